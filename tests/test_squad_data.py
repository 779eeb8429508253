"""SQuAD: reader checks, passage windows and gold spans, answer search, official metrics."""
import json

import numpy as np
import pytest

from bert_jax.tasks import squad_data

CONTEXT = ("Denver Broncos defeated the Carolina Panthers 24–10 to earn their third Super Bowl title. "
           "The game was played at Levi's Stadium in Santa Clara, California.")


def squad_json(qas, context=CONTEXT, version="1.1"):
    return {"version": version, "data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}


def qa(qid, question, *answers, impossible=None):
    out = {"id": qid, "question": question,
           "answers": [{"text": t, "answer_start": CONTEXT.index(t) if s is None else s} for t, s in answers]}
    if impossible is not None:
        out["is_impossible"] = impossible
    return out


FIXTURE = [
    qa("first", "Who won?", ("Denver Broncos", None)),                                  # passage start
    qa("last", "Where?", ("Santa Clara, California.", None), ("Santa Clara", None),
       ("California", None)),                                                           # passage end
    qa("score", "What was the score?", ("24–10", None)),
]


@pytest.fixture(scope="module")
def tokenizer(minilm_tokenizer):
    return minilm_tokenizer


def write(tmp_path, content, name="train.json"):
    path = tmp_path / name
    path.write_text(json.dumps(content), encoding="utf-8")
    return str(path)


def one_hot(features, positions, value=10.0):
    out = []
    for window, position in enumerate(positions):
        logits = np.zeros(len(features.token_ids[window]) + 5)  # padding after the tokens is allowed
        logits[position] = value
        out.append(logits)
    return out


def gold_answers(examples, features, version_2=False, **kw):
    n_best, null_diff = squad_data.best_answers(examples, features, one_hot(features, features.start_positions),
                                           one_hot(features, features.end_positions), **kw)
    return squad_data.predictions(n_best, null_diff if version_2 else None)


def test_windows_and_gold_spans_at_passage_boundaries(tmp_path, tokenizer):
    examples = squad_data.read_squad(write(tmp_path, squad_json(FIXTURE)))
    assert [len(e.answers) for e in examples] == [1, 3, 1]
    features = squad_data.featurize(examples, tokenizer, max_seq_length=24, doc_stride=8, max_query_length=4)
    assert features.lengths.max() == 24
    for example_index, example in enumerate(examples):
        mine = np.nonzero(features.example_ids == example_index)[0]
        assert len(mine) > 2  # the passage is split
        found = [w for w in mine if features.start_positions[w] > 0]
        assert found, example.qid
        for w in found:  # gold tokens map back to exactly the answer's characters
            offsets = features.token_offsets[w]
            start, end = features.start_positions[w], features.end_positions[w]
            assert CONTEXT[offsets[start, 0]:offsets[end, 1]] == example.answers[0][0]
            assert features.first_segment_lengths[w] <= start <= end < len(features.token_ids[w]) - 1
    first_window = features.example_ids.tolist().index(0)
    assert features.start_positions[first_window] == features.first_segment_lengths[first_window]
    last_window = np.nonzero(features.example_ids == 1)[0][-1]
    assert features.end_positions[last_window] == len(features.token_ids[last_window]) - 2
    answers = gold_answers(examples, features)
    assert answers == {"first": "Denver Broncos", "last": "Santa Clara, California.", "score": "24–10"}
    assert squad_data.evaluate(examples, answers) == {"exact_match": 100.0, "f1": 100.0, "total": 3}


def test_unanswerable_questions_point_at_cls(tmp_path, tokenizer):
    qas = FIXTURE[:1] + [{"id": "no", "question": "Who lost the Super Bowl 49?", "answers": [],
                          "plausible_answers": [{"text": "Carolina Panthers", "answer_start": 28}],
                          "is_impossible": True}]
    path = write(tmp_path, squad_json(qas, version="v2.0"))
    with pytest.raises(ValueError, match=r"train.json: question no is unanswerable .*version_2_with_negative"):
        squad_data.read_squad(path)
    examples = squad_data.read_squad(path, version_2_with_negative=True)
    features = squad_data.featurize(examples, tokenizer, max_seq_length=32, doc_stride=8)
    unanswerable = features.example_ids == 1
    assert (features.start_positions[unanswerable] == 0).all() and (features.end_positions[unanswerable] == 0).all()
    answers = gold_answers(examples, features, version_2=True)
    assert answers == {"first": "Denver Broncos", "no": ""}
    assert squad_data.evaluate(examples, answers)["NoAns_exact_match"] == 100.0


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"bad.json: question score: answer '24–11' does not match the context "
                                         r"at answer_start 46 \('24–10'\)"):
        squad_data.read_squad(write(tmp_path, squad_json([qa("score", "?", ("24–11", 46))]), "bad.json"))
    with pytest.raises(ValueError, match=r"dup.json: question id first appears more than once"):
        squad_data.read_squad(write(tmp_path, squad_json([FIXTURE[0], FIXTURE[0]]), "dup.json"))
    with pytest.raises(ValueError, match=r"none.json: not a SQuAD JSON file"):
        squad_data.read_squad(write(tmp_path, [1, 2], "none.json"))


def test_cjk_answers_map_to_original_characters(tokenizer):
    context = "Die Hauptstadt von 日本 ist 東京都 (Tōkyō-to)."
    example = squad_data.Example("jp", "Hauptstadt?", context, (("東京", context.index("東京")),))
    features = squad_data.featurize([example], tokenizer, max_seq_length=64)
    assert gold_answers([example], features) == {"jp": "東京"}  # one token per CJK character


def test_samples_recover_gold_spans(shared_data, tokenizer):
    """Predicting the gold start/end tokens gives back the gold answers on the real samples."""
    examples = squad_data.read_squad(str(shared_data / "squad_sample" / "dev-v2.0-sample.json"), True)
    for max_seq_length, doc_stride in ((384, 128), (64, 16)):
        features = squad_data.featurize(examples, tokenizer, max_seq_length, doc_stride)
        results = squad_data.evaluate(examples, gold_answers(examples, features, version_2=True))
        assert (results["exact_match"], results["f1"], results["HasAns_total"], results["NoAns_total"]) == (
            100.0, 100.0, 96, 112)
    # The training file has one answer per question; 16 of them are annotated inside a word
    # ("gold" of "golden", "8" of "20–18"), which no token span can reproduce.
    examples = squad_data.read_squad(str(shared_data / "squad_sample" / "train-v1.1-sample.json"))
    features = squad_data.featurize(examples, tokenizer)
    answers = gold_answers(examples, features)
    wrong = {e.qid for e in examples if answers[e.qid] != e.answers[0][0]}
    assert len(examples) == 1057 and len(wrong) == 16
    for example in examples:
        text, start = example.answers[0]
        if example.qid in wrong:
            assert text in answers[example.qid] and answers[example.qid] != text
    aligned = [e for e in examples if e.qid not in wrong]
    assert squad_data.evaluate(aligned, answers)["exact_match"] == 100.0


def test_official_normalisation():
    assert squad_data.normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert squad_data.compute_exact("the Broncos", "Broncos.") == 1
    assert squad_data.compute_exact("an apple", "apple pie") == 0
    assert squad_data.compute_f1("Denver Broncos", "the Broncos") == pytest.approx(2 / 3)  # P 1, R 1/2
    assert squad_data.compute_f1("w b c d", "b c x") == pytest.approx(4 / 7)               # P 2/3, R 1/2
    assert squad_data.compute_f1("a b c d", "b c x") == pytest.approx(2 / 3)               # "a" is an article
    assert squad_data.compute_f1("", "") == 1.0 and squad_data.compute_f1("", "Paris") == 0.0


def test_evaluate_v2_splits_and_best_threshold():
    examples = [squad_data.Example("a", "?", "x", (("Denver Broncos", 0), ("Broncos", 7))),
                squad_data.Example("b", "?", "x", (("Santa Clara", 0),)),
                squad_data.Example("c", "?", "x", (), is_impossible=True)]
    answers = {"a": "the Broncos", "b": "Clara", "c": "Panthers"}
    results = squad_data.evaluate(examples, answers, null_diff={"a": -1.0, "b": 0.5, "c": 2.0})
    # a: exact 1 (matches "Broncos"); b: exact 0, f1 2/3; c: answered but unanswerable: 0.
    assert results["exact_match"] == pytest.approx(100 / 3) and results["f1"] == pytest.approx(100 * 5 / 9)
    assert (results["HasAns_total"], results["NoAns_total"], results["NoAns_f1"]) == (2, 1, 0.0)
    assert results["HasAns_f1"] == pytest.approx(100 * 5 / 6)
    # Answering a and b but not c is best: threshold at b's null_diff.
    assert results["best_f1"] == pytest.approx(100 * 8 / 9) and results["best_f1_thresh"] == 0.5
    assert results["best_exact_match"] == pytest.approx(200 / 3) and results["best_exact_match_thresh"] == -1.0


def test_answer_search_constraints():
    context = "aa bb cc dd"
    example = squad_data.Example("q", "?", context, ())
    offsets = np.array([[-1, -1], [-1, -1], [0, 2], [3, 5], [6, 8], [9, 11], [-1, -1]])
    features = squad_data.Features([np.zeros(7, np.int32)], np.array([2]), [offsets],
                              [np.array([0, 0, 1, 1, 1, 0, 0], bool)], np.array([0]), np.array([0]), np.array([0]))
    start = [np.array([3.0, 9.0, 1.0, 0.0, 2.0, 5.0, 0.0])]  # best start 1 is the question; 5 is not max context
    end = [np.array([1.0, 0.0, 8.0, 0.0, 0.0, 4.0, 0.0])]
    n_best, null_diff = squad_data.best_answers([example], features, start, end, n_best_size=5, max_answer_length=3)
    # Valid starts among the 5 best: 4 and 2; ends must be among the 5 best, >= start, within 3 tokens.
    assert [c.text for c in n_best["q"]] == ["aa", "cc dd", "aa bb"]
    assert n_best["q"][0].score == 9.0 and null_diff["q"] == (3.0 + 1.0) - 9.0
    assert squad_data.predictions(n_best, null_diff, null_threshold=-6.0) == {"q": ""}
    assert squad_data.predictions(n_best, null_diff, null_threshold=-4.0) == {"q": "aa"}


def test_predictions_file_is_the_official_format(tmp_path):
    squad_data.write_predictions(tmp_path / "predictions.json", {"56be4db0acb8001400a502ec": "Denver Broncos", "x": ""})
    assert json.loads((tmp_path / "predictions.json").read_text()) == {"56be4db0acb8001400a502ec": "Denver Broncos",
                                                                       "x": ""}
