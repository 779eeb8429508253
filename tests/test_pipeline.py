"""build_pretraining_data's parts that need no training run (the runs: test_pretrain, test_workdir_uri)."""
import os
import pathlib
import shutil

import pytest

from bert_jax import config_utils, paths, tokenizer
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


def test_workdir_data_of_another_source_or_tokenizer_is_refused(tmp_path, minilm, truncated_vocab):
    """workdir/data records its source (files, sizes, times) and is reused only with the same
    source and tokenizer: a changed corpus file, another path or another vocabulary is an error."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("One sentence here.\nAnd another.\n\nA second document.\nIts end.\n")
    c = config_utils.pretrain_config("tiny")
    c.data.source, c.data.train_path, c.data.eval_fraction, c.train.progress_bar = "text", str(corpus), 0.0, False
    c.data.tokenizer = str(pathlib.Path(minilm.__file__).parent / "model" / "vocab.txt")
    source, workdir = sources.from_config(c.data)[0], paths.workdir_path(tmp_path / "run")
    pipeline.prepare_tokenizer(c, source, workdir, None)
    data = pathlib.Path(pipeline.prepare_text_data(c, source, workdir))
    metadata = (data / "metadata.json").read_bytes()
    assert pipeline.prepare_text_data(c, source, workdir) == str(data)  # the same source: reused

    original, stat = corpus.read_bytes(), corpus.stat()
    with open(corpus, "a") as f:
        f.write("\nA third document, added later.\n")
    with pytest.raises(ValueError, match=rf"{data} was prepared from {corpus} as it was then \(\d+ bytes, .*it has "
                                         rf"changed since .*; delete {data} to prepare it again"):
        pipeline.prepare_text_data(c, source, workdir)
    other = sources.DataSource.text(tmp_path / "other.txt")
    with pytest.raises(ValueError, match=r"prepared from another source \('.*corpus.txt', this run's config.data "
                                         r"names '.*other.txt'\)"):
        pipeline.prepare_text_data(c, other, workdir)
    shutil.rmtree(workdir / "tokenizer")
    tokenizer.load_tokenizer(truncated_vocab).save(workdir / "tokenizer")
    corpus.write_bytes(original)
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the corpus as it was: only the tokenizer differs
    with pytest.raises(ValueError, match=r"prepared from another tokenizer than .*run/tokenizer"):
        pipeline.prepare_text_data(c, source, workdir)
    assert (data / "metadata.json").read_bytes() == metadata  # nothing was prepared again
