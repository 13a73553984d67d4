"""The one generic host loop, and the run directory it writes.

``train_loop`` takes a jitted step, a batch iterator and hooks; it knows nothing about algorithms.
Metrics are fetched one step late (step k's metrics are read after step k+1 is dispatched) so the
device never waits on the host. Each run writes::

    runs/<name>/config.json      the resolved experiment config
    runs/<name>/metrics.jsonl    one JSON object per logged step ({"step", "split", ...metrics})
    runs/<name>/samples.jsonl    generated samples ({"step", "prompt", "completion", ...})
    runs/<name>/tb/              TensorBoard event files
    runs/<name>/checkpoints/     orbax checkpoints (state, data position, metadata)
    runs/<name>/compile.json     the compiled step's memory per device and FLOPs (jaxrlhf.compile_stats)
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from jaxrlhf.checkpoint import Checkpointer
from jaxrlhf.errors import NonFiniteError, Preempted

__all__ = ["RunDir", "Hooks", "train_loop", "GUARDED_METRICS", "check_finite", "PreemptionHandler"]

GUARDED_METRICS = ("loss", "grad_norm")
"""The metrics the NaN guard checks at every step (``train_state.gradient_step`` returns both)."""


class RunDir:
    """Files of one run. Appends to ``metrics.jsonl`` / ``samples.jsonl``; resumes keep appending."""

    def __init__(self, root: str | pathlib.Path, name: str, *, tensorboard: bool = True):
        self.path = pathlib.Path(root) / name
        self.path.mkdir(parents=True, exist_ok=True)
        self._tb = None
        self._use_tb = tensorboard and jax.process_index() == 0

    @property
    def checkpoints(self) -> pathlib.Path:
        return self.path / "checkpoints"

    def write_config(self, cfg_dict: dict) -> None:
        if jax.process_index() == 0:
            (self.path / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True))

    def log(self, step: int, metrics: dict, split: str = "train") -> None:
        """Append ``{"step", "split", **metrics}`` to metrics.jsonl and TensorBoard (process 0 only)."""
        if jax.process_index() != 0:
            return
        clean = {k: _to_py(v) for k, v in metrics.items()}
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": int(step), "split": split, **clean}) + "\n")
        if self._use_tb:
            if self._tb is None:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(str(self.path / "tb"))
            for k, v in clean.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{split}/{k}", v, step)
            self._tb.flush()

    def write_samples(self, step: int, samples: list[dict]) -> None:
        if jax.process_index() != 0:
            return
        with open(self.path / "samples.jsonl", "a") as f:
            for s in samples:
                f.write(json.dumps({"step": int(step), **s}) + "\n")

    def read_metrics(self) -> list[dict]:
        p = self.path / "metrics.jsonl"
        return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []

    def truncate_after(self, step: int) -> int:
        """Drop the ``metrics.jsonl`` and ``samples.jsonl`` lines written after ``step`` (they will be redone):
        on resume from checkpoint ``step``, or with ``step = -1`` when a run starts from scratch in a folder
        that holds lines of an earlier attempt with no checkpoint. Returns the number of lines dropped."""
        dropped = 0
        for name in ("metrics.jsonl", "samples.jsonl"):
            p = self.path / name
            if p.exists() and jax.process_index() == 0:
                lines = p.read_text().splitlines()
                keep = [line for line in lines if json.loads(line)["step"] <= step]
                dropped += len(lines) - len(keep)
                p.write_text("".join(line + "\n" for line in keep))
        return dropped

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _to_py(v: Any) -> Any:
    v = np.asarray(v) if isinstance(v, (jax.Array, np.ndarray, np.generic)) else v
    if isinstance(v, np.ndarray):
        return v.item() if v.size == 1 else v.tolist()
    return v


def check_finite(step: int, metrics: dict, latest_checkpoint: Callable[[], int | None]) -> None:
    """The NaN guard: raise :class:`~jaxrlhf.errors.NonFiniteError` naming ``step`` and the metric when one
    of :data:`GUARDED_METRICS` in the fetched (host) ``metrics`` is nan or +-inf.

    ``latest_checkpoint()`` is asked only on failure (for the message). Metrics other than the loss and the
    gradient norm may legitimately be nan (e.g. a mean over an empty group) and are not checked.
    """
    for name in GUARDED_METRICS:
        value = metrics.get(name)
        if isinstance(value, (int, float)) and not math.isfinite(value):
            raise NonFiniteError(step, name, value, latest_checkpoint())


class PreemptionHandler:
    """Turns SIGTERM (what TPU VMs, SLURM and Kubernetes send before they stop a job) into a flag the loop
    reads at each step boundary, so the step in flight finishes, a checkpoint is written and the run stops
    with :class:`~jaxrlhf.errors.Preempted` instead of dying mid-write.

    A context manager; the previous handler is restored on exit. Outside the main thread (where Python
    cannot install signal handlers) it does nothing, and the signal keeps its previous meaning.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 -- signal handler signature
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "PreemptionHandler":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def should_stop(self) -> bool:
        """True when this process, or with several processes any of them, has received the signal. Every
        process must take the same decision at the same step, since the checkpoint is written collectively;
        with one process this is a plain flag read, with several a tiny all-gather per step."""
        if jax.process_count() == 1:
            return self.received is not None
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.received is not None))
        if flags.any() and self.received is None:
            self.received = "SIGTERM (on another process)"
        return bool(flags.any())


@dataclasses.dataclass(frozen=True)
class Hooks:
    """Optional callbacks of the loop (``step`` is always the 1-based step number that just finished).

    * ``evaluate(state) -> dict``: metrics logged under split ``eval`` every ``eval_every`` steps and at
      the last step (when ``eval_every`` > 0).
    * ``after_step(step, state, metrics, aux)``: after every step is dispatched (``metrics`` still on the
      device; ``aux`` is the optional third element the step returned, e.g. an RL iteration's decoded
      completions for rollout samples; ``None`` otherwise).
    * ``finalize(state) -> state``: once, on the last step, after its eval and before its checkpoint, so
      the final checkpoint holds what it returns (e.g. the reward model's normalisation statistics).
    * ``at_end(state, step)``: once, on the last step, after its checkpoint (e.g. "after" samples).
    * ``on_metrics(step, metrics)``: every fetched (host) metrics dict (e.g. a test recording a trajectory).
    """

    evaluate: Callable[[Any], dict] | None = None
    after_step: Callable[[int, Any, dict, Any], None] | None = None
    finalize: Callable[[Any], Any] | None = None
    at_end: Callable[[Any, int], None] | None = None
    on_metrics: Callable[[int, dict], None] | None = None


def train_loop(*, state: Any, step_fn: Callable, batches: Iterator, place: Callable[[dict], Any],
               total_steps: int, run: RunDir, checkpointer: Checkpointer | None = None,
               data_position: Callable[[], dict] | None = None, meta: dict | None = None,
               log_every: int = 1, eval_every: int = 0, save_every: int = 0, hooks: Hooks = Hooks(),
               tokens_per_step: int | None = None, step_args: tuple = (), pass_step: bool = False,
               progress: bool = True, stop_after: int = 0) -> Any:
    """Run ``state, metrics[, aux] = step_fn(state, place(batch), *step_args)`` until ``state.step == total_steps``.

    Args:
      state: a TrainState whose ``step`` says where to start (0, or the restored step).
      step_fn: returns ``(state, metrics)`` or ``(state, metrics, aux)`` (``aux`` goes to
        ``hooks.after_step`` only). With ``pass_step`` it is called with the keyword ``step=<int>``
        (the 1-based number of the step it performs), e.g. to derive that step's PRNG key.
      batches: yields host (numpy) batches; ``data_position()`` must return its resumable state.
      place: host batch -> global device arrays.
      total_steps: the step to stop at.
      checkpointer: saves every ``save_every`` steps and at the end.
      eval_every: evaluate every this many steps and at the last step (0 = never).
      tokens_per_step: for the throughput column (tokens/s).
      stop_after: leave the loop after this step, as a preempted job would (only the checkpoints
        already written survive); ``--resume`` continues from the latest one.
    Returns the final state.

    Raises:
      NonFiniteError: the NaN guard (:func:`check_finite`): step k's loss or gradient norm is nan/inf. It is
        checked before any checkpoint of step k is written, so the latest checkpoint is the last one before k.
      Preempted: SIGTERM arrived (:class:`PreemptionHandler`); the step in flight finished, its checkpoint
        was written (with ``checkpointer``) and the loop stopped. ``--resume`` continues from it.
    """
    with PreemptionHandler() as preemption:
        return _loop(state=state, step_fn=step_fn, batches=batches, place=place, total_steps=total_steps,
                     run=run, checkpointer=checkpointer, data_position=data_position, meta=meta,
                     log_every=log_every, eval_every=eval_every, save_every=save_every, hooks=hooks,
                     tokens_per_step=tokens_per_step, step_args=step_args, pass_step=pass_step,
                     progress=progress, stop_after=stop_after, preemption=preemption)


def _loop(*, state, step_fn, batches, place, total_steps, run, checkpointer, data_position, meta, log_every,
          eval_every, save_every, hooks, tokens_per_step, step_args, pass_step, progress, stop_after,
          preemption: PreemptionHandler):
    from tqdm import tqdm

    start = int(jax.device_get(state.step))
    bar = tqdm(total=total_steps, initial=start, disable=not progress or jax.process_index() != 0,
               dynamic_ncols=True, desc=run.path.name)
    pending: tuple[int, Any, float] | None = None
    t_last = time.perf_counter()

    def flush(pending):
        nonlocal t_last
        step, metrics, _ = pending
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        dt = now - t_last
        t_last = now
        metrics = {k: _to_py(v) for k, v in metrics.items()}
        metrics["step_time_s"] = dt
        check_finite(step, metrics, lambda: checkpointer.latest_step() if checkpointer is not None else None)
        if tokens_per_step:
            metrics["tokens_per_s"] = tokens_per_step / max(dt, 1e-9)
        if hooks.on_metrics is not None:
            hooks.on_metrics(step, metrics)
        if step % max(log_every, 1) == 0 or step == total_steps:
            run.log(step, metrics)
        post = {"loss": f"{metrics.get('loss', float('nan')):.4f}"}
        if tokens_per_step:
            post["tok/s"] = f"{metrics['tokens_per_s']:.0f}"
        bar.set_postfix(post)

    try:
        for step in range(start + 1, total_steps + 1):
            batch = next(batches)
            out = step_fn(state, place(batch), *step_args, **({"step": step} if pass_step else {}))
            state, metrics, aux = out if len(out) == 3 else (*out, None)
            if hooks.after_step is not None:
                hooks.after_step(step, state, metrics, aux)
            if pending is not None:
                flush(pending)
            pending = (step, metrics, time.perf_counter())
            bar.update(1)
            last = step == total_steps
            if hooks.evaluate is not None and eval_every and (step % eval_every == 0 or last):
                flush(pending)
                pending = None
                run.log(step, hooks.evaluate(state), split="eval")
            if last and hooks.finalize is not None:
                state = hooks.finalize(state)
            preempted = not last and preemption.should_stop()
            if checkpointer is not None and ((save_every and step % save_every == 0) or last or preempted):
                if pending is not None:
                    flush(pending)
                    pending = None
                checkpointer.save(step, state, data_position() if data_position else {}, meta or {})
            if hooks.at_end is not None and last:
                hooks.at_end(state, step)
            if preempted:
                if pending is not None:
                    flush(pending)
                where = str(checkpointer.directory) if checkpointer is not None else "(no checkpointer: nothing saved)"
                raise Preempted(step, preemption.received, where)
            if stop_after and step >= stop_after:
                break
        if pending is not None:
            flush(pending)
    finally:
        bar.close()  # also when the NaN guard or a preemption ends the loop
    return state
