"""The README's main job (`python -m bert_jax.demo`) end to end, at a small size:
pretraining, the continuation task, fine-tuning and both exports, as a user runs it."""
import json
import os
import subprocess
import sys
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_runs_every_stage_and_exports(tmp_path):
    # One CPU device, as a user's machine has (not conftest's eight); XLA's -O0 compiles the
    # stages' programs about twice as fast, and compiling is most of this test's time.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    result = subprocess.run(
        [sys.executable, "-m", "bert_jax.demo", f"--workdir={tmp_path}", "--pretrain_steps=4",
         "--finetune_epochs=0.25", "--finetune_examples=128"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "=== summary" in result.stdout
    summary = result.stdout[result.stdout.index("=== summary"):]
    assert "unigram baseline accuracy" in summary and "model            accuracy" in summary
    assert summary.count("[MASK]") >= 1 and "answer '" in summary  # a held-out word and the top predictions
    assert (tmp_path / "export" / "npz" / "bert.npz").is_file()
    assert (tmp_path / "export" / "hf" / "config.json").is_file()
    results = json.loads((tmp_path / "finetune" / "results.json").read_text())
    assert "continuation" in results["tasks"]
