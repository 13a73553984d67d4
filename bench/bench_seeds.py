"""Seeds sequentially vs in one compiled step: S DPO seeds as S jitted steps, or one ``jit(vmap(step))``.

The study's DPO arms at their quick shapes (SmolLM2-135M-Instruct, f32, 8 pairs x 32 tokens per seed, a
frozen reference in the step). Per repeat, the sequential side runs one step of each of S seeds (S calls
of the plain jitted step, each seed its own state), the vmapped side one call of the vmapped step on the
seed-stacked state; the two sides alternate within each repeat. Arms/hour is 3600 / (time of one step of
S seeds / S * steps per arm), i.e. the throughput of optimizer steps expressed per seed.

    python bench/bench_seeds.py [--seeds 2] [--repeats 3] [--batch 8] [--length 32]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import numpy as np

from common import machine, print_table, write_results


def make_batch(rng, B, T, V):
    tokens = rng.integers(1, V, (B, 2, T)).astype(np.int32)
    mask = np.zeros((B, 2, T), np.float32)
    mask[:, :, T // 2:] = 1.0  # the second half of each row is the completion
    return {"tokens": tokens, "completion_mask": mask, "segment_ids": np.ones((B, 2, T), np.int32),
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, 2, T)).copy()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--steps-per-arm", type=int, default=8, help="steps of one arm, for arms/hour")
    args = p.parse_args()

    import jax
    from flax import nnx

    from jaxrlhf.algos.dpo import dpo_extra, dpo_step
    from jaxrlhf.config import DPOConfig, OptimConfig
    from jaxrlhf.models.hub import load_pretrained
    from jaxrlhf.seeds import stack_seeds, vmap_over_seeds
    from jaxrlhf.train_state import create_train_state, make_optimizer

    S, B, T = args.seeds, args.batch, args.length
    pre = load_pretrained("smollm2-135m-instruct")
    graphdef, params = nnx.split(pre.model)
    ref = jax.tree.map(lambda x: x.copy(), params)
    cfg = DPOConfig(beta=0.1)
    tx = make_optimizer(OptimConfig(lr=1e-5, schedule="constant"), 1000)
    step = functools.partial(dpo_step, graphdef=graphdef, tx=tx, cfg=cfg)
    rng = np.random.default_rng(0)
    batches = [jax.tree.map(jax.numpy.asarray, make_batch(rng, B, T, pre.cfg.vocab_size)) for _ in range(S)]

    one = jax.jit(step, donate_argnums=(0,))
    many = jax.jit(vmap_over_seeds(step, num_shared=1), donate_argnums=(0,))
    states = [create_train_state(jax.tree.map(lambda x: x.copy(), params), tx, dpo_extra(cfg)) for _ in range(S)]
    state_S = stack_seeds([create_train_state(params, tx, dpo_extra(cfg)) for _ in range(S)])
    batch_S = stack_seeds(batches)

    def sequential():
        for s in range(S):
            states[s], m = one(states[s], batches[s], ref)
        jax.block_until_ready(states[-1].params)

    def vmapped():
        nonlocal state_S
        state_S, m = many(state_S, batch_S, ref)
        jax.block_until_ready(state_S.params)

    t0 = time.perf_counter()
    sequential()
    compile_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    vmapped()
    compile_vmap = time.perf_counter() - t0
    times = {"sequential": [], "vmapped": []}
    for _ in range(args.repeats):  # alternate the sides in each repeat
        for name, fn in (("sequential", sequential), ("vmapped", vmapped)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"side": name, "seeds": S, "median_s": med, "min_s": min(ts), "max_s": max(ts),
                     "s_per_seed_step": med / S, "arms_per_hour": 3600.0 / (med / S * args.steps_per_arm),
                     "first_call_s": compile_seq if name == "sequential" else compile_vmap})
    rows.append({"side": "speed-up of vmapped (sequential / vmapped time)",
                 "median_s": rows[0]["median_s"] / rows[1]["median_s"]})
    print_table(rows, ["side", "seeds", "median_s", "min_s", "max_s", "s_per_seed_step", "arms_per_hour",
                       "first_call_s"])
    write_results("seeds", {"benchmark": "dpo_step, S seeds sequential vs jit(vmap)", "machine": machine(),
                            "model": "SmolLM2-135M-Instruct (f32)", "shape": {"seeds": S, "pairs": B, "tokens": T},
                            "steps_per_arm": args.steps_per_arm, "repeats": args.repeats, "times_s": times,
                            "rows": rows})


if __name__ == "__main__":
    main()
