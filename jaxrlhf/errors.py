"""The errors a user can act on.

Every exception below means "your input is wrong (or the run was stopped), here is the field or file and
the fix"; the command line prints such an error as one line (``<kind> error: <message>``), exits with a
non-zero status and shows no traceback unless ``--debug`` is given (:mod:`jaxrlhf.cli`). Anything else is
a bug and keeps its traceback.

The classes also subclass the built-in exception a caller would expect (``ValueError`` for bad values,
``FileNotFoundError`` for missing files, ...), so ``except ValueError`` keeps working for library users.

``docs/errors.md`` is the catalogue of bad inputs and their messages; ``tests/test_cli_errors.py`` tries
each one at the command line.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "JaxrlhfError", "DataError", "DataFileNotFoundError", "ModelError", "ModelNotFoundError", "CheckpointError",
    "CheckpointExistsError", "MeshError", "StudyError", "NonFiniteError", "Preempted", "EXIT_USER_ERROR",
    "EXIT_PREEMPTED", "error_kind", "report_error",
]

EXIT_USER_ERROR = 2
"""Exit status of the CLI for a known bad input (config, data, model, checkpoint, mesh, non-finite loss)."""

EXIT_PREEMPTED = 143
"""Exit status after a SIGTERM was honoured (128 + 15, what a process killed by SIGTERM reports): the run
saved a checkpoint at a step boundary and can be continued with ``--resume``."""


class JaxrlhfError(Exception):
    """Base of the errors the CLI prints without a traceback. ``kind`` names the family in the message."""

    kind = "input"


class DataError(JaxrlhfError, ValueError):
    """A data file or row that cannot be used (broken JSONL line, missing field, empty dataset, ...)."""

    kind = "data"


class DataFileNotFoundError(JaxrlhfError, FileNotFoundError):
    """A data path that does not exist."""

    kind = "data"


class ModelError(JaxrlhfError, ValueError):
    """A model that cannot be loaded or does not fit the run (unknown name offline, unsupported GGUF
    quantisation, tokenizer/model vocabulary mismatch, ...)."""

    kind = "model"


class ModelNotFoundError(ModelError, FileNotFoundError):
    """A model name that looks like a path (or a registered package's file) that does not exist."""


class CheckpointError(JaxrlhfError, ValueError):
    """A checkpoint that cannot be restored into this run (another shape, another format version), or a
    run folder whose finished checkpoints would be overwritten."""

    kind = "checkpoint"


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A checkpoint (or a run folder holding checkpoints) that the run would overwrite; ``--resume``
    continues it instead."""


class MeshError(JaxrlhfError, ValueError):
    """A mesh that does not fit the devices, the batch or the model (heads not divisible, ...)."""

    kind = "mesh"


class StudyError(JaxrlhfError, ValueError):
    """A malformed study (stage/arm names, dependencies, outputs) or an ``--only`` pattern matching no arm."""

    kind = "study"


class NonFiniteError(JaxrlhfError, FloatingPointError):
    """A non-finite training metric (loss or gradient norm). Raised by the loop's NaN guard at the step
    that produced it; the latest checkpoint is the last one written before that step.

    Attributes:
      step: the 1-based step whose metrics were not finite.
      metric: the metric's name (``"loss"``, ``"grad_norm"``).
      value: its value (nan, inf or -inf).
    """

    kind = "training"

    def __init__(self, step: int, metric: str, value: float, latest_checkpoint: int | None):
        self.step, self.metric, self.value, self.latest_checkpoint = step, metric, value, latest_checkpoint
        where = (f"the latest checkpoint is step {latest_checkpoint}" if latest_checkpoint is not None
                 else "no checkpoint was written before it")
        super().__init__(
            f"non-finite {metric} = {value} at step {step}; the run stopped there and {where}. Lower "
            "optim.lr, raise optim.warmup_steps or set optim.max_grad_norm (model.dtype=float32 rules out "
            "bf16 overflow); --resume continues from the latest checkpoint")


class Preempted(JaxrlhfError):
    """The run received SIGTERM (or SIGINT with the preemption handler installed), saved a checkpoint at
    the next step boundary and stopped. ``step`` is the saved step; continue with ``--resume``."""

    kind = "preempted"

    def __init__(self, step: int, signal_name: str, checkpoint_dir: str):
        self.step = step
        super().__init__(f"{signal_name} received: saved checkpoint step {step} in {checkpoint_dir} and "
                         "stopped; run the same command with --resume to continue")


def error_kind(exc: BaseException) -> str:
    """The family word the CLI prints before a known error (``config``, ``data``, ``model``, ...)."""
    return getattr(exc, "kind", "input")


def report_error(exc: JaxrlhfError, debug: bool = False, file: Any = None) -> int:
    """Print a known error the way the command line does and return its exit status.

    One line ``<kind> error: <message>`` and :data:`EXIT_USER_ERROR`, or for :class:`Preempted`
    ``preempted: <message>`` and :data:`EXIT_PREEMPTED`; with ``debug`` the traceback comes first.
    ``file`` defaults to ``sys.stderr``.
    """
    import sys
    import traceback

    file = sys.stderr if file is None else file
    if debug:
        traceback.print_exception(exc, file=file)
    if isinstance(exc, Preempted):
        print(f"preempted: {exc}", file=file)
        return EXIT_PREEMPTED
    print(f"{error_kind(exc)} error: {exc}", file=file)
    return EXIT_USER_ERROR
