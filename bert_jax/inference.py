"""Run a BERT checkpoint on text: any checkpoint :mod:`bert_jax.weights` reads (bert_jax
Orbax, Hugging Face, Google TF, .npz), with the tokenizer that belongs to it.

    model = InferenceModel.load("path/to/checkpoint")
    [first, second] = model.encode(["A sentence.", "Another one."])
    first.tokens, first.hidden        # ['[CLS]', 'a', ..., '[SEP]'], float32 [tokens, hidden]

Texts are encoded as ``[CLS] text [SEP]``, in batches padded to a few lengths (powers of two)
so that the jitted forward compiles a handful of times whatever the texts.
"""
from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bert_jax import model as M
from bert_jax import params as params_lib
from bert_jax import weights

log = logging.getLogger("bert_jax.inference")
MIN_PADDED_LENGTH = 16


@dataclasses.dataclass
class Encoded:
    tokens: list[str]
    hidden: np.ndarray  # [tokens, hidden_size] float32: the last layer's output


class InferenceModel:
    def __init__(self, pretrained: weights.Pretrained):
        self.config = pretrained.config
        self.tokenizer = pretrained.tokenizer
        model = M.BertModel(self.config, rngs=nnx.Rngs(0))
        params_lib.load_params(model, pretrained.encoder)
        graphdef, self._state = nnx.split(model)

        def forward(state, input_ids, input_mask):
            out = nnx.merge(graphdef, state)(input_ids, input_mask, jnp.zeros_like(input_ids))
            return out["sequence_output"].astype(jnp.float32)

        self._forward = jax.jit(forward)

    @classmethod
    def load(cls, path, fmt: str = "auto", tokenizer_path: str | None = None) -> InferenceModel:
        return cls(weights.load_pretrained_encoder(str(path), fmt, tokenizer_path or ""))

    def token_ids(self, text: str, where: str = "text") -> list[int]:
        """``[CLS] text [SEP]``, truncated (with a warning) to max_position_embeddings."""
        if not text or not text.strip():
            raise ValueError(f"encode: {where} is empty")
        ids = self.tokenizer.encode(text)
        limit = self.config.max_position_embeddings - 2
        if len(ids) > limit:
            log.warning("%s has %d tokens; truncated to %d (max_position_embeddings=%d with [CLS] and [SEP])",
                        where, len(ids), limit, self.config.max_position_embeddings)
            ids = ids[:limit]
        return [self.tokenizer.cls_id, *ids, self.tokenizer.sep_id]

    def encode(self, texts: list[str], batch_size: int = 32) -> list[Encoded]:
        """The last hidden states of each text, computed ``batch_size`` texts at a time."""
        if batch_size < 1:
            raise ValueError(f"encode: batch_size={batch_size} must be >= 1")
        ids = [self.token_ids(t, f"text {i}" if len(texts) > 1 else "text") for i, t in enumerate(texts)]
        rows = min(batch_size, len(ids))
        results = []
        for start in range(0, len(ids), rows):
            chunk = ids[start:start + rows]
            hidden = np.asarray(self._forward(self._state, *self._pad(chunk, rows)))
            results += [Encoded(self.tokenizer.ids_to_tokens(seq), hidden[r, :len(seq)])
                        for r, seq in enumerate(chunk)]
        return results

    def _pad(self, chunk: list[list[int]], rows: int) -> tuple[np.ndarray, np.ndarray]:
        """-> input_ids, input_mask [rows, length]; length: the next power of two that holds the
        longest sequence (at least MIN_PADDED_LENGTH, at most max_position_embeddings)."""
        longest = max(map(len, chunk))
        length = min(max(MIN_PADDED_LENGTH, 1 << (longest - 1).bit_length()), self.config.max_position_embeddings)
        input_ids = np.zeros((rows, length), np.int32)
        input_mask = np.zeros((rows, length), np.int32)
        for r, seq in enumerate(chunk):
            input_ids[r, :len(seq)] = seq
            input_mask[r, :len(seq)] = 1
        return input_ids, input_mask
