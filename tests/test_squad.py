"""SQuAD task: configs/squad.py, batches and answer plumbing (v1.1 and v2.0), the span loss,
and real MiniLM weights fine-tuned on SQuAD sample questions through the shared loop."""
import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from bert_jax import config_utils, finetune, losses
from bert_jax.model import BertConfig, BertForQuestionAnswering
from bert_jax.tasks import squad

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def squad_config(**overrides):
    c = config_utils.load_config_file(f"{CONFIGS}/squad.py")
    for key, value in overrides.items():
        c[key] = value
    return c


@pytest.fixture(scope="module")
def tokenizer(minilm_tokenizer):
    return minilm_tokenizer


def gold_predict(batch):
    """Start/end logits peaked at the batch's gold positions ([CLS] when unanswerable)."""
    logits = np.zeros((*batch["input_ids"].shape, 2), np.float32)
    rows = np.arange(len(logits))
    logits[rows, batch["start_positions"], 0] = 10.0
    logits[rows, batch["end_positions"], 1] = 10.0
    return logits


def test_config_defaults_are_googles():
    c = squad_config()
    config_utils.validate_finetune(c)
    assert (c.max_seq_length, c.doc_stride, c.max_query_length, c.max_answer_length, c.n_best_size) == (
        384, 128, 64, 30, 20)
    assert c.task == "squad" and not c.version_2_with_negative


def test_gold_logits_give_exact_answers_v2(shared_data, tokenizer, tmp_path):
    dev = str(shared_data / "squad_sample" / "dev-v2.0-sample.json")
    with pytest.raises(ValueError, match="config.train_file is empty"):
        squad.build("squad", squad_config(predict_file=dev), tokenizer)
    c = squad_config(train_file=dev, predict_file=dev, version_2_with_negative=True, max_seq_length=128,
                     doc_stride=48, smallest_bucket=64, batch_size=8, eval_batch_size=16)
    task = squad.build("squad", c, tokenizer)
    batch = next(task.train_batches(seed=0, epoch=0))
    assert batch["input_ids"].shape[0] == 8 and set(batch) >= set(losses.SPAN_KEYS)
    metrics = task.evaluate(gold_predict)
    assert (metrics["dev/exact_match"], metrics["dev/f1"], metrics["dev/HasAns_f1"], metrics["dev/NoAns_f1"]) == (
        100.0, 100.0, 100.0, 100.0)
    files = task.write_predictions(task.test_predictions(gold_predict), str(tmp_path))
    assert [pathlib.Path(f).name for f in files] == ["predictions.json", "null_odds.json"]
    answers = json.loads((tmp_path / "predictions.json").read_text())
    assert answers["56ddde6b9a695914005b9628"] == "France" and len(answers) == 208
    assert sum(a == "" for a in answers.values()) == 112


def test_span_loss_ignores_padding():
    cfg = BertConfig.preset("tiny", vocab_size=40, max_position_embeddings=32)
    graphdef, params = nnx.split(BertForQuestionAnswering(cfg, rngs=nnx.Rngs(0)))
    ids = np.random.default_rng(0).integers(5, 40, (2, 10))
    losses_by_length = []
    for length in (10, 16):
        batch = {"input_ids": np.zeros((2, length), np.int32), "input_mask": np.zeros((2, length), np.int32),
                 "segment_ids": np.zeros((2, length), np.int32), "start_positions": np.array([3, 0]),
                 "end_positions": np.array([5, 0]), "is_real_example": np.array([1.0, 0.0])}
        batch["input_ids"][:, :10], batch["input_mask"][:, :10] = ids, 1
        loss, sums = jax.jit(lambda p, b: losses.SPAN.loss(p, graphdef, b, None, deterministic=True))(params, batch)
        losses_by_length.append(float(loss))
    out = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, ids)
    start, end = (np.asarray(out[k][0], np.float64) for k in ("start_logits", "end_logits"))
    expected = (np.log(np.exp(start).sum()) - start[3] + np.log(np.exp(end).sum()) - end[5]) / 2
    assert losses_by_length == pytest.approx([expected, expected], rel=1e-5) and float(sums["examples"]) == 1


def short_paragraph_files(shared_data, out: pathlib.Path, paragraphs: int = 10) -> tuple[str, str]:
    """Train on the first two thirds of the questions of the shortest paragraphs, evaluate on the rest."""
    data = json.loads((shared_data / "squad_sample" / "train-v1.1-sample.json").read_text())
    chosen = sorted((p for a in data["data"] for p in a["paragraphs"]), key=lambda p: len(p["context"]))[:paragraphs]
    files = []
    for name, part in (("train", lambda q: q[: 2 * len(q) // 3]), ("dev", lambda q: q[2 * len(q) // 3:])):
        content = {"version": "1.1", "data": [{"title": "short", "paragraphs": [
            dict(p, qas=part(p["qas"])) for p in chosen]}]}
        (out / f"{name}.json").write_text(json.dumps(content))
        files.append(str(out / f"{name}.json"))
    return files[0], files[1]


def test_minilm_fine_tuned_on_sample_questions_answers_better(shared_data, minilm, tmp_path):
    train_file, predict_file = short_paragraph_files(shared_data, tmp_path)
    c = squad_config(train_file=train_file, predict_file=predict_file, init_checkpoint=str(minilm.MODEL_DIR),
                     max_seq_length=96, doc_stride=48, max_query_length=24, smallest_bucket=96, batch_size=16,
                     eval_batch_size=64, num_epochs=1.0, learning_rates=(3e-4,), warmup_fraction=0.0,
                     progress_bar=False, eval_before_training=True, eval_every_steps=10_000, save_checkpoint=False)
    c.mesh.update(data=1, fsdp=-1)  # each CPU device updates an eighth of the optimizer state, not all of it
    results = finetune.run(c, tmp_path / "work")
    run = results["tasks"]["squad"]["runs"][0]
    before, after = run["evaluations"][0], run["final"]
    assert after["dev/f1"] > before["dev/f1"] + 5, (before["dev/f1"], after["dev/f1"])
    answers = json.loads((tmp_path / "work" / "submission" / "predictions.json").read_text())
    assert len(answers) == after["dev/total"]
