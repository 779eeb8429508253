"""The pod planner: compile the pretraining step for a TPU topology on a CPU host.

With libtpu installed (``pip install -r requirements-tpu.txt``) JAX compiles for a TPU
topology without a TPU: ``jax.experimental.topologies.get_topology_desc`` gives compile-only
devices. `plan` builds the step with the function ``bert_jax.pretrain`` itself calls
(``train_step.build_pretraining_step``: the config's optimizer and schedule, micro-batches,
remat, scan, dtype and sharding rules), lowers it with abstract arguments, compiles it for
the topology and reports (`Plan`) the per-chip memory of the compiled program
(``compiled.memory_analysis()``) against the chip's HBM, the model FLOPs of one step (BERT's
analytic count and the compiler's ``cost_analysis``), and the step time and sequences/s they
imply at a stated MFU. A program that does not fit fails in the TPU compiler with
RESOURCE_EXHAUSTED: reported as "does not fit". `search_batch` finds the largest global batch
that fits (doubling, then bisection, one compile per probe).

    parse_topology("v5e:16x16" | "v5litepod-256" | "v5p-128", num_slices=1) -> Topology
    plan(config, topology, num_slices=1, global_batch_size=None, packed=False) -> Plan
    search_batch(config, topology, ...) -> (largest fitting Plan or None, every probe)
    lower_pretraining_step(config, mesh) -> (PretrainingStep, jax.stages.Lowered)

``packed=True`` (or ``data.packing`` in the config) lowers the step on packed rows, the batch the
loader gives with ``data.packing`` (``instances.batch_spec``: position ids, packed segment ids
and, for mlm_nsp, per-instance [CLS] positions and NSP labels and weights). The attention path is the one the model takes on the TPU
(``bert_jax.attention``): Pallas splash attention with segment ids when attention dropout is
off (``--config.model.attention_probs_dropout_prob=0``); the report names it and counts the
Pallas kernels in the lowered step.

The command line is ``python -m bert_jax.aot``; chips come from ``bert_jax.hardware.CHIPS``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time

import jax
from ml_collections import config_dict

from bert_jax import attention, config_utils, hardware, sharding
from bert_jax import train_step as train_step_lib
from bert_jax.hardware import GiB

# The table's TPUs (the chips a topology can name).
TPU_CHIPS = {name: chip for name, chip in hardware.CHIPS.items() if chip.dims}

_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v6litepod": "v6e"}
# Slice shapes of the standard accelerator types, by chip count.
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}


@dataclasses.dataclass(frozen=True)
class Topology:
    chip: hardware.Chip
    shape: str           # "16x16"
    num_slices: int = 1

    @property
    def name(self) -> str:
        return f"{self.chip.name}:{self.shape}"

    @property
    def chips_per_slice(self) -> int:
        return math.prod(int(d) for d in self.shape.split("x"))

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    def __str__(self) -> str:
        slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
        return f"{self.name}{slices} ({self.chips} chips of {self.chip.device_kind})"


def parse_topology(text: str, num_slices: int = 1) -> Topology:
    """'v5e:16x16' or an accelerator type ('v5litepod-256', 'v5p-128') -> Topology."""
    known = f"known chips: {', '.join(TPU_CHIPS)} (e.g. v5e:4x4, v5p:2x2x2, v5litepod-16, v5p-128)"
    if num_slices < 1:
        raise ValueError(f"--num_slices={num_slices}: must be >= 1")
    m = re.fullmatch(r"([a-z0-9]+)(?::|-)([0-9x]+)", text.strip().lower())
    if not m:
        raise ValueError(f"unknown TPU topology {text!r}; {known}")
    generation, size = _ALIASES.get(m.group(1), m.group(1)), m.group(2)
    if generation not in TPU_CHIPS:
        raise ValueError(f"unknown TPU generation {m.group(1)!r} in {text!r}; {known}")
    chip = TPU_CHIPS[generation]
    if "x" not in size:  # an accelerator type: a core or chip count
        count = int(size)
        chips, rem = divmod(count, chip.cores_per_chip)
        shapes = _SHAPES_3D if chip.dims == 3 else _SHAPES_2D
        if rem or chips not in shapes:
            what = "TensorCores (2 per chip)" if chip.cores_per_chip == 2 else "chips"
            raise ValueError(f"{text!r}: no standard {chip.name} slice with {count} {what}; give the shape "
                             f"instead, like {chip.name}:{next(iter(shapes.values()))}")
        return Topology(chip, shapes[chips], num_slices)
    dims = size.split("x")
    if len(dims) != chip.dims or not all(d.isdigit() and int(d) > 0 for d in dims):
        example = "4x4x4" if chip.dims == 3 else "16x16"
        raise ValueError(f"{text!r}: a {chip.name} topology has {chip.dims} dimensions, like {chip.name}:{example}")
    return Topology(chip, size, num_slices)


# ----------------------------------------------------------------------------
# Compile-only TPU devices

def _quiet_libtpu() -> None:
    # Compile-only use: no TPU to find, no metadata server, and other processes on
    # this host (tests, a second planner) may load libtpu at the same time.
    for key, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
                       ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"),
                       ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),
                       ("TPU_STDERR_LOG_LEVEL", "3"), ("TPU_MIN_LOG_LEVEL", "3")):
        os.environ.setdefault(key, value)


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: Topology) -> list:
    """Compile-only devices of the topology (all slices)."""
    if not libtpu_available():
        raise RuntimeError(
            "the pod planner needs libtpu to compile for TPUs (no TPU needed): "
            "pip install -r requirements-tpu.txt  (libtpu==0.0.42.1, the version jax 0.10.2 pins)")
    _quiet_libtpu()
    from jax.experimental import topologies
    kwargs = {}
    if topology.chip.cores_per_chip == 2:
        kwargs["chip_config_name"] = "megacore"  # one JAX device per chip, as on real v4/v5p
    if topology.num_slices > 1:
        kwargs["num_slices"] = topology.num_slices
    dims = [int(d) for d in topology.shape.split("x")] + [1]
    if dims[0] < 2 or dims[1] < 2:  # slices smaller than one host's 2x2 chips (v5e:1x1, v6e:1x2)
        kwargs["chips_per_host_bounds"] = (min(dims[0], 2), min(dims[1], 2), 1)
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology.name, **kwargs).devices
    except jax.errors.JaxRuntimeError as e:
        raise ValueError(f"libtpu rejected topology {topology.name!r}: {str(e).splitlines()[0]}") from None
    if len(devices) != topology.chips:
        raise RuntimeError(f"{topology}: libtpu gave {len(devices)} devices, expected {topology.chips}")
    return list(devices)


# ----------------------------------------------------------------------------
# Plan one configuration

@dataclasses.dataclass
class Plan:
    topology: Topology
    mesh_shape: dict
    global_batch_size: int
    seq_len: int
    max_predictions: int
    micro_batches: int
    model: str
    num_params: int
    dtype: str
    remat_policy: str
    scan_layers: bool
    fits: bool
    compile_seconds: float
    # Per chip, from compiled.memory_analysis() (None when it does not fit).
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    temp_bytes: int | None = None
    code_bytes: int | None = None
    # From the compiler's out-of-memory error, when it does not fit.
    oom_message: str = ""
    oom_needed_bytes: int | None = None
    oom_available_bytes: int | None = None
    analytic_flops_per_step: float = 0.0
    compiler_flops_per_step: float | None = None
    mfu: float = 0.5
    packed: bool = False
    attention: str = ""      # attention.describe() on the TPU
    pallas_kernels: int = 0  # tpu_custom_call ops (splash: forward, dq, dkv) in the lowered text

    @property
    def total_bytes(self) -> int | None:
        if self.argument_bytes is None:
            return None
        # Donated state is both argument and output: count the aliased bytes once.
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def hbm_bytes(self) -> int:
        return self.topology.chip.hbm_bytes

    @property
    def step_seconds(self) -> float:
        """Step time at the stated MFU of the chips' peak bf16 FLOP/s (analytic FLOPs)."""
        return self.analytic_flops_per_step / (self.mfu * self.topology.chips * self.topology.chip.peak_bf16_flops)

    @property
    def sequences_per_second(self) -> float:
        return self.global_batch_size / self.step_seconds

    def report(self) -> str:
        t, gib = self.topology, lambda b: f"{b / GiB:.2f}"
        per_chip = self.global_batch_size / t.chips
        mesh = " ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
        lines = [
            f"topology   {t}",
            f"model      {self.model}: {self.num_params / 1e6:.1f}M params, compute {self.dtype}, "
            f"remat {self.remat_policy}, scan_layers {self.scan_layers}",
            f"mesh       {mesh}",
            f"batch      global {self.global_batch_size} ({per_chip:g} per chip), seq {self.seq_len}, "
            f"{self.max_predictions} predictions, micro_batches {self.micro_batches}"
            f"{', packed rows' if self.packed else ''}",
            f"attention  {self.attention.removeprefix('attention: ')}; {self.pallas_kernels} Pallas kernels",
            f"compile    {self.compile_seconds:.1f} s",
        ]
        if self.fits:
            lines.append(
                f"memory     per chip, GiB: arguments {gib(self.argument_bytes)}, outputs {gib(self.output_bytes)} "
                f"({gib(self.alias_bytes)} aliased with donated arguments), temporaries {gib(self.temp_bytes)}, "
                f"code {gib(self.code_bytes)}")
            lines.append(f"fits       yes: {gib(self.total_bytes)} of {gib(self.hbm_bytes)} GiB HBM per chip "
                         f"({100 * self.total_bytes / self.hbm_bytes:.0f}%)")
        else:
            needs = ""
            if self.oom_needed_bytes:
                needs = (f": needs {gib(self.oom_needed_bytes)} GiB, the compiler has "
                         f"{gib(self.oom_available_bytes)} GiB")
            lines.append(f"fits       NO: does not fit in {gib(self.hbm_bytes)} GiB HBM per chip{needs}")
            lines.append(f"           compiler: {self.oom_message}")
        compiler = ""
        if self.compiler_flops_per_step:
            # XLA's cost analysis does not multiply a while loop's body by its trip count.
            scanned = " (counts the scanned layer once)" if self.scan_layers else ""
            compiler = f"; compiler cost_analysis {self.compiler_flops_per_step:.3e}{scanned}"
        lines.append(f"FLOPs      per step: analytic {self.analytic_flops_per_step:.3e} (matmuls, fwd+bwd){compiler}")
        lines.append(
            f"speed      at {100 * self.mfu:.0f}% MFU of {t.chip.peak_bf16_flops / 1e12:.0f} TFLOP/s per chip: "
            f"step {1e3 * self.step_seconds:.1f} ms, {self.sequences_per_second:,.0f} sequences/s, "
            f"{self.sequences_per_second * self.seq_len / 1e6:.2f}M tokens/s")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["topology"] = {"name": self.topology.name, "num_slices": self.topology.num_slices,
                         "chips": self.topology.chips, "chip": self.topology.chip.name}
        d.update(total_bytes=self.total_bytes, hbm_bytes=self.hbm_bytes, step_seconds=self.step_seconds,
                 sequences_per_second=self.sequences_per_second)
        return d


def _is_oom(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "out of memory" in text.lower()


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# The two ways libtpu words it: "... required for HLO temporaries (1.55T) exceeds
# available HBM (15.75G)" and "Used 20.5G of 15.75G hbm".
_OOM_PATTERNS = (r"required for [^(]*\(([\d.]+)([KMGT]?)B?\) exceeds available HBM \(([\d.]+)([KMGT]?)B?\)",
                 r"Used ([\d.]+)([KMGT]?)B? of ([\d.]+)([KMGT]?)B? hbm")


def _oom_summary(error: Exception) -> tuple[str, int | None, int | None]:
    """-> (the compiler's message, bytes it needed, bytes available) from a TPU OOM."""
    text = " ".join(str(error).split())
    m = re.search(r"(RESOURCE_EXHAUSTED: .*?)(?: Largest program allocations|$)", text)
    summary = (m.group(1) if m else text)[:300]
    for pattern in _OOM_PATTERNS:
        m = re.search(pattern, text)
        if m:
            needed = int(float(m.group(1)) * _UNITS[m.group(2)])
            available = int(float(m.group(3)) * _UNITS[m.group(4)])
            return summary, needed, available
    return summary, None, None


def _copy_for_topology(config, topology: Topology) -> config_dict.ConfigDict:
    """An unlocked copy of the config whose mesh.slices matches the topology."""
    config = config_dict.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else config)
    if topology.num_slices > 1 and config.mesh.slices == 1:
        config.mesh.slices = topology.num_slices
    elif config.mesh.slices != topology.num_slices:
        raise ValueError(f"config.mesh.slices={config.mesh.slices} but the topology has {topology.num_slices} "
                         f"slice(s); pass --num_slices {config.mesh.slices} or change config.mesh.slices")
    return config


def lower_pretraining_step(config, mesh, *, vocab_size: int = 30522):
    """The step `python -m bert_jax.pretrain` runs for `config` on `mesh`
    (``train_step.build_pretraining_step``, the builder pretraining itself calls),
    lowered with abstract arguments (packed rows with ``data.packing``).
    -> (PretrainingStep, jax.stages.Lowered)."""
    model_config = train_step_lib.pretraining_model_config(config, vocab_size)  # unless the config sets it
    program = train_step_lib.build_pretraining_step(config, model_config, mesh)
    return program, program.train_step.lower(*program.abstract_arguments())


def plan(config, topology: Topology | str, num_slices: int = 1, *, global_batch_size: int | None = None,
         mfu: float = 0.5, vocab_size: int = 30522, packed: bool = False) -> Plan:
    """Compile the pretraining step of `config` for `topology`; -> Plan (fits or not).

    `vocab_size` is used when the config leaves model.vocab_size to the tokenizer.
    Bad input (unknown topology, a mesh that does not match the chip count, a batch
    the mesh cannot split) raises ValueError naming what to change.
    """
    if isinstance(topology, str):
        topology = parse_topology(topology, num_slices)
    config = _copy_for_topology(config, topology)
    # "auto" dtype and matmul path as on the TPU being planned for, not this CPU host.
    choice = hardware.compute_choice(config.model.dtype or "float32", config.model.matmul_impl or "auto",
                                     platform="tpu")
    config.model.dtype, config.model.matmul_impl = choice.dtype, choice.matmul_impl
    if global_batch_size is not None:
        config.train.global_batch_size = int(global_batch_size)
    packed = config.data.packing = packed or config.data.packing
    config_utils.validate(_with_train_path(config))

    devices = topology_devices(topology)
    try:
        mesh = sharding.make_mesh(config.mesh, devices=devices)
    except ValueError as e:
        raise ValueError(f"config.mesh {dict(config.mesh)} does not fit {topology}: {e}") from None
    batch = config.train.global_batch_size
    try:
        sharding.check_batch_size(batch, mesh, sharding.DEFAULT_RULES)
    except ValueError as e:
        raise ValueError(f"config.train.global_batch_size={batch} on mesh {dict(mesh.shape)}: {e}") from None

    start = time.perf_counter()
    program, lowered = lower_pretraining_step(config, mesh, vocab_size=vocab_size)
    model_config, seq, preds = program.model_config, program.seq_len, program.max_predictions
    result = Plan(
        topology=topology, mesh_shape=dict(mesh.shape), global_batch_size=batch, seq_len=seq,
        max_predictions=preds, micro_batches=config.train.micro_batches,
        model=f"{config.model.preset} ({model_config.num_hidden_layers} layers, hidden {model_config.hidden_size})",
        num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(program.abstract_state.params)),
        dtype=model_config.dtype, remat_policy=model_config.remat_policy, scan_layers=model_config.scan_layers,
        fits=False, compile_seconds=0.0, mfu=mfu, packed=packed,
        attention=attention.describe(model_config, seq_len=seq, packed=packed, platform_name="tpu"),
        pallas_kernels=lowered.as_text().count("tpu_custom_call"),
        analytic_flops_per_step=batch * hardware.pretraining_flops_per_sequence(model_config, seq, preds))
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if not _is_oom(e):
            raise
        result.compile_seconds = time.perf_counter() - start
        result.oom_message, result.oom_needed_bytes, result.oom_available_bytes = _oom_summary(e)
        return result
    result.compile_seconds = time.perf_counter() - start
    result.fits = True
    memory = compiled.memory_analysis()
    result.argument_bytes = memory.argument_size_in_bytes
    result.output_bytes = memory.output_size_in_bytes
    result.alias_bytes = memory.alias_size_in_bytes
    result.temp_bytes = memory.temp_size_in_bytes
    result.code_bytes = memory.generated_code_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get("flops"):
        result.compiler_flops_per_step = float(cost["flops"]) * topology.chips  # per-device program
    if result.total_bytes > result.hbm_bytes:  # the compiler should have refused; be safe
        result.fits = False
        result.oom_message = "memory_analysis total exceeds the chip's HBM"
    return result


def _with_train_path(config):
    """validate() wants a data path; the planner reads no data."""
    if config.data.source != "demo" and not config.data.train_path:
        config = config_dict.ConfigDict(config.to_dict())
        config.data.train_path = "(not read by the planner)"
    return config


# ----------------------------------------------------------------------------
# Batch-size search

def search_batch(config, topology: Topology | str, num_slices: int = 1, *, max_compiles: int = 10,
                 max_batch: int = 1 << 22, log=print, **plan_kwargs) -> tuple[Plan | None, list[Plan]]:
    """Largest global batch that fits: double (or halve) from the config's batch, then
    bisect, in multiples of what the mesh and micro-batches can split.
    -> (largest fitting Plan or None, every probe in order)."""
    if isinstance(topology, str):
        topology = parse_topology(topology, num_slices)
    devices = topology_devices(topology)
    probe_config = _copy_for_topology(config, topology)
    mesh = sharding.make_mesh(probe_config.mesh, devices=devices)
    unit = math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh, sharding.DEFAULT_RULES))
    unit *= config.train.micro_batches
    results: dict[int, Plan] = {}

    def fits(batch: int) -> bool:
        if batch not in results:
            results[batch] = plan(config, topology, global_batch_size=batch, **plan_kwargs)
            r = results[batch]
            if r.fits:
                used = f"fits: {r.total_bytes / GiB:.2f} GiB"
            else:
                needs = f", needs {r.oom_needed_bytes / GiB:.2f} GiB" if r.oom_needed_bytes else ""
                used = f"does not fit{needs}"
            log(f"  batch {batch:>8}: {used} of {r.hbm_bytes / GiB:.2f} GiB per chip "
                f"(compile {r.compile_seconds:.0f} s)")
        return results[batch].fits

    batch = max(unit, config.train.global_batch_size // unit * unit)
    lo, hi = 0, None  # largest known fit, smallest known failure
    if fits(batch):
        lo = batch
        while hi is None and len(results) < max_compiles and 2 * lo <= max_batch:
            hi = None if fits(2 * lo) else 2 * lo
            lo = 2 * lo if hi is None else lo
    else:
        hi = batch
        while lo == 0 and hi > unit and len(results) < max_compiles:
            half = max(unit, hi // 2 // unit * unit)
            if fits(half):
                lo = half
            else:
                hi = half
    while hi is not None and lo and hi - lo > unit and len(results) < max_compiles:
        mid = (lo + hi) // 2 // unit * unit
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return (results[lo] if lo else None), [results[b] for b in results]
