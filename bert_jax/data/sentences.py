"""Sentence splitting of paragraphs with pysbd (used by the text sources and the demo corpus)."""
from __future__ import annotations

import functools
import re

# pysbd splits only at these; a paragraph without one inside is one sentence.
_TERMINATORS = re.compile(r"[.!?。！？…]")


@functools.lru_cache(maxsize=None)
def _segmenter(language: str):
    import pysbd

    return pysbd.Segmenter(language=language, clean=False)


def split_sentences(paragraph: str, language: str = "en") -> list[str]:
    """Sentences of one paragraph, by pysbd (stripped, empty ones dropped)."""
    paragraph = paragraph.strip()
    if not paragraph:
        return []
    if not _TERMINATORS.search(paragraph[:-1]):  # pysbd is slow (~50 kB/s); skip the obvious
        return [paragraph]
    return [s for s in (s.strip() for s in _segmenter(language).segment(paragraph)) if s]
