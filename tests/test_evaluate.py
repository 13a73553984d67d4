"""Tests for jaxrlhf.evaluate: every estimator against numbers worked out by hand in the test, plus a
Monte-Carlo check of the sequence-KL estimator against the exact KL of a known distribution."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import evaluate


# ----------------------------------------------------------------------------------------------------
# sequence_kl
# ----------------------------------------------------------------------------------------------------
def test_sequence_kl_hand_computation():
    nan = float("nan")
    # row 0: first position is prompt (masked, ref is nan there); diffs -0.5-(-1.5)=1.0, -1.0-(-2.0)=1.0
    # row 1: last position is padding holding nan; diffs -0.2-(-0.7)=0.5, -0.3-(-0.1)=-0.2
    # row 2: policy == reference -> 0
    policy = np.array([[-9.0, -0.5, -1.0], [-0.2, -0.3, nan], [-1.0, -1.0, -1.0]], np.float32)
    ref = np.array([[nan, -1.5, -2.0], [-0.7, -0.1, 0.0], [-1.0, -1.0, -1.0]], np.float32)
    mask = np.array([[0, 1, 1], [1, 1, 0], [1, 1, 1]], np.int32)
    out = jax.jit(evaluate.sequence_kl)(policy, ref, mask)
    np.testing.assert_allclose(np.asarray(out.kl_B), [2.0, 0.3, 0.0], rtol=1e-6, atol=1e-6)
    mean = 2.3 / 3  # (2.0 + 0.3 + 0.0) / 3
    var = ((2.0 - mean) ** 2 + (0.3 - mean) ** 2 + (0.0 - mean) ** 2) / 2  # ddof = 1
    np.testing.assert_allclose(float(out.mean), mean, rtol=1e-6)
    np.testing.assert_allclose(float(out.stderr), math.sqrt(var) / math.sqrt(3), rtol=1e-5)
    assert abs(float(out.stderr) - 0.6227180) < 1e-5  # sqrt(1.1633333 / 3), worked out by hand


def test_sequence_kl_single_sample_stderr_is_nan_and_bool_mask():
    out = evaluate.sequence_kl(np.array([[-1.0, -2.0]]), np.array([[-3.0, -2.5]]), np.array([[True, False]]))
    np.testing.assert_allclose(np.asarray(out.kl_B), [2.0])
    assert math.isnan(float(out.stderr))


def test_sequence_kl_monte_carlo_matches_exact_kl():
    # Tokens i.i.d. per position from p; then KL(P^T || Q^T) = T * KL(p || q) exactly.
    p = np.array([0.6, 0.3, 0.1])
    q = np.array([0.2, 0.5, 0.3])
    T, B = 5, 4000
    exact = T * float(np.sum(p * np.log(p / q)))
    rng = np.random.default_rng(0)
    toks = rng.choice(3, size=(B, T), p=p)
    out = evaluate.sequence_kl(np.log(p)[toks], np.log(q)[toks], np.ones((B, T)))
    assert abs(float(out.mean) - exact) < 4 * float(out.stderr)
    # the estimator's standard error equals the per-sample std / sqrt(B) of a numpy re-derivation
    per = np.sum(np.log(p)[toks] - np.log(q)[toks], axis=1)
    np.testing.assert_allclose(float(out.stderr), per.std(ddof=1) / math.sqrt(B), rtol=1e-4)


def test_sequence_kl_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        evaluate.sequence_kl(np.zeros((2, 3)), np.zeros((2, 4)), np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        evaluate.sequence_kl(np.zeros(3), np.zeros(3), np.ones(3))


# ----------------------------------------------------------------------------------------------------
# win_rate
# ----------------------------------------------------------------------------------------------------
def test_win_rate_hand_computation():
    # per prompt: 1 > 0 win (1), 2 == 2 tie (1/2), 3 < 5 loss (0), 4 > 1 win (1)
    rate, se = evaluate.win_rate([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 5.0, 1.0])
    assert rate == pytest.approx(2.5 / 4)
    # deviations from 0.625: .375, -.125, -.625, .375; squares sum .6875; /3 -> .2291667; sqrt/2
    assert se == pytest.approx(math.sqrt(0.6875 / 3) / 2)
    assert se == pytest.approx(0.2393568, abs=1e-7)


def test_win_rate_edges():
    assert evaluate.win_rate([1.0, 1.0], [1.0, 1.0])[0] == 0.5  # all ties
    rate, se = evaluate.win_rate([3.0], [1.0])
    assert rate == 1.0 and math.isnan(se)
    with pytest.raises(ValueError, match="equal shape"):
        evaluate.win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        evaluate.win_rate([1.0, float("nan")], [1.0, 0.0])


# ----------------------------------------------------------------------------------------------------
# distinct_n, lengths
# ----------------------------------------------------------------------------------------------------
def test_distinct_n_hand_computation():
    comps = [[1, 2, 3], [1, 2, 2]]
    # unigrams 1,2,3,1,2,2 -> {1,2,3}: 3 distinct of 6
    assert evaluate.distinct_n(comps, 1) == pytest.approx(3 / 6)
    # bigrams (1,2),(2,3),(1,2),(2,2) -> {(1,2),(2,3),(2,2)}: 3 distinct of 4
    assert evaluate.distinct_n(comps, 2) == pytest.approx(3 / 4)
    # trigrams (1,2,1),(2,1,2),(1,2,1): 2 distinct of 3
    assert evaluate.distinct_n([[1, 2, 1, 2, 1]], 3) == pytest.approx(2 / 3)


def test_distinct_n_no_ngrams_across_completions_and_empty():
    # [], [5], [5,5,5]: unigrams 5,5,5,5 -> 1 of 4; bigrams only inside [5,5,5]: (5,5),(5,5) -> 1 of 2
    comps = [[], [5], [5, 5, 5]]
    assert evaluate.distinct_n(comps, 1) == pytest.approx(1 / 4)
    assert evaluate.distinct_n(comps, 2) == pytest.approx(1 / 2)
    # [1,2] and [3,4]: the cross-boundary bigram (2,3) must not count -> 2 of 2
    assert evaluate.distinct_n([[1, 2], [3, 4]], 2) == 1.0
    assert evaluate.distinct_n([[], []], 1) == 0.0
    assert evaluate.distinct_n([[7]], 2) == 0.0
    with pytest.raises(ValueError, match="n"):
        evaluate.distinct_n(comps, 0)


def test_completion_token_lists_and_lengths():
    tokens = np.array([[10, 11, 12, 0], [10, 0, 0, 0], [5, 6, 7, 8]])
    mask = np.array([[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    lists = evaluate.completion_token_lists(tokens, mask)
    assert lists == [[11, 12], [], [5, 6, 7, 8]]
    np.testing.assert_array_equal(evaluate.completion_lengths(mask), [2, 0, 4])
    assert evaluate.mean_completion_length(mask) == pytest.approx(6 / 3)
    assert evaluate.mean_completion_length(jnp.asarray(mask, jnp.float32)) == pytest.approx(2.0)
    assert evaluate.mean_completion_length(lists) == pytest.approx(2.0)
    assert math.isnan(evaluate.mean_completion_length([]))
    # distinct-1 of those completions: 11,12,5,6,7,8 all distinct -> 6 of 6
    assert evaluate.distinct_n(lists, 1) == 1.0


# ----------------------------------------------------------------------------------------------------
# mean ± std over seeds
# ----------------------------------------------------------------------------------------------------
def test_mean_std_over_seeds_hand_computation():
    s = evaluate.mean_std_over_seeds([1.0, 2.0, 4.0, None, float("nan")])
    assert s.n == 3
    assert s.mean == pytest.approx(7 / 3)
    # deviations -4/3, -1/3, 5/3 -> squares 16/9 + 1/9 + 25/9 = 42/9; / (3 - 1) = 7/3
    assert s.std == pytest.approx(math.sqrt(7 / 3))
    one = evaluate.mean_std_over_seeds([np.float32(0.25)])
    assert one.n == 1 and one.mean == 0.25 and math.isnan(one.std)
    none = evaluate.mean_std_over_seeds([None])
    assert none.n == 0 and math.isnan(none.mean)


def test_format_mean_std():
    assert evaluate.format_mean_std(evaluate.SeedSummary(0.5123, 0.0311, 2)) == "0.512 ± 0.031"
    assert evaluate.format_mean_std(evaluate.SeedSummary(1.0, float("nan"), 1), digits=1) == "1.0"
    assert evaluate.format_mean_std(evaluate.SeedSummary(float("nan"), float("nan"), 0)) == "–"
