"""Two processes on localhost (jax.distributed, gloo, 2 CPU devices each).

* Two processes == one process with 4 devices: each worker feeds only its half of
  every global batch through ``sharding.make_global_batch``; the FSDP x data mesh
  spans both processes, so parameters, gradients and optimizer state cross the
  process boundary. Run as a script, this file is that worker.
* The same from the pretraining loader on meshes whose batch axes do not separate
  the processes (a ``tensor`` axis across both, a batch replicated over both): each
  process loads the rows of the batch shards its devices hold.
* The training loop never leaves more than a few steps un-awaited (gloo deadlocks).
* ``python -m bert_jax.pretrain`` as two processes, preempted with SIGTERM (to both,
  or to one), saves one checkpoint at the agreed step and resumes exactly.
* ``python -m bert_jax.finetune`` (a sweep) as two processes with one device each gives
  the results.json, submission and fine-tuned params of one process with two devices,
  and only process 0 writes them.
"""
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

MESH = {"data": 2, "fsdp": 2}
STEPS = 4
BATCH = 16


def train():
    import jax
    from bert_jax import optim, sharding, train_step as T
    from test_sharding import FAST_COMPILE, make_batch, tiny_config

    cfg = tiny_config(num_hidden_layers=1)  # dropout on: keys must agree across processes
    opt, schedule = optim.make_optimizer({"learning_rate": 1e-2, "warmup_steps": 0, "total_steps": 10})
    mesh = sharding.make_mesh(MESH, devices=jax.devices()[:4])
    graphdef, state, shardings = T.create_train_state(cfg, opt, mesh, seed=0, compiler_options=FAST_COMPILE)
    step = T.make_train_step(graphdef, opt, mesh, None, shardings, schedule=schedule, compiler_options=FAST_COMPILE)
    rows = sharding.process_batch_rows(sharding.batch_sharding(mesh), (BATCH,))  # this process's half
    losses = []
    for i in range(STEPS):
        batch = make_batch(np.random.default_rng(i), batch_size=BATCH)
        local = {k: v[rows] for k, v in batch.items()}
        state, metrics = step(state, sharding.make_global_batch(local, mesh), jax.random.key(3))
        losses.append(float(metrics["loss"]))  # blocks every step: un-awaited collectives can deadlock gloo
    return losses, state.params


# Meshes whose batch axes do not separate the two processes (2 devices each).
LOADER_MESHES = {
    "tensor_across_processes": {"data": 2, "tensor": 2},  # data within each process, tensor across both
    "batch_replicated": {"tensor": 4},                   # every device holds the whole batch
}
LOADER_BATCH, LOADER_SEQ, LOADER_PREDICTIONS = 8, 32, 5


def _loader_mesh(name):
    """On two processes the devices are ordered so that `tensor` runs across the processes."""
    import jax
    from bert_jax import sharding

    devices = jax.devices()[:4]
    if jax.process_count() == 2:
        local = [[d for d in devices if d.process_index == p] for p in range(2)]
        devices = [local[p][i] for i in range(2) for p in range(2)]  # [p0, p1, p0, p1]: tensor is the last axis
    return sharding.make_mesh(LOADER_MESHES[name], devices=devices)


def train_from_loader(mesh_name: str, data_dir: str):
    """Pretraining steps on batches of the loader: this process reads the rows its devices hold."""
    import jax
    from bert_jax import optim, sharding, train_step as T
    from bert_jax.data import loader
    from bert_jax.data.sources import DataSource
    from test_sharding import FAST_COMPILE, tiny_config

    vocab_size = loader.read_metadata(data_dir)["vocab_size"]
    source = DataSource.prepared(data_dir)
    cfg = tiny_config(num_hidden_layers=1, vocab_size=vocab_size, max_position_embeddings=LOADER_SEQ)
    opt, schedule = optim.make_optimizer({"learning_rate": 1e-2, "warmup_steps": 0, "total_steps": 10})
    mesh = _loader_mesh(mesh_name)
    graphdef, state, shardings = T.create_train_state(cfg, opt, mesh, seed=0, compiler_options=FAST_COMPILE)
    step = T.make_train_step(graphdef, opt, mesh, None, shardings, schedule=schedule, compiler_options=FAST_COMPILE)
    batches = loader.make_pretraining_loader(
        source, global_batch_size=LOADER_BATCH, max_seq_length=LOADER_SEQ, max_predictions_per_seq=LOADER_PREDICTIONS,
        seed=0, host_rows=sharding.process_batch_rows(sharding.batch_sharding(mesh), (LOADER_BATCH,)))
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, sharding.make_global_batch(next(batches), mesh), jax.random.key(3))
        losses.append(float(metrics["loss"]))  # blocks every step
    return losses, state.params


def _worker(port: int, process_index: int, out: str, data_dir: str | None):
    import jax
    from jax.experimental import multihost_utils

    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_index)
    assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2
    runs = {"synthetic": train()}
    if data_dir:
        runs.update({name: train_from_loader(name, data_dir) for name in LOADER_MESHES})
    for name, (losses, params) in runs.items():
        params = multihost_utils.process_allgather(params, tiled=True)
        if process_index == 0:
            np.savez(f"{out}.{name}.npz", **_flat(params))
            pathlib.Path(f"{out}.{name}.json").write_text(json.dumps(losses))
    jax.distributed.shutdown()


def _flat(params) -> dict:
    import jax
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(out: str, data_dir: str | None = None) -> None:
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(pathlib.Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    args = [str(data_dir)] if data_dir else []
    procs = [subprocess.Popen([sys.executable, __file__, str(port), str(i), out, *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"worker {i} failed:\n{logs[i][-3000:]}"


def _assert_same_run(out: str, ref_losses, ref_params) -> None:
    losses = json.loads(pathlib.Path(out + ".json").read_text())
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    got, ref = np.load(out + ".npz"), _flat(ref_params)
    assert sorted(got.files) == sorted(ref)
    for name, value in ref.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.fixture(scope="module")
def two_process_runs(request, tmp_path_factory) -> str:
    """The workers' runs for the two tests below, from one start of the two processes: the
    synthetic run, and the loader's when the shared data is there. -> their results' prefix."""
    out = str(tmp_path_factory.mktemp("two_processes") / "result")
    try:
        data_dir = request.getfixturevalue("small_corpus") / "data"
    except pytest.skip.Exception:
        data_dir = None
    _run_workers(out, data_dir)
    return out


def test_two_processes_match_one(two_process_runs):
    _assert_same_run(two_process_runs + ".synthetic", *train())


def test_two_processes_holding_the_same_batch_shards_load_the_same_rows(small_corpus, two_process_runs):
    """A `tensor` axis across both processes, and a batch replicated over both: each process
    loads the rows of the shards its devices hold (here the whole batch), so the copies agree
    and the params equal one process's on the same mesh shape."""
    for name in LOADER_MESHES:
        _assert_same_run(f"{two_process_runs}.{name}", *train_from_loader(name, str(small_corpus / "data")))



# ----------------------------------------------------------------------------
# The loop never lets un-awaited steps pile up (gloo deadlocks at ~32 in flight)

class _InFlight:
    """Stand-in device values: records how many dispatched steps were not yet read."""

    def __init__(self):
        self.dispatched = self.awaited = self.most = 0

    def dispatch(self):
        self.dispatched += 1
        self.most = max(self.most, self.dispatched - self.awaited)
        return _Value(self, self.dispatched)


class _Value:
    def __init__(self, tracker, step):
        self.tracker, self.step = tracker, step

    def block_until_ready(self):  # the device runs steps in order: this one and all before
        self.tracker.awaited = max(self.tracker.awaited, self.step)
        return self

    def __array__(self, dtype=None, copy=None):
        self.block_until_ready()
        return np.asarray(0.0, dtype or np.float32)


def test_loop_and_evaluation_block_every_few_steps():
    from bert_jax import loop, metrics_writer

    train, evals = _InFlight(), _InFlight()
    settings = loop.LoopSettings(total_steps=80, log_every=50, eval_every=40,
                                 checkpoint_every=1000, max_nonfinite_steps=3, global_batch_size=1,
                                 flops_per_step=1.0, peak_flops_total=1.0)
    preemption = loop.PreemptionWatcher()
    try:
        _, summary = loop.train_loop(
            state=0, start_step=0, settings=settings,
            train_step=lambda state, batch: (state + 1, {"loss": train.dispatch(), "update_skipped": train.dispatch()}),
            evaluate=lambda state: loop.evaluate_sums(state, lambda state, batch: {"loss": evals.dispatch()},
                                                      iter(range(100)), lambda b: b, 60, lambda sums: {"loss": 0.0}),
            train_batches=iter(range(1000)), to_global=lambda b: b, save=lambda *a, **k: None,
            writer=metrics_writer.MetricsWriter(None, enabled=False), preemption=preemption)
    finally:
        preemption.close()
    assert summary["step"] == 80 and evals.dispatched == 2 * 60
    # Two values per train step, read every log_every steps; the loop blocks on the step
    # launched MAX_STEPS_IN_FLIGHT steps earlier.
    assert train.most <= 2 * loop.MAX_STEPS_IN_FLIGHT, train.most
    assert evals.most <= loop.MAX_STEPS_IN_FLIGHT, evals.most


# ----------------------------------------------------------------------------
# Preemption of a two-process `python -m bert_jax.pretrain` run (SIGTERM, as a TPU
# maintenance event or SLURM's --signal does), and resume.

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRETRAIN_STEPS = 16
# O0 compiles the tiny step ~2x faster; every run here uses it, so all runs agree.
SUBPROCESS_XLA_FLAGS = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"


@pytest.fixture(scope="module")
def small_corpus(shared_data, tmp_path_factory):
    """~400 enwiki lines, a 500-piece SentencePiece vocabulary, instances of length 32."""
    from test_pretrain import prepare_enwiki

    return prepare_enwiki(shared_data, tmp_path_factory.mktemp("mp_corpus"), 400, 500, 32)


def _pretrain_args(corpus) -> list[str]:
    from test_pretrain import _cli_args, make_config

    c = make_config(corpus, model__max_position_embeddings=32, data__max_seq_length=32,
                    data__max_predictions_per_seq=5, train__steps=PRETRAIN_STEPS, optimizer__warmup_steps=2,
                    mesh__data=2, mesh__fsdp=2)
    return [f"--config={ROOT / 'configs' / 'bert_tiny.py'}", *_cli_args(c)]


class TwoProcessRun:
    """`python -m bert_jax.pretrain` as processes 0 and 1 of one jax.distributed job."""

    def __init__(self, workdir: pathlib.Path, args: list[str]):
        self.workdir, port = workdir, _free_port()
        env = dict(os.environ, XLA_FLAGS=SUBPROCESS_XLA_FLAGS, JAX_PLATFORMS="cpu")
        self.logs = [workdir.parent / f"{workdir.name}.process{i}.log" for i in range(2)]
        self.procs = []
        for i, log in enumerate(self.logs):
            with open(log, "a") as out:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "bert_jax.pretrain", f"--workdir={workdir}", *args,
                     f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                     "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
                    cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))

    def wait(self, timeout: float = 240) -> list[str]:
        """Waits for both; -> their output. Fails naming the process that did not exit 0."""
        deadline = time.time() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(1.0, deadline - time.time()))
        finally:
            self.kill()
        outputs = [log.read_text() for log in self.logs]
        for i, p in enumerate(self.procs):
            assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{outputs[i][-3000:]}"
        return outputs

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def wait_for_step(self, step: int, timeout: float = 240):
        """Until metrics.jsonl (written by process 0) shows `step`."""
        deadline = time.time() + timeout
        while time.time() < deadline and all(p.poll() is None for p in self.procs):
            if max(_logged_losses(self.workdir), default=0) >= step:
                return
            time.sleep(0.02)
        self.kill()
        raise AssertionError(f"no step {step} before exit/timeout:\n" + "\n".join(
            log.read_text()[-2000:] for log in self.logs))


def _logged_losses(workdir) -> dict[int, float]:
    from bert_jax import metrics_writer
    try:
        return {r["step"]: r["loss"] for r in metrics_writer.read_jsonl(workdir, "train")}
    except json.JSONDecodeError:  # a line being written
        return {}


def _final_params(workdir):
    from bert_jax import checkpoint
    return checkpoint.restore_params(workdir)[1]


@pytest.fixture(scope="module")
def uninterrupted(small_corpus, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mp_reference") / "run"
    TwoProcessRun(workdir, _pretrain_args(small_corpus)).wait()
    return workdir


def _check_one_preemption_checkpoint(workdir, outputs) -> int:
    """Both processes saved at the same step (JAX's sync point) and exited 0; the
    workdir holds exactly that one complete checkpoint and no temporary directory."""
    from bert_jax import checkpoint

    steps = []
    for i, out in enumerate(outputs):
        said = [line for line in out.splitlines() if line.startswith("preempted: checkpoint at step ")]
        assert len(said) == 1, f"process {i} did not report a preemption checkpoint:\n{out[-3000:]}"
        steps.append(int(said[0].split()[4]))
    assert steps[0] == steps[1], steps
    saved = steps[0]
    assert 1 <= saved < PRETRAIN_STEPS
    assert sorted(p.name for p in (workdir / checkpoint.CHECKPOINTS_DIR).iterdir()) == [str(saved)]
    assert checkpoint.Checkpointer(workdir, read_only=True).all_steps() == [saved]
    assert max(_logged_losses(workdir)) == saved  # training stopped at the step it saved
    return saved


@pytest.mark.parametrize("signalled", [(0, 1), (1,)], ids=["sigterm_both", "sigterm_one"])
def test_two_process_preemption_saves_once_and_resumes_exactly(small_corpus, uninterrupted, tmp_path, signalled):
    """SIGTERM mid-run to both processes (or only to process 1: JAX's coordination
    service tells the other) -> one checkpoint at the agreed step, exit 0; restarting
    both processes finishes with the params of an uninterrupted two-process run."""
    args = _pretrain_args(small_corpus)
    workdir = tmp_path / "run"
    run = TwoProcessRun(workdir, args)
    try:
        run.wait_for_step(2)
        for i in signalled:
            run.procs[i].send_signal(signal.SIGTERM)
        saved = _check_one_preemption_checkpoint(workdir, run.wait())
    finally:
        run.kill()
    if signalled != (0, 1):
        return  # resuming is the same code path; once is enough for the time budget

    outputs = TwoProcessRun(workdir, args).wait()
    assert f"resuming at step {saved}" in outputs[0]
    resumed, reference = _logged_losses(workdir), _logged_losses(uninterrupted)
    assert sorted(resumed) == list(range(1, PRETRAIN_STEPS + 1))
    np.testing.assert_allclose([resumed[s] for s in sorted(resumed)], [reference[s] for s in sorted(resumed)],
                               rtol=1e-5)
    got, want = _final_params(workdir), _final_params(uninterrupted)
    for (path, a), b in zip(jax_tree_flatten_with_path(got), [v for _, v in jax_tree_flatten_with_path(want)],
                            strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=path)


def jax_tree_flatten_with_path(tree):
    import jax
    return [(jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)


# ----------------------------------------------------------------------------
# A peer that dies (kill -9) mid-run: the survivor stops at once with one line naming it

DEAD_PEER_WORKER = """
import itertools, sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from bert_jax import checkpoint, cli, config_utils, distributed, loop, metrics_writer

@cli.entrypoint
def main(argv):
    port, process_id, workdir = argv
    c = config_utils.distributed_section()
    c.coordinator_address, c.num_processes, c.process_id = f"127.0.0.1:{port}", 2, int(process_id)
    c.heartbeat_timeout_seconds = 10  # JAX's own (fatal) stop when this process is not in a collective
    distributed.initialize(c)
    sharding = NamedSharding(jax.make_mesh((2,), ("data",)), PartitionSpec("data"))
    state = {"w": jax.make_array_from_callback((2, 256), sharding, lambda index: np.ones((1, 256), np.float32))}
    step = jax.jit(lambda s: ({"w": s["w"] * 0.999}, {"loss": jnp.sum(s["w"])}))  # the sum crosses the processes
    ckpt = checkpoint.Checkpointer(workdir, keep=1000)
    settings = loop.LoopSettings(total_steps=10**6, log_every=10**6, eval_every=10**6, checkpoint_every=10,
                                 max_nonfinite_steps=3, global_batch_size=2)
    loop.train_loop(state=state, start_step=0, settings=settings,
                    train_step=lambda s, b: (time.sleep(0.005), step(s))[1], train_batches=itertools.count(),
                    to_global=lambda b: b, evaluate=None,
                    save=lambda at, s, **kw: ckpt.save(at, s, data_state={}, config={}, meta={}),
                    writer=metrics_writer.MetricsWriter(None, enabled=False), preemption=loop.PreemptionWatcher(),
                    check_saves=ckpt.check)

sys.exit(main(sys.argv[1:]))
"""


def test_a_dead_peer_stops_the_survivor_naming_it_and_loses_no_checkpoint(tmp_path):
    from test_faults import _hashes

    workdir, port = tmp_path / "run", _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", DEAD_PEER_WORKER, str(port), str(i), str(workdir)], env=env,
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.time() + 60
        while len(_hashes(workdir)) < 2 * 3 and time.time() < deadline and procs[0].poll() is None:
            time.sleep(0.05)  # until a few checkpoints are complete
        procs[1].kill()
        killed_at = time.time()
        before = _hashes(workdir)
        _, stderr = procs[0].communicate(timeout=30)
        seconds = time.time() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    # Two outcomes, both bounded and naming process 1. Ours: the collective in flight fails, and
    # `distributed.exit_if_peer_lost` asks the coordination service which process is gone and
    # prints one line. JAX's: the service declares process 1 dead after the heartbeat timeout and
    # aborts the survivor with its own fatal message; when the service's answer to our query and
    # its abort come at the same moment (seen once in CI), the abort can win.
    jax_abort = "The following tasks are unhealthy (stopped sending heartbeats):\n1\n" in stderr
    if not (jax_abort and not lines):
        assert procs[0].returncode == 1 and len(lines) == 1, stderr[-3000:]
        assert lines[0].startswith("error: stopped: process 1 of 2 is gone (this process 0 saw: ")
        assert "restart every process to resume (the last checkpoint is step " in lines[0]
    assert procs[0].returncode != 0 and seconds < 10 + 10, (procs[0].returncode, seconds)  # heartbeat timeout 10 s
    assert before and all(_hashes(workdir).get(name) == digest for name, digest in before.items())


# ----------------------------------------------------------------------------
# `python -m bert_jax.finetune` as two processes (1 device each) == one process with 2 devices

# `-c AUDITED_FINETUNE WRITES_JSON WORKDIR FINETUNE_ARGS...`: the fine-tuning CLI, recording into
# WRITES_JSON every file this process created, wrote, renamed or deleted under WORKDIR from
# Python (TensorStore's writes of a checkpoint's arrays are C++ and not seen).
AUDITED_FINETUNE = """
import json, os, sys
workdir = os.path.realpath(sys.argv[2]) + os.sep
writes, active = [], [True]

def hook(event, args):
    if not active[0] or event not in ("open", "os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree"):
        return
    path = args[0]
    if event == "open":
        mode, flags = args[1] or "", args[2] or 0
        if not (set(str(mode)) & set("wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
            return
    if isinstance(path, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(path)).startswith(workdir):
        writes.append([event, os.path.relpath(os.path.realpath(os.fsdecode(path)), workdir)])

sys.addaudithook(hook)
from bert_jax import finetune
try:
    status = finetune.main(sys.argv[3:])
finally:
    active[0] = False
    with open(sys.argv[1], "w") as f:
        json.dump(writes, f)
sys.exit(status)
"""


def _finetune_process(workdir, args, devices: int, distributed: list[str], log, audit):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
               "--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-c", AUDITED_FINETUNE, str(audit), str(workdir),
                                 f"--workdir={workdir}", *args, *distributed],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def test_two_process_finetuning_sweep_matches_one_process_and_only_process_0_writes(tmp_path):
    """The fine-tuning sweep (2 learning rates, evaluation before and after training, test
    predictions, the chosen run's checkpoint) on 2 processes x 1 device gives one process
    x 2 devices' results.json, submission and fine-tuned params; process 1 writes none of them."""
    from test_finetune import make_tiny_checkpoint, write_polarity_task

    checkpoint_dir = make_tiny_checkpoint(tmp_path / "ckpt")
    write_polarity_task(tmp_path / "data", n_train=32, n_dev=16, n_test=8)
    args = [f"--config={ROOT / 'configs' / 'glue.py'}", "--config.task=continuation",
            f"--config.glue_dir={tmp_path / 'data'}", f"--config.init_checkpoint={checkpoint_dir / 'orbax'}",
            "--config.max_seq_length=16", "--config.batch_size=8", "--config.eval_batch_size=8",
            "--config.num_epochs=1", "--config.learning_rates=(0.01,0.003)", "--config.seeds=(0,)",
            "--config.eval_before_training=true", "--config.progress_bar=false"]
    port = _free_port()
    jobs = {"one": [("one", 2, [])],
            "two": [(f"two{i}", 1, ["--config.distributed.coordinator_address=127.0.0.1:" + str(port),
                                    "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"])
                    for i in range(2)]}
    procs = {name: _finetune_process(tmp_path / run, args, devices, distributed, tmp_path / f"{name}.log",
                                     tmp_path / f"{name}.writes.json")
             for run, parts in jobs.items() for name, devices, distributed in parts}
    try:
        for p in procs.values():
            p.wait(timeout=300)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for name, p in procs.items():
        assert p.returncode == 0, f"{name} exited {p.returncode}:\n{(tmp_path / f'{name}.log').read_text()[-3000:]}"

    one, two = tmp_path / "one", tmp_path / "two"
    _assert_same_results(json.loads((two / "results.json").read_text()),
                         json.loads((one / "results.json").read_text()), {str(two): str(one)})
    submission = pathlib.Path("submission") / "continuation.tsv"
    assert (two / submission).read_text() == (one / submission).read_text()
    got, want = (_final_params(d / "continuation" / "checkpoint") for d in (two, one))
    for (path, a), (_, b) in zip(jax_tree_flatten_with_path(got), jax_tree_flatten_with_path(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=path)

    # Process 1 wrote only its own per-process Orbax array metadata (no results, metrics,
    # submission or tokenizer file); process 0 made the same Python-level writes as one
    # process (names with a pid or time aside).
    writes = {name: json.loads((tmp_path / f"{name}.writes.json").read_text()) for name in procs}
    assert writes["two1"] and all(path.endswith("/array_metadatas/process_1") for _, path in writes["two1"]), \
        writes["two1"]
    assert ["open", "results.json.tmp"] in writes["one"]
    assert _without_ids(writes["two0"]) == _without_ids(writes["one"])


def _without_ids(writes: list) -> list:
    return sorted((event, re.sub(r"(write_probe|tfevents)\.\d+", r"\1.N", path)) for event, path in writes)


def _assert_same_results(got, want, renamed: dict, where="results.json"):
    """Equal trees; floats to rtol 1e-5; paths in `got` renamed; timings and the config (its
    distributed section differs) left out."""
    if isinstance(want, dict):
        keys = set(want) - {"train_seconds", "config"}
        assert set(got) - {"train_seconds", "config"} == keys, where
        for key in keys:
            _assert_same_results(got[key], want[key], renamed, f"{where}/{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            _assert_same_results(a, b, renamed, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), where
    elif isinstance(want, str):
        for old, new in renamed.items():
            got = got.replace(old, new)
        assert got == want, where
    else:
        assert got == want, where
