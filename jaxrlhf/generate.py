"""Text in, text out: chat template -> left-padded batch -> :func:`jaxrlhf.sampling.sample` -> decoded text.

Host-side helpers around the jitted sampler, for the CLI, evaluation samples and notebooks::

    pre = load_pretrained("smollm2-135m-instruct")
    generate_text(pre, None, ["What is 2+2?"], max_new_tokens=32, temperature=0.0)

Prompt batches are padded to a multiple of ``pad_to_multiple_of`` tokens, so calls with similar
prompt lengths reuse one compiled sampler instead of recompiling for every length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxrlhf.data.tokenize import eos_ids_for, pad_id_for
from jaxrlhf.errors import DataError
from jaxrlhf.sampling import SampleOutput, SamplingConfig, sample

__all__ = ["encode_prompts", "decode_completions", "generate", "generate_text"]


def _unwrap(pretrained_or_model, tokenizer):
    """``(model, tokenizer)`` from a ``Pretrained`` (``.model``/``.tokenizer``) or a bare module."""
    model = getattr(pretrained_or_model, "model", pretrained_or_model)
    if tokenizer is None:
        tokenizer = getattr(pretrained_or_model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("no tokenizer: pass `tokenizer=` or a Pretrained whose .tokenizer is set")
    if not hasattr(model, "cfg"):
        raise ValueError(f"expected a jaxrlhf decoder module (with .cfg) or a Pretrained, got {type(model).__name__}")
    return model, tokenizer


def encode_prompts(tokenizer, prompts: Sequence[str], *, use_chat_template: bool = True,
                   pad_to_multiple_of: int = 32, max_prompt_len: int | None = None,
                   pad_token_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise and left-pad a batch of prompts.

    When ``use_chat_template`` and the tokenizer has a chat template, each prompt becomes one user turn
    rendered with ``add_generation_prompt=True`` (the template adds its own special tokens); otherwise
    the raw text is encoded with the tokenizer's special tokens (e.g. BOS).

    Args:
      tokenizer: a ``transformers`` tokenizer.
      prompts: B strings.
      use_chat_template: see above.
      pad_to_multiple_of: round the padded length P up to a multiple of this (limits recompiles).
      max_prompt_len: keep at most the last this-many tokens of each prompt (None = no limit).
      pad_token_id: id for the padding slots (default :func:`pad_id_for`).

    Returns:
      ``(prompt_tokens int32[B, P], prompt_mask int32[B, P])``, left-padded.

    Raises:
      ValueError: empty ``prompts``, a prompt that encodes to no tokens, or ``pad_to_multiple_of < 1``.
    """
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    templated = use_chat_template and getattr(tokenizer, "chat_template", None)
    ids: list[list[int]] = []
    for i, text in enumerate(prompts):
        if templated:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                     add_generation_prompt=True, tokenize=False)
            row = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        else:
            row = tokenizer(text, add_special_tokens=True)["input_ids"]
        if max_prompt_len is not None:
            row = row[-max_prompt_len:]
        if not row:
            raise DataError(f"prompts[{i}] encodes to no tokens; give it some text")
        ids.append(list(row))
    P = -(-max(len(r) for r in ids) // pad_to_multiple_of) * pad_to_multiple_of
    if max_prompt_len is not None:
        P = min(P, max_prompt_len)          # every row is already <= max_prompt_len tokens
    pad = pad_id_for(tokenizer) if pad_token_id is None else pad_token_id
    tokens = np.full((len(ids), P), pad, np.int32)
    mask = np.zeros((len(ids), P), np.int32)
    for b, row in enumerate(ids):
        tokens[b, P - len(row):] = row
        mask[b, P - len(row):] = 1
    return tokens, mask


def decode_completions(tokenizer, out: SampleOutput, *, skip_special_tokens: bool = True) -> list[str]:
    """Decode each row's completion tokens (those with mask 1; the EOS token is dropped as special)."""
    toks = np.asarray(out.completion_tokens_BN)
    mask = np.asarray(out.completion_mask_BN) > 0
    return [tokenizer.decode(toks[b][mask[b]].tolist(), skip_special_tokens=skip_special_tokens)
            for b in range(toks.shape[0])]


def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, use_chat_template: bool = True,
             pad_to_multiple_of: int = 32) -> tuple[list[str], SampleOutput]:
    """Like :func:`generate_text` but takes a bare module and also returns the :class:`SampleOutput`.

    A prompt longer than the model allows is left-truncated to ``max_position_embeddings - max_new_tokens``
    tokens (the most recent text is kept).
    """
    cfg_m = model.cfg
    limit = cfg_m.max_position_embeddings - max_new_tokens
    if limit < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt within "
                         f"model.max_position_embeddings={cfg_m.max_position_embeddings}")
    pad = pad_id_for(tokenizer, cfg_m)
    tokens, mask = encode_prompts(tokenizer, prompts, use_chat_template=use_chat_template,
                                  pad_to_multiple_of=pad_to_multiple_of, max_prompt_len=limit, pad_token_id=pad)
    scfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          eos_token_ids=eos_ids_for(tokenizer, cfg_m), pad_token_id=pad)
    out = sample(model, tokens, mask, jax.random.key(seed), scfg)
    return decode_completions(tokenizer, out), out


def generate_text(pretrained_or_model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                  use_chat_template: bool = True) -> list[str]:
    """Generate one completion per prompt and return the decoded texts.

    Args:
      pretrained_or_model: a ``jaxrlhf.models.hub.Pretrained`` or a decoder module.
      tokenizer: a ``transformers`` tokenizer, or None to use ``pretrained.tokenizer``.
      prompts: list of B prompt strings (user turns when a chat template is used).
      max_new_tokens: completion length budget N.
      temperature: 0 = greedy; else softmax temperature.
      top_k: 0 = off.
      top_p: 1.0 = off (nucleus sampling, Holtzman et al. 2020).
      seed: PRNG seed (``jax.random.key(seed)``).
      use_chat_template: render prompts with the tokenizer's chat template when it has one.

    Returns:
      B strings, decoded with ``skip_special_tokens=True`` and stopped at the first EOS id (the model
      config's and the tokenizer's).

    Raises:
      ValueError: bad sampling settings (see :class:`jaxrlhf.sampling.SamplingConfig`), no tokenizer,
        empty prompts.
    """
    model, tokenizer = _unwrap(pretrained_or_model, tokenizer)
    texts, _ = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed, use_chat_template=use_chat_template)
    return texts
