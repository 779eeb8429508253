"""build_pretraining_data's parts that need no training run (the runs: test_pretrain, test_workdir_uri)."""
import pathlib

import pytest

from bert_jax import config_utils, paths
from bert_jax.data import pipeline, prepare, sources


def test_instances_without_a_tokenizer_is_a_clear_error(tmp_path):
    c = config_utils.pretrain_config("tiny")
    c.data.source, c.data.train_path = "tfrecord", str(tmp_path / "x.tfrecord")
    with pytest.raises(ValueError, match="data.tokenizer is required for data.source='tfrecord'"):
        pipeline.prepare_tokenizer(c, sources.from_config(c.data)[0], paths.workdir_path(tmp_path / "run"), None)
    assert not (tmp_path / "run" / "tokenizer").exists()


def test_a_prepared_directory_brings_its_tokenizer(tmp_path, minilm, minilm_tokenizer, truncated_vocab):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("One sentence here.\nAnd another.\n\nA second document.\nIts end.\n")
    vocab = pathlib.Path(minilm.__file__).parent / "model" / "vocab.txt"
    prepare.prepare(sources.DataSource.text(corpus), vocab, tmp_path / "prepared", workers=1, progress=False)
    c = config_utils.pretrain_config("tiny")
    c.data.source, c.data.train_path = "prepared", str(tmp_path / "prepared")
    source = sources.from_config(c.data)[0]
    tok = pipeline.prepare_tokenizer(c, source, paths.workdir_path(tmp_path / "run"), None)  # no data.tokenizer
    assert tok.same_as(minilm_tokenizer) and (tmp_path / "run" / "tokenizer").is_dir()
    c.data.tokenizer = str(vocab)  # the same vocabulary from another file: accepted
    assert pipeline.prepare_tokenizer(c, source, paths.workdir_path(tmp_path / "run2"), None).same_as(tok)
    c.data.tokenizer = str(truncated_vocab)
    with pytest.raises(ValueError, match=f"tokenizer {truncated_vocab} .* differs from {tmp_path}/prepared/tokenizer"):
        pipeline.prepare_tokenizer(c, source, paths.workdir_path(tmp_path / "run3"), None)
    assert not (tmp_path / "run3" / "tokenizer").exists()
