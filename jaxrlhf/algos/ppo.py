"""PPO for language models with a frozen reference and a KL penalty in the reward.

Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences") and Ouyang et al. 2022
(InstructGPT), with Schulman et al. 2017's clipped objective and GAE (Schulman et al. 2016).

Rollout (:func:`ppo_experience`, one jit after sampling and scoring; see :mod:`jaxrlhf.algos.rollout`):

1. log-probs of the sampled tokens under the policy (``old_logps``) and the frozen reference, one forward
   pass each over prompt + completion, at the sampling temperature;
2. values ``V_t`` from the critic (see *critic* below);
3. per-token rewards ``r_t = -β·KL_t`` on every completion token (estimator k1/k2/k3), plus the shaped
   score on the last completion token (:func:`~jaxrlhf.algos.rollout.per_token_rewards`);
4. optional reward whitening, then ``GAE(γ, λ)`` advantages and returns ``A_t + V_t``; optional advantage
   whitening over the rollout's completion tokens.

Update (:func:`ppo_update`, one jit; settings in ``cfg.update``, :class:`~jaxrlhf.config.UpdateConfig`):
``epochs`` × ``num_minibatches`` minibatch steps in a nested ``lax.scan``; loss = clipped policy loss
(asymmetric ε and dual-clip optional) + ``vf_coef`` · clipped value loss − ``entropy_coef`` · entropy,
aggregated per token (default: every completion token weighs the same) or per sequence (token mean within
a completion, then mean over completions). Then the KL controller (fixed, or Ziegler's adaptive rule)
updates ``β`` in ``TrainState.extra["kl"]``; ``state.step`` counts iterations (the optimizer's own count
drives the learning-rate schedule).

Critic: ``separate`` (default) is a second copy of the policy's decoder with a scalar head, initialised
from the policy; the value loss cannot disturb the policy's representation (InstructGPT / TRL's setup),
at the price of twice the parameters and an extra forward/backward per minibatch. ``shared`` puts the
head on the policy's own final hidden state (one forward/backward; the value loss, scaled by
``vf_coef``, also trains the trunk). The head starts at zero (V = 0 everywhere) so early value errors are
the returns themselves, not a random offset.

Parameters (``TrainState.params``): ``{"policy", "value_head"}`` plus ``"critic"`` (separate).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxrlhf.algos.rollout import (LM_KEYS, RLAlgorithm, advantage_metrics, aggregate_normaliser, copy_tree,
                                   explained_variance, kl_controller_update, minibatch_epochs, per_token_rewards,
                                   rollout_metrics, sequence_kl, shape_scores, shift_values, token_entropy,
                                   token_logps)
from jaxrlhf.config import PPOConfig
from jaxrlhf.losses import ppo_policy_loss, ppo_value_loss
from jaxrlhf.models.heads import ScalarHead
from jaxrlhf.models.lora import merge_model
from jaxrlhf.ops import gae, kl_penalty, masked_aggregate, masked_mean, masked_whiten
from jaxrlhf.train_state import TrainState

__all__ = ["PPOGraphs", "copy_tree", "ppo_init_params", "policy_and_values", "ppo_experience", "ppo_loss", "ppo_update",
           "PPO"]


class PPOGraphs(NamedTuple):
    """Static graph definitions: the policy decoder (also the separate critic's) and the value head."""

    policy: nnx.GraphDef
    value_head: nnx.GraphDef


def ppo_init_params(policy_params, graphdef: nnx.GraphDef, model_cfg, cfg: PPOConfig, key) -> tuple[dict, PPOGraphs]:
    """PPO's trainable parameters (the ``init_params`` of :data:`PPO`).

    Args:
      policy_params: the policy decoder's ``nnx.State`` (used as is; pass a copy if you keep the original).
      graphdef: the policy's ``nnx.GraphDef``.
      model_cfg: its :class:`~jaxrlhf.models.config.ModelConfig` (``hidden_size`` sizes the value head).
      cfg: :class:`~jaxrlhf.config.PPOConfig` (``critic``: ``separate`` or ``shared``).
      key: PRNG key of the value head's initialiser.

    Returns:
      ``(params, graphs)``: ``{"policy", "value_head"[, "critic"]}`` (the head zero, the separate critic a
      copy of the policy) and :class:`PPOGraphs`.
    """
    head = ScalarHead(model_cfg.hidden_size, rngs=nnx.Rngs(params=key))
    head_gd, head_params = nnx.split(head)
    params = {"policy": policy_params, "value_head": jax.tree.map(jnp.zeros_like, head_params)}
    if cfg.critic == "separate":
        params["critic"] = copy_tree(policy_params)
    return params, PPOGraphs(graphdef, head_gd)


def policy_and_values(params: dict, lm: dict, *, graphs: PPOGraphs, critic: str, temperature: float):
    """``(logps_BS, values_BS, logits_BSV)`` of an LM batch (values aligned with tokens, 0 off the
    completion; see :mod:`jaxrlhf.algos.rollout` for the alignment)."""
    logps, out = token_logps(graphs.policy, params["policy"], lm, temperature)
    if critic == "shared":
        hidden = out.hidden_BTD
    else:
        hidden = merge_model(graphs.policy, params["critic"])(lm["tokens"], lm["positions"], lm["segment_ids"]).hidden_BTD
    head = nnx.merge(graphs.value_head, params["value_head"])
    values = shift_values(head(hidden))
    return logps, jnp.where(lm["completion_mask"] > 0, values, 0.0), out.logits_BTV


def ppo_experience(state: TrainState, ref_params, lm: dict, truncated_B, scores_B, *, graphs: PPOGraphs,
                   cfg: PPOConfig) -> tuple[dict, dict]:
    """Everything the update needs from one rollout (pure; jit it).

    Args:
      state: the train state (params and ``extra["kl"].coef``).
      ref_params: frozen reference policy params.
      lm: LM batch ``[B, S]`` of prompt + completion (``SampleOutput.lm_batch()``).
      truncated_B: bool, completions without EOS.
      scores_B: float32 raw scores of the reward.

    Returns:
      ``(exp, metrics)``; ``exp`` holds the LM keys plus float32 ``[B, S]`` ``old_logps``, ``ref_logps``,
      ``old_values``, ``kl`` (the penalty estimator), ``rewards``, ``advantages`` (whitened when asked),
      ``returns``, and ``scores`` ``[B]`` (shaped).
    """
    T = cfg.rollout.temperature
    mask = lm["completion_mask"]
    logps, values, _ = policy_and_values(state.params, lm, graphs=graphs, critic=cfg.critic, temperature=T)
    ref_logps, _ = token_logps(graphs.policy, ref_params, lm, T)
    coef = state.extra["kl"].coef
    kl = jnp.where(mask > 0, kl_penalty(logps, ref_logps, cfg.kl.estimator), 0.0)
    shaped = shape_scores(scores_B, truncated_B, cfg.rollout)
    rewards, non_score = per_token_rewards(shaped, kl, mask, coef)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    metrics = {**rollout_metrics(scores_B, shaped, logps, ref_logps, non_score, mask, truncated_B, coef),
               **advantage_metrics(adv, mask),
               "value/explained_variance": explained_variance(values, returns, mask),
               "value/rollout_mean": masked_mean(values, mask), "returns/mean": masked_mean(returns, mask)}
    if cfg.update.whiten_advantages:
        adv = masked_whiten(adv, mask)
    exp = {**lm, "old_logps": logps, "ref_logps": ref_logps, "old_values": values, "kl": kl, "rewards": rewards,
           "advantages": adv, "returns": returns, "scores": shaped}
    return jax.lax.stop_gradient(exp), metrics


def ppo_loss(params, mb: dict, *, graphs: PPOGraphs, cfg: PPOConfig):
    """``(loss · n, (n, metrics))`` for :func:`jaxrlhf.train_state.gradient_step` (``n`` = completion tokens
    or completions, by ``cfg.update.aggregation``): clipped policy loss + ``vf_coef`` · value loss −
    ``update.entropy_coef`` · entropy."""
    T = cfg.rollout.temperature
    mask = mb["completion_mask"]
    logps, values, logits = policy_and_values(params, mb, graphs=graphs, critic=cfg.critic, temperature=T)
    u = cfg.update
    pg, pg_m = ppo_policy_loss(logps, mb["old_logps"], mb["advantages"], mask, clip_eps=u.clip_eps,
                               clip_eps_high=u.clip_eps_high, dual_clip=cfg.dual_clip, aggregation=u.aggregation)
    vf, vf_m = ppo_value_loss(values, mb["old_values"], mb["returns"], mask, clip_eps=cfg.value_clip_eps,
                              aggregation=u.aggregation)
    ent_BS = token_entropy(logits if u.entropy_coef else jax.lax.stop_gradient(logits), T)
    ent = masked_aggregate(ent_BS, mask, u.aggregation)
    loss = pg + cfg.vf_coef * vf - u.entropy_coef * ent
    n = aggregate_normaliser(mask, u.aggregation)
    metrics = {k: v for k, v in {**pg_m, **vf_m}.items() if k != "loss"}
    metrics["policy/entropy"] = jax.lax.stop_gradient(ent)
    return loss * n, (n, metrics)


UPDATE_KEYS = (*LM_KEYS, "old_logps", "old_values", "advantages", "returns")


def ppo_update(state: TrainState, exp: dict, key, *, graphs: PPOGraphs, tx: optax.GradientTransformation,
               cfg: PPOConfig, grad_accum_steps: int = 1) -> tuple[TrainState, dict]:
    """``cfg.update.epochs`` × ``cfg.update.num_minibatches`` optimizer steps on one rollout, then the KL
    controller (pure; jit it and donate the state).

    Args:
      state: :class:`TrainState` with the params of :func:`ppo_init_params` and ``extra = init_extra(coef)``.
      exp: the rollout of :func:`ppo_experience` (``[B, S]`` arrays; ``B`` divisible by
        ``num_minibatches * grad_accum_steps``).
      key: PRNG key of the minibatch permutations.
      graphs: :class:`PPOGraphs` (static).
      tx: the optimizer.
      cfg: :class:`~jaxrlhf.config.PPOConfig`.
      grad_accum_steps: micro-batches per minibatch.

    Returns:
      ``(state, metrics)``: ``state.step`` advanced by one (an iteration), ``extra["kl"]`` updated; float32
      scalar metrics averaged over the minibatches (``loss``, ``grad_norm``, policy and value statistics).
    """
    step0 = state.step
    data = {k: exp[k] for k in UPDATE_KEYS}
    loss_fn = functools.partial(ppo_loss, graphs=graphs, cfg=cfg)
    state, metrics = minibatch_epochs(state, data, key, loss_fn=loss_fn, tx=tx, epochs=cfg.update.epochs,
                                      num_minibatches=cfg.update.num_minibatches, grad_accum_steps=grad_accum_steps)
    seq_kl = sequence_kl(exp["old_logps"], exp["ref_logps"], exp["completion_mask"])
    extra = kl_controller_update(state.extra, seq_kl, cfg.kl)
    return state.replace(step=step0 + 1, extra=extra), metrics


PPO = RLAlgorithm(init_params=ppo_init_params, experience=ppo_experience, update=ppo_update,
                  initial_coef=lambda cfg: cfg.kl.coef)
