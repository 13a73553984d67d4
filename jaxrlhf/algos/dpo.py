"""The DPO family in one pure step: DPO / cDPO, IPO, SimPO, ORPO and KTO, chosen by ``cfg.loss``.

``dpo_step(state, batch, ref_params=None, *, graphdef, tx, cfg, grad_accum_steps) -> (state, metrics)``
is pure; jit it once with :func:`jaxrlhf.train_state.jit_step` (``ref_params`` travels as the extra
positional argument, placed like the policy's parameters, never donated).

Batches keep a pair axis ``[B, 2, T]``:

* preference pairs: index 0 = prompt + chosen, 1 = prompt + rejected;
* KTO (:func:`build_kto_batch`): index 0 = prompt + completion (with ``desirable`` bool ``[B]``),
  index 1 = the same prompt with a *mismatched* completion (fixed per example, from another prompt), used
  only for KTO's KL reference point ``z0`` (Ethayarajh et al. 2024 §4.1; TRL builds the same pairs).

One policy forward over the local reshape ``[B*2, T]`` gives per-sequence log-probabilities
(:func:`sequence_logps`: sums over completion tokens and token counts, ``[B, 2]``). The reference's sums
come either from frozen ``ref_params`` inside the step (``jax.lax.stop_gradient``; ``cfg.reference =
"model"``) or from the batch key ``reference_logps`` float32 ``[B, 2]`` written by one jitted pass over
the data (:func:`precompute_reference`, ``cfg.reference = "precomputed"``; the step then needs no
reference model). Reference-free losses (SimPO, ORPO) use neither.

:data:`jaxrlhf.algos.dpo_losses.PREFERENCE_LOSSES` describes each loss once (its function in
:mod:`jaxrlhf.losses`, whether it needs a reference, summed or length-normalised log-probs, whether it
reads ``label_smoothing``, paired or KTO data); the config's validation, the step and the held-out metrics
all read it. Members: dpo (cDPO with ``label_smoothing``), ipo, hinge, robust, simpo, orpo, kto.

The loss is a mean over examples (pairs, or KTO completions), returned to :func:`gradient_step` as a sum
with the example count as normaliser (exact accumulation). Metrics: ``loss``, ``rewards/chosen``,
``rewards/rejected``, ``rewards/accuracy``, ``rewards/margin``, ``logps/chosen``, ``logps/rejected``
(+ loss-specific ones), ``grad_norm``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrlhf.algos.dpo_losses import PREFERENCE_LOSSES, SeqLogps
from jaxrlhf.config import DPOConfig
from jaxrlhf.ops import next_token_logprobs, sequence_logprobs
from jaxrlhf.train_state import TrainState, gradient_step


def sequence_logps(graphdef: nnx.GraphDef, params: Any, batch: dict) -> SeqLogps:
    """Completion log-likelihoods of every sequence of ``batch`` (LM keys ``[..., T]``) under the model.

    One forward pass over the rows flattened to ``[prod(...), T]`` (for pairs a local reshape of each
    example's two rows); ``logps[t] = log p(tokens[t] | tokens[<t])`` summed where ``completion_mask`` is 1
    (:func:`jaxrlhf.ops.next_token_logprobs`, :func:`jaxrlhf.ops.sequence_logprobs`).
    """
    model = nnx.merge(graphdef, params)
    tokens = batch["tokens"]
    lead, T = tokens.shape[:-1], tokens.shape[-1]
    flat = lambda x: x.reshape(-1, T)  # noqa: E731
    out = model(flat(tokens), flat(batch["positions"]), flat(batch["segment_ids"]))
    logps = next_token_logprobs(out.logits_BTV, flat(tokens))
    mask = flat(batch["completion_mask"]).astype(jnp.float32)
    sums = sequence_logprobs(logps, mask)
    return SeqLogps(sums.reshape(lead), jnp.sum(mask, axis=-1).reshape(lead))


def reference_sums(graphdef: nnx.GraphDef, ref_params: Any | None, batch: dict) -> jax.Array:
    """Reference log-prob sums ``[B, 2]``: from frozen ``ref_params`` (no gradient), or -- when
    ``ref_params is None`` -- the batch's precomputed ``reference_logps``.

    Raises:
      ValueError: no ``ref_params`` and no ``reference_logps`` key in the batch.
    """
    if ref_params is None:
        if "reference_logps" not in batch:
            raise ValueError("this loss needs reference log-probs: pass ref_params to the step "
                             "(algo.reference='model') or batches with 'reference_logps' "
                             "(algo.reference='precomputed', see precompute_reference)")
        return batch["reference_logps"].astype(jnp.float32)
    return jax.lax.stop_gradient(sequence_logps(graphdef, jax.lax.stop_gradient(ref_params), batch).sums)


def dpo_family_loss(params, batch: dict, ref_params: Any | None, *, graphdef: nnx.GraphDef, cfg: DPOConfig):
    """``(loss_sum, (num_examples, metrics))`` for :func:`gradient_step`: the loss of
    ``PREFERENCE_LOSSES[cfg.loss]`` on the policy's (and, when the loss uses one, the reference's)
    sequence log-probs."""
    entry = PREFERENCE_LOSSES[cfg.loss]
    pol = sequence_logps(graphdef, params, batch)
    ref = reference_sums(graphdef, ref_params, batch) if entry.uses_reference else None
    loss, metrics = entry(pol, ref, batch, cfg)
    n = jnp.asarray(batch["tokens"].shape[0], jnp.float32)
    return loss * n, (n, metrics)


def dpo_step(state: TrainState, batch: dict, ref_params: Any | None = None, *, graphdef: nnx.GraphDef,
             tx: optax.GradientTransformation, cfg: DPOConfig, grad_accum_steps: int = 1
             ) -> tuple[TrainState, dict]:
    """One optimizer step of the DPO family (pure). ``ref_params`` = frozen reference parameters, or
    None when the batch carries ``reference_logps`` or the loss is reference-free."""

    def loss_fn(params, mb):
        return dpo_family_loss(params, mb, ref_params, graphdef=graphdef, cfg=cfg)

    return gradient_step(state, batch, loss_fn=loss_fn, tx=tx, grad_accum_steps=grad_accum_steps)


def eval_logps(params, batch: dict, *, graphdef: nnx.GraphDef) -> dict:
    """Eval forward: ``{"sums", "counts"}`` ``[B, 2]`` of the policy (jit it)."""
    pol = sequence_logps(graphdef, params, batch)
    return {"sums": pol.sums, "counts": pol.counts}


def eval_metrics(cfg: DPOConfig, outputs: dict, batch: dict) -> dict:
    """Held-out preference metrics over the real pairs (host, numpy), with the implicit rewards of
    ``cfg.loss`` (:meth:`~jaxrlhf.algos.dpo_losses.PreferenceLoss.implicit_rewards`): ``reward_accuracy``
    (fraction with chosen implicit reward > rejected), ``reward_margin`` (mean difference), ``reward_chosen``,
    ``reward_rejected``, ``logps_chosen``, ``logps_rejected`` (policy sums), ``pairs``."""
    valid = np.asarray(batch["segment_ids"]).any(-1).all(-1)
    sums = np.asarray(outputs["sums"], np.float64)[valid]
    counts = np.asarray(outputs["counts"], np.float64)[valid]
    ref = np.asarray(batch["reference_logps"], np.float64)[valid] if "reference_logps" in batch else None
    r = PREFERENCE_LOSSES[cfg.loss].implicit_rewards(cfg.beta, sums, counts, ref, xp=np)
    d = r[:, 0] - r[:, 1]
    return {"reward_accuracy": float(np.mean(d > 0)), "reward_margin": float(np.mean(d)),
            "reward_chosen": float(np.mean(r[:, 0])), "reward_rejected": float(np.mean(r[:, 1])),
            "logps_chosen": float(np.mean(sums[:, 0])), "logps_rejected": float(np.mean(sums[:, 1])),
            "pairs": int(valid.sum())}


# ------------------------------------------------------------------------------ data: KTO, references

class KTOTokens(NamedTuple):
    """One KTO example: ``prompt + completion`` labelled ``desirable``, and ``kl_completion_ids``: the
    completion of another prompt, used as the mismatched pair ``(prompt, kl_completion)``."""

    prompt_ids: np.ndarray
    completion_ids: np.ndarray
    desirable: bool
    kl_completion_ids: np.ndarray


def kto_examples(pairs: Sequence[Any], seed: int = 0) -> list[KTOTokens]:
    """Unpair preference pairs (each gives a desirable chosen and an undesirable rejected example, as
    TRL's ``unpair_preference_dataset``) and give every example a fixed mismatched completion.

    Mismatched partners: examples are visited in a seeded permutation and each takes the completion of
    the next one whose prompt differs (never its own pair's other completion).

    Raises:
      ValueError: fewer than two distinct prompts.
    """
    flat = []
    for i, p in enumerate(pairs):
        flat.append((i, p[0], np.asarray(p[1]), True))
        flat.append((i, p[0], np.asarray(p[2]), False))
    if len(pairs) < 2:
        raise ValueError(f"KTO needs at least two prompts for mismatched pairs, got {len(pairs)}")
    order = np.random.default_rng(seed).permutation(len(flat))
    out = [None] * len(flat)
    for j, k in enumerate(order):
        step = 1
        while flat[order[(j + step) % len(order)]][0] == flat[k][0]:
            step += 1
        partner = flat[order[(j + step) % len(order)]]
        out[k] = KTOTokens(np.asarray(flat[k][1]), flat[k][2], flat[k][3], partner[2])
    return out


def build_kto_batch(examples: Sequence[KTOTokens], seq_len: int, pad_id: int, padding_side: str = "right", *,
                    batch_size: int | None = None) -> dict[str, np.ndarray]:
    """KTO examples -> LM keys ``[B, 2, T]`` (0 = prompt + completion, 1 = prompt + mismatched completion,
    cut from the right to fit ``seq_len``) + ``desirable`` bool ``[B]`` (False on padding rows)."""
    from jaxrlhf.data.batching import build_preference_batch

    triples = []
    for ex in examples:
        room = max(seq_len - len(ex.prompt_ids), 1)
        triples.append((ex.prompt_ids, ex.completion_ids, np.asarray(ex.kl_completion_ids)[:room]))
    batch = build_preference_batch(triples, seq_len, pad_id, padding_side, batch_size=batch_size)
    desirable = np.zeros(batch["tokens"].shape[0], bool)
    desirable[:len(examples)] = [bool(ex.desirable) for ex in examples]
    batch["desirable"] = desirable
    return batch


class WithReference(NamedTuple):
    """An example (any tuple the base collate accepts) and its reference log-prob sums float32 ``[2]``."""

    example: Any
    reference_logps: np.ndarray


def collate_with_reference(base: Callable) -> Callable:
    """Wrap a collate so a list of :class:`WithReference` gives the base batch plus ``reference_logps``
    float32 ``[B, 2]`` (0 on padding rows)."""

    def collate(examples: Sequence[WithReference], batch_size: int | None = None) -> dict:
        batch = base([ex.example for ex in examples], batch_size=batch_size)
        ref = np.zeros((batch["tokens"].shape[0], 2), np.float32)
        if examples:
            ref[:len(examples)] = np.stack([ex.reference_logps for ex in examples])
        batch["reference_logps"] = ref
        return batch

    return collate


def precompute_reference(graphdef: nnx.GraphDef, ref_params: Any, examples: Sequence[Any], collate: Callable,
                         batch_size: int, place: Callable[[dict], dict]) -> list[WithReference]:
    """One jitted pass of the reference model over ``examples``: each becomes ``WithReference(example,
    [sum logp index 0, sum logp index 1])`` (collate with :func:`collate_with_reference`)."""
    from jaxrlhf.algos.reward import map_batches

    fn = jax.jit(lambda p, b: sequence_logps(graphdef, p, b).sums)
    sums, _ = map_batches(lambda b: {"sums": fn(ref_params, b)}, examples, collate, batch_size, place)
    if not examples:
        return []
    return [WithReference(ex, np.asarray(s, np.float32)) for ex, s in zip(examples, sums["sums"][:len(examples)])]


# ------------------------------------------------------------------------------------------- driver

def train(cfg, resume: bool = False) -> dict:
    """DPO-family fine-tuning of ``cfg.model`` on preference pairs; writes the run directory; returns a
    summary (see ``jaxrlhf.algos.sft.train``). Held-out metrics: implicit-reward accuracy and margin."""
    import dataclasses
    import logging

    from jaxrlhf.algos.reward import map_batches, split_rows, tokenize_pairs
    from jaxrlhf.data.batching import build_preference_batch
    from jaxrlhf.data.iterator import BatchIterator
    from jaxrlhf.data.tokenize import pad_id_for
    from jaxrlhf.loop import Hooks, train_loop
    from jaxrlhf.runner import (check_lengths, init_or_restore, load_policy, run_summary, sample_hook,
                                start_run)
    from jaxrlhf.train_state import jit_step, make_optimizer, place_batch

    log = logging.getLogger("jaxrlhf")
    a = cfg.algo
    run = start_run(cfg)
    policy = load_policy(cfg.model)
    check_lengths(cfg, policy.model_cfg)
    train_rows, eval_rows = split_rows(cfg)
    train_pairs, train_rep = tokenize_pairs(train_rows, cfg, policy.tokenizer)
    eval_pairs, eval_rep = tokenize_pairs(eval_rows, cfg, policy.tokenizer)
    log.info("data: %d train / %d eval pairs; train %s; eval %s", len(train_pairs), len(eval_pairs),
             train_rep.summary(), eval_rep.summary())
    common = dict(seq_len=cfg.data.max_length, pad_id=pad_id_for(policy.tokenizer), padding_side=cfg.data.padding_side)
    pair_collate = functools.partial(build_preference_batch, **common)
    if a.loss == "kto":
        train_ex, collate = kto_examples(train_pairs, seed=cfg.data.seed), functools.partial(build_kto_batch, **common)
    else:
        train_ex, collate = list(train_pairs), pair_collate

    tx = make_optimizer(cfg.optim, cfg.train.steps)
    state, sharding, position = init_or_restore(run, policy.params, tx, resume)
    micro = cfg.data.batch_size // cfg.optim.grad_accum_steps
    place = lambda b: place_batch(b, run.mesh)  # noqa: E731
    eval_ex, eval_collate, step_args = list(eval_pairs), pair_collate, ()
    if a.uses_reference:
        if a.reference_model:
            ref = load_policy(dataclasses.replace(cfg.model, name=a.reference_model))
            if ref.model_cfg.vocab_size != policy.model_cfg.vocab_size:
                raise ValueError(f"algo.reference_model={a.reference_model!r} has vocab {ref.model_cfg.vocab_size}, "
                                 f"the policy {policy.model_cfg.vocab_size}; they must share a tokenizer")
            ref_graphdef, ref_params = ref.graphdef, ref.params
        else:
            ref_graphdef, ref_params = policy.graphdef, policy.params  # the initial policy (never donated)
        ref_params = jax.device_put(ref_params, sharding.params)
        # Held-out reference log-probs are computed once, whatever the mode (the reference is frozen).
        eval_ex = precompute_reference(ref_graphdef, ref_params, eval_ex, pair_collate, micro, place)
        eval_collate = collate_with_reference(pair_collate)
        if a.reference == "precomputed":
            train_ex = precompute_reference(ref_graphdef, ref_params, train_ex, collate, micro, place)
            collate = collate_with_reference(collate)
            del ref_params
        else:
            layout = lambda p: (jax.tree.structure(p), [x.shape for x in jax.tree.leaves(p)])  # noqa: E731
            if layout(ref_params) != layout(policy.params):
                raise ValueError("algo.reference='model' runs the reference with the policy's architecture; "
                                 f"{a.reference_model!r} differs: use algo.reference='precomputed'")
            step_args = (ref_params,)
    if not step_args:
        policy.params = None  # no reference model in the step: free the initial weights
    batches = BatchIterator(train_ex, cfg.data.batch_size, collate, seed=cfg.data.seed,
                            process_index=jax.process_index(), process_count=jax.process_count())
    if position:
        batches.set_state(position)
    step = jit_step(dpo_step, run.mesh, sharding, static_kwargs=dict(
        graphdef=policy.graphdef, tx=tx, cfg=a, grad_accum_steps=cfg.optim.grad_accum_steps))
    eval_fn = jax.jit(functools.partial(eval_logps, graphdef=policy.graphdef))

    def evaluate(st) -> dict:
        outs, cat = map_batches(lambda b: eval_fn(st.params, b), eval_ex, eval_collate, micro, place)
        return eval_metrics(a, outs, cat)

    samples = sample_hook(run, policy, [p[0] for p in eval_pairs[:cfg.train.num_samples]],
                          cfg.train.max_new_tokens)

    start = int(jax.device_get(state.step))
    before = samples(state, "before", start) if start == 0 else []
    # With a reference, the initial policy's implicit rewards are all 0 (accuracy 0, margin 0): no pass.
    eval_before = evaluate(state) if (eval_ex and start == 0 and not a.uses_reference) else {}
    if eval_before:
        run.dir.log(0, eval_before, split="eval")
    after: list[dict] = []
    hooks = Hooks(evaluate=evaluate if eval_ex else None,
                  sample=lambda st, s: after.extend(samples(st, "after", s)))
    state = train_loop(state=state, step_fn=step, batches=batches, place=place, total_steps=cfg.train.steps,
                       run=run.dir, checkpointer=run.checkpointer, data_position=batches.get_state,
                       meta={"algo": "dpo", "loss": a.loss}, log_every=cfg.train.log_every,
                       eval_every=cfg.train.eval_every or (cfg.train.steps if eval_ex else 0),
                       save_every=cfg.train.save_every, hooks=hooks, step_args=step_args,
                       tokens_per_step=cfg.data.batch_size * 2 * cfg.data.max_length)
    run.checkpointer.close()
    run.dir.close()
    return run_summary(run, state, eval_before=eval_before or None, samples_before=before,
                       samples_after=after)
