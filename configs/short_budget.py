"""bert_jax's short-budget pretraining recipe: the one the time-to-accuracy benchmark runs
(benchmarks/bench_time_to_accuracy.py; the README has its figures), BERT-mini at 16 x 128 for
400 steps on a 2-core CPU. On top of BERT's recipe (config_utils.pretrain_config, as
configs/bert_mini.py):

* masked LM only (`train.objective=mlm`), at 30% masking (MosaicBERT's rate), packed rows;
* pre-LayerNorm blocks and a final LayerNorm (`model.pre_layer_norm`, Xiong et al. 2020;
  Geiping & Goldstein 2022, "Cramming"): at the same rate they learned more per step than
  BERT's post-LN blocks on both seeds tried, and they take 1e-3, where post-LN stays on the
  unigram plateau (but 1e-3 stalled on one seed of two, so the peak is 5e-4);
* no dropout (a short run does not overfit; Cramming drops it too);
* AdamW, peak 5e-4, linear warmup over 6% of the steps, then linear decay to 0.

Measured at this budget only: for longer runs scale train.steps and optimizer.warmup_steps
together. Hugging Face's BertModel has no pre-LN blocks: export with --format npz.

    python -m bert_jax.pretrain --config configs/short_budget.py --workdir workdirs/short \
        --config.data.source=text --config.data.train_path='corpus/*.txt' \
        --config.data.tokenizer=VOCAB_DIR/vocab.txt
"""
from bert_jax import config_utils

STEPS = 400


def get_config(arg: str = ""):
    c = config_utils.pretrain_config("mini")
    c.train.objective = "mlm"
    c.data.packing = True
    c.data.masked_lm_prob = 0.3              # max_predictions_per_seq follows: 39 at 128 (41 packed)
    c.model.pre_layer_norm = True
    c.model.hidden_dropout_prob = 0.0
    c.model.attention_probs_dropout_prob = 0.0
    c.train.global_batch_size = 16
    c.train.steps = STEPS
    c.optimizer.learning_rate = 5e-4
    c.optimizer.warmup_steps = round(0.06 * STEPS)
    return config_utils.finish(c, arg)
