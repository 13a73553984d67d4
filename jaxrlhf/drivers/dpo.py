"""The DPO-family driver (every loss of ``algos.dpo_losses.PREFERENCE_LOSSES``) -> ``algos.dpo.dpo_step``.

Data: preference pairs (KTO: unpaired into desirable/undesirable examples with mismatched partners;
Plackett-Luce: K-way rankings ``{prompt, completions, ranking | scores}``). β lives in
``state.extra["beta"]`` (:func:`jaxrlhf.algos.dpo.dpo_extra`). The
reference (losses that use one): the initial policy or ``algo.reference_model``, either run inside the
step (``algo.reference = "model"``) or once over the data here (``"precomputed"``:
:func:`precompute_reference`, the batches then carry ``reference_logps``). Held-out metrics:
implicit-reward accuracy and margin (:func:`jaxrlhf.algos.dpo.eval_metrics`); samples: greedy
completions of held-out prompts; export: the policy as a Hugging Face folder ``runs/<name>/hf`` (summary
``export_dir``).

Config fields read here: ``data.{max_length,padding_side,seed,batch_size}`` (+ those of
:func:`jaxrlhf.drivers.reward.tokenize_pairs`), ``optim.grad_accum_steps``, ``train.{steps,num_samples,
sample_max_new_tokens}``, ``model`` (replaced by ``algo.reference_model``), ``algo.{loss,uses_reference,
reference,reference_model}``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from jaxrlhf import config as C
from jaxrlhf.algos.dpo import (build_kto_batch, dpo_extra, dpo_step, eval_logps, eval_metrics, kto_examples,
                               sequence_logps)
from jaxrlhf.algos.dpo_losses import PREFERENCE_LOSSES
from jaxrlhf.data.batching import build_preference_batch, build_ranked_batch
from jaxrlhf.data.iterator import BatchIterator
from jaxrlhf.data.tokenize import pad_id_for, tokenize_ranked_dataset
from jaxrlhf.distributed import tokenize_rows
from jaxrlhf.drivers import core
from jaxrlhf.drivers.reward import tokenize_pairs
from jaxrlhf.errors import ModelError
from jaxrlhf.sharding import place_batch, place_global_batch, state_shardings
from jaxrlhf.train_state import jit_step, make_optimizer

__all__ = ["train", "precompute_reference"]

log = logging.getLogger("jaxrlhf")


class WithReference(NamedTuple):
    """An example (any tuple the base collate accepts) and its reference log-prob sums float32 ``[2]``."""

    example: Any
    reference_logps: np.ndarray


def collate_with_reference(base: Callable) -> Callable:
    """Wrap a collate so a list of :class:`WithReference` gives the base batch plus ``reference_logps``
    float32 ``[B, 2]`` (``[B, N]`` for rankings; 0 on padding rows)."""

    def collate(examples: Sequence[WithReference], batch_size: int | None = None) -> dict:
        batch = base([ex.example for ex in examples], batch_size=batch_size)
        ref = np.zeros(batch["tokens"].shape[:2], np.float32)
        if examples:
            ref[:len(examples)] = np.stack([ex.reference_logps for ex in examples])
        batch["reference_logps"] = ref
        return batch

    return collate


def precompute_reference(graphdef: nnx.GraphDef, ref_params: Any, examples: Sequence[Any], collate: Callable,
                         batch_size: int, place: Callable[[dict], dict]) -> list[WithReference]:
    """One jitted pass of the reference model over ``examples``: each becomes ``WithReference(example,
    [sum logp index 0, sum logp index 1])`` (collate with :func:`collate_with_reference`)."""
    fn = jax.jit(lambda p, b: sequence_logps(graphdef, p, b).sums)
    sums, _ = core.map_batches(lambda b: {"sums": fn(ref_params, b)}, examples, collate, batch_size, place)
    if not examples:
        return []
    return [WithReference(ex, np.asarray(s, np.float32)) for ex, s in zip(examples, sums["sums"][:len(examples)])]


def train(cfg: C.ExperimentConfig, resume: bool = False) -> dict:
    """DPO-family fine-tuning of ``cfg.model`` on preference pairs; writes the run directory; returns the
    summary."""
    a, d = cfg.algo, cfg.data
    run = core.start_run(cfg)
    policy = core.load_policy(cfg.model, run.mesh)
    core.check_lengths(policy.model_cfg, d.max_length, "data.max_length")
    entry = PREFERENCE_LOSSES[a.loss]
    train_rows, eval_rows = core.split_rows(d, a.eval_source, a.eval_split)
    common = dict(seq_len=d.max_length, pad_id=pad_id_for(policy.tokenizer), padding_side=d.padding_side)
    if entry.rankings:
        tok = lambda rows: tokenize_ranked_dataset(  # noqa: E731
            rows, policy.tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
            use_chat_template=core.use_chat_template(d, policy.tokenizer), on_overflow=d.on_overflow)
    else:
        tok = lambda rows: tokenize_pairs(rows, d, policy.tokenizer)  # noqa: E731
    # Several processes: each tokenises only its pairs (jaxrlhf.distributed), unless a pass needs every one.
    whole = entry.rankings or entry.unpaired or (a.uses_reference and a.reference == "precomputed")
    train_pairs, train_rep = tokenize_rows(train_rows, tok, shard=not whole)
    eval_pairs, eval_rep = tok(eval_rows)
    log.info("data: %d train / %d eval %s; train %s; eval %s", len(train_pairs), len(eval_pairs),
             "rankings" if entry.rankings else "pairs", train_rep.summary(), eval_rep.summary())
    if entry.rankings:
        n = max(len(ex.completion_ids) for ex in list(train_pairs) + list(eval_pairs))
        pair_collate = functools.partial(build_ranked_batch, num_completions=n, **common)
    else:
        pair_collate = functools.partial(build_preference_batch, **common)
    if entry.unpaired:
        train_ex, collate = kto_examples(train_pairs, seed=d.seed), functools.partial(build_kto_batch, **common)
    else:
        train_ex, collate = train_pairs, pair_collate

    tx = make_optimizer(cfg.optim, cfg.train.steps)
    tr = core.policy_trainable(run, policy)  # LoRA (model.lora): policy.params is now the frozen base
    state, sharding, position = core.init_or_restore(run, tr.params, tx, resume, extra=dpo_extra(a))
    micro = d.batch_size // cfg.optim.grad_accum_steps
    place = functools.partial(place_batch, mesh=run.mesh)
    place_all = functools.partial(place_global_batch, mesh=run.mesh)  # passes over data every process holds
    eval_ex, eval_collate, step_args = list(eval_pairs), pair_collate, ()
    if a.uses_reference:
        if a.reference_model:
            ref = core.load_policy(dataclasses.replace(cfg.model, name=a.reference_model))
            if ref.model_cfg.vocab_size != policy.model_cfg.vocab_size:
                raise ModelError(f"algo.reference_model={a.reference_model!r} has vocab {ref.model_cfg.vocab_size}, "
                                 f"the policy {policy.model_cfg.vocab_size}; they must share a tokenizer")
            ref_graphdef, ref_params = ref.graphdef, ref.params
        else:
            ref_graphdef, ref_params = policy.graphdef, policy.params  # the initial policy (never donated)
        # LoRA: the state holds adapters only; the reference (the base itself unless reference_model) is
        # placed by its own layout, and with the base it is the one copy of those weights.
        ref_params = jax.device_put(ref_params, sharding.params if tr.base is None
                                    else state_shardings(ref_params, run.mesh))
        # Held-out reference log-probs are computed once, whatever the mode (the reference is frozen).
        eval_ex = precompute_reference(ref_graphdef, ref_params, eval_ex, pair_collate, micro, place_all)
        eval_collate = collate_with_reference(pair_collate)
        if a.reference == "precomputed":
            train_ex = precompute_reference(ref_graphdef, ref_params, train_ex, collate, micro, place_all)
            collate = collate_with_reference(collate)
            del ref_params
        else:
            layout = lambda p: (jax.tree.structure(p), [x.shape for x in jax.tree.leaves(p)])  # noqa: E731
            if layout(ref_params) != layout(policy.params):
                raise C.ConfigError("algo.reference='model' runs the reference with the policy's architecture; "
                                 f"{a.reference_model!r} differs: use algo.reference='precomputed'")
            step_args = (ref_params,)
    policy_eval = core.policy_eval_for(cfg, policy, lambda st: tr.model_params(st.params))
    if not step_args:
        policy.params = None  # no reference model in the step: free the initial weights (unless policy_eval holds them)
    batches = BatchIterator(train_ex, d.batch_size, collate, seed=d.seed,
                            process_index=jax.process_index(), process_count=jax.process_count())
    step = jit_step(tr.step(dpo_step), run.mesh, sharding, static_kwargs=dict(
        graphdef=policy.graphdef, tx=tx, cfg=a, grad_accum_steps=cfg.optim.grad_accum_steps))
    eval_fn = jax.jit(functools.partial(eval_logps, graphdef=policy.graphdef))

    def evaluate(st) -> core.Evaluation:
        params = tr.model_params(st.params)
        outs, cat = core.map_batches(lambda b: eval_fn(params, b), eval_ex, eval_collate, micro, place_all)
        return core.Evaluation(eval_metrics(a, outs, cat))

    def export(st) -> dict:
        # The finished policy as a Hugging Face folder (transformers loads it; so does load_pretrained).
        from jaxrlhf.models.hf import save_hf_folder

        path = run.dir.path / "hf"
        save_hf_folder(nnx.merge(policy.graphdef, jax.device_get(tr.merged(st.params))), policy.model_cfg, path,
                       tokenizer=policy.tokenizer)
        log.info("exported the policy to %s (AutoModelForCausalLM / load_pretrained)", path)
        return {"export_dir": str(path)}

    return core.drive(
        run, state, position, step_fn=step, batches=batches, place=place, meta={"algo": "dpo", "loss": a.loss},
        evaluate=evaluate if eval_ex else None,
        sample=tr.on_model(core.greedy_samples(policy, [p[0] for p in eval_pairs[:cfg.train.num_samples]],
                                               cfg.train.sample_max_new_tokens)),
        export=export, step_args=tr.step_args + step_args, tokens_per_step=d.batch_size * 2 * d.max_length,
        policy_eval=policy_eval)
