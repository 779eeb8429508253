"""Held-out masked-LM quality a reader can judge: accuracy on fixed masks next to the unigram
baseline, and a masked word's top predictions.

    batch = fixed_mask_batch(input_ids, input_mask, vocab, seed=0)   # the same masks every time
    baseline = unigram_baseline(token_counts(train_ids, train_mask, V, special_ids), batch)
    fill_mask(model_config, params, tokenizer, ["the [MASK] of the function"])

The unigram baseline predicts, at every masked position, the most frequent training token (its
accuracy) with the training tokens' frequencies as probabilities (its loss): what a model that
ignores the context can reach. Used by the demo's summary and the time-to-accuracy benchmark.
"""
from __future__ import annotations

import functools
import pathlib

import jax
import numpy as np
from flax import nnx

from bert_jax import checkpoint, losses
from bert_jax import params as params_lib
from bert_jax import tokenizer as tokenizer_lib
from bert_jax.data import instances, loader, masking
from bert_jax.model import BertForPreTraining
from bert_jax.tasks import batching

_FIXED_MASK_PURPOSE = 0x6576616C  # keeps these masks apart from the loader's and prepare's


def chunk_documents(documents, seq_len: int, cls_id: int, sep_id: int) -> np.ndarray:
    """Token-id documents (lists of id lists) -> [N, seq_len] rows ``[CLS] tokens [SEP]``, each
    document's tokens cut in consecutive full-length pieces (a shorter last piece is dropped)."""
    body = seq_len - 2
    rows = []
    for document in documents:
        flat = np.fromiter((i for ids in document for i in ids), np.int32)
        for start in range(0, len(flat) - body + 1, body):
            rows.append(np.concatenate([[cls_id], flat[start:start + body], [sep_id]]))
    if not rows:
        raise ValueError(f"chunk_documents: no document holds {body} tokens")
    return np.stack(rows).astype(np.int32)


def fixed_mask_batch(input_ids, input_mask, vocab: masking.MaskingVocab, *, seed: int = 0,
                     masked_lm_prob: float = 0.15, max_predictions_per_seq: int | None = None) -> dict:
    """A pretraining batch (Google's names, single segments, NSP label 0) whose 80/10/10 masks
    depend only on (seed, row): every model and every evaluation sees the same ones."""
    input_ids, input_mask = np.asarray(input_ids, np.int32), np.asarray(input_mask, np.int32)
    predictions = max_predictions_per_seq or max(1, round(input_ids.shape[1] * masked_lm_prob))
    keys = masking.example_keys(seed, _FIXED_MASK_PURPOSE, np.arange(len(input_ids)))
    masked = masking.mask_batch(input_ids, input_mask, keys, vocab, max_predictions_per_seq=predictions,
                                masked_lm_prob=masked_lm_prob)
    return {**masked, "input_mask": input_mask, "segment_ids": np.zeros_like(input_ids),
            "next_sentence_labels": np.zeros(len(input_ids), np.int32)}


def token_counts(input_ids, input_mask, vocab_size: int, special_ids) -> np.ndarray:
    """How often each id occurs among the real tokens (special ids count 0)."""
    ids = np.asarray(input_ids)[np.asarray(input_mask).astype(bool)]
    counts = np.bincount(ids.astype(np.int64), minlength=vocab_size)[:vocab_size].astype(np.float64)
    counts[list(special_ids)] = 0
    return counts


def unigram_baseline(counts: np.ndarray, batch: dict) -> dict:
    """Accuracy of predicting the most frequent token at every masked position of ``batch``, and
    the cross-entropy of the (add-one smoothed) unigram distribution there."""
    weights = np.asarray(batch["masked_lm_weights"], np.float64)
    ids = np.asarray(batch["masked_lm_ids"])
    top = int(np.argmax(counts))
    probabilities = (counts + 1) / (counts.sum() + len(counts))
    total = weights.sum()
    return {"accuracy": float(((ids == top) * weights).sum() / total),
            "loss": float((-np.log(probabilities[ids]) * weights).sum() / total), "token": top}


def _canonical(model_config, params):
    """(config, params) in the canonical layer layout (one entry per layer), scanned or not."""
    return (model_config.replace(scan_layers=False),
            params_lib.unstack_layers(params, model_config.num_hidden_layers))


def pretraining_graphdef(model_config, params):
    """The pretraining model's graph for ``params``: with an NSP head when they hold one
    (``train.objective=mlm_nsp``), without it for MLM-only checkpoints."""
    next_sentence = "nsp" in params
    return nnx.split(nnx.eval_shape(lambda: BertForPreTraining(model_config, next_sentence=next_sentence,
                                                               rngs=nnx.Rngs(0))))[0]


@functools.lru_cache(maxsize=4)
def _jitted(model_config, next_sentence: bool):
    """(sums, logits), jitted, one per model: (params, batch) -> (loss sum, correct sum) at the
    masked positions, and (params, batch, positions) -> masked-LM logits there."""
    graphdef = pretraining_graphdef(model_config, {"nsp": None} if next_sentence else {})

    @jax.jit
    def logits(params, batch, positions):
        return losses.forward(params, graphdef, batch, None, True, positions)["mlm_logits"]

    @jax.jit
    def sums(params, batch):
        return losses.cross_entropy_sums(logits(params, batch, batch["masked_lm_positions"]),
                                         batch["masked_lm_ids"], batch["masked_lm_weights"])
    return sums, logits


def evaluate(model_config, params, batch: dict, rows: int = 64) -> dict:
    """Masked-LM accuracy and loss of ``params`` on ``batch``, ``rows`` sequences at a time (a
    shorter last slice is filled up with its own rows at weight 0: one program compiles)."""
    model_config, params = _canonical(model_config, params)
    sums = _jitted(model_config, "nsp" in params)[0]
    size = len(batch["input_ids"])
    rows = min(rows, size)
    total_loss = total_correct = 0.0
    for start in range(0, size, rows):
        index = np.arange(start, start + rows)
        part = {k: np.asarray(v)[index % size] for k, v in batch.items()}
        part["masked_lm_weights"] = part["masked_lm_weights"] * (index < size)[:, None]
        loss, correct = sums(params, part)
        total_loss, total_correct = total_loss + float(loss), total_correct + float(correct)
    masked = float(np.sum(batch["masked_lm_weights"]))
    return {"accuracy": total_correct / masked, "loss": total_loss / masked, "masked_tokens": int(masked)}


def masked_word_examples(input_ids, input_mask, tokenizer, count: int, *, window: int = 12, seed: int = 0):
    """``count`` (text with one word as ``[MASK]``, the word) from different rows: a one-piece
    alphabetic word of 3+ letters, chosen at random (seeded), with ``window`` tokens each side."""
    rng = np.random.default_rng(seed)
    starts = tokenizer.word_start_mask(np.asarray(input_ids))
    examples = []
    for row in rng.permutation(len(input_ids)):
        ids, n = np.asarray(input_ids[row]), int(np.sum(input_mask[row]))
        pieces = tokenizer.ids_to_tokens(ids[:n].tolist())
        eligible = [j for j in range(window, n - window) if starts[row, j] and starts[row, j + 1]
                    and ids[j] not in tokenizer.special_ids and pieces[j].lstrip("\u2581").isalpha()
                    and len(pieces[j].lstrip("\u2581")) >= 3
                    and not np.isin(ids[j - window:j + window + 1], tokenizer.special_ids).any()]
        if eligible:
            j = int(rng.choice(eligible))
            text = (f"{tokenizer.decode(ids[j - window:j].tolist())} [MASK] "
                    f"{tokenizer.decode(ids[j + 1:j + window + 1].tolist())}")
            examples.append((text, pieces[j].lstrip("\u2581")))
            if len(examples) == count:
                break
    return examples


def fill_mask(model_config, params, tokenizer, texts, k: int = 5) -> list[list[tuple[str, float]]]:
    """The top ``k`` (token, probability) at the first ``[MASK]`` of each text (``[CLS] text [SEP]``);
    the texts go through the model as one padded batch."""
    rows, positions = [], []
    for text in texts:
        before, found, after = text.partition("[MASK]")
        if not found:
            raise ValueError(f"fill_mask: no [MASK] in {text!r}")
        left, right = tokenizer.encode(before), tokenizer.encode(after)
        rows.append([tokenizer.cls_id, *left, tokenizer.mask_id, *right, tokenizer.sep_id])
        positions.append([len(left) + 1])
    if not rows:
        return []
    model_config, params = _canonical(model_config, params)
    batch = batching.encoder_inputs([np.asarray(r, np.int32) for r in rows], None, len(rows), max(map(len, rows)),
                                    tokenizer.pad_id)
    logits = _jitted(model_config, "nsp" in params)[1](params, batch, np.asarray(positions, np.int32))
    probabilities = np.asarray(jax.nn.softmax(logits[:, 0, :tokenizer.vocab_size].astype(np.float32)))
    results = []
    for row in probabilities:
        best = np.argsort(-row)[:k]
        results.append(list(zip(tokenizer.ids_to_tokens(best.tolist()), row[best].tolist())))
    return results


def prepared_rows(data_dir, split: str) -> np.ndarray:
    """Every instance row of one split of a ``bert_jax.data.prepare`` directory."""
    shards = loader.read_metadata(data_dir)["splits"][split]["shards"]
    return loader.InstanceShards([pathlib.Path(data_dir) / s["file"] for s in shards]).read(
        np.arange(sum(s["instances"] for s in shards)))


def pretraining_report(workdir, *, data_dir=None, sequences: int = 256, examples: int = 4, seed: int = 0) -> str:
    """A pretraining workdir's newest checkpoint on the held-out instances of its prepared data
    (``data_dir``, default workdir/data; fixed 15% masks) against the unigram baseline of the
    training instances, and a few masked held-out words."""
    model_config, params, tokenizer_dir = checkpoint.restore_params(workdir)
    tok = tokenizer_lib.load_tokenizer(tokenizer_dir)
    data_dir = pathlib.Path(data_dir or pathlib.Path(workdir) / "data")
    held_out = instances.unmasked_batch(prepared_rows(data_dir, "eval")[:sequences])
    train = instances.unmasked_batch(prepared_rows(data_dir, "train"))
    batch = {**fixed_mask_batch(held_out["input_ids"], held_out["input_mask"], masking.MaskingVocab.from_tokenizer(tok),
                                seed=seed), "segment_ids": held_out["segment_ids"]}
    model = evaluate(model_config, params, batch)
    baseline = unigram_baseline(token_counts(train["input_ids"], train["input_mask"], tok.vocab_size,
                                             tok.special_ids), batch)
    top = tok.ids_to_tokens([baseline["token"]])[0]
    lines = [f"held-out masked LM: {model['masked_tokens']} masked tokens of {len(batch['input_ids'])} held-out "
             "sequences (fixed 15% masks, 80/10/10)",
             f"  model            accuracy {model['accuracy']:.3f}  loss {model['loss']:.2f}",
             f"  unigram baseline accuracy {baseline['accuracy']:.3f}  loss {baseline['loss']:.2f}"
             f"  (always {top!r}; training-token frequencies)",
             "held-out text, one word masked: the model's top 5"]
    cases = masked_word_examples(held_out["input_ids"], held_out["input_mask"], tok, examples, seed=seed)
    for (text, word), top5 in zip(cases, fill_mask(model_config, params, tok, [t for t, _ in cases])):
        lines.append(f"  {text}")
        lines.append(f"    answer {word!r}: " + ", ".join(f"{t} {p:.2f}" for t, p in top5))
    return "\n".join(lines)
