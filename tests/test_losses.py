"""Tests for jaxrlhf.losses against independent numpy re-derivations (values and gradients).

Gradients are checked against float64 central finite differences of the numpy references (or against
analytic derivatives where they are short), so a wrong sign, factor or stop-gradient is caught.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import losses
from jit_cache import jit_cached


_jit = jit_cached


bradley_terry_loss = _jit(losses.bradley_terry_loss)
classification_loss = _jit(losses.classification_loss)
dpo_loss = _jit(losses.dpo_loss)
ipo_loss = _jit(losses.ipo_loss)
kto_kl_reference_point = _jit(losses.kto_kl_reference_point)
kto_loss = _jit(losses.kto_loss)
orpo_loss = _jit(losses.orpo_loss)
ppo_policy_loss = _jit(losses.ppo_policy_loss)
ppo_value_loss = _jit(losses.ppo_value_loss)
ranking_loss = _jit(losses.ranking_loss)
simpo_loss = _jit(losses.simpo_loss)


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
def np_logsig(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def fd_grad(f, x, h=1e-6):
    """Central finite-difference gradient of scalar numpy function ``f`` at ``x`` (float64)."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        g[idx] = (f(xp) - f(xm)) / (2 * h)
    return g


def check_grad(jax_loss, np_loss, args, argnums, rtol=1e-4, atol=2e-6):
    """jax.grad of ``jax_loss(*args)[0]`` wrt each of ``argnums`` vs finite differences of ``np_loss``."""
    grads = jax.jit(jax.grad(lambda *a: jax_loss(*a)[0], argnums=argnums))(*[jnp.asarray(a) for a in args])
    for k, i in enumerate(argnums):

        def f(x, i=i):
            a = list(args)
            a[i] = x
            return np_loss(*a)

        np.testing.assert_allclose(np.asarray(grads[k]), fd_grad(f, args[i]), rtol=rtol, atol=atol)


def rand(rng, *shape, scale=1.0, loc=0.0):
    return (loc + scale * rng.normal(size=shape)).astype(np.float32)


def assert_metrics_scalar(metrics):
    assert "loss" in metrics
    for k, v in metrics.items():
        assert jnp.shape(v) == (), k
        assert np.isfinite(float(v)), k


# ----------------------------------------------------------------------------------------------------
# reward model losses
# ----------------------------------------------------------------------------------------------------
def np_bt(rc, rr, m=None, c=None):
    m = 0.0 if m is None else m
    loss = np.mean(-np_logsig(rc - rr - m))
    if c is not None:
        loss += c * np.mean((np.asarray(rc, np.float64) + rr) ** 2)
    return loss


@pytest.mark.parametrize("use_margin,coef", [(False, None), (True, None), (True, 0.01), (False, 0.5)])
def test_bradley_terry(use_margin, coef):
    rng = np.random.default_rng(0)
    rc, rr = rand(rng, 7), rand(rng, 7)
    m = np.abs(rand(rng, 7)) if use_margin else None
    loss, metrics = jax.jit(losses.bradley_terry_loss, static_argnums=3)(rc, rr, m, coef)
    np.testing.assert_allclose(loss, np_bt(rc, rr, m, coef), rtol=1e-5)
    assert_metrics_scalar(metrics)
    np.testing.assert_allclose(metrics["rewards/accuracy"], np.mean(rc > rr))
    np.testing.assert_allclose(metrics["rewards/margin"], np.mean(rc - rr), rtol=1e-5, atol=1e-6)
    allr = np.concatenate([rc, rr])
    np.testing.assert_allclose(metrics["rewards/mean"], allr.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["rewards/std"], allr.std(), rtol=1e-5)
    check_grad(
        lambda a, b: bradley_terry_loss(a, b, m, coef),
        lambda a, b: np_bt(a, b, m, coef),
        (rc, rr),
        (0, 1),
    )


def test_bradley_terry_analytic_gradient_and_validation():
    rc, rr = np.array([1.0, -0.5], np.float32), np.array([0.0, 0.5], np.float32)
    g = jax.grad(lambda a: bradley_terry_loss(a, rr)[0])(rc)
    sig = 1 / (1 + np.exp(-(rc - rr)))
    np.testing.assert_allclose(g, -(1 - sig) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        bradley_terry_loss(jnp.zeros(3), jnp.zeros(4))
    with pytest.raises(ValueError, match=r"\[B\]"):
        bradley_terry_loss(jnp.zeros((3, 2)), jnp.zeros((3, 2)))


def np_ranking(rewards, ranks):
    per_prompt = []
    for b in range(rewards.shape[0]):
        pair_losses = []
        for i in range(rewards.shape[1]):
            for j in range(rewards.shape[1]):
                if ranks[b, i] >= 0 and ranks[b, j] >= 0 and ranks[b, i] < ranks[b, j]:
                    pair_losses.append(-np_logsig(rewards[b, i] - rewards[b, j]))
        if pair_losses:
            per_prompt.append(np.mean(pair_losses))
    return float(np.mean(per_prompt)) if per_prompt else 0.0


def test_ranking_loss_matches_numpy_with_ties_and_missing():
    rng = np.random.default_rng(1)
    rewards = rand(rng, 5, 4)
    ranks = np.array(
        [[0, 1, 2, 3], [2, 0, 3, 1], [0, 0, 1, -1], [1, -1, -1, 0], [-1, 0, -1, -1]], np.int32
    )  # distinct, permuted, tie + missing, missing, a single completion (no pair)
    loss, metrics = jax.jit(losses.ranking_loss)(rewards, ranks)
    np.testing.assert_allclose(loss, np_ranking(rewards, ranks), rtol=1e-5)
    assert_metrics_scalar(metrics)
    np.testing.assert_allclose(metrics["rewards/prompts_with_pairs"], 4 / 5)
    np.testing.assert_allclose(metrics["rewards/num_pairs"], (6 + 6 + 2 + 1 + 0) / 5)
    check_grad(ranking_loss, lambda r, k: np_ranking(r, k), (rewards, ranks), (0,))


def test_ranking_loss_special_cases():
    rng = np.random.default_rng(2)
    # N = 2 equals Bradley–Terry (either order of the completions).
    rewards = rand(rng, 6, 2)
    ranks = np.array([[0, 1], [1, 0]] * 3, np.int32)
    chosen = np.where(ranks[:, 0] == 0, rewards[:, 0], rewards[:, 1])
    rejected = np.where(ranks[:, 0] == 0, rewards[:, 1], rewards[:, 0])
    np.testing.assert_allclose(ranking_loss(rewards, ranks)[0], bradley_terry_loss(chosen, rejected)[0], rtol=1e-6)
    # N = 4, distinct ranks: the mean of the 6 pair losses.
    r4 = rand(rng, 1, 4)
    k4 = np.array([[3, 0, 2, 1]], np.int32)
    order = np.argsort(k4[0])  # best first
    pairs = [(order[a], order[b]) for a in range(4) for b in range(a + 1, 4)]
    assert len(pairs) == 6
    expected = np.mean([-np_logsig(r4[0, i] - r4[0, j]) for i, j in pairs])
    np.testing.assert_allclose(ranking_loss(r4, k4)[0], expected, rtol=1e-6)
    # All ties: no pairs, loss 0. Missing completions may hold nan: loss and gradient stay finite
    # and equal those without the missing column.
    assert float(ranking_loss(r4, np.zeros((1, 4), np.int32))[0]) == 0.0
    r_nan = r4.copy()
    r_nan[0, 2] = np.nan
    k_missing = np.array([[1, 0, -1, 2]], np.int32)
    loss, _ = ranking_loss(r_nan, k_missing)
    np.testing.assert_allclose(loss, ranking_loss(r4[:, [0, 1, 3]], k_missing[:, [0, 1, 3]])[0], rtol=1e-6)
    g = jax.grad(lambda r: ranking_loss(r, k_missing)[0])(jnp.asarray(r_nan))
    assert np.all(np.isfinite(np.asarray(g))) and float(g[0, 2]) == 0.0
    # Tie excluded: ranks [0, 0, 1] gives pairs (0,2), (1,2) only.
    r3 = rand(rng, 1, 3)
    tie = (-np_logsig(r3[0, 0] - r3[0, 2]) - np_logsig(r3[0, 1] - r3[0, 2])) / 2
    np.testing.assert_allclose(ranking_loss(r3, np.array([[0, 0, 1]], np.int32))[0], tie, rtol=1e-6)
    with pytest.raises(ValueError, match="integers"):
        ranking_loss(r3, np.zeros((1, 3), np.float32))


def test_classification_loss():
    rng = np.random.default_rng(3)
    logits = rand(rng, 6, 5, scale=2.0)
    labels = rng.integers(0, 5, size=6).astype(np.int32)

    def np_ce(z, y, eps):
        lp = z - z.max(-1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
        q = (1 - eps) * np.eye(5)[y] + eps / 5
        return np.mean(-(q * lp).sum(-1))

    for eps in (0.0, 0.1):
        loss, metrics = classification_loss(logits, labels, eps)
        np.testing.assert_allclose(loss, np_ce(logits, labels, eps), rtol=1e-5)
        np.testing.assert_allclose(metrics["accuracy"], np.mean(logits.argmax(-1) == labels))
        check_grad(lambda z: classification_loss(z, labels, eps), lambda z: np_ce(z, labels, eps), (logits,), (0,))
    with pytest.raises(ValueError, match="labels_B"):
        classification_loss(logits, labels[:3])
    with pytest.raises(ValueError, match="label_smoothing"):
        classification_loss(logits, labels, 1.0)


# ----------------------------------------------------------------------------------------------------
# DPO family
# ----------------------------------------------------------------------------------------------------
def pref_inputs(seed, B=6):
    rng = np.random.default_rng(seed)
    return tuple(rand(rng, B, scale=3.0, loc=-20.0) for _ in range(4))


def np_dpo(pc, pr, rc, rr, beta, eps):
    h = (np.asarray(pc, np.float64) - rc) - (np.asarray(pr, np.float64) - rr)
    return np.mean(-(1 - eps) * np_logsig(beta * h) - eps * np_logsig(-beta * h))


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2)])
def test_dpo_loss(beta, eps):
    pc, pr, rc, rr = pref_inputs(4)
    fn = functools.partial(losses.dpo_loss, beta=beta, label_smoothing=eps)
    loss, metrics = jax.jit(fn)(pc, pr, rc, rr)
    np.testing.assert_allclose(loss, np_dpo(pc, pr, rc, rr, beta, eps), rtol=1e-5)
    assert_metrics_scalar(metrics)
    cr, rj = beta * (pc - rc), beta * (pr - rr)
    np.testing.assert_allclose(metrics["rewards/chosen"], cr.mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(metrics["rewards/rejected"], rj.mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(metrics["rewards/margin"], (cr - rj).mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(metrics["rewards/accuracy"], np.mean(cr > rj))
    np.testing.assert_allclose(metrics["logps/chosen"], pc.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["logps/rejected"], pr.mean(), rtol=1e-6)
    np_fn = lambda *a: np_dpo(*a, beta, eps)  # noqa: E731
    check_grad(fn, np_fn, (pc, pr, rc, rr), (0, 1))


def test_dpo_policy_equals_reference_is_log2_with_nonzero_gradient():
    pc, pr, _, _ = pref_inputs(5)
    beta = 0.1
    loss, metrics = dpo_loss(pc, pr, pc, pr, beta=beta)
    np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)
    assert float(metrics["rewards/accuracy"]) == 0.0 and float(metrics["rewards/margin"]) == 0.0
    gc, gr = jax.grad(lambda a, b: dpo_loss(a, b, pc, pr, beta=beta)[0], argnums=(0, 1))(pc, pr)
    B = pc.shape[0]
    np.testing.assert_allclose(gc, np.full(B, -beta / 2 / B), rtol=1e-6)  # d/dh[-log σ(βh)] at 0 = -β/2
    np.testing.assert_allclose(gr, np.full(B, beta / 2 / B), rtol=1e-6)
    # cDPO keeps log 2 at the reference too.
    np.testing.assert_allclose(dpo_loss(pc, pr, pc, pr, label_smoothing=0.3)[0], math.log(2), rtol=1e-6)


def test_dpo_validation():
    z = jnp.zeros(4)
    with pytest.raises(ValueError, match="reference_rejected_logps"):
        dpo_loss(z, z, z, jnp.zeros(3))
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(z, z, z, z, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(z, z, z, z, label_smoothing=0.5)


def test_ipo_loss():
    pc, pr, rc, rr = (x / 20 for x in pref_inputs(6))  # length-averaged scale
    beta = 0.3

    def np_ipo(pc, pr, rc, rr):
        h = (np.asarray(pc, np.float64) - rc) - (np.asarray(pr, np.float64) - rr)
        return np.mean((h - 1 / (2 * beta)) ** 2)

    loss, metrics = ipo_loss(pc, pr, rc, rr, beta=beta)
    np.testing.assert_allclose(loss, np_ipo(pc, pr, rc, rr), rtol=1e-5)
    assert_metrics_scalar(metrics)
    check_grad(functools.partial(ipo_loss, beta=beta), np_ipo, (pc, pr, rc, rr), (0, 1), rtol=1e-4, atol=1e-5)
    # At policy == reference: (1/(2β))^2.
    np.testing.assert_allclose(ipo_loss(pc, pr, pc, pr, beta=beta)[0], (1 / (2 * beta)) ** 2, rtol=1e-6)


@pytest.mark.parametrize("beta,ratio,eps", [(2.0, 0.5, 0.0), (2.5, 0.3, 0.1)])
def test_simpo_loss(beta, ratio, eps):
    rng = np.random.default_rng(7)
    pc, pr = -np.abs(rand(rng, 6)), -np.abs(rand(rng, 6))  # average per-token log-probs

    def np_simpo(pc, pr):
        z = beta * (np.asarray(pc, np.float64) - pr) - ratio * beta
        return np.mean(-(1 - eps) * np_logsig(z) - eps * np_logsig(-z))

    fn = functools.partial(losses.simpo_loss, beta=beta, gamma_beta_ratio=ratio, label_smoothing=eps)
    loss, metrics = fn(pc, pr)
    np.testing.assert_allclose(loss, np_simpo(pc, pr), rtol=1e-5)
    assert_metrics_scalar(metrics)
    np.testing.assert_allclose(metrics["rewards/chosen"], beta * pc.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/accuracy"], np.mean(pc > pr))
    check_grad(fn, np_simpo, (pc, pr), (0, 1))


def np_orpo(pc, pr, nll, beta):
    pc, pr = np.asarray(pc, np.float64), np.asarray(pr, np.float64)
    log_odds = (pc - np.log(1 - np.exp(pc))) - (pr - np.log(1 - np.exp(pr)))
    return np.mean(nll) + beta * np.mean(-np_logsig(log_odds))


def test_orpo_loss():
    rng = np.random.default_rng(8)
    pc = -np.abs(rand(rng, 6, scale=1.5)) - 0.01
    pr = -np.abs(rand(rng, 6, scale=1.5)) - 0.01
    nll = -pc
    beta = 0.25
    loss, metrics = orpo_loss(pc, pr, nll, beta=beta)
    np.testing.assert_allclose(loss, np_orpo(pc, pr, nll, beta), rtol=1e-5)
    assert_metrics_scalar(metrics)
    lo = (pc - np.log(1 - np.exp(pc.astype(np.float64)))) - (pr - np.log(1 - np.exp(pr.astype(np.float64))))
    np.testing.assert_allclose(metrics["orpo/log_odds_ratio"], lo.mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(metrics["orpo/nll"], nll.mean(), rtol=1e-6)
    check_grad(
        lambda a, b, n: orpo_loss(a, b, n, beta=beta), lambda a, b, n: np_orpo(a, b, n, beta), (pc, pr, nll), (0, 1, 2)
    )
    # Scalar NLL is accepted.
    np.testing.assert_allclose(orpo_loss(pc, pr, nll.mean(), beta=beta)[0], loss, rtol=1e-6)
    with pytest.raises(ValueError, match="chosen_nll"):
        orpo_loss(pc, pr, nll[:2])


def test_orpo_log_odds_is_numerically_stable():
    # Near 0 (probability ~1) a naive float32 log(1 - exp(x)) loses most digits; very negative values
    # must not produce -inf/nan. Compare with float64.
    pc = np.array([-1e-5, -3e-4, -0.5, -40.0, -80.0], np.float32)
    pr = np.array([-2e-5, -1e-3, -0.9, -60.0, -1e-6], np.float32)
    nll = np.zeros(5, np.float32)
    _, metrics = orpo_loss(pc, pr, nll, beta=1.0)
    lo64 = (pc - np.log(-np.expm1(pc.astype(np.float64)))) - (pr - np.log(-np.expm1(pr.astype(np.float64))))
    np.testing.assert_allclose(metrics["orpo/log_odds_ratio"], lo64.mean(), rtol=1e-4)
    g = jax.grad(lambda a, b: orpo_loss(a, b, nll, beta=1.0)[0], argnums=(0, 1))(pc, pr)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in g)


def np_kto(pol, ref, des, z0, beta, wd, wu):
    z0 = max(z0, 0.0)
    out = []
    for p, r, d in zip(pol.astype(np.float64), ref.astype(np.float64), des):
        lr = p - r
        if d:
            out.append(wd - wd / (1 + np.exp(-beta * (lr - z0))))
        else:
            out.append(wu - wu / (1 + np.exp(-beta * (z0 - lr))))
    return np.mean(out)


@pytest.mark.parametrize("z0,wd,wu", [(0.7, 1.0, 1.0), (-0.3, 1.0, 1.33), (2.0, 0.5, 2.0)])
def test_kto_loss(z0, wd, wu):
    rng = np.random.default_rng(9)
    pol, ref = rand(rng, 8, scale=3.0, loc=-10.0), rand(rng, 8, scale=3.0, loc=-10.0)
    des = np.array([1, 0, 1, 1, 0, 0, 1, 0], bool)
    beta = 0.2
    fn = functools.partial(losses.kto_loss, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    loss, metrics = jax.jit(fn)(pol, ref, des, jnp.float32(z0))
    np.testing.assert_allclose(loss, np_kto(pol, ref, des, z0, beta, wd, wu), rtol=1e-5)
    assert_metrics_scalar(metrics)
    np.testing.assert_allclose(metrics["kto/kl"], max(z0, 0.0))
    r = beta * (pol - ref)
    np.testing.assert_allclose(metrics["rewards/chosen"], r[des].mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(metrics["rewards/rejected"], r[~des].mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(metrics["logps/chosen"], pol[des].mean(), rtol=1e-5)
    check_grad(
        lambda p, q: fn(p, q, des, jnp.float32(z0)),
        lambda p, q: np_kto(p, q, des, z0, beta, wd, wu),
        (pol, ref),
        (0, 1),
    )
    # The reference point is not differentiated.
    gz = jax.grad(lambda z: fn(pol, ref, des, z)[0])(jnp.float32(z0))
    assert float(gz) == 0.0


def test_kto_reference_point():
    rng = np.random.default_rng(10)
    pol, ref = rand(rng, 5, loc=-5.0), rand(rng, 5, loc=-5.0)
    z = kto_kl_reference_point(pol, ref)
    np.testing.assert_allclose(z, max(0.0, float(np.mean(pol.astype(np.float64) - ref))), rtol=1e-5, atol=1e-6)
    assert float(kto_kl_reference_point(ref - 1.0, ref)) == 0.0  # clamped at 0
    np.testing.assert_allclose(kto_kl_reference_point(ref + 1.0, ref), 1.0, rtol=1e-5)
    assert float(jax.grad(lambda p: kto_kl_reference_point(p, ref))(ref + 1.0).sum()) == 0.0
    with pytest.raises(ValueError, match="kl_reference_point"):
        kto_loss(pol, ref, np.ones(5, bool), jnp.zeros(2))


# ----------------------------------------------------------------------------------------------------
# PPO
# ----------------------------------------------------------------------------------------------------
def np_ppo_policy(logps, old, adv, mask, eps_low, eps_high, dual, aggregation):
    """Per-token piecewise loop; returns (loss, clip_fraction, approx_kl)."""
    B, T = logps.shape
    per_tok = np.zeros((B, T))
    clipped = np.zeros((B, T))
    kl = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            ratio = math.exp(float(logps[b, t]) - float(old[b, t]))
            a = float(adv[b, t])
            clipped_ratio = min(max(ratio, 1 - eps_low), 1 + eps_high)
            objective = min(ratio * a, clipped_ratio * a)
            if dual is not None and a < 0:
                objective = max(objective, dual * a)
            per_tok[b, t] = -objective
            clipped[b, t] = (ratio > 1 + eps_high and a > 0) or (ratio < 1 - eps_low and a < 0)
            kl[b, t] = ratio - 1 - math.log(ratio)
    m = mask.astype(bool)
    if aggregation == "token":
        loss = per_tok[m].mean()
    else:
        loss = np.mean([per_tok[b][m[b]].mean() for b in range(B) if m[b].any()])
    return loss, clipped[m].mean(), kl[m].mean()


def ppo_inputs(seed, B=4, T=9):
    rng = np.random.default_rng(seed)
    old = -np.abs(rand(rng, B, T, scale=2.0))
    logps = old + rand(rng, B, T, scale=0.4)  # ratios spread around [0.5, 2]
    adv = rand(rng, B, T, scale=1.5)
    mask = np.zeros((B, T), np.float32)
    for b, (s, e) in enumerate([(0, 9), (2, 7), (0, 3), (4, 9)][:B]):
        mask[b, s:e] = 1
    return logps, old, adv, mask


@pytest.mark.parametrize(
    "eps_high,dual,aggregation",
    [(None, None, "token"), (0.28, None, "token"), (None, 3.0, "sequence"), (0.3, 1.5, "sequence")],
)
def test_ppo_policy_loss(eps_high, dual, aggregation):
    logps, old, adv, mask = ppo_inputs(11)
    eps = 0.2
    fn = functools.partial(
        losses.ppo_policy_loss, clip_eps=eps, clip_eps_high=eps_high, dual_clip=dual, aggregation=aggregation
    )
    loss, metrics = jax.jit(fn)(logps, old, adv, mask)
    ref_loss, ref_clip, ref_kl = np_ppo_policy(logps, old, adv, mask, eps, eps_high or eps, dual, aggregation)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_metrics_scalar(metrics)
    np.testing.assert_allclose(metrics["policy/clip_fraction"], ref_clip, rtol=1e-6)
    assert 0 < ref_clip < 1  # the inputs exercise both regimes
    np.testing.assert_allclose(metrics["policy/approx_kl"], ref_kl, rtol=1e-4, atol=1e-6)
    ratio = np.exp(logps.astype(np.float64) - old)[mask > 0]
    np.testing.assert_allclose(metrics["policy/ratio_mean"], ratio.mean(), rtol=1e-5)
    assert ("policy/dual_clip_fraction" in metrics) == (dual is not None)

    def np_fn(lp):
        return np_ppo_policy(lp, old, adv, mask, eps, eps_high or eps, dual, aggregation)[0]

    check_grad(lambda lp: fn(lp, old, adv, mask), np_fn, (logps,), (0,))
    # old log-probs and advantages are constants.
    g_old, g_adv = jax.grad(lambda o, a: fn(logps, o, a, mask)[0], argnums=(0, 1))(old, adv)
    assert float(jnp.abs(g_old).sum()) == 0.0 and float(jnp.abs(g_adv).sum()) == 0.0


def test_ppo_policy_loss_on_policy_and_dual_clip_bound():
    logps, _, adv, mask = ppo_inputs(12)
    # On-policy (ratio 1): loss = -mean(A), gradient = -A/N on valid tokens (the policy gradient).
    loss, metrics = ppo_policy_loss(logps, logps, adv, mask)
    np.testing.assert_allclose(loss, -adv[mask > 0].mean(), rtol=1e-5)
    assert float(metrics["policy/clip_fraction"]) == 0.0 and float(metrics["policy/approx_kl"]) == 0.0
    g = jax.grad(lambda lp: ppo_policy_loss(lp, logps, adv, mask)[0])(logps)
    np.testing.assert_allclose(g, np.where(mask > 0, -adv / mask.sum(), 0.0), rtol=1e-5, atol=1e-7)
    # Dual clip: a huge ratio with negative advantage costs at most -c*A and has no gradient.
    lp, old = np.array([[5.0]], np.float32), np.array([[0.0]], np.float32)
    a, m = np.array([[-2.0]], np.float32), np.ones((1, 1), np.float32)
    loss, metrics = ppo_policy_loss(lp, old, a, m, dual_clip=3.0)
    np.testing.assert_allclose(loss, 6.0, rtol=1e-6)
    assert float(metrics["policy/dual_clip_fraction"]) == 1.0
    assert float(jax.grad(lambda x: ppo_policy_loss(x, old, a, m, dual_clip=3.0)[0])(lp)[0, 0]) == 0.0
    np.testing.assert_allclose(ppo_policy_loss(lp, old, a, m)[0], 2.0 * math.exp(5.0), rtol=1e-5)


def test_ppo_policy_loss_padding_and_validation():
    logps, old, adv, mask = ppo_inputs(13)
    poisoned = np.where(mask > 0, logps, np.nan).astype(np.float32)
    np.testing.assert_allclose(ppo_policy_loss(poisoned, old, adv, mask)[0], ppo_policy_loss(logps, old, adv, mask)[0])
    with pytest.raises(ValueError, match="aggregation"):
        ppo_policy_loss(logps, old, adv, mask, aggregation="seq-mean")
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_policy_loss(logps, old, adv, mask, dual_clip=1.0)
    with pytest.raises(ValueError, match="clip_eps"):
        ppo_policy_loss(logps, old, adv, mask, clip_eps=0.0)
    with pytest.raises(ValueError, match="mask_BT"):
        ppo_policy_loss(logps, old, adv, mask[:, :3])


def np_value_loss(values, old, returns, mask, eps, aggregation):
    B, T = values.shape
    per_tok = np.zeros((B, T))
    clipped = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            v, o, r = float(values[b, t]), float(old[b, t]), float(returns[b, t])
            v_clip = min(max(v, o - eps), o + eps)
            per_tok[b, t] = 0.5 * max((v - r) ** 2, (v_clip - r) ** 2)
            clipped[b, t] = (v_clip - r) ** 2 > (v - r) ** 2
    m = mask.astype(bool)
    if aggregation == "token":
        loss = per_tok[m].mean()
    else:
        loss = np.mean([per_tok[b][m[b]].mean() for b in range(B) if m[b].any()])
    return loss, clipped[m].mean()


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_ppo_value_loss(aggregation):
    rng = np.random.default_rng(14)
    _, _, _, mask = ppo_inputs(14)
    old = rand(rng, 4, 9)
    values = old + rand(rng, 4, 9, scale=0.3)
    returns = old + rand(rng, 4, 9)
    fn = functools.partial(losses.ppo_value_loss, clip_eps=0.2, aggregation=aggregation)
    loss, metrics = jax.jit(fn)(values, old, returns, mask)
    ref_loss, ref_clip = np_value_loss(values, old, returns, mask, 0.2, aggregation)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["value/clip_fraction"], ref_clip, rtol=1e-6)
    assert 0 < ref_clip < 1
    assert_metrics_scalar(metrics)
    check_grad(lambda v: fn(v, old, returns, mask), lambda v: np_value_loss(v, old, returns, mask, 0.2, aggregation)[0],
               (values,), (0,))
    # No clipping: plain half squared error.
    unclipped = ppo_value_loss(values, old, returns, mask, clip_eps=None)[0]
    np.testing.assert_allclose(unclipped, 0.5 * ((values - returns) ** 2)[mask > 0].mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="aggregation"):
        ppo_value_loss(values, old, returns, mask, aggregation="mean")


def test_low_precision_inputs_are_upcast():
    pc, pr, rc, rr = (jnp.asarray(x, jnp.bfloat16) for x in pref_inputs(15))
    loss, metrics = dpo_loss(pc, pr, rc, rr)
    assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in metrics.values())
    exact = [np.asarray(x.astype(jnp.float32), np.float64) for x in (pc, pr, rc, rr)]
    np.testing.assert_allclose(loss, np_dpo(*exact, 0.1, 0.0), rtol=1e-5)
    logps, old, adv, mask = (jnp.asarray(x, jnp.bfloat16) for x in ppo_inputs(16))
    loss, _ = ppo_policy_loss(logps, old, adv, mask)
    assert loss.dtype == jnp.float32


def test_ppo_value_loss_does_not_count_unclipped_tokens_as_clipped():
    """Every update is strictly inside ±ε, so no token is clipped. Writing the clipped value as
    ``old + clip(v - old, ±ε)`` rounds away from ``v`` in float32 on some of these tokens (then its error
    can exceed the unclipped one by an ulp); ``clip(v, old - ε, old + ε)`` is ``v`` exactly."""
    rng = np.random.default_rng(0)
    old = (3.0 * rng.normal(size=2000)).astype(np.float32)
    values = (old + rng.uniform(-0.19, 0.19, size=2000)).astype(np.float32)
    returns = (old + rng.normal(size=2000)).astype(np.float32)
    # The inputs do exercise the rounding: the old formula is not v on some tokens (numpy float32).
    assert np.any(old + np.clip(values - old, np.float32(-0.2), np.float32(0.2)) != values)
    shape = (40, 50)
    v, o, r = (x.reshape(shape) for x in (values, old, returns))
    mask = np.ones(shape, np.float32)
    loss, metrics = jax.jit(functools.partial(losses.ppo_value_loss, clip_eps=0.2))(v, o, r, mask)
    assert float(metrics["value/clip_fraction"]) == 0.0
    np.testing.assert_allclose(loss, 0.5 * np.mean((v.astype(np.float64) - r) ** 2), rtol=1e-5)


def np_hinge_dpo(pc, pr, rc, rr, beta):
    h = (np.asarray(pc, np.float64) - rc) - (np.asarray(pr, np.float64) - rr)
    return np.mean(np.maximum(0.0, 1.0 - beta * h))


def test_hinge_dpo_loss():
    """TRL's hinge: relu(1 - β h). Inputs on both sides of the kink; the gradient is -β/B per pair with
    β h < 1 and 0 past the margin (finite differences away from the kink)."""
    pc, pr, rc, rr = pref_inputs(20, B=8)
    beta = 0.5
    fn = functools.partial(losses.hinge_dpo_loss, beta=beta)
    h = (pc.astype(np.float64) - rc) - (pr - rr)
    assert np.any(beta * h > 1) and np.any(beta * h < 1) and np.min(np.abs(beta * h - 1)) > 1e-3
    loss, metrics = jax.jit(fn)(pc, pr, rc, rr)
    np.testing.assert_allclose(loss, np_hinge_dpo(pc, pr, rc, rr, beta), rtol=1e-5)
    assert_metrics_scalar(metrics)
    np.testing.assert_allclose(metrics["rewards/margin"], np.mean(beta * h), rtol=1e-4, atol=1e-5)
    check_grad(fn, lambda *a: np_hinge_dpo(*a, beta), (pc, pr, rc, rr), (0, 1), atol=1e-5)
    with pytest.raises(ValueError, match="beta"):
        losses.hinge_dpo_loss(pc, pr, rc, rr, beta=0.0)


def np_robust_dpo(pc, pr, rc, rr, beta, eps):
    h = beta * ((np.asarray(pc, np.float64) - rc) - (np.asarray(pr, np.float64) - rr))
    return np.mean((-(1 - eps) * np_logsig(h) + eps * np_logsig(-h)) / (1 - 2 * eps))


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2), (0.3, 0.45)])
def test_robust_dpo_loss(beta, eps):
    pc, pr, rc, rr = pref_inputs(21)
    fn = functools.partial(losses.robust_dpo_loss, beta=beta, label_smoothing=eps)
    loss, metrics = jax.jit(fn)(pc, pr, rc, rr)
    np.testing.assert_allclose(loss, np_robust_dpo(pc, pr, rc, rr, beta, eps), rtol=1e-5)
    assert_metrics_scalar(metrics)
    check_grad(fn, lambda *a: np_robust_dpo(*a, beta, eps), (pc, pr, rc, rr), (0, 1))
    if eps == 0.0:  # no flips: plain DPO
        np.testing.assert_allclose(loss, np_dpo(pc, pr, rc, rr, beta, 0.0), rtol=1e-5)
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.robust_dpo_loss(pc, pr, rc, rr, label_smoothing=0.5)
