"""The RLAIF judge: order-swapped preference arithmetic against hand computations, the label logits against a
full forward pass, and the rows it writes."""

import math

import numpy as np
import pytest

from jaxrlhf.judge import (PairJudgement, agreement_report, judge_pairs, judge_prompt_ids, label_logits,
                           label_token_ids, labelled_rows, order_debiased_preference)


def test_a_judge_that_always_answers_a_is_indifferent_and_always_flips():
    always_a = np.tile([[7.0, -1.0]], (5, 1))
    v = order_debiased_preference(always_a, always_a)
    np.testing.assert_allclose(v.prob_first, 0.5)
    assert v.flipped.all()
    judged = [PairJudgement("p", "x", "y", *map(float, (v.prob_first[i], v.p_first_as_a[i], v.p_second_as_a[i])),
                            bool(v.flipped[i])) for i in range(5)]
    rep = agreement_report(judged, human_first_is_chosen=[True, False, True, True, False])
    assert rep["position_bias_rate"] == 1.0
    assert rep["agreement"] == 0.5  # every tie counts half


def test_preference_equals_a_hand_computation_from_fixed_logits():
    first_as_a = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    second_as_a = np.array([[0.0, 1.0], [0.5, 0.0], [4.0, 0.0]])
    v = order_debiased_preference(first_as_a, second_as_a)
    # P(A) = e^a / (e^a + e^b) by hand.
    p1 = [math.exp(2) / (math.exp(2) + 1), 1 / (1 + math.exp(3)), 0.5]
    p2 = [1 / (1 + math.e), math.exp(0.5) / (math.exp(0.5) + 1), math.exp(4) / (math.exp(4) + 1)]
    np.testing.assert_allclose(v.p_first_as_a, p1, rtol=1e-12)
    np.testing.assert_allclose(v.p_second_as_a, p2, rtol=1e-12)
    np.testing.assert_allclose(v.prob_first, [(a + 1 - b) / 2 for a, b in zip(p1, p2)], rtol=1e-12)
    # Row 0: both orders prefer the first reply; row 1: both prefer the second; row 2: a tie then "second".
    assert v.flipped.tolist() == [False, False, True]
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        order_debiased_preference(first_as_a, second_as_a[:2])


def test_labelled_rows_put_the_preferred_reply_first_and_agreement_counts_it():
    judged = [PairJudgement("p0", "good", "bad", 0.8, 0.9, 0.3, False),
              PairJudgement("p1", "meh", "fine", 0.3, 0.4, 0.8, False),
              PairJudgement("p2", "x", "y", 0.6, 0.9, 0.7, True)]
    rows = labelled_rows(judged)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("good", "bad"), ("fine", "meh"), ("x", "y")]
    np.testing.assert_allclose([r["judge_prob"] for r in rows], [0.8, 0.7, 0.6])
    rep = agreement_report(judged, human_first_is_chosen=[True, True, False])
    assert rep["agreement"] == pytest.approx(1 / 3)   # only the first pair agrees with the human
    assert rep["position_bias_rate"] == pytest.approx(1 / 3)
    assert rep["mean_confidence"] == pytest.approx((0.8 + 0.7 + 0.6) / 3)


@pytest.mark.slow  # compiles the judge at two buckets (~20 s idle); the arithmetic tests stay default
def test_label_logits_equal_a_full_forward_pass_at_the_last_token(tiny_llama_folder):
    import jax
    from flax import nnx

    from jaxrlhf.models.hub import load_pretrained

    pre = load_pretrained(str(tiny_llama_folder))
    tok = pre.tokenizer
    graphdef, params = nnx.split(pre.model)
    ids = label_token_ids(tok)
    a, b = judge_prompt_ids(tok, "Human: is the sky green?", "No, it is blue.", "Yes, very green indeed.",
                            max_reply_tokens=4)
    assert len(b) == len(a)  # replies cut to 4 tokens each (+ "...")
    inputs = [a, b, a[:20], b[:7], a[:65]]  # several lengths, two buckets, a padded last batch
    got = label_logits(graphdef, params, inputs, ids, batch_size=2, bucket=64)
    model = nnx.merge(graphdef, params)
    for row, t in zip(got, inputs):
        logits = np.asarray(jax.device_get(model(np.asarray([t], np.int32)).logits_BTV))[0, -1]
        np.testing.assert_allclose(row, logits[list(ids)], rtol=2e-4, atol=2e-4)
    # judge_pairs = both orders through the same logits, then the debiasing arithmetic.
    judged = judge_pairs(graphdef, params, tok, [("Human: hi", "Hello!", "Go away.")], batch_size=2)
    first_as_a, second_as_a = judge_prompt_ids(tok, "Human: hi", "Hello!", "Go away.")
    full = [np.asarray(jax.device_get(model(np.asarray([t], np.int32)).logits_BTV))[0, -1][list(ids)]
            for t in (first_as_a, second_as_a)]
    want = order_debiased_preference(full[0][None], full[1][None])
    assert judged[0].prob_first == pytest.approx(float(want.prob_first[0]), abs=1e-4)
    assert judged[0].flipped == bool(want.flipped[0])
