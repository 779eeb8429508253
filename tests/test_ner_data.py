"""NER: CoNLL reader (IOB1/IOB2, -DOCSTART-, bad lines), word-piece windows, seqeval metrics."""

import numpy as np
import pytest

from bert_jax.tasks import ner_data, windows

# IOB1 as in the original files: B- only where an entity follows one of the same type.
IOB1 = """-DOCSTART- -X- O O

EU NNP I-NP I-ORG
rejects VBZ I-VP O
German JJ I-NP I-MISC
call NN I-NP O

Peter NNP I-NP I-PER
Blackburn NNP I-NP I-PER
Mary NNP I-NP B-PER
Smith NNP I-NP I-PER
Rome NNP I-NP I-LOC

-DOCSTART- -X- O O

Israel NNP I-NP B-LOC
"""
IOB2_TAGS = [["B-ORG", "O", "B-MISC", "O"], ["B-PER", "I-PER", "B-PER", "I-PER", "B-LOC"], ["B-LOC"]]


@pytest.fixture(scope="module")
def tokenizer(minilm_tokenizer):
    return minilm_tokenizer


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_iob1_and_iob2_read_the_same(tmp_path):
    iob1 = ner_data.read_conll(write(tmp_path, "eng.train", IOB1))
    assert [s.tags for s in iob1] == IOB2_TAGS
    assert iob1[0].words == ["EU", "rejects", "German", "call"] and iob1[1].line == 8
    # IOB2 input (two columns here, as some distributions have) gives the same sentences.
    iob2_text = "\n\n".join("\n".join(f"{w} {t}" for w, t in zip(s.words, s.tags)) for s in iob1)
    assert [s.tags for s in ner_data.read_conll(write(tmp_path, "train.txt", iob2_text))] == IOB2_TAGS
    assert ner_data.label_set(iob1) == ("O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER")


def test_bad_lines_are_named(tmp_path):
    path = write(tmp_path, "eng.train", IOB1.replace("call NN I-NP O", "call NN O"))
    with pytest.raises(ValueError, match=r"eng.train:6: 3 columns where the file has 4"):
        ner_data.read_conll(path)
    path = write(tmp_path, "eng.testa", IOB1.replace("Rome NNP I-NP I-LOC", "Rome NNP I-NP I-GPE"))
    with pytest.raises(ValueError, match=r"eng.testa:12: tag B-GPE is not in the label set"):
        ner_data.read_conll(path, labels=ner_data.label_set(ner_data.read_conll(write(tmp_path, "ok", IOB1))))
    path = write(tmp_path, "eng.testb", IOB1.replace("I-MISC", "E-MISC"))
    with pytest.raises(ValueError, match=r"eng.testb:5: tag 'E-MISC' is not O, B-TYPE or I-TYPE"):
        ner_data.read_conll(path)
    with pytest.raises(FileNotFoundError, match="no eng.train or train.txt"):
        ner_data.find_split_files(str(tmp_path / "nowhere"))


def test_real_sample_files(shared_data):
    files = ner_data.find_split_files(str(shared_data / "conll2003_sample"))
    assert sorted(files) == ["dev", "train"]
    train = ner_data.read_conll(files["train"])
    labels = ner_data.label_set(train)
    dev = ner_data.read_conll(files["dev"], labels)
    assert labels == ("O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER")
    assert train[0].words[:3] == ["EU", "rejects", "German"] and train[0].tags[:3] == ["B-ORG", "O", "B-MISC"]
    for sentence in train + dev:  # valid IOB2: every I-X continues an X entity
        for previous, tag in zip(["O"] + sentence.tags, sentence.tags):
            assert not tag.startswith("I-") or previous[2:] == tag[2:]
    assert ner_data.entity_metrics([s.tags for s in dev], [s.tags for s in dev])["f1"] == 1.0


def test_windows_cover_every_position_once():
    spans = windows.spans(10, 4, 2)
    assert spans == [(0, 4), (2, 4), (4, 4), (6, 4)]
    owner = windows.max_context_window(spans, 10)
    assert owner.tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]
    assert windows.spans(3, 4, 2) == [(0, 3)] and windows.spans(0, 4, 2) == [(0, 0)]


@pytest.mark.parametrize("max_seq_length", [128, 10])
def test_alignment_recovers_every_word(shared_data, tokenizer, max_seq_length):
    train = ner_data.read_conll(str(shared_data / "conll2003_sample" / "eng.train"))
    labels = ner_data.label_set(train)
    features = ner_data.featurize(train, tokenizer, labels, max_seq_length, stride=3)
    assert features.lengths.max() <= max_seq_length
    windowed = np.bincount(features.sentence_ids) > 1
    assert windowed.any() == (max_seq_length == 10)
    for ids, label_ids, word_ids in zip(features.token_ids, features.label_ids, features.word_ids):
        labelled = label_ids != ner_data.IGNORE
        assert (labelled == (word_ids >= 0)).all()
        assert tokenizer.word_start_mask(ids)[labelled].all()  # labels only on first sub-tokens
        assert not labelled[[0, -1]].any()                      # never on [CLS] / [SEP]
    # Gold labels as sub-token predictions give back every word's label, each from one window.
    counts = [np.zeros(len(s.words), int) for s in train]
    for sentence, words in zip(features.sentence_ids, features.word_ids):
        np.add.at(counts[sentence], words[words >= 0], 1)
    assert all((c == 1).all() for c in counts)
    padded = [np.pad(label_ids, (0, 3)) for label_ids in features.label_ids]
    recovered = ner_data.word_predictions(features, padded, [len(s.words) for s in train])
    assert [[labels[i] for i in r] for r in recovered] == [s.tags for s in train]


def test_long_sentence_split_with_context(tokenizer):
    words = [f"w{i}" for i in range(30)]  # "w12" -> "w", "##12": two sub-tokens per word
    sentence = ner_data.Sentence(words, ["B-PER"] + ["O"] * 29, 1)
    features = ner_data.featurize([sentence], tokenizer, ("O", "B-PER", "I-PER"), max_seq_length=22, stride=10)
    assert len(features) == 5 and features.lengths.max() == 22  # 60 sub-tokens, windows of 20 every 10
    for window in features.word_ids[1:-1]:  # inner windows predict their middle: context on both sides
        predicted = np.nonzero(window >= 0)[0]
        assert predicted[0] > 1 and predicted[-1] < len(window) - 2
    recovered = ner_data.word_predictions(features, features.label_ids, [30])[0]
    assert recovered.tolist() == [1] + [0] * 29


def test_entity_metrics_hand_computed():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-MISC", "I-MISC"]]
    predicted = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "I-MISC", "I-MISC"]]
    m = ner_data.entity_metrics(gold, predicted)
    # 4 gold entities, 4 predicted (conlleval: I-MISC after O starts one), 3 correct.
    assert m["precision"] == m["recall"] == m["f1"] == 0.75 and m["support"] == 4
    assert (m["PER/f1"], m["LOC/recall"], m["MISC/f1"]) == (1.0, 0.0, 1.0)
    assert (m["ORG/precision"], m["ORG/recall"]) == (0.5, 1.0) and m["ORG/f1"] == pytest.approx(2 / 3)


def test_write_conll_round_trips(tmp_path):
    sentences = ner_data.read_conll(write(tmp_path, "eng.testa", IOB1))
    predicted = [["O"] * len(s.words) for s in sentences]
    predicted[1][0] = "B-LOC"
    ner_data.write_conll(tmp_path / "dev.conll", sentences, predicted)
    lines = (tmp_path / "dev.conll").read_text().splitlines()
    assert lines[:2] == ["EU B-ORG O", "rejects O O"] and lines[5] == "Peter B-PER B-LOC"
    assert [s.tags for s in ner_data.read_conll(str(tmp_path / "dev.conll"))] == predicted
