"""One ``.npz`` file, loadable with nothing but numpy: every parameter under its flat
``/``-joined path (``bert/encoder/layers/0/attention/query/kernel``; kernels are ``[in, out]``)
and the model config as ``config.json`` text under ``__config__``."""
from __future__ import annotations

import json
import os
import pathlib

import numpy as np

from bert_jax import params as params_lib
from bert_jax.model import BertConfig
from bert_jax.weights.hf import config_from_hf, config_to_hf, label_entries, labels_from_hf
from bert_jax.weights.mapping import ConversionError, Imported, add_fresh_heads, report

CONFIG_KEY = "__config__"


def npz_file(path) -> pathlib.Path | None:
    """``path`` itself if it is an .npz, the one .npz in a directory, else None."""
    p = pathlib.Path(path)
    if p.suffix == ".npz":
        return p
    files = sorted(p.glob("*.npz")) if p.is_dir() else []
    return files[0] if len(files) == 1 else None


def load(path, seed: int = 0) -> Imported:
    given = pathlib.Path(path)
    path = npz_file(given)
    if path is None:
        found = [f.name for f in sorted(given.glob("*.npz"))] if given.is_dir() else []
        raise ConversionError(f"{given}: expected an .npz file or a directory with exactly one, found {found}")
    if not path.is_file():
        raise ConversionError(f"{path}: no such .npz file")
    with np.load(path, allow_pickle=False) as z:
        if CONFIG_KEY not in z.files:
            raise ConversionError(f"{path}: no {CONFIG_KEY} entry (not written by bert_jax.convert?)")
        hf_config = json.loads(str(z[CONFIG_KEY]))
        cfg = config_from_hf(hf_config, f"{path}:{CONFIG_KEY}")
        flat = {k: z[k] for k in z.files if k != CONFIG_KEY}
    bias = [k for k in ("classifier/bias", "token_classifier/bias") if k in flat]
    num_labels = int(flat[bias[0]].shape[0]) if bias else 2
    shapes = params_lib.canonical_shapes(cfg, num_labels)
    for k, v in flat.items():
        if k not in shapes:
            raise ConversionError(f"{path}: unknown parameter {k!r}")
        if tuple(v.shape) != shapes[k]:
            raise ConversionError(f"{path}: parameter {k!r} has shape {v.shape}, expected {shapes[k]}")
    missing = sorted(k for k in shapes if k.startswith("bert/") and k not in flat)
    if missing:
        raise ConversionError(f"{path}: missing parameter(s) {missing[:5]}")
    initialised = add_fresh_heads(cfg, flat, str(path), seed)
    params = params_lib.unflatten(flat)
    return Imported(cfg, params, report(initialised, [], labels_from_hf(hf_config, params, f"{path}:{CONFIG_KEY}")))


def output_path(path) -> pathlib.Path:
    """The file ``save(..., path)`` writes: ``path`` itself if it ends in .npz, else ``path/params.npz``."""
    path = pathlib.Path(path)
    return path if path.suffix == ".npz" else path / "params.npz"


def save(cfg: BertConfig, params: dict, path, labels=None) -> pathlib.Path:
    """Writes ``path`` (an .npz file, or ``params.npz`` inside a directory) atomically;
    ``labels``, the head's label names, go into the config as id2label."""
    path = output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: np.asarray(v, dtype=np.float32) for k, v in params_lib.flatten(params).items()}
    tmp = path.with_name(path.name + ".tmp.npz")
    config = {**config_to_hf(cfg), **(label_entries(labels) if labels is not None else {})}
    np.savez(tmp, **{CONFIG_KEY: np.array(json.dumps(config))}, **flat)
    os.replace(tmp, path)  # never leave a half-written file in place of a good one
    return path
