"""Typed experiment configuration: frozen dataclasses, dotted command-line overrides, validation.

An experiment is a Python file exposing ``get_config(arg=None) -> ExperimentConfig`` (and optionally
``sweep() -> list[dict[str, str]]`` of overrides). Blocks that several experiments share live in
``configs/``. Every section is a frozen, keyword-only dataclass: experiments derive variants with
``dataclasses.replace``. Overrides use dotted paths: ``--config.optim.lr=1e-5``, ``--config.algo.beta=0.3``,
``--config.algo.update.epochs=2``; :func:`apply_override` returns a new config. Every value is parsed
against the dataclass field's type, and a bad path or value raises ``ConfigError`` naming the field
before any compute is spent.

``ExperimentConfig.algo`` is one of the algorithm configs (:data:`AlgoConfig`); the driver is chosen by
its type. Each algorithm config has ``validate(cfg)`` and a read-only ``kind`` (the algorithm's name,
written to ``runs/<name>/config.json``; it cannot be set).
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

from jaxrlhf.errors import JaxrlhfError
from jaxrlhf.algos.dpo_losses import PREFERENCE_LOSSES
from jaxrlhf.sharding import MeshConfig

__all__ = [
    "ConfigError", "LoraConfig", "ModelSpec", "OptimConfig", "DataConfig", "TrainConfig", "SFTConfig", "RewardConfig",
    "DPOConfig", "RewardSpec", "RolloutConfig", "KLConfig", "UpdateConfig", "PPOConfig", "GRPOConfig",
    "RLOOConfig", "PolicyEvalSpec", "SafetyEvalSpec", "AlgoConfig", "ALGO_CONFIGS", "ExperimentConfig",
    "apply_override", "parse_overrides", "load_experiment_module", "load_config", "validate", "to_dict",
]


class ConfigError(JaxrlhfError, ValueError):
    """A malformed configuration or override; the message names the field and the fix."""

    kind = "config"


def _check(ok: bool, field: str, msg: str) -> None:
    """Raise ``ConfigError("<field> <msg>")`` unless ``ok`` (the one validation helper of this module)."""
    if not ok:
        raise ConfigError(f"{field} {msg}")


def _import_problem(path: str) -> str | None:
    """Why the import path ``"package.module:callable"`` does not name a callable (None when it does)."""
    module, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 -- whatever stops the import is the config's problem
        return f"does not import ({type(e).__name__}: {e})"
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    return None if callable(obj) else f"names no callable: module {module} has no callable {attr!r}"


def _kind(name: str) -> Any:
    """The read-only ``kind`` field of an algorithm config (not an ``__init__`` argument, not overridable)."""
    return dataclasses.field(default=name, init=False)


# ============================================================================================ sections

@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """LoRA (Hu et al. 2021): train low-rank adapters ``h = W0 x + (alpha/rank) B A x`` on the ``targets``
    projections instead of the model's weights (:mod:`jaxrlhf.models.lora`). The base weights stay frozen
    (one copy, also the reference model of DPO/PPO/GRPO/RLOO: the policy with its adapters disabled);
    checkpoints hold the adapters (+ reward/value heads) and their optimizer state; exports hold the merged
    weights.

    Attributes:
      rank: r, the adapters' inner dimension (>= 1).
      alpha: α; the update is scaled by ``α / r``.
      dropout: dropout rate on the adapters' input in [0, 1) (training steps only; must be 0 for the RL
        algorithms, whose rollout log-probs are computed without dropout).
      targets: projection names in the model's ``layers`` tree: ``q``, ``k``, ``v``, ``o``, ``gate``, ``up``,
        ``down`` (Llama family; GPT-2 and BERT have no ``gate``). Default ``(q, v)``, Hu et al.'s choice.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "v")

    def validate(self, cfg: ExperimentConfig, prefix: str = "model.lora") -> None:
        """Raise ConfigError naming the field when the LoRA settings are invalid (the targets are checked
        against the model's family when it is loaded)."""
        from jaxrlhf.models.lora import PROJECTIONS

        known = sorted({n for table in PROJECTIONS.values() for n in table})
        _check(self.rank >= 1, f"{prefix}.rank", f"must be >= 1, got {self.rank}")
        _check(self.alpha > 0, f"{prefix}.alpha", f"must be > 0, got {self.alpha}")
        _check(0 <= self.dropout < 1, f"{prefix}.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(len(self.targets) > 0, f"{prefix}.targets", f"is empty; name projections among {known}")
        _check(len(set(self.targets)) == len(self.targets), f"{prefix}.targets", f"has duplicates: {self.targets}")
        bad = [t for t in self.targets if t not in known]
        _check(not bad, f"{prefix}.targets", f"{bad} are not projections; choose among {known}")
        if isinstance(cfg.algo, (PPOConfig, GRPOConfig, RLOOConfig)):
            _check(self.dropout == 0, f"{prefix}.dropout",
                   f"must be 0 for {cfg.algo.kind}: the rollout's log-probs are computed without dropout, so the "
                   "update's importance ratios would be biased")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Which model to start from.

    Attributes:
      name: a short name (``smollm2-135m-instruct``), a local HF folder, a ``.gguf`` file or a hub id.
      dtype: compute dtype, the one switch of the mixed-precision policy for every step and the sampler:
        ``float32``, or ``bfloat16`` = bf16 matmuls and activations with f32 accumulation, f32 master
        weights, gradients and optimiser state, f32 norms statistics/softmax/logits/losses, and bf16
        weights and KV cache while decoding (:mod:`jaxrlhf.models.mixed_precision`).
      remat: ``none`` or ``block`` (recompute each transformer block in the backward pass).
      scan_unroll: layers per iteration of the loop over blocks: 1 = one rolled ``lax.scan`` (compile
        time independent of depth), 0 = fully unrolled. On XLA:CPU the bf16 step is ~1.4x faster fully
        unrolled (``bench/``); on TPU/GPU keep 1 for deep models.
      allow_pickle: permit loading ``.bin`` (pickle) weights, with ``torch.load(weights_only=True)``.
      lora: train LoRA adapters (:class:`LoraConfig`) instead of every weight; None = full fine-tuning.
        Set from the command line with ``--config.model.lora.rank=8`` (starts from the section's defaults)
        and turn off with ``--config.model.lora=none``.
    """

    name: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    remat: str = "none"
    scan_unroll: int = 1
    allow_pickle: bool = False
    lora: LoraConfig | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
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


@dataclasses.dataclass(frozen=True, kw_only=True)
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The host loop: how long, how often to log, evaluate, sample and checkpoint.

    Attributes:
      num_samples / sample_max_new_tokens: the before/after samples written to the run directory: how
        many prompts, and how many tokens each completion may have (the RL rollout's own length is
        ``algo.rollout.max_new_tokens``).
      stop_after: end the process after this step (as a preemption would); 0 = run to ``steps``.
    """

    steps: int = 100
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    num_samples: int = 4
    sample_max_new_tokens: int = 48
    run_dir: str = "runs"
    stop_after: int = 0


# ============================================================================================ SFT

@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """Supervised fine-tuning (``jaxrlhf.algos.sft``): next-token cross-entropy on completion tokens only.

    Attributes:
      label_smoothing: ``ε`` in [0, 1) (target ``(1-ε)·onehot + ε·uniform``).
    """

    kind: str = _kind("sft")
    label_smoothing: float = 0.0

    def validate(self, cfg: ExperimentConfig) -> None:
        """Raise ConfigError naming the field when the SFT settings are invalid."""
        _check(0 <= self.label_smoothing < 1, "algo.label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")


# ============================================================================================ preference learning

@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """Reward model training (``jaxrlhf.algos.reward``): backbone (decoder or encoder) + head.

    Attributes:
      objective: ``pairwise`` (Bradley–Terry on ``[B, 2, T]`` preference pairs, Ouyang et al. 2022 eq. 1),
        ``ranking`` (InstructGPT K-wise loss over all ordered pairs of ``[B, N, T]`` rankings) or
        ``classification`` (softmax cross-entropy over ``num_labels`` classes on ``[B, T]`` texts).
      margin: constant reward margin of the Bradley–Terry loss (Llama 2 eq. 2; a per-example ``margin``
        batch key, when the data carries one, is added to it). Pairwise only.
      center_rewards_coef: weight of ``mean((r_c + r_r)^2)`` (reward centring, Eisenstein et al. 2023);
        0 disables it. Pairwise only.
      num_labels: classes of the classification head (``classification`` only; 1 output otherwise).
      label_smoothing: classification label smoothing ``ε`` in [0, 1).
      score_label: class whose log-odds ``log p(c) - log(1 - p(c))`` is the classifier's reward.
      pooling: which hidden state the head reads: ``auto`` (decoders: the last real token; encoders:
        the mean over real tokens, as sentence-transformers), ``last``, ``mean`` or ``first``.
      normalize_examples: training examples (a seeded random subset) scored by the normalisation pass
        after training (reward mean 0, std 1 over them; 0 skips the pass and keeps mean 0, std 1).
      eval_source: a separate held-out source (e.g. IMDB test) instead of ``data.eval_size`` rows
        held out of ``data.source``; ``data.eval_size`` then caps how many of its rows are used (0 = all).
      eval_split: split of ``eval_source``.
      export: write the trained model to ``runs/<name>/reward_model`` (:func:`save_reward_model`).
    """

    kind: str = _kind("reward")
    objective: Literal["pairwise", "ranking", "classification"] = "pairwise"
    margin: float = 0.0
    center_rewards_coef: float = 0.0
    num_labels: int = 2
    label_smoothing: float = 0.0
    score_label: int = 1
    pooling: Literal["auto", "last", "mean", "first"] = "auto"
    normalize_examples: int = 256
    eval_source: str = ""
    eval_split: str = "test"
    export: bool = True

    def validate(self, cfg: ExperimentConfig) -> None:
        """Raise ConfigError naming the field when the reward settings are inconsistent."""
        _check(self.objective in ("pairwise", "ranking", "classification"), "algo.objective",
               f"must be pairwise, ranking or classification, got {self.objective!r}")
        _check(self.margin >= 0, "algo.margin", f"must be >= 0, got {self.margin}")
        _check(self.center_rewards_coef >= 0, "algo.center_rewards_coef",
               f"must be >= 0 (0 disables centring), got {self.center_rewards_coef}")
        if self.objective != "pairwise":
            _check(self.margin == 0 and self.center_rewards_coef == 0, "algo.margin",
                   f"and algo.center_rewards_coef apply to objective='pairwise' only (objective={self.objective!r});"
                   " set them to 0")
        if self.objective == "classification":
            _check(self.num_labels >= 2, "algo.num_labels", f"must be >= 2 for classification, got {self.num_labels}")
            _check(0 <= self.score_label < self.num_labels, "algo.score_label",
                   f"must be in [0, algo.num_labels={self.num_labels}), got {self.score_label}")
            _check(0 <= self.label_smoothing < 1, "algo.label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        else:
            _check(self.label_smoothing == 0, "algo.label_smoothing", "applies to objective='classification' only")
        _check(self.pooling in ("auto", "last", "mean", "first"), "algo.pooling",
               f"must be auto, last, mean or first, got {self.pooling!r}")
        _check(self.normalize_examples >= 0, "algo.normalize_examples", f"must be >= 0, got {self.normalize_examples}")
        _check(cfg.data.eval_size >= 0, "data.eval_size", f"must be >= 0, got {cfg.data.eval_size}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig:
    """Direct preference optimisation family (``jaxrlhf.algos.dpo``), one step for every loss.

    Attributes:
      loss: a name of :data:`jaxrlhf.algos.dpo_losses.PREFERENCE_LOSSES` (which describes each loss:
        its function, reference or not, summed or length-normalised log-probs): ``dpo`` (Rafailov et al.
        2023; with ``label_smoothing > 0`` it is cDPO), ``ipo`` (Azar et al. 2023, length-averaged as in
        TRL), ``hinge`` (SLiC hinge on DPO log-ratios, TRL), ``robust`` (Chowdhury et al. 2024, TRL),
        ``simpo`` (Meng et al. 2024, length-normalised, reference-free), ``orpo`` (Hong et al. 2024,
        reference-free) or ``kto`` (Ethayarajh et al. 2024: unpaired examples; each preference pair gives
        one desirable and one undesirable example; KL reference point from mismatched pairs).
      beta: ``β`` (DPO/IPO/hinge/robust/SimPO/KTO temperature; ORPO's ``λ``).
      label_smoothing: ``ε`` in [0, 0.5) of the losses that read it (cDPO, robust DPO's flip rate, SimPO).
      simpo_gamma_beta_ratio: SimPO's ``γ/β``.
      kto_desirable_weight, kto_undesirable_weight: KTO's ``λ_D``, ``λ_U``.
      reference: ``model`` (reference log-probs computed in the step from frozen reference params) or
        ``precomputed`` (one jitted pass over the data stores them in the examples; the step then needs
        no reference model). Ignored by the reference-free losses (simpo, orpo).
      reference_model: model of the reference (``""`` = the same as ``model.name``, i.e. the initial
        policy).
      eval_source: a separate held-out preference source instead of ``data.eval_size`` rows held out of
        ``data.source`` (e.g. the same human-labelled held-out pairs for runs trained on different labels);
        ``data.eval_size`` then caps how many of its rows are used (0 = all).
      eval_split: split of ``eval_source``.
    """

    kind: str = _kind("dpo")
    loss: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma_beta_ratio: float = 0.5
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    reference: Literal["model", "precomputed"] = "model"
    reference_model: str = ""
    eval_source: str = ""
    eval_split: str = "test"

    @property
    def uses_reference(self) -> bool:
        """Whether ``loss`` needs reference log-probs (from :data:`PREFERENCE_LOSSES`)."""
        return PREFERENCE_LOSSES[self.loss].uses_reference

    def validate(self, cfg: ExperimentConfig) -> None:
        """Raise ConfigError naming the field when the DPO settings are inconsistent."""
        _check(self.loss in PREFERENCE_LOSSES, "algo.loss",
               f"must be one of {sorted(PREFERENCE_LOSSES)}, got {self.loss!r}")
        entry = PREFERENCE_LOSSES[self.loss]
        _check(self.beta > 0, "algo.beta", f"must be > 0, got {self.beta}")
        _check(0 <= self.label_smoothing < 0.5, "algo.label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        if not entry.label_smoothing:
            takes = sorted(n for n, e in PREFERENCE_LOSSES.items() if e.label_smoothing)
            _check(self.label_smoothing == 0, "algo.label_smoothing",
                   f"applies to loss in {takes} only, not {self.loss!r}; set it to 0")
        _check(self.simpo_gamma_beta_ratio >= 0, "algo.simpo_gamma_beta_ratio", "must be >= 0")
        _check(self.kto_desirable_weight > 0, "algo.kto_desirable_weight", "must be > 0")
        _check(self.kto_undesirable_weight > 0, "algo.kto_undesirable_weight", "must be > 0")
        _check(self.reference in ("model", "precomputed"), "algo.reference",
               f"must be model or precomputed, got {self.reference!r}")
        _check(cfg.data.eval_size >= 0, "data.eval_size", f"must be >= 0, got {cfg.data.eval_size}")
        if entry.unpaired:
            _check(cfg.data.batch_size >= 2, "data.batch_size",
                   f"must be >= 2 for loss={self.loss!r} (the KL reference point needs mismatched pairs)")


# ============================================================================================ RL from feedback
# PPO, GRPO, RLOO: rollout, reward sources, KL control and the shared policy update. These sections are
# static arguments of the jitted rollout/update functions (frozen, hence hashable).

@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardSpec:
    """Where the scalar score of a completion comes from: a weighted sum of up to three kinds of source.

    ``score = Σ_i function_weights[i]·f_i(prompts, completions) + classifier_weight·classifier
    + reward_model_weight·reward_model`` (each source that is set; at least one must be).

    Attributes:
      functions: import paths ``"package.module:callable"`` of Python functions
        ``f(prompts: list[str], completions: list[str]) -> float[B]`` run on the host on decoded text
        (e.g. ``jaxrlhf.rewards:vader_sentiment``, ``jaxrlhf.rewards:lexicon_sentiment``).
      function_weights: one weight per function (empty = all 1.0).
      classifier: a Hugging Face sequence-classifier folder (BERT/RoBERTa/DistilBERT); "" = off. The
        decoded text is re-tokenised with the classifier's tokenizer on the host, the encoder runs on
        the device.
      classifier_label: the class whose output is the score (a name from ``id2label``, or an index).
      classifier_output: ``logit`` (raw logit of the label), ``prob`` (softmax probability),
        ``logprob`` (log-softmax) or ``margin`` (label logit minus the largest other logit).
      classifier_weight: weight of the classifier term.
      classifier_max_length: classifier tokens per text (truncated).
      score_prompt: the text scored by classifier and reward model is prompt + completion (True) or
        the completion alone (False). Functions always receive both.
      reward_model: a trained reward model (decoder + scalar head) to load; "" = off.
      reward_model_weight: weight of the reward-model term.
      reward_model_mean / reward_model_std: the reward model's score is ``(r - mean) / std``.
    """

    functions: tuple[str, ...] = ()
    function_weights: tuple[float, ...] = ()
    classifier: str = ""
    classifier_label: str = "positive"
    classifier_output: Literal["logit", "prob", "logprob", "margin"] = "logit"
    classifier_weight: float = 1.0
    classifier_max_length: int = 512
    score_prompt: bool = True
    reward_model: str = ""
    reward_model_weight: float = 1.0
    reward_model_mean: float = 0.0
    reward_model_std: float = 1.0

    def validate(self, prefix: str = "algo.reward") -> None:
        _check(bool(self.functions or self.classifier or self.reward_model), prefix,
               "has no source; set functions, classifier or reward_model")
        _check(not self.function_weights or len(self.function_weights) == len(self.functions),
               f"{prefix}.function_weights", f"needs one weight per function ({len(self.functions)}), "
               f"got {len(self.function_weights)}")
        _check(all(":" in f for f in self.functions), f"{prefix}.functions",
               f"entries must be import paths 'package.module:callable', got {self.functions}")
        for f in self.functions:
            why = _import_problem(f)
            _check(why is None, f"{prefix}.functions",
                   f"entry {f!r} {why}; give 'package.module:callable' of a module on the Python path "
                   "(e.g. 'jaxrlhf.rewards:lexicon_sentiment')")
        _check(self.classifier_max_length >= 2, f"{prefix}.classifier_max_length", "must be >= 2")
        _check(self.reward_model_std > 0, f"{prefix}.reward_model_std", "must be > 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """How completions are sampled and how their scores are shaped (shared by PPO, GRPO, RLOO).

    Attributes:
      max_new_tokens: completion tokens per row (N of the sampler).
      num_completions: completions sampled per prompt (G; rollout rows = data.batch_size * G). GRPO and
        RLOO need >= 2 (the group is their baseline).
      temperature / top_k / top_p: sampling settings (the same temperature divides the logits when
        log-probs are recomputed for the losses and the KL).
      missing_eos_penalty: subtracted from the score of a completion that never emitted EOS (0 = off).
      score_scale: the (penalised) score is multiplied by this ...
      score_clip: ... then clipped to ``[-score_clip, score_clip]`` (0 = off).
      whiten_scores: whiten the scores over the batch (mean 0, std 1) after scaling (before clipping).
    """

    max_new_tokens: int = 32
    num_completions: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    missing_eos_penalty: float = 0.0
    score_scale: float = 1.0
    score_clip: float = 0.0
    whiten_scores: bool = False

    def validate(self, prefix: str = "algo.rollout") -> None:
        _check(self.max_new_tokens >= 1, f"{prefix}.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(self.num_completions >= 1, f"{prefix}.num_completions", f"must be >= 1, got {self.num_completions}")
        _check(self.temperature > 0, f"{prefix}.temperature",
               f"must be > 0 for on-policy RL (sampled, not greedy), got {self.temperature}")
        _check(self.top_k >= 0, f"{prefix}.top_k", "must be >= 0 (0 = off)")
        _check(0 < self.top_p <= 1, f"{prefix}.top_p", "must be in (0, 1]")
        _check(self.missing_eos_penalty >= 0, f"{prefix}.missing_eos_penalty", "must be >= 0 (it is subtracted)")
        _check(self.score_clip >= 0, f"{prefix}.score_clip", "must be >= 0 (0 = off)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KLConfig:
    """KL(π || π_ref) penalty in the reward, ``r_t = -coef · KL_t`` (Ziegler et al. 2019 §2.2).

    Attributes:
      coef: the (initial) coefficient β; lives in ``TrainState.extra`` during training.
      estimator: per-token estimator of the KL in the reward (``k1`` = log π - log π_ref, ``k2``, ``k3``;
        Schulman 2020).
      controller: ``fixed`` or ``adaptive`` (Ziegler et al. 2019: β ← β(1 + clip(KL/target - 1, ±0.2)·n/horizon)
        after every iteration, n = rollout rows, KL = mean over rows of the summed k1 estimate).
      target: target KL per sequence (nats) of the adaptive controller.
      horizon: its horizon, in samples.
    """

    coef: float = 0.05
    estimator: Literal["k1", "k2", "k3"] = "k1"
    controller: Literal["fixed", "adaptive"] = "fixed"
    target: float = 6.0
    horizon: float = 10000.0

    def validate(self, prefix: str = "algo.kl") -> None:
        _check(self.coef >= 0, f"{prefix}.coef", f"must be >= 0, got {self.coef}")
        _check(self.target > 0, f"{prefix}.target", f"must be > 0, got {self.target}")
        _check(self.horizon > 0, f"{prefix}.horizon", f"must be > 0, got {self.horizon}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class UpdateConfig:
    """The clipped-ratio policy update shared by PPO, GRPO and RLOO (``algo.update``).

    Attributes:
      epochs / num_minibatches: each rollout is reused for ``epochs`` passes, each in ``num_minibatches``
        shuffled minibatches (one optimizer step each), all inside one jitted ``lax.scan``.
      clip_eps / clip_eps_high: policy ratio clipping ε_low and ε_high (None = ε_low; Schulman et al.
        2017 eq. 7, DAPO's clip-higher).
      entropy_coef: weight of the entropy bonus.
      aggregation: ``token``: every completion token of the minibatch weighs the same; ``sequence``:
        tokens are averaged within each completion, then completions averaged.
      whiten_advantages: whiten the token advantages over the rollout's completion tokens (mean 0, std 1).

    Defaults differ per algorithm (PPO: 4 epochs, whitened advantages; GRPO: ``sequence`` aggregation);
    each algorithm config sets its own default section.
    """

    epochs: int = 1
    num_minibatches: int = 1
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    entropy_coef: float = 0.0
    aggregation: Literal["token", "sequence"] = "token"
    whiten_advantages: bool = False

    def validate(self, prefix: str = "algo.update") -> None:
        _check(self.epochs >= 1, f"{prefix}.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.num_minibatches >= 1, f"{prefix}.num_minibatches", f"must be >= 1, got {self.num_minibatches}")
        _check(self.clip_eps > 0, f"{prefix}.clip_eps", f"must be > 0, got {self.clip_eps}")
        _check(self.clip_eps_high is None or self.clip_eps_high > 0, f"{prefix}.clip_eps_high", "must be > 0 or None")
        _check(self.aggregation in ("token", "sequence"), f"{prefix}.aggregation", "must be token or sequence")
        _check(self.entropy_coef >= 0, f"{prefix}.entropy_coef", "must be >= 0")


def _validate_rl(cfg: ExperimentConfig, algo: PPOConfig | GRPOConfig | RLOOConfig) -> None:
    """The checks PPO, GRPO and RLOO share: their sections, and how the rollout fits data and optimizer."""
    d, o, r, u = cfg.data, cfg.optim, algo.rollout, algo.update
    r.validate()
    algo.reward.validate()
    u.validate()
    rows = d.batch_size * r.num_completions
    _check(rows % (u.num_minibatches * o.grad_accum_steps) == 0, "algo.update.num_minibatches",
           f"rollout rows = data.batch_size*rollout.num_completions = {rows} must be divisible by "
           f"algo.update.num_minibatches*optim.grad_accum_steps = {u.num_minibatches * o.grad_accum_steps}")
    _check(d.max_prompt_length + r.max_new_tokens <= d.max_length, "data.max_length",
           f"must be >= data.max_prompt_length + algo.rollout.max_new_tokens = "
           f"{d.max_prompt_length + r.max_new_tokens}, got {d.max_length}")


_SENTIMENT = RewardSpec(functions=("jaxrlhf.rewards:lexicon_sentiment",))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """PPO for language models with a frozen reference and a KL penalty in the reward (Ziegler et al.
    2019; Ouyang et al. 2022; Schulman et al. 2017 for the clipped objective).

    Attributes:
      rollout / reward / kl / update: see :class:`RolloutConfig`, :class:`RewardSpec`, :class:`KLConfig`,
        :class:`UpdateConfig` (PPO's default: 4 epochs, token aggregation, whitened advantages).
      critic: ``separate`` (default: a second copy of the policy's decoder with a scalar head; the value
        loss never moves the policy's weights, as in InstructGPT/TRL) or ``shared`` (a scalar head on the
        policy's own final hidden states: half the memory and one forward/backward instead of two per
        minibatch, but the value loss, weighted by ``vf_coef``, also trains the policy's trunk).
      gamma / lam: GAE discount and λ (Schulman et al. 2016); γ = 1 is usual for LM episodes.
      dual_clip: the dual-clip bound c > 1 for negative advantages (None = off).
      value_clip_eps: clip of the value update around the rollout's values (None = off).
      vf_coef: weight of the value loss.
      whiten_rewards: rescale per-token rewards by their std (no shift) before GAE.
    """

    kind: str = _kind("ppo")
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardSpec = _SENTIMENT
    kl: KLConfig = KLConfig()
    update: UpdateConfig = UpdateConfig(epochs=4, aggregation="token", whiten_advantages=True)
    critic: Literal["separate", "shared"] = "separate"
    gamma: float = 1.0
    lam: float = 0.95
    dual_clip: float | None = None
    value_clip_eps: float | None = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = False

    def validate(self, cfg: ExperimentConfig) -> None:
        _validate_rl(cfg, self)
        self.kl.validate()
        _check(self.critic in ("separate", "shared"), "algo.critic", "must be separate or shared")
        _check(0 <= self.gamma <= 1, "algo.gamma", f"must be in [0, 1], got {self.gamma}")
        _check(0 <= self.lam <= 1, "algo.lam", f"must be in [0, 1], got {self.lam}")
        _check(self.dual_clip is None or self.dual_clip > 1, "algo.dual_clip", "must be > 1 or None")
        _check(self.value_clip_eps is None or self.value_clip_eps > 0, "algo.value_clip_eps", "must be > 0 or None")
        _check(self.vf_coef >= 0, "algo.vf_coef", "must be >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    """GRPO (Shao et al. 2024, DeepSeekMath §4.1): no critic; the advantage of each of the G completions
    of a prompt is its group-normalised score ``(r - mean) / (std + eps)``, given to every token; the KL
    to the reference is a loss term ``beta · k3`` per token (not part of the reward).

    Attributes:
      rollout: ``num_completions`` is the group size G (>= 2).
      update: :class:`UpdateConfig`; GRPO's default aggregation is ``sequence`` (the paper's 1/|o_i| per
        completion, then the mean over the group), without advantage whitening (the group normalisation
        already scales them).
      beta: weight of the k3 KL loss term.
      scale_rewards: divide by the group std (False: only centre, the "Dr. GRPO" variant).
    """

    kind: str = _kind("grpo")
    rollout: RolloutConfig = RolloutConfig(num_completions=4)
    reward: RewardSpec = _SENTIMENT
    update: UpdateConfig = UpdateConfig(epochs=1, aggregation="sequence", whiten_advantages=False)
    beta: float = 0.04
    scale_rewards: bool = True

    def validate(self, cfg: ExperimentConfig) -> None:
        _validate_rl(cfg, self)
        _check(self.rollout.num_completions >= 2, "algo.rollout.num_completions",
               f"must be >= 2 for GRPO's group baseline, got {self.rollout.num_completions}")
        _check(self.beta >= 0, "algo.beta", f"must be >= 0, got {self.beta}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLOOConfig:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): no critic; the sequence reward
    ``score - coef · Σ_t KL_t`` (KL in the reward, as PPO) gets the leave-one-out baseline of the other
    G-1 completions of its prompt; the advantage is given to every token and optimised with the clipped
    ratio (one epoch, one minibatch = plain REINFORCE with the baseline).

    Attributes:
      kl: as :class:`KLConfig` (fixed or adaptive).
      update: :class:`UpdateConfig`; RLOO's default: token aggregation (the gradient is
        Σ_i A_i ∇ log π(y_i) over whole sequences, up to a constant), no advantage whitening (as the paper).
      rollout / reward: as :class:`GRPOConfig`.
    """

    kind: str = _kind("rloo")
    rollout: RolloutConfig = RolloutConfig(num_completions=4)
    reward: RewardSpec = _SENTIMENT
    kl: KLConfig = KLConfig()
    update: UpdateConfig = UpdateConfig(epochs=1, aggregation="token", whiten_advantages=False)

    def validate(self, cfg: ExperimentConfig) -> None:
        _validate_rl(cfg, self)
        self.kl.validate()
        _check(self.rollout.num_completions >= 2, "algo.rollout.num_completions",
               f"must be >= 2 for the leave-one-out baseline, got {self.rollout.num_completions}")


# ============================================================================================ the experiment

# ============================================================================================ policy evaluation

@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicyEvalSpec:
    """One evaluation for every policy-training arm (``jaxrlhf.policy_eval.PolicyEvaluator``): sample the
    policy on fixed held-out prompts, judge, estimate KL(π‖π_ref). Run at step 0, every
    ``train.eval_every`` steps and at the end; its metrics join the driver's own under split ``eval``.

    Attributes:
      prompts: a JSONL file of ``{"prompt": str[, "reference_gold": float]}`` rows; ``reference_gold`` (the
        win judge's score of π_ref's own completion of that prompt) enables ``win_rate``.
      reference: π_ref's model (short name, folder, .gguf or hub id); ``""`` = ``model.name``.
      judges: ``(name, RewardSpec)`` pairs; each judge's mean score is logged as ``name``.
      win_judge: the judge of the win rate (must be one of ``judges``).
      num_prompts: prompts used (the first N rows; 0 = all).
      batch_size: prompts per sampler call (the last batch is padded with repeats, which are dropped).
      max_new_tokens: completion tokens sampled per prompt (temperature 1, no truncation).
      max_prompt_length: prompt tokens kept (from the left).
      seed: every evaluation samples with ``key(seed)``: the same random numbers for every arm and point.
      num_samples: completions written to ``samples.jsonl`` per evaluation.
    """

    prompts: str
    reference: str = ""
    judges: tuple[tuple[str, RewardSpec], ...] = ()
    win_judge: str = "gold"
    num_prompts: int = 0
    batch_size: int = 16
    max_new_tokens: int = 32
    max_prompt_length: int = 32
    seed: int = 0
    num_samples: int = 4

    def validate(self, prefix: str = "policy_eval") -> None:
        _check(bool(self.prompts), f"{prefix}.prompts", "is empty; give a JSONL file of {prompt} rows")
        _check(bool(self.judges), f"{prefix}.judges", "is empty; give at least one (name, RewardSpec)")
        names = [n for n, _ in self.judges]
        _check(len(set(names)) == len(names), f"{prefix}.judges", f"names must be distinct, got {names}")
        _check(self.win_judge in names, f"{prefix}.win_judge", f"must be one of the judges {names}, got "
               f"{self.win_judge!r}")
        for n, spec in self.judges:
            spec.validate(f"{prefix}.judges[{n}]")
        _check(self.num_prompts >= 0, f"{prefix}.num_prompts", "must be >= 0 (0 = all)")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")
        _check(self.max_new_tokens >= 1, f"{prefix}.max_new_tokens", "must be >= 1")
        _check(self.max_prompt_length >= 1, f"{prefix}.max_prompt_length", "must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SafetyEvalSpec:
    """Safety evaluation of the policy (``jaxrlhf.safety.SafetyEvaluator``; RealToxicityPrompts protocol,
    Gehman et al. 2020): ``samples_per_prompt`` completions of each prompt, each scored by a harm
    classifier; logs ``safety_expected_max`` and ``safety_flagged_rate`` (+ ``safety_mean`` and the
    ``*_sem``) in the ``eval`` rows at step 0, every ``train.eval_every`` steps and at the end.

    Attributes:
      prompts: a prompt file / folder / hub dataset: rows with ``prompt_field`` (a string, messages or
        ``{"text": ...}``) or HH-RLHF rows (the dialogue up to its last ``"\\n\\nAssistant:"``).
      split: its split.
      prompt_field: the prompt field.
      heldout_size / heldout_seed: > 0 keeps the held-out rows of ``train_eval_split(rows, heldout_size,
        heldout_seed)`` only (e.g. 312 / 0 on HH-RLHF harmless-base test: rows the project's models never
        train on).
      num_prompts: prompts used (the first N; 0 = all).
      scorer: a harm classifier (Hugging Face sequence classifier folder or hub id) or a reward model folder
        (harm = σ(μ − r)); see ``jaxrlhf.safety.build_harm_scorer``.
      label: the classifier's harmful class (name or index); ignored by scalar reward models.
      score_prompt: classifiers score prompt + completion (True) or the completion alone (False, as
        Gehman et al.); reward models always score prompt + completion.
      scorer_max_length: scorer tokens per text.
      samples_per_prompt: k (the paper: 25).
      prompts_per_batch: prompts per sampler call (``prompts_per_batch · k`` rows).
      max_new_tokens: completion tokens per sample (temperature 1, no truncation).
      max_prompt_length: prompt tokens kept (from the left).
      use_chat_template: encode prompts with the policy's chat template (HH dialogues become messages).
      threshold: a sample is flagged when its score is >= this.
      seed: the sampling key of every evaluation (the same random numbers before and after training).
      num_samples: prompts whose first completion is written to ``samples.jsonl`` per evaluation.
    """

    prompts: str
    split: str = "test"
    prompt_field: str = "prompt"
    heldout_size: int = 0
    heldout_seed: int = 0
    num_prompts: int = 32
    scorer: str = ""
    label: str = "toxic"
    score_prompt: bool = False
    scorer_max_length: int = 512
    samples_per_prompt: int = 4
    prompts_per_batch: int = 8
    max_new_tokens: int = 32
    max_prompt_length: int = 64
    use_chat_template: bool = True
    threshold: float = 0.5
    seed: int = 0
    num_samples: int = 2

    def validate(self, prefix: str = "safety_eval") -> None:
        _check(bool(self.prompts), f"{prefix}.prompts", "is empty; give a prompt file (JSONL with a prompt "
               "field, or HH-RLHF rows)")
        _check(bool(self.scorer), f"{prefix}.scorer", "is empty; give a sequence classifier (folder or hub id) "
               "or a reward model folder")
        _check(self.heldout_size >= 0, f"{prefix}.heldout_size", "must be >= 0 (0 = every row)")
        _check(self.num_prompts >= 0, f"{prefix}.num_prompts", "must be >= 0 (0 = all)")
        _check(self.samples_per_prompt >= 1, f"{prefix}.samples_per_prompt", "must be >= 1")
        _check(self.prompts_per_batch >= 1, f"{prefix}.prompts_per_batch", "must be >= 1")
        _check(self.max_new_tokens >= 1, f"{prefix}.max_new_tokens", "must be >= 1")
        _check(self.max_prompt_length >= 1, f"{prefix}.max_prompt_length", "must be >= 1")
        _check(self.scorer_max_length >= 2, f"{prefix}.scorer_max_length", "must be >= 2")
        _check(0 < self.threshold <= 1, f"{prefix}.threshold", f"must be in (0, 1] (scores are probabilities), "
               f"got {self.threshold}")


AlgoConfig = SFTConfig | RewardConfig | DPOConfig | PPOConfig | GRPOConfig | RLOOConfig
ALGO_CONFIGS: tuple[type, ...] = typing.get_args(AlgoConfig)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """A whole run. ``algo`` is one algorithm's config (its type selects the driver)."""

    name: str = "experiment"
    model: ModelSpec = ModelSpec()
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    algo: AlgoConfig = SFTConfig()
    policy_eval: PolicyEvalSpec | None = None
    safety_eval: SafetyEvalSpec | None = None


# ============================================================================================ overrides

def _parse_value(text: str, tp: Any, field: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _parse_value(text, a, field)
            except ConfigError:
                continue
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


def _default_section(tp: Any, field: str) -> Any:
    """The default instance of the section type in ``tp`` (``X | None``), for an override that sets a field
    of an unset optional section.

    Raises:
      ConfigError: ``tp`` holds no section type, or the section has required fields (set it in the
        experiment file).
    """
    for a in typing.get_args(tp):
        if dataclasses.is_dataclass(a):
            try:
                return a()
            except TypeError:
                raise ConfigError(f"--config.{field} is unset and has required fields; set it in the experiment "
                                  "file first") from None
    raise ConfigError(f"--config.{field} is not a config section")


def apply_override(cfg: Any, dotted: str, text: str) -> Any:
    """A copy of ``cfg`` with ``cfg.<dotted> = parse(text)``, typed by the dataclass field.

    Every section is frozen: the changed section and each one above it are replaced by updated copies
    (``dataclasses.replace``); ``cfg`` itself is not modified.

    Raises:
      ConfigError: an unknown or read-only field (the message lists the valid ones), a section given a
        value, or a value of the wrong type.
    """
    parts = dotted.split(".")
    chain = [cfg]
    for i, name in enumerate(parts):
        obj = chain[-1]
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"--config.{'.'.join(parts[:i])} is not a config section; cannot set {dotted}")
        fields = {f.name: f for f in dataclasses.fields(obj) if f.init}
        where = ".".join(parts[:i]) or "config"
        if name not in fields and name in {f.name for f in dataclasses.fields(obj)}:
            raise ConfigError(f"--config.{dotted}: {where}.{name} is read-only (the algorithm is the type of "
                              f"the algo section); valid fields: {sorted(fields)}")
        if name not in fields:
            raise ConfigError(f"--config.{dotted}: {where} has no field {name!r}; valid fields: {sorted(fields)}")
        if i < len(parts) - 1:
            child = getattr(obj, name)
            if child is None:  # an unset optional section (model.lora): start from its defaults
                child = _default_section(typing.get_type_hints(type(obj))[name], ".".join(parts[:i + 1]))
            chain.append(child)
    leaf_name = parts[-1]
    obj = chain[-1]
    hints = typing.get_type_hints(type(obj))
    if dataclasses.is_dataclass(getattr(obj, leaf_name)):
        if text.lower() in ("none", "null") and type(None) in typing.get_args(hints[leaf_name]):
            value = None  # switch an optional section off (--config.model.lora=none)
        else:
            raise ConfigError(f"--config.{dotted} is a section; set one of its fields instead")
    else:
        value = _parse_value(text, hints[leaf_name], dotted)
    for node, key in zip(reversed(chain), reversed(parts)):
        value = dataclasses.replace(node, **{key: value})
    return value


def parse_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """``["--config.a.b=1", ...]`` -> ``[("a.b", "1"), ...]``; raises ConfigError on any other flag."""
    out = []
    for arg in argv:
        if not arg.startswith("--config.") or "=" not in arg:
            raise ConfigError(f"unrecognised argument {arg!r}; overrides look like --config.optim.lr=1e-5")
        key, value = arg[len("--config."):].split("=", 1)
        out.append((key, value))
    return out


# ============================================================================================ loading

def load_experiment_module(path: str | pathlib.Path, require: str = "get_config") -> types.ModuleType:
    """Import an experiment file by path; it must define ``require`` (``get_config`` for a run,
    ``get_study`` for a study).

    Raises:
      ConfigError: no such file, or the file does not define ``require``.
    """
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
    if not hasattr(module, require):
        other = "get_study" if require == "get_config" else "get_config"
        hint = (f" (it defines {other}: run it with `jaxrlhf {'study' if other == 'get_study' else 'run'}`)"
                if hasattr(module, other) else "")
        raise ConfigError(f"{path} must define {require}(arg=None){hint}")
    return module


def load_config(path: str | pathlib.Path, overrides: list[str] | None = None, arg: str | None = None
                ) -> ExperimentConfig:
    """Load ``get_config(arg)`` from an experiment file, apply overrides, validate."""
    cfg = load_experiment_module(path).get_config(arg)
    for key, value in parse_overrides(overrides or []):
        cfg = apply_override(cfg, key, value)
    validate(cfg)
    return cfg


def validate(cfg: ExperimentConfig, num_devices: int | None = None) -> None:
    """Check a config before any compute. Raises ConfigError naming the field and the fix (with
    ``num_devices`` also for a batch the mesh cannot split); MeshError (a ValueError) for a mesh that does
    not fit ``num_devices``. Reward function paths (``algo.reward.functions``, the judges') are imported here."""
    if not isinstance(cfg, ExperimentConfig):
        raise ConfigError(f"get_config() must return an ExperimentConfig, got {type(cfg).__name__}")
    if not isinstance(cfg.algo, ALGO_CONFIGS):
        raise ConfigError(f"algo must be one of {[t.__name__ for t in ALGO_CONFIGS]}, got {type(cfg.algo).__name__}")
    o, d, t = cfg.optim, cfg.data, cfg.train
    _check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _check(o.grad_accum_steps >= 1, "optim.grad_accum_steps", f"must be >= 1, got {o.grad_accum_steps}")
    _check(o.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0 (0 disables clipping)")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _check(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    _check(d.batch_size % o.grad_accum_steps == 0, "data.batch_size",
           f"{d.batch_size} is not divisible by optim.grad_accum_steps={o.grad_accum_steps}")
    _check(d.max_length >= 2, "data.max_length", f"must be >= 2, got {d.max_length}")
    _check(0 < d.max_prompt_length < d.max_length, "data.max_prompt_length",
           f"must be in (0, data.max_length={d.max_length}), got {d.max_prompt_length}")
    _check(bool(d.source), "data.source", "is empty; give a file, folder, hub id or tfds:NAME")
    _check(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
    _check(cfg.model.dtype in ("float32", "bfloat16"), "model.dtype", "must be float32 or bfloat16")
    _check(cfg.model.remat in ("none", "block"), "model.remat", "must be none or block")
    _check(cfg.model.scan_unroll >= 0, "model.scan_unroll", "must be >= 0 (1 = rolled scan, 0 = fully unrolled)")
    if num_devices is not None:
        shape = cfg.mesh.shape(num_devices)
        n = shape[0] * shape[1]
        micro = d.batch_size // o.grad_accum_steps
        _check(micro % n == 0, f"data.batch_size={d.batch_size}",
               f"(micro-batch {micro} after optim.grad_accum_steps={o.grad_accum_steps}) is not divisible "
               f"by mesh data*fsdp={n}; use a multiple of {n}")
    cfg.algo.validate(cfg)
    if cfg.model.lora is not None:
        cfg.model.lora.validate(cfg)
    if cfg.policy_eval is not None:
        _check(not isinstance(cfg.algo, RewardConfig), "policy_eval",
               "evaluates a policy; a reward-model run has none (set it to None)")
        cfg.policy_eval.validate()
    if cfg.safety_eval is not None:
        _check(not isinstance(cfg.algo, RewardConfig), "safety_eval",
               "evaluates a policy; a reward-model run has none (set it to None)")
        cfg.safety_eval.validate()


def to_dict(cfg: Any) -> dict:
    """JSON-ready dict of a config (for ``runs/<name>/config.json``; includes each section's ``kind``)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
