"""GRPO and RLOO: group advantages vs numpy, learning on a task with a known optimum, KL-coefficient
ordering, the GRPO KL loss term.

Same synthetic task as tests/test_ppo.py: tiny random Llama (vocab 16), up to 8 completion tokens, EOS = 1,
reward = count of token 3; 8 prompts x G = 4 completions.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrlhf import config as C
from jaxrlhf.algos import grpo
from jaxrlhf.algos.ppo import copy_tree
from jaxrlhf.algos.rollout import init_extra, repeat_prompts, sampling_config
from jaxrlhf.drivers.rl import make_rl_functions, rl_iteration
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.llama import Llama
from jaxrlhf.rewards import Completions, count_token
from jaxrlhf.sharding import MeshConfig, make_mesh, place_batch, state_shardings
from jaxrlhf.train_state import init_sharded_state, make_optimizer

V, EOS, TARGET, G, B, P = 16, 1, 3, 4, 8, 5
MODEL = ModelConfig(family="llama", vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                    num_kv_heads=2, max_position_embeddings=32)
ROLLOUT = C.RolloutConfig(max_new_tokens=8, num_completions=G)
GRPO_CFG = C.GRPOConfig(rollout=ROLLOUT, beta=0.05, update=C.UpdateConfig(epochs=2, num_minibatches=2,
                                                                         aggregation="sequence"))
RLOO_CFG = C.RLOOConfig(rollout=ROLLOUT, kl=C.KLConfig(coef=0.05), update=C.UpdateConfig(epochs=2, num_minibatches=2))
REWARD = count_token(TARGET)


def prompts(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    toks = np.zeros((B, P), np.int32)
    mask = np.zeros((B, P), np.int32)
    for i in range(B):
        n = int(rng.integers(2, P + 1))
        toks[i, P - n:] = rng.integers(4, V, n)
        mask[i, P - n:] = 1
    return repeat_prompts({"prompt_tokens": toks, "prompt_mask": mask}, G)


@pytest.fixture(scope="module")
def model():
    return nnx.split(Llama(MODEL, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def tx():
    return make_optimizer(C.OptimConfig(lr=3e-3, schedule="constant", max_grad_norm=1.0), 1000)


def setup(model, tx, algo, cfg):
    graphdef, pol = model
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    params, graphs = algo.init_params(copy_tree(pol), graphdef, MODEL, cfg, None)
    template, sh = init_sharded_state(params, tx, mesh, init_extra(algo.initial_coef(cfg)))

    def new_state(coef):
        return copy_tree(template).replace(extra=jax.device_put(init_extra(coef), sh.extra))

    ref = jax.device_put(copy_tree(pol), state_shardings(pol, mesh))
    fns = make_rl_functions(algo, graphs, cfg, tx, mesh, sh, sampling_config(cfg.rollout, (EOS,), 0))
    return fns, new_state, ref, mesh


def iterate(fns, state, ref, mesh, n):
    hist = []
    for it in range(n):
        batch = place_batch(prompts(it), mesh)
        state, metrics, info = rl_iteration(fns, state, ref, batch, jax.random.key(it), reward_fn=REWARD)
        hist.append(jax.device_get(metrics))
    return state, hist, info


@pytest.fixture(scope="module")
def grpo_setup(model, tx):
    return setup(model, tx, grpo.GRPO, GRPO_CFG)


@pytest.fixture(scope="module")
def rloo_setup(model, tx):
    return setup(model, tx, grpo.RLOO, RLOO_CFG)


def _check_learns_and_orders_kl(fns, new_state, ref, mesh, low_coef, high_coef, n=10):
    _, low, _ = iterate(fns, new_state(low_coef), ref, mesh, n)
    _, high, _ = iterate(fns, new_state(high_coef), ref, mesh, n)
    start, end = low[0]["score/mean"], np.mean([h["score/mean"] for h in low[-3:]])
    assert start < 1.0 and end > start + 1.5, (start, end)  # seen: 0.38 -> 3.4 (GRPO), 3.2 (RLOO)
    kl_low, kl_high = (np.mean([h["kl/ref"] for h in hist[-3:]]) for hist in (low, high))
    assert kl_high < 0.5 * kl_low, (kl_high, kl_low)


def test_grpo_learns_and_larger_beta_keeps_kl_lower(grpo_setup):
    _check_learns_and_orders_kl(*grpo_setup, low_coef=0.0, high_coef=1.0)


def test_rloo_learns_and_larger_kl_coefficient_keeps_kl_lower(rloo_setup):
    _check_learns_and_orders_kl(*rloo_setup, low_coef=0.0, high_coef=2.0)


def _rollout(fns, state, ref, mesh, seed=5):
    batch = place_batch(prompts(seed), mesh)
    sample = fns.generate(state.params["policy"], batch["prompt_tokens"], batch["prompt_mask"], jax.random.key(seed))
    scores = REWARD(Completions.from_sample(sample))
    exp, m = fns.experience(state, ref, sample.lm_batch(), sample.truncated_B, scores)
    return sample, np.asarray(scores, np.float64), jax.device_get(exp), jax.device_get(m)


def test_grpo_group_advantages_match_numpy(grpo_setup, model):
    fns, new_state, ref, mesh = grpo_setup
    state = new_state(0.05)
    sample, scores, exp, _ = _rollout(fns, state, ref, mesh)
    s = scores.reshape(B, G)
    a = (s - s.mean(1, keepdims=True)) / (s.std(1, ddof=1, keepdims=True) + 1e-4)
    mask = np.asarray(exp["completion_mask"])
    np.testing.assert_allclose(np.asarray(exp["advantages"]), a.reshape(-1)[:, None] * mask, rtol=1e-5, atol=1e-6)
    # Rows of one prompt share the prompt and hold different samples.
    toks = np.asarray(sample.tokens_BS).reshape(B, G, -1)
    assert np.all(toks[:, :, :P] == toks[:, :1, :P]) and not np.all(toks == toks[:, :1])


def test_rloo_advantages_match_numpy(rloo_setup, model):
    fns, new_state, _, mesh = rloo_setup
    graphdef, pol = model
    coef = 0.2
    state = new_state(coef)
    ref = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(9), x.shape), pol)
    sample, scores, exp, m = _rollout(fns, state, ref, mesh)
    mask = np.asarray(exp["completion_mask"], np.float64)
    kl = (np.asarray(exp["old_logps"], np.float64) - np.asarray(exp["ref_logps"], np.float64)) * mask  # k1
    assert np.abs(kl).max() > 1e-3
    R = (scores - coef * kl.sum(-1)).reshape(B, G)
    base = (R.sum(1, keepdims=True) - R) / (G - 1)
    np.testing.assert_allclose(np.asarray(exp["advantages"]), (R - base).reshape(-1)[:, None] * mask,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m["reward/non_score"], (-coef * kl.sum(-1)).mean(), rtol=1e-4, atol=1e-6)


def test_grpo_kl_loss_term(grpo_setup, model):
    """With the policy as its own reference the k3 term is 0 and its gradient too; against another
    reference it adds β·mean k3 (sequence aggregation) to the loss."""
    fns, new_state, ref, mesh = grpo_setup
    state = new_state(0.05)
    _, _, exp, _ = _rollout(fns, state, ref, mesh)
    mb = {k: jnp.asarray(v) for k, v in exp.items() if k != "scores"}
    loss_fn = jax.jit(lambda p, mb, coef: grpo.critic_free_loss(p, mb, graphs=fns.graphs, cfg=GRPO_CFG,
                                                                kl_coef=coef)[0])
    base = float(loss_fn(state.params, mb, 0.0))
    same = float(loss_fn(state.params, mb, 1.0))
    grad = jax.grad(lambda p: grpo.critic_free_loss(p, mb, graphs=fns.graphs, cfg=GRPO_CFG, kl_coef=1.0)[0]
                    - grpo.critic_free_loss(p, mb, graphs=fns.graphs, cfg=GRPO_CFG, kl_coef=0.0)[0])
    g = jax.jit(grad)(state.params)
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g)) < 1e-6  # k3 gradient vanishes at π = π_ref
    assert same == pytest.approx(base, abs=1e-6)
    other = dict(mb, ref_logps=mb["ref_logps"] - 0.3 * mb["completion_mask"])
    with_kl = float(loss_fn(state.params, other, 1.0))
    d = -0.3
    k3 = np.expm1(d) - d
    rows = float(np.sum(np.asarray(mb["completion_mask"]).sum(-1) > 0))
    assert with_kl - base == pytest.approx(k3 * rows, rel=1e-4)  # loss·n with n = rows (sequence)


def test_group_configs_validate():
    base = C.ExperimentConfig(algo=GRPO_CFG, data=C.DataConfig(source="x", max_length=16, max_prompt_length=8))
    C.validate(base)
    for algo in (dataclasses.replace(GRPO_CFG, rollout=C.RolloutConfig(max_new_tokens=8, num_completions=1)),
                 dataclasses.replace(RLOO_CFG, rollout=C.RolloutConfig(max_new_tokens=8, num_completions=1))):
        with pytest.raises(C.ConfigError, match=r"algo\.rollout\.num_completions"):
            C.validate(dataclasses.replace(base, algo=algo))


@pytest.mark.parametrize("algo, cfg", [(grpo.GRPO, GRPO_CFG), (grpo.RLOO, RLOO_CFG)], ids=["grpo", "rloo"])
def test_unscorable_completion_gets_advantage_zero_and_the_update_stays_finite(model, tx, algo, cfg):
    """One NaN score (a completion the reward could not score) leaves its group's other advantages equal
    to those of the finite scores alone, gets advantage 0, and the update's loss and parameters stay
    finite."""
    graphdef, pol = model
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    params, graphs = algo.init_params(copy_tree(pol), graphdef, MODEL, cfg, None)
    state, _ = init_sharded_state(params, tx, mesh, init_extra(0.0))  # β = 0: the advantage is the score's
    rng = np.random.default_rng(3)
    S = P + 6
    lm = {"tokens": rng.integers(2, V, (B * G, S)).astype(np.int32),
          "positions": np.tile(np.arange(S, dtype=np.int32), (B * G, 1)),
          "segment_ids": np.ones((B * G, S), np.int32),
          "completion_mask": np.tile((np.arange(S) >= P).astype(np.float32), (B * G, 1))}
    scores = rng.normal(size=B * G).astype(np.float32)
    scores[1] = np.nan  # prompt 0, completion 1
    exp, metrics = jax.jit(functools.partial(algo.experience, graphs=graphs, cfg=cfg))(
        state, pol, lm, np.zeros(B * G, bool), scores)
    adv = np.asarray(exp["advantages"])[:, P]  # every completion token holds the row's advantage
    assert np.all(np.isfinite(np.asarray(exp["advantages"])))
    assert adv[1] == 0.0
    finite = np.delete(scores[:G].astype(np.float64), 1)
    if algo is grpo.GRPO:
        want = (finite - finite.mean()) / (finite.std(ddof=1) + 1e-4)
    else:
        want = finite - (finite.sum() - finite) / (len(finite) - 1)
    np.testing.assert_allclose(np.delete(adv[:G], 1), want, rtol=1e-4, atol=1e-5)
    new_state, upd = jax.jit(functools.partial(algo.update, graphs=graphs, tx=tx, cfg=cfg))(
        state, exp, jax.random.key(0))
    assert np.isfinite(float(upd["policy/loss"]))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(new_state.params))
