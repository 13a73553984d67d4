"""Tests for jaxrlhf.ops against independent numpy / plain-Python re-derivations."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import ops
from jaxrlhf.ops import KL_ESTIMATORS
from jit_cache import jit_cached


_jit = jit_cached


entropy_from_logits = _jit(ops.entropy_from_logits)
gae = _jit(ops.gae)
grpo_advantages = _jit(ops.grpo_advantages)
kl_k1 = _jit(ops.kl_k1)
kl_k2 = _jit(ops.kl_k2)
kl_k3 = _jit(ops.kl_k3)
kl_penalty = _jit(ops.kl_penalty)
masked_mean = _jit(ops.masked_mean)
masked_sum = _jit(ops.masked_sum)
masked_var = _jit(ops.masked_var)
masked_whiten = _jit(ops.masked_whiten)
next_token_logprobs = _jit(ops.next_token_logprobs)
rloo_advantages = _jit(ops.rloo_advantages)
sequence_logprobs = _jit(ops.sequence_logprobs)
token_logprobs = _jit(ops.token_logprobs)


# ----------------------------------------------------------------------------------------------------
# numpy references
# ----------------------------------------------------------------------------------------------------
def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_gae_loop(rewards, values, mask, gamma, lam):
    """Plain double loop: for every valid step t, A_t = sum_l (γλ)^l δ_{t+l} over the valid steps."""
    rewards, values = np.asarray(rewards, np.float64), np.asarray(values, np.float64)
    adv = np.zeros_like(rewards)
    ret = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
        n = len(idx)
        deltas = []
        for k in range(n):
            next_v = values[b, idx[k + 1]] if k + 1 < n else 0.0
            deltas.append(rewards[b, idx[k]] + gamma * next_v - values[b, idx[k]])
        for k in range(n):
            total = 0.0
            for l in range(n - k):
                total += (gamma * lam) ** l * deltas[k + l]
            adv[b, idx[k]] = total
            ret[b, idx[k]] = total + values[b, idx[k]]
    return adv, ret


# ----------------------------------------------------------------------------------------------------
# logprobs
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_matches_numpy(temperature):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(3, 5)).astype(np.int32)
    got = np.asarray(jax.jit(ops.token_logprobs)(logits, targets, temperature))
    ref = np.take_along_axis(np_log_softmax(logits / temperature), targets[..., None], -1)[..., 0]
    assert got.dtype == np.float32 and got.shape == (3, 5)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_token_logprobs_bfloat16_upcast_and_leading_dims():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 2, 4, 9)) * 4, jnp.bfloat16)  # [B, 2, T, V]
    targets = rng.integers(0, 9, size=(2, 2, 4)).astype(np.int32)
    got = token_logprobs(logits, targets)
    assert got.dtype == jnp.float32 and got.shape == (2, 2, 4)
    exact = np.asarray(logits.astype(jnp.float32), np.float64)  # the bf16 values, exactly
    ref = np.take_along_axis(np_log_softmax(exact), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
    # Per-pair slices equal separate [B, T, V] calls.
    for k in range(2):
        np.testing.assert_allclose(got[:, k], token_logprobs(logits[:, k], targets[:, k]), atol=1e-6)


def test_token_logprobs_gradient_is_onehot_minus_softmax():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 3)).astype(np.int32)
    weights = rng.normal(size=(2, 3)).astype(np.float32)
    grad = jax.grad(lambda z: jnp.sum(token_logprobs(z, targets) * weights))(logits)
    probs = np.exp(np_log_softmax(logits))
    onehot = np.eye(7)[targets]
    np.testing.assert_allclose(np.asarray(grad), weights[..., None] * (onehot - probs), atol=1e-5)


def test_next_token_logprobs_alignment():
    rng = np.random.default_rng(3)
    B, T, V = 2, 6, 8
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    tokens = rng.integers(0, V, size=(B, T)).astype(np.int32)
    got = np.asarray(next_token_logprobs(logits, tokens))
    ref = np.zeros((B, T))
    for b in range(B):
        for t in range(1, T):
            ref[b, t] = np_log_softmax(logits[b, t - 1])[tokens[b, t]]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert np.all(got[:, 0] == 0)

    # A "model" whose logits at position t put all mass on tokens[t+1] scores ~0 at every t >= 1,
    # while the mis-aligned (unshifted) reading does not.
    peaked = np.full((B, T, V), -30.0, np.float32)
    for b in range(B):
        for t in range(T - 1):
            peaked[b, t, tokens[b, t + 1]] = 30.0
    np.testing.assert_allclose(next_token_logprobs(peaked, tokens), 0.0, atol=1e-6)
    assert not np.allclose(token_logprobs(peaked, tokens)[:, :-1], 0.0, atol=1e-3)  # unshifted reading


def test_next_token_logprobs_leading_dims():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, 2, 5, 6)).astype(np.float32)
    tokens = rng.integers(0, 6, size=(3, 2, 5)).astype(np.int32)
    got = next_token_logprobs(logits, tokens)
    flat = next_token_logprobs(logits.reshape(6, 5, 6), tokens.reshape(6, 5)).reshape(3, 2, 5)
    np.testing.assert_allclose(got, flat, atol=1e-6)


def test_logprobs_validation():
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="integers"):
        token_logprobs(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), jnp.int32), temperature=0.0)
    with pytest.raises(ValueError, match="mask"):
        sequence_logprobs(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


def test_sequence_logprobs_sum_and_mean():
    rng = np.random.default_rng(5)
    logps = -rng.random(size=(4, 7)).astype(np.float32)
    mask = (rng.random(size=(4, 7)) > 0.4).astype(np.float32)
    mask[2] = 0.0  # an empty row
    s = np.asarray(sequence_logprobs(logps, mask))
    a = np.asarray(sequence_logprobs(logps, mask.astype(bool), average=True))
    for b in range(4):
        sel = logps[b][mask[b] > 0]
        np.testing.assert_allclose(s[b], sel.sum(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(a[b], sel.mean() if sel.size else 0.0, rtol=1e-6, atol=1e-6)
    # nan in masked positions does not leak.
    poisoned = np.where(mask > 0, logps, np.nan)
    np.testing.assert_allclose(sequence_logprobs(poisoned, mask), s, atol=1e-6)


def test_entropy_from_logits():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(2, 2, 3, 10)).astype(np.float32) * 2
    p = np.exp(np_log_softmax(logits))
    ref = -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(entropy_from_logits(logits), ref, rtol=1e-5, atol=1e-6)
    p2 = np.exp(np_log_softmax(logits / 0.5))
    np.testing.assert_allclose(entropy_from_logits(logits, 0.5), -(p2 * np.log(p2)).sum(-1), rtol=1e-5, atol=1e-5)
    # Uniform logits: log V. Masked vocabulary (-inf) entries: entropy of the rest, finite gradient.
    np.testing.assert_allclose(entropy_from_logits(jnp.zeros((4,))), math.log(4), rtol=1e-6)
    masked = jnp.array([0.0, 0.0, -jnp.inf, -jnp.inf])
    np.testing.assert_allclose(entropy_from_logits(masked), math.log(2), rtol=1e-6)
    g = jax.grad(lambda z: entropy_from_logits(z))(jnp.array([0.3, -0.2, -jnp.inf]))
    assert np.all(np.isfinite(np.asarray(g)))


# ----------------------------------------------------------------------------------------------------
# masked reductions
# ----------------------------------------------------------------------------------------------------
def test_masked_reductions_match_numpy():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(5, 9)).astype(np.float32)
    mask = rng.random(size=(5, 9)) > 0.3
    sel = x[mask].astype(np.float64)
    np.testing.assert_allclose(masked_sum(x, mask), sel.sum(), rtol=1e-5)
    np.testing.assert_allclose(masked_mean(x, mask), sel.mean(), rtol=1e-5)
    np.testing.assert_allclose(masked_var(x, mask), np.var(sel, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(masked_var(x, mask, unbiased=False), np.var(sel), rtol=1e-5)
    rows = np.asarray(masked_mean(x, mask, axis=-1))
    for b in range(5):
        np.testing.assert_allclose(rows[b], x[b][mask[b]].mean(), rtol=1e-5)
    # Float weights: weighted mean.
    w = rng.random(size=(5, 9)).astype(np.float32)
    np.testing.assert_allclose(masked_mean(x, w), (x * w).sum() / w.sum(), rtol=1e-5)
    # Masked nan/inf does not leak; an empty mask gives 0, not nan.
    poisoned = np.where(mask, x, np.inf)
    np.testing.assert_allclose(masked_mean(poisoned, mask), sel.mean(), rtol=1e-5)
    assert float(masked_mean(x, np.zeros_like(mask))) == 0.0
    assert float(masked_var(x, np.zeros_like(mask))) == 0.0
    with pytest.raises(ValueError, match="mask"):
        masked_mean(x, mask[:, :3])


def test_masked_whiten_matches_numpy():
    rng = np.random.default_rng(8)
    x = rng.normal(loc=3.0, scale=2.0, size=(4, 6)).astype(np.float32)
    mask = rng.random(size=(4, 6)) > 0.3
    sel = x[mask].astype(np.float64)
    mean, var = sel.mean(), np.var(sel, ddof=1)
    ref = np.where(mask, (x - mean) / np.sqrt(var + 1e-8), 0.0)
    got = np.asarray(masked_whiten(x, mask))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert abs(got[mask].mean()) < 1e-5 and abs(np.var(got[mask], ddof=1) - 1) < 1e-4
    ref_noshift = np.where(mask, (x - mean) / np.sqrt(var + 1e-8) + mean, 0.0)
    np.testing.assert_allclose(masked_whiten(x, mask, shift_mean=False), ref_noshift, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# GAE
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (0.5, 0.7)])
def test_gae_matches_python_loop_prefix_masks(gamma, lam):
    rng = np.random.default_rng(9)
    B, T = 4, 8
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    values = rng.normal(size=(B, T)).astype(np.float32)
    lengths = [8, 5, 1, 3]
    mask = (np.arange(T)[None, :] < np.array(lengths)[:, None]).astype(np.float32)
    adv, ret = jax.jit(ops.gae)(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = np_gae_loop(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
    # Textbook closed forms: λ=1 gives discounted reward-to-go minus V; λ=0 gives the one-step TD error.
    if lam == 1.0:
        for b, L in enumerate(lengths):
            for t in range(L):
                rtg = sum(gamma ** (k - t) * rewards[b, k] for k in range(t, L))
                np.testing.assert_allclose(adv[b, t], rtg - values[b, t], rtol=1e-5, atol=1e-5)
    if lam == 0.0:
        for b, L in enumerate(lengths):
            for t in range(L):
                nv = values[b, t + 1] if t + 1 < L else 0.0
                np.testing.assert_allclose(adv[b, t], rewards[b, t] + gamma * nv - values[b, t], rtol=1e-5, atol=1e-5)


def test_gae_padding_does_not_leak():
    rng = np.random.default_rng(10)
    B, T = 3, 7
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    values = rng.normal(size=(B, T)).astype(np.float32)
    mask = np.zeros((B, T), bool)
    mask[0, :4] = True  # right padding
    mask[1, 2:6] = True  # left zeros (prompt) and right padding
    mask[2, :] = True
    adv, ret = gae(rewards, values, mask, 0.95, 0.9)
    poisoned_r = np.where(mask, rewards, 1e6).astype(np.float32)
    poisoned_v = np.where(mask, values, np.nan).astype(np.float32)
    adv2, ret2 = gae(poisoned_r, poisoned_v, mask, 0.95, 0.9)
    np.testing.assert_allclose(adv2, adv, atol=1e-6)
    np.testing.assert_allclose(ret2, ret, atol=1e-6)
    assert np.all(np.asarray(adv)[~mask] == 0) and np.all(np.asarray(ret)[~mask] == 0)
    ref_adv, ref_ret = np_gae_loop(rewards, values, mask, 0.95, 0.9)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
    # The left-zero row equals the same completion placed at the start of the row.
    shifted = gae(np.roll(rewards[1:2], -2, 1), np.roll(values[1:2], -2, 1), np.roll(mask[1:2], -2, 1), 0.95, 0.9)
    np.testing.assert_allclose(np.roll(np.asarray(shifted[0]), 2, 1), adv[1:2], atol=1e-6)


def test_gae_interior_gaps_are_skipped_and_leading_dims():
    rng = np.random.default_rng(11)
    rewards = rng.normal(size=(2, 2, 9)).astype(np.float32)  # [B, 2, T]
    values = rng.normal(size=(2, 2, 9)).astype(np.float32)
    mask = rng.random(size=(2, 2, 9)) > 0.35
    adv, ret = gae(rewards, values, mask, 0.97, 0.8)
    ref_adv, ref_ret = np_gae_loop(rewards.reshape(4, 9), values.reshape(4, 9), mask.reshape(4, 9), 0.97, 0.8)
    np.testing.assert_allclose(np.asarray(adv).reshape(4, 9), ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret).reshape(4, 9), ref_ret, rtol=1e-5, atol=1e-5)


def test_gae_validation():
    z = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="shape"):
        gae(z, np.zeros((2, 4)), z, 1.0, 1.0)
    with pytest.raises(ValueError, match="gamma"):
        gae(z, z, z, 1.5, 1.0)
    with pytest.raises(ValueError, match="lam"):
        gae(z, z, z, 1.0, -0.1)


# ----------------------------------------------------------------------------------------------------
# KL estimators
# ----------------------------------------------------------------------------------------------------
def test_kl_estimators_match_definitions():
    rng = np.random.default_rng(12)
    logps = -rng.random(size=(3, 50)).astype(np.float32) * 4
    ref = -rng.random(size=(3, 50)).astype(np.float32) * 4
    lp, rf = logps.astype(np.float64), ref.astype(np.float64)
    np.testing.assert_allclose(kl_k1(logps, ref), lp - rf, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(kl_k2(logps, ref), 0.5 * (lp - rf) ** 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kl_k3(logps, ref), np.exp(rf - lp) - 1 - (rf - lp), rtol=1e-5, atol=1e-6)
    for name, fn in [("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)]:
        np.testing.assert_array_equal(kl_penalty(logps, ref, name), fn(logps, ref))
        np.testing.assert_array_equal(jax.jit(ops.kl_penalty, static_argnums=2)(logps, ref, name), fn(logps, ref))
        assert np.all(np.asarray(kl_penalty(logps, logps, name)) == 0)
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
    assert np.all(np.asarray(kl_k3(logps, ref)) >= 0)
    assert np.all(np.asarray(kl_k3(ref, logps)) >= 0)
    # Tiny differences: k3 ~ d^2/2 stays >= 0 and accurate.
    d = np.float32(1e-3)
    np.testing.assert_allclose(kl_k3(jnp.float32(-1.0), jnp.float32(-1.0) + d), d**2 / 2, rtol=1e-2)


def test_kl_estimator_expectations():
    """Monte-Carlo: E_π[k1] = E_π[k3] = KL(π||π_ref) for categorical distributions."""
    rng = np.random.default_rng(13)
    p = rng.dirichlet(np.ones(6))
    q = rng.dirichlet(np.ones(6))
    kl = float(np.sum(p * np.log(p / q)))
    logp, logq = np.log(p), np.log(q)
    # Exact expectations by weighting each outcome with p.
    for name in ("k1", "k3"):
        per = np.asarray(kl_penalty(logp.astype(np.float32), logq.astype(np.float32), name), np.float64)
        np.testing.assert_allclose(np.sum(p * per), kl, rtol=1e-4)


def test_kl_penalty_unknown_estimator():
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(jnp.zeros(3), jnp.zeros(3), "k4")
    with pytest.raises(ValueError, match="shape"):
        kl_k1(jnp.zeros(3), jnp.zeros(4))


# ----------------------------------------------------------------------------------------------------
# group advantages
# ----------------------------------------------------------------------------------------------------
def test_grpo_advantages_match_numpy():
    rng = np.random.default_rng(14)
    scores = rng.normal(size=(5, 4)).astype(np.float32)
    scores[3] = 1.5  # identical scores: advantage 0
    got = np.asarray(jax.jit(ops.grpo_advantages)(scores))
    ref = np.zeros((5, 4))
    for b in range(5):
        r = scores[b].astype(np.float64)
        ref[b] = (r - r.mean()) / (r.std(ddof=1) + 1e-4)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert np.all(got[3] == 0)
    np.testing.assert_allclose(grpo_advantages(scores, scale=False), scores - scores.mean(1, keepdims=True), atol=1e-6)
    ref0 = (scores - scores.mean(1, keepdims=True)) / (scores.std(1, keepdims=True) + 1e-2)
    np.testing.assert_allclose(grpo_advantages(scores, eps=1e-2, ddof=0), ref0, rtol=1e-5, atol=1e-5)


def test_rloo_advantages_match_numpy_and_sum_to_zero():
    rng = np.random.default_rng(15)
    for n in (2, 3, 8):
        scores = rng.normal(size=(6, n)).astype(np.float32)
        got = np.asarray(rloo_advantages(scores))
        ref = np.zeros_like(got)
        for b in range(6):
            for i in range(n):
                others = [scores[b, j] for j in range(n) if j != i]
                ref[b, i] = scores[b, i] - sum(others) / (n - 1)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.sum(-1), 0.0, atol=1e-5)  # derived property
        np.testing.assert_allclose(got, n / (n - 1) * (scores - scores.mean(1, keepdims=True)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", [grpo_advantages, rloo_advantages])
def test_group_advantages_validation(fn):
    with pytest.raises(ValueError, match="N >= 2"):
        fn(jnp.zeros((4, 1)))
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        fn(jnp.zeros((4,)))


def _finite_group_reference(scores, fn):
    """Apply ``fn(finite scores of one group) -> their advantages`` per row (float64); non-finite -> 0."""
    out = np.zeros(scores.shape)
    for b in range(scores.shape[0]):
        ok = np.isfinite(scores[b])
        if ok.sum() >= 2:
            out[b, ok] = fn(scores[b, ok].astype(np.float64))
    return out


def test_group_advantages_leave_unscorable_rewards_out_of_the_baseline():
    """A NaN/inf score (an unscorable completion) is left out of its group's baseline and gets advantage 0;
    the other completions of the group keep finite advantages computed from the finite scores only."""
    rng = np.random.default_rng(16)
    scores = rng.normal(size=(5, 4)).astype(np.float32)
    scores[0, 1] = np.nan
    scores[1, [0, 3]] = [np.inf, np.nan]
    scores[2, :3] = np.nan          # one finite score: no baseline, advantage 0
    scores[3, :] = np.nan           # nothing scorable
    for fn, ref_fn in [
        (grpo_advantages, lambda r: (r - r.mean()) / (r.std(ddof=1) + 1e-4)),
        (functools.partial(grpo_advantages, scale=False), lambda r: r - r.mean()),
        (rloo_advantages, lambda r: r - (r.sum() - r) / (len(r) - 1)),
    ]:
        got = np.asarray(fn(scores))
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, _finite_group_reference(scores, ref_fn), rtol=1e-5, atol=1e-5)
        assert np.all(got[~np.isfinite(scores)] == 0)
