"""Decoder families (Llama / Qwen2 / Mistral layout, GPT-2) against ``transformers``' PyTorch models.

Small random models are built by ``transformers`` from configs (every weight perturbed so norms and
biases are not trivially 1/0), saved with ``save_pretrained`` (safetensors) and loaded with
``load_hf_folder``; logits must match to 1e-4 in float32. Padding and KV-cache decoding are checked
against the unpadded / full forward.
"""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrlhf.models import GPT2, Llama, ModelConfig, load_hf_folder
from jaxrlhf.models.layers import init_cache

transformers = pytest.importorskip("transformers")

V = 97


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _hf_model(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        c = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                    bos_token_id=1, eos_token_id=2)
    elif kind == "llama_gqa_untied":
        c = transformers.LlamaConfig(
            vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    elif kind == "qwen2":
        c = transformers.Qwen2Config(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
            rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                             "original_max_position_embeddings": 32})
    elif kind == "mistral":
        c = transformers.MistralConfig(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=128, sliding_window=None)
    else:
        raise KeyError(kind)
    return _perturb(transformers.AutoModelForCausalLM.from_config(c, dtype=torch.float32))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``{kind: (hf_model, our_model, cfg)}``: each small architecture built by transformers, saved with
    ``save_pretrained`` (safetensors) and loaded back with ``load_hf_folder``, once per module."""
    out = {}
    for kind in ("gpt2", "llama_gqa_untied", "qwen2", "mistral"):
        m = _hf_model(kind)
        path = tmp_path_factory.mktemp(kind)
        m.save_pretrained(path)
        model, cfg = load_hf_folder(path)
        out[kind] = (m, model, cfg)
    return out


@nnx.jit
def _forward(model, tokens_BT, positions_BT, segment_ids_BT):
    return model(tokens_BT, positions_BT, segment_ids_BT).logits_BTV


def _ours(model, tokens, positions=None, segment_ids=None):
    """Jitted forward (compiled once per model and shape) -> numpy logits."""
    as_j = lambda x: None if x is None else jnp.asarray(x)  # noqa: E731
    return np.asarray(_forward(model, jnp.asarray(tokens), as_j(positions), as_j(segment_ids)))


def _tokens(B=2, T=11, seed=0):
    return np.random.default_rng(seed).integers(3, V, size=(B, T)).astype(np.int32)


def _hf_logits(m, tokens, **kw):
    with torch.no_grad():
        return m(torch.as_tensor(tokens, dtype=torch.long), **kw).logits.numpy()


@pytest.mark.parametrize("kind", ["gpt2", "llama_gqa_untied", "qwen2", "mistral"])
def test_logits_match_transformers(saved, kind):
    hf, model, cfg = saved[kind]
    tokens = _tokens()
    out = model(jnp.asarray(tokens))
    ref = _hf_logits(hf, tokens)
    assert out.logits_BTV.shape == ref.shape
    np.testing.assert_allclose(np.asarray(out.logits_BTV), ref, atol=1e-4, rtol=0)
    # hidden_BTD is after the final norm: the LM head applied to it gives the logits.
    np.testing.assert_allclose(np.asarray(model.logits(out.hidden_BTD)), np.asarray(out.logits_BTV), atol=1e-5)
    if kind == "llama_gqa_untied":
        assert (cfg.num_kv_heads, cfg.tie_word_embeddings, cfg.rope_scaling.rope_type) == (2, False, "llama3")
    if kind == "qwen2":
        assert cfg.attention_bias and cfg.rope_scaling.rope_type == "yarn"
    if kind == "gpt2":
        assert isinstance(model, GPT2) and cfg.tie_word_embeddings


@pytest.mark.parametrize("kind", ["gpt2", "llama_gqa_untied"])
def test_left_and_right_padding_match_unpadded_reference(saved, kind):
    """Segment ids 0 on pads: left- and right-padded rows give the unpadded logits on real tokens."""
    hf, model, _ = saved[kind]
    lengths = [9, 5, 12]
    T = 12
    rng = np.random.default_rng(1)
    seqs = [rng.integers(3, V, size=n).astype(np.int32) for n in lengths]
    right = np.zeros((3, T), np.int32)
    left = np.zeros((3, T), np.int32)
    seg_r = np.zeros((3, T), np.int32)
    seg_l = np.zeros((3, T), np.int32)
    for i, s in enumerate(seqs):
        right[i, :len(s)] = s
        seg_r[i, :len(s)] = 1
        left[i, T - len(s):] = s
        seg_l[i, T - len(s):] = 1
    out_r = _ours(model, right, None, seg_r)
    out_l = _ours(model, left, None, seg_l)
    for i, s in enumerate(seqs):
        ref = _hf_logits(hf, s[None])[0]
        np.testing.assert_allclose(out_r[i, :len(s)], ref, atol=1e-4, rtol=0)
        np.testing.assert_allclose(out_l[i, T - len(s):], ref, atol=1e-4, rtol=0)
    # Also against transformers' own padded batch (attention_mask + explicit position ids).
    mask = torch.as_tensor(seg_l)
    pos = torch.clamp(mask.cumsum(-1) - 1, min=0)
    ref_l = _hf_logits(hf, left, attention_mask=mask, position_ids=pos)
    np.testing.assert_allclose(out_l[seg_l > 0], ref_l[seg_l > 0], atol=1e-4, rtol=0)


def test_packed_segments_match_separate_sequences(saved):
    """Two sequences packed in one row (segment ids 1, 2) equal the two run alone."""
    hf, model, _ = saved["llama_gqa_untied"]
    a, b = _tokens(1, 5, seed=3)[0], _tokens(1, 7, seed=4)[0]
    packed = np.zeros((3, 12), np.int32)
    packed[0] = np.concatenate([a, b])
    seg = np.zeros((3, 12), np.int32)
    seg[0] = [1] * 5 + [2] * 7
    out = _ours(model, packed, None, seg)[0]
    np.testing.assert_allclose(out[:5], _hf_logits(hf, a[None])[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out[5:], _hf_logits(hf, b[None])[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_kv_cache_decoding_matches_full_forward(saved, kind):
    """Prefill a left-padded prompt into the cache, then decode token by token: each step's logits equal
    the full forward's at that position."""
    _, model, cfg = saved[kind]
    B, P, N = 2, 6, 4
    tokens = _tokens(B, P + N, seed=5)
    seg = np.ones((B, P + N), np.int32)
    seg[1, :2] = 0  # row 1 is left-padded by two
    tokens[1, :2] = 0
    pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    full = _ours(model, tokens, pos, seg)

    cache = init_cache(cfg, B, P + N)
    step = nnx.jit(lambda m, t, p, s, c: m(t, p, s, cache=c))
    out = step(model, jnp.asarray(tokens[:, :P]), jnp.asarray(pos[:, :P]), jnp.asarray(seg[:, :P]), cache)
    np.testing.assert_allclose(np.asarray(out.logits_BTV)[seg[:, :P] > 0], full[:, :P][seg[:, :P] > 0],
                               atol=1e-4)
    cache = out.cache
    for t in range(P, P + N):
        out = step(model, jnp.asarray(tokens[:, t:t + 1]), jnp.asarray(pos[:, t:t + 1]),
                   jnp.asarray(seg[:, t:t + 1]), cache)
        cache = out.cache
        np.testing.assert_allclose(np.asarray(out.logits_BTV)[:, 0], full[:, t], atol=1e-4)
    assert int(cache.index) == P + N


def test_gpt2_module_params_and_axes():
    """GPT2 builds with stacked layers, logical axes on every Param and a tied head."""
    cfg = ModelConfig(family="gpt2", vocab_size=V, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=4,
                      intermediate_size=64, max_position_embeddings=32, attention_bias=True, mlp_bias=True,
                      tie_word_embeddings=True, hidden_act="gelu_new")
    model = nnx.eval_shape(lambda: GPT2(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    for path, var in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        axes = getattr(var, "logical_axes", None)
        assert axes is not None and len(axes) == len(var.get_value().shape), path
    assert model.layers.q.get_value().shape == (3, 32, 4, 8)
    assert not hasattr(model, "lm_head")
    untied = nnx.eval_shape(lambda: GPT2(cfg.replace(tie_word_embeddings=False), rngs=nnx.Rngs(0)))
    assert untied.lm_head.get_value().shape == (32, V)
    with pytest.raises(ValueError, match="num_kv_heads"):
        GPT2(cfg.replace(num_kv_heads=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="family"):
        Llama(cfg, rngs=nnx.Rngs(0))


def test_unsupported_configs_fail_clearly():
    from jaxrlhf.models import gpt2, llama

    base = dict(model_type="mistral", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    with pytest.raises(ValueError, match="sliding_window"):
        llama.config_from_hf({**base, "sliding_window": 1024})
    assert llama.config_from_hf({**base, "sliding_window": None}).num_kv_heads == 2
    # Qwen2 declares a window but does not use it unless use_sliding_window is set.
    q = {**base, "model_type": "qwen2", "sliding_window": 1024, "use_sliding_window": False}
    assert llama.config_from_hf(q).attention_bias
    with pytest.raises(ValueError, match="sliding_window"):
        llama.config_from_hf({**q, "use_sliding_window": True, "max_window_layers": 0})
    with pytest.raises(ValueError, match="rope_type"):
        llama.config_from_hf({**base, "model_type": "llama",
                              "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="attention_bias"):
        llama.config_from_hf({**base, "model_type": "llama", "attention_bias": True})
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        gpt2.config_from_hf({"model_type": "gpt2", "vocab_size": V, "n_embd": 32, "n_layer": 2, "n_head": 4,
                             "scale_attn_by_inverse_layer_idx": True})
    legacy = llama.config_from_hf({**base, "model_type": "llama", "rope_theta": 5e5,
                                   "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert legacy.rope_theta == 5e5 and legacy.rope_scaling.rope_type == "linear"


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_bf16_kv_cache_is_stored_as_bits_and_decoding_matches_full_forward(saved, kind):
    """With ``dtype=bfloat16`` the cache holds uint16 bf16 bits (``layers.cache_storage_dtype``: an in-place
    slot write on XLA:CPU); token-by-token decoding still equals the bf16 full forward, and the stored bits
    are exactly the bf16 keys the full forward computes."""
    _, model, cfg = saved[kind]
    graphdef, state = nnx.split(model)
    m = nnx.merge(graphdef, state)
    m.cfg = cfg.replace(dtype="bfloat16")
    B, P, N = 2, 6, 3
    tokens = _tokens(B, P + N, seed=7)
    seg = np.ones((B, P + N), np.int32)
    pos = np.tile(np.arange(P + N, dtype=np.int32), (B, 1))
    fwd = nnx.jit(lambda mm, t, p, s, c: mm(t, p, s, cache=c))
    full = np.asarray(fwd(m, jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg), None).logits_BTV)
    cache = init_cache(m.cfg, B, P + N)
    assert cache.k_LBSKd.dtype == jnp.uint16 and cache.v_LBSKd.dtype == jnp.uint16
    out = fwd(m, jnp.asarray(tokens[:, :P]), jnp.asarray(pos[:, :P]), jnp.asarray(seg[:, :P]), cache)
    for t in range(P, P + N):
        out = fwd(m, jnp.asarray(tokens[:, t:t + 1]), jnp.asarray(pos[:, t:t + 1]), jnp.asarray(seg[:, t:t + 1]),
                  out.cache)
        np.testing.assert_allclose(np.asarray(out.logits_BTV)[:, 0], full[:, t], atol=2e-2, rtol=0)
    # the one-shot prefill of all P + N tokens stores the same bits as the incremental writes
    once = fwd(m, jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg), init_cache(m.cfg, B, P + N)).cache
    k_inc = np.asarray(jax.lax.bitcast_convert_type(out.cache.k_LBSKd, jnp.bfloat16), np.float32)
    k_once = np.asarray(jax.lax.bitcast_convert_type(once.k_LBSKd, jnp.bfloat16), np.float32)
    assert np.abs(k_inc).max() > 0
    np.testing.assert_allclose(k_inc, k_once, atol=2e-2, rtol=0)
