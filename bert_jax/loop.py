"""The one training loop, for pretraining and every fine-tuning task: steps, logging
(metrics.jsonl, TensorBoard, progress bar), periodic evaluation, checkpoints, preemption.

`train_loop` knows nothing of files, models or tasks: its callers (`bert_jax.pretrain`,
`bert_jax.sweep`) give it the jitted step, the host batches, an `evaluate` function, a
`save` function (a `Checkpointer` behind it) and a `MetricsWriter`.

Exact resume: the loop's state is the train state, the data iterator state and its
`record` (evaluations so far, train loss since the last one), and all three go into
every checkpoint; dropout keys come from (seed, step) inside the step.

Divergence: `max_nonfinite_steps` consecutive skipped (non-finite) steps, a loss over
`loss_spike_factor` times the recent mean, or a state too broken to save (the saver raises
NonFiniteStateError) roll the state back to the last checkpoint (the `rollback` function)
and training goes on with the batches after the bad ones (the window that led there is
skipped); after `max_rollbacks` of them the loop stops with NonFiniteError. Checks ride
on the step metrics the loop fetches anyway, and on the saves.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import signal
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from bert_jax import distributed
from bert_jax.checkpoint import NonFiniteStateError


class NonFiniteError(RuntimeError):
    """Training diverged (non-finite steps, a loss spike) and no rollback was left."""


class _Diverged(Exception):
    """Internal: the steps fetched so far ask for a rollback."""


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
    max_rollbacks: int = 0           # restores of the last checkpoint on divergence before stopping
    loss_spike_factor: float = 0.0   # a loss over factor x the recent mean is divergence; 0: off


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
    check_saves: Callable[[], None] = lambda: None,  # raises if an async save failed (every step)
    rollback: Callable[[], tuple[Any, int] | None] | None = None,  # -> (state, step) of the last checkpoint
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
    summary = {"start_step": start_step, "preempted": False, "evaluations": record["evaluations"],
               "last_checkpoint": start_step or None, "rollbacks": 0}
    window = _Window(settings)
    window.reset(step)
    divergence = _Divergence(settings, writer)
    pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet fetched

    def fetch():
        fetched = jax.device_get([m for _, m in pending])
        steps = [at for at, _ in pending]
        pending.clear()
        for at, metrics in zip(steps, fetched):
            divergence.observe(at, metrics)
            window.add(metrics)
            record["loss_sum"] += float(metrics["loss"])
            record["loss_steps"] += 1

    def save_checkpoint(final=False, metrics=None):
        save(step, state, record=record, metrics=metrics, final=final)
        summary["last_checkpoint"] = step

    def recover(reason: str):
        """-> (state, step) of the last checkpoint, or NonFiniteError when none is left."""
        pending.clear()
        restored = rollback() if rollback is not None and summary["rollbacks"] < settings.max_rollbacks else None
        if restored is None:
            last = summary["last_checkpoint"]
            raise NonFiniteError(
                f"{reason}; stopping after {summary['rollbacks']} rollback(s) (train.max_rollbacks). Lower the "
                "learning rate, enable clipping (optimizer.clip_norm) or use float32 compute (model.dtype); "
                + (f"the last checkpoint is step {last}" if last is not None else "no checkpoint was written"))
        summary["rollbacks"] += 1
        restored_state, restored_step = restored
        writer.message(f"{reason}: rollback {summary['rollbacks']}/{settings.max_rollbacks} to the checkpoint "
                       f"at step {restored_step}; the batches since are skipped")
        writer.drop_after(restored_step)
        record["evaluations"][:] = [e for e in record["evaluations"] if e["step"] <= restored_step]
        record.update(loss_sum=0.0, loss_steps=0)
        window.reset(restored_step)
        divergence.reset()
        return restored_state, restored_step

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

    def _one_step() -> bool:
        """One step and what follows it (log, evaluation, checkpoint). -> stop (preempted)."""
        nonlocal state, step
        batch = to_global(next(train_batches))
        state, metrics = train_step(state, batch)
        step += 1
        check_saves()
        pending.append((step, metrics))
        if step == start_step + 1:  # the first step compiles: keep it out of the throughput
            jax.block_until_ready(metrics)
            window.start_step, window.start_time = step, time.perf_counter()
        elif len(pending) >= MAX_STEPS_IN_FLIGHT:
            jax.block_until_ready(pending[-MAX_STEPS_IN_FLIGHT][1])

        if step % settings.log_every == 0 or step == settings.total_steps:
            fetch()
            logged = window.summary(step) | {"rollbacks": summary["rollbacks"]}
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
            save_checkpoint(final=True, metrics=metrics_for_best)
            summary["preempted"] = True
            return True
        if step % settings.checkpoint_every == 0 or step == settings.total_steps:
            paused_at = time.perf_counter()
            fetch()
            save_checkpoint(final=step == settings.total_steps, metrics=metrics_for_best)
            window.pause(time.perf_counter() - paused_at)
        return False

    while step < settings.total_steps:
        try:
            stop = _one_step()
        except (_Diverged, NonFiniteStateError) as error:
            state, step = recover(str(error))
            continue
        except Exception as error:  # a collective fails at once when another process dies
            distributed.exit_if_peer_lost(error, summary["last_checkpoint"])
            raise
        if stop:
            break

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


class _Divergence:
    """Watches the fetched step metrics; raises _Diverged when a rollback is due."""

    def __init__(self, settings: LoopSettings, writer):
        self.settings, self.writer = settings, writer
        self.reset()

    def reset(self):
        self.nonfinite_run = 0
        self.losses = collections.deque(maxlen=SPIKE_WINDOW)

    def observe(self, step: int, metrics: dict) -> None:
        loss = float(np.asarray(metrics.get("loss", 0.0)))
        if float(np.asarray(metrics.get("update_skipped", 0.0))) or not math.isfinite(loss):
            self.nonfinite_run += 1
            self.writer.message(f"step {step}: non-finite gradients, update skipped ({self.nonfinite_run} in a row)")
            if self.nonfinite_run >= self.settings.max_nonfinite_steps:
                raise _Diverged(f"{self.nonfinite_run} consecutive steps with non-finite gradients (last at step "
                                f"{step}; train.max_nonfinite_steps)")
            return
        self.nonfinite_run = 0
        factor = self.settings.loss_spike_factor
        if factor and len(self.losses) == SPIKE_WINDOW and loss > factor * (mean := sum(self.losses) / SPIKE_WINDOW):
            raise _Diverged(f"step {step}: loss {loss:.4g} is over {factor:g} x the mean {mean:.4g} of the "
                            f"{SPIKE_WINDOW} steps before (train.loss_spike_factor)")
        self.losses.append(loss)


# Steps whose mean loss a spike is measured against (and needed before one is looked for).
SPIKE_WINDOW = 20


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
        if "packing_efficiency" in out:  # pretraining: `tokens` are the real (non-padding) tokens
            out["tokens_per_second"] = out["tokens"] * steps / seconds
        if self.settings.flops_per_step:
            out["mfu"] = self.settings.flops_per_step * steps / seconds / self.settings.peak_flops_total
        return out
