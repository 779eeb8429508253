"""A demo corpus that needs no download and vendors nobody's text.

The English documentation that ships inside the running Python: the docstrings of the
standard library's modules, classes and functions, and the language reference topics of
`pydoc_data.topics` (about 1.9 MB on Python 3.11). One module (all its docstrings) or topic is one document;
blocks that do not read as prose (code, tables, signatures) are dropped; paragraphs are split into sentences with
pysbd. The order is deterministic (sorted module and topic names), so the same Python gives
the same corpus.

    from bert_jax.data import demo_corpus
    docs = demo_corpus.documents()          # list of documents, each a list of sentences
    python -m bert_jax.data.demo_corpus --output demo.txt   # Google's one-sentence-per-line format

Modules are imported in a child process, so their import side effects (and the ~200
modules) stay out of the caller. Sentence splitting is the slow part (pysbd, ~50 kB/s a
core), so the result is cached under $BERT_JAX_CACHE (default ~/.cache/bert_jax), keyed by
the Python version and this module's CLEANING_VERSION.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import inspect
import json
import multiprocessing
import os
import pathlib
import re
import subprocess
import sys
import tempfile

from absl import flags

from bert_jax import cli
from bert_jax.data.sentences import split_sentences

CLEANING_VERSION = 2  # bump when the cleaning below changes: invalidates caches

# Modules whose import does something (prints, opens a browser, needs a display) or that
# are not documentation of this platform.
_SKIP_MODULES = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip",
    "venv", "test", "pydoc_data", "__main__", "__hello__", "__phello__", "msilib", "winreg",
    "winsound", "nt", "msvcrt", "xxsubtype", "xxlimited", "xxlimited_35",
})

# Runs in a child interpreter: writes {module: [docstring, ...]} as JSON to argv[2].
_GATHER = r"""
import contextlib, importlib, inspect, io, json, pkgutil, sys, warnings
skip = set(sys.argv[1].split(","))
def docs_of(module):
    out = [module.__doc__] if isinstance(module.__doc__, str) else []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isroutine(obj):
            if isinstance(obj.__doc__, str):
                out.append(obj.__doc__)
            if inspect.isclass(obj):
                for member_name, member in sorted(vars(obj).items()):
                    if not member_name.startswith("_") and inspect.isroutine(member) \
                            and isinstance(member.__doc__, str):
                        out.append(member.__doc__)
    return out
def load(name):
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return importlib.import_module(name)
    except BaseException:
        return None
names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in skip)
result = {}
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for name in names:
        module = load(name)
        if module is None:
            continue
        result[name] = docs_of(module)
        for info in sorted(pkgutil.iter_modules(getattr(module, "__path__", None) or []), key=lambda i: i.name):
            full = name + "." + info.name
            if info.name.startswith("_") or info.name in ("test", "tests", "__main__"):
                continue
            sub = load(full)
            if sub is not None:
                result[full] = docs_of(sub)
with open(sys.argv[2], "w", encoding="utf-8") as out:  # not stdout: C code may print there
    json.dump(result, out)
"""

def gather_raw() -> dict[str, str]:
    """{document name: raw text} for every stdlib module and pydoc topic, in a fixed order."""
    from pydoc_data.topics import topics

    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "docstrings.json")
        process = subprocess.run([sys.executable, "-c", _GATHER, ",".join(sorted(_SKIP_MODULES)), result_file],
                                 capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if process.returncode != 0:
            raise RuntimeError(f"gathering standard library docstrings failed:\n{process.stderr[-2000:]}")
        with open(result_file, encoding="utf-8") as f:
            gathered = json.load(f)
    raw = {}
    for module, docs in gathered.items():
        # one module, one document: its docstrings are about one subject, and documents
        # of several sentences give next-sentence prediction true continuations
        raw[module] = "\n\n".join(inspect.cleandoc(doc) for doc in docs)
    for name in sorted(topics):
        raw[f"pydoc_data.topics:{name}"] = topics[name]
    return raw


_DOCTEST_OR_TABLE = re.compile(r"^\s*(>>>|\.\.\.|\$ |[-=+*~^]{3,}\s*$|[|+])")
_WORD = re.compile(r"[A-Za-z]{2,}")
_PROSE_CHARACTERS = re.compile(r"[A-Za-z0-9\s.,;:'\"()*?!-]")


def paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a docstring: blank-line separated blocks, lines joined.

    A block is kept when it reads as prose: no doctest or table line, at least 3 words,
    ending with '.', '!' or '?', and 90% letters, digits, spaces and punctuation (code
    samples, signatures and option lists fail one of these)."""
    result = []
    for block in re.split(r"\n\s*\n", inspect.cleandoc(text)):
        lines = block.split("\n")
        if any(_DOCTEST_OR_TABLE.match(line) for line in lines):
            continue
        paragraph = " ".join(line.strip() for line in lines).strip()
        if (len(_WORD.findall(paragraph)) < 3 or not paragraph.endswith((".", "!", "?"))
                or len(_PROSE_CHARACTERS.findall(paragraph)) < 0.9 * len(paragraph)):
            continue
        result.append(paragraph)
    return result


def _clean_document(text: str) -> list[str]:
    return [s for paragraph in paragraphs(text) for s in split_sentences(paragraph)]


def _cache_path(limit: int | None) -> pathlib.Path:
    root = os.environ.get("BERT_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bert_jax")
    key = hashlib.sha256(f"{sys.version}|{CLEANING_VERSION}|{limit}".encode()).hexdigest()[:16]
    return pathlib.Path(root) / f"demo_corpus-{key}.json"


def documents(*, use_cache: bool = True, workers: int | None = None, limit: int | None = None) -> list[list[str]]:
    """The demo corpus: documents (lists of sentences) with at least one sentence, in a fixed order.

    limit: only the first `limit` raw documents (a quick sample)."""
    cache = _cache_path(limit)
    if use_cache and cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    texts = list(gather_raw().values())[:limit]
    workers = workers or os.cpu_count() or 1
    if workers > 1:
        # spawn: the caller (pretraining) may have started JAX's threads; fork could deadlock.
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            cleaned = list(pool.map(_clean_document, texts, chunksize=8))
    else:
        cleaned = [_clean_document(text) for text in texts]
    result = [doc for doc in cleaned if doc]
    if use_cache:  # atomic: a reader never sees half a file
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(result), encoding="utf-8")
        os.replace(partial, cache)
    return result


def write_text(path, docs: list[list[str]] | None = None) -> pathlib.Path:
    """Google's text format: one sentence per line, a blank line between documents."""
    path = pathlib.Path(path)
    docs = documents() if docs is None else docs
    path.write_text("\n\n".join("\n".join(doc) for doc in docs) + "\n", encoding="utf-8")
    return path


def _define_flags(fv) -> None:
    flags.DEFINE_string("output", None, "write the corpus here (one sentence per line)", flag_values=fv)
    flags.DEFINE_boolean("no_cache", False, "rebuild the corpus instead of reading the cached copy", flag_values=fv)


@cli.entrypoint
def main(argv=None) -> None:
    fv = cli.parse(argv, _define_flags, __doc__, prog="python -m bert_jax.data.demo_corpus")
    docs = documents(use_cache=not fv.no_cache)
    sentences = sum(map(len, docs))
    size = sum(len(s.encode()) + 1 for doc in docs for s in doc)
    print(f"{len(docs)} documents, {sentences} sentences, {size / 1e6:.2f} MB")
    if fv.output:
        write_text(fv.output, docs)
        print(f"wrote {fv.output}")


if __name__ == "__main__":
    sys.exit(main())
