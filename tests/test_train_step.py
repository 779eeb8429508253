"""Loss, gradient accumulation, non-finite skip, eval and init of the pure train/eval steps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bert_jax import model as M
from bert_jax import losses, optim, sharding, train_step as T
from bert_jax.data import packing
from bert_jax import params as params_lib
from test_sharding import FAST_COMPILE, VOCAB, make_batch, tiny_config

NO_DROPOUT = dict(num_hidden_layers=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def setup():
    """One device mesh, tiny model, AdamW; reused by the tests below."""
    cfg = tiny_config(**NO_DROPOUT)
    opt, schedule = optim.make_optimizer({"learning_rate": 1e-2, "warmup_steps": 2, "total_steps": 10})
    mesh = sharding.make_mesh({"data": 2}, devices=jax.devices()[:2])
    graphdef, state, shardings = T.create_train_state(cfg, opt, mesh, seed=0, compiler_options=FAST_COMPILE)
    return cfg, opt, schedule, mesh, graphdef, state, shardings


def _copy(state):
    return jax.tree.map(lambda x: x.copy(), state)  # steps donate their input state


def test_pretraining_loss_matches_numpy(setup):
    cfg, _, _, _, graphdef, state, _ = setup
    batch = make_batch(np.random.default_rng(1), batch_size=4)
    loss, sums = losses.pretraining_loss(state.params, graphdef, batch, None, deterministic=True)
    out = nnx.merge(graphdef, state.params)(batch["input_ids"], batch["input_mask"], batch["segment_ids"],
                                           batch["masked_lm_positions"])
    logits = np.asarray(out["mlm_logits"], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, batch["masked_lm_ids"][..., None], -1)[..., 0]
    w = batch["masked_lm_weights"]
    mlm = (nll * w).sum() / (w.sum() + 1e-5)
    nsp_logits = np.asarray(out["nsp_logits"], np.float64)
    nsp_logp = nsp_logits - np.log(np.exp(nsp_logits).sum(-1, keepdims=True))
    nsp = -nsp_logp[np.arange(4), batch["next_sentence_labels"]].mean()
    np.testing.assert_allclose(float(loss), mlm + nsp, rtol=1e-5)
    metrics = losses.pretraining_metrics(sums)
    np.testing.assert_allclose(float(metrics["mlm_loss"]), mlm, rtol=1e-5)
    assert float(sums["masked_tokens"]) == w.sum() and float(sums["tokens"]) == batch["input_mask"].sum()
    # Padding predictions (weight 0) do not count, whatever their ids.
    padded = dict(batch, masked_lm_ids=np.where(w > 0, batch["masked_lm_ids"], 0).astype(np.int32))
    np.testing.assert_allclose(float(losses.pretraining_loss(state.params, graphdef, padded, None, deterministic=True)[0]),
                               float(loss), rtol=1e-6)


def test_gradient_accumulation_equals_one_big_batch(setup):
    _, opt, schedule, mesh, graphdef, state, shardings = setup
    rng = np.random.default_rng(2)
    batches = [make_batch(rng, batch_size=16) for _ in range(2)]
    results = {}
    for k in (1, 4):
        step = T.make_train_step(graphdef, opt, mesh, None, shardings, micro_batches=k, schedule=schedule,
                                 compiler_options=FAST_COMPILE)
        s, losses = _copy(state), []
        for b in batches:
            s, metrics = step(s, b, jax.random.key(0))
            losses.append(float(metrics["loss"]))
        results[k] = (losses, jax.tree.map(np.asarray, s.params), {k_: float(v) for k_, v in metrics.items()})
    np.testing.assert_allclose(results[4][0], results[1][0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), results[4][1], results[1][1])
    for name in ("grad_norm", "mlm_accuracy", "nsp_accuracy", "tokens", "sequences", "learning_rate"):
        assert results[4][2][name] == pytest.approx(results[1][2][name], rel=1e-4), name
    assert results[1][2]["sequences"] == 16 and results[1][2]["learning_rate"] == pytest.approx(5e-3)
    with pytest.raises(ValueError, match="not divisible by micro_batches=3"):
        T.make_train_step(graphdef, opt, mesh, None, shardings, micro_batches=3)(_copy(state), batches[0],
                                                                                jax.random.key(0))


@pytest.mark.parametrize("guard", ["cond", "where"])  # "where": the old form bench_finetune compares
def test_nonfinite_gradients_skip_the_update(setup, guard):
    _, opt, schedule, mesh, graphdef, state, shardings = setup
    step = T.make_train_step(graphdef, opt, mesh, None, shardings, schedule=schedule, compiler_options=FAST_COMPILE,
                             guard=guard)
    batch = make_batch(np.random.default_rng(3), batch_size=8)
    bad = dict(batch, masked_lm_weights=np.full_like(batch["masked_lm_weights"], np.nan))
    before = jax.tree.map(np.asarray, state.params)
    s, metrics = step(_copy(state), bad, jax.random.key(0))
    assert int(metrics["update_skipped"]) == 1 and int(s.skipped_steps) == 1 and int(s.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, s.params), before)
    assert np.isfinite(np.asarray(s.opt_state[1].mu["mlm"]["bias"])).all()
    s, metrics = step(s, batch, jax.random.key(0))
    assert int(metrics["update_skipped"]) == 0 and int(s.skipped_steps) == 1 and int(s.step) == 2
    # The skipped step did not advance the schedule: this first real update uses lr(0) = 0 (warmup).
    assert float(metrics["learning_rate"]) == 0.0
    s, metrics = step(s, batch, jax.random.key(0))
    assert float(metrics["learning_rate"]) == pytest.approx(5e-3)
    assert not np.allclose(np.asarray(s.params["mlm"]["transform"]["kernel"]), before["mlm"]["transform"]["kernel"])


def test_dropout_key_depends_on_seed_and_step():
    cfg = tiny_config(num_hidden_layers=1, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.0)
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    graphdef, params = nnx.split(M.BertForPreTraining(cfg, rngs=nnx.Rngs(0)))
    params = params_lib.to_dict(params)
    batch = make_batch(np.random.default_rng(4), batch_size=4)

    @jax.jit
    def loss_at(base_key, step):
        return losses.pretraining_loss(params, graphdef, batch, jax.random.fold_in(base_key, step))[0]

    a, b = float(loss_at(jax.random.key(0), 0)), float(loss_at(jax.random.key(0), 0))
    assert a == b  # same seed and step: same dropout
    assert a != float(loss_at(jax.random.key(0), 1)) and a != float(loss_at(jax.random.key(1), 0))
    del mesh


def test_eval_step_sums_combine_across_batches(setup):
    _, _, _, mesh, graphdef, state, shardings = setup
    evaluate = T.make_eval_step(graphdef, mesh, None, shardings, compiler_options=FAST_COMPILE)
    batch = make_batch(np.random.default_rng(5), batch_size=8)
    whole = T.eval_metrics([evaluate(state.params, batch)])
    halves = T.eval_metrics([evaluate(state.params, {k: v[:4] for k, v in batch.items()}),
                             evaluate(state.params, {k: v[4:] for k, v in batch.items()})])
    for name in ("loss", "mlm_loss", "mlm_accuracy", "nsp_accuracy", "sequences"):
        assert halves[name] == pytest.approx(whole[name], rel=1e-5), name
    expected = float(losses.pretraining_loss(state.params, graphdef, batch, None, deterministic=True)[0])
    assert whole["loss"] == pytest.approx(expected, rel=1e-5)


def test_create_train_state_from_params_and_errors(setup):
    cfg, opt, _, mesh, _, _, _ = setup
    params = params_lib.init_params(cfg, seed=7)
    _, state, _ = T.create_train_state(cfg, opt, mesh, params=params, compiler_options=FAST_COMPILE)
    np.testing.assert_array_equal(np.asarray(state.params["mlm"]["transform"]["kernel"]),
                                  params["mlm"]["transform"]["kernel"])
    assert int(state.step) == 0
    params["mlm"]["transform"]["kernel"] = params["mlm"]["transform"]["kernel"][:, :5]
    with pytest.raises(ValueError, match=r"\['mlm'\]\['transform'\]\['kernel'\]"):
        T.create_train_state(cfg, opt, mesh, params=params)


def test_missing_batch_key_is_named(setup):
    _, _, _, _, graphdef, state, _ = setup
    batch = make_batch(np.random.default_rng(6), batch_size=2)
    del batch["masked_lm_weights"]
    with pytest.raises(KeyError, match="masked_lm_weights"):
        losses.pretraining_loss(state.params, graphdef, batch, None, deterministic=True)


def test_bfloat16_compute_keeps_float32_params_and_loss():
    cfg = tiny_config(dtype="bfloat16", **NO_DROPOUT)
    opt, _ = optim.make_optimizer({"warmup_steps": 0, "total_steps": 10})
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    graphdef, state, shardings = T.create_train_state(cfg, opt, mesh, compiler_options=FAST_COMPILE)
    step = T.make_train_step(graphdef, opt, mesh, None, shardings, compiler_options=FAST_COMPILE)
    state, metrics = step(state, make_batch(np.random.default_rng(7), batch_size=4), jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
    assert float(metrics["loss"]) == pytest.approx(np.log(VOCAB) + np.log(2), rel=0.1)


def test_packed_batch_gives_the_unpacked_losses_and_gradients(setup):
    """The same instances, unpacked (one per row) and packed two per row: the same MLM and NSP
    losses and gradients (the losses pass the packing arrays to the model)."""
    _, _, _, _, graphdef, state, _ = setup
    unpacked = make_batch(np.random.default_rng(5), batch_size=6, seq_len=16, predictions=4)
    slots = np.array([[0, 3], [1, 4], [5, -1], [2, -1]])  # rows of 32 slots
    packed = packing.pack_rows(unpacked, slots, row_length=32, row_predictions=8)
    grad_fn = jax.jit(jax.value_and_grad(lambda p, b: losses.pretraining_loss(p, graphdef, b, None, deterministic=True),
                                         has_aux=True), compiler_options=FAST_COMPILE)
    (loss, sums), grads = grad_fn(state.params, unpacked)
    (packed_loss, packed_sums), packed_grads = grad_fn(state.params, packed)
    np.testing.assert_allclose(float(packed_loss), float(loss), rtol=1e-5)
    metrics, packed_metrics = losses.pretraining_metrics(sums), losses.pretraining_metrics(packed_sums)
    for name in ("mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy", "sequences", "tokens", "masked_tokens"):
        np.testing.assert_allclose(float(packed_metrics[name]), float(metrics[name]), rtol=1e-5, err_msg=name)
    for a, b in zip(jax.tree.leaves(packed_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    tokens = unpacked["input_mask"].sum()
    assert float(packed_metrics["packing_efficiency"]) == pytest.approx(tokens / (4 * 32))
    assert float(metrics["packing_efficiency"]) == pytest.approx(tokens / (6 * 16))
    # objective mlm: rows packed without NSP labels have no NSP arrays and count their instances
    mlm_packed = packing.pack_rows({k: v for k, v in unpacked.items() if k != "next_sentence_labels"}, slots,
                                   row_length=32, row_predictions=8)
    assert not {"cls_positions", "next_sentence_labels", "next_sentence_weights"} & set(mlm_packed)
    mlm_loss, mlm_sums = jax.jit(lambda p, b: losses.mlm_loss(p, graphdef, b, None, deterministic=True),
                                 compiler_options=FAST_COMPILE)(state.params, mlm_packed)
    np.testing.assert_allclose(float(mlm_loss), float(metrics["mlm_loss"]), rtol=1e-5)
    assert float(mlm_sums["sequences"]) == 6
