"""Command lines: absl flags defined per call (main can run many times in one process),
argparse's conventions for errors (one line, exit status 2) and --help (exit 0)."""
import pytest
from absl import flags

from bert_jax import cli, demo
from bert_jax.data import demo_corpus, tfds_corpus


def _define(fv):
    flags.DEFINE_string("output", None, "where", flag_values=fv)
    flags.DEFINE_integer("steps", 3, "how many", flag_values=fv)
    flags.DEFINE_boolean("overwrite", False, "replace", flag_values=fv)
    flags.mark_flag_as_required("output", flag_values=fv)


def test_flags_are_fresh_on_every_call():
    first = cli.parse(["--output", "a", "--steps=5", "--overwrite"], _define, prog="p")
    second = cli.parse(["--output=b"], _define, prog="p")  # no DuplicateFlagError, no state carried over
    assert (first.output, first.steps, first.overwrite) == ("a", 5, True)
    assert (second.output, second.steps, second.overwrite) == ("b", 3, False)
    assert "output" not in flags.FLAGS


def test_positional_arguments_in_order():
    fv, positional = cli.parse_with_positional(["x", "--output", "o", "y"], _define, prog="p")
    assert fv.output == "o" and positional == ["x", "y"]


@pytest.mark.parametrize("argv, message", [
    ([], "p: error: flag --output=None: Flag --output must have a value other than None."),
    (["--output", "o", "--stpes=2"], "p: error: Unknown command line flag 'stpes'. Did you mean: steps ?"),
    (["--output", "o", "--steps=many"], "p: error: flag --steps=many: invalid literal for int()"),
    (["--output", "o", "extra"], "p: error: unexpected arguments ['extra']"),
])
def test_usage_errors_print_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse(argv, _define, prog="p")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_help_lists_the_flags_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse(["--help"], _define, prog="p", doc="What p does.")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: p [flags]\n\nWhat p does.") and "--output: where" in out


@pytest.mark.parametrize("main, argv, message", [
    (tfds_corpus.main, ["--prepared", "d"], "python -m bert_jax.data.tfds_corpus: error: flag --data_dir=None"),
    (demo_corpus.main, ["demo.txt"], "python -m bert_jax.data.demo_corpus: error: unexpected arguments"),
    (demo.main, ["--pretrain_step=3"], "python -m bert_jax.demo: error: Unknown command line flag 'pretrain_step'"),
])
def test_entrypoints_reject_bad_flags_before_any_work(main, argv, message, capsys):
    for _ in range(2):  # twice in one process: flags are defined per call
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and capsys.readouterr().err.startswith(message)


def test_several_errors_stay_on_one_line(capsys):
    with pytest.raises(SystemExit):
        tfds_corpus.main([])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--prepared" in err and "--data_dir" in err and "--name" in err


def test_without_prog_errors_start_with_error(capsys):
    with pytest.raises(SystemExit):
        cli.parse(["--bogus"], _define, "Doc.")
    assert capsys.readouterr().err.startswith("error: Unknown command line flag 'bogus'")
