"""Critic-free RL from feedback on groups of G completions per prompt: GRPO and RLOO.

Both sample G completions of every prompt (rows ``b*G + g``), score them, and give every token of
completion ``i`` one sequence-level advantage ``A_i`` computed within its group; the policy is optimised
with the clipped ratio objective (:func:`jaxrlhf.losses.ppo_policy_loss`; with one epoch and one minibatch
the ratio is 1 and this is REINFORCE with a baseline). They differ in where the KL to the reference goes:

* **GRPO** (Shao et al. 2024, DeepSeekMath §4.1.2, eq. 3): ``A_i = (r_i - mean_g r) / (std_g r + eps)``
  of the (shaped) scores (``scale_rewards=False``: centred only); the KL is a *loss term*
  ``β · k3(π, π_ref)`` per token (Schulman 2020's k3, differentiated through ``log π``).
* **RLOO** (Kool et al. 2019; Ahmadian et al. 2024 eq. 6): the sequence reward is
  ``R_i = score_i - β Σ_t KL_t`` (KL *in the reward*, estimator k1/k2/k3, fixed or adaptive β as in PPO)
  and ``A_i = R_i - mean_{j≠i} R_j`` (leave-one-out baseline).

β lives in ``TrainState.extra["kl"].coef`` for both. Parameters: ``{"policy"}`` only.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxrlhf.algos.rollout import (LM_KEYS, RLAlgorithm, advantage_metrics, aggregate_normaliser,
                                   kl_controller_update, minibatch_epochs, rollout_metrics, sequence_kl,
                                   shape_scores, token_entropy, token_logps)
from jaxrlhf.config import GRPOConfig, RLOOConfig
from jaxrlhf.losses import ppo_policy_loss
from jaxrlhf.ops import grpo_advantages, kl_k3, kl_penalty, masked_aggregate, masked_whiten, rloo_advantages
from jaxrlhf.train_state import TrainState

__all__ = ["PolicyGraphs", "policy_init_params", "critic_free_experience", "grpo_experience", "rloo_experience", "critic_free_loss",
           "grpo_update", "rloo_update", "GRPO", "RLOO"]


class PolicyGraphs(NamedTuple):
    """Static graph definitions of GRPO / RLOO: only the policy decoder's ``nnx.GraphDef``."""

    policy: nnx.GraphDef


def policy_init_params(policy_params, graphdef, model_cfg, cfg, key):
    """GRPO's and RLOO's trainable parameters: nothing but the policy is trained.

    Args:
      policy_params: the policy decoder's ``nnx.State``.
      graphdef: its ``nnx.GraphDef``.
      model_cfg, cfg, key: unused (the :class:`~jaxrlhf.algos.rollout.RLAlgorithm` signature).

    Returns:
      ``({"policy": policy_params}, PolicyGraphs(graphdef))``.
    """
    del model_cfg, cfg, key
    return {"policy": policy_params}, PolicyGraphs(graphdef)


def _grpo_sequence_advantages(shaped_B, logps, ref_logps, mask, coef, cfg: GRPOConfig):
    """GRPO: group-normalised scores; no KL in the reward (it is a loss term)."""
    del ref_logps, coef
    adv_B = grpo_advantages(shaped_B.reshape(-1, cfg.rollout.num_completions), scale=cfg.scale_rewards)
    return adv_B.reshape(-1), jnp.zeros_like(logps)


def _rloo_sequence_advantages(shaped_B, logps, ref_logps, mask, coef, cfg: RLOOConfig):
    """RLOO: ``R_i = score_i - β Σ_t KL_t``, leave-one-out baseline."""
    non_score = jnp.where(mask > 0, -coef * kl_penalty(logps, ref_logps, cfg.kl.estimator), 0.0)
    seq_reward = shaped_B + jnp.sum(non_score, axis=-1)
    return rloo_advantages(seq_reward.reshape(-1, cfg.rollout.num_completions)).reshape(-1), non_score


def critic_free_experience(state: TrainState, ref_params, lm: dict, truncated_B, scores_B, *,
                           graphs: PolicyGraphs, cfg, sequence_advantages):
    """Rollout statistics of a critic-free method with a pluggable advantage estimator (pure; jit it).

    :func:`grpo_experience` and :func:`rloo_experience` are this function with the GRPO and RLOO
    estimators; pass your own to try another baseline without touching the library.

    Args:
      state, ref_params, lm, truncated_B, scores_B, graphs: as :func:`grpo_experience`.
      cfg: a :class:`~jaxrlhf.config.GRPOConfig` or :class:`~jaxrlhf.config.RLOOConfig` (static).
      sequence_advantages: ``f(shaped_B, logps_BS, ref_logps_BS, mask_BS, kl_coef, cfg) -> (adv_B,
        non_score_BS)``: ``shaped_B`` float32 ``[B]`` are the shaped scores, rows prompt-major (``B`` =
        prompts × G, reshape to ``[-1, cfg.rollout.num_completions]`` for the groups); ``logps_BS`` /
        ``ref_logps_BS`` the policy / reference token log-probs at the rollout temperature; ``kl_coef`` a
        float32 scalar; it returns one advantage per row ``[B]`` (spread over the row's completion
        tokens) and the per-token non-score reward ``[B, S]`` that it folded in (zeros if none; only
        reported in the metrics).

    Returns:
      ``(exp, metrics)`` as :func:`grpo_experience` (advantages whitened when
      ``cfg.update.whiten_advantages``).
    """
    T = cfg.rollout.temperature
    G = cfg.rollout.num_completions
    mask = lm["completion_mask"]
    logps, _ = token_logps(graphs.policy, state.params["policy"], lm, T)
    ref_logps, _ = token_logps(graphs.policy, ref_params, lm, T)
    coef = state.extra["kl"].coef
    shaped = shape_scores(scores_B, truncated_B, cfg.rollout)
    adv_B, non_score = sequence_advantages(shaped, logps, ref_logps, mask, coef, cfg)
    adv = jnp.where(mask > 0, adv_B[:, None], 0.0)
    metrics = {**rollout_metrics(scores_B, shaped, logps, ref_logps, non_score, mask, truncated_B, coef),
               **advantage_metrics(adv, mask),
               "score/group_std": jnp.mean(jnp.std(shaped.reshape(-1, G), axis=-1))}
    if cfg.update.whiten_advantages:
        adv = masked_whiten(adv, mask)
    exp = {**lm, "old_logps": logps, "ref_logps": ref_logps, "advantages": adv, "scores": shaped}
    return jax.lax.stop_gradient(exp), metrics


def grpo_experience(state, ref_params, lm, truncated_B, scores_B, *, graphs, cfg: GRPOConfig):
    """GRPO rollout statistics (pure; jit it): policy/reference log-probs and group-normalised advantages.

    Args:
      state: :class:`TrainState` (``params["policy"]``, ``extra["kl"].coef``).
      ref_params: frozen reference policy params.
      lm: LM batch ``[B, S]`` of prompt + completion, rows prompt-major (``B`` = prompts × G).
      truncated_B: bool ``[B]``, completions without EOS.
      scores_B: float32 ``[B]`` raw scores of the reward.
      graphs: :class:`PolicyGraphs` (static).
      cfg: :class:`~jaxrlhf.config.GRPOConfig`.

    Returns:
      ``(exp, metrics)``: ``exp`` holds the LM keys and float32 ``[B, S]`` ``old_logps``, ``ref_logps``,
      ``advantages`` (the row's ``A_i`` on its completion tokens), ``scores`` ``[B]`` (shaped).
    """
    return critic_free_experience(state, ref_params, lm, truncated_B, scores_B, graphs=graphs, cfg=cfg,
                       sequence_advantages=_grpo_sequence_advantages)


def rloo_experience(state, ref_params, lm, truncated_B, scores_B, *, graphs, cfg: RLOOConfig):
    """RLOO rollout statistics (pure; jit it): KL-penalised sequence rewards and leave-one-out advantages.

    Args: as :func:`grpo_experience`, with ``cfg`` a :class:`~jaxrlhf.config.RLOOConfig`.

    Returns:
      ``(exp, metrics)``: the LM keys and float32 ``[B, S]`` ``old_logps``, ``ref_logps``, ``advantages``,
      ``scores`` ``[B]`` (shaped).
    """
    return critic_free_experience(state, ref_params, lm, truncated_B, scores_B, graphs=graphs, cfg=cfg,
                       sequence_advantages=_rloo_sequence_advantages)


def critic_free_loss(params, mb: dict, *, graphs: PolicyGraphs, cfg, kl_coef):
    """``(loss · n, (n, metrics))``: clipped policy loss + ``kl_coef`` · k3 KL to the reference (GRPO; pass
    ``kl_coef=None`` for none) − ``update.entropy_coef`` · entropy, aggregated by ``cfg.update.aggregation``."""
    T = cfg.rollout.temperature
    mask = mb["completion_mask"]
    logps, out = token_logps(graphs.policy, params["policy"], mb, T)
    u = cfg.update
    loss, metrics = ppo_policy_loss(logps, mb["old_logps"], mb["advantages"], mask, clip_eps=u.clip_eps,
                                    clip_eps_high=u.clip_eps_high, aggregation=u.aggregation)
    metrics = {k: v for k, v in metrics.items() if k != "loss"}
    if kl_coef is not None:
        kl = masked_aggregate(jnp.where(mask > 0, kl_k3(logps, mb["ref_logps"]), 0.0), mask, u.aggregation)
        loss = loss + kl_coef * kl
        metrics["kl/loss_k3"] = jax.lax.stop_gradient(kl)
    logits = out.logits_BTV if u.entropy_coef else jax.lax.stop_gradient(out.logits_BTV)
    ent = masked_aggregate(token_entropy(logits, T), mask, u.aggregation)
    loss = loss - u.entropy_coef * ent
    metrics["policy/entropy"] = jax.lax.stop_gradient(ent)
    n = aggregate_normaliser(mask, u.aggregation)
    return loss * n, (n, metrics)


_UPDATE_KEYS = (*LM_KEYS, "old_logps", "ref_logps", "advantages")


def _update(state, exp, key, *, graphs, tx, cfg, grad_accum_steps, kl_coef, kl_cfg):
    step0 = state.step
    data = {k: exp[k] for k in _UPDATE_KEYS}
    loss_fn = functools.partial(critic_free_loss, graphs=graphs, cfg=cfg, kl_coef=kl_coef)
    state, metrics = minibatch_epochs(state, data, key, loss_fn=loss_fn, tx=tx, epochs=cfg.update.epochs,
                                      num_minibatches=cfg.update.num_minibatches, grad_accum_steps=grad_accum_steps)
    extra = state.extra
    if kl_cfg is not None:
        extra = kl_controller_update(extra, sequence_kl(exp["old_logps"], exp["ref_logps"], exp["completion_mask"]),
                                     kl_cfg)
    return state.replace(step=step0 + 1, extra=extra), metrics


def grpo_update(state: TrainState, exp: dict, key, *, graphs, tx: optax.GradientTransformation, cfg: GRPOConfig,
                grad_accum_steps: int = 1):
    """GRPO update (pure; jit it, donate the state): KL as a loss term with β = ``extra["kl"].coef``.

    Args:
      state: :class:`TrainState` with ``{"policy"}`` params and ``extra = init_extra(cfg.beta)``.
      exp: the rollout of :func:`grpo_experience` (``[B, S]``; ``B`` divisible by
        ``num_minibatches * grad_accum_steps``).
      key: PRNG key of the minibatch permutations.
      graphs: :class:`PolicyGraphs` (static).
      tx: the optimizer.
      cfg: :class:`~jaxrlhf.config.GRPOConfig`.
      grad_accum_steps: micro-batches per minibatch.

    Returns:
      ``(state, metrics)``: ``state.step`` advanced by one; float32 scalar metrics averaged over minibatches.
    """
    return _update(state, exp, key, graphs=graphs, tx=tx, cfg=cfg, grad_accum_steps=grad_accum_steps,
                   kl_coef=state.extra["kl"].coef, kl_cfg=None)


def rloo_update(state: TrainState, exp: dict, key, *, graphs, tx: optax.GradientTransformation, cfg: RLOOConfig,
                grad_accum_steps: int = 1):
    """RLOO update (pure; jit it, donate the state): no KL loss term (it is in the reward); then the KL
    controller.

    Args: as :func:`grpo_update`, with ``exp`` from :func:`rloo_experience` and ``cfg`` a
    :class:`~jaxrlhf.config.RLOOConfig`.

    Returns:
      ``(state, metrics)``: ``state.step`` advanced by one, ``extra["kl"]`` updated; float32 scalar metrics.
    """
    return _update(state, exp, key, graphs=graphs, tx=tx, cfg=cfg, grad_accum_steps=grad_accum_steps,
                   kl_coef=None, kl_cfg=cfg.kl)


GRPO = RLAlgorithm(init_params=policy_init_params, experience=grpo_experience, update=grpo_update,
                   initial_coef=lambda cfg: cfg.beta)
RLOO = RLAlgorithm(init_params=policy_init_params, experience=rloo_experience, update=rloo_update,
                   initial_coef=lambda cfg: cfg.kl.coef)
