"""Shared set-up of a run: validate, mesh, run directory, model, train state, resume.

Each algorithm's ``train(cfg, resume)`` (in ``jaxrlhf/algos``) composes these pieces with its own step;
:func:`run_experiment` dispatches on ``cfg.algo.kind``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
from flax import nnx

from jaxrlhf import config as C
from jaxrlhf.checkpoint import Checkpointer, abstract_with_shardings
from jaxrlhf.loop import RunDir
from jaxrlhf.sharding import check_batch_divisible, make_mesh
from jaxrlhf.train_state import TrainState, init_sharded_state

log = logging.getLogger("jaxrlhf")


@dataclasses.dataclass
class Policy:
    """A loaded language model split for pure steps: ``model = nnx.merge(graphdef, params)``."""

    graphdef: nnx.GraphDef
    params: nnx.State
    model_cfg: Any
    tokenizer: Any
    source: str


def load_policy(spec: C.ModelSpec) -> Policy:
    """Load ``spec.name`` (short name, folder, .gguf or hub id) and apply the compute dtype / remat."""
    from jaxrlhf.models.hub import load_pretrained

    pre = load_pretrained(spec.name, allow_pickle=spec.allow_pickle)
    model = pre.model
    model.cfg = pre.cfg.replace(dtype=spec.dtype, remat=spec.remat)  # static: lives in the graphdef
    graphdef, params = nnx.split(model)
    return Policy(graphdef, params, model.cfg, pre.tokenizer, pre.source)


def check_lengths(cfg: C.ExperimentConfig, model_cfg: Any, extra_tokens: int = 0) -> None:
    """A sequence longer than the model supports is a config error, raised before compute."""
    need = cfg.data.max_length + extra_tokens
    if need > model_cfg.max_position_embeddings:
        raise C.ConfigError(
            f"data.max_length={cfg.data.max_length}"
            + (f" (+{extra_tokens} new tokens)" if extra_tokens else "")
            + f" exceeds the model's max_position_embeddings={model_cfg.max_position_embeddings}; "
            "lower data.max_length")


@dataclasses.dataclass
class Run:
    cfg: C.ExperimentConfig
    dir: RunDir
    mesh: jax.sharding.Mesh
    checkpointer: Checkpointer


def start_run(cfg: C.ExperimentConfig) -> Run:
    """Validate against the devices present, build the mesh, create ``runs/<name>`` and write config."""
    C.validate(cfg, num_devices=jax.device_count())
    mesh = make_mesh(cfg.mesh)
    check_batch_divisible(cfg.data.batch_size // cfg.optim.grad_accum_steps, mesh, "data.batch_size")
    run_dir = RunDir(cfg.train.run_dir, cfg.name)
    run_dir.write_config(C.to_dict(cfg))
    return Run(cfg, run_dir, mesh, Checkpointer(run_dir.checkpoints, keep=cfg.train.keep_checkpoints))


def init_or_restore(run: Run, params: Any, tx: Any, resume: bool, extra: Any = None
                    ) -> tuple[TrainState, TrainState, dict | None]:
    """Fresh sharded state, or (``resume``) the latest checkpoint restored into the same shardings.

    Returns ``(state, state_sharding, data_position or None)``.
    """
    state, sharding = init_sharded_state(params, tx, run.mesh, extra)
    if not resume:
        if run.checkpointer.latest_step() is not None:
            raise FileExistsError(
                f"{run.dir.checkpoints} already holds checkpoints; pass --resume to continue, or choose "
                "another --config.name (finished checkpoints are never overwritten)")
        return state, sharding, None
    if run.checkpointer.latest_step() is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch", run.dir.checkpoints)
        return state, sharding, None
    abstract = abstract_with_shardings(state, sharding)
    del state
    state, data_position, _ = run.checkpointer.restore(abstract)
    run.dir.truncate_metrics_after(int(jax.device_get(state.step)))
    return state, sharding, data_position


# algo.kind -> module whose ``train(cfg, resume)`` runs it (imported lazily: drivers pull in data/models).
DRIVERS: dict[str, str] = {
    "sft": "jaxrlhf.algos.sft",
    "ppo": "jaxrlhf.algos.ppo",
    "grpo": "jaxrlhf.algos.grpo",
    "rloo": "jaxrlhf.algos.grpo",
    "reward": "jaxrlhf.algos.reward",
    "dpo": "jaxrlhf.algos.dpo",
}


def run_experiment(cfg: C.ExperimentConfig, resume: bool = False) -> dict:
    """Dispatch to the algorithm's driver; returns its summary dict."""
    import importlib

    kind = getattr(cfg.algo, "kind", None)
    if kind not in DRIVERS:
        raise C.ConfigError(f"algo.kind={kind!r} has no driver; known: {sorted(DRIVERS)}")
    return importlib.import_module(DRIVERS[kind]).train(cfg, resume=resume)


def quiet_logs() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("absl", "orbax", "jax._src", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)


def complete_prompt_ids(graphdef, params, tokenizer, prompt_ids: list, *, max_new_tokens: int,
                        temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Greedy (or sampled) completions of already-tokenized prompts, decoded to text (samples hook)."""
    import numpy as np

    from jaxrlhf.data.batching import build_prompt_batch
    from jaxrlhf.data.tokenize import pad_id_for
    from jaxrlhf.sampling import SamplingConfig, sample

    model_cfg = nnx.merge(graphdef, params).cfg
    eos = tuple(model_cfg.eos_token_ids) or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
    P = max(len(p) for p in prompt_ids)
    batch = build_prompt_batch([np.asarray(p) for p in prompt_ids], P, pad_id_for(tokenizer))
    scfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, eos_token_ids=eos,
                          pad_token_id=pad_id_for(tokenizer))
    out = jax.device_get(sample((graphdef, params), batch["prompt_tokens"], batch["prompt_mask"],
                                jax.random.key(seed), scfg))
    return [tokenizer.decode(t[m > 0], skip_special_tokens=True)
            for t, m in zip(out.completion_tokens_BN, out.completion_mask_BN)]


def sample_hook(run: Run, policy: Policy, prompt_ids: list, max_new_tokens: int):
    """``samples(state, tag, step) -> list[dict]``: greedy completions of fixed held-out prompts, written
    to ``samples.jsonl`` with ``tag`` (``before``/``after``), for eyeballing what training changed."""

    def samples(state, tag: str, step_no: int) -> list[dict]:
        if not prompt_ids:
            return []
        texts = complete_prompt_ids(policy.graphdef, state.params, policy.tokenizer, prompt_ids,
                                    max_new_tokens=max_new_tokens)
        prompts = [policy.tokenizer.decode(p, skip_special_tokens=False) for p in prompt_ids]
        out = [{"tag": tag, "prompt": p, "completion": c} for p, c in zip(prompts, texts)]
        run.dir.write_samples(step_no, out)
        return out

    return samples


def run_summary(run: Run, state: Any, **extra) -> dict:
    """The summary every driver returns: first/last train loss, first/last eval metrics, run dir."""
    metrics = run.dir.read_metrics()
    train_losses = [m["loss"] for m in metrics if m["split"] == "train" and "loss" in m]
    evals = [m for m in metrics if m["split"] == "eval"]
    summary = {"run_dir": str(run.dir.path),
               "train_loss_first": train_losses[0] if train_losses else None,
               "train_loss_last": train_losses[-1] if train_losses else None,
               "eval_before": evals[0] if evals else None, "eval_after": evals[-1] if evals else None,
               "samples_before": [], "samples_after": [], "state": state}
    summary.update(extra)
    return summary
