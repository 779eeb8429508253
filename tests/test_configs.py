"""Config files: every one loads and validates; typos and bad values are errors."""
import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from bert_jax import config_utils
from bert_jax.model import BertConfig

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
SIZES = {"tiny": (2, 128), "mini": (4, 256), "small": (4, 512), "medium": (8, 512),
         "base": (12, 768), "large": (24, 1024)}


def _parse(*args):
    """Parse command-line flags the way `python -m bert_jax.pretrain` does."""
    flag_values = flags.FlagValues()
    argv = ["pretrain", *args]
    holder = config_flags.DEFINE_config_file("config", None, "config", flag_values=flag_values,
                                             lock_config=True, sys_argv=argv)
    flag_values(argv)
    return holder.value


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("phase", ["", ":phase2"])
def test_size_configs_load_and_build(size, phase):
    c = config_utils.load_config_file(f"{CONFIGS}/bert_{size}.py{phase}")
    c.data.train_path = "data/prepared"
    config_utils.validate(c)
    model = BertConfig.preset(c.model.preset, **config_utils.model_overrides(c, 30522))
    assert (model.num_hidden_layers, model.hidden_size) == SIZES[size]
    assert model.max_position_embeddings == 512  # phase 2 needs all 512 positions
    assert c.data.max_seq_length == (512 if phase else 128)


def test_demo_config_is_offline_and_small():
    c = config_utils.load_config_file(f"{CONFIGS}/demo.py")
    config_utils.validate(c)
    assert c.data.source == "demo" and c.data.tokenizer == ""  # SentencePiece trained on the corpus
    assert c.model.preset == "tiny"


def test_command_line_override_and_unknown_key():
    c = _parse(f"--config={CONFIGS}/demo.py", "--config.train.steps=7", "--config.optimizer.name=lamb")
    assert c.train.steps == 7 and c.optimizer.name == "lamb"
    with pytest.raises(Exception, match="stpes"):
        _parse(f"--config={CONFIGS}/demo.py", "--config.train.stpes=7")
    with pytest.raises(Exception, match="steps"):
        _parse(f"--config={CONFIGS}/demo.py", "--config.train.steps=many")


def test_config_is_locked():
    c = config_utils.load_config_file(f"{CONFIGS}/bert_base.py")
    with pytest.raises(AttributeError, match="warmpu"):
        c.optimizer.warmpu_steps = 10


def test_phase_argument_unknown():
    with pytest.raises(ValueError, match="phase3"):
        config_utils.load_config_file(f"{CONFIGS}/bert_base.py:phase3")


@pytest.mark.parametrize("key,value,match", [
    ("optimizer.name", "sgd", "optimizer.name"),
    ("model.preset", "huge", "model.preset"),
    ("data.source", "web", "data.source"),
    ("train.micro_batches", 3, "train.micro_batches"),
    ("data.max_seq_length", 1024, "data.max_seq_length"),
])
def test_validate_names_the_key(key, value, match):
    c = config_utils.load_config_file(f"{CONFIGS}/demo.py")
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(ValueError, match=match):
        config_utils.validate(c)


def test_model_overrides_only_set_keys():
    c = config_utils.load_config_file(f"{CONFIGS}/bert_base.py")
    overrides = config_utils.model_overrides(c, vocab_size=8000)
    assert overrides["vocab_size"] == 8000
    assert "hidden_dropout_prob" not in overrides  # the preset's 0.1
    c.model.vocab_size = 8192  # e.g. padded for TPU-friendly shapes
    assert config_utils.model_overrides(c, vocab_size=8000)["vocab_size"] == 8192


def test_every_bertconfig_field_is_a_model_key():
    c = _parse(f"--config={CONFIGS}/bert_tiny.py", "--config.model.num_hidden_layers=3",
               "--config.model.layer_norm_eps=1e-6")
    model = BertConfig.preset(c.model.preset, **config_utils.model_overrides(c, 1000))
    assert (model.num_hidden_layers, model.hidden_size, model.layer_norm_eps) == (3, 128, 1e-6)
    assert set(config_utils.MODEL_OVERRIDES) == set(BertConfig.__dataclass_fields__)


def test_finetune_config_shares_mesh_and_distributed_with_pretraining():
    glue = config_utils.load_config_file(f"{CONFIGS}/glue.py")
    config_utils.validate_finetune(glue)
    base = config_utils.load_config_file(f"{CONFIGS}/bert_base.py")
    assert glue.mesh.to_dict() == base.mesh.to_dict()
    assert glue.distributed.to_dict() == base.distributed.to_dict()
    assert config_utils.load_config_file(f"{CONFIGS}/glue.py:quick").max_seq_length == 64


@pytest.mark.parametrize("key,value,match", [
    ("learning_rates", (2e-5, 2e-5), "config.learning_rates: must not repeat"),
    ("seeds", (), "config.seeds"),
    ("log_every_steps", 0, "config.log_every_steps"),
    ("checkpoint_every_steps", -1, "config.checkpoint_every_steps"),
    ("mesh.tensor", 0, "config.mesh.tensor"),
    ("distributed.initialize", "sometimes", "config.distributed.initialize"),
])
def test_validate_finetune_names_the_key(key, value, match):
    c = config_utils.load_config_file(f"{CONFIGS}/glue.py")
    *section, name = key.split(".")
    (c[section[0]] if section else c)[name] = value
    with pytest.raises(ValueError, match=match):
        config_utils.validate_finetune(c)
