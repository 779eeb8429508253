"""The fine-tuning sweep: every (learning rate, seed) run of a task through the shared loop,
results.json (mean ± std over seeds per learning rate), the chosen run and its outputs.

Workdir layout:
    results.json                          every run's dev metrics at every evaluation; mean/std
                                          over seeds per learning rate; the chosen run per task
    submission/<TASK>.tsv                 test-set predictions of the chosen run
    <task>/checkpoint/                    the chosen run's fine-tuned params (Orbax)
    <task>/runs/lr=<lr>,seed=<seed>/      one run: metrics.jsonl, tensorboard/, checkpoints/
                                          while it trains, result.json once it finished

Resume: a finished run (its result.json is on disk) is not trained again; the unfinished
one continues from its newest intact checkpoint (params, optimizer state, step, loop record),
exactly as if never stopped; a damaged one is set aside (`resume_damaged`). Divergence rolls
a run back to its last checkpoint (`max_rollbacks`), as in pretraining: the same loop and
`Checkpointer`. SIGTERM saves a checkpoint and stops (`finished` False). Outputs are
written when a run becomes the best so far, so a restarted sweep never needs the params of
runs it skipped.

The learning rate is a value in the optimizer state, not a constant of the compiled step,
so one sweep compiles its train step once per input shape.
"""
from __future__ import annotations

import itertools
import json
import math
import pathlib
import tempfile
import time

import jax
import numpy as np
import optax
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from bert_jax import attention, checkpoint, distributed, glue_metrics, hardware, loop, metrics_writer, optim
from bert_jax import partitioning, paths, sharding, weights
from bert_jax import train_step as train_step_lib

RESULTS_FILE = "results.json"
SUBMISSION_DIR = "submission"
RUN_RESULT = "result.json"
# The config keys that change what a run computes (with its learning rate, seed and model).
RUN_KEYS = ("batch_size", "max_seq_length", "smallest_bucket", "num_epochs", "warmup_fraction", "weight_decay",
            "clip_norm", "max_train_examples", "eval_every_steps", "eval_before_training", "packing",
            "max_examples_per_row")
# Keys a run key holds only when they differ from what runs without them did (FineTuning.run_key).
OPTIONAL_RUN_KEYS = ("packed_row_length",)


class FineTuning:
    """The compiled steps of one task, shared by every (learning rate, seed) run."""

    def __init__(self, task, pretrained, c, mesh, rules):
        self.task, self.pretrained, self.c, self.mesh, self.rules = task, pretrained, c, mesh, rules
        self.model_config = pretrained.config.replace(
            hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.dropout,
            dtype=hardware.compute_choice(c.dtype).dtype)
        if c.max_seq_length > self.model_config.max_position_embeddings:
            raise ValueError(f"config.max_seq_length={c.max_seq_length} exceeds the checkpoint's "
                             f"max_position_embeddings={self.model_config.max_position_embeddings}")
        for key, size in (("batch_size", c.batch_size), ("eval_batch_size", c.eval_batch_size)):
            try:
                sharding.check_batch_size(size, mesh, rules)
            except ValueError as error:
                raise ValueError(f"config.{key}: {error}") from None
        self.total_steps = max(1, math.ceil(c.num_epochs * task.steps_per_epoch))
        self.eval_every = c.eval_every_steps or task.steps_per_epoch
        self.model_fn = lambda rngs: task.model(self.model_config, rngs)
        self.graphdef, self.abstract_state, self.state_shardings = train_step_lib.abstract_train_state(
            self.model_config, self.optimizer(1.0), mesh, rules, model_fn=self.model_fn)
        self.train_step = train_step_lib.make_train_step(
            self.graphdef, self.optimizer(1.0), mesh, rules, self.state_shardings, loss_fns=task.loss_fns)
        self.batch_sharding = sharding.batch_sharding(mesh, rules)
        self.batch_shards = math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh, rules))

        def predict(params, batch):
            with partitioning.axis_rules(mesh, rules):
                return task.predict_outputs(params, self.graphdef, batch)
        # Replicated outputs: every host reads every row.
        self.predict_step = jax.jit(predict, in_shardings=(self.state_shardings.params, self.batch_sharding),
                                    out_shardings=NamedSharding(mesh, PartitionSpec()))

    def optimizer(self, learning_rate: float) -> optax.GradientTransformation:
        """AdamW with warmup and linear decay: the schedule's shape at peak 1, times `learning_rate`.

        AdamW's update is linear in the learning rate, so this equals optim.make_optimizer at
        peak `learning_rate`; the rate is a state value, not a compiled constant.
        """
        c = self.c
        shape, _ = optim.make_optimizer({
            "name": "adamw", "learning_rate": 1.0, "total_steps": self.total_steps,
            "warmup_steps": int(c.warmup_fraction * self.total_steps), "decay": "linear",
            "weight_decay": c.weight_decay, "clip_norm": c.clip_norm})
        return optax.chain(shape, optax.inject_hyperparams(optax.scale)(step_size=learning_rate))

    def global_batch(self, batch: dict) -> dict:
        """A global numpy batch (every host holds all of it) -> sharded jax.Arrays. Each device
        takes its rows by index, whatever the mesh: processes holding the same shard read the
        same rows. A row count the batch shards do not divide (packed batches) gets zero rows
        added (no tokens, no weight in any loss)."""
        fill = -len(next(iter(batch.values()))) % self.batch_shards
        if fill:
            batch = {k: np.concatenate([v, np.zeros((fill, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
        return {k: jax.make_array_from_callback(v.shape, self.batch_sharding, lambda index, v=v: v[index])
                for k, v in batch.items()}

    def predictor(self, params):
        """predict(numpy batch) -> the task's outputs as numpy (this host's replica)."""
        def predict(batch):
            out = self.predict_step(params, self.global_batch(batch))
            return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), out)
        return predict

    def run_key(self, learning_rate: float, seed: int) -> dict:
        """What a run's checkpoint and result must agree on to be resumed or reused."""
        key = {"learning_rate": learning_rate, "seed": seed, "total_steps": self.total_steps,
               **{k: self.c[k] for k in RUN_KEYS if k in self.c}, "model_config": self.model_config.to_dict()}
        rows = getattr(self.task, "row_length", None) if self.c.get("packing") else None
        if rows and rows != self.c.max_seq_length:  # rows shorter than max_seq_length (auto's choice, or set)
            key["packed_row_length"] = rows  # absent otherwise: runs saved before the key existed resume
        return key

    def train(self, learning_rate: float, seed: int, run_dir: epath.Path, preemption) -> tuple[dict, object] | None:
        """One run, resumed from run_dir's checkpoint if it has one -> (record, state), None if preempted."""
        c, task, main = self.c, self.task, jax.process_index() == 0
        key = self.run_key(learning_rate, seed)
        ckpt = checkpoint.Checkpointer(run_dir, keep=c.keep_checkpoints)
        saved_meta = ckpt.newest_meta()
        if saved_meta is not None:  # before anything is restored, moved or written
            _check_same_run(saved_meta["run"], key, run_dir / checkpoint.CHECKPOINTS_DIR)
        say = print if main else lambda _: None
        found = ckpt.restore_newest_intact(self.abstract_state, damaged=c.resume_damaged, message=say)
        if found is None:
            params = {"bert": self.pretrained.encoder, **task.init_head(self.model_config, seed)}
            _, state, _ = train_step_lib.create_train_state(
                self.model_config, self.optimizer(learning_rate), self.mesh, self.rules, seed,
                params=params, model_fn=self.model_fn)
            start_step, record = 0, None
        else:
            start_step, state, _ = found
            record = ckpt.read_json(start_step, checkpoint.META)["loop"]
        base_key = jax.random.key(seed)
        config_dict = c.to_dict()

        def save(step, state, record=None, metrics=None, final=False):
            # A copy: the loop goes on changing `record` while an async save may still read it.
            meta = {"run": key, "loop": json.loads(json.dumps(record))}
            ckpt.save(step, state, data_state={"step": step}, config=config_dict, meta=meta)
            if final:
                ckpt.wait()

        settings = loop.LoopSettings(
            total_steps=self.total_steps, log_every=c.log_every_steps, eval_every=self.eval_every,
            checkpoint_every=c.checkpoint_every_steps or self.eval_every, max_nonfinite_steps=c.max_nonfinite_steps,
            global_batch_size=c.batch_size, eval_at_start=c.eval_before_training,
            progress_metrics=(("loss", "loss"), ("acc", "accuracy")),
            max_rollbacks=c.max_rollbacks, loss_spike_factor=c.loss_spike_factor)
        writer = metrics_writer.MetricsWriter(run_dir, enabled=main, total_steps=self.total_steps,
                                              initial_step=start_step, progress_bar=c.progress_bar,
                                              description=f"{task.name} lr={learning_rate:g} seed={seed}")
        started = time.perf_counter()
        try:
            state, summary = loop.train_loop(
                state=state, start_step=start_step, settings=settings,
                train_step=lambda s, b: self.train_step(s, b, base_key),
                train_batches=_epochs(task, seed, start_step), to_global=self.global_batch,
                evaluate=lambda s: task.evaluate(self.predictor(s.params)),
                save=save, writer=writer, preemption=preemption, record=record, check_saves=ckpt.check,
                rollback=lambda: ckpt.rollback(self.abstract_state, damaged=c.resume_damaged,
                                               message=writer.message))
        finally:
            ckpt.wait()
            ckpt.close()
            writer.close()
        if summary["preempted"]:
            return None
        evaluations = [{"step": e["step"], "epoch": round(e["step"] / task.steps_per_epoch, 3), **e}
                       for e in summary["evaluations"]]
        return {"learning_rate": learning_rate, "seed": seed, "total_steps": self.total_steps,
                "evaluations": evaluations, "final": evaluations[-1],
                "train_seconds": round(time.perf_counter() - started, 2),
                "skipped_steps": int(state.skipped_steps), "rollbacks": summary["rollbacks"]}, state


def _epochs(task, seed: int, start_step: int):
    """Train batches from `start_step` on, epoch after epoch (the loop stops at total_steps)."""
    epoch, skip = divmod(start_step, task.steps_per_epoch)
    while True:
        yield from itertools.islice(task.train_batches(seed, epoch), skip, None)
        epoch, skip = epoch + 1, 0


def _check_same_run(saved: dict, expected: dict, where) -> None:
    keys = list(expected) + [k for k in OPTIONAL_RUN_KEYS if k in saved and k not in expected]
    diffs = [f"{k}: saved {saved.get(k)!r} vs this sweep {expected.get(k)!r}" for k in keys
             if saved.get(k) != expected.get(k)]
    if diffs:
        raise checkpoint.CheckpointMismatchError(
            f"{where} belongs to a run with other settings ({'; '.join(diffs)}); use another --workdir "
            "or the same config")


# ----------------------------------------------------------------------------
# The sweep of one task


def run_sweep(tuner: FineTuning, workdir: epath.Path, results: dict, preemption) -> bool:
    """Every (learning rate, seed) run of tuner.task; results.json after each. -> finished (not preempted)."""
    c, task = tuner.c, tuner.task
    compute = hardware.compute_choice(tuner.model_config.dtype, tuner.model_config.matmul_impl)
    if jax.process_index() == 0:  # the start-up line, whatever the logging verbosity
        rows = (f"packed rows of {task.row_length} tokens; " if c.get("packing") and getattr(task, "row_length", None)
                else "")
        print(f"{task.name}: {task.num_train_examples} train examples, {task.steps_per_epoch} steps/epoch, "
              f"{tuner.total_steps} steps; {rows}{compute.describe()}; "
              f"{attention.describe(tuner.model_config, seq_len=c.max_seq_length)}", flush=True)
    entry = results["tasks"][task.name] = {"primary_metric": task.primary_metric, "runs": []}
    for learning_rate, seed in itertools.product(c.learning_rates, c.seeds):
        learning_rate, seed = float(learning_rate), int(seed)
        run_dir = workdir / task.name / "runs" / f"lr={learning_rate:g},seed={seed}"
        if (run_dir / RUN_RESULT).is_file():  # finished in an earlier invocation
            done = json.loads((run_dir / RUN_RESULT).read_text())
            _check_same_run(done["run"], tuner.run_key(learning_rate, seed), run_dir / RUN_RESULT)
        else:
            trained = tuner.train(learning_rate, seed, run_dir, preemption)
            if trained is None:
                return False
            record, state = trained
            best = _best(task, entry["runs"] + [record]) == len(entry["runs"])
            outputs = save_outputs(tuner, state.params, workdir) if best else None
            del state
            done = {"run": tuner.run_key(learning_rate, seed), "record": record, "outputs": outputs}
            _write_json(run_dir / RUN_RESULT, done)
            done = clean_nan(done)  # as a later invocation reads it back
        entry["runs"].append(done["record"])
        if _best(task, entry["runs"]) == len(entry["runs"]) - 1:
            entry["chosen"] = {"learning_rate": learning_rate, "seed": seed, "metrics": done["record"]["final"],
                               **(done["outputs"] or {})}
        entry.update(summarize(task, entry["runs"]))
        _write_json(workdir / RESULTS_FILE, results)
        if jax.process_index() == 0:  # one line per run, whatever the logging verbosity
            print(f"{task.name} lr={learning_rate:g} seed={seed}: " + ", ".join(
                f"{k}={v:.4f}" for k, v in done["record"]["final"].items() if isinstance(v, float)), flush=True)
        _remove(run_dir / checkpoint.CHECKPOINTS_DIR, "finetune_run_finished")  # its result is on disk
    return True


def _best(task, runs: list[dict]) -> int:
    return glue_metrics.best_index([r["final"][task.primary_metric] for r in runs])


def summarize(task, runs: list[dict]) -> dict:
    """Mean/std over seeds of every final dev metric, per learning rate; the best single run."""
    by_lr = {}
    for lr in sorted({r["learning_rate"] for r in runs}):
        finals = [r["final"] for r in runs if r["learning_rate"] == lr]
        names = [k for k in finals[0] if "/" in k]
        by_lr[f"{lr:g}"] = {k: glue_metrics.mean_std([f[k] for f in finals]) for k in names}
    best_lr = max(by_lr, key=lambda lr: _finite(by_lr[lr][task.primary_metric]["mean"]))
    return {"by_learning_rate": by_lr, "best_learning_rate_by_mean": float(best_lr), "best_run": _best(task, runs)}


def _finite(x):
    return x if x is not None and math.isfinite(x) else -math.inf


def save_outputs(tuner: FineTuning, params, workdir: epath.Path) -> dict:
    """Submission files and the fine-tuned checkpoint of a run (replacing earlier ones).
    On a URI workdir both are written locally first, then uploaded by process 0."""
    c, task, out = tuner.c, tuner.task, {}
    primary = jax.process_index() == 0
    if c.write_predictions:
        predictions = task.test_predictions(tuner.predictor(params))  # every process
        files = []
        if primary:
            with paths.write_dir(workdir / SUBMISSION_DIR) as local_dir:
                files = [str(workdir / SUBMISSION_DIR / pathlib.Path(name).name)
                         for name in task.write_predictions(predictions, str(local_dir))]
        out["submissions"] = files
    if c.save_checkpoint:
        final, tmp = workdir / task.name / "checkpoint", workdir / task.name / "checkpoint.tmp"
        _remove(tmp, "finetune_checkpoint_clean")
        host_params = jax.tree.map(np.asarray, distributed.gather(params))
        with tempfile.TemporaryDirectory(prefix="bert_jax_export_") as scratch:
            local_tmp = tmp if paths.is_local(tmp) else epath.Path(scratch) / "checkpoint"
            # Every process calls the Orbax save (it coordinates who writes what).
            weights.orbax.save(tuner.model_config.replace(dtype="float32"), host_params, local_tmp,
                               tokenizer_dir=tuner.pretrained.tokenizer_dir, labels=task.labels)
            if primary and local_tmp != tmp:
                paths.copy_tree(local_tmp, tmp)
        _remove(final, "finetune_checkpoint_saved")  # the new one replaces the old once completely written
        if primary:
            tmp.rename(final)
        distributed.barrier("finetune_checkpoint_moved")
        out["checkpoint"] = str(final)
    return out


def _remove(path: epath.Path, barrier: str) -> None:
    """Process 0 deletes `path` (if it exists) after every process reached `barrier`."""
    distributed.barrier(barrier)
    if jax.process_index() == 0:
        paths.rmtree(path)
    distributed.barrier(barrier + "_done")


def _write_json(path: epath.Path, tree: dict) -> None:
    """Process 0 writes `tree` atomically; undefined metrics (nan) become null (strict JSON)."""
    if jax.process_index() != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(clean_nan(tree), indent=2, default=_json_default, allow_nan=False))
    tmp.replace(path)


def _json_default(x):
    return x.item() if hasattr(x, "item") else str(x)


def clean_nan(tree):
    if isinstance(tree, dict):
        return {k: clean_nan(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [clean_nan(v) for v in tree]
    return None if isinstance(tree, float) and not math.isfinite(tree) else tree
