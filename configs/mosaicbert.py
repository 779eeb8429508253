"""MosaicBERT-Base's pretraining recipe, as far as it applies to a standard BERT: masked LM
only (no next sentence prediction) at 30% masking, sequence 128, no attention dropout (so
the fused attention path can be taken), AdamW with betas (0.9, 0.98) and a linear warmup
over 6% of training then linear decay to 0.02x the peak, batch 4096 for 70,000 steps.

Source: MosaicML's examples repository, examples/benchmarks/bert/yamls/main/
mosaic-bert-base-uncased.yaml (https://github.com/mosaicml/examples), and Portes et al. 2023,
"MosaicBERT: A Bidirectional Encoder Optimized for Fast Pretraining" (arXiv:2312.17482).
What is not theirs here is listed in docs/pretraining.md (MosaicBERT's ALiBi, gated linear
units and unpadding are architecture changes this codebase does not make).

    python -m bert_jax.pretrain --config configs/mosaicbert.py --workdir workdirs/mosaicbert \
        --config.data.source=prepared --config.data.train_path=DATA_DIR   # prepare --objective mlm
"""
from bert_jax import config_utils

STEPS = 70_000  # their max_duration: 286,720,000 samples / 4096 per batch


def get_config(arg: str = ""):
    c = config_utils.pretrain_config("base")
    c.train.objective = "mlm"
    c.data.max_seq_length = 128
    c.data.masked_lm_prob = 0.3              # max_predictions_per_seq follows: 39 at 128
    c.data.short_seq_prob = 0.0              # full-length rows only
    c.model.attention_probs_dropout_prob = 0.0
    c.model.hidden_dropout_prob = 0.1
    c.train.seed = 17
    c.train.global_batch_size = 4096
    c.train.steps = STEPS
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 5e-4
    c.optimizer.warmup_steps = round(0.06 * STEPS)  # t_warmup: 0.06dur
    c.optimizer.decay = "linear"
    c.optimizer.end_learning_rate = 0.02 * 5e-4     # alpha_f: 0.02
    c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.98, 1e-6
    # Composer's decoupled_adamw decays by weight_decay x (lr / peak lr) per step, optax's adamw by
    # lr x weight_decay: their 1e-5 is 1e-5 / 5e-4 = 0.02 here.
    c.optimizer.weight_decay = 1e-5 / 5e-4
    c.optimizer.clip_norm = 0.0              # the recipe clips no gradients
    return config_utils.finish(c, arg)
