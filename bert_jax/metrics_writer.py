"""Where training metrics go: a JSON-lines file, TensorBoard events, a progress bar.

Only process 0 writes (the others get `enabled=False` and every call is a no-op), so
a pod does not write N copies. Files in the workdir:

    metrics.jsonl          one {"step": s, "split": "train"|"eval", name: value, ...} per line
    tensorboard/           event files (tensorboardX; view with `tensorboard --logdir`)
"""
from __future__ import annotations

import json
import math
import pathlib
import time

import tqdm

JSONL_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
    def __init__(self, workdir, *, enabled: bool = True, total_steps: int = 0,
                 initial_step: int = 0, progress_bar: bool = True):
        self.enabled = enabled
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Appending keeps the history of earlier (preempted) runs of this workdir.
        self._jsonl = open(self.workdir / JSONL_FILE, "a", encoding="utf-8")
        if progress_bar:
            self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step",
                                  dynamic_ncols=True, smoothing=0.1)

    def _tensorboard(self):
        if self._tb is None:
            # Imported late: tensorboardX pulls in torch when it is installed.
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(self.workdir / TENSORBOARD_DIR), flush_secs=30)
        return self._tb

    def write(self, step: int, metrics: dict, split: str = "train") -> None:
        """Scalars to JSONL and TensorBoard (`split/name` tags)."""
        if not self.enabled:
            return
        scalars = {k: _to_float(v) for k, v in metrics.items()}
        record = {"step": int(step), "split": split, "time": round(time.time(), 3), **scalars}
        self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        self._jsonl.flush()
        tb = self._tensorboard()
        for name, value in scalars.items():
            tb.add_scalar(f"{split}/{name}", value, int(step))

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
    path = pathlib.Path(workdir) / JSONL_FILE
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if split is None or r["split"] == split]


def _to_float(v) -> float:
    return float(v.item() if hasattr(v, "item") else v)


def _short(v):
    if isinstance(v, float):
        if math.isfinite(v) and v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4):
            return f"{v:.2e}"
        return f"{v:.4g}"
    return v

