"""A pretraining run: config -> data, mesh, state (resumed, phase-2 init or fresh), the
shared loop, checkpoints. `bert_jax.pretrain` is its command line.

`run(config, workdir)` pretrains as configured in `workdir`. Started again on the same
workdir it resumes from the newest intact checkpoint (params, optimizer, step, data order);
a workdir holding a checkpoint of another model is an error, and nothing is written before
the restore succeeded. SIGTERM saves a checkpoint at a step all hosts agree on and stops.
"""
from __future__ import annotations

import jax
import optax

from bert_jax import attention, checkpoint, config_utils, distributed, hardware, loop, metrics_writer, paths, sharding
from bert_jax import params as params_lib
from bert_jax import train_step as train_step_lib
from bert_jax.data import pipeline


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
        progress_metrics=(("loss", "loss"), ("mlm_acc", "mlm_accuracy")),
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
