"""PPO: KL penalty and per-token rewards/returns vs a numpy re-derivation, learning on a task with a
known optimum, KL-coefficient ordering, the adaptive controller, sharded == single-device iteration.

Tiny random Llama (vocab 16), completions of up to 8 tokens with EOS = 1; the synthetic reward counts
token 3 in the completion (optimum 8; a uniform policy scores about 8/16 * (length before EOS)).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrlhf import config as C
from jaxrlhf.algos import ppo
from jaxrlhf.algos.rollout import init_extra, kl_controller_update, sampling_config
from jaxrlhf.drivers.rl import make_rl_functions, rl_iteration
from jaxrlhf.kl_control import KLControllerState
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.llama import Llama
from jaxrlhf.ops import kl_penalty
from jaxrlhf.rewards import Completions, count_token
from jaxrlhf.sharding import MeshConfig, make_mesh, place_batch, state_shardings
from jaxrlhf.train_state import init_sharded_state, make_optimizer

V, EOS, TARGET = 16, 1, 3
MODEL = ModelConfig(family="llama", vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                    num_kv_heads=2, max_position_embeddings=32)
CFG = C.PPOConfig(rollout=C.RolloutConfig(max_new_tokens=8), kl=C.KLConfig(coef=0.05), vf_coef=0.5,
                  update=C.UpdateConfig(epochs=4, num_minibatches=2, aggregation="token", whiten_advantages=True))
ROWS, P = 32, 5
REWARD = count_token(TARGET)


def prompts(seed: int, rows: int = ROWS) -> dict:
    """Left-padded random prompts of 2..P tokens (ids 4..V-1)."""
    rng = np.random.default_rng(seed)
    toks = np.zeros((rows, P), np.int32)
    mask = np.zeros((rows, P), np.int32)
    for i in range(rows):
        n = int(rng.integers(2, P + 1))
        toks[i, P - n:] = rng.integers(4, V, n)
        mask[i, P - n:] = 1
    return {"prompt_tokens": toks, "prompt_mask": mask}


@pytest.fixture(scope="module")
def model():
    return nnx.split(Llama(MODEL, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def tx():
    return make_optimizer(C.OptimConfig(lr=3e-3, schedule="constant", max_grad_norm=1.0), 1000)


def setup(model, tx, cfg=CFG, mesh_shape=(1, 1, 1)):
    """``(fns, new_state(coef), ref, mesh)`` for PPO on the tiny model; ``new_state`` builds a fresh state."""
    graphdef, pol = model
    devices = jax.devices()[:1] if mesh_shape == (1, 1, 1) else jax.devices()
    mesh = make_mesh(MeshConfig(*mesh_shape), devices)
    _, graphs = ppo.ppo_init_params(pol, graphdef, MODEL, cfg, jax.random.key(1))

    params, _ = ppo.ppo_init_params(ppo.copy_tree(pol), graphdef, MODEL, cfg, jax.random.key(1))
    template, sh = init_sharded_state(params, tx, mesh, init_extra(cfg.kl.coef))

    def new_state(coef=cfg.kl.coef):  # a fresh copy (the update donates its state), with β = coef
        return ppo.copy_tree(template).replace(extra=jax.device_put(init_extra(coef), sh.extra))

    ref = jax.device_put(ppo.copy_tree(pol), state_shardings(pol, mesh))
    fns = make_rl_functions(ppo.PPO, graphs, cfg, tx, mesh, sh, sampling_config(cfg.rollout, (EOS,), 0))
    return fns, new_state, ref, mesh


def iterate(fns, state, ref, mesh, n, seed=0):
    history = []
    for it in range(n):
        batch = place_batch(prompts(seed * 1000 + it), mesh)
        state, metrics, info = rl_iteration(fns, state, ref, batch, jax.random.key(seed * 1000 + it), reward_fn=REWARD)
        history.append(jax.device_get(metrics))
    return state, history, info


@pytest.fixture(scope="module")
def single(model, tx):
    return setup(model, tx)


_experience = jax.jit(ppo.ppo_experience, static_argnames=("graphs", "cfg"))


def _sample(fns, state, mesh, seed):
    batch = place_batch(prompts(seed), mesh)
    sample = fns.generate(state.params["policy"], batch["prompt_tokens"], batch["prompt_mask"], jax.random.key(seed))
    return sample, REWARD(Completions.from_sample(sample))


# One experience config for the two rollout tests (one compilation): k3 penalty, γ, λ < 1, shaping on.
CFG_X = dataclasses.replace(CFG, gamma=0.9, lam=0.8, kl=C.KLConfig(coef=0.1, estimator="k3"),
                            rollout=C.RolloutConfig(max_new_tokens=8, missing_eos_penalty=0.5, score_scale=2.0,
                                                    score_clip=5.0))


def test_policy_equal_to_reference_has_zero_kl_penalty(single):
    fns, new_state, ref, mesh = single
    state = new_state(0.5)
    sample, scores = _sample(fns, state, mesh, 7)
    assert 0 < float(jnp.mean(sample.truncated_B)) < 1  # some rows stop at EOS, some do not
    exp, m = _experience(state, ref, sample.lm_batch(), sample.truncated_B, scores, graphs=fns.graphs, cfg=CFG_X)
    assert float(m["kl/ref"]) == 0.0 and float(m["reward/non_score"]) == 0.0
    assert np.all(np.asarray(exp["kl"]) == 0.0)
    for est in ("k1", "k2", "k3"):
        assert np.all(np.asarray(kl_penalty(exp["old_logps"], exp["ref_logps"], est)) == 0.0)
    # The only reward is the (shaped) score, on the last completion token of each row.
    r, mask, shaped = np.asarray(exp["rewards"]), np.asarray(exp["completion_mask"]), np.asarray(exp["scores"])
    last = np.array([np.flatnonzero(row)[-1] for row in mask])
    expected = np.zeros_like(r)
    expected[np.arange(len(last)), last] = shaped
    np.testing.assert_array_equal(r, expected)


def _numpy_experience(logp, ref, values, mask, raw_scores, truncated, cfg):
    """Independent per-token rewards, GAE returns and whitened advantages (float64 loops)."""
    d = ref - logp
    kl = np.expm1(d) - d  # k3
    s = (raw_scores - cfg.rollout.missing_eos_penalty * truncated) * cfg.rollout.score_scale
    s = np.clip(s, -cfg.rollout.score_clip, cfg.rollout.score_clip)
    B, S = mask.shape
    rewards = np.zeros((B, S))
    adv = np.zeros((B, S))
    for b in range(B):
        idx = np.flatnonzero(mask[b])
        for t in idx:
            rewards[b, t] = -cfg.kl.coef * kl[b, t]
        rewards[b, idx[-1]] += s[b]
        next_v, next_a = 0.0, 0.0
        for t in idx[::-1]:
            delta = rewards[b, t] + cfg.gamma * next_v - values[b, t]
            next_a = delta + cfg.gamma * cfg.lam * next_a
            adv[b, t] = next_a
            next_v = values[b, t]
    returns = np.where(mask > 0, adv + values, 0.0)
    a = adv[mask > 0]
    white = np.where(mask > 0, (adv - a.mean()) / np.sqrt(a.var(ddof=1) + 1e-8), 0.0)
    return rewards, returns, white, s


def test_rollout_rewards_and_returns_match_numpy(model, single):
    fns, new_state, _, mesh = single
    graphdef, pol = model
    cfg = CFG_X
    state = new_state(cfg.kl.coef)  # the coefficient in use lives in TrainState.extra
    # A reference different from the policy, and a random (non-zero) value head.
    noise = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(5), x.shape), pol)
    head = state.params["value_head"]
    head["kernel"].set_value(jax.random.normal(jax.random.key(6), head["kernel"].shape) * 0.3)
    head["bias"].set_value(jnp.full(head["bias"].shape, 0.2))
    sample, scores = _sample(fns, state, mesh, 11)
    exp, m = _experience(state, noise, sample.lm_batch(), sample.truncated_B, scores, graphs=fns.graphs, cfg=cfg)
    e = {k: np.asarray(v, np.float64) for k, v in jax.device_get(exp).items()}
    mask = e["completion_mask"]

    # The recomputed log-probs are the sampler's (KV cache == full forward), aligned with the tokens.
    P_ = sample.tokens_BS.shape[1] - sample.completion_tokens_BN.shape[1]
    np.testing.assert_allclose(e["old_logps"][:, P_:], np.asarray(sample.policy_logps_BN), atol=2e-5)
    # Values: the critic's hidden state at t-1 through the head, read independently.
    lm = sample.lm_batch()
    hidden = np.asarray(nnx.merge(graphdef, state.params["critic"])(lm["tokens"], lm["positions"],
                                                                     lm["segment_ids"]).hidden_BTD, np.float64)
    v = hidden @ np.asarray(head["kernel"][...], np.float64)[:, 0] + float(head["bias"][...][0])
    np.testing.assert_allclose(e["old_values"][:, 1:], np.where(mask[:, 1:] > 0, v[:, :-1], 0.0), atol=1e-5)

    rewards, returns, white, shaped = _numpy_experience(e["old_logps"], e["ref_logps"], e["old_values"], mask,
                                                        np.asarray(scores, np.float64),
                                                        np.asarray(sample.truncated_B, np.float64), cfg)
    assert np.abs(e["kl"]).max() > 1e-3  # the reference really differs
    assert np.any(shaped == 5.0) or np.any(np.asarray(sample.truncated_B))  # shaping options are exercised
    np.testing.assert_allclose(e["scores"], shaped, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(e["rewards"], rewards, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e["returns"], returns, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(e["advantages"], white, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(m["reward/non_score"]), (rewards.sum(-1) - shaped).mean(), rtol=1e-4, atol=1e-6)


def test_ppo_learns_and_larger_kl_coefficient_keeps_kl_lower(single):
    fns, new_state, ref, mesh = single
    _, low, _ = iterate(fns, new_state(0.01), ref, mesh, 12)
    _, high, _ = iterate(fns, new_state(0.5), ref, mesh, 12)
    start = low[0]["score/mean"]
    end_low = np.mean([h["score/mean"] for h in low[-3:]])
    assert start < 1.0 and end_low > start + 1.5, (start, end_low)  # ~4x; seen: 0.41 -> 3.26
    kl_low = np.mean([h["kl/ref"] for h in low[-3:]])
    kl_high = np.mean([h["kl/ref"] for h in high[-3:]])
    assert kl_high < 0.5 * kl_low, (kl_high, kl_low)
    for h in low:  # the metrics the issue asks for are reported
        for k in ("score/std", "reward/non_score", "policy/entropy", "policy/clip_fraction", "policy/approx_kl",
                  "value/loss", "value/explained_variance", "advantage/mean", "advantage/std",
                  "completion/length", "completion/truncated", "kl/coef"):
            assert np.isfinite(h[k]), k


def test_adaptive_controller_update_rule():
    cfg = C.KLConfig(coef=0.2, controller="adaptive", target=6.0, horizon=1000.0)
    extra = {"kl": KLControllerState(jnp.float32(0.2))}
    for kl, direction in ((12.0, 1), (3.0, -1)):
        seq_kl = jnp.full((64,), kl)
        new = float(kl_controller_update(extra, seq_kl, cfg)["kl"].coef)
        e = np.clip(kl / 6.0 - 1.0, -0.2, 0.2)
        np.testing.assert_allclose(new, 0.2 * (1 + e * 64 / 1000.0), rtol=1e-6)
        assert np.sign(new - 0.2) == direction
    fixed = kl_controller_update(extra, jnp.full((8,), 50.0), dataclasses.replace(cfg, controller="fixed"))
    assert float(fixed["kl"].coef) == pytest.approx(0.2)


@pytest.fixture(scope="module")
def one_device_iteration(single):
    fns, new_state, ref, mesh = single
    state, hist, info = iterate(fns, new_state(), ref, mesh, 1, seed=3)
    return jax.device_get(state.params), hist[0], np.asarray(info["sample"].tokens_BS)


@pytest.mark.parametrize("mesh_shape", [pytest.param((8, 1, 1), marks=pytest.mark.slow), (2, 2, 2)])
def test_sharded_iteration_equals_single_device(model, tx, one_device_iteration, mesh_shape):
    """Rollout (sampling, scoring, GAE) + 4 epochs x 2 minibatches of AdamW (lr 3e-3) on 8 fake devices."""
    params_1, metrics_1, tokens_1 = one_device_iteration
    fns, new_state, ref, mesh = setup(model, tx, mesh_shape=mesh_shape)
    state = new_state()
    if mesh_shape == (2, 2, 2):
        q = state.params["policy"]["layers"]["q"]
        assert not q.get_value().sharding.is_fully_replicated
    state, hist, info = iterate(fns, state, ref, mesh, 1, seed=3)
    np.testing.assert_array_equal(np.asarray(info["sample"].tokens_BS), tokens_1)
    for k in ("score/mean", "kl/ref", "value/loss", "policy/clip_fraction", "loss"):
        np.testing.assert_allclose(hist[0][k], metrics_1[k], rtol=1e-4, atol=1e-5, err_msg=k)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(params_1)))
    assert diff < 2e-4, diff


def test_config_validation_names_fields():
    base = C.ExperimentConfig(algo=CFG, data=C.DataConfig(source="x", max_length=16, max_prompt_length=8))
    C.validate(base)
    bad = [("algo.rollout.num_completions", dataclasses.replace(CFG, rollout=C.RolloutConfig(max_new_tokens=8,
                                                                                          num_completions=0))),
           ("data.max_length", dataclasses.replace(CFG, rollout=C.RolloutConfig(max_new_tokens=9))),
           ("algo.update.num_minibatches",
            dataclasses.replace(CFG, update=dataclasses.replace(CFG.update, num_minibatches=3))),
           ("algo.update.clip_eps", dataclasses.replace(CFG, update=dataclasses.replace(CFG.update, clip_eps=0.0))),
           ("algo.kl.target", dataclasses.replace(CFG, kl=C.KLConfig(target=0.0))),
           ("algo.reward", dataclasses.replace(CFG, reward=C.RewardSpec())),
           ("algo.dual_clip", dataclasses.replace(CFG, dual_clip=0.5))]
    for field, algo in bad:
        cfg = dataclasses.replace(base, algo=algo)
        with pytest.raises(C.ConfigError, match=field.replace(".", r"\.")):
            C.validate(cfg)
    # Dotted overrides reach the nested frozen sections and return a new config (the old one is unchanged).
    cfg = C.apply_override(base, "algo.kl.coef", "0.3")
    cfg = C.apply_override(cfg, "algo.reward.functions", "jaxrlhf.rewards:word_count")
    cfg = C.apply_override(cfg, "algo.update.epochs", "2")
    assert cfg.algo.kl.coef == 0.3 and cfg.algo.reward.functions == ("jaxrlhf.rewards:word_count",)
    assert cfg.algo.update == dataclasses.replace(CFG.update, epochs=2) and cfg.algo.kl.estimator == CFG.kl.estimator
    assert base.algo.kl.coef == 0.05 and base.algo.update.epochs == 4
    with pytest.raises(C.ConfigError, match="read-only"):
        C.apply_override(base, "algo.kind", "grpo")


@pytest.mark.slow
def test_shared_critic_learns(model, tx):
    cfg = dataclasses.replace(CFG, critic="shared")
    fns, new_state, ref, mesh = setup(model, tx, cfg=cfg)
    state = new_state()
    assert set(state.params) == {"policy", "value_head"}
    _, hist, _ = iterate(fns, state, ref, mesh, 12)
    assert np.mean([h["score/mean"] for h in hist[-3:]]) > hist[0]["score/mean"] + 1.5
