"""The tokenized corpus on disk: appended chunk by chunk as `prepare` tokenizes, memory-mapped
by the workers that make instances (so no process holds the corpus in memory).

    writer = CorpusWriter(directory)
    writer.append(flat_tokens, sentence_lengths, sentences_per_document)   # per chunk, in order
    document_tokens = writer.close()          # tokens per document (8 bytes a document in memory)
    corpus = open_corpus(directory)           # instances.TokenizedCorpus of read-only memmaps

The three arrays of `instances.TokenizedCorpus`, as raw little-endian files (their lengths are
known only at the end, so no .npy header): tokens.int32 [T], sentence_offsets.int64 [S+1],
document_offsets.int64 [D+1].
"""
from __future__ import annotations

import pathlib

import numpy as np

from bert_jax.data.instances import TokenizedCorpus

_FILES = {"tokens": ("tokens.int32", np.dtype("<i4")),
          "sentence_offsets": ("sentence_offsets.int64", np.dtype("<i8")),
          "document_offsets": ("document_offsets.int64", np.dtype("<i8"))}


class CorpusWriter:
    """Appends tokenized documents to the files; counts tokens, sentences and documents."""

    def __init__(self, directory):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True)
        self._files = {name: open(self.directory / file, "wb") for name, (file, _) in _FILES.items()}
        self.tokens = self.sentences = self.documents = 0
        self._document_tokens = []
        self._write("sentence_offsets", [0])
        self._write("document_offsets", [0])

    def _write(self, name: str, values) -> None:
        self._files[name].write(np.asarray(values, _FILES[name][1]).tobytes())

    def append(self, flat_tokens: np.ndarray, sentence_lengths: np.ndarray, sentences_per_document: np.ndarray):
        """One chunk: its tokens, the length of each sentence, the sentences of each document (>= 1)."""
        if not len(sentences_per_document):
            return
        self._write("tokens", flat_tokens)
        self._write("sentence_offsets", self.tokens + np.cumsum(sentence_lengths, dtype=np.int64))
        self._write("document_offsets", self.sentences + np.cumsum(sentences_per_document, dtype=np.int64))
        first_sentences = np.cumsum(sentences_per_document) - sentences_per_document
        self._document_tokens.append(np.add.reduceat(np.asarray(sentence_lengths, np.int64), first_sentences))
        self.tokens += len(flat_tokens)
        self.sentences += len(sentence_lengths)
        self.documents += len(sentences_per_document)

    def close(self) -> np.ndarray:
        """Flushes the files; -> int64 [D], the tokens of each document."""
        for f in self._files.values():
            f.close()
        return np.concatenate(self._document_tokens) if self._document_tokens else np.zeros(0, np.int64)


def open_corpus(directory) -> TokenizedCorpus:
    """The corpus a `CorpusWriter` wrote, as read-only memory maps (pages are read on demand)."""
    directory = pathlib.Path(directory)
    return TokenizedCorpus(*(np.memmap(directory / file, dtype, mode="r") if (directory / file).stat().st_size
                             else np.zeros(0, dtype) for file, dtype in _FILES.values()))
