"""Train-step throughput and MFU: bert_jax vs PyTorch and Hugging Face Flax, side by side.

    python benchmarks/bench_train.py [--configs tiny,mini,small,medium,base] [--batch 16] [--seq 128]
                                     [--steps 5] [--no-torch] [--no-hf-flax]

In one run, on the same random batch (Google's format: P=20 masked positions per
sequence), each with AdamW:
* bert_jax: the jitted ``train_step.make_train_step`` on one device (float32 params,
  optimizer and loss): row ``default`` is dtype and matmul_impl "auto" as this machine
  resolves them (``hardware.compute_choice``, printed with the CPU features), then
  float32, bfloat16 with XLA's dots (``bf16-xla``) and bfloat16 with float32-output
  matmuls (``bf16-f32out``, ``bert_jax/matmul.py``);
* PyTorch ``BertForPreTraining`` (transformers 5, ``torch.optim.AdamW``);
* Hugging Face ``FlaxBertForPreTraining`` (transformers 4.57.6) in the
  benchmark-only venv made by ``benchmarks/setup_hf_flax_env.sh`` (subprocess,
  run after ours, never concurrently);
* this machine's matmul peak (2048^3 jnp.dot) in each form the rows use: float32,
  bfloat16 -> bfloat16 (XLA's dots) and bfloat16 -> float32 (f32_out), for MFU.

MFU = model FLOPs per second / peak of the matmul form the row uses. Model FLOPs per
sequence = 3 x forward FLOPs of BERT pretraining with P predictions (matmuls and
attention; the MLM head on the P masked positions). The HF implementations
project all T positions onto the vocabulary, so they do more work than counted.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from bert_jax import model as M
from bert_jax import attention, hardware
from bert_jax import optim, sharding, train_step as T
from bert_jax.weights.hf import config_to_hf

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH_VENV_PY = ROOT / ".cache" / "bench-venv" / "bin" / "python"
PREDICTIONS = 20
# (label, compute dtype, BertConfig.matmul_impl) of the bert_jax rows; "default" resolves "auto"
VARIANTS = (("default", "auto", "auto"), ("float32", "float32", "xla"), ("bf16-xla", "bfloat16", "xla"),
            ("bf16-f32out", "bfloat16", "f32_out"))


def make_batch(batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(seq_len // 2, seq_len + 1, batch_size)
    input_mask = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int32)
    positions = np.stack([np.sort(rng.choice(np.arange(1, n - 1), PREDICTIONS, replace=False)) for n in lengths])
    return dict(
        input_ids=(rng.integers(1000, vocab, (batch_size, seq_len)) * input_mask).astype(np.int32),
        input_mask=input_mask,
        segment_ids=((np.arange(seq_len)[None] >= lengths[:, None] // 2) * input_mask).astype(np.int32),
        masked_lm_positions=positions.astype(np.int32),
        masked_lm_ids=rng.integers(1000, vocab, (batch_size, PREDICTIONS)).astype(np.int32),
        masked_lm_weights=np.ones((batch_size, PREDICTIONS), np.float32),
        next_sentence_labels=rng.integers(0, 2, batch_size).astype(np.int32),
    )


def matmul_peak(dtype, f32_out: bool, n: int = 2048, repeats: int = 10) -> float:
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    b = jnp.asarray(np.random.default_rng(1).normal(size=(n, n)), dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32 if f32_out else None))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def bench_ours(cfg: M.BertConfig, batch: dict, steps: int, warmup: int, compiler_options=None,
               sync_each_step: bool = True) -> dict:
    """Our train step on `batch`: `warmup` steps (the first compiles: `compile_s`), then `steps`
    timed ones, fetching the loss after each (`sync_each_step`) or once at the end (an
    accelerator, where a host sync per step would idle the device)."""
    opt, schedule = optim.make_optimizer({"learning_rate": 1e-4, "warmup_steps": 0, "total_steps": 1000})
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    graphdef, state, shardings = T.create_train_state(cfg, opt, mesh, seed=0)
    step = T.make_train_step(graphdef, opt, mesh, None, shardings, schedule=schedule,
                             compiler_options=compiler_options)
    device_batch = sharding.make_global_batch(batch, mesh)
    key = jax.random.key(0)
    compile_s = 0.0
    for i in range(warmup):
        start = time.perf_counter()
        state, metrics = step(state, device_batch, key)
        float(metrics["loss"])
        compile_s = compile_s or time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, device_batch, key)
        if sync_each_step:
            float(metrics["loss"])
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / steps
    return {"seconds_per_step": seconds, "sequences_per_s": len(batch["input_ids"]) / seconds,
            "loss": float(metrics["loss"]), "compile_s": compile_s}


def bench_torch(cfg: M.BertConfig, batch: dict, steps: int, warmup: int) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    model = transformers.BertForPreTraining(transformers.BertConfig(**config_to_hf(cfg)))
    model.train()
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.999), eps=1e-6)
    b, t = batch["input_ids"].shape
    labels = np.full((b, t), -100, np.int64)
    np.put_along_axis(labels, batch["masked_lm_positions"].astype(np.int64), batch["masked_lm_ids"], axis=1)
    inputs = dict(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                  attention_mask=torch.tensor(batch["input_mask"], dtype=torch.long),
                  token_type_ids=torch.tensor(batch["segment_ids"], dtype=torch.long),
                  labels=torch.tensor(labels), next_sentence_label=torch.tensor(batch["next_sentence_labels"],
                                                                                dtype=torch.long))

    def one_step():
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().item()

    for _ in range(warmup):
        one_step()
    start = time.perf_counter()
    for _ in range(steps):
        loss = one_step()
    seconds = (time.perf_counter() - start) / steps
    return {"seconds_per_step": seconds, "sequences_per_s": b / seconds, "loss": loss,
            "torch": torch.__version__, "transformers": transformers.__version__}


def bench_hf_flax(cfgs: dict, batch: dict, steps: int, warmup: int, dtypes: list[str]) -> dict:
    if not BENCH_VENV_PY.exists():
        subprocess.run(["bash", str(ROOT / "benchmarks" / "setup_hf_flax_env.sh")], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        batch_file = os.path.join(tmp, "batch.npz")
        np.savez(batch_file, **batch)
        job = {"configs": {name: config_to_hf(cfg) for name, cfg in cfgs.items()}, "batch_file": batch_file,
               "steps": steps, "warmup": warmup, "dtypes": dtypes}
        proc = subprocess.run([str(BENCH_VENV_PY), str(ROOT / "benchmarks" / "hf_flax_train_worker.py"),
                               json.dumps(job)], capture_output=True, text=True,
                              env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
    if proc.returncode:
        raise RuntimeError(f"HF Flax worker failed:\n{proc.stderr[-3000:]}")
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[(r["config"], r["dtype"])] = r
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,mini,small,medium,base")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default=",".join(v[0] for v in VARIANTS),
                        help="bert_jax rows to run (on a GPU: --variants bfloat16 --no-torch --no-hf-flax)")
    parser.add_argument("--peak-n", type=int, default=2048,
                        help="matmul size for the peak (8192 on a GPU: small matmuls do not reach its peak)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-hf-flax", action="store_true")
    parser.add_argument("--hf-flax-bf16", action="store_true", help="also run HF Flax with dtype=bfloat16")
    parser.add_argument("--json", help="write all results here")
    args = parser.parse_args()

    default = hardware.compute_choice()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; default: {default.describe()}; "
          f"{attention.describe(M.BertConfig(dtype=default.dtype), seq_len=args.seq)}; "
          f"batch {args.batch}, seq {args.seq}, {PREDICTIONS} predictions, {args.steps} timed steps")
    choices = {label: hardware.compute_choice(d, m) for label, d, m in VARIANTS if label in args.variants.split(",")}
    variants = [(label, c.dtype, c.matmul_impl) for label, c in choices.items()]
    forms = {"float32": ("float32", False), "bfloat16": ("bfloat16", False), "bf16->f32": ("bfloat16", True)}
    peak = {name: matmul_peak(jnp.dtype(d), f32_out, args.peak_n) for name, (d, f32_out) in forms.items()}
    print("matmul peak: " + ", ".join(f"{name} {p / 1e9:.1f} GFLOP/s" for name, p in peak.items()), flush=True)

    names = args.configs.split(",")
    cfgs = {n: M.BertConfig.preset(n, max_position_embeddings=512) for n in names}
    batch = make_batch(args.batch, args.seq, cfgs[names[0]].vocab_size)
    rows = []
    for name, cfg in cfgs.items():
        flops = hardware.pretraining_flops_per_sequence(cfg, args.seq, PREDICTIONS)
        for label, dtype, matmul_impl in variants:
            r = bench_ours(cfg.replace(dtype=dtype, matmul_impl=matmul_impl), batch, args.steps, args.warmup)
            form = "float32" if dtype == "float32" else ("bf16->f32" if matmul_impl == "f32_out" else "bfloat16")
            rows.append({"config": name, "impl": "bert_jax", "dtype": label, "peak_dtype": form, **r})
            print(f"  {name} bert_jax {label}: {r['sequences_per_s']:.2f} seq/s", flush=True)
        if not args.no_torch:
            rows.append({"config": name, "impl": "pytorch", "dtype": "float32",
                         **bench_torch(cfg, batch, args.steps, args.warmup)})
            print(f"  {name} pytorch float32: {rows[-1]['sequences_per_s']:.2f} seq/s", flush=True)
        for row in rows:
            if row["config"] == name:
                row["mfu"] = row["sequences_per_s"] * flops / peak[row.get("peak_dtype", row["dtype"])]
    if not args.no_hf_flax:
        dtypes = ["float32"] + (["bfloat16"] if args.hf_flax_bf16 else [])
        for (name, dtype), r in bench_hf_flax(cfgs, batch, args.steps, args.warmup, dtypes).items():
            flops = hardware.pretraining_flops_per_sequence(cfgs[name], args.seq, PREDICTIONS)
            rows.append({"config": name, "impl": "hf_flax", **r, "dtype": dtype,
                         "mfu": r["sequences_per_s"] * flops / peak[dtype]})

    print(f"\n{'config':8} {'impl':9} {'dtype':9} {'seq/s':>8} {'MFU':>6} {'vs HF Flax fp32':>16} {'vs PyTorch':>11}")
    for name in names:
        ref = {(r["impl"], r["dtype"]): r["sequences_per_s"] for r in rows if r["config"] == name}
        for r in sorted((r for r in rows if r["config"] == name), key=lambda r: (r["impl"], r["dtype"])):
            hf, pt = ref.get(("hf_flax", "float32")), ref.get(("pytorch", "float32"))
            vs_hf = f"{r['sequences_per_s'] / hf:.2f}x" if hf else "-"
            vs_pt = f"{r['sequences_per_s'] / pt:.2f}x" if pt else "-"
            print(f"{name:8} {r['impl']:9} {r['dtype']:9} {r['sequences_per_s']:8.2f} {r['mfu']:6.1%} "
                  f"{vs_hf:>16} {vs_pt:>11}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"peak_flops": peak, "results": rows}, indent=1))


if __name__ == "__main__":
    from bert_jax import _hugepages
    _hugepages.reexec()  # as the entry points run: huge pages for malloc (bert_jax/_hugepages.py)
    main()
