"""The reward-model driver (pairwise Bradley–Terry, K-way rankings, classifiers) -> ``algos.reward.reward_step``.

Held-out metrics: :func:`jaxrlhf.algos.reward.eval_metrics` (accuracy, margin, loss, ...). On the last
step, after its eval and *before* its checkpoint, a normalisation pass over ``algo.normalize_examples``
training examples (a seeded sample) stores ``(mean, std)`` in ``state.extra``, so the final checkpoint
and the exported folder ``runs/<name>/reward_model`` hold the same statistics. A scalar decoder reward
model is also exported as a Hugging Face ``*ForSequenceClassification`` folder ``runs/<name>/hf_reward``
(:func:`jaxrlhf.models.reward_model.export_hf_reward_model`: ``transformers``/TRL load it; its logit plus
``config.json``'s ``jaxrlhf_reward_offset`` is the normalised score).

Config fields read here: ``data.{max_length,max_prompt_length,use_chat_template,on_overflow,format,
padding_side,seed,batch_size}``, ``optim.grad_accum_steps``, ``train.{seed,steps}``, ``algo.{objective,
num_labels,pooling,score_label,eval_source,eval_split,normalize_examples,export}``.
"""

from __future__ import annotations

import functools
import json
import logging

import jax
import numpy as np
from flax import nnx

from jaxrlhf import config as C
from jaxrlhf.algos.reward import eval_metrics, normalization_stats, real_rewards, reward_outputs, reward_step
from jaxrlhf.data import batching
from jaxrlhf.data.iterator import BatchIterator
from jaxrlhf.data.tokenize import (pad_id_for, tokenize_classification_dataset, tokenize_preference_dataset,
                                   tokenize_ranked_dataset)
from jaxrlhf.distributed import tokenize_rows
from jaxrlhf.drivers import core
from jaxrlhf.models.reward_model import (RewardModel, export_hf_reward_model, save_reward_model, split_reward_model,
                                         stats_of, with_stats)
from jaxrlhf.sharding import place_batch, place_global_batch
from jaxrlhf.train_state import jit_step, make_optimizer

__all__ = ["train"]

log = logging.getLogger("jaxrlhf")


def tokenize_pairs(rows, data: C.DataConfig, tokenizer, add_eos: bool = True):
    """Preference rows -> ``PreferenceTokens`` (HH dialogues become chat messages when a template is used;
    ``add_eos``: end each completion with the tokenizer's EOS, as a decoder's sequence score reads it)."""
    chat = core.use_chat_template(data, tokenizer)
    return tokenize_preference_dataset(rows, tokenizer, max_length=data.max_length,
                                       max_prompt_length=data.max_prompt_length, use_chat_template=chat,
                                       add_eos=add_eos, on_overflow=data.on_overflow, format=data.format,
                                       hh_prompt_as_messages=chat)


def load_reward_data(cfg: C.ExperimentConfig, tokenizer, is_decoder: bool):
    """``(train_examples, eval_examples, collate, reports)`` for ``cfg.algo.objective``."""
    d, a = cfg.data, cfg.algo
    train_rows, eval_rows = core.split_rows(d, a.eval_source, a.eval_split)
    common = dict(seq_len=d.max_length, pad_id=pad_id_for(tokenizer), padding_side=d.padding_side)
    # Decoders score the last token: completions end with EOS. Encoders pool over the text: no EOS (their
    # tokenizers, e.g. MiniLM's, have none).
    add_eos = is_decoder and tokenizer.eos_token_id is not None
    if a.objective == "pairwise":
        tok = lambda rows: tokenize_pairs(rows, d, tokenizer, add_eos)  # noqa: E731
        collate = functools.partial(batching.build_preference_batch, **common)
    elif a.objective == "ranking":
        tok = lambda rows: tokenize_ranked_dataset(  # noqa: E731
            rows, tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
            use_chat_template=core.use_chat_template(d, tokenizer), add_eos=add_eos, on_overflow=d.on_overflow)
        collate = None
    else:
        tok = lambda rows: tokenize_classification_dataset(  # noqa: E731
            rows, tokenizer, max_length=d.max_length, add_eos=add_eos, on_overflow=d.on_overflow)
        collate = functools.partial(batching.build_classification_batch, **common)
    # Several processes: each tokenises only its rows (jaxrlhf.distributed); rankings need every K.
    train_ex, train_report = tokenize_rows(train_rows, tok, shard=a.objective != "ranking")
    eval_ex, eval_report = tok(eval_rows)
    if a.objective == "ranking":
        n = max(len(ex.completion_ids) for ex in list(train_ex) + list(eval_ex))
        collate = functools.partial(batching.build_ranked_batch, num_completions=n, **common)
    return train_ex, eval_ex, collate, (train_report, eval_report)


def train(cfg: C.ExperimentConfig, resume: bool = False) -> dict:
    """Train a reward model / classifier on ``cfg.data``; writes the run directory and (``algo.export``)
    the model folder ``runs/<name>/reward_model`` (+ ``runs/<name>/hf_reward`` for scalar decoder models);
    returns the summary (+ ``normalization``, ``stats``, ``export_dir``, ``hf_export_dir``)."""
    a, d = cfg.algo, cfg.data
    run = core.start_run(cfg)
    backbone = core.load_policy(cfg.model, run.mesh)
    core.check_lengths(backbone.model_cfg, d.max_length, "data.max_length")
    num_outputs = a.num_labels if a.objective == "classification" else 1
    rm = RewardModel(nnx.merge(backbone.graphdef, backbone.params), num_outputs=num_outputs, pooling=a.pooling,
                     score_label=a.score_label, rngs=nnx.Rngs(cfg.train.seed))
    graphdef, params, stats = split_reward_model(rm)
    del rm
    train_ex, eval_ex, collate, (train_rep, eval_rep) = load_reward_data(cfg, backbone.tokenizer,
                                                                        backbone.model_cfg.is_decoder)
    log.info("data: %d train / %d eval examples; train %s; eval %s", len(train_ex), len(eval_ex),
             train_rep.summary(), eval_rep.summary())
    batches = BatchIterator(train_ex, d.batch_size, collate, seed=d.seed,
                            process_index=jax.process_index(), process_count=jax.process_count())
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    tr = core.trainable(cfg, params, backbone.model_cfg, run.mesh, train=("head",))  # LoRA: adapters + head
    state, sharding, position = core.init_or_restore(run, tr.params, tx, resume, extra=stats)
    step = jit_step(tr.step(reward_step), run.mesh, sharding, static_kwargs=dict(
        graphdef=graphdef, tx=tx, cfg=a, grad_accum_steps=cfg.optim.grad_accum_steps))
    micro = d.batch_size // cfg.optim.grad_accum_steps
    place = functools.partial(place_batch, mesh=run.mesh)
    place_all = functools.partial(place_global_batch, mesh=run.mesh)  # passes over data every process holds
    out_fn = jax.jit(functools.partial(reward_outputs, graphdef=graphdef))

    def evaluate(st) -> core.Evaluation:
        params = tr.model_params(st.params)
        outs, cat = core.map_batches(lambda b: out_fn(params, st.extra, b), eval_ex, collate, micro, place_all)
        return core.Evaluation(eval_metrics(a.objective, outs, cat))

    def normalize(st):
        """Reward mean 0 / std 1 over ``normalize_examples`` training examples drawn by a seeded permutation
        (files are often sorted by label, e.g. IMDB: positives first); written before the last checkpoint."""
        pick = np.random.default_rng(d.seed).permutation(len(train_ex))[:a.normalize_examples]
        ref = [train_ex[int(i)] for i in np.sort(pick)]
        params = tr.model_params(st.params)
        outs, cat = core.map_batches(lambda b: out_fn(params, st.extra, b), ref, collate, micro, place_all)
        mean, std = normalization_stats(real_rewards(a.objective, outs, cat))
        norm = {"reward_mean": mean, "reward_std": std, "examples": len(ref)}
        if jax.process_index() == 0:
            (run.dir.path / "reward_normalization.json").write_text(json.dumps(norm, indent=2))
        log.info("normalisation: mean %.4f std %.4f over %d examples", mean, std, len(ref))
        return st.replace(extra=jax.device_put(with_stats(jax.device_get(st.extra), mean, std), sharding.extra))

    def export(st) -> dict:
        norm_file = run.dir.path / "reward_normalization.json"
        out = {"normalization": json.loads(norm_file.read_text()) if norm_file.exists() else {},
               "stats": stats_of(jax.device_get(st.extra)), "export_dir": None, "hf_export_dir": None}
        if a.export:
            model = nnx.merge(graphdef, jax.device_get(tr.merged(st.params)), jax.device_get(st.extra))
            out["export_dir"] = str(save_reward_model(model, run.dir.path / "reward_model", backbone.tokenizer))
            log.info("exported reward model to %s (load with jaxrlhf.models.reward_model.load_reward_model)",
                     out["export_dir"])
            if model.num_outputs == 1 and model.is_decoder and model.pooling == "last":
                # The same model as transformers' *ForSequenceClassification (num_labels=1): TRL, AutoModel...
                path = export_hf_reward_model(model, run.dir.path / "hf_reward", backbone.tokenizer)
                out["hf_export_dir"] = str(path)
                log.info("exported a Hugging Face reward model to %s (AutoModelForSequenceClassification; add "
                         "config.json's jaxrlhf_reward_offset to its logit for this run's normalised score)", path)
        return out

    seqs = {"pairwise": 2, "ranking": None, "classification": 1}[a.objective]
    return core.drive(run, state, position, step_fn=step, batches=batches, place=place,
                      meta={"algo": "reward", "objective": a.objective},
                      evaluate=evaluate if eval_ex else None,
                      finalize=normalize if a.normalize_examples else None, export=export, step_args=tr.step_args,
                      tokens_per_step=d.batch_size * d.max_length * seqs if seqs else None)
