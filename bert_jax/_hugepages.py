"""Transparent huge pages for the large buffers XLA:CPU allocates every step.

XLA:CPU allocates a step's temporaries afresh each step. glibc serves an allocation above its
largest mmap threshold (32 MiB) with newly mapped pages, so every step faults them in again, 4
KiB at a time, each page zeroed by the kernel: fine-tuning MiniLM, about 47,000 minor faults a
step on CoLA-like batches and 126,000 on MRPC-like ones (the word-embedding gradient alone is
47 MB). glibc's tunable `glibc.malloc.hugetlb=1` (glibc 2.35 or later) makes malloc ask for
transparent huge pages (`madvise`) for those mappings: about 500 faults a step, and 12-25%
more examples/s (README, "Fine-tuning"). PyTorch's own caching allocator gains nothing from it.

glibc reads tunables when a process starts, so the entry points (`python -m bert_jax.pretrain`,
`finetune`, `predict`, `demo`, `encode`, `hugepages`) re-execute themselves once, before
anything is imported, with the tunable added to `GLIBC_TUNABLES`. Nothing happens when the
tunable is already set (any value), on glibc older than 2.35 or not Linux, when transparent
huge pages are `never`, or with `BERT_JAX_HUGE_PAGES=0`. Importing bert_jax as a library
never re-executes anything.

    python -m bert_jax.hugepages    # prints whether an entry point gets huge pages, and why
"""
from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "BERT_JAX_HUGE_PAGES"
ENTRY_POINTS = frozenset({"pretrain", "finetune", "predict", "demo", "encode", "hugepages"})
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except (AttributeError, OSError, ValueError):
        return None


def thp_mode(path: str = THP_SETTING) -> str | None:
    """'always' | 'madvise' | 'never' (the bracketed word of the kernel's setting), None if unknown."""
    try:
        text = open(path).read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def decision(environ, glibc: tuple[int, int] | None, thp: str | None) -> tuple[bool, str]:
    """(whether to add the tunable, why) for this environment, glibc version and THP mode."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if any(item.split("=")[0] == TUNABLE for item in tunables.split(":") if item):
        return False, f"GLIBC_TUNABLES already sets {TUNABLE}"
    if environ.get(OPT_OUT) == "0":
        return False, f"{OPT_OUT}=0"
    if glibc is None or glibc < (2, 35):
        return False, "needs glibc 2.35 or later" + (f" (this is {glibc[0]}.{glibc[1]})" if glibc else "")
    if thp not in ("always", "madvise"):
        return False, f"transparent huge pages are {thp or 'unavailable'} ({THP_SETTING})"
    return True, f"GLIBC_TUNABLES={TUNABLE}=1"


def environment(environ=None) -> dict | None:
    """`environ` (default os.environ) with the tunable added, or None when it should not be."""
    environ = dict(os.environ if environ is None else environ)
    add, _ = decision(environ, glibc_version(), thp_mode())
    if not add:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    environ["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
    return environ


def status(environ=None) -> str:
    """One line for start-up logs: whether this process runs with huge pages for malloc."""
    environ = os.environ if environ is None else environ
    tunables = environ.get("GLIBC_TUNABLES", "")
    if f"{TUNABLE}=1" in tunables.split(":") or f"{TUNABLE}=2" in tunables.split(":"):
        return f"malloc huge pages on (GLIBC_TUNABLES={tunables})"
    add, why = decision(environ, glibc_version(), thp_mode())
    if add:  # not started through an entry point
        why = f"set {why} before Python starts, as the bert_jax entry points do"
    return f"malloc huge pages off ({why})"


def reexec_entry_point(execve=os.execve) -> None:
    """Called when the package is first imported: re-executes `python [options] -m
    bert_jax.ENTRY ...` once with the tunable set. A no-op for any other program."""
    argv = getattr(sys, "orig_argv", None)
    if sys.argv[:1] != ["-m"] or not argv or "-m" not in argv:  # runpy sets argv[0] to "-m" while it imports
        return
    module = argv[argv.index("-m") + 1] if argv.index("-m") + 1 < len(argv) else ""
    if not module.startswith("bert_jax.") or module[len("bert_jax."):] not in ENTRY_POINTS:
        return
    reexec(execve)


def reexec(execve=os.execve) -> None:
    """Re-executes this process's command line once with the tunable set (when it applies):
    for scripts that run bert_jax steps as the entry points do (benchmarks/)."""
    env = environment()
    if env is not None and getattr(sys, "orig_argv", None):
        sys.stdout.flush()
        sys.stderr.flush()
        execve(sys.executable, sys.orig_argv, env)
