"""Named-entity recognition (CoNLL-2003) as a fine-tuning task: a label per word from the
token-classification head at the word's first sub-token, scored by entity-level precision,
recall and F1 (seqeval, conlleval's definition) on the dev and test files.

With `packing` (configs/ner.py's default) several sentence windows share a row of
`packed_row_length` tokens (auto: `tasks.batching.choose_row_length`), each with its own
[CLS] ... [SEP], positions restarting at 0 and attention kept inside it
(`tasks.batching.pack_rows`); the loss is the mean over the batch's labelled tokens either way,
so packed and padded batches of the same windows give the same loss, gradients and predictions
(tests/test_ner.py).

    python -m bert_jax.finetune --config configs/ner.py --config.data_dir=DIR \
        --config.init_checkpoint=PATH --workdir WORKDIR

Data (reader, windows, metrics, CoNLL output) is `tasks.ner_data`; the interface this
implements is documented in `bert_jax.tasks`.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bert_jax import losses
from bert_jax.model import BertConfig, BertForTokenClassification
from bert_jax.tasks import batching, glue_data, heads, ner_data, tfds_split

NAMES = ("ner",)
_SPELLINGS = {"ner": "ner", "conll2003": "ner"}


def lookup(name: str) -> str | None:
    return _SPELLINGS.get(name.strip().lower())


def build(name: str, c, tokenizer) -> "Ner":
    return Ner(c, tokenizer)


class Ner:
    """CoNLL files read and featurized once; see `bert_jax.tasks` for the members."""

    name = "ner"
    primary_metric = "dev/f1"
    loss_fns = losses.TOKEN_CLASSIFICATION

    def __init__(self, c, tokenizer):
        labels = tuple(label.strip() for label in c.labels.split(",")) if c.labels else None
        read, splits, source_labels = self._source(c)
        train = read("train", labels or source_labels)
        self.labels = labels or source_labels or ner_data.label_set(train)
        if c.max_train_examples:
            train = train[: c.max_train_examples]
        self.eval_sets = {split: read(split, self.labels) for split in ("dev", "test") if split in splits}

        def featurize(sentences):
            return ner_data.featurize(sentences, tokenizer, self.labels, c.max_seq_length, c.doc_stride or None)
        self.train = featurize(train)
        self.eval_features = {split: featurize(s) for split, s in self.eval_sets.items()}
        self.batch_size, self.eval_batch_size, self.pad_id = c.batch_size, c.eval_batch_size, tokenizer.pad_id
        self.buckets = glue_data.bucket_lengths(c.max_seq_length, c.smallest_bucket)
        self.packing = bool(c.get("packing", False))
        self.max_per_row = c.get("max_examples_per_row", 1)
        longest = max(int(f.lengths.max(initial=1)) for f in [self.train, *self.eval_features.values()])
        self.row_length = batching.packed_row_length(
            c.get("packed_row_length", 0), c.max_seq_length, self.train.lengths, longest, c.batch_size,
            self.max_per_row, jax.default_backend()) if self.packing else c.max_seq_length
        self.num_train_examples = len(train)
        self.steps_per_epoch = math.ceil(len(self.train) / c.batch_size)

    @staticmethod
    def _source(c):
        """-> (read(split, labels) -> sentences, the splits there are, the source's label set
        or None): CoNLL files, or TFDS (its label set: the builder's tags)."""
        name = tfds_split.tfds_name(c.data_source)
        if name is not None:
            tags = ner_data.tfds_tag_names(tfds_split.builder(name, c.tfds_data_dir))
            return ((lambda split, labels: ner_data.read_tfds(name, split, c.tfds_data_dir, labels)),
                    ner_data.TFDS_SPLITS, tags)
        if not c.data_dir:
            raise ValueError("config.data_dir is empty; give the directory of eng.train, eng.testa, eng.testb "
                             "(or train.txt, dev.txt, test.txt), or config.data_source='tfds:conll2003'")
        files = ner_data.find_split_files(c.data_dir)
        if "dev" not in files:
            raise FileNotFoundError(f"{c.data_dir}: no eng.testa or dev.txt (the dev set picks the run)")
        return (lambda split, labels: ner_data.read_conll(files[split], labels)), files, None

    def model(self, model_config: BertConfig, rngs: nnx.Rngs) -> nnx.Module:
        return BertForTokenClassification(model_config, len(self.labels), rngs=rngs)

    def init_head(self, model_config: BertConfig, seed: int) -> dict:
        return {"token_classifier": heads.dense_init(model_config, len(self.labels), seed)}

    def _batch(self, features: ner_data.Features, indices, rows: int) -> tuple[dict, list[tuple[int, int]]]:
        """-> (batch, where): `where[k]` is the (row, first position) of window `indices[k]`.

        Padded: one window per row, `rows` rows (fill rows: all labels IGNORE), padded to a
        bucket. Packed: the windows first-fit into rows of `row_length` tokens (the row
        count rounded up by `batching.packed_row_count`), labels IGNORE between them."""
        token_ids = [features.token_ids[i] for i in indices]
        if not self.packing:
            length = batching.bucket_length(features.lengths[indices], self.buckets)
            batch = batching.encoder_inputs(token_ids, None, rows, length, self.pad_id)
            batch["label_ids"] = batching.pad_rows([features.label_ids[i] for i in indices], rows, length,
                                                   ner_data.IGNORE)
            return batch, [(k, 0) for k in range(len(indices))]
        packed = batching.pack_rows([len(t) for t in token_ids], self.row_length, self.max_per_row)
        num_rows = batching.packed_row_count(len(packed))
        batch, slots = batching.packed_encoder_inputs(token_ids, None, packed, num_rows, self.row_length,
                                                      self.max_per_row, self.pad_id)
        starts = batch.pop("cls_positions")  # the head reads every token, not the [CLS]
        batch["label_ids"] = np.full((num_rows, self.row_length), ner_data.IGNORE, np.int32)
        where = [(0, 0)] * len(indices)
        for row, slot in zip(*np.nonzero(slots >= 0)):
            k, start = int(slots[row, slot]), int(starts[row, slot])
            batch["label_ids"][row, start: start + len(token_ids[k])] = features.label_ids[indices[k]]
            where[k] = (int(row), start)
        return batch, where

    def train_batches(self, seed: int, epoch: int) -> Iterator[dict]:
        # Packed batches mix lengths (packing wastes little on them): no length grouping.
        for indices in glue_data.train_batch_indices(self.train.lengths, self.batch_size, seed=seed, epoch=epoch,
                                                     group_batches=1 if self.packing else 50):
            yield self._batch(self.train, indices, self.batch_size)[0]

    def predict_outputs(self, params, graphdef, batch):
        logits = losses.forward(params, graphdef, batch, None, True)["logits"]
        return jnp.argmax(logits, -1).astype(jnp.int32)

    def _predict_tags(self, predict: Callable, split: str) -> list[list[str]]:
        features, sentences = self.eval_features[split], self.eval_sets[split]
        token_predictions = [None] * len(features)
        # Padded: batches of similar length; packed: file order (mixed lengths pack well).
        n, size = len(features), self.eval_batch_size
        order = ([np.arange(start, min(start + size, n)) for start in range(0, n, size)] if self.packing
                 else batching.eval_batch_indices(features.lengths, size))
        for indices in order:
            batch, where = self._batch(features, indices, self.eval_batch_size)
            predicted = predict(batch)
            for (row, start), i in zip(where, indices):
                token_predictions[i] = predicted[row, start: start + len(features.token_ids[i])]
        words = ner_data.word_predictions(features, token_predictions, [len(s.words) for s in sentences])
        return [[self.labels[i] for i in sentence] for sentence in words]

    def evaluate(self, predict: Callable) -> dict[str, float]:
        metrics = {}
        for split, sentences in self.eval_sets.items():
            scores = ner_data.entity_metrics([s.tags for s in sentences], self._predict_tags(predict, split))
            metrics.update({f"{split}/{k}": float(v) for k, v in scores.items() if not k.endswith("support")})
        return metrics

    def test_predictions(self, predict: Callable) -> dict:
        return {split: self._predict_tags(predict, split) for split in self.eval_sets}

    def write_predictions(self, predictions: dict, out_dir: str) -> list[str]:
        """`ner_<split>.conll`: word, gold and predicted tag per line (conlleval's input)."""
        written = []
        for split, tags in predictions.items():
            path = os.path.join(out_dir, f"ner_{split}.conll")
            ner_data.write_conll(path, self.eval_sets[split], tags)
            written.append(path)
        return written
