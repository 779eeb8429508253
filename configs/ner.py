"""Named-entity recognition on CoNLL-2003 (bert_jax.tasks.ner).

    python -m bert_jax.finetune --config configs/ner.py --workdir workdirs/ner \
        --config.init_checkpoint=PRETRAIN_WORKDIR --config.data_dir=CONLL_DIR

CONLL_DIR holds eng.train, eng.testa, eng.testb (or train.txt, dev.txt, test.txt), exactly as
distributed (IOB1 or IOB2). results.json reports entity f1, precision and recall per split
(dev picks the run), and predictions in CoNLL format (word gold predicted) go to
submission/ner_dev.conll and ner_test.conll. `configs/ner.py:quick` is a smoke-test setting.
"""
from bert_jax import config_utils


def get_config(arg: str = ""):
    c = config_utils.finetune_config(glue_data=False)
    c.task = "ner"
    c.data_dir = ""                 # eng.train, eng.testa, eng.testb (or train.txt, dev.txt, test.txt)
    c.labels = ""                   # '' : O + B-/I- of every type in the training file; else 'O,B-PER,I-PER,...'
    c.data_source = ""              # '' : the files in data_dir; 'tfds:conll2003': TFDS, prepared in tfds_data_dir
    c.tfds_data_dir = ""            # '' : $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.doc_stride = 0                # long sentences: windows this many sub-tokens apart (0: half a window)
    c.packing = True                # several sentence windows per row of packed_row_length tokens, each with its
                                    # own [CLS], positions and attention (False: one per row, padded to buckets)
    c.max_examples_per_row = 16     # windows a packed row holds at most
    c.packed_row_length = 0         # tokens a packed row holds; 0 (auto): on a CPU the row length with the
                                    # least estimated cost for the windows' lengths, else max_seq_length
    c.learning_rates = (5e-5,)
    if arg == "quick":
        c.num_epochs = 1.0
        c.max_seq_length = 64
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; expected '' or 'quick'")
    c.lock()
    return c
