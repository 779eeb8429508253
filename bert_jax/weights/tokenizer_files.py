"""The tokenizer that travels with a checkpoint: find it, check it, copy it along."""
from __future__ import annotations

import pathlib
import shutil

from bert_jax import checkpoint, paths
from bert_jax.model import BertConfig
from bert_jax.tokenizer import Tokenizer, load_tokenizer
from bert_jax.weights.mapping import ConversionError

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "spiece.model")


def find_tokenizer_files(path) -> pathlib.Path | None:
    """Directory holding the tokenizer that belongs with a checkpoint, if any (for a URI
    checkpoint: a local copy of it)."""
    if paths.is_uri(path):
        found = _find_tokenizer_dir(paths.workdir_path(path, "checkpoint"))
        return None if found is None else pathlib.Path(paths.local_copy(found, "tokenizers"))
    return _find_tokenizer_dir(pathlib.Path(path))


def _find_tokenizer_dir(p):
    """pathlib.Path or epath.Path -> the tokenizer directory beside that checkpoint, or None."""
    d = p if p.is_dir() else p.parent
    for cand in (d, d / "tokenizer"):
        if any((cand / f).is_file() for f in TOKENIZER_FILES):
            return cand
    if p.is_dir():  # an Orbax step dir: workdir/checkpoints/<step>
        try:
            tok = checkpoint.resolve_step_dir(p).parent.parent / checkpoint.TOKENIZER_DIR
        except FileNotFoundError:
            return None
        return tok if tok.is_dir() else None
    return None


def check_vocab(cfg: BertConfig, tokenizer: Tokenizer, where: str = "") -> None:
    """A tokenizer whose vocabulary differs from the checkpoint's is an error."""
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ConversionError(f"{where}: tokenizer has {tokenizer.vocab_size} tokens but the checkpoint's "
                              f"vocab_size is {cfg.vocab_size}: they do not belong together")


def tokenizer_for(checkpoint_path, cfg: BertConfig, tokenizer_path=None) -> tuple[Tokenizer, pathlib.Path] | None:
    """(tokenizer, its local directory or file) for a checkpoint: ``tokenizer_path`` when given
    (local or URI; it must exist), else the one found beside the checkpoint, else None.
    Its vocabulary must match ``cfg``."""
    if tokenizer_path:
        found = pathlib.Path(paths.local_copy(tokenizer_path, "tokenizers"))
        if not found.exists():
            raise FileNotFoundError(f"tokenizer {tokenizer_path} not found")
    else:
        found = find_tokenizer_files(checkpoint_path)
        if found is None:
            return None
    tokenizer = load_tokenizer(found)
    check_vocab(cfg, tokenizer, f"checkpoint {checkpoint_path}, tokenizer {found}")
    return tokenizer, found


def copied_names(tokenizer, out_dir) -> list[str]:
    """The file names ``copy_tokenizer(tokenizer, out_dir)`` writes into ``out_dir`` (none when
    ``tokenizer`` is None or already lives there)."""
    if tokenizer is None:
        return []
    src = pathlib.Path(tokenizer)
    src_dir = src.parent if src.is_file() else src
    if src_dir.resolve() == pathlib.Path(out_dir).resolve():
        return []
    return [src.name] if src.is_file() else [n for n in TOKENIZER_FILES if (src / n).is_file()]


def copy_tokenizer(tokenizer, out_dir) -> None:
    """Copies a tokenizer directory's files (or one tokenizer file) into ``out_dir``."""
    src = pathlib.Path(tokenizer)
    src_dir = src.parent if src.is_file() else src
    for name in copied_names(tokenizer, out_dir):
        shutil.copy(src_dir / name, pathlib.Path(out_dir) / name)
