"""BERT weights in and out: one module per format, one entry point to read any of them.

* ``hf`` (:mod:`.hf`): a Hugging Face directory, ``config.json`` + ``model.safetensors``
  (or ``pytorch_model.bin``) + tokenizer files.
* ``tf`` (:mod:`.google_tf`): Google's release, ``bert_config.json`` + ``bert_model.ckpt.*``.
* ``npz`` (:mod:`.npz`): one ``.npz``, every parameter under its flat path.
* ``orbax`` (:mod:`.orbax`): a bert_jax workdir or step directory; as a destination, a
  params-only checkpoint in the workdir layout.

:func:`load_pretrained` reads any of them (local paths or URIs) into ``(BertConfig, params,
report)``; :func:`save` writes one; :func:`load_pretrained_encoder` adds the tokenizer that
belongs with the checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import shutil

from bert_jax import checkpoint, paths
from bert_jax.model import BertConfig
from bert_jax.tokenizer import Tokenizer
from bert_jax.weights import google_tf, hf, npz, orbax, tokenizer_files
from bert_jax.weights.mapping import FINE_TUNED_HEADS, ConversionError, Imported
from bert_jax.weights.tokenizer_files import check_vocab, copy_tokenizer, find_tokenizer_files, tokenizer_for

__all__ = ["FORMATS_IN", "FORMATS_OUT", "ConversionError", "Imported", "Pretrained", "check_vocab",
           "detect_format", "find_tokenizer_files", "load_pretrained", "load_pretrained_encoder",
           "save", "tokenizer_for"]

log = logging.getLogger("bert_jax.weights")

READERS = {"hf": hf.load, "tf": google_tf.load, "npz": npz.load, "orbax": orbax.load}
FORMATS_IN = tuple(READERS)
FORMATS_OUT = ("npz", "hf", "orbax")


def detect_format(path) -> str:
    p = pathlib.Path(path)
    if npz.npz_file(p) is not None:
        return "npz"
    if p.is_dir() and (p / hf.CONFIG_FILE).is_file() and any((p / f).is_file() for f in hf.WEIGHTS_FILES):
        return "hf"
    if google_tf.is_checkpoint(p):
        return "tf"
    if p.is_dir() and orbax.is_checkpoint(p):
        return "orbax"
    raise ConversionError(f"{path}: cannot tell the checkpoint format (expected a Hugging Face dir with "
                          "config.json + model.safetensors, a Google dir with bert_config.json + bert_model.ckpt, "
                          "an .npz, or an Orbax workdir); pass the format explicitly")


def load_pretrained(path, fmt: str = "auto", seed: int = 0) -> Imported:
    """(BertConfig, canonical params, report) from any supported format; heads missing from
    the source are made fresh from ``seed``.

    ``path`` may be a URI (gs://, s3://, see bert_jax/paths.py): an Orbax checkpoint is read in
    place; other formats are downloaded once into the local cache and read from there."""
    if fmt != "auto" and fmt not in READERS:
        raise ConversionError(f"unknown source format {fmt!r}; expected one of {FORMATS_IN} or auto")
    if paths.is_uri(path):
        if fmt in ("auto", "orbax") and (fmt == "orbax" or orbax.is_checkpoint(path)):
            return orbax.load(path, seed=seed)
        path = paths.local_copy(os.fspath(path), "checkpoints")
    if not pathlib.Path(path).exists() and not pathlib.Path(str(path) + ".index").exists():
        raise ConversionError(f"{path}: no such file or directory")
    fmt = detect_format(path) if fmt == "auto" else fmt
    return READERS[fmt](path, seed=seed)


def save(cfg: BertConfig, params: dict, dst, fmt: str, tokenizer_dir=None, overwrite: bool = False,
         labels=None) -> pathlib.Path:
    """Writes ``params`` in format ``fmt`` (one of FORMATS_OUT) with the tokenizer, if given,
    and the task head's label names (``labels``, in id order), if given.
    A file (or Orbax step / tokenizer directory) it would write that exists already is an
    error naming it, unless ``overwrite``; then only those are replaced, never other files
    beside them."""
    existing = [p for p in outputs(dst, fmt, tokenizer_dir) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(map(str, existing))}: exists already; choose another destination "
                              "or pass --overwrite to replace it")
    if fmt == "orbax":
        for path in existing:
            shutil.rmtree(path)
    if fmt == "npz":
        out = npz.save(cfg, params, dst, labels)
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, out.parent)
        return out
    if fmt == "hf":
        return hf.save(cfg, params, dst, tokenizer_dir, labels)
    if fmt == "orbax":
        return orbax.save(cfg, params, dst, tokenizer_dir, labels)
    raise ConversionError(f"unknown destination format {fmt!r}; expected one of {FORMATS_OUT}")


def outputs(dst, fmt: str, tokenizer_dir=None) -> list[pathlib.Path]:
    """The paths ``save(..., dst, fmt, tokenizer_dir)`` writes."""
    if fmt == "orbax":
        out = pathlib.Path(dst).absolute()
        return [out / checkpoint.CHECKPOINTS_DIR / "0", *([out / checkpoint.TOKENIZER_DIR] if tokenizer_dir else [])]
    if fmt == "npz":
        weights_file = npz.output_path(dst)
        out, written = weights_file.parent, [weights_file]
    else:
        out, written = pathlib.Path(dst), [pathlib.Path(dst) / name for name in hf.WRITTEN]
    return written + [out / name for name in tokenizer_files.copied_names(tokenizer_dir, out)]


@dataclasses.dataclass
class Pretrained:
    config: BertConfig
    encoder: dict          # the `bert` subtree: embeddings, encoder, pooler (numpy)
    tokenizer: Tokenizer
    tokenizer_dir: str | None
    source: str
    head: dict = dataclasses.field(default_factory=dict)  # a fine-tuned task head ({'classifier': ...}), or {}
    labels: tuple[str, ...] | None = None                 # its label names in id order, when recorded


def load_pretrained_encoder(path: str, fmt: str = "auto", tokenizer_path: str = "") -> Pretrained:
    """Encoder + pooler weights, the fine-tuned task head if the checkpoint has one, and the
    tokenizer that belongs to them; vocab sizes must agree."""
    if not path:
        raise ValueError("config.init_checkpoint is required: a pretraining workdir or imported weights")
    model_config, params, report = load_pretrained(path, fmt)
    if "bert" not in params:
        raise ValueError(f"{path}: no encoder ('bert/...') parameters; found {sorted(params)}")
    found = tokenizer_for(path, model_config, tokenizer_path)
    if found is None:
        raise FileNotFoundError(f"{path}: no tokenizer next to the checkpoint (vocab.txt, tokenizer.json, "
                                "spiece.model or tokenizer/); pass its path (--tokenizer, or "
                                "--config.tokenizer=PATH when fine-tuning)")
    tokenizer, tokenizer_dir = found
    log.info("init from %s (%s); report %s", path, model_config, report)
    head = {name: params[name] for name in FINE_TUNED_HEADS if name in params}
    labels = report["labels"] and tuple(report["labels"])
    return Pretrained(model_config, params["bert"], tokenizer, str(tokenizer_dir), str(path), head, labels)
