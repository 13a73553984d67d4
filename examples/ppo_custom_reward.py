"""PPO in your own loop, with one change: the reward is a plain Python function of the decoded text.

Shows: the minimal RL iteration that ``jaxrlhf.drivers.rl`` runs, from public pieces --
``sample_tokens`` (KV-cache sampler) -> your reward -> ``ppo_experience`` (log-probs, values, KL-penalised
per-token rewards, GAE) -> ``ppo_update`` (epochs x minibatches of the clipped objective, one jit).

The one change: :func:`politeness` scores each completion on the host (any Python works: a regex, a unit
test, an API call); its scores go back to the device with ``place_batch`` and the rest is unchanged.

    python examples/ppo_custom_reward.py --model smollm2-135m-instruct --steps 5
"""
import argparse
import functools

import jax
import numpy as np
from flax import nnx

from jaxrlhf.algos.ppo import copy_tree, ppo_experience, ppo_init_params, ppo_update
from jaxrlhf.algos.rollout import init_extra, sampling_config
from jaxrlhf.config import OptimConfig, PPOConfig, RolloutConfig
from jaxrlhf.data import (
    PromptExample,
    build_prompt_batch,
    eos_ids_for,
    pad_id_for,
    tokenize_prompt_dataset,
)
from jaxrlhf.models.hub import load_pretrained
from jaxrlhf.rewards import Completions
from jaxrlhf.sampling import sample_tokens
from jaxrlhf.sharding import MeshConfig, check_batch_divisible, make_mesh, place_batch
from jaxrlhf.train_state import init_sharded_state, jit_step, make_optimizer

PROMPTS = ["Ask your neighbour to turn the music down.", "Tell a colleague the meeting moved.",
           "Request a refund for a broken kettle.", "Remind a friend to return your book.",
           "Ask for directions to the station.", "Decline an invitation to a party.",
           "Ask a waiter for the bill.", "Tell your team the build is broken."]   # 8: a multiple of the devices


def politeness(prompts: list[str], completions: list[str]) -> np.ndarray:
    """+1 per polite word, minus 1 per 100 characters (brevity): float32 ``[B]``."""
    polite = ("please", "thank", "thanks", "sorry", "kindly")
    return np.array([sum(c.lower().count(w) for w in polite) - len(c) / 100 for c in completions], np.float32)


def main(model: str = "smollm2-135m-instruct", steps: int = 3, seq_len: int = 64, lr: float = 1e-6) -> list[float]:
    mesh = make_mesh(MeshConfig(data=-1))
    check_batch_divisible(len(PROMPTS), mesh, "len(PROMPTS)")
    pre = load_pretrained(model)
    tok, pad = pre.tokenizer, pad_id_for(pre.tokenizer, pre.cfg)
    new_tokens = seq_len // 2                                        # prompt slots + completion = seq_len
    prompt_ids, _ = tokenize_prompt_dataset([PromptExample(p) for p in PROMPTS], tok,
                                            max_prompt_length=seq_len - new_tokens)
    prompts = place_batch(build_prompt_batch(prompt_ids, seq_len - new_tokens, pad), mesh)

    cfg = PPOConfig(rollout=RolloutConfig(max_new_tokens=new_tokens, temperature=1.0))
    graphdef, policy_params = nnx.split(pre.model)
    key = jax.random.key(0)
    params, graphs = ppo_init_params(policy_params, graphdef, pre.cfg, cfg, jax.random.fold_in(key, 1))
    tx = make_optimizer(OptimConfig(lr=lr, schedule="constant"), total_steps=steps * cfg.update.epochs)
    state, sharding = init_sharded_state(params, tx, mesh, init_extra(cfg.kl.coef))   # extra: KL coefficient
    ref = copy_tree(state.params["policy"])                          # frozen reference (own buffers)

    sampling = sampling_config(cfg.rollout, eos_ids_for(tok, pre.cfg), pad)
    generate = jax.jit(functools.partial(sample_tokens, graphs.policy, cfg=sampling))
    experience = jax.jit(functools.partial(ppo_experience, graphs=graphs, cfg=cfg))
    update = jit_step(ppo_update, mesh, sharding, static_kwargs=dict(graphs=graphs, tx=tx, cfg=cfg))
    losses = []
    with jax.set_mesh(mesh):
        for i in range(steps):
            k_sample, k_update = jax.random.split(jax.random.fold_in(key, 1000 + i))
            sample = generate(state.params["policy"], prompts["prompt_tokens"], prompts["prompt_mask"], k_sample)
            texts_p, texts_c = Completions.from_sample(sample, tok).texts()
            scores = place_batch(politeness(texts_p, texts_c), mesh)          # <- the one change
            exp, exp_metrics = experience(state, ref, sample.lm_batch(), sample.truncated_B, scores)
            state, metrics = update(state, exp, k_update)
            losses.append(float(metrics["loss"]))
            print(f"iteration {i}: loss {losses[-1]:.4f}  score {float(exp_metrics['score/mean']):.3f}  "
                  f"kl {float(exp_metrics['kl/ref']):.4f}  e.g. {texts_c[0][:40]!r}")
    return losses


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="registry name, HF folder or .gguf")
    ap.add_argument("--steps", type=int, default=3, help="RL iterations")
    ap.add_argument("--seq-len", type=int, default=64, help="prompt slots + new tokens (half each)")
    ap.add_argument("--lr", type=float, default=1e-6)
    a = ap.parse_args()
    main(a.model, a.steps, a.seq_len, a.lr)
