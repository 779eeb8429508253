"""Why bert_jax/dropout.py exists: the cost of a dropout mask's random bits, side by side.

    python benchmarks/bench_dropout.py [--rows 16] [--seq 128] [--repeats 5]

The masks of one MiniLM layer in fine-tuning (rows of --seq tokens): the attention
probabilities [rows, 12, seq, seq] and a hidden-state mask [rows, seq, 384]. Each is drawn
and applied (inverted dropout at rate 0.1) by `dropout.dropout` with `impl="threefry"`
(`jax.random.bernoulli`) and with `impl="hash"` (bert_jax's default), in one process, the two
alternating, best of --repeats. The end-to-end effect on a fine-tuning step:
`python benchmarks/bench_finetune.py --variant threefry:model.dropout_impl=threefry`.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bert_jax import dropout, hardware  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    shapes = {"attention probs": (args.rows, 12, args.seq, args.seq), "hidden": (args.rows, args.seq, 384)}
    features = ",".join(sorted(hardware.cpu_features())) or "none of " + ",".join(hardware.CPU_FEATURES)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; CPU features {features}; "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, shape in shapes.items():
        x = jnp.ones(shape, jnp.float32)
        fns = {impl: jax.jit(lambda x, k, impl=impl: jnp.sum(dropout.dropout(x, 0.1, k, impl)))
               for impl in dropout.IMPLS}
        best = {impl: float("inf") for impl in fns}
        for impl, f in fns.items():
            f(x, jax.random.key(0)).block_until_ready()
        for r in range(args.repeats):
            for impl, f in fns.items():
                start = time.perf_counter()
                f(x, jax.random.key(r + 1)).block_until_ready()
                best[impl] = min(best[impl], time.perf_counter() - start)
        n = jnp.size(x) / 1e6
        print(f"{name:16s} {str(shape):20s} {n:5.1f}M: threefry {best['threefry'] * 1e3:7.1f} ms, "
              f"hash {best['hash'] * 1e3:6.1f} ms, x{best['threefry'] / best['hash']:.1f}")


if __name__ == "__main__":
    main()
