"""Documents -> BERT sentence-pair instances, as Google's create_pretraining_data.py makes them.

A tokenized corpus is three flat arrays (no Python lists of lists, so it can be memory-mapped
and shared by worker processes):

    tokens             int32 [T]    every sentence's ids, back to back, documents in order
    sentence_offsets   int64 [S+1]  sentence s is tokens[sentence_offsets[s]:sentence_offsets[s+1]]
    document_offsets   int64 [D+1]  document d is sentences document_offsets[d]:document_offsets[d+1]

`create_instances` follows `create_instances_from_document`: per document a target length
(max_seq_length - 3, or with probability short_seq_prob a random one in [2, max]); sentences
are packed into a chunk up to the target, A is a random prefix of the chunk's sentences, B is
the rest (label 0, "is next") or, half the time or when the chunk has one sentence, a span
from a random *other* document of the same split (label 1; the unused sentences are put back).
The pair is truncated from the longer side, a token at a time at a random end.

Three deliberate differences from Google's script, all fixes: the random document is drawn
among the others (Google retries 10 times and may still pick A's own document); a chunk of
one sentence gets a true B half the time, like any chunk: its following sentence, or for a
document's last sentence the sentence's own second half (Google always makes it random,
which skews the labels to 53-55% random on Wikipedia: long sentences, short targets and
document tails make many one-sentence chunks); and each document's random stream is derived
from (seed, dupe, document), so instances do not depend on how documents are split over workers.

Instances are fixed-size rows `[CLS] A [SEP] B [SEP] [PAD]...` (see `INSTANCE_FIELDS`), turned
into a batch by `unmasked_batch`.

Objective "mlm" (RoBERTa's FULL-SENTENCES within a document, MosaicBERT, ModernBERT: no next
sentence prediction) makes rows `[CLS] segment [SEP] [PAD]...`: a document's consecutive whole
sentences up to the same per-document target length (a sentence longer than it is cut into
pieces of the target length, so no token is dropped), one segment (token type 0), no pairing
and no NSP fields (`instance_dtype(..., objective="mlm")`); a batch of them has no
`next_sentence_labels`.
"""
from __future__ import annotations

import dataclasses
import random

import numpy as np

from bert_jax.data.masking import example_keys

OBJECTIVES = ("mlm_nsp", "mlm")       # train.objective: BERT's MLM + next sentence, or MLM alone
METADATA_FILE = "metadata.json"        # files of a `bert_jax.data.prepare` output directory
INSTANCES_FORMAT = "bert_jax.pretraining_instances/1"  # its "format" when it holds .npy instance rows
VOCAB_TABLES_FILE = "vocab_tables.npz"


@dataclasses.dataclass
class TokenizedCorpus:
    tokens: np.ndarray
    sentence_offsets: np.ndarray
    document_offsets: np.ndarray

    @property
    def num_documents(self) -> int:
        return len(self.document_offsets) - 1

    @classmethod
    def from_documents(cls, documents) -> "TokenizedCorpus":
        """documents: iterable of lists of id sequences (one per sentence)."""
        sentences, document_offsets = [], [0]
        for document in documents:
            sentences.extend(np.asarray(s, np.int32) for s in document)
            document_offsets.append(len(sentences))
        lengths = np.fromiter((len(s) for s in sentences), np.int64, len(sentences))
        tokens = np.concatenate(sentences) if sentences else np.zeros(0, np.int32)
        return cls(tokens.astype(np.int32), np.concatenate([[0], np.cumsum(lengths)]),
                   np.asarray(document_offsets, np.int64))

    def document(self, index: int) -> list[np.ndarray]:
        s0, s1 = self.document_offsets[index], self.document_offsets[index + 1]
        offsets = self.sentence_offsets[s0:s1 + 1]
        return [self.tokens[offsets[k]:offsets[k + 1]] for k in range(len(offsets) - 1)]


def token_dtype(vocab_size: int) -> np.dtype:
    """Rows are stored as uint16 when ids fit: half the disk and page cache of int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def instance_dtype(max_seq_length: int, vocab_size: int, max_predictions_per_seq: int | None = None,
                   objective: str = "mlm_nsp") -> np.dtype:
    """One instance row (a numpy structured dtype, so one shard is one memory-mapped .npy).

    With max_predictions_per_seq (static masking) the row also holds its masks and
    `input_ids` are the masked ones. Objective "mlm" rows have one segment and no NSP fields.
    """
    masks = [] if max_predictions_per_seq is None else _mask_fields(max_predictions_per_seq)
    if objective == "mlm":
        return np.dtype([
            ("input_ids", token_dtype(vocab_size), (max_seq_length,)),  # [CLS] segment [SEP], 0-padded
            ("num_tokens", np.int16),          # real tokens including [CLS] and [SEP]
            ("document", np.int32),            # the segment's document (index in the corpus)
        ] + masks)
    return np.dtype([
        ("input_ids", token_dtype(vocab_size), (max_seq_length,)),  # [CLS] A [SEP] B [SEP], 0-padded
        ("num_tokens", np.int16),              # real tokens including [CLS] and both [SEP]
        ("first_segment_length", np.int16),    # len(A) + 2: segment_ids are 1 from here on
        ("next_sentence_label", np.int8),      # 0: B continues A, 1: B is random
        ("document", np.int32),                # A's document (index in the corpus)
        ("b_document", np.int32),              # B's document (== document when label is 0)
    ] + masks)


def _mask_fields(max_predictions_per_seq: int) -> list:
    return [("masked_lm_positions", np.int16, (max_predictions_per_seq,)),
            ("masked_lm_ids", np.int32, (max_predictions_per_seq,)),
            ("num_predictions", np.int16)]


INSTANCE_FIELDS = instance_dtype(8, 100).names


def create_instances(corpus: TokenizedCorpus, split_documents: np.ndarray, documents: np.ndarray, *,
                     max_seq_length: int, short_seq_prob: float, seed: int, dupe: int = 0,
                     cls_id: int, sep_id: int, vocab_size: int, objective: str = "mlm_nsp") -> np.ndarray:
    """Instances of `documents` (a subset of `split_documents`, the pool for random B).

    Returns a structured array with `instance_dtype(max_seq_length, vocab_size, objective=objective)`.
    """
    if objective == "mlm":
        spans = []
        for document in np.asarray(documents, np.int64):
            rng = random.Random(int(example_keys(seed, dupe, document)))
            spans.extend(_document_segments(corpus, int(document), max_seq_length - 2, short_seq_prob, rng))
        spans = np.asarray(spans, np.int64).reshape(-1, 3)
        rows = np.zeros(len(spans), instance_dtype(max_seq_length, vocab_size, objective="mlm"))
        empty = spans[:, 1:2]
        rows["input_ids"], rows["num_tokens"] = _assemble(corpus.tokens, spans[:, 0:1], spans[:, 1:2], empty, empty,
                                                          max_seq_length, cls_id, sep_id)
        rows["document"] = spans[:, 2]
        return rows
    split_documents = np.asarray(split_documents, np.int64)
    if len(split_documents) < 2:
        raise ValueError(f"a split needs at least 2 documents for random next sentences, got {len(split_documents)}")
    documents = np.asarray(documents, np.int64)
    order = np.argsort(split_documents, kind="stable")  # O(D) for a sorted split; no per-call dict of it
    positions_in_split = order[np.searchsorted(split_documents, documents, sorter=order)]
    spans = []
    for document, position in zip(documents, positions_in_split):
        rng = random.Random(int(example_keys(seed, dupe, document)))
        spans.extend(_document_spans(corpus, int(document), split_documents,
                                     int(position), max_seq_length - 3, short_seq_prob, rng))
    return _build_rows(corpus.tokens, np.asarray(spans, np.int64).reshape(-1, 7),
                       instance_dtype(max_seq_length, vocab_size), cls_id, sep_id)


def _document_spans(corpus, document, split_documents, position, max_num_tokens, short_seq_prob, rng):
    """Google's loop, on token offsets: yields (a0, a1, b0, b1, label, document, b_document)."""
    offsets = corpus.sentence_offsets
    first, last = corpus.document_offsets[document], corpus.document_offsets[document + 1]
    target_length = max_num_tokens
    if rng.random() < short_seq_prob:
        target_length = rng.randint(2, max_num_tokens)
    chunk, chunk_length = [], 0
    i = first
    while i < last:
        chunk.append(i)
        chunk_length += offsets[i + 1] - offsets[i]
        if i == last - 1 or chunk_length >= target_length:
            a_end = 1 if len(chunk) < 2 else rng.randint(1, len(chunk) - 1)
            a0, a1 = offsets[chunk[0]], offsets[chunk[a_end - 1] + 1]
            random_next = rng.random() < 0.5
            split_sentence = False
            if len(chunk) == 1 and not random_next:  # Google forces a random B here
                if i + 1 < last:  # B is the next sentence
                    i += 1
                    chunk.append(i)
                elif a1 - a0 >= 2:  # the document's last sentence: B is its own second part
                    split_sentence = True
                else:
                    random_next = True
            if random_next:
                label = 1
                target_b_length = target_length - (a1 - a0)
                k = rng.randint(0, len(split_documents) - 2)
                b_document = int(split_documents[k + (k >= position)])  # any document but A's own
                r0, r1 = corpus.document_offsets[b_document], corpus.document_offsets[b_document + 1]
                start = rng.randint(r0, r1 - 1)
                b0 = b1 = offsets[start]
                for j in range(start, r1):
                    b1 = offsets[j + 1]
                    if b1 - b0 >= target_b_length:
                        break
                i -= len(chunk) - a_end  # put the unused sentences back
            elif split_sentence:
                label, b_document = 0, document
                a1 = b0 = a0 + rng.randint(1, a1 - a0 - 1)
                b1 = offsets[chunk[0] + 1]
            else:
                label, b_document = 0, document
                b0, b1 = offsets[chunk[a_end]], offsets[chunk[-1] + 1]
            while (a1 - a0) + (b1 - b0) > max_num_tokens:  # truncate the longer side, random end
                if a1 - a0 > b1 - b0:
                    if rng.random() < 0.5:
                        a0 += 1
                    else:
                        a1 -= 1
                elif rng.random() < 0.5:
                    b0 += 1
                else:
                    b1 -= 1
            yield (a0, a1, b0, b1, label, document, b_document)
            chunk, chunk_length = [], 0
        i += 1


def _document_segments(corpus, document, max_num_tokens, short_seq_prob, rng):
    """Objective mlm: consecutive whole sentences up to the target length (drawn per document as
    in Google's loop); a longer sentence is cut into pieces of the target. -> (t0, t1, document)."""
    offsets = corpus.sentence_offsets
    first, last = corpus.document_offsets[document], corpus.document_offsets[document + 1]
    target_length = max_num_tokens
    if rng.random() < short_seq_prob:
        target_length = rng.randint(2, max_num_tokens)
    start = offsets[first]
    for i in range(first, last):
        if offsets[i + 1] - start <= target_length:
            continue
        if offsets[i] > start:  # the sentences before this one
            yield (start, offsets[i], document)
            start = offsets[i]
        while offsets[i + 1] - start > target_length:  # a sentence longer than the target
            yield (start, start + target_length, document)
            start += target_length
    if offsets[last] > start:
        yield (start, offsets[last], document)


def _assemble(tokens, a0, a1, b0, b1, max_seq_length, cls_id, sep_id):
    """Vectorised `[CLS] A [SEP] B [SEP]` (`[CLS] A [SEP]` where B is empty) from [N, 1] token
    span bounds -> (input_ids [N, max_seq_length], 0-padded; num_tokens [N])."""
    length_a, length_b = a1 - a0, b1 - b0
    j = np.arange(max_seq_length)[None, :]
    in_a = (j >= 1) & (j <= length_a)
    in_b = (j >= length_a + 2) & (j < length_a + 2 + length_b)
    source = np.where(in_a, a0 + j - 1, np.where(in_b, b0 + j - length_a - 2, 0))
    ids = np.where(in_a | in_b, tokens[source], 0)
    ids = np.where(j == 0, cls_id, ids)
    ids = np.where((j == length_a + 1) | ((j == length_a + length_b + 2) & (length_b > 0)), sep_id, ids)
    return ids, (length_a + length_b + 2 + (length_b > 0))[:, 0]


def _build_rows(tokens, spans, dtype, cls_id, sep_id):
    """`[CLS] A [SEP] B [SEP]` rows from (a0, a1, b0, b1, label, document, b_document) token spans."""
    rows = np.zeros(len(spans), dtype)
    if not len(spans):
        return rows
    a0, a1, b0, b1 = (spans[:, k:k + 1] for k in range(4))
    rows["input_ids"], rows["num_tokens"] = _assemble(tokens, a0, a1, b0, b1, dtype["input_ids"].shape[0],
                                                      cls_id, sep_id)
    rows["first_segment_length"] = (a1 - a0 + 2)[:, 0]
    rows["next_sentence_label"] = spans[:, 4]
    rows["document"] = spans[:, 5]
    rows["b_document"] = spans[:, 6]
    return rows


def batch_spec(batch_size: int, max_seq_length: int, max_predictions_per_seq: int,
               max_instances_per_row: int = 0, *, next_sentence: bool = True) -> dict:
    """Shapes and dtypes of a pretraining batch (what the loader yields), for AOT compilation
    (`jax.ShapeDtypeStruct(*spec[name])`); `next_sentence_labels` only with `next_sentence`;
    max_instances_per_row > 0: packed rows (data/packing.py)."""
    sequence = ((batch_size, max_seq_length), np.dtype(np.int32))
    predictions = ((batch_size, max_predictions_per_seq), np.dtype(np.int32))
    spec = {
        "input_ids": sequence, "input_mask": sequence, "segment_ids": sequence,
        "masked_lm_positions": predictions, "masked_lm_ids": predictions,
        "masked_lm_weights": ((batch_size, max_predictions_per_seq), np.dtype(np.float32)),
    }
    if max_instances_per_row:
        per_instance = (batch_size, max_instances_per_row)
        spec.update(position_ids=sequence, packed_segment_ids=sequence)
        if next_sentence:
            spec.update(cls_positions=(per_instance, np.dtype(np.int32)),
                        next_sentence_labels=(per_instance, np.dtype(np.int32)),
                        next_sentence_weights=(per_instance, np.dtype(np.float32)))
    elif next_sentence:
        spec["next_sentence_labels"] = ((batch_size,), np.dtype(np.int32))
    return spec


def unmasked_batch(rows: np.ndarray) -> dict[str, np.ndarray]:
    """Instance rows -> `input_ids`, `input_mask`, `segment_ids` (int32 [B, L]) and, for rows
    with NSP fields, `next_sentence_labels` (rows of objective mlm: one segment, no labels)."""
    input_ids = rows["input_ids"].astype(np.int32)
    j = np.arange(input_ids.shape[1])[None, :]
    input_mask = j < rows["num_tokens"][:, None]
    batch = {"input_ids": input_ids, "input_mask": input_mask.astype(np.int32)}
    if "next_sentence_label" not in rows.dtype.names:
        batch["segment_ids"] = np.zeros_like(input_ids)
        return batch
    batch["segment_ids"] = (input_mask & (j >= rows["first_segment_length"][:, None])).astype(np.int32)
    batch["next_sentence_labels"] = rows["next_sentence_label"].astype(np.int32)
    return batch


def with_stored_masks(rows: np.ndarray, masked: dict[str, np.ndarray]) -> np.ndarray:
    """Unmasked rows + `mask_batch` output -> rows of the static-masking dtype."""
    out = np.zeros(len(rows), np.dtype(rows.dtype.descr + _mask_fields(masked["masked_lm_weights"].shape[1])))
    for name in rows.dtype.names:
        out[name] = rows[name]
    out["input_ids"] = masked["input_ids"]
    out["masked_lm_positions"] = masked["masked_lm_positions"]
    out["masked_lm_ids"] = masked["masked_lm_ids"]
    out["num_predictions"] = masked["masked_lm_weights"].sum(axis=1)
    return out


def stored_masks(rows: np.ndarray) -> dict[str, np.ndarray]:
    """Static-masking rows -> `masked_lm_positions/ids/weights` (weights 1.0 exactly at real predictions)."""
    positions = rows["masked_lm_positions"].astype(np.int32)
    weights = np.arange(positions.shape[1])[None, :] < rows["num_predictions"][:, None]
    return {"masked_lm_positions": positions, "masked_lm_ids": rows["masked_lm_ids"].astype(np.int32),
            "masked_lm_weights": weights.astype(np.float32)}
