"""The pure, jitted train and eval steps (the losses they take are ``bert_jax.losses``).

The model is split once (``graphdef`` + a nested dict of float32 params); the
steps are plain functions of (state, batch, key) under ``jax.jit`` with explicit
in/out shardings and the state donated, so one compiled program serves every
step and the same function can be lowered ahead of time for another topology.

Public API
* ``TrainState(step, params, opt_state, skipped_steps)``: a pytree. ``params``
  is a nested dict (str keys, the model's layout); ``skipped_steps`` counts
  updates skipped for non-finite gradients.
* ``loss_fns``: a ``bert_jax.losses.LossFns`` (default ``losses.PRETRAINING``);
  fine-tuning tasks pass theirs (``losses.CLASSIFICATION``, ...).
* ``abstract_train_state(model_cfg, opt, mesh, rules)`` -> (graphdef, abstract
  state with shardings, state shardings): no memory touched (AOT planning).
* ``create_train_state(model_cfg, opt, mesh, rules, seed, *, params=None)`` ->
  (graphdef, state, state_shardings): the init is jitted with out_shardings, so
  every parameter and optimizer moment is created directly on its shard. Pass
  ``params`` (nested dict, e.g. pretrained weights) to start from them.
* ``make_train_step(graphdef, opt, mesh, rules, state_shardings, *,
  micro_batches=1, schedule=None, skip_nonfinite=True, guard="cond")`` -> ``jax.jit`` object
  (unlowered: call it, or ``.lower(state, batch, key).compile()`` for AOT).
  ``step(state, batch, base_key) -> (state, metrics)``; dropout key =
  fold_in(base_key, step). With ``micro_batches=k`` the batch is split into k
  micro-batches whose gradients are summed in a ``lax.scan``: the result equals
  one step on the whole batch (the normalisers are computed on the whole batch).
  A non-finite gradient norm or loss leaves params and optimizer state untouched,
  still advances ``step`` and increments ``skipped_steps`` (metric
  ``update_skipped``); the training loop decides when to stop.
* ``make_eval_step(graphdef, mesh, rules, state_shardings)`` -> jitted
  ``eval(params, batch) -> sums``; combine batches with ``eval_metrics(list)``.
* ``build_pretraining_step(config, model_config, mesh) -> PretrainingStep``: the
  one place a pretraining config becomes optimizer, state shardings and jitted
  train/eval steps. ``bert_jax.pretrain`` runs it and ``bert_jax.aot`` compiles
  it for TPU topologies, so the planner measures exactly the program pretraining
  runs (same micro-batches, schedule, remat, scan, dtype and rules).
  ``pretraining_model_config(config, vocab_size)`` is the model both use.

Metrics of a train step (replicated scalars): loss, mlm_loss, nsp_loss,
mlm_accuracy, nsp_accuracy (objective mlm_nsp only), grad_norm (before clipping), learning_rate (when
``schedule`` is given), sequences (instances: of a packed batch, its filled slots), tokens
(non-padding), masked_tokens, packing_efficiency (tokens / row slots), update_skipped,
skipped_steps. A packed batch (``bert_jax.data.packing``) takes the same steps: the losses pass
its packing arrays to the model.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bert_jax import config_utils, optim, partitioning, sharding
from bert_jax.losses import OBJECTIVES, PRETRAINING, LossFns
from bert_jax import params as params_lib
from bert_jax.model import BertConfig, BertForPreTraining


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    skipped_steps: jax.Array


# ----------------------------------------------------------------------------
# State

def _default_model_fn(model_cfg, objective: str = "mlm_nsp"):
    """BertForPreTraining for a pretraining objective (no next-sentence head for "mlm")."""
    return lambda rngs: BertForPreTraining(model_cfg, next_sentence=objective == "mlm_nsp", rngs=rngs)


def _init_fn(model_fn, opt):
    def init(key, params=None):
        if params is None:
            params = params_lib.to_dict(nnx.state(model_fn(nnx.Rngs(key)), nnx.Param))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params),
                          skipped_steps=jnp.zeros((), jnp.int32))
    return init


def abstract_train_state(model_cfg, opt: optax.GradientTransformation, mesh: Mesh, rules=None, *,
                         model_fn: Callable[[nnx.Rngs], nnx.Module] | None = None):
    """(graphdef, ShapeDtypeStruct state carrying shardings, state shardings); allocates nothing."""
    rules = sharding.DEFAULT_RULES if rules is None else rules
    sharding.check_model_fits(model_cfg, mesh, rules)
    model_fn = model_fn or _default_model_fn(model_cfg)
    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: model_fn(nnx.Rngs(0))))
    axes = sharding.param_axes(abstract_params)
    abstract = jax.eval_shape(_init_fn(model_fn, opt), jax.random.key(0))
    shardings = sharding.state_shardings(abstract, mesh, rules, param_axes=axes)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return graphdef, abstract, shardings


def create_train_state(model_cfg, opt: optax.GradientTransformation, mesh: Mesh, rules=None, seed: int = 0, *,
                       params=None, model_fn: Callable[[nnx.Rngs], nnx.Module] | None = None,
                       compiler_options: dict | None = None):
    """(graphdef, TrainState, state shardings), every array created on its shard.

    ``params``: optional nested dict of arrays in the model's layout to start
    from (shapes are checked against the model); ``model_fn(rngs) -> module``
    builds another model (default ``BertForPreTraining(model_cfg)``).
    """
    model_fn = model_fn or _default_model_fn(model_cfg)
    graphdef, abstract, shardings = abstract_train_state(model_cfg, opt, mesh, rules, model_fn=model_fn)
    init = _init_fn(model_fn, opt)
    key = jax.random.key(seed)
    if params is None:
        return graphdef, jax.jit(init, out_shardings=shardings, compiler_options=compiler_options)(key), shardings
    expected = jax.tree.map(lambda a: a.shape, abstract.params)
    given = jax.tree.map(lambda a: tuple(jnp.shape(a)), params)
    if jax.tree.structure(expected) != jax.tree.structure(given) or expected != given:
        exp_flat = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(expected)[0]}
        got_flat = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(given)[0]}
        diff = sorted(k for k in set(exp_flat) | set(got_flat) if exp_flat.get(k) != got_flat.get(k))
        raise ValueError(f"create_train_state: params do not match the model at {diff[:8]} "
                         f"(model {[exp_flat.get(k) for k in diff[:8]]}, given {[got_flat.get(k) for k in diff[:8]]})")
    params = jax.tree.map(lambda p, a: jnp.asarray(p, a.dtype), params, abstract.params)
    state = jax.jit(init, in_shardings=(None, shardings.params), out_shardings=shardings,
                    compiler_options=compiler_options)(key, params)
    return graphdef, state, shardings


# ----------------------------------------------------------------------------
# Steps

def _split_micro_batches(batch, k: int, mesh: Mesh, rules):
    """[B, ...] -> [k, B/k, ...] taking every k-th row, so each device keeps its rows (no resharding)."""
    sizes = {x.shape[0] for x in batch.values()}
    (size,) = sizes
    shards = math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh, rules))
    if size % (k * shards):
        raise ValueError(f"batch size {size} is not divisible by micro_batches={k} x batch shards {shards}")
    axes = sharding.batch_axes(mesh, rules) or None
    spec = NamedSharding(mesh, PartitionSpec(None, axes))

    def split(x):
        x = x.reshape(size // k, k, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, spec)

    return jax.tree.map(split, batch)


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def make_train_step(graphdef, opt: optax.GradientTransformation, mesh: Mesh, rules, state_shardings, *,
                    micro_batches: int = 1, schedule: Callable | None = None, accumulate_steps: int = 1,
                    loss_fns: LossFns = PRETRAINING, skip_nonfinite: bool = True, donate: bool = True,
                    compiler_options: dict | None = None, guard: str = "cond"):
    """The jitted train step (unlowered ``jax.jit`` object); see the module docstring.

    ``accumulate_steps``: the optimizer's ``accumulate_steps`` (optax.MultiSteps),
    only used to report the learning rate of the right update.
    ``compiler_options``: XLA options for this program, e.g.
    ``{"xla_backend_optimization_level": 0}`` compiles ~3x faster on CPU (tests).
    ``guard``: how ``skip_nonfinite`` keeps the old state: ``"cond"`` (a ``lax.cond``: the update
    runs only when finite) or ``"where"`` (the update always runs, then a ``jnp.where`` per leaf
    selects, which makes XLA copy every old leaf: 5-11% of a fine-tuning step in one A/B, within
    noise in a later one; README). Both give the same results; "where" is kept so that
    ``benchmarks/bench_finetune.py --variant where:guard=where`` measures the difference.
    """
    rules = sharding.DEFAULT_RULES if rules is None else rules
    if micro_batches < 1:
        raise ValueError(f"micro_batches={micro_batches} must be >= 1")
    if guard not in ("cond", "where"):
        raise ValueError(f"guard={guard!r}: expected 'cond' or 'where'")
    grad_fn = jax.value_and_grad(loss_fns.loss, has_aux=True)

    def step_fn(state: TrainState, batch, base_key):
        with partitioning.axis_rules(mesh, rules):
            key = jax.random.fold_in(base_key, state.step)
            normalizers = loss_fns.normalizers(batch)
            if micro_batches == 1:
                (loss, sums), grads = grad_fn(state.params, graphdef, batch, key, normalizers)
            else:
                micro = _split_micro_batches(batch, micro_batches, mesh, rules)
                zeros = jax.tree.map(jnp.zeros_like, state.params)
                zeros = jax.lax.with_sharding_constraint(zeros, state_shardings.params)

                def body(carry, xs):
                    mb, i = xs
                    (l, s), g = grad_fn(state.params, graphdef, mb, jax.random.fold_in(key, i), normalizers)
                    return _tree_add(carry, (l, s, g)), None

                first_sums = jax.eval_shape(lambda: grad_fn(state.params, graphdef,
                                                            jax.tree.map(lambda x: x[0], micro), key,
                                                            normalizers)[0][1])
                init = (jnp.zeros((), jnp.float32), jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), first_sums),
                        zeros)
                (loss, sums, grads), _ = jax.lax.scan(body, init, (micro, jnp.arange(micro_batches)))

            grad_norm = optax.tree.norm(grads)
            finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)

            def apply(operands):
                grads, opt_state, params = operands
                updates, opt_state = opt.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state

            operands = (grads, state.opt_state, state.params)
            if skip_nonfinite and guard == "cond":  # the update runs only when finite
                params, opt_state = jax.lax.cond(finite, apply, lambda ops: (ops[2], ops[1]), operands)
            elif skip_nonfinite:  # "where": computed always, then selected leaf by leaf
                params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), apply(operands),
                                                 (state.params, state.opt_state))
            else:
                params, opt_state = apply(operands)
            skipped = jnp.logical_not(finite).astype(jnp.int32) if skip_nonfinite else jnp.zeros((), jnp.int32)
            new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                                   skipped_steps=state.skipped_steps + skipped)
            metrics = dict(loss_fns.metrics(sums))
            metrics.update(loss=loss, grad_norm=grad_norm, update_skipped=skipped,
                           skipped_steps=new_state.skipped_steps)
            if schedule is not None:
                applied = (state.step - state.skipped_steps) // accumulate_steps
                metrics["learning_rate"] = jnp.asarray(schedule(applied), jnp.float32)
            return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step_fn,
                   in_shardings=(state_shardings, sharding.batch_sharding(mesh, rules), replicated),
                   out_shardings=(state_shardings, replicated),
                   donate_argnums=(0,) if donate else (), compiler_options=compiler_options)


def make_eval_step(graphdef, mesh: Mesh, rules, state_shardings, *, loss_fns: LossFns = PRETRAINING,
                   compiler_options: dict | None = None):
    """jitted ``eval(params, batch) -> sums`` (deterministic); see ``eval_metrics``."""
    rules = sharding.DEFAULT_RULES if rules is None else rules

    def eval_fn(params, batch):
        with partitioning.axis_rules(mesh, rules):
            _, sums = loss_fns.loss(params, graphdef, batch, None, loss_fns.normalizers(batch), deterministic=True)
            return sums

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(eval_fn, in_shardings=(state_shardings.params, sharding.batch_sharding(mesh, rules)),
                   out_shardings=replicated, compiler_options=compiler_options)


def eval_metrics(sums_list, loss_fns: LossFns = PRETRAINING) -> dict:
    """Sums from several eval batches -> metrics as Python floats."""
    if not sums_list:
        raise ValueError("eval_metrics: no batches")
    total = jax.tree.map(lambda *xs: sum(float(x) for x in xs), *sums_list)
    return {k: float(v) for k, v in loss_fns.metrics(total).items()}


# ----------------------------------------------------------------------------
# The pretraining program, from a config: shared by pretrain (runs it) and aot (plans it)

def pretraining_model_config(config, vocab_size: int) -> BertConfig:
    """The model of a pretraining config; ``vocab_size`` fills ``model.vocab_size`` when unset."""
    return BertConfig.preset(config.model.preset, **config_utils.model_overrides(config, vocab_size))


@dataclasses.dataclass(frozen=True)
class PretrainingStep:
    """Everything a pretraining config decides about the compiled step."""
    model_config: BertConfig
    mesh: Mesh
    rules: Any
    optimizer: optax.GradientTransformation
    schedule: Callable
    graphdef: Any
    abstract_state: TrainState       # ShapeDtypeStructs carrying their shardings
    state_shardings: Any
    train_step: Any                  # jitted (state, batch, base_key) -> (state, metrics)
    eval_step: Any                   # jitted (params, batch) -> sums
    objective: str                   # train.objective: mlm_nsp | mlm
    global_batch_size: int
    seq_len: int
    max_predictions: int
    seed: int
    max_instances_per_row: int = 0   # > 0: packed batches (data.packing)

    def base_key(self) -> jax.Array:
        """The dropout key the step folds the step number into, replicated over the
        mesh as the step takes it (then the program is the one ``abstract_arguments``
        lowers, text for text; a jit output is a global array on every host count)."""
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return jax.jit(lambda: jax.random.key(self.seed), out_shardings=replicated)()

    def abstract_arguments(self) -> tuple:
        """(state, batch, key) as sharded ShapeDtypeStructs: ``train_step.lower(*these)``."""
        key = jax.eval_shape(self.base_key)
        key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(self.mesh, PartitionSpec()))
        batch = sharding.abstract_batch(self.global_batch_size, self.seq_len, self.max_predictions, self.mesh,
                                        self.rules, max_instances_per_row=self.max_instances_per_row,
                                        next_sentence=self.objective == "mlm_nsp")
        return self.abstract_state, batch, key

    def create_state(self, params=None) -> TrainState:
        """A fresh state (from ``params`` when given), every array made on its shard."""
        _, state, _ = create_train_state(self.model_config, self.optimizer, self.mesh, self.rules,
                                         seed=self.seed, params=params,
                                         model_fn=_default_model_fn(self.model_config, self.objective))
        return state


def build_pretraining_step(config, model_config: BertConfig, mesh: Mesh, rules=None) -> PretrainingStep:
    """Optimizer, abstract state, shardings and jitted steps of a pretraining config
    (``config_utils.pretrain_config`` schema) on ``mesh``. Allocates nothing."""
    rules = sharding.DEFAULT_RULES if rules is None else rules
    sharding.check_batch_size(config.train.global_batch_size, mesh, rules)
    opt, schedule = optim.make_optimizer(config_utils.optimizer_config(config))
    objective = config.train.objective
    graphdef, abstract, shardings = abstract_train_state(model_config, opt, mesh, rules,
                                                         model_fn=_default_model_fn(model_config, objective))
    loss_fns = OBJECTIVES[objective]
    step = make_train_step(graphdef, opt, mesh, rules, shardings, micro_batches=config.train.micro_batches,
                           schedule=schedule, loss_fns=loss_fns)
    return PretrainingStep(
        model_config=model_config, mesh=mesh, rules=rules, optimizer=opt, schedule=schedule, graphdef=graphdef,
        abstract_state=abstract, state_shardings=shardings, train_step=step,
        eval_step=make_eval_step(graphdef, mesh, rules, shardings, loss_fns=loss_fns), objective=objective,
        global_batch_size=config.train.global_batch_size, seq_len=config.data.max_seq_length,
        max_predictions=config_utils.max_predictions_per_seq(config), seed=config.train.seed,
        max_instances_per_row=config_utils.instances_per_row(config))
