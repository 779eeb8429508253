"""Why bert_jax/matmul.py exists: XLA:CPU matmul speed by input/output dtype, side by side.

    python benchmarks/bench_matmul.py [--shape 2048,768,3072] [--repeats 10]

One BERT-base FFN-sized matmul [M,K] x [K,N] (and its two backward forms) in one
process, best of --repeats: float32; bfloat16 inputs with a bfloat16 output (what
JAX's default dot and its transpose give); bfloat16 inputs with a float32 output
(what ``f32_einsum`` uses, forward and backward).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def best_seconds(f, *args, repeats: int) -> float:
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="2048,768,3072", help="M,K,N (tokens, in, out)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    m, k, n = map(int, args.shape.split(","))
    rng = np.random.default_rng(0)
    x, w, dy = rng.normal(size=(m, k)), rng.normal(size=(k, n)), rng.normal(size=(m, n))
    forms = {  # name: (einsum spec, operands)
        "forward  x @ w": ("mk,kn->mn", x, w),
        "backward dy @ w.T": ("mn,kn->mk", dy, w),
        "backward x.T @ dy": ("mk,mn->kn", x, dy),
    }
    variants = {"float32": (jnp.float32, None), "bf16 -> bf16": (jnp.bfloat16, None),
                "bf16 -> f32": (jnp.bfloat16, jnp.float32)}
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; [{m},{k}] x [{k},{n}], best of {args.repeats}")
    print(f"{'matmul':20}" + "".join(f"{v:>16}" for v in variants) + "   GFLOP/s")
    for name, (spec, a, b) in forms.items():
        row = []
        for dtype, out in variants.values():
            f = jax.jit(lambda a, b, spec=spec, out=out: jnp.einsum(spec, a, b, preferred_element_type=out))
            seconds = best_seconds(f, jnp.asarray(a, dtype), jnp.asarray(b, dtype), repeats=args.repeats)
            row.append(2 * m * k * n / seconds / 1e9)
        print(f"{name:20}" + "".join(f"{r:16.0f}" for r in row))


if __name__ == "__main__":
    main()
