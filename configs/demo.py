"""The demo: BERT-tiny on the embedded demo corpus, a SentencePiece vocabulary trained
on it, offline, in a couple of minutes on 2 CPU cores.

    python -m bert_jax.pretrain --config configs/demo.py --workdir workdirs/demo
"""
from bert_jax import config_utils


def get_config(arg: str = ""):
    c = config_utils.pretrain_config("tiny")
    c.model.max_position_embeddings = 128
    c.data.source = "demo"
    c.data.tokenizer_vocab_size = 4000
    c.data.max_seq_length = 64
    c.data.max_predictions_per_seq = 10
    c.data.eval_fraction = 0.02
    c.train.global_batch_size = 32
    # 400 steps left held-out accuracy at 0.071 against the unigram baseline's 0.040 with the
    # training accuracy still rising as the learning rate decayed; 3e-3 and 6e-3 stayed at the
    # baseline (0.043 at step 200, against 0.063 at 1e-3): more steps at 1e-3.
    c.train.steps = 800
    c.train.log_every = 50
    c.train.eval_every = 400
    c.train.eval_steps = 10
    c.train.checkpoint_every = 400
    c.train.keep = 2
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 80
    return config_utils.finish(c, arg)
