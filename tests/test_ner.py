"""NER task: configs/ner.py, batches and evaluation plumbing, the token-classification loss,
and real MiniLM weights fine-tuned on the CoNLL-2003 sample through the shared loop."""
import pathlib

import jax
import numpy as np
import pytest

from flax import nnx

from bert_jax import config_utils, finetune, losses
from bert_jax.model import BertConfig, BertForTokenClassification
from bert_jax.tasks import ner, ner_data

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def ner_config(**overrides):
    c = config_utils.load_config_file(f"{CONFIGS}/ner.py")
    for key, value in overrides.items():
        c[key] = value
    return c


@pytest.fixture(scope="module")
def tokenizer(minilm_tokenizer):
    return minilm_tokenizer


def test_config_keys_and_errors(shared_data, tokenizer):
    c = ner_config()
    config_utils.validate_finetune(c)
    assert (c.task, c.max_seq_length, c.learning_rates) == ("ner", 128, (5e-5,))
    with pytest.raises(AttributeError, match="glue_dir"):  # GLUE's keys are not NER's
        c.glue_dir = "x"
    with pytest.raises(ValueError, match="config.data_dir is empty"):
        ner.build("ner", ner_config(), tokenizer)
    with pytest.raises(ValueError, match=r"eng.train:3: tag B-ORG is not in the label set"):
        ner.build("ner", ner_config(data_dir=str(shared_data / "conll2003_sample"), labels="O,B-PER,I-PER"),
                  tokenizer)


@pytest.mark.parametrize("packing", [False, True])
def test_gold_predictions_score_one(shared_data, tokenizer, tmp_path, packing):
    """Batches carry every window's labels, and predictions come back to the right words."""
    task = ner.build("ner", ner_config(data_dir=str(shared_data / "conll2003_sample"), max_seq_length=16,
                                       batch_size=8, eval_batch_size=8, smallest_bucket=8, packing=packing),
                     tokenizer)
    assert task.steps_per_epoch == -(-len(task.train) // 8) and len(task.train) > task.num_train_examples
    batches = list(task.train_batches(seed=0, epoch=0))
    assert {b["input_ids"].shape[1] for b in batches} <= ({16} if packing else {8, 16})
    if packing:  # some rows hold several windows, each window's [CLS] at a position id 0
        assert any((((b["position_ids"] == 0) & (b["input_mask"] > 0)).sum(1) > 1).any() for b in batches)
        assert all(((b["position_ids"] == 0) == (b["input_ids"] == tokenizer.cls_id))[b["input_mask"] > 0].all()
                   for b in batches)
    labelled = sum(int((b["label_ids"] != losses.IGNORE).sum()) for b in batches)
    assert labelled == sum(len(s.words) for s in ner_data.read_conll(str(shared_data / "conll2003_sample/eng.train")))

    def predict(batch):  # the gold label at labelled positions, rubbish elsewhere
        return np.where(batch["label_ids"] == losses.IGNORE, 3, batch["label_ids"])
    metrics = task.evaluate(predict)
    assert metrics["dev/f1"] == metrics["dev/precision"] == metrics["dev/recall"] == metrics["dev/PER/f1"] == 1.0
    files = task.write_predictions(task.test_predictions(predict), str(tmp_path))
    assert [pathlib.Path(f).name for f in files] == ["ner_dev.conll"]
    lines = pathlib.Path(files[0]).read_text().splitlines()
    assert lines[0].split()[1] == lines[0].split()[2] and len(lines[0].split()) == 3


def test_token_classification_loss_counts_labelled_tokens_only():
    cfg = BertConfig.preset("tiny", vocab_size=40, max_position_embeddings=16)
    graphdef, params = nnx.split(BertForTokenClassification(cfg, 3, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(5, 40, (2, 8)), "input_mask": np.ones((2, 8), np.int32),
             "segment_ids": np.zeros((2, 8), np.int32),
             "label_ids": np.array([[-100, 0, 2, -100, 1, -100, -100, -100], [-100] * 8])}
    loss, sums = jax.jit(lambda p, b: losses.TOKEN_CLASSIFICATION.loss(p, graphdef, b, None, deterministic=True))(
        params, batch)
    logits = np.asarray(jax.jit(lambda p, ids: nnx.merge(graphdef, p)(ids)["logits"])(params, batch["input_ids"]),
                        np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.mean([log_probs[0, 1, 0], log_probs[0, 2, 2], log_probs[0, 4, 1]])
    assert float(loss) == pytest.approx(expected, rel=1e-5) and float(sums["tokens"]) == 3


def test_packed_windows_give_the_padded_loss_gradients_and_predictions(shared_data, tokenizer):
    """The same windows packed several to a row and padded one to a row: equal loss and
    gradients (dropout off) and the same predicted tag for every word, on the same weights."""
    def build(packing):
        return ner.build("ner", ner_config(data_dir=str(shared_data / "conll2003_sample"), max_seq_length=32,
                                           smallest_bucket=32, batch_size=24, eval_batch_size=512, packing=packing),
                         tokenizer)
    padded, packed = build(False), build(True)
    cfg = BertConfig.preset("tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=32)
    model = BertForTokenClassification(cfg, len(padded.labels), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    indices = np.arange(24)
    loss_and_grads = jax.jit(jax.value_and_grad(
        lambda p, b: losses.TOKEN_CLASSIFICATION.loss(p, graphdef, b, None, deterministic=True)[0]))
    (loss, grads), (packed_loss, packed_grads) = (
        loss_and_grads(params, task._batch(task.train, indices, 24)[0]) for task in (padded, packed))
    assert len(packed._batch(packed.train, indices, 24)[0]["input_ids"]) < 24  # it did pack
    np.testing.assert_allclose(packed_loss, loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), packed_grads, grads)

    predict_outputs = jax.jit(lambda p, b: padded.predict_outputs(p, graphdef, b))

    def predict(batch):
        return np.asarray(predict_outputs(params, batch))
    tags = {name: task.test_predictions(predict)["dev"] for name, task in (("padded", padded), ("packed", packed))}
    assert tags["packed"] == tags["padded"] and len(set(t for s in tags["packed"] for t in s)) > 1
    assert packed.evaluate(predict) == padded.evaluate(predict)


def test_minilm_fine_tuned_on_the_sample_finds_entities(shared_data, minilm, tmp_path):
    c = ner_config(data_dir=str(shared_data / "conll2003_sample"), init_checkpoint=str(minilm.MODEL_DIR),
                   max_seq_length=32, smallest_bucket=32, batch_size=16, eval_batch_size=64,
                   max_train_examples=120, num_epochs=1.0, learning_rates=(1e-3,), warmup_fraction=0.0,
                   progress_bar=False, eval_before_training=True, eval_every_steps=10_000, save_checkpoint=False,
                   packing=False)  # one shape to compile; packing's equivalence is tested above
    c.mesh.update(data=1, fsdp=-1)  # each CPU device updates an eighth of the optimizer state, not all of it
    results = finetune.run(c, tmp_path / "work")
    run = results["tasks"]["ner"]["runs"][0]
    before, after = run["evaluations"][0], run["final"]
    assert after["dev/f1"] > before["dev/f1"] + 0.1, (before["dev/f1"], after["dev/f1"])
    assert {"dev/precision", "dev/recall", "dev/LOC/f1", "dev/PER/recall"} <= set(after)
    assert (tmp_path / "work" / "submission" / "ner_dev.conll").is_file()
