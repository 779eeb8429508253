"""Padding unpadded per-example arrays into fixed-shape batches (GLUE, NER, SQuAD), or
packing several examples into each row (GLUE with `packing`).

A padded batch is `batch_size` rows padded to the smallest bucket length that holds its longest
example, so only a few shapes compile; rows past the real examples are filled with
padding (and weigh nothing in the losses). A packed batch is rows of a fixed length holding up
to a fixed number of examples each (`pack_rows`, `packed_encoder_inputs`): hardly any padding.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

# Packed batches have every row count up to this many rows, then counts rounded up to even ones up
# to twice as many, to multiples of 4 up to four times as many, ... (`packed_row_count`).
EXACT_ROWS = 16


def bucket_length(lengths: Sequence[int], buckets: Sequence[int]) -> int:
    longest = max(lengths, default=1)
    length = next((b for b in buckets if b >= longest), None)
    if length is None:
        raise ValueError(f"example of {longest} tokens exceeds the largest bucket {buckets[-1]}")
    return length


def packed_row_count(rows: int, multiple: int = 0) -> int:
    """The row count of a packed batch whose examples fill `rows` rows: rounded up to a multiple of
    `multiple`, or with 0 (the default) to a ladder, every count up to `EXACT_ROWS`, then even
    counts up to twice that, multiples of 4 up to four times, ...: fewer than an eighth of the rows
    empty, and EXACT_ROWS/2 shapes to compile per doubling of the row count. (A fixed
    multiple of 2 left a quarter of the tokens of short tasks empty: 32 CoLA examples of 11 tokens
    fill 3 rows of 128, padded to 4; benchmarks/bench_finetune.py measures both.)"""
    if multiple < 0:
        raise ValueError(f"packed_row_count: multiple={multiple} must be >= 0")
    if not multiple:
        multiple = 1
        while rows > EXACT_ROWS * multiple:
            multiple *= 2
    return -(-rows // multiple) * multiple


# Auto packed row lengths (`choose_row_length`): candidates are multiples of this many tokens.
ROW_LENGTH_STEP = 16
# A packed row's attention cost per token against its dense layers', on a CPU: L / this, for rows
# of L tokens. The attention matmuls are L / (6 hidden) of a layer's FLOPs (QK^T and PV: 2 L hidden
# multiply-adds a token; the dense layers 12 hidden^2), and XLA:CPU runs their small batched
# matmuls on one thread about 5x slower than the dense ones: MiniLM (hidden 384) on MRPC lengths
# spent about 21% of its step on them for 6% of the FLOPs, i.e. L / 480. A wider model's attention
# is a smaller share (L / 960 at hidden 768); both give the same rows on the GLUE tasks.
ATTENTION_COST_TOKENS = 480


def choose_row_length(lengths: Sequence[int], batch_size: int, max_seq_length: int, max_per_row: int,
                      *, longest: int | None = None, sample_batches: int = 64,
                      seed: int = 0) -> int:
    """The packed row length with the least estimated step cost for examples of these `lengths`
    (a dataset's): among the multiples of ROW_LENGTH_STEP from the one that holds the `longest`
    example (default: the longest of `lengths`) up to `max_seq_length` (and `max_seq_length`
    itself), the one whose rows cost least on a random sample of `sample_batches` batches:
    row slots x (1 + L / ATTENTION_COST_TOKENS), slots counted as the batches
    pack them (`pack_rows`, `packed_row_count`). Short examples get short rows, where each token
    attends over fewer keys (CoLA, at most 47 tokens: rows of 48, not 128). Deterministic."""
    lengths = np.asarray(lengths, np.int64)
    longest = int(lengths.max(initial=1)) if longest is None else int(longest)
    if longest > max_seq_length:
        raise ValueError(f"an example of {longest} tokens does not fit a packed row of {max_seq_length} tokens "
                         "(max_seq_length): raise max_seq_length or truncate the example")
    first = -(-longest // ROW_LENGTH_STEP) * ROW_LENGTH_STEP
    candidates = sorted({min(n, max_seq_length)
                         for n in range(first, max_seq_length + ROW_LENGTH_STEP, ROW_LENGTH_STEP)})
    order = np.random.default_rng(seed).permutation(len(lengths))[: batch_size * sample_batches]
    batches = [lengths[order[i: i + batch_size]] for i in range(0, len(order), batch_size)]

    def cost(row_length: int) -> float:
        slots = sum(packed_row_count(len(pack_rows(b, row_length, max_per_row))) * row_length for b in batches)
        return slots * (1.0 + row_length / ATTENTION_COST_TOKENS)
    return min(candidates, key=lambda n: (cost(n), -n))


def packed_row_length(setting: int, max_seq_length: int, train_lengths: Sequence[int], longest: int,
                      batch_size: int, max_per_row: int, platform: str) -> int:
    """The row length of a task's packed batches from `config.packed_row_length` (`setting`):
    0 (auto) is `choose_row_length` over the training lengths on a CPU, and `max_seq_length`
    elsewhere (fused attention kernels: rows of 128 are what splash attention tiles; the cost
    model is a CPU's); a positive setting is used as it is. `longest`: the longest example of
    every split the rows will hold (train, dev, test)."""
    if setting < 0 or setting > max_seq_length:
        raise ValueError(f"config.packed_row_length={setting}: must be 0 (auto) or in "
                         f"[1, max_seq_length={max_seq_length}]")
    if setting and longest > setting:
        raise ValueError(f"config.packed_row_length={setting}: an example of {longest} tokens does not fit a row; "
                         f"raise it (at most max_seq_length={max_seq_length}) or set 0 (auto)")
    if setting:
        return setting
    if platform != "cpu":
        return max_seq_length
    return choose_row_length(train_lengths, batch_size, max_seq_length, max_per_row, longest=longest)


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


# ---------------------------------------------------------------------------- packing

def pack_rows(lengths: Sequence[int], row_length: int, max_per_row: int) -> list[list[int]]:
    """First-fit decreasing: the positions (into `lengths`) of the examples each row holds,
    at most `max_per_row` of them and `row_length` tokens together. Deterministic."""
    if max_per_row < 1:
        raise ValueError(f"max_examples_per_row={max_per_row}: a packed row must hold at least one example")
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep their order
        n = int(lengths[i])
        if n > row_length:
            raise ValueError(f"an example of {n} tokens does not fit a packed row of {row_length} tokens "
                             "(max_seq_length): raise max_seq_length or truncate the example")
        row = next((r for r in range(len(rows)) if used[r] + n <= row_length and len(rows[r]) < max_per_row), None)
        if row is None:
            rows.append([])
            used.append(0)
            row = len(rows) - 1
        rows[row].append(i)
        used[row] += n
    return rows


def packed_encoder_inputs(token_ids: Sequence[np.ndarray], first_segment_lengths: Sequence[int] | None,
                          rows: Sequence[Sequence[int]], num_rows: int, row_length: int, max_per_row: int,
                          pad_id: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Examples laid out in `rows` (from `pack_rows`) -> (encoder inputs, slots).

    Each example keeps its own token types, position ids restart at 0, `packed_segment_ids`
    numbers the examples of a row from 1 (0: padding) so attention stays inside each one, and
    `cls_positions` [num_rows, max_per_row] points at each example's first token ([CLS]).
    `slots` [num_rows, max_per_row] is the position in `token_ids` of the example in each
    (row, slot), -1 where none: labels and predictions go through it. Rows past `rows` are padding.
    """
    shape = (num_rows, row_length)
    out = {"input_ids": np.full(shape, pad_id, np.int32), "input_mask": np.zeros(shape, np.int32),
           "segment_ids": np.zeros(shape, np.int32), "position_ids": np.zeros(shape, np.int32),
           "packed_segment_ids": np.zeros(shape, np.int32),
           "cls_positions": np.zeros((num_rows, max_per_row), np.int32)}
    slots = np.full((num_rows, max_per_row), -1, np.int64)
    for r, row in enumerate(rows):
        start = 0
        for s, i in enumerate(row):
            ids = token_ids[i]
            end = start + len(ids)
            out["input_ids"][r, start:end] = ids
            out["input_mask"][r, start:end] = 1
            if first_segment_lengths is not None:
                out["segment_ids"][r, start + first_segment_lengths[i]: end] = 1
            out["position_ids"][r, start:end] = np.arange(len(ids))
            out["packed_segment_ids"][r, start:end] = s + 1
            out["cls_positions"][r, s] = start
            slots[r, s] = i
            start = end
    return out, slots
