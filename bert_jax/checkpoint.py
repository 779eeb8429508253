"""What a pretraining checkpoint holds, and how to save, resume and read it (Orbax).

Layout of a workdir:

    workdir/
      tokenizer/                 the run's tokenizer, written once (load_tokenizer reads it)
      checkpoints/<step>/
        state/                   train state: params, optimizer state, step (sharded arrays)
        data_iterator/           the loader's get_state() (JSON), to continue the data order
        config/                  the full ml_collections config (JSON)
        meta/                    model config, tokenizer dir + sha256, mesh, versions (JSON)
      metrics.jsonl, tensorboard/

Every process calls `save`/`restore` (Orbax coordinates; array shards are written by
the processes that own them). `restore` takes an abstract state whose leaves carry the
*target* shardings, so a checkpoint written on 8 devices restores onto 2 or 4.

For fine-tuning and export, `restore_params(path)` reads a workdir (latest step) or a
step directory and returns `(BertConfig, params as nested dict of numpy, tokenizer_dir)`.
"""
from __future__ import annotations

import hashlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from bert_jax import params as params_lib
from bert_jax import paths
from bert_jax.model import BertConfig

CHECKPOINTS_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"
STATE, DATA, CONFIG, META = "state", "data_iterator", "config", "meta"
ITEMS = (STATE, DATA, CONFIG, META)
# BertConfig fields that decide parameter shapes and layout; a resumed run must agree.
ARCHITECTURE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size",
                     "hidden_act", "scan_layers", "param_dtype")


class CheckpointMismatchError(ValueError):
    """The workdir's checkpoint does not belong to this run's model or tokenizer."""


class Checkpointer:
    """Orbax CheckpointManager for the train state and its companions.

    keep: the latest checkpoints kept; keep_best: also the k best by `eval_loss`
    (pass `metrics={'eval_loss': x}` to save).
    """

    def __init__(self, workdir, *, keep: int = 3, keep_best: int = 0,
                 async_save: bool = True, read_only: bool = False):
        self.directory = paths.workdir_path(workdir) / CHECKPOINTS_DIR
        keep_policies = [policies.LatestN(n=keep)]
        if keep_best:
            keep_policies.append(policies.BestN(
                get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=keep_best,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # the loop decides when to save
            preservation_policy=policies.AnyPreservationPolicy(keep_policies),
            enable_async_checkpointing=async_save,
            read_only=read_only,
            create=not read_only,
            cleanup_tmp_directories=not read_only,  # debris of a save that was killed
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, *, data_state, config: dict, meta: dict,
             metrics: dict | None = None) -> bool:
        """Starts an (async) save of everything at `step`; False if it already exists."""
        if step in self._manager.all_steps():
            return False
        return self._manager.save(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            DATA: ocp.args.JsonSave(data_state),
            CONFIG: ocp.args.JsonSave(config),
            META: ocp.args.JsonSave(meta),
        }), metrics=metrics, force=True)

    def restore(self, step: int, abstract_state):
        """-> (state, data_state). `abstract_state` leaves: ShapeDtypeStruct with sharding."""
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract_state),
            DATA: ocp.args.JsonRestore(),
        }))
        return restored[STATE], restored[DATA]

    def read_json(self, step: int, item: str) -> dict:
        return read_json_item(self.directory / str(step), item)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def abstract_with_shardings(abstract_state, shardings):
    """ShapeDtypeStruct tree (from jax.eval_shape) + sharding tree -> restore target."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


# ----------------------------------------------------------------------------
# Companions of the state: metadata, tokenizer.

def read_json_item(step_dir, item: str) -> dict:
    step_dir = paths.workdir_path(step_dir, "checkpoint")
    if not (step_dir / item).is_dir():
        raise FileNotFoundError(f"{step_dir}: not a bert_jax checkpoint step (no {item}/)")
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
        step_dir / item, args=ocp.args.JsonRestore())


def tokenizer_fingerprint(tokenizer_dir) -> str:
    """sha256 over the tokenizer's files (names and bytes), to pair it with checkpoints."""
    tokenizer_dir = paths.workdir_path(tokenizer_dir, "tokenizer")
    digest = hashlib.sha256()
    for name in paths.walk_files(tokenizer_dir):
        digest.update(name.encode())
        digest.update((tokenizer_dir / name).read_bytes())
    return digest.hexdigest()


def check_same_model(saved_model_config: dict, model_config: dict, where) -> None:
    """Raise CheckpointMismatchError naming every architecture key that differs."""
    diffs = [f"{k}: checkpoint {saved_model_config.get(k)!r} vs this run {model_config.get(k)!r}"
             for k in ARCHITECTURE_KEYS if saved_model_config.get(k) != model_config.get(k)]
    if diffs:
        raise CheckpointMismatchError(
            f"{where} holds a checkpoint of a different model:\n  " + "\n  ".join(diffs)
            + "\nUse another --workdir (or the same config) to resume; the checkpoint was left untouched.")


# ----------------------------------------------------------------------------
# Reading params for fine-tuning and export.

def resolve_step_dir(path) -> epath.Path:
    """A workdir, its checkpoints/ dir, or one step dir -> that step dir (latest step)."""
    path = paths.workdir_path(path, "checkpoint")
    if (path / STATE).is_dir():
        return path
    root = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    children = root.iterdir() if root.is_dir() else []
    steps = sorted(int(p.name) for p in children if p.name.isdigit() and (p / STATE).is_dir())
    if not steps:
        raise FileNotFoundError(f"{path}: no bert_jax checkpoint found (looked for "
                                f"{CHECKPOINTS_DIR}/<step>/{STATE}/ and <step>/{STATE}/)")
    return root / str(steps[-1])


def restore_params(path):
    """-> (BertConfig, params: nested dict of numpy float arrays in the canonical
    (unstacked) layout, tokenizer_dir or None). `path`: workdir or step dir."""
    step_dir = resolve_step_dir(path)
    meta = read_json_item(step_dir, META)
    config = BertConfig.from_dict(meta["model_config"])
    state_dir = step_dir / STATE
    tree = ocp.PyTreeCheckpointHandler().metadata(state_dir).tree
    if "params" not in tree:
        raise ValueError(f"{state_dir}: no 'params' in the saved state (keys: {sorted(tree)})")
    # Only the params, as host numpy arrays: no devices, no optimizer state read.
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree["params"])
    restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item={"params": tree["params"]}, restore_args={"params": restore_args},
        partial_restore=True))
    params = params_lib.to_dict(restored["params"])
    if config.scan_layers:
        params = params_lib.unstack_layers(params, config.num_hidden_layers)
    tokenizer_dir = step_dir.parent.parent / meta.get("tokenizer", {}).get("dir", TOKENIZER_DIR)
    return config, params, (str(tokenizer_dir) if tokenizer_dir.is_dir() else None)
