"""Attention paths (bert_jax.attention): which one each platform and batch takes, the start-up
line that names it, and that every path a CPU can run gives the explicit path's outputs."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bert_jax import attention
from bert_jax.model import BertConfig, BertModel


def test_each_platform_and_batch_kind_takes_its_path():
    def line(impl, platform, dtype="bfloat16", dropout=0.0, packed=False, seq_len=128):
        return attention.choose(impl, platform=platform, dtype=dtype, seq_len=seq_len, packed=packed,
                                dropout=dropout).describe()

    assert line("auto", "cpu", "float32") == "xla explicit mask"
    assert line("auto", "gpu") == "cudnn fused (padding as sequence lengths)"
    assert line("auto", "gpu", packed=True) == "cudnn fused (segments as a mask bias)"
    assert line("auto", "gpu", "float32") == "xla dot_product_attention (explicit mask)"
    assert line("auto", "tpu", packed=True) == "splash (segment ids)"
    assert line("auto", "tpu", seq_len=96) == "xla dot_product_attention (explicit mask)"
    # Attention dropout forces the unfused path, and says so.
    assert line("auto", "gpu", dropout=0.1) == "xla explicit mask (attention dropout 0.1 forces the unfused path)"
    cfg = BertConfig(dtype="bfloat16")
    assert attention.describe(cfg, seq_len=128, platform_name="tpu") == (
        "attention: xla explicit mask (attention dropout 0.1 forces the unfused path); "
        "evaluation: splash (padding as a segment)")
    assert attention.describe(cfg.replace(attention_probs_dropout_prob=0.0), seq_len=128, packed=True,
                              platform_name="gpu") == "attention: cudnn fused (segments as a mask bias)"


@pytest.mark.parametrize("impl, platform, kw, message", [
    ("flash", "cpu", {}, r"model.attention_impl='flash': expected one of auto, explicit, xla, cudnn, splash"),
    ("cudnn", "cpu", {}, r"'cudnn' needs a GPU \(this program runs on cpu\)"),
    ("cudnn", "gpu", dict(dtype="float32"), r"'cudnn' takes bfloat16 or float16"),
    ("splash", "gpu", {}, r"'splash' needs a TPU"),
    ("splash", "tpu", dict(seq_len=100), r"multiple of 128 \(got 100\)"),
])
def test_impossible_choices_are_one_line_errors(impl, platform, kw, message):
    args = dict(dtype="bfloat16", seq_len=128, packed=False, dropout=0.0) | kw
    with pytest.raises(ValueError, match=message):
        attention.choose(impl, platform=platform, **args)
    with pytest.raises(ValueError, match="attention_impl='flash', expected one of"):
        BertConfig(attention_impl="flash")


def test_cpu_paths_give_the_explicit_outputs_padded_and_packed(caplog):
    """xla and splash (Pallas interpret mode) against explicit, with gradients for splash."""
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    t = 128
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 100, (2, t)), jnp.int32)
    mask = jnp.asarray(np.arange(t)[None] < np.array([[100], [57]]), jnp.int32)
    # Packed rows: three instances in row 0 (the last one cut by padding at 100), two in row 1.
    packed = dict(packed_segment_ids=jnp.asarray(np.digitize(np.arange(t), [40, 90])[None].repeat(2, 0) + 1),
                  position_ids=jnp.asarray(np.concatenate([np.arange(40), np.arange(50), np.arange(38)])[None]
                                           .repeat(2, 0)))
    impls = ("explicit", "xla", "splash")
    graphdefs = {i: nnx.split(BertModel(cfg.replace(attention_impl=i), rngs=nnx.Rngs(0)))[0] for i in impls}
    params = nnx.split(BertModel(cfg, rngs=nnx.Rngs(0)))[1]
    real = mask.astype(bool)[..., None]
    probe = jnp.asarray(rng.normal(size=(2, t, 32)), jnp.float32)  # a loss whose gradients do not cancel

    def output(params, impl, kw):
        return jnp.where(real, nnx.merge(graphdefs[impl], params)(ids, mask, **kw)["sequence_output"], 0.0)

    @jax.jit
    def run(params):
        outs = {(kind, i): output(params, i, kw) for kind, kw in (("padded", {}), ("packed", packed)) for i in impls}
        grads = {i: jax.grad(lambda p: jnp.sum(output(p, i, packed) * probe))(params) for i in ("explicit", "splash")}
        return outs, grads

    with caplog.at_level(logging.INFO, logger="bert_jax.attention"):
        outs, grads = run(params)
    for (kind, impl), out in outs.items():
        np.testing.assert_allclose(out, outs[kind, "explicit"], atol=2e-6, err_msg=f"{impl}, {kind}")
    # Packing changes the outputs (attention stays inside each instance).
    assert np.abs(np.asarray(outs["packed", "explicit"] - outs["padded", "explicit"])).max() > 1e-2
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4), grads["splash"], grads["explicit"])
    assert "attention: splash (segment ids; Pallas interpret mode on cpu)" in caplog.messages
