"""LoRA: low-rank adapters on the stacked projection weights (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models").

A targeted projection ``W0 [in..., out...]`` (per layer) is frozen and gains a trainable low-rank update
(Hu et al. eq. 3, with the ``α/r`` scaling of their §4.1)::

    h = x W0 + (α / r) · drop(x) A B          A [in..., r],  B [r, out...]

``A`` starts uniform in ``±1/sqrt(n_in)`` (PEFT's ``kaiming_uniform(a=√5)``; Hu et al. use a Gaussian) and
``B`` at zero, so an adapted model starts exactly equal to its base. ``drop`` is inverted dropout of rate
``lora.dropout`` on the adapter's input only (PEFT's ``lora_dropout``).

How it plugs in. The model code is unchanged: every projection goes through
:func:`jaxrlhf.models.layers.dense`, which hands a :class:`LoraWeight` (a pytree holding ``W0``, ``A``, ``B``
and the dropout key) to :func:`lora_dense`: ``x W0`` as one GEMM plus the factored ``((x A) B)`` (two thin
GEMMs, ``rows x r`` in between), so no full-size ``ΔW`` is ever formed and no gradient of ``W0`` is
computed (``W0`` passes through ``stop_gradient``). A :class:`LoraWeight` sits where the projection's array
sits in the model's ``nnx.State``, so ``nnx.merge``, ``Variable[...]`` and the layer scan (which slices
every leaf along the stacked ``layers`` axis, the key included) all work on it as on the array.

The pieces, on ``nnx.State`` trees:

* :func:`add_adapters` -- the adapters of a model's params: ``{..., "layers": {"q": {"lora_a", "lora_b"}}}``
  (``nnx.Param`` with logical axes: ``lora_a [L, in..., r]``, ``lora_b [L, r, out...]``, the rank axis
  unsharded). :func:`init_lora` also moves the sub-trees trained in full (a reward head) out of the frozen
  base, giving ``(trainable, frozen)``.
* :func:`with_adapters` -- ``base`` + ``trainable`` -> the model's ``nnx.State`` with :class:`LoraWeight`
  in the targeted slots (no copy of ``W0``); the other trainable leaves (heads) replace or join the base's.
  The model with its adapters *disabled* is the base itself: ``nnx.merge(graphdef, base)``.
* :func:`merge_weights` -- ``W0 + (α/r) A B`` as plain arrays (for export and fast sampling).
* :func:`bind` / :func:`merge_model` -- inside a jitted step the frozen base is a traced input: ``bind``
  pairs it with the graph definition, and every algorithm builds its model with ``merge_model(graphdef,
  params)``, which is ``nnx.merge`` for a plain graph definition and ``nnx.merge(graphdef,
  with_adapters(base, params))`` for a bound one. The reference model (DPO, RL) is the same bound graph
  merged with the base itself, so it runs without adapters on the single copy of the base weights.

The ``lora`` arguments below are any object with ``rank``, ``alpha``, ``dropout`` and ``targets`` (the
:class:`jaxrlhf.config.LoraConfig` section ``model.lora``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.errors import ModelError
from jaxrlhf.models.mixed_precision import matmul

__all__ = [
    "PROJECTIONS", "A_NAME", "B_NAME", "LoraWeight", "lora_dense", "projections", "add_adapters", "init_lora",
    "with_adapters", "merge_weights", "BoundGraph", "bind", "split_bound", "merge_model", "num_params",
]

Array = jax.Array

# Projection name -> how many leading axes of its (per-layer) weight are input axes, per model family.
_DECODER = {"q": 1, "k": 1, "v": 1, "o": 2, "up": 1, "down": 1}
PROJECTIONS: dict[str, dict[str, int]] = {
    "llama": {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1},
    "gpt2": dict(_DECODER),
    "bert": dict(_DECODER), "roberta": dict(_DECODER), "distilbert": dict(_DECODER),
}
"""The projections LoRA can adapt, per ``ModelConfig.family``: name in the ``layers`` parameter tree ->
number of input axes of its weight (``o [H, d, D]`` contracts two)."""

A_NAME, B_NAME = "lora_a", "lora_b"
"""The keys of a projection's adapter pair in the trainable tree (``layers/q/lora_a``, ``layers/q/lora_b``)."""


# ------------------------------------------------------------------------------------------- the weight

@jax.tree_util.register_pytree_node_class
class LoraWeight:
    """A frozen projection weight with its low-rank update, in the slot of the weight array.

    Attributes (pytree children, sliced together by the layer scan):
      base: ``W0`` ``[L?, in..., out...]`` (frozen: used under ``stop_gradient``).
      a: ``A`` ``[L?, in..., r]``.
      b: ``B`` ``[L?, r, out...]``.
      key: the dropout key(s) (``[L]`` typed keys before the layer scan, one key inside it), or None
        (no dropout: evaluation, sampling, ``rate = 0``).

    Static attributes: ``scale`` (``α / r``) and ``rate`` (dropout probability).

    It answers ``shape``/``dtype``/``ndim`` as ``W0`` and ``w[...]`` with itself, so model code that reads
    ``variable[...]`` gets it unchanged.
    """

    __slots__ = ("base", "a", "b", "key", "scale", "rate")

    def __init__(self, base, a, b, scale: float, rate: float = 0.0, key=None):
        self.base, self.a, self.b, self.key = base, a, b, key
        self.scale, self.rate = float(scale), float(rate)

    def tree_flatten(self):
        return (self.base, self.a, self.b, self.key), (self.scale, self.rate)

    @classmethod
    def tree_unflatten(cls, aux, children):
        base, a, b, key = children
        return cls(base, a, b, aux[0], aux[1], key)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return len(self.base.shape)

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    def __getitem__(self, index):
        if index is Ellipsis:
            return self
        raise TypeError("a LoraWeight supports only w[...] (it is consumed whole by layers.dense)")

    def __repr__(self) -> str:
        return f"LoraWeight(shape={self.shape}, rank={self.rank}, scale={self.scale}, rate={self.rate})"


def _dropout(x: Array, rate: float, key) -> Array:
    """Inverted dropout: each element kept with probability ``1 - rate`` (mask
    ``jax.random.bernoulli(key, 1 - rate, x.shape)``) and scaled by ``1 / (1 - rate)``."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def lora_dense(x: Array, w: LoraWeight, in_axes: int = 1, out_dtype=None) -> Array:
    """``x @ W0 + scale · (drop(x) @ A) @ B`` for one (per-layer) :class:`LoraWeight` (Hu et al. eq. 3).

    The same contraction as :func:`jaxrlhf.models.layers.dense` (``x[..., in...]`` with the weight's first
    ``in_axes`` axes, as 2-D GEMMs on ``[rows, n_in]`` under the mixed-precision policy of
    :func:`~jaxrlhf.models.mixed_precision.matmul`); the update is factored: ``[rows, n_in] @ [n_in, r]``
    then ``[rows, r] @ [r, n_out]``, so no ``[n_in, n_out]`` product is formed. ``W0`` is wrapped in
    ``stop_gradient``. Dropout (rate ``w.rate``, key ``w.key``) applies to the adapter's input only and only
    when ``w.key`` is not None.

    Args:
      x: activations ``[..., in...]``; their dtype is the compute dtype.
      w: the weight: ``base [in..., out...]``, ``a [in..., r]``, ``b [r, out...]``.
      in_axes: number of input axes (2 for an attention output ``[H, d, D]``).
      out_dtype: result dtype (default ``x``'s).

    Returns:
      ``[..., out...]`` in ``out_dtype``.
    """
    base = jax.lax.stop_gradient(w.base)
    n_in = math.prod(base.shape[:in_axes])
    r = w.a.shape[-1]
    lead = x.shape[: x.ndim - in_axes]
    x2 = x.reshape(-1, n_in)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    y = matmul(x2, base.reshape(n_in, -1), out_dtype)
    xa = x2 if w.key is None or w.rate <= 0 else _dropout(x2, w.rate, w.key)
    z = matmul(xa, w.a.reshape(n_in, r)) * jnp.asarray(w.scale, x2.dtype)   # [rows, r]
    y = y + matmul(z, w.b.reshape(r, -1), out_dtype)
    return y.reshape(*lead, *base.shape[in_axes:])


# ------------------------------------------------------------------------------------------- adapters

def projections(model_cfg: Any) -> dict[str, int]:
    """The adaptable projections of ``model_cfg.family`` (:data:`PROJECTIONS`).

    Raises:
      ModelError: a family without an entry.
    """
    family = getattr(model_cfg, "family", None)
    if family not in PROJECTIONS:
        raise ModelError(f"model.lora: family {family!r} has no LoRA projections (supported: {sorted(PROJECTIONS)})")
    return PROJECTIONS[family]


def _is_projection(path: tuple, targets: Sequence[str]) -> bool:
    return len(path) >= 2 and path[-2] == "layers" and path[-1] in targets


def _value(var):
    return var.get_value() if isinstance(var, nnx.Variable) else var


def add_adapters(params: nnx.State, lora: Any, model_cfg: Any, key: Array) -> nnx.State:
    """The LoRA adapters of every targeted projection of ``params``.

    A projection is a parameter at a path ending in ``("layers", name)`` with ``name`` in
    ``lora.targets`` (``layers/q`` of a decoder, ``backbone/layers/q`` of a reward model).

    Args:
      params: the model's ``nnx.State`` (stacked layer weights ``[L, in..., out...]``).
      lora: ``rank`` r, ``targets`` (names of :data:`PROJECTIONS` for the family).
      model_cfg: the model's ``ModelConfig`` (its ``family`` and ``param_dtype``).
      key: PRNG key of ``A``'s initialiser (one uniform draw, cut into the projections in path order).

    Returns:
      An ``nnx.State`` ``{..., "layers": {name: {"lora_a": Param [L, in..., r], "lora_b": Param [L, r, out...]}}}``
      in the base weight's dtype: ``A ~ U(-1/sqrt(n_in), 1/sqrt(n_in))`` (PEFT's kaiming-uniform with
      ``a = √5``), ``B = 0``. Logical axes: ``A`` keeps the weight's layer and input axes, ``B`` its layer
      and output axes; the rank axis is ``None`` (replicated).

    Raises:
      ModelError: a target the family does not have, ``rank < 1``, or no targeted projection in ``params``.
    """
    table = projections(model_cfg)
    bad = [t for t in lora.targets if t not in table]
    if bad:
        raise ModelError(f"model.lora.targets {bad} are not projections of a {model_cfg.family} model; choose "
                         f"from {sorted(table)}")
    r = int(lora.rank)
    if r < 1:
        raise ModelError(f"model.lora.rank must be >= 1, got {r}")
    out = {}
    found = [(p, v) for p, v in nnx.to_flat_state(params) if _is_projection(p, lora.targets)]
    if not found:
        raise ModelError(f"model.lora.targets={tuple(lora.targets)} matched no 'layers/<name>' parameter of the model")
    shapes = [_value(v).shape for _, v in found]
    sizes = [s[0] * math.prod(s[1:1 + table[p[-1]]]) * r for (p, _), s in zip(found, shapes)]
    # One uniform draw for every A, cut on the host (no device kernel to compile per shape).
    u = np.asarray(jax.random.uniform(key, (sum(sizes),), jnp.float32))
    offsets = np.cumsum([0] + sizes)
    for i, (path, var) in enumerate(found):
        w = _value(var)
        in_axes = table[path[-1]]
        axes = getattr(var, "logical_axes", None) or (None,) * len(w.shape)
        L, ins, outs = w.shape[0], w.shape[1:1 + in_axes], w.shape[1 + in_axes:]
        bound = 1.0 / math.sqrt(math.prod(ins))
        a = ((2.0 * u[offsets[i]:offsets[i + 1]] - 1.0) * bound).reshape(L, *ins, r)
        out[path + (A_NAME,)] = nnx.Param(jnp.asarray(a, w.dtype), logical_axes=(*axes[:1 + in_axes], None))
        out[path + (B_NAME,)] = nnx.Param(jnp.asarray(np.zeros((L, r, *outs)), w.dtype),
                                          logical_axes=(axes[0], None, *axes[1 + in_axes:]))
    return nnx.from_flat_state(out)


def init_lora(params: nnx.State, lora: Any, model_cfg: Any, key: Array, *, train: Sequence[str] = ()
              ) -> tuple[nnx.State, nnx.State]:
    """Split a model's params for LoRA training: ``(trainable, frozen)``.

    Args:
      params: the model's ``nnx.State``.
      lora, model_cfg, key: as :func:`add_adapters`.
      train: top-level keys of ``params`` trained in full next to the adapters (a reward model's ``head``).

    Returns:
      ``trainable``: the adapters (:func:`add_adapters`) plus the ``train`` sub-trees (moved, not copied);
      ``frozen``: ``params`` without them (the base; it holds no trained array, so a donated train state
      never aliases it). ``with_adapters(frozen, trainable, lora)`` is the model.

    Raises:
      ModelError: as :func:`add_adapters`, or a ``train`` key that ``params`` does not have.
    """
    missing = [k for k in train if k not in params]
    if missing:
        raise ModelError(f"init_lora: the model has no parameters {missing} to train in full (has {sorted(params)})")
    flat = list(nnx.to_flat_state(params))
    trainable = dict(nnx.to_flat_state(add_adapters(params, lora, model_cfg, key)))
    frozen = {}
    for path, var in flat:
        (trainable if path[0] in train else frozen)[path] = var
    return nnx.from_flat_state(trainable), nnx.from_flat_state(frozen)


def _pairs(trainable: nnx.State) -> tuple[dict, dict]:
    """``({projection path: (A var, B var)}, {other path: var})`` of a trainable tree."""
    pairs: dict = {}
    others = {}
    for path, var in nnx.to_flat_state(trainable):
        if path and path[-1] in (A_NAME, B_NAME):
            pairs.setdefault(path[:-1], {})[path[-1]] = var
        else:
            others[path] = var
    for proj, ab in pairs.items():
        if set(ab) != {A_NAME, B_NAME}:
            raise ValueError(f"adapter {'/'.join(map(str, proj))} needs both {A_NAME} and {B_NAME}, got {sorted(ab)}")
    return {p: (ab[A_NAME], ab[B_NAME]) for p, ab in pairs.items()}, others


def with_adapters(base: nnx.State, trainable: nnx.State, lora: Any, key: Array | None = None) -> nnx.State:
    """The model's ``nnx.State``: ``base`` with each adapted projection replaced by a :class:`LoraWeight`.

    No weight is copied: the state refers to the arrays of ``base`` and ``trainable``. Leaves of
    ``trainable`` that are not adapter pairs (task heads) replace or join ``base``'s at the same path; so
    ``with_adapters(base, base, lora)`` is ``base`` (the model with its adapters disabled).

    Args:
      base: frozen params (every projection ``[L, in..., out...]``).
      trainable: adapters (:func:`add_adapters`) and other trained leaves.
      lora: ``alpha`` (scale ``alpha / r``) and ``dropout`` (rate).
      key: dropout key; None = no dropout (evaluation, sampling). Each adapted projection draws from
        ``fold_in(key, i)`` (i = its index in path order), split into one key per layer.

    Returns:
      An ``nnx.State`` for ``nnx.merge(graphdef, .)``.

    Raises:
      ValueError: an adapter for a path ``base`` lacks, or an adapter without its partner.
    """
    pairs, others = _pairs(trainable)
    flat = dict(nnx.to_flat_state(base))
    flat.update(others)
    rate = float(lora.dropout)
    for i, (proj, (a, b)) in enumerate(sorted(pairs.items(), key=lambda kv: tuple(map(str, kv[0])))):
        if proj not in flat:
            raise ValueError(f"adapter {'/'.join(map(str, proj))} has no base weight at that path")
        w0 = flat[proj]
        av, bv = _value(a), _value(b)
        k = None
        if key is not None and rate > 0:
            k = jax.random.split(jax.random.fold_in(key, i), _value(w0).shape[0])
        lw = LoraWeight(_value(w0), av, bv, float(lora.alpha) / av.shape[-1], rate, k)
        flat[proj] = w0.replace(lw) if isinstance(w0, nnx.Variable) else lw
    return nnx.from_flat_state(flat)


def merge_weights(base: nnx.State, trainable: nnx.State, lora: Any) -> nnx.State:
    """Plain params with the adapters folded in: ``W = W0 + (α/r) · A B`` per layer (f32 product at full
    precision, cast to ``W0``'s dtype); other trainable leaves replace or join ``base``'s.

    For export (``save_hf_folder``) and for a sampler that should not pay the adapters' extra GEMMs. The
    result is a new array for every adapted projection (a second copy of those weights).

    Args:
      base, trainable, lora: as :func:`with_adapters` (``alpha`` is read).

    Returns:
      An ``nnx.State`` shaped like the full model's params.
    """
    pairs, others = _pairs(trainable)
    flat = dict(nnx.to_flat_state(base))
    flat.update(others)
    projs = list(pairs)
    merged = _merge_all([_value(flat[p]) for p in projs], [_value(pairs[p][0]) for p in projs],
                        [_value(pairs[p][1]) for p in projs], alpha=float(lora.alpha))
    for proj, m in zip(projs, merged):
        w0 = flat[proj]
        flat[proj] = w0.replace(m) if isinstance(w0, nnx.Variable) else m
    return nnx.from_flat_state(flat)


@functools.partial(jax.jit, static_argnames=("alpha",))
def _merge_all(ws: list, as_: list, bs: list, *, alpha: float) -> list:
    """``W0 + (alpha/r) A B`` for lists of stacked weights (one compiled function for all projections)."""
    out = []
    for w, a, b in zip(ws, as_, bs):
        L, r = a.shape[0], a.shape[-1]
        delta = jnp.einsum("lir,lro->lio", a.reshape(L, -1, r).astype(jnp.float32),
                           b.reshape(L, r, -1).astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        out.append((w.astype(jnp.float32) + (alpha / r) * delta.reshape(w.shape)).astype(w.dtype))
    return out


def num_params(tree: Any) -> int:
    """Number of array elements in a pytree (e.g. the trainable params, or an optimizer state)."""
    return sum(int(math.prod(getattr(x, "shape", ()))) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------------------- inside a step

@dataclasses.dataclass(frozen=True, eq=False)
class BoundGraph:
    """A graph definition with LoRA's frozen base weights bound to it (:func:`bind`).

    Pass it where a step or loss takes a ``graphdef``: :func:`merge_model` then builds
    ``nnx.merge(graphdef, with_adapters(base, params, lora, key))``. Made inside a trace (``base`` is the
    step's traced input); not a pytree and not hashable, so never a jit static argument.
    """

    graphdef: Any
    base: Any
    lora: Any
    key: Any = None


def bind(graphdef: Any, base: nnx.State, lora: Any, key: Array | None = None) -> BoundGraph:
    """``BoundGraph(graphdef, base, lora, key)``: the model ``graphdef`` whose params are ``base`` + adapters
    (``key`` = dropout key, None = no dropout)."""
    return BoundGraph(graphdef, base, lora, key)


def split_bound(graphdef: Any, params: Any) -> tuple[Any, Any]:
    """``(graphdef, state)`` for ``nnx.merge``: unchanged for a plain graph definition; for a
    :class:`BoundGraph`, its graph definition and ``with_adapters(base, params, lora, key)``."""
    if isinstance(graphdef, BoundGraph):
        return graphdef.graphdef, with_adapters(graphdef.base, params, graphdef.lora, graphdef.key)
    return graphdef, params


def merge_model(graphdef: Any, params: Any, *states: Any) -> Any:
    """``nnx.merge(graphdef, params, *states)``, where ``graphdef`` may be a :class:`BoundGraph` (LoRA: the
    module is built from the bound base with ``params`` as its adapters; pass the base itself as
    ``params`` for the model without adapters)."""
    gd, st = split_bound(graphdef, params)
    return nnx.merge(gd, st, *states)
