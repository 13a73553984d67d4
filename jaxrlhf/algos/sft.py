"""Supervised fine-tuning: prompt-masked next-token cross-entropy.

``sft_step(state, batch, *, graphdef, tx, cfg, grad_accum_steps) -> (state, metrics)`` is pure; jit it
once with :func:`jaxrlhf.train_state.jit_step`. The loss is the token-weighted mean over completion
tokens of the whole (accumulated) batch: ``sum_t m_t * nll_t / sum_t m_t``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxrlhf.config import SFTConfig
from jaxrlhf.ops import next_token_logprobs
from jaxrlhf.train_state import TrainState, gradient_step


def sft_token_losses(logits_BTV: jax.Array, tokens_BT: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-token negative log-likelihood ``[B, T]`` aligned with ``tokens`` (position 0 is 0).

    With ``label_smoothing = ε`` the target is ``(1-ε)·onehot + ε·uniform`` (Szegedy et al. 2016 §7):
    ``(1-ε)·nll + ε·(logsumexp(z) − mean_v z_v)``.
    """
    nll = -next_token_logprobs(logits_BTV, tokens_BT)
    if label_smoothing == 0.0:
        return nll
    z = logits_BTV[..., :-1, :].astype(jnp.float32)
    uniform = jax.nn.logsumexp(z, axis=-1) - jnp.mean(z, axis=-1)
    uniform = jnp.pad(uniform, [(0, 0)] * (uniform.ndim - 1) + [(1, 0)])
    return (1.0 - label_smoothing) * nll + label_smoothing * uniform


def sft_loss(params, batch: dict, *, graphdef: nnx.GraphDef, cfg: SFTConfig):
    """``(loss_sum, (num_completion_tokens, metrics))`` for :func:`gradient_step`.

    Args:
      batch: ``tokens``/``positions``/``segment_ids`` int32 ``[B, T]``, ``completion_mask`` f32 ``[B, T]``.
    """
    model = nnx.merge(graphdef, params)
    out = model(batch["tokens"], batch["positions"], batch["segment_ids"])
    losses_BT = sft_token_losses(out.logits_BTV, batch["tokens"], cfg.label_smoothing)
    mask_BT = batch["completion_mask"].astype(jnp.float32)
    loss_sum = jnp.sum(losses_BT * mask_BT)
    num_tokens = jnp.sum(mask_BT)
    return loss_sum, (num_tokens, {"tokens": num_tokens})


def sft_step(state: TrainState, batch: dict, *, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
             cfg: SFTConfig, grad_accum_steps: int = 1) -> tuple[TrainState, dict]:
    """One SFT optimizer step (pure). Metrics: ``loss`` (mean nll per completion token), ``grad_norm``,
    ``tokens`` (completion tokens per micro-batch, averaged)."""

    def loss_fn(params, mb):
        return sft_loss(params, mb, graphdef=graphdef, cfg=cfg)

    return gradient_step(state, batch, loss_fn=loss_fn, tx=tx, grad_accum_steps=grad_accum_steps)


def sft_eval(params, batch: dict, *, graphdef: nnx.GraphDef) -> dict:
    """Token-summed eval loss: ``{"nll_sum", "tokens"}`` so callers can aggregate exactly."""
    loss_sum, (num_tokens, _) = sft_loss(params, batch, graphdef=graphdef, cfg=SFTConfig())
    return {"nll_sum": loss_sum, "tokens": num_tokens}


# ------------------------------------------------------------------------------------------- driver

def load_sft_data(cfg, tokenizer):
    """Rows -> tokenized (prompt, response) pairs, split into train / held-out eval (fixed by seed)."""
    from jaxrlhf.data.iterator import train_eval_split
    from jaxrlhf.data.sources import load_rows
    from jaxrlhf.data.tokenize import tokenize_sft_dataset

    d = cfg.data
    rows = load_rows(d.source, split=d.split)
    if d.limit:
        rows = rows.select(range(min(d.limit, len(rows))))
    examples, report = tokenize_sft_dataset(
        rows, tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
        use_chat_template=d.use_chat_template and getattr(tokenizer, "chat_template", None) is not None,
        on_overflow=d.on_overflow, format=d.format, instances="all")
    train_idx, eval_idx = train_eval_split(len(examples), d.eval_size, seed=d.seed)
    return [examples[i] for i in train_idx], [examples[i] for i in eval_idx], report


def train(cfg, resume: bool = False) -> dict:
    """Fine-tune ``cfg.model`` on ``cfg.data`` (SFT); writes the run directory; returns a summary."""
    import functools
    import logging

    import numpy as np

    from jaxrlhf.data.batching import build_lm_batch, pack_lm_examples, stack_examples, unstack_batch
    from jaxrlhf.data.iterator import BatchIterator
    from jaxrlhf.data.tokenize import pad_id_for
    from jaxrlhf.loop import Hooks, train_loop
    from jaxrlhf.runner import (check_lengths, init_or_restore, load_policy, run_summary, sample_hook,
                                start_run)
    from jaxrlhf.train_state import jit_step, make_optimizer, place_batch

    log = logging.getLogger("jaxrlhf")
    run = start_run(cfg)
    policy = load_policy(cfg.model)
    check_lengths(cfg, policy.model_cfg)
    train_ex, eval_ex, report = load_sft_data(cfg, policy.tokenizer)
    log.info("data: %d train / %d eval examples; %s", len(train_ex), len(eval_ex), report.summary())
    pad_id = pad_id_for(policy.tokenizer)
    collate = functools.partial(build_lm_batch, seq_len=cfg.data.max_length, pad_id=pad_id,
                                padding_side=cfg.data.padding_side)
    if cfg.data.packing:
        # Pack the whole (shuffled once by seed) training set into rows of max_length; batches are rows.
        order = np.random.default_rng(cfg.data.seed).permutation(len(train_ex))
        rows = unstack_batch(pack_lm_examples([train_ex[i] for i in order], cfg.data.max_length, pad_id))
        log.info("packing: %d examples -> %d rows of %d tokens", len(train_ex), len(rows), cfg.data.max_length)
        batches = BatchIterator(rows, cfg.data.batch_size, stack_examples, seed=cfg.data.seed,
                                process_index=jax.process_index(), process_count=jax.process_count())
    else:
        batches = BatchIterator(train_ex, cfg.data.batch_size, collate, seed=cfg.data.seed,
                                process_index=jax.process_index(), process_count=jax.process_count())

    tx = make_optimizer(cfg.optim, cfg.train.steps)
    state, sharding, position = init_or_restore(run, policy.params, tx, resume)
    if position:
        batches.set_state(position)
    step = jit_step(sft_step, run.mesh, sharding, static_kwargs=dict(
        graphdef=policy.graphdef, tx=tx, cfg=cfg.algo, grad_accum_steps=cfg.optim.grad_accum_steps))

    eval_batches = [collate(eval_ex[i:i + cfg.data.batch_size])
                    for i in range(0, len(eval_ex) - cfg.data.batch_size + 1, cfg.data.batch_size)]
    eval_fn = jax.jit(functools.partial(sft_eval, graphdef=policy.graphdef))

    def evaluate(st) -> dict:
        sums = [jax.device_get(eval_fn(st.params, place_batch(b, run.mesh))) for b in eval_batches]
        nll = sum(float(s["nll_sum"]) for s in sums) / max(sum(float(s["tokens"]) for s in sums), 1.0)
        return {"loss": nll, "perplexity": float(np.exp(nll))}

    samples = sample_hook(run, policy, [ex[0] for ex in eval_ex[:cfg.train.num_samples]],
                          cfg.train.max_new_tokens)

    start = int(jax.device_get(state.step))
    before = samples(state, "before", start) if start == 0 else []
    eval_before = evaluate(state) if (eval_batches and start == 0) else {}
    if eval_before:
        run.dir.log(0, eval_before, split="eval")
    after: list[dict] = []
    hooks = Hooks(evaluate=evaluate if eval_batches else None,
                  sample=lambda st, s: after.extend(samples(st, "after", s)))
    state = train_loop(state=state, step_fn=step, batches=batches, place=lambda b: place_batch(b, run.mesh),
                       total_steps=cfg.train.steps, run=run.dir, checkpointer=run.checkpointer,
                       data_position=batches.get_state, meta={"algo": "sft"}, log_every=cfg.train.log_every,
                       eval_every=cfg.train.eval_every or (cfg.train.steps if eval_batches else 0),
                       save_every=cfg.train.save_every, hooks=hooks,
                       tokens_per_step=cfg.data.batch_size * cfg.data.max_length,
                       stop_after=cfg.train.stop_after)
    if int(jax.device_get(state.step)) == cfg.train.steps and jax.process_index() == 0:
        # The finished policy as a Hugging Face folder (transformers loads it; so does load_pretrained).
        from jaxrlhf.models.hf import save_hf_folder

        save_hf_folder(nnx.merge(policy.graphdef, jax.device_get(state.params)), policy.model_cfg,
                       run.dir.path / "hf", tokenizer=policy.tokenizer)
    run.checkpointer.close()
    run.dir.close()
    return run_summary(run, state, samples_before=before, samples_after=after)
