"""The fine-tuning sweep resumes: a sweep stopped in its second run (SIGTERM, or kill -9),
started again, does not train the finished run again, continues the stopped one and writes
the results.json of a sweep that was never stopped."""
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from bert_jax import checkpoint, finetune, metrics_writer, sweep
from bert_jax.tasks import glue as glue_task
from test_finetune import config, make_tiny_checkpoint, write_polarity_task

LEARNING_RATES = (1e-2, 3e-3)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_inputs")
    write_polarity_task(root / "data", n_train=48, n_dev=16, n_test=8)
    make_tiny_checkpoint(root / "ckpt")
    return root


def sweep_config(inputs: pathlib.Path):
    # 3 steps per epoch, 2 epochs per run, 2 runs; an evaluation at step 0 and after every epoch.
    return config(task="continuation", glue_dir=str(inputs / "data"), init_checkpoint=str(inputs / "ckpt" / "orbax"),
                  max_seq_length=16, batch_size=16, eval_batch_size=16, num_epochs=2.0,
                  learning_rates=LEARNING_RATES, seeds=(0,), log_every_steps=1, progress_bar=False,
                  eval_before_training=True)


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """A sweep that was never stopped."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    assert not finetune.run(sweep_config(inputs), workdir)["preempted"]
    return workdir


def _comparable(workdir):
    """results.json without timing, with paths relative to the workdir."""
    results = json.loads((workdir / sweep.RESULTS_FILE).read_text().replace(str(workdir), "WORKDIR"))
    for entry in results["tasks"].values():
        for run in entry["runs"]:
            del run["train_seconds"]
    return results


def _run_dir(workdir, learning_rate):
    return workdir / "continuation" / "runs" / f"lr={learning_rate:g},seed=0"


def _stop_in_second_run(monkeypatch, epoch_count: int, batch: int, signum: int):
    """Send `signum` to this process when the `epoch_count`-th epoch trained (run 2's first
    is the 3rd) fetches its `batch`-th batch."""
    epochs_started = []
    train_batches = glue_task.Glue.train_batches

    def batches_then_signal(self, seed, epoch):
        epochs_started.append(epoch)
        for i, b in enumerate(train_batches(self, seed, epoch)):
            if len(epochs_started) == epoch_count and i == batch:
                os.kill(os.getpid(), signum)
            yield b

    monkeypatch.setattr(glue_task.Glue, "train_batches", batches_then_signal)


def _resume_and_compare(workdir, reference, inputs, monkeypatch):
    """Run the sweep again on `workdir`: only the second run trains, results equal the reference."""
    first_metrics = (_run_dir(workdir, LEARNING_RATES[0]) / metrics_writer.JSONL_FILE).read_text()
    trained = []
    train = sweep.FineTuning.train

    def recording_train(self, learning_rate, seed, run_dir, preemption):
        trained.append(learning_rate)
        return train(self, learning_rate, seed, run_dir, preemption)

    monkeypatch.setattr(sweep.FineTuning, "train", recording_train)
    assert not finetune.run(sweep_config(inputs), workdir)["preempted"]
    assert trained == [LEARNING_RATES[1]]  # the finished run was read back, not trained again
    assert (_run_dir(workdir, LEARNING_RATES[0]) / metrics_writer.JSONL_FILE).read_text() == first_metrics
    assert not (_run_dir(workdir, LEARNING_RATES[1]) / "checkpoints").exists()  # finished: result, no state
    assert _comparable(workdir) == _comparable(reference)
    assert (workdir / "submission" / "continuation.tsv").read_text() == \
        (reference / "submission" / "continuation.tsv").read_text()


def test_sigterm_in_second_run_then_resume_equals_uninterrupted_sweep(inputs, reference, tmp_path, monkeypatch):
    _stop_in_second_run(monkeypatch, epoch_count=3, batch=1, signum=signal.SIGTERM)
    stopped = finetune.run(sweep_config(inputs), tmp_path)
    assert stopped["preempted"] and len(stopped["tasks"]["continuation"]["runs"]) == 1
    first, second = _run_dir(tmp_path, LEARNING_RATES[0]), _run_dir(tmp_path, LEARNING_RATES[1])
    assert (first / sweep.RUN_RESULT).is_file() and not (second / sweep.RUN_RESULT).exists()
    assert [r["step"] for r in metrics_writer.read_jsonl(second, "train")] == [1, 2]  # saved at step 2
    monkeypatch.undo()

    _resume_and_compare(tmp_path, reference, inputs, monkeypatch)
    # The second run continued from its checkpoint at step 2: every step trained once.
    assert [r["step"] for r in metrics_writer.read_jsonl(second, "train")] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in metrics_writer.read_jsonl(second, "eval")] == [0, 3, 6]
    longer = sweep_config(inputs)
    longer.num_epochs = 3.0  # another sweep: its runs are not those on disk
    with pytest.raises(checkpoint.CheckpointMismatchError, match="num_epochs: saved 2.0 vs this sweep 3.0"):
        finetune.run(longer, tmp_path)


KILLED_SWEEP = """
import pathlib, signal, sys
import numpy as np
import pytest
import test_sweep
from bert_jax import finetune
inputs, workdir = map(pathlib.Path, sys.argv[1:])
with pytest.MonkeyPatch.context() as monkeypatch:
    # kill -9 as the second run starts its second epoch (its checkpoint at step 3 may be mid-write)
    test_sweep._stop_in_second_run(monkeypatch, epoch_count=4, batch=0, signum=signal.SIGKILL)
    finetune.run(test_sweep.sweep_config(inputs), workdir)
"""


def test_kill_9_in_second_run_then_resume_equals_uninterrupted_sweep(inputs, reference, tmp_path, monkeypatch):
    tests = pathlib.Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests)]))
    killed = subprocess.run([sys.executable, "-c", KILLED_SWEEP, str(inputs), str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert (_run_dir(tmp_path, LEARNING_RATES[0]) / sweep.RUN_RESULT).is_file()
    assert not (_run_dir(tmp_path, LEARNING_RATES[1]) / sweep.RUN_RESULT).exists()
    _resume_and_compare(tmp_path, reference, inputs, monkeypatch)


def test_nan_batches_roll_back_and_a_damaged_checkpoint_falls_back(inputs, tmp_path, monkeypatch, capsys):
    """One run, a checkpoint every step: its 2nd and 3rd batches give NaN (an injected bad
    window), so it rolls back to step 2 and goes on; SIGTERM at step 4. Then the latest
    checkpoint's array files get flipped bits: the restart sets it aside unchanged, resumes from step 3
    and finishes (the pretraining loop and checkpoints, shared)."""
    from test_faults import _flip_a_bit, _hashes

    c = sweep_config(inputs)
    c.learning_rates, c.checkpoint_every_steps, c.max_nonfinite_steps, c.max_rollbacks = (1e-2,), 1, 2, 1
    c.eval_before_training = c.write_predictions = c.save_checkpoint = False
    make_step = sweep.train_step_lib.make_train_step

    def make_poisoned_step(*args, **kw):
        step, calls = make_step(*args, **kw), iter(range(1, 100))

        def poisoned(state, batch, key):
            state, metrics = step(state, batch, key)
            if next(calls) in (2, 3):
                metrics = {**metrics, "loss": np.float32("nan"), "update_skipped": np.int32(1)}
            return state, metrics
        return poisoned
    monkeypatch.setattr(sweep.train_step_lib, "make_train_step", make_poisoned_step)
    _stop_in_second_run(monkeypatch, epoch_count=2, batch=1, signum=signal.SIGTERM)  # the 5th batch: step 4
    assert finetune.run(c, tmp_path)["preempted"]
    assert "rollback 1/1 to the checkpoint at step 2; the batches since are skipped" in capsys.readouterr().out
    run_dir = _run_dir(tmp_path, 1e-2)
    assert [r["step"] for r in metrics_writer.read_jsonl(run_dir, "train")] == [1, 2, 3, 4]
    monkeypatch.undo()

    assert checkpoint.Checkpointer(run_dir, read_only=True).all_steps() == [3, 4]  # keep_checkpoints=2
    # A flipped bit in every data file of step 4's state. Not just the largest one: after the
    # per-process OCDBT files are merged, some files of ocdbt.process_0/d/ (the per-process B-tree)
    # are no longer read, and damage to one of those harms nothing (restore rightly succeeds).
    for path in (run_dir / checkpoint.CHECKPOINTS_DIR / "4" / checkpoint.STATE).rglob("d/*"):
        _flip_a_bit(path)
    before = _hashes(run_dir)
    results = finetune.run(c, tmp_path)
    out = capsys.readouterr().out
    assert not results["preempted"] and "checkpoint at step 4 is damaged (" in out and "resuming from an earlier" in out
    assert [r["step"] for r in metrics_writer.read_jsonl(run_dir, "train")] == [1, 2, 3, 4, 5, 6]
    after = _hashes(run_dir)  # the finished run's checkpoints/ is removed; the damaged one is kept as it was
    assert {k: v for k, v in before.items() if k.startswith("4/")} == after
    assert results["tasks"]["continuation"]["runs"][0]["final"]["step"] == 6


def test_run_keys_name_packed_rows_only_where_they_differ_from_max_seq_length(tmp_path):
    """A run saved before `packed_row_length` existed (rows of max_seq_length) resumes; one whose
    rows differ from this sweep's, either way round, is refused with the key named."""
    base = {"learning_rate": 1e-3, "seed": 0, "max_seq_length": 128}
    sweep._check_same_run(dict(base), dict(base), tmp_path)  # rows of 128 both: no key, no diff
    with pytest.raises(checkpoint.CheckpointMismatchError, match="packed_row_length: saved None vs this sweep 48"):
        sweep._check_same_run(dict(base), {**base, "packed_row_length": 48}, tmp_path)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="packed_row_length: saved 48 vs this sweep None"):
        sweep._check_same_run({**base, "packed_row_length": 48}, dict(base), tmp_path)


def test_run_key_holds_the_packed_rows_only_when_shorter_than_max_seq_length():
    """FineTuning.run_key on stand-ins for its members: rows of max_seq_length (or no packing) add
    no key, so runs saved before it existed compare equal; shorter rows are named."""
    import types
    from ml_collections import config_dict
    cfg = config_dict.ConfigDict({"max_seq_length": 128, "packing": True, "batch_size": 32})

    def key(rows, packing=True):
        cfg.packing = packing
        tuner = types.SimpleNamespace(c=cfg, task=types.SimpleNamespace(row_length=rows), total_steps=10,
                                      model_config=types.SimpleNamespace(to_dict=dict))
        return sweep.FineTuning.run_key(tuner, 1e-3, 0)
    assert "packed_row_length" not in key(128) and "packed_row_length" not in key(48, packing=False)
    assert key(48)["packed_row_length"] == 48
