"""The BERT encoder family in Flax NNX: BERT, RoBERTa and DistilBERT, for classifier rewards and embeddings.

One config-driven :class:`Encoder` covers the three ``transformers`` architectures (Devlin et al. 2019;
Liu et al. 2019; Sanh et al. 2019). They share the same post-norm block (attention with biases, output
projection + residual + LayerNorm, GELU MLP + residual + LayerNorm) and differ only in the embeddings and
the sequence-classification head:

============  ==========================  ===================  ===================================
family        positions                   token types          classification head (on token 0)
============  ==========================  ===================  ===================================
bert          ``0 .. T-1``                yes                  pooler dense + tanh -> classifier
roberta       ``pad+1 ..`` skipping pads  yes (usually 1)      dense + tanh -> out_proj
distilbert    ``0 .. T-1``                no                   pre_classifier + ReLU -> classifier
============  ==========================  ===================  ===================================

All three heads are ``dense(D->D) -> act -> dense(D->C)`` on the first real token, so they share one
parameter layout (``head/dense``, ``head/out``). Layer parameters are stacked along a leading ``layers``
axis and the blocks run under one ``jax.lax.scan`` (:func:`jaxrlhf.models.layers.run_blocks`). There is
no dropout (inference and reward-model fine-tuning both run without it here).

The encoder is called like the decoders, ``model(tokens_BT, positions_BT, segment_ids_BT, cache=None)``
(``cache`` must stay None), with the encoder-only ``token_type_ids_BT`` keyword-only after them; positions
mean the same as for decoders (0 at each sequence's first real token) and RoBERTa adds its fairseq offset
itself, so a reward model calls every backbone the same way.

Parameter tree (logical axes in brackets)::

    embed [V, D] (vocab, embed)          pos_embed [P, D] (None, embed)     type_embed [Y, D] (None, embed)
    embed_norm_scale, embed_norm_bias [D] (norm)
    layers/q, layers/k, layers/v [L, D, H, d]   layers/q_bias, k_bias, v_bias [L, H, d]
    layers/o [L, H, d, D]   layers/o_bias [L, D]   layers/attn_norm_scale, attn_norm_bias [L, D]
    layers/up [L, D, F]   layers/up_bias [L, F]   layers/down [L, F, D]   layers/down_bias [L, D]
    layers/mlp_norm_scale, mlp_norm_bias [L, D]
    head/dense [D, D] (embed, None)  head/dense_bias [D]  head/out [D, C] (embed, classes)  head/out_bias [C]
                                                                                        (num_labels > 0 only)

Hugging Face conversion (the converter contract of ``hf.py``, which loads and saves encoder folders):
:data:`HF_MODEL_TYPES`, :func:`config_from_hf`, :func:`config_with_head`, :func:`hf_config_from`,
:func:`params_from_hf`, :func:`params_to_hf`, :func:`model_class`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.layers import (activation, attend, attention_mask, dense, layer_norm, normal_param, ones_param,
                                   run_blocks, zeros_param)
from jaxrlhf.sharding import constrain, embed_lookup

__all__ = [
    "Encoder", "EncoderOutput", "HF_MODEL_TYPES", "model_class", "mean_pool", "l2_normalize",
    "config_from_hf", "hf_config_from", "params_from_hf", "params_to_hf", "config_with_head",
]

Array = jax.Array

HF_MODEL_TYPES = ("bert", "roberta", "distilbert")


class EncoderOutput(NamedTuple):
    """Encoder outputs.

    Attributes:
      hidden_BTD: last-layer hidden states (compute dtype). Rows at padding positions are defined but
        meaningless.
      pooled_BD: the classification head's hidden layer on the first real token (BERT pooler output,
        RoBERTa ``classifier.dense``+tanh, DistilBERT ``pre_classifier``+ReLU), compute dtype; ``None``
        without a head (``num_labels == 0``).
      logits_BC: float32 classifier logits, or ``None`` without a head.
    """

    hidden_BTD: Array
    pooled_BD: Array | None
    logits_BC: Array | None


def _check_encoder_cfg(cfg: ModelConfig) -> None:
    if cfg.family not in HF_MODEL_TYPES:
        raise ValueError(f"Encoder got model.family={cfg.family!r}; expected one of {HF_MODEL_TYPES}")
    if cfg.num_kv_heads != cfg.num_heads:
        raise ValueError(f"encoders use plain multi-head attention: model.num_kv_heads={cfg.num_kv_heads} "
                         f"must equal model.num_heads={cfg.num_heads}")
    if cfg.family == "distilbert" and cfg.type_vocab_size:
        raise ValueError(f"DistilBERT has no token-type embeddings; set model.type_vocab_size=0 "
                         f"(got {cfg.type_vocab_size})")
    if cfg.family == "roberta" and cfg.pad_token_id is None:
        raise ValueError("RoBERTa positions start at model.pad_token_id + 1; set model.pad_token_id "
                         "(1 for roberta-base)")


class EncoderLayers(nnx.Module):
    """The stacked parameters of all L post-norm blocks."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        L, D, H, d, F = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
        for name in ("q", "k", "v"):
            setattr(self, name, normal_param(rngs, (L, D, H, d), ("layers", "embed", "heads", "head_dim"), cfg))
            setattr(self, f"{name}_bias", zeros_param((L, H, d), ("layers", "heads", "head_dim"), cfg))
        self.o = normal_param(rngs, (L, H, d, D), ("layers", "heads", "head_dim", "embed"), cfg)
        self.o_bias = zeros_param((L, D), ("layers", "norm"), cfg)
        self.attn_norm_scale = ones_param((L, D), ("layers", "norm"), cfg)
        self.attn_norm_bias = zeros_param((L, D), ("layers", "norm"), cfg)
        self.up = normal_param(rngs, (L, D, F), ("layers", "embed", "mlp"), cfg)
        self.up_bias = zeros_param((L, F), ("layers", "mlp"), cfg)
        self.down = normal_param(rngs, (L, F, D), ("layers", "mlp", "embed"), cfg)
        self.down_bias = zeros_param((L, D), ("layers", "norm"), cfg)
        self.mlp_norm_scale = ones_param((L, D), ("layers", "norm"), cfg)
        self.mlp_norm_bias = zeros_param((L, D), ("layers", "norm"), cfg)


class ClassifierHead(nnx.Module):
    """``dense(D->D) -> tanh|ReLU -> out(D->C)`` on the first real token."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, C = cfg.hidden_size, cfg.num_labels
        self.dense = normal_param(rngs, (D, D), ("embed", None), cfg)
        self.dense_bias = zeros_param((D,), ("norm",), cfg)
        self.out = normal_param(rngs, (D, C), ("embed", "classes"), cfg)
        self.out_bias = zeros_param((C,), ("classes",), cfg)


def _block(cfg: ModelConfig, x_BTD, lp, mask_B1TS):
    """One post-norm block (attention sub-layer then MLP sub-layer, each followed by residual + LayerNorm)."""
    dt = cfg.compute_dtype
    q = dense(x_BTD, lp["q"]) + lp["q_bias"].astype(dt)
    k = dense(x_BTD, lp["k"]) + lp["k_bias"].astype(dt)
    v = dense(x_BTD, lp["v"]) + lp["v_bias"].astype(dt)
    o = attend(q, k, v, mask_B1TS, scale=cfg.head_dim ** -0.5)
    a = dense(o, lp["o"], in_axes=2) + lp["o_bias"].astype(dt)
    x_BTD = layer_norm(x_BTD + a, lp["attn_norm_scale"], lp["attn_norm_bias"], cfg.norm_eps)
    h = dense(x_BTD, lp["up"]) + lp["up_bias"].astype(dt)
    h = activation(cfg.hidden_act)(h)
    m = dense(h, lp["down"]) + lp["down_bias"].astype(dt)
    x_BTD = layer_norm(x_BTD + m, lp["mlp_norm_scale"], lp["mlp_norm_bias"], cfg.norm_eps)
    return constrain(x_BTD, ("batch", "length", "embed"))


def roberta_positions(valid_BT: Array, segment_ids_BT: Array, padding_idx: int) -> Array:
    """RoBERTa/fairseq position ids: ``padding_idx + 1, +2, ...`` over real tokens, ``padding_idx`` on pads.

    Equals ``transformers``' ``create_position_ids_from_input_ids`` (``cumsum(mask) * mask + padding_idx``)
    on rows holding one sequence, whatever the padding side; packed rows restart at each new segment.

    Args:
      valid_BT: bool, True on real tokens.
      segment_ids_BT: int32, 0 = padding.
      padding_idx: the checkpoint's ``pad_token_id``.
    Returns:
      int32 ``[B, T]``.
    """
    valid = valid_BT.astype(jnp.int32)
    count_BT = jnp.cumsum(valid, axis=1)  # real tokens up to and including t
    T = segment_ids_BT.shape[1]
    starts = jnp.concatenate([jnp.ones_like(segment_ids_BT[:, :1], dtype=bool),
                              segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, jnp.arange(T), 0), axis=1)
    base_BT = jnp.take_along_axis(count_BT - valid, start_idx, axis=1)  # real tokens before the segment
    return ((count_BT - base_BT) * valid + padding_idx).astype(jnp.int32)


def first_token_index(segment_ids_BT: Array) -> Array:
    """Index of each row's first non-padding token (0 for rows with none): int32 ``[B]``."""
    T = segment_ids_BT.shape[-1]
    idx = jnp.where(segment_ids_BT != 0, jnp.arange(T), T)
    first = jnp.min(idx, axis=-1)
    return jnp.where(first == T, 0, first).astype(jnp.int32)


class Encoder(nnx.Module):
    """BERT / RoBERTa / DistilBERT encoder with an optional sequence-classification head.

    Call: ``model(tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None, *, token_type_ids_BT=None)
    -> EncoderOutput`` (the decoders' call, plus one encoder-only keyword).

    Args (call):
      tokens_BT: int32 token ids.
      positions_BT: int32 position of each token in its sequence, 0 at the first real token (the batch
        ``positions`` of ``CONVENTIONS.md``, as decoders take them). BERT/DistilBERT index their position
        table with it; RoBERTa with ``pad_token_id + 1 + positions_BT`` on real tokens and
        ``pad_token_id`` on padding (fairseq's offset). Default: BERT/DistilBERT ``0..T-1`` as
        ``transformers`` (also on left-padded rows; give positions for packed rows); RoBERTa
        :func:`roberta_positions` (``pad+1..`` skipping pads), which equals the offset batch positions.
      segment_ids_BT: int32, 0 = padding, 1.. = sequence id; attention is bidirectional within a segment
        (``attention_mask(..., causal=False)``). Default: all ones, except that RoBERTa, like
        ``transformers``, then treats ``tokens == pad_token_id`` as padding for its positions.
      cache: must be None (an encoder has no KV cache); it is in the signature so every model is called
        the same way.
      token_type_ids_BT: (keyword-only) int32 BERT sentence A/B ids (default zeros); ignored by DistilBERT.

    The classification head reads the first real token of each row (``[CLS]`` / ``<s>``), which equals
    ``transformers``' token 0 on right-padded rows. Rows are expected to hold one sequence each when a
    head or :func:`mean_pool` is used.

    Raises:
      ValueError: (at construction) a non-encoder family or an inconsistent config; (at call) a cache, or
        a sequence longer than the position table allows (checked when the family computes positions, and
        always for RoBERTa, whose positions reach ``pad_token_id + T``).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        _check_encoder_cfg(cfg)
        self.cfg = cfg
        D = cfg.hidden_size
        self.embed = normal_param(rngs, (cfg.vocab_size, D), ("vocab", "embed"), cfg)
        self.pos_embed = normal_param(rngs, (cfg.max_position_embeddings, D), (None, "embed"), cfg)
        if cfg.type_vocab_size:
            self.type_embed = normal_param(rngs, (cfg.type_vocab_size, D), (None, "embed"), cfg)
        self.embed_norm_scale = ones_param((D,), ("norm",), cfg)
        self.embed_norm_bias = zeros_param((D,), ("norm",), cfg)
        self.layers = EncoderLayers(cfg, rngs=rngs)
        if cfg.num_labels:
            self.head = ClassifierHead(cfg, rngs=rngs)

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None, *, token_type_ids_BT=None
                 ) -> EncoderOutput:
        if cache is not None:
            raise ValueError("an encoder has no KV cache: call it with cache=None")
        cfg = self.cfg
        dt = cfg.compute_dtype
        B, T = tokens_BT.shape
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)
            valid_BT = tokens_BT != cfg.pad_token_id if cfg.family == "roberta" else segment_ids_BT != 0
        else:
            valid_BT = segment_ids_BT != 0
        if cfg.family == "roberta":
            need = T + cfg.pad_token_id + 1
            if need > cfg.max_position_embeddings:
                raise ValueError(f"tokens_BT has T={T} but RoBERTa positions reach pad_token_id+T = {need - 1} "
                                 f">= model.max_position_embeddings={cfg.max_position_embeddings}; "
                                 f"truncate to T <= {cfg.max_position_embeddings - cfg.pad_token_id - 1}")
            if positions_BT is None:
                positions_BT = roberta_positions(valid_BT, segment_ids_BT, cfg.pad_token_id)
            else:
                positions_BT = jnp.where(valid_BT, positions_BT + cfg.pad_token_id + 1, cfg.pad_token_id)
        elif positions_BT is None:
            if T > cfg.max_position_embeddings:
                raise ValueError(f"tokens_BT has T={T} > model.max_position_embeddings="
                                 f"{cfg.max_position_embeddings}; truncate the inputs")
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

        x = embed_lookup(self.embed[...], tokens_BT).astype(jnp.float32)
        x = x + embed_lookup(self.pos_embed[...], positions_BT).astype(jnp.float32)
        if cfg.type_vocab_size:
            tt = jnp.zeros((B, T), jnp.int32) if token_type_ids_BT is None else token_type_ids_BT
            x = x + embed_lookup(self.type_embed[...], tt).astype(jnp.float32)
        x = layer_norm(x, self.embed_norm_scale[...], self.embed_norm_bias[...], cfg.norm_eps).astype(dt)
        x = constrain(x, ("batch", "length", "embed"))

        slots = jnp.arange(T)
        mask = attention_mask(segment_ids_BT, segment_ids_BT, slots, slots, causal=False)
        layer_params = {name: var[...] for name, var in vars(self.layers).items() if isinstance(var, nnx.Param)}

        def block_fn(x, lp, kv, mask):
            return _block(cfg, x, lp, mask), kv

        hidden, _ = run_blocks(block_fn, cfg, x, layer_params, None, mask)
        if not cfg.num_labels:
            return EncoderOutput(hidden, None, None)
        first_B = first_token_index(segment_ids_BT)
        cls_BD = jnp.take_along_axis(hidden, first_B[:, None, None], axis=1)[:, 0]
        head = self.head
        pooled = jnp.einsum("bd,de->be", cls_BD, head.dense[...].astype(dt)) + head.dense_bias[...].astype(dt)
        pooled = jax.nn.relu(pooled) if cfg.family == "distilbert" else jnp.tanh(pooled)
        logits = jnp.einsum("bd,dc->bc", pooled.astype(jnp.float32), head.out[...].astype(jnp.float32))
        logits = logits + head.out_bias[...].astype(jnp.float32)
        return EncoderOutput(hidden, pooled, logits)


def model_class(cfg: ModelConfig):
    """The module class that builds ``cfg`` (always :class:`Encoder` for this family)."""
    _check_encoder_cfg(cfg)
    return Encoder


# ------------------------------------------------------------------------------------------- pooling

def mean_pool(hidden_BTD: Array, segment_ids_BT: Array) -> Array:
    """Masked mean over the real tokens of each row (sentence-transformers ``mean`` pooling).

    ``sum_t h[b,t] * m[b,t] / max(sum_t m[b,t], 1e-9)`` with ``m = segment_ids != 0``; rows are expected to
    hold one sequence. Computed and returned in float32, ``[B, D]``.
    """
    m = (segment_ids_BT != 0).astype(jnp.float32)[..., None]
    total = jnp.sum(hidden_BTD.astype(jnp.float32) * m, axis=-2)
    return total / jnp.maximum(jnp.sum(m, axis=-2), 1e-9)


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """``x / max(||x||_2, eps)`` along ``axis`` (``torch.nn.functional.normalize``), float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


# ------------------------------------------------------------------------------- Hugging Face import

_PREFIX = {"bert": "bert", "roberta": "roberta", "distilbert": "distilbert"}
_ARCH = {"bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert"}
# Buffers and heads we do not model; they are skipped on import.
_IGNORED_PREFIXES = ("cls.", "lm_head.", "vocab_transform.", "vocab_layer_norm.", "vocab_projector.", "qa_outputs.")
_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")


def config_from_hf(hf_config: dict) -> ModelConfig:
    """Build a :class:`ModelConfig` from a ``transformers`` ``config.json`` dict.

    A sequence-classification head is configured (``num_labels > 0``, ``labels`` from ``id2label``) when
    ``architectures`` names a ``*ForSequenceClassification`` class; otherwise the model is a bare encoder
    (``num_labels = 0``; a BERT ``pooler`` in such checkpoints is not used).

    Raises:
      ValueError: an unsupported ``model_type``, ``position_embedding_type`` other than ``absolute``, or an
        activation outside gelu / gelu_new / relu.
    """
    mt = hf_config.get("model_type")
    if mt not in HF_MODEL_TYPES:
        raise ValueError(f"config.json model_type={mt!r} is not an encoder family {HF_MODEL_TYPES}")
    pet = hf_config.get("position_embedding_type", "absolute")
    if pet not in (None, "absolute"):
        raise ValueError(f"config.json position_embedding_type={pet!r} is not supported (only 'absolute')")
    archs = hf_config.get("architectures") or []
    num_labels, labels = 0, ()
    if any(str(a).endswith("ForSequenceClassification") for a in archs):
        id2label = hf_config.get("id2label") or {}
        num_labels = int(hf_config.get("num_labels") or len(id2label) or 2)
        names = {int(k): str(v) for k, v in id2label.items()}
        if len(names) == num_labels and set(names) == set(range(num_labels)):
            labels = tuple(names[i] for i in range(num_labels))
    if mt == "distilbert":
        D, H = hf_config.get("dim", 768), hf_config.get("n_heads", 12)
        kw = dict(hidden_size=D, num_layers=hf_config.get("n_layers", 6), num_heads=H, num_kv_heads=H,
                  intermediate_size=hf_config.get("hidden_dim", 4 * D), norm_eps=1e-12,
                  hidden_act=hf_config.get("activation", "gelu"), type_vocab_size=0,
                  max_position_embeddings=hf_config.get("max_position_embeddings", 512))
    else:
        H = hf_config.get("num_attention_heads", 12)
        kw = dict(hidden_size=hf_config.get("hidden_size", 768), num_layers=hf_config.get("num_hidden_layers", 12),
                  num_heads=H, num_kv_heads=H, intermediate_size=hf_config.get("intermediate_size", 3072),
                  norm_eps=hf_config.get("layer_norm_eps", 1e-12), hidden_act=hf_config.get("hidden_act", "gelu"),
                  type_vocab_size=hf_config.get("type_vocab_size", 2),
                  max_position_embeddings=hf_config.get("max_position_embeddings", 512))
    activation(kw["hidden_act"])  # raises on an unsupported name
    default_pad = 1 if mt == "roberta" else 0
    eos = hf_config.get("eos_token_id")
    cfg = ModelConfig(family=mt, vocab_size=hf_config.get("vocab_size", 30522), attention_bias=True, mlp_bias=True,
                      tie_word_embeddings=False, num_labels=num_labels, labels=labels,
                      pad_token_id=hf_config.get("pad_token_id", default_pad),
                      bos_token_id=hf_config.get("bos_token_id"),
                      eos_token_id=tuple(eos) if isinstance(eos, list) else eos, **kw)
    _check_encoder_cfg(cfg)
    return cfg


def hf_config_from(cfg: ModelConfig) -> dict:
    """The ``transformers`` ``config.json`` dict for ``cfg`` (inverse of :func:`config_from_hf`).

    ``architectures`` is ``[<Family>ForSequenceClassification]`` with a head, ``[<Family>Model]`` without.
    """
    _check_encoder_cfg(cfg)
    fam = cfg.family
    arch = _ARCH[fam] + ("ForSequenceClassification" if cfg.num_labels else "Model")
    out: dict[str, Any] = {"model_type": fam, "architectures": [arch], "vocab_size": cfg.vocab_size,
                           "max_position_embeddings": cfg.max_position_embeddings, "pad_token_id": cfg.pad_token_id,
                           "dtype": cfg.param_dtype}
    if fam == "distilbert":
        out.update(dim=cfg.hidden_size, n_layers=cfg.num_layers, n_heads=cfg.num_heads,
                   hidden_dim=cfg.intermediate_size, activation=cfg.hidden_act, sinusoidal_pos_embds=False)
    else:
        out.update(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                   num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                   hidden_act=cfg.hidden_act, layer_norm_eps=cfg.norm_eps, type_vocab_size=cfg.type_vocab_size,
                   position_embedding_type="absolute")
    if cfg.bos_token_id is not None:
        out["bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_id is not None:
        out["eos_token_id"] = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    if cfg.num_labels:
        names = cfg.labels or tuple(f"LABEL_{i}" for i in range(cfg.num_labels))
        out["num_labels"] = cfg.num_labels
        out["id2label"] = {str(i): n for i, n in enumerate(names)}
        out["label2id"] = {n: i for i, n in enumerate(names)}
    return out


def _hf_names(cfg: ModelConfig) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """HF tensor names (without the family prefix) for embeddings, per-layer (``{i}`` placeholder), head."""
    if cfg.family == "distilbert":
        emb = {"embed": "embeddings.word_embeddings.weight", "pos_embed": "embeddings.position_embeddings.weight",
               "embed_norm_scale": "embeddings.LayerNorm.weight", "embed_norm_bias": "embeddings.LayerNorm.bias"}
        p = "transformer.layer.{i}."
        layer = {"q": "attention.q_lin.weight", "q_bias": "attention.q_lin.bias",
                 "k": "attention.k_lin.weight", "k_bias": "attention.k_lin.bias",
                 "v": "attention.v_lin.weight", "v_bias": "attention.v_lin.bias",
                 "o": "attention.out_lin.weight", "o_bias": "attention.out_lin.bias",
                 "attn_norm_scale": "sa_layer_norm.weight", "attn_norm_bias": "sa_layer_norm.bias",
                 "up": "ffn.lin1.weight", "up_bias": "ffn.lin1.bias", "down": "ffn.lin2.weight",
                 "down_bias": "ffn.lin2.bias", "mlp_norm_scale": "output_layer_norm.weight",
                 "mlp_norm_bias": "output_layer_norm.bias"}
        head = {"dense": "pre_classifier.weight", "dense_bias": "pre_classifier.bias",
                "out": "classifier.weight", "out_bias": "classifier.bias"}
    else:
        emb = {"embed": "embeddings.word_embeddings.weight", "pos_embed": "embeddings.position_embeddings.weight",
               "embed_norm_scale": "embeddings.LayerNorm.weight", "embed_norm_bias": "embeddings.LayerNorm.bias"}
        if cfg.type_vocab_size:
            emb["type_embed"] = "embeddings.token_type_embeddings.weight"
        p = "encoder.layer.{i}."
        layer = {"q": "attention.self.query.weight", "q_bias": "attention.self.query.bias",
                 "k": "attention.self.key.weight", "k_bias": "attention.self.key.bias",
                 "v": "attention.self.value.weight", "v_bias": "attention.self.value.bias",
                 "o": "attention.output.dense.weight", "o_bias": "attention.output.dense.bias",
                 "attn_norm_scale": "attention.output.LayerNorm.weight",
                 "attn_norm_bias": "attention.output.LayerNorm.bias",
                 "up": "intermediate.dense.weight", "up_bias": "intermediate.dense.bias",
                 "down": "output.dense.weight", "down_bias": "output.dense.bias",
                 "mlp_norm_scale": "output.LayerNorm.weight", "mlp_norm_bias": "output.LayerNorm.bias"}
        if cfg.family == "bert":
            head = {"dense": "pooler.dense.weight", "dense_bias": "pooler.dense.bias",
                    "out": "classifier.weight", "out_bias": "classifier.bias"}
        else:
            head = {"dense": "classifier.dense.weight", "dense_bias": "classifier.dense.bias",
                    "out": "classifier.out_proj.weight", "out_bias": "classifier.out_proj.bias"}
    return emb, {k: p + v for k, v in layer.items()}, head


def _hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF (PyTorch ``nn.Linear`` is ``[out, in]``) shape of every tensor role."""
    D, H, d, F, C = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size, cfg.num_labels
    return {"embed": (cfg.vocab_size, D), "pos_embed": (cfg.max_position_embeddings, D),
            "type_embed": (cfg.type_vocab_size, D), "embed_norm_scale": (D,), "embed_norm_bias": (D,),
            "q": (H * d, D), "k": (H * d, D), "v": (H * d, D), "q_bias": (H * d,), "k_bias": (H * d,),
            "v_bias": (H * d,), "o": (D, H * d), "o_bias": (D,), "attn_norm_scale": (D,), "attn_norm_bias": (D,),
            "up": (F, D), "up_bias": (F,), "down": (D, F), "down_bias": (D,), "mlp_norm_scale": (D,),
            "mlp_norm_bias": (D,), "dense": (D, D), "dense_bias": (D,), "out": (C, D), "out_bias": (C,)}


def _from_torch_layout(role: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """HF layer tensor -> our layout (one layer, no ``layers`` axis)."""
    H, d, D = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    if role in ("q", "k", "v"):
        return w.T.reshape(D, H, d)
    if role in ("q_bias", "k_bias", "v_bias"):
        return w.reshape(H, d)
    if role == "o":
        return w.T.reshape(H, d, D)
    if role in ("up", "down", "dense", "out"):
        return w.T
    return w


def _to_torch_layout(role: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Inverse of :func:`_from_torch_layout`."""
    H, d, D = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    if role in ("q", "k", "v"):
        return w.reshape(D, H * d).T
    if role in ("q_bias", "k_bias", "v_bias"):
        return w.reshape(H * d)
    if role == "o":
        return w.reshape(H * d, D).T
    if role in ("up", "down", "dense", "out"):
        return w.T
    return w


def _strip_prefix(tensors: Mapping[str, Any], family: str) -> dict[str, Any]:
    prefix = _PREFIX[family] + "."
    out: dict[str, Any] = {}
    for key, value in tensors.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        if name in out:
            raise ValueError(f"checkpoint holds both {prefix}{name!s} and {name!s}; keep only one")
        out[name] = (key, value)
    return out


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
    """Convert ``transformers`` tensors to the nested pure dict of ``nnx.state(Encoder(cfg))``.

    Accepts bare-encoder checkpoints (``BertModel``/``RobertaModel``/``DistilBertModel``: keys without a
    prefix) and ``*ForSequenceClassification`` ones (encoder keys under ``bert.``/``roberta.``/
    ``distilbert.``). Head tensors are read only when ``cfg.num_labels > 0``; MLM/QA heads, the BERT
    pooler of bare encoders and ``position_ids`` buffers are skipped. Arrays come back as numpy in
    ``cfg.param_dtype``.

    Raises:
      ValueError: a missing tensor, a tensor whose shape differs from what ``cfg`` implies (message names
        the HF key, the expected and the actual shape), or unexpected tensors (a different architecture).
    """
    _check_encoder_cfg(cfg)
    named = _strip_prefix(tensors, cfg.family)
    shapes = _hf_shapes(cfg)
    emb, layer, head = _hf_names(cfg)
    dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    used: set[str] = set()

    def get(name: str, role: str) -> np.ndarray:
        if name not in named:
            raise ValueError(f"checkpoint is missing tensor {name!r} (model.family={cfg.family}, "
                             f"num_labels={cfg.num_labels}); is it the right architecture?")
        key, value = named[name]
        arr = np.asarray(value)
        if tuple(arr.shape) != shapes[role]:
            raise ValueError(f"tensor {key!r}: expected shape {shapes[role]} from the config, got {tuple(arr.shape)}")
        used.add(name)
        return arr

    out: dict[str, Any] = {}
    for role, name in emb.items():
        out[role] = get(name, role).astype(dtype)
    out["layers"] = {
        role: np.stack([_from_torch_layout(role, get(name.format(i=i), role), cfg)
                        for i in range(cfg.num_layers)]).astype(dtype)
        for role, name in layer.items()}
    if cfg.num_labels:
        out["head"] = {role: _from_torch_layout(role, get(name, role), cfg).astype(dtype)
                       for role, name in head.items()}
    head_names = set(head.values()) | {"pooler.dense.weight", "pooler.dense.bias"}
    unexpected = [named[n][0] for n in named if n not in used and n not in head_names
                  and not n.startswith(_IGNORED_PREFIXES) and not n.endswith(_IGNORED_SUFFIXES)]
    if unexpected:
        raise ValueError(f"checkpoint has tensors that a {cfg.family} encoder with {cfg.num_layers} layers does "
                         f"not use: {sorted(unexpected)[:8]}{' ...' if len(unexpected) > 8 else ''}")
    return out


def params_to_hf(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Convert a pure param dict (``nnx.to_pure_dict(nnx.state(model))``) to ``transformers`` tensors.

    Names follow ``<Family>ForSequenceClassification`` (encoder under the family prefix) when
    ``cfg.num_labels > 0`` and ``<Family>Model`` (no prefix) otherwise. Arrays are float32 numpy, contiguous.

    Raises:
      ValueError: a missing entry or a shape that differs from ``cfg``.
    """
    _check_encoder_cfg(cfg)
    emb, layer, head = _hf_names(cfg)
    shapes = _hf_shapes(cfg)
    prefix = _PREFIX[cfg.family] + "." if cfg.num_labels else ""
    out: dict[str, np.ndarray] = {}

    def put(key: str, role: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(np.asarray(arr, dtype=np.float32))
        if tuple(arr.shape) != shapes[role]:
            raise ValueError(f"params entry {role!r} gives {key!r} shape {tuple(arr.shape)}, expected {shapes[role]}")
        out[key] = arr

    def entry(tree: Mapping[str, Any], *path: str) -> np.ndarray:
        node: Any = tree
        for p in path:
            if not isinstance(node, Mapping) or p not in node:
                raise ValueError(f"params is missing {'/'.join(path)!r} for model.family={cfg.family}")
            node = node[p]
        return np.asarray(jax.device_get(node))

    for role, name in emb.items():
        put(prefix + name, role, entry(params, role))
    for role, name in layer.items():
        stacked = entry(params, "layers", role)
        if stacked.shape[0] != cfg.num_layers:
            raise ValueError(f"params layers/{role} has {stacked.shape[0]} layers, model.num_layers={cfg.num_layers}")
        for i in range(cfg.num_layers):
            put(prefix + name.format(i=i), role, _to_torch_layout(role, stacked[i], cfg))
    if cfg.num_labels:
        for role, name in head.items():
            key = (prefix + name) if cfg.family == "bert" and role.startswith("dense") else name
            put(key, role, _to_torch_layout(role, entry(params, "head", role), cfg))
    return out


def config_with_head(cfg: ModelConfig, hf_config: Mapping[str, Any], tensors: Mapping[str, Any]) -> ModelConfig:
    """``cfg`` with the classification head the weights hold when ``config.json`` configured none.

    A checkpoint whose ``architectures`` lists no ``*ForSequenceClassification`` class but whose tensors
    hold a classifier keeps the head: ``num_labels`` from its weight's shape, ``labels`` from
    ``id2label`` when that names exactly those classes. Otherwise ``cfg`` comes back unchanged.
    """
    if cfg.num_labels:
        return cfg
    name = "classifier.out_proj.weight" if cfg.family == "roberta" else "classifier.weight"
    w = {k: v for k, (_, v) in _strip_prefix(tensors, cfg.family).items()}.get(name)
    n = 0 if w is None else int(np.shape(w)[0])
    if not n:
        return cfg
    id2label = {int(k): str(v) for k, v in (hf_config.get("id2label") or {}).items()}
    labels = tuple(id2label[i] for i in range(n)) if set(id2label) == set(range(n)) else ()
    return cfg.replace(num_labels=n, labels=labels)
