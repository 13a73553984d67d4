"""Train state, optimiser and the generic gradient step every algorithm shares.

The contract (``../shared/DESIGN.md``): an algorithm provides a *loss function*

    loss_fn(params, batch) -> (loss_sum, (normaliser, metrics))

where ``loss_sum`` is a sum over the units the loss averages (tokens for SFT, pairs for DPO), and
``normaliser`` their count. :func:`gradient_step` scans ``optim.grad_accum_steps`` micro-batches, sums
both, and divides once, so accumulated gradients equal the one-big-batch gradient exactly. Metrics are
averaged over micro-batches.

``TrainState`` is a plain pytree; the caller jits the step once with explicit shardings
(:func:`jit_step`) and donates the state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from jaxrlhf import sharding as shd
from jaxrlhf.config import OptimConfig

__all__ = [
    "TrainState", "LossFn", "learning_rate_schedule", "make_optimizer", "create_train_state", "gradient_step",
    "jit_step", "init_sharded_state",
]

LossFn = Callable[[Any, dict], tuple[jax.Array, tuple[jax.Array, dict]]]


@struct.dataclass
class TrainState:
    """``step`` (int32 scalar), ``params`` (trainable pytree, e.g. an ``nnx.State``), ``opt_state``,
    and ``extra`` (non-trained carried state such as the adaptive KL coefficient; may be ``None``)."""

    step: jax.Array
    params: Any
    opt_state: Any
    extra: Any = None


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``lr`` then cosine / linear decay to ``lr * min_lr_ratio`` (or constant)."""
    warm = max(cfg.warmup_steps, 0)
    decay_steps = max(total_steps - warm, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    elif cfg.schedule == "constant":
        decay = optax.constant_schedule(cfg.lr)
    else:
        raise ValueError(f"optim.schedule must be cosine, linear or constant, got {cfg.schedule!r}")
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), decay], [warm])


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; weight decay on matrices only (ndim >= 2).

    Args:
      cfg: :class:`~jaxrlhf.config.OptimConfig` (``lr``, ``b1``, ``b2``, ``eps``, ``weight_decay``,
        ``max_grad_norm`` (0 = no clipping), ``warmup_steps``, ``schedule``, ``min_lr_ratio``).
      total_steps: optimizer steps of the run (the length of the decay).

    Returns:
      The ``optax.GradientTransformation``.

    Raises:
      ValueError: ``cfg.schedule`` is not cosine, linear or constant.
    """
    schedule = learning_rate_schedule(cfg, total_steps)
    decay_mask = lambda params: jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)  # noqa: E731
    parts = []
    if cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)


def create_train_state(params: Any, tx: optax.GradientTransformation, extra: Any = None) -> TrainState:
    """An unsharded :class:`TrainState` at step 0: ``opt_state = tx.init(params)``; see :func:`init_sharded_state`
    for the sharded one."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), extra=extra)


def split_microbatches(batch: dict, n: int) -> dict:
    """``[B, ...] -> [n, B/n, ...]`` with micro-batch ``j`` = rows ``j, j+n, j+2n, ...``, so each micro-batch
    draws evenly from every device's shard of the batch axis."""

    def one(x):
        b = x.shape[0]
        return jnp.swapaxes(x.reshape((b // n, n) + x.shape[1:]), 0, 1)

    return jax.tree.map(one, batch)


def accumulate_gradients(loss_fn: LossFn, params: Any, batch: dict, num_micro: int):
    """Exact gradient of ``sum(loss_sum) / sum(normaliser)`` over ``num_micro`` micro-batches.

    Returns ``(loss, grads, metrics)``.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro == 1:
        (loss_sum, (norm, metrics)), grads = grad_fn(params, batch)
        norm = jnp.maximum(norm, 1e-8)
        return loss_sum / norm, jax.tree.map(lambda g: g / norm, grads), metrics

    micro = split_microbatches(batch, num_micro)

    def body(carry, mb):
        g_acc, l_acc, n_acc = carry
        (loss_sum, (norm, metrics)), grads = grad_fn(params, mb)
        return (jax.tree.map(jnp.add, g_acc, grads), l_acc + loss_sum, n_acc + norm), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, loss_sum, norm), metrics = jax.lax.scan(body, (zeros, 0.0, 0.0), micro)
    norm = jnp.maximum(norm, 1e-8)
    return loss_sum / norm, jax.tree.map(lambda g: g / norm, grads), jax.tree.map(jnp.mean, metrics)


def gradient_step(state: TrainState, batch: dict, *, loss_fn: LossFn, tx: optax.GradientTransformation,
                  grad_accum_steps: int = 1) -> tuple[TrainState, dict]:
    """One optimizer step: accumulate exact gradients, clip, AdamW, return new state and metrics.

    Args:
      state: the :class:`TrainState`.
      batch: dict of arrays with the batch on the leading axis (``B`` divisible by ``grad_accum_steps``).
      loss_fn: ``(params, micro_batch) -> (loss_sum, (normaliser, metrics))`` (see the module docstring).
      tx: the optimizer.
      grad_accum_steps: micro-batches; the gradient is that of ``Σ loss_sum / Σ normaliser``.

    Returns:
      ``(state, metrics)``: ``step`` + 1; the loss's metrics averaged over micro-batches plus float32
      scalars ``loss`` and ``grad_norm`` (global norm before clipping).
    """
    loss, grads, metrics = accumulate_gradients(loss_fn, state.params, batch, grad_accum_steps)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def jit_step(step_fn: Callable, mesh: Mesh, state_sharding: TrainState, *, donate: bool = True,
             static_kwargs: dict | None = None) -> Callable:
    """``jax.jit`` a ``(state, batch, *rest) -> (state, metrics)`` step with explicit shardings.

    The state is donated and keeps its sharding; batch leaves are split over (data, fsdp) on their
    leading axis; any further positional arguments (e.g. frozen reference params) are passed as they are
    (already placed by the caller). The mesh is entered with ``jax.set_mesh`` around tracing and calls so
    activation constraints inside the models apply.

    Args:
      step_fn: a pure step such as :func:`jaxrlhf.algos.sft.sft_step`.
      mesh: the device mesh (:func:`jaxrlhf.sharding.make_mesh`).
      state_sharding: the state's shardings (second result of :func:`init_sharded_state`).
      donate: donate the input state's buffers.
      static_kwargs: keyword arguments bound before jitting (``graphdef``, ``tx``, ``cfg``, ...).

    Returns:
      ``call(state, batch, *rest) -> (state, metrics)`` (metrics replicated); ``call.jitted`` is the
      ``jax.jit`` object (for ``.lower``).
    """
    fn = functools.partial(step_fn, **(static_kwargs or {}))
    jitted = jax.jit(fn, out_shardings=(state_sharding, shd.replicated(mesh)),
                     donate_argnums=(0,) if donate else ())

    def call(state, batch, *rest):
        with jax.set_mesh(mesh):
            return jitted(state, batch, *rest)

    call.jitted = jitted  # type: ignore[attr-defined]
    return call


def init_sharded_state(params: Any, tx: optax.GradientTransformation, mesh: Mesh, extra: Any = None
                       ) -> tuple[TrainState, TrainState]:
    """Place ``params`` by the rules table and build the optimizer state directly sharded.

    Optimizer init runs under ``jit`` with ``out_shardings`` so moments are created where they live (no
    host round trip, no full replica on one device).

    Args:
      params: the trainable pytree (e.g. ``nnx.split(model)[1]``), annotated with logical axes.
      tx: the optimizer (:func:`make_optimizer`).
      mesh: the device mesh.
      extra: non-trained carried state (e.g. :func:`jaxrlhf.algos.dpo.dpo_extra`), or None.

    Returns:
      ``(state, state_sharding)``: the :class:`TrainState` at step 0 and its shardings (for :func:`jit_step`).
    """
    abstract = jax.eval_shape(lambda p, e: create_train_state(p, tx, e), params, extra)
    sharding = shd.state_shardings(abstract, mesh)
    params = jax.device_put(params, sharding.params)
    extra = jax.device_put(extra, sharding.extra) if extra is not None else None
    init = jax.jit(lambda p, e: create_train_state(p, tx, e), out_shardings=sharding)
    with jax.set_mesh(mesh):
        state = init(params, extra)
    return state, sharding
