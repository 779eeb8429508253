"""Dropout with cheap random bits.

`jax.random.bernoulli` draws its bits with Threefry-2x32 (20 rounds per pair of words), which
XLA:CPU runs slowly: for MiniLM fine-tuning (16 rows of 128, 12 heads) the attention-probability
mask of one layer, 3.1M elements, took 222 ms with Threefry against 24 ms here, and a hidden
mask 8.4 ms against 1.5 ms (`benchmarks/bench_dropout.py`, 2-core AVX2 CPU at load 13). A
whole MiniLM fine-tuning step ran 1.20-1.25x faster than with Threefry on a quiet machine
(`bench_finetune.py --variant threefry:model.dropout_impl=threefry`, MRPC/RTE/CoLA lengths);
`dropout_impl="threefry"` (a BertConfig field, a `model.` config key) keeps
`jax.random.bernoulli`.

Here Threefry draws only two 32-bit words per mask (from the layer's key, so masks stay a pure
function of the step key: exact resume and determinism hold). Each element's bits are then an
integer hash of its position, two passes of `lowbias32` (Chris Wellons' xorshift-multiply
hash): its index within one row of the leading (batch) axis times an odd constant plus the
first word goes into the first pass, and the second word plus the row number times another odd
constant is mixed in before the second. For one row every step is a bijection on 32-bit
integers, so no two elements of a row share bits; the position is built from one iota per dimension, so a sharded mask is computed
shard by shard with no communication. An element is kept when its hash is at least
``round(rate * 2**32)``: P(keep) = 1 - rate to within 2**-32.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLS = ("hash", "threefry")  # BertConfig.dropout_impl
_GOLDEN = 0x9E3779B9  # odd: index * _GOLDEN is a bijection mod 2**32


def _lowbias32(x):
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def keep_mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
    """Bool mask of `shape`, True with probability 1 - rate, a pure function of `key`."""
    per_row = math.prod(shape[1:])
    if per_row > 2**32:
        raise ValueError(f"dropout: {per_row} elements per row of {shape} is more than 2**32")
    seed = jax.random.bits(key, (2,), jnp.uint32)
    within_row, stride = jnp.zeros(shape, jnp.uint32), 1
    for dim in reversed(range(1, len(shape))):
        within_row = within_row + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride)
        stride *= shape[dim]
    row = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
    x = _lowbias32(within_row * jnp.uint32(_GOLDEN) + seed[0])
    x = _lowbias32(x ^ (seed[1] + row * jnp.uint32(0x85EBCA6B)))
    return x >= jnp.uint32(min(round(rate * 2**32), 2**32 - 1))


def dropout(x: jax.Array, rate: float, key: jax.Array, impl: str = "hash") -> jax.Array:
    """Inverted dropout: kept elements scaled by 1 / (1 - rate), the rest 0; x's dtype.
    impl: "hash" (keep_mask) or "threefry" (jax.random.bernoulli)."""
    keep = keep_mask(key, rate, x.shape) if impl == "hash" else jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)
