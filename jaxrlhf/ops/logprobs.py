"""Log-probabilities and entropies from language-model logits.

Every function accepts arbitrary leading dimensions: ``[B, T, V]``, ``[B, 2, T, V]`` (preference pairs),
``[B, N, T, V]`` (rankings), ... ``V`` is always the last axis of the logits and ``T`` the last axis of
the token arrays. Maths is done in (at least) float32; bfloat16 logits are upcast.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.ops.masked import as_float, broadcast_mask, safe_div

__all__ = ["token_logprobs", "next_token_logprobs", "sequence_logprobs", "entropy_from_logits"]


def _check_temperature(temperature) -> None:
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}; use 1.0 for the raw logits.")


def _check_logits_targets(logits, targets, fn: str) -> None:
    if jnp.ndim(logits) < 1:
        raise ValueError(f"{fn}: `logits` must have a vocabulary axis last, got a scalar.")
    if tuple(jnp.shape(logits))[:-1] != tuple(jnp.shape(targets)):
        raise ValueError(
            f"{fn}: `logits` shape {list(jnp.shape(logits))} must be `targets`/`tokens` shape "
            f"{list(jnp.shape(targets))} plus a trailing vocabulary axis."
        )
    if not jnp.issubdtype(jnp.asarray(targets).dtype, jnp.integer):
        raise ValueError(f"{fn}: token ids must be integers, got dtype {jnp.asarray(targets).dtype}.")


def token_logprobs(logits_BTV, targets_BT, temperature: float = 1.0) -> jax.Array:
    """Log-probability of ``targets`` under ``softmax(logits / temperature)``, per position.

    ``logps[..., t] = logits[..., t, y_t]/τ - logsumexp(logits[..., t, :]/τ)``. Only the log-normaliser
    (one reduction over ``V``) and the gathered logit are computed; the ``[..., V]`` log-softmax is never
    materialised.

    Args:
      logits_BTV: float ``[..., T, V]`` (any float dtype; computed in float32).
      targets_BT: int ``[..., T]`` token ids in ``[0, V)``. Ids outside that range give undefined values
        (this is not checked, to stay jittable); mask such positions out downstream.
      temperature: ``τ > 0`` (Python float or scalar array), the sampling temperature.

    Returns:
      float32 ``[..., T]``, values <= 0.

    Raises:
      ValueError: shape mismatch, non-integer targets, or a Python ``temperature <= 0``.
    """
    _check_logits_targets(logits_BTV, targets_BT, "token_logprobs")
    _check_temperature(temperature)
    logits = as_float(logits_BTV)
    if not (isinstance(temperature, (int, float)) and temperature == 1.0):
        logits = logits / temperature
    targets = jnp.asarray(targets_BT).astype(jnp.int32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def next_token_logprobs(logits_BTV, tokens_BT, temperature: float = 1.0) -> jax.Array:
    """Causal-LM log-probabilities aligned with the tokens they score.

    ``logps[..., t] = log p(tokens[..., t] | tokens[..., <t])``, computed from ``logits[..., t-1, :]``
    (the model output at position ``t-1`` predicts token ``t``). Position 0 has no prediction and is 0.
    This matches the ``completion_mask`` convention (1 where token ``t`` is predicted from ``t-1``), so
    ``sequence_logprobs(next_token_logprobs(logits, tokens), completion_mask)`` is the completion
    log-likelihood. The logits of the last position are unused.

    Args:
      logits_BTV: float ``[..., T, V]``.
      tokens_BT: int ``[..., T]``.
      temperature: ``τ > 0``.

    Returns:
      float32 ``[..., T]`` with ``[..., 0] == 0``.

    Raises:
      ValueError: shape mismatch, ``T == 0``, non-integer tokens, or a Python ``temperature <= 0``.
    """
    _check_logits_targets(logits_BTV, tokens_BT, "next_token_logprobs")
    if jnp.shape(tokens_BT)[-1:] in ((), (0,)):
        raise ValueError("next_token_logprobs: `tokens` needs a time axis with T >= 1.")
    logps = token_logprobs(logits_BTV[..., :-1, :], tokens_BT[..., 1:], temperature=temperature)
    pad = [(0, 0)] * (logps.ndim - 1) + [(1, 0)]
    return jnp.pad(logps, pad)


def sequence_logprobs(logps_BT, mask_BT, average: bool = False) -> jax.Array:
    """Reduce per-token log-probs to one value per sequence over the masked tokens.

    ``average=False``: ``sum_t logps[..., t] * mask[..., t]`` (the sequence log-likelihood, as used by
    DPO, Rafailov et al. 2023 eq. 7). ``average=True``: that sum divided by ``sum_t mask`` (the
    length-normalised log-likelihood of SimPO, Meng et al. 2024 eq. 4, and ORPO/IPO practice). A row
    with an all-zero mask gives 0.

    Args:
      logps_BT: float ``[..., T]``.
      mask_BT: ``[..., T]`` bool/int/float (broadcastable to ``logps_BT``).
      average: length-normalise.

    Returns:
      float32 ``[...]``.

    Raises:
      ValueError: ``mask_BT`` does not broadcast to ``logps_BT``.
    """
    logps = as_float(logps_BT)
    mask = broadcast_mask(logps, mask_BT, "sequence_logprobs")
    total = jnp.sum(jnp.where(mask != 0, logps * mask, 0.0), axis=-1)
    if not average:
        return total
    return safe_div(total, jnp.sum(mask, axis=-1))


def entropy_from_logits(logits_BTV, temperature: float = 1.0) -> jax.Array:
    """Entropy (nats) of ``softmax(logits / temperature)`` at every position.

    ``H = logsumexp(z) - sum_v softmax(z)_v z_v`` with ``z = logits / τ``. Logits of ``-inf`` (masked
    vocabulary entries) are allowed.

    Args:
      logits_BTV: float ``[..., V]``.
      temperature: ``τ > 0``.

    Returns:
      float32 ``[...]`` (logits shape without the last axis), values in ``[0, log V]``.

    Raises:
      ValueError: scalar logits or a Python ``temperature <= 0``.
    """
    if jnp.ndim(logits_BTV) < 1:
        raise ValueError("entropy_from_logits: `logits` must have a vocabulary axis last.")
    _check_temperature(temperature)
    logits = as_float(logits_BTV)
    if not (isinstance(temperature, (int, float)) and temperature == 1.0):
        logits = logits / temperature
    lse = jax.nn.logsumexp(logits, axis=-1)
    probs = jax.nn.softmax(logits, axis=-1)
    # `where` keeps logits of -inf (masked vocabulary entries, probability 0) from producing 0 * inf.
    # (double `where` so that the gradient is finite as well).
    finite_logits = jnp.where(probs > 0, logits, 0.0)
    return lse - jnp.sum(probs * finite_logits, axis=-1)
