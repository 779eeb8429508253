"""Google's original BERT release: ``bert_config.json`` + ``bert_model.ckpt.*`` (+ ``vocab.txt``),
read with TensorFlow. Classifier checkpoints of Google's ``run_classifier.py`` keep their head."""
from __future__ import annotations

import pathlib

from bert_jax.model import BertConfig
from bert_jax.weights.hf import config_from_hf
from bert_jax.weights.mapping import (MLM_TRANSFORM, ConversionError, Imported, assemble, encoder_modules,
                                      read_json, spell)

CONFIG_FILE = "bert_config.json"
CHECKPOINT_PREFIX = "bert_model.ckpt"
# Our leaf, theirs (None: the module is the tensor), transpose (TF kernels are [in, out] like ours).
LEAVES = {"dense": (("kernel", "kernel", False), ("bias", "bias", False)),
          "norm": (("scale", "gamma", False), ("bias", "beta", False)),
          "embedding": (("embedding", None, False),)}


def name_map(cfg: BertConfig) -> dict[str, list]:
    """Rows (our path, TF variable name, transpose) by part: encoder, mlm, nsp, classifier."""
    return {
        "encoder": spell(encoder_modules(cfg.num_hidden_layers, lambda i: f"layer_{i}"), LEAVES, "/", "bert/"),
        "mlm": spell(MLM_TRANSFORM, LEAVES, "/") + [("mlm/bias", "cls/predictions/output_bias", False)],
        # Google stores the NSP and classifier weights as [classes, hidden].
        "nsp": [("nsp/kernel", "cls/seq_relationship/output_weights", True),
                ("nsp/bias", "cls/seq_relationship/output_bias", False)],
        "classifier": [("classifier/kernel", "output_weights", True), ("classifier/bias", "output_bias", False)],
    }


def is_checkpoint(path) -> bool:
    p = pathlib.Path(path)
    return (p.is_dir() and (p / CONFIG_FILE).is_file()) or pathlib.Path(str(p) + ".index").is_file()


def load(path, seed: int = 0) -> Imported:
    """``path``: the release directory or the checkpoint prefix (``.../bert_model.ckpt``)."""
    d = pathlib.Path(path)
    if d.is_file() or not d.exists():
        prefix, d = d, d.parent
    else:
        prefix = d / CHECKPOINT_PREFIX
    cfg_file = d / CONFIG_FILE
    if not cfg_file.is_file():
        raise ConversionError(f"{d}: no {CONFIG_FILE} beside the TF checkpoint")
    if not pathlib.Path(str(prefix) + ".index").is_file():
        raise ConversionError(f"{prefix}.index not found: pass the directory of a Google BERT release "
                              f"or the checkpoint prefix ({CHECKPOINT_PREFIX})")
    try:
        import tensorflow as tf
    except ImportError as e:
        raise ConversionError("reading Google TF checkpoints needs tensorflow (pip install tensorflow-cpu)") from e
    google_config = read_json(cfg_file)
    if google_config.get("pre_layer_norm"):
        raise ConversionError(f"{cfg_file}: pre_layer_norm=true, but Google's BERT is post-LayerNorm")
    cfg = config_from_hf({**google_config, "model_type": "bert"}, str(cfg_file))
    reader = tf.train.load_checkpoint(str(prefix))
    tensors = {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
    return assemble(cfg, tensors, name_map(cfg), str(prefix), seed)
