"""Windows over token sequences longer than the model's input, as Google's run_squad.py
splits passages ("doc spans"): each window starts `stride` tokens after the previous one,
and each position is predicted in the one window where it has the most context around it.
NER splits long sentences and SQuAD long passages with the same two functions.
"""
from __future__ import annotations

import numpy as np


def spans(length: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(start, size) windows of at most `window` tokens covering positions [0, length)."""
    if window < 1 or stride < 1:
        raise ValueError(f"window ({window}) and stride ({stride}) must be positive")
    out, start = [], 0
    while True:
        size = min(window, length - start)
        out.append((start, size))
        if start + size >= length:
            return out
        start += min(size, stride)


def max_context_window(windows: list[tuple[int, int]], length: int) -> np.ndarray:
    """For each position, the index of the window giving it the most context: the largest
    min(tokens left, tokens right) + 0.01 * window size, the first on ties (run_squad.py's
    _check_is_max_context)."""
    positions = np.arange(length)
    scores = np.full((len(windows), length), -np.inf)
    for k, (start, size) in enumerate(windows):
        inside = (positions >= start) & (positions < start + size)
        context = np.minimum(positions - start, start + size - 1 - positions)
        scores[k, inside] = context[inside] + 0.01 * size
    return np.argmax(scores, axis=0)
