"""Google/MLPerf BERT pretraining TFRecords: read, write, and random access for Grain.

The format is exactly what google-research/bert's create_pretraining_data.py writes: one
tf.train.Example per instance with

    input_ids, input_mask, segment_ids            int64 x max_seq_length
    masked_lm_positions, masked_lm_ids            int64 x max_predictions_per_seq
    masked_lm_weights                             float x max_predictions_per_seq
    next_sentence_labels                          int64 x 1

We hand back our batch format: the same names, int32 (float32 weights), and
`next_sentence_labels` as int32 [B] (a scalar per example).

    for batch in read_batches("data/*.tfrecord", batch_size=256): ...
    source = TFRecordDataSource("data/*.tfrecord")   # len() and [i]: grain.MapDataset.source(source)
    with TFRecordWriter("out.tfrecord") as writer: writer.write_batch(batch)
"""
from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterable, Iterator

import crc32c
import numpy as np

from bert_jax.data.sources import expand_paths

_OPEN_LOCK = threading.Lock()

INT_FEATURES = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids",
                "next_sentence_labels")
FLOAT_FEATURES = ("masked_lm_weights",)
# Google's order (an OrderedDict in create_pretraining_data.py).
FEATURES = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids",
            "masked_lm_weights", "next_sentence_labels")
_SEQUENCE_FEATURES = ("input_ids", "input_mask", "segment_ids")
_PREDICTION_FEATURES = ("masked_lm_positions", "masked_lm_ids", "masked_lm_weights")


class TFRecordFormatError(ValueError):
    """A TFRecord file does not hold BERT pretraining examples (names the file and feature)."""


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


def _to_batch_format(parsed: dict) -> dict[str, np.ndarray]:
    batch = {name: np.asarray(parsed[name], np.int32) for name in INT_FEATURES}
    batch["masked_lm_weights"] = np.asarray(parsed["masked_lm_weights"], np.float32)
    batch["next_sentence_labels"] = batch["next_sentence_labels"][..., 0]
    return batch


def _lengths_from_example(example, path: str) -> tuple[int, int]:
    """(max_seq_length, max_predictions_per_seq) from one parsed tf.train.Example."""
    features = example.features.feature
    for name in FEATURES:
        if name not in features:
            raise TFRecordFormatError(f"{path}: feature {name!r} missing (has {sorted(features)})")
        kind = features[name].WhichOneof("kind")
        expected = "float_list" if name in FLOAT_FEATURES else "int64_list"
        if kind != expected:
            raise TFRecordFormatError(f"{path}: feature {name!r} is {kind}, expected {expected}")
    length = {name: len(getattr(features[name], features[name].WhichOneof("kind")).value) for name in FEATURES}
    seq, pred = length["input_ids"], length["masked_lm_positions"]
    for names, expected in ((_SEQUENCE_FEATURES, seq), (_PREDICTION_FEATURES, pred), (("next_sentence_labels",), 1)):
        for name in names:
            if length[name] != expected:
                raise TFRecordFormatError(f"{path}: feature {name!r} has {length[name]} values, expected {expected}")
    return seq, pred


def feature_spec(max_seq_length: int, max_predictions_per_seq: int) -> dict:
    """tf.io.parse_example spec of the format (as run_pretraining.py's input_fn)."""
    tf = _tf()
    spec = {name: tf.io.FixedLenFeature([max_seq_length], tf.int64) for name in _SEQUENCE_FEATURES}
    spec["masked_lm_positions"] = tf.io.FixedLenFeature([max_predictions_per_seq], tf.int64)
    spec["masked_lm_ids"] = tf.io.FixedLenFeature([max_predictions_per_seq], tf.int64)
    spec["masked_lm_weights"] = tf.io.FixedLenFeature([max_predictions_per_seq], tf.float32)
    spec["next_sentence_labels"] = tf.io.FixedLenFeature([1], tf.int64)
    return spec


def inspect_file(path: str) -> tuple[int, int]:
    """(max_seq_length, max_predictions_per_seq) of a file, checked on its first record."""
    tf = _tf()
    for record in tf.data.TFRecordDataset(path).take(1):
        return _lengths_from_example(tf.train.Example.FromString(record.numpy()), path)
    raise TFRecordFormatError(f"{path}: no records")


def read_batches(paths, batch_size: int = 256, *, drop_remainder: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Batches in file order (files sorted within each glob), parsed by tf.io.parse_example."""
    tf = _tf()
    for path in expand_paths(paths):
        spec = feature_spec(*inspect_file(path))
        dataset = (tf.data.TFRecordDataset(path, buffer_size=8 << 20)
                   .batch(batch_size, drop_remainder=drop_remainder)
                   .map(lambda serialized: tf.io.parse_example(serialized, spec))  # in-graph, no eager op per batch
                   .prefetch(2))
        batches = 0
        try:
            for parsed in dataset.as_numpy_iterator():
                yield _to_batch_format(parsed)
                batches += 1
        except tf.errors.DataLossError as e:  # TensorFlow checks the CRCs of what it reads
            raise TFRecordFormatError(f"{path}: a record in [{batches * batch_size}, {(batches + 1) * batch_size}) "
                                      "is corrupted (fails its CRC32C check); copy the file again from its "
                                      "source") from e
        except tf.errors.InvalidArgumentError as e:
            raise TFRecordFormatError(f"{path}: a record does not match the first one's shape "
                                      f"({e.message.splitlines()[0]})") from e


def read_examples(paths) -> Iterator[dict[str, np.ndarray]]:
    """One example at a time (arrays without the batch dimension)."""
    for batch in read_batches(paths, 1024):
        for index in range(len(batch["input_ids"])):
            yield {name: value[index] for name, value in batch.items()}


# ---- random access -------------------------------------------------------------------------

def masked_crc(data: bytes) -> int:
    """The CRC32C of `data` masked as TFRecord stores it (rotated right by 15 bits, plus a constant)."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _corrupted(path: str, record: int, what: str) -> TFRecordFormatError:
    return TFRecordFormatError(f"{path}: record {record} is corrupted ({what} fails its CRC32C check); "
                               "copy the file again from its source, or leave it out of data.train_path/eval_path")


def record_offsets(path: str) -> np.ndarray:
    """Byte offsets of every record in an uncompressed TFRecord file (headers only are read,
    and each length is checked against its CRC).

    Framing: uint64 length, uint32 masked crc32c(length), data, uint32 masked crc32c(data)."""
    size = os.path.getsize(path)
    offsets = []
    with open(path, "rb", buffering=1 << 20) as f:
        position = 0
        while position < size:
            header = f.read(12)
            if len(header) < 12:
                raise TFRecordFormatError(f"{path}: truncated record header at byte {position}")
            if struct.unpack("<I", header[8:])[0] != masked_crc(header[:8]):
                raise _corrupted(path, len(offsets), "its length")
            (length,) = struct.unpack("<Q", header[:8])
            end = position + 12 + length + 4
            if end > size:
                raise TFRecordFormatError(f"{path}: record at byte {position} claims {length} bytes, past the "
                                          "end of the file (truncated, or a compressed TFRecord: decompress it)")
            offsets.append(position)
            f.seek(end)
            position = end
    return np.asarray(offsets, np.int64)


class TFRecordDataSource:
    """Random access over Google-format TFRecord files, for `grain.MapDataset.source`.

    Indexes record offsets once (a pass over the headers); `read(indices)` parses a whole
    batch in one tf.io.parse_example call, `[i]` one example. Picklable: worker processes
    reopen the files themselves. Expected lengths, when given, are checked against every file.
    """

    def __init__(self, paths, *, max_seq_length: int | None = None, max_predictions_per_seq: int | None = None):
        self.paths = expand_paths(paths)
        self._offsets = [record_offsets(p) for p in self.paths]
        self._starts = np.cumsum([0] + [len(o) for o in self._offsets])
        shapes = {p: inspect_file(p) for p, o in zip(self.paths, self._offsets) if len(o)}
        if not shapes:
            raise TFRecordFormatError(f"no records in {self.paths}")
        expected = (max_seq_length, max_predictions_per_seq)
        for path, shape in shapes.items():
            if any(e is not None and e != got for e, got in zip(expected, shape)) or shape != next(iter(shapes.values())):
                raise TFRecordFormatError(
                    f"{path}: (max_seq_length, max_predictions_per_seq) is {shape}, expected "
                    f"{expected if None not in expected else next(iter(shapes.values()))}")
        self.max_seq_length, self.max_predictions_per_seq = next(iter(shapes.values()))
        self._files = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        """(file number, record number in that file) of a global record index."""
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)})")
        file_index = int(np.searchsorted(self._starts, index, side="right")) - 1
        return file_index, index - int(self._starts[file_index])

    def _serialized(self, index: int) -> bytes:
        file_index, record = self._locate(int(index))
        path = self.paths[file_index]
        fd = self._files.get(path)
        if fd is None:  # opened lazily, per process
            with _OPEN_LOCK:
                fd = self._files.get(path)
                if fd is None:
                    fd = self._files[path] = os.open(path, os.O_RDONLY)
        # Positional reads: Grain calls __getitem__ from several threads at once, and a
        # shared seek()+read() position would hand one thread another thread's bytes.
        offset = int(self._offsets[file_index][record])
        (length,) = struct.unpack("<Q", os.pread(fd, 12, offset)[:8])
        framed = os.pread(fd, length + 4, offset + 12)
        if len(framed) != length + 4:
            raise TFRecordFormatError(f"{path}: record {record} is truncated")
        data = framed[:length]
        if struct.unpack("<I", framed[length:])[0] != masked_crc(data):
            raise _corrupted(path, record, "its data")
        return data

    def describe(self, index: int) -> str:
        """'FILE record N' of a global record index (for error messages)."""
        file_index, record = self._locate(int(index))
        return f"{self.paths[file_index]} record {record}"

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """One example (arrays without the batch dimension)."""
        return {name: value[0] for name, value in self.read([index]).items()}

    def read(self, indices) -> dict[str, np.ndarray]:
        """The examples at `indices` (any order) as one batch, parsed by tf.io.parse_example."""
        tf = _tf()
        indices = np.asarray(indices, np.int64).reshape(-1)
        records = [self._serialized(i) for i in indices]
        spec = feature_spec(self.max_seq_length, self.max_predictions_per_seq)
        try:
            parsed = tf.io.parse_example(tf.constant(records, tf.string), spec)
        except tf.errors.InvalidArgumentError as e:
            where = ", ".join(f"{self.paths[f]}#{r}" for f, r in map(self._locate, indices[:4].tolist()))
            raise TFRecordFormatError(f"records {where}...: do not match ({self.max_seq_length}, "
                                      f"{self.max_predictions_per_seq}) ({e.message.splitlines()[0]})") from e
        return _to_batch_format({k: v.numpy() for k, v in parsed.items()})

    def __getstate__(self):
        return {**self.__dict__, "_files": {}}

    def __repr__(self) -> str:
        return f"TFRecordDataSource({len(self)} records in {len(self.paths)} files)"


# ---- writing -----------------------------------------------------------------------------

def _check_names(example: dict) -> None:
    missing = [name for name in FEATURES if name not in example]
    if missing:
        raise KeyError(f"example lacks {missing[0]!r} (has {sorted(example)})")


def _as_lists(values: np.ndarray, name: str) -> list:
    return np.asarray(values).astype(np.float32 if name in FLOAT_FEATURES else np.int64).tolist()


def _example_from_lists(values: dict[str, list]):
    example = _tf().train.Example()
    feature = example.features.feature
    for name in FEATURES:  # extend() on the message: about 2x faster than building Feature objects
        target = feature[name].float_list if name in FLOAT_FEATURES else feature[name].int64_list
        target.value.extend(values[name])
    return example


def to_tf_example(example: dict[str, np.ndarray]):
    """One example (unbatched arrays in our format) as a tf.train.Example."""
    _check_names(example)
    return _example_from_lists({name: _as_lists(np.reshape(example[name], -1), name) for name in FEATURES})


class TFRecordWriter:
    """Writes to `path + '.partial'` and renames on a clean close: an existing file is never
    left half-overwritten, and an interrupted write leaves no file that looks complete."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._partial = self.path + ".partial"
        self._writer = _tf().io.TFRecordWriter(self._partial)
        self.count = 0

    def write(self, example: dict[str, np.ndarray]) -> None:
        self._writer.write(to_tf_example(example).SerializeToString())
        self.count += 1

    def write_batch(self, batch: dict[str, np.ndarray]) -> None:
        _check_names(batch)
        size = len(batch["input_ids"])
        columns = {name: _as_lists(np.reshape(batch[name], (size, -1)), name) for name in FEATURES}
        for index in range(size):
            self._writer.write(_example_from_lists({name: columns[name][index] for name in FEATURES}).SerializeToString())
            self.count += 1

    def close(self, commit: bool = True) -> None:
        self._writer.close()
        if commit:
            os.replace(self._partial, self.path)
        elif os.path.exists(self._partial):
            os.remove(self._partial)

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(commit=exc_type is None)


def write_examples(path, examples: Iterable[dict[str, np.ndarray]]) -> int:
    """Write examples (unbatched dicts) to one file; returns how many."""
    with TFRecordWriter(path) as writer:
        for example in examples:
            writer.write(example)
    return writer.count
