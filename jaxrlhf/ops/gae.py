"""Generalized Advantage Estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using
Generalized Advantage Estimation", eq. 16)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.ops.masked import as_float, check_same_shape

__all__ = ["gae"]


def _check_discount(name: str, value) -> None:
    if isinstance(value, (int, float)) and not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must lie in [0, 1], got {value}.")


def gae(rewards_BT, values_BT, mask_BT, gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
    """GAE(γ, λ) advantages and returns for per-token rewards, as a reverse ``lax.scan`` over time.

    Schulman et al. 2016 eq. 16: ``δ_t = r_t + γ V_{t+1} - V_t`` and
    ``A_t = Σ_{l>=0} (γλ)^l δ_{t+l}``, computed with the recursion ``A_t = δ_t + γλ A_{t+1}``.

    Mask semantics: ``mask[..., t] != 0`` marks the positions that are steps of the episode (the
    completion tokens). Positions with mask 0 are *skipped*: they are not steps, their rewards and values
    are ignored, and ``t+1`` above means "the next valid position of the row". Hence

    * right padding after the completion, left zeros (prompt, left padding) before it, and interior gaps
      (e.g. environment/tool tokens in a multi-turn episode) are all supported;
    * the episode ends after the last valid token of each row: its bootstrap value ``V_{T}`` is 0, and
      nothing stored in padded positions (values, rewards) leaks into any advantage;
    * masked positions get advantage 0 and return 0.

    Args:
      rewards_BT: float ``[..., T]`` per-token rewards (e.g. score on the last token minus per-token
        KL penalty).
      values_BT: float ``[..., T]`` critic values ``V(s_t)``.
      mask_BT: ``[..., T]`` bool/int/float; nonzero = valid step.
      gamma: discount ``γ`` in ``[0, 1]`` (Python float or scalar array).
      lam: GAE ``λ`` in ``[0, 1]`` (Python float or scalar array).

    Returns:
      ``(advantages_BT, returns_BT)``, float32 ``[..., T]``, with ``returns = advantages + values`` on
      valid positions and both 0 elsewhere. Gradients flow through ``values``/``rewards``; wrap the call
      in ``jax.lax.stop_gradient`` where they must be constants (the usual PPO set-up).

    Raises:
      ValueError: shapes differ, no time axis, or a Python ``gamma``/``lam`` outside ``[0, 1]``.
    """
    shape = check_same_shape(rewards_BT=rewards_BT, values_BT=values_BT, mask_BT=mask_BT)
    if len(shape) < 1:
        raise ValueError("gae: inputs need a time axis (last axis), got scalars.")
    _check_discount("gamma", gamma)
    _check_discount("lam", lam)

    rewards = jnp.moveaxis(as_float(rewards_BT), -1, 0)  # [T, ...]
    values = jnp.moveaxis(as_float(values_BT), -1, 0)
    valid = jnp.moveaxis(jnp.asarray(mask_BT) != 0, -1, 0)
    gamma = jnp.asarray(gamma, rewards.dtype)
    gamma_lam = gamma * jnp.asarray(lam, rewards.dtype)

    def step(carry, xs):
        next_value, next_adv = carry  # value and advantage of the next valid position (0 past the end)
        r_t, v_t, valid_t = xs
        r_t = jnp.where(valid_t, r_t, 0.0)  # keep nan/inf stored in padding out of the maths
        v_t = jnp.where(valid_t, v_t, 0.0)
        delta = r_t + gamma * next_value - v_t
        adv = delta + gamma_lam * next_adv
        carry = (jnp.where(valid_t, v_t, next_value), jnp.where(valid_t, adv, next_adv))
        return carry, jnp.where(valid_t, adv, 0.0)

    zeros = jnp.zeros(rewards.shape[1:], rewards.dtype)
    _, advantages = jax.lax.scan(step, (zeros, zeros), (rewards, values, valid), reverse=True)
    returns = jnp.where(valid, advantages + values, 0.0)
    return jnp.moveaxis(advantages, 0, -1), jnp.moveaxis(returns, 0, -1)
