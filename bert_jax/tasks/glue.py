"""GLUE (and the `continuation` task) as a fine-tuning task: sequence classification or,
for STS-B, regression on the pooled output; scored with GLUE's dev metrics.

Data (readers, featurisation, length buckets, submission files) is `tasks.glue_data`;
the interface this implements is documented in `bert_jax.tasks`.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bert_jax import glue_metrics, losses
from bert_jax.model import BertConfig, BertForSequenceClassification
from bert_jax.tasks import batching, glue_data, heads

NAMES = tuple(glue_data.TASKS)
GLUE_TASKS = glue_data.GLUE_TASKS


def lookup(name: str) -> str | None:
    return glue_data.canonical_name(name)


def build(name: str, c, tokenizer) -> "Glue":
    return Glue(glue_data.TASKS[name], c, tokenizer)


class Glue:
    """One GLUE task, read and featurized once; see `bert_jax.tasks` for the members."""

    loss_fns = losses.CLASSIFICATION

    def __init__(self, spec: glue_data.GlueTask, c, tokenizer):
        self.spec, self.name, self.primary_metric = spec, spec.name, spec.primary_metric
        splits = glue_data.load_task(spec, glue_dir=c.glue_dir or None, tfds_data_dir=c.tfds_data_dir or None,
                                     use_tfds=not c.glue_dir, skip_bad_rows=c.skip_bad_rows,
                                     with_test=c.write_predictions)
        train = splits["train"]["train"]
        if c.max_train_examples:
            n = c.max_train_examples
            train = glue_data.GlueSplit(train.text_a[:n], train.text_b and train.text_b[:n], train.labels[:n],
                                        train.index[:n], train.source)
        if not len(train):
            raise ValueError(f"{spec.dir_name}: no training examples in {train.source}")

        def featurize(split):
            return glue_data.featurize(split, tokenizer, c.max_seq_length)
        self.train = featurize(train)
        self.dev = {name: featurize(split) for name, split in splits["dev"].items()}
        self.test = {name: (split, featurize(split)) for name, split in splits["test"].items()}
        self.batch_size, self.eval_batch_size = c.batch_size, c.eval_batch_size
        longest = max(int(f.lengths.max(initial=1)) for f in [self.train, *self.dev.values()]
                      + [f for _, f in self.test.values()])
        self.row_length = batching.packed_row_length(
            c.get("packed_row_length", 0), c.max_seq_length, self.train.lengths, longest, c.batch_size,
            c.max_examples_per_row, jax.default_backend()) if c.packing else c.max_seq_length
        self.layout = glue_data.Layout(glue_data.bucket_lengths(c.max_seq_length, c.smallest_bucket), tokenizer.pad_id,
                                       regression=spec.is_regression, packing=c.packing, row_length=self.row_length,
                                       max_per_row=c.max_examples_per_row)
        self.num_train_examples = len(self.train)
        self.steps_per_epoch = math.ceil(len(self.train) / c.batch_size)

    @property
    def labels(self) -> tuple[str, ...] | None:
        return self.spec.labels

    def model(self, model_config: BertConfig, rngs: nnx.Rngs) -> nnx.Module:
        return BertForSequenceClassification(model_config, self.spec.num_labels, rngs=rngs)

    def init_head(self, model_config: BertConfig, seed: int) -> dict:
        return {"classifier": heads.dense_init(model_config, self.spec.num_labels, seed)}

    def train_batches(self, seed: int, epoch: int) -> Iterator[dict]:
        return glue_data.train_batches(self.train, self.batch_size, self.layout, seed=seed, epoch=epoch)

    def predict_outputs(self, params, graphdef, batch):
        return losses.forward(params, graphdef, batch, None, True)["logits"].astype(jnp.float32)

    def _predict(self, predict: Callable, features: glue_data.Features) -> np.ndarray:
        """Class ids (scores for regression) in the order of `features`."""
        regression = self.spec.is_regression
        out = np.zeros((len(features),), np.float32 if regression else np.int64)
        for examples, batch in glue_data.eval_batches(features, self.eval_batch_size, self.layout):
            logits, real = predict(batch), examples >= 0  # [rows(, slots), classes]
            logits = logits[: len(examples)][real]  # rows past `examples`: fill to the batch shards
            out[examples[real]] = logits[:, 0] if regression else logits.argmax(-1)
        return out

    def evaluate(self, predict: Callable) -> dict[str, float]:
        metrics = {}
        for name, features in self.dev.items():
            scores = glue_metrics.compute_metrics(self.spec.metric, self._predict(predict, features), features.labels)
            metrics.update({f"{name}/{k}": v for k, v in scores.items()})
        return metrics

    def test_predictions(self, predict: Callable) -> dict:
        return {name: (split, self._predict(predict, features)) for name, (split, features) in self.test.items()}

    def write_predictions(self, predictions: dict, out_dir: str) -> list[str]:
        return [glue_data.write_submission(self.spec, name, split, predicted, out_dir)
                for name, (split, predicted) in predictions.items()]
