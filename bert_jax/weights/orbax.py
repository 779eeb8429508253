"""bert_jax's own Orbax checkpoints: a pretraining or fine-tuning workdir (latest step) or one
step directory, read by :func:`bert_jax.checkpoint.restore_params`; as an export, a params-only
checkpoint in the same workdir layout, so that the same function reads it back."""
from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp

from bert_jax import checkpoint
from bert_jax import params as params_lib
from bert_jax.model import BertConfig
from bert_jax.weights import tokenizer_files
from bert_jax.weights.mapping import ConversionError, Imported, add_fresh_heads, report


def is_checkpoint(path) -> bool:
    try:
        checkpoint.resolve_step_dir(path)
    except FileNotFoundError:
        return False
    return True


def load(path, seed: int = 0) -> Imported:
    cfg, params, _ = checkpoint.restore_params(path)
    labels = checkpoint.read_json_item(checkpoint.resolve_step_dir(path), checkpoint.META).get("labels")
    cfg = cfg.replace(scan_layers=False)
    flat = params_lib.flatten(params)
    initialised = add_fresh_heads(cfg, flat, str(path), seed)
    return Imported(cfg, params_lib.unflatten(flat), report(initialised, [], labels))


def save(cfg: BertConfig, params: dict, out_dir, tokenizer_dir=None, labels=None) -> pathlib.Path:
    """Writes out/checkpoints/0/{state,meta} (+ out/tokenizer); ``labels``, the head's label
    names, go into meta. Every process calls it (Orbax coordinates the writes); an existing
    step 0 is never overwritten."""
    out = pathlib.Path(out_dir).absolute()
    step_dir = out / checkpoint.CHECKPOINTS_DIR / "0"
    if step_dir.exists():
        raise ConversionError(f"{step_dir} exists already; choose an empty destination")
    meta = {"model_config": cfg.replace(scan_layers=False).to_dict(), "tokenizer": {"dir": checkpoint.TOKENIZER_DIR}}
    if labels is not None:
        meta["labels"] = list(labels)
    if tokenizer_dir is not None and jax.process_index() == 0:  # one writer; Orbax writes meta from process 0
        (out / checkpoint.TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
        tokenizer_files.copy_tokenizer(tokenizer_dir, out / checkpoint.TOKENIZER_DIR)
        meta["tokenizer"]["sha256"] = checkpoint.tokenizer_fingerprint(out / checkpoint.TOKENIZER_DIR)
    with ocp.PyTreeCheckpointer() as ckpt:
        ckpt.save(step_dir / checkpoint.STATE, {"params": params_lib.float32_numpy(params)})
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckpt:
        ckpt.save(step_dir / checkpoint.META, args=ocp.args.JsonSave(meta))
    return out
