"""A prepared pretraining corpus as a TFDS dataset (ArrayRecord, random access).

`python -m bert_jax.data.prepare` writes instance rows as .npy shards (fastest on a local
disk). To serve the same corpus to a pod from shared storage (GCS, NFS) in TFDS's own
layout, convert it once; every host then reads it with `tfds.data_source`:

    python -m bert_jax.data.tfds_corpus --prepared data/wiki128 --data_dir gs://bucket/tfds --name wiki128

    source = TfdsInstances("wiki128", data_dir="gs://bucket/tfds", split="train")
    len(source); rows = source.read(indices)      # the same structured rows as the .npy shards
    source.metadata                               # prepare's metadata.json (settings, ids, summary)
    source.vocab_tables                           # word_start, replacement_ids (for masking)

    tfds.data_source("bert_pretraining_corpus/wiki128", data_dir=...)   # plain TFDS, dict per record

The loader reads it directly, with the same batches as from the prepared directory:
`make_pretraining_loader(DataSource("tfds_corpus", name="wiki128", data_dir="gs://bucket/tfds"), ...)`.

The dataset is `bert_pretraining_corpus/<name>`, one TFDS feature per instance field
(`bert_jax.data.instances.instance_dtype`: input_ids, num_tokens, first_segment_length,
next_sentence_label, document, b_document, and the stored masks with --static_masking);
splits are prepare's splits (train, eval). prepare's metadata and vocabulary tables travel
in the dataset's metadata, so nothing else needs copying.
"""
from __future__ import annotations

import itertools
import json
import os
import pathlib
import sys

import numpy as np
from absl import flags

from bert_jax import cli
from bert_jax.data.sources import TFDS_CORPUS as DATASET  # the name TFDS gives BertPretrainingCorpus

_METADATA_FILE = "metadata.json"        # of a prepare output directory
_VOCAB_TABLES_FILE = "vocab_tables.npz"


def _tfds():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow_datasets as tfds

    return tfds


def _read_prepared(prepared_dir: pathlib.Path) -> tuple[dict, np.dtype, dict]:
    """prepare's metadata, the rows' dtype (from the first shard), the vocabulary tables."""
    metadata_file = prepared_dir / _METADATA_FILE
    if not metadata_file.is_file():
        raise FileNotFoundError(f"{metadata_file} not found: give a `python -m bert_jax.data.prepare` output directory")
    metadata = json.loads(metadata_file.read_text())
    shards = [prepared_dir / s["file"] for split in metadata["splits"].values() for s in split["shards"]]
    if not shards:
        raise ValueError(f"{prepared_dir}: no instance shards listed in {_METADATA_FILE}")
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"{prepared_dir}: shard {missing[0]} listed in {_METADATA_FILE} is missing")
    dtype = np.load(shards[0], mmap_mode="r").dtype
    with np.load(prepared_dir / _VOCAB_TABLES_FILE) as tables:
        vocab_tables = {name: tables[name].tolist() for name in tables.files}
    return metadata, dtype, vocab_tables


def _dtype_to_json(dtype: np.dtype) -> list:
    return [[name, np.dtype(dtype[name].base).str, list(dtype[name].shape)] for name in dtype.names]


def _dtype_from_json(fields: list) -> np.dtype:
    return np.dtype([(name, base, tuple(shape)) for name, base, shape in fields])


def _builder_class():
    """Defined on first use, so importing this module does not import TensorFlow."""
    if "_BertPretrainingCorpus" in globals():  # TFDS registers a builder class once
        return globals()["_BertPretrainingCorpus"]
    tfds = _tfds()

    class BertPretrainingCorpus(tfds.core.GeneratorBasedBuilder):
        """Pretraining instance rows of `bert_jax.data.prepare`, one TFDS feature per field."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Rows of bert_jax.pretraining_instances/1."}

        def __init__(self, *, prepared_dir=None, **kwargs):
            self._prepared_dir = pathlib.Path(prepared_dir) if prepared_dir else None
            self._prepared = _read_prepared(self._prepared_dir) if self._prepared_dir else None
            super().__init__(**kwargs)

        def _info(self):
            if self._prepared is None:
                raise ValueError(f"{DATASET}: building needs prepared_dir (reading needs only data_dir)")
            metadata, dtype, vocab_tables = self._prepared
            features = tfds.features.FeaturesDict({
                name: tfds.features.Tensor(shape=dtype[name].shape, dtype=dtype[name].base)
                for name in dtype.names})
            return tfds.core.DatasetInfo(
                builder=self,
                description="BERT sentence-pair instances prepared by bert_jax.data.prepare.",
                features=features,
                disable_shuffling=True,  # record i of a split is row i of prepare's shards
                metadata=tfds.core.MetadataDict(prepared=metadata, row_dtype=_dtype_to_json(dtype),
                                                vocab_tables=vocab_tables))

        def _split_generators(self, dl_manager):
            metadata = self._prepared[0]
            return {split: self._generate_examples(split) for split in metadata["splits"]}

        def _generate_examples(self, split):
            for shard in self._prepared[0]["splits"][split]["shards"]:
                rows = np.load(self._prepared_dir / shard["file"], mmap_mode="r")
                for index in range(len(rows)):
                    row = rows[index]
                    yield f"{shard['file']}#{index}", {name: np.asarray(row[name]) for name in rows.dtype.names}

    globals()["_BertPretrainingCorpus"] = BertPretrainingCorpus
    return BertPretrainingCorpus


def build(prepared_dir, data_dir, name: str) -> str:
    """Writes `bert_pretraining_corpus/<name>` under data_dir as ArrayRecord; returns its directory."""
    tfds = _tfds()
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"name must be letters, digits and '_', got {name!r}")
    builder = _builder_class()(prepared_dir=prepared_dir, data_dir=data_dir, file_format="array_record",
                               config=tfds.core.BuilderConfig(name=name))
    if builder.is_prepared():
        raise FileExistsError(f"{builder.data_dir} already exists: remove it or choose another --name")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder.data_dir


class TfdsInstances:
    """Random access to a converted corpus' rows: `len()` and `read(indices)` -> structured rows,
    the same rows (and dtype) as prepare's .npy shards, read through `tfds.data_source`."""

    def __init__(self, name: str, *, data_dir=None, split: str = "train"):
        if data_dir is None:  # as TFDS: $TFDS_DATA_DIR, else ~/tensorflow_datasets
            data_dir = _tfds().core.constants.get_default_data_dir()
        self.name, self.data_dir, self.split = name, str(data_dir), split
        self._source = None
        builder = self._builder()
        metadata = builder.info.metadata
        self.metadata = dict(metadata["prepared"])
        self.vocab_tables = {k: np.asarray(v) for k, v in metadata["vocab_tables"].items()}
        self.dtype = _dtype_from_json(metadata["row_dtype"])
        if split not in builder.info.splits:
            raise ValueError(f"{DATASET}/{name} in {data_dir} has no split {split!r}: {sorted(builder.info.splits)}")
        self._length = builder.info.splits[split].num_examples

    def _builder(self):
        tfds = _tfds()
        full_name = f"{DATASET}/{self.name}"
        try:
            builder = tfds.builder_from_directory(os.path.join(self.data_dir, DATASET, self.name,
                                                               str(_builder_class().VERSION)))
        except Exception as e:  # no such directory / no dataset_info.json
            raise FileNotFoundError(f"TFDS dataset {full_name!r} is not prepared in data_dir={self.data_dir!r} "
                                    f"(convert it with python -m bert_jax.data.tfds_corpus): {str(e).splitlines()[0]}") from e
        return builder

    def __len__(self) -> int:
        return self._length

    def describe(self, index: int) -> str:
        """Where an example is (for error messages)."""
        return f"{DATASET}/{self.name} in {self.data_dir}, split {self.split!r} example {index}"

    def read(self, indices) -> np.ndarray:
        if self._source is None:  # opened lazily: this object is pickled into Grain workers
            self._source = self._builder().as_data_source(
                split=self.split, deserialize_method=_tfds().decode.DeserializeMethod.RAW_BYTES)
        indices = np.asarray(indices, np.int64).reshape(-1)
        rows = np.empty(len(indices), self.dtype)
        if not len(indices):
            return rows
        # The tf.train.Example protos parsed with TFDS's own protobuf module (no TensorFlow import),
        # one flat array per field: half the CPU of TFDS's per-record decoding
        # (benchmarks/bench_loader_tfds.py). TFDS stores integers as int64, floats as float32.
        from tensorflow_datasets.proto import tf_example_pb2  # noqa: PLC0415

        features = [tf_example_pb2.Example.FromString(record).features.feature
                    for record in self._source.__getitems__(indices.tolist())]
        for name in self.dtype.names:
            field = self.dtype[name]
            kind, values_dtype = ("float_list", np.float32) if field.base.kind == "f" else ("int64_list", np.int64)
            values = np.fromiter(itertools.chain.from_iterable(getattr(f[name], kind).value for f in features),
                                 values_dtype, count=len(indices) * int(np.prod(field.shape, dtype=np.int64)))
            rows[name] = values.reshape((len(indices),) + field.shape)
        return rows

    def __getitem__(self, index: int) -> np.ndarray:
        return self.read([index])[0]

    def __getstate__(self):
        return {**self.__dict__, "_source": None}


def _define_flags(fv) -> None:
    flags.DEFINE_string("prepared", None, "a `python -m bert_jax.data.prepare` output directory", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "TFDS data_dir to write into (local or gs://)", flag_values=fv)
    flags.DEFINE_string("name", None, f"config name: the dataset is {DATASET}/NAME", flag_values=fv)
    for name in ("prepared", "data_dir", "name"):
        flags.mark_flag_as_required(name, flag_values=fv)


@cli.entrypoint
def main(argv=None) -> None:
    fv = cli.parse(argv, _define_flags, __doc__, prog="python -m bert_jax.data.tfds_corpus")
    print(f"wrote {build(fv.prepared, fv.data_dir, fv.name)}")


if __name__ == "__main__":
    sys.exit(main())
