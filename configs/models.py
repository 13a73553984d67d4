"""Reusable model blocks."""

from jaxrlhf.config import ModelSpec


def smollm2_135m(dtype: str = "float32", remat: str = "none") -> ModelSpec:
    """SmolLM2-135M-Instruct (Llama architecture, 30 layers, width 576, GQA 9/3, vocab 49152)."""
    return ModelSpec(name="smollm2-135m-instruct", dtype=dtype, remat=remat)
