"""Autoregressive sampling with a KV cache: one prefill, then a decode loop, all under one ``jax.jit``.

The core is a pure function of ``(graphdef, state, prompt_tokens_BP, prompt_mask_BP, key)`` with the
:class:`SamplingConfig` static, so a trainer can ``jax.jit`` it once (with shardings) inside its rollout::

    graphdef, state = nnx.split(model)
    sample_fn = jax.jit(sample_tokens, static_argnames=("graphdef", "cfg"))
    out = sample_fn(graphdef, state, prompt_tokens_BP, prompt_mask_BP, key, cfg=cfg)

:func:`sample` is the convenience entry point: it accepts a module or a ``(graphdef, state)`` pair,
validates concrete inputs and calls a cached jitted :func:`sample_tokens`.

Algorithm
---------
1. **Prefill**: one forward pass over the left-padded prompt with ``segment_ids = prompt_mask`` (0 on
   pads, which then attend to and are attended by nothing) and ``positions = cumsum(mask) - 1``
   (clipped at 0), writing keys/values into a cache of ``P + N - 1`` slots (the last sampled token is
   never fed back). Only the last position's hidden state goes through the LM head.
2. **Decode**: a ``jax.lax.while_loop`` of single-token steps. Completion token ``j`` of row ``b`` sits
   in cache slot ``P + j`` at RoPE position ``len_b + j`` (``len_b`` = number of real prompt tokens),
   so the positions are exactly those of the unpadded sequence. The loop stops as soon as every row has
   emitted an EOS id; the output shapes stay ``[B, N]`` regardless.
3. **Sampling** at each step from ``logits / temperature`` (greedy ``argmax`` when ``temperature == 0``),
   optionally truncated to the ``top_k`` most likely tokens (Fan et al. 2018) and then to the nucleus
   of mass ``top_p`` (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", Sec. 3.1):
   the smallest prefix of the tokens sorted by probability whose cumulative mass reaches ``top_p``.
   The order is temperature -> top-k -> top-p, as ``transformers``' logits warpers. The vocabulary is
   never sorted: top-k uses ``jax.lax.top_k`` (then top-p works on the k sorted values); top-p alone
   finds the nucleus threshold by bisection (:func:`nucleus_mask`), because XLA:CPU sorts a [16, 50k]
   array ~30x slower than the rest of a sampling step. Full-vocabulary draws and argmax are done in two
   stages over blocks of 256 tokens (:func:`categorical`, :func:`argmax_first`); both are exact.

Log-probabilities returned per completion token
-----------------------------------------------
* ``logps_BN``: log-probability of the emitted token under the distribution it was *actually sampled
  from* (after temperature, top-k and top-p, renormalised). Use it for importance weights of the
  behaviour policy. For greedy decoding (``temperature == 0``) the sampling distribution is a point mass;
  we report instead ``log_softmax(logits)`` of the raw (untempered) logits at the argmax token.
* ``policy_logps_BN``: ``log_softmax(logits / temperature)`` at the emitted token, *without* top-k/top-p
  truncation (temperature 1 when greedy). This is exactly what a training step recomputes with
  ``jaxrlhf.ops.token_logprobs(logits, tokens, temperature)`` over ``tokens_BS`` in one forward pass, so
  PPO's ``old_logps`` can be taken from here.

Both are 0 on masked (post-EOS) positions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.models.layers import init_cache

Array = jax.Array

__all__ = ["SamplingConfig", "SampleOutput", "sample", "sample_tokens", "sample_from_logits", "categorical",
           "argmax_first", "nucleus_mask", "prompt_positions", "validate_sampling"]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static settings of :func:`sample` (hashable: it is a static argument of the jitted sampler).

    Attributes:
      max_new_tokens: N >= 1, completion tokens per row (the output width; generation may stop earlier
        when every row has finished, the rest is padding).
      temperature: >= 0; 0 means greedy (argmax) decoding, otherwise logits are divided by it.
      top_k: keep only the k most likely tokens (0 = off). Exactly k tokens are kept (ties at the k-th
        value are broken by ``jax.lax.top_k``, lowest index first).
      top_p: nucleus mass in (0, 1] (1.0 = off), applied after top-k.
      eos_token_ids: ids that end a row's completion (the EOS token itself is kept with mask 1). Empty:
        rows never finish early and every completion is ``truncated``.
      pad_token_id: id written after a row's EOS (mask 0 there); must be a valid vocabulary id.

    Raises:
      ValueError: a field out of range (naming the field).
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self):
        eos = self.eos_token_ids
        if eos is None:
            eos = ()
        elif isinstance(eos, (int, np.integer)):
            eos = (int(eos),)
        else:
            eos = tuple(int(e) for e in eos)
        object.__setattr__(self, "eos_token_ids", eos)
        if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"sampling.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"sampling.top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1] (1.0 = off), got {self.top_p}")
        if any(e < 0 for e in eos):
            raise ValueError(f"sampling.eos_token_ids must be non-negative ids, got {eos}")
        if self.pad_token_id < 0:
            raise ValueError(f"sampling.pad_token_id must be a valid (non-negative) token id, got {self.pad_token_id}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class SampleOutput(NamedTuple):
    """Result of :func:`sample` (a pytree; B rows, N = max_new_tokens, S = P + N).

    Attributes:
      completion_tokens_BN: int32 emitted tokens; ``pad_token_id`` after a row's EOS.
      completion_mask_BN: float32, 1 on emitted tokens up to and including EOS, 0 after.
      logps_BN: float32 log-prob under the sampling distribution (see module doc; 0 where masked).
      policy_logps_BN: float32 ``log_softmax(logits / temperature)`` without truncation (0 where masked).
      truncated_B: bool, the row never emitted an EOS id within N tokens.
      lengths_B: int32 number of completion tokens (``completion_mask_BN.sum(-1)``).
      tokens_BS: int32 prompt (left-padded, as given) followed by the completion.
      segment_ids_BS: int32, 1 on real prompt and completion tokens, 0 on prompt padding and after EOS.
      positions_BS: int32 RoPE positions of the unpadded sequence (0 on padding).
      completion_mask_BS: float32, ``completion_mask_BN`` placed at the completion slots (the LM-batch
        ``completion_mask`` of CONVENTIONS.md: token t is a completion token predicted from t-1).
      num_steps: int32 scalar, completion tokens actually generated before every row finished (<= N).
    """

    completion_tokens_BN: Array
    completion_mask_BN: Array
    logps_BN: Array
    policy_logps_BN: Array
    truncated_B: Array
    lengths_B: Array
    tokens_BS: Array
    segment_ids_BS: Array
    positions_BS: Array
    completion_mask_BS: Array
    num_steps: Array

    def lm_batch(self) -> dict[str, Array]:
        """The prompt+completion as an LM batch (``tokens``, ``completion_mask``, ``segment_ids``,
        ``positions``, all ``[B, S]``) for recomputing log-probs in one forward pass."""
        return {"tokens": self.tokens_BS, "completion_mask": self.completion_mask_BS,
                "segment_ids": self.segment_ids_BS, "positions": self.positions_BS}


# ------------------------------------------------------------------------------------------ validation

def validate_sampling(cfg: SamplingConfig, model_cfg: Any, prompt_shape: tuple[int, ...],
                      mask_shape: tuple[int, ...] | None = None) -> None:
    """Static checks, done before any compute.

    Raises:
      ValueError: prompt arrays not ``[B, P]`` / shapes differ; ``P + max_new_tokens`` exceeds
        ``model.max_position_embeddings``; ``pad_token_id``/``eos_token_ids`` outside the vocabulary;
        ``top_k`` larger than the vocabulary.
    """
    if len(prompt_shape) != 2:
        raise ValueError(f"prompt_tokens must be int32[B, P] (left-padded), got shape {tuple(prompt_shape)}")
    if mask_shape is not None and tuple(mask_shape) != tuple(prompt_shape):
        raise ValueError(f"prompt_mask shape {tuple(mask_shape)} must equal prompt_tokens shape "
                         f"{tuple(prompt_shape)}")
    B, P = prompt_shape
    if B < 1 or P < 1:
        raise ValueError(f"prompt_tokens must have at least one row and one column, got shape {(B, P)}")
    limit = model_cfg.max_position_embeddings
    if P + cfg.max_new_tokens > limit:
        raise ValueError(
            f"prompt length P={P} + sampling.max_new_tokens={cfg.max_new_tokens} = {P + cfg.max_new_tokens} "
            f"exceeds model.max_position_embeddings={limit}; shorten the prompts (or their padding) or "
            f"lower max_new_tokens to at most {limit - P}")
    V = model_cfg.vocab_size
    if cfg.pad_token_id >= V:
        raise ValueError(f"sampling.pad_token_id={cfg.pad_token_id} is outside the vocabulary (V={V})")
    bad = [e for e in cfg.eos_token_ids if e >= V]
    if bad:
        raise ValueError(f"sampling.eos_token_ids {bad} are outside the vocabulary (V={V})")
    if cfg.top_k > V:
        raise ValueError(f"sampling.top_k={cfg.top_k} exceeds the vocabulary size {V}; use 0 to disable")


def _check_concrete_prompts(prompt_tokens_BP, prompt_mask_BP, vocab_size: int) -> None:
    """Value checks that need concrete arrays (skipped for tracers)."""
    if isinstance(prompt_tokens_BP, jax.core.Tracer) or isinstance(prompt_mask_BP, jax.core.Tracer):
        return
    mask = np.asarray(prompt_mask_BP)
    if not np.all(mask[:, -1] != 0):
        rows = np.flatnonzero(mask[:, -1] == 0)[:8].tolist()
        raise ValueError(f"prompt_mask must be left-padded with a real token in the last column; rows {rows} "
                         "end with padding (left-pad the prompts, and give every row at least one token)")
    toks = np.asarray(prompt_tokens_BP)
    if not np.issubdtype(toks.dtype, np.integer):
        raise ValueError(f"prompt_tokens must be integer token ids, got dtype {toks.dtype}")
    real = toks[mask != 0]
    if real.size and (real.min() < 0 or real.max() >= vocab_size):
        raise ValueError(f"prompt_tokens contain ids outside [0, {vocab_size}): min {real.min()}, max {real.max()}")


# ------------------------------------------------------------------------------------------ sampling

def prompt_positions(prompt_mask_BP: Array) -> Array:
    """RoPE positions of left-padded prompts: ``cumsum(mask) - 1`` clipped at 0 (0 on leading pads)."""
    m = (prompt_mask_BP != 0).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0) * m


def _gather(x_BM: Array, idx_B: Array) -> Array:
    return jnp.take_along_axis(x_BM, idx_B[:, None], axis=-1)[:, 0]


# XLA:CPU lowers ``argmax`` to a slow variadic reduction and ``jax.random.categorical`` draws one Gumbel
# variate (threefry) per vocabulary entry; over a 50k vocabulary both cost more than the rest of the
# sampling step. Both are done hierarchically over blocks of ``_BLOCK`` tokens instead (same results).
_BLOCK = 256


def _blocks(x_BV: Array) -> Array:
    """``[B, V] -> [B, ceil(V / _BLOCK), _BLOCK]``, padded with ``-inf``."""
    B, V = x_BV.shape
    nb = -(-V // _BLOCK)
    if nb * _BLOCK != V:
        x_BV = jnp.pad(x_BV, ((0, 0), (0, nb * _BLOCK - V)), constant_values=-jnp.inf)
    return x_BV.reshape(B, nb, _BLOCK)


def _pick_block(x_BnK: Array, b_B: Array) -> Array:
    return jnp.take_along_axis(x_BnK, b_B[:, None, None], axis=1)[:, 0, :]


def argmax_first(x_BV: Array) -> Array:
    """``jnp.argmax(x, -1)`` (first index of the maximum), computed as block maxima then within-block."""
    if x_BV.shape[-1] <= 2 * _BLOCK:
        return jnp.argmax(x_BV, axis=-1).astype(jnp.int32)
    xb = _blocks(x_BV)
    b = jnp.argmax(jnp.max(xb, axis=-1), axis=-1)
    return (b * _BLOCK + jnp.argmax(_pick_block(xb, b), axis=-1)).astype(jnp.int32)


def categorical(key: Array, logits_BV: Array) -> Array:
    """One exact draw per row from ``softmax(logits_BV)`` (``-inf`` entries are never drawn).

    Two-stage: a block is drawn with probability ``exp(lse_b - lse)`` (Gumbel-max over the blocks'
    log-sum-exps), then a token inside it with probability ``exp(x_i - lse_b)``; the product is
    ``exp(x_i - lse) = softmax(x)_i``. Draws ``B * (V / 256 + 256)`` Gumbel variates instead of ``B * V``.
    """
    if logits_BV.shape[-1] <= 2 * _BLOCK:
        return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)
    xb = _blocks(logits_BV)
    k_block, k_token = jax.random.split(key)
    b = jax.random.categorical(k_block, jax.nn.logsumexp(xb, axis=-1), axis=-1)
    i = jax.random.categorical(k_token, _pick_block(xb, b), axis=-1)
    return (b * _BLOCK + i).astype(jnp.int32)


def nucleus_mask(logits_BV: Array, top_p: float) -> Array:
    """Nucleus of ``softmax(logits_BV)`` (Holtzman et al. 2020, Sec. 3.1) without sorting the vocabulary.

    With ``p`` the probabilities and ``G(t) = sum_{p_j > t} p_j`` (the mass strictly above ``t``), a token
    is kept iff ``G(p_i) < top_p``: exactly the tokens of the smallest probability-sorted prefix whose
    mass reaches ``top_p`` (the most likely token is always kept; tokens tied at the boundary are all
    kept). ``G`` is non-increasing, so the kept set is ``{p_i >= t0}`` with ``t0`` the smallest ``t`` with
    ``G(t) < top_p``, found by bisection over the bit pattern of the f32 ``t`` (non-negative floats order
    like their int32 bits): 31 fused passes over ``[B, V]``, versus a full sort, which XLA:CPU does ~30x
    slower.

    Returns:
      bool ``[B, V]``.
    """
    p = jax.nn.softmax(logits_BV.astype(jnp.float32), axis=-1)
    bits = jax.lax.bitcast_convert_type(p, jnp.int32)

    def body(_, lo_hi):
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2
        mass_above = jnp.sum(jnp.where(bits > mid[:, None], p, 0.0), axis=-1)
        ok = mass_above < top_p
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    lo = jnp.zeros(bits.shape[:1], jnp.int32)
    _, t0 = jax.lax.fori_loop(0, 31, body, (lo, jnp.max(bits, axis=-1)))
    return bits >= t0[:, None]


def sample_from_logits(logits_BV: Array, key: Array, cfg: SamplingConfig) -> tuple[Array, Array, Array]:
    """Draw one token per row.

    Args:
      logits_BV: float ``[B, V]`` next-token logits (any float dtype; maths in f32).
      key: PRNG key (unused when greedy).
      cfg: the sampling settings (temperature, top_k, top_p).

    Returns:
      ``(tokens_B int32, logps_B f32, policy_logps_B f32)``: the token, its log-prob under the truncated
      renormalised sampling distribution (raw ``log_softmax`` when greedy), and its log-prob under
      ``softmax(logits / temperature)`` without truncation (see the module docstring).
    """
    logits = logits_BV.astype(jnp.float32)
    V = logits.shape[-1]
    if cfg.greedy:
        tok = argmax_first(logits)
        lp = _gather(logits, tok) - jax.nn.logsumexp(logits, axis=-1)
        return tok, lp, lp
    scaled = logits if cfg.temperature == 1 else logits / jnp.float32(cfg.temperature)
    policy_norm = jax.nn.logsumexp(scaled, axis=-1)
    use_k = 0 < cfg.top_k < V
    use_p = cfg.top_p < 1.0
    if not use_k:
        if use_p:
            scaled_kept = jnp.where(nucleus_mask(scaled, cfg.top_p), scaled, -jnp.inf)
            norm = jax.nn.logsumexp(scaled_kept, axis=-1)
        else:
            scaled_kept, norm = scaled, policy_norm
        tok = categorical(key, scaled_kept)
        plp = _gather(scaled, tok) - policy_norm
        return tok, _gather(scaled, tok) - norm, plp
    vals_BM, idx_BM = jax.lax.top_k(scaled, cfg.top_k)            # sorted, descending
    if use_p:
        probs = jax.nn.softmax(vals_BM, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs          # exclusive prefix mass; 0 for the top token
        vals_BM = jnp.where(mass_before < cfg.top_p, vals_BM, -jnp.inf)
    j = jax.random.categorical(key, vals_BM, axis=-1)
    tok = _gather(idx_BM, j).astype(jnp.int32)
    lp = _gather(vals_BM, j) - jax.nn.logsumexp(vals_BM, axis=-1)
    plp = _gather(scaled, tok) - policy_norm
    return tok, lp, plp


def _next_logits(model, out) -> Array:
    """Last-position logits ``[B, V]``; computes the LM head on the last hidden state only."""
    if hasattr(model, "logits"):
        return model.logits(out.hidden_BTD[:, -1:, :])[:, 0, :]
    return out.logits_BTV[:, -1, :]


def decode_params(state, model_cfg):
    """The parameters the decode loop reads: floating arrays cast ONCE to the compute dtype.

    Decoding is bound by reading the weights (one token per row per step), so with a bf16 compute dtype
    the loop reads a bf16 copy made here, before the prefill, instead of casting the f32 masters on every
    step. f32 models are returned unchanged. Training keeps its f32 masters; this copy lives only inside
    one :func:`sample_tokens` call.
    """
    dt = model_cfg.compute_dtype
    if dt == jnp.float32:
        return state
    return jax.tree.map(lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)


def sample_tokens(graphdef, state, prompt_tokens_BP: Array, prompt_mask_BP: Array, key: Array, *,
                  cfg: SamplingConfig) -> SampleOutput:
    """Pure sampler: prefill + while-loop decode (jit it with ``static_argnames=("graphdef", "cfg")``).

    Args:
      graphdef, state: ``nnx.split(model)`` of a decoder with the call signature
        ``model(tokens_BT, positions_BT, segment_ids_BT, cache) -> DecoderOutput`` and a ``cfg``
        (``ModelConfig``); the module is rebuilt with ``nnx.merge`` inside the trace. With
        ``cfg.dtype="bfloat16"`` the weights are cast to bf16 once (:func:`decode_params`) and the KV
        cache is bf16; logits and log-probs stay f32.
      prompt_tokens_BP: int32 ``[B, P]`` left-padded prompts.
      prompt_mask_BP: int ``[B, P]``, 1 on real prompt tokens, 0 on padding (the last column must be 1).
      key: PRNG key; step j uses ``fold_in(key, j)``, so a fixed key reproduces the same samples.
      cfg: static :class:`SamplingConfig`.

    Returns:
      :class:`SampleOutput` with N = ``cfg.max_new_tokens``, S = P + N.

    Raises:
      ValueError (at trace time, before compute): see :func:`validate_sampling`.
    """
    state = decode_params(state, nnx.merge(graphdef, state).cfg)
    model = nnx.merge(graphdef, state)
    mcfg = model.cfg
    validate_sampling(cfg, mcfg, tuple(prompt_tokens_BP.shape), tuple(prompt_mask_BP.shape))
    B, P = prompt_tokens_BP.shape
    N = cfg.max_new_tokens
    prompt_tokens_BP = prompt_tokens_BP.astype(jnp.int32)
    seg_BP = (prompt_mask_BP != 0).astype(jnp.int32)
    pos_BP = prompt_positions(seg_BP)
    len_B = jnp.sum(seg_BP, axis=1)

    # Prefill. Cache slots: P prompt + (N - 1) fed-back completion tokens.
    cache = init_cache(mcfg, B, P + N - 1)
    out = model(prompt_tokens_BP, pos_BP, seg_BP, cache)
    logits_BV = _next_logits(model, out)

    eos = cfg.eos_token_ids

    def is_eos(tok_B):
        hit = jnp.zeros(tok_B.shape, bool)
        for e in eos:
            hit = hit | (tok_B == e)
        return hit

    def emit(j, logits_BV, done_B, bufs):
        """Sample completion token j from logits and write it (pad/0 for finished rows)."""
        tok, lp, plp = sample_from_logits(logits_BV, jax.random.fold_in(key, j), cfg)
        active = ~done_B
        tok = jnp.where(active, tok, jnp.int32(cfg.pad_token_id))
        zero = jnp.float32(0)
        toks, lps, plps, mask = bufs
        toks = toks.at[:, j].set(tok)
        lps = lps.at[:, j].set(jnp.where(active, lp, zero))
        plps = plps.at[:, j].set(jnp.where(active, plp, zero))
        mask = mask.at[:, j].set(active.astype(jnp.float32))
        return tok, done_B | (active & is_eos(tok)), (toks, lps, plps, mask)

    bufs = (jnp.full((B, N), cfg.pad_token_id, jnp.int32), jnp.zeros((B, N), jnp.float32),
            jnp.zeros((B, N), jnp.float32), jnp.zeros((B, N), jnp.float32))
    tok_B, done_B, bufs = emit(0, logits_BV, jnp.zeros((B,), bool), bufs)

    def cond(carry):
        j, _, _, done_B, _ = carry
        return (j < N) & ~jnp.all(done_B)

    def body(carry):
        j, tok_B, cache, done_B, bufs = carry
        m = nnx.merge(graphdef, state)
        pos = (len_B + j - 1)[:, None]
        out = m(tok_B[:, None], pos, jnp.ones((B, 1), jnp.int32), cache)
        tok_B, done_B, bufs = emit(j, _next_logits(m, out), done_B, bufs)
        return j + 1, tok_B, out.cache, done_B, bufs

    num_steps, _, _, done_B, bufs = jax.lax.while_loop(cond, body, (jnp.int32(1), tok_B, out.cache, done_B, bufs))
    toks_BN, lps_BN, plps_BN, mask_BN = bufs

    comp_seg = mask_BN.astype(jnp.int32)
    comp_pos = (len_B[:, None] + jnp.arange(N, dtype=jnp.int32)[None, :]) * comp_seg
    return SampleOutput(
        completion_tokens_BN=toks_BN,
        completion_mask_BN=mask_BN,
        logps_BN=lps_BN,
        policy_logps_BN=plps_BN,
        truncated_B=~done_B,
        lengths_B=comp_seg.sum(axis=1),
        tokens_BS=jnp.concatenate([prompt_tokens_BP, toks_BN], axis=1),
        segment_ids_BS=jnp.concatenate([seg_BP, comp_seg], axis=1),
        positions_BS=jnp.concatenate([pos_BP, comp_pos], axis=1),
        completion_mask_BS=jnp.concatenate([jnp.zeros((B, P), jnp.float32), mask_BN], axis=1),
        num_steps=num_steps,
    )


_sample_jit = jax.jit(sample_tokens, static_argnames=("graphdef", "cfg"))


def sample(model_or_split, prompt_tokens_BP, prompt_mask_BP, key: Array, cfg: SamplingConfig) -> SampleOutput:
    """Generate ``cfg.max_new_tokens`` tokens per prompt (convenience wrapper around a jitted
    :func:`sample_tokens`; compiled once per model graph, config and prompt shape).

    Args:
      model_or_split: an NNX decoder module, or ``(graphdef, state)`` from ``nnx.split``.
      prompt_tokens_BP: int32 ``[B, P]`` left-padded prompt ids.
      prompt_mask_BP: int ``[B, P]`` (1 = real token, 0 = padding); the last column must be all ones.
      key: PRNG key.
      cfg: :class:`SamplingConfig`.

    Returns:
      :class:`SampleOutput`.

    Raises:
      ValueError: before any compute, for shape/length/vocabulary problems (:func:`validate_sampling`)
        and, for concrete arrays, right-padded or empty prompt rows or out-of-vocabulary prompt ids.
    """
    if isinstance(model_or_split, tuple):
        graphdef, state = model_or_split
        mcfg = nnx.merge(graphdef, state).cfg
    else:
        graphdef, state = nnx.split(model_or_split)
        mcfg = model_or_split.cfg
    validate_sampling(cfg, mcfg, tuple(np.shape(prompt_tokens_BP)), tuple(np.shape(prompt_mask_BP)))
    _check_concrete_prompts(prompt_tokens_BP, prompt_mask_BP, mcfg.vocab_size)
    return _sample_jit(graphdef, state, jnp.asarray(prompt_tokens_BP, jnp.int32),
                       jnp.asarray(prompt_mask_BP, jnp.int32), key, cfg=cfg)
