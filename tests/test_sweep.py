"""The fine-tuning sweep resumes: a sweep stopped by SIGTERM in its second run, started again,
does not train the finished run again, continues the stopped one from its checkpoint and
writes the results.json of a sweep that was never stopped."""
import json
import os
import signal

from bert_jax import finetune, metrics_writer, sweep
from bert_jax.tasks import glue as glue_task
from test_finetune import config, make_tiny_checkpoint, write_polarity_task


def _sweep_config(tmp_path):
    write_polarity_task(tmp_path / "data", n_train=48, n_dev=16, n_test=8)
    # 3 steps per epoch, 2 epochs per run, 2 runs; an evaluation at step 0 and after every epoch.
    return config(task="continuation", glue_dir=str(tmp_path / "data"),
                  init_checkpoint=str(make_tiny_checkpoint(tmp_path / "ckpt") / "orbax"),
                  max_seq_length=16, batch_size=16, eval_batch_size=16, num_epochs=2.0,
                  learning_rates=(1e-2, 3e-3), seeds=(0,), log_every_steps=1, progress_bar=False,
                  eval_before_training=True)


def _comparable(workdir):
    """results.json without timing, with paths relative to the workdir."""
    text = (workdir / sweep.RESULTS_FILE).read_text().replace(str(workdir), "WORKDIR")
    results = json.loads(text)
    for entry in results["tasks"].values():
        for run in entry["runs"]:
            del run["train_seconds"]
    return results


def _run_dir(workdir, learning_rate):
    return workdir / "continuation" / "runs" / f"lr={learning_rate:g},seed=0"


def test_sigterm_in_second_run_then_resume_equals_uninterrupted_sweep(tmp_path, monkeypatch):
    c = _sweep_config(tmp_path)
    reference = tmp_path / "uninterrupted"
    assert not finetune.run(c, reference)["preempted"]

    # SIGTERM while the second run fetches its second batch of epoch 0 (the third epoch trained).
    epochs_started = []
    train_batches = glue_task.Glue.train_batches

    def batches_then_sigterm(self, seed, epoch):
        epochs_started.append(epoch)
        for i, batch in enumerate(train_batches(self, seed, epoch)):
            if len(epochs_started) == 3 and i == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(glue_task.Glue, "train_batches", batches_then_sigterm)
    workdir = tmp_path / "stopped"
    stopped = finetune.run(c, workdir)
    assert stopped["preempted"] and len(stopped["tasks"]["continuation"]["runs"]) == 1
    first, second = _run_dir(workdir, 1e-2), _run_dir(workdir, 3e-3)
    assert (first / sweep.RUN_RESULT).is_file() and not (second / sweep.RUN_RESULT).exists()
    assert [r["step"] for r in metrics_writer.read_jsonl(second, "train")] == [1, 2]  # saved at step 2
    first_metrics = (first / metrics_writer.JSONL_FILE).read_text()

    trained = []
    train = sweep.FineTuning.train

    def recording_train(self, learning_rate, seed, run_dir, preemption):
        trained.append(learning_rate)
        return train(self, learning_rate, seed, run_dir, preemption)

    monkeypatch.setattr(glue_task.Glue, "train_batches", train_batches)
    monkeypatch.setattr(sweep.FineTuning, "train", recording_train)
    assert not finetune.run(c, workdir)["preempted"]
    assert trained == [3e-3]  # the finished run was read back, not trained again
    assert (first / metrics_writer.JSONL_FILE).read_text() == first_metrics
    # The second run continued from its checkpoint at step 2: every step trained once.
    assert [r["step"] for r in metrics_writer.read_jsonl(second, "train")] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in metrics_writer.read_jsonl(second, "eval")] == [0, 3, 6]
    assert not (second / "checkpoints").exists()  # a finished run keeps its result, not its state
    assert _comparable(workdir) == _comparable(reference)
    assert (workdir / "submission" / "continuation.tsv").read_text() == \
        (reference / "submission" / "continuation.tsv").read_text()
