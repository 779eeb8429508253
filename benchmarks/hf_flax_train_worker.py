"""Hugging Face FlaxBertForPreTraining train step (transformers 4.57.6), for bench_train.py.

Runs inside the benchmark-only venv (benchmarks/setup_hf_flax_env.sh); reads a
JSON job from argv[1] and prints one JSON line per config. The step is what
HF's run_mlm_flax/run_bert_flax examples do: jax.jit, AdamW (weight decay off
LayerNorm/bias), MLM loss over the masked positions of the full [B, T, V]
logits, plus NSP.
"""
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers
from transformers import BertConfig, FlaxBertForPreTraining


def decay_mask(params):
    return _unflatten({p: not (p[-1] == "bias" or any("LayerNorm" in k for k in p)) for p in _paths(params)})


def _paths(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))
        else:
            yield prefix + (k,)


def _unflatten(flat):
    out = {}
    for path, v in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return out


def run(cfg, batch, steps, warmup, dtype):
    config = BertConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
                        intermediate_size=cfg["intermediate_size"], max_position_embeddings=512)
    model = FlaxBertForPreTraining(config, seed=0, dtype=jnp.dtype(dtype))
    opt = optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01, mask=decay_mask)
    params = model.params
    opt_state = opt.init(params)
    b, t = batch["input_ids"].shape
    labels = np.full((b, t), -100, np.int32)
    rows = np.repeat(np.arange(b), batch["masked_lm_positions"].shape[1])
    keep = batch["masked_lm_weights"].reshape(-1) > 0
    labels[rows[keep], batch["masked_lm_positions"].reshape(-1)[keep]] = batch["masked_lm_ids"].reshape(-1)[keep]
    inputs = {k: jnp.asarray(v) for k, v in dict(
        input_ids=batch["input_ids"], attention_mask=batch["input_mask"], token_type_ids=batch["segment_ids"],
        labels=labels, next_sentence_label=batch["next_sentence_labels"]).items()}

    def loss_fn(params, inputs, rng):
        out = model(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"], params=params,
                    dropout_rng=rng, train=True)
        logits = out.prediction_logits.astype(jnp.float32)
        label_mask = inputs["labels"] >= 0
        mlm = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(inputs["labels"], 0))
        mlm = jnp.sum(mlm * label_mask) / jnp.maximum(jnp.sum(label_mask), 1)
        nsp = optax.softmax_cross_entropy_with_integer_labels(out.seq_relationship_logits.astype(jnp.float32),
                                                              inputs["next_sentence_label"]).mean()
        return mlm + nsp

    @jax.jit
    def train_step(params, opt_state, inputs, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, rng)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = jax.random.PRNGKey(0)
    for i in range(warmup):
        params, opt_state, loss = train_step(params, opt_state, inputs, jax.random.fold_in(rng, i))
        loss.block_until_ready()
    start = time.perf_counter()
    for i in range(steps):
        params, opt_state, loss = train_step(params, opt_state, inputs, jax.random.fold_in(rng, 100 + i))
        loss.block_until_ready()
    seconds = (time.perf_counter() - start) / steps
    return {"seconds_per_step": seconds, "sequences_per_s": b / seconds, "loss": float(loss)}


def main():
    job = json.loads(sys.argv[1])
    batch = {k: np.asarray(v) for k, v in np.load(job["batch_file"]).items()}
    for name, cfg in job["configs"].items():
        for dtype in job["dtypes"]:
            result = run(cfg, batch, job["steps"], job["warmup"], dtype)
            print(json.dumps({"config": name, "dtype": dtype, "transformers": transformers.__version__, **result}),
                  flush=True)


if __name__ == "__main__":
    main()
