"""The Flax model against transformers' PyTorch BERT, with the same weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from bert_jax import model as M
from bert_jax import params as params_lib
from bert_jax.weights import hf as hf_weights

CFG = M.BertConfig(vocab_size=211, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                   intermediate_size=96, max_position_embeddings=64, hidden_dropout_prob=0.1,
                   attention_probs_dropout_prob=0.1)


def make_batch(seed=0, batch=3, length=24, predictions=5, vocab=211):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, (batch, length)).astype(np.int32)
    lengths = np.array([length, max(length - 7, predictions + 1), min(9, length)])[:batch]  # padding on two rows
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    segments = ((np.arange(length)[None] >= (lengths[:, None] // 2)) & mask.astype(bool)).astype(np.int32)
    ids = ids * mask
    positions = np.stack([np.sort(rng.choice(int(n), predictions, replace=False)) for n in lengths]).astype(np.int32)
    return ids, mask, segments, positions


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A random-weight HF BertForPreTraining, exported, and our model importing it."""
    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(**{k: v for k, v in hf_weights.config_to_hf(CFG).items()
                                        if k != "architectures"})
    hf = transformers.BertForPreTraining(hf_cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm/bias values so a mix-up cannot hide
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(d)
    cfg, params, report = hf_weights.load(d)
    assert report["initialised"] == []
    ours = M.BertForPreTraining(cfg, rngs=nnx.Rngs(1))
    params_lib.load_params(ours, params)
    return hf, ours, params, cfg


def torch_outputs(hf, ids, mask, segments):
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(segments, dtype=torch.long), output_hidden_states=True)
        pooled = hf.bert.pooler(out.hidden_states[-1])
    return out, pooled


@pytest.mark.parametrize("length", [24, 7])
def test_matches_transformers_forward(pair, length):
    hf, ours, _, _ = pair
    ids, mask, segments, positions = make_batch(length=max(length, 10))
    ids, mask, segments = ids[:, :length], mask[:, :length], segments[:, :length]
    positions = np.minimum(positions, length - 1)
    out, pooled = torch_outputs(hf, ids, mask, segments)
    got = ours(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(segments), None)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got["sequence_output"])[valid], out.hidden_states[-1].numpy()[valid],
                               atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["pooled_output"], pooled.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(got["mlm_logits"])[valid], out.prediction_logits.numpy()[valid],
                               atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["nsp_logits"], out.seq_relationship_logits.numpy(), atol=1e-4, rtol=0)
    # Projecting only the masked positions gives the same logits as projecting all.
    sub = ours(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(segments), jnp.asarray(positions))
    expect = np.take_along_axis(out.prediction_logits.numpy(), positions[..., None], axis=1)
    np.testing.assert_allclose(sub["mlm_logits"], expect, atol=1e-4, rtol=0)
    assert sub["mlm_logits"].shape == (ids.shape[0], positions.shape[1], CFG.vocab_size)


def pretraining_loss_np(mlm_logits, nsp_logits, masked_ids, weights, nsp_labels):
    """Reference loss written independently of bert_jax.train_step."""
    logp = jax.nn.log_softmax(mlm_logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, masked_ids[..., None], axis=-1)[..., 0]
    mlm = (nll * weights).sum() / weights.sum()
    nsp = -jnp.take_along_axis(jax.nn.log_softmax(nsp_logits), nsp_labels[:, None], axis=-1).mean()
    return mlm + nsp


def test_gradients_match_transformers(pair):
    hf, ours, params, cfg = pair
    ids, mask, segments, positions = make_batch(seed=3)
    rng = np.random.default_rng(4)
    masked_ids = rng.integers(5, CFG.vocab_size, positions.shape).astype(np.int32)
    weights = np.ones(positions.shape, np.float32)
    weights[2, 3:] = 0.0
    nsp_labels = np.array([0, 1, 1], np.int32)

    graphdef, state = nnx.split(ours)

    def loss_fn(state):
        o = nnx.merge(graphdef, state)(ids, mask, segments, positions)
        return pretraining_loss_np(o["mlm_logits"], o["nsp_logits"], masked_ids, weights, nsp_labels)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(state)
    grads = params_lib.flatten(params_lib.to_dict(grads))

    hf.zero_grad()
    out = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
             token_type_ids=torch.tensor(segments, dtype=torch.long))
    logits = torch.gather(out.prediction_logits, 1,
                          torch.tensor(positions, dtype=torch.long)[..., None].expand(-1, -1, CFG.vocab_size))
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, CFG.vocab_size),
                                            torch.tensor(masked_ids, dtype=torch.long).reshape(-1), reduction="none")
    w = torch.tensor(weights).reshape(-1)
    t_loss = (nll * w).sum() / w.sum() + torch.nn.functional.cross_entropy(
        out.seq_relationship_logits, torch.tensor(nsp_labels, dtype=torch.long))
    t_loss.backward()
    assert abs(float(loss) - float(t_loss.detach())) < 1e-5
    hf_params = dict(hf.named_parameters())
    checked = 0
    rows = hf_weights.name_map(cfg)
    for ours_path, theirs, transpose in rows["encoder"] + rows["mlm"] + rows["nsp"]:  # the pretraining model's
        g_t = hf_params[theirs].grad.numpy()
        g_t = g_t.T if transpose else g_t
        # (word embeddings: tied, both frameworks sum the decoder's gradient into them)
        np.testing.assert_allclose(np.asarray(grads[ours_path]), g_t, atol=2e-5, rtol=1e-3, err_msg=ours_path)
        checked += 1
    assert checked == len(grads)


def test_bfloat16_close_to_float32(pair):
    _, _, params, cfg = pair
    ids, mask, segments, positions = make_batch(seed=5)
    outs = {}
    for dtype in ("float32", "bfloat16"):
        m = M.BertForPreTraining(cfg.replace(dtype=dtype), rngs=nnx.Rngs(0))
        params_lib.load_params(m, params)
        g, s = nnx.split(m)
        outs[dtype] = jax.jit(lambda s: nnx.merge(g, s)(ids, mask, segments, positions))(s)
    for key in ("sequence_output", "mlm_logits", "nsp_logits"):
        a = np.asarray(outs["float32"][key], np.float32)
        b = np.asarray(outs["bfloat16"][key], np.float32)
        assert b.dtype == np.float32 and outs["bfloat16"]["mlm_logits"].dtype == jnp.float32
        scale = np.abs(a).max()
        err = np.abs(a - b).max() / scale
        assert err < 0.05, (key, err)  # bf16 has an 8-bit mantissa: ~1e-2 relative after a few layers
        assert err > 0, "bfloat16 compute did not change anything: dtype not applied"


@pytest.mark.parametrize("overrides", [dict(remat_policy="full"),
                                       dict(scan_layers=True, remat_policy="dots_no_batch")])
def test_scan_and_remat_are_the_same_function(pair, overrides):
    _, ours, params, cfg = pair
    ids, mask, segments, positions = make_batch(seed=6)
    variant = M.BertForPreTraining(cfg.replace(**overrides), rngs=nnx.Rngs(0))
    params_lib.load_params(variant, params)

    def loss(model_state, graphdef, key):
        o = nnx.merge(graphdef, model_state)(ids, mask, segments, positions, deterministic=False, rngs=key)
        return o["mlm_logits"].sum() + o["nsp_logits"].sum()

    key = jax.random.key(7)
    ref_g, ref_s = nnx.split(ours)
    var_g, var_s = nnx.split(variant)
    grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    l_ref, g_ref = grad_fn(ref_s, ref_g, key)
    l_var, g_var = grad_fn(var_s, var_g, key)
    np.testing.assert_allclose(l_var, l_ref, rtol=1e-5)
    g_ref = params_lib.flatten(params_lib.to_dict(g_ref))
    g_var = params_lib.flatten(params_lib.unstack_layers(params_lib.to_dict(g_var), cfg.num_hidden_layers))
    assert g_ref.keys() == g_var.keys()
    for k in g_ref:
        np.testing.assert_allclose(g_var[k], g_ref[k], atol=1e-5, rtol=1e-4, err_msg=k)


def test_dropout_is_keyed_and_deterministic_mode_is_not_random(pair):
    _, ours, _, _ = pair
    ids, mask, segments, positions = make_batch(seed=8)
    a = ours(ids, mask, segments, positions, deterministic=False, rngs=nnx.Rngs(dropout=1))["mlm_logits"]
    b = ours(ids, mask, segments, positions, deterministic=False, rngs=nnx.Rngs(dropout=1))["mlm_logits"]
    c = ours(ids, mask, segments, positions, deterministic=False, rngs=nnx.Rngs(dropout=2))["mlm_logits"]
    d = ours(ids, mask, segments, positions)["mlm_logits"]
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
    assert np.abs(np.asarray(a) - np.asarray(d)).max() > 1e-3
    with pytest.raises(ValueError, match="dropout needs a key"):
        ours(ids, mask, segments, positions, deterministic=False)


def test_packed_segments_block_attention_across_sequences(pair):
    _, ours, _, _ = pair
    ids, _, _, _ = make_batch(seed=9, batch=1, length=16)
    mask = np.ones_like(ids)
    packed = np.array([[1] * 9 + [2] * 7])
    base = ours.bert(ids, mask, None, packed_segment_ids=packed)["sequence_output"]
    changed = ids.copy()
    changed[0, 12] = (changed[0, 12] + 1) % CFG.vocab_size  # edit the second sequence only
    other = ours.bert(changed, mask, None, packed_segment_ids=packed)["sequence_output"]
    np.testing.assert_allclose(base[0, :9], other[0, :9], atol=1e-6)  # first sequence unaffected
    assert np.abs(np.asarray(base[0, 9:]) - np.asarray(other[0, 9:])).max() > 1e-4


def test_packed_row_gives_each_sequence_its_unpacked_outputs(pair):
    """Two sequences in one row (positions restarting, attention confined, per-sequence
    [CLS]) give the sequence and pooled outputs each gives alone."""
    _, ours, _, _ = pair
    ids, _, segments, _ = make_batch(seed=11, batch=2, length=16)
    lengths = (9, 7)
    row = np.concatenate([ids[0, :lengths[0]], ids[1, :lengths[1]]])[None]
    types = np.concatenate([segments[0, :lengths[0]], segments[1, :lengths[1]]])[None]
    positions = np.concatenate([np.arange(n) for n in lengths])[None]
    packed = np.array([[1] * lengths[0] + [2] * lengths[1]])
    out = ours.bert(row, np.ones_like(row), types, position_ids=positions, packed_segment_ids=packed,
                    cls_positions=np.array([[0, lengths[0]]]))
    assert out["pooled_output"].shape == (1, 2, CFG.hidden_size)
    start = 0
    for i, n in enumerate(lengths):
        alone = ours.bert(ids[i:i + 1, :n], np.ones((1, n), ids.dtype), segments[i:i + 1, :n])
        np.testing.assert_allclose(out["sequence_output"][0, start:start + n], alone["sequence_output"][0],
                                   atol=2e-5)
        np.testing.assert_allclose(out["pooled_output"][0, i], alone["pooled_output"][0], atol=2e-5)
        start += n


def test_every_param_has_logical_axes():
    m = nnx.eval_shape(lambda: M.BertForPreTraining(M.BertConfig.preset("tiny", scan_layers=True), rngs=nnx.Rngs(0)))
    from bert_jax.partitioning import param_logical_axes

    axes = params_lib.flatten(params_lib.to_dict(param_logical_axes(nnx.state(m, nnx.Param))))
    shapes = params_lib.flatten(params_lib.to_dict(nnx.state(m, nnx.Param)))
    for path, names in axes.items():
        assert len(names) == len(shapes[path].shape), path
        assert any(n is not None for n in names), f"{path} has no logical axis name"
        if "encoder/layers" in path:
            assert names[0] == "layers", path


def test_config_presets_and_errors():
    assert M.BertConfig.preset("large").intermediate_size == 4096
    with pytest.raises(ValueError, match="unknown BERT preset"):
        M.BertConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown key"):
        M.BertConfig.from_dict({"hidden_sise": 3})
    with pytest.raises(ValueError, match="not divisible"):
        M.BertConfig(hidden_size=10, num_attention_heads=3)
    tiny = M.BertForPreTraining(M.BertConfig.preset("tiny", vocab_size=50, max_position_embeddings=8),
                                rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        tiny(jnp.ones((1, 9), jnp.int32))


def test_remat_policies_save_what_they_say(capsys):
    """The residuals each policy keeps for the backward pass (dropout off, 2 layers)."""
    cfg = M.BertConfig.preset("tiny", vocab_size=97, max_position_embeddings=32)
    ids, mask, segments, _ = make_batch(seed=8, batch=2, length=8, vocab=97)
    hidden = f"[2,8,{cfg.hidden_size}]"
    saved = {}
    for policy in M.REMAT_POLICIES:
        model = M.BertModel(cfg.replace(remat_policy=policy), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        loss = lambda s: nnx.merge(graphdef, s)(ids, mask, segments)["pooled_output"].sum()  # noqa: E731
        jax.ad_checkpoint.print_saved_residuals(loss, state)
        saved[policy] = capsys.readouterr().out.splitlines()
    named = {p: [r for r in rs if "attention_out" in r] for p, rs in saved.items()}
    assert len(named["attention_out"]) == cfg.num_hidden_layers
    assert all(hidden in r for r in named["attention_out"])
    assert not any(named[p] for p in ("full", "dots", "dots_no_batch"))  # "none" saves everything
    activations = {p: sum(hidden in r for r in rs) for p, rs in saved.items()}
    # full: each layer's input (and the output); attention_out: those plus one per layer.
    assert activations["attention_out"] == activations["full"] + cfg.num_hidden_layers
    assert activations["full"] < activations["attention_out"] < activations["dots"] <= activations["none"]


def test_last_layer_only_where_read_equals_the_full_encoder():
    """The last layer runs only where its output is read (``BertModel(at_positions=...)``): a
    classifier's [CLS] tokens, pretraining's masked positions and [CLS]. Logits and gradients
    equal the full encoder's (scanned layers here; the unrolled path meets transformers' logits
    and gradients above and in test_convert, and the unpacked gradients in test_glue_data)."""
    cfg = M.BertConfig(vocab_size=211, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=48, max_position_embeddings=32, scan_layers=True)
    graphdef, params = nnx.split(M.BertForSequenceClassification(cfg, 3, rngs=nnx.Rngs(0)), nnx.Param)
    pre_graphdef, pre_params = nnx.split(M.BertForPreTraining(cfg, rngs=nnx.Rngs(1)), nnx.Param)
    ids, mask, segments, masked = make_batch(seed=3, batch=3, length=16)
    steps = np.arange(16)[None]
    packed = dict(packed_segment_ids=np.where(mask > 0, 1 + (steps >= 5), 0).astype(np.int32),
                  position_ids=np.where(steps >= 5, steps - 5, steps).astype(np.int32),
                  cls_positions=np.array([[0, 5]] * 3, np.int32))

    def classify(p, kw, full):
        m = nnx.merge(graphdef, p)
        if not full:
            return m(ids, mask, segments, **kw)["logits"]
        seq = m.bert(ids, mask, segments, **kw)["sequence_output"]
        first = M.gather_positions(seq, kw["cls_positions"]) if kw else seq[:, 0]
        return m.classifier(jnp.tanh(m.bert.pooler(first)))

    def pretrain(p, kw, full):
        out = nnx.merge(pre_graphdef, p)(ids, mask, segments, None if full else masked, **kw)
        mlm = M.gather_positions(out["mlm_logits"], masked) if full else out["mlm_logits"]
        return jnp.concatenate([mlm.reshape(-1), out["nsp_logits"].reshape(-1)])

    def both(f, x, kw):
        return [(f(x, kw, full), jax.grad(lambda x, full=full: jnp.sum(jnp.sin(f(x, kw, full))))(x))
                for full in (True, False)]

    # One compile: the classifier on packed rows, pretraining on padded ones (packed pretraining
    # meets its unpacked losses and gradients in test_train_step).
    cases = jax.jit(lambda p, q: {"classifier, packed": both(classify, p, packed),
                                  "pretraining, padded": both(pretrain, q, {})})(params, pre_params)
    assert cases["classifier, packed"][1][0].shape == (3, 2, 3)
    for name, ((want, g_want), (got, g_got)) in cases.items():
        np.testing.assert_allclose(got, want, atol=3e-5, err_msg=name)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name), g_got, g_want)
    out = jax.eval_shape(lambda p: nnx.merge(graphdef, p)(ids, mask, segments), params)
    assert out["sequence_output"].shape == (3, 0, 32)


def test_attention_at_queries_narrows_every_prepared_kind_to_the_same_mask():
    """The mask rows ``at_queries`` builds for a few queries from an explicit mask, from cuDNN's
    lengths and from splash's segment ids (padding -1) are the full mask's rows at them."""
    from bert_jax import attention

    valid = np.array([[1] * 6 + [0] * 2, [1] * 8])
    packed = np.array([[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 2, 2, 2]])
    queries = np.array([[0, 3], [0, 5]])
    path = attention.Path("explicit")
    full = np.asarray(attention.attention_mask(valid, packed))[:, 0]
    want = np.take_along_axis(full, queries[:, :, None], axis=1)
    got = attention.at_queries(attention.Prepared(path, mask=attention.attention_mask(valid, packed)), queries, 8)
    np.testing.assert_array_equal(got.mask[:, 0], want)
    segments = np.where(valid > 0, packed, -1)
    splash = attention.at_queries(attention.Prepared(attention.Path("splash"), segments=segments), queries, 8)
    np.testing.assert_array_equal(splash.mask[:, 0], want)
    assert splash.path.impl == "xla"  # a few queries: XLA's attention, not the 128-block kernel
    lengths = attention.at_queries(attention.Prepared(attention.Path("cudnn"), lengths=valid.sum(1)), queries, 8)
    np.testing.assert_array_equal(np.broadcast_to(lengths.mask[:, 0], want.shape),
                                  np.broadcast_to(valid[:, None, :].astype(bool), want.shape))
