"""The pretraining loop: steps, logging, evaluation, checkpoints, preemption.

`train_loop` knows nothing of files or models: it gets the jitted step functions, the
host iterators, a `Checkpointer` and a `MetricsWriter` from `bert_jax.pretrain`.

Exact resume: the loop's only state is the train state and the data iterator state,
and both go into every checkpoint; dropout keys come from (seed, step) inside the step.
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
        self._previous = None
        if not self.multihost:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self._signalled = True

    def reached(self, step: int) -> bool:
        """Call at every step (multi-host requires every host to call it at every step)."""
        if self.multihost:
            return multihost_utils.reached_preemption_sync_point(step)
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
    eval_steps: int
    checkpoint_every: int
    max_nonfinite_steps: int
    global_batch_size: int
    flops_per_step: float
    peak_flops_total: float  # all devices together


def train_loop(
    *,
    state,
    start_step: int,
    settings: LoopSettings,
    train_step: Callable,            # (state, global_batch) -> (state, metrics)
    eval_step: Callable | None,      # (state, global_batch) -> additive sums
    eval_finish: Callable | None,    # list of sums -> metrics dict (with 'loss')
    train_batches: Iterator[dict],   # host numpy batches; get_state() for checkpoints
    eval_batches: Callable[[], Iterator[dict]] | None,  # a fresh held-out iterator
    to_global: Callable[[dict], dict],
    save: Callable[..., Any],        # save(step, state, metrics=None, final=False)
    writer,
    preemption: PreemptionWatcher,
) -> tuple[Any, dict]:
    """Runs steps start_step+1 .. total_steps. -> (state, summary dict)."""
    step = start_step
    summary = {"start_step": start_step, "preempted": False}
    window = _Window()
    pending = None  # the previous step's device metrics: read one step late, so the
    #                 host never waits for the step it just launched, and never has more
    #                 than two steps in flight (see MAX_STEPS_IN_FLIGHT)
    nonfinite_run = 0
    last_eval = None
    window.reset(step)
    while step < settings.total_steps:
        batch = to_global(next(train_batches))
        state, metrics = train_step(state, batch)
        step += 1
        if step == start_step + 1:  # the first step compiles: keep it out of the throughput
            jax.block_until_ready(metrics)
            window.start_step, window.start_time = step, time.perf_counter()

        if pending is not None:
            nonfinite_run = _check_finite(pending, nonfinite_run, settings, writer)
            window.add(pending)
        pending = (step, metrics)

        if step % settings.log_every == 0 or step == settings.total_steps:
            nonfinite_run = _check_finite(pending, nonfinite_run, settings, writer)
            window.add(pending)
            pending = None
            logged = window.summary(step, settings)
            writer.write(step, logged, "train")
            writer.progress(step, {"loss": logged["loss"], "mlm_acc": logged.get("mlm_accuracy", float("nan")),
                                   "seq/s": logged["sequences_per_second"], "mfu": logged["mfu"]})
            summary["train"] = logged
            window.reset(step)
        else:
            writer.progress(step)

        metrics_for_best = None
        if eval_step is not None and (step % settings.eval_every == 0 or step == settings.total_steps):
            paused_at = time.perf_counter()
            last_eval = evaluate(state, eval_step, eval_batches(), to_global, settings.eval_steps, eval_finish)
            writer.write(step, last_eval, "eval")
            writer.message(f"step {step}: eval " + ", ".join(f"{k} {v:.4g}" for k, v in last_eval.items()))
            summary["eval"] = last_eval
            metrics_for_best = {"eval_loss": last_eval["loss"]}
            window.pause(time.perf_counter() - paused_at)

        if preemption.reached(step):
            writer.message(f"preemption: saving a checkpoint at step {step} and stopping")
            save(step, state, metrics=metrics_for_best, final=True)
            summary["preempted"] = True
            break
        if step % settings.checkpoint_every == 0 or step == settings.total_steps:
            paused_at = time.perf_counter()
            save(step, state, metrics=metrics_for_best, final=step == settings.total_steps)
            window.pause(time.perf_counter() - paused_at)

    summary["step"] = step
    return state, summary


# Steps dispatched but not awaited at most. Multi-host CPU (gloo) deadlocks with ~32
# un-awaited collective programs in flight; accelerators lose nothing at this depth.
MAX_STEPS_IN_FLIGHT = 4


def evaluate(state, eval_step, batches, to_global, max_steps: int, finish: Callable) -> dict:
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


def _check_finite(pending, nonfinite_run, settings, writer) -> int:
    step, metrics = pending
    skipped = _as_float(metrics.get("update_skipped", 0.0))
    if skipped or not math.isfinite(_as_float(metrics.get("loss", 0.0))):
        nonfinite_run += 1
        writer.message(f"step {step}: non-finite gradients, update skipped ({nonfinite_run} in a row)")
        if nonfinite_run >= settings.max_nonfinite_steps:
            raise NonFiniteError(
                f"{nonfinite_run} consecutive steps with non-finite gradients (last at step {step}); "
                "stopping (train.max_nonfinite_steps). Lower the learning rate, enable clipping "
                "(optimizer.clip_norm) or use float32 compute (model.dtype); the last checkpoint is intact.")
        return nonfinite_run
    return 0


def _as_float(x) -> float:
    return float(np.asarray(jax.device_get(x)))


class _Window:
    """Means of train metrics and throughput between two log lines."""

    def reset(self, step):
        self.start_step, self.start_time, self.paused = step, time.perf_counter(), 0.0
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, pending):
        _, metrics = pending
        for k, v in jax.device_get(metrics).items():
            self.sums[k] = self.sums.get(k, 0.0) + float(np.asarray(v))
        self.count += 1

    def pause(self, seconds: float):
        # Time spent in evaluation or checkpointing is not training throughput.
        self.paused += seconds

    def summary(self, step, settings: LoopSettings) -> dict:
        seconds = max(time.perf_counter() - self.start_time - self.paused, 1e-9)
        steps = step - self.start_step
        out = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        out["steps_per_second"] = steps / seconds
        out["sequences_per_second"] = steps * settings.global_batch_size / seconds
        out["mfu"] = settings.flops_per_step * steps / seconds / settings.peak_flops_total
        return out
