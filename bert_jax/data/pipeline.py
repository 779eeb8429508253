"""Pretraining data behind one call: tokenizer, prepared instances, per-host loaders.

    tokenizer, train_batches, eval_batches = build_pretraining_data(
        config, workdir, batch_sharding=sharding.batch_sharding(mesh), saved_meta=None)

`config.data` is parsed once into `sources.DataSource` values (`sources.from_config`). Then:

1. Tokenizer: the workdir keeps its own copy in workdir/tokenizer, written once by process 0
   from `data.tokenizer`, from the one beside `train.init_from`'s weights (a workdir's or a
   released model's: the same vocabulary as `data.tokenizer` if both are given), or trained
   (SentencePiece) on the text source; a prepared directory brings its own (a given one must
   be the same). On resume (`saved_meta`, the checkpoint's meta) it must be unchanged.
2. Text (demo, files, a TFDS text dataset) is prepared once into workdir/data by
   `bert_jax.data.prepare` (process 0; the others wait); on a URI workdir it is prepared in
   this host's cache, uploaded, and every host reads a local copy. workdir/data records what it
   was prepared from (source_fingerprint.json: the source, each text file's size and time; its
   tokenizer/); reused with another source or tokenizer it is an error, never silently. Instances (a prepared
   directory, TFRecords, a converted TFDS corpus) are read as they are.
3. Loaders: every host loads the rows of each global batch that its devices hold
   (`sharding.process_batch_rows` of `batch_sharding`). `train_batches` has
   get_state/set_state (exact resume); `eval_batches` is None or a function giving an
   iterator over the same held-out batches each time.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
from etils import epath

from bert_jax import checkpoint, config_utils, distributed, paths, sharding, weights
from bert_jax import tokenizer as tokenizer_lib
from bert_jax.data import loader, prepare, sources
from bert_jax.data.sources import DataSource

FINGERPRINT_FILE = "source_fingerprint.json"  # in workdir/data: what it was prepared from


def build_pretraining_data(config, workdir: epath.Path, *, batch_sharding, saved_meta: dict | None = None):
    """-> (tokenizer, train batches, eval-batches factory or None); see the module docstring."""
    train_source, eval_source = sources.from_config(config.data)
    tok = prepare_tokenizer(config, train_source, workdir, saved_meta)
    if train_source.is_text:
        train_source = DataSource.prepared(prepare_text_data(config, train_source, workdir))
        eval_source = train_source.with_split("eval")
    d = config.data
    host_rows = sharding.process_batch_rows(batch_sharding, (config.train.global_batch_size,))
    static = train_source.kind == "tfrecord"  # Google's instances carry their masks
    options = dict(global_batch_size=config.train.global_batch_size, max_seq_length=d.max_seq_length,
                   max_predictions_per_seq=config_utils.max_predictions_per_seq(config), seed=config.train.seed,
                   whole_word_masking=d.whole_word_masking, host_rows=host_rows, worker_count=d.worker_count,
                   dynamic_masking=d.dynamic_masking and not static, tokenizer=tok,
                   objective=config.train.objective, max_instances_per_row=config_utils.instances_per_row(config))
    splits = None if static else loader.source_metadata(train_source)["splits"]
    if train_source.kind == "tfds_corpus" and train_source.split not in splits:
        raise ValueError(f"config.data.tfds_split: {d.tfds_name} has no split {train_source.split!r} "
                         f"(splits: {sorted(splits)})")
    train = loader.make_pretraining_loader(train_source, **options)
    if eval_source is None or config.train.eval_steps == 0 or (splits is not None and eval_source.split not in splits):
        return tok, train, None
    return tok, train, _replayable(loader.make_pretraining_loader(eval_source, **options))


def _replayable(eval_loader):
    """Each evaluation reads the same held-out batches from the start."""
    start = eval_loader.get_state()

    def fresh():
        eval_loader.set_state(start)
        return eval_loader
    return fresh


# ----------------------------------------------------------------------------
# Tokenizer: the workdir keeps its own copy, written once

def prepare_tokenizer(config, source: DataSource, workdir: epath.Path, saved_meta: dict | None):
    """-> Tokenizer loaded from workdir/tokenizer (created on a fresh run from
    data.tokenizer, from train.init_from's weights, from a prepared directory, or trained on the
    text `source`)."""
    tokenizer_dir = workdir / checkpoint.TOKENIZER_DIR
    if saved_meta is not None:  # resuming: exactly the tokenizer the checkpoint was trained with
        if not tokenizer_dir.is_dir():
            raise FileNotFoundError(f"{tokenizer_dir}: missing; the checkpoints in {workdir} need it")
        expected = saved_meta["tokenizer"]["sha256"]
        if checkpoint.tokenizer_fingerprint(tokenizer_dir) != expected:
            raise checkpoint.CheckpointMismatchError(
                f"{tokenizer_dir} changed since the checkpoint was written (sha256 differs from "
                f"{expected[:12]}...); restore the original tokenizer files")
        return _load_tokenizer(tokenizer_dir)
    given = _given_tokenizer(config)
    if source.kind == "prepared":
        given = _prepared_tokenizer(source, given)
    if not given and not source.is_text:  # on every process, before any waits for process 0
        raise ValueError(f"data.tokenizer is required for data.source={config.data.source!r} "
                         "(only text sources can train a SentencePiece vocabulary)")
    if jax.process_index() == 0:
        with tempfile.TemporaryDirectory(prefix="bert_jax_tokenizer_") as scratch:
            tok = _load_tokenizer(given) if given else train_tokenizer_on_corpus(config, source, scratch)
            staging = workdir / (checkpoint.TOKENIZER_DIR + ".tmp")
            paths.rmtree(staging)
            with paths.write_dir(staging) as local_staging:
                tok.save(local_staging)
        paths.rmtree(tokenizer_dir)  # no checkpoint uses it yet
        staging.rename(tokenizer_dir)
    distributed.barrier("tokenizer_written")
    return _load_tokenizer(tokenizer_dir)


def _prepared_tokenizer(source: DataSource, given: str) -> str:
    """The tokenizer a prepared directory was made with (its tokenizer/); a given one must be the same."""
    directory = source.paths[0]
    own = str(epath.Path(directory) / loader.read_metadata(directory).get("tokenizer", checkpoint.TOKENIZER_DIR))
    if given and not _load_tokenizer(given).same_as(_load_tokenizer(own)):
        raise ValueError(f"tokenizer {given} (data.tokenizer, or train.init_from's) differs from {own}, the one"
                         f" {directory} was prepared with: leave data.tokenizer empty to use the directory's")
    return own


def _load_tokenizer(path):
    """load_tokenizer reads local files: a URI is copied to this host's cache first."""
    return tokenizer_lib.load_tokenizer(paths.local_copy(path, "tokenizer"))


def _given_tokenizer(config) -> str:
    """data.tokenizer, or the tokenizer that belongs with train.init_from's weights (a workdir's
    tokenizer/, a Hugging Face or Google directory's vocabulary); with both, they must hold the
    same vocabulary. '' : neither (a text source trains one)."""
    given, init_from = config.data.tokenizer, config.train.init_from
    own = weights.find_tokenizer_files(init_from) if init_from else None
    if init_from and own is None and not given:
        raise FileNotFoundError(f"train.init_from={init_from}: no tokenizer beside the weights (vocab.txt, "
                                "tokenizer.json, spiece.model or tokenizer/); set data.tokenizer")
    if own is not None and given:
        theirs, ours = _load_tokenizer(own), _load_tokenizer(given)
        if not ours.same_as(theirs):
            raise ValueError(f"config.data.tokenizer={given} is not the vocabulary of train.init_from's weights "
                             f"({own}, {theirs.vocab_size} tokens vs {ours.vocab_size}): leave data.tokenizer unset"
                             " to use theirs")
    return given or (str(own) if own is not None else "")


def train_tokenizer_on_corpus(config, source: DataSource, output_dir):
    """A SentencePiece vocabulary (data.tokenizer_*) trained on the documents of a text source."""
    d = config.data
    print(f"training a SentencePiece {d.tokenizer_model_type} vocabulary of {d.tokenizer_vocab_size} on {source}",
          flush=True)
    return tokenizer_lib.train_sentencepiece(
        sentences=(s for document in sources.documents(source) for s in document), output_dir=output_dir,
        vocab_size=d.tokenizer_vocab_size, model_type=d.tokenizer_model_type, lowercase=d.lowercase,
        seed=config.train.seed)


# ----------------------------------------------------------------------------
# Text -> workdir/data, once

def prepare_text_data(config, source: DataSource, workdir: epath.Path) -> str:
    """Tokenize a text `source` into workdir/data once (process 0; the others wait) -> a local
    directory for the loader. `prepare` writes to a temporary directory and renames it at the
    end. On a URI workdir it prepares into this host's cache and uploads (metadata.json last,
    so its presence means complete); every host then reads a local copy of workdir/data."""
    data_dir = workdir / "data"
    local_dir = data_dir if paths.is_local(data_dir) else paths.cache_dir(data_dir, "data")
    tokenizer_dir = workdir / checkpoint.TOKENIZER_DIR
    if jax.process_index() == 0 and (data_dir / loader.METADATA_FILE).is_file():
        check_prepared_data(data_dir, source, tokenizer_dir)
    elif jax.process_index() == 0:
        d = config.data
        prepare.prepare(
            source, tokenizer_dir if paths.is_local(workdir) else paths.local_copy(tokenizer_dir, "tokenizer"),
            local_dir, max_seq_length=d.max_seq_length, objective=config.train.objective,
            max_predictions_per_seq=config_utils.max_predictions_per_seq(config), masked_lm_prob=d.masked_lm_prob,
            short_seq_prob=d.short_seq_prob,
            eval_fraction=d.eval_fraction, static_masking=not d.dynamic_masking,
            whole_word_masking=d.whole_word_masking, seed=config.train.seed, max_unk_fraction=d.max_unk_fraction,
            overwrite=True,
            progress=config.train.progress_bar)
        (epath.Path(local_dir) / FINGERPRINT_FILE).write_text(json.dumps(source_fingerprint(source), indent=1))
        if local_dir != data_dir:
            paths.copy_tree(local_dir, data_dir, last=loader.METADATA_FILE)
    distributed.barrier("data_prepared")
    if local_dir != data_dir:
        _download_prepared(data_dir, local_dir)
    return str(local_dir)


def source_fingerprint(source: DataSource) -> dict:
    """What workdir/data was prepared from: the source as configured and, for text files,
    each file's size and modification time (cheap to compare on every start)."""
    files = {}
    if source.kind == "text":
        for path in sources.expand_paths(source.paths):
            stat = os.stat(path)
            files[os.path.abspath(path)] = [stat.st_size, stat.st_mtime_ns]
    return {"source": source.spec(), "files": files}


def check_prepared_data(data_dir: epath.Path, source: DataSource, tokenizer_dir: epath.Path) -> None:
    """workdir/data is reused only if it was prepared from this source (the same spec; no text
    file changed or added since; a source deleted since is not compared) with this tokenizer.
    Data prepared before fingerprints were recorded is checked by its spec and tokenizer."""
    def refuse(what: str):
        raise ValueError(f"{data_dir} was prepared from {what}; delete {data_dir} to prepare it again "
                         "(or use another --workdir)")
    metadata = json.loads((data_dir / loader.METADATA_FILE).read_text())
    fingerprinted = (data_dir / FINGERPRINT_FILE).is_file()
    recorded = json.loads((data_dir / FINGERPRINT_FILE).read_text()) if fingerprinted else \
        {"source": metadata["source"], "files": {}}
    try:
        current = source_fingerprint(source)
    except FileNotFoundError:
        current = {"source": source.spec(), "files": {}}
    if not fingerprinted:
        current["files"] = {}
    if current["source"] != recorded["source"]:
        refuse(f"another source ({recorded['source']!r}, this run's config.data names {current['source']!r})")
    for path, (size, mtime) in current["files"].items():
        if path not in recorded["files"]:
            refuse(f"files without {path} (it was added to the source since)")
        if recorded["files"][path] != [size, mtime]:
            then_size, then_mtime = recorded["files"][path]
            refuse(f"{path} as it was then ({then_size} bytes, modified {then_mtime / 1e9:.0f}); it has changed "
                   f"since ({size} bytes, modified {mtime / 1e9:.0f})")
    if not _load_tokenizer(data_dir / metadata["tokenizer"]).same_as(_load_tokenizer(tokenizer_dir)):
        refuse(f"another tokenizer than {tokenizer_dir} ({data_dir / metadata['tokenizer']} differs)")


def _download_prepared(data_dir: epath.Path, local_dir: epath.Path) -> None:
    """Refresh this host's copy of workdir/data unless it holds the same metadata.json."""
    remote_metadata = (data_dir / loader.METADATA_FILE).read_bytes()
    local_metadata = local_dir / loader.METADATA_FILE
    if local_metadata.is_file() and local_metadata.read_bytes() == remote_metadata:
        return
    staging = local_dir.parent / (local_dir.name + ".download")
    shutil.rmtree(staging, ignore_errors=True)
    paths.copy_tree(data_dir, staging, last=loader.METADATA_FILE)
    shutil.rmtree(local_dir, ignore_errors=True)
    staging.rename(local_dir)
