"""Parameter trees: plain nested dicts of arrays whose ``/``-joined paths are the names used in
checkpoints and exports (``bert/encoder/layers/0/attention/query/kernel``).

The canonical layout is unstacked (one subtree per layer); ``scan_layers`` models hold the
layers stacked on a leading axis (``bert/encoder/layers/attention/query/kernel``):
:func:`stack_layers` / :func:`unstack_layers` convert between the two.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bert_jax import model as M


def to_dict(state) -> dict:
    """nnx.State (or nested dict) of Params -> nested dict of arrays (str keys)."""
    pure = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state

    def fix(d):
        if isinstance(d, dict):
            return {str(k): fix(v) for k, v in d.items()}
        return d

    return fix(pure)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, path))
        else:
            out[path] = v
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        parts = path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return tree


def float32_numpy(params: dict) -> dict:
    """The same tree with every leaf a float32 numpy array."""
    return unflatten({k: np.asarray(v, np.float32) for k, v in flatten(params).items()})


def count(params) -> int:
    """Number of scalars in a tree of arrays."""
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))


def unstack_layers(params: dict, num_layers: int) -> dict:
    """Scanned layout (encoder/layers/<leaf> with a leading layer axis) -> canonical
    layout (encoder/layers/<i>/<leaf>). Canonical input is returned unchanged."""
    out = {}
    for path, v in flatten(params).items():
        head, sep, tail = path.partition("encoder/layers/")
        if sep and not tail.split("/")[0].isdigit():
            for i in range(num_layers):
                out[f"{head}encoder/layers/{i}/{tail}"] = v[i]
        else:
            out[path] = v
    return unflatten(out)


def stack_layers(params: dict, num_layers: int) -> dict:
    """Canonical layout -> scanned layout (inverse of :func:`unstack_layers`)."""
    out, stacks = {}, {}
    for path, v in flatten(params).items():
        head, sep, tail = path.partition("encoder/layers/")
        idx, _, leaf = tail.partition("/")
        if sep and idx.isdigit():
            stacks.setdefault(f"{head}encoder/layers/{leaf}", {})[int(idx)] = v
        else:
            out[path] = v
    for path, by_idx in stacks.items():
        if sorted(by_idx) != list(range(num_layers)):
            raise ValueError(f"stack_layers: {path} has layers {sorted(by_idx)}, expected 0..{num_layers - 1}")
        xp = jnp if isinstance(by_idx[0], jax.Array) else np
        out[path] = xp.stack([by_idx[i] for i in range(num_layers)])
    return unflatten(out)


def _model(cfg: M.BertConfig, head: str, num_labels: int, rngs: nnx.Rngs) -> nnx.Module:
    if head == "pretraining":
        return M.BertForPreTraining(cfg, rngs=rngs)
    if head == "classification":
        return M.BertForSequenceClassification(cfg, num_labels, rngs=rngs)
    if head == "encoder":
        return M.BertModel(cfg, rngs=rngs)
    raise ValueError(f"unknown head {head!r}; expected pretraining, classification or encoder")


def init_params(cfg: M.BertConfig, seed: int = 0, head: str = "pretraining", num_labels: int = 2) -> dict:
    """Fresh canonical params as a nested dict of numpy arrays."""
    model = _model(cfg, head, num_labels, nnx.Rngs(seed))
    params = jax.tree.map(np.asarray, to_dict(nnx.state(model, nnx.Param)))
    return unstack_layers(params, cfg.num_hidden_layers) if cfg.scan_layers else params


def init_heads(cfg: M.BertConfig, seed: int = 0) -> dict:
    """Fresh MLM and NSP head params alone (cheap: no encoder is built), as numpy."""
    rngs = nnx.Rngs(seed)
    heads = {"mlm": M.MaskedLMHead(cfg, rngs),
             "nsp": M.dense(cfg, cfg.hidden_size, 2, ("embed", "classes"), rngs, dtype=jnp.float32)}
    return {name: jax.tree.map(np.asarray, to_dict(nnx.state(mod, nnx.Param))) for name, mod in heads.items()}


def init_pooler(cfg: M.BertConfig, seed: int = 0) -> dict:
    """Fresh pooler params alone (for checkpoints saved without one: token and span heads)."""
    pooler = M.dense(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", "embed_out"), nnx.Rngs(seed))
    return jax.tree.map(np.asarray, to_dict(nnx.state(pooler, nnx.Param)))


@functools.lru_cache(maxsize=16)
def canonical_shapes(cfg: M.BertConfig, num_labels: int = 2) -> dict[str, tuple]:
    """Flat path -> shape of every canonical parameter (pretraining heads, a sequence and a
    token classifier with ``num_labels`` outputs, the span head), without allocating."""
    canon = cfg.replace(scan_layers=False)
    pre = nnx.eval_shape(lambda: M.BertForPreTraining(canon, rngs=nnx.Rngs(0)))
    clf = nnx.eval_shape(lambda: M.BertForSequenceClassification(canon, num_labels, rngs=nnx.Rngs(0)))
    tree = to_dict(nnx.state(pre, nnx.Param))
    tree["classifier"] = to_dict(nnx.state(clf, nnx.Param))["classifier"]
    shapes = {k: tuple(v.shape) for k, v in flatten(tree).items()}
    for head, n in (("token_classifier", num_labels), ("qa_outputs", 2)):
        shapes[f"{head}/kernel"], shapes[f"{head}/bias"] = (cfg.hidden_size, n), (n,)
    return shapes


def load_params(model: nnx.Module, params: dict, *, strict: bool = True) -> list[str]:
    """Copies a canonical nested dict of arrays into ``model`` (in place).

    Shapes must match exactly (errors name the parameter). With ``strict=False``
    parameters absent from ``params`` keep their fresh initialisation, and their
    paths are returned (e.g. a new task head).
    """
    cfg = model.cfg
    if cfg.scan_layers:
        params = stack_layers(params, cfg.num_hidden_layers)
    state = nnx.state(model, nnx.Param)
    target = flatten(to_dict(state))
    given = flatten(params)
    unexpected = sorted(set(given) - set(target))
    if unexpected:
        raise ValueError(f"parameters not in the model: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    missing = sorted(set(target) - set(given))
    if missing and strict:
        raise ValueError(f"parameters missing from the checkpoint: {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}")
    for path, value in given.items():
        if tuple(np.shape(value)) != tuple(target[path].shape):
            raise ValueError(f"parameter {path}: checkpoint shape {tuple(np.shape(value))} != "
                             f"model shape {tuple(target[path].shape)}")
    new = dict(target)
    new.update({p: jnp.asarray(v, dtype=target[p].dtype) for p, v in given.items()})
    nnx.replace_by_pure_dict(state, unflatten(new))
    nnx.update(model, state)
    return missing
