"""GRPO in your own loop, with one change: a custom advantage estimator (leave-one-out *median* baseline).

Shows: G completions per prompt (rows ``b*G + g``), scored by a Python reward, then the library's
``critic_free_experience`` (policy/reference log-probs, shaped scores, and the advantage estimator you
pass it) and ``grpo_update`` (clipped ratio + β·k3 KL loss term, one jit).

The one change: GRPO's ``(r_i - mean_g r) / std_g r`` (``jaxrlhf.ops.grpo_advantages``) becomes
``A_i = r_i - median_{j≠i} r_j`` (:func:`loo_median_advantages`): RLOO's leave-one-out baseline with a
median, so one outlier score does not move the baseline of its whole group. It is passed as
``sequence_advantages`` (one advantage per row, ``[B*G]``; the library spreads it over the row's
completion tokens, whitens it if configured and reports its metrics).

    python examples/grpo_custom_advantage.py --model smollm2-135m-instruct --steps 5
"""
import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.algos.grpo import critic_free_experience, grpo_update, policy_init_params
from jaxrlhf.algos.rollout import copy_tree, init_extra, repeat_prompts, sampling_config
from jaxrlhf.config import GRPOConfig, OptimConfig, RolloutConfig
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

PROMPTS = ["Write a line about the sea.", "Describe a green forest."]
G = 4   # completions per prompt: rollout rows = 2 * 4 = 8, a multiple of the devices


def loo_median_advantages(scores_BG: jax.Array) -> jax.Array:
    """``A[b, i] = r[b, i] - median_{j≠i} r[b, j]`` over the G completions of each prompt: float ``[B, G]``."""
    g = scores_BG.shape[-1]
    others = np.array([[j for j in range(g) if j != i] for i in range(g)])   # [G, G-1], static
    return scores_BG - jnp.median(scores_BG[:, others], axis=-1)


def letter_e(prompts: list[str], completions: list[str]) -> np.ndarray:
    """A toy reward: how many times the letter 'e' appears, / 10. float32 ``[B]``."""
    return np.array([c.lower().count("e") / 10 for c in completions], np.float32)


def sequence_advantages(shaped_B, logps_BS, ref_logps_BS, mask_BS, kl_coef, cfg):
    """The estimator ``critic_free_experience`` calls: ``(adv_B, non_score_BS)``."""
    adv_B = loo_median_advantages(shaped_B.reshape(-1, G)).reshape(-1)        # <- the one change
    return adv_B, jnp.zeros_like(logps_BS)                                      # no KL folded into the reward


def main(model: str = "smollm2-135m-instruct", steps: int = 3, seq_len: int = 64, lr: float = 1e-6) -> list[float]:
    mesh = make_mesh(MeshConfig(data=-1))
    check_batch_divisible(len(PROMPTS) * G, mesh, "len(PROMPTS) * G")
    pre = load_pretrained(model)
    tok, pad = pre.tokenizer, pad_id_for(pre.tokenizer, pre.cfg)
    new_tokens = seq_len // 2
    prompt_ids, _ = tokenize_prompt_dataset([PromptExample(p) for p in PROMPTS], tok,
                                            max_prompt_length=seq_len - new_tokens)
    prompts = build_prompt_batch(prompt_ids, seq_len - new_tokens, pad)
    prompts = place_batch(repeat_prompts(prompts, G), mesh)              # row b*G + g = prompt b

    cfg = GRPOConfig(rollout=RolloutConfig(max_new_tokens=new_tokens, num_completions=G, temperature=1.0))
    graphdef, policy_params = nnx.split(pre.model)
    params, graphs = policy_init_params(policy_params, graphdef, pre.cfg, cfg, None)   # {"policy": ...}
    tx = make_optimizer(OptimConfig(lr=lr, schedule="constant"), total_steps=steps)
    state, sharding = init_sharded_state(params, tx, mesh, init_extra(cfg.beta))      # β of the KL loss term
    ref = copy_tree(state.params["policy"])

    sampling = sampling_config(cfg.rollout, eos_ids_for(tok, pre.cfg), pad)
    generate = jax.jit(functools.partial(sample_tokens, graphs.policy, cfg=sampling))
    experience = jax.jit(functools.partial(critic_free_experience, graphs=graphs, cfg=cfg,
                                           sequence_advantages=sequence_advantages))
    update = jit_step(grpo_update, mesh, sharding, static_kwargs=dict(graphs=graphs, tx=tx, cfg=cfg))
    key, losses = jax.random.key(0), []
    with jax.set_mesh(mesh):
        for i in range(steps):
            k_sample, k_update = jax.random.split(jax.random.fold_in(key, i))
            sample = generate(state.params["policy"], prompts["prompt_tokens"], prompts["prompt_mask"], k_sample)
            scores = place_batch(letter_e(*Completions.from_sample(sample, tok).texts()), mesh)
            exp, exp_metrics = experience(state, ref, sample.lm_batch(), sample.truncated_B, scores)
            state, metrics = update(state, exp, k_update)
            losses.append(float(metrics["loss"]))
            print(f"iteration {i}: loss {losses[-1]:.4f}  score {float(exp_metrics['score/mean']):.3f}  "
                  f"kl {float(exp_metrics['kl/ref']):.4f}")
    return losses


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="registry name, HF folder or .gguf")
    ap.add_argument("--steps", type=int, default=3, help="RL iterations")
    ap.add_argument("--seq-len", type=int, default=64, help="prompt slots + new tokens (half each)")
    ap.add_argument("--lr", type=float, default=1e-6)
    a = ap.parse_args()
    main(a.model, a.steps, a.seq_len, a.lr)
