"""Text in, last hidden states out.

    python -m bert_jax.encode --model PATH --text "This is an example sentence." [--out hidden.npy]

PATH is any checkpoint ``bert_jax.convert`` reads (Hugging Face dir, Google TF dir,
``.npz``, Orbax workdir); the text is tokenized with the model's own vocabulary
(``[CLS] text [SEP]``). Texts longer than ``max_position_embeddings`` are truncated,
with a warning; an empty text is an error. Prints the shape and the first values,
or saves ``[1, tokens, hidden]`` float32 to ``--out``.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def encode_texts(model_path, texts, fmt: str = "auto", tokenizer_path=None):
    """-> list of (tokens, hidden [1, T, H] numpy) for each text."""
    import jax.numpy as jnp
    from flax import nnx

    from bert_jax import model as M
    from bert_jax import params as params_lib
    from bert_jax import weights
    from bert_jax.tokenizer import load_tokenizer

    cfg, params, _ = weights.load_pretrained(model_path, fmt)
    tok_dir = tokenizer_path or weights.find_tokenizer_files(model_path)
    if tok_dir is None:
        raise weights.ConversionError(f"{model_path}: no tokenizer (vocab.txt, tokenizer.json or a bert_jax "
                                      "tokenizer dir) found with the model; pass --tokenizer")
    tokenizer = load_tokenizer(tok_dir)
    weights.check_vocab(cfg, tokenizer, str(tok_dir))
    model = M.BertModel(cfg, rngs=nnx.Rngs(0))
    params_lib.load_params(model, params["bert"])
    results = []
    for text in texts:
        if not text or not text.strip():
            raise ValueError("encode: the text is empty")
        ids = tokenizer.encode(text)
        limit = cfg.max_position_embeddings - 2
        if len(ids) > limit:
            print(f"warning: text has {len(ids)} tokens; truncated to {limit} (max_position_embeddings="
                  f"{cfg.max_position_embeddings} with [CLS] and [SEP])", file=sys.stderr)
            ids = ids[:limit]
        ids = [tokenizer.cls_id, *ids, tokenizer.sep_id]
        arr = jnp.asarray([ids], jnp.int32)
        out = model(arr, jnp.ones_like(arr), jnp.zeros_like(arr))
        results.append((tokenizer.ids_to_tokens(ids), np.asarray(out["sequence_output"], np.float32)))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bert_jax.encode", description="Last hidden states of a text.")
    ap.add_argument("--model", required=True)
    ap.add_argument("--format", default="auto", choices=("auto", "hf", "tf", "npz", "orbax"))
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--text", required=True)
    ap.add_argument("--out", default=None, help="save hidden states [1, tokens, hidden] as .npy")
    args = ap.parse_args(argv)
    try:
        [(tokens, hidden)] = encode_texts(args.model, [args.text], args.format, args.tokenizer)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"tokens: {tokens}")
    print(f"last_hidden_state: shape {hidden.shape}")
    if args.out:
        np.save(args.out, hidden)
        print(f"saved to {args.out}")
    else:
        np.set_printoptions(precision=4, suppress=True, linewidth=120)
        print(hidden[0, :, :8], "...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
