"""Sharding in one place: the device mesh, the logical-axis rules table, and helpers.

Parameters and activations are annotated with *logical* axis names (``batch``, ``length``, ``embed``,
``mlp``, ``heads``, ``kv_heads``, ``head_dim``, ``vocab``, ``layers``). One rules table, ``LOGICAL_RULES``,
maps each logical name to physical mesh axes (``data``, ``fsdp``, ``tensor``). Change the table, not the
models, to change a parallelism layout.

* ``data``   — pure data parallelism: the batch is split, parameters are replicated.
* ``fsdp``   — the batch is split *and* parameters are sharded along their ``embed`` axis (ZeRO-3 style);
  XLA all-gathers a layer's weights when it needs them.
* ``tensor`` — Megatron-style tensor parallelism over heads / MLP width / vocabulary.

The mesh is always passed explicitly by the caller. Inside a jitted step the caller enters
``jax.set_mesh(mesh)``; :func:`constrain` then pins activations at block boundaries and is a no-op when
no mesh is set (plain single-device use).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrlhf.errors import MeshError

__all__ = [
    "MESH_AXES", "LOGICAL_RULES", "ACTIVATION_RULES", "MeshConfig", "make_mesh", "logical_to_spec",
    "state_shardings", "batch_sharding", "place_batch", "place_global_batch", "check_batch_divisible",
    "check_heads_divisible", "replicated", "constrain", "embed_lookup",
]

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# logical axis -> physical mesh axis (or tuple of axes, or None = replicated).
LOGICAL_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "pair": None,
    "length": None,
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "vocab": "tensor",
    "layers": None,
    "classes": None,
    "cache_length": None,
    "norm": None,
}

# Activations use the same table except that ``embed`` on activations is not sharded over ``fsdp``
# (that axis already splits the batch).
ACTIVATION_RULES: dict[str, Any] = {**LOGICAL_RULES, "embed": None}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Shape of the device mesh. One entry may be ``-1``: it is filled with the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """Resolve ``-1`` against ``num_devices``.

        Raises:
          MeshError: (a ValueError) more than one ``-1``, a non-positive size, more devices asked for
            than ``num_devices``, or sizes whose product is not ``num_devices``.
        """
        sizes = [self.data, self.fsdp, self.tensor]
        unknown = [i for i, s in enumerate(sizes) if s == -1]
        if len(unknown) > 1:
            raise MeshError(f"mesh: at most one axis may be -1, got {dataclasses.asdict(self)}; give the "
                            "other axes explicit sizes")
        for name, s in zip(MESH_AXES, sizes):
            if s != -1 and s < 1:
                raise MeshError(f"mesh.{name} must be a positive integer or -1, got {s}")
        known = math.prod(s for s in sizes if s != -1)
        if known > num_devices:
            raise MeshError(
                f"mesh asks for {known} devices ({' x '.join(f'{n}={s}' for n, s in zip(MESH_AXES, sizes) if s != -1)})"
                f" but only {num_devices} are present; lower the mesh sizes, or set one axis to -1 to use the "
                "devices there are")
        if unknown:
            if num_devices % known:
                raise MeshError(
                    f"mesh: {num_devices} devices cannot be split into {dataclasses.asdict(self)}; "
                    f"the fixed axes multiply to {known}, which does not divide {num_devices}")
            sizes[unknown[0]] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise MeshError(
                f"mesh: data*fsdp*tensor = {math.prod(sizes)} but {num_devices} devices are available; "
                "set one axis to -1 to use them all")
        return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a ``Mesh`` with axes ``("data", "fsdp", "tensor")``.

    Args:
      cfg: axis sizes; one may be -1.
      devices: defaults to ``jax.devices()`` (all processes' devices in multi-host runs).
    Raises:
      MeshError: (a ValueError) the sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.shape(len(devices))
    try:
        device_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001 — fall back to a plain reshape on exotic topologies / fake devices
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None] | None, rules: dict[str, Any] = LOGICAL_RULES,
                    mesh: Mesh | None = None) -> PartitionSpec:
    """Map logical axis names to a ``PartitionSpec`` through ``rules``.

    A physical axis is used at most once per array (a later logical axis that maps to an axis already
    used is left replicated). When ``mesh`` is given, mesh axes of size 1 are dropped.

    Raises:
      KeyError: a logical name missing from the rules table.
    """
    if logical_axes is None:
        return PartitionSpec()
    used: set[str] = set()
    out = []
    for name in logical_axes:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} is not in the sharding rules table {sorted(rules)}")
        phys = rules[name]
        phys_t = (phys,) if isinstance(phys, str) else tuple(phys or ())
        phys_t = tuple(a for a in phys_t if a not in used and (mesh is None or mesh.shape[a] > 1))
        used.update(phys_t)
        out.append(None if not phys_t else phys_t[0] if len(phys_t) == 1 else phys_t)
    return PartitionSpec(*out)


def _divisible(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    """Drop sharding on dimensions the mesh does not divide (e.g. 3 kv heads on tensor=2)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
        out.append(axes if dim % size == 0 else None)
    return PartitionSpec(*out)


def state_shardings(state: Any, mesh: Mesh, rules: dict[str, Any] = LOGICAL_RULES) -> Any:
    """``NamedSharding`` for every leaf of a parameter tree or of a whole train state (the one helper).

    * A parameter tree (an NNX ``State`` or any pytree of ``nnx.Variable``): each Variable carrying
      ``logical_axes`` metadata is sharded by the rules table; everything else (scalars, RNG state) is
      replicated.
    * A train state (any dataclass with ``params`` and ``opt_state``, e.g.
      :class:`jaxrlhf.train_state.TrainState`): ``params`` as above; every sub-tree of ``opt_state``
      shaped like the parameters (optax's ``mu``/``nu``) reuses the parameters' shardings; every other
      field (``step``, ``extra``, optimizer counters) is replicated.

    Returns a pytree with the same structure (Variables replaced by their sharding), usable as
    ``in_shardings``/``out_shardings``.
    """
    if hasattr(state, "params") and hasattr(state, "opt_state"):
        return _train_state_shardings(state, mesh, rules)

    def one(x):
        if isinstance(x, nnx.Variable):
            axes = getattr(x, "logical_axes", None)
            value = x.get_value() if hasattr(x, "get_value") else x.value
            spec = logical_to_spec(axes, rules, mesh) if axes is not None else PartitionSpec()
            return x.replace(NamedSharding(mesh, _divisible(np.shape(value), spec, mesh)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _train_state_shardings(state: Any, mesh: Mesh, rules: dict[str, Any]) -> Any:
    param_sh = state_shardings(state.params, mesh, rules)
    leaves_sh = jax.tree.leaves(param_sh)
    param_struct = jax.tree.structure(state.params)
    rep = lambda tree: jax.tree.map(lambda _: replicated(mesh), tree)  # noqa: E731

    def walk(node):
        if jax.tree.structure(node) == param_struct:  # mu, nu, ...: follow the parameters
            return jax.tree.unflatten(param_struct, leaves_sh)
        if hasattr(node, "_fields"):  # NamedTuple optimizer states
            return type(node)(*[walk(n) for n in node])
        if isinstance(node, (tuple, list)):
            return type(node)(walk(n) for n in node)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        return rep(node)

    others = {f.name: rep(getattr(state, f.name)) for f in dataclasses.fields(state)
              if f.name not in ("params", "opt_state")}
    return dataclasses.replace(state, params=param_sh, opt_state=walk(state.opt_state), **others)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding for a batch array of rank ``ndim``: leading axis over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), LOGICAL_RULES, mesh))


def place_batch(batch: Any, mesh: Mesh) -> Any:
    """Host (numpy) data -> global ``jax.Array`` sharded over (data, fsdp) on its leading axis (the one
    helper for putting host batches on the mesh; also used for single arrays such as host rewards).

    Args:
      batch: a pytree of process-local arrays (a dict batch, or one array), leading axis = local rows;
        the global leading size is ``local * process_count``.
    """
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)),
                                                                         np.asarray(v)), batch)


def place_global_batch(batch: Any, mesh: Mesh) -> Any:
    """Like :func:`place_batch` for a batch that every process holds whole (the same rows on each, e.g. a
    replicated held-out set): the global leading size is the batch's own, each device takes its rows.
    With one process it is :func:`place_batch`.

    Args:
      batch: a pytree of arrays, identical on every process, leading axis = the global rows.
    """
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(
        batch_sharding(mesh, np.ndim(v)), np.asarray(v), np.shape(v)), batch)


def check_batch_divisible(batch_size: int, mesh: Mesh, field: str = "data.batch_size") -> None:
    """Raise :class:`~jaxrlhf.errors.MeshError` (a ValueError) before any compute if the batch does not
    split over the data axes."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n:
        raise MeshError(
            f"{field}={batch_size} is not divisible by mesh data*fsdp = {n} "
            f"(mesh {dict(mesh.shape)}); choose a multiple of {n} or change the mesh")


def check_heads_divisible(model_cfg: Any, mesh: Mesh) -> None:
    """Raise :class:`~jaxrlhf.errors.MeshError` (a ValueError) before anything is compiled when the mesh's
    ``tensor`` axis does not divide the model's attention heads (``model_cfg.num_heads`` and
    ``num_kv_heads``): tensor parallelism splits the heads (``LOGICAL_RULES``), and a dimension the axis
    does not divide would silently stay replicated. The message lists the tensor sizes that work (the
    divisors of ``gcd(num_heads, num_kv_heads)``)."""
    t = mesh.shape["tensor"]
    heads = getattr(model_cfg, "num_heads", None)
    if t == 1 or heads is None:
        return
    kv = getattr(model_cfg, "num_kv_heads", None) or heads
    bad = [f"{name}={n}" for name, n in (("num_heads", heads), ("num_kv_heads", kv)) if n % t]
    if bad:
        g = math.gcd(heads, kv)
        fits = [d for d in range(1, g + 1) if g % d == 0]
        raise MeshError(f"mesh.tensor={t} does not divide the model's {' and '.join(bad)}: tensor parallelism "
                        f"splits the attention heads; use mesh.tensor in {fits} and put the other devices on "
                        "mesh.data or mesh.fsdp")


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy of the array on every device of ``mesh`` (``PartitionSpec()``)."""
    return NamedSharding(mesh, PartitionSpec())


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical names; a no-op outside ``jax.set_mesh``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, ACTIVATION_RULES)
    spec = PartitionSpec(*[
        a if a is None or all(ax in mesh.axis_names for ax in ((a,) if isinstance(a, str) else a)) else None
        for a in spec])
    spec = _divisible(x.shape, spec, mesh)  # type: ignore[arg-type]
    return jax.lax.with_sharding_constraint(x, spec)


def _mesh_axes(rule: Any, mesh: Any) -> tuple[str, ...]:
    """The physical axes of one rules-table entry that ``mesh`` has with size > 1."""
    axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
    return tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)


def embed_lookup(table_VD: jax.Array, ids: jax.Array) -> jax.Array:
    """``table_VD[ids]``: rows of an embedding table, ``[V, D]`` gathered by integer ``ids [...]`` into
    ``[..., D]`` (``jnp.take`` along axis 0, same dtype as the table), laid out so that XLA's SPMD
    partitioner never has to replicate the result.

    The table is a parameter: its ``embed`` axis is split over ``fsdp`` (``LOGICAL_RULES``), so a plain
    gather yields activations with ``D`` split over ``fsdp``, while activations want their batch split over
    ``(data, fsdp)`` and ``D`` whole (``ACTIVATION_RULES``). With ``data > 1`` and ``fsdp > 1`` no single
    collective goes from the one layout to the other, and XLA prints "Involuntary full rematerialization"
    (it all-gathers the whole ``[B, T, D]`` on every device and slices it again, forward and backward).
    Here the ids are split over the batch axes that the table's ``embed`` does not use (``data``), the
    gather's output is pinned to ``[batch over data, ..., D over fsdp]``, and the next
    :func:`constrain` to the activation layout is one all-to-all within each ``fsdp`` group (its
    transpose in the backward pass likewise). Outside ``jax.set_mesh`` (or when ``fsdp`` is 1) this is
    ``jnp.take(table_VD, ids, axis=0)``.
    """
    import jax.numpy as jnp

    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or jnp.ndim(ids) == 0:
        return jnp.take(table_VD, ids, axis=0)
    embed = _mesh_axes(LOGICAL_RULES["embed"], mesh)
    if not embed or table_VD.shape[-1] % math.prod(mesh.shape[a] for a in embed):
        return jnp.take(table_VD, ids, axis=0)
    batch = tuple(a for a in _mesh_axes(ACTIVATION_RULES["batch"], mesh) if a not in embed)
    lead = None if not batch else batch[0] if len(batch) == 1 else batch
    rest = (None,) * (ids.ndim - 1)
    ids = jax.lax.with_sharding_constraint(ids, _divisible(ids.shape, PartitionSpec(lead, *rest), mesh))
    out = jnp.take(table_VD, ids, axis=0)
    spec = PartitionSpec(lead, *rest, embed[0] if len(embed) == 1 else embed)
    return jax.lax.with_sharding_constraint(out, _divisible(out.shape, spec, mesh))
