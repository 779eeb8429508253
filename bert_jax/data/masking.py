"""BERT masked-LM masking, vectorised over a batch with numpy.

Same rules as Google's `create_masked_lm_predictions`:
  * num_to_predict = min(max_predictions_per_seq, max(1, round(num_tokens * masked_lm_prob)))
    where num_tokens counts [CLS]/[SEP] too;
  * candidates are the real tokens except special ids ([PAD] [UNK] [CLS] [SEP] [MASK]);
  * candidates (or whole words) are visited in random order and taken while they fit
    (a whole word that would overflow num_to_predict is skipped, later shorter ones still fit);
  * of the chosen tokens 80% become [MASK], 10% a random non-special token, 10% stay;
  * predictions are sorted by position and padded to max_predictions_per_seq
    (position 0, id 0, weight 0.0; real predictions have weight exactly 1.0).

Randomness is a counter-based hash of (key, position): the mask of an example depends only
on its key (e.g. derived from seed, epoch and example index), never on batch size, batch
order, host count or worker count. That is what makes dynamic masking reproducible.
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

_RESERVED = re.compile(r"^(\[[^\]\s]+\]|<[^>\s]+>)$")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Bijective 64-bit mixer (Steele et al., SplitMix64 finaliser)."""
    x = (x + _GOLDEN).astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def example_keys(*parts) -> np.ndarray:
    """Folds integers / integer arrays (broadcast together) into uint64 keys, like jax fold_in."""
    key = np.zeros((), np.uint64)
    with np.errstate(over="ignore"):
        for part in parts:
            key = _splitmix64(key ^ _splitmix64(np.asarray(part).astype(np.uint64)))
    return key


def _uniform(keys: np.ndarray, length: int, stream: int) -> np.ndarray:
    """float64 uniforms in [0, 1) of shape [B, length], one independent stream per `stream`."""
    counters = np.arange(length, dtype=np.uint64) + np.uint64(stream) * np.uint64(1 << 32)
    with np.errstate(over="ignore"):
        bits = _splitmix64(keys[:, None] ^ _splitmix64(counters)[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def predictions_needed(masked_lm_prob: float, max_seq_length: int) -> int:
    """What `mask_batch` predicts in a full row: the smallest max_predictions_per_seq that never caps."""
    return max(1, int(np.round(max_seq_length * masked_lm_prob)))


def default_max_predictions(masked_lm_prob: float, max_seq_length: int) -> int:
    """max_predictions_per_seq following the masking rate: ceil(rate x length), so Google's
    0.15 x 128 gives its 20 (and never fewer than `predictions_needed`)."""
    return math.ceil(round(masked_lm_prob * max_seq_length, 6))


@dataclasses.dataclass(frozen=True)
class MaskingVocab:
    """What masking needs to know about the vocabulary (all plain arrays, picklable)."""

    mask_id: int
    special_ids: tuple[int, ...]           # never chosen for prediction
    replacement_ids: np.ndarray            # int32: ids a token may be replaced by (the 10% random)
    word_start: np.ndarray | None = None   # bool[vocab]: id begins a word (for whole-word masking)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "MaskingVocab":
        special = sorted(set(tokenizer.special_ids))
        all_ids = np.arange(tokenizer.vocab_size, dtype=np.int32)
        # Random replacements come from the real vocabulary: no special or reserved tokens
        # (WordPiece's [unused17], SentencePiece's <s>), which never occur in text.
        reserved = np.array([bool(_RESERVED.match(t)) for t in tokenizer.ids_to_tokens(all_ids.tolist())])
        replacement = all_ids[~reserved & ~np.isin(all_ids, special)]
        word_start = np.asarray(tokenizer.word_start_mask(all_ids), bool)
        return cls(int(tokenizer.mask_id), tuple(special), replacement, word_start)

    def __post_init__(self):
        if len(self.replacement_ids) == 0:
            raise ValueError("masking vocabulary has no non-special token to use as random replacement")


def mask_batch(input_ids: np.ndarray, input_mask: np.ndarray, keys: np.ndarray, vocab: MaskingVocab,
               *, max_predictions_per_seq: int, masked_lm_prob: float = 0.15,
               whole_word_masking: bool = False) -> dict[str, np.ndarray]:
    """Masks a batch. input_ids/input_mask: int [B, L]; keys: uint64 [B] (one per example).

    Returns masked `input_ids` (a new array) and `masked_lm_positions/ids/weights` [B, P].
    """
    input_ids = np.asarray(input_ids)
    batch, length = input_ids.shape
    real = np.asarray(input_mask).astype(bool)
    num_tokens = real.sum(axis=1)
    candidate = real & ~np.isin(input_ids, vocab.special_ids)
    num_to_predict = np.minimum(max_predictions_per_seq,
                                np.maximum(1, np.round(num_tokens * masked_lm_prob).astype(np.int64)))

    # Words: a candidate starts a word if its id is a word start or the token before it is not
    # a candidate (e.g. a '##' piece left first in a segment by truncation). Without whole-word
    # masking every candidate is its own word.
    if whole_word_masking:
        if vocab.word_start is None:
            raise ValueError("whole_word_masking needs MaskingVocab.word_start")
        previous_candidate = np.zeros_like(candidate)
        previous_candidate[:, 1:] = candidate[:, :-1]
        starts = candidate & (vocab.word_start[input_ids] | ~previous_candidate)
    else:
        starts = candidate
    word_of_token = np.cumsum(starts, axis=1) - 1                      # word index within the row
    rows = np.arange(batch)[:, None]
    word_length = np.bincount((rows * length + word_of_token)[candidate],
                              minlength=batch * length).reshape(batch, length)

    # Visit words in random order (a word's score is the uniform drawn at its first token).
    scores = np.where(starts, _uniform(keys, length, stream=0), np.inf)
    start_positions = np.argsort(~starts, axis=1, kind="stable")        # word w starts at [:, w]
    word_score = np.take_along_axis(scores, start_positions, axis=1)
    visit_order = np.argsort(word_score, axis=1, kind="stable")        # words, best score first
    visited_length = np.take_along_axis(word_length, visit_order, axis=1)

    # Greedy "take if it fits, else skip", done in rounds: accept the prefix that fits, then drop
    # every word longer than what is left. Terminates after (longest word length) rounds at most.
    remaining = num_to_predict.copy()
    accepted = np.zeros((batch, length), bool)
    undecided = visited_length > 0
    while True:
        undecided &= visited_length <= remaining[:, None]
        if not undecided.any():
            break
        fits = undecided & (np.cumsum(np.where(undecided, visited_length, 0), axis=1) <= remaining[:, None])
        accepted |= fits
        undecided &= ~fits
        remaining -= np.where(fits, visited_length, 0).sum(axis=1)

    word_accepted = np.zeros((batch, length), bool)
    np.put_along_axis(word_accepted, visit_order, accepted, axis=1)
    chosen = candidate & np.take_along_axis(word_accepted, np.maximum(word_of_token, 0), axis=1)

    # Positions in increasing order, padded with 0 (never a prediction: [CLS] lives there).
    order = np.argsort(~chosen, axis=1, kind="stable")[:, :max_predictions_per_seq]
    weights = np.take_along_axis(chosen, order, axis=1)
    positions = np.where(weights, order, 0).astype(np.int32)
    original_ids = np.where(weights, np.take_along_axis(input_ids, positions, axis=1), 0).astype(np.int32)

    # 80% [MASK], 10% unchanged, 10% random non-special token.
    action = np.take_along_axis(_uniform(keys, length, stream=1), positions, axis=1)
    pick = np.take_along_axis(_uniform(keys, length, stream=2), positions, axis=1)
    random_ids = vocab.replacement_ids[(pick * len(vocab.replacement_ids)).astype(np.int64)]
    new_ids = np.where(action < 0.8, vocab.mask_id, np.where(action < 0.9, original_ids, random_ids))

    masked = input_ids.astype(np.int32, copy=True)
    row_index = np.broadcast_to(rows, positions.shape)
    masked[row_index[weights], positions[weights]] = new_ids[weights]
    return {
        "input_ids": masked,
        "masked_lm_positions": positions,
        "masked_lm_ids": original_ids,
        "masked_lm_weights": weights.astype(np.float32),
    }
