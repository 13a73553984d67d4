"""Reward model from SmolLM2-135M-Instruct on Anthropic HH-RLHF harmless-base (real human preferences).

Pairwise Bradley–Terry on the 2312 harmless-base test pairs, of which a FIXED 312 (``train_eval_split
(2312, 312, seed=0)``) are held out for the reported accuracy. The default size is for the project's
2-core CPU (128-token pairs, 48 steps of 8 pairs = 384 training pairs, one held-out evaluation before
and after; about 15 minutes); ``--arg full`` is the
accelerator-sized variant (all 2000 training pairs for 2 epochs, 384 tokens). The trained model (backbone
as a Hugging Face folder + head + normalisation stats) is exported to ``runs/<name>/reward_model``; load it
with ``jaxrlhf.models.reward_model.load_reward_model``.
"""

import dataclasses

from configs.assets import HH_RLHF_HARMLESS
from configs.models import smollm2_135m
from jaxrlhf.config import DataConfig, ExperimentConfig, OptimConfig, RewardConfig, TrainConfig


def get_config(arg=None) -> ExperimentConfig:
    cfg = ExperimentConfig(
        name="reward_hh_smollm2",
        model=smollm2_135m(),
        optim=OptimConfig(lr=1e-5, warmup_steps=4, schedule="cosine", weight_decay=0.0, max_grad_norm=1.0),
        data=DataConfig(source=HH_RLHF_HARMLESS(), split="test", batch_size=8, max_length=128,
                        max_prompt_length=64, eval_size=312, seed=0),
        train=TrainConfig(steps=48, log_every=1, eval_every=0, save_every=48, num_samples=0),
        algo=RewardConfig(objective="pairwise", center_rewards_coef=0.01, normalize_examples=64),
    )
    if arg == "full":
        cfg = dataclasses.replace(
            cfg, name="reward_hh_smollm2_full",
            data=dataclasses.replace(cfg.data, max_length=384, max_prompt_length=256, batch_size=32),
            optim=dataclasses.replace(cfg.optim, lr=1e-5, warmup_steps=10),
            train=dataclasses.replace(cfg.train, steps=125, eval_every=25, save_every=125),  # 2 epochs of 2000 pairs
            algo=dataclasses.replace(cfg.algo, normalize_examples=2000))
    elif arg not in (None, ""):
        raise ValueError(f"unknown --arg {arg!r}; use 'full' or nothing")
    return cfg
