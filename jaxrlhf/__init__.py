"""jaxrlhf: RLHF in JAX/Flax NNX -- SFT, reward models, the DPO family, PPO, GRPO and RLOO.

The names in ``__all__`` are the public entry points; each is imported lazily on first use (PEP 562),
so ``import jaxrlhf`` costs almost nothing and importing the losses, ops and steps pulls in no torch,
tensorflow, datasets or transformers. The public modules each declare their own ``__all__``; anything
not listed in an ``__all__`` is private and may change without notice.

Example::

    from jaxrlhf import load_pretrained, dpo_loss, dpo_step, make_optimizer, init_sharded_state

Groups: models (:func:`load_pretrained`, :func:`load_hf_folder`, ...), the sampler
(:func:`sample_tokens`, :class:`SamplingConfig`), losses (:func:`dpo_loss`, :func:`ppo_policy_loss`,
...), ops (:func:`gae`, :func:`kl_penalty`, ...), each algorithm's state and step (:func:`sft_step`,
:func:`reward_step`, :func:`dpo_step`, :func:`ppo_update`, :func:`grpo_update`, ...), rewards
(:func:`build_reward`), evaluation (:func:`sequence_kl`, :func:`build_policy_evaluator`), checkpointing
(:class:`Checkpointer`), the mesh (:func:`make_mesh`, :func:`place_batch`), configs
(:class:`ExperimentConfig`, :func:`load_config`), the study runner (:func:`run_study`) and
:func:`run_experiment`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> "module:attribute", grouped as in the README's "Public API" table.
_EXPORTS: dict[str, str] = {
    # models
    "load_pretrained": "jaxrlhf.models.hub:load_pretrained",
    "Pretrained": "jaxrlhf.models.hub:Pretrained",
    "ModelUnavailableError": "jaxrlhf.models.hub:ModelUnavailableError",
    "load_hf_folder": "jaxrlhf.models.hf:load_hf_folder",
    "save_hf_folder": "jaxrlhf.models.hf:save_hf_folder",
    "load_gguf": "jaxrlhf.models.gguf:load_gguf",
    "ModelConfig": "jaxrlhf.models.config:ModelConfig",
    "Llama": "jaxrlhf.models.llama:Llama",
    "GPT2": "jaxrlhf.models.gpt2:GPT2",
    "RewardModel": "jaxrlhf.models.reward_model:RewardModel",
    "load_reward_model": "jaxrlhf.models.reward_model:load_reward_model",
    "save_reward_model": "jaxrlhf.models.reward_model:save_reward_model",
    "export_hf_reward_model": "jaxrlhf.models.reward_model:export_hf_reward_model",
    "load_hf_reward_model": "jaxrlhf.models.reward_model:load_hf_reward_model",
    # host memory (XLA:CPU): keep each step's buffers resident, see jaxrlhf/host_memory.py
    "reuse_host_memory": "jaxrlhf.host_memory:reuse_host_memory",
    # sampler
    "SamplingConfig": "jaxrlhf.sampling:SamplingConfig",
    "SampleOutput": "jaxrlhf.sampling:SampleOutput",
    "sample": "jaxrlhf.sampling:sample",
    "sample_tokens": "jaxrlhf.sampling:sample_tokens",
    "generate_text": "jaxrlhf.generate:generate_text",
    # losses: arrays in, (scalar loss, metrics) out
    "bradley_terry_loss": "jaxrlhf.losses:bradley_terry_loss",
    "ranking_loss": "jaxrlhf.losses:ranking_loss",
    "classification_loss": "jaxrlhf.losses:classification_loss",
    "dpo_loss": "jaxrlhf.losses:dpo_loss",
    "hinge_dpo_loss": "jaxrlhf.losses:hinge_dpo_loss",
    "robust_dpo_loss": "jaxrlhf.losses:robust_dpo_loss",
    "ipo_loss": "jaxrlhf.losses:ipo_loss",
    "simpo_loss": "jaxrlhf.losses:simpo_loss",
    "orpo_loss": "jaxrlhf.losses:orpo_loss",
    "kto_loss": "jaxrlhf.losses:kto_loss",
    "kto_kl_reference_point": "jaxrlhf.losses:kto_kl_reference_point",
    "plackett_luce_dpo_loss": "jaxrlhf.losses:plackett_luce_dpo_loss",
    "ppo_policy_loss": "jaxrlhf.losses:ppo_policy_loss",
    "ppo_value_loss": "jaxrlhf.losses:ppo_value_loss",
    # ops: arrays in, arrays out
    "token_logprobs": "jaxrlhf.ops.logprobs:token_logprobs",
    "next_token_logprobs": "jaxrlhf.ops.logprobs:next_token_logprobs",
    "sequence_logprobs": "jaxrlhf.ops.logprobs:sequence_logprobs",
    "entropy_from_logits": "jaxrlhf.ops.logprobs:entropy_from_logits",
    "masked_sum": "jaxrlhf.ops.masked:masked_sum",
    "masked_mean": "jaxrlhf.ops.masked:masked_mean",
    "masked_var": "jaxrlhf.ops.masked:masked_var",
    "masked_whiten": "jaxrlhf.ops.masked:masked_whiten",
    "masked_aggregate": "jaxrlhf.ops.masked:masked_aggregate",
    "gae": "jaxrlhf.ops.gae:gae",
    "kl_k1": "jaxrlhf.ops.kl:kl_k1",
    "kl_k2": "jaxrlhf.ops.kl:kl_k2",
    "kl_k3": "jaxrlhf.ops.kl:kl_k3",
    "kl_penalty": "jaxrlhf.ops.kl:kl_penalty",
    "grpo_advantages": "jaxrlhf.ops.advantages:grpo_advantages",
    "rloo_advantages": "jaxrlhf.ops.advantages:rloo_advantages",
    # train state and the generic step
    "TrainState": "jaxrlhf.train_state:TrainState",
    "make_optimizer": "jaxrlhf.train_state:make_optimizer",
    "init_sharded_state": "jaxrlhf.train_state:init_sharded_state",
    "jit_step": "jaxrlhf.train_state:jit_step",
    "gradient_step": "jaxrlhf.train_state:gradient_step",
    # steps per algorithm
    "sft_step": "jaxrlhf.algos.sft:sft_step",
    "sft_eval": "jaxrlhf.algos.sft:sft_eval",
    "reward_step": "jaxrlhf.algos.reward:reward_step",
    "dpo_step": "jaxrlhf.algos.dpo:dpo_step",
    "dpo_extra": "jaxrlhf.algos.dpo:dpo_extra",
    "PREFERENCE_LOSSES": "jaxrlhf.algos.dpo_losses:PREFERENCE_LOSSES",
    "RLAlgorithm": "jaxrlhf.algos.rollout:RLAlgorithm",
    "init_extra": "jaxrlhf.algos.rollout:init_extra",
    "ppo_init_params": "jaxrlhf.algos.ppo:ppo_init_params",
    "ppo_experience": "jaxrlhf.algos.ppo:ppo_experience",
    "ppo_update": "jaxrlhf.algos.ppo:ppo_update",
    "PPO": "jaxrlhf.algos.ppo:PPO",
    "policy_init_params": "jaxrlhf.algos.grpo:policy_init_params",
    "grpo_experience": "jaxrlhf.algos.grpo:grpo_experience",
    "critic_free_experience": "jaxrlhf.algos.grpo:critic_free_experience",
    "grpo_update": "jaxrlhf.algos.grpo:grpo_update",
    "rloo_experience": "jaxrlhf.algos.grpo:rloo_experience",
    "rloo_update": "jaxrlhf.algos.grpo:rloo_update",
    "GRPO": "jaxrlhf.algos.grpo:GRPO",
    "RLOO": "jaxrlhf.algos.grpo:RLOO",
    # rewards
    "Completions": "jaxrlhf.rewards:Completions",
    "RewardFn": "jaxrlhf.rewards:RewardFn",
    "TokenReward": "jaxrlhf.rewards:TokenReward",
    "FunctionReward": "jaxrlhf.rewards:FunctionReward",
    "ClassifierReward": "jaxrlhf.rewards:ClassifierReward",
    "RewardModelReward": "jaxrlhf.rewards:RewardModelReward",
    "WeightedSum": "jaxrlhf.rewards:WeightedSum",
    "build_reward": "jaxrlhf.rewards:build_reward",
    # evaluation
    "sequence_kl": "jaxrlhf.evaluate:sequence_kl",
    "win_rate": "jaxrlhf.evaluate:win_rate",
    "distinct_n": "jaxrlhf.evaluate:distinct_n",
    "mean_std_over_seeds": "jaxrlhf.evaluate:mean_std_over_seeds",
    "PolicyEvaluator": "jaxrlhf.policy_eval:PolicyEvaluator",
    "build_policy_evaluator": "jaxrlhf.policy_eval:build_policy_evaluator",
    # checkpointing
    "Checkpointer": "jaxrlhf.checkpoint:Checkpointer",
    # mesh
    "MeshConfig": "jaxrlhf.sharding:MeshConfig",
    "make_mesh": "jaxrlhf.sharding:make_mesh",
    "place_batch": "jaxrlhf.sharding:place_batch",
    "state_shardings": "jaxrlhf.sharding:state_shardings",
    "replicated": "jaxrlhf.sharding:replicated",
    # configs
    "ExperimentConfig": "jaxrlhf.config:ExperimentConfig",
    "ModelSpec": "jaxrlhf.config:ModelSpec",
    "OptimConfig": "jaxrlhf.config:OptimConfig",
    "DataConfig": "jaxrlhf.config:DataConfig",
    "TrainConfig": "jaxrlhf.config:TrainConfig",
    "SFTConfig": "jaxrlhf.config:SFTConfig",
    "RewardConfig": "jaxrlhf.config:RewardConfig",
    "DPOConfig": "jaxrlhf.config:DPOConfig",
    "PPOConfig": "jaxrlhf.config:PPOConfig",
    "GRPOConfig": "jaxrlhf.config:GRPOConfig",
    "RLOOConfig": "jaxrlhf.config:RLOOConfig",
    "RolloutConfig": "jaxrlhf.config:RolloutConfig",
    "KLConfig": "jaxrlhf.config:KLConfig",
    "UpdateConfig": "jaxrlhf.config:UpdateConfig",
    "RewardSpec": "jaxrlhf.config:RewardSpec",
    "PolicyEvalSpec": "jaxrlhf.config:PolicyEvalSpec",
    "ConfigError": "jaxrlhf.config:ConfigError",
    "load_config": "jaxrlhf.config:load_config",
    "validate": "jaxrlhf.config:validate",
    # study runner and experiments
    "Study": "jaxrlhf.study:Study",
    "Stage": "jaxrlhf.study:Stage",
    "Arm": "jaxrlhf.study:Arm",
    "run_study": "jaxrlhf.study:run_study",
    "expand_grid": "jaxrlhf.study:expand_grid",
    "write_study_report": "jaxrlhf.study_report:write_study_report",
    "run_experiment": "jaxrlhf.drivers:run_experiment",
}

__all__ = list(_EXPORTS)

# Subpackages and modules reachable as ``jaxrlhf.<name>`` without an explicit import.
_SUBMODULES = frozenset({
    "algos", "checkpoint", "cli", "config", "data", "drivers", "evaluate", "frontier", "generate",
    "kl_control", "labeling", "loop", "losses", "models", "ops", "policy_eval", "report", "rewards",
    "sampling", "seeds", "sharding", "study", "study_report", "train_state",
})


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule) on first access and cache it in the package namespace.

    Raises:
      AttributeError: ``name`` is neither in ``__all__`` nor a submodule of jaxrlhf.
    """
    target = _EXPORTS.get(name)
    if target is not None:
        module, attr = target.split(":")
        value = getattr(importlib.import_module(module), attr)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'jaxrlhf' has no attribute {name!r}; the public names are jaxrlhf.__all__")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """Module attributes plus the lazily imported public names and submodules."""
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)
