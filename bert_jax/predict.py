r"""A fine-tuned model on new text: labels, entities or answers, as JSON lines.

    python -m bert_jax.predict --model DIR --text "A gripping, beautifully made film."
    python -m bert_jax.predict --model DIR --text "The cat sat." --text_pair "A cat was sitting."
    python -m bert_jax.predict --model DIR --text "Angela Merkel visited Paris."
    python -m bert_jax.predict --model DIR --text PASSAGE --question "Who visited Paris?"
    python -m bert_jax.predict --model DIR --input texts.jsonl [--output predictions.jsonl]

DIR: a fine-tuning workdir (`bert_jax.finetune --workdir`; its one task's fine-tuned model),
its `<task>/checkpoint`, an export of it (`bert_jax.convert`), or a Hugging Face directory
of a `BertForSequenceClassification`, `BertForTokenClassification` or
`BertForQuestionAnswering` (label names from config.json's id2label). The head says what is
predicted (bert_jax/inference.py, `InferenceModel.predict`):

  classifier  {"label": ..., "probabilities": {label: p}}  (regression: {"score": ...})
  tagger      {"entities": [{"type", "text", "start", "end", "score"}]}
  QA          {"answer": ..., "start": ..., "end": ..., "score": start + end logit}

start/end are character offsets into the text. --input: one JSON object per line with
"text", and "text_pair" (pair classifiers) or "question" (QA); every output line is the input
object plus "prediction". Without --output, lines go to stdout. A progress bar runs on a
terminal (--noprogress_bar turns it off). Exit codes: 0 done, 2 bad input (one line on stderr:
the file and line, or the model and what it is when the input does not fit its head).
"""
from __future__ import annotations

import json
import logging
import sys

from absl import flags
from etils import epath

from bert_jax import cli, weights
from bert_jax.inference import InferenceModel

PROG = "python -m bert_jax.predict"


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("model", None, "fine-tuned model: a fine-tuning workdir, <task>/checkpoint, an export, "
                        "or a Hugging Face directory with a task head", flag_values=fv)
    flags.DEFINE_enum("format", "auto", ("auto", *weights.FORMATS_IN), "format of --model", flag_values=fv)
    flags.DEFINE_string("tokenizer", None, "tokenizer dir/file (default: the one beside the model)", flag_values=fv)
    flags.DEFINE_string("text", None, "one text (the passage for a QA model)", flag_values=fv)
    flags.DEFINE_string("text_pair", None, "the second text, for a sentence-pair classifier", flag_values=fv)
    flags.DEFINE_string("question", None, "the question, for a question-answering model", flag_values=fv)
    flags.DEFINE_string("input", None, "JSON lines with 'text' (and 'text_pair' or 'question')", flag_values=fv)
    flags.DEFINE_string("output", None, "write the JSON lines here (default: stdout)", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "sequences per forward pass", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("max_seq_length", 0, "tokens per sequence (0: 128, or 384 for QA)", lower_bound=0,
                         flag_values=fv)
    flags.DEFINE_boolean("progress_bar", True, "a progress bar over the batches (only on a terminal)", flag_values=fv)
    flags.mark_flag_as_required("model", flag_values=fv)


def read_records(fv) -> tuple[list[dict], str]:
    """The inputs as JSON objects, and where they came from (for messages)."""
    if (fv.text is None) == (fv.input is None):
        cli.usage_error(PROG, "give exactly one of --text and --input")
    if fv.input is None:
        record = {"text": fv.text}
        record.update({k: fv[k].value for k in ("text_pair", "question") if fv[k].value is not None})
        return [record], "--text"
    if fv.text_pair is not None or fv.question is not None:
        cli.usage_error(PROG, "--text_pair and --question go with --text; in --input files they are fields")
    records = []
    for number, line in enumerate(epath.Path(fv.input).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{fv.input}:{number}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{fv.input}:{number}: expected a JSON object with a \"text\" string")
        records.append(record)
    if not records:
        raise ValueError(f"{fv.input}: no input lines")
    return records, fv.input


def field(records: list[dict], name: str, source: str) -> list[str] | None:
    """Every record's `name`, or None when no record has it; some but not all is an error."""
    have = [name in r for r in records]
    if not any(have):
        return None
    if not all(have):
        raise ValueError(f"{source}:{have.index(False) + 1}: no \"{name}\" field (the other lines have one)")
    return [r[name] for r in records]


@cli.entrypoint
def main(argv=None) -> int:
    fv = cli.parse(argv, define_flags, __doc__, prog=PROG)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    records, source = read_records(fv)
    pairs, questions = field(records, "text_pair", source), field(records, "question", source)
    model = InferenceModel.load(fv.model, fv.format, fv.tokenizer)
    predicted = model.predict([r["text"] for r in records], text_pairs=pairs, questions=questions,
                              batch_size=fv.batch_size,
                              max_seq_length=fv.max_seq_length or None,
                              progress=fv.progress_bar and sys.stderr.isatty())
    lines = "".join(json.dumps({**r, "prediction": p}, ensure_ascii=False) + "\n" for r, p in zip(records, predicted))
    if fv.output:
        epath.Path(fv.output).write_text(lines, encoding="utf-8")
        print(f"{len(records)} predictions ({model.describe()}) written to {fv.output}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
