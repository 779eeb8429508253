"""Fine-tuning tasks: what a task supplies, and finding tasks by name.

A task (GLUE; NER, `tasks.ner`; SQuAD, `tasks.squad`) is an object with
the members of `Task` below; `bert_jax.sweep` does everything else the same way for every
task: the optimizer (learning rate as a state value, one compiled step per sweep), state
and jitted steps (`bert_jax.train_step`), the shared loop (`bert_jax.loop`: metrics.jsonl,
TensorBoard, progress bar, periodic evaluation, checkpoints, preemption and resume),
the learning-rate x seed sweep, results.json, the chosen run and its outputs.

Batches are dicts of numpy arrays with a leading batch dimension of the configured
(global) batch size. Every host holds the whole task dataset and builds the same global
batch; the sweep hands each device its rows (adding empty rows where the batch shards do not
divide the row count). Pad to a few fixed lengths (buckets), or pack several examples per row
(GLUE's `packing`: `tasks.batching.pack_rows`), so few programs compile, and give padding
rows and empty slots zero weight in the loss (GLUE: `is_real_example`). The input names are Google's: `input_ids`, `input_mask`,
`segment_ids`, plus whatever the task's loss reads (`label_ids`, ...).

A task module under `bert_jax/tasks/` (listed in `FAMILIES`) exposes
  NAMES: tuple[str, ...]                  its canonical task names (`--config.task=NAME`)
  lookup(name: str) -> str | None         canonical name for a spelling (aliases), else None
  build(name, config, tokenizer) -> Task  reads and featurizes the data (config: configs/glue.py, ner.py, squad.py)

Task members:
  name: str                      key in results.json, directory in the workdir
  primary_metric: str            a key of `evaluate`'s result that picks the run; higher is better
  labels: tuple[str, ...] | None the head's label names in id order (None: regression, spans),
                                 saved with the fine-tuned checkpoint (HF export: id2label)
  loss_fns: losses.LossFns       the training loss (and its additive metrics) on train batches
  num_train_examples: int
  steps_per_epoch: int           batches of one epoch (the same for every epoch)
  model(model_config, rngs) -> nnx.Module
      encoder + head; its params are {'bert': encoder and pooler, <head name>: ...}
  init_head(model_config, seed) -> dict
      the head's fresh params for this run's seed: {<head name>: {...}} (numpy)
  train_batches(seed, epoch) -> Iterator[dict]
      one epoch of train batches in an order fixed by (seed, epoch): a resumed run skips
      the batches it already trained on
  predict_outputs(params, graphdef, batch) -> array or dict of arrays
      pure (jitted by the sweep): what the host needs of the model on one batch (logits)
  evaluate(predict) -> dict[str, float]
      dev metrics named '<eval set>/<metric>' ('dev/accuracy', 'dev_matched/accuracy');
      predict(batch) -> predict_outputs as numpy, called by every process
  test_predictions(predict) -> dict
      predictions of the test sets, on every process (empty when none are wanted)
  write_predictions(predictions, out_dir) -> list[str]
      writes test_predictions' result as submission files into the local `out_dir`
      (process 0 only); returns the file names written
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator, Protocol

from flax import nnx

from bert_jax.losses import LossFns

FAMILIES = ("glue", "ner", "squad")  # modules of bert_jax.tasks, asked in this order
ALL = "all"           # --config.task=all: the nine GLUE tasks


class Task(Protocol):
    name: str
    primary_metric: str
    labels: tuple[str, ...] | None
    loss_fns: LossFns
    num_train_examples: int
    steps_per_epoch: int

    def model(self, model_config, rngs: nnx.Rngs) -> nnx.Module: ...
    def init_head(self, model_config, seed: int) -> dict: ...
    def train_batches(self, seed: int, epoch: int) -> Iterator[dict]: ...
    def predict_outputs(self, params, graphdef, batch) -> Any: ...
    def evaluate(self, predict: Callable[[dict], Any]) -> dict[str, float]: ...
    def test_predictions(self, predict: Callable[[dict], Any]) -> dict: ...
    def write_predictions(self, predictions: dict, out_dir: str) -> list[str]: ...


def _family(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def resolve(spec: str) -> list[tuple[str, str]]:
    """'mrpc', 'rte,mrpc' or 'all' -> [(family, canonical task name)]; unknown names fail
    here, before any work."""
    if spec.strip().lower() == ALL:
        return [("glue", name) for name in _family("glue").GLUE_TASKS]
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError("config.task is empty; give a task name such as 'mrpc' or 'all'")
    found = []
    for name in names:
        for family in FAMILIES:
            canonical = _family(family).lookup(name)
            if canonical is not None:
                found.append((family, canonical))
                break
        else:
            known = ", ".join(n for f in FAMILIES for n in _family(f).NAMES)
            raise ValueError(f"config.task: unknown task {name!r}; known tasks: {known} "
                             "(or 'all' for the nine GLUE tasks)")
    return found


def build(family: str, name: str, config, tokenizer) -> Task:
    return _family(family).build(name, config, tokenizer)
