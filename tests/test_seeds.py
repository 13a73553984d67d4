"""Seeds in one compiled step: jit(vmap(dpo_step)) over a leading seed axis equals each seed's own run.

Two seeds start from the same policy and see different batches (their data order); three steps of the
vmapped program must give, for each seed, the parameters, optimiser state and metrics of that seed's
separate run of the plain jitted step (to float rounding: XLA may order a batched reduction differently).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrlhf.algos.dpo import dpo_extra, dpo_step
from jaxrlhf.config import DPOConfig
from jaxrlhf.data.batching import build_preference_batch
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.llama import Llama
from jaxrlhf.seeds import seed_slice, stack_seeds, vmap_over_seeds
from jaxrlhf.train_state import create_train_state

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=64)
T, B, STEPS, SEEDS = 16, 4, 3, 2


def batches(seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(STEPS):
        pairs = []
        for _ in range(B):
            p = rng.integers(1, CFG.vocab_size, int(rng.integers(2, 6)))
            c = rng.integers(1, CFG.vocab_size, int(rng.integers(1, T - len(p) + 1)))
            r = rng.integers(1, CFG.vocab_size, int(rng.integers(1, T - len(p) + 1)))
            pairs.append((p, c, r))
        out.append(jax.tree.map(jnp.asarray, build_preference_batch(pairs, T, pad_id=0)))
    return out


def test_vmapped_seeds_equal_their_separate_runs():
    graphdef, params = nnx.split(Llama(CFG, rngs=nnx.Rngs(0)))
    _, ref = nnx.split(Llama(CFG, rngs=nnx.Rngs(1)))
    cfg = DPOConfig(beta=0.1)
    tx = optax.adamw(1e-2)
    step = functools.partial(dpo_step, graphdef=graphdef, tx=tx, cfg=cfg)
    data = [batches(s) for s in range(SEEDS)]

    separate = []
    one = jax.jit(step)
    for s in range(SEEDS):
        state = create_train_state(params, tx, dpo_extra(cfg))
        metrics = []
        for b in data[s]:
            state, m = one(state, b, ref)
            metrics.append(m)
        separate.append((state, metrics))

    both = jax.jit(vmap_over_seeds(step, num_shared=1))
    state_S = stack_seeds([create_train_state(params, tx, dpo_extra(cfg))] * SEEDS)
    metrics_S = []
    for k in range(STEPS):
        state_S, m = both(state_S, stack_seeds([data[s][k] for s in range(SEEDS)]), ref)
        metrics_S.append(m)

    assert not np.allclose(separate[0][1][-1]["loss"], separate[1][1][-1]["loss"])  # the seeds differ
    for s in range(SEEDS):
        mine = seed_slice(state_S, s)
        want, want_metrics = separate[s]
        for x, y in zip(jax.tree.leaves(mine), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-5, atol=1e-6)
        for k in range(STEPS):
            for name, v in want_metrics[k].items():
                np.testing.assert_allclose(float(metrics_S[k][name][s]), float(v), rtol=1e-5, atol=1e-6, err_msg=name)
