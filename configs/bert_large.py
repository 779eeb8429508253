"""BERT-large (24 layers, hidden 1024) pretraining, BERT's recipe; `:phase2` gives the seq-512 phase.

    python -m bert_jax.pretrain --config configs/bert_large.py --workdir workdirs/bert_large \
        --config.data.source=prepared --config.data.train_path=DATA_DIR
"""
from bert_jax import config_utils


def get_config(arg: str = ""):
    c = config_utils.pretrain_config("large")
    c.train.global_batch_size = 256
    c.train.steps = 1_000_000
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 10_000
    # c.model.scan_layers = True shortens compilation (stacked layer params)
    return config_utils.finish(c, arg)
