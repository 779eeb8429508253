"""Padding unpadded per-example arrays into fixed-shape batches (token tasks: NER, SQuAD).

A batch is `batch_size` rows padded to the smallest bucket length that holds its longest
example, so only a few shapes compile; rows past the real examples are filled with
padding (and weigh nothing in the losses).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


def bucket_length(lengths: Sequence[int], buckets: Sequence[int]) -> int:
    longest = max(lengths, default=1)
    length = next((b for b in buckets if b >= longest), None)
    if length is None:
        raise ValueError(f"example of {longest} tokens exceeds the largest bucket {buckets[-1]}")
    return length


def pad_rows(rows: Sequence[np.ndarray], batch_size: int, length: int, fill, dtype=np.int32) -> np.ndarray:
    """[batch_size, length, ...] with rows[i] at the start of row i, `fill` elsewhere."""
    trailing = np.shape(rows[0])[1:] if len(rows) else ()
    out = np.full((batch_size, length, *trailing), fill, dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def encoder_inputs(token_ids: Sequence[np.ndarray], first_segment_lengths: Sequence[int] | None,
                   batch_size: int, length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Google's input names: input_ids, input_mask, segment_ids (1 after the first segment)."""
    input_ids = pad_rows(token_ids, batch_size, length, pad_id)
    input_mask = pad_rows([np.ones(len(t), np.int32) for t in token_ids], batch_size, length, 0)
    positions = np.arange(length)[None, :]
    firsts = np.full((batch_size, 1), length)
    if first_segment_lengths is not None:
        firsts[: len(token_ids), 0] = first_segment_lengths
    segment_ids = ((positions >= firsts) & (input_mask == 1)).astype(np.int32)
    return {"input_ids": input_ids, "input_mask": input_mask, "segment_ids": segment_ids}


def eval_batch_indices(lengths: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Example indices in batches of similar length (little padding); reorder by them."""
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start: start + batch_size]
