"""Command lines: absl flags, defined per call in a fresh `flags.FlagValues`.

Each entrypoint's `main(argv)` calls `parse(argv, define_flags, __doc__, prog=...)`: nothing
is defined at import time and nothing in absl's global `FLAGS` is touched, so tests (and
programs) can call any number of `main`s in one process. `argv` excludes the program name (`sys.argv[1:]`).
Errors behave as argparse's did: a bad or missing flag prints one line and exits with status 2;
`--help` prints the flags and exits 0.

Every `main` is wrapped in `@cli.entrypoint`: a user error (bad config, data, weights or
checkpoint: see `is_user_error`) prints `error: <message>` on one line and `main` returns 2
(1 for a run that failed, e.g. diverged), without a traceback; `--verbose` (every
entrypoint has it) or BERT_JAX_TRACEBACK=1 re-raises it with its traceback. Any other
exception is a bug and keeps its traceback, unless another process of a jax.distributed job
died (then one line names it: `distributed.exit_if_peer_lost`). The wrapper also stops JAX from probing for a
TPU on a host without one (`skip_absent_tpu`).
"""
from __future__ import annotations

import errno
import functools
import glob
import importlib.metadata
import os
import pathlib
import re
import sys
import sysconfig
import traceback
from collections.abc import Callable, Sequence

from absl import flags
from ml_collections import config_flags

HELP = ("--help", "-h", "-help", "-?", "--helpshort", "--helpfull")
USAGE_ERROR = 2  # exit status of a bad command line (as argparse's), and of bad input
RUN_FAILED = 1  # exit status of a run stopped by one of our errors that is not about input
TRACEBACK_ENV = "BERT_JAX_TRACEBACK"
_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
_STDLIB = (sysconfig.get_paths()["stdlib"], "<frozen ")
# OS errors about the user's files or machine rather than our code.
_USER_ERRNOS = {errno.ENOENT, errno.EEXIST, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS,
                errno.EDQUOT, errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY}


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
    flags.DEFINE_boolean("verbose", False, f"on an error, also print its Python traceback ({TRACEBACK_ENV}=1 "
                         "does the same)", flag_values=fv)
    if any(a in HELP for a in argv[:argv.index("--") if "--" in argv else len(argv)]):
        usage = f"usage: {prog} [flags]\n\n" if prog else ""
        print(f"{usage}{doc.strip()}\n\nflags:\n{fv.get_help(include_special_flags=False)}".strip())
        raise SystemExit(0)
    try:
        positional = fv([prog or sys.argv[0], *argv])[1:]
    except flags.Error as e:
        usage_error(prog, str(e))  # raises SystemExit
    return fv, positional


def parse_config(argv: Sequence[str] | None, define: Callable[[flags.FlagValues], None], doc: str = "", *,
                 prog: str, config_help: str) -> flags.FlagValues:
    """As `parse`, plus `--config FILE.py[:arg]` (an ml_collections config file, locked) and
    its overrides `--config.KEY=value`; a key that does not exist or a file that cannot be
    loaded is a usage error. -> FlagValues; `.config` is the ConfigDict."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def define_all(fv: flags.FlagValues) -> None:
        # sys_argv: the config file is read while its override flags (--config.KEY=...) are defined.
        config_flags.DEFINE_config_file("config", None, config_help, flag_values=fv, lock_config=True,
                                        sys_argv=[prog, *argv])
        define(fv)
        flags.mark_flag_as_required("config", flag_values=fv)

    try:
        fv = parse(argv, define_all, doc, prog=prog)
        fv.config.to_dict()  # config_flags defers the error of a file it could not load to here
    except (AttributeError, KeyError, OSError) as e:  # --config.KEY=... naming no key; no such file
        while isinstance(e, BaseException) and e.args:
            e = e.args[0]
        usage_error(prog, f"--config: {e}")
    return fv


def usage_error(prog: str, message: str):
    """Print `prog: error: message` on one line (the argparse convention) and exit with status 2."""
    message = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"{prog + ': ' if prog else ''}error: {message} (--help lists the flags)", file=sys.stderr)
    raise SystemExit(USAGE_ERROR)


def entrypoint(main: Callable[..., int | None]) -> Callable[..., int]:
    """Decorates an entrypoint's `main(argv=None)`: -> its exit status (None counts as 0), or
    2 (1 for a failed run) after printing `error: <message>` for a user error."""
    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        skip_absent_tpu()
        try:
            return main(argv) or 0
        except Exception as e:  # noqa: BLE001 (re-raised unless it is a user error)
            if "jax" in sys.modules:  # another process of a jax.distributed job died: one line, exit
                from bert_jax import distributed  # noqa: PLC0415 (JAX only where it is used)
                distributed.exit_if_peer_lost(e)
            args = sys.argv[1:] if argv is None else argv
            if not is_user_error(e) or traceback_requested(args):
                raise
            message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
            print(f"error: {message or type(e).__name__}", file=sys.stderr, flush=True)
            return USAGE_ERROR if isinstance(e, (ValueError, OSError)) else RUN_FAILED
    return wrapped


def is_user_error(e: BaseException) -> bool:
    """An error whose message is meant for the user: one of our own error classes; a
    ValueError (or FileNotFoundError, FileExistsError, ...) raised by bert_jax's own checks;
    an OS error about a file or the disk (missing, exists, no permission, disk full).
    A ValueError raised inside a library is a bug (or an unchecked input) and keeps its traceback."""
    if type(e).__module__.split(".")[0] == "bert_jax":
        return True
    if isinstance(e, OSError) and (e.errno in _USER_ERRNOS or e.filename is not None):
        return True
    return isinstance(e, (ValueError, OSError)) and _raised_by_bert_jax(e)


def _raised_by_bert_jax(e: BaseException) -> bool:
    """Whether the innermost frame of `e`'s traceback outside the standard library (pathlib,
    multiprocessing, ...) is in the bert_jax package; for an error a multiprocessing worker
    raised, the worker's traceback counts."""
    files = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(e.__traceback__)]
    if type(e.__cause__).__name__ == "RemoteTraceback":  # multiprocessing.pool: the worker's traceback as text
        files = re.findall(r'File "([^"]+)"', str(e.__cause__))
    ours = [pathlib.Path(f).resolve() for f in files if not f.startswith(_STDLIB) or "-packages" in f]
    return bool(ours) and ours[-1].is_relative_to(_PACKAGE_DIR)


def traceback_requested(argv: Sequence[str]) -> bool:
    if os.environ.get(TRACEBACK_ENV, "").lower() in ("1", "true", "yes"):
        return True
    return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in argv)


def skip_absent_tpu() -> None:
    """With libtpu installed JAX probes for a TPU on every host, and on one without a TPU
    libtpu prints a TPU_WORKER_HOSTNAMES error block. Where no TPU device file exists and
    JAX_PLATFORMS is unset, set it to the other platforms installed (GPU plugins, cpu), for
    this process and the ones it starts. A TPU host (/dev/accel*, /dev/vfio) is left alone."""
    if os.environ.get("JAX_PLATFORMS") or glob.glob("/dev/accel*") or os.path.exists("/dev/vfio"):
        return
    platforms = ",".join([*_gpu_plugin_platforms(), "cpu"])
    os.environ["JAX_PLATFORMS"] = platforms
    if "jax" in sys.modules:  # imported but backends not initialised yet: the config still applies
        import jax  # noqa: PLC0415
        from jax._src import xla_bridge  # noqa: PLC0415 (no public API says whether backends exist)
        if not xla_bridge.backends_are_initialized():
            jax.config.update("jax_platforms", platforms)


def _gpu_plugin_platforms() -> list[str]:
    """JAX's GPU PJRT plugins installed (entry points `jax_plugins`: xla_cuda12, xla_rocm7, ...);
    JAX skips cuda without an NVIDIA device, rocm only where an AMD one exists (/dev/kfd)."""
    names = " ".join(ep.name for ep in importlib.metadata.entry_points(group="jax_plugins"))
    return [p for p in ("cuda", "rocm") if p in names and (p == "cuda" or os.path.exists("/dev/kfd"))]
