"""benchmarks/bench_finetune.py's turn-taking: every side, every turn, is asked for the untimed
settling steps, so the side that runs right after another process is not the only one to pay for
the switch. (The fake side stands in for the workers: that their `seconds` runs the settling steps
untimed is read in Ours.seconds / Torch.seconds, not tested here.)"""
import importlib.util
import pathlib

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
