"""Why bert_jax/matmul.py exists: XLA:CPU matmul speed by input/output dtype, side by side.

    python benchmarks/bench_matmul.py [--shape 2048,768,3072] [--repeats 10] [--weight-grad-shapes ...]

One BERT-base FFN-sized matmul [M,K] x [K,N] (and its two backward forms) in one
process, best of --repeats: float32; bfloat16 inputs with a bfloat16 output (what
JAX's default dot and its transpose give); bfloat16 inputs with a float32 output
(what ``f32_einsum`` uses, forward and backward).

Then the weight-gradient experiment at BERT-base's dense shapes (tokens x in -> in x out:
QKV/output 768x768, FFN 768x3072 and 3072x768): ``x.T @ dy`` as XLA emits it (one dot
contracting the token dimension of both operands) against an explicit transpose of ``x``
(materialised behind an optimization barrier, so XLA cannot fold it back into the dot)
followed by the forward-layout ``a @ b``, the transpose's time included.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from bert_jax import hardware


def best_seconds(f, *args, repeats: int) -> float:
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - start)
    return best


VARIANTS = {"float32": (jnp.float32, None), "bf16 -> bf16": (jnp.bfloat16, None),
            "bf16 -> f32": (jnp.bfloat16, jnp.float32)}


def forms_table(m: int, k: int, n: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    x, w, dy = rng.normal(size=(m, k)), rng.normal(size=(k, n)), rng.normal(size=(m, n))
    forms = {  # name: (einsum spec, operands)
        "forward  x @ w": ("mk,kn->mn", x, w),
        "backward dy @ w.T": ("mn,kn->mk", dy, w),
        "backward x.T @ dy": ("mk,mn->kn", x, dy),
    }
    print(f"[{m},{k}] x [{k},{n}], best of {repeats}")
    print(f"{'matmul':20}" + "".join(f"{v:>16}" for v in VARIANTS) + "   GFLOP/s")
    for name, (spec, a, b) in forms.items():
        row = []
        for dtype, out in VARIANTS.values():
            f = jax.jit(lambda a, b, spec=spec, out=out: jnp.einsum(spec, a, b, preferred_element_type=out))
            seconds = best_seconds(f, jnp.asarray(a, dtype), jnp.asarray(b, dtype), repeats=repeats)
            row.append(2 * m * k * n / seconds / 1e9)
        print(f"{name:20}" + "".join(f"{r:16.0f}" for r in row))


def weight_grad_as_xla(x, dy, out):
    return jnp.einsum("mk,mn->kn", x, dy, preferred_element_type=out)


def weight_grad_transposed(x, dy, out):
    return jnp.matmul(jax.lax.optimization_barrier(x.T), dy, preferred_element_type=out)


def weight_grad_table(shapes: list[tuple[int, int, int]], repeats: int) -> None:
    print(f"\nweight gradient x.T @ dy ([M,K]^T x [M,N] -> [K,N]), best of {repeats}, GFLOP/s "
          "(transposed: x.T materialised, then a @ b; its copy is timed too)")
    print(f"{'shape M,K,N':18}" + "".join(f"{v + ' ' + form:>26}" for v in VARIANTS for form in ("xla", "transposed")))
    rng = np.random.default_rng(0)
    for m, k, n in shapes:
        x, dy = rng.normal(size=(m, k)), rng.normal(size=(m, n))
        row = []
        for dtype, out in VARIANTS.values():
            a, b = jnp.asarray(x, dtype), jnp.asarray(dy, dtype)
            for form in (weight_grad_as_xla, weight_grad_transposed):
                f = jax.jit(lambda a, b, form=form, out=out: form(a, b, out))
                row.append(2 * m * k * n / best_seconds(f, a, b, repeats=repeats) / 1e9)
        print(f"{f'{m},{k},{n}':18}" + "".join(f"{r:26.0f}" for r in row))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="2048,768,3072", help="M,K,N (tokens, in, out)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--weight-grad-shapes", default="2048,768,768;2048,768,3072;2048,3072,768",
                        help="M,K,N;... for the weight-gradient experiment ('' to skip)")
    args = parser.parse_args()
    features = ",".join(sorted(hardware.cpu_features())) or "none of " + ",".join(hardware.CPU_FEATURES)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; CPU features {features}")
    forms_table(*map(int, args.shape.split(",")), args.repeats)
    if args.weight_grad_shapes:
        shapes = [tuple(map(int, s.split(","))) for s in args.weight_grad_shapes.split(";")]
        weight_grad_table(shapes, args.repeats)


if __name__ == "__main__":
    main()
