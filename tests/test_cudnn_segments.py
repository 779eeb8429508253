"""attention.cudnn_segments: packed rows -> cuDNN's packed-layout lengths and offsets. The
kernel itself needs a GPU (benchmarks/device_check.py checks it there against XLA's); here the
layout's meaning is checked: attention confined to each (length, offset) span equals the
segment-mask attention on every real token."""
import numpy as np
import jax.numpy as jnp

from bert_jax import attention


def packed_rows():
    # row 0: instances of 3, 2 and 4 tokens, then 3 padding; row 1: one instance, full row;
    # row 2: two instances, then 5 padding
    ids = np.array([[1, 1, 1, 2, 2, 3, 3, 3, 3, 0, 0, 0],
                    [1] * 12,
                    [1, 1, 1, 1, 2, 2, 2, 0, 0, 0, 0, 0]], np.int32)
    return ids, (ids > 0).astype(np.int32)


def test_lengths_and_offsets_put_padding_in_a_segment_of_its_own():
    ids, mask = packed_rows()
    seqlen, offsets = attention.cudnn_segments(jnp.asarray(ids), jnp.asarray(mask), max_segments=4)
    assert seqlen.shape == (3, 5) and offsets.shape == (3, 6)
    np.testing.assert_array_equal(seqlen, [[3, 2, 4, 3, -1], [12, -1, -1, -1, -1], [4, 3, 5, -1, -1]])
    np.testing.assert_array_equal(offsets, [[0, 3, 5, 9, -1, -1], [0, -1, -1, -1, -1, -1],
                                            [0, 4, 7, -1, -1, -1]])


def span_attention(q, k, v, seqlen, offsets):
    """What cuDNN computes in the packed layout: each span attends within itself."""
    out = np.full_like(q, np.nan)
    for r in range(q.shape[0]):
        for n, o in zip(seqlen[r], offsets[r]):
            if n < 0:
                continue
            s = slice(o, o + n)
            logits = np.einsum("qhd,khd->hqk", q[r, s], k[r, s]) / np.sqrt(q.shape[-1])
            p = np.exp(logits - logits.max(-1, keepdims=True))
            out[r, s] = np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v[r, s])
    return out


def test_spans_give_the_segment_mask_attention_on_real_tokens_and_cover_every_token():
    ids, mask = packed_rows()
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(3, 12, 2, 8)).astype(np.float32) for _ in range(3))
    seqlen, offsets = map(np.asarray, attention.cudnn_segments(jnp.asarray(ids), jnp.asarray(mask), 4))
    spans = span_attention(q, k, v, seqlen, offsets)
    assert not np.isnan(spans).any()  # padding is a segment: every output is written
    ref = np.asarray(attention._explicit(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                         attention.attention_mask(jnp.asarray(mask), jnp.asarray(ids)),
                                         0.0, True, None, "hash"))
    real = mask.astype(bool)
    np.testing.assert_allclose(spans[real], ref[real], rtol=1e-5, atol=1e-5)
