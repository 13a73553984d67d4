"""Building blocks shared by the model families (``llama.py``, ``gpt2.py``, ``bert.py``).

* parameters: :func:`normal_param`, :func:`ones_param`, :func:`zeros_param` (``nnx.Param`` with logical axes);
* arrays: :func:`dense`, :func:`rms_norm`, :func:`layer_norm`, :func:`activation`, RoPE
  (:func:`rope_frequencies`, :func:`apply_rope`), :func:`attention_mask`, :func:`attend`,
  :func:`default_positions`;
* decoding: :class:`KVCache`, :func:`init_cache`, :func:`prepare_inputs` (segments, positions, mask and
  cache slots of a decoder call) and :class:`DecoderOutput`;
* depth: :func:`run_blocks` scans a block over the stacked ``layers`` parameters.

Every model is called the same way, ``model(tokens_BT, positions_BT, segment_ids_BT, cache=None)``
(encoders take no cache). Functions are pure and operate on arrays; the modules in the family files hold
parameters and call these. Shapes use the suffix convention of ``CONVENTIONS.md``. This module imports
no model family.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.models.config import ModelConfig, RopeScaling
from jaxrlhf.models.lora import LoraWeight, lora_dense
from jaxrlhf.models.mixed_precision import matmul

__all__ = [
    "DecoderOutput", "KVCache", "init_cache", "cache_storage_dtype", "write_cache",
    "default_positions", "attention_mask", "attend", "apply_rope",
    "rope_frequencies", "rms_norm", "layer_norm", "dense", "lm_logits", "prepare_inputs", "run_blocks",
]

Array = jax.Array


# --------------------------------------------------------------------------------------- parameters

def normal_param(rngs: nnx.Rngs, shape, axes, cfg: ModelConfig, init=None) -> nnx.Param:
    """An ``nnx.Param`` of ``shape`` in ``cfg.param_dtype`` drawn by ``init`` (default ``normal(0.02)``),
    with ``logical_axes=axes`` for the sharding rules."""
    init = init or nnx.initializers.normal(0.02)
    return nnx.Param(init(rngs.params(), shape, jnp.dtype(cfg.param_dtype)), logical_axes=axes)


def ones_param(shape, axes, cfg: ModelConfig) -> nnx.Param:
    """An all-ones ``nnx.Param`` (norm scales) in ``cfg.param_dtype`` with ``logical_axes=axes``."""
    return nnx.Param(jnp.ones(shape, jnp.dtype(cfg.param_dtype)), logical_axes=axes)


def zeros_param(shape, axes, cfg: ModelConfig) -> nnx.Param:
    """An all-zeros ``nnx.Param`` (biases) in ``cfg.param_dtype`` with ``logical_axes=axes``."""
    return nnx.Param(jnp.zeros(shape, jnp.dtype(cfg.param_dtype)), logical_axes=axes)


# ----------------------------------------------------------------------------------- array functions


def dense(x: Array, w: Array, in_axes: int = 1, out_dtype=None) -> Array:
    """``x[..., i1..ik] @ w[i1..ik, o1..om] -> [..., o1..om]`` as ONE 2-D matmul on ``[rows, in]``.

    ``w``'s first ``in_axes`` axes are contracted with ``x``'s last ``in_axes`` axes; the leading axes of
    ``x`` (batch, time) are folded into rows and the weight's axes into ``[in, out]`` (free reshapes of
    contiguous arrays). XLA:CPU runs this, and above all its weight gradient, as plain GEMMs; the
    equivalent multi-axis einsums (``btd,dhk->bthk`` and their ``btd,bthk->dhk`` gradients) made the
    SmolLM2-135M train step ~25% slower (17.5 s vs 12.9 s fwd+bwd at 8 x 256 on the 2-core CPU).

    ``x``'s dtype is the compute dtype; ``w`` may be the f32 master. With bf16 ``x`` the product follows
    the mixed-precision policy of :mod:`jaxrlhf.models.mixed_precision` (bf16 operands, f32
    accumulation, f32 weight gradient). The result is in ``out_dtype`` (default ``x``'s dtype).

    A :class:`~jaxrlhf.models.lora.LoraWeight` (a frozen weight with LoRA adapters) is applied by
    :func:`~jaxrlhf.models.lora.lora_dense` (``x W0 + (α/r) drop(x) A B``, factored).
    """
    if isinstance(w, LoraWeight):
        return lora_dense(x, w, in_axes, out_dtype)
    n_in = math.prod(w.shape[:in_axes])
    lead = x.shape[: x.ndim - in_axes]
    out = matmul(x.reshape(-1, n_in), w.reshape(n_in, -1), out_dtype)
    return out.reshape(*lead, *w.shape[in_axes:])


def lm_logits(hidden_BTD: Array, w: Array, cfg: ModelConfig) -> Array:
    """LM head: float32 logits ``[..., V]`` from ``hidden [..., D]`` (any float dtype).

    ``w`` is the ``[V, D]`` input embedding when ``cfg.tie_word_embeddings`` (multiplied transposed,
    without a transposed copy), else the ``[D, V]`` output projection. ``hidden`` is cast to
    ``cfg.compute_dtype``; the product accumulates in f32 and is returned in f32 whatever the compute
    dtype, so log-softmax over the vocabulary never sees a bf16-rounded logit.
    """
    lead = hidden_BTD.shape[:-1]
    h = hidden_BTD.reshape(-1, hidden_BTD.shape[-1]).astype(cfg.compute_dtype)
    out = matmul(h, w, jnp.float32, w_transposed=cfg.tie_word_embeddings)
    return out.reshape(*lead, -1)


def rms_norm(x_BTD: Array, scale_D: Array, eps: float) -> Array:
    """RMSNorm (Zhang & Sennrich 2019): ``x / sqrt(mean(x^2) + eps) * scale``, computed in f32."""
    x = x_BTD.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return (y * scale_D.astype(jnp.float32)).astype(x_BTD.dtype)


def layer_norm(x_BTD: Array, scale_D: Array, bias_D: Array, eps: float) -> Array:
    """LayerNorm (Ba et al. 2016), statistics in f32."""
    x = x_BTD.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale_D.astype(jnp.float32) + bias_D.astype(jnp.float32)).astype(x_BTD.dtype)


def activation(name: str):
    """The MLP nonlinearity by its ``transformers`` name."""
    if name == "silu":
        return jax.nn.silu
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"model.hidden_act={name!r} is not supported (silu, gelu, gelu_new, relu)")


# --------------------------------------------------------------------------------------------- RoPE

def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None,
                     max_position_embeddings: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies ``inv_freq[head_dim // 2]`` and the attention scaling factor.

    Follows Su et al. 2021 (RoFormer, eq. 34) with the scaling rules of ``transformers``:
    ``linear`` divides all frequencies by ``factor``; ``llama3`` divides low frequencies by ``factor``,
    keeps high ones and interpolates in between; ``yarn`` blends interpolation and extrapolation per
    dimension (Peng et al. 2023, eq. 19-21) and scales attention by ``0.1 ln(factor) + 1``.

    Raises:
      ValueError: an unknown ``rope_type``.
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    attention_factor = 1.0
    if scaling is None or scaling.rope_type == "default":
        pass
    elif scaling.rope_type == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.rope_type == "llama3":
        old_ctx = scaling.original_max_position_embeddings or max_position_embeddings
        low_wavelen = old_ctx / scaling.low_freq_factor
        high_wavelen = old_ctx / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled)
    elif scaling.rope_type == "yarn":
        old_ctx = scaling.original_max_position_embeddings or max_position_embeddings
        factor = scaling.factor
        attention_factor = scaling.attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

        def correction_dim(num_rotations):
            return (head_dim * math.log(old_ctx / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
        high = min(math.ceil(correction_dim(scaling.beta_slow)), head_dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrapolation_factor = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation_factor) + inv_freq * extrapolation_factor
    else:
        raise ValueError(f"model.rope_scaling.rope_type={scaling.rope_type!r} is not supported "
                         "(default, linear, llama3, yarn)")
    return inv_freq.astype(np.float32), float(attention_factor)


def apply_rope(x_BTHd: Array, positions_BT: Array, inv_freq: np.ndarray, attention_factor: float = 1.0) -> Array:
    """Rotate query/key vectors by their positions (``rotate_half`` layout, as ``transformers``)."""
    angles = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, d/2]
    cos = (jnp.cos(angles) * attention_factor)[:, :, None, :]
    sin = (jnp.sin(angles) * attention_factor)[:, :, None, :]
    x = x_BTHd.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHd.dtype)


# ----------------------------------------------------------------------------------- masks and cache

class KVCache(NamedTuple):
    """Key/value cache for incremental decoding, stacked over layers.

    Attributes:
      k_LBSKd / v_LBSKd: cached keys and values, S = cache length (prompt + new tokens).
      segment_ids_BS: int32, 0 for empty or padding slots, else the segment of the token in the slot.
      index: int32 scalar, the next slot to write.
    """

    k_LBSKd: Array
    v_LBSKd: Array
    segment_ids_BS: Array
    index: Array


def cache_storage_dtype(dtype: Any) -> jnp.dtype:
    """The dtype a KV cache of ``dtype`` values is stored in: ``uint16`` holding the bits for bfloat16.

    XLA:CPU has no native bf16 ``dynamic-update-slice``: its float-normalisation pass rewrites the
    cache write as convert-to-f32, update, convert-back of the **whole** ``[L, B, S, K, d]`` cache, once
    per layer per decode step (1 GB of traffic per step for SmolLM2 at batch 16, half the bf16 sampler's
    time). Stored as ``uint16`` bits, the write is an in-place copy of one slot; reading it back is a free
    ``bitcast_convert_type``. Other dtypes are stored as they are.
    """
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.uint16) if dtype == jnp.dtype(jnp.bfloat16) else dtype


def write_cache(cache_BSKd: Array, new_BTKd: Array, index: Array, dtype: Any) -> tuple[Array, Array]:
    """Write ``new_BTKd`` at slot ``index`` of one layer's cache; returns ``(stored, values)``.

    Args:
      cache_BSKd: ``[B, S, K, d]`` in :func:`cache_storage_dtype` of the cache's value dtype (``uint16`` =
        bf16 bits).
      new_BTKd: ``[B, T, K, d]`` keys or values of the current tokens, any float dtype.
      index: int32 scalar, the first slot to write.
      dtype: the compute dtype the attention reads the values in.

    Returns:
      ``stored``: the updated cache in its storage dtype; ``values``: the same ``[B, S, K, d]`` as
      ``dtype`` numbers.
    """
    if cache_BSKd.dtype == jnp.uint16:                       # bf16 bits (cache_storage_dtype)
        bits = jax.lax.bitcast_convert_type(new_BTKd.astype(jnp.bfloat16), jnp.uint16)
        stored = jax.lax.dynamic_update_slice(cache_BSKd, bits, (0, index, 0, 0))
        return stored, jax.lax.bitcast_convert_type(stored, jnp.bfloat16).astype(dtype)
    stored = jax.lax.dynamic_update_slice(cache_BSKd, new_BTKd.astype(cache_BSKd.dtype), (0, index, 0, 0))
    return stored, stored.astype(dtype)


def init_cache(cfg: ModelConfig, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
    """An empty cache of ``max_length`` slots for values in ``cfg.dtype`` unless ``dtype`` is given.

    bf16 values are stored as ``uint16`` bits (:func:`cache_storage_dtype`; read them with
    :func:`write_cache`, or ``jax.lax.bitcast_convert_type(k, jnp.bfloat16)``).

    Raises:
      ValueError: ``max_length`` exceeds ``cfg.max_position_embeddings``.
    """
    if max_length > cfg.max_position_embeddings:
        raise ValueError(f"cache length {max_length} exceeds model.max_position_embeddings="
                         f"{cfg.max_position_embeddings}; shorten the prompt or max_new_tokens")
    dtype = cache_storage_dtype(dtype or cfg.compute_dtype)
    shape = (cfg.num_layers, batch_size, max_length, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch_size, max_length), jnp.int32), jnp.zeros((), jnp.int32))


def attention_mask(q_segment_BT: Array, kv_segment_BS: Array, q_slot_T: Array, kv_slot_S: Array,
                   causal: bool = True) -> Array:
    """Boolean mask ``[B, 1, T, S]``: query t may attend key s.

    Allowed when both tokens share a nonzero segment id (padding is segment 0; packed sequences get
    1, 2, ...) and, if ``causal``, the key's slot is not after the query's.
    """
    same = (q_segment_BT[:, :, None] == kv_segment_BS[:, None, :]) & (kv_segment_BS[:, None, :] != 0)
    if causal:
        same = same & (kv_slot_S[None, None, :] <= q_slot_T[None, :, None])
    return same[:, None, :, :]


def attend(q_BTHd: Array, k_BSKd: Array, v_BSKd: Array, mask_B1TS: Array, scale: float | None = None) -> Array:
    """Scaled dot-product attention with grouped-query heads (K divides H). Softmax in f32."""
    return jax.nn.dot_product_attention(q_BTHd, k_BSKd, v_BSKd, mask=mask_B1TS, scale=scale)


def default_positions(segment_ids_BT: Array) -> Array:
    """Positions counting from 0 at each row's first real token, restarting at each new segment."""
    valid = (segment_ids_BT != 0).astype(jnp.int32)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids_BT[:, :1], dtype=bool),
         segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    idx = jnp.arange(segment_ids_BT.shape[1])[None, :]
    seg_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return jnp.where(valid > 0, idx - seg_start, 0).astype(jnp.int32)


# ---------------------------------------------------------------------------- decoder calls, depth

class DecoderOutput(NamedTuple):
    """``logits_BTV`` (float32: the LM head keeps its f32 accumulator), ``hidden_BTD`` (after the final norm, f32), updated ``cache`` or None."""

    logits_BTV: Array
    hidden_BTD: Array
    cache: KVCache | None


def prepare_inputs(tokens_BT, positions_BT, segment_ids_BT, cache: KVCache | None):
    """Fill default segments/positions, update the cache's segment ids and build the attention mask.

    Returns ``(positions_BT, mask_B1TS, new_segment_ids_BS or None, cache_index)``.

    Raises:
      ValueError: a cache without ``positions_BT``.
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


def run_blocks(block_fn, cfg: ModelConfig, x_BTD, layer_params: dict, cache: KVCache | None, *args):
    """Scan ``block_fn(x, layer_params_l, kv_l, *args) -> (x, kv_l)`` over the stacked layers.

    With a cache, the full ``[L, ...]`` key/value arrays ride in the scan carry and layer ``l``'s slice
    is updated in place (``dynamic_update_index_in_dim``), rather than being scanned in and stacked out
    again, which copied the whole cache on every decode step. ``remat='block'`` recomputes each block
    in the backward pass; ``cfg.scan_unroll`` blocks run per loop iteration (0 = all of them).
    """
    if cache is None:
        def body(x, lp):
            return block_fn(x, lp, None, *args)[0], None

        if cfg.remat == "block":
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
        x_BTD, _ = jax.lax.scan(body, x_BTD, layer_params, unroll=min(cfg.scan_unroll or cfg.num_layers, cfg.num_layers))
        return x_BTD, None

    def body_cached(carry, xs):
        x, k_all, v_all = carry
        lp, layer = xs
        kv = (jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False),
              jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False))
        x, (k, v) = block_fn(x, lp, kv, *args)
        return (x, jax.lax.dynamic_update_index_in_dim(k_all, k, layer, 0),
                jax.lax.dynamic_update_index_in_dim(v_all, v, layer, 0)), None

    if cfg.remat == "block":
        body_cached = jax.checkpoint(body_cached, policy=jax.checkpoint_policies.nothing_saveable)
    (x_BTD, k_all, v_all), _ = jax.lax.scan(body_cached, (x_BTD, cache.k_LBSKd, cache.v_LBSKd),
                                            (layer_params, jnp.arange(cfg.num_layers)),
                                            unroll=min(cfg.scan_unroll or cfg.num_layers, cfg.num_layers))
    return x_BTD, (k_all, v_all)
