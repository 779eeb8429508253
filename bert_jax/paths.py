"""Workdir paths: local directories or any URI `etils.epath` supports (gs://, s3://, ...).

Every write into a workdir goes through `epath.Path` (for gs:// epath uses tf.io.gfile when
TensorFlow is installed, as here), so a `--workdir gs://bucket/run` needs no FUSE mount.
Libraries that only read local files (SentencePiece, tokenizers, numpy memory maps) get a
local copy: `local_copy` downloads a file or directory into a per-process cache, and
`write_dir` lets such a library write into a local staging directory that is then uploaded.

Local paths behave exactly as before: made absolute, written in place, never copied.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile

from etils import epath

# Local copies of remote files (tokenizers, prepared data), one tree per process and URI.
CACHE_ENV = "BERT_JAX_CACHE_DIR"


def is_uri(path) -> bool:
    return "://" in os.fspath(path)


def workdir_path(path, what: str = "workdir") -> epath.Path:
    """str / PathLike -> epath.Path: local paths made absolute, URIs checked against epath's
    schemes (an unknown scheme would otherwise become a local directory named 'xx:')."""
    if path is None or not os.fspath(path):
        raise ValueError(f"{what} is empty: give a local directory or a URI such as gs://bucket/run")
    text = os.fspath(path)
    if not is_uri(text):
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    try:
        result = epath.Path(text)
    except KeyError:  # epath knows no class for this scheme
        result = None
    if result is None or str(result) != text.rstrip("/"):
        scheme = text.split("://", 1)[0]
        raise ValueError(f"{what} {text!r}: unsupported URI scheme {scheme}:// "
                         f"(epath supports {', '.join(_supported_schemes())} and local paths)")
    return result


def _supported_schemes() -> list[str]:
    from etils.epath import register  # noqa: PLC0415
    return sorted(register._URI_PREFIXES_TO_CLS)  # noqa: SLF001 (epath has no public list)


def ensure_writable_dir(directory: epath.Path, what: str = "workdir") -> None:
    """Create `directory` and prove it is writable (a probe file, removed again), so a
    wrong bucket or permission fails before any work, with the path in the message."""
    probe = directory / f".write_probe.{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not directory.is_dir():
            raise NotADirectoryError(f"{directory} is not a directory")
        probe.write_text("ok")
        probe.unlink()
    except Exception as e:  # each backend raises its own types (OSError, tf.errors.*)
        raise OSError(f"{what} {directory} is not a writable directory: {type(e).__name__}: {e}") from e


def is_local(path) -> bool:
    return not is_uri(path)


def rmtree(path: epath.Path) -> None:
    """Remove the directory `path` (any backend) if it exists."""
    if path.exists():
        path.rmtree()


def walk_files(directory: epath.Path) -> list[str]:
    """Relative posix names of every file under `directory`, sorted (any backend)."""
    root = str(directory).rstrip("/")
    names = []
    for parent, _, files in directory.walk():
        prefix = str(parent).rstrip("/")[len(root):].lstrip("/")
        names.extend(f"{prefix}/{f}" if prefix else f for f in files)
    return sorted(names)


def copy_tree(source: epath.Path, destination: epath.Path, *, last: str | None = None) -> None:
    """Copy every file under `source` into `destination` (either may be remote). `last`: a
    file copied after all others, so that its presence means the copy is complete."""
    names = walk_files(source)
    if last in names:
        names = [n for n in names if n != last] + [last]
    for name in names:
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (source / name).copy(target, overwrite=True)


def cache_dir(uri, purpose: str) -> epath.Path:
    """This process's local directory for copies of `uri` (stable across runs)."""
    import jax  # noqa: PLC0415 (the process index separates hosts sharing one machine)

    root = os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "bert_jax_cache")
    digest = hashlib.sha256(str(uri).encode()).hexdigest()[:16]
    return epath.Path(root) / f"{purpose}-{digest}-p{jax.process_index()}"


def local_copy(path, purpose: str = "files") -> str:
    """A local path holding `path` (file or directory): `path` itself when local, else a
    fresh download into the cache (tokenizers, vocabularies, non-Orbax checkpoints to import)."""
    if is_local(path):
        return os.fspath(path)
    source = workdir_path(path, "path")
    if not source.exists():
        raise FileNotFoundError(f"{source} not found")
    local = cache_dir(source, purpose)
    staging = local.parent / (local.name + ".tmp")
    for d in (staging, local):
        if d.exists():
            shutil.rmtree(d)
    staging.mkdir(parents=True)
    if source.is_dir():
        copy_tree(source, staging / source.name)
    else:
        source.copy(staging / source.name)
    staging.rename(local)
    return os.fspath(local / source.name)


@contextlib.contextmanager
def write_dir(destination: epath.Path):
    """Yield a local directory to write `destination`'s files into: `destination` itself when
    local; else a temporary directory uploaded to it on success (and dropped on failure)."""
    if is_local(destination):
        os.makedirs(destination, exist_ok=True)
        yield epath.Path(destination)
        return
    with tempfile.TemporaryDirectory(prefix="bert_jax_upload_") as staging:
        yield epath.Path(staging)
        copy_tree(epath.Path(staging), destination)


def open_file(path: epath.Path, mode: str = "r"):
    """A file object for `path` that stays open until `.close()` (epath's tf.io.gfile
    backend hands out a context manager, its local backend a plain file)."""
    handle = path.open(mode)
    if hasattr(handle, "write"):
        return handle
    return _EnteredFile(handle)


class _EnteredFile:
    def __init__(self, context):
        self._context = context
        self._file = context.__enter__()

    def __getattr__(self, name):
        return getattr(self._file, name)

    def close(self):
        if self._context is not None:
            context, self._context = self._context, None
            context.__exit__(None, None, None)
