r"""Fine-tuning entrypoint: a sweep of (learning rate, seed) runs per task (GLUE, NER, SQuAD).

    python -m bert_jax.finetune --config configs/glue.py --workdir DIR \
        --config.task=mrpc --config.init_checkpoint=PATH \
        [--config.glue_dir=GLUE_DIR | --config.tfds_data_dir=TFDS_DIR] \
        [--config.learning_rates='(5e-5,4e-5,3e-5,2e-5)' --config.seeds='(0,1,2)']
    python -m bert_jax.finetune --config configs/ner.py --config.data_dir=CONLL_DIR ...
    python -m bert_jax.finetune --config configs/squad.py --config.train_file=F --config.predict_file=F ...

`init_checkpoint`: a pretraining workdir or step dir (Orbax), or a Hugging Face / Google /
.npz directory (through `bert_jax.weights`); encoder and pooler are restored, the task head
is new. The tokenizer comes with the checkpoint (`--config.tokenizer` overrides it).

Every run goes through the training loop pretraining uses (`bert_jax.loop`): metrics.jsonl
and TensorBoard per run, a progress bar, evaluation on dev every epoch (or every
`eval_every_steps`), checkpoints. Started again on the same workdir, the sweep skips the
runs that finished and resumes the unfinished one; SIGTERM saves and exits 0. The sweep,
results.json and the outputs are `bert_jax.sweep`'s; tasks are `bert_jax.tasks`.
"""
from __future__ import annotations

import json
import logging
import sys

import jax
from absl import flags
from ml_collections import config_flags

from bert_jax import cli, config_utils, distributed, loop, paths, sharding, sweep, tasks, weights

PROG = "python -m bert_jax.finetune"


def run(c, workdir) -> dict:
    """Fine-tunes every task of `c.task` -> the results dict written to results.json, plus
    `preempted` (True when SIGTERM stopped the sweep; run again to resume)."""
    config_utils.validate_finetune(c)
    task_names = tasks.resolve(c.task)  # unknown task names fail before any work
    distributed.initialize(c.distributed)
    workdir = paths.workdir_path(workdir)  # a local directory or a URI (gs://...)
    if jax.process_index() == 0:
        paths.ensure_writable_dir(workdir)
    pretrained = weights.load_pretrained_encoder(c.init_checkpoint, c.init_format, c.tokenizer)
    mesh = sharding.make_mesh(c.mesh)
    results = {"config": c.to_dict(), "init_checkpoint": pretrained.source, "tasks": {}}
    path = workdir / sweep.RESULTS_FILE
    if path.is_file():  # keep other tasks' results from earlier invocations
        results["tasks"] = json.loads(path.read_text()).get("tasks", {})
    preemption = loop.PreemptionWatcher()
    try:
        finished = True
        for family, name in task_names:
            task = tasks.build(family, name, c, pretrained.tokenizer)
            tuner = sweep.FineTuning(task, pretrained, c, mesh, sharding.DEFAULT_RULES)
            finished = sweep.run_sweep(tuner, workdir, results, preemption)
            if not finished:
                break
    finally:
        preemption.close()
    return {**results, "preempted": not finished}


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    # sys_argv: the config file is read while its override flags (--config.KEY=...) are defined.
    config_flags.DEFINE_config_file("config", None, "fine-tuning config file (configs/glue.py)", flag_values=fv,
                                    lock_config=True, sys_argv=[PROG, *argv])
    flags.DEFINE_string("workdir", None, "results.json, submission files, fine-tuned checkpoints, runs",
                        flag_values=fv)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)


def main(argv=None) -> int:
    """Exit status: 0 done (or stopped by SIGTERM, resumable), 1 too many non-finite steps,
    2 bad input (one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        fv = cli.parse(argv, lambda fv: define_flags(fv, argv), __doc__, prog=PROG)
        config = fv.config
        config.to_dict()  # config_flags defers the error of a file it could not load to here
    except (AttributeError, KeyError, OSError) as e:  # --config.KEY=... naming no key; no such file
        while isinstance(e, BaseException) and e.args:
            e = e.args[0]
        cli.usage_error(PROG, f"--config: {e}")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save at INFO
    try:
        results = run(config, fv.workdir)
    except (ValueError, FileNotFoundError) as e:  # bad config, data or workdir (CheckpointMismatchError too)
        print(f"error: {e}", file=sys.stderr)
        return cli.USAGE_ERROR
    except loop.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if results["preempted"]:
        print(f"preempted: checkpoint saved in {fv.workdir}; run the same command again to resume", flush=True)
        return 0
    for name, entry in results["tasks"].items():
        chosen = entry.get("chosen", {})
        print(f"{name}: {entry['primary_metric']}={chosen.get('metrics', {}).get(entry['primary_metric'])} "
              f"(lr={chosen.get('learning_rate')}, seed={chosen.get('seed')})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
