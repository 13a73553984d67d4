"""The RL driver shared by PPO, GRPO and RLOO: prompts -> iterations (generate, score, experience, update).

One iteration (:func:`rl_iteration`) is one loop step::

    sample  = generate(policy, prompts, key)          # jit: KV-cache sampler (jaxrlhf.sampling)
    scores  = reward(Completions.from_sample(sample)) # device (jittable) or host (decoded text)
    exp     = algo.experience(state, ref, sample, scores)   # jit (algos/ppo.py, algos/grpo.py)
    state   = algo.update(state, exp, key)                  # jit: epochs x shuffled minibatches

The algorithm supplies only its pure ``experience``/``update`` (an :class:`~jaxrlhf.algos.rollout.RLAlgorithm`
record, :data:`ALGORITHMS`); this module jits them once (:func:`make_rl_functions`) and runs them with
:func:`jaxrlhf.drivers.core.drive`: the step's key is ``fold_in(key, 1000 + step)`` (the loop passes the
step number, so a resumed run draws the same keys), rollout samples are written every ``train.log_every``
steps by the loop's ``after_step`` hook, and the held-out evaluation (:func:`evaluate_policy`: score and
KL to the reference of completions of fixed prompts, same key every time) runs at step 0 and at the end.
At the end the policy is exported as a Hugging Face folder ``runs/<name>/hf`` (summary ``export_dir``).

Config fields read here: ``data.{source,split,format,seed,max_prompt_length,use_chat_template,on_overflow,
batch_size}``, ``optim.grad_accum_steps``, ``train.{seed,steps,log_every,num_samples}``,
``algo.rollout.{num_completions,max_new_tokens,temperature,top_k,top_p}``, ``algo.reward``, and the update
fields ``algo.update.epochs``, ``algo.update.num_minibatches`` (:func:`_update_shape`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrlhf import compile_stats
from jaxrlhf import config as C
from jaxrlhf import sharding as shd
from jaxrlhf.algos.grpo import GRPO, RLOO
from jaxrlhf.algos.ppo import PPO
from jaxrlhf.algos.rollout import (RLAlgorithm, copy_tree, init_extra, repeat_prompts, sampling_config,
                                   sequence_kl, token_logps)
from jaxrlhf.data.batching import build_prompt_batch
from jaxrlhf.data.formats import imdb_prompt_examples
from jaxrlhf.data.iterator import BatchIterator
from jaxrlhf.data.tokenize import eos_ids_for, pad_id_for, tokenize_prompt_dataset
from jaxrlhf.drivers import core
from jaxrlhf.models.lora import split_bound
from jaxrlhf.rewards import Completions, build_reward, reward_parts
from jaxrlhf.sampling import SampleOutput, SamplingConfig, sample_tokens
from jaxrlhf.sharding import place_batch
from jaxrlhf.train_state import TrainState, make_optimizer

__all__ = ["ALGORITHMS", "RLFunctions", "make_rl_functions", "rl_iteration", "evaluate_policy", "train"]

log = logging.getLogger("jaxrlhf")

# algo config class -> (algorithm record, name in the checkpoint metadata).
ALGORITHMS: dict[type, tuple[RLAlgorithm, str]] = {C.PPOConfig: (PPO, "ppo"), C.GRPOConfig: (GRPO, "grpo"),
                                                   C.RLOOConfig: (RLOO, "rloo")}


def _update_shape(algo_cfg) -> tuple[int, int]:
    """``(epochs, num_minibatches)`` of the update (the only update fields the driver reads)."""
    return algo_cfg.update.epochs, algo_cfg.update.num_minibatches


@dataclasses.dataclass(frozen=True)
class RLFunctions:
    """The jitted pieces of one algorithm on one mesh (built once per run by :func:`make_rl_functions`)."""

    generate: Any
    experience: Any
    update: Any
    logps: Any
    mesh: Any
    sampling: SamplingConfig
    group_size: int
    graphs: Any
    cfg: Any


def make_rl_functions(algo: RLAlgorithm, graphs: Any, cfg: Any, tx: optax.GradientTransformation, mesh,
                      state_sharding: TrainState, sampling: SamplingConfig, grad_accum_steps: int = 1,
                      trainable: core.Trainable | None = None) -> RLFunctions:
    """Jit the rollout and update of ``algo`` once, with the state's shardings (state donated by update).

    With LoRA (``trainable`` holds a frozen base) every jitted function takes the base as a last argument
    and binds it into ``graphs.policy`` inside the trace (:meth:`~jaxrlhf.drivers.core.Trainable.bind`;
    the update's dropout key follows ``state.step``); the returned callables pass it themselves, so they
    are called the same way with and without LoRA, and the reference (``ref_params`` = the base) is the
    policy with its adapters disabled."""
    extra = () if trainable is None else trainable.step_args

    def bound(base: tuple, step=None):  # graphs, with LoRA's base bound to the policy's graph definition
        return graphs._replace(policy=trainable.bind(graphs.policy, base[0], step)) if base else graphs

    def gen(policy_params, prompt_tokens, prompt_mask, key, *base):
        graphdef, state = split_bound(bound(base).policy, policy_params)
        return sample_tokens(graphdef, state, prompt_tokens, prompt_mask, key, cfg=sampling)

    def logps(policy_params, ref_params, lm, *base):
        policy = bound(base).policy
        lp, _ = token_logps(policy, policy_params, lm, sampling.temperature or 1.0)
        rp, _ = token_logps(policy, ref_params, lm, sampling.temperature or 1.0)
        return lp, rp

    def exp_fn(state, ref_params, lm, truncated_B, scores_B, *base):
        return algo.experience(state, ref_params, lm, truncated_B, scores_B, graphs=bound(base), cfg=cfg)

    def upd_fn(state, exp, key, *base):
        return algo.update(state, exp, key, graphs=bound(base, state.step), tx=tx, cfg=cfg,
                           grad_accum_steps=grad_accum_steps)

    gen_j, exp_j, logps_j = jax.jit(gen), jax.jit(exp_fn), jax.jit(logps)
    upd_j = jax.jit(upd_fn, out_shardings=(state_sharding, shd.replicated(mesh)), donate_argnums=(0,))

    def in_mesh(f):
        def call(*args):
            with jax.set_mesh(mesh):
                return f(*args, *extra)
        call.jitted = f
        return call

    return RLFunctions(in_mesh(gen_j), in_mesh(exp_j), in_mesh(upd_j), in_mesh(logps_j), mesh, sampling,
                       cfg.rollout.num_completions, graphs, cfg)


def score_sample(reward_fn, sample: SampleOutput, tokenizer, mesh) -> tuple[jax.Array, dict, Completions]:
    """Score a rollout: ``(scores_B on the device, {part: mean score}, completions)``."""
    comp = Completions.from_sample(sample, tokenizer)
    total, parts = reward_parts(reward_fn, comp)
    scores = total if isinstance(total, jax.Array) else place_batch(np.asarray(total, np.float32), mesh)
    part_means = {f"reward/{k}": jnp.mean(jnp.asarray(v)) for k, v in parts.items()} if len(parts) > 1 else {}
    return scores, part_means, comp


def rl_iteration(fns: RLFunctions, state: TrainState, ref_params: Any, prompts: dict, key: jax.Array, *,
                 reward_fn, tokenizer=None) -> tuple[TrainState, dict, dict]:
    """One iteration: generate -> score -> experience -> update.

    Args:
      fns: from :func:`make_rl_functions`.
      state: the train state (donated to the update).
      ref_params: the frozen reference policy's params (placed on the mesh).
      prompts: placed ``prompt_tokens``/``prompt_mask`` ``[B*G, P]`` (already repeated per group).
      key: this iteration's key (sampling and minibatch shuffles derive from it).
      reward_fn: a :mod:`jaxrlhf.rewards` reward.
      tokenizer: the policy tokenizer (host rewards decode with it).

    Returns:
      ``(state, metrics, info)`` with ``metrics`` (device scalars, plus host timings ``time/generate_s``
      and ``time/score_s``; the update's time is the rest of the loop's ``step_time_s``) and
      ``info = {"sample", "experience", "completions", "scores"}`` for samples and tests.
    """
    k_sample, k_update = jax.random.split(key)
    # The rollout needs the previous update's parameters anyway; waiting here makes the phase timings
    # honest (otherwise ``time/generate_s`` would include the tail of the previous update).
    jax.block_until_ready(state.params)
    t0 = time.perf_counter()
    sample = fns.generate(state.params["policy"], prompts["prompt_tokens"], prompts["prompt_mask"], k_sample)
    if not getattr(reward_fn, "on_device", False):
        jax.block_until_ready(sample.tokens_BS)
    t1 = time.perf_counter()
    scores, part_metrics, comp = score_sample(reward_fn, sample, tokenizer, fns.mesh)
    t2 = time.perf_counter()
    exp, exp_metrics = fns.experience(state, ref_params, sample.lm_batch(), sample.truncated_B, scores)
    state, upd_metrics = fns.update(state, exp, k_update)
    metrics = {**exp_metrics, **part_metrics, **upd_metrics,
               "time/generate_s": t1 - t0, "time/score_s": t2 - t1}
    return state, metrics, {"sample": sample, "experience": exp, "completions": comp, "scores": scores}


def evaluate_policy(fns: RLFunctions, policy_params, ref_params, prompt_batches: list[dict], key, *, reward_fn,
                    tokenizer=None) -> tuple[dict, list[dict]]:
    """Score and KL to the reference of sampled completions of fixed held-out prompts (same key every
    time, so "before" and "after" see the same sampling noise). Returns ``(metrics, samples)``."""
    scores, kls, lengths, samples = [], [], [], []
    for i, batch in enumerate(prompt_batches):
        sample = fns.generate(policy_params, batch["prompt_tokens"], batch["prompt_mask"], jax.random.fold_in(key, i))
        s, _, comp = score_sample(reward_fn, sample, tokenizer, fns.mesh)
        lp, rp = fns.logps(policy_params, ref_params, sample.lm_batch())
        kls.append(np.asarray(jax.device_get(sequence_kl(lp, rp, sample.completion_mask_BS))))
        scores.append(np.asarray(jax.device_get(s)))
        lengths.append(np.asarray(jax.device_get(sample.lengths_B)))
        if tokenizer is not None:
            p, c = comp.texts()
            samples += [{"prompt": a, "completion": b, "score": float(x)} for a, b, x in zip(p, c, scores[-1])]
    sc, kl = np.concatenate(scores), np.concatenate(kls)
    return {"score": float(sc.mean()), "score_std": float(sc.std()), "kl": float(kl.mean()),
            "length": float(np.concatenate(lengths).mean())}, samples


def tokenize_prompts(rows, data: C.DataConfig, tokenizer):
    """Rows -> ``(prompt tokens, report)`` (``imdb`` sources: the first 2 to 8 words of each review, as
    in the sentiment-steering setting; otherwise a ``prompt``/``messages`` field)."""
    if data.format == "imdb":
        rows = imdb_prompt_examples(rows, n_words=8, min_words=2, seed=data.seed)
    return tokenize_prompt_dataset(rows, tokenizer, max_prompt_length=data.max_prompt_length,
                                   use_chat_template=core.use_chat_template(data, tokenizer),
                                   on_overflow=data.on_overflow)


def load_prompts(data: C.DataConfig, tokenizer):
    """``(train_prompts, eval_prompts)`` by the core's limit/split rule (:func:`core.split_rows`)."""
    train_rows, eval_rows = core.split_rows(data)
    train, train_rep = tokenize_prompts(train_rows, data, tokenizer)
    held_out, eval_rep = tokenize_prompts(eval_rows, data, tokenizer)
    log.info("prompts: %d train / %d eval; train %s; eval %s", len(train), len(held_out), train_rep.summary(),
             eval_rep.summary())
    return list(train), list(held_out)


def train(cfg: C.ExperimentConfig, resume: bool = False) -> dict:
    """Run PPO, GRPO or RLOO (by the type of ``cfg.algo``); writes ``runs/<name>/``; returns the summary
    (+ ``score_first``, ``score_last``, ``kl_last``, ``train_wall_s``, ``export_dir``).

    Raises:
      MeshError: several processes (``jax.distributed``): the rewards and evaluation read every sampled
        completion on the host, which no process holds whole yet; run on one host's devices.
    """
    if jax.process_count() > 1:
        from jaxrlhf.errors import MeshError

        raise MeshError(f"{type(cfg.algo).__name__} runs in one process for now ({jax.process_count()} were "
                        "started): its rewards and evaluation decode every sampled completion on the host, and "
                        "each process holds only its part; run it on one host's devices (mesh.data=-1), or "
                        "train SFT, reward models and the DPO family across hosts")
    a, d = cfg.algo, cfg.data
    algo, algo_name = ALGORITHMS[type(a)]
    G = a.rollout.num_completions
    epochs, num_minibatches = _update_shape(a)
    rows = d.batch_size * G
    run = core.start_run(cfg, rows // (num_minibatches * cfg.optim.grad_accum_steps),
                         "data.batch_size*rollout.num_completions/(algo.update.num_minibatches*optim.grad_accum_steps)")
    policy = core.load_policy(cfg.model, run.mesh)
    core.check_lengths(policy.model_cfg, d.max_prompt_length + a.rollout.max_new_tokens,
                       "data.max_prompt_length + algo.rollout.max_new_tokens")
    tok = policy.tokenizer
    train_prompts, eval_prompts = load_prompts(d, tok)
    pad = pad_id_for(tok)
    collate = functools.partial(build_prompt_batch, prompt_len=d.max_prompt_length, pad_id=pad)
    batches = BatchIterator(train_prompts, d.batch_size, collate, seed=d.seed,
                            process_index=jax.process_index(), process_count=jax.process_count())

    reward_fn = build_reward(a.reward)
    tx = make_optimizer(cfg.optim, cfg.train.steps * epochs * num_minibatches)
    key = jax.random.key(cfg.train.seed)
    tr = core.policy_trainable(run, policy)  # LoRA (model.lora): adapters on the frozen base policy.params
    params, graphs = algo.init_params(tr.params, policy.graphdef, policy.model_cfg, a, jax.random.fold_in(key, 1))
    state, sharding, position = core.init_or_restore(run, params, tx, resume, extra=init_extra(algo.initial_coef(a)))
    if tr.base is None:
        # A copy: the update donates the state's buffers, which may alias the loaded parameters.
        ref_params = jax.device_put(copy_tree(policy.params), shd.state_shardings(policy.params, run.mesh))
    else:
        ref_params = tr.base  # the policy with its adapters disabled: the one copy of the base (never donated)
    fns = make_rl_functions(algo, graphs, a, tx, run.mesh, sharding,
                            sampling_config(a.rollout, eos_ids_for(tok, policy.model_cfg), pad),
                            cfg.optim.grad_accum_steps, trainable=tr)
    compile_stats.report_rl(run, fns, state, ref_params, batches, G, tr.step_args)

    eb = max(d.batch_size, 1)
    eval_batches = []
    for i in range(0, len(eval_prompts), eb):
        chunk = eval_prompts[i:i + eb]
        eval_batches.append(place_batch(collate(chunk + [chunk[-1]] * (eb - len(chunk))), run.mesh))  # pad: repeat
    eval_key = jax.random.fold_in(key, 2)

    def evaluate(st) -> core.Evaluation:
        return core.Evaluation(*evaluate_policy(fns, st.params["policy"], ref_params, eval_batches, eval_key,
                                                reward_fn=reward_fn, tokenizer=tok))

    def step_fn(st, prompts, *, step: int):
        return rl_iteration(fns, st, ref_params, prompts, jax.random.fold_in(key, 1000 + step),
                            reward_fn=reward_fn, tokenizer=tok)

    def rollout_samples(step: int, st, metrics, info) -> None:
        if step % max(cfg.train.log_every, 1) or not cfg.train.num_samples:
            return
        p, c = info["completions"].texts()
        sc = np.asarray(jax.device_get(info["scores"]))
        run.dir.write_samples(step, [{"tag": "rollout", "prompt": p[i], "completion": c[i], "score": float(sc[i])}
                                     for i in range(min(cfg.train.num_samples, len(c)))])

    def export(st) -> dict:
        # The finished policy (not PPO's value head) as a Hugging Face folder (transformers / load_pretrained).
        from flax import nnx

        from jaxrlhf.models.hf import save_hf_folder

        path = run.dir.path / "hf"
        save_hf_folder(nnx.merge(policy.graphdef, jax.device_get(tr.merged(st.params["policy"]))), policy.model_cfg,
                       path, tokenizer=tok)
        log.info("exported the policy to %s (AutoModelForCausalLM / load_pretrained)", path)
        return {"export_dir": str(path)}

    t_start = time.perf_counter()
    summary = core.drive(run, state, position, step_fn=step_fn, batches=batches,
                         place=lambda b: place_batch(repeat_prompts(b, G), run.mesh), meta={"algo": algo_name},
                         evaluate=evaluate if eval_batches else None, after_step=rollout_samples, pass_step=True,
                         export=export,
                         tokens_per_step=rows * a.rollout.max_new_tokens,
                         policy_eval=core.policy_eval_for(cfg, policy, lambda st: tr.model_params(st.params["policy"])))
    train_rows = [m for m in run.dir.read_metrics()
                  if m["split"] == "train"]
    summary.update(score_first=train_rows[0]["score/mean"] if train_rows else None,
                   score_last=train_rows[-1]["score/mean"] if train_rows else None,
                   kl_last=train_rows[-1]["kl/ref"] if train_rows else None,
                   train_wall_s=time.perf_counter() - t_start)
    return summary
