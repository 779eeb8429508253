"""benchmarks/bench_finetune.py's turn-taking: every side, every turn, is asked for the untimed
settling steps, so the side that runs right after another process is not the only one to pay for
the switch (a fake side); and both real workers (bert_jax's `Ours`, PyTorch's `Torch`, on the real
MiniLM weights) run those steps before their clock starts."""
import importlib.util
import pathlib
import types

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_finetune", ROOT / "benchmarks" / "bench_finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeSide:
    """A side whose first step of a turn costs `switch` seconds more, as measured after PyTorch's turn."""

    def __init__(self, name, log, step=1.0, switch=0.0):
        self.name, self.log, self.step, self.switch = name, log, step, switch

    def warm_up(self, batches):
        self.log.append((self.name, "warm_up", len(batches)))

    def seconds(self, batches, settle=0):
        self.log.append((self.name, "turn", len(batches), settle))
        timed = self.step * len(batches)
        return timed + (self.switch if settle == 0 else 0.0)


def _batches(n):
    return [{"is_real_example": np.ones(4)} for _ in range(n)]


def test_each_turn_settles_and_rates_count_timed_steps_only():
    bench = _bench()
    log = []
    sides = [FakeSide("a", log, switch=0.5), FakeSide("b", log, switch=0.5)]
    rates = bench.timed_in_slices(sides, [_batches(12), _batches(6)], 6, settle=1)
    turns = [entry for entry in log if entry[1] == "turn"]
    assert turns == [("a", "turn", 6, 1), ("b", "turn", 6, 1), ("a", "turn", 6, 1)]
    assert rates == [4.0, 4.0]  # 4 examples a batch, 1 s a timed batch: the switch is not counted
    unsettled = bench.timed_in_slices(sides, [_batches(12), _batches(6)], 6, settle=0)
    assert unsettled[0] < 4.0 and unsettled[1] < 4.0


def test_workers_run_the_settling_steps_before_the_clock(minilm):
    """Each real step advances a fake clock by 1 s, and the first step of a turn by 100 s more:
    with settle=1 that step runs before the clock starts (2 batches: 2 s), with settle=0 it is
    timed (102 s); either way every batch of the turn is timed once. (A fake clock: real step
    times vary too much under CI's load for a margin to hold.)"""
    from bert_jax.tasks import glue_data
    bench = _bench()
    pretrained = bench._load_pretrained(str(minilm.MODEL_DIR), "minilm")
    lengths = np.full(64, 12)
    features = bench.synthetic_features("CoLA", lengths, pretrained.tokenizer)
    plan = bench.Plan("default", {})
    pad_id = pretrained.tokenizer.pad_id
    packed = list(glue_data.train_batches(features, 32, plan.layout(pad_id, lengths), seed=0, epoch=0))
    padded = list(glue_data.train_batches(features, 32, glue_data.Layout((128,), pad_id), seed=0, epoch=0))
    assert len(packed) == len(padded) == 2  # PyTorch takes one example a row, as in the bench
    for side, batches in ((bench.Ours(plan, pretrained), packed), (bench.Torch(str(minilm.MODEL_DIR)), padded)):
        side.warm_up(batches)
        clock, calls, step = [0.0], [], side._step

        def slow_first(*args, step=step, calls=calls, clock=clock):
            calls.append(1)
            out = step(*args)
            clock[0] += 101.0 if len(calls) == 1 else 1.0
            return out
        side._step = slow_first
        bench.time = types.SimpleNamespace(perf_counter=lambda clock=clock: clock[0])
        settled = side.seconds(batches, settle=1)
        assert len(calls) == len(batches) + 1, type(side).__name__
        calls.clear()
        unsettled = side.seconds(batches, settle=0)
        assert len(calls) == len(batches), type(side).__name__
        assert (settled, unsettled) == (2.0, 102.0), (type(side).__name__, settled, unsettled)


def test_memory_check_refuses_workers_that_would_not_fit():
    bench = _bench()
    plans = [types.SimpleNamespace(malloc_reuse=r) for r in ("on", "off", "off")]
    need = bench.WORKER_PEAK_GB[("base", "on")] + 2 * bench.WORKER_PEAK_GB[("base", "off")]
    bench.check_memory("base", plans, need + 0.1)  # fits: no error
    bench.check_memory("base", plans, None)  # unknown: no error
    try:
        bench.check_memory("base", plans, need - 0.1)
    except SystemExit as e:
        message = str(e)
    else:
        raise AssertionError("expected SystemExit")
    assert "3 base workers need about" in message and "--no-default --variant" in message
    assert "\n" not in message


def test_a_worker_that_dies_is_reported_in_one_line():
    import multiprocessing
    import os
    bench = _bench()
    ctx = multiprocessing.get_context("spawn")
    remote = bench.Remote.__new__(bench.Remote)
    remote.conn, child = ctx.Pipe()
    remote.proc = ctx.Process(target=os._exit, args=(3,), daemon=True)
    remote.proc.start()
    child.close()  # the worker never answers: its end is gone
    try:
        remote.seconds([], 0)
    except SystemExit as e:
        message = str(e)
    else:
        raise AssertionError("expected SystemExit")
    assert message.startswith("bench_finetune: a worker process died during seconds: exit code 3.")
    assert "\n" not in message
