"""Extractive question answering (SQuAD v1.1 and v2.0): reader, features, answer search, metrics.

The official JSON files, or TFDS `squad/v1.1` / `squad/v2.0` as a second source
(`config.data_source='tfds:squad/v1.1'`), read into the same checked examples.

Features follow Google's run_squad.py: `[CLS] question [SEP] passage window [SEP]`, the
question cut to max_query_length tokens, passages longer than the rest of the sequence
split into windows `doc_stride` tokens apart (`tasks.windows`). Tokens carry the character
span of the original context they came from (the tokenizer's offsets), so an answer is
always a slice of the context as written. An unanswerable question (v2.0), or an answer
outside a window, points at position 0 ([CLS]).

Answers are the best-scoring (start logit + end logit) valid span among the n_best_size
best starts and ends of every window of the question; for v2.0 the answer is empty when the
null score ([CLS] start + end) beats the best span by more than a threshold chosen on dev.

Metrics are the official evaluation script's (v2.0, which scores v1.1 files the same way):
exact match and F1 over normalised answers, maximum over the gold answers, in percent;
with HasAns/NoAns splits and the best null threshold when null scores are given.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import re
import string
from collections.abc import Iterable, Sequence

import numpy as np
from etils import epath

from bert_jax.tasks import tfds_split, windows


@dataclasses.dataclass(frozen=True)
class Example:
    qid: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...]  # (text, character start); empty when unanswerable
    is_impossible: bool = False


def read_squad(path: str, version_2_with_negative: bool = False) -> list[Example]:
    """Questions of a SQuAD JSON file, checked: answers match the context, ids are unique."""
    try:
        data = json.loads(epath.Path(path).read_text(encoding="utf-8"))["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a SQuAD JSON file with a top-level 'data' list ({e})") from e
    examples, seen = [], set()
    for article in data:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = [(a["text"], a["answer_start"]) for a in qa["answers"]]
                examples.append(_checked(path, seen, version_2_with_negative, qa["id"], qa["question"],
                                         paragraph["context"], answers, qa.get("is_impossible", False)))
    return examples


def _checked(source: str, seen: set, version_2_with_negative: bool, qid: str, question: str, context: str,
             answers, impossible) -> Example:
    """An Example whose answers match its context, its id not in `seen` (then added)."""
    if qid in seen:
        raise ValueError(f"{source}: question id {qid} appears more than once")
    seen.add(qid)
    impossible = bool(impossible)
    if impossible and not version_2_with_negative:
        raise ValueError(f"{source}: question {qid} is unanswerable (SQuAD 2.0); set version_2_with_negative=true")
    answers = () if impossible else tuple((text, int(start)) for text, start in answers)
    if not impossible and not answers:
        raise ValueError(f"{source}: question {qid} has no answers and is not marked is_impossible")
    for text, start in answers:
        if context[start: start + len(text)] != text:
            raise ValueError(f"{source}: question {qid}: answer {text!r} does not match the context "
                             f"at answer_start {start} ({context[start: start + len(text)]!r})")
    return Example(qid, question, context, answers, impossible)


TFDS_SPLITS = {"train": "train", "dev": "validation"}  # TFDS squad's split names


def examples_from_tfds(records: Iterable[dict], source: str, version_2_with_negative: bool = False) -> list[Example]:
    """TFDS `squad/v1.1` or `squad/v2.0` examples (bytes; `answers` {text, answer_start},
    v2.0's `is_impossible`) -> the examples `read_squad` makes, with the same checks."""
    def text(x):
        return x.decode("utf-8") if isinstance(x, bytes) else str(x)

    examples, seen = [], set()
    for record in records:
        answers = [(text(t), s) for t, s in zip(record["answers"]["text"], record["answers"]["answer_start"])]
        examples.append(_checked(source, seen, version_2_with_negative, text(record["id"]), text(record["question"]),
                                 text(record["context"]), answers, record.get("is_impossible", False)))
    if not examples:
        raise ValueError(f"{source}: no questions")
    return examples


def read_tfds(name: str, split: str, data_dir: str | None, version_2_with_negative: bool = False) -> list[Example]:
    """Questions of TFDS `name` (squad/v1.1, squad/v2.0) split `split` (train, dev), prepared under data_dir."""
    _, records = tfds_split.open_split(name, TFDS_SPLITS[split], data_dir)
    return examples_from_tfds(records, f"tfds:{name}:{TFDS_SPLITS[split]}", version_2_with_negative)


@dataclasses.dataclass
class Features:
    """One entry per (question, passage window), unpadded."""
    token_ids: list[np.ndarray]
    first_segment_lengths: np.ndarray  # [CLS] question [SEP]
    token_offsets: list[np.ndarray]    # [tokens, 2]: character span in the context; -1 outside it
    max_context: list[np.ndarray]      # bool per token: this window is the one to answer from there
    start_positions: np.ndarray        # gold answer tokens (0: no answer in this window)
    end_positions: np.ndarray
    example_ids: np.ndarray            # index of the Example

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(t) for t in self.token_ids), np.int32, len(self.token_ids))


def answer_token_span(offsets: np.ndarray, start: int, end: int) -> tuple[int, int]:
    """First and last token whose character span overlaps [start, end) of the context."""
    overlapping = np.nonzero((offsets[:, 1] > start) & (offsets[:, 0] < end) & (offsets[:, 1] > offsets[:, 0]))[0]
    if not len(overlapping):
        raise ValueError(f"no token covers characters [{start}, {end}) of the context")
    return int(overlapping[0]), int(overlapping[-1])


def featurize(examples: Sequence[Example], tokenizer, max_seq_length: int = 384, doc_stride: int = 128,
              max_query_length: int = 64) -> Features:
    """Windows of at most max_seq_length tokens with gold positions from each first answer."""
    out = Features([], [], [], [], [], [], [])
    contexts = {}  # paragraphs are shared by many questions: tokenize each once
    for index, example in enumerate(examples):
        if example.context not in contexts:
            ids, offsets = tokenizer.encode_with_offsets(example.context)
            contexts[example.context] = (np.asarray(ids, np.int32), np.asarray(offsets, np.int64).reshape(-1, 2))
        doc_ids, doc_offsets = contexts[example.context]
        query = tokenizer.encode(example.question)[:max_query_length]
        window = max_seq_length - len(query) - 3
        if window < 1:
            raise ValueError(f"max_seq_length={max_seq_length} leaves no room for the passage after a "
                             f"{len(query)}-token question (max_query_length={max_query_length})")
        gold = None
        if example.answers:
            text, start = example.answers[0]
            try:
                gold = answer_token_span(doc_offsets, start, start + len(text))
            except ValueError as e:
                raise ValueError(f"question {example.qid}: answer {text!r}: {e}") from e
        spans = windows.spans(len(doc_ids), window, doc_stride)
        owner = windows.max_context_window(spans, len(doc_ids))
        first = len(query) + 2
        for k, (start, size) in enumerate(spans):
            part = slice(start, start + size)
            out.token_ids.append(np.concatenate(
                [[tokenizer.cls_id], query, [tokenizer.sep_id], doc_ids[part], [tokenizer.sep_id]]).astype(np.int32))
            out.first_segment_lengths.append(first)
            offsets = np.full((first + size + 1, 2), -1, np.int64)
            offsets[first: first + size] = doc_offsets[part]
            out.token_offsets.append(offsets)
            out.max_context.append(np.pad(owner[part] == k, (first, 1)))
            inside = gold is not None and start <= gold[0] and gold[1] < start + size
            out.start_positions.append(gold[0] - start + first if inside else 0)
            out.end_positions.append(gold[1] - start + first if inside else 0)
            out.example_ids.append(index)
    for name in ("first_segment_lengths", "start_positions", "end_positions", "example_ids"):
        setattr(out, name, np.asarray(getattr(out, name), np.int32))
    return out


@dataclasses.dataclass(frozen=True)
class Candidate:
    text: str
    score: float  # start logit + end logit
    start: int    # character span in the context
    end: int


def best_answers(examples: Sequence[Example], features: Features, start_logits: Sequence[np.ndarray],
                 end_logits: Sequence[np.ndarray], *, n_best_size: int = 20, max_answer_length: int = 30
                 ) -> tuple[dict[str, list[Candidate]], dict[str, float]]:
    """Per question id: its n-best answers (best first, distinct texts) and its null score
    minus the best answer's score (the official script's "na_prob"; +inf without answers).
    Logits are per window, aligned with its tokens (padding after them allowed)."""
    by_example = collections.defaultdict(list)
    for window, example_index in enumerate(features.example_ids):
        by_example[int(example_index)].append(window)
    n_best, null_diff = {}, {}
    for index, example in enumerate(examples):
        candidates, null_score = [], np.inf
        for window in by_example[index]:
            offsets, owner = features.token_offsets[window], features.max_context[window]
            start, end = (np.asarray(l[window], np.float64)[: len(offsets)] for l in (start_logits, end_logits))
            null_score = min(null_score, start[0] + end[0])
            for i in np.argsort(-start, kind="stable")[:n_best_size]:
                for j in np.argsort(-end, kind="stable")[:n_best_size]:
                    if (offsets[i, 0] < 0 or offsets[j, 0] < 0 or not owner[i] or j < i
                            or j - i + 1 > max_answer_length):
                        continue
                    first, last = int(offsets[i, 0]), int(offsets[j, 1])
                    candidates.append(Candidate(example.context[first:last], float(start[i] + end[j]), first, last))
        distinct = {}
        for candidate in sorted(candidates, key=lambda c: -c.score):
            distinct.setdefault(candidate.text, candidate)
        n_best[example.qid] = list(distinct.values())[:n_best_size]
        null_diff[example.qid] = float(null_score - n_best[example.qid][0].score) if n_best[example.qid] else np.inf
    return n_best, null_diff


def predictions(n_best: dict[str, list[Candidate]], null_diff: dict[str, float] | None = None,
                null_threshold: float = 0.0) -> dict[str, str]:
    """{question id: answer text}, the official predictions.json: the best answer, or '' where
    the null score beats it by more than null_threshold (when null_diff is given, v2.0)."""
    return {qid: "" if not best or (null_diff is not None and null_diff[qid] > null_threshold) else best[0].text
            for qid, best in n_best.items()}


def write_predictions(path, answers: dict[str, str]) -> None:
    epath.Path(path).write_text(json.dumps(answers, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- The official evaluation (evaluate-v2.0.py), which scores v1.1 files the same way. ---

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, remove punctuation, articles (a, an, the) and extra whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s, flags=re.UNICODE)
    return " ".join(s.split())


def compute_exact(gold: str, predicted: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(predicted))


def compute_f1(gold: str, predicted: str) -> float:
    gold_tokens, predicted_tokens = normalize_answer(gold).split(), normalize_answer(predicted).split()
    if not gold_tokens or not predicted_tokens:  # no answer: 1 if both are empty
        return float(gold_tokens == predicted_tokens)
    common = collections.Counter(gold_tokens) & collections.Counter(predicted_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _gold_texts(example: Example) -> list[str]:
    return [text for text, _ in example.answers if normalize_answer(text)] or [""]


def _best_threshold(scores: dict[str, float], has_answer: dict[str, bool], answers: dict[str, str],
                    null_diff: dict[str, float]) -> tuple[float, float]:
    """The official find_best_thresh: start from answering nothing, then answer questions in
    increasing null_diff; the best total and the null_diff where it is reached."""
    total = best = sum(not has for has in has_answer.values())
    threshold = 0.0
    for qid in sorted(null_diff, key=null_diff.get):
        total += scores[qid] if has_answer[qid] else (-1 if answers[qid] else 0)
        if total > best:
            best, threshold = total, null_diff[qid]
    return 100.0 * best / len(scores), float(threshold)


def evaluate(examples: Sequence[Example], answers: dict[str, str], null_diff: dict[str, float] | None = None
             ) -> dict[str, float]:
    """exact_match and f1 (percent), with HasAns_/NoAns_ splits when the file has unanswerable
    questions; with null_diff also best_exact_match/best_f1 and the thresholds reaching them
    (`answers` then holds each question's best non-null answer)."""
    missing = [e.qid for e in examples if e.qid not in answers]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} questions (first: {missing[0]})")
    exact = {e.qid: max(compute_exact(g, answers[e.qid]) for g in _gold_texts(e)) for e in examples}
    f1 = {e.qid: max(compute_f1(g, answers[e.qid]) for g in _gold_texts(e)) for e in examples}
    has_answer = {e.qid: bool(e.answers) for e in examples}

    def summary(qids, prefix=""):
        return {f"{prefix}exact_match": 100.0 * sum(exact[q] for q in qids) / len(qids),
                f"{prefix}f1": 100.0 * sum(f1[q] for q in qids) / len(qids), f"{prefix}total": len(qids)}

    results = summary(list(exact))
    if not all(has_answer.values()):
        for prefix, wanted in (("HasAns_", True), ("NoAns_", False)):
            qids = [q for q, has in has_answer.items() if has == wanted]
            if qids:
                results.update(summary(qids, prefix))
    if null_diff is not None:
        for name, scores in (("exact_match", exact), ("f1", f1)):
            results[f"best_{name}"], results[f"best_{name}_thresh"] = _best_threshold(
                scores, has_answer, answers, null_diff)
    return results
