"""Low-precision matmuls with float32 outputs and float32 weight gradients.

``f32_einsum(spec, dtype, a, b)`` computes ``einsum(spec, a, b)`` with both
operands cast to ``dtype`` (e.g. bfloat16) and a float32 result, and defines its
own VJP so the backward matmuls are the same kind: ``dtype`` inputs, float32
outputs. Each gradient comes back in its operand's own dtype, so a float32
kernel gets a float32 gradient that was never rounded to bfloat16.

Why a custom VJP: JAX's transpose of ``dot_general(..., preferred_element_type=
float32)`` multiplies the float32 cotangent with a bfloat16 operand, which XLA
runs as a float32 matmul. On CPUs with AVX512-BF16/AMX, XLA hands bfloat16 x
bfloat16 -> float32 dots to XNNPACK/YNNPACK, 3-5x faster than its bfloat16 ->
bfloat16 or float32 dots in the forward and input-gradient forms
(``benchmarks/bench_matmul.py``; ``benchmarks/bench_train.py`` measures a whole
train step). On GPUs and TPUs the hardware accumulates in float32
either way; the model uses this path there only when asked
(``BertConfig.matmul_impl``).

Specs are two-operand einsums in which every index of an operand appears in
the other operand or the output (true of dense layers and the tied MLM
decoder, which use it, and of attention), so each gradient is itself one einsum.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _parse(spec: str) -> tuple[str, str, str]:
    inputs, out = spec.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    for name, operand, other in (("first", lhs, rhs + out), ("second", rhs, lhs + out)):
        lonely = sorted(set(operand.replace("...", "")) - set(other))
        if lonely:
            raise ValueError(f"f32_einsum: index {lonely} of the {name} operand of {spec!r} appears nowhere else")
    return lhs, rhs, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def f32_einsum(spec: str, dtype, a: jax.Array, b: jax.Array) -> jax.Array:
    _parse(spec)
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _fwd(spec, dtype, a, b):
    return f32_einsum(spec, dtype, a, b), (a, b)


def _bwd(spec, dtype, residuals, g):
    a, b = residuals
    lhs, rhs, out = _parse(spec)
    g = g.astype(dtype)
    da = jnp.einsum(f"{out},{rhs}->{lhs}", g, b.astype(dtype), preferred_element_type=jnp.float32)
    db = jnp.einsum(f"{lhs},{out}->{rhs}", a.astype(dtype), g, preferred_element_type=jnp.float32)
    return da.astype(a.dtype), db.astype(b.dtype)


f32_einsum.defvjp(_fwd, _bwd)
