"""Supervised fine-tuning: prompt-masked next-token cross-entropy.

``sft_step(state, batch, *, graphdef, tx, cfg, grad_accum_steps) -> (state, metrics)`` is pure; jit it
once with :func:`jaxrlhf.train_state.jit_step`. The loss is the token-weighted mean over completion
tokens of the whole (accumulated) batch: ``sum_t m_t * nll_t / sum_t m_t``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxrlhf.config import SFTConfig
from jaxrlhf.models.lora import merge_model
from jaxrlhf.ops import next_token_logprobs
from jaxrlhf.train_state import TrainState, gradient_step

__all__ = ["sft_token_losses", "sft_loss", "sft_step", "sft_eval"]


def sft_token_losses(logits_BTV: jax.Array, tokens_BT: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-token negative log-likelihood ``[B, T]`` aligned with ``tokens`` (position 0 is 0).

    With ``label_smoothing = ε`` the target is ``(1-ε)·onehot + ε·uniform`` (Szegedy et al. 2016 §7):
    ``(1-ε)·nll + ε·(logsumexp(z) − mean_v z_v)``.
    """
    nll = -next_token_logprobs(logits_BTV, tokens_BT)
    if label_smoothing == 0.0:
        return nll
    z = logits_BTV[..., :-1, :].astype(jnp.float32)
    uniform = jax.nn.logsumexp(z, axis=-1) - jnp.mean(z, axis=-1)
    uniform = jnp.pad(uniform, [(0, 0)] * (uniform.ndim - 1) + [(1, 0)])
    return (1.0 - label_smoothing) * nll + label_smoothing * uniform


def sft_loss(params, batch: dict, *, graphdef: nnx.GraphDef, cfg: SFTConfig):
    """``(loss_sum, (num_completion_tokens, metrics))`` for :func:`gradient_step`.

    Args:
      batch: ``tokens``/``positions``/``segment_ids`` int32 ``[B, T]``, ``completion_mask`` f32 ``[B, T]``.
    """
    model = merge_model(graphdef, params)
    out = model(batch["tokens"], batch["positions"], batch["segment_ids"])
    losses_BT = sft_token_losses(out.logits_BTV, batch["tokens"], cfg.label_smoothing)
    mask_BT = batch["completion_mask"].astype(jnp.float32)
    loss_sum = jnp.sum(losses_BT * mask_BT)
    num_tokens = jnp.sum(mask_BT)
    return loss_sum, (num_tokens, {"tokens": num_tokens})


def sft_step(state: TrainState, batch: dict, *, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
             cfg: SFTConfig, grad_accum_steps: int = 1) -> tuple[TrainState, dict]:
    """One SFT optimizer step (pure; jit it once with :func:`jaxrlhf.train_state.jit_step`).

    Args:
      state: the policy's :class:`TrainState` (``params`` = the model's ``nnx.State``).
      batch: LM batch: ``tokens``/``positions``/``segment_ids`` int32 ``[B, T]``, ``completion_mask`` float32
        ``[B, T]``; ``B`` divisible by ``grad_accum_steps``.
      graphdef: the model's ``nnx.GraphDef`` (static), or a LoRA :class:`~jaxrlhf.models.lora.BoundGraph`
        (``state.params`` are then the adapters).
      tx: the optimizer (:func:`jaxrlhf.train_state.make_optimizer`).
      cfg: :class:`~jaxrlhf.config.SFTConfig` (``label_smoothing``).
      grad_accum_steps: micro-batches per step (exact accumulation).

    Returns:
      ``(state, metrics)``: ``step`` + 1; float32 scalar metrics ``loss`` (mean nll in nats per completion
      token of the whole batch), ``grad_norm`` and ``tokens`` (completion tokens per micro-batch, averaged).
    """

    def loss_fn(params, mb):
        return sft_loss(params, mb, graphdef=graphdef, cfg=cfg)

    return gradient_step(state, batch, loss_fn=loss_fn, tx=tx, grad_accum_steps=grad_accum_steps)


def sft_eval(params, batch: dict, *, graphdef: nnx.GraphDef) -> dict:
    """Token-summed eval loss of an LM batch (pure; jit it).

    Args:
      params: the model's ``nnx.State``.
      batch: LM batch as for :func:`sft_step` (``[B, T]``).
      graphdef: the model's ``nnx.GraphDef`` (static).

    Returns:
      ``{"nll_sum", "tokens"}`` float32 scalars (nats summed over completion tokens, their count), so callers
      can aggregate exactly over batches.
    """
    loss_sum, (num_tokens, _) = sft_loss(params, batch, graphdef=graphdef, cfg=SFTConfig())
    return {"nll_sum": loss_sum, "tokens": num_tokens}
