"""The Llama decoder family in Flax NNX: Llama 2/3, TinyLlama, SmolLM/SmolLM2, Qwen2 (q/k/v bias).

RMSNorm, rotary position embeddings (with the standard scaling types), grouped-query attention,
SwiGLU MLP, tied or untied embeddings (Touvron et al. 2023). Layer parameters are stacked along a
leading ``layers`` axis and the blocks run under one ``jax.lax.scan`` (``layers.run_blocks``), so compile
time does not grow with depth, and ``remat='block'`` recomputes a block in the backward pass.

The module holds :class:`Llama` (its block and parameters; the shared helpers are in ``layers.py``) and the
Hugging Face converter contract of ``hf.py`` (``HF_MODEL_TYPES``, ``config_from_hf``, ``hf_config_from``,
``params_from_hf``, ``params_to_hf``), built on ``tensors.CheckpointTensors``.

Parameter tree (logical axes in brackets)::

    embed        [V, D]        (vocab, embed)
    layers/attn_norm [L, D]    layers/q [L, D, H, d]  layers/k, layers/v [L, D, K, d]
    layers/q_bias [L, H, d]    layers/k_bias, layers/v_bias [L, K, d]      (attention_bias only)
    layers/o [L, H, d, D]      layers/mlp_norm [L, D]
    layers/gate, layers/up [L, D, F]   layers/down [L, F, D]
    final_norm   [D]
    lm_head      [D, V]        (untied only)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.models.config import ModelConfig, RopeScaling
from jaxrlhf.models.layers import (DecoderOutput, KVCache, activation, apply_rope, attend, dense, lm_logits,
                                   normal_param, ones_param, prepare_inputs, rms_norm, rope_frequencies, run_blocks,
                                   write_cache, zeros_param)
from jaxrlhf.models.tensors import CheckpointTensors, require
from jaxrlhf.sharding import constrain, embed_lookup

__all__ = ["Llama", "HF_MODEL_TYPES", "config_from_hf", "hf_config_from", "params_from_hf", "params_to_hf"]

Array = jax.Array


class LlamaLayers(nnx.Module):
    """The stacked parameters of all L blocks."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        L, D, H, K, d, F = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                            cfg.intermediate_size)
        self.attn_norm = ones_param((L, D), ("layers", "norm"), cfg)
        self.q = normal_param(rngs, (L, D, H, d), ("layers", "embed", "heads", "head_dim"), cfg)
        self.k = normal_param(rngs, (L, D, K, d), ("layers", "embed", "kv_heads", "head_dim"), cfg)
        self.v = normal_param(rngs, (L, D, K, d), ("layers", "embed", "kv_heads", "head_dim"), cfg)
        if cfg.attention_bias:
            self.q_bias = zeros_param((L, H, d), ("layers", "heads", "head_dim"), cfg)
            self.k_bias = zeros_param((L, K, d), ("layers", "kv_heads", "head_dim"), cfg)
            self.v_bias = zeros_param((L, K, d), ("layers", "kv_heads", "head_dim"), cfg)
        self.o = normal_param(rngs, (L, H, d, D), ("layers", "heads", "head_dim", "embed"), cfg)
        self.mlp_norm = ones_param((L, D), ("layers", "norm"), cfg)
        self.gate = normal_param(rngs, (L, D, F), ("layers", "embed", "mlp"), cfg)
        self.up = normal_param(rngs, (L, D, F), ("layers", "embed", "mlp"), cfg)
        self.down = normal_param(rngs, (L, F, D), ("layers", "mlp", "embed"), cfg)


def _block(cfg: ModelConfig, rope, x_BTD, lp, mask_B1TS, positions_BT, kv, cache_index):
    """One pre-norm block. ``lp`` holds this layer's arrays; ``kv`` is this layer's (k, v) cache or None.

    The residual stream ``x_BTD`` is f32; each norm's output is cast to the compute dtype for the
    projections (:func:`~jaxrlhf.models.layers.dense`, 2-D GEMMs), and the output and down projections
    return f32 straight into the stream (see :mod:`~jaxrlhf.models.mixed_precision`).
    """
    dt = cfg.compute_dtype
    f32 = jnp.float32
    inv_freq, attn_factor = rope
    h = rms_norm(x_BTD, lp["attn_norm"], cfg.norm_eps).astype(dt)
    q = dense(h, lp["q"])
    k = dense(h, lp["k"])
    v = dense(h, lp["v"])
    if cfg.attention_bias:
        q, k, v = q + lp["q_bias"].astype(dt), k + lp["k_bias"].astype(dt), v + lp["v_bias"].astype(dt)
    q = apply_rope(q, positions_BT, inv_freq, attn_factor)
    k = apply_rope(k, positions_BT, inv_freq, attn_factor)
    if kv is not None:
        k_cache, v_cache = kv
        k_cache, k = write_cache(k_cache, k, cache_index, dt)
        v_cache, v = write_cache(v_cache, v, cache_index, dt)
        kv = (k_cache, v_cache)
    o = attend(q, k.astype(dt), v.astype(dt), mask_B1TS, scale=cfg.head_dim ** -0.5)
    x_BTD = x_BTD + dense(o, lp["o"], in_axes=2, out_dtype=f32)
    h = rms_norm(x_BTD, lp["mlp_norm"], cfg.norm_eps).astype(dt)
    g = dense(h, lp["gate"])
    u = dense(h, lp["up"])
    x_BTD = x_BTD + dense(activation(cfg.hidden_act)(g) * u, lp["down"], out_dtype=f32)
    return constrain(x_BTD, ("batch", "length", "embed")), kv


class Llama(nnx.Module):
    """Llama-family causal language model.

    Call: ``model(tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None) -> DecoderOutput``.

    Args (call):
      tokens_BT: int32 token ids.
      positions_BT: int32 RoPE positions; default counts from 0 within each segment.
      segment_ids_BT: int32, 0 = padding, 1.. = packed sequence id; tokens attend only within their own
        segment. Default: all ones.
      cache: a ``KVCache``; the T new tokens are written at ``cache.index`` and attend to every filled
        slot of their segment. ``positions_BT`` is then required.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.family != "llama":
            raise ValueError(f"Llama got model.family={cfg.family!r}")
        self.cfg = cfg
        self.embed = normal_param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg)
        self.layers = LlamaLayers(cfg, rngs=rngs)
        self.final_norm = ones_param((cfg.hidden_size,), ("norm",), cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = normal_param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg)

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache: KVCache | None = None
                 ) -> DecoderOutput:
        cfg = self.cfg
        positions_BT, mask, kv_segments, index = prepare_inputs(tokens_BT, positions_BT, segment_ids_BT, cache)
        x = embed_lookup(self.embed[...], tokens_BT).astype(jnp.float32)  # the f32 residual stream
        x = constrain(x, ("batch", "length", "embed"))
        rope = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        layer_params = {name: var[...] for name, var in vars(self.layers).items() if isinstance(var, nnx.Param)}

        def block_fn(x, lp, kv, mask, positions):
            return _block(cfg, rope, x, lp, mask, positions, kv, index)

        x, kv = run_blocks(block_fn, cfg, x, layer_params, cache, mask, positions_BT)
        hidden = rms_norm(x, self.final_norm[...], cfg.norm_eps)
        logits = self.logits(hidden)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(kv[0], kv[1], kv_segments, index + tokens_BT.shape[1])
        return DecoderOutput(logits, hidden, new_cache)

    def logits(self, hidden_BTD: Array) -> Array:
        """LM head: ``hidden @ embed^T`` (tied) or ``hidden @ lm_head`` (:func:`~jaxrlhf.models.layers.lm_logits`).

        Returns float32 logits ``[..., V]`` whatever the compute dtype: the product accumulates in f32 and
        is not rounded to bf16, so log-softmax over the vocabulary sees full precision."""
        w = self.embed[...] if self.cfg.tie_word_embeddings else self.lm_head[...]
        return constrain(lm_logits(hidden_BTD, w, self.cfg), ("batch", "length", "vocab"))


# ------------------------------------------------------------------------- Hugging Face conversion
#
# HF name map (``model.`` prefix of ``*ForCausalLM`` stripped; torch ``Linear`` weights are [out, in]):
#
#   embed_tokens.weight [V, D]                      -> embed [V, D]
#   layers.i.input_layernorm.weight [D]             -> layers/attn_norm[i]
#   layers.i.self_attn.q_proj.weight [H*d, D]       -> layers/q[i] [D, H, d]   (transpose, split heads)
#   layers.i.self_attn.{k,v}_proj.weight [K*d, D]   -> layers/{k,v}[i] [D, K, d]
#   layers.i.self_attn.{q,k,v}_proj.bias            -> layers/{q,k,v}_bias[i] [H|K, d]   (Qwen2)
#   layers.i.self_attn.o_proj.weight [D, H*d]       -> layers/o[i] [H, d, D]
#   layers.i.post_attention_layernorm.weight [D]    -> layers/mlp_norm[i]
#   layers.i.mlp.{gate,up}_proj.weight [F, D]       -> layers/{gate,up}[i] [D, F]
#   layers.i.mlp.down_proj.weight [D, F]            -> layers/down[i] [F, D]
#   norm.weight [D]                                 -> final_norm
#   lm_head.weight [V, D] (top level)               -> lm_head [D, V]   (absent when tied)

HF_MODEL_TYPES: tuple[str, ...] = ("llama", "qwen2", "mistral")

_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "beta_fast", "beta_slow", "attention_factor", "original_max_position_embeddings",
             "truncate", "mscale", "mscale_all_dim"},
}


def rope_from_hf(hf_config: dict) -> tuple[float, RopeScaling | None]:
    """``(rope_theta, RopeScaling | None)`` from ``rope_parameters`` (transformers 5) or the legacy
    top-level ``rope_theta`` + ``rope_scaling``.

    Raises:
      ValueError: an unsupported ``rope_type`` (``dynamic``, ``longrope``, ...), per-layer-type RoPE,
        ``partial_rotary_factor`` != 1, yarn ``mscale``/``truncate=False``, or an unknown key.
    """
    params = dict(hf_config.get("rope_parameters") or {})
    legacy = hf_config.get("rope_scaling") or {}
    if params and any(isinstance(v, dict) for v in params.values()):
        raise ValueError("config.json rope_parameters is nested per layer type; only one global RoPE is supported")
    if not params:
        params = dict(legacy)
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = hf_config.get("rope_theta", 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    prf = params.pop("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        raise ValueError(f"config.json partial_rotary_factor={prf} is not supported (only full rotary)")
    if rope_type not in _ROPE_KEYS:
        raise ValueError(f"config.json rope_type={rope_type!r} is not supported "
                         f"(supported: {sorted(_ROPE_KEYS)})")
    unknown = set(params) - _ROPE_KEYS[rope_type]
    if unknown:
        raise ValueError(f"config.json rope parameters {sorted(unknown)} are not supported for "
                         f"rope_type={rope_type!r}")
    if rope_type == "default":
        return float(theta), None
    max_pos = int(hf_config.get("max_position_embeddings", 2048))
    orig = params.get("original_max_position_embeddings") or hf_config.get("original_max_position_embeddings")
    factor = params.get("factor")
    if rope_type == "yarn":
        if params.get("mscale") or params.get("mscale_all_dim"):
            raise ValueError("config.json yarn rope parameters mscale/mscale_all_dim are not supported")
        if params.get("truncate", True) is False:
            raise ValueError("config.json yarn rope parameter truncate=False is not supported")
        orig = orig or max_pos
        if factor is None:
            factor = max_pos / orig
        return float(theta), RopeScaling(
            rope_type="yarn", factor=float(factor), original_max_position_embeddings=int(orig),
            beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
            attention_factor=params.get("attention_factor"))
    if factor is None:
        raise ValueError(f"config.json rope_type={rope_type!r} needs a 'factor'")
    if rope_type == "linear":
        return float(theta), RopeScaling(rope_type="linear", factor=float(factor))
    return float(theta), RopeScaling(
        rope_type="llama3", factor=float(factor), low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(orig) if orig else None)


def rope_to_hf(cfg: ModelConfig) -> dict:
    """``rope_parameters`` (transformers 5 layout, ``rope_theta`` included) for ``cfg``."""
    out: dict = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    s = cfg.rope_scaling
    if s is None or s.rope_type == "default":
        return out
    out["rope_type"] = s.rope_type
    out["factor"] = float(s.factor)
    if s.rope_type == "llama3":
        out.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                   original_max_position_embeddings=s.original_max_position_embeddings
                   or cfg.max_position_embeddings)
    elif s.rope_type == "yarn":
        out.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow,
                   original_max_position_embeddings=s.original_max_position_embeddings
                   or cfg.max_position_embeddings)
        if s.attention_factor is not None:
            out["attention_factor"] = s.attention_factor
    return out


def _sliding_window_used(hf: dict, model_type: str) -> bool:
    window = hf.get("sliding_window")
    if window is None or window >= hf.get("max_position_embeddings", 2048):
        return False
    if model_type == "qwen2":
        if not hf.get("use_sliding_window", False):
            return False
        layer_types = hf.get("layer_types")
        if layer_types is not None:
            return "sliding_attention" in layer_types
        return hf.get("max_window_layers", 28) < hf["num_hidden_layers"]
    return True


def config_from_hf(hf_config: dict) -> ModelConfig:
    """``ModelConfig`` (family ``llama``) from a ``llama``/``qwen2``/``mistral`` ``config.json`` dict.

    Qwen2 always has q/k/v biases (``attention_bias=True``); RoPE comes from :func:`rope_from_hf`.

    Raises:
      ValueError: another ``model_type``, a missing field, or an option our ``Llama`` cannot reproduce:
        a sliding attention window shorter than ``max_position_embeddings`` that is actually applied,
        Llama ``attention_bias`` (it adds an o_proj bias) or ``mlp_bias``, unsupported RoPE settings.
    """
    mt = hf_config.get("model_type", "llama")
    if mt not in HF_MODEL_TYPES:
        raise ValueError(f"llama.config_from_hf got model_type={mt!r}; expected one of {HF_MODEL_TYPES}")
    D = int(require(hf_config, "hidden_size", mt))
    H = int(require(hf_config, "num_attention_heads", mt))
    L = int(require(hf_config, "num_hidden_layers", mt))
    if mt == "qwen2":
        attention_bias = True
    else:
        attention_bias = bool(hf_config.get("attention_bias", False))
        if attention_bias:
            raise ValueError(f"config.json attention_bias=True for model_type={mt!r} adds an o_proj bias, "
                             "which jaxrlhf's Llama does not have")
    if hf_config.get("mlp_bias", False):
        raise ValueError("config.json mlp_bias=True is not supported by jaxrlhf's Llama (SwiGLU without bias)")
    if _sliding_window_used(hf_config, mt):
        raise ValueError(f"config.json sliding_window={hf_config['sliding_window']} (< max_position_embeddings="
                         f"{hf_config.get('max_position_embeddings')}) is applied by this {mt} model; sliding-"
                         "window attention is not supported (set sliding_window to null only if sequences stay "
                         "shorter than the window)")
    act = hf_config.get("hidden_act", "silu")
    activation(act)  # validates the name
    theta, scaling = rope_from_hf(hf_config)
    head_dim = hf_config.get("head_dim") or D // H
    kv = hf_config.get("num_key_value_heads") or H
    return ModelConfig(
        family="llama", vocab_size=int(require(hf_config, "vocab_size", mt)), hidden_size=D, num_layers=L,
        num_heads=H, num_kv_heads=int(kv), head_dim=int(head_dim),
        intermediate_size=int(require(hf_config, "intermediate_size", mt)),
        max_position_embeddings=int(hf_config.get("max_position_embeddings", 2048)),
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        attention_bias=attention_bias, mlp_bias=False,
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)), hidden_act=act,
        pad_token_id=hf_config.get("pad_token_id"), bos_token_id=hf_config.get("bos_token_id"),
        eos_token_id=hf_config.get("eos_token_id"))


def hf_config_from(cfg: ModelConfig) -> dict:
    """A ``config.json`` dict for ``cfg`` that ``transformers`` loads back: ``LlamaForCausalLM``, or
    ``Qwen2ForCausalLM`` when ``cfg.attention_bias`` (q/k/v bias without o bias is Qwen2's layout)."""
    if cfg.family != "llama":
        raise ValueError(f"llama.hf_config_from got model.family={cfg.family!r}")
    qwen = cfg.attention_bias
    out = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size, "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps, "hidden_act": cfg.hidden_act, "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_parameters": rope_to_hf(cfg), "rope_theta": float(cfg.rope_theta),
        "bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
    }
    if qwen:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    else:
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    return out


def params_from_hf(tensors, cfg: ModelConfig) -> dict:
    """Pure parameter dict for :class:`Llama` from HF tensors (``{name: array}``; ``model.`` prefix optional).

    Every tensor's shape is checked against ``cfg`` before conversion; a tied ``lm_head.weight`` is
    accepted and dropped, ``rotary_emb.inv_freq`` buffers are ignored.

    Raises:
      ValueError: a wrongly shaped tensor (naming the HF key, expected and actual shapes), or missing /
        unexpected keys.
    """
    L, D, H, K, d, F, V = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           cfg.intermediate_size, cfg.vocab_size)
    t = CheckpointTensors(tensors, strip_prefixes=("model.",), ignore=(r"rotary_emb\.inv_freq$",))
    a = "layers.{}.self_attn."
    m = "layers.{}.mlp."
    layers = {
        "attn_norm": t.stack("layers.{}.input_layernorm.weight", L, (D,)),
        "q": t.stack(a + "q_proj.weight", L, (H * d, D), transform=lambda w: w.T.reshape(D, H, d)),
        "k": t.stack(a + "k_proj.weight", L, (K * d, D), transform=lambda w: w.T.reshape(D, K, d)),
        "v": t.stack(a + "v_proj.weight", L, (K * d, D), transform=lambda w: w.T.reshape(D, K, d)),
        "o": t.stack(a + "o_proj.weight", L, (D, H * d), transform=lambda w: w.T.reshape(H, d, D)),
        "mlp_norm": t.stack("layers.{}.post_attention_layernorm.weight", L, (D,)),
        "gate": t.stack(m + "gate_proj.weight", L, (F, D), transform=np.transpose),
        "up": t.stack(m + "up_proj.weight", L, (F, D), transform=np.transpose),
        "down": t.stack(m + "down_proj.weight", L, (D, F), transform=np.transpose),
    }
    if cfg.attention_bias:
        layers["q_bias"] = t.stack(a + "q_proj.bias", L, (H * d,), transform=lambda b: b.reshape(H, d))
        layers["k_bias"] = t.stack(a + "k_proj.bias", L, (K * d,), transform=lambda b: b.reshape(K, d))
        layers["v_bias"] = t.stack(a + "v_proj.bias", L, (K * d,), transform=lambda b: b.reshape(K, d))
    params = {"embed": t.take("embed_tokens.weight", (V, D)), "layers": layers,
              "final_norm": t.take("norm.weight", (D,))}
    if cfg.tie_word_embeddings:
        if "lm_head.weight" in t:
            t.take("lm_head.weight", (V, D))
    else:
        w = t.take("lm_head.weight", (V, D))
        params["lm_head"] = None if w is None else w.T
    t.finish("Llama" + (" (q/k/v bias)" if cfg.attention_bias else ""))
    return params


def params_to_hf(params: dict, cfg: ModelConfig) -> dict:
    """HF tensors (``*ForCausalLM`` names, torch ``Linear`` layout) from a pure :class:`Llama` dict
    (numpy or jax arrays). A tied LM head is not emitted."""
    L, D, H, K, d = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    lp = {k: np.asarray(v) for k, v in params["layers"].items()}
    out = {"model.embed_tokens.weight": np.asarray(params["embed"]),
           "model.norm.weight": np.asarray(params["final_norm"])}
    for i in range(L):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = lp["attn_norm"][i]
        out[p + "post_attention_layernorm.weight"] = lp["mlp_norm"][i]
        out[p + "self_attn.q_proj.weight"] = lp["q"][i].reshape(D, H * d).T
        out[p + "self_attn.k_proj.weight"] = lp["k"][i].reshape(D, K * d).T
        out[p + "self_attn.v_proj.weight"] = lp["v"][i].reshape(D, K * d).T
        out[p + "self_attn.o_proj.weight"] = lp["o"][i].reshape(H * d, D).T
        if cfg.attention_bias:
            out[p + "self_attn.q_proj.bias"] = lp["q_bias"][i].reshape(H * d)
            out[p + "self_attn.k_proj.bias"] = lp["k_bias"][i].reshape(K * d)
            out[p + "self_attn.v_proj.bias"] = lp["v_bias"][i].reshape(K * d)
        out[p + "mlp.gate_proj.weight"] = lp["gate"][i].T
        out[p + "mlp.up_proj.weight"] = lp["up"][i].T
        out[p + "mlp.down_proj.weight"] = lp["down"][i].T
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = np.asarray(params["lm_head"]).T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
