"""Run a BERT checkpoint on text: any checkpoint :mod:`bert_jax.weights` reads (bert_jax
Orbax, Hugging Face, Google TF, .npz), with the tokenizer that belongs to it.

    model = InferenceModel.load("path/to/checkpoint")
    [first, second] = model.encode(["A sentence.", "Another one."])
    first.tokens, first.hidden        # ['[CLS]', 'a', ..., '[SEP]'], float32 [tokens, hidden]

A fine-tuned model (a fine-tuning workdir, its ``<task>/checkpoint``, or a Hugging Face
``BertFor{Sequence,Token}Classification`` / ``BertForQuestionAnswering`` directory) also
predicts, one call for every head (:meth:`InferenceModel.predict`):

    InferenceModel.load("runs/sst2").predict(["A gripping film."])
        # [{'label': '1', 'probabilities': {'0': 0.03, '1': 0.97}}]   (text_pairs=[...] for pairs)
    InferenceModel.load("runs/ner").predict(["Angela Merkel visited Paris."])
        # [{'entities': [{'type': 'PER', 'text': 'Angela Merkel', 'start': 0, 'end': 13, 'score': 0.98}, ...]}]
    InferenceModel.load("runs/squad").predict([context], questions=["Who ...?"])
        # [{'answer': 'Denver Broncos', 'start': 177, 'end': 191, 'score': 11.2}]

Offsets are characters of the original strings (accents, case, CJK characters included).
Texts are encoded in batches padded to a few lengths (powers of two) so that the jitted
forward compiles a handful of times whatever the texts.
"""
from __future__ import annotations

import dataclasses
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bert_jax import model as M
from bert_jax import params as params_lib
from bert_jax import paths, weights
from bert_jax.tasks import batching, glue_data, predictions

log = logging.getLogger("bert_jax.inference")
MIN_PADDED_LENGTH = 16
# Head -> (task, its fine-tuning default max_seq_length).
TASKS = {"classifier": ("classification", 128), "token_classifier": ("tagging", 128),
         "qa_outputs": ("question_answering", 384)}
RESULTS_FILE = "results.json"  # bert_jax.sweep's


@dataclasses.dataclass
class Encoded:
    tokens: list[str]
    hidden: np.ndarray  # [tokens, hidden_size] float32: the last layer's output


def resolve_model(path) -> str:
    """A fine-tuning workdir (results.json) -> its fine-tuned checkpoint (the chosen run of
    its one task); any other path unchanged."""
    results_file = paths.workdir_path(path) / RESULTS_FILE
    if not results_file.is_file():
        return str(path)
    tasks = {name: entry.get("chosen", {}).get("checkpoint")
             for name, entry in json.loads(results_file.read_text()).get("tasks", {}).items()}
    saved = {name: ckpt for name, ckpt in tasks.items() if ckpt}
    if len(saved) != 1:
        raise ValueError(f"{path}: a fine-tuning workdir with {len(saved)} saved task checkpoints "
                         f"({', '.join(saved) or 'none'}); pass one of them: {path}/<task>/checkpoint")
    return next(iter(saved.values()))
class InferenceModel:
    def __init__(self, pretrained: weights.Pretrained):
        self.config = pretrained.config
        self.tokenizer = pretrained.tokenizer
        self.source = pretrained.source
        self.head = next(iter(pretrained.head), None)  # None: a pretrained encoder
        num_outputs = int(pretrained.head[self.head]["bias"].shape[0]) if self.head else 0
        self.task = None if self.head is None else TASKS[self.head][0]
        if self.task == "classification" and num_outputs == 1:
            self.task = "regression"
        self.labels = None
        if self.head in ("classifier", "token_classifier") and self.task != "regression":
            self.labels = pretrained.labels or tuple(str(i) for i in range(num_outputs))
        model = {None: lambda r: M.BertModel(self.config, rngs=r),
                 "classifier": lambda r: M.BertForSequenceClassification(self.config, num_outputs, rngs=r),
                 "token_classifier": lambda r: M.BertForTokenClassification(self.config, num_outputs, rngs=r),
                 "qa_outputs": lambda r: M.BertForQuestionAnswering(self.config, rngs=r)}[self.head](nnx.Rngs(0))
        params_lib.load_params(model, {"bert": pretrained.encoder, **pretrained.head} if self.head
                               else pretrained.encoder)
        graphdef, self._state = nnx.split(model)
        softmax = self.task in ("classification", "tagging")

        def forward(state, input_ids, input_mask):
            merged = nnx.merge(graphdef, state)
            encoder = merged if self.head is None else merged.bert
            out = encoder(input_ids, input_mask, jnp.zeros_like(input_ids))
            return out["sequence_output"].astype(jnp.float32)

        def head_forward(state, batch):
            out = nnx.merge(graphdef, state)(batch["input_ids"], batch["input_mask"], batch["segment_ids"])
            if self.head == "qa_outputs":
                return jnp.stack([out["start_logits"], out["end_logits"]], -1).astype(jnp.float32)
            logits = out["logits"].astype(jnp.float32)
            return jax.nn.softmax(logits, -1) if softmax else logits

        self._forward = jax.jit(forward)
        self._head_forward = jax.jit(head_forward)

    @classmethod
    def load(cls, path, fmt: str = "auto", tokenizer_path: str | None = None) -> InferenceModel:
        """Any checkpoint `bert_jax.weights` reads, or a fine-tuning workdir (its fine-tuned model)."""
        return cls(weights.load_pretrained_encoder(resolve_model(path), fmt, tokenizer_path or ""))

    def describe(self) -> str:
        if self.task is None:
            return "a pretrained encoder without a fine-tuned task head"
        kind = f"a {self.task.replace('_', '-')} model"
        if not self.labels:
            return kind
        return f"{kind} ({len(self.labels)} labels: {', '.join(self.labels[:6])}{', ...' if len(self.labels) > 6 else ''})"

    def predict(self, texts: list[str], *, text_pairs: list[str] | None = None, questions: list[str] | None = None,
                batch_size: int = 32, max_seq_length: int | None = None, progress: bool = False) -> list[dict]:
        """The fine-tuned head's predictions, one JSON-ready dict per text:

        * classifier: ``{'label', 'probabilities': {label: p}}``; regression ``{'score'}``;
          ``text_pairs``: the second text of each pair (MRPC, MNLI, ...);
        * tagger: ``{'entities': [{'type', 'text', 'start', 'end', 'score'}]}``;
        * question answering (``questions``, one per text, the texts being the passages):
          ``{'answer', 'start', 'end', 'score'}`` (score: start + end logit).

        ``start``/``end`` are character offsets into the text. Sequences are at most
        ``max_seq_length`` tokens (default: the task's fine-tuning default, 128, or 384 for
        QA; at most max_position_embeddings): classifier inputs are truncated, tagger and QA
        texts cut into overlapping windows. ``progress``: a tqdm bar over the batches."""
        if self.task is None:
            raise ValueError(f"{self.source}: {self.describe()}; fine-tune it first (bert_jax.finetune), "
                             "or use bert_jax.encode for hidden states")
        self._check_inputs(texts, text_pairs, questions, batch_size)
        limit = self.config.max_position_embeddings
        length = min(max_seq_length or TASKS[self.head][1], limit)
        if max_seq_length and max_seq_length > limit:
            log.warning("max_seq_length=%d exceeds max_position_embeddings=%d; using %d", max_seq_length, limit, limit)

        def run(token_ids, first_segment_lengths):
            return self._run(token_ids, first_segment_lengths, batch_size, progress)
        if self.head == "classifier":
            return predictions.classify(run, self.tokenizer, self.labels, texts, text_pairs, length)
        if self.head == "token_classifier":
            return predictions.tag(run, self.tokenizer, self.labels, texts, length)
        return predictions.answer(run, self.tokenizer, texts, questions, length)

    def _check_inputs(self, texts, text_pairs, questions, batch_size) -> None:
        if batch_size < 1:
            raise ValueError(f"predict: batch_size={batch_size} must be >= 1")
        if questions is not None and self.task != "question_answering":
            raise ValueError(f"{self.source}: {self.describe()} takes no questions (a question is for a "
                             "question-answering model, e.g. one fine-tuned on SQuAD)")
        if questions is None and self.task == "question_answering":
            raise ValueError(f"{self.source}: {self.describe()} needs a question for each text (the passage)")
        if text_pairs is not None and self.head != "classifier":
            raise ValueError(f"{self.source}: {self.describe()} takes no text pairs (they are for sentence-pair "
                             "classifiers, e.g. MRPC or MNLI)")
        for name, values in (("text_pairs", text_pairs), ("questions", questions)):
            if values is not None and len(values) != len(texts):
                raise ValueError(f"predict: {len(values)} {name} for {len(texts)} texts")
        for name, values in (("text", texts), ("text pair", text_pairs), ("question", questions)):
            for i, value in enumerate(values or ()):
                if not isinstance(value, str) or not value.strip():
                    raise ValueError(f"predict: {name} {i} is empty" + ("" if isinstance(value, str) else
                                                                         f" (not a string: {value!r})"))

    def _run(self, token_ids: list[np.ndarray], first_segment_lengths: np.ndarray | None, batch_size: int,
             progress: bool) -> list[np.ndarray]:
        """The head's outputs for each sequence ([outputs], or [tokens, outputs] unpadded),
        computed `batch_size` sequences of similar length at a time."""
        import tqdm

        lengths = np.fromiter(map(len, token_ids), np.int32, len(token_ids))
        rows = max(1, min(batch_size, len(token_ids)))
        longest = int(lengths.max(initial=1))
        top = min(max(MIN_PADDED_LENGTH, 1 << (longest - 1).bit_length()), self.config.max_position_embeddings)
        buckets = glue_data.bucket_lengths(top, min(MIN_PADDED_LENGTH, top))
        out = [None] * len(token_ids)
        batches = list(batching.eval_batch_indices(lengths, rows))
        for indices in tqdm.tqdm(batches, desc="predict", unit="batch", disable=not progress, leave=False):
            length = batching.bucket_length(lengths[indices], buckets)
            firsts = None if first_segment_lengths is None else first_segment_lengths[indices]
            batch = batching.encoder_inputs([token_ids[i] for i in indices], firsts, rows, length, self.tokenizer.pad_id)
            result = np.asarray(self._head_forward(self._state, batch))
            for row, i in enumerate(indices):
                out[i] = result[row] if self.head == "classifier" else result[row, : lengths[i]]
        return out

    def token_ids(self, text: str, where: str = "text") -> list[int]:
        """``[CLS] text [SEP]``, truncated (with a warning) to max_position_embeddings."""
        if not text or not text.strip():
            raise ValueError(f"encode: {where} is empty")
        ids = self.tokenizer.encode(text)
        limit = self.config.max_position_embeddings - 2
        if len(ids) > limit:
            log.warning("%s has %d tokens; truncated to %d (max_position_embeddings=%d with [CLS] and [SEP])",
                        where, len(ids), limit, self.config.max_position_embeddings)
            ids = ids[:limit]
        return [self.tokenizer.cls_id, *ids, self.tokenizer.sep_id]

    def encode(self, texts: list[str], batch_size: int = 32) -> list[Encoded]:
        """The last hidden states of each text, computed ``batch_size`` texts at a time."""
        if batch_size < 1:
            raise ValueError(f"encode: batch_size={batch_size} must be >= 1")
        ids = [self.token_ids(t, f"text {i}" if len(texts) > 1 else "text") for i, t in enumerate(texts)]
        rows = min(batch_size, len(ids))
        results = []
        for start in range(0, len(ids), rows):
            chunk = ids[start:start + rows]
            hidden = np.asarray(self._forward(self._state, *self._pad(chunk, rows)))
            results += [Encoded(self.tokenizer.ids_to_tokens(seq), hidden[r, :len(seq)])
                        for r, seq in enumerate(chunk)]
        return results

    def _pad(self, chunk: list[list[int]], rows: int) -> tuple[np.ndarray, np.ndarray]:
        """-> input_ids, input_mask [rows, length]; length: the next power of two that holds the
        longest sequence (at least MIN_PADDED_LENGTH, at most max_position_embeddings)."""
        longest = max(map(len, chunk))
        length = min(max(MIN_PADDED_LENGTH, 1 << (longest - 1).bit_length()), self.config.max_position_embeddings)
        input_ids = np.zeros((rows, length), np.int32)
        input_mask = np.zeros((rows, length), np.int32)
        for r, seq in enumerate(chunk):
            input_ids[r, :len(seq)] = seq
            input_mask[r, :len(seq)] = 1
        return input_ids, input_mask
