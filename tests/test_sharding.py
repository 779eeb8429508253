"""Mesh construction, sharding rules, and sharded training == one device (8 fake CPU devices)."""
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bert_jax import model as M
from bert_jax import optim, sharding, train_step as T

# Unoptimised XLA code compiles ~3x faster on CPU; every layout compiles the same way.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
VOCAB = 126  # not divisible by 4: exercises the replicate-on-non-divisible fallback


def tiny_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=32)
    base.update(kw)
    return M.BertConfig.preset("tiny", **base)


def make_batch(rng, batch_size=16, seq_len=16, predictions=4, vocab=VOCAB):
    lengths = rng.integers(seq_len // 2, seq_len + 1, batch_size)
    input_mask = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int32)
    weights = (rng.random((batch_size, predictions)) < 0.8).astype(np.float32)
    return dict(
        input_ids=(rng.integers(1, vocab, (batch_size, seq_len)) * input_mask).astype(np.int32),
        input_mask=input_mask,
        segment_ids=(np.arange(seq_len)[None] >= lengths[:, None] // 2).astype(np.int32) * input_mask,
        masked_lm_positions=(rng.integers(1, seq_len // 2, (batch_size, predictions)) * weights).astype(np.int32),
        masked_lm_ids=rng.integers(1, vocab, (batch_size, predictions)).astype(np.int32),
        masked_lm_weights=weights,
        next_sentence_labels=rng.integers(0, 2, batch_size).astype(np.int32),
    )


# ---------------------------------------------------------------------------
# make_mesh

def test_make_mesh_sizes_and_rest():
    mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(sharding.make_mesh({"data": -1}).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(sharding.make_mesh({"tensor": 2}, devices=jax.devices()[:2]).shape)["tensor"] == 2


@pytest.mark.parametrize("cfg, message", [
    ({"data": 3}, "does not divide the number of devices"),
    ({"data": 2, "fsdp": 2}, "multiply to 4 but there are 8 devices"),
    ({"data": -1, "fsdp": -1}, "at most one axis may be -1"),
    ({"data": 0}, "axis 'data' has size 0"),
    ({"dta": 8}, r"unknown key\(s\) \['dta'\]"),
    ({"data": 6, "fsdp": -1, "slices": 4}, "does not divide"),
    ({"data": 2, "fsdp": 4, "slices": 4}, "data=2 must be a multiple of slices=4"),
])
def test_make_mesh_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(cfg)


# ---------------------------------------------------------------------------
# shardings of state and batch

def test_heads_not_divisible_by_tensor_axis_is_a_clear_error():
    opt, _ = optim.make_optimizer({"learning_rate": 1e-3, "warmup_steps": 0, "total_steps": 10})
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 8})
    with pytest.raises(ValueError, match=r"num_attention_heads=4 .*'tensor': 8"):
        T.abstract_train_state(tiny_config(), opt, mesh)
    T.abstract_train_state(tiny_config(), opt, sharding.make_mesh({"data": 2, "tensor": 4}))  # 4 heads / 4: fine


def test_state_shardings_follow_logical_axes():
    cfg = tiny_config()
    opt, _ = optim.make_optimizer({"warmup_steps": 1, "total_steps": 10})
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    _, abstract, shardings = T.abstract_train_state(cfg, opt, mesh)
    params = shardings.params
    layer = params["bert"]["encoder"]["layers"]["0"]
    assert layer["intermediate"]["kernel"].spec == P("fsdp", "tensor")  # (embed, mlp)
    assert layer["output"]["kernel"].spec == P("tensor", "fsdp")        # (mlp, embed)
    assert layer["attention"]["query"]["bias"].spec == P("tensor")      # (heads,)
    # vocab 126 is not divisible by tensor=4: that dimension is replicated, embed still sharded.
    assert params["bert"]["embeddings"]["word_embeddings"]["embedding"].spec == P(None, "fsdp")
    assert params["mlm"]["bias"].spec == P()
    # Adam's moments mirror the params; counters are replicated.
    adam = abstract.opt_state[1]
    mu = jax.tree.leaves(shardings.opt_state[1].mu)
    assert [s.spec for s in mu] == [s.spec for s in jax.tree.leaves(params)]
    assert adam.count.sharding.spec == P()
    assert shardings.step.spec == P() and shardings.skipped_steps.spec == P()
    # The abstract state carries the shardings, ready for .lower().
    assert abstract.params["mlm"]["transform"]["kernel"].sharding.spec == P("fsdp")


def test_batch_sharding_and_global_batch():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
    batch = make_batch(np.random.default_rng(0), batch_size=8)
    global_batch = sharding.make_global_batch(batch, mesh)
    ids = global_batch["input_ids"]
    assert ids.shape == (8, 16) and ids.sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in ids.addressable_shards} == {(2, 16)}
    np.testing.assert_array_equal(np.asarray(ids), batch["input_ids"])
    assert global_batch["next_sentence_labels"].shape == (8,)


@pytest.mark.parametrize("mesh_cfg", [{"data": 2, "fsdp": 2, "tensor": 2}, {"tensor": 4, "data": 2}, {"tensor": 8}])
def test_one_process_loads_every_row_and_assembles_the_batch(mesh_cfg):
    """One process holds every shard (two-process meshes: test_multiprocess)."""
    mesh = sharding.make_mesh(mesh_cfg)
    np.testing.assert_array_equal(sharding.process_batch_rows(sharding.batch_sharding(mesh), (8,)), np.arange(8))
    batch = make_batch(np.random.default_rng(0), batch_size=8)
    ids = sharding.make_global_batch(batch, mesh)["input_ids"]
    assert ids.shape == (8, 16)
    for shard in ids.addressable_shards:
        np.testing.assert_array_equal(shard.data, batch["input_ids"][shard.index])


def test_global_batch_errors():
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
    batch = make_batch(np.random.default_rng(0), batch_size=12)
    with pytest.raises(ValueError, match=re.escape("global batch size 12 is not divisible by the batch mesh axes")):
        sharding.make_global_batch(batch, mesh)
    batch = make_batch(np.random.default_rng(0), batch_size=8)
    batch["next_sentence_labels"] = batch["next_sentence_labels"][:4]
    with pytest.raises(ValueError, match="same leading batch size"):
        sharding.make_global_batch(batch, mesh)


# ---------------------------------------------------------------------------
# Sharded training equals one device; the compiled step holds the implied collectives.

LAYOUTS = {
    "data_parallel": {"data": 8},
    "fsdp": {"fsdp": 8},
    "data_x_tensor": {"data": 4, "tensor": 2},
    "data_fsdp_tensor": {"data": 2, "fsdp": 2, "tensor": 2},
}
STEPS = 2


def _train(mesh_cfg, devices=None):
    cfg = tiny_config(num_hidden_layers=1, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    opt, schedule = optim.make_optimizer({"learning_rate": 1e-2, "warmup_steps": 0, "total_steps": 10})
    mesh = sharding.make_mesh(mesh_cfg, devices=devices)
    graphdef, abstract, shardings = T.abstract_train_state(cfg, opt, mesh)
    _, state, _ = T.create_train_state(cfg, opt, mesh, seed=0, compiler_options=FAST_COMPILE)
    step = T.make_train_step(graphdef, opt, mesh, None, shardings, schedule=schedule)
    # Ahead-of-time compile of the very function we run; its HLO is what we inspect.
    compiled = step.lower(abstract, sharding.abstract_batch(16, 16, 4, mesh), jax.random.key(0)).compile(FAST_COMPILE)
    initial = jax.tree.map(np.asarray, state.params)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(STEPS):
        state, metrics = compiled(state, sharding.make_global_batch(make_batch(rng), mesh), jax.random.key(42))
        losses.append(float(metrics["loss"]))
    kernel = state.params["bert"]["encoder"]["layers"]["0"]["intermediate"]["kernel"]
    assert not np.allclose(np.asarray(kernel), initial["bert"]["encoder"]["layers"]["0"]["intermediate"]["kernel"])
    return losses, jax.tree.map(np.asarray, state.params), compiled.as_text(), kernel.sharding.spec


@pytest.fixture(scope="module")
def single_device_run():
    return _train({"data": 1}, devices=jax.devices()[:1])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sharded_training_matches_single_device(layout, single_device_run, capfd):
    ref_losses, ref_params, ref_hlo, _ = single_device_run
    capfd.readouterr()
    losses, params, hlo, kernel_spec = _train(LAYOUTS[layout])
    # XLA says so on stderr when a layout forces it to replicate a tensor to reshard it
    # (it did at the word-embedding lookup with FSDP x tensor before model._lookup).
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    # atol: Adam turns ~1e-7 gradient noise near g=0 into ~1e-6 parameter differences.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params, ref_params)

    ops = set(re.findall(r"\b(all-reduce|all-gather|reduce-scatter|dynamic-slice|all-to-all|collective-permute)"
                         r"(?:-start)?\(", hlo))
    assert not re.search(r"\b(all-reduce|all-gather|reduce-scatter)", ref_hlo)  # one device: no collectives
    if layout == "data_parallel":
        assert kernel_spec == P()
        assert "all-reduce" in ops  # gradients summed over data
        assert "all-gather" not in ops  # params replicated: nothing to gather
    elif layout == "fsdp":
        assert kernel_spec == P("fsdp")
        assert "all-gather" in ops  # params gathered for compute
        assert "reduce-scatter" in ops or {"all-reduce", "dynamic-slice"} <= ops  # grads back to shards
    elif layout == "data_fsdp_tensor":
        assert kernel_spec == P("fsdp", "tensor")
        assert "all-gather" in ops and "all-reduce" in ops
    else:
        assert kernel_spec == P(None, "tensor")  # (embed, mlp): mlp split over tensor
        assert "all-reduce" in ops  # data-parallel grads and tensor-parallel partial sums
