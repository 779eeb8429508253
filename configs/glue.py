"""GLUE fine-tuning with BERT's recipe (Devlin et al. 2018, section 4.1 and appendix A.3).

    python -m bert_jax.finetune --config configs/glue.py --workdir workdirs/mrpc \
        --config.task=mrpc --config.init_checkpoint=PRETRAIN_WORKDIR --config.glue_dir=GLUE_DIR

`--config.task=all` runs the nine GLUE tasks in turn (MNLI also predicts AX). The paper's
sweep: `--config.learning_rates='(5e-5,4e-5,3e-5,2e-5)' --config.seeds='(0,1,2,3,4)'`.
`configs/glue.py:quick` is a small setting for smoke tests (1 epoch, 64-token inputs).
"""
from ml_collections import config_dict


def get_config(arg: str = ""):
    c = config_dict.ConfigDict()
    c.task = "mrpc"                 # a task name, 'a,b', or 'all'
    c.init_checkpoint = ""          # pretraining workdir/step dir (Orbax), or HF / Google / .npz weights
    c.init_format = "auto"          # auto | orbax | hf | tf | npz
    c.tokenizer = ""                # '' : the one that comes with init_checkpoint
    c.glue_dir = ""                 # GLUE's TSV layout: GLUE_DIR/MRPC/train.tsv, ...
    c.tfds_data_dir = ""            # else TFDS glue/<task> prepared here ('' : TFDS default)
    c.skip_bad_rows = False         # drop rows with a wrong column count (with a warning)

    c.max_seq_length = 128
    c.batch_size = 32               # global, over all hosts and devices
    c.eval_batch_size = 64
    c.num_epochs = 3.0
    c.warmup_fraction = 0.1
    c.learning_rates = (2e-5,)      # the sweep; the paper picks the best of 5e-5, 4e-5, 3e-5, 2e-5 on dev
    c.seeds = (0,)                  # every (learning rate, seed) is one run; mean/std over seeds
    c.weight_decay = 0.01
    c.clip_norm = 1.0
    c.dropout = 0.1                 # hidden and attention dropout
    c.dtype = "float32"             # compute dtype ('bfloat16' on accelerators); params stay float32
    c.eval_every_steps = 0          # 0: evaluate at the end of every epoch
    c.eval_before_training = False  # also evaluate at step 0 (the untrained head's baseline)
    c.max_train_examples = 0        # 0: all (a cap is for smoke tests)
    c.smallest_bucket = 16          # inputs padded to 16, 32, 64, ... max_seq_length tokens

    c.write_predictions = True      # GLUE submission files for the chosen run
    c.save_checkpoint = True        # the chosen run's fine-tuned params (Orbax)
    c.progress_bar = True

    c.mesh = config_dict.ConfigDict()
    c.mesh.data = -1                # data parallel over every device by default
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.slices = 1

    c.distributed = config_dict.ConfigDict()  # as in pretraining (bert_jax.distributed.initialize)
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    c.distributed.initialize = "auto"       # auto | always | never

    if arg == "quick":
        c.num_epochs = 1.0
        c.max_seq_length = 64
        c.learning_rates = (5e-5,)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; expected '' or 'quick'")
    c.lock()
    return c
