"""DPO (and IPO / SimPO / ORPO / KTO, via ``sweep()``) of SmolLM2-135M-Instruct on HH-RLHF harmless-base.

The same 2312 human preference pairs as ``reward_hh_smollm2.py``, with the same FIXED 312 held out; the
held-out figures are the implicit-reward accuracy (chosen reward > rejected) and the mean implicit reward
margin. The reference is the initial policy. Default size is for the project's 2-core CPU;
``--arg full`` is the accelerator-sized variant. ``--arg safety`` adds the safety evaluation
(``jaxrlhf.safety``: k = 4 samples of 32 held-out red-team prompts scored by the harmlessness reward model of
``reward_hh_smollm2.py``, at step 0 and at the end; ``--config.safety_eval.scorer=`` names another classifier);
``experiments/safety_hh_study.py`` runs the whole comparison over seeds.

    jaxrlhf run experiments/dpo_hh_smollm2.py --config.algo.beta=0.3 --config.algo.loss=ipo
    jaxrlhf run experiments/reward_hh_smollm2.py && jaxrlhf run experiments/dpo_hh_smollm2.py --arg safety
"""

import dataclasses

from configs.assets import HH_RLHF_HARMLESS
from configs.models import smollm2_135m
from jaxrlhf.config import DataConfig, DPOConfig, ExperimentConfig, OptimConfig, SafetyEvalSpec, TrainConfig


def get_config(arg=None) -> ExperimentConfig:
    cfg = ExperimentConfig(
        name="dpo_hh_smollm2",
        model=smollm2_135m(),
        optim=OptimConfig(lr=1e-5, warmup_steps=2, schedule="cosine", weight_decay=0.0, max_grad_norm=10.0),
        data=DataConfig(source=HH_RLHF_HARMLESS(), split="test", batch_size=8, max_length=128,
                        max_prompt_length=64, eval_size=312, seed=0),
        train=TrainConfig(steps=32, log_every=1, eval_every=0, save_every=32, num_samples=2,
                          sample_max_new_tokens=32),
        algo=DPOConfig(loss="dpo", beta=0.1, reference="model"),
    )
    if arg == "full":
        cfg = dataclasses.replace(
            cfg, name="dpo_hh_smollm2_full",
            data=dataclasses.replace(cfg.data, max_length=512, max_prompt_length=256, batch_size=32),
            optim=dataclasses.replace(cfg.optim, lr=5e-7, warmup_steps=10),
            train=dataclasses.replace(cfg.train, steps=125, eval_every=25, save_every=125),  # 2 epochs of 2000 pairs
            algo=dataclasses.replace(cfg.algo, reference="precomputed"))
    elif arg == "safety":
        # The 312 held-out rows of the split above (data.eval_size, data.seed): prompts DPO never trains on.
        cfg = dataclasses.replace(cfg, safety_eval=SafetyEvalSpec(
            prompts=HH_RLHF_HARMLESS(), split="test", heldout_size=312, heldout_seed=0, num_prompts=32,
            scorer="runs/reward_hh_smollm2/reward_model", samples_per_prompt=4, max_new_tokens=32,
            max_prompt_length=64))
    elif arg not in (None, ""):
        raise ValueError(f"unknown --arg {arg!r}; use 'full', 'safety' or nothing")
    return cfg


def sweep() -> list[dict[str, str]]:
    """Loss type x beta (each point gets its own run name). SimPO uses its paper's larger betas."""
    points = [("dpo", b) for b in (0.05, 0.1, 0.3)] + [("ipo", b) for b in (0.1, 0.5)]
    points += [("simpo", b) for b in (2.0, 2.5)] + [("orpo", 0.1), ("kto", 0.1)]
    return [{"algo.loss": loss, "algo.beta": str(beta), "name": f"dpo_hh_smollm2_{loss}_b{beta}"}
            for loss, beta in points]
