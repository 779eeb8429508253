"""One split of a prepared TFDS dataset for a fine-tuning task (GLUE, CoNLL-2003, SQuAD):
the builder (its features name the labels) and the examples as numpy. Never downloads: a
dataset not prepared under `data_dir` is an error that says how to prepare it.

Tasks choose TFDS with `config.data_source='tfds:NAME'` (NER, SQuAD) or by giving no files
(GLUE); `config.tfds_data_dir` is where the prepared data lives ('' : TFDS's default).
"""
from __future__ import annotations

PREFIX = "tfds:"


def tfds_name(data_source: str, key: str = "config.data_source") -> str | None:
    """'tfds:NAME' -> NAME; '' -> None (the task's files)."""
    if not data_source:
        return None
    if not data_source.startswith(PREFIX) or not data_source[len(PREFIX):]:
        raise ValueError(f"{key}={data_source!r}: expected '' (the files) or 'tfds:NAME' (a prepared TFDS dataset)")
    return data_source[len(PREFIX):]


def builder(name: str, data_dir: str | None):
    """TFDS's builder of `name` (its features name the labels; no data read)."""
    import tensorflow_datasets as tfds  # heavy; only when asked for

    try:
        return tfds.builder(name, data_dir=data_dir or None)
    except Exception as error:  # tfds.core.registered.DatasetNotFoundError, ...
        raise ValueError(f"TFDS has no dataset {name!r} ({error})") from error


def open_split(name: str, split: str, data_dir: str | None):
    """-> (builder, iterable of numpy examples) of `name`'s `split`."""
    import tensorflow_datasets as tfds

    found = builder(name, data_dir)
    try:
        dataset = found.as_dataset(split=split, shuffle_files=False)
    except Exception as error:  # tfds raises several types for "not prepared"
        raise FileNotFoundError(f"TFDS dataset {name} split {split!r} is not available under "
                                f"data_dir={data_dir!r} (prepare it with `tfds build {name} "
                                f"--data_dir=...`): {error}") from error
    return found, tfds.as_numpy(dataset)
