"""Reward models: pairwise Bradley–Terry, K-way rankings and classifiers, as one pure step.

``reward_step(state, batch, *, graphdef, tx, cfg, grad_accum_steps) -> (state, metrics)`` is pure; jit it
once with :func:`jaxrlhf.train_state.jit_step`. ``state.params`` holds the trainable parameters of a
:class:`~jaxrlhf.models.reward_model.RewardModel` and ``state.extra`` its (non-trained) normalisation
statistics. The objective (``cfg.objective``) picks one of :data:`OBJECTIVES`:

* ``pairwise`` -- batch ``[B, 2, T]`` (0 = chosen, 1 = rejected): ONE backbone pass over the local
  reshape ``[B*2, T]`` (an example's two rows stay on its device), rewards ``[B, 2]``, then
  :func:`jaxrlhf.losses.bradley_terry_loss` (Ouyang et al. 2022 eq. 1; optional margin, Llama 2 eq. 2;
  optional centring). Loss = mean over pairs.
* ``ranking`` -- batch ``[B, N, T]`` + ``ranks [B, N]``: one pass gives rewards ``[B, N]``, then
  :func:`jaxrlhf.losses.ranking_loss` over all ordered pairs of each prompt (InstructGPT's K-wise loss);
  loss = mean over prompts that have a pair.
* ``classification`` -- batch ``[B, T]`` + ``labels [B]``: logits ``[B, C]`` and
  :func:`jaxrlhf.losses.classification_loss`.

Each objective returns ``(loss_sum, (normaliser, metrics))`` with the loss summed over its units (pairs,
prompts, examples), so gradient accumulation is exact. Metrics: ``loss``, ``rewards/accuracy``
(``accuracy`` for classifiers), ``rewards/margin``, ``rewards/mean``, ``rewards/std``, ``grad_norm``.

After training the driver runs a normalisation pass (:func:`normalization_stats`) over training
examples and stores ``(mean, std)`` in ``state.extra`` and in the exported model folder, so
``RewardModel.score`` returns rewards with mean 0 and std 1 on that reference set.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrlhf.config import RewardConfig
from jaxrlhf.losses import bradley_terry_loss, classification_loss, ranking_loss
from jaxrlhf.models.reward_model import RewardModel
from jaxrlhf.train_state import TrainState, gradient_step


def _masked_mean_std(x: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    w = valid.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    mean = jnp.sum(jnp.where(valid, x, 0.0)) / n
    var = jnp.sum(jnp.where(valid, jnp.square(x - mean), 0.0)) / n
    return mean, jnp.sqrt(var)


def _forward(model: RewardModel, batch: dict) -> jax.Array:
    """Head outputs for a batch of any leading shape (``[B]``, ``[B, 2]``, ``[B, N]``; ``+[C]`` for classifiers)."""
    return model(batch["tokens"], batch["positions"], batch["segment_ids"])


def pairwise_objective(model: RewardModel, batch: dict, cfg: RewardConfig):
    """Bradley–Terry on preference pairs ``[B, 2, T]``; ``(loss_sum, (num_pairs, metrics))``.

    The margin is ``cfg.margin`` plus the batch's per-example ``margin`` float ``[B]`` when the data
    carries one.
    """
    rewards_B2 = _forward(model, batch)
    margin_B = None
    if cfg.margin or "margin" in batch:
        margin_B = jnp.full(rewards_B2.shape[:1], cfg.margin, jnp.float32)
        if "margin" in batch:
            margin_B = margin_B + batch["margin"].astype(jnp.float32)
    loss, metrics = bradley_terry_loss(rewards_B2[:, 0], rewards_B2[:, 1], margin_B,
                                       cfg.center_rewards_coef or None)
    n = jnp.asarray(rewards_B2.shape[0], jnp.float32)
    return loss * n, (n, metrics)


def ranking_objective(model: RewardModel, batch: dict, cfg: RewardConfig):
    """K-way ranking loss on ``[B, N, T]`` + ``ranks [B, N]``; ``(loss_sum, (prompts_with_pairs, metrics))``."""
    rewards_BN = _forward(model, batch)
    ranks = batch["ranks"]
    loss, metrics = ranking_loss(rewards_BN, ranks)
    present = ranks >= 0
    has_pair = jnp.sum((ranks[:, :, None] < ranks[:, None, :]) & present[:, :, None] & present[:, None, :],
                       axis=(1, 2)) > 0
    n = jnp.sum(has_pair.astype(jnp.float32))
    mean, std = _masked_mean_std(jax.lax.stop_gradient(rewards_BN), present)
    metrics = dict(metrics, **{"rewards/mean": mean, "rewards/std": std})
    return loss * n, (n, metrics)


def classification_objective(model: RewardModel, batch: dict, cfg: RewardConfig):
    """Cross-entropy on ``[B, T]`` + ``labels [B]``; ``(loss_sum, (B, metrics))``. The reward statistics are
    those of the classifier's reward (log-odds of ``score_label``)."""
    logits_BC = _forward(model, batch)
    loss, metrics = classification_loss(logits_BC, batch["labels"], cfg.label_smoothing)
    r = jax.lax.stop_gradient(model.reward_from_outputs(logits_BC))
    n = jnp.asarray(logits_BC.shape[0], jnp.float32)
    metrics = dict(metrics, **{"rewards/mean": jnp.mean(r), "rewards/std": jnp.std(r)})
    return loss * n, (n, metrics)


# cfg.objective -> objective; each (model, batch, cfg) -> (loss_sum, (normaliser, metrics)).
OBJECTIVES: dict[str, Callable] = {
    "pairwise": pairwise_objective,
    "ranking": ranking_objective,
    "classification": classification_objective,
}


def reward_loss(params, batch: dict, *, graphdef: nnx.GraphDef, stats: Any, cfg: RewardConfig):
    """``(loss_sum, (normaliser, metrics))`` for :func:`gradient_step` (the objective of ``cfg``)."""
    model = nnx.merge(graphdef, params, stats)
    return OBJECTIVES[cfg.objective](model, batch, cfg)


def reward_step(state: TrainState, batch: dict, *, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                cfg: RewardConfig, grad_accum_steps: int = 1) -> tuple[TrainState, dict]:
    """One reward-model optimizer step (pure); ``state.extra`` holds the normalisation stats (not trained).

    Training batches must not contain all-padding rows (the driver's iterator drops the last short batch).
    """

    def loss_fn(params, mb):
        return reward_loss(params, mb, graphdef=graphdef, stats=state.extra, cfg=cfg)

    return gradient_step(state, batch, loss_fn=loss_fn, tx=tx, grad_accum_steps=grad_accum_steps)


def reward_outputs(params, stats, batch: dict, *, graphdef: nnx.GraphDef) -> dict:
    """Eval forward pass: ``{"rewards": raw rewards [...]}`` plus ``"logits" [B, C]`` for classifiers."""
    model = nnx.merge(graphdef, params, stats)
    out = _forward(model, batch)
    result = {"rewards": model.reward_from_outputs(out)}
    if model.num_outputs > 1:
        result["logits"] = out
    return result


def eval_metrics(objective: str, outputs: dict, batch: dict) -> dict:
    """Host-side (numpy) held-out metrics over the real rows of concatenated eval batches.

    pairwise: ``accuracy`` (fraction ``r_c > r_r``), ``margin`` (mean ``r_c - r_r``), ``loss`` (BT),
    ``reward_mean``/``reward_std``, ``pairs``. ranking: pairwise ``accuracy``/``margin`` over every ordered
    pair of every prompt (pair-weighted), ``prompts``. classification: ``accuracy``, ``loss``, ``examples``.
    """
    r = np.asarray(outputs["rewards"], np.float64)
    if objective == "pairwise":
        valid = np.asarray(batch["segment_ids"])[:, 0].any(-1) & np.asarray(batch["segment_ids"])[:, 1].any(-1)
        d = r[valid, 0] - r[valid, 1]
        both = r[valid].reshape(-1)
        return {"accuracy": float(np.mean(d > 0)), "margin": float(np.mean(d)),
                "loss": float(np.mean(np.logaddexp(0.0, -d))), "reward_mean": float(both.mean()),
                "reward_std": float(both.std()), "pairs": int(valid.sum())}
    if objective == "ranking":
        ranks = np.asarray(batch["ranks"])
        pres = ranks >= 0
        pair = (ranks[:, :, None] < ranks[:, None, :]) & pres[:, :, None] & pres[:, None, :]
        d = (r[:, :, None] - r[:, None, :])[pair]
        return {"accuracy": float(np.mean(d > 0)) if d.size else float("nan"),
                "margin": float(np.mean(d)) if d.size else float("nan"),
                "reward_mean": float(r[pres].mean()), "reward_std": float(r[pres].std()),
                "prompts": int(pair.any(axis=(1, 2)).sum())}
    labels = np.asarray(batch["labels"])
    valid = labels >= 0
    logits = np.asarray(outputs["logits"], np.float64)[valid]
    y = labels[valid]
    logz = np.logaddexp.reduce(logits, axis=-1)
    return {"accuracy": float(np.mean(np.argmax(logits, -1) == y)),
            "loss": float(np.mean(logz - logits[np.arange(len(y)), y])),
            "reward_mean": float(r[valid].mean()), "reward_std": float(r[valid].std()), "examples": int(valid.sum())}


def real_rewards(objective: str, outputs: dict, batch: dict) -> np.ndarray:
    """Rewards of the real (non-padding) sequences of a batch, flattened (for the normalisation pass)."""
    r = np.asarray(outputs["rewards"], np.float64)
    if objective == "ranking":
        return r[np.asarray(batch["ranks"]) >= 0]
    if objective == "classification":
        return r[np.asarray(batch["labels"]) >= 0]
    return r[np.asarray(batch["segment_ids"]).any(-1)]


def normalization_stats(rewards: np.ndarray) -> tuple[float, float]:
    """``(mean, std)`` of reference-set rewards (float64 on the host); std floored at 1e-6.

    Raises:
      ValueError: no rewards, or a non-finite one.
    """
    rewards = np.asarray(rewards, np.float64).reshape(-1)
    if rewards.size == 0 or not np.all(np.isfinite(rewards)):
        raise ValueError(f"normalisation pass got {rewards.size} rewards, some non-finite; cannot normalise")
    return float(rewards.mean()), float(max(rewards.std(), 1e-6))


def map_batches(fn: Callable[[dict], dict], examples: Sequence[Any], collate: Callable, batch_size: int,
                place: Callable[[dict], dict]) -> tuple[dict, dict]:
    """Run ``fn(place(batch))`` over ``examples`` in fixed-size batches (the last padded with all-padding
    rows); returns ``(outputs, batches)`` concatenated on the host, padding rows included."""
    outs, batches = [], []
    for i in range(0, len(examples), batch_size):
        b = collate(list(examples[i:i + batch_size]), batch_size=batch_size)
        outs.append(jax.device_get(fn(place(b))))
        batches.append(b)
    if not outs:
        return {}, {}
    cat = lambda *xs: np.concatenate([np.asarray(x) for x in xs])  # noqa: E731
    return jax.tree.map(cat, *outs), jax.tree.map(cat, *batches)


# ------------------------------------------------------------------------------------------- driver

def _subset(rows, k: int, seed: int):
    """At most ``k`` rows drawn by a seeded permutation (kept in file order); all rows when ``k == 0``."""
    if not k or k >= len(rows):
        return rows
    idx = np.sort(np.random.default_rng(seed).permutation(len(rows))[:k])
    return rows.select(idx.tolist())


def split_rows(cfg, eval_source: str = "", eval_split: str = "test"):
    """``(train_rows, eval_rows)``: a FIXED held-out set of ``data.eval_size`` rows of ``data.source``
    (:func:`~jaxrlhf.data.iterator.train_eval_split` on the row count, before tokenisation, so truncation
    never changes it) -- or, with ``eval_source``, that source (capped at ``data.eval_size`` rows when > 0).
    ``data.limit`` caps the *training* rows (a seeded subset)."""
    from jaxrlhf.data.iterator import train_eval_split
    from jaxrlhf.data.sources import load_rows

    d = cfg.data
    rows = load_rows(d.source, split=d.split)
    if eval_source:
        train_rows = rows
        eval_rows = _subset(load_rows(eval_source, split=eval_split), d.eval_size, d.seed + 1)
    else:
        train_idx, eval_idx = train_eval_split(len(rows), d.eval_size, seed=d.seed)
        train_rows, eval_rows = rows.select(train_idx.tolist()), rows.select(eval_idx.tolist())
    return _subset(train_rows, d.limit, d.seed), eval_rows


def tokenize_pairs(rows, cfg, tokenizer):
    """Preference rows -> ``PreferenceTokens`` (HH dialogues become chat messages when a template is used)."""
    from jaxrlhf.data.tokenize import tokenize_preference_dataset

    d = cfg.data
    use_chat = d.use_chat_template and getattr(tokenizer, "chat_template", None) is not None
    return tokenize_preference_dataset(rows, tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                                       use_chat_template=use_chat, on_overflow=d.on_overflow, format=d.format,
                                       hh_prompt_as_messages=use_chat)


def load_reward_data(cfg, tokenizer, is_decoder: bool):
    """``(train_examples, eval_examples, collate, reports)`` for ``cfg.algo.objective``."""
    from jaxrlhf.data import batching
    from jaxrlhf.data.tokenize import pad_id_for, tokenize_classification_dataset, tokenize_ranked_dataset

    d, a = cfg.data, cfg.algo
    train_rows, eval_rows = split_rows(cfg, a.eval_source, a.eval_split)
    use_chat = d.use_chat_template and getattr(tokenizer, "chat_template", None) is not None
    pad_id = pad_id_for(tokenizer) if (tokenizer.pad_token_id is not None or tokenizer.eos_token_id is not None) else 0
    common = dict(seq_len=d.max_length, pad_id=pad_id, padding_side=d.padding_side)
    if a.objective == "pairwise":
        tok = lambda rows: tokenize_pairs(rows, cfg, tokenizer)  # noqa: E731
        collate = functools.partial(batching.build_preference_batch, **common)
    elif a.objective == "ranking":
        tok = lambda rows: tokenize_ranked_dataset(  # noqa: E731
            rows, tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
            use_chat_template=use_chat, on_overflow=d.on_overflow)
        collate = None
    else:
        add_eos = is_decoder and tokenizer.eos_token_id is not None
        tok = lambda rows: tokenize_classification_dataset(  # noqa: E731
            rows, tokenizer, max_length=d.max_length, add_eos=add_eos, on_overflow=d.on_overflow)
        collate = functools.partial(batching.build_classification_batch, **common)
    train_ex, train_report = tok(train_rows)
    eval_ex, eval_report = tok(eval_rows)
    if a.objective == "ranking":
        n = max(len(ex.completion_ids) for ex in list(train_ex) + list(eval_ex))
        collate = functools.partial(batching.build_ranked_batch, num_completions=n, **common)
    return train_ex, eval_ex, collate, (train_report, eval_report)


def train(cfg, resume: bool = False) -> dict:
    """Train a reward model / classifier on ``cfg.data``; writes the run directory and (``algo.export``)
    the model folder ``runs/<name>/reward_model``; returns a summary (see ``jaxrlhf.algos.sft.train``)."""
    import json
    import logging

    from jaxrlhf.data.iterator import BatchIterator
    from jaxrlhf.loop import Hooks, train_loop
    from jaxrlhf.models.reward_model import (RewardModel, save_reward_model, split_reward_model, stats_of,
                                             with_stats)
    from jaxrlhf.runner import check_lengths, init_or_restore, load_policy, run_summary, start_run
    from jaxrlhf.train_state import jit_step, make_optimizer, place_batch

    log = logging.getLogger("jaxrlhf")
    a = cfg.algo
    run = start_run(cfg)
    backbone = load_policy(cfg.model)
    check_lengths(cfg, backbone.model_cfg)
    num_outputs = a.num_labels if a.objective == "classification" else 1
    rm = RewardModel(nnx.merge(backbone.graphdef, backbone.params), num_outputs=num_outputs, pooling=a.pooling,
                     score_label=a.score_label, rngs=nnx.Rngs(cfg.train.seed))
    graphdef, params, stats = split_reward_model(rm)
    del rm
    train_ex, eval_ex, collate, (train_rep, eval_rep) = load_reward_data(cfg, backbone.tokenizer,
                                                                        backbone.model_cfg.is_decoder)
    log.info("data: %d train / %d eval examples; train %s; eval %s", len(train_ex), len(eval_ex),
             train_rep.summary(), eval_rep.summary())
    batches = BatchIterator(train_ex, cfg.data.batch_size, collate, seed=cfg.data.seed,
                            process_index=jax.process_index(), process_count=jax.process_count())
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    state, sharding, position = init_or_restore(run, params, tx, resume, extra=stats)
    if position:
        batches.set_state(position)
    step = jit_step(reward_step, run.mesh, sharding, static_kwargs=dict(
        graphdef=graphdef, tx=tx, cfg=a, grad_accum_steps=cfg.optim.grad_accum_steps))
    micro = cfg.data.batch_size // cfg.optim.grad_accum_steps
    place = lambda b: place_batch(b, run.mesh)  # noqa: E731
    out_fn = jax.jit(functools.partial(reward_outputs, graphdef=graphdef))

    def evaluate(st) -> dict:
        outs, cat = map_batches(lambda b: out_fn(st.params, st.extra, b), eval_ex, collate, micro, place)
        return eval_metrics(a.objective, outs, cat)

    start = int(jax.device_get(state.step))
    eval_before = evaluate(state) if (eval_ex and start == 0) else {}
    if eval_before:
        run.dir.log(0, eval_before, split="eval")
    seqs = {"pairwise": 2, "ranking": None, "classification": 1}[a.objective]
    state = train_loop(state=state, step_fn=step, batches=batches, place=place, total_steps=cfg.train.steps,
                       run=run.dir, checkpointer=run.checkpointer, data_position=batches.get_state,
                       meta={"algo": "reward", "objective": a.objective}, log_every=cfg.train.log_every,
                       eval_every=cfg.train.eval_every or (cfg.train.steps if eval_ex else 0),
                       save_every=cfg.train.save_every, hooks=Hooks(evaluate=evaluate if eval_ex else None),
                       tokens_per_step=cfg.data.batch_size * cfg.data.max_length * seqs if seqs else None)
    run.checkpointer.close()

    # Normalisation pass: reward mean 0 / std 1 over `normalize_examples` training examples drawn by a seeded
    # permutation (files are often sorted by label, e.g. IMDB: positives first).
    norm = {}
    if a.normalize_examples:
        pick = np.random.default_rng(cfg.data.seed).permutation(len(train_ex))[:a.normalize_examples]
        ref = [train_ex[int(i)] for i in np.sort(pick)]
        outs, cat = map_batches(lambda b: out_fn(state.params, state.extra, b), ref, collate, micro, place)
        mean, std = normalization_stats(real_rewards(a.objective, outs, cat))
        state = state.replace(extra=jax.device_put(with_stats(jax.device_get(state.extra), mean, std),
                                                   sharding.extra))
        norm = {"reward_mean": mean, "reward_std": std, "examples": len(ref)}
        (run.dir.path / "reward_normalization.json").write_text(json.dumps(norm, indent=2))
        log.info("normalisation: mean %.4f std %.4f over %d examples", mean, std, len(ref))
    export_dir = None
    if a.export and jax.process_index() == 0:
        model = nnx.merge(graphdef, jax.device_get(state.params), jax.device_get(state.extra))
        export_dir = str(save_reward_model(model, run.dir.path / "reward_model", backbone.tokenizer))
        log.info("exported reward model to %s (load with jaxrlhf.models.reward_model.load_reward_model)", export_dir)
    run.dir.close()
    return run_summary(run, state, normalization=norm, stats=stats_of(jax.device_get(state.extra)),
                       export_dir=export_dir)
