"""GLUE data: the task registry, readers (GLUE's TSV layout and TFDS), featurisation,
batching and submission files (`bert_jax.tasks.glue` makes the fine-tuning task of them).

Readers return a `GlueSplit`: parallel lists of texts, integer label ids (float scores
for STS-B) or None for test files, and the `index` column used in submission files.
TSV files are parsed exactly as GLUE distributes them: tab-separated with literal quote
characters (no CSV quoting), an optional UTF-8 byte-order mark (MRPC), CoLA's train and
dev files without a header, and test files with an `index` column and no labels.

Label ids follow TFDS's `glue/*` label order, so both sources give the same ids.
Batches use Google's names (`input_ids`, `input_mask`, `segment_ids`, `label_ids`,
`is_real_example`) and are padded to the smallest of a few bucket lengths that fits
(dynamic padding with a bounded number of compiled shapes).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
from typing import Iterator, Sequence

import numpy as np

from bert_jax.tasks import batching, tfds_split

_BINARY = ("0", "1")
_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """How one task's files look and how it is scored."""
    name: str                      # config key: 'mrpc'
    dir_name: str                  # GLUE directory: 'MRPC'
    labels: tuple[str, ...] | None  # label spellings in id order (None: regression)
    text_columns: tuple[str, ...]  # TSV header names of the one or two text columns
    label_column: str              # TSV header name of the label ('' for CoLA's headerless files)
    tfds_name: str                 # 'glue/mrpc'
    tfds_text: tuple[str, ...]     # TFDS feature names of the texts
    metric: str                    # 'mcc' | 'accuracy' | 'f1_accuracy' | 'correlation'
    dev_files: dict[str, str]      # evaluation name -> TSV file stem / TFDS split
    test_files: dict[str, str]     # submission file stem -> TSV file stem ('AX': AX's own file)
    tfds_dev: dict[str, str] = dataclasses.field(default_factory=dict)
    tfds_test: dict[str, str] = dataclasses.field(default_factory=dict)
    index_column: str = "index"

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def primary_metric(self) -> str:
        """The dev metric used to choose among learning rates and seeds."""
        return f"{next(iter(self.dev_files))}/{self.metric}"  # glue_metrics names the mean after the kind


def _task(name, dir_name, labels, text_columns, label_column, tfds_text, metric,
          dev=None, test=None, tfds_dev=None, tfds_test=None, **kw) -> GlueTask:
    return GlueTask(name=name, dir_name=dir_name, labels=labels, text_columns=text_columns,
                    label_column=label_column, tfds_name=f"glue/{name}", tfds_text=tfds_text,
                    metric=metric, dev_files=dev or {"dev": "dev"},
                    test_files=test or {dir_name: "test"},
                    tfds_dev=tfds_dev or {"dev": "validation"},
                    tfds_test=tfds_test or {dir_name: "test"}, **kw)


TASKS: dict[str, GlueTask] = {t.name: t for t in [
    _task("cola", "CoLA", _BINARY, ("sentence",), "", ("sentence",), "mcc"),
    _task("sst2", "SST-2", _BINARY, ("sentence",), "label", ("sentence",), "accuracy"),
    _task("mrpc", "MRPC", _BINARY, ("#1 String", "#2 String"), "Quality",
          ("sentence1", "sentence2"), "f1_accuracy"),
    _task("qqp", "QQP", _BINARY, ("question1", "question2"), "is_duplicate",
          ("question1", "question2"), "f1_accuracy", index_column="id"),
    _task("stsb", "STS-B", None, ("sentence1", "sentence2"), "score",
          ("sentence1", "sentence2"), "correlation"),
    _task("mnli", "MNLI", _NLI3, ("sentence1", "sentence2"), "gold_label",
          ("premise", "hypothesis"), "accuracy",
          dev={"dev_matched": "dev_matched", "dev_mismatched": "dev_mismatched"},
          test={"MNLI-m": "test_matched", "MNLI-mm": "test_mismatched", "AX": "AX"},
          tfds_dev={"dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"},
          tfds_test={"MNLI-m": "test_matched", "MNLI-mm": "test_mismatched", "AX": "glue/ax:test"}),
    _task("qnli", "QNLI", _NLI2, ("question", "sentence"), "label",
          ("question", "sentence"), "accuracy"),
    _task("rte", "RTE", _NLI2, ("sentence1", "sentence2"), "label",
          ("sentence1", "sentence2"), "accuracy"),
    _task("wnli", "WNLI", _BINARY, ("sentence1", "sentence2"), "label",
          ("sentence1", "sentence2"), "accuracy"),
    # Not GLUE: "is sentence2 the sentence that follows sentence1?", made from any corpus by
    # `write_continuation_task` in GLUE's RTE-like file format.
    _task("continuation", "continuation", _BINARY, ("sentence1", "sentence2"), "label",
          ("sentence1", "sentence2"), "f1_accuracy", test={"continuation": "test"}),
]}
GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "ax": "mnli", "mnli-m": "mnli", "mnli-mm": "mnli"}


def canonical_name(name: str) -> str | None:
    """'MRPC', 'sst-2', 'ax' -> the task's key in TASKS; None for a name that is no GLUE task."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in TASKS else None


def get_task(name: str) -> GlueTask:
    key = canonical_name(name)
    if key is None:
        raise ValueError(f"unknown GLUE task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key]


@dataclasses.dataclass
class GlueSplit:
    """One split of one task; `labels` is None for unlabelled (test) files."""
    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray | None      # int32 label ids, or float32 scores for regression
    index: list[str]               # the file's `index` column (row number when absent)
    source: str = ""               # file or dataset the split came from, for messages

    def __len__(self) -> int:
        return len(self.text_a)


# ---------------------------------------------------------------------------- TSV


def _tsv_path(glue_dir: str, task: GlueTask, stem: str) -> str:
    if task.name == "mnli" and stem == "AX":
        candidates = [os.path.join(glue_dir, "AX", "test.tsv"),
                      os.path.join(glue_dir, "diagnostic", "diagnostic.tsv")]
    else:
        candidates = [os.path.join(glue_dir, task.dir_name, f"{stem}.tsv"),
                      os.path.join(glue_dir, f"{stem}.tsv")]  # glue_dir may be the task's own dir
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"GLUE {task.dir_name} split {stem!r} not found: looked for "
                            + " and ".join(candidates))


def _parse_label(task: GlueTask, raw: str, where: str):
    if task.is_regression:
        try:
            score = float(raw)
        except ValueError:
            score = math.nan
        if not 0.0 <= score <= 5.0:
            raise ValueError(f"{where}: {task.dir_name} score {raw!r} is not a number in [0, 5]")
        return score
    if raw not in task.labels:
        raise ValueError(f"{where}: {task.dir_name} label {raw!r} is not one of {list(task.labels)}")
    return task.labels.index(raw)


def read_tsv(path: str, task: GlueTask, *, labelled: bool, skip_bad_rows: bool = False) -> GlueSplit:
    """Reads one GLUE TSV file as distributed (see module docstring)."""
    headerless = task.name == "cola" and labelled
    # utf-8-sig drops MRPC's byte-order mark; newline='' keeps a stray '\r' inside a field.
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = [line.rstrip("\n").removesuffix("\r") for line in f]
    if headerless:
        header = ["source", "label", "original_label", "sentence"]
        text_idx, label_idx, index_idx, first = [3], 1, None, 0
    else:
        if not lines:
            raise ValueError(f"{path}: empty file, expected a header line")
        header = lines[0].split("\t")
        wanted = list(task.text_columns) + ([task.label_column] if labelled else [])
        missing = [c for c in wanted if c not in header]
        if missing:
            raise ValueError(f"{path}:1: header {header} lacks column(s) {missing} "
                             f"expected for {task.dir_name} ({'labelled' if labelled else 'test'} file)")
        text_idx = [header.index(c) for c in task.text_columns]
        label_idx = header.index(task.label_column) if labelled else None
        # MNLI dev files carry label1..label5 before gold_label; the header names the right one.
        index_idx = header.index(task.index_column) if task.index_column in header else None
        first = 1
    texts: list[list[str]] = [[] for _ in text_idx]
    labels, index, skipped = [], [], 0
    for line_no, line in enumerate(lines[first:], first + 1):
        if not line:
            continue  # a trailing empty line
        fields = line.split("\t")
        where = f"{path}:{line_no}"
        if len(fields) != len(header):
            if skip_bad_rows:
                skipped += 1
                continue
            raise ValueError(f"{where}: expected {len(header)} tab-separated columns {header}, found "
                             f"{len(fields)} (set config.skip_bad_rows=True to drop such rows)")
        for column, i in zip(texts, text_idx):
            column.append(fields[i])
        if label_idx is not None:
            labels.append(_parse_label(task, fields[label_idx], where))
        index.append(fields[index_idx] if index_idx is not None else str(len(index)))
    if skipped:
        logging.warning("%s: dropped %d row(s) with the wrong number of columns", path, skipped)
    label_array = None
    if labelled:
        label_array = np.asarray(labels, np.float32 if task.is_regression else np.int32)
    return GlueSplit(texts[0], texts[1] if len(texts) > 1 else None, label_array, index, path)


def load_tsv_split(glue_dir: str, task: GlueTask, stem: str, *, labelled: bool,
                   skip_bad_rows: bool = False) -> GlueSplit:
    # AX (`index sentence1 sentence2`) is read with MNLI's text columns, like a test file.
    path = _tsv_path(glue_dir, task, stem)
    return read_tsv(path, task, labelled=labelled, skip_bad_rows=skip_bad_rows)


# ---------------------------------------------------------------------------- TFDS


def load_tfds_split(data_dir: str | None, task: GlueTask, split: str, *, labelled: bool) -> GlueSplit:
    """Reads `glue/<task>` prepared under `data_dir` (never downloads)."""
    name, split_name = task.tfds_name, split
    if ":" in split:  # 'glue/ax:test'
        name, split_name = split.split(":")
    _, examples = tfds_split.open_split(name, split_name, data_dir)
    texts = [[] for _ in task.tfds_text]
    labels, index = [], []
    for example in examples:
        for column, feature in zip(texts, task.tfds_text):
            column.append(example[feature].decode("utf-8"))
        labels.append(example["label"])
        index.append(str(int(example["idx"])))
    # TFDS shards may come back out of order; GLUE submissions are listed by index.
    order = np.argsort(np.asarray(index, np.int64), kind="stable")
    texts = [[column[i] for i in order] for column in texts]
    index = [index[i] for i in order]
    label_array = None
    if labelled:
        label_array = np.asarray(labels)[order].astype(np.float32 if task.is_regression else np.int32)
        if not task.is_regression and ((label_array < 0) | (label_array >= task.num_labels)).any():
            raise ValueError(f"TFDS {name}:{split_name} has labels outside 0..{task.num_labels - 1}")
    source = f"tfds:{name}:{split_name}"
    return GlueSplit(texts[0], texts[1] if len(texts) > 1 else None, label_array, index, source)


def load_task(task: GlueTask, *, glue_dir: str | None = None, tfds_data_dir: str | None = None,
              use_tfds: bool = False, skip_bad_rows: bool = False, with_test: bool = True
              ) -> dict[str, dict[str, GlueSplit]]:
    """{'train': {'train': ...}, 'dev': {name: ...}, 'test': {submission stem: ...}}.

    A missing AX file only logs a warning (it is not part of the MNLI download).
    """
    if task.name == "continuation" and not glue_dir:
        raise ValueError("task 'continuation' is read from TSV files: set config.glue_dir to the directory "
                         "written by write_continuation_task")
    if glue_dir and not use_tfds:
        def load(kind, stem, labelled):
            return load_tsv_split(glue_dir, task, stem, labelled=labelled, skip_bad_rows=skip_bad_rows)
        dev_files, test_files = task.dev_files, task.test_files
    else:
        def load(kind, split, labelled):
            return load_tfds_split(tfds_data_dir, task, split, labelled=labelled)
        dev_files, test_files = task.tfds_dev, task.tfds_test
    out = {"train": {"train": load("train", "train", True)},
           "dev": {name: load("dev", stem, True) for name, stem in dev_files.items()},
           "test": {}}
    if with_test:
        for name, stem in test_files.items():
            try:
                out["test"][name] = load("test", stem, False)
            except FileNotFoundError as error:
                if name != "AX":
                    raise
                logging.warning("skipping AX predictions: %s", error)
    return out


# ---------------------------------------------------------------------------- features


def _truncate_pair(a: list[int], b: list[int], max_tokens: int) -> None:
    """Google's run_classifier rule: drop one token at a time from the longer sequence."""
    while len(a) + len(b) > max_tokens:
        (a if len(a) > len(b) else b).pop()


def _encode_all(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    encode_batch = getattr(tokenizer, "encode_batch", None)
    if encode_batch is not None:
        return [list(ids) for ids in encode_batch(list(texts))]
    return [list(tokenizer.encode(text)) for text in texts]


@dataclasses.dataclass
class Features:
    """Unpadded token ids of one split: `[CLS] a [SEP] (b [SEP])`."""
    token_ids: list[np.ndarray]
    first_segment_lengths: np.ndarray  # tokens in segment 0, including [CLS] and the first [SEP]
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(t) for t in self.token_ids), np.int32, len(self.token_ids))


def featurize(split: GlueSplit, tokenizer, max_seq_length: int) -> Features:
    if max_seq_length < 4:
        raise ValueError(f"max_seq_length={max_seq_length} leaves no room for text")
    a_ids = _encode_all(tokenizer, split.text_a)
    b_ids = _encode_all(tokenizer, split.text_b) if split.text_b is not None else None
    token_ids, first_lengths = [], np.zeros(len(split), np.int32)
    cls, sep = tokenizer.cls_id, tokenizer.sep_id
    for i, a in enumerate(a_ids):
        if b_ids is None:
            a = a[: max_seq_length - 2]
            ids = [cls, *a, sep]
            first_lengths[i] = len(ids)
        else:
            b = b_ids[i]
            _truncate_pair(a, b, max_seq_length - 3)
            ids = [cls, *a, sep, *b, sep]
            first_lengths[i] = len(a) + 2
        token_ids.append(np.asarray(ids, np.int32))
    return Features(token_ids, first_lengths, split.labels)


def bucket_lengths(max_seq_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` up to max_seq_length: few shapes, little padding."""
    sizes, size = [], smallest
    while size < max_seq_length:
        sizes.append(size)
        size *= 2
    return tuple(sizes) + (max_seq_length,)


def pad_batch(features: Features, indices: Sequence[int], batch_size: int,
              buckets: Sequence[int], pad_id: int, regression: bool) -> dict[str, np.ndarray]:
    """Pads examples `indices` to [batch_size, bucket]; fill rows have is_real_example=0."""
    length = batching.bucket_length([len(features.token_ids[i]) for i in indices], buckets)
    batch = batching.encoder_inputs([features.token_ids[i] for i in indices],
                                    [features.first_segment_lengths[i] for i in indices], batch_size, length, pad_id)
    batch["label_ids"] = np.zeros((batch_size,), np.float32 if regression else np.int32)
    if features.labels is not None:
        batch["label_ids"][: len(indices)] = features.labels[np.asarray(indices, np.int64)]
    batch["is_real_example"] = (np.arange(batch_size) < len(indices)).astype(np.float32)
    return batch


def pack_batch(features: Features, indices: Sequence[int], row_length: int, max_per_row: int, pad_id: int,
               regression: bool, rows_multiple: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Packs examples `indices` into rows of `row_length` tokens (`batching.pack_rows`; the row
    count rounded up by `batching.packed_row_count`: to a multiple of `rows_multiple`, or with 0
    to its ladder). -> (batch, examples): label_ids and
    is_real_example are [rows, max_per_row], one per (row, slot), and `examples` holds the
    example index of each slot (-1: empty)."""
    indices = np.asarray(indices, np.int64)
    rows = batching.pack_rows([len(features.token_ids[i]) for i in indices], row_length, max_per_row)
    num_rows = batching.packed_row_count(len(rows), rows_multiple)
    batch, slots = batching.packed_encoder_inputs(
        [features.token_ids[i] for i in indices], features.first_segment_lengths[indices], rows, num_rows,
        row_length, max_per_row, pad_id)
    real = slots >= 0
    examples = np.where(real, indices[np.maximum(slots, 0)], -1)
    batch["label_ids"] = np.zeros(slots.shape, np.float32 if regression else np.int32)
    if features.labels is not None:
        batch["label_ids"][real] = features.labels[examples[real]]
    batch["is_real_example"] = real.astype(np.float32)
    return batch, examples


@dataclasses.dataclass(frozen=True)
class Layout:
    """How examples become a batch: padded one per row to the smallest bucket that holds the
    longest (`packing` False), or packed several per row of `row_length` tokens."""
    buckets: tuple[int, ...]
    pad_id: int
    regression: bool = False
    packing: bool = False
    row_length: int = 128
    max_per_row: int = 1
    rows_multiple: int = 0  # packed row counts: batching.packed_row_count

    def batch(self, features: Features, indices: Sequence[int], batch_size: int
              ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(batch, examples): `examples` [batch_size] or [rows, max_per_row] is the example index
        behind each row's (slot's) label and logits, -1 for fill."""
        if self.packing:
            return pack_batch(features, indices, self.row_length, self.max_per_row, self.pad_id, self.regression,
                              self.rows_multiple)
        batch = pad_batch(features, indices, batch_size, self.buckets, self.pad_id, self.regression)
        examples = np.full((batch_size,), -1, np.int64)
        examples[: len(indices)] = indices
        return batch, examples


def train_batch_indices(lengths: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                        group_batches: int = 50) -> list[np.ndarray]:
    """One epoch's batches (example indices): random order, examples of similar length together.

    Shuffles, sorts by length within windows of `group_batches` batches, then shuffles the
    batches: random order, little padding. Deterministic in (seed, epoch).
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = batch_size * group_batches
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start: start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def train_batches(features: Features, batch_size: int, layout: Layout, *, seed: int, epoch: int
                  ) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `batch_size` examples in the order of `train_batch_indices`, made as they are
    consumed (big tasks stay small in memory). The last batch holds fewer examples (fill weighs
    is_real_example=0: no example is dropped, padded shapes stay fixed). Packed batches take
    examples of any length together (no length grouping: packing wastes little on mixed lengths)."""
    for indices in train_batch_indices(features.lengths, batch_size, seed=seed, epoch=epoch,
                                       group_batches=1 if layout.packing else 50):
        yield layout.batch(features, indices, batch_size)[0]


def eval_batches(features: Features, batch_size: int, layout: Layout
                 ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(examples, batch) of `batch_size` examples, sorted by length so padded batches pad little
    (packed ones mix lengths: in file order); `examples` (see `Layout.batch`) says where each
    output goes."""
    order = np.arange(len(features)) if layout.packing else np.argsort(features.lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        batch, examples = layout.batch(features, order[start: start + batch_size], batch_size)
        yield examples, batch


# ---------------------------------------------------------------------------- continuation task


def _clean(sentence: str) -> str:
    # GLUE files cannot hold tabs or newlines inside a field.
    return " ".join(sentence.split())


def write_continuation_task(documents: Sequence[Sequence[str]], out_dir: str, seed: int = 0, *,
                            dev_fraction: float = 0.1, test_fraction: float = 0.1,
                            max_examples: int | None = None) -> dict[str, int]:
    """Writes a binary GLUE-format task: is sentence2 the sentence that follows sentence1?

    `documents` are lists of sentences. Each adjacent pair gives one example: label 1 with the
    true next sentence, or (with probability 1/2) label 0 with a random sentence from another
    document. Files `train.tsv`, `dev.tsv` (`index sentence1 sentence2 label`) and `test.tsv`
    (no label) go to `out_dir`, read back with `--config.task=continuation
    --config.glue_dir=out_dir`. Returns the number of rows per file.
    """
    docs = [[s for s in (_clean(x) for x in doc) if s] for doc in documents]
    docs = [d for d in docs if d]
    if len(docs) < 2:
        raise ValueError("write_continuation_task needs at least two non-empty documents "
                         "(negatives come from another document)")
    rng = random.Random(seed)
    examples = []
    for d, doc in enumerate(docs):
        for first, following in zip(doc, doc[1:]):
            if rng.random() < 0.5:
                examples.append((first, following, "1"))
            else:
                other = rng.randrange(len(docs) - 1)
                other += other >= d  # any document but this one
                examples.append((first, rng.choice(docs[other]), "0"))
    rng.shuffle(examples)
    if max_examples:
        examples = examples[:max_examples]
    n_dev = max(1, int(len(examples) * dev_fraction))
    n_test = max(1, int(len(examples) * test_fraction))
    if len(examples) < n_dev + n_test + 2:
        raise ValueError(f"only {len(examples)} sentence pairs: too few for train/dev/test")
    splits = {"dev": examples[:n_dev], "test": examples[n_dev: n_dev + n_test],
              "train": examples[n_dev + n_test:]}
    os.makedirs(out_dir, exist_ok=True)
    for name, rows in splits.items():
        labelled = name != "test"
        tmp = os.path.join(out_dir, f".{name}.tsv.tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write("index\tsentence1\tsentence2" + ("\tlabel" if labelled else "") + "\n")
            for i, (a, b, label) in enumerate(rows):
                f.write(f"{i}\t{a}\t{b}" + (f"\t{label}" if labelled else "") + "\n")
        os.replace(tmp, os.path.join(out_dir, f"{name}.tsv"))  # never leave half a file
    return {name: len(rows) for name, rows in splits.items()}


# ---------------------------------------------------------------------------- submissions


def format_predictions(task: GlueTask, predictions: np.ndarray) -> list[str]:
    """Class ids -> the label spellings GLUE's server expects; STS-B scores clipped to [0, 5]."""
    if task.is_regression:
        return [f"{x:.3f}" for x in np.clip(np.asarray(predictions, np.float64), 0.0, 5.0)]
    return [task.labels[int(i)] for i in predictions]


def write_submission(task: GlueTask, name: str, split: GlueSplit, predictions: np.ndarray,
                     out_dir: str) -> str:
    """Writes `<out_dir>/<name>.tsv` (`index<TAB>prediction`, one row per test example)."""
    if len(predictions) != len(split):
        raise ValueError(f"{name}: {len(predictions)} predictions for {len(split)} test examples")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.tsv")
    with open(path + ".tmp", "w", encoding="utf-8", newline="") as f:
        f.write("index\tprediction\n")
        for index, label in zip(split.index, format_predictions(task, predictions)):
            f.write(f"{index}\t{label}\n")
    os.replace(path + ".tmp", path)
    return path
