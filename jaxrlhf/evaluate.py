"""Per-arm evaluation estimators of the IMDb sentiment study (issue 10), as pure functions on arrays.

Each estimator takes the arrays an evaluation pass produces (the policy's sampled completions on held-out
prompts, their per-token log-probabilities under the policy and the reference, gold-reward scores) and
returns numbers for the report. :func:`sequence_kl` is jax (jittable; it runs where the log-probs live);
the others are host-side numpy / pure Python on small arrays and return Python floats.

Estimators and sources:

- :func:`sequence_kl` — Monte-Carlo sequence-level ``KL(π‖π_ref)`` on the policy's own samples, the
  x-axis of the reward–KL frontier (Rafailov et al. 2023, "Direct Preference Optimization", §6.1, Fig. 2
  left).
- :func:`win_rate` — fraction of prompts on which the policy's completion beats the reference policy's
  completion of the same prompt under the gold reward (ties count 1/2).
- :func:`distinct_n` — distinct-n diversity (Li et al. 2016, "A Diversity-Promoting Objective Function
  for Neural Conversation Models", §4.3).
- :func:`completion_lengths`, :func:`mean_completion_length`, :func:`completion_token_lists` — length
  of completions in tokens, and the conversion from padded ``[B, T]`` arrays to token lists.
- :func:`mean_std_over_seeds`, :func:`format_mean_std` — the "mean ± std over seeds" of the report table.
"""
from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SequenceKL",
    "sequence_kl",
    "win_rate",
    "distinct_n",
    "completion_token_lists",
    "completion_lengths",
    "mean_completion_length",
    "SeedSummary",
    "mean_std_over_seeds",
    "format_mean_std",
]


def _standard_error(x: np.ndarray) -> float:
    """Standard error of the mean of 1-D ``x``: ``std(x, ddof=1) / sqrt(n)``; nan when ``n < 2``."""
    n = x.shape[0]
    if n < 2:
        return float("nan")
    return float(np.std(x, ddof=1) / math.sqrt(n))


# ----------------------------------------------------------------------------------------------------
# Sequence-level KL on the policy's own samples (jax).
# ----------------------------------------------------------------------------------------------------
class SequenceKL(NamedTuple):
    """Result of :func:`sequence_kl` (a pytree, so it can leave a jitted function).

    Attributes:
      kl_B: float ``[B]`` per-sample ``Σ_t (log π - log π_ref)`` over completion tokens, nats.
      mean: float scalar, the estimate of ``KL(π‖π_ref)`` (mean of ``kl_B``), nats per sequence.
      stderr: float scalar, its standard error ``std(kl_B, ddof=1) / sqrt(B)``; nan when ``B = 1``.
    """

    kl_B: jax.Array
    mean: jax.Array
    stderr: jax.Array


def sequence_kl(policy_logps_BT, ref_logps_BT, mask_BT) -> SequenceKL:
    """Monte-Carlo estimate of the sequence-level ``KL(π‖π_ref)`` from samples of ``π``, in nats.

    For completions ``y_b ~ π(·|x_b)``, ``KL(π‖π_ref) = E_{y~π}[log π(y|x) - log π_ref(y|x)]`` and
    ``log π(y|x) = Σ_t log π(y_t | x, y_<t)``; so the per-sample value is
    ``kl_b = Σ_t mask[b,t] · (policy_logps[b,t] - ref_logps[b,t])`` and the unbiased estimate is the
    mean over samples. This is the KL axis of the DPO paper's reward–KL frontier (Rafailov et al. 2023,
    §6.1: "the sequence-level KL ... estimated with samples from the policy"). A single ``kl_b`` may be
    negative; the mean is unbiased for the (non-negative) true KL. The inputs must be log-probs of
    tokens *sampled from the policy being evaluated* (at temperature 1, unfiltered — otherwise the
    samples come from another distribution and this is not ``KL(π‖π_ref)``).

    Jittable (``B`` and ``T`` static). Masked-out entries never influence the result, even if they
    hold nan/inf (selected away, not multiplied by 0).

    Args:
      policy_logps_BT: float ``[B, T]`` log-probability under ``π`` of each sampled completion token
        (e.g. from ``jaxrlhf.ops.token_logprobs``), nats.
      ref_logps_BT: float ``[B, T]`` log-probability of the same tokens under ``π_ref``, nats.
      mask_BT: bool/int/float ``[B, T]``, nonzero on completion tokens (prompt, padding and anything
        after EOS are 0).

    Returns:
      :class:`SequenceKL` ``(kl_B, mean, stderr)``: float32 (float64 under x64) ``[B]``, scalar, scalar.

    Raises:
      ValueError: the three shapes differ or are not ``[B, T]``.
    """
    shapes = {
        "policy_logps_BT": tuple(jnp.shape(policy_logps_BT)),
        "ref_logps_BT": tuple(jnp.shape(ref_logps_BT)),
        "mask_BT": tuple(jnp.shape(mask_BT)),
    }
    if len(set(shapes.values())) != 1 or len(shapes["mask_BT"]) != 2:
        raise ValueError(f"sequence_kl: inputs must all have the same shape [B, T]; got {shapes}.")
    policy = jnp.asarray(policy_logps_BT)
    dtype = jnp.promote_types(jnp.promote_types(policy.dtype, jnp.asarray(ref_logps_BT).dtype), jnp.float32)
    valid = jnp.asarray(mask_BT) != 0
    diff = policy.astype(dtype) - jnp.asarray(ref_logps_BT).astype(dtype)
    kl_B = jnp.sum(jnp.where(valid, diff, 0.0), axis=-1)
    n = kl_B.shape[0]
    mean = jnp.mean(kl_B)
    stderr = jnp.std(kl_B, ddof=1) / math.sqrt(n) if n > 1 else jnp.asarray(jnp.nan, dtype)
    return SequenceKL(kl_B=kl_B, mean=mean, stderr=stderr)


# ----------------------------------------------------------------------------------------------------
# Host-side estimators (numpy / Python).
# ----------------------------------------------------------------------------------------------------
def win_rate(policy_scores_B, reference_scores_B) -> tuple[float, float]:
    """Win rate of the policy against the reference policy under the gold reward, with its standard error.

    For each prompt ``b`` the policy's completion and ``π_ref``'s completion of the same prompt are both
    scored by the gold reward; ``w_b = 1`` if the policy's score is higher, ``1/2`` on a tie, ``0``
    otherwise. The win rate is ``mean_b w_b`` and its standard error ``std(w, ddof=1) / sqrt(B)`` (nan
    for ``B = 1``). This is the "win rate against the reference" of the DPO paper's evaluations
    (Rafailov et al. 2023, §6), with the gold reward as the judge.

    Args:
      policy_scores_B: float ``[B]`` gold-reward scores of the policy's completions (any units; only
        the order matters).
      reference_scores_B: float ``[B]`` gold-reward scores of ``π_ref``'s completions of the same prompts.

    Returns:
      ``(rate, stderr)`` as Python floats; ``rate`` in ``[0, 1]``.

    Raises:
      ValueError: shapes differ, are not ``[B]`` with ``B >= 1``, or a score is not finite.
    """
    p = np.asarray(policy_scores_B, dtype=np.float64)
    r = np.asarray(reference_scores_B, dtype=np.float64)
    if p.ndim != 1 or p.shape != r.shape or p.shape[0] == 0:
        raise ValueError(
            f"win_rate: scores must be non-empty 1-D [B] arrays of equal shape; got {p.shape} and {r.shape}."
        )
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(r))):
        raise ValueError("win_rate: scores must be finite (a nan score has no order); drop or fix those prompts.")
    wins = np.where(p > r, 1.0, np.where(p == r, 0.5, 0.0))
    return float(np.mean(wins)), _standard_error(wins)


def distinct_n(token_lists: Iterable[Sequence[int]], n: int) -> float:
    """Distinct-n: the number of distinct n-grams divided by the total number of n-grams (Li et al. 2016).

    n-grams are taken within each completion (never across two), pooled over the whole set: a
    completion of length ``L`` contributes ``max(L - n + 1, 0)`` n-grams to the total, and an n-gram
    that occurs in several completions counts once in the numerator. Empty completions (and ones shorter
    than ``n``) contribute no n-gram. If the whole set has no n-gram the result is defined as ``0.0``
    (no diversity observed), so the report stays finite.

    Args:
      token_lists: iterable of completions, each a sequence of int token ids (padding and prompt already
        removed, e.g. by :func:`completion_token_lists`).
      n: n-gram order, ``>= 1`` (the study reports ``n = 1, 2``).

    Returns:
      Python float in ``[0, 1]``.

    Raises:
      ValueError: ``n < 1``.
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"distinct_n: `n` must be an int >= 1, got {n!r}.")
    seen: set[tuple[int, ...]] = set()
    total = 0
    for tokens in token_lists:
        toks = tuple(int(t) for t in tokens)
        for i in range(len(toks) - n + 1):
            seen.add(toks[i : i + n])
            total += 1
    return len(seen) / total if total else 0.0


def completion_token_lists(tokens_BT, mask_BT) -> list[list[int]]:
    """The completion tokens of each row of a padded batch, as Python lists (mask order kept).

    Args:
      tokens_BT: int ``[B, T]`` token ids (prompt, completion and padding).
      mask_BT: bool/int/float ``[B, T]``, nonzero exactly on the completion tokens to keep.

    Returns:
      ``B`` lists of int token ids (empty where a row has no completion token).

    Raises:
      ValueError: shapes differ or are not ``[B, T]``.
    """
    tokens, mask = np.asarray(tokens_BT), np.asarray(mask_BT)
    if tokens.ndim != 2 or tokens.shape != mask.shape:
        raise ValueError(f"completion_token_lists: tokens and mask must be [B, T] of equal shape; got "
                         f"{tokens.shape} and {mask.shape}.")
    return [[int(t) for t in row[m != 0]] for row, m in zip(tokens, mask)]


def completion_lengths(mask_BT) -> np.ndarray:
    """Completion length of each row in tokens: the number of nonzero mask entries.

    Args:
      mask_BT: bool/int/float ``[B, T]``, nonzero on completion tokens (EOS included if the caller's
        mask includes it).

    Returns:
      int64 ``[B]`` numpy array, tokens.

    Raises:
      ValueError: ``mask_BT`` is not 2-D.
    """
    mask = np.asarray(mask_BT)
    if mask.ndim != 2:
        raise ValueError(f"completion_lengths: `mask_BT` must be [B, T], got shape {mask.shape}.")
    return np.count_nonzero(mask, axis=-1).astype(np.int64)


def mean_completion_length(completions) -> float:
    """Mean completion length in tokens over a set of completions.

    Args:
      completions: either a ``[B, T]`` completion mask (bool/int/float, nonzero on completion tokens) or
        a list of token lists (as :func:`completion_token_lists` returns).

    Returns:
      Python float, tokens per completion (nan for an empty set).
    """
    if isinstance(completions, (np.ndarray, jax.Array)):
        lengths = completion_lengths(completions)
    else:
        lengths = np.asarray([len(c) for c in completions], dtype=np.int64)
    return float(np.mean(lengths)) if lengths.size else float("nan")


# ----------------------------------------------------------------------------------------------------
# Aggregation over seeds for the report.
# ----------------------------------------------------------------------------------------------------
class SeedSummary(NamedTuple):
    """``mean ± std`` of one metric over the seeds of an arm.

    Attributes:
      mean: mean over the finite values (nan if none).
      std: sample standard deviation (``ddof = 1``) over the finite values; nan when ``n < 2``.
      n: number of finite values used (a failed seed, recorded as nan/None, is not counted).
    """

    mean: float
    std: float
    n: int


def mean_std_over_seeds(values: Iterable[float | None]) -> SeedSummary:
    """Mean, sample std (``ddof = 1``) and count of one metric over seeds, ignoring missing values.

    ``None``, nan and ±inf (a failed or unfinished seed) are dropped and not counted in ``n``, so the
    report can show ``n`` next to the spread and a failed seed never turns the whole row into nan.

    Args:
      values: per-seed values (Python/numpy scalars or None).

    Returns:
      :class:`SeedSummary` ``(mean, std, n)`` of Python floats and an int.
    """
    finite = np.asarray([float(v) for v in values if v is not None and math.isfinite(float(v))], dtype=np.float64)
    n = int(finite.size)
    mean = float(np.mean(finite)) if n else float("nan")
    std = float(np.std(finite, ddof=1)) if n > 1 else float("nan")
    return SeedSummary(mean=mean, std=std, n=n)


def format_mean_std(summary: SeedSummary, digits: int = 3) -> str:
    """``"m ± s"`` with ``digits`` decimals for a report cell; ``"m"`` when there is one seed, ``"–"`` for none.

    Args:
      summary: a :class:`SeedSummary`.
      digits: decimals after the point (>= 0).

    Returns:
      The cell text, e.g. ``"0.512 ± 0.031"``.
    """
    if summary.n == 0:
        return "–"
    if summary.n == 1 or not math.isfinite(summary.std):
        return f"{summary.mean:.{digits}f}"
    return f"{summary.mean:.{digits}f} ± {summary.std:.{digits}f}"
