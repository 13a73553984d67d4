"""Sentiment classifier reward on IMDB: all-MiniLM-L6-v2 encoder + a 2-way head (1 = positive).

Trained on the 2500-review IMDB train subset, evaluated on the separate 2500-review test subset
(``configs/assets.py`` IMDB_TRAIN / IMDB_TEST). The reward is the log-odds of "positive", standardised
to mean 0 / std 1 on training reviews. The exported folder ``runs/<name>/reward_model`` is the PPO
sentiment reward:

    from jaxrlhf.models.reward_model import load_reward_model, score_texts
    rm, tok = load_reward_model("runs/classifier_imdb_minilm/reward_model")
    rewards = score_texts(rm, tok, ["What a wonderful film", "Dull and far too long"])
"""

import dataclasses

from configs.assets import IMDB_TEST, IMDB_TRAIN
from jaxrlhf.config import DataConfig, ExperimentConfig, ModelSpec, OptimConfig, RewardConfig, TrainConfig


def get_config(arg=None) -> ExperimentConfig:
    cfg = ExperimentConfig(
        name="classifier_imdb_minilm",
        model=ModelSpec(name="all-minilm-l6-v2"),
        optim=OptimConfig(lr=5e-5, warmup_steps=10, schedule="cosine", weight_decay=0.01, max_grad_norm=1.0),
        data=DataConfig(source=IMDB_TRAIN(), split="train", format="auto", batch_size=16, max_length=128,
                        max_prompt_length=64, eval_size=1000, seed=0),
        train=TrainConfig(steps=100, log_every=5, eval_every=0, save_every=100, num_samples=0),
        algo=RewardConfig(objective="classification", num_labels=2, score_label=1, pooling="mean",
                          normalize_examples=512, eval_source=IMDB_TEST(), eval_split="test"),
    )
    if arg == "full":
        cfg = dataclasses.replace(
            cfg, name="classifier_imdb_minilm_full",
            data=dataclasses.replace(cfg.data, max_length=512, batch_size=32, eval_size=0),  # all 2500 test reviews
            train=dataclasses.replace(cfg.train, steps=400, save_every=200),  # ~5 epochs of 2500 reviews
            algo=dataclasses.replace(cfg.algo, normalize_examples=2500))
    elif arg not in (None, ""):
        raise ValueError(f"unknown --arg {arg!r}; use 'full' or nothing")
    return cfg
