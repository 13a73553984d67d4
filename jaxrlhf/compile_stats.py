"""What a jitted step costs before it runs: its compiled memory per device and its FLOPs.

:func:`analyze` lowers and compiles a jitted function ahead of time (JAX's AOT API,
``jitted.trace(*args).lower().compile()``) with example arguments -- concrete arrays or abstract
``jax.ShapeDtypeStruct`` s carrying their ``NamedSharding`` -- and returns a :class:`CompileStats`:

* XLA's buffer assignment (``compiled.memory_analysis()``), **per device**: ``argument_bytes`` (the
  inputs' shards), ``output_bytes``, ``temp_bytes`` (every intermediate live at once at the peak of the
  schedule: activations kept for the backward pass, gathered FSDP weights, gradients, optimizer
  temporaries), ``generated_code_bytes`` and ``alias_bytes`` (outputs written into donated input
  buffers). ``peak_bytes = argument + output - alias + temp + generated_code`` is what the device must
  hold; ``arguments`` splits ``argument_bytes`` into parts (``params``, ``opt_state``, ``batch``, ...)
  computed from each input's shape, dtype and sharding (:func:`per_device_bytes`).
* FLOPs: ``flops`` counts the matmuls (``dot_general``) of the traced program for the whole mesh, with
  each ``lax.scan`` body multiplied by its length (:func:`matmul_flops`). XLA's own count
  (``compiled.cost_analysis()["flops"]``, per device, every op) is kept as ``xla_flops_per_device``, but
  it counts the body of a loop once: for the rolled layer loop (``model.scan_unroll=1``) it misses about
  ``(L-1)/L`` of the work. A ``while_loop`` (the sampler's decode loop) has no static trip count; its
  body is counted once and ``unknown_trip_loops`` says how many such loops there were.

The AOT compile is the one the run uses: ``jitted(*args)`` later finds the executable in JAX's
compilation cache (same function, same argument shapes/dtypes/shardings, same mesh context), so the
report costs no second compile (``tests/test_compile_stats.py`` counts XLA compilations to check it).

At start-up every driver reports its train step (:func:`report_startup`, called by
:func:`jaxrlhf.drivers.core.drive`) and the RL driver its rollout, experience and update functions
(:func:`report_rl`): a log line per function ("sft step compiled: 1.23 GiB/device (...), 4.50 TFLOP/step")
and ``runs/<name>/compile.json``.

On a CPU host the figures are XLA:CPU's buffer assignment, a proxy for a GPU/TPU compile of the same
program: the partitioning (what each device holds, what is gathered) is the same, but fusion, layouts,
scheduling and the backend's own scratch space differ (``docs/scaling.md``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

__all__ = ["CompileStats", "analyze", "analyze_rl", "matmul_flops", "per_device_bytes", "format_stats",
           "write_report", "report_startup", "report_rl", "GiB"]

log = logging.getLogger("jaxrlhf")

GiB = float(2 ** 30)
"""Bytes per GiB (the unit of the log line and of ``bench/memory_plan.py``)."""


@dataclasses.dataclass(frozen=True)
class CompileStats:
    """One compiled function's memory (bytes, **per device**) and work (FLOPs).

    Attributes:
      name: what was compiled (``"sft step"``, ``"rollout"``, ...).
      argument_bytes / output_bytes / temp_bytes / generated_code_bytes / alias_bytes: XLA's
        ``memory_analysis()`` of the compiled executable (per device).
      arguments: ``argument_bytes`` split by part (``params``, ``opt_state``, ``state_other`` of a train state,
        then one entry per further argument name), computed from the shapes, dtypes and shardings of the
        inputs the executable reads.
      unused_argument_bytes: inputs passed but not read (XLA drops them: e.g. the optimizer state passed
        to the RL experience pass). They stay on the device all the same: not in ``peak_bytes``.
      flops: matmul FLOPs of one call, whole mesh (:func:`matmul_flops`).
      xla_flops_per_device: XLA's ``cost_analysis()["flops"]`` (per device; a loop body counted once).
      bytes_accessed_per_device: XLA's ``cost_analysis()["bytes accessed"]`` (same caveat).
      devices: devices the program runs on.
      compile_s: wall time of trace + lower + compile (a cache hit if the function was compiled before).
      unknown_trip_loops: ``while_loop`` s whose body ``flops`` counts once.
    """

    name: str
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    alias_bytes: int
    arguments: dict[str, int]
    flops: float
    xla_flops_per_device: float
    bytes_accessed_per_device: float
    devices: int
    compile_s: float
    unknown_trip_loops: int = 0
    unused_argument_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        """Bytes one device holds while the function runs: ``argument + output - alias + temp + code``."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.generated_code_bytes)

    @property
    def flops_per_device(self) -> float:
        """``flops / devices`` (the matmul work of one device if the mesh splits it evenly)."""
        return self.flops / max(self.devices, 1)

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field plus ``peak_bytes`` and ``flops_per_device``."""
        return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes, "flops_per_device": self.flops_per_device}


# ------------------------------------------------------------------------------------------- pieces

def per_device_bytes(tree: Any) -> int:
    """Bytes of one device's shards of every array leaf of ``tree`` (the device holding the most).

    Leaves are ``jax.Array`` s or ``jax.ShapeDtypeStruct`` s; a leaf's shard shape comes from its
    ``sharding`` (``sharding.shard_shape(shape)``), a leaf without one counts whole. ``None`` and
    non-array leaves count 0. PRNG key arrays count their key data (8 bytes per threefry key).
    """
    total = 0
    for x in jax.tree.leaves(tree):
        shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
        if shape is None or dtype is None:
            continue
        sharding = getattr(x, "sharding", None)
        shard = sharding.shard_shape(tuple(shape)) if sharding is not None and hasattr(sharding, "shard_shape") \
            else tuple(shape)
        total += math.prod(shard) * int(dtype.itemsize)
    return total


def _dot_flops(eqn) -> float:
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    (lc, _), (lb, _) = eqn.params["dimension_numbers"]
    contract = math.prod(lhs.shape[i] for i in lc)
    batch = math.prod(lhs.shape[i] for i in lb)
    lhs_free = math.prod(lhs.shape) // max(contract * batch, 1)
    rhs_free = math.prod(rhs.shape) // max(contract * batch, 1)
    return 2.0 * batch * contract * lhs_free * rhs_free


def _sub_jaxprs(value) -> list:
    """The jaxprs inside one equation parameter (a Jaxpr, a ClosedJaxpr, or a tuple/list of them)."""
    if hasattr(value, "eqns"):
        return [value]
    if hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        return [value.jaxpr]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def _count(jaxpr) -> tuple[float, int]:
    flops, unknown = 0.0, 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            flops += _dot_flops(eqn)
            continue
        subs = {k: _sub_jaxprs(v) for k, v in eqn.params.items()}
        counts = {k: [_count(j) for j in js] for k, js in subs.items() if js}
        if name == "scan":
            f, u = counts["jaxpr"][0]
            flops, unknown = flops + eqn.params["length"] * f, unknown + u
        elif name == "cond":  # one branch runs: count the costliest
            f, u = max(counts["branches"])
            flops, unknown = flops + f, unknown + u
        else:
            if name == "while":
                unknown += 1
            for results in counts.values():
                for f, u in results:
                    flops, unknown = flops + f, unknown + u
    return flops, unknown


def matmul_flops(closed_jaxpr) -> tuple[float, int]:
    """``(flops, unknown_trip_loops)``: the matmul FLOPs of one run of a traced program.

    Each ``dot_general`` of shapes ``[batch, M, K] x [batch, K, N]`` counts ``2·batch·M·K·N`` (a
    multiply-add is 2 FLOPs, the convention of Kaplan et al. 2020's ``6·N·tokens``); a ``lax.scan`` body
    counts ``length`` times, a ``cond`` its costliest branch, a ``while_loop`` body once (its trip count
    is not static; counted in ``unknown_trip_loops``); any other equation with sub-programs (``pjit``,
    ``remat``, custom derivatives) counts them once. Element-wise work is not counted. The program is the
    global (unpartitioned) one: the FLOPs of the whole mesh.

    Args:
      closed_jaxpr: ``jitted.trace(*args).jaxpr`` or ``jax.make_jaxpr(f)(*args)``.
    """
    return _count(closed_jaxpr.jaxpr if hasattr(closed_jaxpr, "jaxpr") else closed_jaxpr)


def _argument_parts(args: Sequence[Any], arg_names: Sequence[str], in_shardings: Any) -> tuple[dict[str, int], int]:
    """``(parts, unused)``: per-device bytes of the inputs the executable reads, by part, and of those it
    does not read (XLA drops them; ``compiled.input_shardings`` holds None in their place)."""
    parts: dict[str, int] = {}
    unused = 0

    def add(part: str, value: Any, shardings: Any) -> None:
        nonlocal unused
        leaves = jax.tree.leaves(value)
        kept = jax.tree.leaves(shardings, is_leaf=lambda x: x is None)
        if len(kept) != len(leaves):  # cannot tell: count every leaf as read
            kept = [True] * len(leaves)
        for leaf, sh in zip(leaves, kept):
            if sh is None:
                unused += per_device_bytes(leaf)
            else:
                parts[part] = parts.get(part, 0) + per_device_bytes(leaf)
        parts.setdefault(part, 0)

    for name, arg, sh in zip(arg_names, args, in_shardings):
        if hasattr(arg, "params") and hasattr(arg, "opt_state"):  # a TrainState (and its shardings)
            add("params", arg.params, sh.params)
            add("opt_state", arg.opt_state, sh.opt_state)
            others = [f.name for f in dataclasses.fields(arg) if f.name not in ("params", "opt_state")]
            add("state_other", [getattr(arg, n) for n in others], [getattr(sh, n) for n in others])
        else:
            add(name, arg, sh)
    return parts, unused


def _num_devices(args: Sequence[Any], mesh) -> int:
    if mesh is not None:
        return int(mesh.size)
    sets = [len(s.device_set) for s in (getattr(x, "sharding", None) for x in jax.tree.leaves(args))
            if s is not None and hasattr(s, "device_set")]
    return max(sets, default=1)


def analyze(fn: Any, *args: Any, name: str = "step", mesh=None, arg_names: Sequence[str] | None = None
            ) -> tuple[CompileStats, Any]:
    """Lower and compile ``fn`` for ``args`` (ahead of time, nothing runs) and measure it.

    Args:
      fn: a ``jax.jit`` object, or a wrapper carrying one as ``.jitted`` (``jaxrlhf.train_state.jit_step``,
        the RL driver's functions).
      *args: the positional arguments of a call: arrays, or ``jax.ShapeDtypeStruct`` with their
        ``sharding`` (``NamedSharding`` on ``mesh``); only shapes, dtypes and shardings are used.
      name: the function's name in the report.
      mesh: entered with ``jax.set_mesh`` around tracing, as the run's calls do (the models' activation
        constraints need it, and the mesh context is part of JAX's cache key); None: no mesh context.
      arg_names: a name per positional argument for :attr:`CompileStats.arguments` (default ``arg0``, ...).

    Returns:
      ``(stats, compiled)``: the :class:`CompileStats` and the ``jax.stages.Compiled`` executable.

    Raises:
      TypeError: ``fn`` is not a ``jax.jit`` object and carries none as ``.jitted``.
    """
    jitted = getattr(fn, "jitted", fn)
    if not hasattr(jitted, "trace"):
        raise TypeError(f"analyze needs a jax.jit function (or one with a .jitted attribute), got {type(fn).__name__}")
    names = list(arg_names or ())
    names += [f"arg{i}" for i in range(len(names), len(args))]
    t0 = time.perf_counter()
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        traced = jitted.trace(*args)
        compiled = traced.lower().compile()
    compile_s = time.perf_counter() - t0
    flops, unknown = matmul_flops(traced.jaxpr)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jaxlibs: one dict per partition
        cost = cost[0] if cost else {}
    cost = cost or {}
    get = lambda attr: int(getattr(mem, attr, 0) or 0) if mem is not None else 0  # noqa: E731
    parts, unused = _argument_parts(args, names, compiled.input_shardings[0])
    stats = CompileStats(
        name=name, argument_bytes=get("argument_size_in_bytes"), output_bytes=get("output_size_in_bytes"),
        temp_bytes=get("temp_size_in_bytes"), generated_code_bytes=get("generated_code_size_in_bytes"),
        alias_bytes=get("alias_size_in_bytes"), arguments=parts, unused_argument_bytes=unused, flops=flops,
        xla_flops_per_device=float(cost.get("flops", 0.0)),
        bytes_accessed_per_device=float(cost.get("bytes accessed", 0.0)),
        devices=_num_devices(args, mesh), compile_s=compile_s, unknown_trip_loops=unknown)
    return stats, compiled


# ------------------------------------------------------------------------------------------- reporting

def format_stats(stats: CompileStats) -> str:
    """The one-line start-up report of a compiled function (memory per device in GiB, or MiB below half a
    GiB; work in TFLOP)::

        sft step compiled: 1.23 GiB/device (arguments 0.50 [params 0.17, opt_state 0.33, batch 0.00],
        outputs 0.50 (0.50 aliasing donated arguments), temp 0.60, code 0.00); 4.500 TFLOP/call
        (0.563/device) in 12.3 s
    """
    unit, scale = ("GiB", GiB) if stats.peak_bytes >= GiB / 2 else ("MiB", 2.0 ** 20)
    g = lambda b: f"{b / scale:.2f}"  # noqa: E731
    parts = ", ".join(f"{k} {g(v)}" for k, v in stats.arguments.items())
    loops = (f", {stats.unknown_trip_loops} while-loop body counted once" if stats.unknown_trip_loops else "")
    unused = f", {g(stats.unused_argument_bytes)} passed but unread" if stats.unused_argument_bytes else ""
    return (f"{stats.name} compiled: {g(stats.peak_bytes)} {unit}/device (arguments {g(stats.argument_bytes)} "
            f"[{parts}{unused}], outputs {g(stats.output_bytes)} ({g(stats.alias_bytes)} aliasing donated "
            f"arguments), temp {g(stats.temp_bytes)}, code {g(stats.generated_code_bytes)}); "
            f"{stats.flops / 1e12:.3f} TFLOP/call ({stats.flops_per_device / 1e12:.3f}/device{loops}) "
            f"in {stats.compile_s:.1f} s")


def write_report(path: Any, stats: Sequence[CompileStats], **extra: Any) -> dict:
    """Write ``{"functions": {name: stats.to_dict()}, "units": ..., **extra}`` as JSON to ``path`` (process
    0 only) and return it."""
    import pathlib

    report = {"functions": {s.name: s.to_dict() for s in stats},
              "units": "bytes per device; flops per call for the whole mesh", **extra}
    if jax.process_index() == 0:
        p = pathlib.Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(report, indent=2, sort_keys=True))
    return report


def _peek(batches: Any) -> Any:
    """The next batch of a resumable iterator without consuming it (``get_state``/``set_state``)."""
    position = batches.get_state()
    batch = next(batches)
    batches.set_state(position)
    return batch


def _emit(run: Any, stats: list[CompileStats]) -> list[CompileStats]:
    for s in stats:
        log.info("%s", format_stats(s))
    write_report(run.dir.path / "compile.json", stats, mesh=dict(run.mesh.shape),
                 platform=jax.devices()[0].platform)
    return stats


def report_startup(run: Any, step_fn: Callable, state: Any, batches: Any, place: Callable, step_args: tuple = (),
                   name: str = "step") -> list[CompileStats] | None:
    """At start-up: compile ``step_fn`` for the run's first batch, log it and write ``runs/<name>/compile.json``.

    ``step_fn`` is a :func:`jaxrlhf.train_state.jit_step` step (with ``.jitted``); the compile is the
    one the loop's first call reuses (JAX's cache). Other step functions (the RL iteration, which
    reports through :func:`report_rl`) and runs with nothing left to train are skipped (None).

    Args:
      run: the driver's :class:`jaxrlhf.drivers.core.Run` (``dir``, ``mesh``, ``cfg.train.steps``).
      step_fn: the step, called as ``step_fn(state, place(batch), *step_args)``; the ``step_args`` (frozen
        parameters: LoRA's base, DPO's reference) are reported together as ``frozen``.
      state: the train state (arrays; nothing is donated here).
      batches: the batch iterator (``get_state``/``set_state``; peeked, not consumed).
      place: host batch -> device batch.
      name: the name in the report (e.g. ``"sft step"``).
    """
    if not hasattr(step_fn, "jitted") or not hasattr(batches, "get_state"):
        return None
    if int(jax.device_get(state.step)) >= run.cfg.train.steps:
        return None
    args = (state, place(_peek(batches)), *step_args)
    names = ("state", "batch") + ("frozen",) * len(step_args)
    stats, _ = analyze(step_fn, *args, name=name, mesh=run.mesh, arg_names=names)
    return _emit(run, [stats])


def _abstract_outputs(compiled: Any) -> Any:
    """``ShapeDtypeStruct`` s (shape, dtype, sharding) of a compiled function's outputs."""
    info = jax.tree.leaves(compiled.out_info)
    shardings = jax.tree.leaves(compiled.output_shardings)
    flat = [jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=s) for o, s in zip(info, shardings)]
    return jax.tree.unflatten(jax.tree.structure(compiled.out_info), flat)


def report_rl(run: Any, fns: Any, state: Any, ref_params: Any, batches: Any, group_size: int,
              extra_args: tuple = ()) -> list[CompileStats] | None:
    """At start-up: compile the RL iteration's ``rollout`` (the sampler at the training batch), its
    ``experience`` and its ``update``, log each and write ``runs/<name>/compile.json``.

    The update's inputs are the experience's outputs, whose shapes and shardings come from the compiled
    experience; the experience's scores are taken as host-placed (``place_batch``: split over the batch
    axes). Each compile is the one the first iteration reuses, except that an on-device reward whose
    scores come out with another sharding makes the experience compile once more.

    Args:
      run: the driver's ``Run``.
      fns: the :class:`jaxrlhf.drivers.rl.RLFunctions` (jitted ``generate``/``experience``/``update``).
      state: the train state (``params["policy"]`` is the policy).
      ref_params: the placed reference parameters.
      batches: the prompt iterator (peeked, not consumed).
      group_size: completions per prompt (rows are repeated as the driver's ``place`` does).
      extra_args: what the driver's calls append to every jitted function's arguments (LoRA's frozen
        base, ``Trainable.step_args``); reported as ``frozen``.
    """
    from jaxrlhf.algos.rollout import repeat_prompts
    from jaxrlhf.sharding import place_batch

    if not hasattr(batches, "get_state") or int(jax.device_get(state.step)) >= run.cfg.train.steps:
        return None
    prompts = place_batch(repeat_prompts(_peek(batches), group_size), fns.mesh)
    return _emit(run, analyze_rl(fns, state, ref_params, prompts["prompt_tokens"], prompts["prompt_mask"],
                                 extra_args))


def analyze_rl(fns: Any, state: Any, ref_params: Any, prompt_tokens: Any, prompt_mask: Any, extra_args: tuple = ()
               ) -> list[CompileStats]:
    """:func:`analyze` of one RL iteration's ``rollout``, ``experience`` and ``update`` (in that order).

    Args:
      fns: the :class:`jaxrlhf.drivers.rl.RLFunctions`.
      state: the train state, arrays or ``ShapeDtypeStruct`` s with shardings (``params["policy"]`` is the
        policy).
      ref_params: the reference parameters (same kinds).
      prompt_tokens / prompt_mask: int32 ``[B*G, P]`` placed prompts (rows already repeated per group).
      extra_args: appended to every function's arguments (LoRA's frozen base).

    The update's inputs are the experience's outputs (shapes and shardings of the compiled experience);
    the experience's scores are float32 ``[B*G]`` split over the batch axes (host-placed scores).
    """
    from jaxrlhf.sharding import batch_sharding

    k_sample, k_update = jax.random.split(jax.random.key(0))  # the aval of the iteration's keys
    frozen = ("frozen",) * len(extra_args)
    rollout, gen_c = analyze(fns.generate, state.params["policy"], prompt_tokens, prompt_mask,
                             k_sample, *extra_args, name="rollout", mesh=fns.mesh,
                             arg_names=("params", "prompts", "prompts", "key") + frozen)
    sample = _abstract_outputs(gen_c)
    rows = sample.tokens_BS.shape[0]
    scores = jax.ShapeDtypeStruct((rows,), np.float32, sharding=batch_sharding(fns.mesh, 1))
    experience, exp_c = analyze(fns.experience, state, ref_params, sample.lm_batch(), sample.truncated_B, scores,
                                *extra_args, name="experience", mesh=fns.mesh,
                                arg_names=("state", "ref_params", "rollout", "rollout", "scores") + frozen)
    exp = _abstract_outputs(exp_c)[0]
    update, _ = analyze(fns.update, state, exp, k_update, *extra_args, name="update", mesh=fns.mesh,
                        arg_names=("state", "experience", "key") + frozen)
    return [rollout, experience, update]
