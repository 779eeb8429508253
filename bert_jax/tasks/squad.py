"""Extractive question answering (SQuAD v1.1 / v2.0) as a fine-tuning task: start and end
logits per token from the span head; answers searched over every passage window of a
question and scored with the official exact match and F1 on `predict_file`.

    python -m bert_jax.finetune --config configs/squad.py --config.init_checkpoint=PATH \
        --config.train_file=train-v1.1.json --config.predict_file=dev-v1.1.json --workdir WORKDIR

With `version_2_with_negative`, a question is answered "" when its null score beats the best
span by more than a threshold, the one that maximises F1 on predict_file (reported as
`dev/null_threshold`). Data (reader, windows, answer search, metrics) is `tasks.squad_data`;
the interface this implements is documented in `bert_jax.tasks`.
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bert_jax import losses
from bert_jax.model import BertConfig, BertForQuestionAnswering
from bert_jax.tasks import batching, glue_data, heads, squad_data, tfds_split

NAMES = ("squad",)


def lookup(name: str) -> str | None:
    return "squad" if name.strip().lower() in ("squad", "squad1.1", "squad2.0") else None


def build(name: str, c, tokenizer) -> "Squad":
    return Squad(c, tokenizer)


class Squad:
    """SQuAD files read and featurized once; see `bert_jax.tasks` for the members."""

    name = "squad"
    primary_metric = "dev/f1"
    loss_fns = losses.SPAN
    labels = None

    def __init__(self, c, tokenizer):
        self.version_2 = c.version_2_with_negative
        name = tfds_split.tfds_name(c.data_source)
        if name is not None:
            train, self.dev = (squad_data.read_tfds(name, split, c.tfds_data_dir, self.version_2)
                               for split in ("train", "dev"))
        else:
            for key in ("train_file", "predict_file"):
                if not c[key]:
                    raise ValueError(f"config.{key} is empty; give a SQuAD JSON file (train-v1.1.json, dev-v1.1.json, "
                                     "or the v2.0 files with version_2_with_negative=true), or "
                                     "config.data_source='tfds:squad/v1.1'")
            train, self.dev = (squad_data.read_squad(c[key], self.version_2) for key in ("train_file", "predict_file"))
        if c.max_train_examples:
            train = train[: c.max_train_examples]

        def featurize(examples):
            return squad_data.featurize(examples, tokenizer, c.max_seq_length, c.doc_stride, c.max_query_length)
        self.train, self.dev_features = featurize(train), featurize(self.dev)
        self.n_best_size, self.max_answer_length = c.n_best_size, c.max_answer_length
        self.batch_size, self.eval_batch_size, self.pad_id = c.batch_size, c.eval_batch_size, tokenizer.pad_id
        self.buckets = glue_data.bucket_lengths(c.max_seq_length, c.smallest_bucket)
        self.num_train_examples = len(train)
        self.steps_per_epoch = math.ceil(len(self.train) / c.batch_size)

    def model(self, model_config: BertConfig, rngs: nnx.Rngs) -> nnx.Module:
        return BertForQuestionAnswering(model_config, rngs=rngs)

    def init_head(self, model_config: BertConfig, seed: int) -> dict:
        return {"qa_outputs": heads.dense_init(model_config, 2, seed)}

    def _batch(self, features: squad_data.Features, indices, rows: int) -> dict:
        length = batching.bucket_length(features.lengths[indices], self.buckets)
        batch = batching.encoder_inputs([features.token_ids[i] for i in indices],
                                        features.first_segment_lengths[indices], rows, length, self.pad_id)
        for name in ("start_positions", "end_positions"):
            batch[name] = np.zeros(rows, np.int32)
            batch[name][: len(indices)] = getattr(features, name)[indices]
        batch["is_real_example"] = (np.arange(rows) < len(indices)).astype(np.float32)
        return batch

    def train_batches(self, seed: int, epoch: int) -> Iterator[dict]:
        for indices in glue_data.train_batch_indices(self.train.lengths, self.batch_size, seed=seed, epoch=epoch):
            yield self._batch(self.train, indices, self.batch_size)

    def predict_outputs(self, params, graphdef, batch):
        out = losses.forward(params, graphdef, batch, None, True)
        return jnp.stack([out["start_logits"], out["end_logits"]], -1).astype(jnp.float32)

    def _answers(self, predict: Callable) -> tuple[dict, dict, dict]:
        """(predictions.json content, null_diff per question, dev metrics)."""
        features = self.dev_features
        logits = [None] * len(features)
        for indices in batching.eval_batch_indices(features.lengths, self.eval_batch_size):
            predicted = predict(self._batch(features, indices, self.eval_batch_size))
            for row, i in enumerate(indices):
                logits[i] = predicted[row]
        n_best, null_diff = squad_data.best_answers(
            self.dev, features, [x[:, 0] for x in logits], [x[:, 1] for x in logits],
            n_best_size=self.n_best_size, max_answer_length=self.max_answer_length)
        if not self.version_2:
            answers = squad_data.predictions(n_best)
            return answers, {}, squad_data.evaluate(self.dev, answers)
        best = squad_data.evaluate(self.dev, squad_data.predictions(n_best), null_diff)
        threshold = best["best_f1_thresh"]
        answers = squad_data.predictions(n_best, null_diff, threshold)
        return answers, null_diff, {**squad_data.evaluate(self.dev, answers), "null_threshold": threshold}

    def evaluate(self, predict: Callable) -> dict[str, float]:
        return {f"dev/{k}": float(v) for k, v in self._answers(predict)[2].items()}

    def test_predictions(self, predict: Callable) -> dict:
        answers, null_diff, _ = self._answers(predict)
        return {"predictions": answers, "null_odds": null_diff}

    def write_predictions(self, predictions: dict, out_dir: str) -> list[str]:
        """predictions.json ({question id: answer}, the official format) and, for v2.0,
        null_odds.json (the evaluation script's --na-prob-file)."""
        path = os.path.join(out_dir, "predictions.json")
        squad_data.write_predictions(path, predictions["predictions"])
        written = [path]
        if self.version_2:
            odds = os.path.join(out_dir, "null_odds.json")
            with open(odds, "w", encoding="utf-8") as f:
                json.dump(predictions["null_odds"], f, indent=2)
            written.append(odds)
        return written
