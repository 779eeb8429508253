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


def test_evaluate_in_slices_counts_each_masked_position_once():
    """5 rows 2 at a time (the last slice filled up at weight 0) == all 5 at once."""
    import jax
    from flax import nnx

    from bert_jax import params as params_lib
    from bert_jax.model import BertConfig, BertForPreTraining

    config = BertConfig.preset("tiny", vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=16, dtype="float32")
    shapes = params_lib.to_dict(nnx.state(nnx.eval_shape(lambda: BertForPreTraining(config, rngs=nnx.Rngs(0))),
                                          nnx.Param))
    rng = np.random.default_rng(0)  # random params without compiling an initializer
    params = jax.tree.map(lambda a: rng.normal(0, 0.5, a.shape).astype(a.dtype), shapes)
    rows = mlm_eval.chunk_documents([[list(range(5, 50))]], 16, cls_id=2, sep_id=3)
    batch = {**mlm_eval.fixed_mask_batch(rows, np.ones_like(rows), VOCAB, seed=0), "segment_ids": np.zeros_like(rows)}
    whole, sliced = mlm_eval.evaluate(config, params, batch), mlm_eval.evaluate(config, params, batch, rows=2)
    assert len(rows) == 3 and whole["masked_tokens"] == sliced["masked_tokens"] == 6
    assert sliced["accuracy"] == whole["accuracy"] and np.isclose(sliced["loss"], whole["loss"], rtol=1e-6)
