"""One side of bench_time_to_accuracy.py alone, evaluated every N steps: the pilot that picks
a learning rate (or masking rate, or seed) before the side-by-side run.

    python benchmarks/probe_time_to_accuracy.py --side bert_jax [--lr 5e-4] [--mask 0.3] [--no-pre_ln] [--dropout 0.1] [--seed 0]
    python benchmarks/probe_time_to_accuracy.py --side reference [--lr 5e-4] [--seed 0]
        [--batch 16] [--seq 128] [--steps 400] [--every 50] [--cache /tmp/tta/cache]

The same runners (`BertJax`, `RunMlm`), data split, held-out sequences and fixed masks as the
benchmark (its defaults: BERT-mini, 128 held-out sequences of 128 tokens). Prints the step,
the side's own training seconds and the held-out MLM accuracy every --every steps. Accuracy per
step does not depend on the load, so a probe may share the machine; its seconds do.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import bench_time_to_accuracy as bench  # noqa: E402
from bert_jax import tokenizer as tokenizer_lib  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=("bert_jax", "reference"), required=True)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the benchmark's: "
                   "configs/short_budget.py's for bert_jax, 5e-4 for the reference)")
    p.add_argument("--seed", type=int, default=0)
    jax = p.add_argument_group("bert_jax's recipe (defaults: configs/short_budget.py's, as the benchmark's)")
    jax.add_argument("--mask", type=float, dest="jax_mask", help="data.masked_lm_prob")
    jax.add_argument("--dropout", type=float, dest="jax_dropout", help="hidden and attention dropout")
    jax.add_argument("--pre_ln", action=argparse.BooleanOptionalAction, dest="jax_pre_ln", help="model.pre_layer_norm")
    jax.add_argument("--warmup", type=float, dest="jax_warmup", help="share of the steps warming up")
    jax.add_argument("--b2", type=float, dest="jax_b2", help="AdamW's beta2")
    jax.set_defaults(**{k: v for k, v in bench.recipe_defaults().items() if k not in ("jax_lr",)})
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=400, help="the schedule's length")
    p.add_argument("--every", type=int, default=50, help="steps between evaluations")
    p.add_argument("--eval_sequences", type=int, default=128)
    p.add_argument("--cache", help="bert_jax's prepared data kept here between runs (as the benchmark's)")
    a = p.parse_args(argv)
    recipe = {k: v for k, v in vars(a).items() if k.startswith("jax_")}
    recipe["jax_lr"] = a.lr or bench.recipe_defaults()["jax_lr"]
    a.lr = a.lr or (recipe["jax_lr"] if a.side == "bert_jax" else 5e-4)
    args = argparse.Namespace(size="mini", batch=a.batch, seq=a.seq, steps=a.steps, seed=a.seed,
                              corpus=str(bench.CORPUS), holdout_every=20, max_articles=None, **recipe,
                              lr=a.lr, warmup=0.1)
    train, held = bench.split_articles(args.corpus, args.holdout_every, args.max_articles)
    tok = tokenizer_lib.load_tokenizer(bench.vocab_file())
    batch = bench.held_out_batch(bench.held_out_rows(held, tok, a.seq)[:a.eval_sequences], tok)
    with tempfile.TemporaryDirectory(prefix="probe_tta_") as tmp:
        train_file, work = bench.training_data_paths(pathlib.Path(a.cache or tmp), args, train)
        if a.side == "bert_jax":
            runner = bench.BertJax(args, str(train_file), work)
        else:
            runner = bench.RunMlm(args, train, bench.reference_model_config("mini", tok.vocab_size), seed=a.seed)
        print(f"{a.side}: {runner.describe()}", flush=True)
        while runner.steps_done < a.steps:
            target = min(a.steps, runner.steps_done + a.every)
            while runner.steps_done < target:
                runner.train_for(1e-9)  # one step
            print(f"{a.side} lr {a.lr} mask {a.jax_mask if a.side == 'bert_jax' else 0.15} "
                  f"pre_ln {a.jax_pre_ln if a.side == 'bert_jax' else False} "
                  f"dropout {a.jax_dropout if a.side == 'bert_jax' else 0.1} seed {a.seed} "
                  f"step {runner.steps_done} {runner.clock:.0f} s accuracy {runner.evaluate(batch):.4f} "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    return 0


if __name__ == "__main__":
    from bert_jax import _hugepages
    _hugepages.reexec()  # as the entry points run: huge pages for malloc (bert_jax/_hugepages.py)
    sys.exit(main())
