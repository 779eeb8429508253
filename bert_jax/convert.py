"""Import and export of BERT weights.

    python -m bert_jax.convert --src PATH --src_format {hf,tf,npz,orbax,auto} \
        --dst PATH --dst_format {npz,hf,orbax}

Formats
* ``hf``: a Hugging Face directory: ``config.json`` + ``model.safetensors`` (or
  ``pytorch_model.bin``, read with torch when installed), with or without the
  ``bert.`` prefix, with or without the MLM/NSP heads, plus tokenizer files.
* ``tf``: Google's original release: ``bert_config.json`` + ``bert_model.ckpt.*``
  (+ ``vocab.txt``), read with TensorFlow.
* ``npz``: one ``.npz`` file, loadable with nothing but numpy: every parameter
  under its flat ``/``-joined path (``bert/encoder/layers/0/attention/query/kernel``;
  kernels are ``[in, out]``), and the model config as JSON text under
  ``__config__``. A ``vocab.txt``/tokenizer directory may sit beside it.
* ``orbax``: a pretraining or fine-tuning workdir (latest step) or one step
  directory, written by :mod:`bert_jax.checkpoint`; as a destination, a params-only
  Orbax checkpoint that :func:`bert_jax.checkpoint.restore_params` reads.

Every importer returns ``(BertConfig, params, report)``: params is the canonical
nested dict of numpy arrays (``bert/...``, ``mlm/...``, ``nsp/...``, optionally
``classifier/...``); ``report`` lists heads that were missing and initialised
fresh, and source tensors that were ignored.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import pathlib
import shutil
import sys

import numpy as np

from bert_jax import model as M
from bert_jax import paths

log = logging.getLogger("bert_jax.convert")

FORMATS_IN = ("hf", "tf", "npz", "orbax")
FORMATS_OUT = ("npz", "hf", "orbax")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "spiece.model")


class ConversionError(ValueError):
    """Wrong or incomplete input; the message names the file or tensor."""


# ----------------------------------------------------------------------------
# Name maps: (our path, source name, transpose?) for each parameter.

def _layer_map(i: int, hf_layer: str, tf: bool) -> list[tuple[str, str, bool]]:
    ln_w, ln_b = ("gamma", "beta") if tf else ("weight", "bias")
    w = "kernel" if tf else "weight"
    sep = "/" if tf else "."
    t = not tf  # torch Linear stores [out, in]
    ours = f"bert/encoder/layers/{i}"
    rows = []
    for name in ("query", "key", "value"):
        rows += [(f"{ours}/attention/{name}/kernel", f"{hf_layer}{sep}attention{sep}self{sep}{name}{sep}{w}", t),
                 (f"{ours}/attention/{name}/bias", f"{hf_layer}{sep}attention{sep}self{sep}{name}{sep}bias", False)]
    for ours_name, theirs, in (("attention/output", f"attention{sep}output{sep}dense"),
                               ("intermediate", f"intermediate{sep}dense"),
                               ("output", f"output{sep}dense")):
        rows += [(f"{ours}/{ours_name}/kernel", f"{hf_layer}{sep}{theirs}{sep}{w}", t),
                 (f"{ours}/{ours_name}/bias", f"{hf_layer}{sep}{theirs}{sep}bias", False)]
    for ours_name, theirs in (("attention_layer_norm", f"attention{sep}output{sep}LayerNorm"),
                              ("output_layer_norm", f"output{sep}LayerNorm")):
        rows += [(f"{ours}/{ours_name}/scale", f"{hf_layer}{sep}{theirs}{sep}{ln_w}", False),
                 (f"{ours}/{ours_name}/bias", f"{hf_layer}{sep}{theirs}{sep}{ln_b}", False)]
    return rows


def name_map(cfg: M.BertConfig, style: str, prefix: str = "bert.") -> dict[str, list[tuple[str, str, bool]]]:
    """Groups of rows by part: encoder, mlm, nsp, classifier. style: 'hf' or 'tf'."""
    tf = style == "tf"
    if tf:
        p, sep, w, ln_w, ln_b = "bert/", "/", "kernel", "gamma", "beta"
        emb = lambda n: f"bert/embeddings/{n}"  # noqa: E731
    else:
        p, sep, w, ln_w, ln_b = prefix, ".", "weight", "weight", "bias"
        emb = lambda n: f"{prefix}embeddings.{n}.weight"  # noqa: E731
    t = not tf
    enc = [
        ("bert/embeddings/word_embeddings/embedding", emb("word_embeddings"), False),
        ("bert/embeddings/position_embeddings/embedding", emb("position_embeddings"), False),
        ("bert/embeddings/token_type_embeddings/embedding", emb("token_type_embeddings"), False),
        ("bert/embeddings/layer_norm/scale", f"{p}embeddings{sep}LayerNorm{sep}{ln_w}", False),
        ("bert/embeddings/layer_norm/bias", f"{p}embeddings{sep}LayerNorm{sep}{ln_b}", False),
        ("bert/pooler/kernel", f"{p}pooler{sep}dense{sep}{w}", t),
        ("bert/pooler/bias", f"{p}pooler{sep}dense{sep}bias", False),
    ]
    for i in range(cfg.num_hidden_layers):
        enc += _layer_map(i, f"{p}encoder{sep}layer_{i}" if tf else f"{p}encoder.layer.{i}", tf)
    if tf:
        mlm = [("mlm/transform/kernel", "cls/predictions/transform/dense/kernel", False),
               ("mlm/transform/bias", "cls/predictions/transform/dense/bias", False),
               ("mlm/transform_layer_norm/scale", "cls/predictions/transform/LayerNorm/gamma", False),
               ("mlm/transform_layer_norm/bias", "cls/predictions/transform/LayerNorm/beta", False),
               ("mlm/bias", "cls/predictions/output_bias", False)]
        nsp = [("nsp/kernel", "cls/seq_relationship/output_weights", True),
               ("nsp/bias", "cls/seq_relationship/output_bias", False)]
        cls = [("classifier/kernel", "output_weights", True), ("classifier/bias", "output_bias", False)]
    else:
        mlm = [("mlm/transform/kernel", "cls.predictions.transform.dense.weight", True),
               ("mlm/transform/bias", "cls.predictions.transform.dense.bias", False),
               ("mlm/transform_layer_norm/scale", "cls.predictions.transform.LayerNorm.weight", False),
               ("mlm/transform_layer_norm/bias", "cls.predictions.transform.LayerNorm.bias", False),
               ("mlm/bias", "cls.predictions.bias", False)]
        nsp = [("nsp/kernel", "cls.seq_relationship.weight", True),
               ("nsp/bias", "cls.seq_relationship.bias", False)]
        cls = [("classifier/kernel", "classifier.weight", True), ("classifier/bias", "classifier.bias", False)]
    return {"encoder": enc, "mlm": mlm, "nsp": nsp, "classifier": cls}


@functools.lru_cache(maxsize=16)
def _expected_shapes(cfg: M.BertConfig, num_labels: int = 2) -> dict[str, tuple]:
    """Canonical parameter shapes (pretraining heads + a classifier), without allocating."""
    from flax import nnx

    canon = cfg.replace(scan_layers=False)
    pre = nnx.eval_shape(lambda: M.BertForPreTraining(canon, rngs=nnx.Rngs(0)))
    clf = nnx.eval_shape(lambda: M.BertForSequenceClassification(canon, num_labels, rngs=nnx.Rngs(0)))
    tree = M.params_to_dict(nnx.state(pre, nnx.Param))
    tree["classifier"] = M.params_to_dict(nnx.state(clf, nnx.Param))["classifier"]
    return {k: tuple(v.shape) for k, v in M.flatten(tree).items()}


def _gather(tensors: dict, rows, source: str, cfg: M.BertConfig, required: bool):
    """Pick rows from ``tensors``; returns (flat params, consumed names) or None if
    an optional group is entirely absent. Partial groups are errors."""
    present = [r for r in rows if r[1] in tensors]
    if not present and not required:
        return None
    missing = [r[1] for r in rows if r[1] not in tensors]
    if missing:
        raise ConversionError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    shapes = _expected_shapes(cfg, num_labels=_num_labels(tensors, rows))
    out = {}
    for ours, theirs, transpose in rows:
        arr = np.asarray(tensors[theirs], dtype=np.float32)
        if transpose:
            arr = arr.T
        want = shapes[ours]
        if tuple(arr.shape) != want:
            raise ConversionError(f"{source}: tensor {theirs!r} has shape {tuple(np.shape(tensors[theirs]))}, "
                                  f"expected {want if not transpose else tuple(reversed(want))} for {ours}")
        out[ours] = arr
    return out, {r[1] for r in rows}


def _num_labels(tensors, rows) -> int:
    for ours, theirs, transpose in rows:
        if ours == "classifier/bias" and theirs in tensors:
            return int(np.shape(tensors[theirs])[0])
    return 2


def _assemble(cfg: M.BertConfig, tensors: dict, style: str, source: str, prefix: str = "bert.", seed: int = 0):
    groups = name_map(cfg, style, prefix)
    flat, used = _gather(tensors, groups["encoder"], source, cfg, required=True)
    report = {"initialised": [], "ignored": []}
    fine_tuned = any(r[1] in tensors for r in groups["classifier"])
    for part in ("mlm", "nsp", "classifier"):
        got = _gather(tensors, groups[part], source, cfg, required=False)
        if got is None:
            if part != "classifier" and not fine_tuned:
                report["initialised"].append(part)
            continue
        flat.update(got[0])
        used |= got[1]
    if report["initialised"]:
        fresh = M.flatten(M.init_heads(cfg, seed=seed))
        flat.update({k: v for k, v in fresh.items() if k.split("/")[0] in report["initialised"]})
        log.warning("%s: no %s head(s) in the checkpoint; initialised fresh", source, report["initialised"])
    benign = ("position_ids", "decoder.weight", "decoder.bias", "global_step", "adam_", "bad_steps",
              "loss_scale", "good_steps")
    report["ignored"] = sorted(n for n in tensors if n not in used and not any(b in n for b in benign))
    if report["ignored"]:
        log.warning("%s: ignored tensors not part of BERT: %s", source, report["ignored"][:10])
    return M.unflatten(flat), report


# ----------------------------------------------------------------------------
# Importers

def import_hf(path, seed: int = 0):
    d = pathlib.Path(path)
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise ConversionError(f"{d}: no config.json (a Hugging Face BERT directory needs one)")
    cfg = M.BertConfig.from_json_file(cfg_file)
    if (d / "model.safetensors").is_file():
        from safetensors.numpy import load_file

        source = d / "model.safetensors"
        tensors = load_file(str(source))
    elif (d / "pytorch_model.bin").is_file():
        source = d / "pytorch_model.bin"
        try:
            import torch
        except ImportError as e:
            raise ConversionError(f"{source}: reading pytorch_model.bin needs torch (pip install torch==2.13.0), "
                                  "or convert it to model.safetensors") from e
        tensors = {k: v.float().numpy() for k, v in torch.load(source, map_location="cpu", weights_only=True).items()}
    else:
        raise ConversionError(f"{d}: neither model.safetensors nor pytorch_model.bin found")
    # Older checkpoints name LayerNorm parameters gamma/beta.
    tensors = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
               for k, v in tensors.items()}
    prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""
    params, report = _assemble(cfg, tensors, "hf", str(source), prefix, seed)
    return cfg, params, report


def import_tf(path, seed: int = 0):
    d = pathlib.Path(path)
    if d.is_file() or not d.exists():  # a checkpoint prefix such as .../bert_model.ckpt
        prefix, d = d, d.parent
    else:
        prefix = d / "bert_model.ckpt"
    cfg_file = d / "bert_config.json"
    if not cfg_file.is_file():
        raise ConversionError(f"{d}: no bert_config.json beside the TF checkpoint")
    if not pathlib.Path(str(prefix) + ".index").is_file():
        raise ConversionError(f"{prefix}.index not found: pass the directory of a Google BERT release "
                              "or the checkpoint prefix (bert_model.ckpt)")
    try:
        import tensorflow as tf
    except ImportError as e:
        raise ConversionError("reading Google TF checkpoints needs tensorflow (pip install tensorflow-cpu)") from e
    with open(cfg_file) as f:
        cfg = M.BertConfig.from_hf_dict({**json.load(f), "model_type": "bert"})
    reader = tf.train.load_checkpoint(str(prefix))
    tensors = {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
    params, report = _assemble(cfg, tensors, "tf", str(prefix), seed=seed)
    return cfg, params, report


def import_npz(path, seed: int = 0):
    path = pathlib.Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if len(files) != 1:
            raise ConversionError(f"{path}: expected exactly one .npz file, found {[f.name for f in files]}")
        path = files[0]
    if not path.is_file():
        raise ConversionError(f"{path}: no such .npz file")
    with np.load(path, allow_pickle=False) as z:
        if "__config__" not in z.files:
            raise ConversionError(f"{path}: no __config__ entry (not written by bert_jax.convert?)")
        cfg = M.BertConfig.from_hf_dict(json.loads(str(z["__config__"])))
        flat = {k: z[k] for k in z.files if k != "__config__"}
    shapes = _expected_shapes(cfg, num_labels=int(flat["classifier/bias"].shape[0]) if "classifier/bias" in flat else 2)
    for k, v in flat.items():
        if k not in shapes:
            raise ConversionError(f"{path}: unknown parameter {k!r}")
        if tuple(v.shape) != shapes[k]:
            raise ConversionError(f"{path}: parameter {k!r} has shape {v.shape}, expected {shapes[k]}")
    missing = sorted(k for k in shapes if k.startswith("bert/") and k not in flat)
    if missing:
        raise ConversionError(f"{path}: missing parameter(s) {missing[:5]}")
    report = {"initialised": [p for p in ("mlm", "nsp") if not any(k.startswith(p + "/") for k in flat)],
              "ignored": []}
    if report["initialised"]:
        fresh = M.flatten(M.init_heads(cfg, seed=seed))
        flat.update({k: v for k, v in fresh.items() if k.split("/")[0] in report["initialised"]})
    return cfg, M.unflatten(flat), report


def import_orbax(path, seed: int = 0):
    from bert_jax import checkpoint

    cfg, params, _ = checkpoint.restore_params(path)
    cfg = cfg.replace(scan_layers=False)
    report = {"initialised": [], "ignored": []}
    # A fine-tuned checkpoint has a task head instead of the pretraining heads.
    missing = [] if "classifier" in params else [p for p in ("mlm", "nsp") if p not in params]
    if missing:
        fresh = M.init_heads(cfg, seed=seed)
        for p in missing:
            params[p] = fresh[p]
        report["initialised"] = missing
    return cfg, params, report


def detect_format(path) -> str:
    p = pathlib.Path(path)
    if p.suffix == ".npz" or (p.is_dir() and len(list(p.glob("*.npz"))) == 1):
        return "npz"
    if p.is_dir() and (p / "config.json").is_file() and (
            (p / "model.safetensors").is_file() or (p / "pytorch_model.bin").is_file()):
        return "hf"
    if (p.is_dir() and (p / "bert_config.json").is_file()) or pathlib.Path(str(p) + ".index").is_file():
        return "tf"
    if p.is_dir():
        from bert_jax import checkpoint

        try:
            checkpoint.resolve_step_dir(p)
            return "orbax"
        except Exception:  # noqa: BLE001 - fall through to the error below
            pass
    raise ConversionError(f"{path}: cannot tell the checkpoint format (expected a Hugging Face dir with "
                          "config.json + model.safetensors, a Google dir with bert_config.json + bert_model.ckpt, "
                          "an .npz, or an Orbax workdir); pass the format explicitly")


def load_pretrained(path, fmt: str = "auto", seed: int = 0):
    """(BertConfig, canonical params, report) from any supported format.

    ``path`` may be a URI (gs://, s3://, see bert_jax/paths.py): an Orbax checkpoint is read in
    place; other formats are downloaded once into the local cache and read from there."""
    if paths.is_uri(path):
        return _load_pretrained_uri(os.fspath(path), fmt, seed)
    if not pathlib.Path(path).exists() and not pathlib.Path(str(path) + ".index").exists():
        raise ConversionError(f"{path}: no such file or directory")
    fmt = detect_format(path) if fmt == "auto" else fmt
    importers = {"hf": import_hf, "tf": import_tf, "npz": import_npz, "orbax": import_orbax}
    if fmt not in importers:
        raise ConversionError(f"unknown source format {fmt!r}; expected one of {FORMATS_IN} or auto")
    return importers[fmt](path, seed=seed)


def _load_pretrained_uri(path: str, fmt: str, seed: int):
    from bert_jax import checkpoint

    if fmt in ("auto", "orbax"):
        try:
            checkpoint.resolve_step_dir(path)
        except FileNotFoundError:
            if fmt == "orbax":
                raise
        else:
            return import_orbax(path, seed=seed)
    return load_pretrained(paths.local_copy(path, "checkpoints"), fmt, seed)


def find_tokenizer_files(path) -> pathlib.Path | None:
    """Directory holding the tokenizer that belongs with a checkpoint, if any (for a URI
    checkpoint: a local copy of it)."""
    if paths.is_uri(path):
        found = _find_tokenizer_dir(paths.workdir_path(path, "checkpoint"))
        return None if found is None else pathlib.Path(paths.local_copy(found, "tokenizers"))
    return _find_tokenizer_dir(pathlib.Path(path))


def _find_tokenizer_dir(p):
    """pathlib.Path or epath.Path -> the tokenizer directory beside that checkpoint, or None."""
    d = p if p.is_dir() else p.parent
    for cand in (d, d / "tokenizer"):
        if any((cand / f).is_file() for f in TOKENIZER_FILES):
            return cand
    if p.is_dir():  # an Orbax step dir: workdir/checkpoints/<step>
        from bert_jax import checkpoint

        try:
            tok = checkpoint.resolve_step_dir(p).parent.parent / checkpoint.TOKENIZER_DIR
        except FileNotFoundError:
            return None
        return tok if tok.is_dir() else None
    return None


def check_vocab(cfg: M.BertConfig, tokenizer, where: str = "") -> None:
    """A tokenizer whose vocabulary differs from the checkpoint's is an error."""
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ConversionError(f"{where}: tokenizer has {tokenizer.vocab_size} tokens but the checkpoint's "
                              f"vocab_size is {cfg.vocab_size}: they do not belong together")


# ----------------------------------------------------------------------------
# Exporters

def export_npz(cfg: M.BertConfig, params: dict, path) -> pathlib.Path:
    path = pathlib.Path(path)
    if path.suffix != ".npz":
        path = path / "params.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: np.asarray(v, dtype=np.float32) for k, v in M.flatten(params).items()}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, __config__=np.array(json.dumps(cfg.to_hf_dict())), **flat)
    os.replace(tmp, path)  # never leave a half-written file in place of a good one
    return path


def export_hf(cfg: M.BertConfig, params: dict, out_dir, tokenizer_dir=None) -> pathlib.Path:
    from safetensors.numpy import save_file

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = M.flatten(params)
    groups = name_map(cfg, "hf")
    tensors = {}
    for part, rows in groups.items():
        if not any(r[0] in flat for r in rows):
            continue
        for ours, theirs, transpose in rows:
            if ours not in flat:
                raise ConversionError(f"export_hf: parameter {ours} missing")
            arr = np.asarray(flat[ours], dtype=np.float32)
            tensors[theirs] = np.ascontiguousarray(arr.T if transpose else arr)
    hf_cfg = cfg.to_hf_dict()
    if "classifier/kernel" in flat:
        n = int(np.shape(flat["classifier/bias"])[0])
        hf_cfg.update(architectures=["BertForSequenceClassification"], num_labels=n,
                      problem_type="regression" if n == 1 else "single_label_classification")
        hf_cfg["id2label"] = {str(i): f"LABEL_{i}" for i in range(n)}
        hf_cfg["label2id"] = {f"LABEL_{i}": i for i in range(n)}
        tensors = {k: v for k, v in tensors.items() if not k.startswith("cls.")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with open(out / "config.json", "w") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out)
    return out


def copy_tokenizer(tokenizer_dir, out_dir) -> None:
    src = pathlib.Path(tokenizer_dir)
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and src.resolve() != pathlib.Path(out_dir).resolve():
            shutil.copy(src / name, pathlib.Path(out_dir) / name)


def export_orbax(cfg: M.BertConfig, params: dict, out_dir, tokenizer_dir=None) -> pathlib.Path:
    """A params-only checkpoint in the workdir layout that ``checkpoint.restore_params``
    (and so fine-tuning and this converter) reads: out/checkpoints/0/{state,meta}."""
    import orbax.checkpoint as ocp

    from bert_jax import checkpoint

    out = pathlib.Path(out_dir).absolute()
    step_dir = out / checkpoint.CHECKPOINTS_DIR / "0"
    if step_dir.exists():
        raise ConversionError(f"{step_dir} exists already; choose an empty destination")
    meta = {"model_config": cfg.replace(scan_layers=False).to_dict(), "tokenizer": {"dir": checkpoint.TOKENIZER_DIR}}
    if tokenizer_dir is not None:
        (out / checkpoint.TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
        copy_tokenizer(tokenizer_dir, out / checkpoint.TOKENIZER_DIR)
        meta["tokenizer"]["sha256"] = checkpoint.tokenizer_fingerprint(out / checkpoint.TOKENIZER_DIR)
    tree = {"params": float32_numpy_tree(params)}
    with ocp.PyTreeCheckpointer() as ckpt:
        ckpt.save(step_dir / checkpoint.STATE, tree)
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckpt:
        ckpt.save(step_dir / checkpoint.META, args=ocp.args.JsonSave(meta))
    return out


def float32_numpy_tree(params: dict) -> dict:
    """Nested params -> the same tree of float32 numpy arrays (what export_orbax saves)."""
    return M.unflatten({k: np.asarray(v, np.float32) for k, v in M.flatten(params).items()})


# ----------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bert_jax.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True)
    ap.add_argument("--src_format", default="auto", choices=FORMATS_IN + ("auto",))
    ap.add_argument("--dst", required=True)
    ap.add_argument("--dst_format", required=True, choices=FORMATS_OUT)
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir/file to ship with the export "
                                                      "(default: the one beside the source)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every read at INFO
    try:
        cfg, params, report = load_pretrained(args.src, args.src_format)
        tok_dir = pathlib.Path(args.tokenizer) if args.tokenizer else find_tokenizer_files(args.src)
        if tok_dir is not None and tok_dir.exists():
            from bert_jax.tokenizer import load_tokenizer

            check_vocab(cfg, load_tokenizer(tok_dir), str(tok_dir))
        else:
            tok_dir = None
        if args.dst_format == "npz":
            out = export_npz(cfg, params, args.dst)
            if tok_dir is not None:
                copy_tokenizer(tok_dir, out.parent)
        elif args.dst_format == "hf":
            out = export_hf(cfg, params, args.dst, tok_dir)
        else:
            out = export_orbax(cfg, params, args.dst, tok_dir)
    except (ConversionError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(int(np.prod(np.shape(v))) for v in M.flatten(params).values())
    print(f"wrote {args.dst_format} to {out}: {n:,} parameters"
          + (f"; initialised fresh: {report['initialised']}" if report["initialised"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
