"""Typed experiment configuration: dataclasses, dotted command-line overrides, validation.

An experiment is a Python file exposing ``get_config(arg=None) -> ExperimentConfig`` (and optionally
``sweep() -> list[dict[str, str]]`` of overrides). Blocks that several experiments share live in
``configs/``. Overrides use dotted paths: ``--config.optim.lr=1e-5``, ``--config.algo.beta=0.3``.
Every value is parsed against the dataclass field's type, and a bad path or value raises
``ConfigError`` naming the field before any compute is spent.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import sys
import types
import typing
from typing import Any, Literal, Union

from jaxrlhf.sharding import MeshConfig


class ConfigError(ValueError):
    """A malformed configuration or override; the message names the field and the fix."""


@dataclasses.dataclass
class ModelSpec:
    """Which model to start from.

    Attributes:
      name: a short name (``smollm2-135m-instruct``), a local HF folder, a ``.gguf`` file or a hub id.
      dtype: compute dtype (``float32``/``bfloat16``); parameters stay float32 (master weights).
      remat: ``none`` or ``block`` (recompute each transformer block in the backward pass).
      allow_pickle: permit loading ``.bin`` (pickle) weights, with ``torch.load(weights_only=True)``.
    """

    name: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    remat: str = "none"
    allow_pickle: bool = False


@dataclasses.dataclass
class OptimConfig:
    """AdamW (Loshchilov & Hutter 2019) with warmup, a decay schedule and global-norm clipping.

    ``grad_accum_steps`` micro-batches are scanned inside one jitted step; the loss normaliser (token or
    example count) is summed over all of them, so accumulation is exact, not a mean of means.
    """

    lr: float = 1e-5
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    grad_accum_steps: int = 1


@dataclasses.dataclass
class DataConfig:
    """Where the examples come from and how they become fixed-shape batches.

    Attributes:
      source: a local file/folder (json, jsonl(.gz), parquet, csv), a hub dataset id, or ``tfds:NAME``.
      format: row format (``auto`` detects it from the keys).
      batch_size: global batch size (examples, or preference pairs) per optimizer step.
      max_length: tokens per sequence (prompt + completion).
      max_prompt_length: prompt tokens kept (truncated from the left).
      eval_size: examples held out for evaluation (a fixed set chosen by ``seed``).
      limit: use at most this many rows (``0`` = all).
      on_overflow: ``truncate``, ``drop`` (reported) or ``error`` for rows that do not fit.
    """

    source: str = ""
    split: str = "train"
    format: str = "auto"
    batch_size: int = 8
    max_length: int = 256
    max_prompt_length: int = 128
    eval_size: int = 0
    limit: int = 0
    use_chat_template: bool = True
    padding_side: Literal["right", "left"] = "right"
    packing: bool = False
    on_overflow: Literal["truncate", "drop", "error"] = "truncate"
    seed: int = 0


@dataclasses.dataclass
class TrainConfig:
    """The host loop: how long, how often to log, evaluate, sample and checkpoint."""

    steps: int = 100
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    num_samples: int = 4
    max_new_tokens: int = 48
    run_dir: str = "runs"
    stop_after: int = 0  # end the process after this step (as a preemption would); 0 = run to `steps`


@dataclasses.dataclass
class SFTConfig:
    """Supervised fine-tuning: next-token cross-entropy on completion tokens only."""

    kind: Literal["sft"] = "sft"
    label_smoothing: float = 0.0


@dataclasses.dataclass
class ExperimentConfig:
    """A whole run. ``algo`` is one algorithm's config dataclass (its ``kind`` selects the driver)."""

    name: str = "experiment"
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    algo: Any = dataclasses.field(default_factory=SFTConfig)


# ----------------------------------------------------------------------------------------- overrides

def _parse_value(text: str, tp: Any, field: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return _auto(text)
    if origin in (Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _parse_value(text, a, field)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"--config.{field}={text!r}: not a valid {tp}")
    if origin is Literal:
        for a in args:
            if str(a) == text:
                return a
        raise ConfigError(f"--config.{field}={text!r}: must be one of {list(args)}")
    if origin is tuple:
        items = [t for t in text.strip("()[]").split(",") if t.strip()]
        inner = args[0] if args else str
        return tuple(_parse_value(t.strip(), inner, field) for t in items)
    if tp is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{field}={text!r}: expected true or false")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--config.{field}={text!r}: expected an integer") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--config.{field}={text!r}: expected a number") from None
    if tp is str:
        return text
    raise ConfigError(f"--config.{field}: cannot override a field of type {tp} from the command line")


def _auto(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_override(cfg: Any, dotted: str, text: str) -> None:
    """Set ``cfg.<dotted> = parse(text)`` in place, typed by the dataclass field.

    Frozen sections (e.g. ``MeshConfig``) are replaced by an updated copy in their parent.

    Raises:
      ConfigError: an unknown field (the message lists the valid ones) or a value of the wrong type.
    """
    parts = dotted.split(".")
    chain = [cfg]
    for i, name in enumerate(parts):
        obj = chain[-1]
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"--config.{'.'.join(parts[:i])} is not a config section; cannot set {dotted}")
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if name not in fields:
            where = ".".join(parts[:i]) or "config"
            raise ConfigError(f"--config.{dotted}: {where} has no field {name!r}; valid fields: {sorted(fields)}")
        if i < len(parts) - 1:
            chain.append(getattr(obj, name))
    leaf_name = parts[-1]
    obj = chain[-1]
    hints = typing.get_type_hints(type(obj))
    value = _parse_value(text, hints[leaf_name], dotted)
    if dataclasses.is_dataclass(getattr(obj, leaf_name)) and not dataclasses.is_dataclass(value):
        raise ConfigError(f"--config.{dotted} is a section; set one of its fields instead")
    # Write back up the chain; a frozen section is replaced by an updated copy in its parent.
    for depth in reversed(range(len(chain))):
        node, key = chain[depth], parts[depth]
        if getattr(type(node), "__dataclass_params__").frozen:
            value = dataclasses.replace(node, **{key: value})
            continue
        setattr(node, key, value)
        return
    raise ConfigError(f"--config.{dotted}: the top-level config is frozen")


def parse_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """``["--config.a.b=1", ...]`` -> ``[("a.b", "1"), ...]``; raises ConfigError on any other flag."""
    out = []
    for arg in argv:
        if not arg.startswith("--config.") or "=" not in arg:
            raise ConfigError(f"unrecognised argument {arg!r}; overrides look like --config.optim.lr=1e-5")
        key, value = arg[len("--config."):].split("=", 1)
        out.append((key, value))
    return out


# ----------------------------------------------------------------------------------------- loading

def load_experiment_module(path: str | pathlib.Path) -> types.ModuleType:
    """Import an experiment file by path (it must define ``get_config``)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {str(path)!r} does not exist")
    # Experiments import reusable blocks from the sibling ``configs/`` package of their repository.
    root = str(path.resolve().parents[1])
    if (path.resolve().parents[1] / "configs").is_dir() and root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(f"jaxrlhf_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} must define get_config(arg=None) -> ExperimentConfig")
    return module


def load_config(path: str | pathlib.Path, overrides: list[str] | None = None, arg: str | None = None
                ) -> ExperimentConfig:
    """Load ``get_config(arg)`` from an experiment file, apply overrides, validate."""
    cfg = load_experiment_module(path).get_config(arg)
    for key, value in parse_overrides(overrides or []):
        apply_override(cfg, key, value)
    validate(cfg)
    return cfg


def validate(cfg: ExperimentConfig, num_devices: int | None = None) -> None:
    """Check a config before any compute. Raises ConfigError naming the field and the fix."""
    if not isinstance(cfg, ExperimentConfig):
        raise ConfigError(f"get_config() must return an ExperimentConfig, got {type(cfg).__name__}")
    o, d, t = cfg.optim, cfg.data, cfg.train
    checks = [
        (o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}"),
        (o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}"),
        (o.grad_accum_steps >= 1, "optim.grad_accum_steps", f"must be >= 1, got {o.grad_accum_steps}"),
        (o.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0 (0 disables clipping)"),
        (0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]"),
        (d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}"),
        (d.batch_size % o.grad_accum_steps == 0, "data.batch_size",
         f"{d.batch_size} is not divisible by optim.grad_accum_steps={o.grad_accum_steps}"),
        (d.max_length >= 2, "data.max_length", f"must be >= 2, got {d.max_length}"),
        (0 < d.max_prompt_length < d.max_length, "data.max_prompt_length",
         f"must be in (0, data.max_length={d.max_length}), got {d.max_prompt_length}"),
        (bool(d.source), "data.source", "is empty; give a file, folder, hub id or tfds:NAME"),
        (t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}"),
        (cfg.model.dtype in ("float32", "bfloat16"), "model.dtype", "must be float32 or bfloat16"),
        (cfg.model.remat in ("none", "block"), "model.remat", "must be none or block"),
    ]
    for ok, field, msg in checks:
        if not ok:
            raise ConfigError(f"{field} {msg}")
    if num_devices is not None:
        shape = cfg.mesh.shape(num_devices)
        n = shape[0] * shape[1]
        micro = d.batch_size // o.grad_accum_steps
        if micro % n:
            raise ConfigError(
                f"data.batch_size={d.batch_size} (micro-batch {micro} after optim.grad_accum_steps="
                f"{o.grad_accum_steps}) is not divisible by mesh data*fsdp={n}; use a multiple of {n}")
    algo_validate = getattr(cfg.algo, "validate", None)
    if algo_validate is not None:
        algo_validate(cfg)


def to_dict(cfg: Any) -> dict:
    """JSON-ready dict of a config (for ``runs/<name>/config.json``)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
