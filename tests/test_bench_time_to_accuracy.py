"""benchmarks/bench_time_to_accuracy.py --tiny end to end: both runners train, are evaluated on
the same fixed masks, and the table, results.json and the PNG come out."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_time_to_accuracy_tiny(tmp_path, shared_data, minilm):
    pytest.importorskip("matplotlib")
    # One CPU device, as the benchmark runs; XLA's -O0 compiles bert_jax's programs about twice as
    # fast (its seconds here only need to be measured, not fast).
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_time_to_accuracy.py"), "--tiny",
                             f"--out={tmp_path}"], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for name in ("bert_jax", "reference"):
        curve = results["curves"][name]
        assert len(curve) >= 2 and curve[0][0] == 0.0 and curve[-1][0] > 0  # start + after training
        assert all(0.0 <= accuracy <= 1.0 for _, accuracy in curve)
    assert 0.0 < results["unigram_baseline"]["accuracy"] < 1.0
    assert "time ratio bert_jax / reference" in result.stdout
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
