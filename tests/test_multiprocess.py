"""Two processes on localhost (jax.distributed, gloo, 2 CPU devices each) == one process with 4 devices.

Each worker feeds only its half of every global batch through
``sharding.make_global_batch``; the FSDP x data mesh spans both processes, so
parameters, gradients and optimizer state cross the process boundary.
Run as a script, this file is the worker.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

MESH = {"data": 2, "fsdp": 2}
STEPS = 4
BATCH = 16


def train(process_index: int, num_processes: int):
    import jax
    from bert_jax import optim, sharding, train_step as T
    from test_sharding import FAST_COMPILE, make_batch, tiny_config

    cfg = tiny_config(num_hidden_layers=1)  # dropout on: keys must agree across processes
    opt, schedule = optim.make_optimizer({"learning_rate": 1e-2, "warmup_steps": 0, "total_steps": 10})
    mesh = sharding.make_mesh(MESH, devices=jax.devices()[:4])
    graphdef, state, shardings = T.create_train_state(cfg, opt, mesh, seed=0, compiler_options=FAST_COMPILE)
    step = T.make_train_step(graphdef, opt, mesh, None, shardings, schedule=schedule, compiler_options=FAST_COMPILE)
    rows = BATCH // num_processes
    losses = []
    for i in range(STEPS):
        batch = make_batch(np.random.default_rng(i), batch_size=BATCH)
        local = {k: v[process_index * rows:(process_index + 1) * rows] for k, v in batch.items()}
        state, metrics = step(state, sharding.make_global_batch(local, mesh), jax.random.key(3))
        losses.append(float(metrics["loss"]))  # blocks every step: un-awaited collectives can deadlock gloo
    return losses, state.params


def _worker(port: int, process_index: int, out: str):
    import jax
    from jax.experimental import multihost_utils

    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_index)
    assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2
    losses, params = train(process_index, 2)
    params = multihost_utils.process_allgather(params, tiled=True)
    if process_index == 0:
        flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        np.savez(out + ".npz", **flat)
        pathlib.Path(out + ".json").write_text(json.dumps(losses))
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    import jax

    out = str(tmp_path / "result")
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(pathlib.Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, __file__, str(port), str(i), out], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"worker {i} failed:\n{logs[i][-3000:]}"

    ref_losses, ref_params = train(0, 1)
    losses = json.loads(pathlib.Path(out + ".json").read_text())
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    got = np.load(out + ".npz")
    ref = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(ref_params)[0]}
    assert sorted(got.files) == sorted(ref)
    for name, value in ref.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
