"""GLUE fine-tuning with BERT's recipe (Devlin et al. 2018, section 4.1 and appendix A.3).

    python -m bert_jax.finetune --config configs/glue.py --workdir workdirs/mrpc \
        --config.task=mrpc --config.init_checkpoint=PRETRAIN_WORKDIR --config.glue_dir=GLUE_DIR

`--config.task=all` runs the nine GLUE tasks in turn (MNLI also predicts AX). The paper's
sweep: `--config.learning_rates='(5e-5,4e-5,3e-5,2e-5)' --config.seeds='(0,1,2,3,4)'`.
`configs/glue.py:quick` is a small setting for smoke tests (1 epoch, 64-token inputs).
Every key and its default: `bert_jax.config_utils.finetune_config`.
"""
from bert_jax import config_utils


def get_config(arg: str = ""):
    c = config_utils.finetune_config()
    if arg == "quick":
        c.num_epochs = 1.0
        c.max_seq_length = 64
        c.learning_rates = (5e-5,)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; expected '' or 'quick'")
    c.lock()
    return c
