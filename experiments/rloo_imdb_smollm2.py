"""RLOO: SmolLM2-135M-Instruct continues IMDB review openings positively (critic-free variant of
``ppo_imdb_smollm2.py``; same prompts and reward sources, see that file for switching the reward).

4 prompts x G = 4 completions of 32 tokens per iteration (quick default, CPU); leave-one-out baseline,
KL to the reference in the reward (β = 0.05, k1). ``--arg full``: 32 prompts x 8 completions x 48 tokens.
"""

import dataclasses

from configs.assets import IMDB_TRAIN
from configs.models import smollm2_135m
from jaxrlhf.config import (DataConfig, ExperimentConfig, KLConfig, OptimConfig, RewardSpec, RLOOConfig,
                            RolloutConfig, TrainConfig, UpdateConfig)

SENTIMENT = RewardSpec(functions=("jaxrlhf.rewards:vader_sentiment",))


def get_config(arg=None) -> ExperimentConfig:
    cfg = ExperimentConfig(
        name="rloo_imdb_smollm2",
        model=smollm2_135m(),
        optim=OptimConfig(lr=2e-5, schedule="constant", max_grad_norm=1.0),
        data=DataConfig(source=IMDB_TRAIN(), format="imdb", batch_size=4, max_prompt_length=16, max_length=48,
                        eval_size=16, limit=600, use_chat_template=False, seed=0),
        train=TrainConfig(steps=12, log_every=1, save_every=12, num_samples=4),
        algo=RLOOConfig(rollout=RolloutConfig(max_new_tokens=32, num_completions=4), reward=SENTIMENT,
                        kl=KLConfig(coef=0.05), update=UpdateConfig(epochs=2, num_minibatches=1)),
    )
    if arg == "full":
        cfg = dataclasses.replace(
            cfg, name="rloo_imdb_smollm2_full", model=smollm2_135m(dtype="bfloat16"),
            optim=dataclasses.replace(cfg.optim, lr=1e-5),
            data=dataclasses.replace(cfg.data, batch_size=32, max_length=64, eval_size=128, limit=0),
            train=dataclasses.replace(cfg.train, steps=200, save_every=50, log_every=5),
            algo=RLOOConfig(rollout=RolloutConfig(max_new_tokens=48, num_completions=8), reward=SENTIMENT,
                            kl=KLConfig(coef=0.05, controller="adaptive", target=6.0, horizon=10000.0),
                            update=UpdateConfig(epochs=2, num_minibatches=4)))
    elif arg not in (None, ""):
        raise ValueError(f"unknown --arg {arg!r}; use 'full' or nothing")
    return cfg
