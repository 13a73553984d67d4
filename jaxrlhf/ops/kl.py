"""Per-token KL estimators from the log-probs of sampled tokens (Schulman 2020, "Approximating KL
Divergence", http://joschu.net/blog/kl-approx.html).

With tokens sampled from the policy ``π`` and ``log ρ = ref_logps - logps = log π_ref(y)/π(y)``, each
estimator's expectation under ``π`` relates to ``KL(π || π_ref)``:

* ``k1 = -log ρ = logps - ref_logps``: unbiased, high variance, can be negative per token;
* ``k2 = ½ (log ρ)²``: biased (low bias when the policies are close), low variance, >= 0;
* ``k3 = (ρ - 1) - log ρ``: unbiased, low variance, >= 0.
"""
from __future__ import annotations

from typing import Callable, Literal

import jax
import jax.numpy as jnp

from jaxrlhf.ops.masked import as_float, check_same_shape

__all__ = ["kl_k1", "kl_k2", "kl_k3", "kl_penalty", "KL_ESTIMATORS"]


def kl_k1(logps, ref_logps) -> jax.Array:
    """k1 estimator ``logps - ref_logps`` (Schulman 2020).

    Args:
      logps: float ``[...]`` log-probs of the sampled tokens under the sampling policy ``π``.
      ref_logps: float ``[...]`` log-probs of the same tokens under the reference ``π_ref``.

    Returns:
      float32 ``[...]`` (any sign).

    Raises:
      ValueError: shapes differ.
    """
    check_same_shape(logps=logps, ref_logps=ref_logps)
    return as_float(logps) - as_float(ref_logps)


def kl_k2(logps, ref_logps) -> jax.Array:
    """k2 estimator ``½ (logps - ref_logps)²`` (Schulman 2020).

    Args / Raises: as :func:`kl_k1`.

    Returns:
      float32 ``[...]``, >= 0.
    """
    check_same_shape(logps=logps, ref_logps=ref_logps)
    return 0.5 * jnp.square(as_float(logps) - as_float(ref_logps))


def kl_k3(logps, ref_logps) -> jax.Array:
    """k3 estimator ``exp(ref - logp) - 1 - (ref - logp)`` (Schulman 2020).

    Computed as ``expm1(d) - d`` with ``d = ref - logp`` for accuracy near 0. It is not clamped: very
    large ``d`` overflows to ``inf`` (clip ``d`` upstream if that can happen).

    Args / Raises: as :func:`kl_k1`.

    Returns:
      float32 ``[...]``, >= 0 (0 exactly when ``logps == ref_logps``).
    """
    check_same_shape(logps=logps, ref_logps=ref_logps)
    d = as_float(ref_logps) - as_float(logps)
    return jnp.expm1(d) - d


KL_ESTIMATORS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_penalty(logps, ref_logps, estimator: Literal["k1", "k2", "k3"] = "k1") -> jax.Array:
    """Per-token KL penalty with the named estimator (``"k1"``, ``"k2"`` or ``"k3"``, Schulman 2020).

    Args:
      logps: float ``[...]`` sampling-policy log-probs of the sampled tokens.
      ref_logps: float ``[...]`` reference log-probs of the same tokens.
      estimator: which estimator; see :func:`kl_k1`, :func:`kl_k2`, :func:`kl_k3`.

    Returns:
      float32 ``[...]``.

    Raises:
      ValueError: unknown ``estimator`` or shapes differ.
    """
    try:
        fn = KL_ESTIMATORS[estimator]
    except (KeyError, TypeError):
        raise ValueError(
            f"`estimator` must be one of {sorted(KL_ESTIMATORS)}, got {estimator!r}."
        ) from None
    return fn(logps, ref_logps)
