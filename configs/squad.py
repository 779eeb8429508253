"""Extractive question answering on SQuAD v1.1 or v2.0 (bert_jax.tasks.squad), with the
defaults of Google's run_squad.py (384 tokens, stride 128, questions of 64 tokens at most).

    python -m bert_jax.finetune --config configs/squad.py --workdir workdirs/squad \
        --config.init_checkpoint=PRETRAIN_WORKDIR \
        --config.train_file=train-v1.1.json --config.predict_file=dev-v1.1.json

SQuAD 2.0: the v2.0 files and `--config.version_2_with_negative=true` (the null threshold is
chosen on predict_file). results.json reports exact_match and f1 (official script), and
submission/predictions.json holds the answers in the official format.
"""
from bert_jax import config_utils


def get_config(arg: str = ""):
    c = config_utils.finetune_config(glue_data=False)
    c.task = "squad"
    c.train_file = ""               # SQuAD JSON: train-v1.1.json / train-v2.0.json
    c.predict_file = ""             # dev-v1.1.json / dev-v2.0.json: evaluated, predictions.json written
    c.version_2_with_negative = False  # SQuAD 2.0: unanswerable questions, null threshold chosen on predict_file
    c.data_source = ""              # '' : train_file + predict_file; 'tfds:squad/v1.1' or 'tfds:squad/v2.0':
                                    # TFDS train + validation, prepared in tfds_data_dir
    c.tfds_data_dir = ""            # '' : $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.max_seq_length = 384
    c.doc_stride = 128              # passage windows start this many tokens apart
    c.max_query_length = 64         # question tokens kept
    c.max_answer_length = 30        # tokens of the longest answer predicted
    c.n_best_size = 20              # best starts x best ends searched per window
    c.batch_size = 24
    c.learning_rates = (3e-5,)
    c.num_epochs = 2.0
    if arg == "quick":
        c.num_epochs = 1.0
        c.max_seq_length = 128
        c.doc_stride = 64
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; expected '' or 'quick'")
    c.lock()
    return c
