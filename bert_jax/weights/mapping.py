"""From a checkpoint's named tensors to our canonical params tree (shared by the formats).

A format's name map lists, for each part of the model (``encoder``, ``mlm``, ``nsp``,
``classifier``), rows ``(our path, their tensor name, transpose)``. Google's TF release and
Hugging Face name BERT's modules alike (``bert/encoder/layer_3/attention/self/query/kernel``,
``bert.encoder.layer.3.attention.self.query.weight``): the modules are listed once here, and
each format spells them with its own separator, layer names and leaf names (:func:`spell`).
"""
from __future__ import annotations

import json
import logging
import pathlib
from typing import NamedTuple

import numpy as np

from bert_jax import params as params_lib
from bert_jax.model import BertConfig

log = logging.getLogger("bert_jax.weights")

Row = tuple[str, str, bool]  # (our path, their tensor name, transpose)
# Source tensors that are not parameters (or are tied copies of ours): not worth a warning.
BENIGN = ("position_ids", "decoder.weight", "decoder.bias", "global_step", "adam_", "bad_steps",
          "loss_scale", "good_steps")

# (our module, Google's module, kind); kind picks the leaf names of each format.
EMBEDDINGS_AND_POOLER = (
    ("bert/embeddings/word_embeddings", "embeddings/word_embeddings", "embedding"),
    ("bert/embeddings/position_embeddings", "embeddings/position_embeddings", "embedding"),
    ("bert/embeddings/token_type_embeddings", "embeddings/token_type_embeddings", "embedding"),
    ("bert/embeddings/layer_norm", "embeddings/LayerNorm", "norm"),
    ("bert/pooler", "pooler/dense", "dense"),
)
LAYER = (
    ("attention/query", "attention/self/query", "dense"),
    ("attention/key", "attention/self/key", "dense"),
    ("attention/value", "attention/self/value", "dense"),
    ("attention/output", "attention/output/dense", "dense"),
    ("attention_layer_norm", "attention/output/LayerNorm", "norm"),
    ("intermediate", "intermediate/dense", "dense"),
    ("output", "output/dense", "dense"),
    ("output_layer_norm", "output/LayerNorm", "norm"),
)
MLM_TRANSFORM = (
    ("mlm/transform", "cls/predictions/transform/dense", "dense"),
    ("mlm/transform_layer_norm", "cls/predictions/transform/LayerNorm", "norm"),
)


# Task heads (bert_jax.model): sequence classification, token classification, question answering.
FINE_TUNED_HEADS = ("classifier", "token_classifier", "qa_outputs")
POOLER = "bert/pooler/"


class ConversionError(ValueError):
    """Wrong or incomplete input; the message names the file or tensor."""


class Imported(NamedTuple):
    """What every importer returns. ``params``: the canonical nested dict of numpy arrays
    (``bert/...``, ``mlm/...``, ``nsp/...``, or one task head: ``classifier/...``,
    ``token_classifier/...``, ``qa_outputs/...``); ``report``: ``initialised`` (heads missing
    from the source, made fresh), ``ignored`` (source tensors that are not part of BERT) and
    ``labels`` (the task head's label names, or None), see :func:`report`."""
    config: BertConfig
    params: dict
    report: dict


def encoder_modules(num_layers: int, layer_name) -> list[tuple[str, str, str]]:
    """Embeddings, pooler and layers as (our module, Google's module, kind);
    ``layer_name(i)`` is layer i's module in the format (``layer_3``, ``layer/3``)."""
    modules = list(EMBEDDINGS_AND_POOLER)
    for i in range(num_layers):
        modules += [(f"bert/encoder/layers/{i}/{ours}", f"encoder/{layer_name(i)}/{theirs}", kind)
                    for ours, theirs, kind in LAYER]
    return modules


def spell(modules, leaves: dict, sep: str, prefix: str = "") -> list[Row]:
    """Modules -> rows. ``leaves[kind]``: (our leaf, their leaf or None when the module is
    the tensor itself, transpose); their names are ``prefix`` + the module joined by ``sep``."""
    rows = []
    for ours, theirs, kind in modules:
        name = prefix + theirs.replace("/", sep)
        for our_leaf, their_leaf, transpose in leaves[kind]:
            rows.append((f"{ours}/{our_leaf}", name if their_leaf is None else f"{name}{sep}{their_leaf}",
                         transpose))
    return rows


def read_json(path) -> dict:
    try:
        return json.loads(pathlib.Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e


def assemble(cfg: BertConfig, tensors: dict, groups: dict[str, list[Row]], source: str,
             seed: int = 0) -> Imported:
    """Source tensors -> canonical params through a name map. The encoder is required (a
    missing pooler, as token and span models are saved, is made fresh); a head is taken
    whole or not at all (a partial head is an error)."""
    bias = [theirs for rows in groups.values() for ours, theirs, _ in rows
            if ours.endswith("classifier/bias") and theirs in tensors]
    num_labels = int(np.shape(tensors[bias[0]])[0]) if bias else 2
    shapes = params_lib.canonical_shapes(cfg, num_labels)
    flat, used = {}, set()
    for part, rows in groups.items():
        present = [theirs for _, theirs, _ in rows if theirs in tensors]
        if not present and part != "encoder":
            continue
        if part == "encoder" and not any(theirs in tensors for ours, theirs, _ in rows if ours.startswith(POOLER)):
            rows = [row for row in rows if not row[0].startswith(POOLER)]
        missing = [theirs for _, theirs, _ in rows if theirs not in tensors]
        if missing:
            raise ConversionError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        for ours, theirs, transpose in rows:
            arr = np.asarray(tensors[theirs], dtype=np.float32)
            arr = arr.T if transpose else arr
            if tuple(arr.shape) != shapes[ours]:
                want = tuple(reversed(shapes[ours])) if transpose else shapes[ours]
                raise ConversionError(f"{source}: tensor {theirs!r} has shape {tuple(np.shape(tensors[theirs]))}, "
                                      f"expected {want} for {ours}")
            flat[ours] = arr
            used.add(theirs)
    pooler = [] if POOLER + "kernel" in flat else ["pooler"]
    if pooler:
        flat.update(params_lib.flatten(params_lib.init_pooler(cfg, seed), POOLER.rstrip("/")))
        log.info("%s: no pooler in the checkpoint; initialised fresh", source)
    initialised = pooler + add_fresh_heads(cfg, flat, source, seed)
    ignored = sorted(n for n in tensors if n not in used and not any(b in n for b in BENIGN))
    if ignored:
        log.warning("%s: ignored tensors not part of BERT: %s", source, ignored[:10])
    return Imported(cfg, params_lib.unflatten(flat), report(initialised, ignored))


def report(initialised: list[str], ignored: list[str], labels: tuple[str, ...] | None = None) -> dict:
    """An importer's report: heads made fresh, source tensors ignored, the head's label names
    in id order (None: no task head, or a checkpoint that names no labels)."""
    return {"initialised": initialised, "ignored": ignored, "labels": None if labels is None else list(labels)}


def add_fresh_heads(cfg: BertConfig, flat: dict, source: str, seed: int = 0) -> list[str]:
    """Gives flat params of a bare encoder (a ``BertModel`` checkpoint) fresh MLM/NSP heads,
    in place; a fine-tuned checkpoint (with a task head) gets none. -> the heads made."""
    if any(k.split("/")[0] in FINE_TUNED_HEADS for k in flat):
        return []
    missing = [head for head in ("mlm", "nsp") if not any(k.startswith(head + "/") for k in flat)]
    if missing:
        fresh = params_lib.flatten(params_lib.init_heads(cfg, seed=seed))
        flat.update({k: v for k, v in fresh.items() if k.split("/")[0] in missing})
        log.warning("%s: no %s head(s) in the checkpoint; initialised fresh", source, missing)
    return missing
