"""Critic-free, group-relative advantages for N completions per prompt (GRPO, RLOO)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.ops.masked import as_float, safe_div

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


def _finite_scores(scores_BN) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(scores with non-finite entries set to 0, finite mask [B, N], finite count per group [B, 1])``."""
    scores = as_float(scores_BN)
    valid = jnp.isfinite(scores)
    count = jnp.sum(valid.astype(scores.dtype), axis=-1, keepdims=True)
    return jnp.where(valid, scores, 0.0), valid, count


def grpo_advantages(scores_BN, eps: float = 1e-4, scale: bool = True, ddof: int = 1) -> jax.Array:
    """Group-normalised outcome advantages of GRPO.

    Shao et al. 2024 (DeepSeekMath) §4.1.2 / eq. 3: ``A_i = (r_i - mean(r)) / (std(r) + eps)`` over the
    ``N`` completions of one prompt; the value is given to every token of completion ``i``. With
    ``scale=False`` only the mean is subtracted (the "Dr. GRPO" variant, Liu et al. 2025, which drops
    the std normalisation to remove its difficulty bias).

    Unscorable completions: a non-finite score (NaN/inf, e.g. a reward function that could not score the
    text) is left out of its group's mean and std and gets advantage 0; the group's other completions
    are normalised over the finite scores only. A group with fewer than 2 finite scores has no baseline:
    all its advantages are 0.

    Args:
      scores_BN: float ``[B, N]`` scalar rewards, ``N`` completions per prompt (non-finite = unscorable).
      eps: added to the group std (guards groups with identical scores, which get advantage 0).
      scale: divide by the group std.
      ddof: delta degrees of freedom of the std (1 = unbiased sample std, as in common GRPO code).

    Returns:
      float32 ``[B, N]``, always finite.

    Raises:
      ValueError: ``scores_BN`` is not 2-D, ``N < 2``, or ``ddof`` not in ``[0, N)``.
    """
    _check_scores(scores_BN, "grpo_advantages")
    n = scores_BN.shape[-1]
    if scale and not 0 <= ddof < n:
        raise ValueError(f"grpo_advantages: `ddof` must be in [0, N) = [0, {n}), got {ddof}.")
    scores, valid, count = _finite_scores(scores_BN)
    centred = jnp.where(valid, scores - safe_div(jnp.sum(scores, axis=-1, keepdims=True), count), 0.0)
    if scale:
        var = safe_div(jnp.sum(jnp.square(centred), axis=-1, keepdims=True), jnp.maximum(count - ddof, 0.0))
        centred = centred / (jnp.sqrt(var) + eps)
    return jnp.where(valid & (count >= 2), centred, 0.0)


def rloo_advantages(scores_BN) -> jax.Array:
    """REINFORCE leave-one-out advantages.

    Kool et al. 2019 ("Buy 4 REINFORCE samples, get a baseline for free!"); Ahmadian et al. 2024
    ("Back to Basics", eq. 6): ``A_i = r_i - 1/(N-1) Σ_{j≠i} r_j``, which equals
    ``N/(N-1) (r_i - mean(r))``; the advantages of one prompt sum to 0.

    Unscorable completions: a non-finite score is left out of the other completions' baselines (``N``
    becomes the group's count of finite scores) and gets advantage 0; a group with fewer than 2 finite
    scores gets advantage 0 everywhere.

    Args:
      scores_BN: float ``[B, N]`` scalar rewards (non-finite = unscorable).

    Returns:
      float32 ``[B, N]``, always finite.

    Raises:
      ValueError: ``scores_BN`` is not 2-D or ``N < 2``.
    """
    _check_scores(scores_BN, "rloo_advantages")
    scores, valid, count = _finite_scores(scores_BN)
    baseline = safe_div(jnp.sum(scores, axis=-1, keepdims=True) - scores, count - 1.0)
    return jnp.where(valid & (count >= 2), scores - baseline, 0.0)
