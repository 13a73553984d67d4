"""The DPO family, each loss described once: :data:`PREFERENCE_LOSSES`.

One :class:`PreferenceLoss` entry per ``algo.loss`` name says everything the rest of the package needs:

* ``fn``: an adapter that calls the pure loss of :mod:`jaxrlhf.losses` on per-sequence log-probs;
* ``uses_reference``: whether reference log-probs are needed (the step then runs or reads a reference);
* ``logps``: ``"sum"`` (summed completion log-probs) or ``"mean"`` (length-normalised: sum / tokens), for
  the policy and the reference alike;
* ``label_smoothing``: whether the loss reads ``cfg.label_smoothing`` (others require it to be 0);
* ``unpaired``: KTO-style data (each pair gives two labelled examples; index 1 holds a mismatched
  completion for the KL reference point) instead of preference pairs;
* ``rankings``: K-way ranked data (``[B, N, T]`` + ``ranks [B, N]``, InstructGPT's rankings) instead of
  preference pairs.

Every adapter takes ``beta`` as an argument (a traced scalar: the step reads it from
``TrainState.extra["beta"]``), so runs that differ only in β share one compiled step.

The implicit reward of every loss follows from ``logps`` and ``uses_reference``:
``β (π - ref)`` with a reference, ``β π`` without, on the chosen form of log-probs
(:meth:`PreferenceLoss.implicit_rewards`).

Readers: :class:`jaxrlhf.config.DPOConfig` (valid names, whether a reference is needed, which losses take
``label_smoothing``, KTO's batch rule), :func:`jaxrlhf.algos.dpo.dpo_family_loss` (the step) and
:func:`jaxrlhf.algos.dpo.eval_metrics` (held-out implicit rewards). Adding a variant = one loss
function in :mod:`jaxrlhf.losses` + one entry here.

This module imports only jax, :mod:`jaxrlhf.losses` and :mod:`jaxrlhf.ops` (so :mod:`jaxrlhf.config`
can import it without a circle); adapters read ``cfg`` (a ``DPOConfig``) by attribute.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from jaxrlhf import losses

__all__ = ["PREFERENCE_LOSSES", "PreferenceLoss", "SeqLogps"]


class SeqLogps(NamedTuple):
    """Per-sequence completion log-probabilities: ``sums`` (nats) and ``counts`` (completion tokens), both
    float32 with the batch's leading shape (``[B, 2]``)."""

    sums: jax.Array
    counts: jax.Array

    @property
    def means(self) -> jax.Array:
        """Length-normalised log-probs (``sums / counts``; 0 for an empty completion)."""
        return self.sums / jnp.maximum(self.counts, 1.0)


# An adapter: (policy logps [B, 2], reference logps [B, 2] or None -- both already in the entry's form,
# sums or means --, batch, cfg, beta) -> (loss, metrics). Index 0 = chosen (KTO: the example), 1 = rejected
# (KTO: the mismatched completion); ranked entries get [B, N] in the batch's order.
Adapter = Callable[[jax.Array, "jax.Array | None", dict, Any, Any], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreferenceLoss:
    """One member of the DPO family (see the module docstring for the fields)."""

    name: str
    fn: Adapter
    uses_reference: bool
    logps: Literal["sum", "mean"]
    label_smoothing: bool = False
    unpaired: bool = False
    rankings: bool = False

    def select(self, sums, counts, xp=jnp):
        """``sums`` as this loss reads them: unchanged (``sum``) or ``sums / max(counts, 1)`` (``mean``);
        ``xp`` = ``jnp`` (traced) or ``numpy`` (host)."""
        return sums if self.logps == "sum" else sums / xp.maximum(counts, 1.0)

    def __call__(self, policy: SeqLogps, reference_sums, batch: dict, cfg, beta) -> tuple[jax.Array, dict]:
        """The loss of ``policy`` (and ``reference_sums`` ``[B, 2]`` (``[B, N]``), summed over the same
        completions, or None for a reference-free loss) under ``cfg`` with temperature ``beta`` (float32
        scalar, may be traced): ``(scalar loss, metrics)``."""
        ref = None if reference_sums is None else self.select(reference_sums, policy.counts)
        return self.fn(self.select(policy.sums, policy.counts), ref, batch, cfg, beta)

    def implicit_rewards(self, beta: float, sums, counts, reference_sums=None, xp=jnp):
        """Implicit rewards ``[B, 2]`` as this loss defines them: ``β (π - ref)`` (with a reference) or
        ``β π`` (reference-free), on summed or length-normalised log-probs by ``logps``."""
        pol = self.select(sums, counts, xp)
        if not self.uses_reference:
            return beta * pol
        return beta * (pol - self.select(reference_sums, counts, xp))


def _kto(pol, ref, batch, cfg, beta):
    z0 = losses.kto_kl_reference_point(pol[:, 1], ref[:, 1])
    return losses.kto_loss(pol[:, 0], ref[:, 0], batch["desirable"], z0, beta=beta,
                           desirable_weight=cfg.kto_desirable_weight, undesirable_weight=cfg.kto_undesirable_weight)


_ENTRIES = (
    # DPO (Rafailov et al. 2023); label_smoothing > 0 is cDPO.
    PreferenceLoss(name="dpo", uses_reference=True, logps="sum", label_smoothing=True,
                   fn=lambda pol, ref, batch, cfg, beta: losses.dpo_loss(
                       pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=beta,
                       label_smoothing=cfg.label_smoothing)),
    # IPO (Azar et al. 2023) on length-averaged log-probs, as TRL.
    PreferenceLoss(name="ipo", uses_reference=True, logps="mean",
                   fn=lambda pol, ref, batch, cfg, beta: losses.ipo_loss(
                       pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=beta)),
    # SLiC hinge on DPO log-ratios (TRL "hinge").
    PreferenceLoss(name="hinge", uses_reference=True, logps="sum",
                   fn=lambda pol, ref, batch, cfg, beta: losses.hinge_dpo_loss(
                       pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=beta)),
    # Robust DPO (Chowdhury et al. 2024; TRL "robust"); label_smoothing = the label flip rate.
    PreferenceLoss(name="robust", uses_reference=True, logps="sum", label_smoothing=True,
                   fn=lambda pol, ref, batch, cfg, beta: losses.robust_dpo_loss(
                       pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=beta,
                       label_smoothing=cfg.label_smoothing)),
    # SimPO (Meng et al. 2024): length-normalised, reference-free.
    PreferenceLoss(name="simpo", uses_reference=False, logps="mean", label_smoothing=True,
                   fn=lambda pol, ref, batch, cfg, beta: losses.simpo_loss(
                       pol[:, 0], pol[:, 1], beta=beta, gamma_beta_ratio=cfg.simpo_gamma_beta_ratio,
                       label_smoothing=cfg.label_smoothing)),
    # ORPO (Hong et al. 2024): reference-free; the NLL term is the mean chosen token NLL.
    PreferenceLoss(name="orpo", uses_reference=False, logps="mean",
                   fn=lambda pol, ref, batch, cfg, beta: losses.orpo_loss(pol[:, 0], pol[:, 1], -pol[:, 0], beta=beta)),
    # KTO (Ethayarajh et al. 2024): unpaired examples, KL reference point from the mismatched index 1.
    PreferenceLoss(name="kto", uses_reference=True, logps="sum", unpaired=True, fn=_kto),
    # Plackett-Luce DPO (Rafailov et al. 2023, App. A.3): the whole K-way ranking, not its pairs.
    PreferenceLoss(name="plackett_luce", uses_reference=True, logps="sum", rankings=True,
                   fn=lambda pol, ref, batch, cfg, beta: losses.plackett_luce_dpo_loss(
                       pol, ref, batch["ranks"], beta=beta)),
)

PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {e.name: e for e in _ENTRIES}
