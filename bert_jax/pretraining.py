"""A pretraining run: config -> data, mesh, state (resumed, phase-2 init or fresh), the
shared loop, checkpoints. `bert_jax.pretrain` is its command line.

`run(config, workdir)` pretrains as configured in `workdir`. Started again on the same
workdir it resumes from the newest intact checkpoint (params, optimizer, step, data order);
a workdir holding a checkpoint of another model or objective is an error, and nothing is
written before the restore succeeded. SIGTERM saves a checkpoint at a step all hosts agree on
and stops.

`train.init_from` starts a fresh run (step 0, fresh optimizer unless `train.init_optimizer`)
from other params: a bert_jax workdir (phase 2) or released weights, a Hugging Face
directory, a Google TF checkpoint or an .npz (continued pretraining), read by
`bert_jax.weights.load_pretrained`. The model keys must match the weights' (vocab_size
too: the weights' own tokenizer is the run's, `data.pipeline`); pretraining heads the
source lacks are made fresh and reported, heads the objective does not use are dropped.
"""
from __future__ import annotations

import functools
import pathlib

import jax
import optax

from bert_jax import attention, checkpoint, config_utils, distributed, hardware, loop, losses, metrics_writer
from bert_jax import paths, sharding, weights
from bert_jax import params as params_lib
from bert_jax import train_step as train_step_lib
from bert_jax.data import pipeline

# Compared between train.init_from's weights and the run's model (a config key each: model.KEY).
_INIT_FROM_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                   "max_position_embeddings", "type_vocab_size", "hidden_act", "pre_layer_norm")


# ----------------------------------------------------------------------------
# State: resume, phase-2 init, or fresh

def initial_state(config, program: train_step_lib.PretrainingStep, ckpt, message):
    """-> (state, start_step, data_state or None), laid out as `program` shards it: the
    newest intact checkpoint (damaged ones are reported and set aside), else a fresh state."""
    model_config = program.model_config
    found = ckpt.restore_newest_intact(program.abstract_state, damaged=config.train.resume_damaged,
                                       message=message)
    if found is not None:
        start_step, state, data_state = found
        return state, start_step, data_state
    params = None
    if config.train.init_from:
        params = init_from_params(config, model_config, message)
        if model_config.scan_layers:
            params = params_lib.stack_layers(params, model_config.num_hidden_layers)
    state = program.create_state(params)
    if config.train.init_from and config.train.init_optimizer:
        state = state.replace(opt_state=_init_from_opt_state(config.train.init_from, state,
                                                             program.state_shardings))
    return state, 0, None


def init_from_params(config, model_config, message) -> dict:
    """train.init_from's params (canonical layout) for this run's model and objective; the
    heads it lacks are made fresh (from train.seed) and reported in one `message` line."""
    path, objective = config.train.init_from, config.train.objective
    fmt = _weights_format(path)
    if fmt == "orbax":  # a bert_jax checkpoint records the objective that made it (exports do not)
        made_by = checkpoint.read_json_item(checkpoint.resolve_step_dir(path), checkpoint.META).get("objective")
        if made_by not in (None, objective):
            raise ValueError(f"train.init_from={path} was pretrained with train.objective={made_by!r}, this run's is"
                             f" {objective!r}: set train.objective={made_by!r}, or export its weights"
                             " (python -m bert_jax.convert) and start from those")
    if config.train.init_optimizer and fmt != "orbax":
        raise ValueError(f"config.train.init_optimizer: train.init_from={path} is {fmt} weights, without optimizer"
                         " state (only a bert_jax workdir has one); set train.init_optimizer=False")
    source_config, params, report = weights.load_pretrained(path, fmt, seed=config.train.seed)
    where = f"{path}/config.json" if fmt == "hf" else path
    diffs = [f"model.{k} is {getattr(source_config, k)!r} there, {getattr(model_config, k)!r} here"
             for k in _INIT_FROM_KEYS if getattr(source_config, k) != getattr(model_config, k)]
    if diffs:
        raise ValueError(f"train.init_from={where}: the weights do not fit this run's model: {'; '.join(diffs)}"
                         " (set those config keys, or the tokenizer, to the weights')")
    heads = ("mlm", "nsp") if objective == "mlm_nsp" else ("mlm",)
    lacking = [h for h in heads if h not in params or h in report["initialised"]]
    dropped = sorted(k for k in params if k != "bert" and k not in heads and k not in report["initialised"])
    if any(h not in params for h in heads):  # a fine-tuned checkpoint: load_pretrained made no heads
        params = {**params_lib.init_heads(source_config, seed=config.train.seed), **params}
    params = {k: params[k] for k in ("bert",) + heads}
    optimizer = "its optimizer state" if config.train.init_optimizer else "a fresh optimizer"
    message(f"init from {path} ({fmt} weights, {optimizer}): heads initialised fresh: {lacking or 'none'};"
            f" not used by objective {objective}: {dropped or 'none'}")
    return params


def _weights_format(path) -> str:
    """train.init_from's format (weights.FORMATS_IN), a bert_jax workdir read in place."""
    if weights.orbax.is_checkpoint(path):
        return "orbax"
    if paths.is_uri(path):
        path = paths.local_copy(path, "checkpoints")
    if not pathlib.Path(path).exists() and not pathlib.Path(f"{path}.index").exists():
        raise FileNotFoundError(f"train.init_from={path}: no such file or directory")
    return weights.detect_format(path)


def _init_from_opt_state(path, state, shardings):
    """Phase 2 with init_optimizer: phase 1's moments and Adam's bias-correction count;
    the schedule's count is reset to 0 so the new warmup and decay start from the beginning."""
    step_dir = checkpoint.resolve_step_dir(path)
    source = checkpoint.Checkpointer(step_dir.parent.parent, read_only=True)
    abstract = checkpoint.abstract_with_shardings(jax.eval_shape(lambda: state), shardings)
    restored, _ = source.restore(int(step_dir.name), abstract)
    source.close()
    is_schedule = lambda s: isinstance(s, optax.ScaleByScheduleState)  # noqa: E731
    return jax.tree.map(lambda s: s._replace(count=s.count * 0) if is_schedule(s) else s,
                        restored.opt_state, is_leaf=is_schedule)


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
    saved_meta = ckpt.newest_meta()
    if saved_meta is not None and saved_meta.get("objective", "mlm_nsp") != config.train.objective:
        raise checkpoint.CheckpointMismatchError(
            f"{workdir} holds checkpoints of train.objective={saved_meta.get('objective', 'mlm_nsp')!r}, this run's is"
            f" {config.train.objective!r}: set it back, or use another --workdir (the checkpoints were left untouched)")
    mesh = sharding.make_mesh(config.mesh)
    tok, train_batches, eval_batches = pipeline.build_pretraining_data(
        config, workdir, batch_sharding=sharding.batch_sharding(mesh), saved_meta=saved_meta)
    model_config = train_step_lib.pretraining_model_config(config, tok.vocab_size)
    if saved_meta is not None:
        checkpoint.check_same_model(saved_meta["model_config"], model_config.to_dict(), workdir)
    if model_config.vocab_size < tok.vocab_size:
        raise ValueError(f"config.model.vocab_size={model_config.vocab_size} is smaller than the "
                         f"tokenizer's {tok.vocab_size} ({workdir / checkpoint.TOKENIZER_DIR})")

    # The same builder gives `python -m bert_jax.aot` the program it plans.
    program = train_step_lib.build_pretraining_step(config, model_config, mesh)
    rules = program.rules
    state, start_step, data_state = initial_state(config, program, ckpt,
                                                  print if main_process else lambda _: None)

    if data_state is not None:
        train_batches.set_state(data_state)

    step_fn, eval_fn, base_key = program.train_step, program.eval_step, program.base_key()
    eval_metrics = functools.partial(train_step_lib.eval_metrics, loss_fns=losses.OBJECTIVES[program.objective])
    meta = {"model_config": model_config.to_dict(), "objective": config.train.objective,
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
        model_config, config.data.max_seq_length, config_utils.max_predictions_per_seq(config))
    # A CPU device is a share of one host: the measured matmul peak is the host's.
    peak_total = peak if jax.devices()[0].platform == "cpu" else peak * jax.device_count()
    settings = loop.LoopSettings(
        total_steps=config.train.steps, log_every=config.train.log_every,
        eval_every=config.train.eval_every, checkpoint_every=config.train.checkpoint_every,
        max_nonfinite_steps=config.train.max_nonfinite_steps,
        global_batch_size=config.train.global_batch_size,
        flops_per_step=flops_per_step, peak_flops_total=peak_total,
        progress_metrics=(("loss", "loss"), ("mlm_acc", "mlm_accuracy"), ("fill", "packing_efficiency")),
        max_rollbacks=config.train.max_rollbacks, loss_spike_factor=config.train.loss_spike_factor)

    writer = metrics_writer.MetricsWriter(workdir, enabled=main_process, total_steps=config.train.steps,
                                          initial_step=start_step, progress_bar=config.train.progress_bar)
    if main_process and start_step == 0:
        (workdir / "config.json").write_text(config_utils.to_json(config))  # epath: local or URI
    writer.message(f"{'resuming at step ' + str(start_step) if start_step else 'starting'}: "
                   f"BERT-{config.model.preset} ({params_lib.count(state.params) / 1e6:.1f}M params, "
                   f"vocab {model_config.vocab_size}), mesh {dict(mesh.shape)}, "
                   f"{jax.process_count()} process(es); {compute.describe()}; "
                   f"{attention.describe(model_config, seq_len=program.seq_len)}; "
                   + (f"packed rows of up to {config.data.max_instances_per_row} instances; " if config.data.packing
                      else "one instance per row (padded); ")
                   + f"peak {peak / 1e12:.2f} TFLOP/s ({peak_source})")
    preemption = loop.PreemptionWatcher()
    to_global = lambda b: sharding.make_global_batch(b, mesh, rules)  # noqa: E731
    try:
        state, summary = loop.train_loop(
            state=state, start_step=start_step, settings=settings,
            train_step=lambda s, b: step_fn(s, b, base_key),
            evaluate=(lambda s: loop.evaluate_sums(s, lambda s, b: eval_fn(s.params, b), eval_batches(), to_global,
                                                   config.train.eval_steps, eval_metrics))
            if eval_batches is not None else None,
            to_global=to_global,
            train_batches=train_batches, save=save, writer=writer, preemption=preemption,
            check_saves=ckpt.check,
            rollback=lambda: ckpt.rollback(program.abstract_state, damaged=config.train.resume_damaged,
                                           message=writer.message))
    finally:
        preemption.close()
        ckpt.wait()
        ckpt.close()
        writer.close()
    summary["workdir"] = str(workdir)
    summary["state"] = state
    return summary
