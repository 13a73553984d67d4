"""Training objectives of jaxrlhf: reward models, direct preference optimisation family, PPO.

Every loss is a pure jittable function of arrays (never of models) and returns
``(scalar_loss, metrics)`` where ``metrics`` is a ``dict[str, scalar jax.Array]`` with "/"-separated
keys; every dict carries ``"loss"``. Unless stated otherwise the loss is the mean over the batch axis
``B``. Inputs of any float dtype are upcast; maths is float32 (float64 stays float64 under x64).
Configuration arguments (``beta``, ``aggregation``, ...) are Python values; mark them static (or close
over them) when jitting. Bad arguments raise ``ValueError`` at trace time, before any compute.

Conventions for the preference losses: ``*_chosen_logps`` / ``*_rejected_logps`` are per-sequence
log-probabilities ``[B]`` of the chosen / rejected completion (see ``jaxrlhf.ops.sequence_logprobs``).
Whether they are sums or length-normalised means is the caller's choice and is stated per loss.
"""
from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from jaxrlhf.ops.kl import kl_k3
from jaxrlhf.ops.masked import AGGREGATIONS, as_float, check_same_shape, masked_aggregate, masked_mean, safe_div

__all__ = [
    "plackett_luce_dpo_loss",
    "bradley_terry_loss",
    "ranking_loss",
    "classification_loss",
    "dpo_loss",
    "hinge_dpo_loss",
    "robust_dpo_loss",
    "ipo_loss",
    "simpo_loss",
    "orpo_loss",
    "kto_loss",
    "kto_kl_reference_point",
    "ppo_policy_loss",
    "ppo_value_loss",
]

Aggregation = Literal["token", "sequence"]


# ----------------------------------------------------------------------------------------------------
# Validation helpers.
# ----------------------------------------------------------------------------------------------------
def _require_positive(name: str, value) -> None:
    if isinstance(value, (int, float)) and not value > 0:
        raise ValueError(f"`{name}` must be > 0, got {value}.")


def _require_label_smoothing(value, upper: float = 0.5) -> None:
    if isinstance(value, (int, float)) and not 0.0 <= value < upper:
        raise ValueError(f"`label_smoothing` must lie in [0, {upper}), got {value}; use 0.0 to disable it.")


def _require_1d(**arrays) -> None:
    shape = check_same_shape(**arrays)
    if len(shape) != 1:
        names = ", ".join(f"`{n}`" for n in arrays)
        raise ValueError(f"{names} must be 1-D with shape [B], got shape {list(shape)}.")


def _require_aggregation(aggregation) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"`aggregation` must be one of {AGGREGATIONS}, got {aggregation!r}.")


def _preference_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, loss) -> dict:
    chosen_rewards = jax.lax.stop_gradient(chosen_rewards)
    rejected_rewards = jax.lax.stop_gradient(rejected_rewards)
    return {
        "loss": loss,
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/accuracy": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "rewards/margin": jnp.mean(chosen_rewards - rejected_rewards),
        "logps/chosen": jnp.mean(jax.lax.stop_gradient(chosen_logps)),
        "logps/rejected": jnp.mean(jax.lax.stop_gradient(rejected_logps)),
    }


# ----------------------------------------------------------------------------------------------------
# Reward-model losses.
# ----------------------------------------------------------------------------------------------------
def _log_ratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                beta) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The reference-relative losses' shared start: check four ``[B]`` arrays and ``β > 0``; return float32
    ``(π_c, π_r, π_c - ref_c, π_r - ref_r)``."""
    _require_1d(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    _require_positive("beta", beta)
    pc, pr = as_float(policy_chosen_logps), as_float(policy_rejected_logps)
    return pc, pr, pc - as_float(reference_chosen_logps), pr - as_float(reference_rejected_logps)


def bradley_terry_loss(
    chosen_rewards_B,
    rejected_rewards_B,
    margin_B=None,
    center_rewards_coef: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Pairwise Bradley–Terry reward-model loss, optionally with a margin and reward centring.

    ``L = mean_b[-log σ(r_c - r_r - m)]`` (Ouyang et al. 2022 eq. 1 for one pair; the margin ``m`` is
    Llama 2's, Touvron et al. 2023 eq. 2). With ``center_rewards_coef = c`` the auxiliary term
    ``c · mean_b[(r_c + r_r)²]`` is added, which pins the reward scale's offset near 0 (the reward
    centring discussed by Eisenstein et al. 2023, "Helping or Herding?").

    Args:
      chosen_rewards_B: float ``[B]`` scalar rewards of the preferred completions.
      rejected_rewards_B: float ``[B]`` rewards of the dispreferred completions.
      margin_B: optional float ``[B]`` (>= 0 typically) required reward gap.
      center_rewards_coef: optional coefficient ``c`` of the centring term (None or 0 disables it).

    Returns:
      ``(loss, metrics)``; metrics: ``loss``, ``rewards/accuracy`` (fraction with ``r_c > r_r``),
      ``rewards/margin`` (mean ``r_c - r_r``), ``rewards/chosen``, ``rewards/rejected`` (means),
      ``rewards/mean`` and ``rewards/std`` (over all ``2B`` rewards), and ``rewards/center_loss`` when
      centring is on.

    Raises:
      ValueError: shapes differ or are not ``[B]``.
    """
    arrays = {"chosen_rewards_B": chosen_rewards_B, "rejected_rewards_B": rejected_rewards_B}
    if margin_B is not None:
        arrays["margin_B"] = margin_B
    _require_1d(**arrays)
    rc, rr = as_float(chosen_rewards_B), as_float(rejected_rewards_B)
    diff = rc - rr
    logits = diff if margin_B is None else diff - as_float(margin_B)
    loss = jnp.mean(-jax.nn.log_sigmoid(logits))
    metrics = {}
    if center_rewards_coef is not None:
        center = jnp.mean(jnp.square(rc + rr))
        loss = loss + center_rewards_coef * center
        metrics["rewards/center_loss"] = center
    both = jax.lax.stop_gradient(jnp.concatenate([rc, rr]))
    metrics.update({
        "loss": loss,
        "rewards/accuracy": jnp.mean((rc > rr).astype(jnp.float32)),
        "rewards/margin": jnp.mean(jax.lax.stop_gradient(diff)),
        "rewards/chosen": jnp.mean(jax.lax.stop_gradient(rc)),
        "rewards/rejected": jnp.mean(jax.lax.stop_gradient(rr)),
        "rewards/mean": jnp.mean(both),
        "rewards/std": jnp.std(both),
    })
    return loss, metrics


def ranking_loss(rewards_BN, ranks_BN) -> tuple[jax.Array, dict[str, jax.Array]]:
    """InstructGPT K-wise ranking loss over all strictly ordered pairs of each prompt.

    Ouyang et al. 2022 eq. 1: ``loss(θ) = -1/C(K,2) E[log σ(r(x, y_w) - r(x, y_l))]``. For each prompt,
    every pair ``(i, j)`` with ``0 <= rank_i < rank_j`` contributes ``-log σ(r_i - r_j)``; ties (equal
    ranks) form no pair and ``rank = -1`` marks a missing completion that is excluded (its reward may
    hold anything, even nan). Each prompt weighs once: the loss is the mean over its valid pairs, then
    the mean over prompts that have at least one pair (if no prompt has a pair the loss is 0). For
    ``N = 2`` with ranks ``[0, 1]`` this is :func:`bradley_terry_loss`.

    Args:
      rewards_BN: float ``[B, N]`` rewards of the ``N`` completions of each prompt.
      ranks_BN: int ``[B, N]`` ranks, 0 = best, equal = tie, -1 = missing.

    Returns:
      ``(loss, metrics)``; metrics: ``loss``, ``rewards/accuracy`` (fraction of valid pairs with
      ``r_i > r_j``, weighted like the loss), ``rewards/margin`` (mean ``r_i - r_j``, weighted like the
      loss), ``rewards/num_pairs`` (mean pairs per prompt), ``rewards/prompts_with_pairs`` (fraction).

    Raises:
      ValueError: shapes differ, are not ``[B, N]``, or ranks are not integers.
    """
    shape = check_same_shape(rewards_BN=rewards_BN, ranks_BN=ranks_BN)
    if len(shape) != 2:
        raise ValueError(f"`rewards_BN` and `ranks_BN` must have shape [B, N], got {list(shape)}.")
    if not jnp.issubdtype(jnp.asarray(ranks_BN).dtype, jnp.integer):
        raise ValueError(f"`ranks_BN` must be integers (0 = best, -1 = missing), got {jnp.asarray(ranks_BN).dtype}.")
    rewards = as_float(rewards_BN)
    ranks = jnp.asarray(ranks_BN)
    present = ranks >= 0
    # pair[b, i, j]: completion i is strictly better than completion j, both present.
    pair = (ranks[:, :, None] < ranks[:, None, :]) & present[:, :, None] & present[:, None, :]
    diff = jnp.where(pair, rewards[:, :, None] - rewards[:, None, :], 0.0)  # keeps missing nan out
    pair_f = pair.astype(rewards.dtype)
    n_pairs = jnp.sum(pair_f, axis=(1, 2))  # [B]
    has_pairs = n_pairs > 0
    n_prompts = jnp.sum(has_pairs.astype(rewards.dtype))

    def prompt_weighted(per_pair):
        per_prompt = safe_div(jnp.sum(jnp.where(pair, per_pair, 0.0), axis=(1, 2)), n_pairs)
        return safe_div(jnp.sum(per_prompt), n_prompts)

    loss = prompt_weighted(-jax.nn.log_sigmoid(diff))
    sg_diff = jax.lax.stop_gradient(diff)
    metrics = {
        "loss": loss,
        "rewards/accuracy": prompt_weighted((sg_diff > 0).astype(rewards.dtype)),
        "rewards/margin": prompt_weighted(sg_diff),
        "rewards/num_pairs": jnp.mean(n_pairs),
        "rewards/prompts_with_pairs": jnp.mean(has_pairs.astype(rewards.dtype)),
    }
    return loss, metrics


def classification_loss(
    logits_BC, labels_B, label_smoothing: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Softmax cross-entropy with optional label smoothing (Szegedy et al. 2016, §7).

    Target distribution ``q = (1 - ε) onehot(label) + ε / C``; ``L = mean_b[-Σ_c q_c log softmax(z)_c]``.

    Args:
      logits_BC: float ``[B, C]``.
      labels_B: int ``[B]`` in ``[0, C)`` (not range-checked, to stay jittable).
      label_smoothing: ``ε`` in ``[0, 1)``.

    Returns:
      ``(loss, metrics)``; metrics: ``loss``, ``accuracy`` (argmax == label).

    Raises:
      ValueError: shapes are not ``[B, C]`` / ``[B]``, labels are not integers, or ``ε`` outside [0, 1).
    """
    lshape, yshape = tuple(jnp.shape(logits_BC)), tuple(jnp.shape(labels_B))
    if len(lshape) != 2 or yshape != lshape[:1]:
        raise ValueError(f"`logits_BC` must be [B, C] and `labels_B` [B]; got {list(lshape)} and {list(yshape)}.")
    if not jnp.issubdtype(jnp.asarray(labels_B).dtype, jnp.integer):
        raise ValueError(f"`labels_B` must be integer class ids, got dtype {jnp.asarray(labels_B).dtype}.")
    _require_label_smoothing(label_smoothing, upper=1.0)
    logits = as_float(logits_BC)
    labels = jnp.asarray(labels_B)
    n_classes = lshape[1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    target = jax.nn.one_hot(labels, n_classes, dtype=logits.dtype)
    target = (1.0 - label_smoothing) * target + label_smoothing / n_classes
    loss = jnp.mean(-jnp.sum(target * logp, axis=-1))
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
    return loss, {"loss": loss, "accuracy": accuracy}


# ----------------------------------------------------------------------------------------------------
# Direct preference optimisation family.
# ----------------------------------------------------------------------------------------------------
def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Direct Preference Optimization loss (Rafailov et al. 2023, eq. 7), with conservative smoothing.

    With ``h = (π_c - ref_c) - (π_r - ref_r)`` (differences of sequence log-probs),
    ``L = mean_b[-(1 - ε) log σ(β h) - ε log σ(-β h)]``; ``ε > 0`` is conservative DPO (cDPO, Mitchell
    2023, "A note on DPO with noisy preferences"), i.e. labels flipped with probability ``ε``. When the
    policy equals the reference the loss is ``log 2`` (and its gradient is not 0).

    Args:
      policy_chosen_logps: float ``[B]`` summed log-probs of the chosen completions under the policy.
      policy_rejected_logps: float ``[B]`` same for the rejected completions.
      reference_chosen_logps: float ``[B]`` chosen log-probs under the frozen reference.
      reference_rejected_logps: float ``[B]`` rejected log-probs under the reference.
      beta: ``β > 0``, inverse KL-regularisation strength.
      label_smoothing: ``ε`` in ``[0, 0.5)``.

    Returns:
      ``(loss, metrics)``; metrics: ``loss``, ``rewards/chosen`` (mean ``β(π_c - ref_c)``),
      ``rewards/rejected``, ``rewards/accuracy`` (fraction chosen reward > rejected),
      ``rewards/margin`` (mean reward difference), ``logps/chosen``, ``logps/rejected`` (policy means).

    Raises:
      ValueError: shapes differ or are not ``[B]``; ``beta <= 0``; ``ε`` outside ``[0, 0.5)``.
    """
    _require_label_smoothing(label_smoothing)
    pc, pr, chosen_ratio, rejected_ratio = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta)
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(-logits)
    loss = jnp.mean(losses)
    return loss, _preference_metrics(beta * chosen_ratio, beta * rejected_ratio, pc, pr, loss)


def hinge_dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    beta: float = 0.1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Hinge (SLiC) preference loss on the DPO log-ratios: TRL's ``loss_type="hinge"``.

    Zhao et al. 2023 ("SLiC-HF", the rank-calibration hinge ``max(0, δ - log π_c + log π_r)``) with the
    reference-normalised log-ratios of DPO, as in TRL: with ``h = (π_c - ref_c) - (π_r - ref_r)``,
    ``L = mean_b[max(0, 1 - β h)]``, i.e. the margin ``δ = 1/β``. The gradient is ``-β`` per pair while
    ``β h < 1`` and 0 beyond (at the kink ``β h = 1`` it is 0).

    Args:
      policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
        float ``[B]`` summed log-probs each, as in :func:`dpo_loss`.
      beta: ``β > 0``.

    Returns:
      ``(loss, metrics)`` with the metrics of :func:`dpo_loss` (rewards ``β(π - ref)``).

    Raises:
      ValueError: shapes differ or are not ``[B]``; ``beta <= 0``.
    """
    pc, pr, chosen_ratio, rejected_ratio = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta)
    loss = jnp.mean(jax.nn.relu(1.0 - beta * (chosen_ratio - rejected_ratio)))
    return loss, _preference_metrics(beta * chosen_ratio, beta * rejected_ratio, pc, pr, loss)


def robust_dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback", the de-biased loss), TRL's ``loss_type="robust"``.

    An unbiased loss under preference labels flipped with known probability ``ε``: with
    ``h = (π_c - ref_c) - (π_r - ref_r)``,
    ``L = mean_b[(-(1 - ε) log σ(β h) + ε log σ(-β h)) / (1 - 2ε)]``. ``ε = 0`` is :func:`dpo_loss`.
    (cDPO, the ``label_smoothing`` of :func:`dpo_loss`, instead mixes the two directions with ``+ε``.)

    Args:
      policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
        float ``[B]`` summed log-probs each, as in :func:`dpo_loss`.
      beta: ``β > 0``.
      label_smoothing: the flip rate ``ε`` in ``[0, 0.5)``.

    Returns:
      ``(loss, metrics)`` with the metrics of :func:`dpo_loss`.

    Raises:
      ValueError: shapes differ or are not ``[B]``; ``beta <= 0``; ``ε`` outside ``[0, 0.5)``.
    """
    _require_label_smoothing(label_smoothing)
    pc, pr, chosen_ratio, rejected_ratio = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta)
    logits = beta * (chosen_ratio - rejected_ratio)
    eps = label_smoothing
    losses = (-(1.0 - eps) * jax.nn.log_sigmoid(logits) + eps * jax.nn.log_sigmoid(-logits)) / (1.0 - 2.0 * eps)
    loss = jnp.mean(losses)
    return loss, _preference_metrics(beta * chosen_ratio, beta * rejected_ratio, pc, pr, loss)


def ipo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    beta: float = 0.1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Identity Preference Optimisation loss (Azar et al. 2023, "A General Theoretical Paradigm to
    Understand Learning from Human Preferences", eq. 17).

    ``L = mean_b[(h - 1/(2β))²]`` with ``h = (π_c - ref_c) - (π_r - ref_r)``; here ``β`` plays the role
    of the paper's ``τ``. The log-probs are taken as given: many implementations pass length-averaged
    log-probs (``sequence_logprobs(..., average=True)``), the paper's formula uses sums; the caller
    chooses.

    Args:
      policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
        float ``[B]`` each, as in :func:`dpo_loss`.
      beta: ``β > 0``; the target log-ratio gap is ``1/(2β)``.

    Returns:
      ``(loss, metrics)`` with the metrics of :func:`dpo_loss`.

    Raises:
      ValueError: shapes differ or are not ``[B]``; ``beta <= 0``.
    """
    pc, pr, chosen_ratio, rejected_ratio = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta)
    loss = jnp.mean(jnp.square(chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)))
    return loss, _preference_metrics(beta * chosen_ratio, beta * rejected_ratio, pc, pr, loss)


def simpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Simple Preference Optimization loss (Meng et al. 2024, "SimPO", eq. 6), reference-free.

    ``L = mean_b[-(1 - ε) log σ(z) - ε log σ(-z)]``, ``z = β (π̄_c - π̄_r) - γ`` with ``γ =
    gamma_beta_ratio · β``. The log-probs **must be length-normalised** (the per-token average,
    ``sequence_logprobs(..., average=True)``): SimPO's implicit reward is ``β/|y| log π(y|x)``.

    Args:
      policy_chosen_logps: float ``[B]`` average per-token log-prob of the chosen completions.
      policy_rejected_logps: float ``[B]`` same for the rejected completions.
      beta: ``β > 0``.
      gamma_beta_ratio: ``γ/β``, the target reward margin in units of ``β``.
      label_smoothing: ``ε`` in ``[0, 0.5)`` (cDPO-style smoothing, as in the SimPO code).

    Returns:
      ``(loss, metrics)``; metrics: ``loss``, ``rewards/chosen`` (mean ``β π̄_c``), ``rewards/rejected``,
      ``rewards/accuracy``, ``rewards/margin``, ``logps/chosen``, ``logps/rejected``.

    Raises:
      ValueError: shapes differ or are not ``[B]``; ``beta <= 0``; ``ε`` outside ``[0, 0.5)``.
    """
    _require_1d(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    _require_positive("beta", beta)
    _require_label_smoothing(label_smoothing)
    pc, pr = as_float(policy_chosen_logps), as_float(policy_rejected_logps)
    logits = beta * (pc - pr) - gamma_beta_ratio * beta
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(-logits)
    loss = jnp.mean(losses)
    return loss, _preference_metrics(beta * pc, beta * pr, pc, pr, loss)


def _log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 - exp(x))`` for ``x < 0``, stable over the whole range (Mächler 2012)."""
    near_zero = x > -math.log(2.0)
    a = jnp.where(near_zero, x, -1.0)  # double `where`: the unused branch never sees a bad input
    b = jnp.where(near_zero, -1.0, x)
    return jnp.where(near_zero, jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(b)))


def orpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    chosen_nll,
    beta: float = 0.1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Odds-Ratio Preference Optimization loss (Hong et al. 2024, "ORPO", eqs. 6–7), reference-free.

    ``odds(y) = P(y)/(1 - P(y))`` with ``log P(y)`` the **length-averaged** per-token log-prob, so
    ``log odds = logp - log(1 - exp(logp))`` (computed stably with ``log1p/expm1``). Then
    ``L_OR = -log σ(log odds_c - log odds_r)`` and ``L = mean(chosen_nll) + β · mean_b(L_OR)``
    (the paper's ``λ`` is ``beta``).

    Args:
      policy_chosen_logps: float ``[B]`` average per-token log-prob (< 0) of the chosen completions.
      policy_rejected_logps: float ``[B]`` same for the rejected completions.
      chosen_nll: float ``[B]`` or scalar: the SFT negative log-likelihood of the chosen completions
        (typically the token-mean NLL, i.e. ``-policy_chosen_logps``); its mean is added.
      beta: ``λ > 0`` weight of the odds-ratio term.

    Log-probs at exactly 0 (probability 1) give infinite log-odds; inputs are not clamped.

    Returns:
      ``(loss, metrics)``; metrics: ``loss``, ``orpo/nll`` (mean chosen NLL), ``orpo/or_loss`` (mean
      ``L_OR``), ``orpo/log_odds_ratio`` (mean ``log odds_c - log odds_r``), ``rewards/chosen`` (mean
      ``β logp_c``), ``rewards/rejected``, ``rewards/accuracy``, ``rewards/margin``, ``logps/chosen``,
      ``logps/rejected``.

    Raises:
      ValueError: shapes differ or are not ``[B]``; ``chosen_nll`` is neither ``[B]`` nor scalar;
        ``beta <= 0``.
    """
    _require_1d(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    nll_shape = tuple(jnp.shape(chosen_nll))
    if nll_shape not in ((), tuple(jnp.shape(policy_chosen_logps))):
        raise ValueError(
            f"`chosen_nll` must be a scalar or have shape {list(jnp.shape(policy_chosen_logps))}, "
            f"got {list(nll_shape)}."
        )
    _require_positive("beta", beta)
    pc, pr = as_float(policy_chosen_logps), as_float(policy_rejected_logps)
    log_odds = (pc - pr) - (_log1mexp(pc) - _log1mexp(pr))
    or_losses = -jax.nn.log_sigmoid(log_odds)
    nll = jnp.mean(as_float(chosen_nll))
    or_loss = jnp.mean(or_losses)
    loss = nll + beta * or_loss
    metrics = _preference_metrics(beta * pc, beta * pr, pc, pr, loss)
    metrics.update({
        "orpo/nll": nll,
        "orpo/or_loss": or_loss,
        "orpo/log_odds_ratio": jnp.mean(jax.lax.stop_gradient(log_odds)),
    })
    return loss, metrics


def kto_kl_reference_point(policy_logps_mismatched, reference_logps_mismatched) -> jax.Array:
    """KTO reference point ``z0 = max(0, mean(π - ref))`` on mismatched pairs, without gradient.

    Ethayarajh et al. 2024 ("KTO"), §4.1: ``z0 = KL(π_θ(y'|x) || π_ref(y'|x))`` is estimated from
    completions ``y'`` paired with unrelated prompts ``x`` in the same batch; it is clamped at 0 and not
    back-propagated through. Under ``jit`` with a sharded batch the mean is global.

    Args:
      policy_logps_mismatched: float ``[B]`` sequence log-probs of mismatched (x, y') under the policy.
      reference_logps_mismatched: float ``[B]`` same under the reference.

    Returns:
      float32 scalar ``>= 0``.

    Raises:
      ValueError: shapes differ or are not ``[B]``.
    """
    _require_1d(
        policy_logps_mismatched=policy_logps_mismatched,
        reference_logps_mismatched=reference_logps_mismatched,
    )
    kl = jnp.mean(as_float(policy_logps_mismatched) - as_float(reference_logps_mismatched))
    return jax.lax.stop_gradient(jnp.maximum(kl, 0.0))


def kto_loss(
    policy_logps_B,
    reference_logps_B,
    desirable_B,
    kl_reference_point,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Kahneman–Tversky Optimization loss (Ethayarajh et al. 2024, "KTO", eq. 8).

    With ``r = π - ref`` (sequence log-ratio) and ``z0 = stop_gradient(max(kl_reference_point, 0))``:
    ``v = λ_D σ(β(r - z0))`` for desirable examples, ``v = λ_U σ(β(z0 - r))`` for undesirable ones, and
    ``L = mean_b[λ_y - v]``.

    Args:
      policy_logps_B: float ``[B]`` sequence log-probs under the policy.
      reference_logps_B: float ``[B]`` same under the reference.
      desirable_B: bool ``[B]`` (or 0/1 ints): True = desirable example.
      kl_reference_point: float scalar ``z0`` (e.g. :func:`kto_kl_reference_point`); clamped >= 0 and
        not differentiated.
      beta: ``β > 0``.
      desirable_weight: ``λ_D > 0``.
      undesirable_weight: ``λ_U > 0``.

    Returns:
      ``(loss, metrics)``; metrics: ``loss``, ``kto/kl`` (the clamped ``z0``), ``rewards/chosen`` (mean
      ``β r`` over desirable examples, 0 if none), ``rewards/rejected`` (over undesirable ones),
      ``rewards/margin`` (their difference), ``logps/chosen``, ``logps/rejected`` (policy means over the
      two groups), ``kto/desirable_fraction``.

    Raises:
      ValueError: shapes differ or are not ``[B]``; ``kl_reference_point`` is not a scalar; a weight or
        ``beta`` is <= 0.
    """
    _require_1d(policy_logps_B=policy_logps_B, reference_logps_B=reference_logps_B, desirable_B=desirable_B)
    if jnp.ndim(kl_reference_point) != 0:
        raise ValueError(f"`kl_reference_point` must be a scalar, got shape {list(jnp.shape(kl_reference_point))}.")
    _require_positive("beta", beta)
    _require_positive("desirable_weight", desirable_weight)
    _require_positive("undesirable_weight", undesirable_weight)
    policy = as_float(policy_logps_B)
    logratio = policy - as_float(reference_logps_B)
    desirable = jnp.asarray(desirable_B).astype(bool)
    z0 = jax.lax.stop_gradient(jnp.maximum(as_float(kl_reference_point), 0.0))
    value = jnp.where(
        desirable,
        desirable_weight * jax.nn.sigmoid(beta * (logratio - z0)),
        undesirable_weight * jax.nn.sigmoid(beta * (z0 - logratio)),
    )
    weight = jnp.where(desirable, desirable_weight, undesirable_weight)
    loss = jnp.mean(weight - value)
    rewards = jax.lax.stop_gradient(beta * logratio)
    sg_policy = jax.lax.stop_gradient(policy)
    chosen_reward = masked_mean(rewards, desirable)
    rejected_reward = masked_mean(rewards, ~desirable)
    metrics = {
        "loss": loss,
        "kto/kl": z0,
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/margin": chosen_reward - rejected_reward,
        "logps/chosen": masked_mean(sg_policy, desirable),
        "logps/rejected": masked_mean(sg_policy, ~desirable),
        "kto/desirable_fraction": jnp.mean(desirable.astype(jnp.float32)),
    }
    return loss, metrics


# ----------------------------------------------------------------------------------------------------
# PPO.
# ----------------------------------------------------------------------------------------------------
def ppo_policy_loss(
    logps_BT,
    old_logps_BT,
    advantages_BT,
    mask_BT,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: Aggregation = "token",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO clipped-surrogate policy loss (Schulman et al. 2017, eq. 7), negated for minimisation.

    Per token, with ``ρ = exp(logp - old_logp)``:
    ``ℓ = -min(ρ A, clip(ρ, 1 - ε_low, 1 + ε_high) A)``. ``ε_low = clip_eps``; ``ε_high = clip_eps_high``
    (defaults to ``clip_eps``; a larger value is DAPO's "clip-higher", Yu et al. 2025, §3.1). With
    ``dual_clip = c > 1``, tokens with ``A < 0`` use ``ℓ = -max(min(ρ A, clip(ρ) A), c A)``, bounding
    the loss of very large ratios (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep
    RL", eq. 5).

    Aggregation: ``"token"`` = mean over every valid token of the batch (token-weighted);
    ``"sequence"`` = mean over valid tokens of each row, then mean over rows that have a valid token.

    Args:
      logps_BT: float ``[..., T]`` log-probs of the sampled tokens under the current policy.
      old_logps_BT: float ``[..., T]`` same under the behaviour (sampling) policy; not differentiated.
      advantages_BT: float ``[..., T]`` advantages (treated as constants).
      mask_BT: ``[..., T]`` nonzero on tokens that count.
      clip_eps: ``ε_low > 0``.
      clip_eps_high: ``ε_high > 0`` or None (= ``clip_eps``).
      dual_clip: ``c > 1`` or None (off).
      aggregation: ``"token"`` or ``"sequence"``.

    Returns:
      ``(loss, metrics)``; metrics (token-weighted means over valid tokens): ``loss``, ``policy/loss``
      (= ``loss``), ``policy/clip_fraction`` (tokens whose gradient the clip removes: ``ρ > 1 + ε_high``
      with ``A > 0`` or ``ρ < 1 - ε_low`` with ``A < 0``), ``policy/dual_clip_fraction`` (when
      ``dual_clip`` is set: ``A < 0`` tokens where the ``c A`` bound is active), ``policy/approx_kl``
      (k3 estimate of ``KL(π_old || π)``: ``(ρ - 1) - log ρ``, see ``jaxrlhf.ops.kl_k3``),
      ``policy/ratio_mean``.

    Raises:
      ValueError: shapes differ or have no time axis; ``clip_eps``/``clip_eps_high <= 0``;
        ``dual_clip <= 1``; unknown ``aggregation``.
    """
    shape = check_same_shape(
        logps_BT=logps_BT, old_logps_BT=old_logps_BT, advantages_BT=advantages_BT, mask_BT=mask_BT
    )
    if len(shape) < 1:
        raise ValueError("ppo_policy_loss: inputs need a time axis [..., T], got scalars.")
    _require_positive("clip_eps", clip_eps)
    if clip_eps_high is None:
        clip_eps_high = clip_eps
    _require_positive("clip_eps_high", clip_eps_high)
    if dual_clip is not None and isinstance(dual_clip, (int, float)) and not dual_clip > 1.0:
        raise ValueError(f"`dual_clip` must be > 1 (or None to disable), got {dual_clip}.")
    _require_aggregation(aggregation)

    logps = as_float(logps_BT)
    old = jax.lax.stop_gradient(as_float(old_logps_BT))
    adv = jax.lax.stop_gradient(as_float(advantages_BT))
    valid = jnp.asarray(mask_BT) != 0
    log_ratio = jnp.where(valid, logps - old, 0.0)  # padding may hold garbage log-probs
    adv = jnp.where(valid, adv, 0.0)
    ratio = jnp.exp(log_ratio)
    surr_unclipped = ratio * adv
    surr_clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps_high) * adv
    losses = -jnp.minimum(surr_unclipped, surr_clipped)
    metrics = {}
    if dual_clip is not None:
        bound = -dual_clip * adv  # loss upper bound for A < 0
        dual_active = (adv < 0) & (losses > bound)
        losses = jnp.where(adv < 0, jnp.minimum(losses, bound), losses)
        metrics["policy/dual_clip_fraction"] = masked_mean(dual_active, mask_BT)
    loss = masked_aggregate(losses, mask_BT, aggregation)
    sg_ratio = jax.lax.stop_gradient(ratio)
    clipped = ((sg_ratio > 1.0 + clip_eps_high) & (adv > 0)) | ((sg_ratio < 1.0 - clip_eps) & (adv < 0))
    metrics.update({
        "loss": loss,
        "policy/loss": loss,
        "policy/clip_fraction": masked_mean(clipped, mask_BT),
        "policy/approx_kl": masked_mean(kl_k3(old, jax.lax.stop_gradient(logps)), mask_BT),
        "policy/ratio_mean": masked_mean(sg_ratio, mask_BT),
    })
    return loss, metrics


def ppo_value_loss(
    values_BT,
    old_values_BT,
    returns_BT,
    mask_BT,
    clip_eps: float | None = 0.2,
    aggregation: Aggregation = "token",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped PPO value loss (the value clipping of the PPO reference implementation, OpenAI
    baselines ``ppo2``; see also Ziegler et al. 2019).

    Per token: ``ℓ = ½ max((v - R)², (v_clip - R)²)`` with
    ``v_clip = clip(v, old_v - ε, old_v + ε)`` (equal to ``old_v + clip(v - old_v, -ε, ε)`` in exact
    arithmetic; this form is ``v`` itself inside the band, so float rounding never marks an unclipped
    token as clipped). ``clip_eps=None`` disables clipping (``ℓ = ½(v - R)²``).

    Args:
      values_BT: float ``[..., T]`` current critic values.
      old_values_BT: float ``[..., T]`` values at rollout time (not differentiated).
      returns_BT: float ``[..., T]`` return targets (e.g. from :func:`jaxrlhf.ops.gae`; constants).
      mask_BT: ``[..., T]`` nonzero on tokens that count.
      clip_eps: ``ε > 0`` or None.
      aggregation: ``"token"`` or ``"sequence"`` (as in :func:`ppo_policy_loss`).

    Returns:
      ``(loss, metrics)``; metrics (token-weighted over valid tokens): ``loss``, ``value/loss``,
      ``value/clip_fraction`` (tokens where the clipped term is strictly larger, so the gradient is
      removed), ``value/mean`` (current values), ``value/returns_mean``.

    Raises:
      ValueError: shapes differ or have no time axis; ``clip_eps <= 0``; unknown ``aggregation``.
    """
    shape = check_same_shape(
        values_BT=values_BT, old_values_BT=old_values_BT, returns_BT=returns_BT, mask_BT=mask_BT
    )
    if len(shape) < 1:
        raise ValueError("ppo_value_loss: inputs need a time axis [..., T], got scalars.")
    if clip_eps is not None:
        _require_positive("clip_eps", clip_eps)
    _require_aggregation(aggregation)
    valid = jnp.asarray(mask_BT) != 0
    values = jnp.where(valid, as_float(values_BT), 0.0)
    old = jnp.where(valid, jax.lax.stop_gradient(as_float(old_values_BT)), 0.0)
    returns = jnp.where(valid, jax.lax.stop_gradient(as_float(returns_BT)), 0.0)
    err_unclipped = jnp.square(values - returns)
    if clip_eps is None:
        losses = 0.5 * err_unclipped
        clipped = jnp.zeros_like(valid)
    else:
        v_clip = jnp.clip(values, old - clip_eps, old + clip_eps)
        err_clipped = jnp.square(v_clip - returns)
        losses = 0.5 * jnp.maximum(err_unclipped, err_clipped)
        clipped = jax.lax.stop_gradient(err_clipped > err_unclipped)
    loss = masked_aggregate(losses, mask_BT, aggregation)
    metrics = {
        "loss": loss,
        "value/loss": loss,
        "value/clip_fraction": masked_mean(clipped, mask_BT),
        "value/mean": masked_mean(jax.lax.stop_gradient(values), mask_BT),
        "value/returns_mean": masked_mean(returns, mask_BT),
    }
    return loss, metrics


# ----------------------------------------------------------------------------------------------------
# Plackett–Luce DPO: DPO on a whole K-way ranking (appended for the IMDb study, issue 10).
# ----------------------------------------------------------------------------------------------------
def plackett_luce_dpo_loss(
    policy_logps_BN,
    ref_logps_BN,
    ranks_BN,
    *,
    beta: float = 0.1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO on K-way rankings under the Plackett–Luce model (Rafailov et al. 2023, Appendix A.3, eq. 18).

    With implicit rewards ``r_i = β (log π(y_i|x) - log π_ref(y_i|x))`` and the observed ranking ``τ``
    of the present completions of a prompt (best first, ``τ(1)`` best, ``K`` present completions), the
    per-prompt loss is the negative log-likelihood of ``τ`` under Plackett–Luce::

        L_b = -Σ_{k=1..K} log( exp(r_{τ(k)}) / Σ_{j=k..K} exp(r_{τ(j)}) )
            =  Σ_{k=1..K} [ logsumexp_{j>=k} r_{τ(j)} - r_{τ(k)} ]

    (the ``k = K`` term is 0). The loss is the mean of ``L_b`` over prompts with at least two present
    completions (others contribute nothing and are not counted; 0 if no prompt qualifies). For ``K = 2``
    it is exactly :func:`dpo_loss` (``-log σ(r_c - r_r)``).

    Ranks: ``0`` = best, larger = worse, ``-1`` = missing completion (excluded; its log-probs may hold
    anything, even nan, and get zero gradient). Ranks need not be contiguous. **Ties are broken by
    index**: completions with equal rank are ordered by their position on the ``N`` axis (lower index
    first), i.e. ``τ`` sorts by ``(rank, index)``. Plackett–Luce has no tie model, so pass strict ranks
    when ties are meaningful (rankings from continuous reward scores are strict almost surely).

    Args:
      policy_logps_BN: float ``[B, N]`` summed log-probs of the ``N`` completions under the policy.
      ref_logps_BN: float ``[B, N]`` the same under the frozen reference.
      ranks_BN: int ``[B, N]`` ranks, 0 = best, -1 = missing (ties broken by index, see above).
      beta: ``β > 0``, inverse KL-regularisation strength (a Python number or a traced scalar).

    Returns:
      ``(loss, metrics)``; metrics: ``loss``; ``rewards/chosen``, ``rewards/rejected`` (mean implicit
      reward of the best / worst completion, i.e. first / last in ``τ``); ``logps/chosen``,
      ``logps/rejected`` (their policy log-probs); ``rewards/accuracy`` and ``rewards/margin`` (over
      strictly ordered pairs ``rank_i < rank_j`` of present completions: fraction with ``r_i > r_j`` and
      mean ``r_i - r_j``, each prompt weighing once as in :func:`ranking_loss`); ``rewards/num_ranked``
      (mean present completions per prompt); ``rewards/prompts_ranked`` (fraction of prompts with >= 2).
      All means over prompts are over the prompts with >= 2 present completions. With ``N = 2`` and
      ranks ``[0, 1]`` the metrics equal those of :func:`dpo_loss`.

    Raises:
      ValueError: shapes differ or are not ``[B, N]``; ranks are not integers; ``beta <= 0``.
    """
    shape = check_same_shape(policy_logps_BN=policy_logps_BN, ref_logps_BN=ref_logps_BN, ranks_BN=ranks_BN)
    if len(shape) != 2:
        raise ValueError(f"`policy_logps_BN`, `ref_logps_BN`, `ranks_BN` must have shape [B, N], got {list(shape)}.")
    if not jnp.issubdtype(jnp.asarray(ranks_BN).dtype, jnp.integer):
        raise ValueError(f"`ranks_BN` must be integers (0 = best, -1 = missing), got {jnp.asarray(ranks_BN).dtype}.")
    _require_positive("beta", beta)
    n = shape[1]
    ranks = jnp.asarray(ranks_BN)
    present = ranks >= 0
    policy = as_float(policy_logps_BN)
    policy_safe = jnp.where(present, policy, 0.0)  # keeps nan of missing completions out of values and grads
    ratio = jnp.where(present, policy - as_float(ref_logps_BN), 0.0)
    rewards = beta * ratio  # [B, N]

    # later[b, i, j]: completion j comes at or after completion i in τ (sorted by (rank, index)), both present.
    idx = jnp.arange(n)
    rank_i, rank_j = ranks[:, :, None], ranks[:, None, :]
    at_or_after = (rank_j > rank_i) | ((rank_j == rank_i) & (idx[None, :] >= idx[:, None]))
    both = present[:, :, None] & present[:, None, :]
    later = at_or_after & both
    # The diagonal keeps every row's logsumexp finite (a missing i then sees only its own reward 0).
    in_set = later | jnp.eye(n, dtype=bool)
    lse = jax.nn.logsumexp(jnp.where(in_set, rewards[:, None, :], -jnp.inf), axis=-1)  # [B, N]
    per_prompt = jnp.sum(jnp.where(present, lse - rewards, 0.0), axis=-1)  # [B]

    dtype = rewards.dtype
    n_present = jnp.sum(present.astype(dtype), axis=-1)
    ranked = n_present >= 2
    n_ranked = jnp.sum(ranked.astype(dtype))

    def over_prompts(x_B):
        return safe_div(jnp.sum(jnp.where(ranked, x_B, 0.0)), n_ranked)

    loss = over_prompts(per_prompt)

    sg_rewards = jax.lax.stop_gradient(rewards)
    sg_policy = jax.lax.stop_gradient(policy_safe)
    n_later = jnp.sum(later.astype(dtype), axis=-1)  # [B, N]
    first = present & (n_later == n_present[:, None])  # every present completion is at/after it
    last = present & (n_later == 1)  # only itself is at/after it

    def pick(mask_BN, x_BN):
        return over_prompts(jnp.sum(jnp.where(mask_BN, x_BN, 0.0), axis=-1))

    pair = (rank_i < rank_j) & both  # strictly ordered pairs, i better
    pair_f = pair.astype(dtype)
    n_pairs = jnp.sum(pair_f, axis=(1, 2))
    has_pairs = n_pairs > 0
    diff = sg_rewards[:, :, None] - sg_rewards[:, None, :]

    def pair_weighted(per_pair):
        per_prompt_pairs = safe_div(jnp.sum(jnp.where(pair, per_pair, 0.0), axis=(1, 2)), n_pairs)
        return safe_div(jnp.sum(jnp.where(has_pairs, per_prompt_pairs, 0.0)), jnp.sum(has_pairs.astype(dtype)))

    metrics = {
        "loss": loss,
        "rewards/chosen": pick(first, sg_rewards),
        "rewards/rejected": pick(last, sg_rewards),
        "rewards/accuracy": pair_weighted((diff > 0).astype(dtype)),
        "rewards/margin": pair_weighted(diff),
        "logps/chosen": pick(first, sg_policy),
        "logps/rejected": pick(last, sg_policy),
        "rewards/num_ranked": jnp.mean(n_present),
        "rewards/prompts_ranked": jnp.mean(ranked.astype(dtype)),
    }
    return loss, metrics


