"""Text sources: Google's and paragraph formats, bad UTF-8, empty files, the demo corpus."""
import logging

import pytest

from bert_jax.data import demo_corpus, sentences, sources
from bert_jax.data.sentences import split_sentences
from bert_jax.data.sources import DataSource, SourceStats, documents, sniff_format, text_file_documents


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_google_format_documents(tmp_path):
    path = write(tmp_path / "a.txt", "First one.\nSecond one.\n\n\nOnly sentence.\n\nÜber café.\nLast 東京.".encode())
    stats = SourceStats()
    docs = list(text_file_documents([path], "sentences", stats=stats))
    assert docs == [["First one.", "Second one."], ["Only sentence."], ["Über café.", "Last 東京."]]
    assert (stats.documents, stats.sentences, stats.single_sentence_documents) == (3, 5, 1)
    assert not stats.skipped


def test_paragraph_format_splits_with_pysbd(tmp_path):
    text = ("Mr. Smith went to Washington. He arrived at 4 p.m. on Monday! Was it late? No.\n"
            "A second paragraph, one sentence\n\nNext doc. Two sentences.\n")
    path = write(tmp_path / "p.txt", text.encode())
    docs = list(text_file_documents(path, "paragraphs"))
    assert docs == [["Mr. Smith went to Washington.", "He arrived at 4 p.m. on Monday!", "Was it late?", "No.",
                     "A second paragraph, one sentence"], ["Next doc.", "Two sentences."]]
    # split=False leaves paragraphs for a worker pool to split
    assert list(text_file_documents(path, "paragraphs", split=False))[1] == ["Next doc. Two sentences."]


def test_auto_format(tmp_path, shared_data):
    google = shared_data / "google_bert_sample" / "sample_text.txt"
    wiki = shared_data / "enwiki_sample" / "enwiki_2015_sample.txt"
    assert sniff_format(google.read_text().splitlines()) == "sentences"
    with open(wiki, encoding="utf-8") as f:
        assert sniff_format([next(f) for _ in range(200)]) == "paragraphs"
    auto = list(text_file_documents(google, "auto"))
    assert auto == list(text_file_documents(google, "sentences"))
    assert len(auto) == 3 and sum(map(len, auto)) == 31


def test_wikiextractor_shard_one_document_per_doc_titles_dropped(shared_data):
    shard = shared_data / "enwiki_sample" / "wiki_00"
    raw = shard.read_text(encoding="utf-8")
    titles = [line.split('title="')[1].rstrip('">') for line in raw.splitlines() if line.startswith("<doc ")]
    with open(shard, encoding="utf-8") as f:
        assert sniff_format([next(f) for _ in range(50)]) == "wikiextractor"
    stats = SourceStats()
    docs = list(text_file_documents(shard, "auto", stats=stats, split=False))
    assert len(docs) == len(titles) == raw.count("</doc>") == stats.documents == 38
    assert docs[0][0].startswith("Anarchism is a political philosophy") and docs[1][0].startswith("Autism is")
    assert all(doc[0] != title for doc, title in zip(docs, titles))  # the title line is dropped
    paragraphs = [p for doc in docs for p in doc]
    assert not [p for p in paragraphs if "<doc" in p or "</doc>" in p]
    # everything else reaches the documents: all non-blank lines but the tags and titles
    assert len(paragraphs) == sum(1 for line in raw.splitlines() if line.strip()) - 3 * len(titles)


@pytest.mark.parametrize("text, line, message", [
    (b'<doc id="1" title="A">\nA\nText here.\n', 1, "not closed by </doc> at the end of the file"),
    (b'<doc id="1" title="A">\nA\nText.\n<doc id="2" title="B">\nB\nMore.\n</doc>\n', 1, "before the next <doc> at line 4"),
    (b'<doc id="1" title="A">\nA\nText.\n</doc>\n</doc>\n', 5, "</doc> without an opening"),
])
def test_wikiextractor_bad_tags_name_file_and_line(tmp_path, text, line, message):
    path = write(tmp_path / "wiki_01", text)
    with pytest.raises(ValueError, match=f"{path}:{line}: .*{message}"):
        list(text_file_documents(path))


def test_invalid_utf8_lines_skipped_and_named(tmp_path, caplog):
    data = b"Good line one.\n\xff\xfe broken\nGood line two.\n\nOther doc \xc3\x28 bad.\nFine.\n"
    path = write(tmp_path / "bad.txt", data)
    stats = SourceStats()
    with caplog.at_level(logging.WARNING):
        docs = list(text_file_documents(path, "sentences", stats=stats))
    assert docs == [["Good line one.", "Good line two."], ["Fine."]]
    assert stats.skipped == {"invalid UTF-8": 2}
    assert f"{path}:2" in caplog.text and f"{path}:5" in caplog.text
    assert "invalid UTF-8" in stats.summary() and f"{path}:2" in stats.summary()


def test_byte_order_mark_and_crlf(tmp_path):
    path = write(tmp_path / "bom.txt", b"\xef\xbb\xbfHello there.\r\nSecond.\r\n")
    assert list(text_file_documents(path, "sentences")) == [["Hello there.", "Second."]]


def test_bad_files_are_named(tmp_path):
    empty = write(tmp_path / "empty.txt", b"")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        list(text_file_documents(empty))
    blank = write(tmp_path / "blank.txt", b"\n\n  \n")
    with pytest.raises(ValueError, match="blank.txt holds no text"):
        list(text_file_documents(blank))
    garbage = write(tmp_path / "garbage.txt", b"\xff\n\xfe\n")
    with pytest.raises(ValueError, match=r"garbage.txt holds no text \(2 lines skipped"):
        list(text_file_documents(garbage))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        list(text_file_documents(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match=r"nomatch\*"):
        list(text_file_documents(str(tmp_path / "nomatch*")))
    with pytest.raises(ValueError, match="format"):
        list(text_file_documents(empty, "lines"))


def test_glob_and_spec_dispatch(tmp_path):
    write(tmp_path / "b.txt", b"B one.\nB two.\n")
    write(tmp_path / "a.txt", b"A one.\n")
    stats = SourceStats()
    docs = list(documents(DataSource.text(tmp_path / "*.txt"), format="sentences", stats=stats))
    assert docs == [["A one."], ["B one.", "B two."]]  # sorted, one file never joins another
    assert stats.documents == 2


def test_split_sentences_fast_path_agrees_with_pysbd():
    for text in ["no terminator here", "ends with one.", "Dr. Who? Yes!", "e.g. this one is tricky. Ok."]:
        expected = [s.strip() for s in sentences._segmenter("en").segment(text) if s.strip()]
        assert split_sentences(text) == expected


def test_demo_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("BERT_JAX_CACHE", str(tmp_path))
    raw = demo_corpus.gather_raw()
    assert sum(map(len, raw.values())) > 1_500_000  # ~1.8 MB of docstrings and topics
    modules = [name for name in raw if not name.startswith("pydoc_data.topics:")]
    assert modules == sorted(modules) and len(modules) > 300  # a fixed order: sorted names
    # cleaning keeps prose and drops code
    kept = demo_corpus.paragraphs(raw["json"])
    assert any("JSON" in p for p in kept)
    assert not any(">>>" in p for p in kept)
    # sentence splitting of everything takes ~10 s: check all paragraphs, split a sample
    all_paragraphs = [p for text in raw.values() for p in demo_corpus.paragraphs(text)]
    assert sum(map(len, all_paragraphs)) > 1_000_000
    docs = demo_corpus.documents(workers=1, limit=8)
    sentences = [s for doc in docs for s in doc]
    assert len(docs) > 5 and len(sentences) > 100
    assert all(s.strip() == s and s for s in sentences)
    assert list(tmp_path.glob("demo_corpus-*.json"))  # cached, and the cache gives the same
    assert demo_corpus.documents(limit=8) == docs
    path = demo_corpus.write_text(tmp_path / "demo.txt", docs)
    assert list(text_file_documents(path, "sentences")) == docs


# ----------------------------------------------------------------------------
# DataSource: one typed value from the config or from `prepare --input`

def _data_config(**data):
    from bert_jax import config_utils
    c = config_utils.pretrain_config("tiny")
    c.data.update(data)
    return c.data


@pytest.mark.parametrize("data, train, evaluation", [
    (dict(source="demo"), DataSource("demo"), None),
    (dict(source="text", train_path="a.txt,b/*.txt"), DataSource.text("a.txt", "b/*.txt"), None),
    (dict(source="prepared", train_path="prep"), DataSource.prepared("prep"), DataSource.prepared("prep", "eval")),
    (dict(source="tfrecord", train_path="t/*.tfrecord", eval_path="e.tfrecord"),
     DataSource("tfrecord", paths=("t/*.tfrecord",)), DataSource("tfrecord", paths=("e.tfrecord",))),
    (dict(source="tfds", tfds_name="wikipedia/20230601.en", tfds_split="train[:1%]", tfds_data_dir="gs://b/tfds"),
     DataSource("tfds_text", name="wikipedia/20230601.en", split="train[:1%]", data_dir="gs://b/tfds"), None),
    (dict(source="tfds", tfds_name="bert_pretraining_corpus/wiki", tfds_eval_split=""),
     DataSource("tfds_corpus", name="wiki"), None),
    (dict(source="tfds", tfds_name="bert_pretraining_corpus/wiki"),
     DataSource("tfds_corpus", name="wiki"), DataSource("tfds_corpus", name="wiki", split="eval")),
])
def test_data_source_from_config(data, train, evaluation):
    assert sources.from_config(_data_config(**data)) == (train, evaluation)


@pytest.mark.parametrize("data, message", [
    (dict(source="txt"), r"config.data.source: must be one of \('demo', 'text', 'prepared', 'tfrecord', 'tfds'\)"),
    (dict(source="text"), "config.data.train_path: required for data.source='text'"),
    (dict(source="tfds"), "config.data.tfds_name: required for data.source='tfds'"),
    (dict(source="tfds", tfds_name="bert_pretraining_corpus/a/b"), "config.data.tfds_name: a converted corpus is"),
    (dict(source="prepared", train_path="p", eval_path="e"), "config.data.eval_path: only for data.source='tfrecord'"),
])
def test_data_source_config_errors_name_the_key(data, message):
    with pytest.raises(ValueError, match=message):
        sources.from_config(_data_config(**data))


def test_data_source_parse_and_checks():
    for spec in ("demo", "tfds:wikipedia/20230601.en:train", "a.txt,b/*.txt"):
        assert DataSource.parse(spec).spec() == spec
    assert DataSource.parse("tfds:c4/en", tfds_data_dir="/t") == DataSource("tfds_text", name="c4/en", data_dir="/t")
    with pytest.raises(ValueError, match="kind 'txt'"):
        DataSource("txt")
    with pytest.raises(ValueError, match="text data source: paths required"):
        DataSource("text")
    with pytest.raises(ValueError, match="one directory"):
        DataSource("prepared", paths=("a", "b"))
    with pytest.raises(ValueError, match="give NAME of bert_pretraining_corpus/NAME"):
        DataSource("tfds_corpus", name="bert_pretraining_corpus/wiki")
    with pytest.raises(ValueError, match="no held-out split"):
        DataSource("tfrecord", paths=("a",), split="eval")
    with pytest.raises(ValueError, match="holds pretraining instances, not text"):
        list(documents(DataSource.prepared("p")))
