"""Reward–KL frontier maths of the IMDb sentiment study (issue 10): the Gao et al. (2022) fit of reward
against ``d = sqrt(KL)`` and the upper-left Pareto frontier of (KL, reward) points. Host-side numpy/scipy.

Sources: Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model Overoptimization", §3 (functional
forms ``R_bon(d) = d(α_bon - β_bon d)`` and ``R_RL(d) = d(α_RL - β_RL log d)`` with
``d = sqrt(KL(π‖π_init))``); Rafailov et al. 2023, "Direct Preference Optimization", §6.1, Fig. 2 left
(the reward–KL frontier).
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
from scipy.optimize import curve_fit

__all__ = ["GaoForm", "GaoFit", "gao_curve", "fit_gao", "pareto_frontier"]

GaoForm = Literal["rl", "bon"]
_FORMS = ("rl", "bon")


def _require_form(form) -> None:
    if form not in _FORMS:
        raise ValueError(f"`form` must be one of {_FORMS} ('rl': d(α - β log d), 'bon': d(α - β d)), got {form!r}.")


def _basis(d: np.ndarray, form: str) -> tuple[np.ndarray, np.ndarray]:
    """The two columns the Gao forms are linear in: ``R = α·a(d) - β·b(d)``; ``d log d -> 0`` at ``d = 0``."""
    if form == "rl":
        safe = np.where(d > 0, d, 1.0)
        return d, np.where(d > 0, d * np.log(safe), 0.0)
    return d, d * d


class GaoFit(NamedTuple):
    """Result of :func:`fit_gao`.

    Attributes:
      alpha: fitted ``α`` (reward units per ``sqrt(nat)``).
      beta: fitted ``β`` (same units).
      alpha_se: standard error of ``α`` (``sqrt`` of the diagonal of ``curve_fit``'s covariance).
      beta_se: standard error of ``β``.
      form: ``"rl"`` or ``"bon"``, the functional form that was fitted.
      num_points: number of points used.
    """

    alpha: float
    beta: float
    alpha_se: float
    beta_se: float
    form: str
    num_points: int

    def predict(self, kl) -> np.ndarray:
        """The fitted curve at ``kl`` (nats; ``d = sqrt(max(kl, 0))``), float64 array of ``kl``'s shape."""
        return gao_curve(np.sqrt(np.maximum(np.asarray(kl, np.float64), 0.0)), self.alpha, self.beta, self.form)


def gao_curve(d, alpha: float, beta: float, form: GaoForm = "rl") -> np.ndarray:
    """Gao et al. (2022) reward-versus-distance form evaluated at ``d = sqrt(KL)``.

    ``form="rl"``: ``R(d) = d (α - β log d)`` (their RL form); ``form="bon"``: ``R(d) = d (α - β d)``
    (best-of-n). ``R(0) = 0``: ``R`` is the reward *gain* over the initial policy ``π_init = π_ref``.

    Args:
      d: float array ``>= 0``, ``sqrt`` of ``KL(π‖π_ref)`` in nats (so units ``sqrt(nat)``).
      alpha: ``α``.
      beta: ``β``.
      form: ``"rl"`` or ``"bon"``.

    Returns:
      float64 array of ``d``'s shape, reward units.

    Raises:
      ValueError: unknown ``form``; negative ``d``.
    """
    _require_form(form)
    d = np.asarray(d, dtype=np.float64)
    if np.any(d < 0):
        raise ValueError("gao_curve: `d` = sqrt(KL) must be >= 0; clip negative KL estimates before taking sqrt.")
    a, b = _basis(d, form)
    return alpha * a - beta * b


def fit_gao(kl, reward_gain, form: GaoForm = "rl", sigma=None) -> GaoFit:
    """Least-squares fit of the Gao et al. (2022) form to (KL, reward gain) points, with standard errors.

    ``d = sqrt(max(KL, 0))`` (a Monte-Carlo KL estimate can be slightly negative near 0; such points are
    placed at ``d = 0``). The form is linear in ``(α, β)``, so the ordinary least-squares solution is the
    starting point and ``scipy.optimize.curve_fit`` (``absolute_sigma=False``: the covariance is scaled by
    the residual variance) returns the estimate and its covariance; the standard errors are the square
    roots of that covariance's diagonal. Pass reward *gains* over ``π_ref`` (``R(0) = 0`` in the form):
    subtract ``π_ref``'s mean reward from each point's reward first.

    Args:
      kl: float ``[P]`` ``KL(π‖π_ref)`` of each point (e.g. each evaluation of each arm), nats.
      reward_gain: float ``[P]`` reward minus ``π_ref``'s reward at those points (gold or proxy).
      form: ``"rl"`` (``d(α - β log d)``, default) or ``"bon"`` (``d(α - β d)``).
      sigma: optional float ``[P]`` > 0 per-point standard deviations (e.g. standard errors over
        samples); points are then weighted by ``1/sigma²``.

    Returns:
      :class:`GaoFit` ``(alpha, beta, alpha_se, beta_se, form, num_points)``.

    Raises:
      ValueError: unknown ``form``; shapes differ or are not ``[P]``; a value is not finite; fewer than
        3 points (2 parameters plus one degree of freedom for the error estimate); the points do not
        determine both parameters (e.g. all at the same ``d``).
    """
    _require_form(form)
    kl = np.asarray(kl, dtype=np.float64)
    y = np.asarray(reward_gain, dtype=np.float64)
    if kl.ndim != 1 or kl.shape != y.shape:
        raise ValueError(f"fit_gao: `kl` and `reward_gain` must be 1-D [P] of equal shape; got {kl.shape}, {y.shape}.")
    if not (np.all(np.isfinite(kl)) and np.all(np.isfinite(y))):
        raise ValueError("fit_gao: `kl` and `reward_gain` must be finite; drop failed arms' points first.")
    if kl.shape[0] < 3:
        raise ValueError(f"fit_gao: need at least 3 points to fit (α, β) with errors, got {kl.shape[0]}.")
    if sigma is not None:
        sigma = np.asarray(sigma, dtype=np.float64)
        if sigma.shape != y.shape or not np.all(sigma > 0):
            raise ValueError(f"fit_gao: `sigma` must be [P] and > 0; got shape {sigma.shape}.")
    d = np.sqrt(np.maximum(kl, 0.0))
    a, b = _basis(d, form)
    design = np.stack([a, -b], axis=1)
    if np.linalg.matrix_rank(design) < 2:
        raise ValueError("fit_gao: the points do not determine α and β (spread the KL values over several d > 0).")
    w = np.ones_like(y) if sigma is None else 1.0 / sigma
    p0, *_ = np.linalg.lstsq(design * w[:, None], y * w, rcond=None)

    def model(x, alpha, beta):
        return gao_curve(x, alpha, beta, form)

    popt, pcov = curve_fit(model, d, y, p0=p0, sigma=sigma, absolute_sigma=False)
    se = np.sqrt(np.diag(pcov))
    return GaoFit(
        alpha=float(popt[0]),
        beta=float(popt[1]),
        alpha_se=float(se[0]),
        beta_se=float(se[1]),
        form=form,
        num_points=int(y.shape[0]),
    )


def pareto_frontier(kl, reward) -> np.ndarray:
    """Indices of the upper-left Pareto frontier of (KL, reward) points: the non-dominated ones.

    Point ``j`` dominates point ``i`` when ``kl_j <= kl_i`` and ``reward_j >= reward_i`` with at least
    one strict (less KL for at least as much reward, or more reward for at most as much KL). The
    frontier is every point that no other point dominates; exact duplicates do not dominate each other,
    so both are kept. Points with a non-finite KL or reward (a failed arm) are ignored.

    Args:
      kl: float ``[P]`` ``KL(π‖π_ref)`` of each point, nats.
      reward: float ``[P]`` reward of each point (higher is better).

    Returns:
      int64 ``[F]`` indices into the inputs, sorted by KL ascending (then reward descending, then index),
      so plotting ``kl[idx], reward[idx]`` draws the frontier left to right.

    Raises:
      ValueError: shapes differ or are not ``[P]``.
    """
    kl = np.asarray(kl, dtype=np.float64)
    reward = np.asarray(reward, dtype=np.float64)
    if kl.ndim != 1 or kl.shape != reward.shape:
        raise ValueError(f"pareto_frontier: `kl` and `reward` must be 1-D [P] of equal shape; got {kl.shape}, {reward.shape}.")
    ok = np.isfinite(kl) & np.isfinite(reward)
    idx = np.flatnonzero(ok)
    k, r = kl[idx][:, None], reward[idx][:, None]
    # dominated[i, j]: point j dominates point i
    dominated = (k.T <= k) & (r.T >= r) & ((k.T < k) | (r.T > r))
    keep = idx[~dominated.any(axis=1)]
    order = np.lexsort((keep, -reward[keep], kl[keep]))
    return keep[order].astype(np.int64)
