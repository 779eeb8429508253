"""Launch scripts: dry runs print the right commands; input checks stop a run before
anything is created; SLURM/local process wiring, with fake gcloud/sbatch/srun/python
on PATH that record how they were called."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A fake CLI: appends {"argv": [...], "env": {...}} to $FAKE_LOG and fails when the
# joined argv contains any '|'-separated pattern of $FAKE_FAIL.
FAKE_TOOL = r"""#!/usr/bin/env python3
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    env = {k: os.environ.get(k) for k in ("XLA_FLAGS", "SLURM_LOCALID", "CUDA_VISIBLE_DEVICES", "JAX_PLATFORMS")}
    f.write(json.dumps({"tool": os.path.basename(sys.argv[0]), "argv": args, "env": env}) + "\n")
fail = [p for p in os.environ.get("FAKE_FAIL", "").split("|") if p]
sys.exit(1 if any(p in " ".join(args) for p in fail) else 0)
"""


@pytest.fixture
def project(tmp_path):
    """A copy of launch/ in a scratch project with one config and fake tools on PATH."""
    (tmp_path / "launch").mkdir()
    for script in (ROOT / "launch").iterdir():
        shutil.copy2(script, tmp_path / "launch" / script.name)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.py").write_text("def get_config(arg=''):\n    return None\n")
    (tmp_path / "README.md").write_text("scratch project\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gcloud", "sbatch", "srun", "sinfo"):
        (bin_dir / tool).write_text(FAKE_TOOL)
        (bin_dir / tool).chmod(0o755)
    (bin_dir / "sinfo").write_text("#!/bin/sh\necho gpu\n")
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(FAKE_TOOL)
    (venv_bin / "python").chmod(0o755)
    return tmp_path


def run_script(project, script, *args, fail="", extra_env=None, timeout=60):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    tmpdir = project.parent / f"{project.name}-tmp"  # outside the tree the TPU script tars
    tmpdir.mkdir(exist_ok=True)
    env.update(PATH=f"{project / 'bin'}:{env['PATH']}", FAKE_LOG=str(project / "calls.jsonl"), FAKE_FAIL=fail,
               TMPDIR=str(tmpdir))
    env.update(extra_env or {})
    return subprocess.run(["bash", str(project / "launch" / script), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def calls(project, tool=None):
    log = project / "calls.jsonl"
    if not log.exists():
        return []
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    return [e for e in entries if tool is None or e["tool"] == tool]


def printed(result):
    """The commands a script printed ('+ ...' lines)."""
    return [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]


TPU_ARGS = ("--project", "my-proj", "--zone", "us-east5-b", "--name", "bert-run",
            "--config", "configs/tiny.py", "--workdir", "gs://my-bucket/runs/r1")


# ----------------------------------------------------------------------------
# TPU pods

def test_tpu_dry_run_creates_installs_and_starts_on_all_workers(project):
    result = run_script(project, "tpu_pod.sh", *TPU_ARGS, "--accelerator-type", "v5litepod-16", "--spot",
                        "--gcsfuse", "--dry-run", "--", "--config.train.global_batch_size=512",
                        "--config.data.train_path=gs://my-bucket/data", fail="tpu-vm describe")
    assert result.returncode == 0, result.stderr
    lines = printed(result)
    create = [c for c in lines if c.startswith("gcloud compute tpus tpu-vm create")]
    assert create == ["gcloud compute tpus tpu-vm create bert-run --project my-proj --zone us-east5-b "
                      "--accelerator-type v5litepod-16 --version v2-alpha-tpuv5-lite --spot"]
    scp = [c for c in lines if " scp " in c]
    ssh = [c for c in lines if " ssh " in c]
    assert len(scp) == 1 and "--worker=all" in scp[0]
    assert len(ssh) == 3 and all("--worker=all" in c for c in ssh)
    assert "-r requirements.txt -r requirements-tpu.txt" in ssh[0]
    # --gcsfuse: gs:// data paths reach the trainer through a Cloud Storage FUSE mount on every
    # worker; the workdir stays gs:// (the trainer writes it through etils.epath).
    assert "gcsfuse --implicit-dirs my-bucket /tmp/gcs/my-bucket" in ssh[1]
    assert ("python -m bert_jax.pretrain --config configs/tiny.py --workdir gs://my-bucket/runs/r1 "
            "--config.train.global_batch_size=512 --config.data.train_path=/tmp/gcs/my-bucket/data") in ssh[2]
    # The dry run ran read-only queries only: nothing created, copied or started.
    executed = [" ".join(c["argv"]) for c in calls(project, "gcloud")]
    assert executed and all(" describe " in f" {c} " for c in executed), executed
    assert any("storage buckets describe gs://my-bucket" in c for c in executed)


def test_tpu_reuses_an_existing_vm(project):
    result = run_script(project, "tpu_pod.sh", *TPU_ARGS, "--accelerator-type", "v5p-128", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "reusing existing bert-run" in result.stdout
    assert not [c for c in printed(result) if " create " in c]


def test_tpu_multislice_uses_a_queued_resource_and_starts_every_slice(project):
    result = run_script(project, "tpu_pod.sh", *TPU_ARGS, "--accelerator-type", "v5p-128", "--num-slices", "2",
                        "--spot", "--dry-run", fail="queued-resources describe bert-run --project")
    assert result.returncode == 0, result.stderr
    lines = printed(result)
    create = [c for c in lines if "queued-resources create" in c]
    assert create == ["gcloud compute tpus queued-resources create bert-run --project my-proj --zone us-east5-b "
                      "--accelerator-type v5p-128 --runtime-version v2-alpha-tpuv5 --node-count 2 "
                      "--node-prefix bert-run --spot"]
    starts = [c for c in lines if " ssh " in c and "bert_jax.pretrain" in c]
    assert [c.split()[5] for c in starts] == ["bert-run-0", "bert-run-1"]


def test_tpu_real_run_order_with_fake_gcloud(project):
    result = run_script(project, "tpu_pod.sh", *TPU_ARGS, "--accelerator-type", "v6e-16", "--env", "FOO=bar baz",
                        "--", "--config.data.train_path=gs://data-bucket/wiki", fail="tpu-vm describe")
    assert result.returncode == 0, result.stderr
    verbs = [" ".join(c["argv"][:4]) for c in calls(project, "gcloud")]
    assert verbs == ["projects describe my-proj --format=value(projectId)",
                     "compute tpus accelerator-types describe", "storage buckets describe gs://my-bucket",
                     "storage buckets describe gs://data-bucket",
                     "compute tpus tpu-vm describe", "compute tpus tpu-vm create", "compute tpus tpu-vm scp",
                     "compute tpus tpu-vm ssh", "compute tpus tpu-vm ssh"]
    start = calls(project, "gcloud")[-1]["argv"]
    command = start[start.index("--command") + 1]
    assert "nohup env 'FOO=bar baz' .venv/bin/python -m bert_jax.pretrain" in command
    assert command.endswith("--workdir gs://my-bucket/runs/r1 --config.data.train_path=gs://data-bucket/wiki "
                            "> pretrain.log 2>&1 < /dev/null &")
    assert (project.parent / f"{project.name}-tmp" / "bert_jax-bert-run.tar.gz").is_file()  # the copied checkout


@pytest.mark.parametrize("fail, message", [
    ("storage buckets describe", "bucket gs://my-bucket does not exist"),
    ("projects describe", "project 'my-proj' not found"),
    ("accelerator-types describe", "accelerator type 'v5litepod-16' is not offered in zone 'us-east5-b'"),
])
def test_tpu_failed_check_stops_before_spending(project, fail, message):
    result = run_script(project, "tpu_pod.sh", *TPU_ARGS, "--accelerator-type", "v5litepod-16",
                        fail=fail + "|tpu-vm describe")
    assert result.returncode != 0
    assert message in result.stderr
    assert not [c for c in calls(project, "gcloud") if c["argv"][3] in ("create", "scp", "ssh")]


@pytest.mark.parametrize("change, message", [
    (("--config", "configs/nope.py"), "config file not found"),
    (("--workdir", "/local/dir"), "--workdir must be on GCS"),
    (("--accelerator-type", "v9-8"), "is not one of v4-N, v5litepod-N, v5p-N, v6e-N"),
    (("--zone", "useast"), "is not a zone name"),
    (("--preemptible", "--num-slices", "2"), "take --spot, not --preemptible"),
    (("--typo",), "unknown flag: --typo"),
])
def test_tpu_bad_input_is_a_clear_error(project, change, message):
    args = list(TPU_ARGS) + ["--accelerator-type", "v5litepod-16", *change, "--dry-run"]
    result = run_script(project, "tpu_pod.sh", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert calls(project) == []


# ----------------------------------------------------------------------------
# SLURM

def test_slurm_submit_dry_run(project):
    (project / "shared").mkdir()
    result = run_script(project, "slurm_submit.sh", "--nodes", "4", "--partition", "gpu", "--time", "2:00:00",
                        "--config", "configs/tiny.py:phase2", "--workdir", str(project / "shared" / "run"),
                        "--venv", str(project / "venv"), "--dry-run", "--", "--config.train.steps=10")
    assert result.returncode == 0, result.stderr
    (line,) = printed(result)
    assert line.startswith(f"sbatch --chdir={project} --job-name=bert_jax --nodes=4 --ntasks-per-node=8 "
                           "--gpus-per-node=8 --cpus-per-task=8 --time=2:00:00 --partition=gpu "
                           f"{project}/launch/slurm_gpu.sbatch --config configs/tiny.py:phase2")
    assert line.endswith("-- --config.train.steps=10")
    assert calls(project, "sbatch") == []


def test_slurm_submit_checks_inputs(project):
    base = ["--config", "configs/tiny.py", "--venv", str(project / "venv")]
    result = run_script(project, "slurm_submit.sh", *base, "--workdir", "/no/such/fs/run")
    assert result.returncode == 2 and "/no/such/fs does not exist" in result.stderr
    result = run_script(project, "slurm_submit.sh", *base, "--workdir", "relative/run")
    assert result.returncode == 2 and "absolute path" in result.stderr
    result = run_script(project, "slurm_submit.sh", "--config", "configs/tiny.py", "--workdir", str(project / "r"),
                        "--venv", str(project / "novenv"))
    assert result.returncode == 2 and "no Python at" in result.stderr
    assert calls(project, "sbatch") == []


def test_slurm_job_per_gpu_lets_jax_read_slurm(project):
    env = {"SLURM_JOB_ID": "77", "SLURM_NNODES": "2", "SLURM_NTASKS": "16", "BERT_JAX_ROOT": str(project)}
    result = run_script(project, "slurm_gpu.sbatch", "--config", "configs/tiny.py", "--workdir", "/shared/r",
                        "--venv", str(project / "venv"), "--", "--config.train.steps=3", extra_env=env)
    assert result.returncode == 0, result.stderr
    (srun,) = calls(project, "srun")
    assert srun["argv"] == ["--kill-on-bad-exit=1", f"{project}/venv/bin/python", "-m", "bert_jax.pretrain",
                            "--config", "configs/tiny.py", "--workdir", "/shared/r", "--config.train.steps=3"]
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in srun["env"]["XLA_FLAGS"]


def test_slurm_job_per_node_passes_explicit_process_ids(project):
    """The per-node srun line, executed as one task: the process id comes from the task's
    SLURM_PROCID and SLURM_LOCALID is removed (else JAX binds the task to one GPU)."""
    env = {"SLURM_JOB_ID": "4099", "SLURM_NNODES": "2", "SLURMD_NODENAME": "node7", "BERT_JAX_ROOT": str(project)}
    result = run_script(project, "slurm_gpu.sbatch", "--per-node", "--config", "configs/tiny.py",
                        "--workdir", "/shared/r", "--venv", str(project / "venv"), extra_env=env)
    assert result.returncode == 0, result.stderr
    (srun,) = calls(project, "srun")
    assert srun["argv"][:3] == ["--kill-on-bad-exit=1", "--ntasks-per-node=1", "bash"]
    task = subprocess.run(srun["argv"][2:], env={**os.environ, "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
                                                   "FAKE_LOG": str(project / "calls.jsonl")}, timeout=30)
    assert task.returncode == 0
    (python,) = calls(project, "python")
    assert python["argv"][-3:] == ["--config.distributed.coordinator_address=node7:61443",
                                   "--config.distributed.num_processes=2", "--config.distributed.process_id=1"]
    assert python["env"]["SLURM_LOCALID"] is None


def test_slurm_job_dry_run_prints_srun(project):
    result = run_script(project, "slurm_gpu.sbatch", "--config", "configs/tiny.py", "--workdir", "/r",
                        "--venv", str(project / "venv"), "--dry-run", extra_env={"BERT_JAX_ROOT": str(project)})
    assert result.returncode == 0, result.stderr
    assert printed(result) == [f"srun --kill-on-bad-exit=1 {project}/venv/bin/python -m bert_jax.pretrain "
                               "--config configs/tiny.py --workdir /r"]
    assert calls(project) == []


def test_slurm_job_outside_slurm_refuses(project):
    result = run_script(project, "slurm_gpu.sbatch", "--config", "configs/tiny.py", "--workdir", "/r",
                        "--venv", str(project / "venv"))
    assert result.returncode == 2 and "not inside a SLURM job" in result.stderr


def test_gpu_xla_flags_are_known_to_this_jaxlib(project):
    """XLA aborts on an unknown flag: every flag in gpu_env.sh must parse."""
    flags = subprocess.run(["bash", "-c", f"source {project}/launch/gpu_env.sh; echo \"$XLA_FLAGS\""],
                           capture_output=True, text=True, env={"PATH": os.environ["PATH"]}).stdout.strip()
    assert flags.count("--xla_gpu_") >= 5
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    check = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert check.returncode == 0 and check.stdout.strip() == "3.0", check.stderr[-2000:]


# ----------------------------------------------------------------------------
# One machine

def test_local_dry_run_one_and_many_processes(project):
    result = run_script(project, "local.sh", "--config", "configs/tiny.py", "--workdir", "w",
                        "--python", str(project / "venv" / "bin" / "python"), "--dry-run")
    assert printed(result) == [f"{project}/venv/bin/python -m bert_jax.pretrain --config configs/tiny.py --workdir w"]
    result = run_script(project, "local.sh", "--config", "configs/tiny.py", "--workdir", "w", "--num-processes", "3",
                        "--cpu-devices", "2", "--port", "23456", "--python", "python3", "--dry-run", "--", "--config.x=1")
    lines = printed(result)
    assert lines == [f"env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 python3 -m "
                     f"bert_jax.pretrain --config configs/tiny.py --workdir w --config.x=1 "
                     f"--config.distributed.coordinator_address=127.0.0.1:23456 "
                     f"--config.distributed.num_processes=3 --config.distributed.process_id={i}" for i in range(3)]


FAKE_TRAINER = r"""#!/usr/bin/env bash
# process 1 fails after a moment unless told to wait; the others wait for SIGTERM.
id=${@: -1}; id=${id##*=}
echo "$id $CUDA_VISIBLE_DEVICES" >> "$MARKS/started"
trap 'echo "$id" >> "$MARKS/terminated"; exit 0' TERM
if [[ $id == 1 && -z "$ALL_WAIT" ]]; then sleep 0.5; exit 3; fi
for _ in $(seq 300); do sleep 0.1; done
"""


def _fake_trainer(project):
    script = project / "fake_trainer.sh"
    script.write_text(FAKE_TRAINER)
    script.chmod(0o755)
    (project / "marks").mkdir()
    return script


def test_local_many_processes_a_failure_stops_the_rest(project):
    trainer = _fake_trainer(project)
    result = run_script(project, "local.sh", "--config", "configs/tiny.py", "--workdir", str(project / "w"),
                        "--num-processes", "3", "--gpus-per-process", "2", "--python", str(trainer),
                        extra_env={"MARKS": str(project / "marks")}, timeout=30)
    assert result.returncode == 3, result.stdout + result.stderr
    started = sorted((project / "marks" / "started").read_text().split("\n")[:-1])
    assert started == ["0 0,1", "1 2,3", "2 4,5"]
    assert sorted((project / "marks" / "terminated").read_text().split()) == ["0", "2"]
    assert (project / "w.logs" / "process_2.log").exists()


def test_local_sigterm_reaches_every_process(project):
    trainer = _fake_trainer(project)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(MARKS=str(project / "marks"), ALL_WAIT="1")
    proc = subprocess.Popen(["bash", str(project / "launch" / "local.sh"), "--config", "configs/tiny.py",
                             "--workdir", str(project / "w"), "--num-processes", "2", "--python", str(trainer)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = project / "marks" / "started"
    deadline = time.time() + 20
    while time.time() < deadline and (not started.exists() or len(started.read_text().split("\n")) < 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert sorted((project / "marks" / "terminated").read_text().split()) == ["0", "1"]
