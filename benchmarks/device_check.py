"""The one-shot accelerator check: every GPU figure bert_jax needs, in one short run.

    python benchmarks/device_check.py [--json device_check.json]     # one GPU: at most ~8 minutes
    python benchmarks/device_check.py --tiny                         # any CPU, seconds (CI, tests)

Writes one JSON file and prints a table:
* the bfloat16 matmul peak (8192^3 on an accelerator), what MFU is measured against;
* BERT-large pretraining train steps at sequence 128 and 512, on padded rows (one instance per
  row) and packed rows (instances packed up to the row, ``packed_segment_ids`` and
  ``position_ids``), with the fused attention (``cudnn`` on a GPU) and XLA's (``explicit``),
  attention dropout 0 so the fused kernel runs: rows/s, instances (sequences)/s, real tokens/s
  and MFU (analytic FLOPs of the whole rows / the peak);
* fine-tuning (sequence classification, BERT-base, batch 32, the default config) examples/s at
  the real length mix of CoLA, MRPC and RTE, each batch padded to its longest example rounded
  up to 32.

Instance lengths are drawn from the real GLUE train histograms (``../shared/data/glue_lengths.json``,
real token counts; random token ids). ``--tiny`` runs the same code with a 2-layer model on the
host's CPU (attention ``xla`` only) so the script keeps working. Each
measurement is one compile (layers scanned) plus ``--steps`` timed steps; once ``--budget``
seconds have passed the rest is skipped and marked so in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_train import bench_ours, matmul_peak  # noqa: E402
from bert_jax import attention, hardware, losses, optim, sharding  # noqa: E402
from bert_jax import train_step as T  # noqa: E402
from bert_jax.model import BertConfig, BertForSequenceClassification  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
GLUE_LENGTHS = ROOT.parent / "shared" / "data" / "glue_lengths.json"
FINETUNE_TASKS = ("CoLA", "MRPC", "RTE")


def glue_lengths(tasks=None) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, probabilities) of the GLUE train histograms of `tasks` (all when None)."""
    if not GLUE_LENGTHS.is_file():
        raise FileNotFoundError(f"{GLUE_LENGTHS}: the GLUE length histograms are missing (see ../shared/data)")
    hist: dict[int, int] = {}
    for name, task in json.loads(GLUE_LENGTHS.read_text())["tasks"].items():
        if (tasks is None or name in tasks) and "train" in task:  # QNLI has only dev
            for length, count in task["train"]["tokens_with_special"].items():
                hist[int(length)] = hist.get(int(length), 0) + count
    lengths = np.array(sorted(hist))
    counts = np.array([hist[n] for n in lengths], np.float64)
    return lengths, counts / counts.sum()


def pretraining_rows(rows: int, seq: int, predictions: int, vocab: int, packed: bool, rng) -> tuple[dict, int]:
    """A pretraining batch of `rows` rows whose instances have real GLUE lengths (clipped to the
    row). -> (batch, instances in it)."""
    lengths, p = glue_lengths()
    ids, mask, seg, pos, packed_ids = (np.zeros((rows, seq), np.int32) for _ in range(5))
    instances = 0
    for r in range(rows):
        used, k = 0, 0
        while True:
            n = int(min(rng.choice(lengths, p=p), seq))
            if used + n > seq or (k and not packed):
                break
            ids[r, used:used + n] = rng.integers(1000, vocab, n)
            mask[r, used:used + n] = 1
            seg[r, used + n // 2:used + n] = 1
            pos[r, used:used + n] = np.arange(n)
            packed_ids[r, used:used + n] = k + 1
            used, k = used + n, k + 1
        instances += k
    real = mask.sum(1)
    positions = np.stack([np.sort(rng.choice(np.arange(n), predictions, replace=n < predictions)) for n in real])
    batch = dict(input_ids=ids, input_mask=mask, segment_ids=seg, masked_lm_positions=positions.astype(np.int32),
                 masked_lm_ids=rng.integers(1000, vocab, (rows, predictions)).astype(np.int32),
                 masked_lm_weights=np.ones((rows, predictions), np.float32),
                 next_sentence_labels=rng.integers(0, 2, rows).astype(np.int32))
    if packed:
        batch.update(position_ids=pos, packed_segment_ids=packed_ids)
    return batch, instances


def finetune_batches(task: str, batch_size: int, max_len: int, width_step: int, count: int, vocab: int,
                     rng) -> list[dict]:
    lengths, p = glue_lengths((task,))
    batches = []
    for _ in range(count):
        n = np.minimum(rng.choice(lengths, batch_size, p=p), max_len)
        width = min(max_len, -(-int(n.max()) // width_step) * width_step)
        mask = (np.arange(width)[None] < n[:, None]).astype(np.int32)
        batches.append(dict(input_ids=(rng.integers(1000, vocab, (batch_size, width)) * mask).astype(np.int32),
                            input_mask=mask, segment_ids=np.zeros_like(mask),
                            label_ids=rng.integers(0, 2, batch_size).astype(np.int32),
                            is_real_example=np.ones(batch_size, np.int32)))
    return batches


class FineTuner:
    """A sequence-classification train step (state and jit shared by every task: each batch
    width compiles once)."""

    def __init__(self, cfg: BertConfig, compiler_options=None):
        opt, schedule = optim.make_optimizer({"learning_rate": 2e-5, "warmup_steps": 0, "total_steps": 1000})
        self.mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
        model_fn = lambda rngs: BertForSequenceClassification(cfg, 2, rngs=rngs)  # noqa: E731
        graphdef, self.state, shardings = T.create_train_state(cfg, opt, self.mesh, seed=0, model_fn=model_fn)
        self.step = T.make_train_step(graphdef, opt, self.mesh, None, shardings, schedule=schedule,
                                      loss_fns=losses.CLASSIFICATION, compiler_options=compiler_options)
        self.widths: set[int] = set()

    def examples_per_second(self, batches: list[dict]) -> float:
        device_batches = [sharding.make_global_batch(b, self.mesh) for b in batches]
        state, key, metrics = self.state, jax.random.key(0), None
        for b in device_batches:  # compile each new width first, untimed (and warm up)
            if b["input_ids"].shape[1] not in self.widths or metrics is None:
                state, metrics = self.step(state, b, key)
                self.widths.add(b["input_ids"].shape[1])
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for b in device_batches:
            state, metrics = self.step(state, b, key)
        jax.block_until_ready(metrics)
        self.state = state
        return sum(len(b["input_ids"]) for b in batches) / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU: seconds")
    parser.add_argument("--json", default="device_check.json")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 10, tiny 2)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds after which the rest is skipped (default 420; none with --tiny)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    platform = jax.default_backend()
    fused = "cudnn" if platform == "gpu" else ("splash" if platform == "tpu" else "xla")
    if args.tiny:  # one width per fine-tuning batch and XLA's fastest compiles: every step compiles once
        base = BertConfig.preset("tiny", num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                 intermediate_size=128, vocab_size=2048)
        large, finetune, shapes, peak_n = base, base, ((128, 4, 20),), 256
        ft_batch, ft_width_step, ft_batches, steps = 8, 128, 2, args.steps or 2
        budget, options = args.budget or float("inf"), {"xla_backend_optimization_level": 0}
    else:
        large, finetune = BertConfig.preset("large"), BertConfig.preset("base")
        shapes, peak_n = ((128, 128, 20), (512, 32, 76)), 8192
        ft_batch, ft_width_step, ft_batches, steps = 32, 32, 10, args.steps or 10
        budget, options = args.budget or 420.0, None
    dtype = "bfloat16" if platform != "cpu" else hardware.compute_choice().dtype
    device = jax.devices()[0]
    peak = matmul_peak(jnp.dtype(dtype), False, peak_n)
    report = {"device": getattr(device, "device_kind", device.platform), "platform": platform,
              "jax": jax.__version__, "dtype": dtype, "peak_flops": peak, "peak_matmul": f"{peak_n}^3 {dtype}",
              "cpu_features": sorted(hardware.cpu_features()), "pretraining": [], "finetuning": [], "skipped": []}
    print(f"device check on {report['device']} ({platform}), jax {jax.__version__}, compute {dtype}; "
          f"{peak_n}^3 {dtype} matmul peak {peak / 1e12:.3f} TFLOP/s", flush=True)

    rng = np.random.default_rng(0)
    for seq, rows, predictions in shapes:
        for kind in ("padded", "packed"):
            batch, instances = pretraining_rows(rows, seq, predictions, large.vocab_size, kind == "packed", rng)
            for impl in (fused,) if args.tiny else (fused, "explicit"):  # tiny: half the compiles
                name = f"pretrain seq {seq} {kind} {impl}"
                if time.perf_counter() - start > budget:
                    report["skipped"].append(name)
                    continue
                cfg = large.replace(dtype=dtype, attention_impl=impl, attention_probs_dropout_prob=0.0,
                                    scan_layers=True)
                r = bench_ours(cfg, batch, steps, warmup=1, compiler_options=options)
                flops = hardware.pretraining_flops_per_sequence(cfg, seq, predictions) * r["sequences_per_s"]
                report["pretraining"].append({
                    "seq": seq, "rows": rows, "batch": kind, "attention": impl, "predictions": predictions,
                    "path": attention.describe(cfg, seq_len=seq, packed=kind == "packed"),
                    "rows_per_s": r["sequences_per_s"], "sequences_per_s": r["sequences_per_s"] * instances / rows,
                    "real_tokens_per_s": r["sequences_per_s"] * batch["input_mask"].sum() / rows,
                    "packing_efficiency": float(batch["input_mask"].mean()), "mfu": flops / peak})
                print(f"  {name}: {r['sequences_per_s']:.2f} rows/s", flush=True)
    cfg = finetune.replace(dtype=dtype)
    tuner = FineTuner(cfg, options)
    for task in FINETUNE_TASKS:
        if time.perf_counter() - start > budget:
            report["skipped"].append(f"finetune {task}")
            continue
        batches = finetune_batches(task, ft_batch, 128, ft_width_step, ft_batches, finetune.vocab_size, rng)
        report["finetuning"].append({"task": task, "batch": ft_batch, "path": attention.describe(cfg, seq_len=128),
                                     "examples_per_s": tuner.examples_per_second(batches)})
        print(f"  finetune {task}: {report['finetuning'][-1]['examples_per_s']:.1f} examples/s", flush=True)
    report["seconds"] = time.perf_counter() - start

    print(f"\n{'pretraining':32} {'rows/s':>9} {'seq/s':>9} {'tokens/s':>10} {'fill':>5} {'MFU':>6}")
    for r in report["pretraining"]:
        label = f"seq {r['seq']} {r['batch']} {r['attention']}"
        print(f"{label:32} {r['rows_per_s']:9.2f} {r['sequences_per_s']:9.2f} {r['real_tokens_per_s']:10.0f} "
              f"{r['packing_efficiency']:5.0%} {r['mfu']:6.1%}")
    print(f"\n{'fine-tuning':32} {'examples/s':>10}")
    for r in report["finetuning"]:
        print(f"{r['task']:32} {r['examples_per_s']:10.1f}")
    if report["skipped"]:
        print(f"\nskipped (past the {budget:g} s budget): {', '.join(report['skipped'])}")
    pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"\n{args.json} written ({report['seconds']:.0f} s; load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
