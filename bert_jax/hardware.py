"""What the hardware offers: one table of accelerator chips (peak FLOP/s, HBM, TPU topology
rank) for MFU logging and the pod planner, the model FLOPs MFU divides by, the CPU's
instruction-set features, and the compute dtype and matmul path that follow from them
(`compute_choice`: what `dtype="auto"` and `matmul_impl="auto"` mean on this machine).

Peaks are dense (no sparsity) per chip, from the vendors' data sheets (Cloud TPU system
architecture pages, NVIDIA data sheets). `peak_fp32_flops` is the rate of float32 matmuls at
XLA's default precision, the one bert_jax runs them at: one bfloat16 pass on a TPU's MXU
(so the bfloat16 peak) and TF32 tensor cores on NVIDIA Ampere and later.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

from bert_jax import _hugepages

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str                  # as topologies name the generation: "v5e"; GPUs: "h100"
    device_kind: str           # what jax reports on it: "TPU v5 lite", "NVIDIA H100 80GB HBM3"
    hbm_bytes: int             # per chip
    peak_bf16_flops: float     # dense FLOP/s per chip
    peak_fp32_flops: float     # float32 matmuls at XLA's default precision (see the module doc)
    dims: int = 0              # TPU topology rank: 2 (v5e, v6e) or 3 (v4, v5p); 0: not a TPU
    cores_per_chip: int = 1    # TPU accelerator-type names count TensorCores (2 per chip on v4/v5p)
    also_reported_as: tuple[str, ...] = ()  # other device_kind spellings

    def peak_flops(self, dtype: str) -> float:
        return self.peak_bf16_flops if jnp.dtype(dtype).itemsize == 2 else self.peak_fp32_flops


CHIPS = {c.name: c for c in (
    Chip("v4", "TPU v4", 32 * GiB, 275e12, 275e12, dims=3, cores_per_chip=2),
    Chip("v5e", "TPU v5 lite", 16 * GiB, 197e12, 197e12, dims=2, also_reported_as=("TPU v5e",)),
    Chip("v5p", "TPU v5", 95 * GiB, 459e12, 459e12, dims=3, cores_per_chip=2, also_reported_as=("TPU v5p",)),
    Chip("v6e", "TPU v6 lite", 32 * GiB, 918e12, 918e12, dims=2, also_reported_as=("TPU v6e",)),
    Chip("a100", "NVIDIA A100-SXM4-40GB", 40 * GiB, 312e12, 156e12, also_reported_as=("A100",)),
    Chip("a100-80gb", "NVIDIA A100-SXM4-80GB", 80 * GiB, 312e12, 156e12,
         also_reported_as=("A100 80GB", "A100-PCIE-80GB", "A100-80GB")),
    Chip("h100", "NVIDIA H100 80GB HBM3", 80 * GiB, 989e12, 495e12, also_reported_as=("H100 SXM", "H100")),
    Chip("h100-pcie", "NVIDIA H100 PCIe", 80 * GiB, 756e12, 378e12),
    Chip("h200", "NVIDIA H200", 141 * 10 ** 9, 989e12, 495e12),
    Chip("l4", "NVIDIA L4", 24 * GiB, 121e12, 60e12),
)}


def chip_for_device_kind(kind: str) -> Chip | None:
    """The table's chip for a jax `device_kind`, or None. The longest spelling contained
    in `kind` wins, so "TPU v5 lite" is a v5e, not a v5p ("TPU v5")."""
    kind = kind.lower()
    spellings = sorted(((s.lower(), c) for c in CHIPS.values() for s in (c.device_kind, *c.also_reported_as)),
                       key=lambda sc: -len(sc[0]))
    return next((c for s, c in spellings if s in kind), None)


# ----------------------------------------------------------------------------
# MFU: model FLOPs over peak FLOP/s

def pretraining_flops_per_sequence(model_config, seq_len: int, predictions: int) -> float:
    """Matmul FLOPs of one training sequence (forward + backward = 3x forward).

    Per layer: QKV and output projections 4H^2, feed-forward 2HI per token, attention
    scores and context 2S^2H per sequence (x2 FLOPs per multiply-add); the MLM head
    (transform HxH and the tied HxV decoder) runs on the masked positions only.
    """
    h, i, v = model_config.hidden_size, model_config.intermediate_size, model_config.vocab_size
    per_layer = 2 * seq_len * (4 * h * h + 2 * h * i) + 4 * seq_len * seq_len * h
    forward = model_config.num_hidden_layers * per_layer + 2 * predictions * (h * h + h * v)
    forward += 2 * (h * h + 2 * h)  # pooler and NSP
    return 3.0 * forward


def device_peak_flops(dtype: str = "float32", f32_out: bool = False,
                      measure_seconds: float = 0.3) -> tuple[float, str]:
    """Per-device peak FLOP/s for matmuls in `dtype` and where it came from: the table for
    known accelerators, else a matmul measured here (CPU) in the form the train step runs:
    `dtype` inputs with a float32 result when `f32_out` (matmul_impl f32_out), else a
    `dtype` result (XLA's dots)."""
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    chip = chip_for_device_kind(kind)
    if chip is not None:
        return chip.peak_flops(dtype), f"data sheet ({kind})"
    n = 1024
    a = jnp.ones((n, n), dtype)
    out = jnp.float32 if f32_out else None
    matmul = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=out))
    matmul(a).block_until_ready()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < measure_seconds:
        matmul(a).block_until_ready()
        runs += 1
    seconds = time.perf_counter() - start
    form = f"{dtype}->float32" if f32_out and jnp.dtype(dtype) != jnp.float32 else dtype
    # A CPU "device" is the whole host; MFU is then per host, against this peak.
    return 2 * n ** 3 * runs / seconds, f"measured {n}x{n} {form} matmul on {kind or device.platform}"


# ----------------------------------------------------------------------------
# CPU features

# The x86 flags that decide XLA:CPU's fast matmul paths (AVX-512 BF16 and AMX take bfloat16
# dots to XNNPACK/oneDNN kernels; see bert_jax/matmul.py), as Linux's /proc/cpuinfo spells them.
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU_FEATURES this host's CPU has, from the `flags` line of /proc/cpuinfo. Where
    that file is missing or has no such line (macOS, Windows, ARM), the empty set: nothing
    is assumed."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(CPU_FEATURES).intersection(value.split())
    except OSError:
        pass
    return frozenset()


# ----------------------------------------------------------------------------
# The compute dtype and matmul path: what "auto" means here

# Either gives XLA:CPU a bfloat16 x bfloat16 -> float32 dot faster than its float32 one. Without
# them (AVX2, AVX-512 without BF16) bfloat16 matmuls are slower than float32 ones.
FAST_BF16_CPU_FEATURES = frozenset({"avx512_bf16", "amx_bf16"})


@dataclasses.dataclass(frozen=True)
class ComputeChoice:
    dtype: str                 # the compute dtype: "float32" | "bfloat16" | what was asked
    matmul_impl: str           # "xla" | "f32_out" (BertConfig.matmul_impl, resolved)
    platform: str              # "cpu" | "gpu" | "tpu"
    cpu_features: frozenset

    @property
    def f32_out(self) -> bool:
        return self.matmul_impl == "f32_out" and jnp.dtype(self.dtype) != jnp.float32

    def describe(self) -> str:
        """For start-up lines: 'compute float32, XLA matmuls (cpu; CPU features avx2); malloc huge
        pages on (...)'."""
        matmuls = f"{self.dtype} x {self.dtype} -> float32 matmuls" if self.f32_out else "XLA matmuls"
        features = ",".join(sorted(self.cpu_features)) or "none of " + ",".join(CPU_FEATURES)
        line = f"compute {self.dtype}, {matmuls} ({self.platform}; CPU features {features})"
        if self.platform == "cpu":  # XLA:CPU's step buffers are host memory
            line += f"; {_hugepages.status()}"
        return line


@functools.lru_cache(maxsize=1)
def _host_cpu_features() -> frozenset[str]:  # every model layer asks: read /proc/cpuinfo once
    return cpu_features()


def compute_choice(dtype: str = "auto", matmul_impl: str = "auto", *, platform: str | None = None,
                   features: frozenset[str] | None = None) -> ComputeChoice:
    """Resolves `dtype="auto"` and `matmul_impl="auto"` for `platform` (default: jax's default
    backend) and the CPU's `features` (default: this host's).

    Accelerators: bfloat16 compute with XLA's dots (their matrix units accumulate in float32
    anyway). A CPU with a fast bfloat16 path (FAST_BF16_CPU_FEATURES): bfloat16 compute with
    the float32-output matmuls of bert_jax/matmul.py. Any other CPU: float32 with XLA's dots;
    an explicit bfloat16 there also takes XLA's dots (faster than the float32-output form
    without the bf16 instructions). Explicit values other than "auto" are kept.
    """
    platform = platform or jax.default_backend()
    features = _host_cpu_features() if features is None else frozenset(features)
    fast_bf16 = platform != "cpu" or bool(features & FAST_BF16_CPU_FEATURES)
    if dtype == "auto":
        dtype = "bfloat16" if fast_bf16 else "float32"
    if matmul_impl == "auto":
        low_precision = jnp.dtype(dtype) != jnp.float32
        matmul_impl = "f32_out" if platform == "cpu" and fast_bf16 and low_precision else "xla"
    return ComputeChoice(dtype, matmul_impl, platform, features)
