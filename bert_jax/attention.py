"""Self-attention's core, softmax(Q K^T / sqrt(d)) V over the keys a query may see, by one of
four paths, chosen per platform and batch kind (``BertConfig.attention_impl``):

* ``explicit``: einsums, a boolean [B, 1, T, S] mask (padding and, for packed rows, equal
  ``packed_segment_ids``), float32 softmax. The only path with dropout on the attention
  probabilities: a training step with ``attention_probs_dropout_prob > 0`` takes it whatever
  was asked, and the start-up line says so.
* ``xla``: ``jax.nn.dot_product_attention(implementation="xla")`` with the same mask.
* ``cudnn`` (GPU, bfloat16/float16): cuDNN's fused flash attention through
  ``jax.nn.dot_product_attention(implementation="cudnn")``. Padded rows pass their lengths
  (``query_seq_lengths``/``key_value_seq_lengths``: cuDNN's padding mask, no mask tensor);
  packed rows pass the segment mask, which JAX hands to cuDNN as an additive bias (its public
  API takes no segment ids). cuDNN's own packed layout (``cudnn_segments``: per-instance lengths
  and offsets) is as accurate but measured 2.9x slower forward and backward on an H200 (32 rows
  of 512, up to 38 instances a row; benchmarks/results/device_check), so it is not used.
* ``splash`` (TPU): the Pallas splash-attention kernel with segment ids: the packed segment
  of each token, padding a segment of its own. Sequence lengths must be multiples of 128.
  Inside a mesh it runs per shard (``shard_map``) over the batch and head axes. On a CPU it
  runs in Pallas interpret mode (slow: for tests).

``auto`` is ``explicit`` on CPUs, ``cudnn`` on GPUs (``xla`` in float32), ``splash`` on TPUs
(``xla`` at lengths that are not multiples of 128). ``prepare`` builds what a path needs once
per forward pass (the mask, the lengths or the segment ids); ``attend`` runs it in every
layer; ``at_queries`` narrows it to a few query positions (a classifier's last layer);
``describe`` is the start-up line's ``attention: ...`` text.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from bert_jax import dropout as dropout_lib
from bert_jax import partitioning

IMPLS = ("auto", "explicit", "xla", "cudnn", "splash")
_NAMES = {"explicit": "xla explicit mask", "xla": "xla dot_product_attention (explicit mask)",
          "cudnn": "cudnn fused", "splash": "splash"}
_QKV_NAMES = ("batch", "length", "heads", "kv")
log = logging.getLogger("bert_jax.attention")


@dataclasses.dataclass(frozen=True)
class Path:
    impl: str          # explicit | xla | cudnn | splash
    note: str = ""     # why, when it is not what was asked or not obvious

    def describe(self) -> str:
        return _NAMES[self.impl] + (f" ({self.note})" if self.note else "")


def platform() -> str:
    """The platform the program being traced runs on: the active mesh's devices (compile-only
    TPU devices in the planner), else JAX's default backend."""
    active = partitioning.current_rules()
    return active[0].devices.flat[0].platform if active else jax.default_backend()


def choose(impl: str, *, platform: str, dtype: str, seq_len: int, packed: bool, dropout: float) -> Path:
    """The path for ``BertConfig.attention_impl=impl`` on ``platform``; ``dropout`` is the
    attention-probability dropout rate in effect (0 when deterministic)."""
    if impl not in IMPLS:
        raise ValueError(f"model.attention_impl={impl!r}: expected one of {', '.join(IMPLS)}")
    if impl == "cudnn" and platform != "gpu":
        raise ValueError(f"model.attention_impl='cudnn' needs a GPU (this program runs on {platform}); "
                         "use auto, xla or explicit")
    if impl == "splash" and platform not in ("tpu", "cpu"):
        raise ValueError(f"model.attention_impl='splash' needs a TPU (this program runs on {platform}); "
                         "use auto, cudnn, xla or explicit")
    low_precision = jnp.dtype(dtype).itemsize == 2
    if impl == "cudnn" and not low_precision:
        raise ValueError(f"model.attention_impl='cudnn' takes bfloat16 or float16 (model.dtype={dtype}); "
                         "use auto or xla in float32")
    if impl == "splash" and seq_len % 128:
        raise ValueError(f"model.attention_impl='splash' needs a sequence length that is a multiple of 128 "
                         f"(got {seq_len}); use auto or xla")
    if dropout > 0.0:
        fused = "" if impl == "explicit" else f"attention dropout {dropout:g} forces the unfused path"
        return Path("explicit", fused)
    if impl == "auto":
        if platform == "gpu":
            impl = "cudnn" if low_precision else "xla"
        elif platform == "tpu":
            impl = "splash" if seq_len % 128 == 0 else "xla"
        else:
            impl = "explicit"
    if impl == "cudnn":
        return Path(impl, "segments as a mask bias" if packed else "padding as sequence lengths")
    if impl == "splash":
        note = "segment ids" if packed else "padding as a segment"
        return Path(impl, note + ("; Pallas interpret mode on cpu" if platform == "cpu" else ""))
    return Path(impl)


def describe(cfg, *, seq_len: int, packed: bool = False, platform_name: str | None = None) -> str:
    """'attention: <training path>[; evaluation: <path>]' for a start-up line."""
    kw = dict(platform=platform_name or jax.default_backend(), dtype=cfg.dtype, seq_len=seq_len, packed=packed)
    train = choose(cfg.attention_impl, dropout=cfg.attention_probs_dropout_prob, **kw)
    evaluate = choose(cfg.attention_impl, dropout=0.0, **kw)
    tail = "" if evaluate == train else f"; evaluation: {evaluate.describe()}"
    return f"attention: {train.describe()}{tail}"


@functools.lru_cache(maxsize=None)
def _log_once(line: str) -> None:
    log.info(line)


def attention_mask(input_mask: jax.Array, packed_segment_ids: jax.Array | None = None) -> jax.Array:
    """Boolean [B, 1, T, S] mask: keys that are real tokens (and, for packed
    sequences, in the same packed segment as the query)."""
    valid = input_mask.astype(bool)
    if packed_segment_ids is None:
        return valid[:, None, None, :]
    same = packed_segment_ids[:, :, None] == packed_segment_ids[:, None, :]
    return (same & valid[:, None, :])[:, None, :, :]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What one path needs, built once per forward pass (``prepare``)."""
    path: Path
    mask: jax.Array | None = None      # explicit, xla, cudnn packed: [B, 1, T, S] bool
    lengths: jax.Array | None = None   # cudnn padded: [B] int32
    segments: jax.Array | None = None  # splash: [B, T] int32, padding -1


def prepare(cfg, input_mask, packed_segment_ids=None, *, deterministic: bool) -> Prepared:
    dropout = 0.0 if deterministic else cfg.attention_probs_dropout_prob
    path = choose(cfg.attention_impl, platform=platform(), dtype=cfg.dtype, seq_len=input_mask.shape[1],
                  packed=packed_segment_ids is not None, dropout=dropout)
    _log_once(f"attention: {path.describe()}")
    if path.impl == "splash":
        segments = jnp.ones_like(input_mask) if packed_segment_ids is None else packed_segment_ids
        return Prepared(path, segments=jnp.where(input_mask.astype(bool), segments, -1).astype(jnp.int32))
    if path.impl == "cudnn" and packed_segment_ids is None:
        # At least 1: an all-padding row (an eval batch's filler) must not divide by zero.
        return Prepared(path, lengths=jnp.maximum(jnp.sum(input_mask, axis=-1), 1).astype(jnp.int32))
    return Prepared(path, mask=attention_mask(input_mask, packed_segment_ids))


def at_queries(prep: Prepared, queries: jax.Array, seq_len: int) -> Prepared:
    """The same attention for the queries at ``queries`` [B, Q] positions only, over all
    ``seq_len`` keys (a layer whose output is needed there alone: a classifier's last layer at
    each [CLS]): a [B, 1, Q, S] mask, on the explicit path when it was taken (dropout) and XLA's
    otherwise (a fused kernel's blocks gain nothing on a few queries; splash needs multiples of
    128)."""
    path = prep.path if prep.path.impl == "explicit" else Path("xla", f"{queries.shape[1]} queries")
    queries = queries.astype(jnp.int32)
    if prep.mask is not None:  # padded rows have one mask row for every query
        mask = prep.mask if prep.mask.shape[2] == 1 else jnp.take_along_axis(
            prep.mask, queries[:, None, :, None], axis=2)
    elif prep.lengths is not None:
        mask = (jnp.arange(seq_len) < prep.lengths[:, None])[:, None, None, :]
    else:  # splash's segment ids: padding is -1
        own = jnp.take_along_axis(prep.segments, queries, axis=1)
        mask = ((own[:, :, None] == prep.segments[:, None, :]) & (prep.segments[:, None, :] >= 0))[:, None]
    return Prepared(path, mask=mask)


def attend(prep: Prepared, q, k, v, *, dropout: float, deterministic: bool, key, dropout_impl: str) -> jax.Array:
    """[B, T, N, H] queries, [B, S, N, H] keys and values -> [B, T, N, H] context."""
    impl = prep.path.impl
    if impl == "explicit":
        return _explicit(q, k, v, prep.mask, dropout, deterministic, key, dropout_impl)
    if impl == "splash":
        return _splash(q, k, v, prep.segments)
    if impl == "cudnn" and prep.lengths is not None:
        return jax.nn.dot_product_attention(q, k, v, query_seq_lengths=prep.lengths,
                                            key_value_seq_lengths=prep.lengths, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=prep.mask, implementation=impl)


def _explicit(q, k, v, mask, rate, deterministic, key, dropout_impl):
    # Plain einsums: the batched attention matmuls are ~3% of the FLOPs, and XLA:CPU 0.10 fails
    # at run time ("DotThunk: BF16 x BF16 = F32") on some of their f32_einsum gradients at
    # BERT-base sizes.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(q.shape[-1])
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if not deterministic and rate > 0.0:
        if key is None:
            raise ValueError("dropout needs a key: pass rngs=nnx.Rngs(dropout=key) with deterministic=False")
        probs = dropout_lib.dropout(probs, rate, key, dropout_impl)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def _splash(q, k, v, segments):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    interpret = platform() == "cpu"

    def local(q, k, v, segments):  # one shard: [b, T, n, H]
        _, t, n, h = q.shape
        block = math.gcd(t, 512)
        sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
        kernel = sa.make_splash_mha(sa.MultiHeadMask([sa.FullMask((t, t))] * n), block_sizes=sizes,
                                    head_shards=1, q_seq_shards=1, interpret=interpret)
        heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
        out = jax.vmap(kernel)(heads_first(q / math.sqrt(h)), heads_first(k), heads_first(v),
                               sa.SegmentIds(segments, segments))
        return heads_first(out)

    active = partitioning.current_rules()
    if active is None:
        return local(q, k, v, segments)
    mesh, rules = active
    qkv = partitioning.logical_to_mesh_spec(_QKV_NAMES, rules, mesh)
    rows = PartitionSpec(*qkv[:2])
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, rows), out_specs=qkv,
                         check_vma=False)(q, k, v, segments)


def cudnn_segments(packed_segment_ids: jax.Array, input_mask: jax.Array, max_segments: int):
    """cuDNN's packed ("THD") layout for packed rows: -> (seqlen [B, M], offsets [B, M + 1]),
    M = max_segments + 1, for the ``q_seqlen``/``q_offsets`` (and kv) arguments of
    ``jax._src.cudnn.fused_attention_stablehlo.dot_product_attention``.

    A row's instances (``packed_segment_ids`` 1..k, contiguous and in order, as
    ``data.packing`` writes them) come first; the row's trailing padding is one more segment of
    its own, so every token's output is defined (cuDNN leaves tokens outside every segment
    unwritten, and an undefined value there would reach the weight gradients). Unused entries
    are -1, live ones first. ``offsets`` are segment starts within the row.
    """
    b = packed_segment_ids.shape[0]
    ids = jnp.where(input_mask.astype(bool), packed_segment_ids, max_segments + 1)
    counts = jnp.sum(ids[:, :, None] == jnp.arange(1, max_segments + 2, dtype=ids.dtype), axis=1,
                     dtype=jnp.int32)
    starts = jnp.cumsum(counts, axis=1, dtype=jnp.int32) - counts
    order = jnp.argsort(counts == 0, axis=1, stable=True)  # live segments first, in order
    counts, starts = (jnp.take_along_axis(x, order, axis=1) for x in (counts, starts))
    live = counts > 0
    seqlen = jnp.where(live, counts, -1)
    offsets = jnp.concatenate([jnp.where(live, starts, -1), jnp.full((b, 1), -1, jnp.int32)], axis=1)
    return seqlen.astype(jnp.int32), offsets.astype(jnp.int32)
