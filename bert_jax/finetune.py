"""GLUE fine-tuning entrypoint: a sweep of (learning rate, seed) runs per task.

    python -m bert_jax.finetune --config configs/glue.py --workdir DIR \
        --config.task=mrpc --config.init_checkpoint=PATH \
        [--config.glue_dir=GLUE_DIR | --config.tfds_data_dir=TFDS_DIR] \
        [--config.learning_rates='(5e-5,4e-5,3e-5,2e-5)' --config.seeds='(0,1,2)']

`init_checkpoint`: a pretraining workdir or step dir (Orbax), or a Hugging Face / Google /
.npz directory (through `bert_jax.convert`); encoder and pooler are restored, the task head
is new. The tokenizer comes with the checkpoint (`--config.tokenizer` overrides it).

Every run trains with AdamW (warmup, linear decay), evaluates on dev each epoch (or every
`eval_every_steps`), and is scored by its final dev metric. Outputs in the workdir:
  results.json                every dev metric at every evaluation of every run; mean/std
                              over seeds per learning rate; the chosen (best) run per task
  submission/<TASK>.tsv       GLUE test-server files of the chosen run (AX with MNLI)
  <task>/checkpoint/          the chosen run's fine-tuned params (Orbax, `bert_jax.convert`
                              exports it like any other checkpoint)

The steps are `bert_jax.train_step`'s (same mesh, shardings and jit as pretraining) with
the classification loss below. The learning rate is a value in the optimizer state, not a
constant of the compiled step, so a sweep compiles once per input length bucket.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import app, flags
from absl import logging as absl_logging
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

from bert_jax import convert, distributed, glue_metrics, optim, partitioning, paths, sharding
from bert_jax import train_step as train_step_lib
from bert_jax.data import glue
from bert_jax.model import BertConfig, BertForSequenceClassification
from bert_jax.tokenizer import load_tokenizer

log = logging.getLogger("bert_jax.finetune")
RESULTS_FILE = "results.json"
SUBMISSION_DIR = "submission"


# ----------------------------------------------------------------------------
# Loss: cross-entropy (or squared error for STS-B) over the real rows of a batch.

def classification_normalizers(batch) -> dict:
    return {"examples": jnp.maximum(jnp.sum(batch["is_real_example"].astype(jnp.float32)), 1.0)}


def classification_loss(params, graphdef, batch, dropout_key, normalizers=None, *, deterministic=False):
    if normalizers is None:
        normalizers = classification_normalizers(batch)
    model = nnx.merge(graphdef, params)
    out = model(batch["input_ids"], batch["input_mask"], batch["segment_ids"],
                deterministic=deterministic, rngs=None if deterministic else dropout_key)
    logits = out["logits"].astype(jnp.float32)
    weights = batch["is_real_example"].astype(jnp.float32)
    if logits.shape[-1] == 1:  # regression
        per_example = jnp.square(logits[:, 0] - batch["label_ids"].astype(jnp.float32))
        correct = jnp.zeros_like(weights)
    else:
        labels = batch["label_ids"].astype(jnp.int32)
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    sums = {"loss_sum": jnp.sum(per_example * weights), "correct": jnp.sum(correct * weights),
            "examples": jnp.sum(weights)}
    return sums["loss_sum"] / normalizers["examples"], sums


def classification_metrics(sums) -> dict:
    examples = jnp.maximum(sums["examples"], 1.0)
    return {"loss": sums["loss_sum"] / examples, "accuracy": sums["correct"] / examples,
            "examples": sums["examples"]}


CLASSIFICATION = train_step_lib.LossFns(classification_normalizers, classification_loss,
                                        classification_metrics)


def make_predict_step(graphdef, mesh, rules, param_shardings):
    """jitted (params, batch) -> logits [B, num_labels], replicated so every host reads all rows."""
    def predict(params, batch):
        with partitioning.axis_rules(mesh, rules):
            model = nnx.merge(graphdef, params)
            out = model(batch["input_ids"], batch["input_mask"], batch["segment_ids"], deterministic=True)
            return out["logits"].astype(jnp.float32)

    return jax.jit(predict, in_shardings=(param_shardings, sharding.batch_sharding(mesh, rules)),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))


# ----------------------------------------------------------------------------
# Pretrained weights


@dataclasses.dataclass
class Pretrained:
    config: BertConfig
    encoder: dict          # the `bert` subtree: embeddings, encoder, pooler (numpy)
    tokenizer: object
    tokenizer_dir: str | None
    source: str


def load_pretrained_encoder(path: str, fmt: str = "auto", tokenizer_path: str = "") -> Pretrained:
    """Encoder + pooler weights and the tokenizer that belongs to them; vocab sizes must agree."""
    if not path:
        raise ValueError("config.init_checkpoint is required: a pretraining workdir or imported weights")
    model_config, params, report = convert.load_pretrained(path, fmt)
    if "bert" not in params:
        raise ValueError(f"{path}: no encoder ('bert/...') parameters; found {sorted(params)}")
    tokenizer_dir = tokenizer_path or convert.find_tokenizer_files(path)
    if tokenizer_dir is None or not pathlib.Path(tokenizer_dir).exists():
        raise FileNotFoundError(f"{path}: no tokenizer next to the checkpoint (vocab.txt, tokenizer.json, "
                                "spiece.model or tokenizer/); pass --config.tokenizer=PATH")
    tokenizer = load_tokenizer(str(tokenizer_dir))
    convert.check_vocab(model_config, tokenizer, where=f"init_checkpoint={path}, tokenizer={tokenizer_dir}")
    log.info("init from %s (%s); report %s", path, model_config, report)
    return Pretrained(model_config, params["bert"], tokenizer, str(tokenizer_dir), str(path))


# ----------------------------------------------------------------------------
# One task


@dataclasses.dataclass
class TaskData:
    task: glue.GlueTask
    train: glue.Features
    dev: dict[str, glue.Features]
    test: dict[str, tuple[glue.GlueSplit, glue.Features]]


def prepare_task(task: glue.GlueTask, c, tokenizer) -> TaskData:
    splits = glue.load_task(task, glue_dir=c.glue_dir or None, tfds_data_dir=c.tfds_data_dir or None,
                            use_tfds=not c.glue_dir, skip_bad_rows=c.skip_bad_rows,
                            with_test=c.write_predictions)
    train = splits["train"]["train"]
    if c.max_train_examples:
        train = glue.GlueSplit(train.text_a[: c.max_train_examples],
                               train.text_b and train.text_b[: c.max_train_examples],
                               train.labels[: c.max_train_examples], train.index[: c.max_train_examples],
                               train.source)
    if not len(train):
        raise ValueError(f"{task.dir_name}: no training examples in {train.source}")
    featurize = lambda s: glue.featurize(s, tokenizer, c.max_seq_length)  # noqa: E731
    return TaskData(task, featurize(train), {n: featurize(s) for n, s in splits["dev"].items()},
                    {n: (s, featurize(s)) for n, s in splits["test"].items()})


class Runner:
    """Compiled steps and data of one task, shared by every (learning rate, seed) run."""

    def __init__(self, data: TaskData, pretrained: Pretrained, c, mesh, rules):
        self.data, self.pretrained, self.c, self.mesh, self.rules = data, pretrained, c, mesh, rules
        task = data.task
        self.model_config = pretrained.config.replace(
            hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.dropout, dtype=c.dtype)
        if c.max_seq_length > self.model_config.max_position_embeddings:
            raise ValueError(f"config.max_seq_length={c.max_seq_length} exceeds the checkpoint's "
                             f"max_position_embeddings={self.model_config.max_position_embeddings}")
        for key, size in (("batch_size", c.batch_size), ("eval_batch_size", c.eval_batch_size)):
            try:
                sharding.check_batch_size(size, mesh, rules)
            except ValueError as error:
                raise ValueError(f"config.{key}: {error}") from None
        self.buckets = glue.bucket_lengths(c.max_seq_length, c.smallest_bucket)
        self.steps_per_epoch = math.ceil(len(data.train) / c.batch_size)
        self.total_steps = max(1, math.ceil(c.num_epochs * self.steps_per_epoch))
        self.eval_every = c.eval_every_steps or self.steps_per_epoch
        self.model_fn = lambda rngs: BertForSequenceClassification(self.model_config, task.num_labels, rngs=rngs)
        graphdef, _, self.state_shardings = train_step_lib.abstract_train_state(
            self.model_config, self.optimizer(1.0), mesh, rules, model_fn=self.model_fn)
        # The learning rate lives in the optimizer state (see optimizer()), so one compiled
        # step serves every run of the sweep.
        self.train_step = train_step_lib.make_train_step(
            graphdef, self.optimizer(1.0), mesh, rules, self.state_shardings, loss_fns=CLASSIFICATION)
        self.predict_step = make_predict_step(graphdef, mesh, rules, self.state_shardings.params)

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

    def _global(self, batch):
        """This host's rows of a global batch -> sharded jax.Arrays."""
        n, i = jax.process_count(), jax.process_index()
        rows = next(iter(batch.values())).shape[0] // n
        return sharding.make_global_batch({k: v[i * rows:(i + 1) * rows] for k, v in batch.items()},
                                          self.mesh, self.rules)

    def predict(self, params, features: glue.Features) -> np.ndarray:
        """Class ids (or scores for regression) in the order of `features`."""
        out = np.zeros((len(features),), np.float32 if self.data.task.is_regression else np.int64)
        batches = glue.eval_batches(features, self.c.eval_batch_size, self.buckets, self.pretrained.tokenizer.pad_id,
                                    regression=self.data.task.is_regression)
        for indices, batch in batches:
            logits = np.asarray(self.predict_step(params, self._global(batch)))[: len(indices)]
            out[indices] = logits[:, 0] if self.data.task.is_regression else logits.argmax(-1)
        return out

    def evaluate(self, params) -> dict[str, float]:
        task, metrics = self.data.task, {}
        for name, features in self.data.dev.items():
            scores = glue_metrics.compute_metrics(task.metric, self.predict(params, features), features.labels)
            metrics.update({f"{name}/{k}": v for k, v in scores.items()})
        return metrics

    def train(self, learning_rate: float, seed: int):
        """One run -> (record for results.json, final params)."""
        c, task = self.c, self.data.task
        pretrained = {"bert": self.pretrained.encoder}
        head = {"classifier": _fresh_head(self.model_config, task.num_labels, seed)}
        _, state, _ = train_step_lib.create_train_state(
            self.model_config, self.optimizer(learning_rate), self.mesh, self.rules, seed,
            params={**pretrained, **head}, model_fn=self.model_fn)
        key = jax.random.key(seed)
        record = {"learning_rate": learning_rate, "seed": seed, "total_steps": self.total_steps,
                  "evaluations": []}
        if c.eval_before_training:
            record["evaluations"].append({"step": 0, "epoch": 0.0, **self.evaluate(state.params)})
        step, losses, start = 0, [], time.perf_counter()
        show = c.progress_bar and jax.process_index() == 0
        for epoch in range(math.ceil(c.num_epochs)):
            indices = glue.train_batch_indices(self.data.train.lengths, c.batch_size, seed=seed, epoch=epoch)
            indices = indices[: self.total_steps - step]  # a fractional last epoch
            bar = tqdm.tqdm(indices, desc=f"{task.name} lr={learning_rate:g} seed={seed} epoch {epoch + 1}",
                            disable=not show, leave=False, dynamic_ncols=True)
            for rows in bar:
                batch = glue.pad_batch(self.data.train, rows, c.batch_size, self.buckets,
                                       self.pretrained.tokenizer.pad_id, task.is_regression)
                state, metrics = self.train_step(state, self._global(batch), key)
                step += 1
                losses.append(metrics["loss"])
                if step % 10 == 0:  # reading the loss also bounds the queue of un-awaited steps
                    bar.set_postfix(loss=f"{float(np.mean(jax.device_get(losses[-10:]))):.4f}")
                if step % self.eval_every == 0 or step == self.total_steps:
                    record["evaluations"].append({"step": step, "epoch": round(step / self.steps_per_epoch, 3),
                                                  "train_loss": float(np.mean(jax.device_get(losses))),
                                                  **self.evaluate(state.params)})
                    losses = []
        seconds = time.perf_counter() - start
        record["final"] = record["evaluations"][-1]
        record["train_seconds"] = round(seconds, 2)
        record["skipped_steps"] = int(state.skipped_steps)
        return record, state.params


def _fresh_head(model_config: BertConfig, num_labels: int, seed: int) -> dict:
    """The task head's initial weights for this seed, initialised like the model's dense layers."""
    init = nnx.initializers.truncated_normal(stddev=model_config.initializer_range)
    kernel = init(jax.random.fold_in(jax.random.key(seed), 1), (model_config.hidden_size, num_labels))
    return {"kernel": np.asarray(kernel, np.float32), "bias": np.zeros((num_labels,), np.float32)}


def summarize(task: glue.GlueTask, runs: list[dict]) -> dict:
    """Mean/std over seeds of every final dev metric, per learning rate; the best single run."""
    by_lr = {}
    for lr in sorted({r["learning_rate"] for r in runs}):
        finals = [r["final"] for r in runs if r["learning_rate"] == lr]
        names = [k for k in finals[0] if "/" in k]
        by_lr[f"{lr:g}"] = {k: glue_metrics.mean_std([f[k] for f in finals]) for k in names}
    best = glue_metrics.best_index([r["final"][task.primary_metric] for r in runs])
    best_lr = max(by_lr, key=lambda lr: _finite(by_lr[lr][task.primary_metric]["mean"]))
    return {"by_learning_rate": by_lr, "best_learning_rate_by_mean": float(best_lr), "best_run": best}


def _finite(x):
    return x if x is not None and math.isfinite(x) else -math.inf


def run_task(task: glue.GlueTask, c, workdir: epath.Path, pretrained: Pretrained, mesh, rules,
             results: dict) -> dict:
    data = prepare_task(task, c, pretrained.tokenizer)
    runner = Runner(data, pretrained, c, mesh, rules)
    log.info("%s: %d train examples, %d steps/epoch, %d steps, buckets %s", task.name, len(data.train),
             runner.steps_per_epoch, runner.total_steps, runner.buckets)
    entry = results["tasks"][task.name] = {"primary_metric": task.primary_metric, "runs": []}
    best_score, best_params = -math.inf, None
    for learning_rate in c.learning_rates:
        for seed in c.seeds:
            record, params = runner.train(float(learning_rate), int(seed))
            entry["runs"].append(record)
            score = _finite(record["final"][task.primary_metric])
            if jax.process_index() == 0:  # one line per run, whatever the logging verbosity
                print(f"{task.name} lr={learning_rate:g} seed={seed}: " + ", ".join(
                    f"{k}={v:.4f}" for k, v in record["final"].items() if isinstance(v, float)), flush=True)
            if score > best_score or best_params is None:
                # Kept on the host: test predictions and the checkpoint are written once, at the end.
                best_score, best_params = score, jax.tree.map(np.asarray, distributed.gather(params))
                entry["chosen"] = {"learning_rate": float(learning_rate), "seed": int(seed),
                                   "metrics": record["final"]}
            del params
            entry.update(summarize(task, entry["runs"]))
            write_results(workdir, results)
    entry["chosen"].update(save_outputs(runner, best_params, workdir))
    write_results(workdir, results)
    return entry


def save_outputs(runner: Runner, host_params, workdir: epath.Path) -> dict:
    """Submission files and the fine-tuned checkpoint of the chosen run (replacing earlier ones).
    On a URI workdir both are written locally first, then uploaded by process 0."""
    c, task, out = runner.c, runner.data.task, {}
    primary = jax.process_index() == 0
    if c.write_predictions:
        params = jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]),
                              host_params, runner.state_shardings.params)
        files = []
        predictions = {name: (split, runner.predict(params, features))
                       for name, (split, features) in runner.data.test.items()}
        if primary:
            with paths.write_dir(workdir / SUBMISSION_DIR) as local_dir:
                for name, (split, predicted) in predictions.items():
                    written = glue.write_submission(task, name, split, predicted, str(local_dir))
                    files.append(str(workdir / SUBMISSION_DIR / pathlib.Path(written).name))
        out["submissions"] = files
        del params
    if c.save_checkpoint:
        final, tmp = workdir / task.name / "checkpoint", workdir / task.name / "checkpoint.tmp"
        if primary:
            paths.rmtree(tmp)
        distributed.barrier("finetune_checkpoint_clean")
        with tempfile.TemporaryDirectory(prefix="bert_jax_export_") as scratch:
            local_tmp = tmp if paths.is_local(tmp) else epath.Path(scratch) / "checkpoint"
            # Every process calls the Orbax save (it coordinates who writes what).
            convert.export_orbax(runner.model_config.replace(dtype="float32"), host_params, local_tmp,
                                 tokenizer_dir=runner.pretrained.tokenizer_dir)
            if primary and local_tmp != tmp:
                paths.copy_tree(local_tmp, tmp)
        distributed.barrier("finetune_checkpoint_saved")
        if primary:  # the new best replaces the old one only once it is completely written
            paths.rmtree(final)
            tmp.rename(final)
        distributed.barrier("finetune_checkpoint_moved")
        out["checkpoint"] = str(final)
    return out


def write_results(workdir: epath.Path, results: dict) -> None:
    if jax.process_index() != 0:
        return
    tmp = workdir / (RESULTS_FILE + ".tmp")
    # Undefined metrics (nan) become null: strict JSON for every reader.
    tmp.write_text(json.dumps(_clean_nan(results), indent=2, default=_json_default, allow_nan=False))
    tmp.replace(workdir / RESULTS_FILE)


def _json_default(x):
    return x.item() if hasattr(x, "item") else str(x)


def _clean_nan(tree):
    if isinstance(tree, dict):
        return {k: _clean_nan(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_clean_nan(v) for v in tree]
    return None if isinstance(tree, float) and not math.isfinite(tree) else tree


# ----------------------------------------------------------------------------
# Whole job


def validate(c) -> None:
    def check(ok, key, msg):
        if not ok:
            raise ValueError(f"config.{key}: {msg} (got {c[key]!r})")
    check(len(c.learning_rates) > 0 and all(lr > 0 for lr in c.learning_rates), "learning_rates",
          "needs one or more positive values")
    check(len(c.seeds) > 0, "seeds", "needs one or more seeds")
    check(c.num_epochs > 0, "num_epochs", "must be > 0")
    check(0 <= c.warmup_fraction < 1, "warmup_fraction", "must be in [0, 1)")
    check(0 <= c.dropout < 1, "dropout", "must be in [0, 1)")
    check(c.max_seq_length >= 8, "max_seq_length", "must be >= 8")
    check(c.init_format in ("auto",) + convert.FORMATS_IN, "init_format",
          f"must be auto or one of {convert.FORMATS_IN}")


def run(c, workdir) -> dict:
    """Fine-tunes every task of `c.task`; returns the results dict written to results.json."""

    validate(c)
    tasks = glue.resolve_tasks(c.task)  # unknown task names fail before any work
    distributed.initialize(c.distributed)
    workdir = paths.workdir_path(workdir)  # a local directory or a URI (gs://...)
    if jax.process_index() == 0:
        paths.ensure_writable_dir(workdir)
    pretrained = load_pretrained_encoder(c.init_checkpoint, c.init_format, c.tokenizer)
    mesh = sharding.make_mesh(c.mesh)
    rules = sharding.DEFAULT_RULES
    results = {"config": c.to_dict(), "init_checkpoint": pretrained.source, "tasks": {}}
    path = workdir / RESULTS_FILE
    if path.is_file():  # keep other tasks' results from earlier invocations
        results["tasks"] = json.loads(path.read_text()).get("tasks", {})
    for task in tasks:
        run_task(task, c, workdir, pretrained, mesh, rules, results)
    return results


def define_flags() -> None:
    """Defines the command-line flags (only when run as a program, so that importing
    several entrypoints into one process, as the tests do, defines nothing)."""
    global _CONFIG, _WORKDIR
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Fine-tuning config file (configs/glue.py).",
                                              lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "results.json, submission files, fine-tuned checkpoints.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO
        absl_logging.set_verbosity(absl_logging.WARNING)
    results = run(_CONFIG.value, _WORKDIR.value)
    for name, entry in results["tasks"].items():
        chosen = entry.get("chosen", {})
        print(f"{name}: {entry['primary_metric']}={chosen.get('metrics', {}).get(entry['primary_metric'])} "
              f"(lr={chosen.get('learning_rate')}, seed={chosen.get('seed')})", flush=True)


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
