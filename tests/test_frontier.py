"""Tests for jaxrlhf.frontier: the Gao et al. (2022) fit recovers known (α, β) from synthetic points and
its standard errors equal a numpy ordinary-least-squares re-derivation; the Pareto frontier of a small
hand-made set equals the hand-picked answer."""
import math

import numpy as np
import pytest

from jaxrlhf import frontier


def _ols_reference(d, y, cols):
    """Textbook OLS: β̂ = (XᵀX)⁻¹Xᵀy, cov = s²(XᵀX)⁻¹ with s² = RSS / (P - 2)."""
    X = np.stack(cols, axis=1)
    xtx_inv = np.linalg.inv(X.T @ X)
    coef = xtx_inv @ X.T @ y
    resid = y - X @ coef
    s2 = resid @ resid / (len(y) - 2)
    return coef, np.sqrt(np.diag(s2 * xtx_inv))


def test_gao_curve_by_hand():
    # d = 1: log 1 = 0 -> R = α; d = e: R = e(α - β); d = 0 -> 0
    np.testing.assert_allclose(frontier.gao_curve([0.0, 1.0, math.e], 2.0, 0.5), [0.0, 2.0, math.e * 1.5])
    # best-of-n: d = 2 -> 2(α - 2β)
    np.testing.assert_allclose(frontier.gao_curve([2.0], 2.0, 0.5, form="bon"), [2.0 * (2.0 - 1.0)])
    with pytest.raises(ValueError, match="form"):
        frontier.gao_curve([1.0], 1.0, 1.0, form="ppo")
    with pytest.raises(ValueError, match=">= 0"):
        frontier.gao_curve([-1.0], 1.0, 1.0)


def test_fit_recovers_rl_form_from_noisy_points():
    alpha, beta, noise = 1.0, 0.25, 0.05
    rng = np.random.default_rng(0)
    kl = np.linspace(0.5, 60.0, 40)  # nats; d from 0.71 to 7.75
    # dR/dd = α - β(log d + 1) = 0 at d = exp(α/β - 1) = e^3 ≈ 20, so the range covers the rising,
    # bending part of the curve (the regime a study reaches), not the overoptimised decline.
    d = np.sqrt(kl)
    y = d * (alpha - beta * np.log(d)) + rng.normal(0.0, noise, size=kl.shape)
    fit = frontier.fit_gao(kl, y)
    # tolerance: within 4 standard errors and within 0.05 absolute of the true values
    assert abs(fit.alpha - alpha) < 4 * fit.alpha_se and abs(fit.alpha - alpha) < 0.05
    assert abs(fit.beta - beta) < 4 * fit.beta_se and abs(fit.beta - beta) < 0.05
    assert fit.num_points == 40 and fit.form == "rl"
    coef, se = _ols_reference(d, y, [d, -d * np.log(d)])
    np.testing.assert_allclose([fit.alpha, fit.beta], coef, rtol=1e-6)
    np.testing.assert_allclose([fit.alpha_se, fit.beta_se], se, rtol=1e-4)
    np.testing.assert_allclose(fit.predict([4.0]), [2.0 * (fit.alpha - fit.beta * math.log(2.0))])


def test_fit_recovers_bon_form_and_exact_points():
    alpha, beta = 0.8, 0.1
    kl = np.array([0.0, 1.0, 4.0, 9.0, 16.0, 25.0])  # d = 0..5
    d = np.sqrt(kl)
    y = d * (alpha - beta * d)
    fit = frontier.fit_gao(kl, y, form="bon")
    assert fit.alpha == pytest.approx(alpha, abs=1e-8) and fit.beta == pytest.approx(beta, abs=1e-8)
    assert fit.alpha_se < 1e-6 and fit.beta_se < 1e-6  # noise-free: zero residual
    rng = np.random.default_rng(1)
    noisy = y + rng.normal(0.0, 0.02, size=y.shape)
    fit = frontier.fit_gao(kl, noisy, form="bon")
    coef, se = _ols_reference(d, noisy, [d, -d * d])
    np.testing.assert_allclose([fit.alpha, fit.beta], coef, rtol=1e-6)
    np.testing.assert_allclose([fit.alpha_se, fit.beta_se], se, rtol=1e-4)


def test_fit_negative_kl_is_d_zero_and_sigma_weights():
    # a slightly negative MC estimate sits at d = 0 (contributes R = 0), like KL = 0
    kl = np.array([-0.01, 1.0, 4.0, 9.0])
    y = np.array([0.0, 1.0, 2.0 * (1.0 - 0.2 * math.log(2.0)), 3.0 * (1.0 - 0.2 * math.log(3.0))])
    fit = frontier.fit_gao(kl, y)
    assert fit.alpha == pytest.approx(1.0, abs=1e-8) and fit.beta == pytest.approx(0.2, abs=1e-8)
    # weighted fit equals OLS on rows scaled by 1/sigma (weighted least squares by hand)
    rng = np.random.default_rng(2)
    kl = np.linspace(1.0, 30.0, 12)
    d = np.sqrt(kl)
    sigma = np.linspace(0.01, 0.2, 12)
    y = d * (1.0 - 0.3 * np.log(d)) + rng.normal(0.0, sigma)
    fit = frontier.fit_gao(kl, y, sigma=sigma)
    coef, _ = _ols_reference(d / sigma, y / sigma, [d / sigma, -d * np.log(d) / sigma])
    np.testing.assert_allclose([fit.alpha, fit.beta], coef, rtol=1e-6)


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 3"):
        frontier.fit_gao([1.0, 2.0], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        frontier.fit_gao([1.0, 2.0, float("nan")], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="determine"):
        frontier.fit_gao([4.0, 4.0, 4.0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="equal shape"):
        frontier.fit_gao([1.0, 2.0, 3.0], [0.1, 0.2])


def test_pareto_frontier_hand_picked():
    points = [
        (1.0, 0.2),  # 0 kept
        (2.0, 0.5),  # 1 kept
        (3.0, 0.4),  # 2 dominated by 1 (less KL, more reward)
        (4.0, 0.9),  # 3 kept
        (0.5, 0.1),  # 4 kept (least KL)
        (2.0, 0.3),  # 5 dominated by 1 (same KL, more reward)
        (5.0, 0.9),  # 6 dominated by 3 (same reward, less KL)
        (4.0, 0.9),  # 7 exact duplicate of 3: neither dominates, kept
        (float("nan"), 1.0),  # 8 failed arm, ignored
        (6.0, 1.2),  # 9 kept (most reward)
    ]
    kl, reward = np.array(points).T
    np.testing.assert_array_equal(frontier.pareto_frontier(kl, reward), [4, 0, 1, 3, 7, 9])
    np.testing.assert_array_equal(frontier.pareto_frontier([3.0], [1.0]), [0])
    assert frontier.pareto_frontier([], []).size == 0
    with pytest.raises(ValueError, match="equal shape"):
        frontier.pareto_frontier([1.0, 2.0], [1.0])
