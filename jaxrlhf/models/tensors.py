"""Checkpoint tensors on disk and in memory, for every model family; imports no model.

* Files: :func:`read_safetensors` / :func:`write_safetensors` (through the ``safetensors`` library, whose
  numpy API stores ``bfloat16`` as ``ml_dtypes.bfloat16`` without torch), :func:`read_hf_config` and
  :func:`read_hf_tensors` (a Hugging Face folder's ``config.json`` and weights: sharded or single
  safetensors, or opt-in PyTorch pickles).
* Conversion helpers the family converters (``llama.py``, ``gpt2.py``, ``bert.py``) share:
  :class:`CheckpointTensors` (checked, bookkept access by Hugging Face name), :func:`require` (a
  mandatory ``config.json`` field), :func:`torch_to_numpy` and :func:`to_numpy_tree`.

``jaxrlhf.models.hf`` builds on this module to dispatch a folder to its family; the families import
from here, never from ``hf.py``, so the import graph of ``jaxrlhf.models`` has no cycle.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from jaxrlhf.errors import ModelError, ModelNotFoundError

__all__ = [
    "read_safetensors", "write_safetensors", "read_hf_config", "read_hf_tensors", "CheckpointTensors",
    "require", "to_numpy_tree",
]

PathLike = str | os.PathLike

# ----------------------------------------------------------------------------------- safetensors I/O


def read_safetensors(path: PathLike) -> dict[str, np.ndarray]:
    """Every tensor of one ``.safetensors`` file as numpy arrays (``BF16``/``F8`` as ``ml_dtypes`` arrays).

    Raises:
      ModelError: (a ValueError) not a safetensors file, a malformed header or a truncated file (the
        library's message).
    """
    try:
        return dict(load_file(os.fspath(path)))
    except SafetensorError as e:
        raise ModelError(f"{path}: cannot read safetensors ({e})") from e


def write_safetensors(tensors: Mapping[str, np.ndarray], path: PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` to one ``.safetensors`` file (``metadata`` defaults to ``{"format": "pt"}``,
    which ``transformers`` requires). Arrays are made contiguous and little-endian first.

    The file is written beside ``path`` and renamed over it, so arrays still memory-mapped from an old
    ``path`` (see :func:`read_safetensors`) keep their inode instead of being truncated under them.

    Raises:
      ValueError: a dtype safetensors cannot store (naming the tensor).
    """
    arrays: dict[str, np.ndarray] = {}
    for name in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[name]))
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        arrays[name] = a
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(arrays, tmp, metadata=dict(metadata or {"format": "pt"}))
    except (SafetensorError, KeyError, ValueError, TypeError) as e:
        tmp.unlink(missing_ok=True)
        bad = [f"{k!r} ({a.dtype})" for k, a in arrays.items() if f'"{a.dtype.name}"' in str(e)]
        raise ValueError(f"tensor {', '.join(bad) or 'of ' + str(path)}: cannot be written to safetensors "
                         f"({e})") from e
    os.replace(tmp, path)


# --------------------------------------------------------------------------------- folders: reading

def read_hf_config(path: PathLike) -> dict:
    """``config.json`` of a checkpoint folder as a dict.

    Raises:
      ModelNotFoundError: (a FileNotFoundError) no ``config.json`` in ``path``.
    """
    f = pathlib.Path(path) / "config.json"
    if not f.is_file():
        raise ModelNotFoundError(f"{path} has no config.json; is it a Hugging Face checkpoint folder?")
    return json.loads(f.read_text())


def read_hf_tensors(path: PathLike, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint folder: the shards of ``model.safetensors.index.json``, else
    ``model.safetensors``, else every ``*.safetensors`` file, else (only with ``allow_pickle``)
    ``pytorch_model*.bin`` via ``torch.load(weights_only=True)``.

    Raises:
      ModelError: (a ValueError) only pickles are present and ``allow_pickle`` is False; a key in two files.
      ModelNotFoundError: (a FileNotFoundError) no weights at all, or a shard named by the index is absent.
    """
    path = pathlib.Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]  # other *.safetensors beside it (e.g. a reward head) are not ours
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if files:
        tensors: dict[str, np.ndarray] = {}
        for name in files:
            f = path / name
            if not f.is_file():
                raise ModelNotFoundError(f"{index} lists shard {name!r}, which is not in {path}")
            for k, v in read_safetensors(f).items():
                if k in tensors:
                    raise ModelError(f"tensor {k!r} appears in more than one safetensors file of {path}")
                tensors[k] = v
        return tensors
    bin_index = path / "pytorch_model.bin.index.json"
    if bin_index.is_file():
        bins = sorted(set(json.loads(bin_index.read_text()).get("weight_map", {}).values()))
    else:
        bins = sorted(p.name for p in path.glob("*.bin") if p.name != "training_args.bin")
    if not bins:
        raise ModelNotFoundError(f"{path} has no *.safetensors (or pytorch_model*.bin) weights")
    if not allow_pickle:
        raise ModelError(
            f"{path} holds only PyTorch pickle weights ({', '.join(bins)}); unpickling can run arbitrary "
            "code, so it is refused. Convert the folder to safetensors, or pass allow_pickle=True "
            "(model.allow_pickle) to load it with torch.load(weights_only=True)")
    import torch  # optional dependency, only for the opt-in pickle path

    tensors = {}
    for name in bins:
        sd = torch.load(path / name, map_location="cpu", weights_only=True)
        for k, v in sd.items():
            tensors[k] = torch_to_numpy(v)
    return tensors


# ------------------------------------------------------------------------------ converter helpers

class CheckpointTensors:
    """Checked, bookkept access to a checkpoint's tensors by their Hugging Face name.

    Family converters call :meth:`take` for every tensor they expect (with the expected shape) and then
    :meth:`finish`, which raises one ``ValueError`` listing every missing and every unexpected key.

    Args:
      tensors: ``{hf_name: array}``.
      strip_prefixes: leading prefixes removed from every key (the first that matches), e.g. ``model.``
        of ``*ForCausalLM`` checkpoints, so the converter sees base-model names.
      ignore: regular expressions of keys to drop silently (non-persistent buffers such as
        ``rotary_emb.inv_freq``).
    """

    def __init__(self, tensors: Mapping[str, Any], strip_prefixes: Iterable[str] = (),
                 ignore: Iterable[str] = ()):
        self._ignore = [re.compile(p) for p in ignore]
        self._tensors: dict[str, Any] = {}
        self._original: dict[str, str] = {}
        prefixes = tuple(strip_prefixes)
        self._stripped: set[str] = set()
        for key, value in tensors.items():
            short = key
            for p in prefixes:
                if key.startswith(p):
                    short = key[len(p):]
                    self._stripped.add(p)
                    break
            if any(r.search(short) for r in self._ignore):
                continue
            self._tensors[short] = value
            self._original[short] = key
        self._used: set[str] = set()
        self._missing: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def take(self, key: str, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray | None:
        """The tensor ``key`` as a numpy array of ``dtype``; records a missing key and returns None.

        Raises:
          ValueError: the stored shape differs from ``shape`` (names the key and both shapes).
        """
        if key not in self._tensors:
            self._missing.append(key)
            return None
        value = self._tensors[key]
        if hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # a torch tensor
            value = torch_to_numpy(value)
        arr = np.asarray(value)
        if tuple(arr.shape) != tuple(shape):
            raise ModelError(f"checkpoint tensor {self._original[key]!r} has shape {tuple(arr.shape)}, "
                             f"expected {tuple(shape)} from config.json; the weights do not match the config")
        self._used.add(key)
        return arr.astype(dtype, copy=False)

    def stack(self, template: str, num_layers: int, shape: tuple[int, ...], dtype: Any = np.float32,
              transform=None) -> np.ndarray | None:
        """Stack ``template.format(i)`` for ``i < num_layers`` on a new leading axis, each checked for
        ``shape`` then mapped through ``transform`` (e.g. a transpose/reshape into our layout)."""
        parts = []
        for i in range(num_layers):
            a = self.take(template.format(i), shape, dtype)
            if a is not None:
                parts.append(transform(a) if transform else a)
        if len(parts) != num_layers:
            return None
        return np.stack(parts)

    def finish(self, what: str) -> None:
        """Raise ``ValueError`` listing missing and unexpected keys (``what`` names the architecture)."""
        unexpected = sorted(self._original[k] for k in self._tensors if k not in self._used)
        if self._missing or unexpected:
            parts = []
            if self._missing:
                note = f" (named without the {'/'.join(sorted(self._stripped))} prefix)" if self._stripped else ""
                parts.append(f"missing keys{note} {_short_list(self._missing)}")
            if unexpected:
                parts.append(f"unexpected keys {_short_list(unexpected)}")
            raise ModelError(f"checkpoint does not match the {what} architecture: " + "; ".join(parts))


def _short_list(keys: list[str], n: int = 8) -> str:
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return "[" + ", ".join(repr(k) for k in keys[:n]) + "]" + more


def torch_to_numpy(t) -> np.ndarray:
    """A torch tensor as a numpy array on the host; ``bfloat16`` becomes ``ml_dtypes.bfloat16`` (numpy has
    none), every other dtype goes through ``Tensor.numpy()``."""
    import torch  # only called with torch tensors, so torch is installed

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def require(hf_config: Mapping[str, Any], key: str, model_type: str):
    """``hf_config[key]``, raising a ``ValueError`` naming the missing config.json field."""
    if key not in hf_config or hf_config[key] is None:
        raise ModelError(f"config.json of a {model_type!r} model lacks the field {key!r}")
    return hf_config[key]


def to_numpy_tree(params: Any) -> Any:
    """A pure dict of jax arrays / nnx Variables -> the same dict of numpy arrays."""
    return jax.tree.map(lambda x: np.asarray(x[...] if isinstance(x, nnx.Variable) else x), params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
