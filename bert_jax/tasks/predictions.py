"""New text through a fine-tuned head: the inputs each head reads, and its outputs read back
as labels, entities or answers with character offsets into the original strings.

Each head reuses its fine-tuning task's featurisation, so text is cut and windowed exactly as
in training: a classifier sees `[CLS] text [SEP] (pair [SEP])` (`glue_data.featurize`); a
tagger's words are the tokenizer's words (split on spaces and punctuation, one per CJK
character, as BERT's basic tokenizer), windowed as `ner_data.featurize`; a QA model reads
`[CLS] question [SEP] passage window [SEP]` (`squad_data.featurize`). `run(token_ids,
first_segment_lengths)` is the model: per sequence, the head's outputs (class probabilities
[labels], token tag probabilities [tokens, labels], or start/end logits [tokens, 2]).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from bert_jax.tasks import glue_data, ner_data, squad_data

Run = Callable[[list[np.ndarray], np.ndarray | None], list[np.ndarray]]


def classify(run: Run, tokenizer, labels: Sequence[str] | None, texts: Sequence[str],
             pairs: Sequence[str] | None, max_seq_length: int) -> list[dict]:
    """{'label', 'probabilities': {label: p}} per text (pair), or {'score'} for regression
    (`labels` None)."""
    split = glue_data.GlueSplit(list(texts), None if pairs is None else list(pairs), None,
                                [str(i) for i in range(len(texts))])
    features = glue_data.featurize(split, tokenizer, max_seq_length)
    outputs = run(features.token_ids, features.first_segment_lengths)
    if labels is None:
        return [{"score": float(out[0])} for out in outputs]
    return [{"label": labels[int(np.argmax(out))],
             "probabilities": {name: round(float(p), 6) for name, p in zip(labels, out)}} for out in outputs]


def words(tokenizer, text: str) -> list[tuple[int, int]]:
    """[start, end) character spans of the tokenizer's words in `text`: a word starts at
    every piece that begins one (not a `##` continuation), CJK characters one each."""
    ids, offsets = tokenizer.encode_with_offsets(text)
    spans = []
    for starts, (start, end) in zip(tokenizer.word_start_mask(ids), offsets):
        if end <= start:  # a piece made of no character
            continue
        if starts or not spans:
            spans.append((start, end))
        else:
            spans[-1] = (spans[-1][0], end)
    return spans


def tag(run: Run, tokenizer, labels: Sequence[str], texts: Sequence[str], max_seq_length: int) -> list[dict]:
    """{'entities': [{'type', 'text', 'start', 'end', 'score'}]} per text: IOB2 spans of
    words (seqeval's reading of the tags), character offsets into the text, score the mean
    probability of the words' predicted tags."""
    from seqeval.metrics.sequence_labeling import get_entities

    spans = [words(tokenizer, text) for text in texts]
    sentences = [ner_data.Sentence([text[s:e] for s, e in ws], [labels[0]] * len(ws), 0)
                 for text, ws in zip(texts, spans)]
    features = ner_data.featurize(sentences, tokenizer, labels, max_seq_length)
    probabilities = run(features.token_ids, None)
    tag_ids = ner_data.word_predictions(features, [p.argmax(-1) for p in probabilities],
                                        [len(ws) for ws in spans])
    word_scores = ner_data.word_predictions(features, [p.max(-1) for p in probabilities],
                                            [len(ws) for ws in spans], dtype=np.float32)
    results = []
    for text, ws, ids, scores in zip(texts, spans, tag_ids, word_scores):
        entities = []
        for kind, first, last in get_entities([labels[i] for i in ids]):
            start, end = ws[first][0], ws[last][1]
            entities.append({"type": kind, "text": text[start:end], "start": start, "end": end,
                             "score": round(float(scores[first: last + 1].mean()), 6)})
        results.append({"entities": entities})
    return results


def answer(run: Run, tokenizer, contexts: Sequence[str], questions: Sequence[str], max_seq_length: int, *,
           doc_stride: int = 128, max_query_length: int = 64, n_best_size: int = 20,
           max_answer_length: int = 30) -> list[dict]:
    """{'answer', 'start', 'end', 'score'} per (context, question): the best span (start +
    end logit) over every window of the context, as `tasks.squad` answers; '' with start and
    end None when no span is valid."""
    examples = [squad_data.Example(str(i), q, c, ()) for i, (c, q) in enumerate(zip(contexts, questions))]
    features = squad_data.featurize(examples, tokenizer, max_seq_length, min(doc_stride, max_seq_length // 2),
                                    min(max_query_length, max_seq_length // 2))
    logits = run(features.token_ids, features.first_segment_lengths)
    n_best, _ = squad_data.best_answers(examples, features, [x[:, 0] for x in logits], [x[:, 1] for x in logits],
                                        n_best_size=n_best_size, max_answer_length=max_answer_length)
    results = []
    for example in examples:
        best = n_best[example.qid][:1]
        results.append({"answer": best[0].text, "start": best[0].start, "end": best[0].end,
                        "score": round(best[0].score, 6)} if best else
                       {"answer": "", "start": None, "end": None, "score": None})
    return results
