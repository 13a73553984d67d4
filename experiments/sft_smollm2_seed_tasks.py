"""SFT of SmolLM2-135M-Instruct on the 175 human-written self-instruct seed tasks.

The README's main job. Default size finishes in a few minutes on a 2-core CPU; ``--arg full`` is the
accelerator-sized variant (longer sequences, all instances, more steps).
"""

import dataclasses

from configs.assets import SELF_INSTRUCT_SEED
from configs.models import smollm2_135m
from jaxrlhf.config import DataConfig, ExperimentConfig, OptimConfig, SFTConfig, TrainConfig


def get_config(arg=None) -> ExperimentConfig:
    cfg = ExperimentConfig(
        name="sft_smollm2_seed_tasks",
        model=smollm2_135m(),
        optim=OptimConfig(lr=5e-5, warmup_steps=3, schedule="cosine", weight_decay=0.0, max_grad_norm=1.0),
        data=DataConfig(source=SELF_INSTRUCT_SEED(), batch_size=8, max_length=160, max_prompt_length=96,
                        eval_size=16, seed=0),
        train=TrainConfig(steps=24, log_every=1, eval_every=12, save_every=12, num_samples=3,
                          sample_max_new_tokens=40),
        algo=SFTConfig(),
    )
    if arg == "full":
        cfg = dataclasses.replace(
            cfg, name="sft_smollm2_seed_tasks_full",
            data=dataclasses.replace(cfg.data, max_length=512, max_prompt_length=256, batch_size=32),
            train=dataclasses.replace(cfg.train, steps=200, eval_every=50, save_every=100))
    elif arg not in (None, ""):
        raise ValueError(f"unknown --arg {arg!r}; use 'full' or nothing")
    return cfg
