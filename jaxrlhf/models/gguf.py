"""Load llama.cpp GGUF files (Llama / Qwen2 architectures) into our ``Llama`` module.

The file is read with ``gguf.GGUFReader`` (memory-mapped) and every tensor is dequantised to float32 with
``gguf.quants.dequantize`` (numpy; no torch). GGUF stores dimensions fastest-first (``ne[0]`` is the
input width), so a ``[ne0, ne1]`` tensor comes back as the row-major ``[ne1, ne0]`` array, which is
PyTorch ``Linear``'s ``[out, in]`` layout. Names are mapped to Hugging Face names and converted by
``llama.params_from_hf`` (one source of truth for the layout).

llama.cpp's ``convert_hf_to_gguf.py`` permutes the rows of ``attn_q`` / ``attn_k`` of *llama*-architecture
models so that its interleaved (GPT-J style) RoPE reproduces HF's ``rotate_half`` RoPE: within each head
the rows ``[half, i]`` are stored as ``[i, half]``. :func:`unpermute_qk` undoes it. Qwen2 files use
llama.cpp's NEOX RoPE and are stored unpermuted.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Any

import numpy as np

from jaxrlhf.errors import ModelError, ModelNotFoundError
from jaxrlhf.models import llama
from jaxrlhf.models.config import ModelConfig, RopeScaling
from jaxrlhf.models.hf import model_from_params

__all__ = ["load_gguf", "SUPPORTED_ARCHITECTURES", "config_from_gguf", "check_quantizations", "supported_quantizations"]

PathLike = str | os.PathLike

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``).

    Raises:
      ValueError: a tensor we do not map (e.g. ``rope_freqs.weight`` of Llama 3.1 files), named.
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} is not supported by jaxrlhf's Llama loader")


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, rows stored as ``[d/2, 2]`` go back to ``[2, d/2]``.

    Args:
      w: ``[n_heads * d, ...]`` weight (or bias) rows as stored in the GGUF file.
      n_heads: query heads for ``attn_q``, key/value heads for ``attn_k``.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot unpermute {rows} rows into {n_heads} heads of even width")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_metadata(reader) -> dict[str, Any]:
    """Scalar and string GGUF metadata (arrays such as the vocabulary are skipped; their length is
    reported under ``<key>.__len__``)."""
    from gguf import GGUFValueType

    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not field.types:
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            out[key + ".__len__"] = len(field.data)
            continue
        value = field.contents()
        out[key] = value.item() if isinstance(value, np.generic) else value
    return out


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    """``ModelConfig`` from GGUF metadata (``{arch}.context_length``, ``embedding_length``, ``block_count``,
    ``feed_forward_length``, ``attention.head_count(_kv)``, ``attention.key_length``, ``rope.freq_base``,
    ``rope.scaling.*``, ``attention.layer_norm_rms_epsilon``, ``vocab_size``; special ids from
    ``tokenizer.ggml.*``). The LM head is tied when the file has no ``output.weight``.

    Raises:
      ValueError: an unsupported architecture, partial rotary dims, a RoPE scaling type we lack, or a
        missing key (named).
    """
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(f"GGUF general.architecture={arch!r} is not supported ({SUPPORTED_ARCHITECTURES})")

    def get(key, default=None, required=True):
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if required and default is None:
            raise ValueError(f"GGUF metadata lacks {full!r}")
        return default

    D = int(get("embedding_length"))
    H = int(get("attention.head_count"))
    K = int(get("attention.head_count_kv", H))
    head_dim = int(get("attention.key_length", D // H))
    rot = int(get("rope.dimension_count", head_dim))
    if rot != head_dim:
        raise ValueError(f"GGUF {arch}.rope.dimension_count={rot} != head_dim={head_dim}: partial rotary "
                         "embeddings are not supported")
    vocab = get("vocab_size", meta.get("tokenizer.ggml.tokens.__len__"), required=False)
    if vocab is None:
        raise ValueError(f"GGUF metadata lacks {arch}.vocab_size and tokenizer.ggml.tokens")
    ctx = int(get("context_length"))
    scaling = None
    stype = get("rope.scaling.type", "none", required=False)
    if stype not in ("none", None):
        factor = float(get("rope.scaling.factor"))
        orig = get("rope.scaling.original_context_length", None, required=False)
        if stype == "linear":
            scaling = RopeScaling(rope_type="linear", factor=factor)
        elif stype == "yarn":
            scaling = RopeScaling(rope_type="yarn", factor=factor,
                                  original_max_position_embeddings=int(orig) if orig else None)
        else:
            raise ValueError(f"GGUF {arch}.rope.scaling.type={stype!r} is not supported (linear, yarn)")
    default_theta = 1000000.0 if arch == "qwen2" else 10000.0
    return ModelConfig(
        family="llama", vocab_size=int(vocab), hidden_size=D, num_layers=int(get("block_count")),
        num_heads=H, num_kv_heads=K, head_dim=head_dim, intermediate_size=int(get("feed_forward_length")),
        max_position_embeddings=ctx, norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6, required=False)),
        rope_theta=float(get("rope.freq_base", default_theta, required=False)), rope_scaling=scaling,
        attention_bias="blk.0.attn_q.bias" in tensor_names, mlp_bias=False,
        tie_word_embeddings="output.weight" not in tensor_names, hidden_act="silu",
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"), bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))


def supported_quantizations() -> list[str]:
    """The GGML tensor types the installed ``gguf`` package dequantises (F32, F16 and its quant traits)."""
    from gguf import GGMLQuantizationType, quants

    traits = getattr(quants, "_type_traits", {})
    return [t.name for t in GGMLQuantizationType
            if t in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) or t in traits]


def check_quantizations(reader, path: PathLike) -> None:
    """Raise :class:`~jaxrlhf.errors.ModelError` naming the first tensor whose type cannot be dequantised
    (and the supported types) before any tensor is read."""
    supported = supported_quantizations()
    bad = {}
    for t in reader.tensors:
        name = getattr(t.tensor_type, "name", str(t.tensor_type))
        if name not in supported:
            bad.setdefault(name, t.name)
    if bad:
        kinds = ", ".join(f"{k} (e.g. tensor {v!r})" for k, v in bad.items())
        raise ModelError(f"GGUF file {path} holds tensors quantised as {kinds}, which the gguf package cannot "
                         f"dequantise; supported: {supported}. Re-quantise it (llama.cpp's llama-quantize) to one "
                         "of those, e.g. Q8_0 or F16")


def read_gguf_tensors(reader, cfg: ModelConfig, arch: str) -> dict[str, np.ndarray]:
    """All tensors dequantised to float32, renamed to HF names, q/k rows un-permuted for ``llama``."""
    from gguf.quants import dequantize

    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        shape = tuple(int(s) for s in reversed([int(x) for x in t.shape]))
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if arch == "llama":
            if t.name.endswith((".attn_q.weight", ".attn_q.bias")):
                w = unpermute_qk(w, cfg.num_heads)
            elif t.name.endswith((".attn_k.weight", ".attn_k.bias")):
                w = unpermute_qk(w, cfg.num_kv_heads)
        out[name] = w
    return out


def load_gguf(path: PathLike, *, dtype: str = "float32", param_dtype: str = "float32",
              load_tokenizer: bool = True):
    """Load a GGUF file as ``(model, cfg, tokenizer)``.

    Args:
      path: the ``.gguf`` file (architectures ``llama`` and ``qwen2``; any quantisation the ``gguf``
        package dequantises, e.g. F32/F16/Q8_0/Q4_1/Q4_K).
      dtype: compute dtype (``cfg.dtype``).
      param_dtype: parameter storage dtype (the dequantised weights are float32).
      load_tokenizer: build the tokenizer with
        ``transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)``; None when False or
        when the file carries no ``tokenizer.ggml.model``.
    Returns:
      ``(Llama module, ModelConfig, tokenizer or None)``.
    Raises:
      ModelNotFoundError: (a FileNotFoundError) no such file.
      ModelError: (a ValueError) a tensor type the ``gguf`` package cannot dequantise
        (:func:`check_quantizations`, before any tensor is read); an unsupported architecture.
      ValueError: unsupported metadata / tensor names, or wrongly shaped tensors.
      ImportError: a tokenizer is asked for and torch is missing (transformers' GGUF reader needs it;
        ``pip install 'jaxrlhf[gguf]'``), raised before the weights are read.
    """
    from gguf import GGUFReader

    path = pathlib.Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {path} does not exist")
    reader = GGUFReader(str(path))
    check_quantizations(reader, path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    wants_tokenizer = load_tokenizer and "tokenizer.ggml.model" in meta
    if wants_tokenizer and importlib.util.find_spec("torch") is None:  # checked before reading the weights
        raise ImportError(f"reading the tokenizer of {path.name} needs torch (transformers' GGUF reader "
                          "imports it): pip install 'jaxrlhf[gguf]' (or torch), or pass "
                          "load_tokenizer=False and load a tokenizer from a Hugging Face folder")
    cfg = config_from_gguf(meta, names).replace(dtype=dtype, param_dtype=param_dtype)
    tensors = read_gguf_tensors(reader, cfg, meta["general.architecture"])
    params = llama.params_from_hf(tensors, cfg)
    del tensors, reader
    model = model_from_params(cfg, params)
    tokenizer = None
    if wants_tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, cfg, tokenizer
