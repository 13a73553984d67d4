"""PPO: SmolLM2-135M-Instruct learns to continue IMDB review openings positively.

Prompts are the first 2-8 words of IMDB training reviews (``jaxrlhf.data.imdb_prompt_examples``), continued
as raw text (no chat template). The score is a sentiment reward of the completion; the KL to the frozen
initial model is penalised in the reward (β = 0.05, k1) and reported as ``kl/ref``.

Reward source (a config choice, ``algo.reward``):

* default: VADER's compound sentiment of the completion (``jaxrlhf.rewards:vader_sentiment``; needs
  ``pip install vaderSentiment==3.3.2``; ``--config.algo.reward.functions=jaxrlhf.rewards:lexicon_sentiment``
  is a dependency-free stand-in);
* the trained IMDB sentiment classifier of ``experiments/classifier_imdb_minilm.py`` (log-odds of
  "positive", standardised): ``--arg classifier`` (or any folder written by ``save_reward_model``:
  ``--config.algo.reward.functions= --config.algo.reward.reward_model=runs/<name>/reward_model``);
* a Hugging Face sequence classifier folder: ``--config.algo.reward.functions=
  --config.algo.reward.classifier=PATH --config.algo.reward.classifier_label=POSITIVE``.

Default size: 8 prompts x 32 new tokens, 12 iterations (a few minutes on a 2-core CPU);
``--arg full`` is the accelerator-sized variant (64 prompts x 48 tokens, 4 minibatches, 200 iterations);
``--arg full+classifier`` combines both.
"""

import dataclasses
import pathlib

from configs.assets import IMDB_TRAIN
from configs.models import smollm2_135m
from jaxrlhf.config import (DataConfig, ExperimentConfig, KLConfig, OptimConfig, PPOConfig, RewardSpec,
                            RolloutConfig, TrainConfig, UpdateConfig)

SENTIMENT = RewardSpec(functions=("jaxrlhf.rewards:vader_sentiment",))
CLASSIFIER = pathlib.Path(__file__).resolve().parents[1] / "runs" / "classifier_imdb_minilm" / "reward_model"


def get_config(arg=None) -> ExperimentConfig:
    cfg = ExperimentConfig(
        name="ppo_imdb_smollm2",
        model=smollm2_135m(),
        optim=OptimConfig(lr=2e-5, schedule="constant", warmup_steps=0, max_grad_norm=1.0),
        data=DataConfig(source=IMDB_TRAIN(), format="imdb", batch_size=8, max_prompt_length=16, max_length=48,
                        eval_size=16, limit=600, use_chat_template=False, seed=0),
        train=TrainConfig(steps=12, log_every=1, save_every=12, num_samples=4),
        algo=PPOConfig(rollout=RolloutConfig(max_new_tokens=32, temperature=1.0),
                       reward=SENTIMENT, kl=KLConfig(coef=0.05, estimator="k1"),
                       critic="separate", vf_coef=0.1,
                       update=UpdateConfig(epochs=4, num_minibatches=1, whiten_advantages=True)),
    )
    parts = set((arg or "").split("+")) - {""}
    if parts - {"full", "classifier"}:
        raise ValueError(f"unknown --arg {arg!r}; use 'full', 'classifier', 'full+classifier' or nothing")
    if "full" in parts:
        cfg = dataclasses.replace(
            cfg, name="ppo_imdb_smollm2_full", model=smollm2_135m(dtype="bfloat16"),
            optim=dataclasses.replace(cfg.optim, lr=1.4e-5),
            data=dataclasses.replace(cfg.data, batch_size=64, max_length=64, eval_size=128, limit=0),
            train=dataclasses.replace(cfg.train, steps=200, save_every=50, log_every=5),
            algo=PPOConfig(rollout=RolloutConfig(max_new_tokens=48), reward=SENTIMENT,
                           kl=KLConfig(coef=0.05, controller="adaptive", target=6.0, horizon=10000.0), vf_coef=0.1,
                           update=UpdateConfig(epochs=4, num_minibatches=4, whiten_advantages=True)))
    if "classifier" in parts:
        cfg = dataclasses.replace(cfg, name=cfg.name + "_classifier",
                                  algo=dataclasses.replace(cfg.algo, reward=RewardSpec(reward_model=str(CLASSIFIER))))
    return cfg
