"""mlm_eval: fixed masks are the same on every call, the unigram baseline is what it says."""
import numpy as np

from bert_jax import mlm_eval
from bert_jax.data import masking

VOCAB = masking.MaskingVocab(mask_id=4, special_ids=(0, 1, 2, 3, 4), replacement_ids=np.arange(5, 50, dtype=np.int32))


def test_fixed_masks_depend_on_seed_and_row_only():
    rows = mlm_eval.chunk_documents([[[5, 6, 7, 8, 9] * 10], [[10, 11] * 20]], 16, cls_id=2, sep_id=3)
    assert rows.shape == (5, 16) and (rows[:, 0] == 2).all() and (rows[:, -1] == 3).all()
    a = mlm_eval.fixed_mask_batch(rows, np.ones_like(rows), VOCAB, seed=0)
    b = mlm_eval.fixed_mask_batch(rows, np.ones_like(rows), VOCAB, seed=0)
    c = mlm_eval.fixed_mask_batch(rows, np.ones_like(rows), VOCAB, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["masked_lm_positions"], c["masked_lm_positions"])
    first = mlm_eval.fixed_mask_batch(rows[:2], np.ones_like(rows[:2]), VOCAB, seed=0)
    assert np.array_equal(first["masked_lm_positions"], a["masked_lm_positions"][:2])  # not the batch's size
    assert a["masked_lm_weights"].sum(1).tolist() == [2.0] * 5  # round(16 x 0.15) per row


def test_unigram_baseline_predicts_the_most_frequent_training_token():
    counts = mlm_eval.token_counts(np.array([[2, 7, 7, 7, 8, 3]]), np.ones((1, 6)), 10, VOCAB.special_ids)
    assert counts.tolist() == [0, 0, 0, 0, 0, 0, 0, 3, 1, 0]  # [CLS]/[SEP] not counted
    batch = {"masked_lm_ids": np.array([[7, 8, 9, 0]]), "masked_lm_weights": np.array([[1.0, 1.0, 1.0, 0.0]])}
    baseline = mlm_eval.unigram_baseline(counts, batch)
    assert baseline["token"] == 7 and np.isclose(baseline["accuracy"], 1 / 3)
    assert np.isclose(baseline["loss"], -np.mean(np.log(np.array([4, 2, 1]) / 14)))  # add-one smoothed
