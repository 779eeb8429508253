"""bert_jax.weights on a tiny model: config.json mapping, every format's round trip and
detection, heads, the tokenizer that goes with a checkpoint, bad input."""
import numpy as np
import pytest

from bert_jax import convert, weights
from bert_jax import params as params_lib
from bert_jax.model import BertConfig
from bert_jax.weights import hf

TINY = BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                  max_position_embeddings=16)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c", "d", "e"]


def test_config_json_mapping():
    d = hf.config_to_hf(BertConfig.preset("base", dtype="bfloat16", scan_layers=True))
    assert d["num_hidden_layers"] == 12 and d["model_type"] == "bert" and "scan_layers" not in d
    assert hf.config_from_hf(d) == BertConfig.preset("base")  # how to run it is not in config.json
    with pytest.raises(weights.ConversionError, match=r"^x/config.json: position_embedding_type='relative_key'"):
        hf.config_from_hf({**d, "position_embedding_type": "relative_key"}, "x/config.json")
    with pytest.raises(weights.ConversionError, match=r"missing key\(s\) \['hidden_size'\]"):
        hf.config_from_hf({k: v for k, v in d.items() if k != "hidden_size"})
    with pytest.raises(weights.ConversionError, match=r"^config.json: BertConfig: hidden_size=768 is not divisible"):
        hf.config_from_hf({**d, "num_attention_heads": 5})


@pytest.mark.parametrize("fmt", ["npz", "hf", "orbax"])
def test_every_format_round_trips_and_is_detected(tmp_path, fmt):
    params = params_lib.init_params(TINY, seed=0, head="classification", num_labels=3)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    out = weights.save(TINY, params, tmp_path / "out", fmt, tokenizer_dir=tmp_path / "tok", labels=("no", "sí", "?"))
    assert weights.detect_format(out) == fmt
    cfg, got, report = weights.load_pretrained(out)
    # A fine-tuned tree keeps its classifier and label names and gets no fresh pretraining heads.
    assert cfg == TINY and report == {"initialised": [], "ignored": [], "labels": ["no", "sí", "?"]}
    assert set(got) == {"bert", "classifier"}
    flat = params_lib.flatten(params)
    assert params_lib.flatten(got).keys() == flat.keys()
    for k, v in params_lib.flatten(got).items():
        np.testing.assert_array_equal(v, flat[k], err_msg=k)
    tokenizer, found = weights.tokenizer_for(out, cfg)  # shipped with the export, found again
    assert tokenizer.vocab_size == len(VOCAB) and (found / "vocab.txt").is_file()


def test_bare_encoder_gets_fresh_heads_and_tokenizer_errors(tmp_path):
    encoder = {"bert": params_lib.init_params(TINY, seed=0)["bert"]}
    path = weights.save(TINY, encoder, tmp_path / "enc.npz", "npz")
    _, params, report = weights.load_pretrained(path)
    assert report["initialised"] == ["mlm", "nsp"] and set(params) == {"bert", "mlm", "nsp"}
    assert weights.tokenizer_for(path, TINY) is None  # none beside it: the caller decides
    with pytest.raises(FileNotFoundError, match="no tokenizer next to the checkpoint"):
        weights.load_pretrained_encoder(str(path))
    with pytest.raises(FileNotFoundError, match="tokenizer .*missing_vocab.txt not found"):
        weights.tokenizer_for(path, TINY, str(tmp_path / "missing_vocab.txt"))
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB[:7]) + "\n")
    with pytest.raises(weights.ConversionError, match="tokenizer has 7 tokens but the checkpoint's vocab_size is 10"):
        weights.tokenizer_for(path, TINY)


def test_bad_input_is_named(tmp_path, capsys):
    hf.save(TINY, params_lib.init_params(TINY, seed=0), tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text("{not json")
    with pytest.raises(weights.ConversionError, match=r"hf/config.json: not valid JSON"):
        weights.load_pretrained(tmp_path / "hf")
    with pytest.raises(weights.ConversionError, match="unknown source format 'pt'"):
        weights.load_pretrained(tmp_path / "hf", "pt")
    np.savez(tmp_path / "foreign.npz", x=np.zeros(3))
    with pytest.raises(weights.ConversionError, match=r"foreign.npz: no __config__ entry"):
        weights.load_pretrained(tmp_path / "foreign.npz")
    # The CLI: one line on stderr and exit code 2, for bad flags and bad input alike.
    assert convert.main(["--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "o"), "--dst_format", "npz"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        convert.main(["--src", "x", "--dst", "y", "--dst_format", "safetensors"])
    assert e.value.code == 2 and "--dst_format=safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("fmt, dst", [("npz", "out/model.npz"), ("hf", "out"), ("orbax", "out")])
def test_an_existing_destination_is_refused_unless_overwrite(tmp_path, fmt, dst):
    """Every destination format: an export onto an earlier one fails naming the file and leaves
    it untouched; with overwrite only the export's own files are replaced, others beside them stay."""
    params = params_lib.init_params(TINY, seed=0)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    weights.save(TINY, params, tmp_path / dst, fmt, tokenizer_dir=tmp_path / "tok")
    unrelated = tmp_path / "out" / "notes.txt"
    unrelated.write_text("mine")
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="exists already; choose another destination or pass --overwrite"):
        weights.save(TINY, params_lib.init_params(TINY, seed=1), tmp_path / dst, fmt, tokenizer_dir=tmp_path / "tok")
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
    weights.save(TINY, params_lib.init_params(TINY, seed=1), tmp_path / dst, fmt, tokenizer_dir=tmp_path / "tok",
                 overwrite=True)
    _, got, _ = weights.load_pretrained(tmp_path / dst)
    np.testing.assert_array_equal(params_lib.flatten(got)["bert/pooler/kernel"],
                                  params_lib.flatten(params_lib.init_params(TINY, seed=1))["bert/pooler/kernel"])
    assert unrelated.read_text() == "mine"


def test_convert_keeps_unrelated_files_beside_the_destination(tmp_path, capsys):
    params = params_lib.init_params(TINY, seed=0)
    weights.save(TINY, params, tmp_path / "src.npz", "npz")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "vocab.txt").write_text("someone else's vocabulary\n")
    argv = ["--src", str(tmp_path / "src.npz"), "--dst", str(tmp_path / "hf"), "--dst_format", "hf",
            "--tokenizer", str(tmp_path / "tok")]
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    assert convert.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "hf/vocab.txt: exists already" in err and "--overwrite" in err
    assert (tmp_path / "hf" / "vocab.txt").read_text() == "someone else's vocabulary\n"
    assert not (tmp_path / "hf" / "model.safetensors").exists()
