"""Several seeds of one arm in one compiled step: ``jit(vmap(step))`` over a leading seed axis.

purejaxrl's idea (Lu et al. 2022: train many seeds in one ``jax.jit(jax.vmap(train))``) applied to a
language-model train step: the train state of S seeds is one pytree whose every leaf has a leading axis
``S``; each seed's batch is its own slice of a ``[S, B, ...]`` batch; frozen inputs that all seeds share
(the reference policy's parameters) are passed once, unmapped. Seed ``s`` of the vmapped run computes
exactly what its separate run computes (the same maths per slice; XLA may order a reduction differently,
so results agree to float rounding, see ``tests/test_seeds.py``).

Worth it when S copies of the state fit in memory and one step does not fill the device: S small
batches become one larger batch per matmul. On a 2-core CPU the gain is small (the matmuls are already
near the peak at the study's shapes, see ``bench/bench_seeds.py``); on an accelerator it runs S seeds
for about the price of one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["stack_seeds", "seed_slice", "vmap_over_seeds"]


def stack_seeds(trees: Sequence[Any]) -> Any:
    """Stack S pytrees of the same structure into one with a leading seed axis ``[S, ...]`` on every leaf.

    Raises:
      ValueError: an empty sequence.
    """
    if not trees:
        raise ValueError("stack_seeds needs at least one pytree")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def seed_slice(tree: Any, s: int) -> Any:
    """Seed ``s``'s pytree out of a seed-stacked one (every leaf ``x[s]``)."""
    return jax.tree.map(lambda x: x[s], tree)


def vmap_over_seeds(step_fn: Callable, *, num_shared: int = 0) -> Callable:
    """``(state_S, batch_S, *shared) -> (state_S, metrics_S)`` from ``step_fn(state, batch, *shared)``.

    Args:
      step_fn: a pure step ``(state, batch, *shared) -> (state, metrics)`` with its static arguments
        bound (e.g. ``functools.partial(dpo_step, graphdef=..., tx=..., cfg=...)``).
      num_shared: how many trailing positional arguments are shared by every seed (not mapped), such as
        frozen reference parameters.

    Returns:
      the vmapped function (not jitted: wrap it in ``jax.jit`` with ``donate_argnums=(0,)``). Every leaf
      of ``state_S``/``batch_S`` has a leading seed axis ``S``; metrics come back as ``[S]`` arrays.
    """
    def mapped(state_S, batch_S, *shared):
        if len(shared) != num_shared:
            raise TypeError(f"expected {num_shared} shared argument(s), got {len(shared)}")
        in_axes = (0, 0) + (None,) * num_shared
        return jax.vmap(step_fn, in_axes=in_axes)(state_S, batch_S, *shared)

    return mapped
