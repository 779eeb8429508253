"""Pretraining entrypoint: wires config, tokenizer, data, mesh, state and checkpoints.

    python -m bert_jax.pretrain --config configs/bert_base.py --workdir DIR [--config.key=value ...]

Started again on the same workdir it resumes from the latest checkpoint (params,
optimizer, step, data order). A workdir holding a checkpoint of another model is an
error, and nothing is written before the restore succeeded. SIGTERM saves a checkpoint
at the current step and exits 0. The run itself is `bert_jax.pretraining.run`.
"""
from __future__ import annotations

import sys

from absl import flags
from absl import logging as absl_logging

from bert_jax import checkpoint, cli, loop, pretraining


# ----------------------------------------------------------------------------
# Command line

def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "checkpoints, tokenizer, metrics; resumed when it has them", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)


@cli.entrypoint
def main(argv=None) -> int:
    """Exit status: 0 finished or preempted (resumable), 1 stopped (too many non-finite steps,
    a failed save), 2 bad input (one line on stderr)."""
    fv = cli.parse_config(argv, define_flags, __doc__, prog="python -m bert_jax.pretrain",
                          config_help="pretraining config file (configs/*.py[:phase2])")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    try:
        summary = pretraining.run(fv.config, fv.workdir)
    except (checkpoint.CheckpointMismatchError, checkpoint.DamagedCheckpointError,
            checkpoint.CheckpointSaveError, loop.NonFiniteError) as e:
        print(f"error: stopped: {e}", file=sys.stderr, flush=True)
        return cli.RUN_FAILED
    print(ending(summary), flush=True)
    return 0


def ending(summary: dict) -> str:
    """The run's last line: how it ended and where its last checkpoint is
    (`preempted: checkpoint at step N in DIR`, which launch scripts read, or `finished...`)."""
    how = "preempted" if summary["preempted"] else "finished"
    rollbacks = f" after {summary['rollbacks']} rollback(s)" if summary["rollbacks"] else ""
    return f"{how}{rollbacks}: checkpoint at step {summary['last_checkpoint']} in {summary['workdir']}"


if __name__ == "__main__":
    sys.exit(main())
