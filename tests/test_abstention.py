"""jaxrlhf.abstention: the question generator, the answer checker on a hand-written table, the reward table
for each λ (directly and through a config's RewardSpec), the per-tier rates and the greedy evaluation."""

import numpy as np
import pytest

from jaxrlhf import abstention as A
from jaxrlhf import config as C
from jaxrlhf.errors import DataError

EASY = 'What is 8 + 6? Answer with just the number. If you are not sure, say "I don\'t know".'
HARD = 'What is 532 * 48? Answer with just the number. If you are not sure, say "I don\'t know".'
NEG = "What is 3 - 5? Answer with just the number."
# The decoded prompt the RL driver hands to a reward: the chat template's text around the question.
CHAT = "system\nYou are a helpful AI assistant named SmolLM\nuser\n" + HARD + "\nassistant\n"

# (prompt, completion, label): hand-graded (8 + 6 = 14, 532 * 48 = 25536, 3 - 5 = -2).
TABLE = [
    (EASY, "14", "correct"),
    (EASY, "8 + 6 = 14", "correct"),                       # the number after "=", not the first number
    (EASY, "1. 8 + 6 = 14\n2", "correct"),
    (EASY, "The answer is 14.", "correct"),
    (EASY, "14.0", "correct"),
    (EASY, "  14\n\nHope this helps!", "correct"),
    (HARD, "25,536", "correct"),                           # thousands separator
    (HARD, "532 * 48 = 25536", "correct"),
    (HARD, "532 times 48 is 25536", "correct"),            # the number after "is", not 532
    (CHAT, "It equals 25,536.", "correct"),
    (NEG, "-2", "correct"),
    (NEG, "3 - 5 = -2", "correct"),
    (NEG, "−2", "correct"),                                # U+2212 minus sign
    (EASY, "15", "wrong"),
    (EASY, "8 + 6 = 12", "wrong"),
    (EASY, "-14", "wrong"),
    (EASY, "140", "wrong"),
    (EASY, "14.5", "wrong"),
    (EASY, "7 + 7 = 12, but I'm not sure", "wrong"),       # answer first, hedge after: graded
    (HARD, "532 * 48 = 2553", "wrong"),
    (HARD, "25,5360", "wrong"),
    (NEG, "2", "wrong"),
    (EASY, "I don't know", "abstain"),
    (EASY, "I do not know.", "abstain"),
    (EASY, "I DON’T KNOW", "abstain"),                     # curly apostrophe, upper case
    (HARD, "I'm not sure.", "abstain"),
    (HARD, "I'm not sure, maybe 25536", "abstain"),        # abstention first: not graded as an answer
    (HARD, "I cannot answer that.", "abstain"),
    (HARD, "No idea!", "abstain"),
    (EASY, "", "wrong"),                                   # malformed: no number, no abstention
    (EASY, "I'm not a helpful AI. I'm designed to help.", "wrong"),
    (EASY, "Fourteen", "wrong"),                           # number words are not parsed
    (HARD, "Sorry for your loss.", "wrong"),
]


def test_checker_table():
    got = [A.grade(p, c) for p, c, _ in TABLE]
    assert got == [label for _, _, label in TABLE]


def test_parse_question_recomputes_the_answer_from_text():
    assert A.parse_question(EASY) == (14, "easy")
    assert A.parse_question(CHAT) == (25536, "hard")
    assert A.parse_question(NEG) == (-2, "easy")
    assert A.parse_question("What is 7 times 6?") == (42, "hard")
    with pytest.raises(DataError, match="no arithmetic question"):
        A.parse_question("Write a positive movie review.")
    with pytest.raises(DataError):
        A.grade("hello", "14")


def test_generator_is_seeded_and_its_answers_match_the_text():
    qs = A.make_questions(200, seed=3, hard_fraction=0.25)
    assert qs == A.make_questions(200, seed=3, hard_fraction=0.25)
    assert qs != A.make_questions(200, seed=4, hard_fraction=0.25)
    assert sum(q.tier == "hard" for q in qs) == 50
    for row in A.question_rows(qs):
        # independent re-derivation: split the text "What is a op b?" and compute with Python
        _, _, a, op, b = row["prompt"].split("?")[0].split()
        a, b = int(a), int(b)
        assert row["answer"] == {"+": a + b, "*": a * b}[op]
        assert "I don't know" in row["prompt"]
        if row["tier"] == "easy":
            assert op == "+" and 1 <= a <= 9 and 1 <= b <= 9
        else:
            assert op == "*" and 100 <= a <= 999 and 10 <= b <= 99
        assert A.parse_question(row["prompt"]) == (row["answer"], row["tier"])
    with pytest.raises(ValueError, match="hard_fraction"):
        A.make_questions(4, seed=0, hard_fraction=1.5)


# λ -> rewards of [correct, abstain, wrong, malformed], by hand from +1 / 0 / -λ.
REWARD_TABLE = {0.0: [1.0, 0.0, 0.0, 0.0], 0.5: [1.0, 0.0, -0.5, -0.5], 1.0: [1.0, 0.0, -1.0, -1.0],
                2.0: [1.0, 0.0, -2.0, -2.0]}
CASES = [(EASY, "8 + 6 = 14"), (HARD, "I don't know"), (HARD, "532 * 48 = 2553"), (EASY, "Sorry.")]


@pytest.mark.parametrize("lam", sorted(REWARD_TABLE))
def test_reward_table(lam):
    from jaxrlhf.rewards import Completions, build_reward, reward_parts

    prompts, completions = [p for p, _ in CASES], [c for _, c in CASES]
    want = np.asarray(REWARD_TABLE[lam], np.float32)
    got = A.abstention_reward(prompts, completions, wrong_penalty=lam)
    assert got.dtype == np.float32 and got.shape == (4,)
    np.testing.assert_array_equal(got, want)
    # the same reward from a config: three indicators weighted (1, -λ, 0), each logged as a part
    total, parts = reward_parts(build_reward(A.reward_spec(lam)), Completions.from_texts(prompts, completions))
    np.testing.assert_allclose(total, want, atol=0)
    np.testing.assert_array_equal(parts["answer_correct"], [1, 0, 0, 0])
    np.testing.assert_array_equal(parts["answer_abstained"], [0, 1, 0, 0])
    np.testing.assert_array_equal(parts["answer_wrong"], [0, 0, 1, 1])


def test_lambda_is_one_dotted_override():
    cfg = C.ExperimentConfig(data=C.DataConfig(source="x.jsonl"),
                             algo=C.GRPOConfig(rollout=C.RolloutConfig(num_completions=2), reward=A.reward_spec(1.0)))
    key, value = C.parse_overrides(["--config.algo.reward.function_weights=[1,-2,0]"])[0]
    cfg = C.apply_override(cfg, key, value)
    assert tuple(cfg.algo.reward.function_weights) == (1, -2, 0)
    assert cfg.algo.reward.functions == A.reward_spec(2.0).functions
    with pytest.raises(ValueError, match="wrong_penalty"):
        A.reward_spec(-1.0)
    with pytest.raises(ValueError, match="wrong_penalty"):
        A.abstention_reward([EASY], ["14"], wrong_penalty=-0.5)


def test_tier_rates_by_hand():
    labels = ["correct", "correct", "wrong", "abstain", "wrong", "abstain", "abstain"]
    tiers = ["easy", "easy", "easy", "easy", "hard", "hard", "hard"]
    r = A.tier_rates(labels, tiers)
    assert r["easy/n"] == 4 and r["hard/n"] == 3 and r["all/n"] == 7
    assert (r["easy/correct"], r["easy/abstain"], r["easy/wrong"]) == (0.5, 0.25, 0.25)
    assert (r["hard/correct"], r["hard/abstain"], r["hard/wrong"]) == (0.0, 2 / 3, 1 / 3)
    assert r["all/abstain"] == 3 / 7
    assert np.isnan(A.tier_rates(["correct"], ["easy"])["hard/correct"])
    with pytest.raises(ValueError, match="unknown labels"):
        A.tier_rates(["right"], ["easy"])


def test_mean_std_table():
    table = A.mean_std_table({"lam=1": [{"x": 0.5}, {"x": 0.75}], "base": [{"x": 0.25}]}, ["x"])
    sd = np.std([0.5, 0.75], ddof=1)  # 0.1768
    assert f"| lam=1 | 2 | 0.62 ± {sd:.2f} |" in table   # mean 0.625 -> "0.62" (round half to even)
    assert "| base | 1 | 0.25 |" in table


def test_greedy_evaluation_matches_the_drivers_sampler(tiny_llama_folder):
    """evaluate_abstention (batches of 3 with repeat padding) against complete_prompt_ids (one batch) on
    a random tiny Llama: the same greedy completions, graded by the checker."""
    from flax import nnx

    from jaxrlhf.data.tokenize import encode_prompt
    from jaxrlhf.drivers.core import complete_prompt_ids
    from jaxrlhf.models.hub import load_pretrained

    pre = load_pretrained(str(tiny_llama_folder))
    graphdef, params = nnx.split(pre.model)
    tok = pre.tokenizer
    rows = A.question_rows(A.make_questions(5, seed=0))
    rates, records = A.evaluate_abstention(graphdef, params, tok, rows, eos_token_ids=(tok.eos_token_id,),
                                           max_new_tokens=4, batch_size=3, use_chat_template=False)
    ids = [encode_prompt(tok, r["prompt"]) for r in rows]
    ref = complete_prompt_ids(graphdef, params, tok, ids, max_new_tokens=4)
    assert [r["completion"] for r in records] == ref
    labels = [A.grade(r["prompt"], c) for r, c in zip(rows, ref)]
    assert [r["label"] for r in records] == labels
    assert rates == A.tier_rates(labels, [r["tier"] for r in rows])
