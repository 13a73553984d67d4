"""KL-penalty coefficient controllers for RL fine-tuning of language models.

Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2.2: the reward is
``R = r - β KL`` and ``β`` is adapted towards a target KL with a proportional controller
``e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)``, ``β_{t+1} = β_t (1 + K_β e_t)``; following that paper's
code ``K_β = n_steps / horizon`` (``n_steps`` = samples, or updates, since the last adjustment).

The state is a pytree (``NamedTuple``) so it lives inside a train state and passes through ``jit``.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["KLControllerState", "init_kl_controller", "adaptive_kl_update", "fixed_kl_update"]


class KLControllerState(NamedTuple):
    """Controller state. ``coef``: float32 scalar, the current KL coefficient ``β``."""

    coef: jax.Array


def init_kl_controller(init_coef: float) -> KLControllerState:
    """Initial state with ``coef = init_coef`` (float32 scalar).

    Raises:
      ValueError: a Python ``init_coef < 0``.
    """
    if isinstance(init_coef, (int, float)) and init_coef < 0:
        raise ValueError(f"`init_coef` must be >= 0, got {init_coef}.")
    return KLControllerState(coef=jnp.asarray(init_coef, jnp.float32))


def adaptive_kl_update(
    state: KLControllerState,
    observed_kl,
    n_steps,
    *,
    target: float,
    horizon: float,
) -> KLControllerState:
    """Adaptive KL controller update (Ziegler et al. 2019, §2.2).

    ``e = clip(observed_kl / target - 1, -0.2, 0.2)``; ``coef ← coef · (1 + e · n_steps / horizon)``.
    KL above target raises the coefficient, below lowers it.

    Args:
      state: current :class:`KLControllerState`.
      observed_kl: float scalar, the measured KL(π || π_ref) (nats per sequence, same units as
        ``target``).
      n_steps: scalar (int or float), number of samples (or steps) since the last update.
      target: target KL ``> 0`` (Python float, keyword-only).
      horizon: controller horizon ``> 0`` in the units of ``n_steps`` (keyword-only).

    Returns:
      The new state (float32 ``coef``).

    Raises:
      ValueError: a Python ``target <= 0`` or ``horizon <= 0``.
    """
    if isinstance(target, (int, float)) and not target > 0:
        raise ValueError(f"`target` KL must be > 0, got {target}; use fixed_kl_update for a fixed coefficient.")
    if isinstance(horizon, (int, float)) and not horizon > 0:
        raise ValueError(f"`horizon` must be > 0, got {horizon}.")
    coef = jnp.asarray(state.coef, jnp.float32)
    error = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    mult = 1.0 + error * jnp.asarray(n_steps, jnp.float32) / horizon
    return KLControllerState(coef=coef * mult)


def fixed_kl_update(state: KLControllerState, observed_kl=None, n_steps=None, **unused) -> KLControllerState:
    """Fixed coefficient: returns ``state`` unchanged (same call signature as :func:`adaptive_kl_update`,
    so the two are interchangeable; extra keyword arguments such as ``target``/``horizon`` are ignored)."""
    del observed_kl, n_steps, unused
    return state
