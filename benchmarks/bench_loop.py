"""Training-loop overhead: this tree's `loop.train_loop` and `checkpoint.Checkpointer`
(failed-save check every step, divergence watch, save-time finiteness check and checksums)
vs those of another git revision, on the same jitted BERT step, in one process, runs
alternating; and the whole of the finiteness checks: this tree (the step's non-finite
update skip, the loop's and the saves' checks) vs no checks at all (the other revision's
loop and Checkpointer driving a step built with `skip_nonfinite=False`).

    python benchmarks/bench_loop.py [--baseline-rev 62aeb47] [--config tiny] [--batch 16]
                                    [--seq 128] [--steps 60] [--checkpoint-every 20] [--repeats 3]

All save real (async Orbax) checkpoints through their revision's `Checkpointer` every
`--checkpoint-every` steps into a temporary workdir. Reported: seconds per step (median
over repeats, from the second step's launch to the last save's end), the ratios, and the
time of one save-time check (`checkpoint._digest`) alone.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_train import make_batch  # noqa: E402
from bert_jax import checkpoint, loop, metrics_writer, optim, sharding  # noqa: E402
from bert_jax import model as M  # noqa: E402
from bert_jax import train_step as T  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def module_at(rev: str, name: str):
    """bert_jax/<name>.py as of `rev`, imported as its own module `baseline_<name>`."""
    source = subprocess.run(["git", "show", f"{rev}:bert_jax/{name}.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = pathlib.Path(tempfile.mkdtemp()) / f"baseline_{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"baseline_{name}", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(loop_module, checkpoint_module, program, batch, args) -> float:
    """-> seconds per step of one train_loop run of args.steps steps."""
    state, step_fn, mesh = program
    state = jax.tree.map(lambda x: x.copy(), state)  # the step donates its input
    device_batch = sharding.make_global_batch(batch, mesh)
    key = jax.random.key(0)
    with tempfile.TemporaryDirectory() as workdir:
        ckpt = checkpoint_module.Checkpointer(workdir, keep=2)

        def save(step, state, record=None, metrics=None, final=False):
            ckpt.save(step, state, data_state={}, config={}, meta={})
            if final:
                ckpt.wait()
        settings = loop_module.LoopSettings(
            total_steps=args.steps, log_every=10, eval_every=10 ** 9, checkpoint_every=args.checkpoint_every,
            max_nonfinite_steps=10, global_batch_size=args.batch)
        extra = {"check_saves": ckpt.check} if hasattr(ckpt, "check") else {}
        preemption = loop_module.PreemptionWatcher()
        launches = []

        def timed_step(state, batch):
            launches.append(time.perf_counter())
            return step_fn(state, batch, key)
        try:
            loop_module.train_loop(state=state, start_step=0, settings=settings, train_step=timed_step,
                                   train_batches=iter(lambda: batch, None), to_global=lambda b: device_batch,
                                   evaluate=None, save=save, writer=metrics_writer.MetricsWriter(None, enabled=False),
                                   preemption=preemption, **extra)
        finally:
            preemption.close()
            ckpt.wait()
            ckpt.close()
        end = time.perf_counter()
    return (end - launches[1]) / (len(launches) - 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-rev", default="62aeb47")
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = M.BertConfig.preset(args.config, max_position_embeddings=max(512, args.seq))
    opt, schedule = optim.make_optimizer({"learning_rate": 1e-4, "warmup_steps": 0, "total_steps": 1000})
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    graphdef, state, shardings = T.create_train_state(cfg, opt, mesh, seed=0)
    step_fn = T.make_train_step(graphdef, opt, mesh, None, shardings, schedule=schedule)
    program = (state, step_fn, mesh)
    unchecked = (state, T.make_train_step(graphdef, opt, mesh, None, shardings, schedule=schedule,
                                          skip_nonfinite=False), mesh)
    batch = make_batch(args.batch, args.seq, cfg.vocab_size)
    baseline = (module_at(args.baseline_rev, "loop"), module_at(args.baseline_rev, "checkpoint"))

    results = {"baseline": [], "this_tree": [], "no_checks": []}
    for _ in range(args.repeats):
        results["baseline"].append(run(*baseline, program, batch, args))
        results["this_tree"].append(run(loop, checkpoint, program, batch, args))
        results["no_checks"].append(run(*baseline, unchecked, batch, args))
    jax.block_until_ready(checkpoint._digest(state))
    start = time.perf_counter()
    for _ in range(5):
        jax.block_until_ready(checkpoint._digest(state))
    median = {k: statistics.median(v) for k, v in results.items()}
    print(json.dumps({"device": jax.devices()[0].device_kind, "config": args.config, "batch": args.batch,
                      "seq": args.seq, "steps": args.steps, "checkpoint_every": args.checkpoint_every,
                      "seconds_per_step": median, "all": results,
                      "ratio_this_tree_over_baseline": median["this_tree"] / median["baseline"],
                      "ratio_this_tree_over_no_checks": median["this_tree"] / median["no_checks"],
                      "save_time_check_seconds": (time.perf_counter() - start) / 5}, indent=1))


if __name__ == "__main__":
    main()
