"""The shared driver core: everything a run does that is not its algorithm.

Every driver (:mod:`~jaxrlhf.drivers.sft`, :mod:`~jaxrlhf.drivers.reward`, :mod:`~jaxrlhf.drivers.dpo`,
:mod:`~jaxrlhf.drivers.rl`) is::

    run = start_run(cfg)                         # validate, mesh, runs/<name>/, config.json, checkpointer
    policy = load_policy(cfg.model, run.mesh)    # the model (heads checked against the mesh), split
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

LoRA (``cfg.model.lora``): :func:`trainable` / :func:`policy_trainable` split the model into what the state
trains (adapters, + heads) and the frozen base that every step receives as an argument; a driver uses the
returned :class:`Trainable` for its state, step (``tr.step(step_fn)``, ``step_args=tr.step_args``), eval
(``tr.model_params``) and export (``tr.merged``), each the identity without LoRA.

Config fields read here: ``cfg.name``, ``cfg.mesh``, ``cfg.model.{name,dtype,remat,allow_pickle,lora}``,
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

from jaxrlhf import compile_stats
from jaxrlhf import config as C
from jaxrlhf.checkpoint import Checkpointer, abstract_with_shardings
from jaxrlhf.data.iterator import train_eval_split
from jaxrlhf.data.tokenize import eos_ids_for, pad_id_for
from jaxrlhf.distributed import host_copy
from jaxrlhf.errors import CheckpointExistsError, DataError
from jaxrlhf.loop import Hooks, RunDir, train_loop
from jaxrlhf.sharding import check_batch_divisible, check_heads_divisible, make_mesh
from jaxrlhf.train_state import TrainState, init_sharded_state

__all__ = [
    "Policy", "load_policy", "Run", "start_run", "init_or_restore", "split_rows", "greedy_samples",
    "PolicyEval", "policy_eval_for", "Evaluation", "drive", "run_summary", "Trainable", "trainable",
    "policy_trainable",
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


def load_policy(spec: C.ModelSpec, mesh: jax.sharding.Mesh | None = None) -> Policy:
    """Load ``spec.name`` (short name, folder, .gguf or hub id) and apply the compute dtype, remat and
    layer-loop unrolling.

    Raises:
      ModelError: the model cannot be loaded (see :func:`jaxrlhf.models.hub.load_pretrained`).
      MeshError: ``mesh``'s tensor axis does not divide the model's heads
        (:func:`jaxrlhf.sharding.check_heads_divisible`), checked before anything is compiled.
    """
    from jaxrlhf.models.hub import load_pretrained

    pre = load_pretrained(spec.name, allow_pickle=spec.allow_pickle)
    if mesh is not None:
        check_heads_divisible(pre.cfg, mesh)
    model = pre.model
    model.cfg = pre.cfg.replace(dtype=spec.dtype, remat=spec.remat,  # static: lives in the graphdef
                                scan_unroll=spec.scan_unroll)
    graphdef, params = nnx.split(model)
    return Policy(graphdef, params, model.cfg, pre.tokenizer, pre.source)


@dataclasses.dataclass
class Trainable:
    """What a driver optimises: every weight (full fine-tuning) or LoRA adapters on frozen base weights
    (``cfg.model.lora``, :mod:`jaxrlhf.models.lora`). Made by :func:`trainable` / :func:`policy_trainable`;
    without LoRA every method below is the identity, so a full fine-tuning run is unchanged.

    Attributes:
      params: the train state's params: the model's ``nnx.State``, or with LoRA the adapters plus the
        sub-trees trained in full (a reward model's head).
      base: LoRA's frozen base params, placed on the mesh by the rules table (one copy; it is also the
        reference model); None without LoRA.
      lora: the :class:`~jaxrlhf.config.LoraConfig`, or None.
      seed: seed of the adapters' dropout keys (``train.seed``).
    """

    params: Any
    base: Any = None
    lora: Any = None
    seed: int = 0

    @property
    def step_args(self) -> tuple:
        """Leading extra arguments of a :meth:`step`-wrapped step: ``(base,)`` with LoRA, else ``()``."""
        return () if self.base is None else (self.base,)

    def bind(self, graphdef: Any, base: Any, step: Any = None) -> Any:
        """``graphdef`` with the (traced) ``base`` bound (:func:`jaxrlhf.models.lora.bind`); the dropout key is
        ``fold_in(key(seed), step)`` when ``lora.dropout > 0`` and ``step`` is given, else None."""
        from jaxrlhf.models import lora as L

        key = None
        if step is not None and self.lora.dropout > 0:
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), 0x10A), step)
        return L.bind(graphdef, base, self.lora, key)

    def step(self, step_fn: Callable, graph_kw: str = "graphdef") -> Callable:
        """``step_fn`` for :func:`jaxrlhf.train_state.jit_step`. With LoRA: ``(state, batch, base, *rest, **kw)
        -> step_fn(state, batch, *rest, **kw)`` with ``kw[graph_kw]`` bound to ``base`` (dropout key from
        ``state.step``); pass :attr:`step_args` before the step's own extra arguments."""
        if self.base is None:
            return step_fn

        def lora_step(state, batch, base, *rest, **kw):
            kw[graph_kw] = self.bind(kw[graph_kw], base, state.step)
            return step_fn(state, batch, *rest, **kw)

        return lora_step

    def model_params(self, params: Any) -> Any:
        """The model's ``nnx.State`` for evaluation and sampling: ``params`` + the base, adapters factored
        (:func:`jaxrlhf.models.lora.with_adapters`, no dropout, no copy)."""
        from jaxrlhf.models import lora as L

        return params if self.base is None else L.with_adapters(self.base, params, self.lora)

    def on_model(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``fn(state)`` that reads ``state.params`` as the model's params: with LoRA it gets the state with
        :meth:`model_params` in place of the adapters (for :func:`greedy_samples` and the like)."""
        if self.base is None:
            return fn
        return lambda st: fn(st.replace(params=self.model_params(st.params)))

    def merged(self, params: Any) -> Any:
        """Plain params with the adapters folded into the weights (:func:`jaxrlhf.models.lora.merge_weights`),
        for export."""
        from jaxrlhf.models import lora as L

        return params if self.base is None else L.merge_weights(self.base, params, self.lora)


def trainable(cfg: C.ExperimentConfig, params: Any, model_cfg: Any, mesh: Any, *, train: Sequence[str] = ()
              ) -> Trainable:
    """``Trainable(params)`` (no ``cfg.model.lora``), or LoRA's split of ``params``: adapters on
    ``model.lora.targets`` (+ the top-level sub-trees ``train``, trained in full) and the frozen rest placed
    on ``mesh`` (:func:`jaxrlhf.models.lora.init_lora`; adapters from ``key(train.seed)``).

    Raises:
      ConfigError: a ``model.lora.targets`` entry the model's family does not have, or a family without
        LoRA projections.
    """
    lora = cfg.model.lora
    if lora is None:
        return Trainable(params)
    from jaxrlhf.models import lora as L
    from jaxrlhf.sharding import state_shardings

    table = L.PROJECTIONS.get(model_cfg.family)
    if table is None:
        raise C.ConfigError(f"model.lora is not supported for model family {model_cfg.family!r} "
                            f"(supported: {sorted(L.PROJECTIONS)}); set model.lora=None")
    bad = [t for t in lora.targets if t not in table]
    if bad:
        raise C.ConfigError(f"model.lora.targets {bad} are not projections of this {model_cfg.family} model "
                            f"({cfg.model.name}); choose among {sorted(table)}")
    params, base = L.init_lora(params, lora, model_cfg, jax.random.fold_in(jax.random.key(cfg.train.seed), 0x10A),
                               train=train)
    base = jax.device_put(base, state_shardings(base, mesh))
    n_train, n_base = L.num_params(params), L.num_params(base)
    log.info("LoRA rank %d on %s: %d trainable parameters (%.3f%% of the %d frozen)", lora.rank,
             ",".join(lora.targets), n_train, 100.0 * n_train / max(n_base, 1), n_base)
    return Trainable(params, base, lora, cfg.train.seed)


def policy_trainable(run: Run, policy: Policy) -> Trainable:
    """:func:`trainable` for a policy; with LoRA, ``policy.params`` becomes the placed frozen base (the
    initial policy and reference model, which the adapters start equal to)."""
    tr = trainable(run.cfg, policy.params, policy.model_cfg, run.mesh)
    if tr.base is not None:
        policy.params = tr.base
    return tr


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
      CheckpointExistsError: (a FileExistsError) not ``resume`` but the run directory already holds
        checkpoints.
      CheckpointError: ``resume`` and the latest checkpoint was saved from another model (shapes differ).
    """
    if not resume and run.checkpointer.latest_step() is not None:  # checked before any compile
        raise CheckpointExistsError(
            f"{run.dir.checkpoints} already holds checkpoints; pass --resume to continue, or choose "
            "another --config.name (finished checkpoints are never overwritten)")
    state, sharding = init_sharded_state(params, tx, run.mesh, extra)
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

    Raises:
      DataError: the source holds no rows, or ``data.eval_size`` holds out all of them (and the errors of
        :func:`jaxrlhf.data.sources.load_rows`: missing file, broken JSON line, ...).
    """
    from jaxrlhf.data.sources import load_rows

    rows = load_rows(data.source, split=data.split)
    if len(rows) == 0:
        raise DataError(f"data.source={data.source!r} (split {data.split!r}) holds no rows; give data with rows")
    if not eval_source and data.eval_size >= len(rows):
        raise DataError(f"data.eval_size={data.eval_size} holds out every row of data.source={data.source!r} "
                        f"({len(rows)} rows), leaving none to train on; lower data.eval_size")
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
    rows); returns ``(outputs, batches)`` concatenated on the host, padding rows included.

    Several processes: every process passes the same ``examples`` (a replicated held-out set), so
    ``place`` should be :func:`~jaxrlhf.sharding.place_global_batch` (the batch is the global batch);
    the outputs are gathered to every host (:func:`jaxrlhf.distributed.host_copy`, a collective)."""
    outs, batches = [], []
    for i in range(0, len(examples), batch_size):
        b = collate(list(examples[i:i + batch_size]), batch_size=batch_size)
        outs.append(host_copy(fn(place(b))))
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
    by ``policy_eval.reference`` (which must have the policy's architecture). ``cfg.safety_eval`` (the
    safety evaluation, :mod:`jaxrlhf.safety`) joins it: its metrics are added to the same ``eval`` rows.

    Raises:
      ConfigError: ``policy_eval.reference`` has another architecture than the policy, or
        ``policy_eval.max_prompt_length + max_new_tokens`` (or ``safety_eval``'s) exceeds the model's context.
    """
    spec = cfg.policy_eval
    safety = _safety_evaluator(cfg, policy)
    if spec is None:
        return None if safety is None else PolicyEval(safety, params_of)
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
    return PolicyEval(evaluator if safety is None else _joined(evaluator, safety), params_of)


def _safety_evaluator(cfg: C.ExperimentConfig, policy: Policy):
    """``jaxrlhf.safety.SafetyEvaluator`` of ``cfg.safety_eval`` (None when unset)."""
    spec = getattr(cfg, "safety_eval", None)
    if spec is None:
        return None
    from jaxrlhf.safety import build_safety_evaluator

    check_lengths(policy.model_cfg, spec.max_prompt_length + spec.max_new_tokens,
                  "safety_eval.max_prompt_length + safety_eval.max_new_tokens")
    return build_safety_evaluator(spec, graphdef=policy.graphdef, tokenizer=policy.tokenizer,
                                  model_cfg=policy.model_cfg)


def _joined(*evaluators: Callable):
    """One evaluator ``params -> (metrics, samples)`` running each in turn (later metrics win a clash)."""

    def evaluate(params):
        metrics, samples = {}, []
        for ev in evaluators:
            m, s = ev(params)
            metrics.update(m)
            samples += s
        return metrics, samples

    return evaluate


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
    compile_stats.report_startup(run, step_fn, state, batches, place, step_args, f"{meta.get('algo', 'train')} step")
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
    if int(jax.device_get(state.step)) == cfg.train.steps and export is not None:
        # Several processes: all take part in copying the (possibly cross-host sharded) weights; process 0 writes.
        host = host_copy(state.replace(opt_state=None)) if jax.process_count() > 1 else state
        if jax.process_index() == 0:
            extra = export(host)
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
