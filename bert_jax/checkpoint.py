"""What a pretraining checkpoint holds, and how to save, resume and read it (Orbax).

Layout of a workdir:

    workdir/
      tokenizer/                 the run's tokenizer, written once (load_tokenizer reads it)
      checkpoints/<step>/
        state/                   train state: params, optimizer state, step (sharded arrays)
        data_iterator/           the loader's get_state() (JSON), to continue the data order
        config/                  the full ml_collections config (JSON)
        meta/                    model config, tokenizer dir + sha256, mesh, versions, and a
                                 checksum per state array (JSON)
      damaged_checkpoints/<step>/  checkpoints found damaged on resume, moved here unchanged
      metrics.jsonl, tensorboard/

Every process calls `save`/`restore` (Orbax coordinates; array shards are written by
the processes that own them). `restore` takes an abstract state whose leaves carry the
*target* shardings, so a checkpoint written on 8 devices restores onto 2 or 4.

Nothing unresumable is written or resumed: `save` refuses a state with NaN/inf (one
jitted reduction over the state, which also gives the per-array checksums); `restore`
verifies what it read (every array readable, finite and matching its checksum, the JSON
items parsing) and raises `DamagedCheckpointError` naming the step and the array or file;
`restore_newest_intact` falls back to older checkpoints. An async save that failed is
raised by `check` (called by the loop at every step) as one `CheckpointSaveError` line.

For fine-tuning and export, `restore_params(path)` reads a workdir (latest step) or a
step directory and returns `(BertConfig, params as nested dict of numpy, tokenizer_dir)`.
"""
from __future__ import annotations

import hashlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from bert_jax import distributed
from bert_jax import params as params_lib
from bert_jax import paths
from bert_jax.model import BertConfig

CHECKPOINTS_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"
DAMAGED_DIR = "damaged_checkpoints"
TMP_MARK = ".orbax-checkpoint-tmp"  # in the name of a step directory still being written
STATE, DATA, CONFIG, META = "state", "data_iterator", "config", "meta"
ITEMS = (STATE, DATA, CONFIG, META)
# BertConfig fields that decide parameter shapes and layout; a resumed run must agree.
ARCHITECTURE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size",
                     "hidden_act", "scan_layers", "param_dtype")


class CheckpointMismatchError(ValueError):
    """The workdir's checkpoint does not belong to this run's model or tokenizer."""


class DamagedCheckpointError(ValueError):
    """A checkpoint step cannot be resumed: unreadable, non-finite or changed on disk."""

    def __init__(self, step: int, where, reason: str):
        super().__init__(f"checkpoint at step {step} is damaged ({where}: {reason})")
        self.step = step


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (disk full, permission lost, ...)."""


class NonFiniteStateError(RuntimeError):
    """The train state holds NaN or inf: it is not saved."""


class _BackgroundSaveErrors(logging.Filter):
    """Orbax logs a failed async save with a traceback from each of its threads (dozens of
    lines); the failure reaches the user once, as CheckpointSaveError. Other logs pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "/orbax/checkpoint/" in record.pathname)


logging.getLogger("absl").addFilter(_BackgroundSaveErrors())


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
        )
        if not read_only:
            self._remove_unfinished_saves()
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def _remove_unfinished_saves(self) -> None:
        """Delete the temporary directories of saves that were killed or failed (Orbax's own
        cleanup runs in the background; this one is done before anything is read or written)."""
        if jax.process_index() == 0 and self.directory.is_dir():
            for path in self.directory.iterdir():
                if TMP_MARK in path.name:
                    paths.rmtree(path)
        distributed.barrier("unfinished_saves_removed")

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, *, data_state, config: dict, meta: dict,
             metrics: dict | None = None) -> bool:
        """Starts an (async) save of everything at `step`; False if it already exists.
        Raises NonFiniteStateError (nothing written) if the state holds NaN or inf, and
        CheckpointSaveError if an earlier async save failed."""
        self.check()
        if step in self._manager.all_steps():
            return False
        finite, sums = jax.device_get(_digest(state))
        if not finite:
            last = self._manager.latest_step()
            raise NonFiniteStateError(
                f"step {step}: the params or optimizer state hold NaN/inf, so no checkpoint was written; "
                + (f"the last checkpoint is step {last} in {self.directory}" if last is not None
                   else f"there is no checkpoint in {self.directory}"))
        try:
            return self._manager.save(step, args=ocp.args.Composite(**{
                STATE: ocp.args.StandardSave(state),
                DATA: ocp.args.JsonSave(data_state),
                CONFIG: ocp.args.JsonSave(config),
                META: ocp.args.JsonSave({**meta, "state_sums": sums.tolist()}),
            }), metrics=metrics, force=True)
        except OSError as error:
            raise self._save_error(error) from None

    def check(self) -> None:
        """Raise CheckpointSaveError if a finished async save failed (cheap: no waiting)."""
        try:
            self._manager.check_for_errors()
        except Exception as error:  # noqa: BLE001 - whatever the background write raised
            raise self._save_error(error) from None

    def _save_error(self, error: BaseException) -> CheckpointSaveError:
        self._manager.reload()  # the failed step is not a checkpoint
        last = self._manager.latest_step()
        return CheckpointSaveError(
            f"saving a checkpoint in {self.directory} failed: {root_cause(error)}; training stopped, "
            + (f"the last complete checkpoint is step {last}" if last is not None else "no checkpoint was written"))

    def restore(self, step: int, abstract_state):
        """-> (state, data_state), verified. `abstract_state` leaves: ShapeDtypeStruct with
        sharding. Raises DamagedCheckpointError naming the step and what is wrong."""
        step_dir = self.directory / str(step)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{
                STATE: ocp.args.StandardRestore(abstract_state),
                DATA: ocp.args.JsonRestore(),
                META: ocp.args.JsonRestore(),
            }))
        except Exception as error:  # noqa: BLE001 - TensorStore, JSON, missing files: all damage
            raise DamagedCheckpointError(step, step_dir, root_cause(error)) from None
        state, data_state, meta = restored[STATE], restored[DATA], restored[META]
        if not isinstance(data_state, dict) or not isinstance(meta, dict):
            raise DamagedCheckpointError(step, step_dir, f"{DATA}/ or {META}/ does not hold a JSON object")
        finite, sums = jax.device_get(_digest(state))
        saved = meta.get("state_sums")
        if saved is not None and sums.tolist() != saved:
            paths_ = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
            changed = [p for p, a, b in zip(paths_, sums.tolist(), saved) if a != b] or ["the array list"]
            raise DamagedCheckpointError(step, step_dir / STATE, f"{', '.join(changed[:3])} changed on disk "
                                         "since it was saved (checksum differs)")
        if not finite:
            raise DamagedCheckpointError(step, step_dir / STATE, "NaN/inf in the saved state")
        return state, data_state

    def restore_newest_intact(self, abstract_state, *, damaged: str = "fallback", message=print):
        """-> (step, state, data_state) of the newest checkpoint that verifies, or None if
        there is none. A damaged one is reported in one line and moved, unchanged, to
        workdir/damaged_checkpoints/ (so it is neither resumed, overwritten nor deleted);
        damaged='refuse' raises its DamagedCheckpointError instead."""
        steps = sorted(self.all_steps(), reverse=True)
        for step in steps:
            try:
                return (step, *self.restore(step, abstract_state))
            except DamagedCheckpointError as error:
                if damaged == "refuse":
                    raise DamagedCheckpointError(step, self.directory / str(step), str(error).split(" (", 1)[1][:-1]
                                                 + "; set train.resume_damaged=fallback to resume from the newest "
                                                 "intact one") from None
                moved = self._set_aside(step)
                message(f"{error}; moved unchanged to {moved}, resuming from an earlier checkpoint")
        if steps:
            raise DamagedCheckpointError(steps[-1], self.directory, f"every checkpoint (steps {sorted(steps)}) "
                                         f"is damaged; they were moved to {self.directory.parent / DAMAGED_DIR}, "
                                         "start again with another --workdir")
        return None

    def rollback(self, abstract_state, *, damaged: str = "fallback", message=print):
        """The loop's `rollback`: waits for the save in flight, -> (state, step) of the newest
        intact checkpoint, or None without one. The caller's batches go on from where they
        are, so the window that led to the divergence is skipped."""
        self.wait()
        found = self.restore_newest_intact(abstract_state, damaged=damaged, message=message)
        return None if found is None else (found[1], found[0])

    def _set_aside(self, step: int) -> epath.Path:
        target = self.directory.parent / DAMAGED_DIR / str(step)
        distributed.barrier(f"damaged_checkpoint_{step}")
        if jax.process_index() == 0:
            suffix = 0
            while target.exists():
                suffix += 1
                target = target.parent / f"{step}.{suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        distributed.barrier(f"damaged_checkpoint_{step}_moved")
        self._manager.reload()
        return target

    def newest_meta(self) -> dict | None:
        """The meta item of the newest checkpoint whose meta/ reads (what the model and the
        tokenizer of a resumed run must match); None without checkpoints."""
        steps = sorted(self.all_steps(), reverse=True)
        for step in steps:
            try:
                return self.read_json(step, META)
            except Exception:  # noqa: BLE001 - a damaged one; restore_newest_intact reports it
                continue
        if steps:
            raise DamagedCheckpointError(steps[0], self.directory, f"no checkpoint has a readable {META}/ "
                                         f"(steps {sorted(steps)}); start again with another --workdir")
        return None

    def read_json(self, step: int, item: str) -> dict:
        return read_json_item(self.directory / str(step), item)

    def wait(self) -> None:
        """Wait for the async save in flight; CheckpointSaveError if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001
            raise self._save_error(error) from None
        self.check()

    def close(self) -> None:
        self._manager.close()


@jax.jit
def _digest(state):
    """-> (every float array finite, uint32 checksum per array: the sum of its bits as
    unsigned integers, which any flipped bit changes). One pass over the state, on device."""
    leaves = jax.tree.leaves(state)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves
                                if jnp.issubdtype(x.dtype, jnp.inexact)] or [jnp.bool_(True)]))
    return finite, jnp.stack([_bit_sum(x) for x in leaves]) if leaves else jnp.zeros(0, jnp.uint32)


def _bit_sum(x):
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}"))
    return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)


def root_cause(error: BaseException) -> str:
    """The innermost exception of a chain, as one line of at most 300 characters (TensorStore
    and Orbax wrap theirs)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    # TensorStore ends with the OS error (`... No space left on device [os_error_code='28']`): keep both ends.
    return text if len(text) <= 300 else text[:140] + " ... " + text[-155:]


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
