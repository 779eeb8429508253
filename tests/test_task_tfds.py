"""TFDS conll2003 and squad as the NER and SQuAD tasks' second source (config.data_source):
records shaped like the builders' features, served through TFDS's own mock (no download)."""
import numpy as np
import pytest

from bert_jax.tasks import ner, ner_data, squad, squad_data
from test_ner import ner_config
from test_squad import squad_config

tfds = pytest.importorskip("tensorflow_datasets")
tf = pytest.importorskip("tensorflow")

CONLL = {  # split -> (tokens, ner tag ids into the builder's names: O B-PER I-PER B-ORG I-ORG B-LOC I-LOC ...)
    "train": [(["EU", "rejects", "German", "call"], [3, 0, 7, 0]), (["Peter", "Blackburn"], [1, 2])],
    "dev": [(["Paris", "is", "big"], [5, 0, 0])],
    "test": [(["John", "Smith", "in", "Zürich"], [1, 2, 0, 5])],
}
CONTEXT = "Denver Broncos won Super Bowl 50 in Santa Clara."
SQUAD = {"train": [("q1", "Who won?", [("Denver Broncos", 0)], False)],
         "validation": [("q2", "Where?", [("Santa Clara", 36), ("Santa Clara.", 36)], False),
                        ("q3", "Who lost?", [], True)]}


def serve(records):
    """as_dataset_fn for tfds.testing.mock_data: `records(split)` as the builder's features."""
    def as_dataset(self, split, **kwargs):
        examples = records(self.name, str(split))
        features = self.info.features
        return tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=features.get_tensor_spec())
    return as_dataset


def conll_records(name, split):
    assert name == "conll2003"
    return [{"tokens": tokens, "ner": np.array(tags, np.int64), "pos": np.zeros(len(tags), np.int64),
             "chunks": np.zeros(len(tags), np.int64)} for tokens, tags in CONLL[split]]


def squad_records(name, split):
    assert name == "squad"
    out = []
    for qid, question, answers, impossible in SQUAD[split]:
        spans = {"text": [t for t, _ in answers], "answer_start": np.array([s for _, s in answers], np.int32)}
        out.append({"id": qid, "title": "SB50", "context": CONTEXT, "question": question, "answers": spans,
                    "is_impossible": impossible, "plausible_answers": spans})
    return out


def test_conll2003_from_tfds(minilm_tokenizer):
    with tfds.testing.mock_data(as_dataset_fn=serve(conll_records)):
        task = ner.build("ner", ner_config(data_source="tfds:conll2003", max_seq_length=16), minilm_tokenizer)
    assert task.labels == ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")  # the builder's
    assert task.num_train_examples == 2 and set(task.eval_sets) == {"dev", "test"}
    assert task.eval_sets["test"][0] == ner_data.Sentence(["John", "Smith", "in", "Zürich"],
                                                          ["B-PER", "I-PER", "O", "B-LOC"], 1)
    with pytest.raises(ValueError, match=r"tfds:conll2003:train: example 1 has 2 tokens but 1 ner tags"):
        ner_data.sentences_from_tfds([{"tokens": [b"a", b"b"], "ner": [0]}], ["O"], "tfds:conll2003:train")
    with pytest.raises(ValueError, match=r"config.data_source='conll2003': expected '' \(the files\) or 'tfds:NAME'"):
        ner.build("ner", ner_config(data_source="conll2003"), minilm_tokenizer)


def test_squad_from_tfds(minilm_tokenizer):
    with tfds.testing.mock_data(as_dataset_fn=serve(squad_records)):
        task = squad.build("squad", squad_config(data_source="tfds:squad/v2.0", version_2_with_negative=True,
                                                 max_seq_length=64, doc_stride=32), minilm_tokenizer)
    assert task.num_train_examples == 1 and [e.qid for e in task.dev] == ["q2", "q3"]
    assert task.dev[0].answers == (("Santa Clara", 36), ("Santa Clara.", 36)) and task.dev[1].is_impossible
    bad = squad_records("squad", "train")
    bad[0]["answers"]["answer_start"] = np.array([3], np.int32)
    with pytest.raises(ValueError, match=r"tfds:squad/v1.1:train: question q1: answer 'Denver Broncos' does not "
                                         r"match the context at answer_start 3"):
        squad_data.examples_from_tfds(bad, "tfds:squad/v1.1:train")
