"""One clean line for a user error: every entrypoint prints `error: <message>` and exits 2
(no traceback unless --verbose / BERT_JAX_TRACEBACK=1); bad config values are refused before
any work; no libtpu probe on a host without a TPU. Rows of docs/reliability.md."""
import errno
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from bert_jax import aot, cli, config_utils, convert, encode, finetune, predict, pretrain, tokenizer
from bert_jax.data import prepare

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "bert_tiny.py")
GLUE = str(ROOT / "configs" / "glue.py")


def _one_error_line(capsys, *fragments):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


PRETRAINING_CASES = [
    ("optimizer.learning_rate=nan", "config.optimizer.learning_rate: must be a finite number"),
    ("optimizer.learning_rate=inf", "config.optimizer.learning_rate: must be a finite number"),
    ("optimizer.learning_rate=-1e-4", "config.optimizer.learning_rate: must be > 0"),
    ("train.eval_every=0", "config.train.eval_every: must be >= 1 when train.eval_steps=50"),
    ("train.eval_steps=-1", "config.train.eval_steps: must be >= 0"),
    ("data.masked_lm_prob=1.5", "config.data.masked_lm_prob: must be in (0, 1)"),
    ("optimizer.b2=1.0", "config.optimizer.b2: must be in [0, 1)"),
    ("optimizer.eps=0.0", "config.optimizer.eps: must be > 0"),
    ("distributed.heartbeat_timeout_seconds=0", "config.distributed.heartbeat_timeout_seconds: must be >= 1"),
    ("optimizer.warmup_steps=-5", "config.optimizer.warmup_steps: must be >= 0"),
    ("optimizer.clip_norm=-1.0", "config.optimizer.clip_norm: must be >= 0"),
    ("train.init_optimizer=True", "config.train.init_optimizer: needs train.init_from"),
    ("model.hidden_dropout_prob=1.0", "config.model.hidden_dropout_prob: must be in [0, 1)"),
    ("data.tokenizer_model_type=wordpiece", "config.data.tokenizer_model_type: must be unigram or bpe"),
    ("data.max_unk_fraction=1.5", "config.data.max_unk_fraction: must be in [0, 1]"),
    ("train.objective=nsp", "config.train.objective: must be one of ('mlm_nsp', 'mlm') (got 'nsp')"),
    ("data.max_predictions_per_seq=10", "config.data.max_predictions_per_seq: must be >= 19, what "
     "data.masked_lm_prob=0.15 masks in a row of data.max_seq_length=128"),
]


@pytest.mark.parametrize("override, message", PRETRAINING_CASES, ids=[o for o, _ in PRETRAINING_CASES])
def test_pretraining_config_values_are_refused_before_any_work(override, message, tmp_path, capsys):
    workdir = tmp_path / "w"
    args = [f"--config={TINY}", f"--workdir={workdir}", "--config.data.source=demo", f"--config.{override}"]
    assert pretrain.main(args) == 2
    _one_error_line(capsys, message)
    assert not workdir.exists()  # nothing prepared, compiled or written


FINETUNING_CASES = [
    ("learning_rates=(2e-5,1e999)", "config.learning_rates: must be a finite number"),
    ("num_epochs=inf", "config.num_epochs: must be a finite number"),
    ("weight_decay=-0.1", "config.weight_decay: must be >= 0"),
    ("dtype=float64", "config.dtype: must be one of"),
    ("smallest_bucket=512", "config.smallest_bucket: must be in [1, max_seq_length]"),
    ("max_examples_per_row=0", "config.max_examples_per_row: must be >= 1"),
    ("packed_row_length=256", "config.packed_row_length: must be 0 (auto) or in [1, max_seq_length]"),
]


@pytest.mark.parametrize("override, message", FINETUNING_CASES, ids=[o for o, _ in FINETUNING_CASES])
def test_finetuning_config_values_are_refused_before_any_work(override, message, tmp_path, capsys):
    workdir = tmp_path / "w"
    assert finetune.main([f"--config={GLUE}", f"--workdir={workdir}", f"--config.{override}"]) == 2
    _one_error_line(capsys, message)
    assert not workdir.exists()


@pytest.mark.parametrize("main, argv, message", [
    (convert.main, ["--src=/no/such/model", "--dst=/tmp/x.npz", "--dst_format=npz"], "/no/such/model"),
    (encode.main, ["--model=/no/such/model", "--text=hi"], "/no/such/model"),
    (prepare.main, ["--input=/no/such/corpus.txt", "--tokenizer=/no/such/vocab.txt", "--output=/tmp/o"], "/no/such/"),
    (tokenizer.main, ["show", "/no/such/tokenizer"], "/no/such/tokenizer"),
    (aot.main, [f"--config={TINY}", "--topology=v9z:2x2"], "v9z"),
], ids=["convert", "encode", "prepare", "tokenizer", "aot"])
def test_entrypoints_report_bad_input_on_one_line(main, argv, message, capsys):
    assert main(argv) == 2
    _one_error_line(capsys, message)


def test_user_errors_and_bugs_are_told_apart():
    for raise_it, user in [(lambda: config_utils.finish(config_utils.finetune_config(), "phase3"), True),
                           (lambda: tokenizer.load_tokenizer("/no/such/vocab.txt"), True), (lambda: np.ones(3).reshape(2, 2), False), (lambda: {}["k"], False),
                           (lambda: pathlib.Path("/no/such/file").read_text(), True),
                           (lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")), True)]:
        with pytest.raises(Exception) as info:
            raise_it()
        assert cli.is_user_error(info.value) is user, info.value


def test_a_bug_keeps_its_traceback():
    @cli.entrypoint
    def main(argv=None):
        np.ones(3).reshape(2, 2)

    with pytest.raises(ValueError, match="reshape"):
        main([])


def _run(args, **env):
    environ = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", cli.TRACEBACK_ENV)}
    environ.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=environ, timeout=300)


def test_a_process_prints_one_line_without_a_tpu_probe(tmp_path):
    """JAX_PLATFORMS unset, libtpu installed, no TPU: no TPU_WORKER_HOSTNAMES block."""
    result = _run(["bert_jax.pretrain", f"--config={TINY}", f"--workdir={tmp_path / 'w'}",
                   "--config.optimizer.learning_rate=nan"])
    assert result.returncode == 2
    assert result.stderr.strip() == "error: config.optimizer.learning_rate: must be a finite number (got nan)"
    assert "TPU_WORKER_HOSTNAMES" not in result.stdout + result.stderr


def test_traceback_on_request(tmp_path):
    args = ["bert_jax.convert", "--src=/no/such/model", f"--dst={tmp_path / 'x.npz'}", "--dst_format=npz"]
    for result in (_run([*args, "--verbose"]), _run(args, **{cli.TRACEBACK_ENV: "1"})):
        assert result.returncode != 0 and "Traceback (most recent call last)" in result.stderr
        assert "/no/such/model" in result.stderr and "TPU_WORKER_HOSTNAMES" not in result.stderr


def test_corpus_workers_are_spawned_not_forked_after_jax_started():
    """prepare and the demo corpus start worker processes while JAX's threads run: spawn, no fork warning."""
    import warnings

    import jax

    from bert_jax.data import demo_corpus

    jax.devices()  # JAX's threads are running
    with warnings.catch_warnings(record=True) as caught:  # also the pool's own threads' warnings
        warnings.simplefilter("always")
        assert demo_corpus.documents(limit=16, workers=2, use_cache=False)
    assert not [w for w in caught if "fork" in str(w.message)]  # JAX: "os.fork() was called ... deadlock"


def test_prepare_unclosed_wikiextractor_doc_is_one_line(tmp_path, minilm, capsys):
    wiki = tmp_path / "wiki_00"
    wiki.write_text('<doc id="1" url="u" title="A">\nA\n\nText of A.\n</doc>\n<doc id="2" url="u" title="B">\nB\n\nCut.\n')
    vocab = pathlib.Path(minilm.__file__).parent / "model" / "vocab.txt"
    out = tmp_path / "out"
    assert prepare.main([f"--input={wiki}", f"--tokenizer={vocab}", f"--output={out}", "--workers=1"]) == 2
    err = capsys.readouterr().err  # after the progress bar: one error line, no traceback
    assert err.splitlines()[-1].startswith(f"error: {wiki}:6: <doc> not closed by </doc> at the end of the file")
    assert "Traceback" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["wiki_00"]


def test_prepare_with_a_vocabulary_that_misses_the_corpus_is_one_line(tmp_path, truncated_vocab, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog.\nIt was tired.\n\n"
                      "Pretraining needs a vocabulary that fits.\nOtherwise words become unknown.\n")
    args = [f"--input={corpus}", f"--tokenizer={truncated_vocab}", f"--output={tmp_path / 'out'}", "--workers=1"]
    assert prepare.main(args) == 2
    err = capsys.readouterr().err  # after the progress bar: one error line, no traceback
    assert "Traceback" not in err
    line = err.splitlines()[-1]
    assert line.startswith("error: ") and "tokens are [UNK] with the tokenizer" in line
    assert str(truncated_vocab) in line and "max_unk_fraction=0.05" in line and "--max_unk_fraction=1" in line
    assert not (tmp_path / "out").exists()
    assert prepare.main([*args, "--max_unk_fraction=1"]) == 0  # overridden: prepared, the share reported
    share = float(line.split("error: ")[1].split("%")[0])
    printed = float(capsys.readouterr().out.split("% [UNK]")[0].split("(")[-1])
    assert share > 50 and abs(printed - share) < 0.1


def test_predict_inputs_are_checked_before_the_model_loads(tmp_path, capsys):
    """Bad JSON lines name the file and line; a workdir of several tasks names them."""
    bad = tmp_path / "in.jsonl"
    cases = [('{"text": "fine"}\n{"text": "cut', f"{bad}:2: not JSON ("),
             ('{"text": "fine"}\n["a list"]', f'{bad}:2: expected a JSON object with a "text" string'),
             ('{"text": "a", "question": "q?"}\n{"text": "b"}', f'{bad}:2: no "question" field (the other lines have one)')]
    for content, message in cases:
        bad.write_text(content + "\n")
        assert predict.main(["--model=/no/such/model", f"--input={bad}"]) == 2
        _one_error_line(capsys, message)
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "results.json").write_text('{"tasks": {"rte": {"chosen": {"checkpoint": "a"}}, '
                                          '"mrpc": {"chosen": {"checkpoint": "b"}}}}')
    assert predict.main([f"--model={workdir}", "--text=x"]) == 2
    _one_error_line(capsys, f"{workdir}: a fine-tuning workdir with 2 saved task checkpoints (rte, mrpc); pass one")
    assert predict.main(["--model=/no/such/model", "--text=x"]) == 2
    _one_error_line(capsys, "/no/such/model: no such file or directory")
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--model=/no/such/model"])
    assert exit_info.value.code == 2 and "give exactly one of --text and --input" in capsys.readouterr().err
    from bert_jax.weights import ConversionError, hf
    with pytest.raises(ConversionError, match=r"^m/config.json: id2label has ids \[0, 1\], expected 0..2 for the 3 "
                                              r"outputs of the classifier head$"):
        hf.labels_from_hf({"id2label": {"0": "a", "1": "b"}}, {"classifier": {"bias": np.zeros(3)}}, "m/config.json")


def test_init_from_weights_of_another_vocabulary_or_size(minilm, truncated_vocab, tmp_path, capsys):
    """train.init_from (the MiniLM Hugging Face directory) with a tokenizer that is not the
    weights' own, or a model of other sizes: one line naming the file and the keys."""
    from bert_jax import pretraining
    from bert_jax import train_step as train_step_lib

    model_dir = pathlib.Path(minilm.__file__).parent / "model"
    args = [f"--config={TINY}", f"--workdir={tmp_path / 'w'}", "--config.data.source=demo",
            f"--config.train.init_from={model_dir}", f"--config.data.tokenizer={truncated_vocab}"]
    assert pretrain.main(args) == 2
    _one_error_line(capsys, f"config.data.tokenizer={truncated_vocab} is not the vocabulary of train.init_from's",
                    "30522 tokens vs 2000")
    c = config_utils.load_config_file(TINY)
    c.train.init_from = str(model_dir)
    with pytest.raises(ValueError) as error:
        pretraining.init_from_params(c, train_step_lib.pretraining_model_config(c, 30522), print)
    message = str(error.value)
    assert "\n" not in message and f"train.init_from={model_dir}/config.json" in message, message
    assert "model.hidden_size is 384 there, 128 here" in message
    assert "model.num_hidden_layers is 6 there, 2 here" in message
    c.model.pre_layer_norm = True  # released BERT weights are post-LN: another function, refused
    with pytest.raises(ValueError, match="model.pre_layer_norm is False there, True here"):
        pretraining.init_from_params(c, train_step_lib.pretraining_model_config(c, 30522), print)
