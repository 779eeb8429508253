"""Pretraining batches checked where they enter: token ids against the vocabulary and
masked positions against the sequence length, on the host, vectorised over the batch.

An id beyond the vocabulary (data made with another tokenizer, a damaged file) would index
past the embedding table, which JAX clamps silently: the loss goes wrong or NaN far from the
cause. Here it is a one-line error naming the file and record (`source.describe(index)`).
"""
from __future__ import annotations

import numpy as np


class BadRecordError(ValueError):
    """A record holds an id or position outside its range (names the file and record)."""


def check_batch(batch: dict[str, np.ndarray], indices: np.ndarray, *, vocab_size: int | None, describe,
                vocab_name: str = "the vocabulary") -> None:
    """Raise BadRecordError for the first row of `batch` whose token ids are not in
    [0, vocab_size) (None: not checked) or whose masked_lm_positions are not in
    [0, sequence length). `indices[row]` is the row's index in the source; `describe(index)`
    names its file and record."""
    seq_length = batch["input_ids"].shape[1]
    checks = [("masked_lm_positions", seq_length, "the sequence length")] if "masked_lm_positions" in batch else []
    if vocab_size is not None:
        checks += [(name, vocab_size, f"{vocab_name} ({vocab_size} ids)")
                   for name in ("input_ids", "masked_lm_ids") if name in batch]
    for name, limit, what in checks:
        values = batch[name]
        bad = (values < 0) | (values >= limit)
        if bad.any():
            row, column = np.argwhere(bad)[0]
            raise BadRecordError(
                f"{describe(int(indices[row]))}: {name}[{column}] = {values[row, column]} is outside {what}, "
                f"[0, {limit}); was the data made with another tokenizer or max_seq_length? Prepare it again "
                "with this run's settings (or remove the damaged file)")
