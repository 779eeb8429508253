"""The pretraining entrypoint end to end on real text (tiny model, short sequences).

One prepared slice of ../shared/data/enwiki_sample is shared by all tests; every run has
the same shapes (batch 16, length 64) so they compile the same programs.
"""
import dataclasses
import hashlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bert_jax import checkpoint, config_utils, loop, metrics_writer, pretrain, pretraining, tokenizer
from bert_jax.data import prepare
from bert_jax.data.sources import DataSource

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 1000
STEPS = 20


@pytest.fixture(scope="module")
def prepared(shared_data, tmp_path_factory):
    """~40 enwiki articles, a SentencePiece vocabulary trained on them, prepared instances."""
    return prepare_enwiki(shared_data, tmp_path_factory.mktemp("enwiki"), 2000, VOCAB, 64)


def prepare_enwiki(shared_data, tmp, num_lines: int, vocab_size: int, seq_len: int):
    """The first `num_lines` of the enwiki sample in `tmp`: tmp/tokenizer (SentencePiece) and
    tmp/data (prepared instances of length `seq_len`). -> tmp"""
    lines = (shared_data / "enwiki_sample" / "enwiki_2015_sample.txt").read_text().splitlines()
    corpus = tmp / "enwiki_slice.txt"
    corpus.write_text("\n".join(lines[:num_lines]) + "\n")
    tok = tokenizer.train_sentencepiece([str(corpus)], tmp / "tokenizer", vocab_size=vocab_size, lowercase=True)
    tok.save(tmp / "tokenizer")
    prepare.prepare(DataSource.text(corpus), tmp / "tokenizer", tmp / "data", max_seq_length=seq_len, eval_fraction=0.05,
                    seed=1, workers=1, progress=False)
    return tmp


def make_config(prepared, **overrides):
    c = config_utils.load_config_file(str(ROOT / "configs" / "bert_tiny.py"))
    c.model.dtype = "float32"
    c.model.max_position_embeddings = 64
    c.data.source = "prepared"
    c.data.train_path = str(prepared / "data")
    c.data.tokenizer = str(prepared / "tokenizer")
    c.data.max_seq_length = 64
    c.data.max_predictions_per_seq = 10
    c.train.global_batch_size = 16
    c.train.steps = STEPS
    c.train.log_every = 1
    c.train.eval_every = 10_000
    c.train.eval_steps = 0  # no evaluation unless a test asks
    c.train.checkpoint_every = 10_000
    c.train.progress_bar = False
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 5
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        c[section][key] = value
    return c


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    """An uninterrupted run of STEPS steps, with asynchronous checkpoints along the way."""
    workdir = tmp_path_factory.mktemp("reference")
    pretraining.run(make_config(prepared, train__checkpoint_every=5, train__keep=10), workdir)
    return workdir


def _cli_args(c) -> list[str]:
    flat = {f"{s}.{k}": v for s, sec in c.items() for k, v in sec.items() if v is not None}
    return [f"--config.{k}={v}" for k, v in flat.items()]


def _params(workdir):
    return checkpoint.restore_params(workdir)[1]


def _train_losses(workdir):
    return {r["step"]: r["loss"] for r in metrics_writer.read_jsonl(workdir, "train")}


def test_mlm_loss_falls_on_real_text(prepared, tmp_path):
    c = make_config(prepared, train__steps=200, train__log_every=20, train__eval_every=100,
                    train__eval_steps=4, optimizer__warmup_steps=20)
    summary = pretraining.run(c, tmp_path)
    rows = metrics_writer.read_jsonl(tmp_path, "train")
    first, last = rows[0]["mlm_loss"], rows[-1]["mlm_loss"]
    assert first > np.log(VOCAB) - 0.5  # starts near uniform over the vocabulary
    # From near-uniform (ln 1000 = 6.9) to the frequency level and below within 200 steps.
    assert last < first - 0.8, (first, last)
    evals = metrics_writer.read_jsonl(tmp_path, "eval")
    assert [r["step"] for r in evals] == [100, 200]
    assert evals[-1]["mlm_loss"] < evals[0]["mlm_loss"] < np.log(VOCAB) - 1.2
    assert rows[-1]["sequences_per_second"] > 0 and 0 < rows[-1]["mfu"] < 1
    assert summary["step"] == 200 and not summary["preempted"]
    assert (tmp_path / metrics_writer.TENSORBOARD_DIR).is_dir()
    assert checkpoint.Checkpointer(tmp_path, read_only=True).all_steps() == [200]


def test_sigterm_checkpoint_then_exact_resume_on_another_mesh(prepared, reference, tmp_path):
    """A run on 4 devices gets SIGTERM, saves at that step and exits 0; resumed on 8
    devices it ends where an uninterrupted run ends: same losses, same params."""
    config = make_config(prepared)
    interrupted = tmp_path / "interrupted"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(
        [sys.executable, "-m", "bert_jax.pretrain", f"--config={ROOT / 'configs' / 'bert_tiny.py'}",
         f"--workdir={interrupted}", *_cli_args(config)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not _train_losses(interrupted) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output[-3000:]
    saved_step = checkpoint.Checkpointer(interrupted, read_only=True).latest_step()
    assert 1 <= saved_step < STEPS, output[-3000:]
    assert f"preempted: checkpoint at step {saved_step}" in output
    assert max(_train_losses(interrupted)) == saved_step  # the step it had reached

    summary = pretraining.run(config, interrupted)
    assert summary["start_step"] == saved_step and summary["step"] == STEPS

    resumed_losses, reference_losses = _train_losses(interrupted), _train_losses(reference)
    assert sorted(resumed_losses) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([resumed_losses[s] for s in range(1, STEPS + 1)],
                               [reference_losses[s] for s in range(1, STEPS + 1)], rtol=2e-5)
    for a, b in zip(jax.tree.leaves(_params(interrupted)), jax.tree.leaves(_params(reference)), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_resume_is_bitwise_on_the_same_mesh(prepared, reference, tmp_path):
    """N steps, then N more from the checkpoint == 2N steps (schedule over 2N both times)."""
    half = make_config(prepared, train__steps=STEPS // 2, optimizer__total_steps=STEPS)
    pretraining.run(half, tmp_path)
    summary = pretraining.run(make_config(prepared, train__keep=10), tmp_path)
    assert summary["start_step"] == STEPS // 2
    assert _train_losses(tmp_path) == _train_losses(reference)
    # The reference's async checkpoint at N (its state donated to the next step while
    # saving) holds what the half run saved at its end.
    for a, b in zip(jax.tree.leaves(_params(tmp_path / checkpoint.CHECKPOINTS_DIR / str(STEPS // 2))),
                    jax.tree.leaves(_params(reference / checkpoint.CHECKPOINTS_DIR / str(STEPS // 2))), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(_params(tmp_path)), jax.tree.leaves(_params(reference)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_other_model_in_workdir_is_an_error_and_leaves_it_untouched(prepared, reference):
    files = lambda: {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()}  # noqa: E731
    before = files()
    with pytest.raises(checkpoint.CheckpointMismatchError, match="hidden_size: checkpoint 128 vs this run 256"):
        pretraining.run(make_config(prepared, model__preset="mini", train__steps=STEPS + 5), reference)
    assert files() == before


def _loop(train_metrics, *, max_nonfinite_steps=3, total_steps=10):
    """train_loop with stand-in steps: metrics for step i are train_metrics(i)."""
    settings = loop.LoopSettings(total_steps=total_steps, log_every=5, eval_every=100,
                                 checkpoint_every=100, max_nonfinite_steps=max_nonfinite_steps,
                                 global_batch_size=1, flops_per_step=1.0, peak_flops_total=1.0)
    saved = []
    preemption = loop.PreemptionWatcher()
    try:
        return loop.train_loop(
            state=0, start_step=0, settings=settings,
            train_step=lambda state, batch: (state + 1, train_metrics(state + 1)),
            evaluate=None, train_batches=iter(range(100)),
            to_global=lambda b: b, save=lambda step, state, **kw: saved.append(step),
            writer=metrics_writer.MetricsWriter(None, enabled=False), preemption=preemption), saved
    finally:
        preemption.close()


def test_repeated_nonfinite_steps_stop_with_a_clear_message():
    bad_from_step_4 = lambda step: {"loss": np.float32("nan") if step >= 4 else np.float32(1.0),  # noqa: E731
                                    "update_skipped": np.int32(step >= 4)}
    with pytest.raises(loop.NonFiniteError, match="3 consecutive steps.*last at step 6"):
        _loop(bad_from_step_4)
    # Isolated skipped steps are counted, not fatal.
    every_third = lambda step: {"loss": np.float32(1.0), "update_skipped": np.int32(step % 3 == 0)}  # noqa: E731
    (state, summary), saved = _loop(every_third)
    assert summary["step"] == 10 and saved == [10]


def test_phase2_init_from_phase1(prepared, reference, tmp_path):
    """Phase 2 starts from phase 1's params (and tokenizer) with a fresh step count."""
    c = make_config(prepared, train__steps=2, optimizer__total_steps=STEPS, train__init_from=str(reference))
    c.data.tokenizer = ""  # taken from phase 1's workdir
    summary = pretraining.run(c, tmp_path)
    assert summary["start_step"] == 0 and summary["step"] == 2
    phase1, phase2 = _params(reference), _params(tmp_path)
    # One small update (the first step's warmup learning rate is 0) from phase 1's params.
    diffs = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(phase1), jax.tree.leaves(phase2), strict=True)]
    assert 0 < max(diffs) < 0.01
    assert checkpoint.tokenizer_fingerprint(reference / "tokenizer") == \
        checkpoint.tokenizer_fingerprint(tmp_path / "tokenizer")


def _checkpoint_hashes(directory):
    """{'<step>/<file>': sha256} of the committed steps in `directory` (not unfinished saves)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in directory.rglob("*") if p.is_file() and p.relative_to(directory).parts[0].isdigit()}


def test_bit_flipped_latest_checkpoint_resumes_from_the_previous_one(prepared, reference, tmp_path, capsys):
    """The reference's step-20 checkpoint with a flipped bit: the restart reports it, sets it
    aside unchanged, resumes at 15 and ends with the reference's params, bitwise."""
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    checkpoints, damaged = workdir / checkpoint.CHECKPOINTS_DIR, workdir / checkpoint.DAMAGED_DIR
    array_file = max((checkpoints / str(STEPS) / checkpoint.STATE).rglob("d/*"), key=lambda p: p.stat().st_size)
    data = bytearray(array_file.read_bytes())
    data[len(data) // 2] ^= 0x04
    array_file.write_bytes(bytes(data))
    before = _checkpoint_hashes(checkpoints)
    summary = pretraining.run(make_config(prepared, train__checkpoint_every=5, train__keep=10), workdir)
    assert summary["start_step"] == STEPS - 5 and summary["step"] == STEPS
    out = capsys.readouterr().out
    assert f"checkpoint at step {STEPS} is damaged" in out and "checksum differs" in out
    after = _checkpoint_hashes(checkpoints)
    old = lambda hashes: {k: v for k, v in hashes.items() if not k.startswith(f"{STEPS}/")}  # noqa: E731
    assert old(after) == old(before)  # 5, 10, 15 untouched
    assert _checkpoint_hashes(damaged) == {k: v for k, v in before.items() if k not in old(before)}  # kept as it was
    for a, b in zip(jax.tree.leaves(_params(workdir)), jax.tree.leaves(_params(reference)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _train_losses(workdir) == _train_losses(reference)  # the redone steps 16..20 once each


def test_nan_batches_roll_back_to_the_last_checkpoint(prepared, tmp_path, monkeypatch, capsys):
    """The 12th to 14th batches give NaN (an injected bad data window): after 3 of them
    (max_nonfinite_steps) the run restores step 10, goes on with the 15th batch and finishes."""
    build = pretraining.train_step_lib.build_pretraining_step

    def build_with_bad_batches(*args, **kw):
        program = build(*args, **kw)
        calls = iter(range(1, 10_000))

        def poisoned(state, batch, key):
            new_state, metrics = program.train_step(state, batch, key)
            if 12 <= next(calls) <= 14:
                metrics = {**metrics, "loss": np.float32("nan"), "update_skipped": np.int32(1)}
            return new_state, metrics
        return dataclasses.replace(program, train_step=poisoned)
    monkeypatch.setattr(pretraining.train_step_lib, "build_pretraining_step", build_with_bad_batches)
    summary = pretraining.run(make_config(prepared, train__checkpoint_every=10, train__max_nonfinite_steps=3,
                                       train__max_rollbacks=1), tmp_path)
    saved = _checkpoint_hashes(tmp_path / checkpoint.CHECKPOINTS_DIR)
    assert summary["rollbacks"] == 1 and summary["step"] == STEPS
    assert "rollback 1/1 to the checkpoint at step 10" in capsys.readouterr().out
    rows = metrics_writer.read_jsonl(tmp_path, "train")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # the diverged steps' lines superseded
    assert rows[-1]["rollbacks"] == 1
    assert pretrain.ending(summary) == f"finished after 1 rollback(s): checkpoint at step {STEPS} in {tmp_path}"
    assert sorted({int(k.split("/")[0]) for k in saved}) == [10, STEPS]  # the one rolled back to is kept


def test_phase2_init_optimizer_keeps_adams_count_and_restarts_the_schedule(prepared, reference):
    import optax
    from bert_jax import sharding
    from bert_jax import train_step as train_step_lib
    c = make_config(prepared, train__init_from=str(reference), train__init_optimizer=True)
    model_config = train_step_lib.pretraining_model_config(c, VOCAB)
    program = train_step_lib.build_pretraining_step(c, model_config, sharding.make_mesh(c.mesh))
    opt_state = pretraining._init_from_opt_state(str(reference), program.create_state(), program.state_shardings)
    counted = (optax.ScaleByAdamState, optax.ScaleByScheduleState)
    counts = {type(s).__name__: int(s.count)
              for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, counted)) if isinstance(s, counted)}
    assert counts == {"ScaleByAdamState": STEPS, "ScaleByScheduleState": 0}


def test_packed_run_resumes_bitwise_and_reports_its_fill(prepared, reference, tmp_path):
    """data.packing=True: 4 steps then 4 more from the checkpoint == 8 steps; the summary
    reports real tokens/s and the fill of the rows (as the padded run does)."""
    packed = dict(data__packing=True, data__max_predictions_per_seq=12, optimizer__total_steps=8)
    whole = pretraining.run(make_config(prepared, train__steps=8, **packed), tmp_path / "whole")
    pretraining.run(make_config(prepared, train__steps=4, **packed), tmp_path / "half")
    resumed = pretraining.run(make_config(prepared, train__steps=8, **packed), tmp_path / "half")
    assert resumed["start_step"] == 4 and _train_losses(tmp_path / "half") == _train_losses(tmp_path / "whole")
    for a, b in zip(jax.tree.leaves(_params(tmp_path / "half")), jax.tree.leaves(_params(tmp_path / "whole")),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    logged = whole["train"]  # the last log window: instances per step, the rows' fill, real tokens/s
    assert logged["sequences"] >= 16 and 0.9 < logged["packing_efficiency"] <= 1
    assert logged["tokens_per_second"] == pytest.approx(logged["tokens"] * logged["steps_per_second"])
    assert 0.5 < metrics_writer.read_jsonl(reference, "train")[-1]["packing_efficiency"] <= 1  # padded: reported too
