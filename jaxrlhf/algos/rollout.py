"""What PPO, GRPO and RLOO share (pure code): sampling settings, log-probs, score shaping, per-token
rewards, the minibatch epochs of the update and the :class:`RLAlgorithm` record. The host side (the
iteration that composes them, evaluation, the driver) is :mod:`jaxrlhf.drivers.rl`.

One RL iteration (:func:`jaxrlhf.drivers.rl.rl_iteration`) is::

    sample  = generate(policy, prompts, key)                 # jit: KV-cache sampler (jaxrlhf.sampling)
    scores  = reward(Completions.from_sample(sample))        # device (jittable) or host (decoded text)
    exp     = experience(state, ref, sample, scores)         # jit: policy/ref log-probs, values, KL, advantages
    state   = update(state, exp, key)                        # jit: scan over epochs x shuffled minibatches

Each algorithm supplies only its ``experience`` and ``update`` (pure functions) and its parameter layout
(an :class:`RLAlgorithm` record); everything else lives here.

Alignment convention (all arrays on the ``S = P + N`` axis of prompt + completion): index ``t`` of a
per-token array refers to token ``t``; ``logps[:, t] = log π(tokens[t] | tokens[<t])`` (from the logits at
``t-1``), values ``V[:, t]`` are the critic's estimate of the state *before* token ``t`` (read from the
hidden state at ``t-1``), and ``completion_mask[:, t] = 1`` on the completion tokens (incl. EOS).
Rollout rows are prompt-major: with G completions per prompt, row ``b*G + g`` is completion ``g`` of
prompt ``b``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrlhf.kl_control import adaptive_kl_update, init_kl_controller
from jaxrlhf.models.heads import last_token_index
from jaxrlhf.models.lora import merge_model
from jaxrlhf.ops import entropy_from_logits, kl_k1, masked_mean, masked_var, next_token_logprobs
from jaxrlhf.sampling import SamplingConfig
from jaxrlhf.sharding import constrain
from jaxrlhf.train_state import TrainState, gradient_step

__all__ = [
    "LM_KEYS", "RLAlgorithm", "init_extra", "copy_tree", "repeat_prompts", "sampling_config", "token_logps",
    "shape_scores", "per_token_rewards", "sequence_kl", "kl_controller_update", "minibatch_epochs",
]

LM_KEYS = ("tokens", "positions", "segment_ids", "completion_mask")


# ------------------------------------------------------------------------------------------- prompts

def copy_tree(tree: Any) -> Any:
    """A copy of every array of ``tree`` (new buffers: safe to donate one and keep the other)."""
    return jax.tree.map(jnp.copy, tree)


def repeat_prompts(batch: dict, group_size: int) -> dict:
    """Host prompt batch ``[B, P]`` -> ``[B*G, P]`` with row ``b*G + g`` = prompt ``b`` (numpy)."""
    if group_size == 1:
        return batch
    return {k: np.repeat(np.asarray(v), group_size, axis=0) for k, v in batch.items()}


def sampling_config(rollout, eos_token_ids: tuple[int, ...], pad_token_id: int) -> SamplingConfig:
    """The sampler settings of a :class:`jaxrlhf.config.RolloutConfig`."""
    return SamplingConfig(max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                          top_k=rollout.top_k, top_p=rollout.top_p, eos_token_ids=tuple(eos_token_ids),
                          pad_token_id=pad_token_id)


# ------------------------------------------------------------------------------------------- forward passes

def token_logps(graphdef: nnx.GraphDef, params: Any, lm: dict, temperature: float):
    """One forward pass: ``(logps_BS, out)`` with ``logps[:, t] = log softmax(logits[:, t-1] / τ)[tokens[t]]``
    (0 where ``completion_mask`` is 0) and the model output (``logits_BTV``, ``hidden_BTD``)."""
    model = merge_model(graphdef, params)  # graphdef may be a LoRA BoundGraph
    out = model(lm["tokens"], lm["positions"], lm["segment_ids"])
    logps = next_token_logprobs(out.logits_BTV, lm["tokens"], temperature)
    return jnp.where(lm["completion_mask"] > 0, logps, 0.0), out


def token_entropy(logits_BSV: jax.Array, temperature: float) -> jax.Array:
    """Entropy of the distribution each token was drawn from, aligned like ``logps`` (``[B, S]``,
    position 0 is 0)."""
    ent = entropy_from_logits(logits_BSV[:, :-1], temperature)
    return jnp.pad(ent, ((0, 0), (1, 0)))


def shift_values(values_BS: jax.Array) -> jax.Array:
    """Head outputs at every position -> ``V[:, t]`` = output at ``t-1`` (the state before token ``t``)."""
    return jnp.pad(values_BS[:, :-1], ((0, 0), (1, 0)))


# ------------------------------------------------------------------------------------------- scores and rewards

def shape_scores(scores_B: jax.Array, truncated_B: jax.Array, rollout) -> jax.Array:
    """Scores after the rollout's shaping, in this order: subtract ``missing_eos_penalty`` from
    completions without EOS; multiply by ``score_scale``; whiten over the batch (``whiten_scores``);
    clip to ``±score_clip`` (when > 0). float32 ``[B]``.

    A non-finite score (an unscorable completion) stays non-finite and is left out of the whitening
    statistics, so it does not spread to the other rows (the group advantages then give it 0)."""
    s = scores_B.astype(jnp.float32)
    if rollout.missing_eos_penalty:
        s = s - rollout.missing_eos_penalty * truncated_B.astype(jnp.float32)
    if rollout.score_scale != 1.0:
        s = s * rollout.score_scale
    if rollout.whiten_scores:
        finite = jnp.isfinite(s)
        mean = masked_mean(jnp.where(finite, s, 0.0), finite)
        std = jnp.sqrt(masked_mean(jnp.where(finite, jnp.square(s - mean), 0.0), finite))
        s = (s - mean) / (std + 1e-8)
    if rollout.score_clip > 0:
        s = jnp.clip(s, -rollout.score_clip, rollout.score_clip)
    return s


def per_token_rewards(scores_B: jax.Array, kl_BS: jax.Array, mask_BS: jax.Array, kl_coef: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
    """Ziegler et al. 2019 eq. 2, per token: ``r_t = -β·KL_t`` on every completion token, plus the score on
    the last completion token.

    Args:
      scores_B: float32 sequence scores.
      kl_BS: per-token KL estimates (any estimator); ignored where the mask is 0.
      mask_BS: completion mask.
      kl_coef: β (scalar).

    Returns:
      ``(rewards_BS, non_score_BS)``, float32, 0 off the completion. A row without completion tokens gets
      no reward at all.
    """
    valid = mask_BS > 0
    non_score = jnp.where(valid, -kl_coef * kl_BS, 0.0)
    last = last_token_index(valid.astype(jnp.int32))
    at_last = (jnp.arange(mask_BS.shape[1])[None, :] == last[:, None]) & valid
    return non_score + jnp.where(at_last, scores_B[:, None], 0.0), non_score


def sequence_kl(logps_BS: jax.Array, ref_logps_BS: jax.Array, mask_BS: jax.Array) -> jax.Array:
    """``Σ_t (log π - log π_ref)`` over each completion (the k1 estimate of KL(π||π_ref) per sequence), [B]."""
    return jnp.sum(jnp.where(mask_BS > 0, kl_k1(logps_BS, ref_logps_BS), 0.0), axis=-1)


def explained_variance(values_BS, returns_BS, mask_BS) -> jax.Array:
    """``1 - Var(returns - values) / Var(returns)`` over completion tokens (1 = perfect critic)."""
    var_r = masked_var(returns_BS, mask_BS)
    return jnp.where(var_r > 0, 1.0 - masked_var(returns_BS - values_BS, mask_BS) / jnp.maximum(var_r, 1e-12), 0.0)


def rollout_metrics(scores_B, shaped_B, logps_BS, ref_logps_BS, non_score_BS, mask_BS, truncated_B, kl_coef
                    ) -> dict:
    """Per-iteration statistics of a rollout (means over rows unless stated)."""
    seq_kl = sequence_kl(logps_BS, ref_logps_BS, mask_BS)
    non_score = jnp.sum(non_score_BS, axis=-1)
    lengths = jnp.sum(mask_BS, axis=-1)
    return {
        "score/mean": jnp.mean(scores_B), "score/std": jnp.std(scores_B),
        "score/shaped_mean": jnp.mean(shaped_B),
        "kl/ref": jnp.mean(seq_kl),               # nats per completion (k1)
        "kl/ref_per_token": masked_mean(kl_k1(logps_BS, ref_logps_BS), mask_BS),
        "kl/coef": kl_coef,
        "reward/non_score": jnp.mean(non_score),  # Σ_t -β KL_t per completion
        "reward/total": jnp.mean(shaped_B + non_score),
        "completion/length": jnp.mean(lengths),
        "completion/truncated": jnp.mean(truncated_B.astype(jnp.float32)),
        "policy/logp": masked_mean(logps_BS, mask_BS),
    }


def advantage_metrics(adv_BS, mask_BS, prefix="advantage") -> dict:
    valid = mask_BS > 0
    return {f"{prefix}/mean": masked_mean(adv_BS, mask_BS), f"{prefix}/std": jnp.sqrt(masked_var(adv_BS, mask_BS)),
            f"{prefix}/min": jnp.min(jnp.where(valid, adv_BS, jnp.inf)),
            f"{prefix}/max": jnp.max(jnp.where(valid, adv_BS, -jnp.inf))}


def kl_controller_update(extra: dict, seq_kl_B: jax.Array, kl_cfg) -> dict:
    """The KL coefficient after an iteration: unchanged (``fixed``) or Ziegler et al.'s adaptive rule with
    the rollout's mean per-sequence KL and ``n_steps`` = rollout rows."""
    if kl_cfg.controller == "fixed":
        return extra
    new = adaptive_kl_update(extra["kl"], jnp.mean(seq_kl_B), seq_kl_B.shape[0], target=kl_cfg.target,
                             horizon=kl_cfg.horizon)
    return dict(extra, kl=new)


def init_extra(coef: float) -> dict:
    """``TrainState.extra`` of the RL algorithms: ``{"kl": KLControllerState(coef)}``."""
    return {"kl": init_kl_controller(coef)}


# ------------------------------------------------------------------------------------------- update

def aggregate_normaliser(mask_BS: jax.Array, aggregation: str) -> jax.Array:
    """The count a loss of this aggregation averages over: tokens (``token``) or non-empty rows
    (``sequence``); ``loss * count`` summed over micro-batches / ``Σ count`` is then exact."""
    m = (mask_BS > 0).astype(jnp.float32)
    return jnp.sum(m) if aggregation == "token" else jnp.sum(jnp.sum(m, axis=-1) > 0).astype(jnp.float32)


def minibatch_epochs(state: TrainState, data: dict, key: jax.Array, *, loss_fn, tx: optax.GradientTransformation,
                     epochs: int, num_minibatches: int, grad_accum_steps: int = 1) -> tuple[TrainState, dict]:
    """``epochs`` passes over ``data`` (rows on the leading axis), each a fresh permutation cut into
    ``num_minibatches`` minibatches, one :func:`gradient_step` each, all in nested ``lax.scan`` (one jit).

    Returns the new state (``step`` advanced by ``epochs * num_minibatches``) and the metrics averaged over
    every minibatch.
    """
    rows = jax.tree.leaves(data)[0].shape[0]
    mb = rows // num_minibatches

    def epoch(state, k):
        perm = jax.random.permutation(k, rows)

        def cut(x):
            y = jnp.take(x, perm, axis=0).reshape((num_minibatches, mb) + x.shape[1:])
            return constrain(y, (None, "batch") + (None,) * (x.ndim - 1))

        shuffled = jax.tree.map(cut, data)

        def one(state, batch):
            return gradient_step(state, batch, loss_fn=loss_fn, tx=tx, grad_accum_steps=grad_accum_steps)

        return jax.lax.scan(one, state, shuffled)

    state, metrics = jax.lax.scan(epoch, state, jax.random.split(key, epochs))
    return state, jax.tree.map(jnp.mean, metrics)


# ------------------------------------------------------------------------------------------- algorithms

class RLAlgorithm(NamedTuple):
    """What an algorithm plugs into the shared machinery (plain functions, no class hierarchy).

    Attributes:
      init_params: ``(policy_params, graphdef, model_cfg, cfg, key) -> (params, graphs)``: the trainable
        pytree (always with ``params["policy"]``) and a hashable record of graph definitions.
      experience: ``(state, ref_params, lm, truncated_B, scores_B, *, graphs, cfg) -> (exp, metrics)``.
      update: ``(state, exp, key, *, graphs, tx, cfg, grad_accum_steps) -> (state, metrics)``.
      initial_coef: ``cfg -> float``, the KL coefficient stored in ``TrainState.extra`` at the start.
    """

    init_params: Callable
    experience: Callable
    update: Callable
    initial_coef: Callable
