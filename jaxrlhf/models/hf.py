"""Hugging Face checkpoint folders <-> our NNX modules: dispatch by ``model_type``, build, load, save.

A folder written by ``transformers``' ``save_pretrained`` (one ``model.safetensors``, or shards listed in
``model.safetensors.index.json``) is loaded into our NNX modules (:func:`load_hf_folder`), and our modules
are written back in the same layout (:func:`save_hf_folder`) so that ``transformers`` reloads them
(``AutoModelForCausalLM`` for decoders, ``AutoModel`` / ``*ForSequenceClassification`` for encoders).
Decoder sequence classifiers (``LlamaForSequenceClassification`` etc.: a backbone plus a bias-free
``score`` matrix, the layout of TRL reward models) are read and written by
:func:`load_hf_sequence_classifier` / :func:`save_hf_sequence_classifier`.

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

from jaxrlhf.errors import ModelError
from jaxrlhf.models import bert, gpt2, llama
from jaxrlhf.models.config import ENCODER_FAMILIES, ModelConfig
from jaxrlhf.models.tensors import (read_hf_config, read_hf_tensors, to_numpy_tree, torch_to_numpy,
                                   write_safetensors)

__all__ = ["load_hf_folder", "save_hf_folder", "model_class", "model_from_params", "family_module",
           "save_hf_sequence_classifier", "load_hf_sequence_classifier", "is_decoder_sequence_classifier",
           "SEQUENCE_CLASSIFIER_ARCHITECTURES"]

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
    raise ModelError(f"config.json model_type={model_type!r} is not supported; supported: {supported}")


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
        raise ModelError(f"{path}/config.json has no model_type; is it a Hugging Face model folder?")
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


# ------------------------------------------------------------------ decoder sequence classifiers
#
# ``transformers``' decoder ``*ForSequenceClassification`` models (``LlamaForSequenceClassification``,
# ``Qwen2ForSequenceClassification``, ``GPT2ForSequenceClassification``) are the base model (same tensor
# names as the causal LM, under ``model.`` / ``transformer.``, without ``lm_head``) plus ``score.weight``
# ``[C, D]`` (a ``Linear`` without bias). They pool the score at the rightmost token of each row that is
# not ``config.pad_token_id``; TRL loads a reward model as such a model with ``num_labels = 1``.

SEQUENCE_CLASSIFIER_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification",
    "mistral": "MistralForSequenceClassification", "gpt2": "GPT2ForSequenceClassification"}
_EMBED_KEYS = {"llama": "model.embed_tokens.weight", "qwen2": "model.embed_tokens.weight",
               "gpt2": "transformer.wte.weight"}


def is_decoder_sequence_classifier(hf_config: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` dict describes a decoder ``*ForSequenceClassification`` that
    :func:`load_hf_sequence_classifier` reads (by ``architectures`` and ``model_type``)."""
    archs = hf_config.get("architectures") or ()
    return (hf_config.get("model_type") in SEQUENCE_CLASSIFIER_ARCHITECTURES
            and any(str(a).endswith("ForSequenceClassification") for a in archs))


def save_hf_sequence_classifier(model: nnx.Module, cfg: ModelConfig, path: PathLike, score_weight_CD: np.ndarray,
                                tokenizer: Any = None, *, pad_token_id: int | None, vocab_size: int | None = None,
                                labels: tuple[str, ...] = (), extra_config: Mapping[str, Any] | None = None,
                                dtype: str | None = None) -> pathlib.Path:
    """Write a decoder backbone plus a bias-free score matrix as a ``transformers``
    ``*ForSequenceClassification`` folder (``LlamaForSequenceClassification``, ``Qwen2...``, ``GPT2...``).

    ``transformers.AutoModelForSequenceClassification.from_pretrained(path)`` reloads it; its logits are
    ``hidden[b, t*] @ score_weight.T`` with ``t*`` the rightmost token of row ``b`` that is not
    ``pad_token_id`` (``hidden``: the backbone's final-norm output, as our ``hidden_BTD``).

    Args:
      model: a decoder module (``Llama``/``GPT2``; its LM head, if untied, is not written).
      cfg: its configuration.
      path: the folder (created).
      score_weight_CD: float ``[C, D]`` (``C`` = ``num_labels``; 1 for a reward model).
      tokenizer: optional tokenizer, saved next to the weights (it should pad with ``pad_token_id``).
      pad_token_id: ``config.json`` ``pad_token_id`` (what ``transformers`` pools by); ``None`` only for
        models scored one unpadded row at a time.
      vocab_size: a larger vocabulary than ``cfg.vocab_size``: the input embedding gets zero rows appended
        (for a padding token added to the tokenizer; padding never reaches a real token's state).
      labels: ``id2label`` names (default ``LABEL_i``).
      extra_config: more ``config.json`` fields (e.g. jaxrlhf's reward offset).
      dtype: storage dtype of the tensors (default: the parameters' own).
    Returns:
      the folder path.
    Raises:
      ValueError: an encoder ``cfg``, a family without a sequence-classification class, ``score_weight``
        not ``[C, D]``, ``labels`` of the wrong length, ``vocab_size < cfg.vocab_size`` or ``pad_token_id``
        outside the vocabulary.
    """
    if not cfg.is_decoder:
        raise ValueError(f"save_hf_sequence_classifier writes decoders; model.family={cfg.family!r} is an encoder "
                         "(save_hf_folder writes encoder classifiers)")
    model_type = _model_type_for(cfg)
    if model_type not in _EMBED_KEYS:
        raise ValueError(f"model_type {model_type!r} has no sequence-classification export; supported: "
                         f"{sorted(_EMBED_KEYS)}")
    w = np.asarray(score_weight_CD, np.float32)
    if w.ndim != 2 or w.shape[1] != cfg.hidden_size:
        raise ValueError(f"score_weight must be [C, {cfg.hidden_size}], got {w.shape}")
    C = w.shape[0]
    if labels and len(labels) != C:
        raise ValueError(f"labels has {len(labels)} names for {C} outputs")
    V = int(vocab_size or cfg.vocab_size)
    if V < cfg.vocab_size:
        raise ValueError(f"vocab_size={V} is smaller than the model's {cfg.vocab_size}")
    if pad_token_id is not None and not 0 <= int(pad_token_id) < V:
        raise ValueError(f"pad_token_id={pad_token_id} is outside the vocabulary [0, {V})")
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fam = family_module(model_type)
    params = to_numpy_tree(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    tensors = fam.params_to_hf(params, cfg)
    tensors.pop("lm_head.weight", None)  # a sequence classifier has no LM head
    embed_key = _EMBED_KEYS[model_type]
    if V > cfg.vocab_size:
        e = np.asarray(tensors[embed_key])
        tensors[embed_key] = np.concatenate([e, np.zeros((V - e.shape[0], e.shape[1]), e.dtype)])
    store = np.dtype(dtype) if dtype is not None else np.asarray(tensors[embed_key]).dtype
    tensors["score.weight"] = w
    tensors = {k: np.ascontiguousarray(np.asarray(v).astype(store)) for k, v in tensors.items()}
    write_safetensors(tensors, path / "model.safetensors", {"format": "pt"})
    hf_config = fam.hf_config_from(cfg.replace(pad_token_id=None if pad_token_id is None else int(pad_token_id)))
    names = list(labels) or [f"LABEL_{i}" for i in range(C)]
    hf_config.update(architectures=[SEQUENCE_CLASSIFIER_ARCHITECTURES[model_type]], vocab_size=V,
                     id2label={str(i): n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)},
                     use_cache=False, dtype=str(store), torch_dtype=str(store))
    hf_config.update(dict(extra_config or {}))
    (path / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def load_hf_sequence_classifier(path: PathLike, *, dtype: str = "float32", allow_pickle: bool = False,
                                param_dtype: str = "float32") -> tuple[nnx.Module, ModelConfig, np.ndarray, dict]:
    """Read a decoder ``*ForSequenceClassification`` folder (e.g. ``LlamaForSequenceClassification`` saved by
    ``transformers``, a TRL reward model, or :func:`save_hf_sequence_classifier`'s output).

    The backbone goes through the family converter (``model.`` / ``transformer.`` prefix stripped); without
    an ``lm_head.weight`` the backbone is built with a tied LM head (its language-model logits are unused
    by a classifier); ``score.weight`` ``[C, D]`` is returned separately.

    Args:
      path: the folder.
      dtype / param_dtype / allow_pickle: as :func:`load_hf_folder`.
    Returns:
      ``(backbone, cfg, score_weight_CD float32 [C, D], hf_config dict)``; pooling follows
      ``hf_config["pad_token_id"]`` (see the section comment).
    Raises:
      FileNotFoundError: no config.json or no weights.
      ValueError: not a decoder sequence classifier, a score with a bias (not produced by ``transformers``),
        a wrongly shaped, missing or unexpected tensor.
    """
    hf_config = read_hf_config(path)
    if not is_decoder_sequence_classifier(hf_config):
        raise ValueError(f"{path}/config.json is not a decoder *ForSequenceClassification (architectures="
                         f"{hf_config.get('architectures')}, model_type={hf_config.get('model_type')!r}); "
                         f"supported model types: {sorted(SEQUENCE_CLASSIFIER_ARCHITECTURES)}")
    fam = family_module(hf_config["model_type"])
    cfg = fam.config_from_hf(hf_config).replace(dtype=dtype, param_dtype=param_dtype)
    tensors = dict(read_hf_tensors(path, allow_pickle=allow_pickle))
    if "score.bias" in tensors:
        raise ValueError(f"{path}: score.bias is not part of a transformers decoder sequence classifier")
    if "score.weight" not in tensors:
        raise ValueError(f"{path} has no score.weight tensor; is it a *ForSequenceClassification checkpoint?")
    w = tensors.pop("score.weight")
    w = np.asarray(w if isinstance(w, np.ndarray) else torch_to_numpy(w), np.float32)
    if w.ndim != 2 or w.shape[1] != cfg.hidden_size:
        raise ValueError(f"{path}: score.weight has shape {w.shape}, expected [num_labels, {cfg.hidden_size}]")
    if not cfg.tie_word_embeddings and "lm_head.weight" not in tensors:
        cfg = cfg.replace(tie_word_embeddings=True)
    params = fam.params_from_hf(tensors, cfg)
    return model_from_params(cfg, params), cfg, w, hf_config
