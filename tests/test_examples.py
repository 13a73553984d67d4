"""The custom-loop scripts in ``examples/``: each runs a few steps on a tiny random Llama (loss changes /
decreases), and each custom piece matches an independent numpy re-derivation on fixed arrays."""
import importlib.util
import pathlib

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
STEPS, SEQ_LEN = 3, 32
RL_STEPS, RL_SEQ_LEN = 2, 16   # RL iterations (compile-bound), prompt slots + new tokens


def load(name: str):
    """Import ``examples/<name>.py`` as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"jaxrlhf_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


# ------------------------------------------------------------------------------------------- custom pieces

def test_sft_sequence_weights_give_each_row_weight_one():
    ex = load("sft_loop")
    mask = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], np.float32)
    w = ex.sequence_weights(mask)
    want = np.array([[0, 0, 1 / 3, 1 / 3, 1 / 3, 0], [0, 0.5, 0.5, 0, 0, 0], [0] * 6], np.float32)
    np.testing.assert_allclose(w, want, rtol=1e-6)
    # sum_t w nll / sum_t w == mean over real rows of each row's mean nll
    nll = np.arange(18, dtype=np.float32).reshape(3, 6)
    per_row = [nll[0, 2:5].mean(), nll[1, 1:3].mean()]
    np.testing.assert_allclose((w * nll).sum() / w.sum(), np.mean(per_row), rtol=1e-6)


def test_dpop_loss_matches_numpy_and_is_dpo_at_lambda_zero():
    import jax.numpy as jnp

    from jaxrlhf.losses import dpo_loss

    ex = load("dpo_custom_loss")
    pc = np.array([-12.0, -30.5, -7.25, -20.0, -15.0, -9.0], np.float32)
    pr = np.array([-14.0, -28.0, -9.5, -19.0, -22.0, -9.0], np.float32)
    rc = np.array([-13.0, -27.0, -7.25, -25.0, -11.0, -8.0], np.float32)
    rr = np.array([-13.5, -29.0, -8.0, -18.0, -20.0, -10.0], np.float32)
    beta, lam = 0.1, 5.0
    want = -np.mean(log_sigmoid(beta * ((pc - rc) - (pr - rr) - lam * np.maximum(0.0, rc - pc))))
    got, metrics = ex.dpop_loss(jnp.asarray(pc), jnp.asarray(pr), jnp.asarray(rc), jnp.asarray(rr), beta, lam)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["penalty"]), np.mean(np.maximum(0.0, rc - pc)), rtol=1e-5)
    assert np.any(rc > pc) and np.any(rc < pc)          # both branches of the max are exercised
    zero, _ = ex.dpop_loss(pc, pr, rc, rr, beta, 0.0)
    np.testing.assert_allclose(float(zero), float(dpo_loss(pc, pr, rc, rr, beta)[0]), rtol=1e-6)


def test_loo_median_advantages_match_numpy():
    ex = load("grpo_custom_advantage")
    scores = np.array([[1.0, 2.0, 3.0, 100.0], [0.5, -1.0, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    want = np.array([[s[i] - np.median(np.delete(s, i)) for i in range(len(s))] for s in scores])
    np.testing.assert_allclose(np.asarray(ex.loo_median_advantages(scores)), want, rtol=1e-6)
    # the outlier (100) does not move the others' baseline the way a mean would
    assert np.asarray(ex.loo_median_advantages(scores))[0, 0] == pytest.approx(1.0 - 3.0)  # mean: 1 - 35
    odd = scores[:, :3]
    want = np.array([[s[i] - np.median(np.delete(s, i)) for i in range(3)] for s in odd])
    np.testing.assert_allclose(np.asarray(ex.loo_median_advantages(odd)), want, rtol=1e-6)


def test_politeness_reward_matches_hand_count():
    ex = load("ppo_custom_reward")
    got = ex.politeness(["p", "p"], ["Please, thank you!", "no"])
    np.testing.assert_allclose(got, [2 - 18 / 100, -2 / 100], rtol=1e-6)
    assert got.dtype == np.float32


# ------------------------------------------------------------------------------------------- the loops

def test_sft_loop_loss_decreases(tiny_llama_folder):
    losses = load("sft_loop").main(model=str(tiny_llama_folder), steps=STEPS, seq_len=SEQ_LEN, lr=1e-3)
    assert len(losses) == STEPS and np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 1e-3, losses


def test_reward_model_loop_loss_decreases(tiny_llama_folder):
    losses = load("reward_model_loop").main(model=str(tiny_llama_folder), steps=STEPS, seq_len=SEQ_LEN, lr=1e-3)
    assert len(losses) == STEPS and np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 1e-4, losses


def test_dpo_custom_loss_starts_at_log2_and_decreases(tiny_llama_folder):
    losses = load("dpo_custom_loss").main(model=str(tiny_llama_folder), steps=STEPS, seq_len=SEQ_LEN, lr=1e-3,
                                          lam=1.0)
    assert len(losses) == STEPS and np.all(np.isfinite(losses))
    assert losses[0] == pytest.approx(np.log(2.0), abs=1e-5)   # policy == reference at step 0, no penalty
    assert losses[-1] < losses[0] - 1e-4, losses


def test_ppo_custom_reward_runs_and_loss_changes(tiny_llama_folder):
    losses = load("ppo_custom_reward").main(model=str(tiny_llama_folder), steps=RL_STEPS, seq_len=RL_SEQ_LEN,
                                            lr=1e-3)
    assert len(losses) == RL_STEPS and np.all(np.isfinite(losses))
    assert max(losses) - min(losses) > 1e-6, losses


def test_grpo_custom_advantage_runs_and_loss_changes(tiny_llama_folder):
    losses = load("grpo_custom_advantage").main(model=str(tiny_llama_folder), steps=RL_STEPS,
                                                seq_len=RL_SEQ_LEN, lr=1e-3)
    assert len(losses) == RL_STEPS and np.all(np.isfinite(losses))
    assert max(losses) - min(losses) > 1e-6, losses
