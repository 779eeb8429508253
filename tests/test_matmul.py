"""f32_einsum: same values and gradients as autodiff; the model's f32_out path against xla."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bert_jax import hardware
from bert_jax import model as M
from bert_jax import params as params_lib
from bert_jax.matmul import f32_einsum

SPECS = [("...k,kn->...n", (3, 5, 8), (8, 6)), ("bpe,ve->bpv", (2, 4, 8), (11, 8)),
         ("bqhd,bkhd->bhqk", (2, 5, 3, 4), (2, 7, 3, 4))]


@pytest.mark.parametrize("spec,a_shape,b_shape", SPECS)
def test_float32_equals_autodiff_of_einsum(spec, a_shape, b_shape):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=a_shape).astype(np.float32), rng.normal(size=b_shape).astype(np.float32)
    w = rng.normal(size=jnp.einsum(spec, a, b).shape).astype(np.float32)
    ours = jax.value_and_grad(lambda a, b: jnp.sum(w * f32_einsum(spec, jnp.float32, a, b)), (0, 1))(a, b)
    ref = jax.value_and_grad(lambda a, b: jnp.sum(w * jnp.einsum(spec, a, b)), (0, 1))(a, b)
    for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_give_float32_outputs_and_operand_dtype_gradients():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 16)), jnp.bfloat16)
    kernel = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    y = f32_einsum("...k,kn->...n", jnp.bfloat16, x, kernel)
    assert y.dtype == jnp.float32
    dx, dk = jax.grad(lambda x, k: f32_einsum("...k,kn->...n", jnp.bfloat16, x, k).sum(), (0, 1))(x, kernel)
    assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.float32
    # the kernel gradient is x^T 1 accumulated in float32 from bfloat16 inputs: exact here
    np.testing.assert_allclose(dk, np.broadcast_to(np.asarray(x, np.float32).sum(0)[:, None], (16, 8)), rtol=1e-6)
    np.testing.assert_allclose(y, np.asarray(x, np.float32) @ np.asarray(kernel.astype(jnp.bfloat16), np.float32),
                               rtol=1e-5, atol=1e-5)


def test_spec_with_an_index_summed_on_one_side_is_refused():
    with pytest.raises(ValueError, match="appears nowhere else"):
        f32_einsum("ij,kl->ik", jnp.float32, jnp.ones((2, 3)), jnp.ones((4, 5)))


def test_model_f32_out_matches_xla_path_in_bfloat16():
    """Same params, bfloat16 compute: the two matmul implementations agree in loss and gradients
    to bfloat16 precision, and f32_out's parameter gradients are float32."""
    cfg = M.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=32, dtype="bfloat16")
    rng = np.random.default_rng(2)
    ids = rng.integers(5, 97, (3, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    positions = rng.integers(0, 16, (3, 4)).astype(np.int32)
    results = {}
    for impl in ("xla", "f32_out"):
        model = M.BertForPreTraining(cfg.replace(matmul_impl=impl), rngs=nnx.Rngs(0))
        low = [m for _, m in nnx.iter_graph(model) if isinstance(m, M.Dense) and jnp.dtype(m.dtype) == jnp.bfloat16]
        assert len(low) == 2 * 6 + 2 and all(m.f32_out == (impl == "f32_out") for m in low)
        graphdef, state = nnx.split(model)

        def loss(state):
            out = nnx.merge(graphdef, state)(ids, mask, None, positions, deterministic=False, rngs=jax.random.key(3))
            return out["mlm_logits"].astype(jnp.float32).std() + out["nsp_logits"].astype(jnp.float32).mean()

        results[impl] = jax.jit(jax.value_and_grad(loss))(state)
    (l_xla, g_xla), (l_f32, g_f32) = results["xla"], results["f32_out"]
    np.testing.assert_allclose(l_f32, l_xla, rtol=2e-2)
    flat_xla = params_lib.flatten(params_lib.to_dict(g_xla))
    flat_f32 = params_lib.flatten(params_lib.to_dict(g_f32))
    for k in flat_xla:
        a, b = np.asarray(flat_xla[k], np.float32), np.asarray(flat_f32[k], np.float32)
        assert flat_f32[k].dtype == jnp.float32, k
        assert np.abs(a - b).max() <= 0.05 * np.abs(a).max() + 1e-6, k


def test_auto_is_f32_out_only_for_low_precision_on_a_fast_bf16_cpu():
    cfg = M.BertConfig.preset("tiny")
    assert not M.f32_matmuls(cfg)  # float32 compute: nothing to gain
    assert M.f32_matmuls(cfg.replace(dtype="bfloat16")) == hardware.compute_choice("bfloat16").f32_out
    assert not M.f32_matmuls(cfg.replace(dtype="bfloat16", matmul_impl="xla"))
    assert M.f32_matmuls(cfg.replace(dtype="bfloat16", matmul_impl="f32_out"))
    with pytest.raises(ValueError, match="matmul_impl"):
        cfg.replace(matmul_impl="fast")
