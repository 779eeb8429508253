"""Hugging Face BERT: ``config.json`` <-> :class:`BertConfig`, and ``model.safetensors`` (or
``pytorch_model.bin``, read with torch when installed) <-> our params, with or without the
``bert.`` prefix, with or without the MLM/NSP heads, or with a sequence-classification head.
Token-classification and question-answering heads are exported (transformers'
``BertForTokenClassification`` / ``BertForQuestionAnswering``), not imported.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from bert_jax import params as params_lib
from bert_jax.model import RUNTIME_KEYS, BertConfig
from bert_jax.weights import tokenizer_files
from bert_jax.weights.mapping import (MLM_TRANSFORM, ConversionError, Imported, assemble, encoder_modules,
                                      read_json, spell)

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

def name_map(cfg: BertConfig, prefix: str = "bert.") -> dict[str, list]:
    """Rows (our path, HF tensor name, transpose) by part: encoder, mlm, nsp, classifier."""
    def rows(modules, prefix=""):
        return spell(modules, LEAVES, ".", prefix)

    return {
        "encoder": rows(encoder_modules(cfg.num_hidden_layers, lambda i: f"layer/{i}"), prefix),
        "mlm": rows(MLM_TRANSFORM) + [("mlm/bias", "cls.predictions.bias", False)],
        "nsp": rows([("nsp", "cls/seq_relationship", "dense")]),
        "classifier": rows([("classifier", "classifier", "dense")]),
    }


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
    cfg = config_from_hf(read_json(cfg_file), str(cfg_file))
    source, tensors = _read_tensors(d)
    # Older checkpoints name LayerNorm parameters gamma/beta.
    tensors = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
               for k, v in tensors.items()}
    prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""
    return assemble(cfg, tensors, name_map(cfg, prefix), str(source), seed)


WRITTEN = (CONFIG_FILE, "model.safetensors")  # the files `save` writes (and the tokenizer's)


def save(cfg: BertConfig, params: dict, out_dir, tokenizer_dir=None) -> pathlib.Path:
    """``config.json`` + ``model.safetensors`` that transformers' ``BertForPreTraining``
    (``BertForSequenceClassification``, ``BertForTokenClassification`` or
    ``BertForQuestionAnswering`` for a fine-tuned tree) loads without warnings."""
    from safetensors.numpy import save_file

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
        hf_cfg.update(architectures=[architecture], num_labels=n, id2label={str(i): f"LABEL_{i}" for i in range(n)},
                      label2id={f"LABEL_{i}": i for i in range(n)})
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
