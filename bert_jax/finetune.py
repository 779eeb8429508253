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


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "results.json, submission files, fine-tuned checkpoints, runs",
                        flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)


@cli.entrypoint
def main(argv=None) -> int:
    """Exit status: 0 done (or stopped by SIGTERM, resumable), 1 too many non-finite steps,
    2 bad input (one line on stderr)."""
    fv = cli.parse_config(argv, define_flags, __doc__, prog=PROG,
                          config_help="fine-tuning config file (configs/glue.py)")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save at INFO
    results = run(fv.config, fv.workdir)
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
