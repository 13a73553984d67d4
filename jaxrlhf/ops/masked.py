"""Masked reductions over token arrays.

A *mask* marks which entries of an array count: 1 (or ``True``) for a valid token, 0 for prompt,
padding or anything else to ignore. Masks may be bool, int or float; a float mask acts as a per-entry
weight (``masked_mean`` is then a weighted mean). Entries with mask 0 never influence a result, even if
they hold ``nan`` or ``inf`` (they are selected away with ``jnp.where``, not multiplied by 0).

All maths is done in at least float32 (bfloat16/float16/int inputs are upcast; float64 stays float64
when x64 is enabled).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

__all__ = [
    "AGGREGATIONS",
    "as_float",
    "broadcast_mask",
    "check_same_shape",
    "masked_aggregate",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "safe_div",
]

Axis = int | Sequence[int] | None


# ----------------------------------------------------------------------------------------------------
# Array helpers shared by jaxrlhf.ops and jaxrlhf.losses.
# ----------------------------------------------------------------------------------------------------
def as_float(x) -> jax.Array:
    """``x`` as a jax array of a float dtype with at least float32 precision."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def check_same_shape(**arrays) -> tuple[int, ...]:
    """Raise ``ValueError`` unless every keyword array has the same shape; return that shape."""
    shapes = {name: tuple(jnp.shape(a)) for name, a in arrays.items()}
    first_name, first = next(iter(shapes.items()))
    for name, shape in shapes.items():
        if shape != first:
            desc = ", ".join(f"{n}{list(s)}" for n, s in shapes.items())
            raise ValueError(
                f"`{name}` has shape {list(shape)} but `{first_name}` has shape {list(first)}; "
                f"these arrays must have identical shapes (got {desc})."
            )
    return first


def broadcast_mask(x: jax.Array, mask, fn: str) -> jax.Array:
    """``mask`` broadcast to ``x.shape`` (float); raises if it cannot broadcast to exactly that shape."""
    mask = jnp.asarray(mask)
    try:
        out_shape = jnp.broadcast_shapes(x.shape, mask.shape)
    except ValueError:
        out_shape = None
    if out_shape != tuple(x.shape):
        raise ValueError(
            f"{fn}: `mask` with shape {list(mask.shape)} does not broadcast to `x` with shape "
            f"{list(x.shape)}; pass a mask with the same shape as `x`."
        )
    return jnp.broadcast_to(as_float(mask), x.shape)


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` where ``den != 0``, else 0 (gradient-safe)."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), 0.0)


# ----------------------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------------------
def masked_sum(x, mask, axis: Axis = None, keepdims: bool = False) -> jax.Array:
    """Sum of ``x * mask`` over ``axis``.

    Args:
      x: array of any shape ``[...]`` (any real dtype; computed in >= float32).
      mask: array broadcastable to ``x.shape`` (bool/int/float); 0 = ignore, otherwise a weight.
      axis: axes to reduce (``None`` = all).
      keepdims: keep reduced axes with size 1.

    Returns:
      float array: ``sum(where(mask != 0, x * mask, 0), axis)``.

    Raises:
      ValueError: ``mask`` does not broadcast to ``x.shape``.
    """
    x = as_float(x)
    m = broadcast_mask(x, mask, "masked_sum")
    return jnp.sum(jnp.where(m != 0, x * m, 0.0), axis=axis, keepdims=keepdims)


def masked_mean(x, mask, axis: Axis = None, keepdims: bool = False) -> jax.Array:
    """Mask-weighted mean of ``x`` over ``axis`` (token-weighted for a 0/1 mask).

    ``masked_mean(x, mask) = sum(x * mask) / sum(mask)``; with ``axis=None`` every valid token in the
    whole array counts once, so longer sequences weigh more. A slice whose mask sums to 0 gives 0
    (not ``nan``).

    Args:
      x: array ``[...]``.
      mask: broadcastable to ``x.shape``.
      axis: axes to reduce (``None`` = all).
      keepdims: keep reduced axes with size 1.

    Returns:
      float array of the reduced shape.

    Raises:
      ValueError: ``mask`` does not broadcast to ``x.shape``.
    """
    x = as_float(x)
    m = broadcast_mask(x, mask, "masked_mean")
    total = jnp.sum(jnp.where(m != 0, x * m, 0.0), axis=axis, keepdims=keepdims)
    count = jnp.sum(m, axis=axis, keepdims=keepdims)
    return safe_div(total, count)


def masked_var(x, mask, unbiased: bool = True, axis: Axis = None, keepdims: bool = False) -> jax.Array:
    """Mask-weighted variance of ``x`` over ``axis``.

    ``var = masked_mean((x - masked_mean(x))**2)``; with ``unbiased=True`` it is multiplied by the
    Bessel factor ``n / (n - 1)`` where ``n = sum(mask)`` (the convention of the PPO / InstructGPT
    reference implementations). When ``n <= 1`` the Bessel factor is skipped (the biased value, 0 for a
    single token, is returned) so the function stays finite and jittable.

    Args:
      x: array ``[...]``.
      mask: broadcastable to ``x.shape``.
      unbiased: apply Bessel's correction.
      axis: axes to reduce (``None`` = all).
      keepdims: keep reduced axes with size 1.

    Returns:
      float array of the reduced shape (>= 0).

    Raises:
      ValueError: ``mask`` does not broadcast to ``x.shape``.
    """
    x = as_float(x)
    m = broadcast_mask(x, mask, "masked_var")
    mean = masked_mean(x, m, axis=axis, keepdims=True)
    var = masked_mean(jnp.square(x - mean), m, axis=axis, keepdims=keepdims)
    if unbiased:
        n = jnp.sum(m, axis=axis, keepdims=keepdims)
        bessel = jnp.where(n > 1, n / jnp.where(n > 1, n - 1, 1.0), 1.0)
        var = var * bessel
    return var


def masked_whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """Normalise ``x`` with its masked mean and (unbiased) variance over the whole array.

    ``out = (x - mean) / sqrt(var + eps)`` on valid entries (``+ mean`` again when ``shift_mean`` is
    False, i.e. only rescale), 0 on masked entries. This is the advantage whitening of the PPO-for-LMs
    implementations (Ziegler et al. 2019 / InstructGPT, Ouyang et al. 2022 code), with the statistics
    taken over every valid token in the batch.

    Args:
      x: array ``[...]`` (e.g. advantages ``[B, T]``).
      mask: broadcastable to ``x.shape``.
      shift_mean: subtract the mean (True) or keep it (False).
      eps: added to the variance before the square root.

    Returns:
      float array of ``x.shape``; masked entries are 0.

    Raises:
      ValueError: ``mask`` does not broadcast to ``x.shape``.
    """
    x = as_float(x)
    m = broadcast_mask(x, mask, "masked_whiten")
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(m != 0, out, 0.0)


AGGREGATIONS = ("token", "sequence")


def masked_aggregate(x, mask, aggregation: str) -> jax.Array:
    """Reduce per-token ``x [..., T]`` to a scalar the way a policy loss is aggregated.

    ``"token"``: :func:`masked_mean` over every valid token of the array (each token weighs the same,
    longer rows weigh more). ``"sequence"``: the masked mean of each row over ``T``, then the mean over
    rows that have at least one valid token (each completion weighs the same; rows without tokens are
    skipped, and the result is 0 if there are none).

    Args:
      x: float ``[..., T]``.
      mask: ``[..., T]`` (bool/int/float), nonzero on tokens that count.
      aggregation: ``"token"`` or ``"sequence"``.

    Returns:
      float scalar.

    Raises:
      ValueError: unknown ``aggregation``; ``mask`` does not broadcast to ``x.shape``.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"`aggregation` must be one of {AGGREGATIONS}, got {aggregation!r}.")
    if aggregation == "token":
        return masked_mean(x, mask)
    row_mean = masked_mean(x, mask, axis=-1)
    has_tokens = jnp.sum(as_float(mask), axis=-1) > 0
    return safe_div(jnp.sum(jnp.where(has_tokens, row_mean, 0.0)), jnp.sum(has_tokens.astype(row_mean.dtype)))
