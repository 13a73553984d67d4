"""Tests for jaxrlhf.losses.plackett_luce_dpo_loss (DPO paper, Appendix A.3) against dpo_loss (K = 2) and
a float64 numpy re-derivation of the Plackett–Luce negative log-likelihood and its gradient."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jit_cache import jit_cached
from test_losses import fd_grad

from jaxrlhf import losses

pl_loss = jit_cached(losses.plackett_luce_dpo_loss)
dpo_loss = jit_cached(losses.dpo_loss)


def _jgrad(fn, **kwargs):
    """``jax.grad`` under ``jax.jit`` (one compile is faster than eager dispatch of every op here)."""
    return jax.jit(jax.grad(fn, **kwargs))


# ----------------------------------------------------------------------------------------------------
# numpy reference
# ----------------------------------------------------------------------------------------------------
def np_pl_loss(policy, ref, ranks, beta):
    """Plackett–Luce NLL written from the paper: sort present completions by (rank, index), sum the
    -log softmax of each one over itself and everything ranked after it; mean over prompts with >= 2."""
    policy, ref, ranks = np.asarray(policy, np.float64), np.asarray(ref, np.float64), np.asarray(ranks)
    per_prompt = []
    for b in range(ranks.shape[0]):
        order = sorted((int(ranks[b, i]), i) for i in range(ranks.shape[1]) if ranks[b, i] >= 0)
        if len(order) < 2:
            continue
        r = [beta * (policy[b, i] - ref[b, i]) for _, i in order]
        nll = 0.0
        for k in range(len(r)):
            tail = np.array(r[k:])
            m = tail.max()
            nll -= r[k] - (m + math.log(np.sum(np.exp(tail - m))))
        per_prompt.append(nll)
    return float(np.mean(per_prompt)) if per_prompt else 0.0


def _random_inputs(rng, B, N):
    policy = rng.normal(-20.0, 3.0, size=(B, N)).astype(np.float32)
    ref = (policy + rng.normal(0.0, 1.0, size=(B, N))).astype(np.float32)
    ranks = np.stack([rng.permutation(N) for _ in range(B)]).astype(np.int32)
    return policy, ref, ranks


# ----------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0, 5.0])
def test_k2_equals_dpo(beta):
    rng = np.random.default_rng(1)
    B = 6
    pc, pr = rng.normal(-15, 2, B).astype(np.float32), rng.normal(-15, 2, B).astype(np.float32)
    rc, rr = (pc + rng.normal(0, 1, B)).astype(np.float32), (pr + rng.normal(0, 1, B)).astype(np.float32)
    want, want_m = dpo_loss(pc, pr, rc, rr, beta=beta)
    # chosen in column 0 for half the prompts and in column 1 for the other half (ranks say which)
    swap = np.arange(B) % 2 == 1
    policy = np.where(swap[:, None], np.stack([pr, pc], 1), np.stack([pc, pr], 1))
    ref = np.where(swap[:, None], np.stack([rr, rc], 1), np.stack([rc, rr], 1))
    ranks = np.where(swap[:, None], [[1, 0]], [[0, 1]]).astype(np.int32)
    got, got_m = pl_loss(policy, ref, ranks, beta=beta)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5, atol=1e-6)
    for key in ["rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
                "logps/chosen", "logps/rejected"]:
        np.testing.assert_allclose(float(got_m[key]), float(want_m[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    # gradients w.r.t. the chosen / rejected policy log-probs match too
    g_dpo = _jgrad(lambda a, b: losses.dpo_loss(a, b, rc, rr, beta=beta)[0], argnums=(0, 1))(pc, pr)
    g_pl = np.asarray(_jgrad(lambda p: losses.plackett_luce_dpo_loss(p, ref, ranks, beta=beta)[0])(policy))
    g_c = np.where(swap, g_pl[:, 1], g_pl[:, 0])
    g_r = np.where(swap, g_pl[:, 0], g_pl[:, 1])
    np.testing.assert_allclose(g_c, np.asarray(g_dpo[0]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_r, np.asarray(g_dpo[1]), rtol=1e-5, atol=1e-7)


def test_policy_equals_reference_is_log_k_factorial():
    # all rewards 0: each step k is a uniform choice among K-k+1 -> NLL = log K! (hand: log 24 for K=4)
    p = np.full((3, 4), -7.0, np.float32)
    ranks = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]], np.int32)
    loss, m = pl_loss(p, p, ranks, beta=0.3)
    np.testing.assert_allclose(float(loss), math.log(24.0), rtol=1e-6)
    assert float(m["rewards/num_ranked"]) == 4.0 and float(m["rewards/prompts_ranked"]) == 1.0


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_k4_value_and_gradient_match_numpy(beta):
    rng = np.random.default_rng(2)
    policy, ref, ranks = _random_inputs(rng, B=3, N=4)
    loss, _ = pl_loss(policy, ref, ranks, beta=beta)
    np.testing.assert_allclose(float(loss), np_pl_loss(policy, ref, ranks, beta), rtol=1e-5, atol=1e-6)
    g = np.asarray(_jgrad(lambda p: losses.plackett_luce_dpo_loss(p, ref, ranks, beta=beta)[0])(policy))
    g_ref = fd_grad(lambda p: np_pl_loss(p, ref, ranks, beta), policy)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6)
    # analytic form: dL_b/dr_i = -1 + Σ_{k <= pos(i)} softmax over τ(k..K) at i; each prompt's row sums to 0
    np.testing.assert_allclose(g.sum(axis=1), 0.0, atol=1e-6)
    # the reference's gradient is minus the policy's (L depends on policy - ref only)
    g_r = np.asarray(_jgrad(lambda r: losses.plackett_luce_dpo_loss(policy, r, ranks, beta=beta)[0])(ref))
    np.testing.assert_allclose(g_r, -g, rtol=1e-6, atol=1e-8)


def test_k4_hand_gradient_for_one_prompt():
    # rewards r = β(π - ref) = [0, 0, 0, 0] ranked 0,1,2,3 with β = 1: softmax over the tail is uniform.
    # dL/dr_0 = -1 + 1/4 = -3/4; dL/dr_1 = -1 + 1/4 + 1/3 = -5/12;
    # dL/dr_2 = -1 + 1/4 + 1/3 + 1/2 = 1/12; dL/dr_3 = 1/4 + 1/3 + 1/2 + 1 - 1 = 13/12.
    p = np.zeros((1, 4), np.float32)
    ranks = np.array([[0, 1, 2, 3]], np.int32)
    g = _jgrad(lambda x: losses.plackett_luce_dpo_loss(x, p, ranks, beta=1.0)[0])(p)
    np.testing.assert_allclose(np.asarray(g)[0], [-3 / 4, -5 / 12, 1 / 12, 13 / 12], rtol=1e-6)


def test_missing_completions_are_excluded():
    rng = np.random.default_rng(3)
    policy, ref, _ = _random_inputs(rng, B=2, N=4)
    ranks = np.array([[2, -1, 0, 1], [1, 0, -1, -1]], np.int32)
    policy[0, 1] = np.nan  # a missing completion may hold anything
    ref[1, 2:] = np.inf
    loss, m = pl_loss(policy, ref, ranks, beta=0.5)
    np.testing.assert_allclose(float(loss), np_pl_loss(policy, ref, ranks, 0.5), rtol=1e-5)
    # equals prompt 0 without its missing column and prompt 1 as a K = 2 DPO pair, averaged
    l0, _ = pl_loss(policy[:1, [0, 2, 3]], ref[:1, [0, 2, 3]], np.array([[2, 0, 1]], np.int32), beta=0.5)
    l1, _ = dpo_loss(policy[1:, 1], policy[1:, 0], ref[1:, 1], ref[1:, 0], beta=0.5)
    np.testing.assert_allclose(float(loss), (float(l0) + float(l1)) / 2, rtol=1e-5)
    assert float(m["rewards/num_ranked"]) == 2.5
    g = np.asarray(_jgrad(lambda p: losses.plackett_luce_dpo_loss(p, ref, ranks, beta=0.5)[0])(policy))
    assert np.all(np.isfinite(g))
    assert g[0, 1] == 0.0 and g[1, 2] == 0.0 and g[1, 3] == 0.0


def test_prompt_with_fewer_than_two_completions_does_not_count():
    rng = np.random.default_rng(4)
    policy, ref, ranks = _random_inputs(rng, B=2, N=3)
    ranks[1] = [-1, 0, -1]
    loss, m = pl_loss(policy, ref, ranks, beta=1.0)
    alone, _ = pl_loss(policy[:1], ref[:1], ranks[:1], beta=1.0)
    np.testing.assert_allclose(float(loss), float(alone), rtol=1e-6)
    assert float(m["rewards/prompts_ranked"]) == 0.5
    none, _ = pl_loss(policy, ref, np.full((2, 3), -1, np.int32), beta=1.0)
    assert float(none) == 0.0


def test_permutation_invariance():
    rng = np.random.default_rng(5)
    policy, ref, ranks = _random_inputs(rng, B=4, N=5)
    ranks[0, 3] = -1
    loss, m = pl_loss(policy, ref, ranks, beta=0.7)
    perm = rng.permutation(5)
    loss_p, m_p = pl_loss(policy[:, perm], ref[:, perm], ranks[:, perm], beta=0.7)
    np.testing.assert_allclose(float(loss_p), float(loss), rtol=1e-6)
    for key in m:
        np.testing.assert_allclose(float(m_p[key]), float(m[key]), rtol=1e-5, atol=1e-6, err_msg=key)


def test_non_contiguous_ranks_and_ties_broken_by_index():
    rng = np.random.default_rng(6)
    policy, ref, _ = _random_inputs(rng, B=2, N=3)
    strict, _ = pl_loss(policy, ref, np.array([[0, 1, 2], [2, 0, 1]], np.int32), beta=1.0)
    gaps, _ = pl_loss(policy, ref, np.array([[0, 5, 9], [7, 0, 3]], np.int32), beta=1.0)
    np.testing.assert_allclose(float(gaps), float(strict), rtol=1e-6)
    # ties: [0, 0, 1] is ordered like [0, 1, 2] (lower index first), not like [1, 0, 2]
    tied, _ = pl_loss(policy[:1], ref[:1], np.array([[0, 0, 1]], np.int32), beta=1.0)
    by_index, _ = pl_loss(policy[:1], ref[:1], np.array([[0, 1, 2]], np.int32), beta=1.0)
    np.testing.assert_allclose(float(tied), float(by_index), rtol=1e-6)


def test_traced_beta_and_metrics_by_hand():
    # r = β(π - ref) with β = 2: ratios [1, 0, -0.5] -> r = [2, 0, -1]; ranks best->worst: 2, 0, 1
    policy = np.array([[-1.0, -2.0, -3.5]], np.float32)
    ref = np.array([[-2.0, -2.0, -3.0]], np.float32)
    ranks = np.array([[1, 2, 0]], np.int32)  # τ = (c2, c0, c1) with rewards (-1, 2, 0)
    loss, m = jax.jit(lambda b: losses.plackett_luce_dpo_loss(policy, ref, ranks, beta=b))(jnp.float32(2.0))
    hand = (math.log(math.exp(-1) + math.exp(2) + math.exp(0)) + 1) + (math.log(math.exp(2) + math.exp(0)) - 2)
    np.testing.assert_allclose(float(loss), hand, rtol=1e-6)
    assert float(m["rewards/chosen"]) == pytest.approx(-1.0) and float(m["rewards/rejected"]) == pytest.approx(0.0)
    assert float(m["logps/chosen"]) == pytest.approx(-3.5) and float(m["logps/rejected"]) == pytest.approx(-2.0)
    # pairs (c2>c0): -1-2=-3 wrong; (c2>c1): -1-0=-1 wrong; (c0>c1): 2-0=2 right -> acc 1/3, margin -2/3
    assert float(m["rewards/accuracy"]) == pytest.approx(1 / 3)
    assert float(m["rewards/margin"]) == pytest.approx(-2 / 3)


def test_bad_inputs_raise():
    p = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="shape"):
        losses.plackett_luce_dpo_loss(p, np.zeros((2, 4)), np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        losses.plackett_luce_dpo_loss(p[0], p[0], np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="integers"):
        losses.plackett_luce_dpo_loss(p, p, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="beta"):
        losses.plackett_luce_dpo_loss(p, p, np.zeros((2, 3), np.int32), beta=0.0)
