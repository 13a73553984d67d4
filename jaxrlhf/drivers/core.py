"""The shared driver core: everything a run does that is not its algorithm.

Every driver (:mod:`~jaxrlhf.drivers.sft`, :mod:`~jaxrlhf.drivers.reward`, :mod:`~jaxrlhf.drivers.dpo`,
:mod:`~jaxrlhf.drivers.rl`) is::

    run = start_run(cfg)                         # validate, mesh, runs/<name>/, config.json, checkpointer
    policy = load_policy(cfg.model)              # the model, split for pure steps
    train_rows, eval_rows = split_rows(cfg.data) # THE limit/split rule (below)
    ...                                          # the driver's own tokenisation, collate, step, eval
    state, sharding, position = init_or_restore(run, params, tx, resume)
    return drive(run, state, position, step_fn=..., batches=..., evaluate=..., sample=..., export=...)

:func:`drive` evaluates at step 0 (a fresh run) and at the last step, writes ``before``/``after``
samples, runs :func:`jaxrlhf.loop.train_loop` with its hooks, exports, and returns the summary.

The limit/split rule (:func:`split_rows`, the same for every driver): the held-out set is
``data.eval_size`` rows of ``data.source`` chosen by :func:`~jaxrlhf.data.iterator.train_eval_split`
(a hash of the row index and ``data.seed``; before tokenisation, so truncation never changes it) -- or
another source's rows when a driver has one; ``data.limit`` then draws a *seeded sample* of that many
training rows (never the first N of a file: files are often sorted, e.g. IMDB by label).

Config fields read here: ``cfg.name``, ``cfg.mesh``, ``cfg.model.{name,dtype,remat,allow_pickle}``,
``cfg.data.{source,split,eval_size,limit,seed,batch_size}``, ``cfg.optim.grad_accum_steps``,
``cfg.train.{run_dir,keep_checkpoints,steps,log_every,eval_every,save_every,stop_after,num_samples}``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from jaxrlhf import config as C
from jaxrlhf.checkpoint import Checkpointer, abstract_with_shardings
from jaxrlhf.data.iterator import train_eval_split
from jaxrlhf.data.tokenize import eos_ids_for, pad_id_for
from jaxrlhf.loop import Hooks, RunDir, train_loop
from jaxrlhf.sharding import check_batch_divisible, make_mesh
from jaxrlhf.train_state import TrainState, init_sharded_state

__all__ = [
    "Policy", "load_policy", "Run", "start_run", "init_or_restore", "split_rows", "greedy_samples",
    "PolicyEval", "policy_eval_for", "Evaluation", "drive", "run_summary",
]

log = logging.getLogger("jaxrlhf")


# ------------------------------------------------------------------------------------------- set-up

@dataclasses.dataclass
class Policy:
    """A loaded language model split for pure steps: ``model = nnx.merge(graphdef, params)``."""

    graphdef: nnx.GraphDef
    params: nnx.State
    model_cfg: Any
    tokenizer: Any
    source: str


def load_policy(spec: C.ModelSpec) -> Policy:
    """Load ``spec.name`` (short name, folder, .gguf or hub id) and apply the compute dtype, remat and
    layer-loop unrolling."""
    from jaxrlhf.models.hub import load_pretrained

    pre = load_pretrained(spec.name, allow_pickle=spec.allow_pickle)
    model = pre.model
    model.cfg = pre.cfg.replace(dtype=spec.dtype, remat=spec.remat,  # static: lives in the graphdef
                                scan_unroll=spec.scan_unroll)
    graphdef, params = nnx.split(model)
    return Policy(graphdef, params, model.cfg, pre.tokenizer, pre.source)


def check_lengths(model_cfg: Any, length: int, field: str) -> None:
    """A sequence of ``length`` tokens longer than the model supports is a config error, raised before
    compute; ``field`` names the config fields that make up ``length`` (e.g. ``data.max_length``)."""
    if length > model_cfg.max_position_embeddings:
        raise C.ConfigError(f"{field} = {length} exceeds the model's max_position_embeddings="
                            f"{model_cfg.max_position_embeddings}; lower it")


@dataclasses.dataclass
class Run:
    """What :func:`start_run` sets up: the validated config, the run folder, the mesh and the checkpointer."""

    cfg: C.ExperimentConfig
    dir: RunDir
    mesh: jax.sharding.Mesh
    checkpointer: Checkpointer


def start_run(cfg: C.ExperimentConfig, rows_per_device_step: int | None = None,
              rows_field: str = "data.batch_size/optim.grad_accum_steps") -> Run:
    """Validate against the devices present, build the mesh, create ``runs/<name>`` and write config.

    ``rows_per_device_step`` (default ``data.batch_size / optim.grad_accum_steps``) must split over the
    mesh's data axes (``ValueError`` naming ``rows_field`` otherwise).
    """
    C.validate(cfg, num_devices=jax.device_count())
    mesh = make_mesh(cfg.mesh)
    rows = cfg.data.batch_size // cfg.optim.grad_accum_steps if rows_per_device_step is None else rows_per_device_step
    check_batch_divisible(rows, mesh, rows_field)
    run_dir = RunDir(cfg.train.run_dir, cfg.name)
    run_dir.write_config(C.to_dict(cfg))
    return Run(cfg, run_dir, mesh, Checkpointer(run_dir.checkpoints, keep=cfg.train.keep_checkpoints))


def init_or_restore(run: Run, params: Any, tx: Any, resume: bool, extra: Any = None
                    ) -> tuple[TrainState, TrainState, dict | None]:
    """Fresh sharded state, or (``resume``) the latest checkpoint restored into the same shardings.

    Returns ``(state, state_sharding, data_position or None)``.

    Raises:
      FileExistsError: not ``resume`` but the run directory already holds checkpoints.
    """
    state, sharding = init_sharded_state(params, tx, run.mesh, extra)
    if not resume and run.checkpointer.latest_step() is not None:
        raise FileExistsError(
            f"{run.dir.checkpoints} already holds checkpoints; pass --resume to continue, or choose "
            "another --config.name (finished checkpoints are never overwritten)")
    if run.checkpointer.latest_step() is None:
        if resume:
            log.warning("--resume: no checkpoint in %s, starting from scratch", run.dir.checkpoints)
        if run.dir.truncate_after(-1):  # lines of an earlier attempt that left no checkpoint
            log.warning("%s: dropped the metrics/samples of an earlier attempt that left no checkpoint",
                        run.dir.path)
        return state, sharding, None
    abstract = abstract_with_shardings(state, sharding)
    del state
    state, data_position, _ = run.checkpointer.restore(abstract)
    run.dir.truncate_after(int(jax.device_get(state.step)))
    return state, sharding, data_position


# ------------------------------------------------------------------------------------------- rows

def sample_rows(rows, k: int, seed: int):
    """At most ``k`` rows drawn by a seeded permutation (kept in file order); all rows when ``k == 0``."""
    if not k or k >= len(rows):
        return rows
    idx = np.sort(np.random.default_rng(seed).permutation(len(rows))[:k])
    return rows.select(idx.tolist())


def split_rows(data: C.DataConfig, eval_source: str = "", eval_split: str = "test"):
    """``(train_rows, eval_rows)`` of ``data.source`` by THE limit/split rule (module docstring).

    The held-out set: ``data.eval_size`` rows picked by ``train_eval_split(len(rows), data.eval_size,
    seed=data.seed)`` -- or, with ``eval_source``, that source's ``eval_split`` (a seeded sample of
    ``data.eval_size`` rows when > 0). The training rows: the rest, a seeded sample of ``data.limit``
    rows when > 0. Both keep file order.
    """
    from jaxrlhf.data.sources import load_rows

    rows = load_rows(data.source, split=data.split)
    if eval_source:
        train_rows = rows
        eval_rows = sample_rows(load_rows(eval_source, split=eval_split), data.eval_size, data.seed + 1)
    else:
        train_idx, eval_idx = train_eval_split(len(rows), data.eval_size, seed=data.seed)
        train_rows, eval_rows = rows.select(train_idx.tolist()), rows.select(eval_idx.tolist())
    return sample_rows(train_rows, data.limit, data.seed), eval_rows


def use_chat_template(data: C.DataConfig, tokenizer: Any) -> bool:
    """``data.use_chat_template``, and the tokenizer has a template."""
    return bool(data.use_chat_template and getattr(tokenizer, "chat_template", None) is not None)


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


# ------------------------------------------------------------------------------------------- samples

def complete_prompt_ids(graphdef, params, tokenizer, prompt_ids: list, *, max_new_tokens: int,
                        temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Greedy (or sampled) completions of already-tokenized prompts, decoded to text."""
    from jaxrlhf.data.batching import build_prompt_batch
    from jaxrlhf.sampling import SamplingConfig, sample

    model_cfg = nnx.merge(graphdef, params).cfg
    pad = pad_id_for(tokenizer)
    P = max(len(p) for p in prompt_ids)
    batch = build_prompt_batch([np.asarray(p) for p in prompt_ids], P, pad)
    scfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                          eos_token_ids=eos_ids_for(tokenizer, model_cfg), pad_token_id=pad)
    out = jax.device_get(sample((graphdef, params), batch["prompt_tokens"], batch["prompt_mask"],
                                jax.random.key(seed), scfg))
    return [tokenizer.decode(t[m > 0], skip_special_tokens=True)
            for t, m in zip(out.completion_tokens_BN, out.completion_mask_BN)]


def greedy_samples(policy: Policy, prompt_ids: list, max_new_tokens: int) -> Callable[[Any], list[dict]]:
    """``sample(state) -> [{"prompt", "completion"}]``: greedy completions of fixed held-out prompts by
    ``state.params`` (for :func:`drive`'s before/after samples)."""

    def sample(state) -> list[dict]:
        if not prompt_ids:
            return []
        texts = complete_prompt_ids(policy.graphdef, state.params, policy.tokenizer, prompt_ids,
                                    max_new_tokens=max_new_tokens)
        prompts = [policy.tokenizer.decode(p, skip_special_tokens=False) for p in prompt_ids]
        return [{"prompt": p, "completion": c} for p, c in zip(prompts, texts)]

    return sample


# ------------------------------------------------------------------------------------------- policy evaluation

class PolicyEval(NamedTuple):
    """The study's evaluation of a run's policy (``cfg.policy_eval``): the evaluator and how to read the
    policy's parameters out of the train state."""

    evaluator: Any  # jaxrlhf.policy_eval.PolicyEvaluator
    params_of: Callable[[Any], Any]


def policy_eval_for(cfg: C.ExperimentConfig, policy: Policy, params_of: Callable[[Any], Any]) -> PolicyEval | None:
    """:class:`PolicyEval` of ``cfg.policy_eval`` (None when the section is unset). π_ref is the run's
    initial policy (``policy.params``; call this before the driver lets go of them), or the model named
    by ``policy_eval.reference`` (which must have the policy's architecture).

    Raises:
      ConfigError: ``policy_eval.reference`` has another architecture than the policy, or
        ``policy_eval.max_prompt_length + max_new_tokens`` exceeds the model's context.
    """
    spec = cfg.policy_eval
    if spec is None:
        return None
    from jaxrlhf.policy_eval import build_policy_evaluator

    check_lengths(policy.model_cfg, spec.max_prompt_length + spec.max_new_tokens,
                  "policy_eval.max_prompt_length + policy_eval.max_new_tokens")
    ref_params = policy.params
    if spec.reference and spec.reference != cfg.model.name:
        ref = load_policy(dataclasses.replace(cfg.model, name=spec.reference))
        layout = lambda p: (jax.tree.structure(p), [x.shape for x in jax.tree.leaves(p)])  # noqa: E731
        if layout(ref.params) != layout(policy.params):
            raise C.ConfigError(f"policy_eval.reference={spec.reference!r} has another architecture than "
                                f"model.name={cfg.model.name!r}; the KL needs both on the same tokens")
        ref_params = ref.params
    evaluator = build_policy_evaluator(spec, graphdef=policy.graphdef, ref_params=ref_params,
                                       tokenizer=policy.tokenizer, model_cfg=policy.model_cfg)
    return PolicyEval(evaluator, params_of)


# ------------------------------------------------------------------------------------------- the drive

class Evaluation(NamedTuple):
    """What a driver's ``evaluate(state)`` returns: held-out ``metrics`` and, optionally, the ``samples``
    ``[{"prompt", "completion", ...}]`` it generated on the way (the RL eval samples completions anyway)."""

    metrics: dict
    samples: list = []


def drive(run: Run, state: Any, position: dict | None, *, step_fn: Callable, batches: Iterator,
          place: Callable, meta: dict, evaluate: Callable[[Any], Evaluation] | None = None,
          sample: Callable[[Any], list[dict]] | None = None, after_step: Callable | None = None,
          finalize: Callable[[Any], Any] | None = None, export: Callable[[Any], dict] | None = None,
          step_args: tuple = (), pass_step: bool = False, tokens_per_step: int | None = None,
          policy_eval: PolicyEval | None = None) -> dict:
    """Train ``state`` to ``cfg.train.steps`` with :func:`jaxrlhf.loop.train_loop` and write the run.

    What every driver gets from here, in order:

    1. ``batches.set_state(position)`` on a resumed run;
    2. on a fresh run (step 0): ``evaluate(state)`` logged as the step-0 ``eval`` row, and ``before``
       samples (``sample(state)``, else the evaluation's samples; ``train.num_samples`` of them);
       ``policy_eval`` (the study's one evaluation, :func:`policy_eval_for`) joins every ``eval`` row
       with its metrics (they win a name clash) and writes its samples tagged ``policy_eval``;
    3. the loop (``eval`` every ``train.eval_every`` steps and at the last step, ``finalize`` before the
       last checkpoint, ``after`` samples at the last step, ``stop_after`` honoured);
    4. at the last step ``export(state) -> dict`` on process 0 (merged into the summary);
    5. the summary: ``run_dir``, ``train_loss_first``/``_last``, ``eval_before``/``_after`` (the first and
       last ``eval`` rows of ``metrics.jsonl``), ``samples_before``/``_after``, ``state``.
    """
    cfg = run.cfg
    n_samples = cfg.train.num_samples
    if position:
        batches.set_state(position)
    written: dict[str, list] = {"before": [], "after": []}
    last_eval: list = []  # the samples of the most recent evaluation (for drivers without `sample`)

    def eval_metrics(st) -> dict:
        metrics: dict = {}
        if evaluate is not None:
            ev = evaluate(st)
            last_eval[:] = list(ev.samples)
            metrics.update(ev.metrics)
        if policy_eval is not None:
            step_no = int(jax.device_get(st.step))
            pe_metrics, pe_samples = policy_eval.evaluator(policy_eval.params_of(st))
            metrics.update(pe_metrics)
            run.dir.write_samples(step_no, [dict(x, tag="policy_eval") for x in pe_samples])
        return metrics

    def write_samples(st, tag: str, step_no: int) -> None:
        out = sample(st) if sample is not None else last_eval
        out = [dict(s, tag=tag) for s in out[:n_samples]]
        run.dir.write_samples(step_no, out)
        written[tag] = out

    has_eval = evaluate is not None or policy_eval is not None
    start = int(jax.device_get(state.step))
    if start == 0:
        if has_eval:
            run.dir.log(0, eval_metrics(state), split="eval")
        if n_samples:
            write_samples(state, "before", 0)
    hooks = Hooks(evaluate=eval_metrics if has_eval else None, after_step=after_step,
                  finalize=finalize, at_end=(lambda st, s: write_samples(st, "after", s)) if n_samples else None)
    try:  # NonFiniteError / Preempted leave the finished checkpoints as they are (jaxrlhf.loop)
        state = train_loop(state=state, step_fn=step_fn, batches=batches, place=place,
                           total_steps=cfg.train.steps, run=run.dir, checkpointer=run.checkpointer,
                           data_position=batches.get_state, meta=meta, log_every=cfg.train.log_every,
                           eval_every=(cfg.train.eval_every or cfg.train.steps) if has_eval else 0,
                           save_every=cfg.train.save_every, hooks=hooks, tokens_per_step=tokens_per_step,
                           step_args=step_args, pass_step=pass_step, stop_after=cfg.train.stop_after)
    except BaseException:
        run.checkpointer.close()
        run.dir.close()
        raise
    extra: dict = {}
    if int(jax.device_get(state.step)) == cfg.train.steps and export is not None and jax.process_index() == 0:
        extra = export(state)
    run.checkpointer.close()
    run.dir.close()
    return run_summary(run, state, samples_before=written["before"], samples_after=written["after"], **extra)


def run_summary(run: Run, state: Any, **extra) -> dict:
    """The summary every driver returns: first/last train loss, first/last eval rows, run dir, state."""
    metrics = run.dir.read_metrics()
    train_losses = [m["loss"] for m in metrics if m["split"] == "train" and "loss" in m]
    evals = [m for m in metrics if m["split"] == "eval"]
    summary = {"run_dir": str(run.dir.path),
               "train_loss_first": train_losses[0] if train_losses else None,
               "train_loss_last": train_losses[-1] if train_losses else None,
               "eval_before": evals[0] if evals and evals[0]["step"] == 0 else None,
               "eval_after": evals[-1] if evals and evals[-1]["step"] == run.cfg.train.steps else None,
               "samples_before": [], "samples_after": [], "state": state}
    summary.update(extra)
    return summary
