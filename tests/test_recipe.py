"""Recipe options: the MLM-only objective, the masking rate, continued pretraining from
released weights (train.init_from with the real all-MiniLM-L6-v2 Hugging Face directory)."""
import hashlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bert_jax import mlm_eval, checkpoint, config_utils, losses, metrics_writer, pretraining, weights
from bert_jax import params as params_lib
from bert_jax import train_step as train_step_lib
from bert_jax.data import instances, loader, masking, prepare
from bert_jax.data.sources import DataSource
from bert_jax.model import BertConfig, BertForPreTraining, BertModel

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLS, SEP, VOCAB = 101, 102, 30522


def _corpus(num_documents, max_sentences=30, seed=0):
    rng = np.random.default_rng(seed)
    documents = [[rng.integers(1000, VOCAB, size=n) for n in
                  np.maximum(1, rng.lognormal(3.1, 0.6, size=rng.integers(1, max_sentences)).astype(int))]
                 for _ in range(num_documents)]
    return instances.TokenizedCorpus.from_documents(documents)


def _instances(corpus, seq_len, **kw):
    everything = np.arange(corpus.num_documents)
    return instances.create_instances(corpus, everything, everything, max_seq_length=seq_len, seed=3, cls_id=CLS,
                                      sep_id=SEP, vocab_size=VOCAB, **kw)


def test_default_objective_data_is_unchanged():
    """BERT's pairs and masks for a fixed seed: the digest they had before the objective option."""
    corpus = _corpus(200)
    rows = _instances(corpus, 128, short_seq_prob=0.1)
    batch = instances.unmasked_batch(rows)
    vocab = masking.MaskingVocab(103, (0, 100, 101, 102, 103), np.arange(999, VOCAB, dtype=np.int32))
    keys = masking.example_keys(3, np.arange(len(rows)))
    predictions = config_utils.max_predictions_per_seq(config_utils.pretrain_config("tiny"))  # follows 0.15 x 128
    batch.update(masking.mask_batch(batch["input_ids"], batch["input_mask"], keys, vocab,
                                    max_predictions_per_seq=predictions))
    digest = hashlib.sha256(rows.tobytes())
    for key in sorted(batch):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(batch[key]).tobytes())
    assert (len(rows), digest.hexdigest()) == (969, "eb28c93b3ba17ad67af84788deeb33374ea09864f772d5aa6b5fb33601b04cb2")


def test_mlm_rows_are_whole_sentences_of_one_document_without_nsp():
    seq_len = 64
    corpus = _corpus(60)
    rows = _instances(corpus, seq_len, short_seq_prob=0.0, objective="mlm")
    assert rows.dtype.names == ("input_ids", "num_tokens", "document")
    ids, n = rows["input_ids"].astype(np.int64), rows["num_tokens"].astype(np.int64)
    assert np.all(ids[:, 0] == CLS) and np.all(ids[np.arange(len(rows)), n - 1] == SEP) and np.all(n <= seq_len)
    assert np.all(ids[np.arange(seq_len)[None] >= n[:, None]] == 0)
    sentence_starts = set(corpus.sentence_offsets[:-1].tolist())
    for document in range(corpus.num_documents):
        mine = np.flatnonzero(rows["document"] == document)
        segments = [ids[r, 1:n[r] - 1] for r in mine]
        # every token of the document, in order
        np.testing.assert_array_equal(np.concatenate(segments), np.concatenate(corpus.document(document)))
        start = corpus.sentence_offsets[corpus.document_offsets[document]]
        for r, segment in zip(mine[:-1], segments):  # full: the next sentence (or piece) did not fit
            start += len(segment)
            assert start in sentence_starts or len(segment) == seq_len - 2
            next_sentence = corpus.sentence_offsets[np.searchsorted(corpus.sentence_offsets, start, "right")] - start
            assert len(segment) + next_sentence > seq_len - 2
    batch = instances.unmasked_batch(rows)
    assert set(batch) == {"input_ids", "input_mask", "segment_ids"} and not batch["segment_ids"].any()
    assert set(instances.batch_spec(1, seq_len, 1, next_sentence=False)) == \
        set(instances.batch_spec(1, seq_len, 1)) - {"next_sentence_labels"}


def test_mlm_loss_has_no_nsp_term():
    """The MLM objective's model has no NSP head and its loss is the MLM part of BERT's loss."""
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    abstract = nnx.eval_shape(lambda: BertForPreTraining(cfg, next_sentence=False, rngs=nnx.Rngs(0)))
    assert set(params_lib.to_dict(nnx.state(abstract, nnx.Param))) == {"bert", "mlm"}
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(5, 120, (4, 16)), "input_mask": np.ones((4, 16), np.int32),
             "segment_ids": np.zeros((4, 16), np.int32), "masked_lm_positions": rng.integers(1, 15, (4, 3)),
             "masked_lm_ids": rng.integers(5, 120, (4, 3)), "masked_lm_weights": np.ones((4, 3), np.float32)}

    @jax.jit
    def both(batch):  # one compiled program: the same encoder and MLM head with and without NSP
        graphdef, params = nnx.split(BertForPreTraining(cfg, rngs=nnx.Rngs(0)), nnx.Param)
        params = params_lib.to_dict(params)
        mlm_graphdef = nnx.split(BertForPreTraining(cfg, next_sentence=False, rngs=nnx.Rngs(0)))[0]
        mlm = losses.MLM.loss({k: params[k] for k in ("bert", "mlm")}, mlm_graphdef, batch, None, deterministic=True)
        pairs = losses.PRETRAINING.loss(params, graphdef, {**batch, "next_sentence_labels": jnp.zeros(4, jnp.int32)},
                                        None, deterministic=True)
        return mlm, pairs

    (loss, sums), (_, nsp_sums) = both(batch)
    assert "nsp_loss_sum" not in sums and set(losses.MLM.metrics(sums)).isdisjoint({"nsp_loss", "nsp_accuracy"})
    assert float(nsp_sums["nsp_loss_sum"]) > 0
    np.testing.assert_allclose(float(loss), float(nsp_sums["mlm_loss_sum"]) / (12 + 1e-5), rtol=1e-6)
    assert float(loss) == pytest.approx(float(losses.MLM.metrics(sums)["loss"]), rel=1e-5)
    with pytest.raises(KeyError, match="next_sentence_labels"):
        losses.PRETRAINING.normalizers(batch)


def test_max_predictions_follow_the_masking_rate():
    c = config_utils.pretrain_config("tiny")
    assert config_utils.max_predictions_per_seq(c) == 20  # Google's 0.15 x 128
    c.data.masked_lm_prob = 0.3
    assert config_utils.max_predictions_per_seq(c) == 39
    c.data.max_seq_length, c.model.max_position_embeddings = 512, 512
    assert config_utils.max_predictions_per_seq(c) == 154
    c.data.max_predictions_per_seq = 160
    assert config_utils.max_predictions_per_seq(c) == 160
    c.data.max_predictions_per_seq = 100
    c.data.train_path = "data"
    with pytest.raises(ValueError, match=r"config.data.max_predictions_per_seq: must be >= 154, what "
                                         r"data.masked_lm_prob=0.3 masks in a row of data.max_seq_length=512"):
        config_utils.validate(c)
    mosaic = config_utils.load_config_file(str(ROOT / "configs" / "mosaicbert.py"))
    mosaic.data.train_path = "data"
    config_utils.validate(mosaic)
    assert (mosaic.train.objective, mosaic.data.masked_lm_prob, mosaic.model.attention_probs_dropout_prob,
            config_utils.max_predictions_per_seq(mosaic)) == ("mlm", 0.3, 0.0, 39)
    short = config_utils.load_config_file(str(ROOT / "configs" / "short_budget.py"))
    short.data.train_path = "data"
    config_utils.validate(short)
    model = BertConfig.preset(short.model.preset, **config_utils.model_overrides(short, 30522))
    assert (model.pre_layer_norm, model.hidden_dropout_prob, model.attention_probs_dropout_prob,
            short.train.objective, short.optimizer.learning_rate) == (True, 0.0, 0.0, "mlm", 5e-4)


@pytest.fixture
def minilm_run(minilm, shared_data, tmp_path_factory):
    """MLM-only instances of some enwiki lines with MiniLM's own vocabulary, and a config for a
    continued-pretraining run from the MiniLM Hugging Face directory."""
    tmp = tmp_path_factory.mktemp("minilm_recipe")
    model_dir = pathlib.Path(minilm.__file__).parent / "model"
    lines = (shared_data / "enwiki_sample" / "enwiki_2015_sample.txt").read_text().splitlines()[:300]
    (tmp / "corpus.txt").write_text("\n".join(lines) + "\n")
    prepare.prepare(DataSource.text(str(tmp / "corpus.txt")), model_dir / "vocab.txt", tmp / "data",
                    max_seq_length=32, masked_lm_prob=0.2, seed=1, workers=1, progress=False, objective="mlm")
    c = config_utils.load_config_file(str(ROOT / "configs" / "bert_tiny.py"))
    c.model.update(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536,
                   dtype="float32", scan_layers=True)  # scanned layers: a sixth of the compile
    c.data.update(source="prepared", train_path=str(tmp / "data"), max_seq_length=32, masked_lm_prob=0.2)
    c.train.update(objective="mlm", init_from=str(model_dir), global_batch_size=8, steps=2, log_every=1,
                   eval_steps=0, checkpoint_every=10_000, progress_bar=False)
    c.optimizer.update(learning_rate=1e-4, warmup_steps=0)
    return c, model_dir


def test_init_from_hugging_face_weights(minilm_run, tmp_path, capsys, monkeypatch):
    """A short MLM-only run from the MiniLM directory starts from MiniLM's encoder (the same
    outputs), reports the head it made, keeps MiniLM's vocabulary and records its objective."""
    c, model_dir = minilm_run
    create_state, initial = train_step_lib.PretrainingStep.create_state, []

    def recording(program, params=None):  # the run's initial state, copied before the steps donate it
        state = create_state(program, params)
        initial.append(jax.device_get(state.params))
        return state
    monkeypatch.setattr(train_step_lib.PretrainingStep, "create_state", recording)
    workdir = tmp_path / "run"
    summary = pretraining.run(c, workdir)
    rows = metrics_writer.read_jsonl(workdir, "train")
    assert summary["step"] == 2 and all(np.isfinite(r["loss"]) for r in rows) and "nsp_loss" not in rows[-1]
    assert "heads initialised fresh: ['mlm']" in capsys.readouterr().out
    meta = checkpoint.Checkpointer(workdir, read_only=True).newest_meta()
    assert meta["objective"] == "mlm" and meta["tokenizer"]["vocab_size"] == VOCAB

    source = weights.load_pretrained_encoder(str(model_dir))
    (params,) = initial
    assert set(params) == {"bert", "mlm"}
    encoder = nnx.eval_shape(lambda: BertModel(source.config.replace(dtype="float32", scan_layers=True),
                                               rngs=nnx.Rngs(0)))
    graphdef = nnx.split(encoder)[0]
    forward = jax.jit(lambda p, ids: nnx.merge(graphdef, p)(ids, deterministic=True)["sequence_output"])
    ids = np.asarray([source.tokenizer.encode("continued pretraining from released weights")], np.int32)
    expected = forward(params_lib.stack_layers(source.encoder, 6), ids)
    np.testing.assert_array_equal(forward(params["bert"], ids), expected)

    restored_config, restored, _ = checkpoint.restore_params(workdir)  # MLM-only checkpoints evaluate
    (top,) = mlm_eval.fill_mask(restored_config, restored, source.tokenizer, ["the capital of france is [MASK] ."])
    assert len(top) == 5 and all(0.0 <= p <= 1.0 for _, p in top)

    c.train.objective = "mlm_nsp"  # resuming with the other objective, or reading the data with it
    with pytest.raises(checkpoint.CheckpointMismatchError, match="train.objective='mlm'"):
        pretraining.run(c, workdir)
    with pytest.raises(ValueError, match=r"was prepared for train.objective='mlm', this run's is 'mlm_nsp'"):
        loader.make_pretraining_loader(DataSource.prepared(c.data.train_path), global_batch_size=8,
                                       max_seq_length=32, max_predictions_per_seq=7, seed=0)
