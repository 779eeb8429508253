"""BERT in Flax NNX: encoder, pooler, masked-LM (tied) and NSP heads, task heads.

Numerically identical to reference BERT (Google's TF code, Hugging Face's
``BertForPreTraining``) given the same weights: post-LayerNorm residual blocks,
exact (erf) GELU, LayerNorm eps 1e-12, MLM decoder tied to the word embeddings
plus an output bias. ``BertConfig(pre_layer_norm=True)`` is the one departure, a
config choice: pre-LayerNorm blocks and a final LayerNorm (more learned per step in
short pretraining runs; not exportable to Hugging Face's or Google's BERT).

Design notes
* Modules hold only ``nnx.Param`` state. Dropout keys come per call
  (``rngs=nnx.Rngs(dropout=key)`` or a raw key), so the train step is a pure
  function of ``nnx.split`` state.
* Every parameter carries logical axis names (``vocab, embed, embed_out, heads,
  kv, mlp, position, type_vocab, classes``, and ``layers`` for scanned stacks); the main
  activations are constrained through :mod:`bert_jax.partitioning`. The model
  knows nothing about meshes.
* The MLM head projects only ``masked_lm_positions`` onto the vocabulary
  (Google's data format provides them); ``masked_lm_positions=None`` projects
  every position, for inspection. The last encoder layer runs only where its output is
  read (``BertModel(at_positions=...)``): the masked positions and [CLS] in pretraining, the
  [CLS] tokens in sequence classification; same values, up to ~(10/12)/L of the encoder's
  matmuls less.
* Params are float32 (``param_dtype``); matmuls run in ``dtype`` (bfloat16 on
  accelerators). Softmax, LayerNorm statistics and logits used by losses are
  float32.
* Attention's core (explicit mask, XLA, cuDNN fused or Pallas splash, chosen per platform and
  batch kind, named in the start-up line) is :mod:`bert_jax.attention`.
* ``remat_policy`` and ``scan_layers`` trade memory and compile time (``full`` saves only
  each layer's input, ``dots`` every matmul output, ``dots_no_batch`` those without batch
  dimensions (not attention's), ``attention_out`` only the attention context); the
  canonical (exported) param layout is always unstacked: see :mod:`bert_jax.params`.
* The model knows no files: ``config.json`` and the checkpoint formats live in
  :mod:`bert_jax.weights`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from bert_jax import attention, hardware
from bert_jax import dropout as dropout_lib
from bert_jax.matmul import f32_einsum
from bert_jax.partitioning import constrain

# Sizes Google published with the BERT release (L/H/A); intermediate = 4H.
PRESETS = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "attention_out")
MATMUL_IMPLS = ("auto", "xla", "f32_out")
# BertConfig fields that say how to run the model, not what it is (absent from config.json).
RUNTIME_KEYS = ("dtype", "param_dtype", "remat_policy", "scan_layers", "attention_impl", "matmul_impl",
                "dropout_impl")
HIDDEN_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    # False: BERT's post-LayerNorm blocks (LayerNorm(x + sublayer(x))), what Google's and Hugging
    # Face's BERT are. True: pre-LayerNorm blocks (x + sublayer(LayerNorm(x))) and a LayerNorm after
    # the last layer (encoder/final_layer_norm), the form Xiong et al. 2020 and Geiping & Goldstein
    # 2022 ("Cramming") train at higher learning rates; here it learned more per step than post-LN
    # at the same rate (README, time to accuracy). Not exportable to Hugging Face's or Google's
    # BERT, which have no such blocks (bert_jax.weights says so).
    pre_layer_norm: bool = False
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat_policy: str = "none"
    scan_layers: bool = False
    attention_impl: str = "auto"  # auto | explicit | xla | cudnn | splash (bert_jax/attention.py)
    # auto | xla | f32_out. f32_out: matmuls in `dtype` give float32 outputs and float32 weight
    # gradients (bert_jax/matmul.py); auto = f32_out on a CPU with a fast bfloat16 path when dtype
    # is not float32, else xla (hardware.compute_choice). Config files' dtype "auto" is resolved
    # by the same function before a BertConfig is made.
    matmul_impl: str = "auto"
    # hash | threefry: the dropout masks' random bits (bert_jax/dropout.py); hash is ~50x cheaper
    # on XLA:CPU, threefry is jax.random.bernoulli.
    dropout_impl: str = "hash"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig: hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"BertConfig: remat_policy={self.remat_policy!r}, expected one of {REMAT_POLICIES}")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"BertConfig: hidden_act={self.hidden_act!r}, expected one of {HIDDEN_ACTS}")
        if self.attention_impl not in attention.IMPLS:
            raise ValueError(f"BertConfig: attention_impl={self.attention_impl!r}, expected one of {attention.IMPLS}")
        if self.dropout_impl not in dropout_lib.IMPLS:
            raise ValueError(f"BertConfig: dropout_impl={self.dropout_impl!r}, expected one of {dropout_lib.IMPLS}")
        if self.matmul_impl not in MATMUL_IMPLS:
            raise ValueError(f"BertConfig: matmul_impl={self.matmul_impl!r}, expected one of {MATMUL_IMPLS}")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError as e:
                raise ValueError(f"BertConfig: {name}={getattr(self, name)!r} is not a dtype") from e

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> "BertConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown BERT preset {name!r}; known: {sorted(PRESETS)}")
        layers, hidden, heads = PRESETS[name]
        base = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                    intermediate_size=4 * hidden)
        base.update(overrides)
        return cls.from_dict(base)

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        """Our own config dict: an unknown key is an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"BertConfig: unknown key(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **kw) -> "BertConfig":
        return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------
# Building blocks

def _init(cfg: BertConfig):
    return nnx.initializers.truncated_normal(stddev=cfg.initializer_range)


def _axes(init, *names):
    # eager_sharding=False: names are logical; the trainer maps them to a mesh.
    return nnx.with_partitioning(init, names, eager_sharding=False)


def f32_matmuls(cfg: BertConfig, dtype=None) -> bool:
    """Whether matmuls computed in ``dtype`` (default: the compute dtype) go through
    :func:`matmul.f32_einsum`; ``auto`` asks :func:`hardware.compute_choice` (this process's
    backend and CPU)."""
    return hardware.compute_choice(str(jnp.dtype(dtype or cfg.dtype)), cfg.matmul_impl).f32_out


class Dense(nnx.Linear):
    """``nnx.Linear`` (same parameters) that, with ``f32_out``, runs its matmul through
    :func:`matmul.f32_einsum`: float32 output and float32 kernel gradients."""

    def __init__(self, *args, f32_out: bool = False, **kw):
        super().__init__(*args, **kw)
        self.f32_out = f32_out

    def __call__(self, x, *, keep_f32: bool = False):
        """``keep_f32``: with ``f32_out``, return the float32 result uncast, for element-wise work
        (GELU, dropout, the residual add) to run in float32 before one cast; else ignored."""
        if not self.f32_out:
            return super().__call__(x)
        y = f32_einsum("...k,kn->...n", jnp.dtype(self.dtype), x, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y if keep_f32 else y.astype(self.dtype)


def dense(cfg: BertConfig, d_in: int, d_out: int, axes: tuple, rngs: nnx.Rngs, dtype=None) -> nnx.Linear:
    return Dense(
        d_in, d_out,
        kernel_init=_axes(_init(cfg), *axes),
        bias_init=_axes(nnx.initializers.zeros_init(), axes[1]),
        dtype=dtype or cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
        f32_out=f32_matmuls(cfg, dtype))


def layer_norm(cfg: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # LayerNorm statistics in float32 whatever the compute dtype.
    return nnx.LayerNorm(
        cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=cfg.param_dtype,
        scale_init=_axes(nnx.initializers.ones_init(), "embed"),
        bias_init=_axes(nnx.initializers.zeros_init(), "embed"), rngs=rngs)


def activation(name: str):
    if name == "gelu":  # BERT's own form, 0.5 x (1 + erf(x / sqrt 2)): on XLA:CPU erf costs half
        # the erfc of jax.nn.gelu(approximate=False) (forward 3.5 against 7.8 ms at [2304, 1536])
        return lambda x: 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))
    if name == "relu":
        return jax.nn.relu
    return lambda x: jax.nn.gelu(x, approximate=True)


def _key(rngs) -> jax.Array | None:
    if rngs is None:
        return None
    if isinstance(rngs, nnx.Rngs):
        return rngs.dropout()
    return rngs


def _dropout(x, rate: float, deterministic: bool, key, impl: str):
    if deterministic or rate == 0.0:
        return x
    if key is None:
        raise ValueError("dropout needs a key: pass rngs=nnx.Rngs(dropout=key) with deterministic=False")
    return dropout_lib.dropout(x, rate, key, impl)


def _lookup(embed: nnx.Embed, ids, rows: str | None = None):
    """Rows of an embedding table, gathered from the table with its ``embed`` (FSDP) axis all-gathered
    first: the gather then yields batch-sharded rows directly. Gathering from the FSDP-sharded
    table instead leaves rows sharded on ``embed``, which XLA can only reshard to the batch layout
    by a full rematerialisation when FSDP and tensor parallelism are combined."""
    table = constrain(embed.embedding.get_value(), (rows, None))
    return constrain(jnp.take(table, ids, axis=0), ("batch", "length", "embed"))


class Embeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        init = _init(cfg)
        self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=_axes(init, "vocab", "embed"),
                                         param_dtype=cfg.param_dtype, rngs=rngs)
        self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                             embedding_init=_axes(init, "position", "embed"),
                                             param_dtype=cfg.param_dtype, rngs=rngs)
        self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size,
                                               embedding_init=_axes(init, "type_vocab", "embed"),
                                               param_dtype=cfg.param_dtype, rngs=rngs)
        self.layer_norm = layer_norm(cfg, rngs)

    def __call__(self, input_ids, segment_ids, position_ids, deterministic, key):
        x = (_lookup(self.word_embeddings, input_ids, "vocab") + _lookup(self.position_embeddings, position_ids)
             + _lookup(self.token_type_embeddings, segment_ids))
        x = self.layer_norm(x)
        x = _dropout(x, self.cfg.hidden_dropout_prob, deterministic, key, self.cfg.dropout_impl)
        return constrain(x.astype(self.cfg.dtype), ("batch", "length", "embed"))


class SelfAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        h = cfg.hidden_size
        self.query = dense(cfg, h, h, ("embed", "heads"), rngs)
        self.key = dense(cfg, h, h, ("embed", "heads"), rngs)
        self.value = dense(cfg, h, h, ("embed", "heads"), rngs)
        self.output = dense(cfg, h, h, ("heads", "embed"), rngs)

    def __call__(self, x, prepared: attention.Prepared, deterministic, key, queries=None, keep_f32=False):
        """``queries`` [B, Q]: the output at those positions only, [B, Q, H] (keys and values
        still come from every position). ``keep_f32``: see ``Dense``."""
        cfg = self.cfg
        names = ("batch", "length", "heads", "kv")

        def split_heads(y):
            return constrain(y.reshape(*y.shape[:2], cfg.num_attention_heads, cfg.head_dim), names)

        if queries is None:
            q = split_heads(self.query(x))
        else:
            q = split_heads(self.query(gather_positions(x, queries)))
            prepared = attention.at_queries(prepared, queries, x.shape[1])
        k, v = split_heads(self.key(x)), split_heads(self.value(x))
        ctx = attention.attend(prepared, q, k, v, dropout=cfg.attention_probs_dropout_prob,
                               deterministic=deterministic, key=key, dropout_impl=cfg.dropout_impl)
        ctx = constrain(ctx, names).reshape(*q.shape[:2], cfg.hidden_size)
        # remat_policy="attention_out" saves this [B, T, H] per layer and recomputes the rest.
        return self.output(checkpoint_name(ctx, "attention_out"), keep_f32=keep_f32)


class Layer(nnx.Module):
    """One transformer block: post-LayerNorm (BERT's), or pre-LayerNorm with ``pre_layer_norm``
    (the same parameters, ``attention_layer_norm`` then normalising the attention's input and
    ``output_layer_norm`` the feed-forward's)."""

    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attention = SelfAttention(cfg, rngs)
        self.attention_layer_norm = layer_norm(cfg, rngs)
        self.intermediate = dense(cfg, cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), rngs)
        self.output = dense(cfg, cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), rngs)
        self.output_layer_norm = layer_norm(cfg, rngs)

    def __call__(self, x, prepared, deterministic, key, queries=None):
        """``queries`` [B, Q]: the block's output at those positions only, [B, Q, H]."""
        cfg = self.cfg
        keys = [None] * 3 if key is None else list(jax.random.split(key, 3))
        if cfg.pre_layer_norm:
            return self._pre_layer_norm(x, prepared, deterministic, keys, queries)
        # With float32-output matmuls (f32_out), the element-wise work between them (dropout, the
        # residual add, GELU) runs on their float32 results and is cast to the compute dtype once,
        # before the next matmul: XLA:CPU otherwise rounds to bfloat16 after every element-wise op.
        a = self.attention(x, prepared, deterministic, keys[0], queries, keep_f32=True)
        a = _dropout(a, cfg.hidden_dropout_prob, deterministic, keys[1], cfg.dropout_impl)
        residual = x if queries is None else gather_positions(x, queries)
        x = self.attention_layer_norm(residual + a).astype(cfg.dtype)
        x = constrain(x, ("batch", "length", "embed"))
        h = activation(cfg.hidden_act)(self.intermediate(x, keep_f32=True)).astype(cfg.dtype)
        h = constrain(h, ("batch", "length", "mlp"))
        h = _dropout(self.output(h, keep_f32=True), cfg.hidden_dropout_prob, deterministic, keys[2],
                     cfg.dropout_impl)
        x = self.output_layer_norm(x + h).astype(cfg.dtype)
        return constrain(x, ("batch", "length", "embed"))

    def _pre_layer_norm(self, x, prepared, deterministic, keys, queries):
        cfg = self.cfg
        a = self.attention(self.attention_layer_norm(x).astype(cfg.dtype), prepared, deterministic, keys[0], queries,
                           keep_f32=True)
        a = _dropout(a, cfg.hidden_dropout_prob, deterministic, keys[1], cfg.dropout_impl)
        x = (x if queries is None else gather_positions(x, queries)) + a
        x = constrain(x, ("batch", "length", "embed"))
        h = self.intermediate(self.output_layer_norm(x).astype(cfg.dtype), keep_f32=True)
        h = activation(cfg.hidden_act)(h).astype(cfg.dtype)
        h = constrain(h, ("batch", "length", "mlp"))
        h = _dropout(self.output(h, keep_f32=True), cfg.hidden_dropout_prob, deterministic, keys[2],
                     cfg.dropout_impl)
        return constrain((x + h).astype(cfg.dtype), ("batch", "length", "embed"))


def _remat_policy(name: str):
    return {
        "full": None,  # save nothing
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
    }[name]


class Encoder(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        if cfg.scan_layers:
            @nnx.split_rngs(splits=cfg.num_hidden_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make(r):
                return Layer(cfg, r)

            self.layers = make(rngs)
        else:
            self.layers = nnx.List([Layer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
        if cfg.pre_layer_norm:  # pre-LN blocks leave the residual stream unnormalised
            self.final_layer_norm = layer_norm(cfg, rngs)

    def __call__(self, x, prepared, deterministic, key, last_queries=None):
        """``last_queries`` [B, Q]: the last layer computes its output at those positions only
        ([B, Q, H] out): what a classifier needs (its [CLS] tokens), ~1/L of the encoder's work
        less, with the same values there."""
        x = self._layers(x, prepared, deterministic, key, last_queries)
        if self.cfg.pre_layer_norm:
            x = self.final_layer_norm(x).astype(self.cfg.dtype)
        return x

    def _layers(self, x, prepared, deterministic, key, last_queries):
        cfg = self.cfg

        def apply(layer_state, graphdef, h, layer_key, queries=None):
            return nnx.merge(graphdef, layer_state)(h, prepared, deterministic, layer_key, queries)

        if cfg.remat_policy != "none":
            apply = jax.checkpoint(apply, policy=_remat_policy(cfg.remat_policy), static_argnums=(1,))

        def layer_key(i):
            return None if key is None else jax.random.fold_in(key, i)

        n = cfg.num_hidden_layers
        if cfg.scan_layers:
            graphdef, stacked = nnx.split(self.layers)

            def body(h, xs):
                state, i = xs
                return apply(state, graphdef, h, layer_key(i)), None

            if last_queries is None:
                x, _ = jax.lax.scan(body, x, (stacked, jnp.arange(n)))
                return x
            x, _ = jax.lax.scan(body, x, (jax.tree.map(lambda a: a[:-1], stacked), jnp.arange(n - 1)))
            return apply(jax.tree.map(lambda a: a[-1], stacked), graphdef, x, layer_key(n - 1), last_queries)
        for i, layer in enumerate(self.layers):
            graphdef, state = nnx.split(layer)
            x = apply(state, graphdef, x, layer_key(i), last_queries if i == n - 1 else None)
        return x


class BertModel(nnx.Module):
    """Embeddings + encoder + pooler. Returns sequence_output and pooled_output."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, rngs)
        self.encoder = Encoder(cfg, rngs)
        self.pooler = dense(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", "embed_out"), rngs)

    def __call__(self, input_ids, input_mask=None, segment_ids=None, *, deterministic=True, rngs=None,
                 position_ids=None, packed_segment_ids=None, cls_positions=None, at_positions=None):
        """``packed_segment_ids`` [B, T] (one id per packed sequence, attention stays inside it)
        with ``position_ids`` restarting at 0 per sequence, and ``cls_positions`` [B, N] (each
        packed sequence's ``[CLS]`` index) make ``pooled_output`` [B, N, H], one per sequence;
        without ``cls_positions`` it is [B, H] from position 0. ``at_positions`` [B, P]: the last
        layer runs only there and at the [CLS] tokens (its keys and values still from every
        position), and ``sequence_output`` is [B, P, H], the outputs at ``at_positions``: the same
        values for about (10/12)(1 - P/T)/L of the encoder's matmuls less (a [B, 0] array: the
        pooled outputs alone, what a classifier reads)."""
        cfg = self.cfg
        b, t = input_ids.shape
        if t > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {t} exceeds max_position_embeddings={cfg.max_position_embeddings}")
        if input_mask is None:
            input_mask = jnp.ones_like(input_ids)
        if segment_ids is None:
            segment_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(t), (b, t))
        key = _key(rngs)
        keys = [None, None] if key is None else list(jax.random.split(key, 2))
        x = self.embeddings(input_ids, segment_ids, position_ids, deterministic, keys[0])
        prepared = attention.prepare(cfg, input_mask, packed_segment_ids, deterministic=deterministic)
        if at_positions is None:
            x = self.encoder(x, prepared, deterministic, keys[1])
            first = x[:, 0] if cls_positions is None else gather_positions(x, cls_positions)
        else:
            cls = jnp.zeros((b, 1), jnp.int32) if cls_positions is None else cls_positions.astype(jnp.int32)
            out = self.encoder(x, prepared, deterministic, keys[1],
                               jnp.concatenate([cls, at_positions.astype(jnp.int32)], axis=1))
            n = cls.shape[1]
            first, x = (out[:, 0] if cls_positions is None else out[:, :n]), out[:, n:]
        pooled = jnp.tanh(self.pooler(first))
        return {"sequence_output": x, "pooled_output": pooled}


class MaskedLMHead(nnx.Module):
    """dense + GELU + LayerNorm, then the decoder tied to the word embeddings + bias."""

    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.transform = dense(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", "embed_out"), rngs)
        self.transform_layer_norm = layer_norm(cfg, rngs)
        self.bias = nnx.Param(_axes(nnx.initializers.zeros_init(), "vocab")(rngs.params(), (cfg.vocab_size,),
                                                                           cfg.param_dtype))

    def __call__(self, x, word_embeddings):
        cfg = self.cfg
        h = activation(cfg.hidden_act)(self.transform(x, keep_f32=True))
        h = self.transform_layer_norm(h).astype(cfg.dtype)
        if f32_matmuls(cfg):
            logits = f32_einsum("bpe,ve->bpv", jnp.dtype(cfg.dtype), h, word_embeddings)
        else:
            logits = jnp.einsum("bpe,ve->bpv", h, word_embeddings.astype(cfg.dtype),
                                preferred_element_type=jnp.float32)
        logits = logits + self.bias.get_value().astype(jnp.float32)
        return constrain(logits, ("batch", "length", "vocab"))


def gather_positions(sequence_output: jax.Array, positions: jax.Array) -> jax.Array:
    """[B, T, E] at [B, P] positions -> [B, P, E]."""
    return jnp.take_along_axis(sequence_output, positions[..., None].astype(jnp.int32), axis=1)


class BertForPreTraining(nnx.Module):
    """BERT with the masked-LM and (``next_sentence=True``, BERT's objective) next-sentence
    heads; without it there is no `nsp` parameter and no `nsp_logits` (MLM-only pretraining)."""

    def __init__(self, cfg: BertConfig, *, next_sentence: bool = True, rngs: nnx.Rngs):
        self.cfg = cfg
        self.bert = BertModel(cfg, rngs=rngs)
        self.mlm = MaskedLMHead(cfg, rngs)
        if next_sentence:
            self.nsp = dense(cfg, cfg.hidden_size, 2, ("embed", "classes"), rngs, dtype=jnp.float32)

    def __call__(self, input_ids, input_mask=None, segment_ids=None, masked_lm_positions=None, *,
                 deterministic=True, rngs=None, **kw):
        # With masked_lm_positions the last layer runs at those (and the [CLS] tokens) alone.
        out = self.bert(input_ids, input_mask, segment_ids, deterministic=deterministic, rngs=rngs,
                        at_positions=masked_lm_positions, **kw)
        seq = out["sequence_output"]
        word = self.bert.embeddings.word_embeddings.embedding.get_value()
        out["mlm_logits"] = self.mlm(seq, word)
        if hasattr(self, "nsp"):
            out["nsp_logits"] = self.nsp(out["pooled_output"].astype(jnp.float32))
        return out


class BertForSequenceClassification(nnx.Module):
    """BERT + dropout + linear head on the pooled output. num_labels=1: regression. Its last
    encoder layer runs at the [CLS] tokens alone, so ``sequence_output`` is empty ([B, 0, H]);
    ``self.bert(...)`` gives the full one."""

    def __init__(self, cfg: BertConfig, num_labels: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.num_labels = num_labels
        self.bert = BertModel(cfg, rngs=rngs)
        self.classifier = dense(cfg, cfg.hidden_size, num_labels, ("embed", "classes"), rngs, dtype=jnp.float32)

    def __call__(self, input_ids, input_mask=None, segment_ids=None, *, deterministic=True, rngs=None, **kw):
        key = _key(rngs)
        keys = [None, None] if key is None else list(jax.random.split(key, 2))
        # Only the pooled [CLS] outputs are used: the last layer runs at those positions alone.
        out = self.bert(input_ids, input_mask, segment_ids, deterministic=deterministic, rngs=keys[0],
                        at_positions=jnp.zeros((input_ids.shape[0], 0), jnp.int32), **kw)
        pooled = _dropout(out["pooled_output"], self.cfg.hidden_dropout_prob, deterministic, keys[1],
                          self.cfg.dropout_impl)
        out["logits"] = self.classifier(pooled.astype(jnp.float32))
        return out


class BertForTokenClassification(nnx.Module):
    """BERT + dropout + linear head on every token's output (tagging, NER). The head is
    `token_classifier` (not `classifier`), so a checkpoint says which head it holds."""

    def __init__(self, cfg: BertConfig, num_labels: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.num_labels = num_labels
        self.bert = BertModel(cfg, rngs=rngs)
        self.token_classifier = dense(cfg, cfg.hidden_size, num_labels, ("embed", "classes"), rngs, dtype=jnp.float32)

    def __call__(self, input_ids, input_mask=None, segment_ids=None, *, deterministic=True, rngs=None, **kw):
        key = _key(rngs)
        keys = [None, None] if key is None else list(jax.random.split(key, 2))
        out = self.bert(input_ids, input_mask, segment_ids, deterministic=deterministic, rngs=keys[0], **kw)
        sequence = _dropout(out["sequence_output"], self.cfg.hidden_dropout_prob, deterministic, keys[1],
                            self.cfg.dropout_impl)
        out["logits"] = self.token_classifier(sequence.astype(jnp.float32))
        return out


class BertForQuestionAnswering(nnx.Module):
    """BERT + a linear start/end head on every token (extractive QA, SQuAD); no dropout on
    the head's input, as in Google's run_squad.py and Hugging Face."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.bert = BertModel(cfg, rngs=rngs)
        self.qa_outputs = dense(cfg, cfg.hidden_size, 2, ("embed", "classes"), rngs, dtype=jnp.float32)

    def __call__(self, input_ids, input_mask=None, segment_ids=None, *, deterministic=True, rngs=None, **kw):
        out = self.bert(input_ids, input_mask, segment_ids, deterministic=deterministic, rngs=rngs, **kw)
        logits = self.qa_outputs(out["sequence_output"].astype(jnp.float32))
        out["start_logits"], out["end_logits"] = logits[..., 0], logits[..., 1]
        return out
