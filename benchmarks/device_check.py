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
  up to 32; then transformers' PyTorch ``BertForSequenceClassification`` on the same batches
  (bfloat16 autocast, SDPA attention, fused AdamW), the ratio in the same run;
* attention alone at BERT-large's heads on packed rows (forward and backward): XLA's, cuDNN's
  with the segment mask as a bias (today's ``cudnn`` packed path) and cuDNN's packed layout
  (``attention.cudnn_segments``), each against a float32 reference on the real tokens.

Instance lengths are drawn from the real GLUE train histograms (``../shared/data/glue_lengths.json``,
real token counts; random token ids). ``--tiny`` runs the same code with a 2-layer model on the
host's CPU (attention ``xla`` only) so the script keeps working. Each
measurement is one compile (layers scanned) plus ``--steps`` timed steps; once ``--budget``
seconds have passed the rest is skipped and marked so in the JSON. A measurement that fails is
recorded (``errors``: its name and the error's last line) and the check goes on: one short run
on a lent GPU must bring back every figure it can. Steps are timed without a host sync between
them (one at the end).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import re
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_train import bench_ours, matmul_peak  # noqa: E402
from bert_jax import attention, hardware, losses, optim, sharding  # noqa: E402
from bert_jax import train_step as T  # noqa: E402
from bert_jax.model import BertConfig, BertForSequenceClassification  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
# ../shared does not travel to a lent machine: --glue-lengths (or BERT_JAX_GLUE_LENGTHS) names a copy
GLUE_LENGTHS = pathlib.Path(os.environ.get("BERT_JAX_GLUE_LENGTHS",
                                           ROOT.parent / "shared" / "data" / "glue_lengths.json"))
FINETUNE_TASKS = ("CoLA", "MRPC", "RTE")


def glue_lengths(tasks=None) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, probabilities) of the GLUE train histograms of `tasks` (all when None)."""
    if not GLUE_LENGTHS.is_file():
        raise FileNotFoundError(f"{GLUE_LENGTHS}: the GLUE length histograms are missing (see ../shared/data; "
                                "--glue-lengths names another copy)")
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


class TorchFineTuner:
    """transformers' BertForSequenceClassification on the same batches: what a PyTorch user runs
    (bfloat16 autocast on a GPU, SDPA attention, AdamW lr 2e-5 with weight decay 0.01, gradient
    clipping at 1.0; each batch at the width it was padded to)."""

    def __init__(self, cfg: BertConfig):
        import torch
        import transformers

        from bert_jax.weights.hf import config_to_hf

        torch.manual_seed(0)
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        hf = transformers.BertConfig(**config_to_hf(cfg), num_labels=2)
        self.model = transformers.BertForSequenceClassification(hf).to(self.device).train()
        fused = {"fused": True} if self.device == "cuda" else {}
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=2e-5, weight_decay=0.01, **fused)
        self.describe = (f"torch {torch.__version__}, transformers {transformers.__version__}, {self.device}, "
                         f"attention {getattr(hf, '_attn_implementation', '?')}, "
                         f"autocast {'bfloat16' if self.device == 'cuda' else 'off'}")

    def _step(self, inputs, labels):
        torch = self.torch
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"):
            loss = self.model(**inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def examples_per_second(self, batches: list[dict]) -> float:
        torch = self.torch
        moved = [({"input_ids": torch.from_numpy(b["input_ids"].astype(np.int64)).to(self.device),
                   "attention_mask": torch.from_numpy(b["input_mask"].astype(np.int64)).to(self.device),
                   "token_type_ids": torch.from_numpy(b["segment_ids"].astype(np.int64)).to(self.device)},
                  torch.from_numpy(b["label_ids"].astype(np.int64)).to(self.device)) for b in batches]
        for inputs, labels in moved:  # warm up every width
            loss = self._step(inputs, labels)
        loss.item()
        start = time.perf_counter()
        for inputs, labels in moved:
            loss = self._step(inputs, labels)
        loss.item()  # one sync at the end
        return sum(len(b["input_ids"]) for b in batches) / (time.perf_counter() - start)


def attention_check(batch: dict, heads: int, head_dim: int, impls: tuple[str, ...], reps: int) -> list[dict]:
    """Attention alone on the packed `batch`'s rows ([B, T, heads, head_dim] bfloat16 q, k, v):
    per path, the forward and backward time and the largest error of the output and of
    dq/dk/dv on real tokens against a float32 XLA reference."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_sdpa

    ids, mask = jnp.asarray(batch["packed_segment_ids"]), jnp.asarray(batch["input_mask"])
    rows, seq = ids.shape
    max_segments = int(np.asarray(batch["packed_segment_ids"]).max())
    rng = np.random.default_rng(0)
    q, k, v, g = (jnp.asarray(rng.normal(size=(rows, seq, heads, head_dim)), jnp.bfloat16) for _ in range(4))
    seg_mask = attention.attention_mask(mask, ids)
    seqlen, offsets = attention.cudnn_segments(ids, mask, max_segments)
    scale = 1.0 / np.sqrt(head_dim)

    def offsets_path(mask_type):
        return lambda q, k, v: cudnn_sdpa.dot_product_attention(
            q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen, q_offsets=offsets, kv_offsets=offsets, scale=scale,
            mask_type=getattr(cudnn_sdpa.MaskType, mask_type), qkv_layout="BTNH")

    paths = {"xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=seg_mask, implementation="xla"),
             "cudnn mask bias": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=seg_mask,
                                                                            implementation="cudnn"),
             "cudnn offsets padding": offsets_path("PADDING"), "cudnn offsets no_mask": offsets_path("NO_MASK")}
    real = mask.astype(bool)[:, :, None, None]

    def fwd_bwd(f):
        def loss(q, k, v):
            return jnp.sum(jnp.where(real, f(q, k, v).astype(jnp.float32) * g.astype(jnp.float32), 0.0))
        return jax.jit(lambda q, k, v: (f(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))

    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref_out, ref_grads = jax.jit(lambda q, k, v: fwd_bwd(
        lambda a, b, c: jax.nn.dot_product_attention(a, b, c, mask=seg_mask, implementation="xla"))(q, k, v))(
        f32(q), f32(k), f32(v))
    out = []
    for name in impls:
        fn = fwd_bwd(paths[name])
        o, grads = fn(q, k, v)
        jax.block_until_ready((o, grads))
        start = time.perf_counter()
        for _ in range(reps):
            o, grads = fn(q, k, v)
        jax.block_until_ready((o, grads))
        ms = (time.perf_counter() - start) / reps * 1e3
        err = lambda a, b: float(jnp.max(jnp.where(real, jnp.abs(f32(a) - b), 0.0)))  # noqa: E731
        out.append({"path": name, "rows": rows, "seq": seq, "heads": heads, "head_dim": head_dim,
                    "max_segments": max_segments, "fwd_bwd_ms": ms, "out_max_error": err(o, ref_out),
                    "grad_max_error": max(err(a, b) for a, b in zip(grads, ref_grads)),
                    "ref_out_max": float(jnp.max(jnp.abs(ref_out))),
                    "ref_grad_max": max(float(jnp.max(jnp.abs(b))) for b in ref_grads)})
    return out


class Check:
    """Runs measurements in order until `budget` seconds have passed; a failure is recorded
    (name and the error's last line) and the check goes on."""

    def __init__(self, report: dict, budget: float, path: pathlib.Path, only: str | None = None):
        self.report, self.budget, self.path, self.start = report, budget, path, time.perf_counter()
        self.only = re.compile(only) if only else None
        self.save()

    def save(self) -> None:  # after every measurement: a run stopped from outside keeps what it measured
        self.report["seconds"] = time.perf_counter() - self.start
        self.path.write_text(json.dumps(self.report, indent=1))

    def run(self, name: str, fn):
        if self.only and not self.only.search(name):
            return None
        if time.perf_counter() - self.start > self.budget:
            self.report["skipped"].append(name)
            return None
        began = time.perf_counter()
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001: one failure must not lose the other figures
            line = (str(e).strip().splitlines() or [type(e).__name__])[-1][:400]
            self.report["errors"].append({"name": name, "error": f"{type(e).__name__}: {line}"})
            print(f"  {name}: FAILED ({type(e).__name__}: {line})", flush=True)
            traceback.print_exc(limit=3)
            return None
        finally:
            self.save()
        print(f"  {name}: done in {time.perf_counter() - began:.0f} s", flush=True)
        return result


def main(argv=None) -> int:
    global GLUE_LENGTHS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU: seconds")
    parser.add_argument("--json", default="device_check.json")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 10, tiny 2)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds after which the rest is skipped (default 420; none with --tiny)")
    parser.add_argument("--glue-lengths", default=str(GLUE_LENGTHS), help="glue_lengths.json (../shared/data)")
    parser.add_argument("--no-torch", action="store_true", help="skip transformers' PyTorch reference")
    parser.add_argument("--only", default=None, help="a regular expression: run only the measurements it finds "
                        "in their names (e.g. 'seq 128 padded cudnn|attention dropout 0')")
    parser.add_argument("--rows", type=int, default=None, help="rows per pretraining batch at sequence 128")
    args = parser.parse_args(argv)
    GLUE_LENGTHS = pathlib.Path(args.glue_lengths)
    if not GLUE_LENGTHS.is_file():  # one line now, not a failure per measurement
        parser.error(f"--glue-lengths {GLUE_LENGTHS}: no such file (the GLUE length histograms: "
                     "../shared/data/glue_lengths.json)")
    platform = jax.default_backend()
    fused = "cudnn" if platform == "gpu" else ("splash" if platform == "tpu" else "xla")
    if args.tiny:  # one width per fine-tuning batch; on a CPU XLA's fastest compiles
        base = BertConfig.preset("tiny", num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                 intermediate_size=128, vocab_size=2048)
        large, finetune, shapes, peak_n = base, base, ((128, 4, 20),), 256
        ft_batch, ft_width_step, ft_batches, steps = 8, 128, 2, args.steps or 2
        budget = args.budget or float("inf")
        options = {"xla_backend_optimization_level": 0} if platform == "cpu" else None
        attn_shape, attn_reps = (128, 4, 2, 32), 2
    else:
        large, finetune = BertConfig.preset("large"), BertConfig.preset("base")
        shapes, peak_n = ((128, args.rows or 128, 20), (512, 32, 76)), 8192
        ft_batch, ft_width_step, ft_batches, steps = 32, 32, 10, args.steps or 10
        budget, options = args.budget or 420.0, None
        attn_shape, attn_reps = (512, 32, 16, 64), 20
    dtype = "bfloat16" if platform != "cpu" else hardware.compute_choice().dtype
    device = jax.devices()[0]
    peak = matmul_peak(jnp.dtype(dtype), False, peak_n)
    report = {"device": getattr(device, "device_kind", device.platform), "platform": platform,
              "jax": jax.__version__, "dtype": dtype, "peak_flops": peak, "peak_matmul": f"{peak_n}^3 {dtype}",
              "cpu_features": sorted(hardware.cpu_features()), "pretraining": [], "finetuning": [],
              "torch_finetuning": [], "attention": [], "skipped": [], "errors": []}
    for lib in ("flax", "optax"):
        report[lib] = getattr(__import__(lib), "__version__", "?")
    print(f"device check on {report['device']} ({platform}), jax {jax.__version__}, flax {report['flax']}, "
          f"compute {dtype}; {peak_n}^3 {dtype} matmul peak {peak / 1e12:.3f} TFLOP/s", flush=True)
    check = Check(report, budget, pathlib.Path(args.json), args.only)
    rng = np.random.default_rng(0)
    pretraining_batches = {(seq, kind): pretraining_rows(rows, seq, predictions, large.vocab_size,
                                                         kind == "packed", rng)
                           for seq, rows, predictions in shapes for kind in ("padded", "packed")}

    def pretrain(seq, rows, predictions, kind, impl, attention_dropout=0.0):
        """`impl` with attention dropout 0 (the fused kernel runs), or the default 0.1 (the
        explicit path, whatever was asked)."""
        batch, instances = pretraining_batches[seq, kind]
        cfg = large.replace(dtype=dtype, attention_impl=impl, attention_probs_dropout_prob=attention_dropout,
                            scan_layers=True)
        r = bench_ours(cfg, batch, steps, warmup=2, compiler_options=options, sync_each_step=False)
        if not np.isfinite(r["loss"]):
            raise FloatingPointError(f"loss {r['loss']} after {steps + 2} steps")
        rate = r["sequences_per_s"]  # rows
        flops = hardware.pretraining_flops_per_sequence(cfg, seq, predictions) * rate
        label = impl + (f", dropout {attention_dropout:g}" if attention_dropout else "")
        report["pretraining"].append({
            "seq": seq, "rows": rows, "batch": kind, "attention": label, "predictions": predictions,
            "path": attention.describe(cfg, seq_len=seq, packed=kind == "packed"),
            "rows_per_s": rate, "sequences_per_s": rate * instances / rows,
            "real_tokens_per_s": rate * batch["input_mask"].sum() / rows,
            "packing_efficiency": float(batch["input_mask"].mean()), "mfu": flops / peak,
            "compile_s": r["compile_s"], "loss": r["loss"]})
        print(f"  seq {seq} {kind} {label}: {rate:.2f} rows/s, MFU {flops / peak:.1%}", flush=True)

    def pretraining_block(seq, rows, predictions):
        for kind in ("padded", "packed"):
            for impl in (fused,) if args.tiny else (fused, "explicit"):  # tiny: half the compiles
                check.run(f"pretrain seq {seq} {kind} {impl}", functools.partial(pretrain, seq, rows, predictions,
                                                                               kind, impl))

    pretraining_block(*shapes[0])  # sequence 128 first, then fine-tuning, then 512 (budget order)
    cfg = finetune.replace(dtype=dtype)
    ft_data = {task: finetune_batches(task, ft_batch, 128, ft_width_step, ft_batches, finetune.vocab_size, rng)
               for task in FINETUNE_TASKS}
    tuner = check.run("finetune setup", lambda: FineTuner(cfg, options))
    for task in FINETUNE_TASKS if tuner else ():
        rate = check.run(f"finetune {task}", functools.partial(tuner.examples_per_second, ft_data[task]))
        if rate is not None:
            report["finetuning"].append({"task": task, "batch": ft_batch,
                                         "path": attention.describe(cfg, seq_len=128), "examples_per_s": rate})
    torch_tuner = None if args.no_torch else check.run("torch finetune setup", lambda: TorchFineTuner(cfg))
    for task in FINETUNE_TASKS if torch_tuner else ():
        rate = check.run(f"torch finetune {task}", functools.partial(torch_tuner.examples_per_second, ft_data[task]))
        if rate is not None:
            report["torch_finetuning"].append({"task": task, "batch": ft_batch, "examples_per_s": rate,
                                               "describe": torch_tuner.describe})
    del torch_tuner
    seq, rows, heads, head_dim = attn_shape
    attn_batch = pretraining_rows(rows, seq, 8, large.vocab_size, True, rng)[0]
    impls = ("xla",) if platform != "gpu" else ("xla", "cudnn mask bias", "cudnn offsets padding",
                                                "cudnn offsets no_mask")
    for impl in impls:
        result = check.run(f"attention {impl} seq {seq}",
                           functools.partial(attention_check, attn_batch, heads, head_dim, (impl,), attn_reps))
        report["attention"] += result or []
    for shape in shapes[1:]:
        pretraining_block(*shape)
    if not args.tiny:  # what the defaults pay on a GPU: attention dropout forces the unfused path
        seq, rows, predictions = shapes[0]
        check.run(f"pretrain seq {seq} padded explicit attention dropout 0.1",
                  lambda: pretrain(seq, rows, predictions, "padded", "explicit", large.attention_probs_dropout_prob))
        cfg0 = cfg.replace(attention_probs_dropout_prob=0.0)
        tuner0 = check.run("finetune setup, attention dropout 0", lambda: FineTuner(cfg0, options))
        for task in FINETUNE_TASKS if tuner0 else ():
            rate = check.run(f"finetune {task} attention dropout 0",
                             functools.partial(tuner0.examples_per_second, ft_data[task]))
            if rate is not None:
                report["finetuning"].append({"task": task, "batch": ft_batch, "attention_dropout": 0.0,
                                             "path": attention.describe(cfg0, seq_len=128), "examples_per_s": rate})

    print(f"\n{'pretraining':32} {'rows/s':>9} {'seq/s':>9} {'tokens/s':>10} {'fill':>5} {'MFU':>6} {'compile':>8}")
    for r in report["pretraining"]:
        label = f"seq {r['seq']} {r['batch']} {r['attention']}"
        print(f"{label:32} {r['rows_per_s']:9.2f} {r['sequences_per_s']:9.2f} {r['real_tokens_per_s']:10.0f} "
              f"{r['packing_efficiency']:5.0%} {r['mfu']:6.1%} {r['compile_s']:7.0f}s")
    torch_rates = {r["task"]: r["examples_per_s"] for r in report["torch_finetuning"]}
    print(f"\n{'fine-tuning (examples/s)':32} {'bert_jax':>10} {'PyTorch':>10} {'ratio':>7}")
    for r in report["finetuning"]:
        t = torch_rates.get(r["task"])
        label = r["task"] + (" (attention dropout 0)" if "attention_dropout" in r else "")
        print(f"{label:32} {r['examples_per_s']:10.1f} {t or float('nan'):10.1f} "
              f"{r['examples_per_s'] / t if t else float('nan'):7.2f}")
    if report["attention"]:
        print(f"\n{'attention, packed, fwd+bwd':32} {'ms':>8} {'out err':>9} {'grad err':>9}")
        for r in report["attention"]:
            print(f"{r['path']:32} {r['fwd_bwd_ms']:8.2f} {r['out_max_error']:9.4f} {r['grad_max_error']:9.4f}")
    if report["skipped"]:
        print(f"\nskipped (past the {budget:g} s budget): {', '.join(report['skipped'])}")
    for e in report["errors"]:
        print(f"failed: {e['name']}: {e['error']}")
    check.save()
    print(f"\n{args.json} written ({report['seconds']:.0f} s; load average {os.getloadavg()[0]:.1f})")
    return 0 if not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
