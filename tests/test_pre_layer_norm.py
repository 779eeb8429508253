"""model.pre_layer_norm: pre-LayerNorm blocks and a final LayerNorm, against transformers'
MegatronBertModel (the same blocks), and what the weights formats do with such a model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from bert_jax import model as M
from bert_jax import params as params_lib
from bert_jax import weights
from bert_jax.weights import hf as hf_weights
from bert_jax.weights.mapping import ConversionError

CFG = M.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                   intermediate_size=48, max_position_embeddings=32, pre_layer_norm=True)


def batch(seed=0, length=20):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, CFG.vocab_size, (3, length)).astype(np.int32)
    mask = (np.arange(length)[None] < np.array([[length], [13], [7]])).astype(np.int32)
    segments = (np.arange(length)[None] >= 5).astype(np.int32) * mask
    return ids * mask, mask, segments


def megatron_with_our_weights(ours):
    """MegatronBertModel holding `ours`' encoder weights. Megatron's embeddings have no LayerNorm
    (ours do), so its position and token-type tables are zeroed and it is fed our embeddings'
    output as inputs_embeds: everything after that is the two encoders' own."""
    hf = transformers.MegatronBertModel(transformers.MegatronBertConfig(
        vocab_size=CFG.vocab_size, hidden_size=CFG.hidden_size, num_hidden_layers=CFG.num_hidden_layers,
        num_attention_heads=CFG.num_attention_heads, intermediate_size=CFG.intermediate_size,
        max_position_embeddings=CFG.max_position_embeddings, layer_norm_eps=CFG.layer_norm_eps)).eval()
    flat = params_lib.flatten(params_lib.to_dict(nnx.state(ours, nnx.Param)))
    ours_of = {"attention.ln": "attention_layer_norm", "attention.self.query": "attention/query",
               "attention.self.key": "attention/key", "attention.self.value": "attention/value",
               "attention.output.dense": "attention/output", "ln": "output_layer_norm",
               "intermediate.dense": "intermediate", "output.dense": "output"}
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.startswith("embeddings."):
                p.zero_()
                continue
            module, leaf = name.rsplit(".", 1)
            if module == "encoder.ln":
                path = "encoder/final_layer_norm"
            elif module.startswith("pooler"):
                path = "pooler"
            else:
                _, _, i, rest = module.split(".", 3)
                path = f"encoder/layers/{i}/{ours_of[rest]}"
            norm = path.endswith("layer_norm")
            key = f"bert/{path}/" + {("weight", True): "scale", ("bias", True): "bias",
                                     ("weight", False): "kernel", ("bias", False): "bias"}[leaf, norm]
            value = np.asarray(flat[key])
            p.copy_(torch.tensor(value.T if leaf == "weight" and not norm else value))
    return hf


@pytest.fixture(scope="module")
def ours():
    model = M.BertForPreTraining(CFG, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)  # non-trivial LayerNorm values, so that a mix-up shows
    noisy = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(a.size), a.shape), state)
    nnx.update(model, noisy)
    return model


def test_blocks_and_final_layer_norm_match_megatron_bert(ours):
    ids, mask, segments = batch()
    hf = megatron_with_our_weights(ours)
    bert = ours.bert
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    embedded = bert.embeddings(jnp.asarray(ids), jnp.asarray(segments), positions, True, None)
    with torch.no_grad():
        expect = hf(inputs_embeds=torch.tensor(np.asarray(embedded)), attention_mask=torch.tensor(mask))
    got = bert(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(segments))
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got["sequence_output"])[valid],
                               expect.last_hidden_state.numpy()[valid], atol=2e-5, rtol=0)
    np.testing.assert_allclose(got["pooled_output"], expect.pooler_output.numpy(), atol=2e-5, rtol=0)
    # The post-LN model with the same weights is another function: the flag is not ignored.
    post = M.BertModel(CFG.replace(pre_layer_norm=False), rngs=nnx.Rngs(0))
    shared = params_lib.flatten(params_lib.to_dict(nnx.state(bert, nnx.Param)))
    params_lib.load_params(post, params_lib.unflatten({k: v for k, v in shared.items() if "final" not in k}))
    other = post(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(segments))["sequence_output"]
    assert np.abs(np.asarray(other)[valid] - expect.last_hidden_state.numpy()[valid]).max() > 0.1


def test_last_layer_at_positions_and_scanned_layers_are_the_same_function(ours):
    """What the pretraining step runs (the last layer only at the masked positions, optionally
    scanned layers) gives the full pre-LN encoder's values and gradients there."""
    ids, mask, segments = batch(seed=3)
    at = jnp.asarray([[1, 4, 9], [0, 2, 12], [3, 5, 6]], jnp.int32)
    params = params_lib.to_dict(nnx.state(ours, nnx.Param))
    scanned = M.BertForPreTraining(CFG.replace(scan_layers=True), rngs=nnx.Rngs(1))
    params_lib.load_params(scanned, params)

    def loss(state, graphdef):
        o = nnx.merge(graphdef, state)(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(segments), at)
        return o["mlm_logits"].sum() + o["nsp_logits"].sum(), o["mlm_logits"]

    full = ours.bert(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(segments))["sequence_output"]
    narrow = ours.bert(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(segments), at_positions=at)
    np.testing.assert_allclose(narrow["sequence_output"], jnp.take_along_axis(full, at[..., None], axis=1),
                               atol=1e-5, rtol=0)
    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (l_ref, _), g_ref = grad(*reversed(nnx.split(ours)))
    (l_scan, _), g_scan = grad(*reversed(nnx.split(scanned)))
    np.testing.assert_allclose(l_scan, l_ref, rtol=1e-5)
    g_ref = params_lib.flatten(params_lib.to_dict(g_ref))
    g_scan = params_lib.flatten(params_lib.unstack_layers(params_lib.to_dict(g_scan), CFG.num_hidden_layers))
    assert g_ref.keys() == g_scan.keys() and "bert/encoder/final_layer_norm/scale" in g_ref
    for k in g_ref:
        np.testing.assert_allclose(g_scan[k], g_ref[k], atol=1e-5, rtol=1e-4, err_msg=k)


def test_npz_keeps_it_and_hugging_face_refuses_it(ours, tmp_path):
    params = params_lib.float32_numpy(params_lib.to_dict(nnx.state(ours, nnx.Param)))
    out = weights.save(CFG, params, tmp_path / "w.npz", "npz")
    cfg, back, _ = weights.load_pretrained(out)
    assert cfg.pre_layer_norm and "final_layer_norm" in back["bert"]["encoder"]
    np.testing.assert_array_equal(back["bert"]["encoder"]["final_layer_norm"]["scale"],
                                  params["bert"]["encoder"]["final_layer_norm"]["scale"])
    with pytest.raises(ConversionError, match="pre_layer_norm=True .* --format npz"):
        weights.save(CFG, params, tmp_path / "hf", "hf")
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    # A config.json that claims it (hand-edited, or another tool's) is refused, not read as post-LN.
    post = params_lib.float32_numpy(params_lib.init_params(CFG.replace(pre_layer_norm=False)))
    d = weights.save(CFG.replace(pre_layer_norm=False), post, tmp_path / "hf2", "hf")
    config_file = d / hf_weights.CONFIG_FILE
    config_file.write_text(config_file.read_text().replace('"pre_layer_norm": false', '"pre_layer_norm": true'))
    with pytest.raises(ConversionError, match="config.json: pre_layer_norm=true"):
        weights.load_pretrained(d)
