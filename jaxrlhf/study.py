"""The study runner: stages reused by config hash, then arms x seeds with skip / resume / fail-and-go-on.

A :class:`Study` is a list of :class:`Stage` (shared work: SFT reference, gold classifier, preference
data, proxy reward model) and a list of :class:`Arm` (one training run each: method, seed, hparams).
:func:`run_study` runs it with one progress bar; :func:`study_main` is the ``jaxrlhf study`` front end.
Everything the runner calls is injected (``Stage.run``, ``Arm.make_config``, ``run_arm``), so this module
imports no model, driver or config code.

Folder layout (``study_dir = <root>/<study name>``)::

    study_dir/study.json                      versions, device, stages (hash, config) and every arm's
                                              config dict; rewritten at each run (layout: study_record)
    study_dir/.jax_cache/                     JAX persistent compilation cache
    study_dir/stages/<stage>/done.json        {"stage", "hash", "config", "deps": {dep: hash}, "outputs",
                                               "wall_s", "compilations": {...}, "finished"}
    study_dir/stages/<stage>/...              whatever Stage.run writes into its folder
    study_dir/arms/<arm>/status.json          {"arm", "method", "seed", "hparams", "group", "status":
                                               "running"|"done"|"failed", "config_hash", "resumed",
                                               "started", "finished", "wall_s", "compilations": {...},
                                               "summary" (done: JSON-able parts of run_arm's return),
                                               "error_type", "error", "traceback" (failed)}
    study_dir/arms/<arm>/{config.json, metrics.jsonl, samples.jsonl, tb/, checkpoints/}
                                              written by the arm's own run (jaxrlhf.loop.RunDir);
                                              checkpoints/ is removed once the arm is done unless
                                              Study.keep_checkpoints
    study_dir/stale/<arm or stage>-<old hash[:8]>-<time>/
                                              a folder moved aside before a fresh run (config changed,
                                              or a failed arm left no checkpoint): never deleted

How an arm's run folder is chosen: the runner owns ``study_dir/arms/<arm name>``. ``Arm.make_config``
receives the stage outputs plus the key ``"_arm_dir"`` (that folder, a str) and ``"_study_dir"``; the config
it returns must make the run write there -- with :class:`jaxrlhf.config.ExperimentConfig` that is
``train.run_dir, name = arm_run_dir(outputs)`` (the parent folder and the arm name). When
``run_arm`` returns a summary whose ``"run_dir"`` resolves elsewhere, the arm is recorded as failed.

Hashes: a stage's hash is sha256 of ``{"config": config, "deps": {dep: dep hash}}`` (sorted JSON), so a
changed upstream stage changes every stage below it. An arm's hash is sha256 of ``{"config":
to_dict(config), "stages": {stage: hash}}``: any re-run stage re-runs every arm.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import fnmatch
import hashlib
import itertools
import json
import logging
import pathlib
import platform
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from jaxrlhf.errors import JaxrlhfError, Preempted, StudyError, report_error
from jaxrlhf.host_memory import release_free_memory

__all__ = [
    "Stage", "Arm", "Study", "StudyResult", "expand_grid", "arm_run_dir", "run_study", "study_main",
    "CompilationCounter", "setup_compilation_cache", "environment_record",
]

log = logging.getLogger("jaxrlhf")

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch: every XLA compile
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"  # jax._src.compiler: served from the persistent cache
VERSION_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "transformers", "torch")


@dataclasses.dataclass(frozen=True)
class Stage:
    """Shared work run once per config: ``run(config, outputs_of_earlier_stages, folder) -> outputs``.

    ``config`` and the returned outputs must be JSON-able (outputs are saved in ``done.json`` and reused
    on a re-run; downstream stages and arms always see the JSON round-tripped outputs, cached or fresh).
    ``deps`` names earlier stages whose hash enters this one's. ``cost`` weights the progress bar.
    """

    name: str
    config: dict
    run: Callable[[dict, dict[str, dict], pathlib.Path], dict]
    deps: tuple[str, ...] = ()
    cost: float = 1.0


@dataclasses.dataclass(frozen=True)
class Arm:
    """One training run. ``make_config(outputs) -> experiment config`` (opaque to the runner), where
    ``outputs`` maps stage name -> stage outputs plus ``"_arm_dir"`` / ``"_study_dir"`` (see module doc).
    ``cost`` weights the progress bar (e.g. training steps); ``group`` labels the arm's seed group in the
    report (default: method and hparams)."""

    name: str
    method: str
    seed: int
    hparams: dict
    make_config: Callable[[dict[str, dict]], Any]
    cost: float = 1.0
    group: str = ""

    @property
    def group_label(self) -> str:
        return self.group or _slug(self.method + "".join(f"-{k}{_fmt(v)}" for k, v in sorted(self.hparams.items())))


@dataclasses.dataclass(frozen=True)
class Study:
    """Stages (in dependency order) and arms; everything lives in ``<root>/<name>``.

    ``keep_checkpoints``: keep a finished arm's ``checkpoints/`` (False: they are removed once the arm is
    done; they exist to resume an interrupted arm, and a 135M-parameter PPO state with its critic and
    AdamW moments is ~2 GB per checkpoint, so 20 arms would fill a disk). The arm's metrics, samples,
    config, TensorBoard logs and status stay.

    ``report_metrics``: the eval metrics of the report's table (default: the policy-evaluation metrics,
    :data:`jaxrlhf.study_report.DEFAULT_METRICS`).
    """

    name: str
    stages: tuple[Stage, ...]
    arms: tuple[Arm, ...]
    root: str = "runs"
    keep_checkpoints: bool = False
    report_metrics: tuple[str, ...] = ()

    @property
    def dir(self) -> pathlib.Path:
        return pathlib.Path(self.root) / self.name


@dataclasses.dataclass
class StudyResult:
    """What :func:`run_study` did. Actions: stages ``cached``/``run``; arms ``skip``/``resume``/``run``/
    ``retry`` (was failed) or ``not selected``; ``statuses`` holds each run arm's final status.json."""

    study_dir: pathlib.Path
    stage_actions: dict[str, str]
    arm_actions: dict[str, str]
    statuses: dict[str, dict]
    stage_outputs: dict[str, dict]

    @property
    def failed(self) -> list[str]:
        return [a for a, s in self.statuses.items() if s.get("status") == "failed"]


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", s)


def expand_grid(method: str, base_hparams: dict, sweep: dict[str, list], seeds: Sequence[int],
                make_config_for: Callable[[dict, int], Callable[[dict[str, dict]], Any]], *,
                cost: float = 1.0) -> list[Arm]:
    """Arms for every combination of ``sweep`` values x ``seeds``, seed-major (all combinations at seed
    ``seeds[0]`` first, so a study stopped early has each setting at one seed).

    Names read ``<method>-<key><value>...-s<seed>`` over the swept keys only (``dpo-beta0.1-s0``); each
    arm's hparams are ``{**base_hparams, **combination}`` (a swept key overrides a base key). Raises
    :class:`~jaxrlhf.errors.StudyError` (a ValueError) when ``seeds`` or a sweep list is empty.
    """
    if not seeds:
        raise StudyError(f"expand_grid({method!r}): seeds is empty; pass e.g. seeds=[0, 1]")
    for k, vals in sweep.items():
        if not list(vals):
            raise StudyError(f"expand_grid({method!r}): sweep[{k!r}] is empty; give at least one value")
    keys = list(sweep)
    arms = []
    for seed in seeds:
        for combo in itertools.product(*(list(sweep[k]) for k in keys)):
            swept = dict(zip(keys, combo))
            group = _slug(method + "".join(f"-{k}{_fmt(v)}" for k, v in swept.items()))
            hp = {**base_hparams, **swept}
            arms.append(Arm(name=f"{group}-s{seed}", method=method, seed=int(seed), hparams=hp,
                            make_config=make_config_for(hp, int(seed)), cost=cost, group=group))
    return arms


def arm_run_dir(outputs: dict[str, Any]) -> tuple[str, str]:
    """``(train.run_dir, name)`` that make the run of the arm whose ``make_config`` got ``outputs`` land
    in the folder the runner chose: ``dataclasses.replace(cfg, name=name, train=replace(cfg.train,
    run_dir=run_dir))`` for :class:`jaxrlhf.config.ExperimentConfig` (RunDir writes ``run_dir/name``)."""
    arm_dir = pathlib.Path(outputs["_arm_dir"])
    return str(arm_dir.parent), arm_dir.name


def default_to_dict(config: Any) -> dict:
    """A config as a JSON-able dict: dataclasses via ``dataclasses.asdict``, mappings as is; values JSON
    cannot hold become ``str``."""
    d = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return json.loads(json.dumps(d, default=str))


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _jsonable(obj: Any) -> Any:
    """The JSON-able parts of ``obj``: numpy/jax scalars and small arrays become lists/numbers; anything
    else (a train state, a model) is dropped from its container."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        out = {str(k): _jsonable(v) for k, v in obj.items()}
        return {k: v for k, v in out.items() if v is not _DROP}
    if isinstance(obj, (list, tuple)):
        return [v for v in (_jsonable(x) for x in obj) if v is not _DROP]
    if hasattr(obj, "tolist") and getattr(obj, "size", 1e9) <= 1024:
        return obj.tolist()
    return _DROP


_DROP = object()


def _read_json(path: pathlib.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _main_process() -> bool:
    """Whether this process writes the study's files: with several processes (``jax.distributed``) each
    runs the same stages and arms and process 0 alone writes; always True with one."""
    jax = sys.modules.get("jax")
    return jax is None or jax.process_index() == 0


def _barrier(name: str) -> None:
    """With several processes, wait until every one reaches ``name`` (so that none reads a study file that
    process 0 is about to write or move); nothing with one process."""
    jax = sys.modules.get("jax")
    if jax is not None and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _write_json(path: pathlib.Path, obj: dict) -> None:
    if not _main_process():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)  # atomic: an interrupted write never leaves half a status


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


class CompilationCounter:
    """Context manager counting XLA compilations through ``jax.monitoring`` listeners.

    ``backend_compiles`` counts ``/jax/core/compile/backend_compile_duration`` events (one per executable
    built, whether compiled or loaded from the persistent cache); ``cache_hits`` counts
    ``/jax/compilation_cache/cache_hits``; ``compilations = backend_compiles - cache_hits`` is the number
    of real XLA compilations. A call served by jit's in-memory cache fires neither event. ``by_function``
    counts the backend compiles per jitted function name (e.g. ``"jit(sft_step)"``).
    """

    def __init__(self):
        self.backend_compiles, self.cache_hits, self.compile_secs = 0, 0, 0.0
        self.by_function: collections.Counter = collections.Counter()

    def _on_duration(self, event: str, duration_secs: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.backend_compiles, self.compile_secs = self.backend_compiles + 1, self.compile_secs + duration_secs
            self.by_function[kwargs.get("fun_name")] += 1

    def _on_event(self, event: str, **kwargs) -> None:
        self.cache_hits += event == CACHE_HIT_EVENT

    @property
    def compilations(self) -> int:
        return self.backend_compiles - self.cache_hits

    def as_dict(self) -> dict:
        return {"compilations": self.compilations, "persistent_cache_hits": self.cache_hits,
                "compile_secs": round(self.compile_secs, 3)}

    def __enter__(self) -> CompilationCounter:
        from jax import monitoring

        monitoring.register_event_duration_secs_listener(self._on_duration)
        monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc) -> None:
        from jax import monitoring

        monitoring.unregister_event_duration_listener(self._on_duration)
        monitoring.unregister_event_listener(self._on_event)


def setup_compilation_cache(cache_dir: str | pathlib.Path) -> None:
    """Point JAX's persistent compilation cache at ``cache_dir``, caching every program (no minimum
    compile time or entry size, so small CPU programs are cached too). Resets an already initialised
    cache that points elsewhere, so the new folder takes effect."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    cache_dir = str(pathlib.Path(cache_dir).resolve())
    pathlib.Path(cache_dir).mkdir(parents=True, exist_ok=True)
    changed = jax.config.jax_compilation_cache_dir != cache_dir
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if changed:
        cc.reset_cache()


def environment_record() -> dict:
    """``{"versions": {package: version}, "device": {"kind", "platform", "count"}, "python", "platform"}``
    (packages not installed are left out; importlib.metadata, so torch is not imported)."""
    import importlib.metadata as md

    import jax

    versions = {}
    for pkg in VERSION_PACKAGES:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    dev = jax.devices()[0]
    return {"versions": versions,
            "device": {"kind": dev.device_kind, "platform": dev.platform, "count": jax.device_count()},
            "python": sys.version.split()[0], "platform": platform.platform()}


def _check_study(study: Study) -> None:
    seen: set[str] = set()
    for st in study.stages:
        if st.name in seen or not st.name or _slug(st.name) != st.name:
            raise StudyError(f"stage name {st.name!r} is empty, repeated or not a plain folder name")
        for d in st.deps:
            if d not in seen:
                raise StudyError(f"stage {st.name!r} depends on {d!r}, which is not an earlier stage")
        try:
            json.dumps(st.config)
        except TypeError as e:
            raise StudyError(f"stage {st.name!r}: config is not JSON-able ({e}); use plain values") from None
        seen.add(st.name)
    names = [a.name for a in study.arms]
    for a in study.arms:
        if not a.name or _slug(a.name) != a.name or names.count(a.name) > 1:
            raise StudyError(f"arm name {a.name!r} is empty, repeated or not a plain folder name")


def _stage_hashes(study: Study) -> dict[str, str]:
    hashes: dict[str, str] = {}
    for st in study.stages:
        hashes[st.name] = _sha({"config": st.config, "deps": {d: hashes[d] for d in st.deps}})
    return hashes


def _move_stale(folder: pathlib.Path, study_dir: pathlib.Path, old_hash: str | None) -> None:
    """Move a non-empty ``folder`` to ``study_dir/stale/<name>-<hash8>-<time>`` (a fresh run needs it
    empty; nothing is deleted). Process 0 only (:func:`_main_process`)."""
    if _main_process() and folder.exists() and any(folder.iterdir()):
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        dest = study_dir / "stale" / f"{folder.name}-{(old_hash or 'nohash')[:8]}-{stamp}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(folder), str(dest))
        log.info("moved %s aside to %s", folder, dest)


def arm_action(arm_dir: pathlib.Path, config_hash: str | None) -> str:
    """What to do with an arm: ``skip`` (done, same hash), ``resume`` (same or unknown hash and a
    ``checkpoints/`` folder, not done), ``retry`` (failed, no checkpoint), else ``run``."""
    status = _read_json(arm_dir / "status.json") or {}
    same = config_hash is not None and status.get("config_hash") == config_hash
    if status.get("status") == "done" and same:
        return "skip"
    if (arm_dir / "checkpoints").is_dir() and (same or not status) and status.get("status") != "done":
        return "resume"
    if status.get("status") == "failed" and same:
        return "retry"
    return "run"


def select_arms(arms: Sequence[Arm], only: Sequence[str] | None) -> list[Arm]:
    """Arms whose name matches any fnmatch pattern of ``only`` (all when ``only`` is None/empty); a pattern
    that matches nothing raises :class:`~jaxrlhf.errors.StudyError` (a ValueError) listing the arm names."""
    if not only:
        return list(arms)
    for pat in only:
        if not any(fnmatch.fnmatchcase(a.name, pat) for a in arms):
            raise StudyError(f"--only {pat!r} matches no arm; arms: {', '.join(a.name for a in arms)}")
    return [a for a in arms if any(fnmatch.fnmatchcase(a.name, p) for p in only)]


def _arm_config(study_dir, arm, outputs, hashes, to_dict) -> tuple[Any, dict, str]:
    """``(config, to_dict(config), arm hash)``; make_config sees the stage outputs + ``_arm_dir``."""
    cfg = arm.make_config({**outputs, "_arm_dir": str(study_dir / "arms" / arm.name), "_study_dir": str(study_dir)})
    cfg_dict = to_dict(cfg)
    return cfg, cfg_dict, _sha({"config": cfg_dict, "stages": hashes})


def _print_plan(study: Study, study_dir: pathlib.Path, to_dict, only) -> tuple[dict, dict]:
    """Dry run: print stages (cached / run) and arms (skip / resume / run / retry) with hparams."""
    hashes = _stage_hashes(study)
    stage_actions, outputs = {}, {}
    print(f"study {study.name}  ({study_dir})")
    for st in study.stages:
        done = _read_json(study_dir / "stages" / st.name / "done.json") or {}
        cached = done.get("hash") == hashes[st.name]
        stage_actions[st.name] = "cached" if cached else "run"
        if cached:
            outputs[st.name] = done.get("outputs", {})
        print(f"  stage {st.name:<24} {stage_actions[st.name]}")
    selected = {a.name for a in select_arms(study.arms, only)}
    arm_actions = {}
    for arm in study.arms:
        if arm.name not in selected:
            arm_actions[arm.name] = "not selected"
        else:
            try:
                h = _arm_config(study_dir, arm, outputs, hashes, to_dict)[2]
            except Exception:  # make_config needs outputs of a stage that has not run yet
                h = None
            arm_actions[arm.name] = arm_action(study_dir / "arms" / arm.name, h)
            status = _read_json(study_dir / "arms" / arm.name / "status.json") or {}
            if arm_actions[arm.name] == "retry" or (status.get("status") == "failed"):
                arm_actions[arm.name] += f" (failed: {status.get('error_type')}: {status.get('error')})"
        hp = " ".join(f"{k}={_fmt(v)}" for k, v in arm.hparams.items())
        print(f"  arm   {arm.name:<24} {arm_actions[arm.name]:<12} seed={arm.seed} {hp}")
    return stage_actions, arm_actions


def run_study(study: Study, *, run_arm: Callable[[Any, bool], dict], only: Sequence[str] | None = None,
              dry_run: bool = False, progress: bool = True,
              to_dict: Callable[[Any], dict] = default_to_dict) -> StudyResult:
    """Run ``study``: stages in order (reused when their hash is unchanged), then the selected arms.

    Args:
      run_arm: ``run_arm(config, resume) -> summary dict`` runs one arm (e.g. ``runner.run_experiment``).
      only: fnmatch patterns over arm names (None: all arms). Stages always run (or are reused).
      dry_run: print the plan (see :func:`_print_plan`) and run nothing.
      progress: one tqdm bar over the stages and arms that will run, weighted by their ``cost``.
      to_dict: experiment config -> JSON-able dict, hashed and recorded in study.json.
    Returns:
      a :class:`StudyResult`. An arm that raises is recorded failed and the others still run;
      KeyboardInterrupt propagates (the arm stays ``running`` and is resumed next time).
    Raises:
      StudyError: (a ValueError) a malformed study (see ``_check_study``) or an ``only`` pattern matching
        no arm.
      Whatever a stage raises: a stage failure stops the study (the arms need its outputs).
    """
    _check_study(study)
    study_dir = study.dir
    if dry_run:
        stage_actions, arm_actions = _print_plan(study, study_dir, to_dict, only)
        return StudyResult(study_dir, stage_actions, arm_actions, {}, {})
    from tqdm.auto import tqdm

    selected = select_arms(study.arms, only)
    study_dir.mkdir(parents=True, exist_ok=True)
    setup_compilation_cache(study_dir / ".jax_cache")
    hashes = _stage_hashes(study)
    stage_done = {st.name: (_read_json(study_dir / "stages" / st.name / "done.json") or {}).get("hash")
                  == hashes[st.name] for st in study.stages}
    _barrier("jaxrlhf study: stages read")
    total = sum(st.cost for st in study.stages if not stage_done[st.name]) + sum(a.cost for a in selected)
    bar = tqdm(total=total, desc=study.name, unit="cost", disable=not progress, dynamic_ncols=True)
    stage_actions, outputs = {}, {}
    try:
        for st in study.stages:
            folder = study_dir / "stages" / st.name
            if stage_done[st.name]:
                stage_actions[st.name] = "cached"
                outputs[st.name] = _read_json(folder / "done.json")["outputs"]
                log.info("stage %s: cached (hash %s)", st.name, hashes[st.name][:8])
                continue
            stage_actions[st.name] = "run"
            _move_stale(folder, study_dir, (_read_json(folder / "done.json") or {}).get("hash"))
            _barrier(f"jaxrlhf study: stage {st.name}")
            folder.mkdir(parents=True, exist_ok=True)
            bar.set_postfix_str(f"stage {st.name}")
            t0 = time.perf_counter()
            with CompilationCounter() as cc:
                out = st.run(dict(st.config), {d: outputs[d] for d in st.deps}, folder)
            try:
                outputs[st.name] = json.loads(json.dumps(out))
            except TypeError as e:
                raise StudyError(f"stage {st.name!r} returned outputs that are not JSON-able: {e}") from None
            _write_json(folder / "done.json", {
                "stage": st.name, "hash": hashes[st.name], "config": st.config,
                "deps": {d: hashes[d] for d in st.deps}, "outputs": outputs[st.name],
                "wall_s": round(time.perf_counter() - t0, 3), "compilations": cc.as_dict(), "finished": _now()})
            release_free_memory()  # the stage's freed buffers are not the arms' working set
            log.info("stage %s: %d compilations (%.1f s compiling), %.1f s", st.name, cc.compilations,
                     cc.compile_secs, time.perf_counter() - t0)
            bar.update(st.cost)
        configs: dict[str, tuple | Exception] = {}
        for a in study.arms:
            try:
                configs[a.name] = _arm_config(study_dir, a, outputs, hashes, to_dict)
            except Exception as e:  # noqa: BLE001 -- a bad config fails its arm, not the study
                configs[a.name] = e
        _write_json(study_dir / "study.json", study_record(study, hashes, configs))
        arm_actions = {a.name: "not selected" for a in study.arms}
        for a in selected:
            h = None if isinstance(configs[a.name], Exception) else configs[a.name][2]
            arm_actions[a.name] = arm_action(study_dir / "arms" / a.name, h)
        _barrier("jaxrlhf study: arms read")
        bar.total = total - sum(a.cost for a in selected if arm_actions[a.name] == "skip")
        bar.refresh()
        statuses = {}
        for arm in selected:
            bar.set_postfix_str(f"arm {arm.name}")
            statuses[arm.name] = _run_one_arm(study_dir, arm, configs[arm.name], arm_actions[arm.name], run_arm,
                                              keep_checkpoints=study.keep_checkpoints)
            if arm_actions[arm.name] != "skip":
                bar.update(arm.cost)
    finally:
        bar.close()
    return StudyResult(study_dir, stage_actions, arm_actions, statuses, outputs)


def _run_one_arm(study_dir: pathlib.Path, arm: Arm, config: tuple | Exception, action: str,
                 run_arm: Callable[[Any, bool], dict], *, keep_checkpoints: bool = False) -> dict:
    """Run (or skip / resume) one arm and write its status.json; ``config`` is ``(cfg, cfg_dict, hash)``
    or the exception ``make_config`` raised (recorded as the failure). A finished arm's ``checkpoints/``
    are removed unless ``keep_checkpoints``."""
    arm_dir = study_dir / "arms" / arm.name
    cfg, config_hash = (None, None) if isinstance(config, Exception) else (config[0], config[2])
    status_path = arm_dir / "status.json"
    if action == "skip":
        log.info("arm %s: done, skipped", arm.name)
        return _read_json(status_path)
    if action in ("run", "retry"):
        _move_stale(arm_dir, study_dir, (_read_json(status_path) or {}).get("config_hash"))
    status = {"arm": arm.name, "method": arm.method, "seed": arm.seed, "hparams": _jsonable(arm.hparams),
              "group": arm.group_label, "status": "running", "config_hash": config_hash,
              "resumed": action == "resume", "started": _now()}
    _write_json(status_path, status)
    _barrier(f"jaxrlhf study: arm {arm.name}")
    t0 = time.perf_counter()
    counter = CompilationCounter()
    try:
        if isinstance(config, Exception):
            raise config
        with counter:
            summary = run_arm(cfg, action == "resume")
        run_dir = (summary or {}).get("run_dir")
        if run_dir is not None and pathlib.Path(run_dir).resolve() != arm_dir.resolve():
            raise ValueError(f"arm {arm.name} wrote its run to {run_dir}, not {arm_dir}: its make_config must "
                             "set the run folder from outputs['_arm_dir'] (see jaxrlhf.study)")
        status.update(status="done", summary=_jsonable(summary or {}))
        _barrier(f"jaxrlhf study: arm {arm.name} done")
        if not keep_checkpoints and (arm_dir / "checkpoints").exists() and _main_process():
            shutil.rmtree(arm_dir / "checkpoints")
            status["checkpoints_removed"] = True
    except Preempted as e:  # SIGTERM: the arm saved its checkpoint; the study stops and resumes it next time
        status.update(status="preempted", error=str(e), finished=_now(), wall_s=round(time.perf_counter() - t0, 3))
        _write_json(status_path, status)
        raise
    except Exception as e:  # noqa: BLE001 -- a failed arm is recorded and the study goes on
        status.update(status="failed", error_type=type(e).__name__, error=str(e),
                      traceback=traceback.format_exc())
        log.error("arm %s failed: %s: %s", arm.name, type(e).__name__, e)
    status.update(finished=_now(), wall_s=round(time.perf_counter() - t0, 3), compilations=counter.as_dict())
    _write_json(status_path, status)
    release_free_memory()  # this arm's freed buffers are not the next arm's working set
    log.info("arm %s: %s, %d compilations, %.1f s", arm.name, status["status"], counter.compilations,
             status["wall_s"])
    return status


def study_record(study: Study, hashes: dict[str, str], configs: dict[str, tuple]) -> dict:
    """The study.json layout::

        {"study", "updated", "versions": {pkg: version}, "device": {"kind", "platform", "count"},
         "python", "platform",
         "stages": [{"name", "hash", "deps", "config"}],
         "arms": [{"name", "method", "seed", "hparams", "group", "cost", "dir" (relative to the study
                   folder: "arms/<name>"), "config_hash", "config" (to_dict of the arm's config; None
                   and "config_error" when make_config raised)}]}
    """
    return {"study": study.name, "updated": _now(), **environment_record(),
            "stages": [{"name": s.name, "hash": hashes[s.name], "deps": list(s.deps), "config": s.config}
                       for s in study.stages],
            "arms": [{"name": a.name, "method": a.method, "seed": a.seed, "hparams": _jsonable(a.hparams),
                      "group": a.group_label, "cost": a.cost, "dir": f"arms/{a.name}",
                      **({"config_hash": None, "config": None, "config_error": f"{type(c).__name__}: {c}"}
                         if isinstance(c := configs[a.name], Exception)
                         else {"config_hash": c[2], "config": c[1]})} for a in study.arms]}


def study_main(argv: Sequence[str], load_study: Callable[[str, str | None], Study],
               run_arm: Callable[[Any, bool], dict], *, to_dict: Callable[[Any], dict] = default_to_dict,
               write_report: Callable[[pathlib.Path], pathlib.Path] | None = None, debug: bool = False) -> int:
    """``jaxrlhf study FILE [--arg X] [--only PATTERN ...] [--dry-run] [--report-only] [--no-progress] [--debug]``.

    ``load_study(path, arg) -> Study``; ``run_arm`` as in :func:`run_study`; ``write_report(study_dir)``
    defaults to :func:`jaxrlhf.study_report.write_study_report`. Writes the report after a run (and only
    that with ``--report-only``). A failing arm is recorded and the others go on; a known error of the
    study itself (a :class:`~jaxrlhf.errors.JaxrlhfError`: a malformed study, a missing file, a stage's bad
    input) prints one line ``<kind> error: <message>`` (with its traceback when ``debug`` or ``--debug``).
    Returns 0, 1 if any selected arm failed, 2 on a known error of the study
    (:data:`~jaxrlhf.errors.EXIT_USER_ERROR`), 143 when an arm was preempted
    (:data:`~jaxrlhf.errors.EXIT_PREEMPTED`). Any other exception propagates with its traceback.
    """
    p = argparse.ArgumentParser(prog="jaxrlhf study", description="run a study: stages, then arms x seeds")
    p.add_argument("file", help="study file exposing the Study (see jaxrlhf.study)")
    p.add_argument("--arg", default=None, help="passed to the study file (e.g. 'full')")
    p.add_argument("--only", nargs="+", action="extend", default=None, metavar="PATTERN",
                   help="run only arms whose name matches (fnmatch, e.g. 'dpo-*-s0'); repeatable")
    p.add_argument("--dry-run", action="store_true", help="print the grid and what would run; run nothing")
    p.add_argument("--report-only", action="store_true", help="rewrite report.md from what is on disk")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="print the traceback of a known error too")
    args = p.parse_args(list(argv))
    debug = debug or args.debug
    try:
        study = load_study(args.file, args.arg)
        if write_report is None:
            from jaxrlhf.study_report import DEFAULT_METRICS, write_study_report

            metrics = tuple(study.report_metrics) or DEFAULT_METRICS
            write_report = lambda d: write_study_report(d, metrics=metrics)  # noqa: E731
        if args.report_only:
            if not (study.dir / "study.json").exists():
                raise StudyError(f"{study.dir / 'study.json'} not found: run the study first")
            print(f"report written to {write_report(study.dir)}")
            return 0
        result = run_study(study, run_arm=run_arm, only=args.only, dry_run=args.dry_run,
                           progress=not args.no_progress, to_dict=to_dict)
    except JaxrlhfError as e:
        return report_error(e, debug)
    if args.dry_run:
        return 0
    if not _main_process():  # process 0 writes the report
        return 1 if result.failed else 0
    path = write_report(result.study_dir)
    for name in result.failed:
        print(f"arm {name} FAILED: {result.statuses[name]['error_type']}: {result.statuses[name]['error']}",
              file=sys.stderr)
    print(f"report written to {path}")
    return 1 if result.failed else 0
