"""One tokenizer interface over WordPiece (`tokenizers`) and SentencePiece.

    tok = load_tokenizer("path/to/vocab.txt")      # or tokenizer.json, spiece.model, a saved dir
    ids = tok.encode("Hello world")                 # no special tokens; truncation is the caller's
    starts = tok.word_start_mask(ids)               # for whole-word masking
    tok.save("workdir/tokenizer")                   # files + tokenizer_config.json

Train a SentencePiece vocabulary with BERT's special tokens at ids 0..4:

    python -m bert_jax.tokenizer train --input corpus.txt --vocab_size 30522 \
        --model_type unigram --output workdir/tokenizer

Special tokens typed in raw text ("[MASK]") are never mapped to special ids, whatever
file the tokenizer came from, as in Google's create_pretraining_data.py: raw text must
not inject a [SEP] into an instance.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np
from absl import flags

from bert_jax import cli

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CONFIG_FILE = "tokenizer_config.json"
SENTENCEPIECE_FILE = "spiece.model"
_SP_ALIASES = {  # names other SentencePiece BERTs (ALBERT, ...) give the same roles
    "[PAD]": ("[PAD]", "<pad>"), "[UNK]": ("[UNK]", "<unk>"),
    "[CLS]": ("[CLS]", "<cls>"), "[SEP]": ("[SEP]", "<sep>"), "[MASK]": ("[MASK]", "<mask>"),
}


class Tokenizer:
    """Common interface; see WordPieceTokenizer and SentencePieceTokenizer."""

    kind: str
    lowercase: bool
    pad_id: int
    unk_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    _word_start_table: np.ndarray  # bool [vocab_size]: id begins a whitespace word

    @property
    def vocab_size(self) -> int:
        return len(self._word_start_table)

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and, per id, the [start, end) character span of `text` it came from (for mapping
        predicted token spans back to the original text; pieces made of no character get an
        empty span)."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def tokenize(self, text: str) -> list[str]:
        return self.ids_to_tokens(self.encode(text))

    def ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def encode_with_specials(self, text_a: str, text_b: str | None = None) -> tuple[list[int], list[int]]:
        """`[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]` ids and their segment ids (no truncation)."""
        return self.build_inputs(self.encode(text_a), None if text_b is None else self.encode(text_b))

    def build_inputs(self, ids_a: Sequence[int], ids_b: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
        ids = [self.cls_id, *ids_a, self.sep_id]
        segment_ids = [0] * len(ids)
        if ids_b is not None:
            ids += [*ids_b, self.sep_id]
            segment_ids += [1] * (len(ids_b) + 1)
        return ids, segment_ids

    def word_start_mask(self, ids) -> np.ndarray:
        """True where a token begins a word; special tokens are words of their own."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}): {ids.min()}..{ids.max()}")
        return self._word_start_table[ids]

    def save(self, directory) -> pathlib.Path:
        raise NotImplementedError

    def same_as(self, other: Tokenizer) -> bool:
        """The same kind, casing and token for every id (whatever files each was loaded from)."""
        return ((self.kind, self.lowercase, self.vocab_size) == (other.kind, other.lowercase, other.vocab_size)
                and self.ids_to_tokens(range(self.vocab_size)) == other.ids_to_tokens(range(other.vocab_size)))

    def _write_config(self, directory: pathlib.Path, **extra) -> None:
        # Also readable by transformers' AutoTokenizer for WordPiece (tokenizer_class, do_lower_case).
        config = {"kind": self.kind, "lowercase": self.lowercase, "do_lower_case": self.lowercase,
                  "vocab_size": self.vocab_size,
                  **dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"),
                             self.ids_to_tokens(self.special_ids))),
                  **extra}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, lowercase={self.lowercase})"


class WordPieceTokenizer(Tokenizer):
    """BERT WordPiece via the `tokenizers` library (Rust, batched)."""

    kind = "wordpiece"

    def __init__(self, backend, lowercase: bool, source: str = "<memory>"):
        import tokenizers

        if type(backend.model).__name__ != "WordPiece":
            raise ValueError(f"{source}: model type {type(backend.model).__name__} is not WordPiece; "
                             "load SentencePiece vocabularies from their .model file")
        backend.no_truncation()
        backend.no_padding()
        if backend.decoder is None:
            backend.decoder = tokenizers.decoders.WordPiece(prefix="##")
        self._backend = backend
        self.lowercase = lowercase
        vocab = backend.get_vocab(with_added_tokens=True)
        size = max(vocab.values()) + 1
        self._tokens = [""] * size
        for token, index in vocab.items():
            self._tokens[index] = token
        self._word_start_table = np.array([not t.startswith("##") for t in self._tokens], dtype=bool)
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"{source}: vocabulary lacks BERT special tokens {missing}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (vocab[t] for t in SPECIAL_TOKENS)

    @classmethod
    def from_vocab_file(cls, vocab_file, lowercase: bool | None = None) -> WordPieceTokenizer:
        import tokenizers
        from tokenizers import normalizers, pre_tokenizers

        vocab_file = pathlib.Path(vocab_file)
        if not vocab_file.is_file() or vocab_file.stat().st_size == 0:
            raise FileNotFoundError(f"WordPiece vocabulary {vocab_file} is missing or empty")
        if lowercase is None:
            lowercase = _infer_lowercase(vocab_file)
        backend = tokenizers.Tokenizer(tokenizers.models.WordPiece.from_file(
            str(vocab_file), unk_token="[UNK]", max_input_chars_per_word=100))
        # strip_accents=None follows lowercase, exactly as BERT's BasicTokenizer.
        backend.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = tokenizers.decoders.WordPiece(prefix="##")
        return cls(backend, lowercase, source=str(vocab_file))

    @classmethod
    def from_tokenizer_json(cls, path, lowercase: bool | None = None) -> WordPieceTokenizer:
        import tokenizers

        path = pathlib.Path(path)
        try:
            loaded = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust error names no file
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from e
        if type(loaded.model).__name__ != "WordPiece":
            raise ValueError(f"{path}: model type {type(loaded.model).__name__} is not WordPiece; "
                             "load SentencePiece vocabularies from their .model file")
        # Rebuild without the file's added tokens, so "[MASK]" in raw text stays text (as from vocab.txt).
        model = loaded.model
        backend = tokenizers.Tokenizer(tokenizers.models.WordPiece(
            model.get_vocab() if hasattr(model, "get_vocab") else loaded.get_vocab(with_added_tokens=False),
            unk_token=model.unk_token, continuing_subword_prefix=model.continuing_subword_prefix,
            max_input_chars_per_word=model.max_input_chars_per_word))
        backend.normalizer, backend.pre_tokenizer, backend.decoder = (
            loaded.normalizer, loaded.pre_tokenizer, loaded.decoder)
        if lowercase is None:
            normalizer = json.loads(path.read_text(encoding="utf-8")).get("normalizer") or {}
            lowercase = bool(normalizer.get("lowercase", False))
        return cls(backend, lowercase, source=str(path))

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # `tokenizers` tracks offsets through the normalizer (lower case, accents, CJK spacing).
        encoding = self._backend.encode(text, add_special_tokens=False)
        return encoding.ids, [tuple(o) for o in encoding.offsets]

    def decode(self, ids: Iterable[int]) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self._tokens[int(i)] for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def save(self, directory) -> pathlib.Path:
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "vocab.txt").write_text("".join(t + "\n" for t in self._tokens), encoding="utf-8")
        self._backend.save(str(directory / "tokenizer.json"))
        self._write_config(directory, tokenizer_class="BertTokenizer")
        return directory


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece (unigram or BPE); word starts are pieces beginning with '▁'."""

    kind = "sentencepiece"

    def __init__(self, model_file, lowercase: bool | None = None):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        self.model_file = pathlib.Path(model_file)
        if not self.model_file.is_file():
            raise FileNotFoundError(f"SentencePiece model {self.model_file} not found")
        self._model_proto = self.model_file.read_bytes()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._model_proto)
            proto = sentencepiece_model_pb2.ModelProto.FromString(self._model_proto)
        except Exception as e:
            raise ValueError(f"{self.model_file}: not a SentencePiece model ({e})") from e
        # Case folding lives in the model's normalizer ('nmt_nfkc_cf' folds case).
        self.lowercase = proto.normalizer_spec.name.endswith("_cf") if lowercase is None else lowercase
        own_word = {proto.SentencePiece.UNKNOWN, proto.SentencePiece.CONTROL, proto.SentencePiece.USER_DEFINED}
        self._word_start_table = np.array(
            [piece.piece.startswith("▁") or piece.type in own_word for piece in proto.pieces], dtype=bool)
        sp = self._sp
        ids = {}
        for name, aliases in _SP_ALIASES.items():
            found = [sp.piece_to_id(a) for a in aliases if sp.id_to_piece(sp.piece_to_id(a)) == a]
            if not found:
                raise ValueError(f"{self.model_file}: SentencePiece model lacks special token {name} "
                                 f"(looked for {list(aliases)})")
            ids[name] = found[0]
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (ids[t] for t in SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # SentencePiece reports UTF-8 byte offsets, and a piece's span includes the
        # whitespace its '▁' stands for: map bytes to characters and drop that whitespace.
        pieces = self._sp.encode(text, return_type="proto").pieces
        char_at_byte = np.zeros(len(text.encode("utf-8")) + 1, np.int64)
        char_at_byte[np.cumsum([0] + [len(c.encode("utf-8")) for c in text])] = np.arange(len(text) + 1)
        char_at_byte = np.maximum.accumulate(char_at_byte)
        offsets = []
        for piece in pieces:
            start, end = int(char_at_byte[piece.begin]), int(char_at_byte[piece.end])
            while start < end and text[start].isspace():
                start += 1
            offsets.append((start, end))
        return [piece.id for piece in pieces], offsets

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self._sp.id_to_piece(int(i)) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        index = self._sp.piece_to_id(token)
        return index if self._sp.id_to_piece(index) == token else None

    def save(self, directory) -> pathlib.Path:
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / SENTENCEPIECE_FILE).write_bytes(self._model_proto)
        self._write_config(directory, model_file=SENTENCEPIECE_FILE)
        return directory


def _infer_lowercase(vocab_file: pathlib.Path) -> bool:
    """A vocabulary is cased iff some ordinary token has an upper-case letter; an HF
    tokenizer_config.json beside it (do_lower_case) wins."""
    hf_config = vocab_file.parent / CONFIG_FILE
    if hf_config.is_file():
        config = json.loads(hf_config.read_text(encoding="utf-8"))
        if "do_lower_case" in config:
            return bool(config["do_lower_case"])
    with open(vocab_file, encoding="utf-8") as f:
        for line in f:
            token = line.rstrip("\n")
            if not (token.startswith("[") and token.endswith("]")) and token != token.lower():
                return False
    return True


def load_tokenizer(path, lowercase: bool | None = None) -> Tokenizer:
    """Load a saved directory, a WordPiece vocab.txt, a tokenizer.json or a SentencePiece .model."""
    path = pathlib.Path(path)
    if path.is_dir():
        config_file = path / CONFIG_FILE
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        if lowercase is None and "lowercase" in config:
            lowercase = bool(config["lowercase"])
        kind = config.get("kind")
        if kind == "sentencepiece" or (kind is None and (path / SENTENCEPIECE_FILE).is_file()):
            return SentencePieceTokenizer(path / config.get("model_file", SENTENCEPIECE_FILE), lowercase)
        if kind not in (None, "wordpiece"):
            raise ValueError(f"{config_file}: unknown tokenizer kind {kind!r} (wordpiece|sentencepiece)")
        for name in ("tokenizer.json", "vocab.txt"):
            if (path / name).is_file():
                return load_tokenizer(path / name, lowercase)
        models = sorted(path.glob("*.model"))
        if models:
            return SentencePieceTokenizer(models[0], lowercase)
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}, tokenizer.json, vocab.txt or *.model found")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} not found")
    if path.suffix == ".json":
        return WordPieceTokenizer.from_tokenizer_json(path, lowercase)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path, lowercase)
    return WordPieceTokenizer.from_vocab_file(path, lowercase)


def train_sentencepiece(
    input_files: Sequence[str] | None = None,
    output_dir: str | os.PathLike = "tokenizer",
    *,
    sentences: Iterable[str] | None = None,
    vocab_size: int = 30522,
    model_type: str = "unigram",
    lowercase: bool = False,
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    input_sentence_size: int = 10_000_000,
    seed: int = 0,
    num_threads: int | None = None,
) -> SentencePieceTokenizer:
    """Train with sentencepiece's own trainer; [PAD],[UNK],[CLS],[SEP],[MASK] get ids 0..4.

    Give `input_files` (text, one sentence or paragraph per line; read by the C++ trainer)
    or an iterable of `sentences`. byte_fallback makes any text round-trip through decode.
    """
    import sentencepiece as spm

    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    if (input_files is None) == (sentences is None):
        raise ValueError("give exactly one of input_files or sentences")
    minimum = len(SPECIAL_TOKENS) + (256 if byte_fallback else 0) + 1
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} too small: need > {minimum - 1} "
                         f"({'256 byte pieces + ' if byte_fallback else ''}5 special tokens)")
    if input_files is not None:
        for f in input_files:
            if not os.path.isfile(f) or os.path.getsize(f) == 0:
                raise FileNotFoundError(f"tokenizer training input {f} is missing or empty")
    output_dir = pathlib.Path(output_dir)
    with tempfile.TemporaryDirectory() as tmp:
        options = dict(
            model_prefix=os.path.join(tmp, "spiece"), vocab_size=vocab_size, model_type=model_type,
            pad_id=0, pad_piece="[PAD]", unk_id=1, unk_piece="[UNK]", bos_id=-1, eos_id=-1,
            # control symbols: fixed ids 2..4, never produced from raw text
            control_symbols=["[CLS]", "[SEP]", "[MASK]"],
            normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
            character_coverage=character_coverage, byte_fallback=byte_fallback,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            num_threads=num_threads or os.cpu_count() or 1,
            train_extremely_large_corpus=False, minloglevel=2,
        )
        spm.set_random_generator_seed(seed)  # sampling of input_sentence_size lines
        if input_files is not None:
            spm.SentencePieceTrainer.train(input=list(map(str, input_files)), **options)
        else:
            spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), **options)
        tokenizer = SentencePieceTokenizer(os.path.join(tmp, "spiece.model"), lowercase)
    if tokenizer.special_ids != (0, 1, 2, 3, 4):
        raise AssertionError(f"special ids came out as {tokenizer.special_ids}")
    tokenizer.save(output_dir)
    return load_tokenizer(output_dir)


def _define_train_flags(fv) -> None:
    flags.DEFINE_multi_string("input", None, "text files (one sentence or paragraph per line; several may follow "
                              "one --input), or 'demo' for the built-in corpus", flag_values=fv)
    flags.DEFINE_string("output", None, "directory to save the tokenizer into", flag_values=fv)
    flags.DEFINE_integer("vocab_size", 30522, "vocabulary size", flag_values=fv)
    flags.DEFINE_enum("model_type", "unigram", ("unigram", "bpe"), "SentencePiece model type", flag_values=fv)
    flags.DEFINE_boolean("lowercase", False, "case-fold (uncased vocabulary)", flag_values=fv)
    flags.DEFINE_float("character_coverage", 0.9995, "share of characters covered", flag_values=fv)
    flags.DEFINE_boolean("no_byte_fallback", False, "no byte pieces for unknown characters", flag_values=fv)
    flags.DEFINE_integer("input_sentence_size", 10_000_000, "sample at most this many lines", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the line sampling", flag_values=fv)
    for name in ("input", "output"):
        flags.mark_flag_as_required(name, flag_values=fv)


_USAGE = """commands:
  train --input FILE [FILE ...] --output DIR [--vocab_size N ...]   train a SentencePiece vocabulary
  show PATH [TEXT ...]                                             print a tokenizer's summary and tokenize text"""


@cli.entrypoint
def main(argv: Sequence[str] | None = None) -> None:
    prog = "python -m bert_jax.tokenizer"
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    if command not in ("train", "show"):
        if command in cli.HELP:
            print(f"usage: {prog} {{train,show}} ...\n\n{_USAGE}")
            return
        cli.usage_error(prog, f"give a command, train or show, not {command!r}")
    if command == "train":
        fv, extra_inputs = cli.parse_with_positional(argv[1:], _define_train_flags, _USAGE, prog=f"{prog} train")
        inputs = fv.input + extra_inputs  # a shell glob after --input gives several files
        kwargs = dict(vocab_size=fv.vocab_size, model_type=fv.model_type, lowercase=fv.lowercase,
                      character_coverage=fv.character_coverage, byte_fallback=not fv.no_byte_fallback,
                      input_sentence_size=fv.input_sentence_size, seed=fv.seed)
        if inputs == ["demo"]:
            from bert_jax.data import demo_corpus

            sentences = (s for doc in demo_corpus.documents() for s in doc)
            tokenizer = train_sentencepiece(None, fv.output, sentences=sentences, **kwargs)
        else:
            tokenizer = train_sentencepiece(inputs, fv.output, **kwargs)
        print(f"saved {tokenizer} to {fv.output}")
    else:
        _, positional = cli.parse_with_positional(argv[1:], lambda fv: None, _USAGE, prog=f"{prog} show")
        if not positional:
            cli.usage_error(f"{prog} show", "give the tokenizer's path")
        tokenizer = load_tokenizer(positional[0])
        print(tokenizer, "special ids", tokenizer.special_ids)
        for text in positional[1:]:
            print(tokenizer.tokenize(text))


if __name__ == "__main__":
    sys.exit(main())
