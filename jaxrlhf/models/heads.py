"""Scalar heads for reward models and PPO value functions, and last-token reads.

A decoder reward model or value function puts a :class:`ScalarHead` on the final hidden states
(Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"; Ouyang et al. 2022): it maps
every position to one scalar. The sequence's reward is the value at its last real token
(:func:`sequence_reward`); a value function uses every position.

Index helpers accept any leading batch dims (``[B, T]``, preference pairs ``[B, 2, T]``, rankings
``[B, N, T]``); the suffixes below write the common ``[B, T]`` case.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["ScalarHead", "last_token_index", "gather_last", "sequence_reward"]

Array = jax.Array


class ScalarHead(nnx.Module):
    """Linear ``D -> 1``: ``values[b, t] = hidden[b, t] . w + b``.

    The weight ``kernel`` ``[D, 1]`` (logical axes ``("embed", None)``) is drawn from
    ``normal(0, 1 / sqrt(D + 1))`` as the reward/value heads of OpenAI's lm-human-preferences; the bias
    starts at 0.

    Args:
      hidden_size: D.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
      param_dtype: dtype of the stored parameters (default float32).
    Call:
      ``head(hidden_BTD) -> values_BT`` float32 (matmul in float32 whatever the hidden dtype). Any leading
      dims are kept: ``[..., D] -> [...]``.
    Raises:
      ValueError: ``hidden_size < 1``.
    """

    def __init__(self, hidden_size: int, *, rngs: nnx.Rngs, param_dtype: str = "float32"):
        if hidden_size < 1:
            raise ValueError(f"ScalarHead hidden_size must be >= 1, got {hidden_size}")
        std = 1.0 / math.sqrt(hidden_size + 1)
        init = nnx.initializers.normal(std)
        self.kernel = nnx.Param(init(rngs.params(), (hidden_size, 1), jnp.dtype(param_dtype)),
                                logical_axes=("embed", None))
        self.bias = nnx.Param(jnp.zeros((1,), jnp.dtype(param_dtype)), logical_axes=(None,))

    def __call__(self, hidden_BTD: Array) -> Array:
        w = self.kernel[...].astype(jnp.float32)
        out = jnp.einsum("...d,do->...o", hidden_BTD.astype(jnp.float32), w) + self.bias[...].astype(jnp.float32)
        return out[..., 0]


def last_token_index(segment_ids_BT: Array) -> Array:
    """Index of the last non-padding token (``segment_ids != 0``) of each row, int32 ``[B]``.

    Works for right padding (``n - 1``), left padding (``T - 1``) and anything in between. A row with no
    real token gives 0.
    """
    T = segment_ids_BT.shape[-1]
    idx = jnp.where(segment_ids_BT != 0, jnp.arange(T, dtype=jnp.int32), -1)
    return jnp.maximum(jnp.max(idx, axis=-1), 0).astype(jnp.int32)


def gather_last(x_BT: Array, idx_B: Array) -> Array:
    """``x[b, idx[b], ...]``: pick one time step per row.

    Args:
      x_BT: array ``idx.shape + (T,) + rest`` (e.g. values ``[B, T]`` or hidden ``[B, T, D]``).
      idx_B: int indices ``[B]`` (any leading dims matching ``x``'s), in ``[0, T)``.
    Returns:
      ``idx.shape + rest``.
    Raises:
      ValueError: ``x``'s leading dims do not match ``idx``'s.
    """
    lead = idx_B.ndim
    if x_BT.ndim <= lead or x_BT.shape[:lead] != idx_B.shape:
        raise ValueError(f"gather_last: x shape {x_BT.shape} must start with idx shape {idx_B.shape} "
                         "followed by the time axis")
    index = idx_B.reshape(idx_B.shape + (1,) * (x_BT.ndim - lead)).astype(jnp.int32)
    return jnp.take_along_axis(x_BT, index, axis=lead).squeeze(lead)


def sequence_reward(values_BT: Array, segment_ids_BT: Array) -> Array:
    """Reward of each row: the head's value at its last real token, float32 ``[B]``.

    Invariant to extra padding on either side. Raises ``ValueError`` when shapes differ.
    """
    if values_BT.shape != segment_ids_BT.shape:
        raise ValueError(f"sequence_reward: values shape {values_BT.shape} != segment_ids shape "
                         f"{segment_ids_BT.shape}")
    return gather_last(values_BT, last_token_index(segment_ids_BT)).astype(jnp.float32)
