"""The dropout mask's bits (bert_jax/dropout.py): the keep rate, no pattern across positions,
rows or keys, determinism, and the same values sharded as on one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from bert_jax import dropout

SHAPE = (4, 8, 64, 128)  # rows, heads, queries, keys: attention probabilities


def _mask(seed, rate=0.1, shape=SHAPE):
    return np.asarray(dropout.keep_mask(jax.random.key(seed), rate, shape))


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_share_is_one_minus_rate(rate):
    keep = _mask(0, rate)
    sigma = np.sqrt(rate * (1 - rate) / keep.size)
    assert abs(keep.mean() - (1 - rate)) < 5 * sigma, keep.mean()
    per_row = keep.reshape(SHAPE[0], -1).mean(axis=1)  # every row alike, not only the whole
    assert np.all(np.abs(per_row - (1 - rate)) < 5 * sigma * np.sqrt(SHAPE[0]))


def test_no_correlation_between_neighbours_rows_or_keys():
    a, b = _mask(0).astype(np.float64), _mask(1).astype(np.float64)
    n = a.size
    bound = 5 / np.sqrt(n / SHAPE[0])  # five standard errors of a correlation over one row's worth

    def corr(x, y):
        return np.corrcoef(x.ravel(), y.ravel())[0, 1]

    assert abs(corr(a[..., 1:], a[..., :-1])) < bound   # next key position
    assert abs(corr(a[:, :, 1:], a[:, :, :-1])) < bound  # next query
    assert abs(corr(a[:, 1:], a[:, :-1])) < bound        # next head
    assert abs(corr(a[1:], a[:-1])) < bound              # next row (the batch axis is mixed apart)
    assert abs(corr(a, b)) < bound                       # another key
    # a 2x2 block of neighbours: all four patterns as often as independence predicts
    pairs = (a[..., :-1] * 2 + a[..., 1:]).ravel()
    counts = np.bincount(pairs.astype(int), minlength=4) / pairs.size
    p = a.mean()
    expected = np.array([(1 - p) ** 2, (1 - p) * p, p * (1 - p), p ** 2])
    assert np.all(np.abs(counts - expected) < 0.005), (counts, expected)


def test_a_pure_function_of_the_key():
    assert np.array_equal(_mask(3), _mask(3))
    assert not np.array_equal(_mask(3), _mask(4))
    # a fold_in of the step key (how the train step derives its keys) changes the mask too
    key = jax.random.key(7)
    m1 = dropout.keep_mask(jax.random.fold_in(key, 1), 0.1, (4, 64))
    m2 = dropout.keep_mask(jax.random.fold_in(key, 2), 0.1, (4, 64))
    assert not np.array_equal(np.asarray(m1), np.asarray(m2))


def test_sharded_mask_equals_the_unsharded_one():
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharding = NamedSharding(mesh, PartitionSpec("data", "model"))
    shape = (8, 12, 64, 64)
    key = jax.random.key(5)
    sharded = jax.jit(lambda k: dropout.keep_mask(k, 0.1, shape), out_shardings=sharding)(key)
    assert np.array_equal(np.asarray(sharded), _mask(5, shape=shape))


def test_dropout_scales_kept_values_and_keeps_the_dtype():
    x = jnp.ones((4, 256), jnp.bfloat16)
    y = dropout.dropout(x, 0.25, jax.random.key(0))
    assert y.dtype == jnp.bfloat16
    kept = np.asarray(y, np.float32)
    assert set(np.unique(kept).tolist()) == {0.0, float(jnp.bfloat16(1 / 0.75))}
    assert abs((kept == 0).mean() - 0.25) < 0.05
