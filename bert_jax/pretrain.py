"""Pretraining entrypoint: wires config, tokenizer, data, mesh, state and checkpoints.

    python -m bert_jax.pretrain --config configs/bert_base.py --workdir DIR [--config.key=value ...]

Started again on the same workdir it resumes from the latest checkpoint (params,
optimizer, step, data order). A workdir holding a checkpoint of another model is an
error, and nothing is written before the restore succeeded. SIGTERM saves a checkpoint
at the current step and exits 0. The loop itself is `bert_jax.loop.train_loop`.
"""
from __future__ import annotations

import logging
import shutil
import sys
import tempfile

import jax
import numpy as np
import optax
from absl import app, flags
from absl import logging as absl_logging
from etils import epath
from ml_collections import config_flags

from bert_jax import checkpoint, config_utils, distributed, hardware, metrics_writer, paths, sharding, tokenizer as tokenizer_lib
from bert_jax import params as params_lib
from bert_jax import train_step as train_step_lib
from bert_jax import loop

log = logging.getLogger("bert_jax.pretrain")


# ----------------------------------------------------------------------------
# Tokenizer: the workdir keeps its own copy, written once

def prepare_tokenizer(config, workdir: epath.Path, saved_meta: dict | None):
    """-> Tokenizer loaded from workdir/tokenizer (created on a fresh run from
    data.tokenizer, from train.init_from's workdir, or trained on the corpus)."""
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
    if jax.process_index() == 0:
        source = config.data.tokenizer or _init_from_tokenizer(config)
        with tempfile.TemporaryDirectory(prefix="bert_jax_tokenizer_") as scratch:
            if source:
                tok = _load_tokenizer(source)
            else:
                tok = train_tokenizer_on_corpus(config, scratch)
            staging = workdir / (checkpoint.TOKENIZER_DIR + ".tmp")
            paths.rmtree(staging)
            with paths.write_dir(staging) as local_staging:
                tok.save(local_staging)
        paths.rmtree(tokenizer_dir)  # no checkpoint uses it yet
        staging.rename(tokenizer_dir)
    distributed.barrier("tokenizer_written")
    return _load_tokenizer(tokenizer_dir)


def _load_tokenizer(path):
    """load_tokenizer reads local files: a URI is copied to this host's cache first."""
    return tokenizer_lib.load_tokenizer(paths.local_copy(path, "tokenizer"))


def _init_from_tokenizer(config) -> str:
    if not config.train.init_from:
        return ""
    _, _, tokenizer_dir = _read_init_from_meta(config.train.init_from)
    if tokenizer_dir is None:
        raise FileNotFoundError(f"train.init_from={config.train.init_from}: no tokenizer/ beside the "
                                "checkpoint; set data.tokenizer")
    return tokenizer_dir


def train_tokenizer_on_corpus(config, output_dir):
    from bert_jax.data import sources
    spec = _text_source(config)
    if spec is None:
        raise ValueError(f"data.tokenizer is required for data.source={config.data.source!r} "
                         "(only text sources can train a SentencePiece vocabulary)")
    sentences = (s for document in sources.documents(spec, data_dir=config.data.tfds_data_dir or None)
                 for s in document)
    print(f"training a SentencePiece {config.data.tokenizer_model_type} vocabulary of "
          f"{config.data.tokenizer_vocab_size} on {spec}", flush=True)
    return tokenizer_lib.train_sentencepiece(
        sentences=sentences, output_dir=output_dir,
        vocab_size=config.data.tokenizer_vocab_size, model_type=config.data.tokenizer_model_type,
        lowercase=config.data.lowercase, seed=config.train.seed)


# ----------------------------------------------------------------------------
# Data

def make_data(config, tok, workdir: epath.Path, host_rows):
    """-> (train iterator with get_state/set_state, fresh-eval-iterator factory or None);
    each batch holds the rows `host_rows` (sharding.process_batch_rows) of the global batch.

    Text, demo and TFDS text sources are prepared once into workdir/data (instances,
    shards) by `bert_jax.data.prepare`; TFRecords are Google's statically masked instances;
    `tfds` with a `bert_pretraining_corpus/NAME` is a prepared corpus in ArrayRecord.
    """
    from bert_jax.data import loader
    d = config.data
    common = dict(global_batch_size=config.train.global_batch_size, max_seq_length=d.max_seq_length,
                  max_predictions_per_seq=d.max_predictions_per_seq, seed=config.train.seed,
                  whole_word_masking=d.whole_word_masking, host_rows=host_rows, worker_count=d.worker_count)
    if d.source == "tfrecord":
        train = loader.make_pretraining_loader(d.train_path, dynamic_masking=False, **common)
        if not d.eval_path:
            return train, None
        return train, _replayable(loader.make_pretraining_loader(d.eval_path, dynamic_masking=False, **common))
    if _text_source(config) is None and d.source == "tfds":  # a converted corpus: read in place
        spec, train_split, eval_split = loader.TFDS_PREFIX + d.tfds_name, d.tfds_split, d.tfds_eval_split
        common["tfds_data_dir"] = d.tfds_data_dir or None
        splits = loader.read_metadata(spec, tfds_data_dir=common["tfds_data_dir"])["splits"]
        if train_split not in splits:
            raise ValueError(f"config.data.tfds_split: {d.tfds_name} has no split {train_split!r} "
                             f"(splits: {sorted(splits)})")
    else:
        spec = d.train_path if d.source == "prepared" else prepare_text_data(config, workdir)
        train_split, eval_split = "train", "eval"
        splits = loader.read_metadata(spec)["splits"]
    train = loader.make_pretraining_loader(spec, split=train_split, dynamic_masking=d.dynamic_masking,
                                           tokenizer=tok, **common)
    if not eval_split or eval_split not in splits:
        return train, None
    return train, _replayable(loader.make_pretraining_loader(
        spec, split=eval_split, dynamic_masking=d.dynamic_masking, tokenizer=tok, **common))


def _text_source(config) -> str | None:
    """The `prepare` input spec of a text source (demo, files, TFDS text dataset), else None."""
    d = config.data
    if d.source == "demo":
        return "demo"
    if d.source == "text":
        return d.train_path
    if d.source == "tfds" and not d.tfds_name.startswith(_TFDS_CORPUS + "/"):
        return f"tfds:{d.tfds_name}:{d.tfds_split}"
    return None


_TFDS_CORPUS = "bert_pretraining_corpus"  # bert_jax.data.tfds_corpus.DATASET (imported lazily: TF)


def _replayable(eval_loader):
    """Each evaluation reads the same held-out batches from the start."""
    start = eval_loader.get_state()

    def fresh():
        eval_loader.set_state(start)
        return eval_loader
    return fresh


def prepare_text_data(config, workdir: epath.Path) -> str:
    """Tokenize a text corpus into workdir/data once (process 0; the others wait) -> a local
    directory for the loader. `prepare` writes to a temporary directory and renames it at the
    end. On a URI workdir it prepares into this host's cache and uploads (metadata.json last,
    so its presence means complete); every host then reads a local copy of workdir/data."""
    from bert_jax.data import prepare
    data_dir = workdir / "data"
    local_dir = data_dir if paths.is_local(data_dir) else paths.cache_dir(data_dir, "data")
    if jax.process_index() == 0 and not (data_dir / "metadata.json").is_file():
        d = config.data
        prepare.prepare(
            _text_source(config), workdir / checkpoint.TOKENIZER_DIR if paths.is_local(workdir)
            else paths.local_copy(workdir / checkpoint.TOKENIZER_DIR, "tokenizer"), local_dir,
            max_seq_length=d.max_seq_length, max_predictions_per_seq=d.max_predictions_per_seq,
            masked_lm_prob=d.masked_lm_prob, short_seq_prob=d.short_seq_prob,
            eval_fraction=d.eval_fraction, static_masking=not d.dynamic_masking,
            whole_word_masking=d.whole_word_masking, seed=config.train.seed, overwrite=True,
            tfds_data_dir=d.tfds_data_dir or None, progress=config.train.progress_bar)
        if local_dir != data_dir:
            paths.copy_tree(local_dir, data_dir, last="metadata.json")
    distributed.barrier("data_prepared")
    if local_dir != data_dir:
        _download_prepared(data_dir, local_dir)
    return str(local_dir)


def _download_prepared(data_dir: epath.Path, local_dir: epath.Path) -> None:
    """Refresh this host's copy of workdir/data unless it holds the same metadata.json."""
    remote_metadata = (data_dir / "metadata.json").read_bytes()
    local_metadata = local_dir / "metadata.json"
    if local_metadata.is_file() and local_metadata.read_bytes() == remote_metadata:
        return
    staging = local_dir.parent / (local_dir.name + ".download")
    shutil.rmtree(staging, ignore_errors=True)
    paths.copy_tree(data_dir, staging, last="metadata.json")
    shutil.rmtree(local_dir, ignore_errors=True)
    staging.rename(local_dir)


# ----------------------------------------------------------------------------
# State: resume, phase-2 init, or fresh

def _read_init_from_meta(path):
    step_dir = checkpoint.resolve_step_dir(path)
    meta = checkpoint.read_json_item(step_dir, checkpoint.META)
    tokenizer_dir = step_dir.parent.parent / meta.get("tokenizer", {}).get("dir", checkpoint.TOKENIZER_DIR)
    return step_dir, meta, (str(tokenizer_dir) if tokenizer_dir.is_dir() else None)


def initial_state(config, program: train_step_lib.PretrainingStep, ckpt, latest):
    """-> (state, start_step, data_state or None), laid out as `program` shards it."""
    model_config = program.model_config
    if latest is not None:
        state, data_state = ckpt.restore(latest, program.abstract_state)
        return state, latest, data_state
    params = None
    if config.train.init_from:
        init_model_config, params, _ = checkpoint.restore_params(config.train.init_from)
        checkpoint.check_same_model(init_model_config.to_dict(), model_config.to_dict(),
                                    f"train.init_from={config.train.init_from}")
        if model_config.scan_layers:
            params = params_lib.stack_layers(params, model_config.num_hidden_layers)
    state = program.create_state(params)
    if config.train.init_from and config.train.init_optimizer:
        state = state.replace(opt_state=_init_from_opt_state(config.train.init_from, state,
                                                             program.state_shardings))
    return state, 0, None


def _init_from_opt_state(path, state, shardings):
    """Phase 2 with init_optimizer: phase 1's moments, step counters reset to 0 so the
    new warmup and decay start from the beginning."""
    step_dir = checkpoint.resolve_step_dir(path)
    source = checkpoint.Checkpointer(step_dir.parent.parent, read_only=True)
    abstract = checkpoint.abstract_with_shardings(jax.eval_shape(lambda: state), shardings)
    restored, _ = source.restore(int(step_dir.name), abstract)
    source.close()
    return optax.tree_utils.tree_set(restored.opt_state, count=np.zeros((), np.int32)) \
        if _has_count(restored.opt_state) else restored.opt_state


def _has_count(tree) -> bool:
    try:
        optax.tree_utils.tree_get(tree, "count")
        return True
    except (KeyError, ValueError):
        return False


# ----------------------------------------------------------------------------
# The run

def run(config, workdir) -> dict:
    """Pretrain as configured in `workdir` (resuming if it holds a checkpoint). -> summary."""
    config_utils.validate(config)
    distributed.initialize(config.distributed)
    workdir = paths.workdir_path(workdir)  # a local directory or a URI (gs://...)
    main_process = jax.process_index() == 0
    if main_process:
        paths.ensure_writable_dir(workdir)
    distributed.barrier("workdir_created")

    ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep, keep_best=config.train.keep_best,
                                   async_save=config.train.async_checkpoints)
    latest = ckpt.latest_step()
    saved_meta = ckpt.read_json(latest, checkpoint.META) if latest is not None else None
    tok = prepare_tokenizer(config, workdir, saved_meta)
    model_config = train_step_lib.pretraining_model_config(config, tok.vocab_size)
    if saved_meta is not None:
        checkpoint.check_same_model(saved_meta["model_config"], model_config.to_dict(), workdir)
    if model_config.vocab_size < tok.vocab_size:
        raise ValueError(f"config.model.vocab_size={model_config.vocab_size} is smaller than the "
                         f"tokenizer's {tok.vocab_size} ({workdir / checkpoint.TOKENIZER_DIR})")

    mesh = sharding.make_mesh(config.mesh)
    # The same builder gives `python -m bert_jax.aot` the program it plans.
    program = train_step_lib.build_pretraining_step(config, model_config, mesh)
    rules = program.rules
    state, start_step, data_state = initial_state(config, program, ckpt, latest)

    host_rows = sharding.process_batch_rows(sharding.batch_sharding(mesh, rules), (config.train.global_batch_size,))
    train_batches, eval_batches = make_data(config, tok, workdir, host_rows)
    if config.train.eval_steps == 0:
        eval_batches = None
    if data_state is not None:
        train_batches.set_state(data_state)

    step_fn, eval_fn, base_key = program.train_step, program.eval_step, program.base_key()
    meta = {"model_config": model_config.to_dict(),
            "tokenizer": {"dir": checkpoint.TOKENIZER_DIR,
                          "sha256": checkpoint.tokenizer_fingerprint(workdir / checkpoint.TOKENIZER_DIR),
                          "kind": tok.kind, "vocab_size": tok.vocab_size},
            "mesh": dict(mesh.shape), "process_count": jax.process_count(),
            "jax_version": jax.__version__}
    config_dict = config.to_dict()

    def save(step, state, record=None, metrics=None, final=False):  # evaluations: in metrics.jsonl
        ckpt.save(step, state, data_state=train_batches.get_state(), config=config_dict,
                  meta={**meta, "step": step}, metrics=metrics)
        if final:
            ckpt.wait()

    compute = hardware.compute_choice(model_config.dtype, model_config.matmul_impl)
    peak, peak_source = hardware.device_peak_flops(model_config.dtype, compute.f32_out)  # the step's matmuls
    flops_per_step = config.train.global_batch_size * hardware.pretraining_flops_per_sequence(
        model_config, config.data.max_seq_length, config.data.max_predictions_per_seq)
    # A CPU device is a share of one host: the measured matmul peak is the host's.
    peak_total = peak if jax.devices()[0].platform == "cpu" else peak * jax.device_count()
    settings = loop.LoopSettings(
        total_steps=config.train.steps, log_every=config.train.log_every,
        eval_every=config.train.eval_every, checkpoint_every=config.train.checkpoint_every,
        max_nonfinite_steps=config.train.max_nonfinite_steps,
        global_batch_size=config.train.global_batch_size,
        flops_per_step=flops_per_step, peak_flops_total=peak_total,
        progress_metrics=(("loss", "loss"), ("mlm_acc", "mlm_accuracy")))

    writer = metrics_writer.MetricsWriter(workdir, enabled=main_process, total_steps=config.train.steps,
                                          initial_step=start_step, progress_bar=config.train.progress_bar)
    if main_process and start_step == 0:
        (workdir / "config.json").write_text(config_utils.to_json(config))  # epath: local or URI
    writer.message(f"{'resuming at step ' + str(start_step) if start_step else 'starting'}: "
                   f"BERT-{config.model.preset} ({params_lib.count(state.params) / 1e6:.1f}M params, "
                   f"vocab {model_config.vocab_size}), mesh {dict(mesh.shape)}, "
                   f"{jax.process_count()} process(es); {compute.describe()}; "
                   f"peak {peak / 1e12:.2f} TFLOP/s ({peak_source})")
    preemption = loop.PreemptionWatcher()
    to_global = lambda b: sharding.make_global_batch(b, mesh, rules)  # noqa: E731
    try:
        state, summary = loop.train_loop(
            state=state, start_step=start_step, settings=settings,
            train_step=lambda s, b: step_fn(s, b, base_key),
            evaluate=(lambda s: loop.evaluate_sums(s, lambda s, b: eval_fn(s.params, b), eval_batches(), to_global,
                                                   config.train.eval_steps, train_step_lib.eval_metrics))
            if eval_batches is not None else None,
            to_global=to_global,
            train_batches=train_batches, save=save, writer=writer, preemption=preemption)
    finally:
        preemption.close()
        ckpt.wait()
        ckpt.close()
        writer.close()
    summary["workdir"] = str(workdir)
    summary["state"] = state
    return summary


# ----------------------------------------------------------------------------
# Command line

def define_flags() -> None:
    """Defines the command-line flags (only when run as a program, so that importing
    several entrypoints into one process, as the tests do, defines nothing)."""
    global _CONFIG, _WORKDIR
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Pretraining config file (configs/*.py[:phase2]).",
                                              lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, tokenizer, metrics; resumed when it has them.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO
        absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        summary = run(_CONFIG.value, _WORKDIR.value)
    except (checkpoint.CheckpointMismatchError, loop.NonFiniteError) as e:
        sys.exit(f"error: {e}")
    if summary.get("preempted"):
        print(f"preempted: checkpoint at step {summary['step']} in {summary['workdir']}", flush=True)


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
