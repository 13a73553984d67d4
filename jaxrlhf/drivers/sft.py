"""The SFT driver: rows -> tokenized (prompt, response) examples (optionally packed) -> ``algos.sft.sft_step``.

Held-out metric: token-weighted completion NLL (``loss``) and ``perplexity``; samples: greedy completions
of held-out prompts; export: the policy as a Hugging Face folder ``runs/<name>/hf``.

Config fields read here: ``data.{max_length,max_prompt_length,use_chat_template,on_overflow,format,
padding_side,packing,seed,batch_size}``, ``optim.grad_accum_steps``, ``train.{steps,num_samples,
sample_max_new_tokens}`` (the samples' length), ``algo`` (the :class:`~jaxrlhf.config.SFTConfig`).
"""

from __future__ import annotations

import functools
import logging

import jax
import numpy as np
from flax import nnx

from jaxrlhf import config as C
from jaxrlhf.algos.sft import sft_eval, sft_step
from jaxrlhf.data.batching import build_lm_batch, pack_lm_examples, stack_examples, unstack_batch
from jaxrlhf.data.formats import sft_example
from jaxrlhf.data.iterator import BatchIterator
from jaxrlhf.data.tokenize import pad_id_for, tokenize_sft_dataset
from jaxrlhf.distributed import tokenize_rows
from jaxrlhf.drivers import core
from jaxrlhf.sharding import place_batch, place_global_batch
from jaxrlhf.train_state import jit_step, make_optimizer

__all__ = ["train"]

log = logging.getLogger("jaxrlhf")


def tokenize_sft_rows(rows, data: C.DataConfig, tokenizer):
    """Rows -> ``(SFTTokens list, TruncationReport)`` (every instance of a multi-turn row)."""
    return tokenize_sft_dataset(rows, tokenizer, max_length=data.max_length, max_prompt_length=data.max_prompt_length,
                                use_chat_template=core.use_chat_template(data, tokenizer),
                                on_overflow=data.on_overflow, format=data.format, instances="all")


def _sft_instances(row, format: str) -> int:
    """How many SFT examples a row gives before truncation (several for a self-instruct row)."""
    return len(sft_example(row, format=format, instances="all"))


def train(cfg: C.ExperimentConfig, resume: bool = False) -> dict:
    """Fine-tune ``cfg.model`` on ``cfg.data`` (SFT); writes the run directory; returns the summary."""
    d = cfg.data
    run = core.start_run(cfg)
    policy = core.load_policy(cfg.model, run.mesh)
    core.check_lengths(policy.model_cfg, d.max_length, "data.max_length")
    train_rows, eval_rows = core.split_rows(d)
    # Several processes: each tokenises only its rows (jaxrlhf.distributed); packing needs every example.
    train_ex, train_rep = tokenize_rows(train_rows, lambda rows: tokenize_sft_rows(rows, d, policy.tokenizer),
                                        instances=functools.partial(_sft_instances, format=d.format),
                                        shard=not d.packing)
    eval_ex, eval_rep = tokenize_sft_rows(eval_rows, d, policy.tokenizer)
    log.info("data: %d train / %d eval examples; train %s; eval %s", len(train_ex), len(eval_ex),
             train_rep.summary(), eval_rep.summary())
    pad_id = pad_id_for(policy.tokenizer)
    collate = functools.partial(build_lm_batch, seq_len=d.max_length, pad_id=pad_id, padding_side=d.padding_side)
    if d.packing:
        # Pack the whole (shuffled once by seed) training set into rows of max_length; batches are rows.
        order = np.random.default_rng(d.seed).permutation(len(train_ex))
        rows = unstack_batch(pack_lm_examples([train_ex[i] for i in order], d.max_length, pad_id))
        log.info("packing: %d examples -> %d rows of %d tokens", len(train_ex), len(rows), d.max_length)
        batches = BatchIterator(rows, d.batch_size, stack_examples, seed=d.seed,
                                process_index=jax.process_index(), process_count=jax.process_count())
    else:
        batches = BatchIterator(train_ex, d.batch_size, collate, seed=d.seed,
                                process_index=jax.process_index(), process_count=jax.process_count())

    tx = make_optimizer(cfg.optim, cfg.train.steps)
    tr = core.policy_trainable(run, policy)  # every weight, or LoRA adapters on the frozen base (model.lora)
    state, sharding, position = core.init_or_restore(run, tr.params, tx, resume)
    step = jit_step(tr.step(sft_step), run.mesh, sharding, static_kwargs=dict(
        graphdef=policy.graphdef, tx=tx, cfg=cfg.algo, grad_accum_steps=cfg.optim.grad_accum_steps))
    place = functools.partial(place_batch, mesh=run.mesh)
    eval_batches = [collate(eval_ex[i:i + d.batch_size]) for i in range(0, len(eval_ex) - d.batch_size + 1, d.batch_size)]
    eval_fn = jax.jit(functools.partial(sft_eval, graphdef=policy.graphdef))

    def evaluate(st) -> core.Evaluation:
        sums = [jax.device_get(eval_fn(tr.model_params(st.params), place_global_batch(b, run.mesh)))  # held whole
                for b in eval_batches]
        nll = sum(float(s["nll_sum"]) for s in sums) / max(sum(float(s["tokens"]) for s in sums), 1.0)
        return core.Evaluation({"loss": nll, "perplexity": float(np.exp(nll))})

    def export(st) -> dict:
        # The finished policy as a Hugging Face folder (transformers loads it; so does load_pretrained).
        from jaxrlhf.models.hf import save_hf_folder

        path = run.dir.path / "hf"
        save_hf_folder(nnx.merge(policy.graphdef, jax.device_get(tr.merged(st.params))), policy.model_cfg, path,
                       tokenizer=policy.tokenizer)
        return {"export_dir": str(path)}

    return core.drive(
        run, state, position, step_fn=step, batches=batches, place=place, meta={"algo": "sft"},
        evaluate=evaluate if eval_batches else None,
        sample=tr.on_model(core.greedy_samples(policy, [ex[0] for ex in eval_ex[:cfg.train.num_samples]],
                                               cfg.train.sample_max_new_tokens)),
        export=export, step_args=tr.step_args, tokens_per_step=d.batch_size * d.max_length,
        policy_eval=core.policy_eval_for(cfg, policy, lambda st: tr.model_params(st.params)))
