"""Every loss of the codebase: pretraining (MLM + NSP, or MLM alone), sequence classification and regression,
token classification (NER) and spans (extractive QA).

A loss is a ``LossFns(normalizers, loss, metrics)``, what ``bert_jax.train_step``'s steps call:

* ``normalizers(batch) -> {name: scalar}``: denominators computed on the *whole* batch, so
  micro-batches (gradient accumulation) sum to exactly the whole-batch loss.
* ``loss(params, graphdef, batch, dropout_key, normalizers=None, *, deterministic=False)
  -> (scalar loss, sums)``: ``sums`` are additive statistics (sums over examples), so
  evaluation adds them over batches; in float32 whatever the compute dtype.
* ``metrics(sums) -> {name: scalar}``: loss and accuracies from (added) sums.

The pieces every loss is made of: ``forward`` (merge the params, run the model on Google's
input names) and ``cross_entropy_sums(logits, labels, weights)``, which serves [B, C]
logits (NSP, classification), [B, P, V] (MLM at masked positions),
[B, L, C] token classification (per-token weights) and [B, L] span starts/ends alike.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx


class LossFns(NamedTuple):
    normalizers: Callable[[dict], dict]          # batch -> scalars computed on the whole batch
    loss: Callable[..., tuple[jax.Array, dict]]  # (params, graphdef, batch, key, normalizers, deterministic=)
    metrics: Callable[[dict], dict]              # additive sums -> metrics


def check_keys(batch, keys) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"batch is missing {missing}; it has {sorted(batch)}")


# Packed rows' extra model inputs, passed when the batch has them (`tasks.batching.packed_encoder_inputs`).
PACKING_KEYS = ("position_ids", "packed_segment_ids", "cls_positions")


def forward(params, graphdef, batch, dropout_key, deterministic: bool, *extra_inputs) -> dict:
    """The model's outputs on ``input_ids, input_mask, segment_ids`` (+ ``extra_inputs``, and
    ``PACKING_KEYS`` where the batch has them)."""
    model = nnx.merge(graphdef, params)
    packing = {k: batch[k] for k in PACKING_KEYS if k in batch}
    return model(batch["input_ids"], batch["input_mask"], batch["segment_ids"], *extra_inputs,
                 deterministic=deterministic, rngs=None if deterministic else dropout_key, **packing)


def cross_entropy_sums(logits, labels, weights) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted negative log-likelihoods, sum of weighted correct argmaxes), float32."""
    logits = logits.astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(correct * weights)


# ----------------------------------------------------------------------------
# Pretraining: masked LM (Google's normalisation: sum / (sum of weights + 1e-5)) + mean NSP
# (objective "mlm_nsp", BERT's), or the masked LM alone (objective "mlm": RoBERTa, MosaicBERT).
# Packed rows (next_sentence_labels [B, N] with next_sentence_weights): NSP is the mean over the
# real instances, MLM the mean over every masked position: the losses and gradients of the same
# instances unpacked.

MLM_KEYS = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids", "masked_lm_weights")
PRETRAINING_KEYS = MLM_KEYS + ("next_sentence_labels",)


def mlm_normalizers(batch) -> dict:
    return {"mlm": jnp.sum(batch["masked_lm_weights"].astype(jnp.float32)) + 1e-5}


def pretraining_normalizers(batch) -> dict:
    return {**mlm_normalizers(batch), "nsp": jnp.sum(_nsp_weights(batch))}


def _nsp_weights(batch):
    """1.0 per instance: every row of an unpacked batch, the filled slots of a packed one."""
    if "next_sentence_weights" in batch:
        return batch["next_sentence_weights"].astype(jnp.float32)
    return jnp.ones(batch["next_sentence_labels"].shape, jnp.float32)


def _instances(batch):
    """The instances of a batch: its rows, or of packed rows (instances numbered 1..k in a row's
    packed_segment_ids) the sum of each row's k."""
    if "packed_segment_ids" in batch:
        return jnp.sum(jnp.max(batch["packed_segment_ids"], axis=1)).astype(jnp.float32)
    return jnp.asarray(batch["input_ids"].shape[0], jnp.float32)


def _mlm_sums(params, graphdef, batch, dropout_key, deterministic) -> tuple[dict, dict]:
    """(the model's outputs, the masked-LM sums) of a pretraining batch."""
    out = forward(params, graphdef, batch, dropout_key, deterministic, batch["masked_lm_positions"])
    weights = batch["masked_lm_weights"].astype(jnp.float32)
    mlm_loss_sum, mlm_correct = cross_entropy_sums(out["mlm_logits"], batch["masked_lm_ids"], weights)
    return out, {"mlm_loss_sum": mlm_loss_sum, "mlm_correct": mlm_correct, "masked_tokens": jnp.sum(weights),
                 "sequences": _instances(batch),
                 "tokens": jnp.sum(batch["input_mask"]).astype(jnp.float32),
                 "slots": jnp.asarray(batch["input_mask"].size, jnp.float32)}


def mlm_loss(params, graphdef, batch, dropout_key, normalizers=None, *, deterministic=False):
    check_keys(batch, MLM_KEYS)
    if normalizers is None:
        normalizers = mlm_normalizers(batch)
    _, sums = _mlm_sums(params, graphdef, batch, dropout_key, deterministic)
    return sums["mlm_loss_sum"] / normalizers["mlm"], sums


def pretraining_loss(params, graphdef, batch, dropout_key, normalizers=None, *, deterministic=False):
    check_keys(batch, PRETRAINING_KEYS)
    if normalizers is None:
        normalizers = pretraining_normalizers(batch)
    out, sums = _mlm_sums(params, graphdef, batch, dropout_key, deterministic)
    nsp_weights = _nsp_weights(batch)
    nsp_labels = batch["next_sentence_labels"].reshape(nsp_weights.shape)
    sums["nsp_loss_sum"], sums["nsp_correct"] = cross_entropy_sums(out["nsp_logits"], nsp_labels, nsp_weights)
    loss = sums["mlm_loss_sum"] / normalizers["mlm"] + sums["nsp_loss_sum"] / normalizers["nsp"]
    return loss, sums


def mlm_metrics(sums) -> dict:
    mlm_loss = sums["mlm_loss_sum"] / (sums["masked_tokens"] + 1e-5)
    return {"loss": mlm_loss, "mlm_loss": mlm_loss,
            "mlm_accuracy": sums["mlm_correct"] / (sums["masked_tokens"] + 1e-5),
            "sequences": sums["sequences"], "tokens": sums["tokens"], "masked_tokens": sums["masked_tokens"],
            "packing_efficiency": sums["tokens"] / sums["slots"]}  # real tokens / row slots, padded or packed


def pretraining_metrics(sums) -> dict:
    metrics = mlm_metrics(sums)
    nsp_loss = sums["nsp_loss_sum"] / sums["sequences"]
    return {**metrics, "loss": metrics["mlm_loss"] + nsp_loss, "nsp_loss": nsp_loss,
            "nsp_accuracy": sums["nsp_correct"] / sums["sequences"]}


PRETRAINING = LossFns(pretraining_normalizers, pretraining_loss, pretraining_metrics)
MLM = LossFns(mlm_normalizers, mlm_loss, mlm_metrics)
# train.objective -> its loss; the objective also decides the data (instances.create_instances)
# and whether the model has a next-sentence head (model.BertForPreTraining).
OBJECTIVES = {"mlm_nsp": PRETRAINING, "mlm": MLM}


# ----------------------------------------------------------------------------
# Sequence classification (cross-entropy) and regression (squared error, STS-B) over the
# real examples of a batch (`is_real_example`: fill rows of the last batch weigh 0). Packed
# batches have label_ids, is_real_example and logits per (row, slot): [B, N] and [B, N, C].

CLASSIFICATION_KEYS = ("input_ids", "input_mask", "segment_ids", "label_ids", "is_real_example")


def classification_normalizers(batch) -> dict:
    return {"examples": jnp.maximum(jnp.sum(batch["is_real_example"].astype(jnp.float32)), 1.0)}


def classification_loss(params, graphdef, batch, dropout_key, normalizers=None, *, deterministic=False):
    check_keys(batch, CLASSIFICATION_KEYS)
    if normalizers is None:
        normalizers = classification_normalizers(batch)
    logits = forward(params, graphdef, batch, dropout_key, deterministic)["logits"].astype(jnp.float32)
    weights = batch["is_real_example"].astype(jnp.float32)
    if logits.shape[-1] == 1:  # regression
        squared_error = jnp.square(logits[..., 0] - batch["label_ids"].astype(jnp.float32))
        loss_sum, correct = jnp.sum(squared_error * weights), jnp.zeros((), jnp.float32)
    else:
        loss_sum, correct = cross_entropy_sums(logits, batch["label_ids"].astype(jnp.int32), weights)
    sums = {"loss_sum": loss_sum, "correct": correct, "examples": jnp.sum(weights)}
    return sums["loss_sum"] / normalizers["examples"], sums


def classification_metrics(sums) -> dict:
    examples = jnp.maximum(sums["examples"], 1.0)
    return {"loss": sums["loss_sum"] / examples, "accuracy": sums["correct"] / examples,
            "examples": sums["examples"]}


CLASSIFICATION = LossFns(classification_normalizers, classification_loss, classification_metrics)


# ----------------------------------------------------------------------------
# Token classification (NER): cross-entropy over the labelled tokens of the batch (a word's
# first sub-token; other sub-tokens, specials, padding and fill rows carry label IGNORE)

IGNORE = -100
TOKEN_CLASSIFICATION_KEYS = ("input_ids", "input_mask", "segment_ids", "label_ids")


def token_classification_normalizers(batch) -> dict:
    return {"tokens": jnp.maximum(jnp.sum((batch["label_ids"] != IGNORE).astype(jnp.float32)), 1.0)}


def token_classification_loss(params, graphdef, batch, dropout_key, normalizers=None, *, deterministic=False):
    check_keys(batch, TOKEN_CLASSIFICATION_KEYS)
    if normalizers is None:
        normalizers = token_classification_normalizers(batch)
    logits = forward(params, graphdef, batch, dropout_key, deterministic)["logits"]
    labels = batch["label_ids"].astype(jnp.int32)
    weights = (labels != IGNORE).astype(jnp.float32)
    loss_sum, correct = cross_entropy_sums(logits, jnp.maximum(labels, 0), weights)
    sums = {"loss_sum": loss_sum, "correct": correct, "tokens": jnp.sum(weights)}
    return sums["loss_sum"] / normalizers["tokens"], sums


def token_classification_metrics(sums) -> dict:
    tokens = jnp.maximum(sums["tokens"], 1.0)
    return {"loss": sums["loss_sum"] / tokens, "accuracy": sums["correct"] / tokens, "tokens": sums["tokens"]}


TOKEN_CLASSIFICATION = LossFns(token_classification_normalizers, token_classification_loss,
                               token_classification_metrics)


# ----------------------------------------------------------------------------
# Spans (extractive QA): the mean of the start and end cross-entropies over the positions
# of the sequence, per real example (Google's run_squad.py; padding positions excluded)

SPAN_KEYS = ("input_ids", "input_mask", "segment_ids", "start_positions", "end_positions", "is_real_example")


def span_loss(params, graphdef, batch, dropout_key, normalizers=None, *, deterministic=False):
    check_keys(batch, SPAN_KEYS)
    if normalizers is None:
        normalizers = classification_normalizers(batch)
    out = forward(params, graphdef, batch, dropout_key, deterministic)
    weights = batch["is_real_example"].astype(jnp.float32)
    padding = batch["input_mask"] == 0  # out of the softmax: the loss does not depend on the padded length
    sums = {"examples": jnp.sum(weights)}
    for end in ("start", "end"):
        logits = jnp.where(padding, -1e9, out[f"{end}_logits"].astype(jnp.float32))
        sums[f"{end}_loss_sum"], sums[f"{end}_correct"] = cross_entropy_sums(
            logits, batch[f"{end}_positions"].astype(jnp.int32), weights)
    loss = (sums["start_loss_sum"] + sums["end_loss_sum"]) / (2 * normalizers["examples"])
    return loss, sums


def span_metrics(sums) -> dict:
    examples = jnp.maximum(sums["examples"], 1.0)
    return {"loss": (sums["start_loss_sum"] + sums["end_loss_sum"]) / (2 * examples),
            "accuracy": (sums["start_correct"] + sums["end_correct"]) / (2 * examples),
            "start_accuracy": sums["start_correct"] / examples, "end_accuracy": sums["end_correct"] / examples,
            "examples": sums["examples"]}


SPAN = LossFns(classification_normalizers, span_loss, span_metrics)
