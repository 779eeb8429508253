"""Predict with fine-tuned heads (bert_jax.inference.InferenceModel.predict, bert_jax.predict):
entities and answers with character offsets into the original (accented, CJK) text, windows
over long texts, JSON lines in and out, and inputs that do not fit the model's head.
(The classifier is predicted from a real fine-tuning workdir in tests/test_finetune.py.)"""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from bert_jax import model as M
from bert_jax import params as params_lib
from bert_jax import predict, weights
from bert_jax.inference import InferenceModel

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "zurich", "is", "big", "!", "東", "京", "##s", "what", "?"]
CFG = M.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=64)
TEXT = "Zürich is big! 東京はタワー isss"
WORDS = ["Zürich", "is", "big", "!", "東", "京", "はタワー", "isss"]  # hiragana/katakana are not split, as BERT's


def head_params(model, head, bias):
    params = jax.tree.map(np.array, params_lib.to_dict(nnx.state(model, nnx.Param)))
    params[head]["kernel"][:] = 0  # outputs from the bias alone: known predictions
    params[head]["bias"][:] = bias
    return params


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict_models")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tagger = head_params(M.BertForTokenClassification(CFG, 3, rngs=nnx.Rngs(0)), "token_classifier", [0, 5, 0])
    weights.save(CFG, tagger, d / "tagger", "hf", tokenizer_dir=d, labels=("O", "B-LOC", "I-LOC"))
    qa = head_params(M.BertForQuestionAnswering(CFG, rngs=nnx.Rngs(0)), "qa_outputs", 0)
    weights.save(CFG, qa, d / "qa", "npz", tokenizer_dir=d)
    weights.save(CFG, params_lib.init_params(CFG), d / "encoder", "npz", tokenizer_dir=d)
    return d


def test_tagger_entities_map_back_to_the_original_characters(models, tmp_path, capsys):
    model = InferenceModel.load(models / "tagger")  # a Hugging Face BertForTokenClassification dir
    assert model.task == "tagging" and model.labels == ("O", "B-LOC", "I-LOC")
    long_text = " ".join([TEXT] * 4)  # 4 x 11 tokens: windows of 14 tokens over it, each word predicted once
    [short, long] = model.predict([TEXT, long_text], max_seq_length=16, batch_size=3)
    for text, result, words in ((TEXT, short, WORDS), (long_text, long, WORDS * 4)):
        assert [e["text"] for e in result["entities"]] == words
        assert all(text[e["start"]:e["end"]] == e["text"] and e["type"] == "LOC" for e in result["entities"])
    assert short["entities"][4] == {"type": "LOC", "text": "東", "start": 15, "end": 16,
                                    "score": pytest.approx(float(np.exp(5) / (np.exp(5) + 2)), abs=1e-5)}

    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"id": 7, "text": "東京 is big"}, ensure_ascii=False) + "\n\n"
                      + json.dumps({"text": TEXT}, ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert predict.main(["--model", str(models / "tagger"), "--input", str(inputs), "--output", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert lines[0]["id"] == 7 and [e["text"] for e in lines[0]["prediction"]["entities"]] == ["東", "京", "is", "big"]
    assert lines[1]["prediction"] == short
    assert "2 predictions (a tagging model (3 labels: O, B-LOC, I-LOC)) written to" in capsys.readouterr().err

    # An input that does not fit the head: one line naming the model and what it is.
    assert predict.main(["--model", str(models / "tagger"), "--text", "x", "--question", "y?"]) == 2
    assert capsys.readouterr().err == (f"error: {models / 'tagger'}: a tagging model (3 labels: O, B-LOC, I-LOC) "
                                       "takes no questions (a question is for a question-answering model, e.g. one "
                                       "fine-tuned on SQuAD)\n")


def test_answers_are_slices_of_the_passage_and_mismatches_fail(models, capsys):
    model = InferenceModel.load(models / "qa")
    assert model.task == "question_answering" and model.labels is None
    passages = ["東京は big", "Zürich is big! " * 6]  # the second in windows (max_seq_length 16)
    results = model.predict(passages, questions=["what?", "what is big?"], max_seq_length=16)
    # Equal logits everywhere: the first valid span, the passage's first token.
    assert results == [{"answer": "東", "start": 0, "end": 1, "score": 0.0},
                       {"answer": "Zürich", "start": 0, "end": 6, "score": 0.0}]
    with pytest.raises(ValueError, match=r"/qa: a question-answering model needs a question for each text"):
        model.predict(["a passage"])
    with pytest.raises(ValueError, match=r"/qa: a question-answering model takes no text pairs"):
        model.predict(["a passage"], questions=["q?"], text_pairs=["b"])
    with pytest.raises(ValueError, match=r"predict: question 1 is empty"):
        model.predict(["a", "b"], questions=["q?", " "])
    with pytest.raises(ValueError, match=r"/encoder: a pretrained encoder without a fine-tuned task head; "
                                         r"fine-tune it first"):
        InferenceModel.load(models / "encoder").predict(["text"])
    assert predict.main(["--model", str(models / "qa"), "--text", "東京は big", "--question", "what?"]) == 0
    assert json.loads(capsys.readouterr().out)["prediction"]["answer"] == "東"
