"""build_pretraining_data's parts that need no training run (the runs: test_pretrain, test_workdir_uri)."""
import pytest

from bert_jax import config_utils, paths
from bert_jax.data import pipeline, sources


def test_instances_without_a_tokenizer_is_a_clear_error(tmp_path):
    c = config_utils.pretrain_config("tiny")
    c.data.source, c.data.train_path = "prepared", str(tmp_path / "prepared")
    with pytest.raises(ValueError, match="data.tokenizer is required for data.source='prepared'"):
        pipeline.prepare_tokenizer(c, sources.from_config(c.data)[0], paths.workdir_path(tmp_path / "run"), None)
    assert not (tmp_path / "run" / "tokenizer").exists()
