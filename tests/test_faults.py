"""Faults: damaged checkpoints, failed saves, non-finite states, divergence, kill -9 mid-save.

Each test asserts that no checkpoint was lost or overwritten (hashes of every file before
and after). Small states (a few arrays) keep them fast; the loop runs stand-in steps.
"""
import hashlib
import logging
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from bert_jax import checkpoint, loop, metrics_writer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _state(step):
    rng = np.random.default_rng(step)
    return {"params": {"w": jnp.asarray(rng.normal(size=(128, 128)), jnp.float32),
                       "b": jnp.asarray(rng.normal(size=128), jnp.float32)},
            "step": jnp.int32(step)}


ABSTRACT = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state(0))


def _save_steps(workdir, steps, **kw):
    ckpt = checkpoint.Checkpointer(workdir, keep=10, **kw)
    for step in steps:
        ckpt.save(step, _state(step), data_state={"next": step}, config={}, meta={})
    ckpt.wait()
    return ckpt


def _hashes(root) -> dict:
    """{step/path: sha256} of every file of the committed steps in checkpoints/ and
    damaged_checkpoints/ (not the temporary directories of unfinished saves). Safe to call while a
    run is saving: a directory or file that a finishing save renames or that garbage collection
    deletes during the walk is left out, not an error."""
    root, hashes = pathlib.Path(root), {}
    for top in (checkpoint.CHECKPOINTS_DIR, checkpoint.DAMAGED_DIR):
        steps = [d for d in (root / top).iterdir() if d.name.isdigit()] if (root / top).is_dir() else []
        for step_dir in steps:
            try:
                files = [path for path in step_dir.rglob("*") if path.is_file()]
                hashes.update({str(path.relative_to(root / top)): hashlib.sha256(path.read_bytes()).hexdigest()
                               for path in files})
            except FileNotFoundError:
                continue
    return hashes


def _largest_array_file(step_dir):
    return max((p for p in (step_dir / checkpoint.STATE).rglob("d/*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, os.remove, _flip_a_bit], ids=["truncated", "deleted", "bit-flipped"])
def test_damaged_latest_array_falls_back_and_is_kept(tmp_path, damage):
    _save_steps(tmp_path, [1, 2]).close()
    damage(_largest_array_file(tmp_path / checkpoint.CHECKPOINTS_DIR / "2"))
    before = _hashes(tmp_path)
    messages = []
    ckpt = checkpoint.Checkpointer(tmp_path)
    step, state, data_state = ckpt.restore_newest_intact(ABSTRACT, message=messages.append)
    ckpt.close()
    assert step == 1 and data_state == {"next": 1}
    np.testing.assert_array_equal(state["params"]["w"], _state(1)["params"]["w"])
    assert len(messages) == 1 and "\n" not in messages[0]
    assert messages[0].startswith("checkpoint at step 2 is damaged (")
    assert "params" in messages[0]  # names the array
    assert (tmp_path / checkpoint.DAMAGED_DIR / "2").is_dir()
    assert _hashes(tmp_path) == before  # nothing lost or changed, only set aside


def test_cut_data_iterator_state_falls_back(tmp_path):
    _save_steps(tmp_path, [1, 2]).close()
    data_file = next((tmp_path / checkpoint.CHECKPOINTS_DIR / "2" / checkpoint.DATA).glob("metadata"))
    data_file.write_text(data_file.read_text()[:3])
    messages = []
    ckpt = checkpoint.Checkpointer(tmp_path)
    assert ckpt.restore_newest_intact(ABSTRACT, message=messages.append)[0] == 1
    ckpt.close()
    assert "step 2 is damaged" in messages[0]


def test_refuse_names_step_and_file_and_moves_nothing(tmp_path):
    _save_steps(tmp_path, [1, 2]).close()
    _truncate(_largest_array_file(tmp_path / checkpoint.CHECKPOINTS_DIR / "2"))
    before = _hashes(tmp_path)
    ckpt = checkpoint.Checkpointer(tmp_path)
    with pytest.raises(checkpoint.DamagedCheckpointError, match=r"step 2 is damaged .*resume_damaged=fallback"):
        ckpt.restore_newest_intact(ABSTRACT, damaged="refuse")
    ckpt.close()
    assert not (tmp_path / checkpoint.DAMAGED_DIR).exists() and _hashes(tmp_path) == before


def test_non_finite_state_is_never_saved(tmp_path):
    ckpt = _save_steps(tmp_path, [1])
    before = _hashes(tmp_path)
    bad = _state(2)
    bad["params"]["b"] = bad["params"]["b"].at[3].set(jnp.nan)
    with pytest.raises(checkpoint.NonFiniteStateError, match="step 2: .*NaN/inf.*last checkpoint is step 1"):
        ckpt.save(2, bad, data_state={}, config={}, meta={})
    ckpt.wait()
    assert ckpt.all_steps() == [1] and _hashes(tmp_path) == before
    ckpt.close()


def test_failed_async_save_is_one_line_naming_the_workdir(tmp_path, monkeypatch, caplog):
    ckpt = _save_steps(tmp_path, [1])
    before = _hashes(tmp_path)

    async def disk_full(self, x, directory):
        raise OSError(28, "No space left on device", str(directory))
    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full)
    ckpt.save(2, _state(2), data_state={}, config={}, meta={})
    with pytest.raises(checkpoint.CheckpointSaveError) as caught:
        ckpt.wait()
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path) in message and "No space left on device" in message
    assert message.endswith("the last complete checkpoint is step 1")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no Orbax thread tracebacks
    monkeypatch.undo()
    ckpt.close()
    # The state's TensorStore writes of the failed save may still be finishing (nothing
    # awaits them once a sibling write failed): the restart comes when they are done.
    for _ in range(100):
        try:
            ckpt = checkpoint.Checkpointer(tmp_path)
            break
        except OSError:
            time.sleep(0.1)
    assert ckpt.restore_newest_intact(ABSTRACT)[0] == 1
    ckpt.close()
    assert _hashes(tmp_path) == before
    # The tmp dir is cleaned by the next start. In this one process the failed save's writes can
    # outlive close() and land after a start's cleanup (a restarted job has no such writes): start
    # again until they are done.
    for _ in range(100):
        names = sorted(p.name for p in (tmp_path / checkpoint.CHECKPOINTS_DIR).iterdir())
        if names == ["1"]:
            break
        time.sleep(0.1)
        checkpoint.Checkpointer(tmp_path).close()
    assert names == ["1"]
    assert _hashes(tmp_path) == before


def test_failed_save_stops_the_loop_at_the_next_step():
    failed = {"at": None}

    def check_saves():
        if failed["at"] is not None:
            raise checkpoint.CheckpointSaveError("saving a checkpoint in W failed: disk full")

    def save(step, state, **kw):
        failed["at"] = step
    with pytest.raises(checkpoint.CheckpointSaveError, match="disk full"):
        _loop(lambda step: {"loss": np.float32(1.0)}, save=save, check_saves=check_saves, checkpoint_every=3)
    assert failed["at"] == 3


def _loop(train_metrics, *, save=None, total_steps=30, checkpoint_every=5, **kw):
    """train_loop over stand-in steps (state = the step's number); metrics of step i: train_metrics(i)."""
    settings = loop.LoopSettings(total_steps=total_steps, log_every=5, eval_every=100,
                                 checkpoint_every=checkpoint_every, max_nonfinite_steps=kw.pop("k", 3),
                                 global_batch_size=1, max_rollbacks=kw.pop("max_rollbacks", 0),
                                 loss_spike_factor=kw.pop("loss_spike_factor", 0.0))
    preemption = loop.PreemptionWatcher()
    try:
        return loop.train_loop(
            state=0, start_step=0, settings=settings,
            train_step=lambda state, batch: (state + 1, train_metrics(batch)),
            evaluate=None, train_batches=iter(range(1, 1000)), to_global=lambda b: b,
            save=save or (lambda *a, **k: None),
            writer=metrics_writer.MetricsWriter(None, enabled=False), preemption=preemption, **kw)
    finally:
        preemption.close()


def test_nan_batches_roll_back_skip_the_window_and_count():
    """Batches 12..14 give NaN: after 3 of them the loop restores the checkpoint at 10 and
    goes on with batch 15 (the window 11..14 is skipped)."""
    saved, seen = {}, []

    def metrics(batch):
        seen.append(batch)
        bad = 12 <= batch <= 14
        return {"loss": np.float32("nan" if bad else 1.0), "update_skipped": np.int32(bad)}
    state, summary = _loop(metrics, save=lambda step, state, **kw: saved.update({step: state}),
                           rollback=lambda: (saved[max(saved)], max(saved)), max_rollbacks=2)
    assert summary["rollbacks"] == 1 and summary["step"] == 30 and state == 30
    assert seen[10:15] == [11, 12, 13, 14, 15] and seen.count(11) == 1  # not replayed
    assert sorted(saved) == [5, 10, 15, 20, 25, 30]


def test_divergence_stops_after_max_rollbacks_with_the_last_checkpoint():
    saved = {}
    nan_from_12 = lambda batch: {"loss": np.float32("nan" if batch >= 12 else 1.0),  # noqa: E731
                                 "update_skipped": np.int32(batch >= 12)}
    with pytest.raises(loop.NonFiniteError, match=r"stopping after 2 rollback\(s\).*last checkpoint is step 10"):
        _loop(nan_from_12, save=lambda step, state, **kw: saved.update({step: state}),
              rollback=lambda: (saved[max(saved)], max(saved)), max_rollbacks=2)


def test_loss_spike_rolls_back():
    saved = {}
    spike_at_25 = lambda batch: {"loss": np.float32(100.0 if batch == 25 else 2.0)}  # noqa: E731
    _, summary = _loop(spike_at_25, save=lambda step, state, **kw: saved.update({step: state}),
                       rollback=lambda: (saved[max(saved)], max(saved)), max_rollbacks=1,
                       loss_spike_factor=5.0, total_steps=40)
    assert summary["rollbacks"] == 1 and summary["step"] == 40


def test_unsaveable_state_rolls_back():
    """A save that meets NaN params (NonFiniteStateError) is a divergence too."""
    saved = {}

    def save(step, state, **kw):
        if step == 15 and not saved.get("refused"):
            saved["refused"] = True
            raise checkpoint.NonFiniteStateError("step 15: NaN")
        saved[step] = state
    _, summary = _loop(lambda b: {"loss": np.float32(1.0)}, save=save,
                       rollback=lambda: (saved[10], 10), max_rollbacks=1)
    assert summary["rollbacks"] == 1 and 15 in saved


def test_metrics_after_the_resumed_step_are_dropped(tmp_path):
    writer = metrics_writer.MetricsWriter(tmp_path, progress_bar=False)
    writer.write(0, {"loss": 3.0}, "eval")
    for step in range(1, 8):
        writer.write(step, {"loss": 1.0})
    writer.close()
    with open(tmp_path / metrics_writer.JSONL_FILE, "a") as f:
        f.write('{"step": 8, "spl')  # cut by kill -9
    writer = metrics_writer.MetricsWriter(tmp_path, progress_bar=False, initial_step=5)
    writer.write(6, {"loss": 2.0})
    writer.close()
    assert [(r["step"], r["loss"]) for r in metrics_writer.read_jsonl(tmp_path)] == \
        [(0, 3.0), (1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 1.0), (6, 2.0)]


SAVER = textwrap.dedent("""
    import sys, time, jax.numpy as jnp, numpy as np
    from bert_jax import checkpoint
    ckpt = checkpoint.Checkpointer(sys.argv[1], keep=10)
    state = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(2048, 1024)), jnp.float32)}
    ckpt.save(1, state, data_state={}, config={}, meta={})
    ckpt.wait()
    for step in range(2, 1000):
        print("saving", step, flush=True)
        ckpt.save(step, state, data_state={}, config={}, meta={})
        ckpt.wait()
""")


def test_kill_9_during_a_save_then_restart(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path)], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        while process.stdout.readline().split()[-1:] != ["3"]:
            pass
        time.sleep(0.05)  # inside the save of step 3
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    before = _hashes(tmp_path)
    ckpt = checkpoint.Checkpointer(tmp_path, keep=10)
    steps = ckpt.all_steps()
    assert steps and steps[0] == 1 and set(steps) <= {1, 2, 3}
    abstract = {"w": jax.ShapeDtypeStruct((2048, 1024), jnp.float32,
                                          sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
    step, state, _ = ckpt.restore_newest_intact(abstract)
    ckpt.close()
    assert step == max(steps)
    leftovers = [p.name for p in (tmp_path / checkpoint.CHECKPOINTS_DIR).iterdir() if not p.name.isdigit()]
    assert leftovers == []  # the interrupted save's tmp dir is cleaned
    assert _hashes(tmp_path) == before


def _small_filesystem(path, monkeypatch):
    """A 2 MiB tmpfs at `path` where this host allows mounting one (root); elsewhere a disk
    that fills at the third save of the state (an injected ENOSPC). -> unmount function."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)], capture_output=True).returncode == 0:
        return lambda: subprocess.run(["umount", "-l", str(path)], check=True)
    from orbax.checkpoint._src.handlers import standard_checkpoint_handler
    save = standard_checkpoint_handler.StandardCheckpointHandler.async_save
    saves = []

    async def filling(self, directory, *args, **kwargs):
        saves.append(directory)
        if len(saves) >= 3:
            raise OSError(28, "No space left on device", str(directory))
        return await save(self, directory, *args, **kwargs)
    monkeypatch.setattr(standard_checkpoint_handler.StandardCheckpointHandler, "async_save", filling)
    return lambda: None


def _incompressible(step):
    return jnp.asarray(np.random.default_rng(step).normal(size=(128, 1024)), jnp.float32)


def test_disk_full_in_a_run_stops_it_naming_the_workdir_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    """A real small filesystem filled by the checkpoints of a short run (states of 0.5 MiB):
    the run stops with one line naming the workdir and the OS error; every checkpoint
    completed before is intact (hashes) and restores."""
    workdir = tmp_path / "small"
    unmount = _small_filesystem(workdir, monkeypatch)
    try:
        ckpt = checkpoint.Checkpointer(workdir, keep=100)
        committed = {}

        def save(step, state, **kw):
            ckpt.wait()  # the previous save is complete: its files are final
            committed.update(_hashes(workdir))
            ckpt.save(step, {"w": _incompressible(step)}, data_state={"next": step}, config={}, meta={})
        with pytest.raises(checkpoint.CheckpointSaveError) as caught:
            _loop(lambda batch: {"loss": np.float32(1.0)}, save=save, check_saves=ckpt.check, total_steps=100)
        message = str(caught.value)
        assert "\n" not in message and str(workdir) in message and "No space left on device" in message
        monkeypatch.undo()
        steps = sorted({int(name.split("/")[0]) for name in committed})
        assert len(steps) >= 2 and {k: v for k, v in _hashes(workdir).items() if k in committed} == committed
        assert message.endswith(f"the last complete checkpoint is step {steps[-1]}")
        abstract = {"w": jax.ShapeDtypeStruct((128, 1024), jnp.float32, sharding=ABSTRACT["step"].sharding)}
        step, state, _ = ckpt.restore_newest_intact(abstract)
        assert step == steps[-1]
        np.testing.assert_array_equal(state["w"], _incompressible(step))
        ckpt.close()
    finally:
        unmount()
