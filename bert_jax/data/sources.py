"""Text sources: documents (lists of sentence strings) from files, TFDS or the demo corpus.

    stats = SourceStats()
    for document in text_file_documents(["corpus/*.txt"], format="auto", stats=stats):
        ...                                   # document: list[str], one sentence each
    print(stats.summary())                    # documents, sentences, skipped lines and why

    documents(DataSource("demo"))              # the embedded demo corpus (no download)
    documents(DataSource("tfds_text", name="wikipedia/20230601.en", data_dir="gs://bucket/tfds"))  # offline
    documents(DataSource.text("corpus/*.txt"))  # text files

    DataSource: where pretraining data comes from (text to prepare, or instances to load), one
    typed value: `from_config(config.data)` for pretraining, `DataSource.parse` for `--input`.

File formats: 'sentences' is Google's (one sentence per line, blank line between documents);
'paragraphs' is one paragraph per line (blank line between documents), split into sentences
with pysbd; 'wikiextractor' is WikiExtractor's output (`<doc id=.. url=.. title=..>`, the
title line, paragraph lines, `</doc>`): one document per <doc>, the tags and the title dropped,
paragraphs split with pysbd; 'auto' looks at a file's first 1000 lines (see `sniff_format`).

Lines of invalid UTF-8 are skipped, counted, and logged as `file:line` (the first few of
each file); an empty file or a glob matching nothing is an error naming it.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence

from bert_jax.data import demo_corpus
from bert_jax.data.sentences import split_sentences

log = logging.getLogger(__name__)

FORMATS = ("sentences", "paragraphs", "wikiextractor", "auto")
PARAGRAPH_FORMATS = ("paragraphs", "wikiextractor")  # lines are paragraphs, split by pysbd
_WARNINGS_PER_REASON = 5  # log the first few `file:line` per reason and file, count them all
# A sentence end followed by a capitalised word inside a line: the mark of paragraph lines.
_INTERIOR_BOUNDARY = re.compile(r"[.!?][\"')\]]*\s+[\"'(\[]?[A-Z]")
_DOC_OPEN = re.compile(r"<doc(\s[^>]*)?>$")  # WikiExtractor: <doc id="12" url="..." title="Anarchism">
_DOC_CLOSE = "</doc>"

Document = list  # list[str]: the sentences of one document, in order


@dataclasses.dataclass
class SourceStats:
    """What a source read, and what it skipped and why (reason -> count)."""

    documents: int = 0
    sentences: int = 0
    single_sentence_documents: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict = dataclasses.field(default_factory=dict)  # reason -> first few "file:line"

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < _WARNINGS_PER_REASON:
            shown.append(where)
            log.warning("%s: skipped line, %s%s", where, reason, f" ({detail})" if detail else "")

    def add_document(self, document: Sequence[str]) -> None:
        self.documents += 1
        self.sentences += len(document)
        self.single_sentence_documents += len(document) == 1

    def merge(self, other: SourceStats) -> None:
        self.documents += other.documents
        self.sentences += other.sentences
        self.single_sentence_documents += other.single_sentence_documents
        self.skipped.update(other.skipped)
        for reason, where in other.examples.items():
            self.examples.setdefault(reason, []).extend(where[:_WARNINGS_PER_REASON])

    def summary(self) -> str:
        text = (f"{self.documents} documents, {self.sentences} sentences "
                f"({self.single_sentence_documents} one-sentence documents)")
        for reason, count in sorted(self.skipped.items()):
            text += f"; skipped {count} lines: {reason} (e.g. {', '.join(self.examples.get(reason, [])[:3])})"
        return text


def sniff_format(lines: Sequence[str]) -> str:
    """'wikiextractor' when the first non-blank line is a `<doc ...>` tag; else 'paragraphs'
    when over 40% of non-blank lines hold a sentence boundary inside them.

    Measured: Google's sample_text.txt 13%, English Wikipedia paragraphs 66%."""
    lines = [line.strip() for line in lines if line.strip()]
    if not lines:
        return "sentences"
    if _DOC_OPEN.match(lines[0]):
        return "wikiextractor"
    interior = sum(bool(_INTERIOR_BOUNDARY.search(line.strip())) for line in lines)
    return "paragraphs" if interior > 0.4 * len(lines) else "sentences"


def expand_paths(patterns: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Files named by paths or glob patterns (sorted within a pattern); errors name the pattern."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    paths = []
    for pattern in map(os.fspath, patterns):
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no files match {pattern!r}")
            paths.extend(matches)
        elif not os.path.isfile(pattern):
            raise FileNotFoundError(f"text file {pattern} not found")
        else:
            paths.append(pattern)
    return paths


def _decoded_lines(path: str, stats: SourceStats) -> Iterator[tuple[int, str]]:
    """(line number, the line as str, stripped); invalid UTF-8 lines skipped and counted."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # byte-order mark
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                stats.skip("invalid UTF-8", f"{path}:{number}", f"byte {raw[e.start]:#04x} at column {e.start + 1}")
                continue
            yield number, line.strip()


def text_file_documents(
    paths, format: str = "auto", *, stats: SourceStats | None = None, split: bool = True,
    language: str = "en",
) -> Iterator[Document]:
    """Documents of local text files; a document never spans two files.

    split=False yields paragraph-format documents as lists of unsplit paragraphs, for a
    caller that splits them in worker processes with `sentences.split_sentences`.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    stats = stats if stats is not None else SourceStats()
    for path in expand_paths(paths):
        if os.path.getsize(path) == 0:
            raise ValueError(f"text file {path} is empty")
        lines = _decoded_lines(path, stats)
        file_format = format
        if format == "auto":
            head = [numbered for _, numbered in zip(range(1000), lines)]
            file_format = sniff_format([line for _, line in head])
            log.info("%s: read as %s", path, file_format)
            lines = _chain(head, lines)
        documents_before = stats.documents
        split_documents = _wikiextractor_documents if file_format == "wikiextractor" else _split_blank_lines
        for document in split_documents(lines, path):
            if file_format in PARAGRAPH_FORMATS and split:
                document = [s for paragraph in document for s in split_sentences(paragraph, language)]
            stats.add_document(document)
            yield document
        if stats.documents == documents_before:
            raise ValueError(f"text file {path} holds no text"
                             + (f" ({sum(stats.skipped.values())} lines skipped so far)" if stats.skipped else ""))


def _chain(head: list, rest: Iterator) -> Iterator:
    yield from head
    yield from rest


def _split_blank_lines(lines: Iterable[tuple[int, str]], path: str) -> Iterator[list[str]]:
    document = []
    for _, line in lines:
        if line:
            document.append(line)
        elif document:
            yield document
            document = []
    if document:
        yield document


def _wikiextractor_documents(lines: Iterable[tuple[int, str]], path: str) -> Iterator[list[str]]:
    """The paragraphs of each <doc>...</doc>, without the tags and the title (the line after <doc>).

    An unclosed <doc>, a </doc> without its <doc>, or text outside a <doc> is a ValueError naming
    the file and line."""
    opened, document, title_pending = 0, [], False  # opened: the line number of the open <doc>
    for number, line in lines:
        if _DOC_OPEN.match(line):
            if opened:
                raise ValueError(f"{path}:{opened}: <doc> not closed by </doc> before the next <doc> at line"
                                 f" {number} (a cut WikiExtractor file?)")
            opened, document, title_pending = number, [], True
        elif line == _DOC_CLOSE:
            if not opened:
                raise ValueError(f"{path}:{number}: </doc> without an opening <doc ...> line")
            if document:
                yield document
            opened = 0
        elif line and not opened:
            raise ValueError(f"{path}:{number}: text outside <doc>...</doc> in a WikiExtractor file "
                             "(read it with --format=paragraphs if it is not one)")
        elif line and title_pending:
            title_pending = False
        elif line:
            document.append(line)
    if opened:
        raise ValueError(f"{path}:{opened}: <doc> not closed by </doc> at the end of the file (a cut WikiExtractor"
                         " file?)")


def tfds_documents(
    name: str, *, data_dir: str | None = None, split: str = "train", text_key: str | None = None,
    stats: SourceStats | None = None, language: str = "en",
) -> Iterator[Document]:
    """Documents of a prepared TFDS dataset with a text feature (one example, one document).

    Never downloads: a dataset not prepared in `data_dir` is an error naming both. Lines of
    the text feature are paragraphs (Wikipedia, C4), split into sentences with pysbd.
    """
    import tensorflow_datasets as tfds

    stats = stats if stats is not None else SourceStats()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # unknown name with no files either
        raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared in data_dir={data_dir!r} "
                                f"({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in data_dir={str(builder.data_dir_root)!r}: prepare it "
            f"there first (tfds build {name} --data_dir=...); we never download while reading")
    text_key = text_key or _text_feature(builder, name)
    try:
        builder.info.splits[split]  # also accepts slices: 'train[:1%]'
    except (KeyError, ValueError) as e:
        raise ValueError(f"TFDS dataset {name!r} has no split {split!r}: {sorted(builder.info.splits)}") from e
    where = f"tfds:{name}[{split}]"
    for index, example in enumerate(_tfds_examples(builder, split)):
        text = example[text_key]
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                stats.skip("invalid UTF-8", f"{where}#{index}", str(e))
                continue
        document = [s for line in text.splitlines() for s in split_sentences(line, language)]
        if document:
            stats.add_document(document)
            yield document


def _text_feature(builder, name: str) -> str:
    import tensorflow_datasets as tfds

    features = builder.info.features
    if "text" in features:
        return "text"
    texts = [key for key, feature in features.items() if isinstance(feature, tfds.features.Text)]
    if len(texts) != 1:
        raise ValueError(f"TFDS dataset {name!r}: give text_key, one of its features {sorted(features)}")
    return texts[0]


def _tfds_examples(builder, split: str) -> Iterator[dict]:
    """Examples as numpy, by random access for ArrayRecord, else through tf.data (TFRecord)."""
    import tensorflow_datasets as tfds

    if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
        source = builder.as_data_source(split=split)
        for index in range(len(source)):
            yield source[index]
    else:
        yield from tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))


def documents(source: DataSource, *, format: str = "auto", stats: SourceStats | None = None,
              **kwargs) -> Iterator[Document]:
    """The documents of a text source (kind demo, text or tfds_text)."""
    if source.kind == "demo":
        stats = stats if stats is not None else SourceStats()
        for document in demo_corpus.documents():
            stats.add_document(document)
            yield document
    elif source.kind == "tfds_text":
        yield from tfds_documents(source.name, data_dir=source.data_dir or None, split=source.split, stats=stats,
                                  **kwargs)
    elif source.kind == "text":
        yield from text_file_documents(source.paths, format, stats=stats, **kwargs)
    else:
        raise ValueError(f"{source} holds pretraining instances, not text")


# ----------------------------------------------------------------------------
# Where pretraining data comes from, as one typed value

TEXT_KINDS = ("demo", "text", "tfds_text")           # text: tokenized into instances by `prepare`
INSTANCE_KINDS = ("prepared", "tfrecord", "tfds_corpus")   # instances: read by the loader as they are
TFDS_CORPUS = "bert_pretraining_corpus"                # the dataset of `bert_jax.data.tfds_corpus`


@dataclasses.dataclass(frozen=True)
class DataSource:
    """One pretraining data source, parsed once (from the config or a flag) and checked here.

    kind      demo (the embedded corpus), text (files), tfds_text (a TFDS text dataset): text,
              tokenized by `prepare`; prepared (a `prepare` output directory), tfrecord (Google's
              statically masked TFRecords), tfds_corpus (a prepared directory converted by
              `tfds_corpus`, read in place): instances
    paths     text, tfrecord: files or globs; prepared: its directory
    name      tfds_text: the TFDS name ('wikipedia/20230601.en'); tfds_corpus: NAME of
              bert_pretraining_corpus/NAME
    split     tfds_text: the TFDS split read (slices too: 'train[:1%]'); prepared and
              tfds_corpus: the split of instances ('train', 'eval'); tfrecord: only 'train'
    data_dir  TFDS data_dir ('' : $TFDS_DATA_DIR or ~/tensorflow_datasets)
    """
    kind: str
    paths: tuple[str, ...] = ()
    name: str = ""
    split: str = "train"
    data_dir: str = ""

    def __post_init__(self):
        object.__setattr__(self, "paths", tuple(os.fspath(p) for p in self.paths))
        if self.kind not in TEXT_KINDS + INSTANCE_KINDS:
            raise ValueError(f"data source kind {self.kind!r}: expected one of {TEXT_KINDS + INSTANCE_KINDS}")
        if (self.kind in ("text", "tfrecord", "prepared")) != bool(self.paths):
            raise ValueError(f"{self.kind} data source: paths {'required' if self.paths == () else 'not used'}")
        if self.kind == "prepared" and len(self.paths) != 1:
            raise ValueError(f"a prepared data source is one directory, got {list(self.paths)}")
        if self.kind.startswith("tfds") != bool(self.name):
            raise ValueError(f"{self.kind} data source: a TFDS name is {'required' if not self.name else 'not used'}")
        if self.kind == "tfds_corpus" and "/" in self.name:
            raise ValueError(f"tfds_corpus data source: give NAME of {TFDS_CORPUS}/NAME, got {self.name!r}")
        if self.kind == "tfrecord" and self.split != "train":
            raise ValueError("TFRecord inputs have no held-out split: give the eval files as another source")

    @classmethod
    def text(cls, *paths) -> DataSource:
        return cls("text", paths=paths)

    @classmethod
    def prepared(cls, directory, split: str = "train") -> DataSource:
        return cls("prepared", paths=(directory,), split=split)

    @classmethod
    def parse(cls, spec: str, *, tfds_data_dir: str = "") -> DataSource:
        """A text source as `prepare --input` spells it: 'demo', 'tfds:NAME[:SPLIT]', or files/globs
        (comma-separated)."""
        if spec == "demo":
            return cls("demo")
        if spec.startswith("tfds:"):
            name, _, split = spec[len("tfds:"):].partition(":")
            return cls("tfds_text", name=name, split=split or "train", data_dir=tfds_data_dir)
        return cls("text", paths=tuple(part for part in spec.split(",") if part))

    def spec(self) -> str:
        """A text source as `parse` reads it (what prepare's metadata.json records)."""
        if self.kind == "tfds_text":
            return f"tfds:{self.name}:{self.split}"
        if self.kind not in ("demo", "text"):
            raise ValueError(f"{self} is not a text source")
        return "demo" if self.kind == "demo" else ",".join(self.paths)

    @property
    def is_text(self) -> bool:
        return self.kind in TEXT_KINDS

    def with_split(self, split: str) -> DataSource:
        return dataclasses.replace(self, split=split)

    def __str__(self) -> str:
        if self.kind == "demo":
            return "the demo corpus"
        if self.kind == "tfds_text":
            return f"TFDS {self.name}[{self.split}]"
        if self.kind == "tfds_corpus":
            return f"TFDS {TFDS_CORPUS}/{self.name}[{self.split}]"
        where = ",".join(self.paths)
        return f"{where} [{self.split}]" if self.kind == "prepared" else where


def from_config(data) -> tuple[DataSource, DataSource | None]:
    """config.data -> (the source trained on, the evaluation source or None), checked.

    Text sources hold out `data.eval_fraction` of their documents when prepared, so their
    evaluation source comes from `prepare`'s output (the caller's business); a prepared
    directory has its 'eval' split and a converted TFDS corpus `data.tfds_eval_split` (either
    may be absent: no evaluation); TFRecords evaluate on `data.eval_path`.
    """
    def require(ok, key, message):
        if not ok:
            raise ValueError(f"config.data.{key}: {message} (got {data[key]!r})")

    kinds = ("demo", "text", "prepared", "tfrecord", "tfds")
    require(data.source in kinds, "source", f"must be one of {kinds}")
    require(data.source in ("demo", "tfds") or data.train_path, "train_path",
            f"required for data.source={data.source!r}")
    require(data.source == "tfrecord" or not data.eval_path, "eval_path",
            "only for data.source='tfrecord' (text holds out data.eval_fraction of its documents; prepared "
            "and TFDS corpora have an eval split)")
    if data.source == "demo":
        return DataSource("demo"), None
    if data.source == "text":
        return DataSource("text", paths=tuple(p for p in data.train_path.split(",") if p)), None
    if data.source == "prepared":
        train = DataSource.prepared(data.train_path)
        return train, train.with_split("eval")
    if data.source == "tfrecord":
        return (DataSource("tfrecord", paths=(data.train_path,)),
                DataSource("tfrecord", paths=(data.eval_path,)) if data.eval_path else None)
    require(data.tfds_name, "tfds_name", f"required for data.source='tfds' ({TFDS_CORPUS}/NAME or a TFDS text dataset)")
    dataset, _, name = data.tfds_name.partition("/")
    if dataset != TFDS_CORPUS:
        return DataSource("tfds_text", name=data.tfds_name, split=data.tfds_split, data_dir=data.tfds_data_dir), None
    require(name and "/" not in name, "tfds_name", f"a converted corpus is {TFDS_CORPUS}/NAME")
    train = DataSource("tfds_corpus", name=name, split=data.tfds_split, data_dir=data.tfds_data_dir)
    return train, train.with_split(data.tfds_eval_split) if data.tfds_eval_split else None
