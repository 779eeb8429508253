"""Optimizers against references: torch.optim.AdamW, LAMB's trust ratio, schedules, masks."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from bert_jax import model as M
from bert_jax import optim
from bert_jax import params as params_lib


def test_decay_mask_excludes_layer_norm_and_biases():
    cfg = M.BertConfig.preset("tiny", vocab_size=64, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    model = nnx.eval_shape(lambda: M.BertForPreTraining(cfg, rngs=nnx.Rngs(0)))
    params = params_lib.to_dict(nnx.state(model, nnx.Param))
    flat = params_lib.flatten(optim.decay_mask(params))
    no_decay = sorted(p for p, decayed in flat.items() if not decayed)
    decay = sorted(p for p, decayed in flat.items() if decayed)
    assert no_decay and all(p.endswith("/bias") or "layer_norm" in p for p in no_decay)
    assert "bert/embeddings/layer_norm/scale" in no_decay and "mlm/bias" in no_decay
    assert all(p.endswith(("/kernel", "/embedding")) for p in decay)
    # Every weight matrix and embedding table is decayed.
    assert len(decay) == sum(1 for p in flat if p.endswith(("/kernel", "/embedding")))


def test_decay_mask_names():
    assert optim.is_decayed(("encoder", "layers", "0", "attention", "query", "kernel"))
    assert not optim.is_decayed(("encoder", "layers", "0", "attention", "query", "bias"))
    assert not optim.is_decayed(("encoder", "LayerNorm", "gamma"))
    assert not optim.is_decayed(("final_norm", "scale"))


def test_adamw_matches_torch():
    """Three steps of our AdamW (clip 1.0, wd 0.01 on weights only) == torch.optim.AdamW."""
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": rng.normal(size=(5, 3)).astype(np.float32),
                        "bias": rng.normal(size=(3,)).astype(np.float32)},
              "layer_norm": {"scale": rng.normal(size=(3,)).astype(np.float32)}}
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32) * 3, params) for _ in range(3)]
    lr = 1e-2
    opt, _ = optim.make_optimizer({"learning_rate": lr, "warmup_steps": 0, "total_steps": 1000,
                                   "decay": "constant", "weight_decay": 0.1})
    state, ours = opt.init(params), jax.tree.map(jnp.asarray, params)
    for g in grads:
        updates, state = opt.update(g, state, ours)
        ours = optax.apply_updates(ours, updates)

    t = {k: torch.tensor(v, requires_grad=True) for k, v in params_lib.flatten(params).items()}
    torch_opt = torch.optim.AdamW(
        [{"params": [t["dense/kernel"]], "weight_decay": 0.1},
         {"params": [t["dense/bias"], t["layer_norm/scale"]], "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.999), eps=1e-6)
    for g in grads:
        for k, v in params_lib.flatten(g).items():
            t[k].grad = torch.tensor(v)
        torch.nn.utils.clip_grad_norm_(list(t.values()), max_norm=1.0)
        torch_opt.step()
    for k, v in params_lib.flatten(ours).items():
        np.testing.assert_allclose(np.asarray(v), t[k].detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=k)


def test_lamb_trust_ratio_only_on_decayed_weights():
    params = {"dense": {"kernel": jnp.full((4, 4), 2.0), "bias": jnp.full((4,), 2.0)}}
    grads = {"dense": {"kernel": jnp.arange(16.0).reshape(4, 4) - 7.5, "bias": jnp.arange(4.0) - 1.5}}
    lr = 1e-3
    opt, _ = optim.make_optimizer({"name": "lamb", "learning_rate": lr, "warmup_steps": 0, "total_steps": 10,
                                   "decay": "constant", "clip_norm": 0})
    updates, _ = opt.update(grads, opt.init(params), params)
    # Trust ratio: ||update|| = lr * ||w|| for a decayed weight...
    np.testing.assert_allclose(jnp.linalg.norm(updates["dense"]["kernel"]), lr * jnp.linalg.norm(params["dense"]["kernel"]),
                               rtol=1e-5)
    # ...while a bias gets the plain Adam step (first step: lr * sign(g)).
    np.testing.assert_allclose(updates["dense"]["bias"], -lr * jnp.sign(grads["dense"]["bias"]), rtol=1e-4)


def test_schedules():
    _, linear = optim.make_optimizer({"learning_rate": 1.0, "warmup_steps": 10, "total_steps": 110})
    assert [float(linear(s)) for s in (0, 5, 10, 60, 110, 200)] == pytest.approx([0, 0.5, 1.0, 0.5, 0.0, 0.0])
    _, poly = optim.make_optimizer({"learning_rate": 1.0, "warmup_steps": 0, "total_steps": 100,
                                    "decay": "polynomial", "power": 2.0, "end_learning_rate": 0.1})
    assert float(poly(50)) == pytest.approx(0.1 + 0.9 * 0.25)
    _, constant = optim.make_optimizer({"learning_rate": 0.3, "warmup_steps": 4, "total_steps": 8, "decay": "constant"})
    assert [float(constant(s)) for s in (2, 4, 100)] == pytest.approx([0.15, 0.3, 0.3])


def test_accumulate_steps_average_gradients():
    params = {"w": jnp.ones((3, 3))}
    g1, g2 = {"w": jnp.full((3, 3), 1.0)}, {"w": jnp.full((3, 3), 3.0)}
    cfg = {"learning_rate": 0.1, "warmup_steps": 0, "total_steps": 10, "decay": "constant", "weight_decay": 0.0}
    acc, _ = optim.make_optimizer({**cfg, "accumulate_steps": 2})
    one, _ = optim.make_optimizer(cfg)
    state = acc.init(params)
    u1, state = acc.update(g1, state, params)
    assert float(jnp.abs(u1["w"]).max()) == 0.0  # no update until the 2nd micro-step
    u2, state = acc.update(g2, state, params)
    expected, _ = one.update({"w": jnp.full((3, 3), 2.0)}, one.init(params), params)
    np.testing.assert_allclose(u2["w"], expected["w"], rtol=1e-6)


@pytest.mark.parametrize("cfg, message", [
    ({"learning_rte": 1e-4}, r"unknown key\(s\) \['learning_rte'\]"),
    ({"name": "sgd"}, "name='sgd'"),
    ({"decay": "cosine"}, "decay='cosine'"),
    ({"warmup_steps": 20, "total_steps": 10}, "warmup_steps"),
    ({"accumulate_steps": 0}, "accumulate_steps=0"),
])
def test_config_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        optim.make_optimizer(cfg)
