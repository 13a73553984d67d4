"""The DPO family in one pure step: DPO / cDPO, IPO, SimPO, ORPO and KTO, chosen by ``cfg.loss``.

``dpo_step(state, batch, ref_params=None, *, graphdef, tx, cfg, grad_accum_steps) -> (state, metrics)``
is pure; jit it once with :func:`jaxrlhf.train_state.jit_step` (``ref_params`` travels as the extra
positional argument, placed like the policy's parameters, never donated).

Batches keep a pair axis ``[B, 2, T]``:

* preference pairs: index 0 = prompt + chosen, 1 = prompt + rejected;
* KTO (:func:`build_kto_batch`): index 0 = prompt + completion (with ``desirable`` bool ``[B]``),
  index 1 = the same prompt with a *mismatched* completion (fixed per example, from another prompt), used
  only for KTO's KL reference point ``z0`` (Ethayarajh et al. 2024 §4.1; TRL builds the same pairs).

One policy forward over the local reshape ``[B*2, T]`` gives per-sequence log-probabilities
(:func:`sequence_logps`: sums over completion tokens and token counts, ``[B, 2]``). The reference's sums
come either from frozen ``ref_params`` inside the step (``jax.lax.stop_gradient``; ``cfg.reference =
"model"``) or from the batch key ``reference_logps`` float32 ``[B, 2]`` written by one jitted pass over
the data (:func:`precompute_reference`, ``cfg.reference = "precomputed"``; the step then needs no
reference model). Reference-free losses (SimPO, ORPO) use neither.

:data:`jaxrlhf.algos.dpo_losses.PREFERENCE_LOSSES` describes each loss once (its function in
:mod:`jaxrlhf.losses`, whether it needs a reference, summed or length-normalised log-probs, whether it
reads ``label_smoothing``, paired, KTO or ranked data); the config's validation, the step and the held-out
metrics all read it. Members: dpo (cDPO with ``label_smoothing``), ipo, hinge, robust, simpo, orpo, kto,
plackett_luce (K-way rankings ``[B, N, T]`` + ``ranks``).

β is a traced input: the step reads it from ``state.extra["beta"]`` (:func:`dpo_extra`, float32 scalar),
so runs that differ only in β (a sweep) share one compiled step and the persistent compilation cache.

The loss is a mean over examples (pairs, or KTO completions), returned to :func:`gradient_step` as a sum
with the example count as normaliser (exact accumulation). Metrics: ``loss``, ``rewards/chosen``,
``rewards/rejected``, ``rewards/accuracy``, ``rewards/margin``, ``logps/chosen``, ``logps/rejected``
(+ loss-specific ones), ``grad_norm``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrlhf.algos.dpo_losses import PREFERENCE_LOSSES, SeqLogps
from jaxrlhf.config import DPOConfig
from jaxrlhf.models.lora import merge_model
from jaxrlhf.ops import next_token_logprobs, sequence_logprobs
from jaxrlhf.train_state import TrainState, gradient_step

__all__ = [
    "sequence_logps", "dpo_extra", "dpo_family_loss", "dpo_step", "eval_logps", "eval_metrics", "KTOTokens",
    "kto_examples", "build_kto_batch",
]


def sequence_logps(graphdef: nnx.GraphDef, params: Any, batch: dict) -> SeqLogps:
    """Completion log-likelihoods of every sequence of ``batch`` (LM keys ``[..., T]``) under the model.

    One forward pass over the rows flattened to ``[prod(...), T]`` (for pairs a local reshape of each
    example's two rows); ``logps[t] = log p(tokens[t] | tokens[<t])`` summed where ``completion_mask`` is 1
    (:func:`jaxrlhf.ops.next_token_logprobs`, :func:`jaxrlhf.ops.sequence_logprobs`).
    """
    model = merge_model(graphdef, params)
    tokens = batch["tokens"]
    lead, T = tokens.shape[:-1], tokens.shape[-1]
    flat = lambda x: x.reshape(-1, T)  # noqa: E731
    out = model(flat(tokens), flat(batch["positions"]), flat(batch["segment_ids"]))
    logps = next_token_logprobs(out.logits_BTV, flat(tokens))
    mask = flat(batch["completion_mask"]).astype(jnp.float32)
    sums = sequence_logprobs(logps, mask)
    return SeqLogps(sums.reshape(lead), jnp.sum(mask, axis=-1).reshape(lead))


def reference_sums(graphdef: nnx.GraphDef, ref_params: Any | None, batch: dict) -> jax.Array:
    """Reference log-prob sums ``[B, 2]``: from frozen ``ref_params`` (no gradient), or -- when
    ``ref_params is None`` -- the batch's precomputed ``reference_logps``.

    Raises:
      ValueError: no ``ref_params`` and no ``reference_logps`` key in the batch.
    """
    if ref_params is None:
        if "reference_logps" not in batch:
            raise ValueError("this loss needs reference log-probs: pass ref_params to the step "
                             "(algo.reference='model') or batches with 'reference_logps' "
                             "(algo.reference='precomputed', see precompute_reference)")
        return batch["reference_logps"].astype(jnp.float32)
    return jax.lax.stop_gradient(sequence_logps(graphdef, jax.lax.stop_gradient(ref_params), batch).sums)


def dpo_extra(cfg: DPOConfig) -> dict:
    """``TrainState.extra`` of the DPO family.

    Args:
      cfg: :class:`~jaxrlhf.config.DPOConfig` (reads ``beta``).

    Returns:
      ``{"beta": float32 scalar}``: the β that :func:`dpo_step` reads as a traced input.
    """
    return {"beta": jnp.asarray(cfg.beta, jnp.float32)}


def dpo_family_loss(params, batch: dict, ref_params: Any | None, *, graphdef: nnx.GraphDef, cfg: DPOConfig,
                    beta):
    """``(loss_sum, (num_examples, metrics))`` for :func:`gradient_step`: the loss of
    ``PREFERENCE_LOSSES[cfg.loss]`` with temperature ``beta`` (float scalar, may be traced) on the policy's
    (and, when the loss uses one, the reference's) sequence log-probs."""
    entry = PREFERENCE_LOSSES[cfg.loss]
    pol = sequence_logps(graphdef, params, batch)
    ref = reference_sums(graphdef, ref_params, batch) if entry.uses_reference else None
    loss, metrics = entry(pol, ref, batch, cfg, beta)
    n = jnp.asarray(batch["tokens"].shape[0], jnp.float32)
    return loss * n, (n, metrics)


def dpo_step(state: TrainState, batch: dict, ref_params: Any | None = None, *, graphdef: nnx.GraphDef,
             tx: optax.GradientTransformation, cfg: DPOConfig, grad_accum_steps: int = 1
             ) -> tuple[TrainState, dict]:
    """One optimizer step of the DPO family (pure; jit it once with :func:`jaxrlhf.train_state.jit_step`).

    β is ``state.extra["beta"]`` (:func:`dpo_extra`), not ``cfg.beta``: a traced input.

    Args:
      state: the policy's :class:`TrainState` with ``extra = dpo_extra(cfg)``.
      batch: LM keys ``[B, 2, T]`` (0 = chosen, 1 = rejected; KTO: :func:`build_kto_batch` with
        ``desirable`` bool ``[B]``; ``plackett_luce``: ``[B, N, T]`` + ``ranks`` int32 ``[B, N]``), optionally
        ``reference_logps`` float32 ``[B, 2]`` (``[B, N]``); ``B`` divisible by ``grad_accum_steps``.
      ref_params: frozen reference parameters, or None when the batch carries ``reference_logps`` or the
        loss is reference-free.
      graphdef: the policy's ``nnx.GraphDef`` (static), or a LoRA :class:`~jaxrlhf.models.lora.BoundGraph`
        (``state.params`` are then the adapters and ``ref_params`` the bound base itself: the policy with
        its adapters disabled).
      tx: the optimizer.
      cfg: :class:`~jaxrlhf.config.DPOConfig` (``cfg.loss`` picks the member of ``PREFERENCE_LOSSES``).
      grad_accum_steps: micro-batches per step.

    Returns:
      ``(state, metrics)``: float32 scalars ``loss``, ``rewards/chosen``, ``rewards/rejected``,
      ``rewards/accuracy``, ``rewards/margin``, ``logps/chosen``, ``logps/rejected`` (+ loss-specific ones),
      ``grad_norm``.

    Raises:
      ValueError: (at trace time) the loss needs a reference but there is neither ``ref_params`` nor
        ``reference_logps``.
    """

    def loss_fn(params, mb):
        return dpo_family_loss(params, mb, ref_params, graphdef=graphdef, cfg=cfg, beta=state.extra["beta"])

    return gradient_step(state, batch, loss_fn=loss_fn, tx=tx, grad_accum_steps=grad_accum_steps)


def eval_logps(params, batch: dict, *, graphdef: nnx.GraphDef) -> dict:
    """Eval forward: ``{"sums", "counts"}`` ``[B, 2]`` (``[B, N]``) of the policy (jit it)."""
    pol = sequence_logps(graphdef, params, batch)
    return {"sums": pol.sums, "counts": pol.counts}


def eval_metrics(cfg: DPOConfig, outputs: dict, batch: dict) -> dict:
    """Held-out preference metrics (host, numpy) with the implicit rewards of ``cfg.loss``
    (:meth:`~jaxrlhf.algos.dpo_losses.PreferenceLoss.implicit_rewards`), over every ordered pair of the
    real completions of each example (a preference pair is ranks ``[0, 1]``; a ranked batch carries
    ``ranks``, -1 = missing): ``reward_accuracy`` (fraction of pairs whose better completion has the
    higher implicit reward), ``reward_margin`` (mean difference over those pairs), ``reward_chosen`` /
    ``reward_rejected`` (mean implicit reward of the best / worst completion), ``logps_chosen`` /
    ``logps_rejected`` (their policy log-prob sums), ``pairs`` (examples with at least two completions)."""
    sums = np.asarray(outputs["sums"], np.float64)
    counts = np.asarray(outputs["counts"], np.float64)
    B, N = sums.shape
    ranks = np.asarray(batch["ranks"]) if "ranks" in batch else np.tile(np.arange(N), (B, 1))
    present = (ranks >= 0) & np.asarray(batch["segment_ids"]).any(-1)
    valid = present.sum(-1) >= 2
    ranks, present, sums, counts = ranks[valid], present[valid], sums[valid], counts[valid]
    ref = np.asarray(batch["reference_logps"], np.float64)[valid] if "reference_logps" in batch else None
    r = PREFERENCE_LOSSES[cfg.loss].implicit_rewards(cfg.beta, sums, counts, ref, xp=np)
    pair = (ranks[:, :, None] < ranks[:, None, :]) & present[:, :, None] & present[:, None, :]
    d = (r[:, :, None] - r[:, None, :])[pair]
    big = np.iinfo(np.int32).max
    best = np.argmin(np.where(present, ranks, big), axis=-1)
    worst = np.argmax(np.where(present, ranks, -1), axis=-1)
    rows = np.arange(len(best))
    return {"reward_accuracy": float(np.mean(d > 0)), "reward_margin": float(np.mean(d)),
            "reward_chosen": float(np.mean(r[rows, best])), "reward_rejected": float(np.mean(r[rows, worst])),
            "logps_chosen": float(np.mean(sums[rows, best])), "logps_rejected": float(np.mean(sums[rows, worst])),
            "pairs": int(valid.sum())}


# ------------------------------------------------------------------------------ data: KTO, references

class KTOTokens(NamedTuple):
    """One KTO example: ``prompt + completion`` labelled ``desirable``, and ``kl_completion_ids``: the
    completion of another prompt, used as the mismatched pair ``(prompt, kl_completion)``."""

    prompt_ids: np.ndarray
    completion_ids: np.ndarray
    desirable: bool
    kl_completion_ids: np.ndarray


def kto_examples(pairs: Sequence[Any], seed: int = 0) -> list[KTOTokens]:
    """Unpair preference pairs (each gives a desirable chosen and an undesirable rejected example, as
    TRL's ``unpair_preference_dataset``) and give every example a fixed mismatched completion.

    Mismatched partners: examples are visited in a seeded permutation and each takes the completion of
    the next one whose prompt differs (never its own pair's other completion).

    Raises:
      ValueError: fewer than two distinct prompts.
    """
    flat = []
    for i, p in enumerate(pairs):
        flat.append((i, p[0], np.asarray(p[1]), True))
        flat.append((i, p[0], np.asarray(p[2]), False))
    if len(pairs) < 2:
        raise ValueError(f"KTO needs at least two prompts for mismatched pairs, got {len(pairs)}")
    order = np.random.default_rng(seed).permutation(len(flat))
    out = [None] * len(flat)
    for j, k in enumerate(order):
        step = 1
        while flat[order[(j + step) % len(order)]][0] == flat[k][0]:
            step += 1
        partner = flat[order[(j + step) % len(order)]]
        out[k] = KTOTokens(np.asarray(flat[k][1]), flat[k][2], flat[k][3], partner[2])
    return out


def build_kto_batch(examples: Sequence[KTOTokens], seq_len: int, pad_id: int, padding_side: str = "right", *,
                    batch_size: int | None = None) -> dict[str, np.ndarray]:
    """KTO examples -> LM keys ``[B, 2, T]`` (0 = prompt + completion, 1 = prompt + mismatched completion,
    cut from the right to fit ``seq_len``) + ``desirable`` bool ``[B]`` (False on padding rows)."""
    from jaxrlhf.data.batching import build_preference_batch

    triples = []
    for ex in examples:
        room = max(seq_len - len(ex.prompt_ids), 1)
        triples.append((ex.prompt_ids, ex.completion_ids, np.asarray(ex.kl_completion_ids)[:room]))
    batch = build_preference_batch(triples, seq_len, pad_id, padding_side, batch_size=batch_size)
    desirable = np.zeros(batch["tokens"].shape[0], bool)
    desirable[:len(examples)] = [bool(ex.desirable) for ex in examples]
    batch["desirable"] = desirable
    return batch
