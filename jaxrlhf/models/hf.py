"""Hugging Face checkpoint folders <-> our NNX modules: dispatch by ``model_type``, build, load, save.

A folder written by ``transformers``' ``save_pretrained`` (one ``model.safetensors``, or shards listed in
``model.safetensors.index.json``) is loaded into our NNX modules (:func:`load_hf_folder`), and our modules
are written back in the same layout (:func:`save_hf_folder`) so that ``transformers`` reloads them
(``AutoModelForCausalLM`` for decoders, ``AutoModel`` / ``*ForSequenceClassification`` for encoders).

The architecture-specific part lives in each family module (``llama.py``, ``gpt2.py``, ``bert.py``), which
exposes the same converter contract:

* ``HF_MODEL_TYPES``: the ``config.json`` ``model_type`` values it handles;
* ``config_from_hf(hf_config: dict) -> ModelConfig`` and ``hf_config_from(cfg) -> dict``;
* ``params_from_hf(tensors, cfg) -> dict`` (a pure dict matching ``nnx.to_pure_dict(nnx.state(model))``)
  and ``params_to_hf(params, cfg) -> dict[str, np.ndarray]``.

The file formats and the converters' shared helpers are in ``tensors.py`` (which imports no family);
this module imports the families and holds the dispatch (:func:`family_module`, :func:`model_class`)
and :func:`model_from_params`. PyTorch pickles (``*.bin``) are refused unless ``allow_pickle=True``:
unpickling can execute code.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.models import bert, gpt2, llama
from jaxrlhf.models.config import ENCODER_FAMILIES, ModelConfig
from jaxrlhf.models.tensors import read_hf_config, read_hf_tensors, to_numpy_tree, write_safetensors

PathLike = str | os.PathLike

_FAMILIES = (llama, gpt2, bert)


# ---------------------------------------------------------------------------------------- dispatch

def family_module(model_type: str):
    """The family module that converts ``config.json`` ``model_type`` (``llama``, ``qwen2``, ``mistral``
    -> ``llama``; ``gpt2``; ``bert``/``roberta``/``distilbert`` -> ``bert``).

    Raises:
      ValueError: an unsupported ``model_type`` (lists the supported ones).
    """
    for mod in _FAMILIES:
        if model_type in mod.HF_MODEL_TYPES:
            return mod
    supported = [t for mod in _FAMILIES for t in mod.HF_MODEL_TYPES]
    raise ValueError(f"config.json model_type={model_type!r} is not supported; supported: {supported}")


def model_class(cfg: ModelConfig) -> type:
    """The NNX module class that builds ``cfg`` (``Llama``, ``GPT2``, or the BERT-family ``Encoder``).

    Raises:
      ValueError: an unknown ``cfg.family``, or an encoder config the ``Encoder`` rejects.
    """
    if cfg.family == "llama":
        return llama.Llama
    if cfg.family == "gpt2":
        return gpt2.GPT2
    if cfg.family in ENCODER_FAMILIES:
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

def load_hf_folder(path: PathLike, *, dtype: str = "float32", allow_pickle: bool = False,
                   param_dtype: str = "float32") -> tuple[nnx.Module, ModelConfig]:
    """Load a Hugging Face checkpoint folder into our NNX module.

    Reads ``config.json`` and the weights (:func:`jaxrlhf.models.tensors.read_hf_tensors`), dispatches on
    ``model_type`` (``llama``/``qwen2``/``mistral`` -> ``Llama``, ``gpt2`` -> ``GPT2``,
    ``bert``/``roberta``/``distilbert`` -> ``bert.Encoder``), converts names and layouts, checks every shape before any compute and
    builds the module without random initialisation. ``*ForCausalLM`` / base-model checkpoints both
    load (the ``model.`` / ``transformer.`` prefixes are stripped by the family converter). An encoder
    whose ``config.json`` names no classifier but whose weights hold one keeps it
    (:func:`jaxrlhf.models.bert.config_with_head`).

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
    if cfg.family in ENCODER_FAMILIES:
        cfg = bert.config_with_head(cfg, hf_config, tensors)
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
