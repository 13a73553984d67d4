"""Model configuration shared by every architecture family.

One frozen dataclass describes a decoder (Llama family, GPT-2) or an encoder (BERT family). It is
hashable, so it can live in a module's static graph definition. The Hugging Face converters
(``config_from_hf``, ``params_from_hf``, ...) live in each family's module (``llama.py``, ``gpt2.py``,
``bert.py``) next to its parameter-name map; ``jaxrlhf.models.hf`` dispatches to them by ``model_type``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

__all__ = ["ModelConfig", "RopeScaling", "DECODER_FAMILIES", "ENCODER_FAMILIES"]

Family = Literal["llama", "gpt2", "bert", "roberta", "distilbert"]
DECODER_FAMILIES = ("llama", "gpt2")
ENCODER_FAMILIES = ("bert", "roberta", "distilbert")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as in ``transformers``' ``rope_scaling`` / ``rope_parameters``.

    ``rope_type`` is one of ``default``, ``linear`` (Chen et al. 2023, position interpolation),
    ``llama3`` (Meta's Llama 3.1 wavelength-dependent scaling) or ``yarn`` (Peng et al. 2023).
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters (all integers are counts, not bytes).

    Attributes:
      family: architecture family; decides which module class builds it.
      vocab_size: V.
      hidden_size: model width D.
      num_layers: number of transformer blocks L.
      num_heads: query heads H.
      num_kv_heads: key/value heads K (K divides H; K < H is grouped-query attention).
      head_dim: per-head width; defaults to D // H.
      intermediate_size: MLP width F.
      max_position_embeddings: longest sequence the model supports (tokens).
      norm_eps: epsilon of RMSNorm / LayerNorm.
      rope_theta: RoPE base (Llama family).
      rope_scaling: optional RoPE scaling.
      attention_bias: q/k/v projections carry a bias (Qwen2, GPT-2, BERT).
      mlp_bias: MLP projections carry a bias (GPT-2, BERT).
      tie_word_embeddings: the LM head reuses the token embedding matrix.
      hidden_act: MLP activation (``silu`` for SwiGLU, ``gelu_new``/``gelu`` for GPT-2/BERT).
      num_labels: classifier outputs (encoders with a sequence-classification head; 0 = none).
      labels: optional class names, ``labels[c]`` is class c (``id2label`` of the checkpoint); empty or
        of length ``num_labels``.
      type_vocab_size: BERT token-type embeddings (0 = none).
      pad_token_id / bos_token_id / eos_token_id: special ids from the checkpoint's config.
      dtype: compute dtype of activations and matmuls (``float32`` or ``bfloat16``); parameters
        are kept in ``param_dtype`` (f32 master weights).
      remat: recompute each block in the backward pass (``none`` or ``block``), trading FLOPs for memory.
      scan_unroll: blocks per iteration of the layer loop (1 = rolled ``lax.scan``, 0 = fully unrolled).
    """

    family: Family = "llama"
    vocab_size: int = 32000
    hidden_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int | None = None
    intermediate_size: int = 1408
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    num_labels: int = 0
    labels: tuple[str, ...] = ()
    type_vocab_size: int = 0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: Literal["none", "block"] = "none"
    scan_unroll: int = 1

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if not isinstance(self.labels, tuple):
            object.__setattr__(self, "labels", tuple(self.labels))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when the configuration is inconsistent."""
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_kv_heads={self.num_kv_heads} must divide "
                             f"model.num_heads={self.num_heads}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.labels and len(self.labels) != self.num_labels:
            raise ValueError(f"model.labels has {len(self.labels)} names but model.num_labels={self.num_labels}; "
                             "give one name per class or leave labels empty")
        if self.remat not in ("none", "block"):
            raise ValueError(f"model.remat must be 'none' or 'block', got {self.remat!r}")
        if self.scan_unroll < 0:
            raise ValueError(f"model.scan_unroll must be >= 0 (1 = a rolled loop over the layers, "
                             f"0 = fully unrolled), got {self.scan_unroll}")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def is_decoder(self) -> bool:
        return self.family in DECODER_FAMILIES

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)
