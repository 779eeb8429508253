"""Offline preparation: corpus -> tokenized sentence-pair instances in memory-mapped shards.

    python -m bert_jax.data.prepare --input 'corpus/*.txt' --tokenizer vocab.txt \
        --output data/wiki128 --max_seq_length 128 --eval_fraction 0.01 --workers 8
    python -m bert_jax.data.prepare --input demo ...              # embedded demo corpus
    python -m bert_jax.data.prepare --input tfds:wikipedia/20230601.en --tfds_data_dir ...
    ... --static_masking --dupe_factor 5 --max_predictions_per_seq 20   # Google-style static masks
    ... --objective mlm --masked_lm_prob 0.3     # MLM only: one-segment rows, no NSP pairs (MosaicBERT)
    ... --output_format tfrecord       # Google/MLPerf TFRecords (static masks) for any BERT trainer

Output directory (read by `bert_jax.data.loader.make_pretraining_loader`):
    metadata.json            settings, vocabulary ids, per-split shards and counts, summary
    vocab_tables.npz         word_start (bool[V]) and replacement_ids: masking needs no tokenizer
    tokenizer/               the tokenizer, saved with `Tokenizer.save`
    {train,eval}-NNNNN.npy   instance rows (`instances.instance_dtype`), memory-mapped by the loader
                             (--output_format tfrecord: {train,eval}-NNNNN.tfrecord, `tfrecord.FEATURES`)

Why .npy rows and not ArrayRecord: rows have a fixed size, so a batch is one fancy-indexing
gather from the page cache with no per-record decoding; Grain reads them through a
RandomAccess-style `InstanceShards`. Evaluation documents are held out whole (--eval_fraction).

Work is spread over processes twice: sentence splitting + tokenization by chunks of documents,
streamed to files on disk as they come (`corpus_files`: no process holds the tokenized corpus;
the parent keeps 8 bytes per document), then instance creation (+ static masks) by shards, each
worker memory-mapping the corpus for one shard at a time. Each document's randomness comes from
(seed, dupe, document), so the output does not depend on --workers. Everything is written to
a temporary directory that replaces --output only at the end: a failed run damages nothing.
The summary reports the share of [UNK] tokens; over --max_unk_fraction it is an error.
"""
from __future__ import annotations

import collections
import json
import logging
import multiprocessing
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np
import tqdm
from absl import flags

from bert_jax import cli
from bert_jax import tokenizer as tokenizer_lib
from bert_jax.data import instances as instances_lib
from bert_jax.data import corpus_files, masking, tfrecord
from bert_jax.data import sentences, sources
from bert_jax.data.sources import DataSource

OUTPUT_FORMATS = ("npy", "tfrecord")
FORMAT_NAMES = {"npy": instances_lib.INSTANCES_FORMAT, "tfrecord": "google_bert.tfrecord/1"}  # metadata "format"
DEFAULT_MAX_UNK_FRACTION = 0.05  # a fitting WordPiece vocabulary gives well under 1% [UNK] on English text
_UNK_TOKENS = "[UNK] tokens"
_TOKENS_PER_MAP = 1 << 18  # documents per corpus map in an instance worker: ~6 MB of its pages at a time
_DOCUMENT_TOKENS = "document_tokens.npy"
_STATIC_MASK_PURPOSE = 0x737461  # keeps static-mask keys apart from the loader's dynamic ones
_DOCUMENTS_PER_TASK = 256
_CHARACTERS_PER_TASK = 50_000  # pysbd splits ~50 kB/s: small tasks keep every worker busy

_worker = {}  # per-process: the tokenizer and its masking tables (loaded once per worker)


def _init_worker(tokenizer_dir):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _worker["tokenizer"] = tokenizer_lib.load_tokenizer(tokenizer_dir)
    _worker["vocab"] = masking.MaskingVocab.from_tokenizer(_worker["tokenizer"])


def _tokenize_documents(task):
    """(documents, split?) -> flat tokens, sentence lengths, sentences per document, counts (with [UNK]s)."""
    documents, split_paragraphs = task
    tok = _worker["tokenizer"]
    counts = collections.Counter()
    lengths, per_document, tokens = [], [], []
    for document in documents:
        if split_paragraphs:
            document = [s for paragraph in document for s in sentences.split_sentences(paragraph)]
        encoded = [ids for ids in tok.encode_batch(document) if ids] if document else []
        counts["empty sentences (no tokens) skipped"] += len(document) - len(encoded)
        if not encoded:
            counts["empty documents skipped"] += 1
            continue
        counts["one-sentence documents"] += len(encoded) == 1
        tokens.extend(encoded)
        lengths.extend(len(ids) for ids in encoded)
        per_document.append(len(encoded))
    flat = np.fromiter((i for ids in tokens for i in ids), np.int32) if tokens else np.zeros(0, np.int32)
    counts[_UNK_TOKENS] = int(np.count_nonzero(flat == tok.unk_id))
    return flat, np.asarray(lengths, np.int64), np.asarray(per_document, np.int64), counts, len(documents)


def _make_shard(task):
    """Instances of one range of documents of a split, for one dupe; written as one .npy."""
    (path, corpus_dir, split, first, last, dupe, settings) = task
    split_documents = np.load(os.path.join(corpus_dir, f"{split}_documents.npy"))
    documents = split_documents[first:last]
    document_tokens = np.load(os.path.join(corpus_dir, _DOCUMENT_TOKENS), mmap_mode="r")[documents]
    # The corpus is mapped afresh per group of documents: the pages that a group's random next
    # sentences touched (anywhere in the corpus) leave this process with its map.
    rows = np.concatenate([instances_lib.create_instances(
        corpus_files.open_corpus(corpus_dir), split_documents, documents[a:b],
        max_seq_length=settings["max_seq_length"], short_seq_prob=settings["short_seq_prob"], seed=settings["seed"],
        dupe=dupe, cls_id=settings["cls_id"], sep_id=settings["sep_id"], vocab_size=settings["vocab_size"],
        objective=settings["objective"])
        for a, b in _token_ranges(document_tokens, _TOKENS_PER_MAP)])
    if settings["static_masking"]:
        batch = instances_lib.unmasked_batch(rows)
        keys = masking.example_keys(settings["seed"], _STATIC_MASK_PURPOSE, dupe, rows["document"],
                                    np.arange(len(rows)) - np.searchsorted(rows["document"], rows["document"]))
        masked = masking.mask_batch(batch["input_ids"], batch["input_mask"], keys, _worker["vocab"],
                                    max_predictions_per_seq=settings["max_predictions_per_seq"],
                                    masked_lm_prob=settings["masked_lm_prob"],
                                    whole_word_masking=settings["whole_word_masking"])
        rows = instances_lib.with_stored_masks(rows, masked)
    if settings["output_format"] == "tfrecord":
        with tfrecord.TFRecordWriter(path) as writer:
            writer.write_batch({**instances_lib.unmasked_batch(rows), **instances_lib.stored_masks(rows)})
    else:
        np.save(path, rows)
    random_next = int(rows["next_sentence_label"].sum()) if "next_sentence_label" in rows.dtype.names else 0
    return {"file": os.path.basename(path), "instances": len(rows), "random_next": random_next}


def _read_tasks(source: DataSource, *, input_format, stats):
    """Chunks of documents for the tokenizer workers, with whether they still need sentence splitting."""
    if source.kind == "text":
        stream = _text_file_stream(source, input_format, stats)
    else:
        stream = ((d, False) for d in sources.documents(source, stats=stats))
    chunk, chunk_needs_split, characters = [], False, 0
    for document, needs_split in stream:
        if chunk and (needs_split != chunk_needs_split or len(chunk) >= _DOCUMENTS_PER_TASK
                      or characters >= _CHARACTERS_PER_TASK):
            yield chunk, chunk_needs_split
            chunk, characters = [], 0
        chunk.append(document)
        chunk_needs_split = needs_split
        characters += sum(map(len, document))
    if chunk:
        yield chunk, chunk_needs_split


def _text_file_stream(source: DataSource, input_format, stats):
    for path in sources.expand_paths(source.paths):
        file_format = input_format
        if input_format == "auto":
            with open(path, "rb") as f:
                head = [line.decode("utf-8", "replace") for _, line in zip(range(1000), f)]
            file_format = sources.sniff_format(head)
        for document in sources.text_file_documents([path], file_format, stats=stats, split=False):
            yield document, file_format in sources.PARAGRAPH_FORMATS


def prepare(source: DataSource, tokenizer_path, output_dir, *, max_seq_length=128, short_seq_prob=0.1,
            eval_fraction=0.0, seed=12345, static_masking=False, dupe_factor=None, max_predictions_per_seq=None,
            masked_lm_prob=0.15, whole_word_masking=False, workers=None, input_format="auto",
            shard_tokens=20_000_000, overwrite=False, progress=True, output_format="npy",
            max_unk_fraction=DEFAULT_MAX_UNK_FRACTION, objective="mlm_nsp") -> dict:
    """Runs the whole preparation of a text source (`sources.DataSource` of kind demo, text or
    tfds_text); returns the metadata written to output_dir/metadata.json.

    output_format 'tfrecord' writes Google's TFRecords (static masks) instead of .npy rows. A share
    of [UNK] tokens over max_unk_fraction is an error (the vocabulary does not fit the corpus).
    `objective`: mlm_nsp (sentence pairs with NSP labels) or mlm (one-segment rows,
    `instances.create_instances`); max_predictions_per_seq None: it follows masked_lm_prob
    (`masking.default_max_predictions`)."""
    if objective not in instances_lib.OBJECTIVES:
        raise ValueError(f"objective must be one of {instances_lib.OBJECTIVES}, got {objective!r}")
    if output_format == "tfrecord" and objective != "mlm_nsp":
        raise ValueError("output_format tfrecord writes Google's sentence pairs with NSP labels: "
                         "objective mlm_nsp only")
    if max_predictions_per_seq is None:
        max_predictions_per_seq = masking.default_max_predictions(masked_lm_prob, max_seq_length)
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    if not 0.0 <= max_unk_fraction <= 1.0:
        raise ValueError(f"max_unk_fraction must be in [0, 1], got {max_unk_fraction}")
    static_masking = static_masking or output_format == "tfrecord"  # Google's format carries its masks
    if not source.is_text:
        raise ValueError(f"{source} holds pretraining instances already; prepare reads text")
    output_dir = pathlib.Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty (pass --overwrite to replace it)")
    if max_seq_length < 5:
        raise ValueError(f"max_seq_length must be at least 5, got {max_seq_length}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    dupe_factor = dupe_factor or (5 if static_masking else 1)
    workers = workers or os.cpu_count() or 1
    tok = tokenizer_lib.load_tokenizer(tokenizer_path)
    started = time.perf_counter()

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    pool = None
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        tok.save(staging / "tokenizer")
        vocab = masking.MaskingVocab.from_tokenizer(tok)
        np.savez(staging / instances_lib.VOCAB_TABLES_FILE, word_start=vocab.word_start,
                 replacement_ids=vocab.replacement_ids)
        # 1. Sentence splitting and tokenization, by chunks of documents, streamed to disk.
        stats = sources.SourceStats()
        counts = collections.Counter()
        pairs = objective == "mlm_nsp"
        room, fate = (max_seq_length - 3, "truncated") if pairs else (max_seq_length - 2, "cut into pieces")
        long_sentences = f"sentences longer than {room} tokens ({fate})"
        corpus_dir = staging / "corpus"
        corpus = corpus_files.CorpusWriter(corpus_dir)
        pool = _pool(workers, str(staging / "tokenizer"))
        with tqdm.tqdm(desc="tokenize", unit=" docs", disable=not progress) as bar:
            tasks = _read_tasks(source, input_format=input_format, stats=stats)
            for flat, sentence_lengths, sentences_per_document, chunk_counts, read in _imap_ahead(
                    pool, _tokenize_documents, tasks, ahead=2 * workers):
                corpus.append(flat, sentence_lengths, sentences_per_document)
                counts.update(chunk_counts)
                counts[long_sentences] += int((sentence_lengths > room).sum())
                bar.update(read)
        document_tokens = corpus.close()
        if corpus.documents < (2 if pairs else 1):
            need = "next-sentence pairs need at least 2" if pairs else "none to train on"
            raise ValueError(f"{source}: {corpus.documents} usable document(s); {need} ({stats.summary()})")
        unk_tokens = counts.pop(_UNK_TOKENS, 0)
        _check_unk_share(unk_tokens, corpus.tokens, tokenizer_path, max_unk_fraction)

        # 2. Hold out evaluation documents.
        order = np.random.default_rng(seed).permutation(corpus.documents)
        num_eval = 0 if eval_fraction == 0 else max(2, round(eval_fraction * corpus.documents))
        if num_eval and corpus.documents - num_eval < 2:
            raise ValueError(f"eval_fraction {eval_fraction} leaves fewer than 2 training documents"
                             f" of {corpus.documents}")
        splits = {"train": np.sort(order[num_eval:])}
        if num_eval:
            splits["eval"] = np.sort(order[:num_eval])

        # 3. Instances (and static masks), one shard per (split, dupe, range of documents).
        settings = {"max_seq_length": max_seq_length, "short_seq_prob": short_seq_prob, "seed": seed,
                    "objective": objective,
                    "cls_id": tok.cls_id, "sep_id": tok.sep_id, "vocab_size": tok.vocab_size,
                    "static_masking": static_masking, "max_predictions_per_seq": max_predictions_per_seq,
                    "masked_lm_prob": masked_lm_prob, "whole_word_masking": whole_word_masking,
                    "output_format": output_format}
        shard_tasks = []
        np.save(corpus_dir / _DOCUMENT_TOKENS, document_tokens)
        for split, documents in splits.items():
            np.save(corpus_dir / f"{split}_documents.npy", documents)
            for dupe in range(dupe_factor):
                for first, last in _token_ranges(document_tokens[documents], shard_tokens):
                    shard_tasks.append((str(staging / f"{split}-{len(shard_tasks):05d}.{output_format}"),
                                        str(corpus_dir), split, first, last, dupe, settings))
        metadata_splits = {split: {"documents": int(len(documents)), "shards": [], "instances": 0,
                                   "random_next": 0} for split, documents in splits.items()}
        results = pool.imap(_make_shard, shard_tasks)
        for task, shard in tqdm.tqdm(zip(shard_tasks, results), total=len(shard_tasks),
                                     desc="instances", unit=" shards", disable=not progress):
            entry = metadata_splits[task[2]]
            entry["shards"].append({"file": shard["file"], "instances": shard["instances"]})
            entry["instances"] += shard["instances"]
            entry["random_next"] += shard["random_next"]
        pool.close()
        shutil.rmtree(corpus_dir)

        metadata = {
            "format": FORMAT_NAMES[output_format],
            "source": source.spec(), "objective": objective, "tokenizer": "tokenizer", "tokenizer_kind": tok.kind,
            "vocab_size": tok.vocab_size, "special_ids": list(tok.special_ids), "mask_id": tok.mask_id,
            "cls_id": tok.cls_id, "sep_id": tok.sep_id, "pad_id": tok.pad_id,
            "max_seq_length": max_seq_length, "short_seq_prob": short_seq_prob, "seed": seed,
            "static_masking": static_masking, "dupe_factor": dupe_factor,
            "max_predictions_per_seq": max_predictions_per_seq if static_masking else None,
            "masked_lm_prob": masked_lm_prob, "whole_word_masking": whole_word_masking if static_masking else None,
            "eval_fraction": eval_fraction, "splits": metadata_splits,
            "summary": {"documents_read": stats.documents,
                        "documents": corpus.documents, "sentences": corpus.sentences,
                        "tokens": corpus.tokens, "unk_tokens": unk_tokens, "workers": workers,
                        "seconds": round(time.perf_counter() - started, 2),
                        "skipped_lines": dict(stats.skipped), "skipped_examples": stats.examples,
                        **{k: int(v) for k, v in counts.items()}},
        }
        (staging / instances_lib.METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        _replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return metadata


class _InProcess:
    """workers=1: the same functions in this process (no start-up cost, easy to debug)."""

    def __init__(self, tokenizer_dir):
        _init_worker(tokenizer_dir)

    imap = staticmethod(map)

    def close(self):
        pass

    terminate = join = close


def _token_ranges(document_tokens: np.ndarray, every: int) -> list[tuple[int, int]]:
    """[first, last) ranges of consecutive documents, a new one from each multiple of `every` tokens."""
    cumulative = np.cumsum(document_tokens)
    bounds = np.unique(np.searchsorted(cumulative, np.arange(every, cumulative[-1], every)))
    edges = np.concatenate([[0], bounds, [len(document_tokens)]])
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _imap_ahead(pool, function, tasks, *, ahead: int):
    """pool.imap, in order, reading at most `ahead` tasks ahead of the results taken (Pool.imap
    reads the whole task iterator at once: all of the corpus text)."""
    if isinstance(pool, _InProcess):
        yield from map(function, tasks)
        return
    pending = collections.deque()
    for task in tasks:
        if len(pending) >= ahead:
            yield pending.popleft().get()
        pending.append(pool.apply_async(function, (task,)))
    while pending:
        yield pending.popleft().get()


def _check_unk_share(unk_tokens: int, tokens: int, tokenizer_path, max_unk_fraction: float) -> None:
    share = unk_tokens / max(tokens, 1)
    if share > max_unk_fraction:
        raise ValueError(
            f"{share:.1%} of the corpus' {tokens} tokens are [UNK] with the tokenizer {tokenizer_path}, over"
            f" max_unk_fraction={max_unk_fraction:g}: the vocabulary does not fit this corpus (a truncated or"
            " wrong vocab.txt, or other casing?); to prepare anyway pass --max_unk_fraction=1"
            " (config: data.max_unk_fraction=1.0)")


def _pool(workers: int, tokenizer_dir: str):
    if workers == 1:
        return _InProcess(tokenizer_dir)
    # spawn, not fork: the parent may hold TF/JAX/tokenizers threads that fork would break.
    return multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer_dir,))


def _replace(staging: pathlib.Path, output_dir: pathlib.Path) -> None:
    """Moves the finished staging directory to output_dir (the old one is removed only then)."""
    if output_dir.exists():
        old = output_dir.with_name(output_dir.name + ".old")
        output_dir.rename(old)
        staging.rename(output_dir)
        shutil.rmtree(old)
    else:
        staging.rename(output_dir)


def summary_text(metadata: dict) -> str:
    s = metadata["summary"]
    lines = [f"{s['documents']} documents, {s['sentences']} sentences, {s['tokens']} tokens"
             f" ({s['unk_tokens'] / max(s['tokens'], 1):.2%} [UNK]; {s['seconds']} s, {s['workers']} workers)"]
    for split, entry in metadata["splits"].items():
        share = entry["random_next"] / max(entry["instances"], 1)
        pairs = f" ({share:.1%} random next)" if metadata.get("objective", "mlm_nsp") == "mlm_nsp" else ""
        lines.append(f"{split}: {entry['documents']} documents -> {entry['instances']} instances in"
                     f" {len(entry['shards'])} shards{pairs}")
    for key, value in s.items():
        if key not in ("documents", "documents_read", "sentences", "tokens", "unk_tokens", "workers", "seconds",
                       "skipped_lines", "skipped_examples") and value:
            lines.append(f"{key}: {value}")
    for reason, count in s["skipped_lines"].items():
        lines.append(f"skipped {count} lines: {reason} (e.g. {', '.join(s['skipped_examples'][reason][:3])})")
    return "\n".join(lines)


def _define_flags(fv) -> None:
    flags.DEFINE_string("input", None, "text files/globs (comma-separated), 'demo', or tfds:NAME[:SPLIT]",
                        flag_values=fv)
    flags.DEFINE_string("tokenizer", None, "vocab.txt, tokenizer.json, .model, or a saved directory", flag_values=fv)
    flags.DEFINE_string("output", None, "output directory", flag_values=fv)
    flags.DEFINE_enum("format", "auto", sources.FORMATS, "text file layout", flag_values=fv)
    flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir", flag_values=fv)
    flags.DEFINE_integer("max_seq_length", 128, "tokens per instance", flag_values=fv)
    flags.DEFINE_float("short_seq_prob", 0.1, "share of instances with a shorter target length", flag_values=fv)
    flags.DEFINE_float("eval_fraction", 0.0, "share of documents held out for eval", flag_values=fv)
    flags.DEFINE_integer("seed", 12345, "seed of pairs and masks", flag_values=fv)
    flags.DEFINE_boolean("static_masking", False, "store masks (default: loader masks anew)", flag_values=fv)
    flags.DEFINE_integer("dupe_factor", None, "copies with different pairs/masks (default 5 with --static_masking, "
                         "else 1)", flag_values=fv)
    flags.DEFINE_enum("objective", "mlm_nsp", instances_lib.OBJECTIVES, "mlm_nsp: sentence pairs with NSP labels; "
                      "mlm: one-segment rows, no pairs", flag_values=fv)
    flags.DEFINE_integer("max_predictions_per_seq", None, "masked positions per instance (default: "
                         "ceil(masked_lm_prob x max_seq_length), 20 at 0.15 x 128)", flag_values=fv)
    flags.DEFINE_float("masked_lm_prob", 0.15, "share of tokens masked", flag_values=fv)
    flags.DEFINE_boolean("whole_word_masking", False, "mask whole words", flag_values=fv)
    flags.DEFINE_integer("workers", None, "processes (default: all cores)", flag_values=fv)
    flags.DEFINE_integer("shard_tokens", 20_000_000, "corpus tokens per shard", flag_values=fv)
    flags.DEFINE_boolean("overwrite", False, "replace an existing --output", flag_values=fv)
    flags.DEFINE_enum("output_format", "npy", OUTPUT_FORMATS, "npy: bert_jax's memory-mapped rows; tfrecord: "
                      "Google/MLPerf TFRecords with static masks (implies --static_masking)", flag_values=fv)
    flags.DEFINE_float("max_unk_fraction", DEFAULT_MAX_UNK_FRACTION, "stop when a larger share of the tokens "
                       "is [UNK] (1: never)", flag_values=fv)
    for name in ("input", "tokenizer", "output"):
        flags.mark_flag_as_required(name, flag_values=fv)


@cli.entrypoint
def main(argv=None) -> None:
    fv = cli.parse(argv, _define_flags, __doc__, prog="python -m bert_jax.data.prepare")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    metadata = prepare(
        DataSource.parse(fv.input, tfds_data_dir=fv.tfds_data_dir or ""), fv.tokenizer, fv.output,
        max_seq_length=fv.max_seq_length, short_seq_prob=fv.short_seq_prob, eval_fraction=fv.eval_fraction,
        seed=fv.seed, static_masking=fv.static_masking, dupe_factor=fv.dupe_factor,
        max_predictions_per_seq=fv.max_predictions_per_seq, masked_lm_prob=fv.masked_lm_prob,
        whole_word_masking=fv.whole_word_masking, workers=fv.workers, input_format=fv.format,
        shard_tokens=fv.shard_tokens, overwrite=fv.overwrite, output_format=fv.output_format,
        max_unk_fraction=fv.max_unk_fraction, objective=fv.objective)
    print(summary_text(metadata))
    print(f"wrote {fv.output}")


if __name__ == "__main__":
    sys.exit(main())
