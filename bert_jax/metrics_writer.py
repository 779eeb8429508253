"""Where training metrics go: a JSON-lines file, TensorBoard events, a progress bar.

Only process 0 writes (the others get `enabled=False` and every call is a no-op), so
a pod does not write N copies. Files in the workdir:

    metrics.jsonl          one {"step": s, "split": "train"|"eval", name: value, ...} per line
    tensorboard/           event files (tensorboardX; view with `tensorboard --logdir`)

The workdir may be a URI (gs://...): both files are written through `etils.epath`
(tf.io.gfile for gs://), and tensorboardX gets a writer for that scheme that does the same.
A GCS object is re-uploaded whole on every flush, so on a URI the JSONL file is flushed at
most every `flush_secs` (and on close); locally every line is flushed at once, as before.

A run resumed at step s (or rolled back to it) drops the lines after s that an earlier
run (or the diverged steps) wrote, so the file holds one history, step by step.
"""
from __future__ import annotations

import json
import math
import time

import tqdm

from bert_jax import paths

JSONL_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
    def __init__(self, workdir, *, enabled: bool = True, total_steps: int = 0,
                 initial_step: int = 0, progress_bar: bool = True, flush_secs: float = 30.0,
                 description: str | None = None):
        self.enabled = enabled
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.workdir = paths.workdir_path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._flush_secs = 0.0 if paths.is_local(self.workdir) else flush_secs
        self._flushed_at = time.monotonic()
        # Appending keeps the history of earlier (preempted) runs of this workdir, up to the
        # step resumed from: what a killed run wrote after its last checkpoint is redone.
        self._jsonl = None
        self.drop_after(initial_step)
        if progress_bar:
            self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step", desc=description,
                                  dynamic_ncols=True, smoothing=0.1)

    def _tensorboard(self):
        if self._tb is None:
            # Imported late: tensorboardX pulls in torch when it is installed.
            from tensorboardX import SummaryWriter
            logdir = self.workdir / TENSORBOARD_DIR
            if not paths.is_local(logdir):
                _register_tensorboard_scheme(str(logdir).split("://", 1)[0])
            self._tb = SummaryWriter(str(logdir), flush_secs=30)
        return self._tb

    def write(self, step: int, metrics: dict, split: str = "train") -> None:
        """Scalars to JSONL and TensorBoard (`split/name` tags)."""
        if not self.enabled:
            return
        scalars = {k: _to_float(v) for k, v in metrics.items()}
        record = {"step": int(step), "split": split, "time": round(time.time(), 3), **scalars}
        self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        if time.monotonic() - self._flushed_at >= self._flush_secs:
            self._jsonl.flush()
            self._flushed_at = time.monotonic()
        tb = self._tensorboard()
        for name, value in scalars.items():
            tb.add_scalar(f"{split}/{name}", value, int(step))

    def drop_after(self, step: int) -> None:
        """Remove the lines of steps after `step` (all of them at 0: a fresh start)."""
        if not self.enabled:
            return
        path = self.workdir / JSONL_FILE
        if self._jsonl is not None:
            self._jsonl.close()
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [line for line in lines if step and _step_of(line) is not None and _step_of(line) <= step]
            if len(kept) < len(lines):
                tmp = path.parent / (JSONL_FILE + ".tmp")
                tmp.write_text("".join(kept), encoding="utf-8")
                tmp.replace(path)
        self._jsonl = paths.open_file(path, "a")

    def progress(self, step: int, postfix: dict | None = None) -> None:
        """Move the bar to `step`; postfix is e.g. loss, mlm_acc, seq/s, mfu (ETA is tqdm's)."""
        if not (self.enabled and self._bar):
            return
        self._bar.update(step - self._bar.n)
        if postfix:
            self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)

    def message(self, text: str) -> None:
        """A line that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._jsonl.close()


def read_jsonl(workdir, split: str | None = None) -> list[dict]:
    path = paths.workdir_path(workdir) / JSONL_FILE
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if split is None or r["split"] == split]


class _EpathRecordWriterFactory:
    """tensorboardX event files for a URI scheme, written through etils.epath (its own gs://
    writer would need google-cloud-storage and credentials of its own)."""

    def open(self, path):
        return paths.open_file(paths.workdir_path(path, "event file"), "wb")

    def directory_check(self, path):
        paths.workdir_path(path, "tensorboard dir").mkdir(parents=True, exist_ok=True)


def _register_tensorboard_scheme(scheme: str) -> None:
    from tensorboardX import record_writer  # noqa: PLC0415
    record_writer.register_writer_factory(scheme, _EpathRecordWriterFactory())


def _step_of(line: str) -> int | None:
    """The step of a JSONL line; None for a line cut short by a killed run."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _to_float(v) -> float:
    return float(v.item() if hasattr(v, "item") else v)


def _short(v):
    if isinstance(v, float):
        if math.isfinite(v) and v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4):
            return f"{v:.2e}"
        return f"{v:.4g}"
    return v

