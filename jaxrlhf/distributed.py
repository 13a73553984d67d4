"""Several processes, one run: start ``jax.distributed`` from the environment, give each process its own
rows of the data, and copy global arrays to the host.

* :func:`initialize_from_env` (called once by the ``jaxrlhf`` command, before JAX starts) reads the
  launcher's environment (:func:`distributed_args`) and calls ``jax.distributed.initialize`` for a
  multi-process launch: a TPU VM (JAX reads the slice's workers from the VM metadata), ``srun`` under
  SLURM, or an explicit coordinator (``JAXRLHF_COORDINATOR_ADDRESS``, ``JAXRLHF_NUM_PROCESSES``,
  ``JAXRLHF_PROCESS_ID``). A process started with none of these does nothing and stays one process.
* :class:`ShardedExamples` / :func:`tokenize_rows`: the training examples of a dataset indexed exactly
  as the list one process builds, while each process tokenises only its own block of rows (to learn how
  many examples each row gives) and the rows of its own slices of the global batches (which is all that
  :class:`~jaxrlhf.data.iterator.BatchIterator` asks it for).
* :func:`host_copy`: numpy copies of global arrays, also of those sharded over several processes (a
  collective: every process calls it), e.g. the parameters that process 0 exports.

Launch recipes (TPU pod, SLURM, other launchers): ``docs/scaling.md``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "ENV_LOCAL_DEVICE_IDS", "ENV_MODE",
    "distributed_args", "initialize_from_env", "ShardedExamples", "tokenize_rows", "process_block", "host_copy",
]

log = logging.getLogger("jaxrlhf")

ENV_COORDINATOR = "JAXRLHF_COORDINATOR_ADDRESS"
"""``host:port`` of process 0's coordinator service (JAX's own ``JAX_COORDINATOR_ADDRESS`` is read too)."""
ENV_NUM_PROCESSES = "JAXRLHF_NUM_PROCESSES"
"""The number of processes of an explicit launch (``JAX_NUM_PROCESSES`` is read too)."""
ENV_PROCESS_ID = "JAXRLHF_PROCESS_ID"
"""This process's id, ``0 .. num_processes - 1`` (``JAX_PROCESS_ID`` is read too)."""
ENV_LOCAL_DEVICE_IDS = "JAXRLHF_LOCAL_DEVICE_IDS"
"""Comma-separated ids of the local devices this process uses (default: all; JAX reads
``JAX_LOCAL_DEVICE_IDS`` itself)."""
ENV_MODE = "JAXRLHF_DISTRIBUTED"
"""``off`` (never initialise), ``auto`` (always call ``jax.distributed.initialize()`` and let JAX detect the
cluster), or one of JAX's detection methods (``slurm``, ``ompi``, ``mpi4py``, ``gcetpu``, ``gketpu``,
``k8s``); unset: the rules of :func:`distributed_args`."""

_OFF = ("0", "off", "false", "no", "none")
_METHODS = ("slurm", "ompi", "mpi4py", "gcetpu", "gketpu", "k8s")


# ------------------------------------------------------------------------------------------- start-up

def _config_error(msg: str) -> Exception:
    from jaxrlhf.config import ConfigError

    return ConfigError(msg)


def _first(environ: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return None


def _int_env(found: tuple[str, str] | None, low: int) -> int | None:
    if found is None:
        return None
    name, value = found
    try:
        out = int(value)
    except ValueError:
        raise _config_error(f"{name}={value!r} is not an integer") from None
    if out < low:
        raise _config_error(f"{name}={out} must be >= {low}")
    return out


def _device_ids(found: tuple[str, str] | None) -> list[int] | None:
    if found is None:
        return None
    name, value = found
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise _config_error(f"{name}={value!r} must be comma-separated device ids, e.g. 0,1,2,3") from None


def _slurm_tasks_on_node(environ: Mapping[str, str]) -> int | None:
    """Tasks of this job step on this node, from ``SLURM_STEP_TASKS_PER_NODE`` (e.g. ``2(x3),1``) and
    ``SLURM_NODEID``; None when SLURM does not say."""
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    node = environ.get("SLURM_NODEID")
    if not spec or node is None:
        return None
    per_node: list[int] = []
    try:
        for part in spec.split(","):
            count, _, rep = part.partition("(x")
            per_node += [int(count)] * (int(rep.rstrip(")")) if rep else 1)
        return per_node[int(node)]
    except (ValueError, IndexError):
        return None


def _slurm_args(environ: Mapping[str, str]) -> dict | None:
    """JAX's SLURM detection (coordinator = the step's first node) for an ``srun`` step of > 1 task."""
    needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    if not all(environ.get(k) for k in needed):
        return None  # not inside an srun step (e.g. the batch script itself, or salloc's shell)
    tasks = _int_env(_first(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"), 1)
    if tasks is None or tasks == 1:
        return None
    args: dict[str, Any] = {"cluster_detection_method": "slurm", "num_processes": tasks,
                            "process_id": _int_env(("SLURM_PROCID", environ["SLURM_PROCID"]), 0)}
    if not environ.get("JAX_LOCAL_DEVICE_IDS"):
        # JAX's SLURM default is one device per process, device number SLURM_LOCALID. Instead: every GPU the
        # process sees when it is the node's only task (one process per node), and its one GPU when SLURM
        # gave each task its own (--gpus-per-task=1: CUDA_VISIBLE_DEVICES lists one, seen as device 0).
        visible = [g for g in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
        n_gpus = len(visible) or (_int_env(_first(environ, "SLURM_GPUS_ON_NODE"), 0) or 0)
        if n_gpus and (_slurm_tasks_on_node(environ) == 1 or len(visible) == 1):
            args["local_device_ids"] = list(range(n_gpus))
    return args


def distributed_args(environ: Mapping[str, str], *, on_tpu_vm: bool = False) -> dict | None:
    """The keyword arguments for ``jax.distributed.initialize`` that a launcher's environment calls for, or
    None for a single process (nothing to initialise).

    Rules, first match wins:

    1. ``JAXRLHF_DISTRIBUTED=off`` -> None; ``=auto`` -> ``{}`` (JAX detects everything); ``=<method>``
       (``slurm``, ``ompi``, ``mpi4py``, ``gcetpu``, ``gketpu``, ``k8s``) -> ``{"cluster_detection_method":
       <method>}``.
    2. An explicit launch: ``JAXRLHF_NUM_PROCESSES`` and ``JAXRLHF_PROCESS_ID`` (or ``JAX_NUM_PROCESSES``
       / ``JAX_PROCESS_ID``) with ``JAXRLHF_COORDINATOR_ADDRESS`` (or ``JAX_COORDINATOR_ADDRESS``) ->
       ``coordinator_address``, ``num_processes``, ``process_id`` (+ ``local_device_ids`` from
       ``JAXRLHF_LOCAL_DEVICE_IDS``) and ``cluster_detection_method="deactivate"``; one process -> None.
    3. An ``srun`` step of more than one task (``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_PROCID``,
       ``SLURM_LOCALID`` set; ``SLURM_STEP_NUM_TASKS`` or ``SLURM_NTASKS`` > 1) -> JAX's SLURM detection
       with the step's task count and ``SLURM_PROCID``; with one task on this node, ``local_device_ids``
       = every GPU SLURM gave the node (``CUDA_VISIBLE_DEVICES`` / ``SLURM_STEP_GPUS`` /
       ``SLURM_GPUS_ON_NODE``), since JAX's SLURM default is one GPU per process.
    4. A Cloud TPU VM (``on_tpu_vm``) -> ``{}``: JAX reads the slice's workers, this worker's id and the
       coordinator from the VM metadata (a single-host VM becomes a group of one).
    5. A coordinator address alone (no process count or id, no SLURM step, no TPU VM) -> ``ConfigError``.
    6. Otherwise None: a single process.

    Args:
      environ: the environment (``os.environ``).
      on_tpu_vm: whether JAX found a Cloud TPU VM (``jax._src.cloud_tpu_init.running_in_cloud_tpu_vm``).

    Raises:
      ConfigError: an incomplete or malformed explicit launch (names the variable and the fix), or an
        unknown ``JAXRLHF_DISTRIBUTED``.
    """
    mode = environ.get(ENV_MODE, "").strip().lower()
    if mode in _OFF:
        return None
    if mode == "auto":
        return {}
    if mode:
        if mode not in _METHODS:
            raise _config_error(f"{ENV_MODE}={mode!r}: use off, auto or one of {', '.join(_METHODS)}")
        return {"cluster_detection_method": mode}
    coord = _first(environ, ENV_COORDINATOR, "JAX_COORDINATOR_ADDRESS")
    num = _int_env(_first(environ, ENV_NUM_PROCESSES, "JAX_NUM_PROCESSES"), 1)
    pid = _int_env(_first(environ, ENV_PROCESS_ID, "JAX_PROCESS_ID"), 0)
    if num is not None or pid is not None:
        if num is None or pid is None:
            raise _config_error(f"an explicit multi-process launch needs both {ENV_NUM_PROCESSES} and "
                                f"{ENV_PROCESS_ID} (and {ENV_COORDINATOR}); set the missing one")
        if pid >= num:
            raise _config_error(f"{ENV_PROCESS_ID}={pid} must be < {ENV_NUM_PROCESSES}={num} (ids run 0 .. "
                                f"{num - 1})")
        if num == 1:
            return None
        if coord is None:
            raise _config_error(f"{ENV_NUM_PROCESSES}={num} needs {ENV_COORDINATOR}=<host:port> of process 0 "
                                "(the same on every process, a port free on that host)")
        args: dict[str, Any] = {"coordinator_address": coord[1], "num_processes": num, "process_id": pid,
                                "cluster_detection_method": "deactivate"}
        ids = _device_ids(_first(environ, ENV_LOCAL_DEVICE_IDS))
        if ids is not None:
            args["local_device_ids"] = ids
        return args
    slurm = _slurm_args(environ)
    if slurm is not None:
        return slurm
    if on_tpu_vm:
        return {}
    if coord is not None:
        raise _config_error(f"{coord[0]} is set but {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} are not; set "
                            "them on every process (or unset it for a single-process run)")
    return None


def _on_tpu_vm() -> bool:
    try:  # `import jax` sets running_in_cloud_tpu_vm when it finds libtpu and TPU chips
        from jax._src import cloud_tpu_init
    except ImportError:  # pragma: no cover -- another JAX layout
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def initialize_from_env(environ: Mapping[str, str] | None = None, *,
                        initialize: Callable[..., Any] | None = None, on_tpu_vm: bool | None = None) -> bool:
    """Call ``jax.distributed.initialize`` when the environment is a multi-process launch
    (:func:`distributed_args`); do nothing otherwise. Call it once, before anything touches the devices.

    A process that ``jax.distributed`` already joined (a launcher that called it) is left as it is.

    Args:
      environ: the environment (default ``os.environ``).
      initialize: the function to call (default ``jax.distributed.initialize``; tests pass a fake).
      on_tpu_vm: override the Cloud TPU VM detection (default: what ``import jax`` found).

    Returns:
      True when this process is (now) part of a distributed group, False for a plain single process.

    Raises:
      ConfigError: a malformed launch environment (:func:`distributed_args`).
      RuntimeError: from JAX, e.g. the backend already started, or the coordinator unreachable within
        JAX's ``initialization_timeout`` (300 s).
    """
    import jax

    environ = os.environ if environ is None else environ
    if initialize is None:
        if jax.distributed.is_initialized():
            return True
        initialize = jax.distributed.initialize
    args = distributed_args(environ, on_tpu_vm=_on_tpu_vm() if on_tpu_vm is None else on_tpu_vm)
    if args is None:
        return False
    log.info("jax.distributed.initialize(%s)", ", ".join(f"{k}={v!r}" for k, v in args.items()))
    initialize(**args)
    return True


# ------------------------------------------------------------------------------------------- data

_REASONS = ("no_room_for_response", "empty_response", "prompt_too_long", "too_long", "empty_prompt")


def process_block(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` whose tokenisation process ``process_index`` of ``process_count`` owns:
    ``lo = process_index * n // process_count`` (contiguous blocks, sizes differing by at most one)."""
    return process_index * n // process_count, (process_index + 1) * n // process_count


def _take(rows: Any, idx: Sequence[int]) -> Any:
    """The rows at ``idx`` (a ``datasets.Dataset`` stays one; anything else becomes a list)."""
    if hasattr(rows, "select"):
        return rows.select(list(map(int, idx)))
    return [rows[int(i)] for i in idx]


_PART_LOCK = threading.Lock()


@contextlib.contextmanager
def _part_of_dataset(quiet: bool):
    """Tokenising a part of the rows: no per-part "every row was dropped" check or report line (the whole
    dataset's report is built, checked and logged after the gather); ``quiet`` also silences the data
    modules' warnings (their row numbers would be positions within the part)."""
    from jaxrlhf.data import tokenize as T

    with _PART_LOCK:  # the patch is process-wide: one part at a time
        finish, data_log = T._finish, logging.getLogger("jaxrlhf.data")
        level = data_log.level
        T._finish = lambda report, name, **kwargs: None
        if quiet:
            data_log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            T._finish = finish
            data_log.setLevel(level)


def _default_allgather(x: np.ndarray) -> np.ndarray:
    import jax

    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x))


class ShardedExamples(Sequence):
    """The examples ``tokenize(rows)[0]`` -- same order, same indices -- of which this process tokenises
    only the rows it needs.

    1. On construction it tokenises its block of rows (:func:`process_block`) to learn how many examples
       each row gives (0 when truncation drops it, several for a self-instruct row with
       ``instances``); these per-row counts, the truncation codes and counters are all-gathered
       (``allgather``: two small int32 collectives, a few bytes a row), so every process knows the full
       index, and :attr:`report` equals the report of ``tokenize(rows)``.
    2. :meth:`fetch` / ``[j]`` tokenise the rows of the examples asked for (batched, cached). A
       :class:`~jaxrlhf.data.iterator.BatchIterator` asks for this process's slice of each global batch
       only, so the global batch the processes assemble is the one a single process would build.

    ``tokenize`` must treat rows independently (a row's examples do not depend on the other rows), as the
    ``tokenize_*_dataset`` functions of :mod:`jaxrlhf.data.tokenize` do.

    Args:
      rows: the rows (a ``datasets.Dataset`` or a list of dict rows).
      tokenize: rows -> ``(examples, TruncationReport)``, report indices being positions in the list of
        examples before truncation (as in :mod:`jaxrlhf.data.tokenize`).
      instances: row -> how many examples it gives before truncation (default 1; e.g. SFT's
        self-instruct rows with ``instances="all"``).
      process_index, process_count: this process and how many there are.
      allgather: int32 ``[k]`` -> ``[process_count, k]`` (every process's array; the default is
        ``jax.experimental.multihost_utils.process_allgather``). Every process must construct its
        ``ShardedExamples`` at the same point (it is a collective).

    Attributes:
      counts: int64 ``[n_rows]``, the examples of each row.
      report: the whole dataset's ``TruncationReport`` (as one process's ``tokenize(rows)`` gives it).
      tokenized_rows: the sorted row indices this process has tokenised so far.

    Raises:
      DataError: truncation dropped every example of the dataset (one process's ``tokenize`` raises the
        same; a block dropped whole is fine), or this process's rows are malformed.
      RuntimeError: another process failed on its rows (every process stops, none waits in the gather);
        ``tokenize`` gave another number of examples for a row than in step 1 (it is not deterministic
        or not row-independent); ``instances`` disagrees with the report.
      ValueError: a bad ``process_index`` / ``process_count``.
    """

    def __init__(self, rows: Any, tokenize: Callable[[Any], tuple[list, Any]], *,
                 instances: Callable[[Any], int] | None = None, process_index: int = 0, process_count: int = 1,
                 allgather: Callable[[np.ndarray], np.ndarray] | None = None):
        from jaxrlhf.data.tokenize import TruncationReport

        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
        self.rows, self.tokenize = rows, tokenize
        self.process_index, self.process_count = process_index, process_count
        allgather = allgather or _default_allgather
        n = len(rows)
        lo, hi = process_block(n, process_index, process_count)
        failure: BaseException | None = None
        try:
            block = _take(rows, range(lo, hi))
            with _part_of_dataset(quiet=process_index != 0):
                examples, report = tokenize(block)
            m = np.array([instances(r) for r in block] if instances else [1] * (hi - lo), np.int64).reshape(-1)
            codes = np.zeros(int(m.sum()), np.int32)  # per example before truncation: 0 kept, 1 + reason dropped
            if any(not 0 <= i < len(codes) for i, _ in report.dropped):
                raise RuntimeError(f"tokenize reported a dropped example beyond the {len(codes)} examples that "
                                   f"`instances` counts for rows [{lo}, {hi}); pass the right `instances`")
            for i, reason in report.dropped:
                codes[i] = 1 + (_REASONS.index(reason) if reason in _REASONS else len(_REASONS))
            kept = m - np.bincount(np.repeat(np.arange(hi - lo), m)[codes > 0], minlength=hi - lo)
            if int(kept.sum()) != len(examples):
                raise RuntimeError(f"tokenize gave {len(examples)} examples for rows [{lo}, {hi}) but its report "
                                   f"accounts for {int(kept.sum())}; report indices must be example positions")
            header = [hi - lo, len(codes), report.kept, report.truncated_prompt, report.truncated_response, 0]
        except Exception as e:  # tell the other processes (they would wait in the gather) before raising
            failure, header = e, [0, 0, 0, 0, 0, 1]
        heads = np.asarray(allgather(np.array(header, np.int32))).reshape(process_count, len(header))
        if failure is not None:
            raise failure
        if heads[:, 5].any():
            raise RuntimeError(f"process(es) {np.flatnonzero(heads[:, 5]).tolist()} failed to tokenise their rows "
                               "of the training data; see their error")
        width_m, width_c = int(heads[:, 0].max()), int(heads[:, 1].max())
        payload = np.zeros(width_m + width_c, np.int32)
        payload[:hi - lo], payload[width_m:width_m + len(codes)] = m, codes
        payloads = np.asarray(allgather(payload)).reshape(process_count, -1)
        all_m = np.concatenate([payloads[q, :heads[q, 0]] for q in range(process_count)]).astype(np.int64)
        all_codes = np.concatenate([payloads[q, width_m:width_m + heads[q, 1]] for q in range(process_count)])
        dropped_rows = np.repeat(np.arange(n), all_m)[all_codes > 0]
        self.counts = all_m - np.bincount(dropped_rows, minlength=n)
        self._ends = np.cumsum(self.counts)
        self._starts = self._ends - self.counts
        names = _REASONS + ("dropped",)
        self.report = TruncationReport(
            kept=int(heads[:, 2].sum()), truncated_prompt=int(heads[:, 3].sum()),
            truncated_response=int(heads[:, 4].sum()),
            dropped=[(int(i), names[int(all_codes[i]) - 1]) for i in np.flatnonzero(all_codes)])
        if self.report.kept == 0 and self.report.dropped:
            from jaxrlhf.errors import DataError

            raise DataError(f"all {self.report.n_dropped} training examples were dropped by truncation "
                            f"({self.report.summary()}); raise data.max_length / data.max_prompt_length, or set "
                            "data.on_overflow='truncate'")
        self._cache: dict[int, list] = {}
        self._store(range(lo, hi), examples)

    def _store(self, row_ids: Iterable[int], examples: list) -> None:
        at = 0
        for r in row_ids:
            c = int(self.counts[r])
            self._cache[int(r)] = list(examples[at:at + c])
            at += c
        if at != len(examples):
            raise RuntimeError(f"tokenize gave {len(examples)} examples where the per-row counts say {at}: it "
                               "must be deterministic and treat rows independently")

    @property
    def tokenized_rows(self) -> list[int]:
        return sorted(self._cache)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def _locate(self, j: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= j < n:
            raise IndexError(f"example {j} out of range for {n} examples")
        j %= n
        r = int(np.searchsorted(self._ends, j, side="right"))
        return r, j - int(self._starts[r])

    def fetch(self, indices: Iterable[int]) -> list:
        """The examples at ``indices`` (ints; in that order), tokenising the missing rows in one call."""
        where = [self._locate(int(j)) for j in indices]
        missing = sorted({r for r, _ in where if r not in self._cache})
        if missing:
            with _part_of_dataset(quiet=True):
                examples, _ = self.tokenize(_take(self.rows, missing))
            self._store(missing, examples)
        return [self._cache[r][k] for r, k in where]

    def __getitem__(self, j):
        if isinstance(j, slice):
            return self.fetch(range(*j.indices(len(self))))
        return self.fetch([j])[0]

    def __iter__(self):
        for start in range(0, len(self), 1024):
            yield from self.fetch(range(start, min(start + 1024, len(self))))


def tokenize_rows(rows: Any, tokenize: Callable[[Any], tuple[list, Any]], *,
                  instances: Callable[[Any], int] | None = None, shard: bool = True,
                  process_index: int | None = None, process_count: int | None = None,
                  allgather: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[Sequence, Any]:
    """A driver's training examples: ``(examples, TruncationReport)``.

    With one process (or ``shard=False``: a driver that needs every example on every process, e.g. to pack
    them) this is exactly ``tokenize(rows)``. With several it is a :class:`ShardedExamples` (indexed as
    ``tokenize(rows)[0]``; each process tokenises its block and the rows its batches draw) and the whole
    dataset's report. A collective with several processes: every process calls it at the same point.

    ``process_index``/``process_count`` default to ``jax.process_index()``/``jax.process_count()``.
    """
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if process_count == 1 or not shard:
        return tokenize(rows)
    ex = ShardedExamples(rows, tokenize, instances=instances, process_index=process_index,
                         process_count=process_count, allgather=allgather)
    log.info("process %d/%d: %d examples from %d rows; tokenised its %d rows, more as its batches draw them",
             process_index, process_count, len(ex), len(rows), len(ex.tokenized_rows))
    return ex, ex.report


# ------------------------------------------------------------------------------------------- host copies

def host_copy(tree: Any) -> Any:
    """``tree`` with every ``jax.Array`` leaf as a numpy array holding its full (global) value.

    A leaf sharded over several processes is gathered with
    ``jax.experimental.multihost_utils.process_allgather`` (a collective: every process must call
    :func:`host_copy` on the same tree at the same point; the leaves are gathered one at a time, each
    replicated on every device for a moment); other leaves are plain ``jax.device_get``. With one process
    this is ``jax.device_get(tree)``.
    """
    import jax

    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree.map(one, tree)
