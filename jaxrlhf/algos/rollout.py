"""What PPO, GRPO and RLOO share: sampling, log-probs, score shaping, per-token rewards, the minibatch
epochs of the update, the iteration that composes them, evaluation and the training driver.

One RL iteration (:func:`rl_iteration`) is::

    sample  = generate(policy, prompts, key)                 # jit: KV-cache sampler (jaxrlhf.sampling)
    scores  = reward(Completions.from_sample(sample))        # device (jittable) or host (decoded text)
    exp     = experience(state, ref, sample, scores)         # jit: policy/ref log-probs, values, KL, advantages
    state   = update(state, exp, key)                        # jit: scan over epochs x shuffled minibatches

Each algorithm supplies only its ``experience`` and ``update`` (pure functions) and its parameter layout
(an :class:`RLAlgorithm` record); everything else lives here.

Alignment convention (all arrays on the ``S = P + N`` axis of prompt + completion): index ``t`` of a
per-token array refers to token ``t``; ``logps[:, t] = log π(tokens[t] | tokens[<t])`` (from the logits at
``t-1``), values ``V[:, t]`` are the critic's estimate of the state *before* token ``t`` (read from the
hidden state at ``t-1``), and ``completion_mask[:, t] = 1`` on the completion tokens (incl. EOS).
Rollout rows are prompt-major: with G completions per prompt, row ``b*G + g`` is completion ``g`` of
prompt ``b``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrlhf.kl_control import adaptive_kl_update, init_kl_controller
from jaxrlhf.models.heads import last_token_index
from jaxrlhf.ops import entropy_from_logits, kl_k1, masked_mean, masked_var, next_token_logprobs
from jaxrlhf.rewards import Completions, reward_parts
from jaxrlhf.sampling import SampleOutput, SamplingConfig, sample_tokens
from jaxrlhf.sharding import constrain
from jaxrlhf.train_state import TrainState, gradient_step

log = logging.getLogger("jaxrlhf")

LM_KEYS = ("tokens", "positions", "segment_ids", "completion_mask")


# ------------------------------------------------------------------------------------------- prompts

def copy_tree(tree: Any) -> Any:
    """A copy of every array of ``tree`` (new buffers: safe to donate one and keep the other)."""
    return jax.tree.map(jnp.copy, tree)


def repeat_prompts(batch: dict, group_size: int) -> dict:
    """Host prompt batch ``[B, P]`` -> ``[B*G, P]`` with row ``b*G + g`` = prompt ``b`` (numpy)."""
    if group_size == 1:
        return batch
    return {k: np.repeat(np.asarray(v), group_size, axis=0) for k, v in batch.items()}


def sampling_config(rollout, eos_token_ids: tuple[int, ...], pad_token_id: int) -> SamplingConfig:
    """The sampler settings of a :class:`jaxrlhf.config.RolloutConfig`."""
    return SamplingConfig(max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                          top_k=rollout.top_k, top_p=rollout.top_p, eos_token_ids=tuple(eos_token_ids),
                          pad_token_id=pad_token_id)


# ------------------------------------------------------------------------------------------- forward passes

def lm_of(sample: SampleOutput) -> dict:
    """The LM batch (``tokens``/``positions``/``segment_ids``/``completion_mask`` ``[B, S]``) of a sample."""
    return sample.lm_batch()


def token_logps(graphdef: nnx.GraphDef, params: Any, lm: dict, temperature: float):
    """One forward pass: ``(logps_BS, out)`` with ``logps[:, t] = log softmax(logits[:, t-1] / τ)[tokens[t]]``
    (0 where ``completion_mask`` is 0) and the model output (``logits_BTV``, ``hidden_BTD``)."""
    model = nnx.merge(graphdef, params)
    out = model(lm["tokens"], lm["positions"], lm["segment_ids"])
    logps = next_token_logprobs(out.logits_BTV, lm["tokens"], temperature)
    return jnp.where(lm["completion_mask"] > 0, logps, 0.0), out


def token_entropy(logits_BSV: jax.Array, temperature: float) -> jax.Array:
    """Entropy of the distribution each token was drawn from, aligned like ``logps`` (``[B, S]``,
    position 0 is 0)."""
    ent = entropy_from_logits(logits_BSV[:, :-1], temperature)
    return jnp.pad(ent, ((0, 0), (1, 0)))


def shift_values(values_BS: jax.Array) -> jax.Array:
    """Head outputs at every position -> ``V[:, t]`` = output at ``t-1`` (the state before token ``t``)."""
    return jnp.pad(values_BS[:, :-1], ((0, 0), (1, 0)))


# ------------------------------------------------------------------------------------------- scores and rewards

def shape_scores(scores_B: jax.Array, truncated_B: jax.Array, rollout) -> jax.Array:
    """Scores after the rollout's shaping, in this order: subtract ``missing_eos_penalty`` from
    completions without EOS; multiply by ``score_scale``; whiten over the batch (``whiten_scores``);
    clip to ``±score_clip`` (when > 0). float32 ``[B]``.

    A non-finite score (an unscorable completion) stays non-finite and is left out of the whitening
    statistics, so it does not spread to the other rows (the group advantages then give it 0)."""
    s = scores_B.astype(jnp.float32)
    if rollout.missing_eos_penalty:
        s = s - rollout.missing_eos_penalty * truncated_B.astype(jnp.float32)
    if rollout.score_scale != 1.0:
        s = s * rollout.score_scale
    if rollout.whiten_scores:
        finite = jnp.isfinite(s)
        mean = masked_mean(jnp.where(finite, s, 0.0), finite)
        std = jnp.sqrt(masked_mean(jnp.where(finite, jnp.square(s - mean), 0.0), finite))
        s = (s - mean) / (std + 1e-8)
    if rollout.score_clip > 0:
        s = jnp.clip(s, -rollout.score_clip, rollout.score_clip)
    return s


def per_token_rewards(scores_B: jax.Array, kl_BS: jax.Array, mask_BS: jax.Array, kl_coef: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
    """Ziegler et al. 2019 eq. 2, per token: ``r_t = -β·KL_t`` on every completion token, plus the score on
    the last completion token.

    Args:
      scores_B: float32 sequence scores.
      kl_BS: per-token KL estimates (any estimator); ignored where the mask is 0.
      mask_BS: completion mask.
      kl_coef: β (scalar).

    Returns:
      ``(rewards_BS, non_score_BS)``, float32, 0 off the completion. A row without completion tokens gets
      no reward at all.
    """
    valid = mask_BS > 0
    non_score = jnp.where(valid, -kl_coef * kl_BS, 0.0)
    last = last_token_index(valid.astype(jnp.int32))
    at_last = (jnp.arange(mask_BS.shape[1])[None, :] == last[:, None]) & valid
    return non_score + jnp.where(at_last, scores_B[:, None], 0.0), non_score


def sequence_kl(logps_BS: jax.Array, ref_logps_BS: jax.Array, mask_BS: jax.Array) -> jax.Array:
    """``Σ_t (log π - log π_ref)`` over each completion (the k1 estimate of KL(π||π_ref) per sequence), [B]."""
    return jnp.sum(jnp.where(mask_BS > 0, kl_k1(logps_BS, ref_logps_BS), 0.0), axis=-1)


def explained_variance(values_BS, returns_BS, mask_BS) -> jax.Array:
    """``1 - Var(returns - values) / Var(returns)`` over completion tokens (1 = perfect critic)."""
    var_r = masked_var(returns_BS, mask_BS)
    return jnp.where(var_r > 0, 1.0 - masked_var(returns_BS - values_BS, mask_BS) / jnp.maximum(var_r, 1e-12), 0.0)


def rollout_metrics(scores_B, shaped_B, logps_BS, ref_logps_BS, non_score_BS, mask_BS, truncated_B, kl_coef
                    ) -> dict:
    """Per-iteration statistics of a rollout (means over rows unless stated)."""
    seq_kl = sequence_kl(logps_BS, ref_logps_BS, mask_BS)
    non_score = jnp.sum(non_score_BS, axis=-1)
    lengths = jnp.sum(mask_BS, axis=-1)
    return {
        "score/mean": jnp.mean(scores_B), "score/std": jnp.std(scores_B),
        "score/shaped_mean": jnp.mean(shaped_B),
        "kl/ref": jnp.mean(seq_kl),               # nats per completion (k1)
        "kl/ref_per_token": masked_mean(kl_k1(logps_BS, ref_logps_BS), mask_BS),
        "kl/coef": kl_coef,
        "reward/non_score": jnp.mean(non_score),  # Σ_t -β KL_t per completion
        "reward/total": jnp.mean(shaped_B + non_score),
        "completion/length": jnp.mean(lengths),
        "completion/truncated": jnp.mean(truncated_B.astype(jnp.float32)),
        "policy/logp": masked_mean(logps_BS, mask_BS),
    }


def advantage_metrics(adv_BS, mask_BS, prefix="advantage") -> dict:
    valid = mask_BS > 0
    return {f"{prefix}/mean": masked_mean(adv_BS, mask_BS), f"{prefix}/std": jnp.sqrt(masked_var(adv_BS, mask_BS)),
            f"{prefix}/min": jnp.min(jnp.where(valid, adv_BS, jnp.inf)),
            f"{prefix}/max": jnp.max(jnp.where(valid, adv_BS, -jnp.inf))}


def kl_controller_update(extra: dict, seq_kl_B: jax.Array, kl_cfg) -> dict:
    """The KL coefficient after an iteration: unchanged (``fixed``) or Ziegler et al.'s adaptive rule with
    the rollout's mean per-sequence KL and ``n_steps`` = rollout rows."""
    if kl_cfg.controller == "fixed":
        return extra
    new = adaptive_kl_update(extra["kl"], jnp.mean(seq_kl_B), seq_kl_B.shape[0], target=kl_cfg.target,
                             horizon=kl_cfg.horizon)
    return dict(extra, kl=new)


def init_extra(coef: float) -> dict:
    """``TrainState.extra`` of the RL algorithms: ``{"kl": KLControllerState(coef)}``."""
    return {"kl": init_kl_controller(coef)}


# ------------------------------------------------------------------------------------------- update

def aggregate_normaliser(mask_BS: jax.Array, aggregation: str) -> jax.Array:
    """The count a loss of this aggregation averages over: tokens (``token``) or non-empty rows
    (``sequence``); ``loss * count`` summed over micro-batches / ``Σ count`` is then exact."""
    m = (mask_BS > 0).astype(jnp.float32)
    return jnp.sum(m) if aggregation == "token" else jnp.sum(jnp.sum(m, axis=-1) > 0).astype(jnp.float32)


def minibatch_epochs(state: TrainState, data: dict, key: jax.Array, *, loss_fn, tx: optax.GradientTransformation,
                     epochs: int, num_minibatches: int, grad_accum_steps: int = 1) -> tuple[TrainState, dict]:
    """``epochs`` passes over ``data`` (rows on the leading axis), each a fresh permutation cut into
    ``num_minibatches`` minibatches, one :func:`gradient_step` each, all in nested ``lax.scan`` (one jit).

    Returns the new state (``step`` advanced by ``epochs * num_minibatches``) and the metrics averaged over
    every minibatch.
    """
    rows = jax.tree.leaves(data)[0].shape[0]
    mb = rows // num_minibatches

    def epoch(state, k):
        perm = jax.random.permutation(k, rows)

        def cut(x):
            y = jnp.take(x, perm, axis=0).reshape((num_minibatches, mb) + x.shape[1:])
            return constrain(y, (None, "batch") + (None,) * (x.ndim - 1))

        shuffled = jax.tree.map(cut, data)

        def one(state, batch):
            return gradient_step(state, batch, loss_fn=loss_fn, tx=tx, grad_accum_steps=grad_accum_steps)

        return jax.lax.scan(one, state, shuffled)

    state, metrics = jax.lax.scan(epoch, state, jax.random.split(key, epochs))
    return state, jax.tree.map(jnp.mean, metrics)


# ------------------------------------------------------------------------------------------- algorithms

class RLAlgorithm(NamedTuple):
    """What an algorithm plugs into the shared machinery (plain functions, no class hierarchy).

    Attributes:
      init_params: ``(policy_params, graphdef, model_cfg, cfg, key) -> (params, graphs)``: the trainable
        pytree (always with ``params["policy"]``) and a hashable record of graph definitions.
      experience: ``(state, ref_params, lm, truncated_B, scores_B, *, graphs, cfg) -> (exp, metrics)``.
      update: ``(state, exp, key, *, graphs, tx, cfg, grad_accum_steps) -> (state, metrics)``.
      initial_coef: ``cfg -> float``, the KL coefficient stored in ``TrainState.extra`` at the start.
    """

    init_params: Callable
    experience: Callable
    update: Callable
    initial_coef: Callable


@dataclasses.dataclass
class RLFunctions:
    """The jitted pieces of one algorithm on one mesh (built once per run by :func:`make_rl_functions`)."""

    generate: Callable
    experience: Callable
    update: Callable
    logps: Callable
    mesh: Any
    sampling: SamplingConfig
    group_size: int
    graphs: Any
    cfg: Any


def make_rl_functions(algo: RLAlgorithm, graphs: Any, cfg: Any, tx: optax.GradientTransformation, mesh,
                      state_sharding: TrainState, sampling: SamplingConfig, grad_accum_steps: int = 1
                      ) -> RLFunctions:
    """Jit the rollout and update of ``algo`` once, with the state's shardings (state donated by update)."""
    from jaxrlhf import sharding as shd

    def gen(policy_params, prompt_tokens, prompt_mask, key):
        return sample_tokens(graphs.policy, policy_params, prompt_tokens, prompt_mask, key, cfg=sampling)

    def logps(policy_params, ref_params, lm):
        lp, _ = token_logps(graphs.policy, policy_params, lm, sampling.temperature or 1.0)
        rp, _ = token_logps(graphs.policy, ref_params, lm, sampling.temperature or 1.0)
        return lp, rp

    exp_fn = functools.partial(algo.experience, graphs=graphs, cfg=cfg)
    upd_fn = functools.partial(algo.update, graphs=graphs, tx=tx, cfg=cfg, grad_accum_steps=grad_accum_steps)
    gen_j, exp_j, logps_j = jax.jit(gen), jax.jit(exp_fn), jax.jit(logps)
    upd_j = jax.jit(upd_fn, out_shardings=(state_sharding, shd.replicated(mesh)), donate_argnums=(0,))

    def in_mesh(f):
        def call(*args):
            with jax.set_mesh(mesh):
                return f(*args)
        call.jitted = f
        return call

    return RLFunctions(in_mesh(gen_j), in_mesh(exp_j), in_mesh(upd_j), in_mesh(logps_j), mesh, sampling,
                       cfg.rollout.num_completions, graphs, cfg)


def place_rows(x: Any, mesh) -> jax.Array:
    """Host ``[B, ...]`` array -> a global array sharded over (data, fsdp) on its leading axis."""
    from jaxrlhf.sharding import batch_sharding
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)


def score_sample(reward_fn, sample: SampleOutput, tokenizer, mesh) -> tuple[jax.Array, dict, Completions]:
    """Score a rollout: ``(scores_B on the device, {part: mean score}, completions)``."""
    comp = Completions.from_sample(sample, tokenizer)
    total, parts = reward_parts(reward_fn, comp)
    scores = total if isinstance(total, jax.Array) else place_rows(np.asarray(total, np.float32), mesh)
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
    exp, exp_metrics = fns.experience(state, ref_params, lm_of(sample), sample.truncated_B, scores)
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
        lp, rp = fns.logps(policy_params, ref_params, lm_of(sample))
        kls.append(np.asarray(jax.device_get(sequence_kl(lp, rp, sample.completion_mask_BS))))
        scores.append(np.asarray(jax.device_get(s)))
        lengths.append(np.asarray(jax.device_get(sample.lengths_B)))
        if tokenizer is not None:
            p, c = comp.texts()
            samples += [{"prompt": a, "completion": b, "score": float(x)} for a, b, x in zip(p, c, scores[-1])]
    sc, kl = np.concatenate(scores), np.concatenate(kls)
    return {"score": float(sc.mean()), "score_std": float(sc.std()), "kl": float(kl.mean()),
            "length": float(np.concatenate(lengths).mean())}, samples


# ------------------------------------------------------------------------------------------- driver

def train_rl(cfg, resume: bool, algo: RLAlgorithm, algo_name: str) -> dict:
    """The driver shared by PPO, GRPO and RLOO: prompts -> iterations -> checkpoints, metrics, samples.

    Writes ``runs/<name>/`` like the SFT driver; eval (score and KL to the reference on held-out prompts)
    is logged at step 0 and at the end; ``samples.jsonl`` gets a few rollout completions every
    ``train.log_every`` iterations plus the eval samples before/after.
    """
    from jaxrlhf.data.batching import build_prompt_batch
    from jaxrlhf.data.iterator import BatchIterator, train_eval_split
    from jaxrlhf.data.tokenize import pad_id_for
    from jaxrlhf.loop import Hooks, train_loop
    from jaxrlhf.rewards import build_reward
    from jaxrlhf.runner import init_or_restore, load_policy, start_run
    from jaxrlhf.sharding import check_batch_divisible, state_shardings
    from jaxrlhf.train_state import make_optimizer

    run = start_run(cfg)
    a, d = cfg.algo, cfg.data
    G = a.rollout.num_completions
    rows = d.batch_size * G
    check_batch_divisible(rows // (a.num_minibatches * cfg.optim.grad_accum_steps), run.mesh,
                          "data.batch_size*rollout.num_completions/(algo.num_minibatches*optim.grad_accum_steps)")
    policy = load_policy(cfg.model)
    if d.max_prompt_length + a.rollout.max_new_tokens > policy.model_cfg.max_position_embeddings:
        raise ValueError(f"data.max_prompt_length + algo.rollout.max_new_tokens exceeds the model's "
                         f"max_position_embeddings={policy.model_cfg.max_position_embeddings}")
    tok = policy.tokenizer
    prompts, report = load_prompts(cfg, tok)
    log.info("prompts: %d; %s", len(prompts), report.summary())
    train_idx, eval_idx = train_eval_split(len(prompts), d.eval_size, seed=d.seed)
    pad = pad_id_for(tok)
    P = d.max_prompt_length
    collate = functools.partial(build_prompt_batch, prompt_len=P, pad_id=pad)
    batches = BatchIterator([prompts[i] for i in train_idx], d.batch_size, collate, seed=d.seed,
                            process_index=jax.process_index(), process_count=jax.process_count())
    eval_prompts = [prompts[i] for i in eval_idx]

    reward_fn = build_reward(a.reward)
    total_updates = cfg.train.steps * a.epochs * a.num_minibatches
    tx = make_optimizer(cfg.optim, total_updates)
    key = jax.random.key(cfg.train.seed)
    params, graphs = algo.init_params(policy.params, policy.graphdef, policy.model_cfg, a, jax.random.fold_in(key, 1))
    state, sharding, position = init_or_restore(run, params, tx, resume, extra=init_extra(algo.initial_coef(a)))
    if position:
        batches.set_state(position)
    # A copy: the update donates the state's buffers, which may alias the loaded parameters.
    ref_params = jax.device_put(copy_tree(policy.params), state_shardings(policy.params, run.mesh))
    eos = tuple(policy.model_cfg.eos_token_ids) or ((tok.eos_token_id,) if tok.eos_token_id is not None else ())
    fns = make_rl_functions(algo, graphs, a, tx, run.mesh, sharding, sampling_config(a.rollout, eos, pad),
                            cfg.optim.grad_accum_steps)

    eval_batches = []
    eb = max(d.batch_size, 1)
    for i in range(0, len(eval_prompts), eb):
        chunk = eval_prompts[i:i + eb]
        batch = collate(chunk + [chunk[-1]] * (eb - len(chunk)))  # pad the last chunk with a repeat
        eval_batches.append({k: place_rows(v, run.mesh) for k, v in batch.items()})
    eval_key = jax.random.fold_in(key, 2)

    def evaluate(st) -> dict:
        m, s = evaluate_policy(fns, st.params["policy"], ref_params, eval_batches, eval_key, reward_fn=reward_fn,
                               tokenizer=tok)
        evaluate.samples = s
        return m

    counter = {"step": int(jax.device_get(state.step))}

    def step_fn(st, batch):
        step_no = counter["step"] + 1
        st, metrics, info = rl_iteration(fns, st, ref_params, batch, jax.random.fold_in(key, 1000 + step_no),
                                         reward_fn=reward_fn, tokenizer=tok)
        counter["step"] = step_no
        if step_no % max(cfg.train.log_every, 1) == 0 and cfg.train.num_samples:
            p, c = info["completions"].texts()
            sc = np.asarray(jax.device_get(info["scores"]))
            n = min(cfg.train.num_samples, len(c))
            run.dir.write_samples(step_no, [{"tag": "rollout", "prompt": p[i], "completion": c[i],
                                             "score": float(sc[i])} for i in range(n)])
        return st, metrics

    start = counter["step"]
    eval_before, samples_before, samples_after = {}, [], []
    if eval_batches and start == 0:
        eval_before = evaluate(state)
        samples_before = evaluate.samples[:cfg.train.num_samples]
        run.dir.log(0, eval_before, split="eval")
        run.dir.write_samples(0, [dict(s, tag="eval_before") for s in evaluate.samples[:cfg.train.num_samples]])
    t_start = time.perf_counter()
    state = train_loop(state=state, step_fn=step_fn, batches=batches,
                       place=lambda b: {k: place_rows(v, run.mesh) for k, v in repeat_prompts(b, G).items()},
                       total_steps=cfg.train.steps, run=run.dir, checkpointer=run.checkpointer,
                       data_position=batches.get_state, meta={"algo": algo_name}, log_every=cfg.train.log_every,
                       eval_every=0, save_every=cfg.train.save_every, hooks=Hooks(),
                       tokens_per_step=rows * a.rollout.max_new_tokens, stop_after=cfg.train.stop_after)
    wall = time.perf_counter() - t_start
    eval_after = {}
    final_step = int(jax.device_get(state.step))
    if eval_batches and final_step == cfg.train.steps:
        eval_after = evaluate(state)
        samples_after = evaluate.samples[:cfg.train.num_samples]
        run.dir.log(final_step, eval_after, split="eval")
        run.dir.write_samples(final_step, [dict(s, tag="eval_after") for s in evaluate.samples[:cfg.train.num_samples]])
    run.checkpointer.close()
    run.dir.close()
    metrics = [m for m in run.dir.read_metrics() if m["split"] == "train"]
    return {"run_dir": str(run.dir.path), "eval_before": eval_before or None, "eval_after": eval_after or None,
            "score_first": metrics[0]["score/mean"] if metrics else None,
            "score_last": metrics[-1]["score/mean"] if metrics else None,
            "kl_last": metrics[-1]["kl/ref"] if metrics else None, "train_wall_s": wall,
            "samples_before": samples_before, "samples_after": samples_after, "state": state}


def load_prompts(cfg, tokenizer):
    """Rows of ``cfg.data.source`` -> tokenized prompts (``imdb`` sources: the first words of each review,
    2 to 8 words, as in the sentiment-steering setting; otherwise a ``prompt``/``messages`` field)."""
    from jaxrlhf.data.formats import imdb_prompt_examples
    from jaxrlhf.data.sources import load_rows
    from jaxrlhf.data.tokenize import tokenize_prompt_dataset

    d = cfg.data
    rows = load_rows(d.source, split=d.split)
    if d.limit:
        rows = rows.select(range(min(d.limit, len(rows))))
    if d.format == "imdb":
        rows = imdb_prompt_examples(rows, n_words=8, min_words=2, seed=d.seed)
    return tokenize_prompt_dataset(rows, tokenizer, max_prompt_length=d.max_prompt_length,
                                   use_chat_template=d.use_chat_template
                                   and getattr(tokenizer, "chat_template", None) is not None,
                                   on_overflow=d.on_overflow)
