r"""Text in, last hidden states out.

    python -m bert_jax.encode --model PATH --text "This is an example sentence." [--out hidden.npy]

PATH is any checkpoint ``bert_jax.convert`` reads (Hugging Face dir, Google TF dir, ``.npz``,
Orbax workdir; local or URI); the text is tokenized with the model's own vocabulary
(``[CLS] text [SEP]``, see bert_jax/inference.py). Texts longer than
``max_position_embeddings`` are truncated, with a warning; an empty text is an error. Prints
the shape and the first values, or saves ``[1, tokens, hidden]`` float32 to ``--out``.
Exit codes: 0 done, 2 bad input (one line on stderr).
"""
from __future__ import annotations

import logging
import sys

import numpy as np
from absl import flags

from bert_jax import cli, weights
from bert_jax.inference import InferenceModel


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("model", None, "checkpoint to encode with (path or URI)", flag_values=fv)
    flags.DEFINE_enum("format", "auto", ("auto", *weights.FORMATS_IN), "format of --model", flag_values=fv)
    flags.DEFINE_string("tokenizer", None, "tokenizer dir/file (default: the one beside the model)",
                        flag_values=fv)
    flags.DEFINE_string("text", None, "the text to encode", flag_values=fv)
    flags.DEFINE_string("out", None, "save hidden states [1, tokens, hidden] as .npy", flag_values=fv)
    flags.mark_flags_as_required(["model", "text"], flag_values=fv)


@cli.entrypoint
def main(argv=None) -> int:
    fv = cli.parse(argv, define_flags, __doc__, prog="python -m bert_jax.encode")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every read at INFO
    [encoded] = InferenceModel.load(fv.model, fv.format, fv.tokenizer).encode([fv.text])
    hidden = encoded.hidden[None]
    print(f"tokens: {encoded.tokens}")
    print(f"last_hidden_state: shape {hidden.shape}")
    if fv.out:
        np.save(fv.out, hidden)
        print(f"saved to {fv.out}")
    else:
        np.set_printoptions(precision=4, suppress=True, linewidth=120)
        print(hidden[0, :, :8], "...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
