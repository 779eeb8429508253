"""Hugging Face BERT: ``config.json`` <-> :class:`BertConfig`, and ``model.safetensors`` (or
``pytorch_model.bin``, read with torch when installed) <-> our params, with or without the
``bert.`` prefix, with or without the MLM/NSP heads, or with one fine-tuned head:
transformers' ``BertForSequenceClassification``, ``BertForTokenClassification`` or
``BertForQuestionAnswering`` (the architecture in ``config.json`` tells the two heads named
``classifier`` apart), with the label names of ``id2label``.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from bert_jax import params as params_lib
from bert_jax.model import RUNTIME_KEYS, BertConfig
from bert_jax.weights import tokenizer_files
from bert_jax.weights.mapping import (FINE_TUNED_HEADS, MLM_TRANSFORM, ConversionError, Imported, assemble,
                                      encoder_modules, read_json, spell)

CONFIG_FILE = "config.json"
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
# Our leaf, theirs, transpose (torch's Linear stores [out, in]).
LEAVES = {"dense": (("kernel", "weight", True), ("bias", "bias", False)),
          "norm": (("scale", "weight", False), ("bias", "bias", False)),
          "embedding": (("embedding", "weight", False),)}
# Our fine-tuned token heads -> their module and architecture (built without the pooler).
TOKEN_HEADS = {"token_classifier": ("classifier", "BertForTokenClassification"),
               "qa_outputs": ("qa_outputs", "BertForQuestionAnswering")}


# ----------------------------------------------------------------------------
# config.json: its keys are a superset of the model's; keys that change the architecture in
# ways we do not implement are errors.

def config_from_hf(d: dict, where: str = CONFIG_FILE) -> BertConfig:
    pet = d.get("position_embedding_type", "absolute")
    if pet != "absolute":
        raise ConversionError(f"{where}: position_embedding_type={pet!r} is not supported (only 'absolute')")
    if d.get("is_decoder") or d.get("add_cross_attention"):
        raise ConversionError(f"{where}: decoder/cross-attention BERT variants are not supported")
    model_type = d.get("model_type", "bert")
    if model_type != "bert":
        raise ConversionError(f"{where}: model_type={model_type!r}, expected 'bert'")
    names = {f.name for f in dataclasses.fields(BertConfig)} - set(RUNTIME_KEYS)
    kw = {k: d[k] for k in names if k in d}
    missing = sorted({"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"} - set(kw))
    if missing:
        raise ConversionError(f"{where}: missing key(s) {missing}")
    try:
        return BertConfig(**kw)
    except ValueError as e:
        raise ConversionError(f"{where}: {e}") from e


def config_to_hf(cfg: BertConfig) -> dict:
    d = {k: v for k, v in cfg.to_dict().items() if k not in RUNTIME_KEYS}
    d.update(model_type="bert", architectures=["BertForPreTraining"],
             position_embedding_type="absolute", pad_token_id=0, torch_dtype="float32")
    return d


# ----------------------------------------------------------------------------
# Weights

def name_map(cfg: BertConfig, prefix: str = "bert.", architecture: str = "") -> dict[str, list]:
    """Rows (our path, HF tensor name, transpose) by part: encoder, mlm, nsp and the task
    heads; their ``classifier`` is our token_classifier in a BertForTokenClassification."""
    def rows(modules, prefix=""):
        return spell(modules, LEAVES, ".", prefix)

    classifier = "token_classifier" if architecture == TOKEN_HEADS["token_classifier"][1] else "classifier"
    return {
        "encoder": rows(encoder_modules(cfg.num_hidden_layers, lambda i: f"layer/{i}"), prefix),
        "mlm": rows(MLM_TRANSFORM) + [("mlm/bias", "cls.predictions.bias", False)],
        "nsp": rows([("nsp", "cls/seq_relationship", "dense")]),
        classifier: rows([(classifier, "classifier", "dense")]),
        "qa_outputs": rows([("qa_outputs", "qa_outputs", "dense")]),
    }


def label_entries(labels) -> dict:
    """config.json's num_labels, id2label and label2id for label names in id order."""
    return {"num_labels": len(labels), "id2label": {str(i): name for i, name in enumerate(labels)},
            "label2id": {name: i for i, name in enumerate(labels)}}


def labels_from_hf(d: dict, params: dict, where: str = CONFIG_FILE) -> list[str] | None:
    """The label names of ``id2label`` in id order when ``params`` hold a classifier head."""
    head = next((h for h in FINE_TUNED_HEADS if h in params and h != "qa_outputs"), None)
    if head is None or "id2label" not in d:
        return None
    n = int(np.shape(params[head]["bias"])[0])
    try:
        names = {int(k): str(v) for k, v in d["id2label"].items()}
    except (AttributeError, ValueError) as e:
        raise ConversionError(f"{where}: id2label must map label ids to names ({e})") from e
    if sorted(names) != list(range(n)):
        raise ConversionError(f"{where}: id2label has ids {sorted(names)}, expected 0..{n - 1} for the "
                              f"{n} outputs of the {head} head")
    return [names[i] for i in range(n)]


def _read_tensors(d: pathlib.Path) -> tuple[pathlib.Path, dict]:
    if (d / "model.safetensors").is_file():
        from safetensors.numpy import load_file

        source = d / "model.safetensors"
        return source, load_file(str(source))
    if (d / "pytorch_model.bin").is_file():
        source = d / "pytorch_model.bin"
        try:
            import torch
        except ImportError as e:
            raise ConversionError(f"{source}: reading pytorch_model.bin needs torch (pip install torch==2.13.0), "
                                  "or convert it to model.safetensors") from e
        state = torch.load(source, map_location="cpu", weights_only=True)
        return source, {k: v.float().numpy() for k, v in state.items()}
    raise ConversionError(f"{d}: neither model.safetensors nor pytorch_model.bin found")


def load(path, seed: int = 0) -> Imported:
    d = pathlib.Path(path)
    cfg_file = d / CONFIG_FILE
    if not cfg_file.is_file():
        raise ConversionError(f"{d}: no config.json (a Hugging Face BERT directory needs one)")
    hf_config = read_json(cfg_file)
    if hf_config.get("pre_layer_norm"):
        raise ConversionError(f"{cfg_file}: pre_layer_norm=true, but Hugging Face's BertModel is post-LayerNorm: "
                              "these weights were not written for it (bert_jax writes pre-LayerNorm models as .npz)")
    cfg = config_from_hf(hf_config, str(cfg_file))
    source, tensors = _read_tensors(d)
    # Older checkpoints name LayerNorm parameters gamma/beta.
    tensors = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
               for k, v in tensors.items()}
    prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""
    architecture = (hf_config.get("architectures") or [""])[0]
    imported = assemble(cfg, tensors, name_map(cfg, prefix, architecture), str(source), seed)
    imported.report["labels"] = labels_from_hf(hf_config, imported.params, str(cfg_file))
    return imported


WRITTEN = (CONFIG_FILE, "model.safetensors")  # the files `save` writes (and the tokenizer's)


def save(cfg: BertConfig, params: dict, out_dir, tokenizer_dir=None, labels=None) -> pathlib.Path:
    """``config.json`` + ``model.safetensors`` that transformers' ``BertForPreTraining``
    (``BertForSequenceClassification``, ``BertForTokenClassification`` or
    ``BertForQuestionAnswering`` for a fine-tuned tree) loads without warnings; ``labels``
    (the head's label names in id order) become id2label/label2id (default LABEL_<i>)."""
    from safetensors.numpy import save_file

    if cfg.pre_layer_norm:
        raise ConversionError("export to Hugging Face: this model has model.pre_layer_norm=True (pre-LayerNorm "
                              "blocks and a final LayerNorm), which Hugging Face's BertModel does not have; "
                              "export with --format npz, or keep the Orbax checkpoint")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = params_lib.flatten(params)
    tensors = {}
    token_heads = [spell([(ours, theirs, "dense")], LEAVES, ".") for ours, (theirs, _) in TOKEN_HEADS.items()]
    for rows in [*name_map(cfg).values(), *token_heads]:
        if not any(ours in flat for ours, _, _ in rows):
            continue
        for ours, theirs, transpose in rows:
            if ours not in flat:
                raise ConversionError(f"export to Hugging Face: parameter {ours} missing")
            arr = np.asarray(flat[ours], dtype=np.float32)
            tensors[theirs] = np.ascontiguousarray(arr.T if transpose else arr)
    hf_cfg = config_to_hf(cfg)
    heads = {"classifier": "BertForSequenceClassification", **{ours: arch for ours, (_, arch) in TOKEN_HEADS.items()}}
    for head, architecture in heads.items():
        if f"{head}/kernel" not in flat:
            continue
        n = int(np.shape(flat[f"{head}/bias"])[0])
        names = [f"LABEL_{i}" for i in range(n)] if labels is None or head == "qa_outputs" else list(labels)
        if len(names) != n:
            raise ConversionError(f"export to Hugging Face: {len(names)} label names for the {n} outputs of {head}")
        hf_cfg.update(architectures=[architecture], **label_entries(names))
        if head == "classifier":
            hf_cfg["problem_type"] = "regression" if n == 1 else "single_label_classification"
        # No pretraining heads in a fine-tuned model; transformers builds the token models without a pooler.
        dropped = ("cls.",) if head == "classifier" else ("cls.", "bert.pooler.")
        tensors = {k: v for k, v in tensors.items() if not k.startswith(dropped)}
    save_file(tensors, str(out / WRITTEN[1]), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
    if tokenizer_dir is not None:
        tokenizer_files.copy_tokenizer(tokenizer_dir, out)
    return out
