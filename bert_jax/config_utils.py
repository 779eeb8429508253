"""The pretraining config: one schema for every configs/*.py file.

Each config file is `get_config(arg='')` returning `pretrain_config(preset)` with a
few sizes changed. The returned ConfigDict is locked, so a typo in a config file or
on the command line (`--config.train.stpes=10`) is an error, not a silent default;
`validate` then checks the values that ml_collections cannot type-check.

    python -m bert_jax.pretrain --config configs/bert_base.py --workdir DIR
    python -m bert_jax.pretrain --config configs/bert_base.py:phase2 --workdir DIR2 \
        --config.train.init_from=DIR          # phase 2: seq 512 from phase 1's checkpoint
"""
from __future__ import annotations

import importlib.util
import json
import pathlib

from ml_collections import config_dict

PRESETS = ("tiny", "mini", "small", "medium", "base", "large")
DATA_SOURCES = ("demo", "text", "prepared", "tfrecord", "tfds")
OPTIMIZERS = ("adamw", "lamb")
DECAYS = ("linear", "polynomial", "constant")
# Keys of `model` that are passed to BertConfig.preset as overrides when set.
MODEL_OVERRIDES = ("vocab_size", "max_position_embeddings", "hidden_dropout_prob",
                   "attention_probs_dropout_prob", "dtype", "param_dtype",
                   "remat_policy", "scan_layers", "attention_impl", "matmul_impl")


def pretrain_config(preset: str = "base") -> config_dict.ConfigDict:
    """Defaults follow BERT's recipe (Devlin et al. 2018, Google's run_pretraining.py)."""
    c = config_dict.ConfigDict()

    c.model = config_dict.ConfigDict()
    c.model.preset = preset                 # tiny/mini/small/medium/base/large
    c.model.vocab_size = config_dict.placeholder(int)  # None: the tokenizer's size
    c.model.max_position_embeddings = 512   # phase 2 (seq 512) needs all 512
    c.model.hidden_dropout_prob = config_dict.placeholder(float)   # None: preset's
    c.model.attention_probs_dropout_prob = config_dict.placeholder(float)
    c.model.dtype = "float32"               # compute dtype; 'bfloat16' on accelerators
    c.model.param_dtype = "float32"
    c.model.remat_policy = "none"           # see bert_jax.model for the names
    c.model.scan_layers = False
    c.model.attention_impl = "auto"         # auto | xla | cudnn | explicit
    c.model.matmul_impl = "auto"            # auto | xla | f32_out (bf16 matmuls, f32 outputs and
                                            # weight grads; auto: f32_out on CPU; bert_jax/matmul.py)

    c.data = config_dict.ConfigDict()
    c.data.source = "text"                  # demo | text | prepared | tfrecord | tfds
    c.data.train_path = ""                  # text files / prepared dir / tfrecord glob
    c.data.eval_path = ""                   # '' : hold out documents of train_path
    c.data.eval_fraction = 0.01             # of documents, when eval_path is ''
    c.data.tfds_name = ""                   # source tfds: bert_pretraining_corpus/NAME (converted
                                            # by bert_jax.data.tfds_corpus) or a text dataset
    c.data.tfds_data_dir = ""               # '' : $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.tfds_split = "train"             # split trained on (of a text dataset: prepared)
    c.data.tfds_eval_split = "eval"         # of a converted corpus; '' : no evaluation
    c.data.tokenizer = ""                   # '' : train SentencePiece on the corpus
    c.data.tokenizer_vocab_size = 30522     # for a trained SentencePiece
    c.data.tokenizer_model_type = "unigram"
    c.data.lowercase = True
    c.data.max_seq_length = 128
    c.data.max_predictions_per_seq = 20
    c.data.masked_lm_prob = 0.15
    c.data.short_seq_prob = 0.1
    c.data.whole_word_masking = False
    c.data.dynamic_masking = True           # fresh masks every epoch, from the seed
    c.data.worker_count = 0                 # grain worker processes per host
    c.data.shuffle_buffer = 0               # unused by random-access sources

    c.train = config_dict.ConfigDict()
    c.train.seed = 0
    c.train.global_batch_size = 256
    c.train.micro_batches = 1               # gradient accumulation inside the step
    c.train.steps = 1_000_000
    c.train.log_every = 100
    c.train.eval_every = 10_000
    c.train.eval_steps = 50                 # 0: no evaluation
    c.train.checkpoint_every = 10_000
    c.train.keep = 3                        # latest checkpoints kept
    c.train.keep_best = 0                   # also keep the k best by eval loss
    c.train.async_checkpoints = True
    c.train.max_nonfinite_steps = 10        # consecutive skipped steps before we stop
    c.train.init_from = ""                  # phase 2: a phase-1 workdir or step dir
    c.train.init_optimizer = False          # also take the optimizer state from it
    c.train.progress_bar = True

    c.optimizer = config_dict.ConfigDict()
    c.optimizer.name = "adamw"              # adamw | lamb
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 10_000
    c.optimizer.decay = "linear"            # after warmup: linear | polynomial | constant
    c.optimizer.total_steps = config_dict.placeholder(int)  # schedule length; None: train.steps
    c.optimizer.power = 1.0                 # for 'polynomial'
    c.optimizer.end_learning_rate = 0.0
    c.optimizer.weight_decay = 0.01         # not on LayerNorm and biases
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-6
    c.optimizer.clip_norm = 1.0             # 0 disables clipping

    c.mesh = config_dict.ConfigDict()
    c.mesh.data = -1                        # -1: all devices left over
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.slices = 1                       # multi-slice TPU (DCN) data parallelism

    c.distributed = config_dict.ConfigDict()
    c.distributed.coordinator_address = ""  # '' with num_processes 0: auto / single
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    c.distributed.initialize = "auto"       # auto | always | never
    return c


def phase2(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """BERT's second phase: sequence 512 for the last 10% of steps, from phase 1's params."""
    c.data.max_seq_length = 512
    c.data.max_predictions_per_seq = 80
    c.train.steps = max(1, c.train.steps // 10)
    c.optimizer.warmup_steps = max(1, c.optimizer.warmup_steps // 10)
    c.train.global_batch_size = max(1, c.train.global_batch_size // 4)
    return c


def finish(c: config_dict.ConfigDict, arg: str = "") -> config_dict.ConfigDict:
    """Apply the `:arg` of `--config file.py:arg` ('' or 'phase2') and lock."""
    if arg == "phase2":
        phase2(c)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; expected '' or 'phase2'")
    c.lock()
    return c


def validate(c: config_dict.ConfigDict) -> None:
    """Value checks with messages naming the key."""
    def check(ok, key, msg):
        if not ok:
            raise ValueError(f"config.{key}: {msg} (got {_get(c, key)!r})")

    check(c.model.preset in PRESETS, "model.preset", f"must be one of {PRESETS}")
    check(c.data.source in DATA_SOURCES, "data.source", f"must be one of {DATA_SOURCES}")
    check(c.data.source in ("demo", "tfds") or c.data.train_path, "data.train_path",
          f"required for data.source={c.data.source!r}")
    check(c.data.source != "tfds" or c.data.tfds_name, "data.tfds_name",
          "required for data.source='tfds' (bert_pretraining_corpus/NAME or a TFDS text dataset)")
    check(c.optimizer.name in OPTIMIZERS, "optimizer.name", f"must be one of {OPTIMIZERS}")
    check(c.optimizer.decay in DECAYS, "optimizer.decay", f"must be one of {DECAYS}")
    for key in ("train.global_batch_size", "train.micro_batches", "train.steps",
                "train.log_every", "train.checkpoint_every", "train.keep",
                "data.max_seq_length", "data.max_predictions_per_seq"):
        check(_get(c, key) >= 1, key, "must be >= 1")
    check(c.train.global_batch_size % c.train.micro_batches == 0, "train.micro_batches",
          f"must divide train.global_batch_size={c.train.global_batch_size}")
    check(c.data.max_seq_length <= c.model.max_position_embeddings, "data.max_seq_length",
          f"exceeds model.max_position_embeddings={c.model.max_position_embeddings}")
    check(c.data.max_predictions_per_seq <= c.data.max_seq_length,
          "data.max_predictions_per_seq", "exceeds data.max_seq_length")
    check(c.distributed.initialize in ("auto", "always", "never"), "distributed.initialize",
          "must be auto, always or never")


def _get(c, dotted):
    for part in dotted.split("."):
        c = c[part]
    return c


def model_overrides(c: config_dict.ConfigDict, vocab_size: int) -> dict:
    """kwargs for BertConfig.preset(c.model.preset, **kwargs); unset keys keep the preset's."""
    overrides = {k: c.model[k] for k in MODEL_OVERRIDES if c.model[k] is not None}
    overrides.setdefault("vocab_size", vocab_size)
    return overrides


def load_config_file(spec: str) -> config_dict.ConfigDict:
    """`configs/bert_base.py[:arg]` -> its get_config(arg), as config_flags would load it."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    if module_spec is None:
        raise FileNotFoundError(f"config file {path!r} not found")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def optimizer_config(c: config_dict.ConfigDict) -> dict:
    """The dict bert_jax.optim.make_optimizer takes; the schedule ends at
    optimizer.total_steps, by default train.steps (set it to stop a run early, or to
    extend one, without changing its learning rates)."""
    opt = c.optimizer.to_dict()
    opt["total_steps"] = opt["total_steps"] or c.train.steps
    return opt


def to_json(c: config_dict.ConfigDict) -> str:
    return json.dumps(c.to_dict(), indent=2, sort_keys=True)
