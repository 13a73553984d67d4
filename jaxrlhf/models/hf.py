"""Hugging Face checkpoint folders: read and write ``config.json`` + ``*.safetensors``.

A folder written by ``transformers``' ``save_pretrained`` (one ``model.safetensors``, or shards listed in
``model.safetensors.index.json``) is loaded into our NNX modules, and our modules are written back in the
same layout so that ``transformers.AutoModelForCausalLM.from_pretrained(path)`` reloads them.

The architecture-specific part lives in each family module (``llama.py``, ``gpt2.py``, ``bert.py``), which
exposes the same converter contract:

* ``HF_MODEL_TYPES``: the ``config.json`` ``model_type`` values it handles;
* ``config_from_hf(hf_config: dict) -> ModelConfig`` and ``hf_config_from(cfg) -> dict``;
* ``params_from_hf(tensors, cfg) -> dict`` (a pure dict matching ``nnx.to_pure_dict(nnx.state(model))``)
  and ``params_to_hf(params, cfg) -> dict[str, np.ndarray]``.

This module holds the file formats (a dependency-free safetensors reader/writer, so ``bfloat16`` works
without torch), the dispatch by ``model_type`` and :func:`model_from_params`. PyTorch pickles
(``*.bin``) are refused unless ``allow_pickle=True``: unpickling can execute code.
"""

from __future__ import annotations

import importlib
import json
import mmap
import os
import pathlib
import re
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.models.config import ENCODER_FAMILIES, ModelConfig

PathLike = str | os.PathLike

# ----------------------------------------------------------------------------------- safetensors I/O

try:  # ml_dtypes ships with jax; it gives numpy a bfloat16 / float8 dtype.
    import ml_dtypes

    _BF16 = np.dtype(ml_dtypes.bfloat16)
    _EXTRA_DTYPES = {"BF16": _BF16, "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
                     "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}
except ImportError:  # pragma: no cover
    _BF16 = None
    _EXTRA_DTYPES = {}

_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_), **_EXTRA_DTYPES,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def read_safetensors(path: PathLike) -> dict[str, np.ndarray]:
    """Read every tensor of one ``.safetensors`` file as read-only numpy arrays (memory-mapped).

    The format is an 8-byte little-endian header length, a JSON header
    ``{name: {dtype, shape, data_offsets}}`` and the raw little-endian data. ``BF16``/``F8`` come back
    as ``ml_dtypes`` arrays.

    Raises:
      ValueError: a truncated file, a malformed header or an unknown dtype (naming the tensor).
    """
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError(f"{path} is not a safetensors file (only {size} bytes)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    (n,) = struct.unpack("<Q", buf[:8])
    if 8 + n > size:
        raise ValueError(f"{path}: safetensors header length {n} exceeds the file size {size}")
    try:
        header = json.loads(bytes(buf[8:8 + n]))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed safetensors header ({e})") from e
    base = 8 + n
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
        dt = _ST_DTYPES[info["dtype"]].newbyteorder("<")
        start, end = info["data_offsets"]
        shape = tuple(int(s) for s in info["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if end - start != count * dt.itemsize or base + end > size:
            raise ValueError(f"{path}: tensor {name!r} data_offsets {info['data_offsets']} do not match "
                             f"shape {shape} x {info['dtype']} (file truncated?)")
        out[name] = np.frombuffer(buf, dtype=dt, count=count, offset=base + start).reshape(shape)
    return out


def write_safetensors(tensors: Mapping[str, np.ndarray], path: PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` to one ``.safetensors`` file (``metadata`` defaults to ``{"format": "pt"}``,
    which ``transformers`` requires).

    Raises:
      ValueError: a dtype safetensors cannot store (naming the tensor).
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[name]))
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        if a.dtype not in _ST_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be written to safetensors")
        header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    # Write a sibling file and rename it over ``path``: arrays still memory-mapped from an old ``path``
    # (see read_safetensors) keep their inode instead of being truncated under them.
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(memoryview(a.reshape(-1).view(np.uint8)))
    os.replace(tmp, path)


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
            value = _torch_to_numpy(value)
        arr = np.asarray(value)
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"checkpoint tensor {self._original[key]!r} has shape {tuple(arr.shape)}, "
                             f"expected {tuple(shape)} from config.json; the weights do not match the config")
        self._used.add(key)
        return arr.astype(dtype, copy=False)

    def skip(self, key: str) -> None:
        """Mark ``key`` as consumed without reading it (e.g. a tied ``lm_head.weight``)."""
        self._used.add(key)

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
            raise ValueError(f"checkpoint does not match the {what} architecture: " + "; ".join(parts))


def _short_list(keys: list[str], n: int = 8) -> str:
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return "[" + ", ".join(repr(k) for k in keys[:n]) + "]" + more


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_BF16 if _BF16 is not None else np.int16)
    return t.numpy()


def require(hf_config: Mapping[str, Any], key: str, model_type: str):
    """``hf_config[key]``, raising a ``ValueError`` naming the missing config.json field."""
    if key not in hf_config or hf_config[key] is None:
        raise ValueError(f"config.json of a {model_type!r} model lacks the field {key!r}")
    return hf_config[key]


def to_numpy_tree(params: Any) -> Any:
    """A pure dict of jax arrays / nnx Variables -> the same dict of numpy arrays."""
    return jax.tree.map(lambda x: np.asarray(x[...] if isinstance(x, nnx.Variable) else x), params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


# ---------------------------------------------------------------------------------------- dispatch

_BERT_MODEL_TYPES_FALLBACK = ("bert", "roberta", "distilbert")


def family_module(model_type: str):
    """The family module that converts ``config.json`` ``model_type`` (``llama``, ``qwen2``, ``mistral``,
    ``gpt2``; ``bert``/``roberta``/``distilbert`` from ``jaxrlhf.models.bert``).

    Raises:
      ValueError: an unsupported ``model_type`` (lists the supported ones).
    """
    from jaxrlhf.models import gpt2, llama

    for mod in (llama, gpt2):
        if model_type in mod.HF_MODEL_TYPES:
            return mod
    supported = list(llama.HF_MODEL_TYPES) + list(gpt2.HF_MODEL_TYPES)
    try:
        bert = importlib.import_module("jaxrlhf.models.bert")
    except ImportError as e:
        if model_type in _BERT_MODEL_TYPES_FALLBACK:
            raise ValueError(f"model_type={model_type!r} needs jaxrlhf.models.bert, which failed to import: "
                             f"{e}") from e
    else:
        types = tuple(getattr(bert, "HF_MODEL_TYPES", _BERT_MODEL_TYPES_FALLBACK))
        if model_type in types:
            return bert
        supported += list(types)
    raise ValueError(f"config.json model_type={model_type!r} is not supported; supported: {supported}")


def model_class(cfg: ModelConfig) -> type:
    """The NNX module class that builds ``cfg`` (``Llama``, ``GPT2``, or the BERT-family class).

    Raises:
      ValueError: an unknown ``cfg.family``.
    """
    if cfg.family == "llama":
        from jaxrlhf.models.llama import Llama

        return Llama
    if cfg.family == "gpt2":
        from jaxrlhf.models.gpt2 import GPT2

        return GPT2
    if cfg.family in ENCODER_FAMILIES:
        bert = importlib.import_module("jaxrlhf.models.bert")
        return bert.model_class(cfg)
    raise ValueError(f"model.family={cfg.family!r} has no module class (llama, gpt2, bert, roberta, distilbert)")


def model_from_params(cfg: ModelConfig, pure_params: Mapping[str, Any]) -> nnx.Module:
    """Build the module for ``cfg`` without random initialisation and fill it with ``pure_params``.

    The module is traced with ``nnx.eval_shape`` (no parameter is materialised), every leaf of
    ``pure_params`` is checked against the abstract parameter's shape, cast to ``cfg.param_dtype`` and
    put in place, keeping the ``logical_axes`` metadata.

    Args:
      cfg: the architecture.
      pure_params: nested dict shaped like ``nnx.to_pure_dict(nnx.state(model))`` (numpy or jax arrays).
    Raises:
      ValueError: a missing, extra or wrongly shaped parameter (named by its path).
    """
    cls = model_class(cfg)
    abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    expected = nnx.to_pure_dict(state)
    flat_expected = _flatten(expected)
    flat_given = _flatten(pure_params)
    missing = sorted(set(flat_expected) - set(flat_given))
    extra = sorted(set(flat_given) - set(flat_expected))
    if missing or extra:
        raise ValueError(f"parameters do not match {cls.__name__}({cfg.family}): missing {missing}, "
                         f"unexpected {extra}")
    filled = {}
    for path, spec in flat_expected.items():
        value = flat_given[path]
        if tuple(np.shape(value)) != tuple(spec.shape):
            raise ValueError(f"parameter {'/'.join(path)} has shape {tuple(np.shape(value))}, "
                             f"expected {tuple(spec.shape)}")
        filled[path] = jnp.asarray(value, dtype=spec.dtype)
    nnx.replace_by_pure_dict(state, _unflatten(filled))
    return nnx.merge(graphdef, state)


def _flatten(tree: Mapping[str, Any], prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return out


# --------------------------------------------------------------------------------- folders: reading

def read_hf_config(path: PathLike) -> dict:
    """``config.json`` of a checkpoint folder as a dict.

    Raises:
      FileNotFoundError: no ``config.json`` in ``path``.
    """
    f = pathlib.Path(path) / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face checkpoint folder?")
    return json.loads(f.read_text())


def read_hf_tensors(path: PathLike, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint folder: the shards of ``model.safetensors.index.json``, else
    ``model.safetensors``, else every ``*.safetensors`` file, else (only with ``allow_pickle``)
    ``pytorch_model*.bin`` via ``torch.load(weights_only=True)``.

    Raises:
      ValueError: only pickles are present and ``allow_pickle`` is False; a key in two files.
      FileNotFoundError: no weights at all, or a shard named by the index is absent.
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
                raise FileNotFoundError(f"{index} lists shard {name!r}, which is not in {path}")
            for k, v in read_safetensors(f).items():
                if k in tensors:
                    raise ValueError(f"tensor {k!r} appears in more than one safetensors file of {path}")
                tensors[k] = v
        return tensors
    bin_index = path / "pytorch_model.bin.index.json"
    if bin_index.is_file():
        bins = sorted(set(json.loads(bin_index.read_text()).get("weight_map", {}).values()))
    else:
        bins = sorted(p.name for p in path.glob("*.bin") if p.name != "training_args.bin")
    if not bins:
        raise FileNotFoundError(f"{path} has no *.safetensors (or pytorch_model*.bin) weights")
    if not allow_pickle:
        raise ValueError(
            f"{path} holds only PyTorch pickle weights ({', '.join(bins)}); unpickling can run arbitrary "
            "code, so it is refused. Convert the folder to safetensors, or pass allow_pickle=True to load "
            "it with torch.load(weights_only=True)")
    import torch

    tensors = {}
    for name in bins:
        sd = torch.load(path / name, map_location="cpu", weights_only=True)
        for k, v in sd.items():
            tensors[k] = _torch_to_numpy(v)
    return tensors


def load_hf_folder(path: PathLike, *, dtype: str = "float32", allow_pickle: bool = False,
                   param_dtype: str = "float32") -> tuple[nnx.Module, ModelConfig]:
    """Load a Hugging Face checkpoint folder into our NNX module.

    Reads ``config.json`` and the weights (see :func:`read_hf_tensors`), dispatches on ``model_type``
    (``llama``/``qwen2``/``mistral`` -> ``Llama``, ``gpt2`` -> ``GPT2``, ``bert``/``roberta``/``distilbert``
    -> ``jaxrlhf.models.bert``), converts names and layouts, checks every shape before any compute and
    builds the module without random initialisation. ``*ForCausalLM`` / base-model checkpoints both
    load (the ``model.`` / ``transformer.`` prefixes are stripped by the family converter).

    Args:
      path: the folder.
      dtype: compute dtype (``cfg.dtype``): ``float32``, ``bfloat16`` or ``float16``.
      allow_pickle: permit ``pytorch_model*.bin`` (loaded with ``torch.load(weights_only=True)``).
      param_dtype: dtype the parameters are stored in (f32 master weights by default).
    Returns:
      ``(model, cfg)``. The tokenizer is ``transformers.AutoTokenizer.from_pretrained(path)``.
    Raises:
      FileNotFoundError: no config.json or no weights.
      ValueError: unsupported architecture/options, pickles without opt-in, a wrongly shaped, missing
        or unexpected tensor (named).
    """
    hf_config = read_hf_config(path)
    model_type = hf_config.get("model_type")
    if not model_type:
        raise ValueError(f"{path}/config.json has no model_type")
    fam = family_module(model_type)
    cfg = fam.config_from_hf(hf_config).replace(dtype=dtype, param_dtype=param_dtype)
    tensors = read_hf_tensors(path, allow_pickle=allow_pickle)
    params = fam.params_from_hf(tensors, cfg)
    return model_from_params(cfg, params), cfg


# --------------------------------------------------------------------------------- folders: writing

def save_hf_folder(model: nnx.Module, cfg: ModelConfig, path: PathLike, tokenizer: Any = None, *,
                   dtype: str | None = None) -> pathlib.Path:
    """Write ``model`` as a Hugging Face folder: ``model.safetensors``, ``config.json``,
    ``generation_config.json`` (decoders with special ids) and the tokenizer (``save_pretrained``).

    ``transformers.AutoModelForCausalLM.from_pretrained(path)`` (decoders) or ``AutoModel`` (encoders)
    reloads it with the same logits. A tied LM head is not stored (``transformers`` ties it again).

    Args:
      model: the NNX module (its parameters are read, not modified).
      cfg: its configuration.
      path: the folder (created).
      tokenizer: optional ``transformers`` tokenizer, saved next to the weights.
      dtype: storage dtype of the tensors (default: the parameters' own dtype).
    Returns:
      the folder path.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fam = family_module(_model_type_for(cfg))
    params = to_numpy_tree(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    tensors = fam.params_to_hf(params, cfg)
    if dtype is not None:
        tensors = {k: np.asarray(v).astype(jnp.dtype(dtype)) for k, v in tensors.items()}
    write_safetensors(tensors, path / "model.safetensors", {"format": "pt"})
    hf_config = fam.hf_config_from(cfg)
    store = str(np.dtype(dtype) if dtype else np.dtype(jnp.dtype(cfg.param_dtype)))
    hf_config.setdefault("dtype", store)
    hf_config.setdefault("torch_dtype", store)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if cfg.is_decoder:
        gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id),
                                 ("eos_token_id", list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple)
                                  else cfg.eos_token_id),
                                 ("pad_token_id", cfg.pad_token_id)) if v is not None}
        if gen:
            (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def _model_type_for(cfg: ModelConfig) -> str:
    if cfg.family == "llama":
        return "qwen2" if cfg.attention_bias else "llama"
    return cfg.family
