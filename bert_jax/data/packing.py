"""Sequence packing for pretraining: several instances per row, each attending only to itself.

A packed row of `max_seq_length` slots holds up to `max_instances_per_row` instances back to
back, each its own `[CLS] A [SEP] B [SEP]` with its token types, then padding:

    input_ids, input_mask, segment_ids      int32 [B, L]   as unpacked, over the whole row
    position_ids                            int32 [B, L]   restart at 0 for each instance
    packed_segment_ids                      int32 [B, L]   1..k: the instance a token is in; 0: padding
    masked_lm_positions, masked_lm_ids      int32 [B, P]   every instance's predictions, row positions
    masked_lm_weights                       float32 [B, P]
    cls_positions                           int32 [B, N]   each instance's [CLS] (0 in empty slots)
    next_sentence_labels                    int32 [B, N]
    next_sentence_weights                   float32 [B, N] 1.0 for an instance, 0.0 for an empty slot

The last three only for instances with `next_sentence_labels` (objective mlm_nsp; the MLM-only
model has no next-sentence head to feed from each [CLS]).

`max_predictions_per_seq` (P) is the width of a row's masked-LM arrays, as in NVIDIA's MLPerf
packed data: each instance keeps its own budget min(P, max(1, round(masked_lm_prob * tokens))),
and a row holds the sum of its instances' budgets, at most floor(masked_lm_prob * L) + N
(`row_predictions`); P must be at least that. Instances are masked one by one with the keys the
unpacked loader uses, so an instance carries the same masks packed or not.

Which instances share a row: the instance stream (the loader's seeded shuffle, epoch after
epoch) is cut into windows of `WINDOW` consecutive instances; each window is packed by
first-fit decreasing (longest first, into the first row with room for its tokens, its
predictions and one more instance), its rows are shuffled with a key of (seed, window), and the
rows of all windows, in window order, form the packed stream. Global batch k is rows
[k*G, (k+1)*G) of it, so it is a pure function of the seed and k, whatever the hosts or
workers. Every host packs whole windows (reading their instances' lengths) and masks only the
instances of its own rows. The resumable state is the cursor: the window and row the next batch
starts at.

Why not Grain's FirstFitPackIterDataset: it packs the stream each host or worker reads, so the
rows would depend on the host and worker counts, and every host would have to read and mask the
whole global batch.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np

WINDOW = 2048                # instances packed together: first-fit decreasing over a window
_ROW_SHUFFLE_PURPOSE = 0x7061636B


def row_predictions(max_seq_length: int, max_instances_per_row: int, masked_lm_prob: float) -> int:
    """The most masked positions a packed row can need: each instance predicts at most
    max(1, round(p * n)) <= p * n + 1 tokens, and the n add up to at most max_seq_length."""
    return math.floor(masked_lm_prob * max_seq_length) + max_instances_per_row


def check_settings(*, max_seq_length: int, max_predictions_per_seq: int, max_instances_per_row: int,
                   masked_lm_prob: float, instance_length: int | None = None,
                   instance_predictions: int | None = None) -> None:
    """Packed rows against the data's instances; each error names the setting to change."""
    if max_instances_per_row < 1:
        raise ValueError(f"config.data.max_instances_per_row={max_instances_per_row}: a packed row must hold at "
                         "least one instance (set it >= 1)")
    if instance_length is not None and instance_length > max_seq_length:
        raise ValueError(f"config.data.max_seq_length={max_seq_length}: a packed row cannot hold one instance of "
                         f"the data (up to {instance_length} tokens); set it >= {instance_length}")
    needed = row_predictions(max_seq_length, max_instances_per_row, masked_lm_prob)
    if instance_predictions is not None:
        needed = max(needed, instance_predictions)
    if max_predictions_per_seq < needed:
        raise ValueError(
            f"config.data.max_predictions_per_seq={max_predictions_per_seq} is too small for packed rows: up to "
            f"{max_instances_per_row} instances in {max_seq_length} tokens predict up to {needed} tokens (floor("
            f"{masked_lm_prob} x {max_seq_length}) + {max_instances_per_row}); set it >= {needed} or lower "
            "config.data.max_instances_per_row")


def instance_budgets(num_tokens: np.ndarray, max_predictions_per_seq: int, masked_lm_prob: float) -> np.ndarray:
    """The most predictions dynamic masking gives each instance (masking.mask_batch's count)."""
    return np.minimum(max_predictions_per_seq, np.maximum(1, np.round(num_tokens * masked_lm_prob))).astype(np.int64)


def first_fit_decreasing(lengths: np.ndarray, budgets: np.ndarray, *, row_length: int, row_predictions: int,
                         max_instances: int) -> np.ndarray:
    """Bins for items of `lengths` tokens and `budgets` predictions -> int64 [rows, max_instances]
    of item indices (-1: empty slot), the slots of a row in increasing item order."""
    count = len(lengths)
    free = np.full(count, row_length, np.int64)
    free_predictions = np.full(count, row_predictions, np.int64)
    used = np.zeros(count, np.int64)
    row_of = np.empty(count, np.int64)
    rows = 0
    for item in np.argsort(-np.asarray(lengths), kind="stable"):
        fits = (free[:rows + 1] >= lengths[item]) & (free_predictions[:rows + 1] >= budgets[item]) \
            & (used[:rows + 1] < max_instances)
        row = int(np.argmax(fits))
        if not fits[row]:  # not even an empty row: check_settings lets no such instance through
            raise ValueError(f"an instance of {lengths[item]} tokens and {budgets[item]} predictions fits no packed "
                             f"row of {row_length} tokens and {row_predictions} predictions")
        free[row] -= lengths[item]
        free_predictions[row] -= budgets[item]
        used[row] += 1
        row_of[item] = row
        rows = max(rows, row + 1)
    slots = np.full((rows, max_instances), -1, np.int64)
    order = np.argsort(row_of, kind="stable")
    first = np.searchsorted(row_of[order], np.arange(rows))
    slots[row_of[order], np.arange(count) - first[row_of[order]]] = order
    return slots


def pack_rows(instances: dict[str, np.ndarray], slots: np.ndarray, *, row_length: int,
              row_predictions: int) -> dict[str, np.ndarray]:
    """Unpacked instances (a batch dict with masks, [m, ...]) placed by `slots` (int [B, N] of
    instance indices, -1 empty) -> the packed batch (see the module docstring)."""
    batch, width = slots.shape
    filled = slots >= 0
    lengths = instances["input_mask"].sum(axis=1).astype(np.int64)
    taken = np.where(filled, lengths[np.maximum(slots, 0)], 0)
    starts = np.cumsum(taken, axis=1) - taken                          # [B, N] where each instance begins
    row, slot = np.nonzero(filled)                                     # placed instances, row-major
    item = slots[row, slot]
    start = starts[row, slot][:, None]

    j = np.arange(instances["input_ids"].shape[1])[None, :]
    real = j < lengths[item][:, None]
    r, c = np.broadcast_to(row[:, None], real.shape)[real], (start + j)[real]
    out = {name: np.zeros((batch, row_length), np.int32)
           for name in ("input_ids", "input_mask", "segment_ids", "position_ids", "packed_segment_ids")}
    out["input_ids"][r, c] = instances["input_ids"][item][real]
    out["segment_ids"][r, c] = instances["segment_ids"][item][real]
    out["position_ids"][r, c] = np.broadcast_to(j, real.shape)[real]
    out["packed_segment_ids"][r, c] = np.broadcast_to(slot[:, None] + 1, real.shape)[real]
    out["input_mask"][r, c] = 1

    predicted = instances["masked_lm_weights"][item] > 0               # [M, P_instance]
    counts = np.zeros((batch, width), np.int64)
    counts[row, slot] = predicted.sum(axis=1)
    first = (np.cumsum(counts, axis=1) - counts)[row, slot][:, None]
    column = (first + np.cumsum(predicted, axis=1) - 1)[predicted]
    r = np.broadcast_to(row[:, None], predicted.shape)[predicted]
    out["masked_lm_positions"] = np.zeros((batch, row_predictions), np.int32)
    out["masked_lm_ids"] = np.zeros((batch, row_predictions), np.int32)
    out["masked_lm_weights"] = np.zeros((batch, row_predictions), np.float32)
    out["masked_lm_positions"][r, column] = (instances["masked_lm_positions"][item] + start)[predicted]
    out["masked_lm_ids"][r, column] = instances["masked_lm_ids"][item][predicted]
    out["masked_lm_weights"][r, column] = 1.0

    if "next_sentence_labels" not in instances:  # objective mlm
        return out
    out["cls_positions"] = np.where(filled, starts, 0).astype(np.int32)
    out["next_sentence_labels"] = np.where(filled, instances["next_sentence_labels"][np.maximum(slots, 0)], 0
                                           ).astype(np.int32)
    out["next_sentence_weights"] = filled.astype(np.float32)
    return out


@dataclasses.dataclass
class _Window:
    positions: np.ndarray    # int64 [W]: stream positions of its instances
    rows: np.ndarray         # int64 [R, N]: the packed rows, indices into `positions` (-1 empty)


class Planner:
    """Global batch k -> which stream positions fill each of its rows, window by window.

    `lengths_and_budgets(positions) -> (tokens, predictions)` of the instances at those stream
    positions. Sequential but cheap (lengths only): a plan continues from the last one, and
    restarts from `start` (batch, window, row) when asked for an earlier batch. One planner per
    iterator (`starting_at`): it keeps its place in the stream.
    """

    def __init__(self, lengths_and_budgets, *, global_batch_size: int, stream_length: int, seed: int,
                 row_length: int, row_predictions: int, max_instances: int):
        self.lengths_and_budgets = lengths_and_budgets
        self.global_batch_size = global_batch_size
        self.stream_length = stream_length
        self.seed = seed
        self.row_length, self.row_predictions, self.max_instances = row_length, row_predictions, max_instances
        self.start = (0, 0, 0)
        self.window = WINDOW
        self._cursor = self.start
        self._windows: dict[int, _Window] = {}

    def _window(self, index: int) -> _Window:
        if index not in self._windows:
            positions = np.arange(index * self.window, min((index + 1) * self.window, self.stream_length),
                                  dtype=np.int64)
            lengths, budgets = self.lengths_and_budgets(positions) if len(positions) else ((), ())
            rows = first_fit_decreasing(np.asarray(lengths, np.int64), np.asarray(budgets, np.int64),
                                        row_length=self.row_length, row_predictions=self.row_predictions,
                                        max_instances=self.max_instances)
            rng = np.random.default_rng([self.seed, _ROW_SHUFFLE_PURPOSE, index])
            self._windows = {index: _Window(positions, rows[rng.permutation(len(rows))])}  # plans move forward
        return self._windows[index]

    def plan(self, batch_index: int):
        """-> (int64 [G, N] stream positions, -1 empty; (batch, window, row) of the next batch),
        or None past the end of the stream."""
        if batch_index < self._cursor[0]:
            self._cursor = self.start
            if batch_index < self.start[0]:
                raise ValueError(f"batch {batch_index} is before this loader's start {self.start}")
        while True:
            k, window, row = self._cursor
            parts, needed = [], self.global_batch_size
            while needed:
                packed = self._window(window)
                if not len(packed.rows):
                    return None  # the stream has ended
                rows = packed.rows[row:row + needed]
                parts.append(np.where(rows >= 0, packed.positions[np.maximum(rows, 0)], -1))
                needed -= len(rows)
                row += len(rows)
                if row == len(packed.rows):
                    window, row = window + 1, 0
            self._cursor = (k + 1, window, row)
            if k == batch_index:
                return np.concatenate(parts), self._cursor

    def starting_at(self, start) -> "Planner":
        """A fresh planner of the same stream whose plans start at `start` (batch, window, row)."""
        planner = copy.copy(self)
        planner.start = planner._cursor = tuple(start)
        planner._windows = {}
        return planner

    def __getstate__(self):
        return {**self.__dict__, "_windows": {}, "_cursor": self.start}
