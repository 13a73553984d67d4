"""Reward models: pairwise Bradley–Terry, K-way rankings and classifiers, as one pure step.

``reward_step(state, batch, *, graphdef, tx, cfg, grad_accum_steps) -> (state, metrics)`` is pure; jit it
once with :func:`jaxrlhf.train_state.jit_step`. ``state.params`` holds the trainable parameters of a
:class:`~jaxrlhf.models.reward_model.RewardModel` and ``state.extra`` its (non-trained) normalisation
statistics. The objective (``cfg.objective``) picks one of :data:`OBJECTIVES`:

* ``pairwise`` -- batch ``[B, 2, T]`` (0 = chosen, 1 = rejected): ONE backbone pass over the local
  reshape ``[B*2, T]`` (an example's two rows stay on its device), rewards ``[B, 2]``, then
  :func:`jaxrlhf.losses.bradley_terry_loss` (Ouyang et al. 2022 eq. 1; optional margin, Llama 2 eq. 2;
  optional centring). Loss = mean over pairs.
* ``ranking`` -- batch ``[B, N, T]`` + ``ranks [B, N]``: one pass gives rewards ``[B, N]``, then
  :func:`jaxrlhf.losses.ranking_loss` over all ordered pairs of each prompt (InstructGPT's K-wise loss);
  loss = mean over prompts that have a pair.
* ``classification`` -- batch ``[B, T]`` + ``labels [B]``: logits ``[B, C]`` and
  :func:`jaxrlhf.losses.classification_loss`.

Each objective returns ``(loss_sum, (normaliser, metrics))`` with the loss summed over its units (pairs,
prompts, examples), so gradient accumulation is exact. Metrics: ``loss``, ``rewards/accuracy``
(``accuracy`` for classifiers), ``rewards/margin``, ``rewards/mean``, ``rewards/std``, ``grad_norm``.

After training the driver runs a normalisation pass (:func:`normalization_stats`) over training
examples and stores ``(mean, std)`` in ``state.extra`` and in the exported model folder, so
``RewardModel.score`` returns rewards with mean 0 and std 1 on that reference set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrlhf.config import RewardConfig
from jaxrlhf.losses import bradley_terry_loss, classification_loss, ranking_loss
from jaxrlhf.models.lora import merge_model
from jaxrlhf.models.reward_model import RewardModel
from jaxrlhf.train_state import TrainState, gradient_step

__all__ = [
    "OBJECTIVES", "pairwise_objective", "ranking_objective", "classification_objective", "reward_loss",
    "reward_step", "reward_outputs", "eval_metrics", "normalization_stats",
]


def _masked_mean_std(x: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    w = valid.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    mean = jnp.sum(jnp.where(valid, x, 0.0)) / n
    var = jnp.sum(jnp.where(valid, jnp.square(x - mean), 0.0)) / n
    return mean, jnp.sqrt(var)


def _forward(model: RewardModel, batch: dict) -> jax.Array:
    """Head outputs for a batch of any leading shape (``[B]``, ``[B, 2]``, ``[B, N]``; ``+[C]`` for classifiers)."""
    return model(batch["tokens"], batch["positions"], batch["segment_ids"])


def pairwise_objective(model: RewardModel, batch: dict, cfg: RewardConfig):
    """Bradley–Terry on preference pairs ``[B, 2, T]``; ``(loss_sum, (num_pairs, metrics))``.

    The margin is ``cfg.margin`` plus the batch's per-example ``margin`` float ``[B]`` when the data
    carries one.
    """
    rewards_B2 = _forward(model, batch)
    margin_B = None
    if cfg.margin or "margin" in batch:
        margin_B = jnp.full(rewards_B2.shape[:1], cfg.margin, jnp.float32)
        if "margin" in batch:
            margin_B = margin_B + batch["margin"].astype(jnp.float32)
    loss, metrics = bradley_terry_loss(rewards_B2[:, 0], rewards_B2[:, 1], margin_B,
                                       cfg.center_rewards_coef or None)
    n = jnp.asarray(rewards_B2.shape[0], jnp.float32)
    return loss * n, (n, metrics)


def ranking_objective(model: RewardModel, batch: dict, cfg: RewardConfig):
    """K-way ranking loss on ``[B, N, T]`` + ``ranks [B, N]``; ``(loss_sum, (prompts_with_pairs, metrics))``."""
    rewards_BN = _forward(model, batch)
    ranks = batch["ranks"]
    loss, metrics = ranking_loss(rewards_BN, ranks)
    present = ranks >= 0
    has_pair = jnp.sum((ranks[:, :, None] < ranks[:, None, :]) & present[:, :, None] & present[:, None, :],
                       axis=(1, 2)) > 0
    n = jnp.sum(has_pair.astype(jnp.float32))
    mean, std = _masked_mean_std(jax.lax.stop_gradient(rewards_BN), present)
    metrics = dict(metrics, **{"rewards/mean": mean, "rewards/std": std})
    return loss * n, (n, metrics)


def classification_objective(model: RewardModel, batch: dict, cfg: RewardConfig):
    """Cross-entropy on ``[B, T]`` + ``labels [B]``; ``(loss_sum, (B, metrics))``. The reward statistics are
    those of the classifier's reward (log-odds of ``score_label``)."""
    logits_BC = _forward(model, batch)
    loss, metrics = classification_loss(logits_BC, batch["labels"], cfg.label_smoothing)
    r = jax.lax.stop_gradient(model.reward_from_outputs(logits_BC))
    n = jnp.asarray(logits_BC.shape[0], jnp.float32)
    metrics = dict(metrics, **{"rewards/mean": jnp.mean(r), "rewards/std": jnp.std(r)})
    return loss * n, (n, metrics)


# cfg.objective -> objective; each (model, batch, cfg) -> (loss_sum, (normaliser, metrics)).
OBJECTIVES: dict[str, Callable] = {
    "pairwise": pairwise_objective,
    "ranking": ranking_objective,
    "classification": classification_objective,
}


def reward_loss(params, batch: dict, *, graphdef: nnx.GraphDef, stats: Any, cfg: RewardConfig):
    """``(loss_sum, (normaliser, metrics))`` for :func:`gradient_step` (the objective of ``cfg``)."""
    model = merge_model(graphdef, params, stats)
    return OBJECTIVES[cfg.objective](model, batch, cfg)


def reward_step(state: TrainState, batch: dict, *, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                cfg: RewardConfig, grad_accum_steps: int = 1) -> tuple[TrainState, dict]:
    """One reward-model optimizer step (pure; jit it once with :func:`jaxrlhf.train_state.jit_step`).

    Training batches must not contain all-padding rows (the driver's iterator drops the last short batch).

    Args:
      state: ``params`` = the trainable ``nnx.State`` of a ``RewardModel``; ``extra`` = its normalisation
        statistics (carried, not trained).
      batch: by ``cfg.objective``: ``pairwise`` LM keys ``[B, 2, T]`` (0 = chosen; optional ``margin``
        float32 ``[B]``); ``ranking`` LM keys ``[B, N, T]`` + ``ranks`` int32 ``[B, N]``; ``classification``
        LM keys ``[B, T]`` + ``labels`` int32 ``[B]``. ``B`` divisible by ``grad_accum_steps``.
      graphdef: the reward model's ``nnx.GraphDef`` (static), or a LoRA
        :class:`~jaxrlhf.models.lora.BoundGraph` (``state.params``: adapters + head).
      tx: the optimizer.
      cfg: :class:`~jaxrlhf.config.RewardConfig`.
      grad_accum_steps: micro-batches per step.

    Returns:
      ``(state, metrics)``: float32 scalars ``loss``, ``rewards/accuracy`` (``accuracy`` for classifiers),
      ``rewards/margin``, ``rewards/mean``, ``rewards/std``, ``grad_norm``.
    """

    def loss_fn(params, mb):
        return reward_loss(params, mb, graphdef=graphdef, stats=state.extra, cfg=cfg)

    return gradient_step(state, batch, loss_fn=loss_fn, tx=tx, grad_accum_steps=grad_accum_steps)


def reward_outputs(params, stats, batch: dict, *, graphdef: nnx.GraphDef) -> dict:
    """Eval forward pass: ``{"rewards": raw rewards [...]}`` plus ``"logits" [B, C]`` for classifiers."""
    model = nnx.merge(graphdef, params, stats)
    out = _forward(model, batch)
    result = {"rewards": model.reward_from_outputs(out)}
    if model.num_outputs > 1:
        result["logits"] = out
    return result


def eval_metrics(objective: str, outputs: dict, batch: dict) -> dict:
    """Host-side (numpy) held-out metrics over the real rows of concatenated eval batches.

    pairwise: ``accuracy`` (fraction ``r_c > r_r``), ``margin`` (mean ``r_c - r_r``), ``loss`` (BT),
    ``reward_mean``/``reward_std``, ``pairs``. ranking: pairwise ``accuracy``/``margin`` over every ordered
    pair of every prompt (pair-weighted), ``prompts``. classification: ``accuracy``, ``loss``, ``examples``.
    """
    r = np.asarray(outputs["rewards"], np.float64)
    if objective == "pairwise":
        valid = np.asarray(batch["segment_ids"])[:, 0].any(-1) & np.asarray(batch["segment_ids"])[:, 1].any(-1)
        d = r[valid, 0] - r[valid, 1]
        both = r[valid].reshape(-1)
        return {"accuracy": float(np.mean(d > 0)), "margin": float(np.mean(d)),
                "loss": float(np.mean(np.logaddexp(0.0, -d))), "reward_mean": float(both.mean()),
                "reward_std": float(both.std()), "pairs": int(valid.sum())}
    if objective == "ranking":
        ranks = np.asarray(batch["ranks"])
        pres = ranks >= 0
        pair = (ranks[:, :, None] < ranks[:, None, :]) & pres[:, :, None] & pres[:, None, :]
        d = (r[:, :, None] - r[:, None, :])[pair]
        return {"accuracy": float(np.mean(d > 0)) if d.size else float("nan"),
                "margin": float(np.mean(d)) if d.size else float("nan"),
                "reward_mean": float(r[pres].mean()), "reward_std": float(r[pres].std()),
                "prompts": int(pair.any(axis=(1, 2)).sum())}
    labels = np.asarray(batch["labels"])
    valid = labels >= 0
    logits = np.asarray(outputs["logits"], np.float64)[valid]
    y = labels[valid]
    logz = np.logaddexp.reduce(logits, axis=-1)
    return {"accuracy": float(np.mean(np.argmax(logits, -1) == y)),
            "loss": float(np.mean(logz - logits[np.arange(len(y)), y])),
            "reward_mean": float(r[valid].mean()), "reward_std": float(r[valid].std()), "examples": int(valid.sum())}


def real_rewards(objective: str, outputs: dict, batch: dict) -> np.ndarray:
    """Rewards of the real (non-padding) sequences of a batch, flattened (for the normalisation pass)."""
    r = np.asarray(outputs["rewards"], np.float64)
    if objective == "ranking":
        return r[np.asarray(batch["ranks"]) >= 0]
    if objective == "classification":
        return r[np.asarray(batch["labels"]) >= 0]
    return r[np.asarray(batch["segment_ids"]).any(-1)]


def normalization_stats(rewards: np.ndarray) -> tuple[float, float]:
    """``(mean, std)`` of reference-set rewards (float64 on the host); std floored at 1e-6.

    Raises:
      ValueError: no rewards, or a non-finite one.
    """
    rewards = np.asarray(rewards, np.float64).reshape(-1)
    if rewards.size == 0 or not np.all(np.isfinite(rewards)):
        raise ValueError(f"normalisation pass got {rewards.size} rewards, some non-finite; cannot normalise")
    return float(rewards.mean()), float(max(rewards.std(), 1e-6))
