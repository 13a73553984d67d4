"""The Llama decoder family in Flax NNX: Llama 2/3, TinyLlama, SmolLM/SmolLM2, Qwen2 (q/k/v bias).

RMSNorm, rotary position embeddings (with the standard scaling types), grouped-query attention,
SwiGLU MLP, tied or untied embeddings (Touvron et al. 2023). Layer parameters are stacked along a
leading ``layers`` axis and the blocks run under one ``jax.lax.scan``, so compile time does not grow
with depth, and ``remat='block'`` recomputes a block in the backward pass.

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

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.layers import (KVCache, activation, apply_rope, attend, attention_mask, default_positions,
                                   rms_norm, rope_frequencies)
from jaxrlhf.sharding import constrain

Array = jax.Array


class DecoderOutput(NamedTuple):
    """``logits_BTV`` (compute dtype), ``hidden_BTD`` (after the final norm), updated ``cache`` or None."""

    logits_BTV: Array
    hidden_BTD: Array
    cache: KVCache | None


def _param(rngs: nnx.Rngs, shape, axes, cfg: ModelConfig, init=None) -> nnx.Param:
    init = init or nnx.initializers.normal(0.02)
    return nnx.Param(init(rngs.params(), shape, jnp.dtype(cfg.param_dtype)), logical_axes=axes)


def _ones(shape, axes, cfg: ModelConfig) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, jnp.dtype(cfg.param_dtype)), logical_axes=axes)


def _zeros(shape, axes, cfg: ModelConfig) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, jnp.dtype(cfg.param_dtype)), logical_axes=axes)


class LlamaLayers(nnx.Module):
    """The stacked parameters of all L blocks."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        L, D, H, K, d, F = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                            cfg.intermediate_size)
        self.attn_norm = _ones((L, D), ("layers", "norm"), cfg)
        self.q = _param(rngs, (L, D, H, d), ("layers", "embed", "heads", "head_dim"), cfg)
        self.k = _param(rngs, (L, D, K, d), ("layers", "embed", "kv_heads", "head_dim"), cfg)
        self.v = _param(rngs, (L, D, K, d), ("layers", "embed", "kv_heads", "head_dim"), cfg)
        if cfg.attention_bias:
            self.q_bias = _zeros((L, H, d), ("layers", "heads", "head_dim"), cfg)
            self.k_bias = _zeros((L, K, d), ("layers", "kv_heads", "head_dim"), cfg)
            self.v_bias = _zeros((L, K, d), ("layers", "kv_heads", "head_dim"), cfg)
        self.o = _param(rngs, (L, H, d, D), ("layers", "heads", "head_dim", "embed"), cfg)
        self.mlp_norm = _ones((L, D), ("layers", "norm"), cfg)
        self.gate = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), cfg)
        self.up = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), cfg)
        self.down = _param(rngs, (L, F, D), ("layers", "mlp", "embed"), cfg)


def _block(cfg: ModelConfig, rope, x_BTD, lp, mask_B1TS, positions_BT, kv, cache_index):
    """One pre-norm block. ``lp`` holds this layer's arrays; ``kv`` is this layer's (k, v) cache or None."""
    dt = cfg.compute_dtype
    inv_freq, attn_factor = rope
    h = rms_norm(x_BTD, lp["attn_norm"], cfg.norm_eps)
    q = jnp.einsum("btd,dhk->bthk", h, lp["q"].astype(dt))
    k = jnp.einsum("btd,dhk->bthk", h, lp["k"].astype(dt))
    v = jnp.einsum("btd,dhk->bthk", h, lp["v"].astype(dt))
    if cfg.attention_bias:
        q, k, v = q + lp["q_bias"].astype(dt), k + lp["k_bias"].astype(dt), v + lp["v_bias"].astype(dt)
    q = apply_rope(q, positions_BT, inv_freq, attn_factor)
    k = apply_rope(k, positions_BT, inv_freq, attn_factor)
    if kv is not None:
        k_cache, v_cache = kv
        k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, cache_index, 0, 0))
        v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, cache_index, 0, 0))
        kv = (k, v)
    o = attend(q, k.astype(dt), v.astype(dt), mask_B1TS, scale=cfg.head_dim ** -0.5)
    x_BTD = x_BTD + jnp.einsum("bthk,hkd->btd", o, lp["o"].astype(dt))
    h = rms_norm(x_BTD, lp["mlp_norm"], cfg.norm_eps)
    g = jnp.einsum("btd,df->btf", h, lp["gate"].astype(dt))
    u = jnp.einsum("btd,df->btf", h, lp["up"].astype(dt))
    x_BTD = x_BTD + jnp.einsum("btf,fd->btd", activation(cfg.hidden_act)(g) * u, lp["down"].astype(dt))
    return constrain(x_BTD, ("batch", "length", "embed")), kv


def run_blocks(block_fn, cfg: ModelConfig, x_BTD, layer_params: dict, cache: KVCache | None, *args):
    """Scan ``block_fn(x, layer_params_l, kv_l, *args)`` over the stacked layers (rematerialised if asked)."""

    def body(x, xs):
        lp, kv = xs
        return block_fn(x, lp, kv, *args)

    if cfg.remat == "block":
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    kv_xs = None if cache is None else (cache.k_LBSKd, cache.v_LBSKd)
    x_BTD, kv_ys = jax.lax.scan(body, x_BTD, (layer_params, kv_xs))
    return x_BTD, kv_ys


def prepare_inputs(tokens_BT, positions_BT, segment_ids_BT, cache: KVCache | None):
    """Fill default segments/positions, update the cache's segment ids and build the attention mask.

    Returns ``(positions_BT, mask_B1TS, new_segment_ids_BS or None, cache_index)``.
    """
    B, T = tokens_BT.shape
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones((B, T), jnp.int32)
    if positions_BT is None:
        if cache is not None:
            raise ValueError("positions_BT is required when decoding with a cache")
        positions_BT = default_positions(segment_ids_BT)
    if cache is None:
        slots = jnp.arange(T)
        return positions_BT, attention_mask(segment_ids_BT, segment_ids_BT, slots, slots), None, None
    index = cache.index
    kv_segments = jax.lax.dynamic_update_slice(cache.segment_ids_BS, segment_ids_BT.astype(jnp.int32), (0, index))
    mask = attention_mask(segment_ids_BT, kv_segments, index + jnp.arange(T), jnp.arange(kv_segments.shape[1]))
    return positions_BT, mask, kv_segments, index


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
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg)
        self.layers = LlamaLayers(cfg, rngs=rngs)
        self.final_norm = _ones((cfg.hidden_size,), ("norm",), cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg)

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache: KVCache | None = None
                 ) -> DecoderOutput:
        cfg = self.cfg
        positions_BT, mask, kv_segments, index = prepare_inputs(tokens_BT, positions_BT, segment_ids_BT, cache)
        x = jnp.take(self.embed[...], tokens_BT, axis=0).astype(cfg.compute_dtype)
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
        """LM head: ``hidden @ embed^T`` (tied) or ``hidden @ lm_head``."""
        dt = self.cfg.compute_dtype
        if self.cfg.tie_word_embeddings:
            w = self.embed[...].astype(dt)
            return constrain(jnp.einsum("btd,vd->btv", hidden_BTD, w), ("batch", "length", "vocab"))
        return constrain(jnp.einsum("btd,dv->btv", hidden_BTD, self.lm_head[...].astype(dt)),
                         ("batch", "length", "vocab"))
