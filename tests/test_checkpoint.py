"""Checkpoints: restore onto other meshes, what is kept, params as numpy, bad paths."""
import jax
import numpy as np
import pytest

from bert_jax import checkpoint, optim, sharding
from bert_jax import train_step as train_step_lib
from bert_jax.model import BertConfig

MODEL = BertConfig.preset("tiny", vocab_size=96, max_position_embeddings=32)
OPT, _ = optim.make_optimizer({"learning_rate": 1e-3, "warmup_steps": 0, "total_steps": 10})


def _mesh(num_devices, **axes):
    return sharding.make_mesh(axes or {"data": -1}, devices=jax.devices()[:num_devices])


def _state(mesh, seed=0):
    return train_step_lib.create_train_state(MODEL, OPT, mesh, sharding.DEFAULT_RULES, seed=seed)


def _save(directory, step, state, **kw):
    ckpt = checkpoint.Checkpointer(directory, async_save=True, **kw.pop("options", {}))
    ckpt.save(step, state, data_state={"next_batch": step}, config={"seed": 0},
              meta={"model_config": MODEL.to_dict(), "tokenizer": {"dir": "tokenizer", "sha256": "x"}},
              **kw)
    return ckpt


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A state on 8 devices with FSDP over all of them, saved at step 7."""
    workdir = tmp_path_factory.mktemp("ckpt")
    mesh8 = _mesh(8, data=1, fsdp=8)
    _, state, _ = _state(mesh8, seed=3)
    state = state.replace(step=state.step + 7)
    ckpt = _save(workdir, 7, state)
    ckpt.wait()
    ckpt.close()
    return workdir, jax.device_get(state)


@pytest.mark.parametrize("num_devices,axes", [(2, {"data": 2}), (4, {"data": 2, "fsdp": 2})])
def test_restore_onto_another_mesh(saved, num_devices, axes):
    workdir, expected = saved
    mesh = _mesh(num_devices, **axes)
    _, abstract, shardings = train_step_lib.abstract_train_state(MODEL, OPT, mesh, sharding.DEFAULT_RULES)
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    assert ckpt.latest_step() == 7
    state, data_state = ckpt.restore(7, abstract)
    assert data_state == {"next_batch": 7}
    _assert_trees_equal(state, expected)
    for leaf, target in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        assert leaf.sharding == target  # on the new mesh, laid out as asked
    assert {d.id for d in jax.tree.leaves(state.params)[0].sharding.device_set} <= \
        {d.id for d in jax.devices()[:num_devices]}


def test_restore_params_as_numpy(saved):
    workdir, expected = saved
    for path in (workdir, workdir / checkpoint.CHECKPOINTS_DIR, workdir / checkpoint.CHECKPOINTS_DIR / "7"):
        config, params, tokenizer_dir = checkpoint.restore_params(path)
        assert config == MODEL
        assert tokenizer_dir is None  # no tokenizer/ in this workdir
        assert all(type(x) is np.ndarray for x in jax.tree.leaves(params))
        _assert_trees_equal(params, expected.params)


def test_restore_params_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        checkpoint.restore_params(tmp_path)


def test_existing_step_is_never_overwritten(saved):
    workdir, expected = saved
    other = jax.tree.map(lambda x: np.asarray(x) + 1, expected)
    ckpt = checkpoint.Checkpointer(workdir)
    assert ckpt.save(7, other, data_state={}, config={}, meta={}) is False
    ckpt.wait()
    ckpt.close()
    _, params, _ = checkpoint.restore_params(workdir)
    _assert_trees_equal(params, expected.params)


def test_keep_latest_and_best_by_eval_loss(tmp_path):
    state = {"params": {"w": np.ones(3, np.float32)}}  # what is kept does not depend on the state
    ckpt = checkpoint.Checkpointer(tmp_path, keep=2, keep_best=1, async_save=False)
    for step, eval_loss in [(1, 5.0), (2, 1.5), (3, None), (4, 3.0)]:
        ckpt.save(step, state, data_state={"next_batch": step}, config={}, meta={},
                  metrics=None if eval_loss is None else {"eval_loss": eval_loss})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3, 4]  # best eval loss (step 2) and the latest two
    ckpt.close()


def test_check_same_model_names_the_differences():
    other = MODEL.replace(hidden_size=256, num_attention_heads=4, intermediate_size=1024).to_dict()
    with pytest.raises(checkpoint.CheckpointMismatchError, match="(?s)hidden_size.*intermediate_size"):
        checkpoint.check_same_model(MODEL.to_dict(), other, "workdir")
    # Compute dtype and remat do not change the params: resuming with them changed is fine.
    checkpoint.check_same_model(MODEL.to_dict(), MODEL.replace(dtype="bfloat16", remat_policy="full").to_dict(), "w")
