"""Command lines: absl flags, defined per call in a fresh `flags.FlagValues`.

Each entrypoint's `main(argv)` calls `parse(argv, define_flags, __doc__, prog=...)`: nothing
is defined at import time and nothing in absl's global `FLAGS` is touched, so tests (and
programs) can call any number of `main`s in one process. `argv` excludes the program name (`sys.argv[1:]`).
Errors behave as argparse's did: a bad or missing flag prints one line and exits with status 2;
`--help` prints the flags and exits 0.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import flags

HELP = ("--help", "-h", "-help", "-?", "--helpshort", "--helpfull")
USAGE_ERROR = 2  # exit status of a bad command line (as argparse's)


def parse(argv: Sequence[str] | None, define: Callable[[flags.FlagValues], None], doc: str = "", *,
          prog: str = "") -> flags.FlagValues:
    """-> a FlagValues holding the flags `define(fv)` declared, parsed from `argv` (None:
    sys.argv[1:]); positional arguments are a usage error. `doc` is printed by --help, `prog`
    (e.g. "python -m bert_jax.demo") starts usage and error lines."""
    fv, positional = parse_with_positional(argv, define, doc, prog=prog)
    if positional:
        usage_error(prog, f"unexpected arguments {positional}")
    return fv


def parse_with_positional(argv: Sequence[str] | None, define: Callable[[flags.FlagValues], None], doc: str = "",
                          *, prog: str = "") -> tuple[flags.FlagValues, list[str]]:
    """As `parse`, and -> (FlagValues, the positional arguments in order)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    fv = flags.FlagValues()
    define(fv)
    if any(a in HELP for a in argv[:argv.index("--") if "--" in argv else len(argv)]):
        usage = f"usage: {prog} [flags]\n\n" if prog else ""
        print(f"{usage}{doc.strip()}\n\nflags:\n{fv.get_help(include_special_flags=False)}".strip())
        raise SystemExit(0)
    try:
        positional = fv([prog or sys.argv[0], *argv])[1:]
    except flags.Error as e:
        usage_error(prog, str(e))  # raises SystemExit
    return fv, positional


def usage_error(prog: str, message: str):
    """Print `prog: error: message` on one line (the argparse convention) and exit with status 2."""
    message = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"{prog + ': ' if prog else ''}error: {message} (--help lists the flags)", file=sys.stderr)
    raise SystemExit(USAGE_ERROR)
