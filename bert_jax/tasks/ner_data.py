"""Token classification (CoNLL-2003 NER): readers, word-piece alignment, entity metrics.

TFDS `conll2003` (`config.data_source='tfds:conll2003'`) is a second source, read into the same
sentences. Files are read exactly as CoNLL-2003 distributes them: one word per line with
whitespace-separated columns (word first, tag last), `-DOCSTART-` lines, blank lines
between sentences. Tags in IOB1 (the original files: an entity starts with `I-` unless it
follows one of the same type) or IOB2 are both read and converted to IOB2.

Alignment: a word's label goes on its first sub-token; the other sub-tokens, [CLS], [SEP]
and padding get IGNORE and count in no loss. A sentence longer than the model's input is
split into overlapping windows (`tasks.windows`), and every word is labelled, and later
predicted, in exactly one window: the one where its first sub-token has the most context.

Metrics are entity-level precision, recall and F1 per type and overall, from seqeval in its
default mode (the conlleval definition).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

import numpy as np
from etils import epath

from bert_jax.losses import IGNORE  # label id of positions outside every loss
from bert_jax.tasks import tfds_split, windows

SPLIT_FILES = {  # split -> file names, CoNLL-2003's own first
    "train": ("eng.train", "train.txt"),
    "dev": ("eng.testa", "dev.txt"),
    "test": ("eng.testb", "test.txt"),
}
_TAG = re.compile(r"^(O|([BI])-(\S+))$")


@dataclasses.dataclass(frozen=True)
class Sentence:
    words: list[str]
    tags: list[str]  # IOB2
    line: int        # 1-based line of the first word, for messages


def find_split_files(data_dir: str) -> dict[str, str]:
    """{split: path} of the CoNLL files present in data_dir (eng.train or train.txt, ...)."""
    directory = epath.Path(data_dir)
    found = {}
    for split, names in SPLIT_FILES.items():
        path = next((directory / n for n in names if (directory / n).exists()), None)
        if path is not None:
            found[split] = str(path)
    if "train" not in found:
        raise FileNotFoundError(f"{data_dir}: no eng.train or train.txt (CoNLL-2003 files expected)")
    return found


def to_iob2(tags: Sequence[str]) -> list[str]:
    """IOB1 or IOB2 -> IOB2: an I-X that does not continue an X entity starts one (B-X)."""
    out = []
    for tag in tags:
        if tag.startswith("I-") and (not out or out[-1][2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
    return out


def read_conll(path: str, labels: Sequence[str] | None = None) -> list[Sentence]:
    """Sentences of a CoNLL file, tags in IOB2; `labels` (if given) must contain every tag."""
    sentences, words, tags, raw_lines, first_line, columns = [], [], [], [], 0, None
    allowed = None if labels is None else set(labels)

    def end_sentence():
        nonlocal words, tags, raw_lines
        if words:
            iob2 = to_iob2(tags)
            if allowed is not None:
                for tag, number in zip(iob2, raw_lines):
                    if tag not in allowed:
                        raise ValueError(f"{path}:{number}: tag {tag} is not in the label set "
                                         f"({', '.join(sorted(allowed))})")
            sentences.append(Sentence(words, iob2, first_line))
        words, tags, raw_lines = [], [], []

    for number, line in enumerate(epath.Path(path).read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields:
            end_sentence()
            continue
        if columns is None:
            columns = len(fields)
            if columns < 2:
                raise ValueError(f"{path}:{number}: one column; expected a word and a tag per line")
        elif len(fields) != columns:
            raise ValueError(f"{path}:{number}: {len(fields)} columns where the file has {columns}")
        if fields[0] == "-DOCSTART-":
            end_sentence()
            continue
        if not _TAG.match(fields[-1]):
            raise ValueError(f"{path}:{number}: tag {fields[-1]!r} is not O, B-TYPE or I-TYPE (IOB1/IOB2)")
        if not words:
            first_line = number
        words.append(fields[0])
        tags.append(fields[-1])
        raw_lines.append(number)
    end_sentence()
    if not sentences:
        raise ValueError(f"{path}: no sentences")
    return sentences


TFDS_SPLITS = {"train": "train", "dev": "dev", "test": "test"}  # TFDS conll2003's split names


def sentences_from_tfds(examples: Iterable[dict], tag_names: Sequence[str], source: str,
                        labels: Sequence[str] | None = None) -> list[Sentence]:
    """TFDS `conll2003` examples (`tokens`: words as bytes, `ner`: tag ids into `tag_names`)
    -> sentences in IOB2; `line` is the example's 1-based position in the split."""
    allowed = None if labels is None else set(labels)
    sentences = []
    for number, example in enumerate(examples, 1):
        words = [w.decode("utf-8") if isinstance(w, bytes) else str(w) for w in example["tokens"]]
        tags = to_iob2([tag_names[int(t)] for t in example["ner"]])
        if len(words) != len(tags):
            raise ValueError(f"{source}: example {number} has {len(words)} tokens but {len(tags)} ner tags")
        bad = [t for t in tags if not _TAG.match(t) or (allowed is not None and t not in allowed)]
        if bad:
            raise ValueError(f"{source}: example {number}: tag {bad[0]} is not in the label set "
                             f"({', '.join(sorted(allowed or ()))}) or not IOB")
        if words:
            sentences.append(Sentence(words, tags, number))
    if not sentences:
        raise ValueError(f"{source}: no sentences")
    return sentences


def tfds_tag_names(builder) -> tuple[str, ...]:
    """The tags of a TFDS conll2003 builder's `ner` feature, in id order (its label set)."""
    return tuple(builder.info.features["ner"].feature.names)


def read_tfds(name: str, split: str, data_dir: str | None, labels: Sequence[str] | None = None) -> list[Sentence]:
    """Sentences of TFDS `name` (conll2003) split `split` (train, dev, test), prepared under data_dir."""
    builder, examples = tfds_split.open_split(name, TFDS_SPLITS[split], data_dir)
    return sentences_from_tfds(examples, tfds_tag_names(builder), f"tfds:{name}:{TFDS_SPLITS[split]}", labels)


def label_set(sentences: Sequence[Sentence]) -> tuple[str, ...]:
    """O, then B-TYPE and I-TYPE for each entity type seen (sorted)."""
    types = sorted({tag[2:] for s in sentences for tag in s.tags if tag != "O"})
    return ("O",) + tuple(f"{p}-{t}" for t in types for p in "BI")


@dataclasses.dataclass
class Features:
    """One entry per window: `[CLS] sub-tokens [SEP]`, unpadded."""
    token_ids: list[np.ndarray]
    label_ids: list[np.ndarray]  # per token: the word's label id where this window predicts it, else IGNORE
    word_ids: list[np.ndarray]   # per token: index of the word predicted there, else -1
    sentence_ids: np.ndarray     # the sentence each window comes from

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(t) for t in self.token_ids), np.int32, len(self.token_ids))


def featurize(sentences: Sequence[Sentence], tokenizer, labels: Sequence[str], max_seq_length: int,
              stride: int | None = None) -> Features:
    """Windows of at most max_seq_length tokens; consecutive windows of one sentence start
    `stride` sub-tokens apart (default: half a window, so each word sees context)."""
    window = max_seq_length - 2
    if window < 1:
        raise ValueError(f"max_seq_length={max_seq_length} leaves no room for text")
    stride = stride or max(1, window // 2)
    label_id = {label: i for i, label in enumerate(labels)}
    all_words = [w for s in sentences for w in s.words]
    # A word the tokenizer drops entirely (control characters) still needs a position.
    pieces = [p or [tokenizer.unk_id] for p in tokenizer.encode_batch(all_words)]
    token_ids, label_ids, word_ids, sentence_ids = [], [], [], []
    offset = 0
    for index, sentence in enumerate(sentences):
        word_pieces = pieces[offset: offset + len(sentence.words)]
        offset += len(sentence.words)
        flat = np.array([t for p in word_pieces for t in p], np.int32)
        word_of = np.repeat(np.arange(len(word_pieces)), [len(p) for p in word_pieces])
        is_first = np.zeros(len(flat), bool)
        is_first[np.cumsum([0] + [len(p) for p in word_pieces[:-1]])] = True
        gold = np.array([label_id[t] for t in sentence.tags], np.int32)
        spans = windows.spans(len(flat), window, stride)
        owner = windows.max_context_window(spans, len(flat))
        for k, (start, size) in enumerate(spans):
            part = slice(start, start + size)
            predicted = is_first[part] & (owner[part] == k)
            words_here = np.where(predicted, word_of[part], -1)
            token_ids.append(np.concatenate([[tokenizer.cls_id], flat[part], [tokenizer.sep_id]]).astype(np.int32))
            word_ids.append(np.pad(words_here, 1, constant_values=-1).astype(np.int32))
            label_ids.append(np.pad(np.where(predicted, gold[word_of[part]], IGNORE), 1,
                                    constant_values=IGNORE).astype(np.int32))
            sentence_ids.append(index)
    return Features(token_ids, label_ids, word_ids, np.array(sentence_ids, np.int32))


def word_predictions(features: Features, token_predictions: Sequence[np.ndarray],
                     sentence_lengths: Sequence[int], dtype=np.int32) -> list[np.ndarray]:
    """Per sentence, the label id (or any non-negative value per token, of `dtype`) predicted
    for each word, read from the token predictions (one array per window, aligned with its
    tokens, padding allowed after them)."""
    out = [np.full(n, -1, dtype) for n in sentence_lengths]
    for window, predictions in enumerate(token_predictions):
        words = features.word_ids[window]
        positions = np.nonzero(words >= 0)[0]
        out[features.sentence_ids[window]][words[positions]] = np.asarray(predictions)[positions]
    missing = [i for i, words in enumerate(out) if (words < 0).any()]
    if missing:
        raise ValueError(f"sentences {missing[:5]} have words predicted in no window")
    return out


def entity_metrics(gold_tags: Sequence[Sequence[str]], predicted_tags: Sequence[Sequence[str]]) -> dict:
    """Entity-level micro precision/recall/F1 (conlleval) and the same per type ('PER/f1', ...)."""
    from seqeval.metrics import classification_report

    report = classification_report(list(map(list, gold_tags)), list(map(list, predicted_tags)),
                                   output_dict=True, zero_division=0)
    metrics = {}
    for name, row in report.items():
        if name in ("macro avg", "weighted avg"):
            continue
        prefix = "" if name == "micro avg" else f"{name}/"
        metrics.update({f"{prefix}precision": float(row["precision"]), f"{prefix}recall": float(row["recall"]),
                        f"{prefix}f1": float(row["f1-score"]), f"{prefix}support": int(row["support"])})
    return metrics


def write_conll(path, sentences: Sequence[Sentence], predicted_tags: Sequence[Sequence[str]]) -> None:
    """`word gold predicted` per line, a blank line after each sentence (conlleval's input)."""
    lines = []
    for sentence, predicted in zip(sentences, predicted_tags, strict=True):
        lines += [f"{w} {g} {p}" for w, g, p in zip(sentence.words, sentence.tags, predicted, strict=True)]
        lines.append("")
    epath.Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
