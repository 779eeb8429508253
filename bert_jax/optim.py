"""Optimizers and learning-rate schedules for BERT (optax).

``make_optimizer(opt_cfg) -> (optax.GradientTransformation, schedule_fn)``

``opt_cfg`` is a dict or ml_collections ConfigDict; an unknown key is an error.
Keys (defaults in ``DEFAULTS``):

* ``name``: ``'adamw'`` (BERT: b1 0.9, b2 0.999, eps 1e-6, weight decay 0.01) or
  ``'lamb'`` (You et al. 2019, for batch sizes in the thousands; the trust ratio
  skips the same parameters as weight decay, as in the reference implementation).
* ``learning_rate`` (peak), ``warmup_steps`` (linear from 0), ``total_steps``,
  ``decay`` (``'linear'``, ``'polynomial'`` with ``power``, or ``'constant'``)
  down to ``end_learning_rate`` at ``total_steps``.
* ``weight_decay``: decoupled, masked off every bias and every LayerNorm
  parameter (see ``decay_mask``).
* ``clip_norm``: clip the gradient by global norm first (0 or None: off).
* ``accumulate_steps``: average the gradients of that many calls before one
  update (``optax.MultiSteps``), for accumulation across train-step calls. Inside
  one jitted step prefer ``train_step.make_train_step(micro_batches=k)``.

``schedule_fn(update_count)`` is the learning rate at a given number of applied
optimizer updates (the train step reports it as ``learning_rate``).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import optax

DEFAULTS: dict[str, Any] = dict(
    name="adamw",
    learning_rate=1e-4,
    warmup_steps=10_000,
    total_steps=1_000_000,
    decay="linear",
    power=1.0,
    end_learning_rate=0.0,
    b1=0.9,
    b2=0.999,
    eps=1e-6,
    weight_decay=0.01,
    clip_norm=1.0,
    accumulate_steps=1,
)

# Parameters never decayed: biases and LayerNorm scales/biases (BERT's
# exclude_from_weight_decay=["LayerNorm", "layer_norm", "bias"]).
_NO_DECAY_LEAF = {"bias", "scale"}
_NO_DECAY_PATH = re.compile(r"layer_?norm|(^|_)ln(_|$)|norm$", re.IGNORECASE)


def is_decayed(path: tuple[str, ...]) -> bool:
    """True for weights that get weight decay (kernels, embeddings); False for biases and LayerNorm."""
    if path and path[-1] in _NO_DECAY_LEAF:
        return False
    return not any(_NO_DECAY_PATH.search(p) for p in path)


def decay_mask(params) -> Any:
    """Boolean tree like ``params``: True where weight decay (and LAMB's trust ratio) applies."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: is_decayed(tuple(jax.tree_util.keystr((k,), simple=True) for k in path)), params)


def _config(opt_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    cfg = opt_cfg.to_dict() if hasattr(opt_cfg, "to_dict") else dict(opt_cfg or {})
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"optimizer config: unknown key(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **cfg}
    if cfg["name"] not in ("adamw", "lamb"):
        raise ValueError(f"optimizer config: name={cfg['name']!r}; expected 'adamw' or 'lamb'")
    if cfg["decay"] not in ("linear", "polynomial", "constant"):
        raise ValueError(f"optimizer config: decay={cfg['decay']!r}; expected 'linear', 'polynomial' or 'constant'")
    if not 0 <= cfg["warmup_steps"] <= cfg["total_steps"]:
        raise ValueError(f"optimizer config: need 0 <= warmup_steps ({cfg['warmup_steps']}) "
                         f"<= total_steps ({cfg['total_steps']})")
    if int(cfg["accumulate_steps"]) < 1:
        raise ValueError(f"optimizer config: accumulate_steps={cfg['accumulate_steps']} must be >= 1")
    return cfg


def make_schedule(cfg: Mapping[str, Any]) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate``, then decay to ``end_learning_rate`` at ``total_steps``."""
    peak, warmup, total = cfg["learning_rate"], int(cfg["warmup_steps"]), int(cfg["total_steps"])
    decay_steps = max(total - warmup, 1)
    if cfg["decay"] == "constant":
        decay = optax.constant_schedule(peak)
    else:
        power = 1.0 if cfg["decay"] == "linear" else cfg["power"]
        decay = optax.polynomial_schedule(peak, cfg["end_learning_rate"], power, decay_steps)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(opt_cfg: Mapping[str, Any] | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    cfg = _config(opt_cfg)
    schedule = make_schedule(cfg)
    parts = []
    if cfg["clip_norm"]:
        parts.append(optax.clip_by_global_norm(cfg["clip_norm"]))
    parts.append(optax.scale_by_adam(b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"]))
    if cfg["weight_decay"]:
        parts.append(optax.add_decayed_weights(cfg["weight_decay"], mask=decay_mask))
    if cfg["name"] == "lamb":
        parts.append(optax.masked(optax.scale_by_trust_ratio(), decay_mask))
    parts.append(optax.scale_by_learning_rate(schedule))
    opt = optax.chain(*parts)
    if int(cfg["accumulate_steps"]) > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=int(cfg["accumulate_steps"]))
    return opt, schedule
