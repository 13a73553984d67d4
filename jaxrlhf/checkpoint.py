"""Checkpoints with ``orbax-checkpoint``: sharded train state + data position + config + version.

Each save is atomic (orbax writes to a temporary directory and renames it when every process has
finished), the newest ``keep`` are kept, and a finished checkpoint is never overwritten: saving a step
that already exists is refused rather than replacing it.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

import jaxrlhf
from jaxrlhf.errors import CheckpointError, CheckpointExistsError

__all__ = ["Checkpointer", "abstract_with_shardings"]

FORMAT_VERSION = 1


class Checkpointer:
    """Save and restore ``{state, data position, metadata}`` under ``directory``.

    Args:
      directory: ``runs/<name>/checkpoints``.
      keep: how many of the newest checkpoints to keep (older ones are deleted after a new one is
        committed).
    """

    def __init__(self, directory: str | pathlib.Path, keep: int = 2):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max(keep, 1), create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        """The newest committed checkpoint step, or None when there is none."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """The committed checkpoint steps, oldest first (a save that died half-way is not among them)."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_position: dict, meta: dict) -> None:
        """Write checkpoint ``step``. Raises ``CheckpointExistsError`` (a FileExistsError) if that step already
        exists."""
        if step in self.manager.all_steps():
            raise CheckpointExistsError(f"checkpoint {step} already exists in {self.directory}; refusing to "
                                        "overwrite a finished checkpoint")
        meta = dict(meta, format_version=FORMAT_VERSION, jaxrlhf_version=jaxrlhf.__version__)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_position),
            meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """Restore ``(state, data_position, meta)`` into the shardings of ``abstract_state``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set (see
        :func:`abstract_with_shardings`). Raises ``FileNotFoundError`` if there is no checkpoint and
        ``CheckpointError`` (a ValueError) if the stored shapes do not match the model being restored into
        or the checkpoint has another format version.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}; start without --resume")
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {self.directory}/{step} has format_version "
                                  f"{meta.get('format_version')}, this jaxrlhf reads {FORMAT_VERSION}")
        stored = self.manager.item_metadata(step)["state"]
        if stored is None:  # a manager that has not saved this session knows no handler for the item
            try:
                stored = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
            except Exception:  # noqa: BLE001 -- another layout: orbax checks the shapes itself later
                stored = None
        _check_shapes(stored, abstract_state, f"{self.directory}/{step}")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out["state"], out["data"], meta

    def close(self) -> None:
        """Release the checkpoint manager's resources (every save has already finished)."""
        self.manager.close()


def _check_shapes(stored: Any, abstract: Any, where: str) -> None:
    """Compare stored array shapes with the target's before reading any tensor data."""
    try:
        stored_leaves = jax.tree_util.tree_leaves_with_path(stored)
    except Exception:  # noqa: BLE001 — metadata trees vary across orbax versions; orbax checks later
        return
    target = {_path_str(p): getattr(x, "shape", None) for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
    params_first = sorted(stored_leaves, key=lambda pl: not _path_str(pl[0]).startswith("params/"))
    for path, leaf in params_first:
        key = _path_str(path)  # the stored tree is nested dicts, the target dataclasses: compare the names
        shape = getattr(leaf, "shape", None)
        if key in target and shape is not None and target[key] is not None and tuple(shape) != tuple(target[key]):
            raise CheckpointError(f"checkpoint {where}: {key} has shape {tuple(shape)} but the model expects "
                                  f"{tuple(target[key])}; resume with the model config it was saved from "
                                  "(model.name), or start a new run (another --config.name, without --resume)")


def _path_str(path: tuple) -> str:
    """A tree path as ``a/b/0/c`` whatever the key types (dict key, attribute, sequence index)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` tree carrying the target shardings (for sharded restore)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
