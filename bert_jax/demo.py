"""The main job, end to end, offline: pretrain -> fine-tune -> export.

    python -m bert_jax.demo --workdir workdirs/demo [--pretrain_steps 600] [--finetune_epochs 2]

1. Pretrains BERT-tiny on the embedded demo corpus (the running Python's own
   docstrings and pydoc topics; a SentencePiece vocabulary is trained on it):
   ``python -m bert_jax.pretrain --config configs/demo.py``.
2. Builds a GLUE-format task from the same corpus (is sentence 2 the sentence
   that follows sentence 1?) and fine-tunes the pretrained checkpoint on it:
   ``python -m bert_jax.finetune --config configs/glue.py --config.task=continuation``.
3. Exports the fine-tuned model to NumPy (``.npz``) and Hugging Face format:
   ``python -m bert_jax.convert``.
4. Prints a short summary: held-out masked-LM accuracy of the pretrained model against the
   unigram baseline on the same masked positions, a few held-out sentences with a masked
   word and the model's top predictions (``bert_jax.mlm_eval``), the fine-tuned result.

Each stage is the real entrypoint run as its own process, exactly as a user would
run it; this file only wires them together. Run it again on the same workdir and
pretraining resumes (or is skipped when finished).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

from absl import flags

from bert_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


class StageFailed(RuntimeError):
    """A stage's process exited non-zero (its own error is printed above)."""


def run(stage: str, args: list[str]) -> float:
    cmd = [sys.executable, "-m", *args]
    print(f"\n=== {stage}: {' '.join(cmd[1:])}", flush=True)
    t = time.time()
    status = subprocess.run(cmd, cwd=ROOT).returncode
    if status:
        raise StageFailed(f"the {stage} stage exited with status {status} (its error is above); "
                          "fix it and run the demo again (finished stages are resumed or skipped)")
    return time.time() - t


def last_metrics(path: pathlib.Path, split: str) -> dict:
    """The last row of ``split`` ('train' or 'eval') in the trainer's metrics.jsonl."""
    found = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("split") == split:
                found = row
    return found


def _define_flags(fv) -> None:
    flags.DEFINE_string("workdir", "workdirs/demo", "directory for all stages' outputs", flag_values=fv)
    flags.DEFINE_integer("pretrain_steps", None, "default: configs/demo.py's", flag_values=fv)
    flags.DEFINE_float("finetune_epochs", 2.0, "fine-tuning epochs", flag_values=fv)
    flags.DEFINE_integer("finetune_examples", 4000, "pairs in the fine-tuning task", flag_values=fv)


@cli.entrypoint
def main(argv=None) -> int:
    args = cli.parse(argv, _define_flags, __doc__, prog="python -m bert_jax.demo")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    work = pathlib.Path(args.workdir).absolute()
    pre, task_dir, fine, export = work / "pretrain", work / "glue", work / "finetune", work / "export"
    times = {}

    overrides = []
    if args.pretrain_steps:
        overrides = [f"--config.train.steps={args.pretrain_steps}",
                     f"--config.optimizer.warmup_steps={args.pretrain_steps // 10}"]
    times["pretrain"] = run("pretrain", ["bert_jax.pretrain", f"--config={ROOT / 'configs/demo.py'}",
                                         f"--workdir={pre}", *overrides])

    from bert_jax.data import demo_corpus
    from bert_jax.tasks import glue_data

    counts = glue_data.write_continuation_task(demo_corpus.documents(), str(task_dir / "continuation"), seed=0,
                                               max_examples=args.finetune_examples)
    print(f"\ncontinuation task written to {task_dir / 'continuation'}: {counts}")
    times["finetune"] = run("fine-tune", [
        "bert_jax.finetune", f"--config={ROOT / 'configs/glue.py'}", f"--workdir={fine}",
        "--config.task=continuation", f"--config.glue_dir={task_dir}", f"--config.init_checkpoint={pre}",
        "--config.max_seq_length=64", "--config.learning_rates=(1e-4,)", "--config.batch_size=32",
        f"--config.num_epochs={args.finetune_epochs}"])

    t = time.time()
    ckpt = fine / "continuation" / "checkpoint"  # the chosen run's fine-tuned params
    run("export npz", ["bert_jax.convert", f"--src={ckpt}", "--src_format=orbax",
                       f"--dst={export / 'npz' / 'bert.npz'}", "--dst_format=npz", "--overwrite"])
    run("export hf", ["bert_jax.convert", f"--src={ckpt}", "--src_format=orbax",
                      f"--dst={export / 'hf'}", "--dst_format=hf", "--overwrite"])
    times["export"] = time.time() - t

    from bert_jax import mlm_eval

    pre_eval = last_metrics(pre / "metrics.jsonl", "eval")
    report = mlm_eval.pretraining_report(pre)
    results = json.loads((fine / "results.json").read_text()) if (fine / "results.json").is_file() else {}
    chosen = results.get("tasks", {}).get("continuation", {}).get("chosen", {})
    print("\n=== summary")
    print(f"pretraining  ({times['pretrain']:.0f} s): workdir {pre}")
    print(f"  held-out at step {pre_eval.get('step')}: " + ", ".join(
        f"{k}={pre_eval[k]:.4g}" for k in ("mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy") if k in pre_eval))
    print("  " + report.replace("\n", "\n  "))
    print(f"fine-tuning  ({times['finetune']:.0f} s): workdir {fine}")
    print(f"  chosen run: {json.dumps(chosen.get('metrics', chosen), default=str)[:300]}")
    print(f"export       ({times['export']:.0f} s): {export / 'npz' / 'bert.npz'} and {export / 'hf'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
