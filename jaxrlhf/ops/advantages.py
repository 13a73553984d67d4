"""Critic-free, group-relative advantages for N completions per prompt (GRPO, RLOO)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.ops.masked import _as_float

__all__ = ["grpo_advantages", "rloo_advantages"]


def _check_scores(scores_BN, fn: str) -> None:
    shape = tuple(jnp.shape(scores_BN))
    if len(shape) != 2:
        raise ValueError(
            f"{fn}: `scores_BN` must have shape [B, N] (prompts x completions per prompt), got {list(shape)}."
        )
    if shape[1] < 2:
        raise ValueError(
            f"{fn}: needs N >= 2 completions per prompt for a group baseline, got N = {shape[1]}; "
            "sample more completions per prompt."
        )


def grpo_advantages(scores_BN, eps: float = 1e-4, scale: bool = True, ddof: int = 1) -> jax.Array:
    """Group-normalised outcome advantages of GRPO.

    Shao et al. 2024 (DeepSeekMath) §4.1.2 / eq. 3: ``A_i = (r_i - mean(r)) / (std(r) + eps)`` over the
    ``N`` completions of one prompt; the value is given to every token of completion ``i``. With
    ``scale=False`` only the mean is subtracted (the "Dr. GRPO" variant, Liu et al. 2025, which drops
    the std normalisation to remove its difficulty bias).

    Args:
      scores_BN: float ``[B, N]`` scalar rewards, ``N`` completions per prompt.
      eps: added to the group std (guards groups with identical scores, which get advantage 0).
      scale: divide by the group std.
      ddof: delta degrees of freedom of the std (1 = unbiased sample std, as in common GRPO code).

    Returns:
      float32 ``[B, N]``.

    Raises:
      ValueError: ``scores_BN`` is not 2-D, ``N < 2``, or ``ddof`` not in ``[0, N)``.
    """
    _check_scores(scores_BN, "grpo_advantages")
    scores = _as_float(scores_BN)
    centred = scores - jnp.mean(scores, axis=-1, keepdims=True)
    if not scale:
        return centred
    n = scores.shape[-1]
    if not 0 <= ddof < n:
        raise ValueError(f"grpo_advantages: `ddof` must be in [0, N) = [0, {n}), got {ddof}.")
    std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=-1, keepdims=True) / (n - ddof))
    return centred / (std + eps)


def rloo_advantages(scores_BN) -> jax.Array:
    """REINFORCE leave-one-out advantages.

    Kool et al. 2019 ("Buy 4 REINFORCE samples, get a baseline for free!"); Ahmadian et al. 2024
    ("Back to Basics", eq. 6): ``A_i = r_i - 1/(N-1) Σ_{j≠i} r_j``, which equals
    ``N/(N-1) (r_i - mean(r))``; the advantages of one prompt sum to 0.

    Args:
      scores_BN: float ``[B, N]`` scalar rewards.

    Returns:
      float32 ``[B, N]``.

    Raises:
      ValueError: ``scores_BN`` is not 2-D or ``N < 2``.
    """
    _check_scores(scores_BN, "rloo_advantages")
    scores = _as_float(scores_BN)
    n = scores.shape[-1]
    baseline = (jnp.sum(scores, axis=-1, keepdims=True) - scores) / (n - 1)
    return scores - baseline
