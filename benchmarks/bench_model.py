"""Forward+backward time of the pretraining loss: bert_jax vs transformers' PyTorch BERT.

    python benchmarks/bench_model.py [--size base] [--batch 8] [--seq 128] [--iters 5]

Same model size, same batch, same process, interleaved runs (the machine is shared:
read the ratios, not the absolute times). Variants of ours:
  fp32-all     float32, MLM logits for every position (what HF computes)
  fp32-masked  float32, MLM logits only at masked_lm_positions (Google's format); the last
               encoder layer runs only at those positions and [CLS] (where it is read)
  fp32-masked-every  the same with the last layer at every position (as before it ran only
               where read)
  bf16-masked  bfloat16 matmuls with float32 accumulation/params, masked positions
The reference is transformers.BertForPreTraining (float32, eager PyTorch, labels
-100 at unmasked positions, its own loss).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bert_jax import model as M  # noqa: E402
from bert_jax.weights.hf import config_to_hf  # noqa: E402


def make_batch(batch, seq, predictions, vocab, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, (batch, seq)).astype(np.int32)
    mask = np.ones((batch, seq), np.int32)
    segments = (np.arange(seq)[None] >= seq // 2).astype(np.int32).repeat(batch, 0)
    positions = np.sort(np.stack([rng.choice(np.arange(1, seq), predictions, replace=False)
                                  for _ in range(batch)]), axis=1).astype(np.int32)
    masked_ids = np.take_along_axis(ids, positions, axis=1)
    weights = np.ones((batch, predictions), np.float32)
    nsp = rng.integers(0, 2, batch).astype(np.int32)
    return ids, mask, segments, positions, masked_ids, weights, nsp


class _EveryPosition(M.BertModel):
    """The encoder with its last layer at every position, gathered at ``at_positions`` after."""

    def __call__(self, *args, at_positions=None, **kw):
        out = super().__call__(*args, **kw)
        if at_positions is not None:
            out["sequence_output"] = M.gather_positions(out["sequence_output"], at_positions)
        return out


def ours_step(cfg, batch, masked_only: bool, last_layer_everywhere: bool = False):
    ids, mask, segments, positions, masked_ids, weights, nsp = batch
    model = M.BertForPreTraining(cfg, rngs=nnx.Rngs(0))
    if last_layer_everywhere:
        model.bert = _EveryPosition(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def loss_fn(state):
        out = nnx.merge(graphdef, state)(ids, mask, segments, positions if masked_only else None,
                                         deterministic=False, rngs=jax.random.key(0))
        logits = out["mlm_logits"]
        if not masked_only:
            logits = jnp.take_along_axis(logits, positions[..., None], axis=1)
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, masked_ids[..., None], axis=-1)[..., 0]
        mlm = (nll * weights).sum() / weights.sum()
        nsp_loss = -jnp.take_along_axis(jax.nn.log_softmax(out["nsp_logits"]), nsp[:, None], -1).mean()
        return mlm + nsp_loss

    step = jax.jit(jax.value_and_grad(loss_fn))

    def run():
        loss, grads = step(state)
        jax.block_until_ready(grads)
        return float(loss)

    return run


def torch_step(cfg, batch, threads):
    import torch
    import transformers

    torch.set_num_threads(threads)
    ids, mask, segments, positions, masked_ids, weights, nsp = batch
    hf = transformers.BertForPreTraining(transformers.BertConfig(
        **{k: v for k, v in config_to_hf(cfg).items() if k != "architectures"})).train()
    labels = np.full(ids.shape, -100, np.int64)
    np.put_along_axis(labels, positions, masked_ids, axis=1)
    inputs = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                  token_type_ids=torch.tensor(segments, dtype=torch.long), labels=torch.tensor(labels),
                  next_sentence_label=torch.tensor(nsp, dtype=torch.long))

    def run():
        hf.zero_grad(set_to_none=True)
        out = hf(**inputs)
        out.loss.backward()
        return out.loss.item()

    return run


def time_it(fn, iters):
    fn()  # compile / warm up
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="base")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--predictions", type=int, default=20)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds over all variants")
    args = ap.parse_args()
    cfg = M.BertConfig.preset(args.size)
    batch = make_batch(args.batch, args.seq, args.predictions, cfg.vocab_size)
    variants = {
        "torch-fp32 (reference)": torch_step(cfg, batch, threads=os.cpu_count()),
        "ours fp32-all": ours_step(cfg, batch, masked_only=False),
        "ours fp32-masked": ours_step(cfg, batch, masked_only=True),
        "ours fp32-masked-every": ours_step(cfg, batch, masked_only=True, last_layer_everywhere=True),
        "ours bf16-masked": ours_step(cfg.replace(dtype="bfloat16"), batch, masked_only=True),
    }
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times[name] += time_it(fn, args.iters)
    ref = statistics.median(times["torch-fp32 (reference)"])
    print(f"BERT-{args.size}, batch {args.batch}, seq {args.seq}, {args.predictions} predictions/seq, "
          f"{os.cpu_count()} CPU cores, jax {jax.__version__}")
    print(f"{'variant':28s} {'median s/step':>14s} {'seq/s':>8s} {'speed vs torch':>15s}")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"{name:28s} {med:14.3f} {args.batch / med:8.2f} {ref / med:14.2f}x")


if __name__ == "__main__":
    main()
