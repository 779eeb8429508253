"""Per-host pretraining batches with Grain: seeded shuffle, host sharding, resumable state.

Public API (the trainer calls exactly this):

    it = make_pretraining_loader(
        source,                       # a sources.DataSource of instances: kind prepared (a
                                      # `python -m bert_jax.data.prepare` output directory and
                                      # its split, 'train' or 'eval'), tfrecord (Google/MLPerf
                                      # TFRecord files / globs, static masks) or tfds_corpus
                                      # (such a directory converted by bert_jax.data.tfds_corpus)
        global_batch_size=256, max_seq_length=128, max_predictions_per_seq=20, seed=0,
        dynamic_masking=True,         # False: masks stored by `prepare --static_masking`
        whole_word_masking=False, num_epochs=None,   # None: repeat forever
        objective="mlm_nsp",          # train.objective; "mlm": batches without next_sentence_labels
        host_rows=None,               # rows of each global batch this host loads:
                                      # sharding.process_batch_rows (None: all, one process)
        worker_count=0,               # >0: Grain worker processes (mp_prefetch)
        tokenizer=None,               # optional: checked against the data's vocabulary
        max_instances_per_row=0)      # >0: packed rows of up to that many instances (packing.py)
    batch = next(it)                  # dict of numpy arrays, this host's rows of the global batch
    state = it.get_state()            # small JSON-able dict: store it in the checkpoint
    it.set_state(state)               # continues with exactly the batch that came next

    instances.batch_spec(batch_size, max_seq_length, max_predictions_per_seq) -> {name: (shape, dtype)}

Batch: `input_ids`, `input_mask`, `segment_ids` int32 [B, L]; `masked_lm_positions`,
`masked_lm_ids` int32 [B, P]; `masked_lm_weights` float32 [B, P]; `next_sentence_labels` int32 [B]
(objective mlm_nsp only; a prepared directory records the objective it was made for).

How the stream is laid out: the split's instances are shuffled per epoch (a seeded numpy
permutation per epoch) into one global stream; global batch k is
stream[k*G:(k+1)*G] and a host gets the rows `host_rows` of it (the rows of the batch shards its
devices hold, from the mesh: hosts holding the same shard read the same rows). So global batch k
does not depend on the number of hosts, the mesh or the workers, and the state is just k (plus a
fingerprint checked on restore). Every host gets the same number
of batches (a trailing partial global batch is dropped), so no host waits on a collective alone.
Dynamic masks depend only on (seed, epoch, instance index) (see masking.py).
Every batch is checked on the host as it is read (`checks.check_batch`): token ids within the
vocabulary (the prepared data's, or the tokenizer's for TFRecords) and masked positions within
the sequence; a bad record is an error naming its file and record.
A TFDS conversion holds the directory's rows in the same order, so it gives the same batches,
and a state saved reading one restores reading the other.

Packed (`max_instances_per_row` > 0, bert_jax/data/packing.py): the same stream of instances,
with the same masks, is packed window by window into rows of `max_seq_length` slots, and global
batch k is rows [k*G, (k+1)*G) of the packed stream; the batch has the packing arrays
(`instances.batch_spec(..., max_instances_per_row)`), `max_predictions_per_seq` is a row's, and
the instances may be shorter than the rows. The state adds the window and row batch k starts at.
"""
from __future__ import annotations

import glob
import hashlib
import json
import pathlib
import sys

import grain
from absl import flags
import numpy as np

from bert_jax.data import instances as instances_lib
from bert_jax.data import checks, masking, packing, sources
from bert_jax.data.sources import DataSource

METADATA_FILE = instances_lib.METADATA_FILE
VOCAB_TABLES_FILE = instances_lib.VOCAB_TABLES_FILE
_STATE_VERSION = 1
_MASK_PURPOSE = 0x6D61736B  # folded into dynamic-mask keys so they never equal shuffle seeds


class InstanceShards:
    """Random access over a split's memory-mapped .npy shards (one structured row per instance)."""

    def __init__(self, files: list[str]):
        self.files = [str(f) for f in files]
        self._arrays = None
        counts = [self._open(f).shape[0] for f in self.files]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @staticmethod
    def _open(file):
        try:
            return np.load(file, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read instance shard {file}: {e}") from e

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Rows at `indices` (any order), gathered shard by shard with fancy indexing."""
        if self._arrays is None:  # opened lazily: the object is pickled into Grain workers
            self._arrays = [self._open(f) for f in self.files]
        indices = np.asarray(indices, np.int64)
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        rows = np.empty(len(indices), self._arrays[0].dtype)
        for s in np.unique(shard):
            where = shard == s
            rows[where] = self._arrays[s][indices[where] - self.starts[s]]
        return rows

    def describe(self, index: int) -> str:
        """'FILE row N' of an instance index (for error messages)."""
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return f"{self.files[shard]} row {index - int(self.starts[shard])}"

    def __getstate__(self):
        return {"files": self.files, "starts": self.starts, "_arrays": None}


class _Shuffle:
    """Stream position -> (epoch, instance): a fresh seeded permutation of the instances per epoch.

    Vectorised (Grain's per-element MapDataset.shuffle costs ~0.3 ms per element here); the
    permutation of the current epoch is cached (4 bytes per instance).
    """

    def __init__(self, num_instances: int, seed: int):
        self.num_instances = num_instances
        self.seed = seed
        self._cache = {}

    def __call__(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        epochs, ranks = np.divmod(positions, self.num_instances)
        instances = np.empty_like(positions)
        for epoch in np.unique(epochs):
            if epoch not in self._cache:
                rng = np.random.default_rng([self.seed, int(epoch)])
                self._cache = {epoch: rng.permutation(self.num_instances).astype(np.int32)}
            where = epochs == epoch
            instances[where] = self._cache[epoch][ranks[where]]
        return epochs, instances

    def __getstate__(self):
        return {**self.__dict__, "_cache": {}}


class _Instances:
    """Stream positions -> those instances as an unpacked batch with masks. Picklable for workers."""

    def __init__(self, source, shuffle, *, seed, max_predictions_per_seq, dynamic_masking, whole_word_masking,
                 masked_lm_prob, masking_vocab, vocab_size, next_sentence):
        self.source = source
        self.shuffle = shuffle
        self.seed = seed
        self.max_predictions_per_seq = max_predictions_per_seq
        self.dynamic_masking = dynamic_masking
        self.whole_word_masking = whole_word_masking
        self.masked_lm_prob = masked_lm_prob
        self.masking_vocab = masking_vocab
        self.vocab_size = vocab_size
        self.next_sentence = next_sentence

    def __call__(self, positions):
        epochs, indices = self.shuffle(positions)
        batch = self._read(epochs, indices)
        checks.check_batch(batch, indices, vocab_size=self.vocab_size, describe=self.source.describe)
        return batch

    def _read(self, epochs, indices):
        rows = self.source.read(indices)
        if not isinstance(rows, np.ndarray):  # a per-example source (TFRecord): already a batch
            if not self.next_sentence:  # Google's pairs, trained on by the masked LM alone
                rows.pop("next_sentence_labels")
            return rows
        batch = instances_lib.unmasked_batch(rows)
        if self.dynamic_masking:
            keys = masking.example_keys(self.seed, _MASK_PURPOSE, epochs, indices)
            batch.update(masking.mask_batch(
                batch["input_ids"], batch["input_mask"], keys, self.masking_vocab,
                max_predictions_per_seq=self.max_predictions_per_seq, masked_lm_prob=self.masked_lm_prob,
                whole_word_masking=self.whole_word_masking))
        else:
            batch.update(instances_lib.stored_masks(rows))
        return batch

    def lengths_and_budgets(self, positions):
        """(tokens, most masked predictions) of the instances at `positions`, for the packer."""
        rows = self.source.read(self.shuffle(positions)[1])
        if not isinstance(rows, np.ndarray):
            return rows["input_mask"].sum(axis=1), (rows["masked_lm_weights"] > 0).sum(axis=1)
        if not self.dynamic_masking:
            return rows["num_tokens"], rows["num_predictions"]
        return rows["num_tokens"], packing.instance_budgets(rows["num_tokens"], self.max_predictions_per_seq,
                                                            self.masked_lm_prob)


class _ReadBatch:
    """Index k of a global batch -> this host's part of it: stream[k*G + host_rows]."""

    def __init__(self, instances, *, host_rows, global_batch_size):
        self.instances = instances
        self.host_rows = host_rows
        self.global_batch_size = global_batch_size

    def __call__(self, batch_index):
        return self.instances(batch_index * self.global_batch_size + self.host_rows)


class _ReadPackedBatch:
    """Index k of a global batch of packed rows -> (this host's rows of it, the cursor after it)."""

    def __init__(self, instances, planner: packing.Planner, *, host_rows, row_length, row_predictions):
        self.instances = instances
        self.planner = planner
        self.host_rows = host_rows
        self.row_length, self.row_predictions = row_length, row_predictions

    def __call__(self, batch_index):
        planned = self.planner.plan(batch_index)
        if planned is None:
            return None  # past the end of a finite stream: Grain skips it
        positions, cursor = planned
        positions = positions[self.host_rows]
        filled = positions >= 0
        unique, inverse = np.unique(positions[filled], return_inverse=True)
        slots = np.full(positions.shape, -1, np.int64)
        slots[filled] = inverse
        batch = packing.pack_rows(self.instances(unique), slots, row_length=self.row_length,
                                  row_predictions=self.row_predictions)
        return batch, cursor

    def starting_at(self, cursor) -> "_ReadPackedBatch":
        """A copy whose plans start at `cursor` (batch, window, row): one per iterator, so a
        closed iterator's prefetch thread never shares a planner with the next one."""
        return _ReadPackedBatch(self.instances, self.planner.starting_at(cursor), host_rows=self.host_rows,
                                row_length=self.row_length, row_predictions=self.row_predictions)


class PretrainingLoader:
    """Iterator over this host's batches; state = number of batches delivered (and, packed, the
    window and row the next batch starts at)."""

    def __init__(self, read_batch, num_batches: int, fingerprint: dict, *, worker_count: int):
        self._read_batch = read_batch  # _ReadBatch, or _ReadPackedBatch
        self._packed = isinstance(read_batch, _ReadPackedBatch)
        self._num_batches = num_batches
        self._fingerprint = fingerprint
        self._worker_count = worker_count
        self._next_batch = 0
        self._cursor = (0, 0, 0)  # packed: (batch, window, row) of the next batch
        self._iterator = None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            read = self._read_batch.starting_at(self._cursor) if self._packed else self._read_batch
            remaining = grain.MapDataset.range(self._num_batches).slice(slice(self._next_batch, None)).map(read)
            # One reader thread: the work is numpy on whole batches; more threads fight over the GIL.
            dataset = remaining.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
            if self._worker_count > 0:
                if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; not parsed outside absl.app
                    flags.FLAGS.mark_as_parsed()
                dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count))
            self._iterator = iter(dataset)
        batch = next(self._iterator)
        if self._packed:
            batch, self._cursor = batch
        self._next_batch += 1
        return batch

    def __len__(self) -> int:
        """The number of batches (packed: at most; a finite packed stream may end sooner)."""
        return self._num_batches

    def get_state(self) -> dict:
        state = {"version": _STATE_VERSION, "next_batch": self._next_batch, **self._fingerprint}
        if self._packed:
            state.update(window=int(self._cursor[1]), row=int(self._cursor[2]))
        return state

    def set_state(self, state: dict) -> None:
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {_STATE_VERSION}")
        saved, here = state.get("max_instances_per_row", 0), self._fingerprint.get("max_instances_per_row", 0)
        if saved != here:
            describe = lambda n: f"data.packing=True, data.max_instances_per_row={n}" if n else "data.packing=False"  # noqa: E731
            raise ValueError(f"loader state was saved with {describe(saved)}; this run has {describe(here)}: "
                             "resume with the settings that saved it")
        for key, value in self._fingerprint.items():  # not the hosts: global batch k is the same on any mesh
            if state.get(key) != value:
                raise ValueError(f"loader state does not match this loader: {key} is "
                                 f"{state.get(key)!r} in the state, {value!r} here")
        self.close()
        self._next_batch = int(state["next_batch"])
        if self._packed:
            self._cursor = (self._next_batch, int(state["window"]), int(state["row"]))

    def close(self) -> None:
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None


def source_metadata(source: DataSource) -> dict:
    """prepare's metadata, of a prepared directory or of a converted TFDS corpus."""
    if source.kind == "tfds_corpus":
        from bert_jax.data import tfds_corpus  # noqa: PLC0415 (TensorFlow only when TFDS is read)
        return tfds_corpus.TfdsInstances(source.name, data_dir=source.data_dir or None).metadata
    if source.kind != "prepared":
        raise ValueError(f"{source}: a {source.kind} source has no `prepare` metadata")
    return read_metadata(source.paths[0])


def read_metadata(data_dir) -> dict:
    """prepare's metadata.json of a prepared directory."""
    path = pathlib.Path(data_dir) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {data_dir} a `python -m bert_jax.data.prepare` output?")
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if metadata.get("format", instances_lib.INSTANCES_FORMAT) != instances_lib.INSTANCES_FORMAT:
        raise ValueError(f"{data_dir} holds {metadata['format']} files (prepare --output_format tfrecord), not"
                         f" instance rows: read them with data.source=tfrecord, data.train_path={data_dir}/train-*.tfrecord")
    return metadata


def _check_metadata(metadata: dict, where: str, split: str, *, max_seq_length, max_predictions_per_seq,
                    dynamic_masking, whole_word_masking, tokenizer, objective) -> None:
    """prepare's settings (metadata.json) against what the caller asks for; `where` names the data.
    max_seq_length and max_predictions_per_seq None: packed rows (checked by `packing.check_settings`)."""
    if split not in metadata["splits"]:
        raise ValueError(f"split {split!r} not in {where} (has {sorted(metadata['splits'])})")
    prepared_for = metadata.get("objective", "mlm_nsp")  # directories from before the option: BERT's pairs
    if prepared_for != objective:
        raise ValueError(f"{where} was prepared for train.objective={prepared_for!r}, this run's is {objective!r}:"
                         f" set train.objective={prepared_for!r} or prepare it again with --objective={objective}")
    if max_seq_length is not None and metadata["max_seq_length"] != max_seq_length:
        raise ValueError(f"{where} holds max_seq_length={metadata['max_seq_length']}, asked for {max_seq_length}")
    if metadata["static_masking"] == dynamic_masking:
        raise ValueError(f"{where} was prepared with {'static' if metadata['static_masking'] else 'dynamic'}"
                         f" masking; pass dynamic_masking={not metadata['static_masking']}")
    if not dynamic_masking:
        for key, value in (("max_predictions_per_seq", max_predictions_per_seq),
                           ("whole_word_masking", whole_word_masking)):
            if value is not None and metadata[key] != value:
                raise ValueError(f"{where} has static masks with {key}={metadata[key]}, asked for {value}")
    if tokenizer is not None and (tokenizer.vocab_size != metadata["vocab_size"]
                                  or list(tokenizer.special_ids) != metadata["special_ids"]):
        raise ValueError(f"tokenizer (vocab_size {tokenizer.vocab_size}, special ids {tokenizer.special_ids}) does"
                         f" not match {where} (vocab_size {metadata['vocab_size']},"
                         f" special ids {metadata['special_ids']})")
    if not metadata["splits"][split]["shards"]:
        raise ValueError(f"split {split!r} of {where} has no instances")


def _masking_vocab(metadata: dict, tables) -> masking.MaskingVocab:
    return masking.MaskingVocab(metadata["mask_id"], tuple(metadata["special_ids"]),
                                np.asarray(tables["replacement_ids"], np.int32), np.asarray(tables["word_start"], bool))


def _shard_names(metadata: dict, split: str) -> list[str]:
    """What the state fingerprints: the same for a prepared directory and its TFDS conversion."""
    return [pathlib.Path(shard["file"]).name for shard in metadata["splits"][split]["shards"]]


def _prepared_source(source: DataSource, **settings):
    data_dir = pathlib.Path(source.paths[0])
    metadata = read_metadata(data_dir)
    _check_metadata(metadata, str(data_dir), source.split, **settings)
    files = [data_dir / shard["file"] for shard in metadata["splits"][source.split]["shards"]]
    with np.load(data_dir / VOCAB_TABLES_FILE) as tables:
        vocab = _masking_vocab(metadata, tables)
    return InstanceShards(files), vocab, metadata, _shard_names(metadata, source.split)


def _tfds_source(source: DataSource, **settings):
    """A prepared corpus converted by `bert_jax.data.tfds_corpus`, read in place."""
    from bert_jax.data import tfds_corpus  # noqa: PLC0415 (TensorFlow only when TFDS is read)
    instances = tfds_corpus.TfdsInstances(source.name, data_dir=source.data_dir or None, split=source.split)
    where = f"{sources.TFDS_CORPUS}/{source.name} in {instances.data_dir}"
    _check_metadata(instances.metadata, where, source.split, **settings)
    vocab = _masking_vocab(instances.metadata, instances.vocab_tables)
    return instances, vocab, instances.metadata, _shard_names(instances.metadata, source.split)


def _tfrecord_source(source: DataSource, max_seq_length, max_predictions_per_seq, dynamic_masking):
    from bert_jax.data import tfrecord  # noqa: PLC0415 (TensorFlow only when TFRecords are read)
    if dynamic_masking:
        raise ValueError("Google TFRecords hold statically masked instances; pass dynamic_masking=False")
    paths = [path for pattern in source.paths for path in sorted(glob.glob(pattern)) or [pattern]]
    missing = [p for p in paths if not pathlib.Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"pretraining data not found: {missing[0]}")
    reader = tfrecord.TFRecordDataSource(paths, max_seq_length=max_seq_length,
                                         max_predictions_per_seq=max_predictions_per_seq)
    return reader, [pathlib.Path(f).name for f in paths]


def make_pretraining_loader(source: DataSource, *, global_batch_size: int, max_seq_length: int,
                            max_predictions_per_seq: int, seed: int, dynamic_masking: bool = True, whole_word_masking: bool = False,
                            num_epochs: int | None = None, host_rows=None, worker_count: int = 0,
                            tokenizer=None, objective: str = "mlm_nsp",
                            max_instances_per_row: int = 0) -> PretrainingLoader:
    """This host's pretraining batches (see the module docstring); max_instances_per_row > 0: packed
    rows of up to that many instances (bert_jax.data.packing)."""
    host_rows = np.arange(global_batch_size) if host_rows is None else np.asarray(host_rows, np.int64)
    if host_rows.ndim != 1 or not len(host_rows) or np.any(np.diff(host_rows) <= 0) \
            or host_rows[0] < 0 or host_rows[-1] >= global_batch_size:
        raise ValueError(f"host_rows must be increasing rows of the global batch [0, {global_batch_size}), "
                         "as sharding.process_batch_rows gives them")

    packed = max_instances_per_row != 0  # (< 0: an error of check_settings)
    instance_shape = (None, None) if packed else (max_seq_length, max_predictions_per_seq)  # packed: the data's
    settings = dict(max_seq_length=instance_shape[0], max_predictions_per_seq=instance_shape[1],
                    dynamic_masking=dynamic_masking, whole_word_masking=whole_word_masking, tokenizer=tokenizer,
                    objective=objective)
    if source.kind in ("tfds_corpus", "prepared"):
        rows, vocab, metadata, files = (_tfds_source if source.kind == "tfds_corpus" else _prepared_source)(
            source, **settings)
        masked_lm_prob, instance_length = metadata["masked_lm_prob"], metadata["max_seq_length"]
        instance_predictions = None if dynamic_masking else metadata["max_predictions_per_seq"]
        vocab_size = metadata["vocab_size"]
    elif source.kind == "tfrecord":
        rows, files = _tfrecord_source(source, *instance_shape, dynamic_masking)
        vocab, masked_lm_prob = None, 0.15
        vocab_size = tokenizer.vocab_size if tokenizer is not None else None
        instance_length, instance_predictions = rows.max_seq_length, rows.max_predictions_per_seq
    else:
        raise ValueError(f"{source}: text must be prepared into instances first (bert_jax.data.prepare)")
    if packed:
        packing.check_settings(max_seq_length=max_seq_length, max_predictions_per_seq=max_predictions_per_seq,
                               max_instances_per_row=max_instances_per_row, masked_lm_prob=masked_lm_prob,
                               instance_length=instance_length, instance_predictions=instance_predictions)
    num_instances = len(rows)

    if num_epochs is None:
        num_global_batches = sys.maxsize // global_batch_size
    else:  # whole global batches only, so every host gets as many batches
        num_global_batches = num_instances * num_epochs // global_batch_size
        if num_global_batches == 0:
            raise ValueError(f"{num_instances} instances x {num_epochs} epochs do not fill one global batch"
                             f" of {global_batch_size}")
    read = _Instances(rows, _Shuffle(num_instances, seed), seed=seed, max_predictions_per_seq=max_predictions_per_seq,
                      dynamic_masking=dynamic_masking, whole_word_masking=whole_word_masking,
                      masked_lm_prob=masked_lm_prob, masking_vocab=vocab, vocab_size=vocab_size,
                      next_sentence=objective == "mlm_nsp")
    if packed:  # a finite stream of packed rows ends sooner than num_global_batches (None past the end)
        planner = packing.Planner(
            read.lengths_and_budgets, global_batch_size=global_batch_size, seed=seed, row_length=max_seq_length,
            stream_length=sys.maxsize if num_epochs is None else num_instances * num_epochs,
            row_predictions=max_predictions_per_seq, max_instances=max_instances_per_row)
        read_batch = _ReadPackedBatch(read, planner, host_rows=host_rows, row_length=max_seq_length,
                                      row_predictions=max_predictions_per_seq)
    else:
        read_batch = _ReadBatch(read, host_rows=host_rows, global_batch_size=global_batch_size)

    # The data's identity as a short hash, so the state stays small with thousands of shards.
    data_hash = hashlib.sha256(json.dumps([files, num_instances]).encode()).hexdigest()[:16]
    fingerprint = {"data": data_hash, "split": source.split, "num_instances": num_instances, "seed": seed,
                   "global_batch_size": global_batch_size, "max_seq_length": max_seq_length,
                   "max_predictions_per_seq": max_predictions_per_seq, "dynamic_masking": dynamic_masking,
                   "whole_word_masking": whole_word_masking, "num_epochs": num_epochs}
    if packed:
        fingerprint.update(max_instances_per_row=max_instances_per_row, packing_window=packing.WINDOW)
    return PretrainingLoader(read_batch, num_global_batches, fingerprint, worker_count=worker_count)
