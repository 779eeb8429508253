"""Device mesh, logical-axis rules and the shardings of train state and batches.

Parallelism is a config change: the mesh config says how many devices go to each
mesh axis, and one table of rules (``DEFAULT_RULES``) maps the model's logical
axis names to those mesh axes.

* ``make_mesh(mesh_cfg) -> Mesh``: axes ``('data', 'fsdp', 'tensor')``; sizes
  come from ``mesh_cfg`` (a dict or ml_collections ConfigDict with keys
  ``data``, ``fsdp``, ``tensor`` and optional ``slices``); one size may be -1
  (= the rest of the devices). ``slices > 1`` builds a multi-slice TPU mesh with
  ``mesh_utils.create_hybrid_device_mesh`` (the data axis spans slices, over
  DCN). All axes are ``AxisType.Auto`` (jit in/out shardings, no explicit-axis
  typing).
* ``DEFAULT_RULES``: batch -> ('data', 'fsdp'); embed -> 'fsdp' (FSDP shards
  every parameter along its hidden dimension); vocab/heads/mlp -> 'tensor'
  (Megatron-style tensor parallelism); kv/length/position/type_vocab/classes/
  layers -> replicated. Pass another table to ``state_shardings`` etc. to change
  the layout.
* ``param_axes(state)``: nested dict of logical-name tuples read from the
  ``nnx.Param`` metadata of a (possibly abstract) model state.
* ``state_shardings(abstract_state, mesh, rules, param_axes=...)``: a
  ``NamedSharding`` tree for a whole train state: params by their logical names,
  optimizer-state leaves that mirror a parameter (Adam's mu/nu, ...) like that
  parameter, everything else (step, counters) replicated.
* ``param_shardings(abstract_params, axes, mesh, rules)`` / ``spec_for(shape,
  names, mesh, rules)``: the same for params alone or one array.
* ``batch_sharding(mesh, rules)``: the sharding of every batch array (dim 0 over
  the batch mesh axes, the rest replicated); ``batch_axes`` names those axes and
  ``check_batch_size(n, mesh, rules)`` raises when n does not divide over them;
  ``abstract_batch(batch_size, seq_len, max_predictions, mesh, rules, max_instances_per_row=0)``:
  a pretraining batch (packed when max_instances_per_row > 0) as sharded ShapeDtypeStructs, for ``.lower``.
* ``process_batch_rows(batch_sharding, global_shape)``: the global rows of a batch
  this process loads: those of the batch shards its devices hold (processes holding
  the same shard load the same rows).
* ``make_global_batch(host_batch, mesh, rules)``: numpy dict of those rows -> dict
  of global ``jax.Array`` (``jax.make_array_from_callback``).

A mesh axis that does not divide a parameter dimension is dropped for that
dimension (e.g. vocab 30522 over tensor=4): the array is replicated along it
rather than failing; ``state_shardings`` logs each such fallback once.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bert_jax import partitioning
from bert_jax.data import instances

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("position", None),
    ("type_vocab", None),
    ("classes", None),
    ("layers", None),
)

_MESH_KEYS = set(MESH_AXES) | {"slices"}


def _resolve_sizes(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
    unknown = [a for a, s in sizes.items() if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh config: at most one axis may be -1, got {sizes}")
    for axis, size in sizes.items():
        if size != -1 and (not isinstance(size, (int, np.integer)) or size < 1):
            raise ValueError(f"mesh config: axis '{axis}' has size {size!r}; use a positive integer or -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if num_devices % known:
        raise ValueError(
            f"mesh config {sizes}: the product of the fixed axis sizes ({known}) does not divide "
            f"the number of devices ({num_devices})")
    if unknown:
        sizes = {**sizes, unknown[0]: num_devices // known}
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"mesh config {sizes}: axis sizes multiply to {math.prod(sizes.values())} but there are "
            f"{num_devices} devices; set one axis to -1 to take the rest")
    return sizes


def make_mesh(mesh_cfg: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the ('data', 'fsdp', 'tensor') mesh; see the module docstring."""
    cfg = dict(mesh_cfg or {"data": -1})
    if hasattr(mesh_cfg, "to_dict"):
        cfg = mesh_cfg.to_dict()
    extra = set(cfg) - _MESH_KEYS
    if extra:
        raise ValueError(f"mesh config: unknown key(s) {sorted(extra)}; expected {sorted(_MESH_KEYS)}")
    devices = list(jax.devices() if devices is None else devices)
    slices = int(cfg.pop("slices", 1) or 1)
    sizes = _resolve_sizes({a: int(cfg.get(a, 1)) for a in MESH_AXES}, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if slices == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    if sizes["data"] % slices:
        raise ValueError(f"mesh config: data={sizes['data']} must be a multiple of slices={slices} "
                         "(the data axis spans the slices)")
    ici_shape = (sizes["data"] // slices, sizes["fsdp"], sizes["tensor"])
    dcn_shape = (slices, 1, 1)
    device_array = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
    return Mesh(device_array, MESH_AXES, axis_types=axis_types)


def param_axes(state) -> dict:
    """Nested dict (like the params) of logical-name tuples from ``nnx.Param`` metadata."""
    from flax import nnx

    axes = partitioning.param_logical_axes(state)
    if isinstance(axes, nnx.State):
        axes = nnx.to_pure_dict(axes)

    def str_keys(d):  # nnx.List keys are ints; param trees use str keys
        return {str(k): str_keys(v) for k, v in d.items()} if isinstance(d, dict) else d

    return str_keys(axes)


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def spec_for(shape: Sequence[int], logical_names, mesh: Mesh, rules, *, where: str = "") -> PartitionSpec:
    """PartitionSpec for one array; mesh axes that do not divide their dimension are dropped."""
    spec = partitioning.logical_to_mesh_spec(logical_names, rules, mesh)
    fixed = []
    for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        n = math.prod(mesh.shape[a] for a in names)
        if n > 1 and size % n:
            logging.info("sharding: %s dim %d (size %d, %s) is not divisible by mesh axes %s (%d); replicated",
                         where, dim, size, logical_names, names, n)
            axes = None
        fixed.append(axes)
    while fixed and fixed[-1] is None:
        fixed.pop()
    return PartitionSpec(*fixed)


def _names(path) -> tuple[str, ...]:
    """A tree path as its key names: ('bert', 'encoder', 'layers', '0', ...)."""
    return tuple(jax.tree_util.keystr((k,), simple=True) for k in path)


def param_shardings(abstract_params, axes, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedSharding tree for ``abstract_params`` (arrays/ShapeDtypeStructs) given ``axes``."""
    flat_axes = {_names(path): names
                 for path, names in jax.tree_util.tree_flatten_with_path(axes, is_leaf=_is_axes)[0]}

    def one(path, leaf):
        names = flat_axes.get(_names(path))
        if names is None:
            raise ValueError(f"sharding: no logical axes for parameter {jax.tree_util.keystr(path)}")
        if len(names) != len(leaf.shape):
            raise ValueError(f"sharding: parameter {jax.tree_util.keystr(path)} has shape {leaf.shape} "
                             f"but logical axes {names}")
        return NamedSharding(mesh, spec_for(leaf.shape, names, mesh, rules, where=jax.tree_util.keystr(path)))

    return jax.tree_util.tree_map_with_path(one, abstract_params)


def state_shardings(abstract_state, mesh: Mesh, rules=DEFAULT_RULES, *, param_axes):
    """NamedSharding tree for a train state (any pytree with a ``params`` attribute or key).

    ``param_axes``: nested dict of logical names like ``abstract_state.params``
    (from ``sharding.param_axes(model_state)``). Optimizer-state leaves whose path
    ends with a parameter's path and whose shape equals it take that parameter's
    sharding; all other leaves are replicated.
    """
    params = abstract_state["params"] if isinstance(abstract_state, Mapping) else abstract_state.params
    p_shardings = param_shardings(params, param_axes, mesh, rules)
    by_path = {}
    for path, s in jax.tree_util.tree_flatten_with_path(p_shardings)[0]:
        by_path[_names(path)] = s
    depths = sorted({len(p) for p in by_path}, reverse=True)
    param_shapes = {_names(path): leaf.shape
                    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        names = _names(path)
        for depth in depths:
            suffix = names[-depth:]
            if len(names) >= depth and suffix in by_path and param_shapes[suffix] == tuple(leaf.shape):
                return by_path[suffix]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def batch_axes(mesh: Mesh, rules=DEFAULT_RULES) -> tuple[str, ...]:
    """Mesh axes the batch dimension is split over (size-1 axes dropped)."""
    spec = partitioning.logical_to_mesh_spec(("batch",), rules, mesh)
    axes = spec[0] if len(spec) else None
    return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of every batch array: dimension 0 over the batch axes."""
    axes = batch_axes(mesh, rules)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def check_model_fits(model_cfg, mesh: Mesh, rules=DEFAULT_RULES) -> None:
    """Attention splits its activations by head over the ``heads`` mesh axes: their size must divide
    the number of heads (a weight that does not divide is replicated; an activation cannot be)."""
    heads = getattr(model_cfg, "num_attention_heads", None)
    axes = partitioning.logical_to_mesh_spec(("heads",), rules, mesh)
    names = () if not axes or axes[0] is None else ((axes[0],) if isinstance(axes[0], str) else tuple(axes[0]))
    n = math.prod(mesh.shape[a] for a in names)
    if heads is not None and heads % n:
        raise ValueError(f"num_attention_heads={heads} is not divisible by the mesh axes that split heads "
                         f"{dict((a, mesh.shape[a]) for a in names)} (product {n}): use a smaller tensor axis")


def check_batch_size(global_batch_size: int, mesh: Mesh, rules=DEFAULT_RULES) -> None:
    axes = batch_axes(mesh, rules)
    n = math.prod(mesh.shape[a] for a in axes)
    if global_batch_size % n:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the batch mesh axes "
                         f"{dict((a, mesh.shape[a]) for a in axes)} (product {n})")


def abstract_batch(batch_size: int, seq_len: int, max_predictions: int, mesh: Mesh, rules=DEFAULT_RULES, *,
                   max_instances_per_row: int = 0, next_sentence: bool = True) -> dict:
    """ShapeDtypeStructs (sharded like real batches) of a pretraining batch (packed rows of up to
    ``max_instances_per_row`` instances when > 0), for ``.lower``."""
    check_batch_size(batch_size, mesh, rules)
    s = batch_sharding(mesh, rules)
    spec = instances.batch_spec(batch_size, seq_len, max_predictions, max_instances_per_row,
                                next_sentence=next_sentence)
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=s) for name, (shape, dtype) in spec.items()}


def process_batch_rows(batch_sharding: NamedSharding, global_shape: Sequence[int]) -> np.ndarray:
    """The global row indices (sorted, int64) of a batch of ``global_shape`` this process loads.

    They are the union of the row ranges (dimension 0) of the shards this process's devices
    hold, read from ``batch_sharding.devices_indices_map(global_shape)``. So the mesh alone
    decides: processes whose devices hold the same batch shards (a batch replicated over
    processes, a ``tensor`` axis spanning them) load the same rows, and where the batch axes
    split the processes they load disjoint rows. ``global_shape`` may be just
    ``(global_batch_size,)``. ``make_global_batch`` takes this process's rows in this order.
    """
    shape = tuple(global_shape)
    axes = batch_sharding.spec[0] if len(batch_sharding.spec) else None
    check_batch_size(shape[0], batch_sharding.mesh, (("batch", axes),))
    held = np.zeros(shape[0], bool)
    for device, index in batch_sharding.devices_indices_map(shape).items():
        if device.process_index == jax.process_index():
            held[index[0]] = True
    return np.flatnonzero(held)


def make_global_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh, rules=DEFAULT_RULES) -> dict:
    """This process's rows (dict of numpy) -> dict of global jax.Arrays sharded over the batch axes.

    ``host_batch`` holds the rows ``process_batch_rows`` names, in that order. The global
    batch size follows from their number: this process holds a fixed share of the batch
    shards, each ``global_batch_size / shards`` rows.
    """
    if not host_batch:
        raise ValueError("make_global_batch: empty batch")
    rows = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in host_batch.items()}
    if None in rows.values() or len(set(rows.values())) != 1:
        raise ValueError(f"make_global_batch: every array needs the same leading batch size, got {rows}")
    local = next(iter(rows.values()))
    sharding = batch_sharding(mesh, rules)
    shards = math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))
    held = len(process_batch_rows(sharding, (shards,)))  # one row per shard: how many this process holds
    if local * shards % held:
        raise ValueError(f"make_global_batch: {local} rows on this process do not split over the {held} "
                         f"(of {shards}) batch shards it holds")
    global_size = local * shards // held
    check_batch_size(global_size, mesh, rules)
    host_rows = process_batch_rows(sharding, (global_size,))

    def one(value):
        value = np.asarray(value)

        def shard(index):  # a device's global rows -> the same rows of this process's array
            start, stop, _ = index[0].indices(global_size)
            first = int(np.searchsorted(host_rows, start))
            return value[first:first + stop - start]
        return jax.make_array_from_callback((global_size, *value.shape[1:]), sharding, shard)

    return {k: one(v) for k, v in host_batch.items()}
