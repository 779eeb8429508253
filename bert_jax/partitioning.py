"""Logical axis names -> mesh axes.

The model names the axes of every parameter and of its main activations with
*logical* names (``batch``, ``length``, ``embed``, ``heads``, ``kv``, ``mlp``,
``vocab``, ...). A table of rules, like t5x/MaxText's, maps each logical name to
a mesh axis (or a tuple of them, or None = replicated). Changing the parallelism
is then a change of rules, never of the model.

* ``logical_to_mesh_spec(names, rules)`` turns one tuple of logical names into a
  ``PartitionSpec``. Rules are tried in order; a rule is skipped when its mesh
  axes are already used by an earlier dimension of the same array (so a rules
  table may list fallbacks).
* ``axis_rules(mesh, rules)`` is a context manager that activates the rules for
  ``constrain``; outside it ``constrain`` is the identity, so the model runs
  unchanged on one device and in tests.
* ``param_logical_axes(state)`` reads the logical names that the model attached
  to each ``nnx.Param`` (metadata ``out_sharding``; ``eager_sharding=False`` so
  Flax never tries to place them itself).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from flax import nnx

Rules = Sequence[tuple[str, Any]]

_local = threading.local()


def _stack() -> list:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def _as_tuple(mesh_axes) -> tuple:
    if mesh_axes is None:
        return ()
    if isinstance(mesh_axes, str):
        return (mesh_axes,)
    return tuple(mesh_axes)


def logical_to_mesh_spec(logical_names: Iterable[str | None] | None, rules: Rules,
                         mesh: Mesh | None = None) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec using ``rules``.

    A mesh axis is used at most once per array. With ``mesh`` given, mesh axes of
    size 1 are dropped (they shard nothing and only clutter the spec).
    """
    if logical_names is None:
        return PartitionSpec()
    used: set[str] = set()
    spec = []
    for name in logical_names:
        chosen = None
        if name is not None:
            for rule_name, mesh_axes in rules:
                if rule_name != name:
                    continue
                axes = _as_tuple(mesh_axes)
                if mesh is not None:
                    axes = tuple(a for a in axes if mesh.shape[a] > 1)
                if any(a in used for a in axes):
                    continue
                chosen = axes
                break
        if not chosen:
            spec.append(None)
        else:
            used.update(chosen)
            spec.append(chosen[0] if len(chosen) == 1 else chosen)
    return PartitionSpec(*spec)


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: Rules):
    """Activates ``rules`` on ``mesh`` for ``constrain`` (at trace time)."""
    _stack().append((mesh, tuple(rules)))
    try:
        yield
    finally:
        _stack().pop()


def current_rules() -> tuple[Mesh, Rules] | None:
    stack = _stack()
    return stack[-1] if stack else None


def constrain(x: jax.Array, logical_names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; identity outside ``axis_rules``."""
    active = current_rules()
    if active is None:
        return x
    mesh, rules = active
    if len(logical_names) != x.ndim:
        raise ValueError(f"constrain: {len(logical_names)} names {tuple(logical_names)} for an array of rank {x.ndim}")
    spec = logical_to_mesh_spec(logical_names, rules, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def param_logical_axes(state) -> Any:
    """Tree (like ``state``) of logical-name tuples for each parameter (None: replicated)."""

    def names(v):
        if isinstance(v, nnx.Variable):
            axes = v.get_metadata().get("out_sharding")
            return tuple(axes) if axes else (None,) * v.get_value().ndim
        return (None,) * getattr(v, "ndim", 0)

    return jax.tree.map(names, state, is_leaf=lambda v: isinstance(v, nnx.Variable))
