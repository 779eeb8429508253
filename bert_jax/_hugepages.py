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

Huge pages make each fault cheaper, but the kernel still zeroes every page of the step's
temporaries again each step (one mapping of about 500 MB a step fine-tuning MiniLM on MRPC-like
batches: `clear_page_erms` was 7% of the process's CPU samples, `perf record`). So, when XLA runs
on the CPU (no accelerator device node, or `JAX_PLATFORMS=cpu`), the entry points also keep that
memory for the next step: `glibc.malloc.arena_max=1` (worker threads' arenas map large blocks
whatever `mmap_max` says), `glibc.malloc.mmap_max=0` (large blocks from the heap) and
`glibc.malloc.trim_threshold=1 TiB` (freed heap memory is not handed back): 0 minor faults a
step, sys time 0.05 against 0.9 s per 8 MRPC steps, and 5-8% more examples/s (README,
"Fine-tuning"). The cost is a higher peak RSS (3.2 against 2.0 GB fine-tuning MiniLM on RTE-like
batches: freed blocks stay resident for reuse, as in a caching allocator). `BERT_JAX_MALLOC_REUSE=0`
turns it off; a `GLIBC_TUNABLES` that sets any of those three keys is left as it is. On a GPU or
TPU host the step's buffers live on the device, and one malloc arena could slow the input
pipeline's threads, so it stays off there.

    python -m bert_jax.hugepages    # prints what an entry point gets, and why
"""
from __future__ import annotations

import glob
import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "BERT_JAX_HUGE_PAGES"
ENTRY_POINTS = frozenset({"pretrain", "finetune", "predict", "demo", "encode", "hugepages"})
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
REUSE_TUNABLES = {"glibc.malloc.arena_max": "1", "glibc.malloc.mmap_max": "0",
                  "glibc.malloc.trim_threshold": str(2**40)}
REUSE_OPT_OUT = "BERT_JAX_MALLOC_REUSE"
ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


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


def _set_keys(environ) -> set[str]:
    return {item.split("=")[0] for item in environ.get("GLIBC_TUNABLES", "").split(":") if item}


def on_accelerator(environ, nodes=ACCELERATOR_NODES) -> bool:
    """Whether XLA will run on an accelerator: `JAX_PLATFORMS`'s first platform when it is set,
    else whether a GPU or TPU device node exists."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() != "cpu"
    return any(glob.glob(pattern) for pattern in nodes)


def reuse_decision(environ, glibc: tuple[int, int] | None, accelerator: bool) -> tuple[bool, str]:
    """(whether to add REUSE_TUNABLES, why) for this environment, glibc version and platform."""
    if _set_keys(environ) & set(REUSE_TUNABLES):
        return False, "GLIBC_TUNABLES already sets malloc's arena, mmap or trim limits"
    if environ.get(REUSE_OPT_OUT) == "0":
        return False, f"{REUSE_OPT_OUT}=0"
    if glibc is None or glibc < (2, 26):
        return False, "needs glibc 2.26 or later" + (f" (this is {glibc[0]}.{glibc[1]})" if glibc else "")
    if accelerator:
        return False, "an accelerator holds the step's buffers"
    return True, ":".join(f"{k}={v}" for k, v in REUSE_TUNABLES.items())


def environment(environ=None) -> dict | None:
    """`environ` (default os.environ) with the tunables added, or None when none should be."""
    environ = dict(os.environ if environ is None else environ)
    glibc = glibc_version()
    added = []
    if decision(environ, glibc, thp_mode())[0]:
        added.append(f"{TUNABLE}=1")
    if reuse_decision(environ, glibc, on_accelerator(environ))[0]:
        added += [f"{k}={v}" for k, v in REUSE_TUNABLES.items()]
    if not added:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    environ["GLIBC_TUNABLES"] = ":".join(([tunables] if tunables else []) + added)
    return environ


# What reuse costs, for the start-up line: freed blocks stay resident (fine-tuning MiniLM on
# RTE-like batches peaked at 3.2 GB against 2.0; BERT-base on MRPC-like buckets 9.3 against 6.2).
REUSE_COST = f"peak memory about 1.5x: {REUSE_OPT_OUT}=0 returns it"


def status(environ=None) -> str:
    """One line for start-up logs: whether this process runs with huge pages for malloc and
    keeps the step's memory for the next step, and why."""
    environ = os.environ if environ is None else environ
    tunables = environ.get("GLIBC_TUNABLES", "")
    items = tunables.split(":")
    huge = f"{TUNABLE}=1" in items or f"{TUNABLE}=2" in items
    reuse = all(f"{k}={v}" in items for k, v in REUSE_TUNABLES.items())
    if huge and reuse:
        return (f"malloc huge pages on, freed memory kept for reuse (GLIBC_TUNABLES={tunables}; "
                f"{REUSE_COST})")
    parts = []
    if huge:
        parts.append(f"malloc huge pages on (GLIBC_TUNABLES={tunables})")
    else:
        add, why = decision(environ, glibc_version(), thp_mode())
        if add:  # not started through an entry point
            why = f"set GLIBC_TUNABLES={TUNABLE}=1 before Python starts, as the bert_jax entry points do"
        parts.append(f"malloc huge pages off ({why})")
    if not reuse:
        add, why = reuse_decision(environ, glibc_version(), on_accelerator(environ))
        if add:
            why = f"set GLIBC_TUNABLES={why} before Python starts, as the bert_jax entry points do"
        parts.append(f"freed memory returned to the system ({why})")
    else:
        parts.append(f"freed memory kept for reuse ({REUSE_COST})")
    return "; ".join(parts)


def reexec_entry_point(execve=os.execve) -> None:
    """Called when the package is first imported: re-executes `python [options] -m
    bert_jax.ENTRY ...` once with the tunables set. A no-op for any other program."""
    argv = getattr(sys, "orig_argv", None)
    if sys.argv[:1] != ["-m"] or not argv or "-m" not in argv:  # runpy sets argv[0] to "-m" while it imports
        return
    module = argv[argv.index("-m") + 1] if argv.index("-m") + 1 < len(argv) else ""
    if not module.startswith("bert_jax.") or module[len("bert_jax."):] not in ENTRY_POINTS:
        return
    reexec(execve)


def reexec(execve=os.execve) -> None:
    """Re-executes this process's command line once with the tunables set (when they apply):
    for scripts that run bert_jax steps as the entry points do (benchmarks/)."""
    env = environment()
    if env is not None and getattr(sys, "orig_argv", None):
        sys.stdout.flush()
        sys.stderr.flush()
        execve(sys.executable, sys.orig_argv, env)
