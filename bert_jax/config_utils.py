"""The config schemas: pretraining (every configs/bert_*.py, configs/demo.py) and fine-tuning
(configs/glue.py). Both share the `mesh` and `distributed` sections and their checks.

Each config file is `get_config(arg='')` returning `pretrain_config(preset)` (or
`finetune_config()`) with a few values changed. The returned ConfigDict is locked, so a
typo in a config file or on the command line (`--config.train.stpes=10`) is an error, not
a silent default; `validate` / `validate_finetune` then check the values that
ml_collections cannot type-check.

    python -m bert_jax.pretrain --config configs/bert_base.py --workdir DIR
    python -m bert_jax.pretrain --config configs/bert_base.py:phase2 --workdir DIR2 \
        --config.train.init_from=DIR          # phase 2: seq 512 from phase 1's checkpoint
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import pathlib

from ml_collections import config_dict

from bert_jax import hardware
from bert_jax.data import instances, masking, packing, sources
from bert_jax.model import BertConfig

PRESETS = ("tiny", "mini", "small", "medium", "base", "large")
OPTIMIZERS = ("adamw", "lamb")
DECAYS = ("linear", "polynomial", "constant")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Every BertConfig field is a `model` key: set, it overrides the preset's value.
MODEL_OVERRIDES = tuple(f.name for f in dataclasses.fields(BertConfig))
# Pretraining's own defaults for some of them; the others are None (the preset's).
_MODEL_DEFAULTS = {
    "max_position_embeddings": 512,         # phase 2 (seq 512) needs all 512
    "dtype": "auto",                        # compute dtype; auto: bfloat16 on accelerators and on CPUs
                                            # with AVX512-BF16/AMX, else float32 (hardware.compute_choice)
    "param_dtype": "float32",
    "remat_policy": "none",                 # see bert_jax.model for the names
    "scan_layers": False,
    "attention_impl": "auto",               # auto | explicit | xla | cudnn | splash (bert_jax/attention.py)
    "matmul_impl": "auto",                  # auto | xla | f32_out (bf16 matmuls, f32 outputs and weight
                                            # grads; auto: f32_out on a fast-bf16 CPU; bert_jax/matmul.py)
}


def model_section(preset: str) -> config_dict.ConfigDict:
    m = config_dict.ConfigDict()
    m.preset = preset                       # tiny/mini/small/medium/base/large
    for field in dataclasses.fields(BertConfig):
        m[field.name] = _MODEL_DEFAULTS.get(field.name, config_dict.placeholder(type(field.default)))
    return m


def mesh_section() -> config_dict.ConfigDict:
    """Device counts per mesh axis (bert_jax.sharding.make_mesh), shared by every job."""
    m = config_dict.ConfigDict()
    m.data = -1                             # -1: all devices left over
    m.fsdp = 1
    m.tensor = 1
    m.slices = 1                            # multi-slice TPU (DCN) data parallelism
    return m


def distributed_section() -> config_dict.ConfigDict:
    """jax.distributed settings (bert_jax.distributed.initialize), shared by every job."""
    d = config_dict.ConfigDict()
    d.coordinator_address = ""              # '' with num_processes 0: auto / single
    d.num_processes = 0
    d.process_id = -1
    d.initialize = "auto"                   # auto | always | never
    d.heartbeat_timeout_seconds = 100       # a process silent this long counts as dead: the others stop
    return d


def pretrain_config(preset: str = "base") -> config_dict.ConfigDict:
    """Defaults follow BERT's recipe (Devlin et al. 2018, Google's run_pretraining.py)."""
    c = config_dict.ConfigDict()

    c.model = model_section(preset)

    c.data = config_dict.ConfigDict()
    c.data.source = "text"                  # demo | text | prepared | tfrecord | tfds: parsed into
                                            # one bert_jax.data.sources.DataSource (from_config)
    c.data.train_path = ""                  # text files / prepared dir / tfrecord glob
    c.data.eval_path = ""                   # tfrecord only: the eval files ('' : no evaluation)
    c.data.eval_fraction = 0.01             # of a text source's documents, held out for evaluation
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
    c.data.masked_lm_prob = 0.15            # share of tokens masked (Google's masked_lm_prob; MosaicBERT: 0.3)
    c.data.max_predictions_per_seq = config_dict.placeholder(int)  # None: ceil(masked_lm_prob x
                                            # max_seq_length), 20 at 0.15 x 128 (max_predictions_per_seq)
    c.data.short_seq_prob = 0.1
    c.data.whole_word_masking = False
    c.data.dynamic_masking = True           # fresh masks every epoch, from the seed
    c.data.max_unk_fraction = 0.05          # text preparation stops when more tokens are [UNK]
    c.data.worker_count = 0                 # grain worker processes per host
    c.data.packing = False                  # several instances per row (bert_jax/data/packing.py); then
                                            # max_predictions_per_seq is a row's: >= floor(prob*L) + N
                                            # (unset: exactly that, 22 at 0.15 x 128 with N=3)
    c.data.max_instances_per_row = 3        # N, with packing (NVIDIA's MLPerf BERT packs up to 3)

    c.train = config_dict.ConfigDict()
    c.train.seed = 0
    c.train.objective = "mlm_nsp"           # mlm_nsp: BERT's masked LM + next sentence; mlm: masked LM
                                            # alone on one-segment rows (RoBERTa, MosaicBERT): no NSP
                                            # pairs, head or loss. The data, model and checkpoints follow it
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
    c.train.max_nonfinite_steps = 10        # consecutive skipped steps before a rollback (or stop)
    c.train.loss_spike_factor = 0.0         # a loss over this x the recent mean rolls back; 0: off
    c.train.max_rollbacks = 3               # restores of the last checkpoint on divergence, then stop
    c.train.resume_damaged = "fallback"     # damaged latest checkpoint: fallback (to an intact one) | refuse
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

    c.mesh = mesh_section()
    c.distributed = distributed_section()
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


def finetune_config(glue_data: bool = True) -> config_dict.ConfigDict:
    """Fine-tuning with BERT's recipe (Devlin et al. 2018, section 4.1 and appendix A.3); unlocked.
    `glue_data=False` leaves out GLUE's data keys (tasks with their own: configs/ner.py, squad.py)."""
    c = config_dict.ConfigDict()
    c.task = "mrpc"                 # a task name, 'a,b', or 'all' (bert_jax.tasks)
    c.init_checkpoint = ""          # pretraining workdir/step dir (Orbax), or HF / Google / .npz weights
    c.init_format = "auto"          # auto | orbax | hf | tf | npz
    c.tokenizer = ""                # '' : the one that comes with init_checkpoint
    if glue_data:
        c.glue_dir = ""             # GLUE's TSV layout: GLUE_DIR/MRPC/train.tsv, ...
        c.tfds_data_dir = ""        # else TFDS glue/<task> prepared here ('' : TFDS default)
        c.skip_bad_rows = False     # drop rows with a wrong column count (with a warning)
        c.packing = True            # several examples per row of packed_row_length tokens, each with its own
                                    # [CLS], positions and attention (False: one per row, padded to buckets)
        c.max_examples_per_row = 16  # examples a packed row holds at most
        c.packed_row_length = 0     # tokens a packed row holds; 0 (auto): on a CPU the row length with the
                                    # least estimated cost for the task's lengths (CoLA: 48), else max_seq_length

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
    c.dtype = "auto"                # compute dtype; auto: bfloat16 on accelerators and AVX512-BF16/AMX
                                    # CPUs, else float32 (hardware.compute_choice); params stay float32
    c.eval_every_steps = 0          # 0: evaluate at the end of every epoch
    c.eval_before_training = False  # also evaluate at step 0 (the untrained head's baseline)
    c.checkpoint_every_steps = 0    # 0: at every evaluation (a preempted run resumes from there)
    c.log_every_steps = 20          # metrics.jsonl / TensorBoard / progress bar (device metrics read then)
    c.max_nonfinite_steps = 10      # consecutive skipped (non-finite) steps before a rollback
    c.max_rollbacks = 3             # restores of the run's last checkpoint on divergence, then stop
    c.loss_spike_factor = 0.0       # a loss over this x the recent mean rolls back; 0: off
    c.resume_damaged = "fallback"   # damaged latest checkpoint: fallback (to an intact one) | refuse
    c.keep_checkpoints = 2          # of the unfinished run (two: one to fall back to)
    c.max_train_examples = 0        # 0: all (a cap is for smoke tests)
    c.smallest_bucket = 16          # inputs padded to 16, 32, 64, ... max_seq_length tokens

    c.write_predictions = True      # submission files of the chosen run
    c.save_checkpoint = True        # the chosen run's fine-tuned params (Orbax)
    c.progress_bar = True

    c.mesh = mesh_section()
    c.distributed = distributed_section()
    return c


def validate_finetune(c: config_dict.ConfigDict) -> None:
    """Value checks of a fine-tuning config, with messages naming the key."""
    check = _checker(c)
    _check_finite(c)
    check(len(c.learning_rates) > 0 and all(lr > 0 for lr in c.learning_rates), "learning_rates",
          "needs one or more positive values")
    check(len(c.seeds) > 0, "seeds", "needs one or more seeds")
    for key in ("learning_rates", "seeds"):
        check(len(set(c[key])) == len(c[key]), key, "must not repeat a value (each run has its own directory)")
    check(c.num_epochs > 0, "num_epochs", "must be > 0")
    check(0 <= c.warmup_fraction < 1, "warmup_fraction", "must be in [0, 1)")
    check(0 <= c.dropout < 1, "dropout", "must be in [0, 1)")
    check(c.max_seq_length >= 8, "max_seq_length", "must be >= 8")
    check(c.weight_decay >= 0, "weight_decay", "must be >= 0")
    check(c.clip_norm >= 0, "clip_norm", "must be >= 0 (0 disables clipping)")
    check(c.init_format in ("auto", "orbax", "hf", "tf", "npz"), "init_format", "must be auto, orbax, hf, tf or npz")
    check(c.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
    check(1 <= c.smallest_bucket <= c.max_seq_length, "smallest_bucket", "must be in [1, max_seq_length]")
    if "max_examples_per_row" in c:
        check(c.max_examples_per_row >= 1, "max_examples_per_row", "must be >= 1 (a packed row holds one example or more)")
    if "packed_row_length" in c:
        check(0 <= c.packed_row_length <= c.max_seq_length, "packed_row_length",
              "must be 0 (auto) or in [1, max_seq_length]")
    for key in ("batch_size", "eval_batch_size", "log_every_steps", "max_nonfinite_steps", "keep_checkpoints"):
        check(c[key] >= 1, key, "must be >= 1")
    check(c.resume_damaged in ("fallback", "refuse"), "resume_damaged", "must be 'fallback' or 'refuse'")
    check(c.max_rollbacks >= 0, "max_rollbacks", "must be >= 0")
    check(c.loss_spike_factor == 0 or c.loss_spike_factor > 1, "loss_spike_factor", "must be 0 (off) or > 1")
    for key in ("eval_every_steps", "checkpoint_every_steps", "max_train_examples"):
        check(c[key] >= 0, key, "must be >= 0")
    _validate_shared(c, check)


def validate(c: config_dict.ConfigDict) -> None:
    """Value checks of a pretraining config, with messages naming the key."""
    check = _checker(c)
    _check_finite(c)

    check(c.train.objective in instances.OBJECTIVES, "train.objective", f"must be one of {instances.OBJECTIVES}")
    check(c.model.preset in PRESETS, "model.preset", f"must be one of {PRESETS}")
    sources.from_config(c.data)  # the data source keys, with messages naming them
    check(c.optimizer.name in OPTIMIZERS, "optimizer.name", f"must be one of {OPTIMIZERS}")
    check(c.train.resume_damaged in ("fallback", "refuse"), "train.resume_damaged", "must be 'fallback' or 'refuse'")
    check(c.train.max_rollbacks >= 0, "train.max_rollbacks", "must be >= 0")
    check(c.train.loss_spike_factor == 0 or c.train.loss_spike_factor > 1, "train.loss_spike_factor",
          "must be 0 (off) or > 1")
    check(c.optimizer.decay in DECAYS, "optimizer.decay", f"must be one of {DECAYS}")
    for key in ("train.global_batch_size", "train.micro_batches", "train.steps",
                "train.log_every", "train.checkpoint_every", "train.keep",
                "data.max_seq_length"):
        check(_get(c, key) >= 1, key, "must be >= 1")
    check(c.train.global_batch_size % c.train.micro_batches == 0, "train.micro_batches",
          f"must divide train.global_batch_size={c.train.global_batch_size}")
    check(c.data.max_seq_length <= c.model.max_position_embeddings, "data.max_seq_length",
          f"exceeds model.max_position_embeddings={c.model.max_position_embeddings}")
    check(0 < c.data.masked_lm_prob < 1, "data.masked_lm_prob", "must be in (0, 1)")
    needed = masking.predictions_needed(c.data.masked_lm_prob, c.data.max_seq_length)
    check(c.data.max_predictions_per_seq is None or c.data.max_predictions_per_seq >= needed,
          "data.max_predictions_per_seq", f"must be >= {needed}, what data.masked_lm_prob="
          f"{c.data.masked_lm_prob} masks in a row of data.max_seq_length={c.data.max_seq_length}; "
          "raise it, or leave it unset to follow the rate")
    check(max_predictions_per_seq(c) <= c.data.max_seq_length,
          "data.max_predictions_per_seq", "exceeds data.max_seq_length")
    if c.data.packing:
        packing.check_settings(max_seq_length=c.data.max_seq_length, max_predictions_per_seq=max_predictions_per_seq(c),
                               max_instances_per_row=c.data.max_instances_per_row, masked_lm_prob=c.data.masked_lm_prob)
    check(c.data.tokenizer_model_type in ("unigram", "bpe"), "data.tokenizer_model_type", "must be unigram or bpe")
    check(c.data.tokenizer_vocab_size >= 16, "data.tokenizer_vocab_size", "must be >= 16")
    check(0 <= c.data.short_seq_prob <= 1, "data.short_seq_prob", "must be in [0, 1]")
    check(0 <= c.data.eval_fraction < 1, "data.eval_fraction", "must be in [0, 1)")
    check(0 <= c.data.max_unk_fraction <= 1, "data.max_unk_fraction", "must be in [0, 1] (1: no limit)")
    for key in ("data.worker_count", "train.eval_steps", "train.keep_best",
                "optimizer.warmup_steps", "optimizer.weight_decay", "optimizer.end_learning_rate"):
        check(_get(c, key) >= 0, key, "must be >= 0")
    check(c.train.eval_steps == 0 or c.train.eval_every >= 1, "train.eval_every",
          f"must be >= 1 when train.eval_steps={c.train.eval_steps} (set train.eval_steps=0 for no evaluation)")
    check(c.train.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
    check(not c.train.init_optimizer or c.train.init_from, "train.init_optimizer",
          "needs train.init_from (the checkpoint whose optimizer state it takes)")
    check(c.optimizer.learning_rate > 0, "optimizer.learning_rate", "must be > 0")
    check(c.optimizer.end_learning_rate <= c.optimizer.learning_rate, "optimizer.end_learning_rate",
          f"must be <= optimizer.learning_rate={c.optimizer.learning_rate}")
    check(c.optimizer.total_steps is None or c.optimizer.total_steps >= 1, "optimizer.total_steps",
          "must be >= 1 (or None: train.steps)")
    check(c.optimizer.power > 0, "optimizer.power", "must be > 0")
    for key in ("optimizer.b1", "optimizer.b2"):
        check(0 <= _get(c, key) < 1, key, "must be in [0, 1)")
    check(c.optimizer.eps > 0, "optimizer.eps", "must be > 0")
    check(c.optimizer.clip_norm >= 0, "optimizer.clip_norm", "must be >= 0 (0 disables clipping)")
    for key in ("model.hidden_dropout_prob", "model.attention_probs_dropout_prob"):
        check(_get(c, key) is None or 0 <= _get(c, key) < 1, key, "must be in [0, 1)")
    _validate_shared(c, check)


def _validate_shared(c, check) -> None:
    """The `mesh` and `distributed` sections, the same in every job's config."""
    for axis in ("data", "fsdp", "tensor"):
        check(c.mesh[axis] == -1 or c.mesh[axis] >= 1, f"mesh.{axis}", "must be >= 1, or -1 for the devices left over")
    check(c.mesh.slices >= 1, "mesh.slices", "must be >= 1")
    check(c.distributed.initialize in ("auto", "always", "never"), "distributed.initialize",
          "must be auto, always or never")
    check(c.distributed.heartbeat_timeout_seconds >= 1, "distributed.heartbeat_timeout_seconds", "must be >= 1")


def _check_finite(c, prefix: str = "") -> None:
    """Every float in the config (also inside tuples) is finite: nan and inf are refused."""
    for key, value in c.items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        if isinstance(value, config_dict.ConfigDict):
            _check_finite(value, f"{prefix}{key}.")
        elif any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ValueError(f"config.{prefix}{key}: must be a finite number (got {value!r})")


def _checker(c):
    def check(ok, key, msg):
        if not ok:
            raise ValueError(f"config.{key}: {msg} (got {_get(c, key)!r})")
    return check


def _get(c, dotted):
    for part in dotted.split("."):
        c = c[part]
    return c


def max_predictions_per_seq(c: config_dict.ConfigDict) -> int:
    """data.max_predictions_per_seq, or when unset the one following data.masked_lm_prob (with
    data.packing: a packed row's budget, floor(masked_lm_prob x max_seq_length) + max_instances_per_row)."""
    d = c.data
    if d.max_predictions_per_seq is not None:
        return d.max_predictions_per_seq
    if d.packing:
        return packing.row_predictions(d.max_seq_length, d.max_instances_per_row, d.masked_lm_prob)
    return masking.default_max_predictions(d.masked_lm_prob, d.max_seq_length)


def instances_per_row(c: config_dict.ConfigDict) -> int:
    """The loader's and the step's max_instances_per_row: data.max_instances_per_row with
    data.packing, else 0 (one instance per row, padded)."""
    return c.data.max_instances_per_row if c.data.packing else 0


def model_overrides(c: config_dict.ConfigDict, vocab_size: int) -> dict:
    """kwargs for BertConfig.preset(c.model.preset, **kwargs); unset keys keep the preset's."""
    overrides = {k: c.model[k] for k in MODEL_OVERRIDES if c.model[k] is not None}
    overrides.setdefault("vocab_size", vocab_size)
    if overrides.get("dtype") == "auto":
        overrides["dtype"] = hardware.compute_choice().dtype
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
