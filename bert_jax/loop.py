"""The one training loop, for pretraining and every fine-tuning task: steps, logging
(metrics.jsonl, TensorBoard, progress bar), periodic evaluation, checkpoints, preemption.

`train_loop` knows nothing of files, models or tasks: its callers (`bert_jax.pretrain`,
`bert_jax.sweep`) give it the jitted step, the host batches, an `evaluate` function, a
`save` function (a `Checkpointer` behind it) and a `MetricsWriter`.

Exact resume: the loop's state is the train state, the data iterator state and its
`record` (evaluations so far, train loss since the last one), and all three go into
every checkpoint; dropout keys come from (seed, step) inside the step.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had non-finite gradients."""


# ----------------------------------------------------------------------------
# Preemption

class PreemptionWatcher:
    """Says when to save and stop: SIGTERM here, or JAX's preemption sync point on
    multi-host (after jax.distributed.initialize, JAX itself catches SIGTERM and all
    hosts agree on the step to save at)."""

    def __init__(self):
        self.multihost = _preemption_sync_manager_running()
        self._signalled = False
        self._calls = 0
        self._previous = None
        if not self.multihost:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self._signalled = True

    def reached(self, step: int) -> bool:
        """Call at every step (multi-host requires every host to call it at every step).
        JAX's sync point is given the number of calls, which only grows, also across the
        runs of a fine-tuning sweep whose steps start at 0 again."""
        self._calls += 1
        if self.multihost:
            return multihost_utils.reached_preemption_sync_point(self._calls)
        return self._signalled

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _preemption_sync_manager_running() -> bool:
    try:
        from jax._src import distributed
        return distributed.global_state.preemption_sync_manager is not None
    except (ImportError, AttributeError):
        return False


# ----------------------------------------------------------------------------
# The loop

@dataclasses.dataclass
class LoopSettings:
    total_steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    max_nonfinite_steps: int
    global_batch_size: int
    flops_per_step: float = 0.0      # 0: no MFU
    peak_flops_total: float = 1.0    # all devices together
    eval_at_start: bool = False      # also evaluate at step 0 of a fresh run
    progress_metrics: tuple[tuple[str, str], ...] = (("loss", "loss"),)  # (bar label, metric name)


def train_loop(
    *,
    state,
    start_step: int,
    settings: LoopSettings,
    train_step: Callable,            # (state, global_batch) -> (state, device metrics)
    train_batches: Iterator[dict],   # host numpy batches
    to_global: Callable[[dict], dict],
    evaluate: Callable[[Any], dict] | None,  # state -> metrics as floats (with 'loss' for keep_best)
    save: Callable[..., Any],        # save(step, state, record=, metrics=None, final=False)
    writer,
    preemption: PreemptionWatcher,
    record: dict | None = None,      # the `record` of the checkpoint resumed from
) -> tuple[Any, dict]:
    """Runs steps start_step+1 .. total_steps. -> (state, summary dict).

    Train metrics stay on the device until a log line, an evaluation or a checkpoint
    needs them (then they are fetched together); the host blocks on the step launched
    MAX_STEPS_IN_FLIGHT steps earlier, so it runs ahead of the device but not unboundedly.
    `record` (JSON) is what the loop needs to resume exactly, saved with every checkpoint:
    every evaluation so far and the train loss summed since the last one.
    """
    step = start_step
    record = record or {"evaluations": [], "loss_sum": 0.0, "loss_steps": 0}
    summary = {"start_step": start_step, "preempted": False, "evaluations": record["evaluations"]}
    window = _Window(settings)
    window.reset(step)
    nonfinite_run = 0
    pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet fetched

    def fetch():
        nonlocal nonfinite_run
        for (at, _), metrics in zip(pending, jax.device_get([m for _, m in pending])):
            nonfinite_run = _check_finite(at, metrics, nonfinite_run, settings, writer)
            window.add(metrics)
            record["loss_sum"] += float(metrics["loss"])
            record["loss_steps"] += 1
        pending.clear()

    def run_evaluation():
        paused_at = time.perf_counter()
        fetch()
        metrics = evaluate(state)
        writer.write(step, metrics, "eval")
        writer.message(f"step {step}: eval " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        entry = {"step": step, **metrics}
        if record["loss_steps"]:
            entry["train_loss"] = record["loss_sum"] / record["loss_steps"]
        record.update(loss_sum=0.0, loss_steps=0)
        record["evaluations"].append(entry)
        summary["eval"] = metrics
        window.pause(time.perf_counter() - paused_at)
        return {"eval_loss": metrics["loss"]} if "loss" in metrics else None

    if evaluate is not None and settings.eval_at_start and start_step == 0:
        run_evaluation()
    while step < settings.total_steps:
        batch = to_global(next(train_batches))
        state, metrics = train_step(state, batch)
        step += 1
        pending.append((step, metrics))
        if step == start_step + 1:  # the first step compiles: keep it out of the throughput
            jax.block_until_ready(metrics)
            window.start_step, window.start_time = step, time.perf_counter()
        elif len(pending) >= MAX_STEPS_IN_FLIGHT:
            jax.block_until_ready(pending[-MAX_STEPS_IN_FLIGHT][1])

        if step % settings.log_every == 0 or step == settings.total_steps:
            fetch()
            logged = window.summary(step)
            writer.write(step, logged, "train")
            writer.progress(step, {label: logged.get(name, float("nan"))
                                   for label, name in settings.progress_metrics}
                            | {"seq/s": logged["sequences_per_second"]}
                            | ({"mfu": logged["mfu"]} if "mfu" in logged else {}))
            summary["train"] = logged
            window.reset(step)
        else:
            writer.progress(step)

        metrics_for_best = None
        if evaluate is not None and (step % settings.eval_every == 0 or step == settings.total_steps):
            metrics_for_best = run_evaluation()

        if preemption.reached(step):
            writer.message(f"preemption: saving a checkpoint at step {step} and stopping")
            fetch()
            save(step, state, record=record, metrics=metrics_for_best, final=True)
            summary["preempted"] = True
            break
        if step % settings.checkpoint_every == 0 or step == settings.total_steps:
            paused_at = time.perf_counter()
            fetch()
            save(step, state, record=record, metrics=metrics_for_best, final=step == settings.total_steps)
            window.pause(time.perf_counter() - paused_at)

    summary["step"] = step
    return state, summary


# Steps dispatched but not awaited at most. Multi-host CPU (gloo) deadlocks with ~32
# un-awaited collective programs in flight; accelerators lose nothing at this depth.
MAX_STEPS_IN_FLIGHT = 4


def evaluate_sums(state, eval_step, batches, to_global, max_steps: int, finish: Callable) -> dict:
    """Metrics over up to max_steps held-out batches: eval_step returns additive sums
    (device arrays, fetched together at the end); finish(list of sums) -> metrics."""
    sums = []
    for _, batch in zip(range(max_steps), batches):
        sums.append(eval_step(state, to_global(batch)))
        if len(sums) % MAX_STEPS_IN_FLIGHT == 0:
            jax.block_until_ready(sums[-1])
    if not sums:
        raise ValueError("evaluation: the held-out split gave no batch")
    return finish(jax.device_get(sums))


def _check_finite(step, metrics, nonfinite_run, settings, writer) -> int:
    skipped = float(np.asarray(metrics.get("update_skipped", 0.0)))
    if skipped or not math.isfinite(float(np.asarray(metrics.get("loss", 0.0)))):
        nonfinite_run += 1
        writer.message(f"step {step}: non-finite gradients, update skipped ({nonfinite_run} in a row)")
        if nonfinite_run >= settings.max_nonfinite_steps:
            raise NonFiniteError(
                f"{nonfinite_run} consecutive steps with non-finite gradients (last at step {step}); "
                "stopping (train.max_nonfinite_steps). Lower the learning rate, enable clipping "
                "(optimizer.clip_norm) or use float32 compute (model.dtype); the last checkpoint is intact.")
        return nonfinite_run
    return 0


class _Window:
    """Means of train metrics and throughput between two log lines."""

    def __init__(self, settings: LoopSettings):
        self.settings = settings

    def reset(self, step):
        self.start_step, self.start_time, self.paused = step, time.perf_counter(), 0.0
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, metrics):
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(np.asarray(v))
        self.count += 1

    def pause(self, seconds: float):
        # Time spent in evaluation or checkpointing is not training throughput.
        self.paused += seconds

    def summary(self, step) -> dict:
        seconds = max(time.perf_counter() - self.start_time - self.paused, 1e-9)
        steps = step - self.start_step
        out = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        out["steps_per_second"] = steps / seconds
        out["sequences_per_second"] = steps * self.settings.global_batch_size / seconds
        if self.settings.flops_per_step:
            out["mfu"] = self.settings.flops_per_step * steps / seconds / self.settings.peak_flops_total
        return out
