"""benchmarks/device_check.py --tiny: the one-shot accelerator check keeps working (CPU, seconds)."""
import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tiny_device_check_writes_its_json_and_table(shared_data, tmp_path, capsys):
    # shared_data: the check reads ../shared/data/glue_lengths.json (skips with a reason without it)
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "benchmarks" / "device_check.py")
    device_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(device_check)
    out = tmp_path / "check.json"
    assert device_check.main(["--tiny", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["platform"] == "cpu" and report["peak_flops"] > 0 and not report["skipped"]
    runs = {(r["batch"], r["attention"]): r for r in report["pretraining"]}
    assert set(runs) == {(b, "xla") for b in ("padded", "packed")}  # --tiny: the fused path only
    padded, packed = runs["padded", "xla"], runs["packed", "xla"]
    assert packed["packing_efficiency"] > 2 * padded["packing_efficiency"]  # GLUE lengths fill 128 poorly
    assert packed["sequences_per_s"] > 2 * packed["rows_per_s"]  # several instances per packed row
    assert padded["sequences_per_s"] == padded["rows_per_s"]
    assert all(r["mfu"] > 0 and r["path"].startswith("attention: xla") for r in runs.values())
    assert [r["task"] for r in report["finetuning"]] == ["CoLA", "MRPC", "RTE"]
    assert all(r["examples_per_s"] > 0 for r in report["finetuning"])
    assert [r["task"] for r in report["torch_finetuning"]] == ["CoLA", "MRPC", "RTE"]  # the same batches
    assert all(r["examples_per_s"] > 0 for r in report["torch_finetuning"])
    (attn,) = report["attention"]  # a CPU runs XLA's path only; it matches the float32 reference
    assert attn["path"] == "xla" and attn["fwd_bwd_ms"] > 0
    assert attn["out_max_error"] < 0.02 * attn["ref_out_max"] and attn["grad_max_error"] < 0.02 * attn["ref_grad_max"]
    assert not report["errors"]
    assert "seq 128 packed xla" in capsys.readouterr().out
