"""The GPT-2 decoder family in Flax NNX (Radford et al. 2019, "Language Models are Unsupervised
Multitask Learners"), with Hugging Face conversion.

Pre-LayerNorm blocks, learned absolute position embeddings (``wpe``), multi-head attention with biases,
a GELU (tanh approximation, ``gelu_new``) MLP with biases, a final LayerNorm and an LM head tied to the
token embedding. As in ``llama.py`` the layer parameters are stacked along a leading ``layers`` axis and
the blocks run under one ``jax.lax.scan`` (``layers.run_blocks``), with the same call signature and KV cache.

Parameter tree (logical axes in brackets)::

    embed        [V, D]        (vocab, embed)       pos_embed [P, D]   (-, embed)
    layers/attn_norm, layers/attn_norm_bias [L, D]   (layers, norm)
    layers/q, layers/k, layers/v [L, D, H, d]        layers/{q,k,v}_bias [L, H, d]
    layers/o [L, H, d, D]      layers/o_bias [L, D]
    layers/mlp_norm, layers/mlp_norm_bias [L, D]
    layers/up [L, D, F]        layers/up_bias [L, F]
    layers/down [L, F, D]      layers/down_bias [L, D]
    final_norm, final_norm_bias [D]
    lm_head      [D, V]        (untied only; GPT-2 checkpoints are tied)

Hugging Face names (``transformer.`` prefix of ``GPT2LMHeadModel`` stripped). GPT-2 uses ``Conv1D``
whose weight is ``[in, out]`` (``y = x W + b``), so no transpose is needed, unlike ``Linear``::

    wte.weight [V, D] -> embed              wpe.weight [P, D] -> pos_embed
    h.i.ln_1.{weight,bias} -> attn_norm(_bias)[i]      h.i.ln_2.{weight,bias} -> mlp_norm(_bias)[i]
    h.i.attn.c_attn.weight [D, 3D] / bias [3D] -> q|k|v [D, H, d] / {q,k,v}_bias [H, d]
    h.i.attn.c_proj.weight [D, D] / bias -> o [H, d, D] / o_bias
    h.i.mlp.c_fc.weight [D, F] / bias -> up / up_bias   h.i.mlp.c_proj.weight [F, D] / bias -> down / down_bias
    ln_f.{weight,bias} -> final_norm(_bias)             lm_head.weight [V, D] -> lm_head [D, V] (untied)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.layers import (DecoderOutput, KVCache, activation, attend, dense, layer_norm, lm_logits,
                                   normal_param, ones_param, prepare_inputs, run_blocks, write_cache, zeros_param)
from jaxrlhf.models.tensors import CheckpointTensors, require
from jaxrlhf.sharding import constrain, embed_lookup

__all__ = ["GPT2", "HF_MODEL_TYPES", "config_from_hf", "hf_config_from", "params_from_hf", "params_to_hf"]

Array = jax.Array

HF_MODEL_TYPES: tuple[str, ...] = ("gpt2",)


class GPT2Layers(nnx.Module):
    """The stacked parameters of all L blocks."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        L, D, H, d, F = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
        # GPT-2 scales the residual projections' init by 1/sqrt(2L) (Radford et al. 2019, sec. 2.3).
        resid = nnx.initializers.normal(0.02 / np.sqrt(2 * L))
        self.attn_norm = ones_param((L, D), ("layers", "norm"), cfg)
        self.attn_norm_bias = zeros_param((L, D), ("layers", "norm"), cfg)
        self.q = normal_param(rngs, (L, D, H, d), ("layers", "embed", "heads", "head_dim"), cfg)
        self.k = normal_param(rngs, (L, D, H, d), ("layers", "embed", "kv_heads", "head_dim"), cfg)
        self.v = normal_param(rngs, (L, D, H, d), ("layers", "embed", "kv_heads", "head_dim"), cfg)
        self.q_bias = zeros_param((L, H, d), ("layers", "heads", "head_dim"), cfg)
        self.k_bias = zeros_param((L, H, d), ("layers", "kv_heads", "head_dim"), cfg)
        self.v_bias = zeros_param((L, H, d), ("layers", "kv_heads", "head_dim"), cfg)
        self.o = normal_param(rngs, (L, H, d, D), ("layers", "heads", "head_dim", "embed"), cfg, init=resid)
        self.o_bias = zeros_param((L, D), ("layers", "norm"), cfg)
        self.mlp_norm = ones_param((L, D), ("layers", "norm"), cfg)
        self.mlp_norm_bias = zeros_param((L, D), ("layers", "norm"), cfg)
        self.up = normal_param(rngs, (L, D, F), ("layers", "embed", "mlp"), cfg)
        self.up_bias = zeros_param((L, F), ("layers", "mlp"), cfg)
        self.down = normal_param(rngs, (L, F, D), ("layers", "mlp", "embed"), cfg, init=resid)
        self.down_bias = zeros_param((L, D), ("layers", "norm"), cfg)


def _block(cfg: ModelConfig, x_BTD, lp, mask_B1TS, kv, cache_index):
    """One pre-LayerNorm GPT-2 block; ``kv`` is this layer's (k, v) cache or None. The residual stream is
    f32 and the norms' outputs are cast to the compute dtype for the projections (as in ``llama._block``)."""
    dt = cfg.compute_dtype
    f32 = jnp.float32
    h = layer_norm(x_BTD, lp["attn_norm"], lp["attn_norm_bias"], cfg.norm_eps).astype(dt)
    q = dense(h, lp["q"]) + lp["q_bias"].astype(dt)
    k = dense(h, lp["k"]) + lp["k_bias"].astype(dt)
    v = dense(h, lp["v"]) + lp["v_bias"].astype(dt)
    if kv is not None:
        k_cache, v_cache = kv
        k_cache, k = write_cache(k_cache, k, cache_index, dt)
        v_cache, v = write_cache(v_cache, v, cache_index, dt)
        kv = (k_cache, v_cache)
    o = attend(q, k.astype(dt), v.astype(dt), mask_B1TS, scale=cfg.head_dim ** -0.5)
    x_BTD = x_BTD + dense(o, lp["o"], in_axes=2, out_dtype=f32) + lp["o_bias"].astype(f32)
    h = layer_norm(x_BTD, lp["mlp_norm"], lp["mlp_norm_bias"], cfg.norm_eps).astype(dt)
    u = activation(cfg.hidden_act)(dense(h, lp["up"]) + lp["up_bias"].astype(dt))
    x_BTD = x_BTD + dense(u, lp["down"], out_dtype=f32) + lp["down_bias"].astype(f32)
    return constrain(x_BTD, ("batch", "length", "embed")), kv


class GPT2(nnx.Module):
    """GPT-2 causal language model.

    Call: ``model(tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None) -> DecoderOutput``
    (``logits_BTV``, ``hidden_BTD`` after ``ln_f``, updated cache or None).

    Args (call):
      tokens_BT: int32 token ids.
      positions_BT: int32 indices into the learned position table (< ``max_position_embeddings``);
        default counts from 0 within each segment, so left padding does not shift positions.
      segment_ids_BT: int32, 0 = padding, 1.. = packed sequence id. Default: all ones.
      cache: a ``KVCache`` (``init_cache``; K = H for GPT-2); ``positions_BT`` is then required.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.family != "gpt2":
            raise ValueError(f"GPT2 got model.family={cfg.family!r}")
        if cfg.num_kv_heads != cfg.num_heads:
            raise ValueError(f"GPT-2 has no grouped-query attention: model.num_kv_heads={cfg.num_kv_heads} "
                             f"must equal model.num_heads={cfg.num_heads}")
        self.cfg = cfg
        D = cfg.hidden_size
        self.embed = normal_param(rngs, (cfg.vocab_size, D), ("vocab", "embed"), cfg)
        self.pos_embed = normal_param(rngs, (cfg.max_position_embeddings, D), (None, "embed"), cfg,
                                init=nnx.initializers.normal(0.01))
        self.layers = GPT2Layers(cfg, rngs=rngs)
        self.final_norm = ones_param((D,), ("norm",), cfg)
        self.final_norm_bias = zeros_param((D,), ("norm",), cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = normal_param(rngs, (D, cfg.vocab_size), ("embed", "vocab"), cfg)

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache: KVCache | None = None
                 ) -> DecoderOutput:
        cfg = self.cfg
        positions_BT, mask, kv_segments, index = prepare_inputs(tokens_BT, positions_BT, segment_ids_BT, cache)
        x = embed_lookup(self.embed[...], tokens_BT) + embed_lookup(self.pos_embed[...], positions_BT)
        x = constrain(x.astype(jnp.float32), ("batch", "length", "embed"))  # the f32 residual stream
        layer_params = {name: var[...] for name, var in vars(self.layers).items() if isinstance(var, nnx.Param)}

        def block_fn(x, lp, kv, mask):
            return _block(cfg, x, lp, mask, kv, index)

        x, kv = run_blocks(block_fn, cfg, x, layer_params, cache, mask)
        hidden = layer_norm(x, self.final_norm[...], self.final_norm_bias[...], cfg.norm_eps)
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

def config_from_hf(hf_config: dict) -> ModelConfig:
    """``ModelConfig`` (family ``gpt2``) from a GPT-2 ``config.json`` dict.

    Raises:
      ValueError: another ``model_type``, a missing field, or an option we do not reproduce
        (``scale_attn_weights=False``, ``scale_attn_by_inverse_layer_idx=True``, ``add_cross_attention``,
        an unknown ``activation_function``).
    """
    mt = hf_config.get("model_type", "gpt2")
    if mt not in HF_MODEL_TYPES:
        raise ValueError(f"gpt2.config_from_hf got model_type={mt!r}; expected 'gpt2'")
    if not hf_config.get("scale_attn_weights", True):
        raise ValueError("config.json scale_attn_weights=False is not supported (scores are scaled by 1/sqrt(d))")
    if hf_config.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("config.json scale_attn_by_inverse_layer_idx=True is not supported")
    if hf_config.get("add_cross_attention", False):
        raise ValueError("config.json add_cross_attention=True is not supported (decoder-only GPT-2)")
    act = hf_config.get("activation_function", "gelu_new")
    activation(act)  # validates the name
    D = int(require(hf_config, "n_embd", mt))
    H = int(require(hf_config, "n_head", mt))
    return ModelConfig(
        family="gpt2", vocab_size=int(require(hf_config, "vocab_size", mt)), hidden_size=D,
        num_layers=int(require(hf_config, "n_layer", mt)), num_heads=H, num_kv_heads=H, head_dim=D // H,
        intermediate_size=int(hf_config.get("n_inner") or 4 * D),
        max_position_embeddings=int(hf_config.get("n_positions", 1024)),
        norm_eps=float(hf_config.get("layer_norm_epsilon", 1e-5)), rope_theta=10000.0, rope_scaling=None,
        attention_bias=True, mlp_bias=True, tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", True)),
        hidden_act=act, pad_token_id=hf_config.get("pad_token_id"), bos_token_id=hf_config.get("bos_token_id"),
        eos_token_id=hf_config.get("eos_token_id"))


def hf_config_from(cfg: ModelConfig) -> dict:
    """A ``config.json`` dict (``GPT2LMHeadModel``) for ``cfg`` that ``transformers`` loads back."""
    if cfg.family != "gpt2":
        raise ValueError(f"gpt2.hf_config_from got model.family={cfg.family!r}")
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        raise ValueError(f"GPT-2 needs head_dim*num_heads == hidden_size, got {cfg.head_dim}*{cfg.num_heads}")
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
        "n_inner": cfg.intermediate_size, "n_positions": cfg.max_position_embeddings,
        "layer_norm_epsilon": cfg.norm_eps, "activation_function": cfg.hidden_act,
        "tie_word_embeddings": cfg.tie_word_embeddings, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "initializer_range": 0.02,
        "bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        "use_cache": True,
    }


def params_from_hf(tensors, cfg: ModelConfig) -> dict:
    """Pure parameter dict for :class:`GPT2` from HF tensors (``transformer.`` prefix optional).

    Shapes are checked before conversion; the causal-mask buffers of old checkpoints (``attn.bias``,
    ``attn.masked_bias``) are ignored and a tied ``lm_head.weight`` is dropped.

    Raises:
      ValueError: a wrongly shaped tensor (naming the HF key, expected and actual shapes), or missing /
        unexpected keys.
    """
    L, D, H, d, F, V, P = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size,
                           cfg.vocab_size, cfg.max_position_embeddings)
    t = CheckpointTensors(tensors, strip_prefixes=("transformer.",),
                          ignore=(r"^h\.\d+\.attn\.(bias|masked_bias)$",))
    c_attn_w = t.stack("h.{}.attn.c_attn.weight", L, (D, 3 * D))
    c_attn_b = t.stack("h.{}.attn.c_attn.bias", L, (3 * D,))
    layers = {
        "attn_norm": t.stack("h.{}.ln_1.weight", L, (D,)),
        "attn_norm_bias": t.stack("h.{}.ln_1.bias", L, (D,)),
        "o": t.stack("h.{}.attn.c_proj.weight", L, (D, D), transform=lambda w: w.reshape(H, d, D)),
        "o_bias": t.stack("h.{}.attn.c_proj.bias", L, (D,)),
        "mlp_norm": t.stack("h.{}.ln_2.weight", L, (D,)),
        "mlp_norm_bias": t.stack("h.{}.ln_2.bias", L, (D,)),
        "up": t.stack("h.{}.mlp.c_fc.weight", L, (D, F)),
        "up_bias": t.stack("h.{}.mlp.c_fc.bias", L, (F,)),
        "down": t.stack("h.{}.mlp.c_proj.weight", L, (F, D)),
        "down_bias": t.stack("h.{}.mlp.c_proj.bias", L, (D,)),
    }
    if c_attn_w is not None:
        qkv = c_attn_w.reshape(L, D, 3, H, d)
        layers.update(q=qkv[:, :, 0], k=qkv[:, :, 1], v=qkv[:, :, 2])
    if c_attn_b is not None:
        qkv_b = c_attn_b.reshape(L, 3, H, d)
        layers.update(q_bias=qkv_b[:, 0], k_bias=qkv_b[:, 1], v_bias=qkv_b[:, 2])
    params = {"embed": t.take("wte.weight", (V, D)), "pos_embed": t.take("wpe.weight", (P, D)),
              "layers": layers, "final_norm": t.take("ln_f.weight", (D,)),
              "final_norm_bias": t.take("ln_f.bias", (D,))}
    if cfg.tie_word_embeddings:
        if "lm_head.weight" in t:
            t.take("lm_head.weight", (V, D))
    else:
        w = t.take("lm_head.weight", (V, D))
        params["lm_head"] = None if w is None else w.T
    t.finish("GPT-2")
    return params


def params_to_hf(params: dict, cfg: ModelConfig) -> dict:
    """HF tensors (``GPT2LMHeadModel`` names, ``Conv1D`` ``[in, out]`` layout) from a pure :class:`GPT2`
    dict. A tied LM head is not emitted."""
    L, D = cfg.num_layers, cfg.hidden_size
    lp = {k: np.asarray(v) for k, v in params["layers"].items()}
    out = {"transformer.wte.weight": np.asarray(params["embed"]),
           "transformer.wpe.weight": np.asarray(params["pos_embed"]),
           "transformer.ln_f.weight": np.asarray(params["final_norm"]),
           "transformer.ln_f.bias": np.asarray(params["final_norm_bias"])}
    for i in range(L):
        p = f"transformer.h.{i}."
        out[p + "ln_1.weight"], out[p + "ln_1.bias"] = lp["attn_norm"][i], lp["attn_norm_bias"][i]
        out[p + "ln_2.weight"], out[p + "ln_2.bias"] = lp["mlp_norm"][i], lp["mlp_norm_bias"][i]
        out[p + "attn.c_attn.weight"] = np.stack([lp["q"][i], lp["k"][i], lp["v"][i]], axis=1).reshape(D, 3 * D)
        out[p + "attn.c_attn.bias"] = np.stack([lp["q_bias"][i], lp["k_bias"][i], lp["v_bias"][i]]).reshape(3 * D)
        out[p + "attn.c_proj.weight"] = lp["o"][i].reshape(D, D)
        out[p + "attn.c_proj.bias"] = lp["o_bias"][i]
        out[p + "mlp.c_fc.weight"], out[p + "mlp.c_fc.bias"] = lp["up"][i], lp["up_bias"][i]
        out[p + "mlp.c_proj.weight"], out[p + "mlp.c_proj.bias"] = lp["down"][i], lp["down_bias"][i]
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = np.asarray(params["lm_head"]).T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
