"""The main job: PPO against DPO (and friends) on IMDb controlled sentiment, arms x seeds, one report.

The template is the DPO paper's controlled-sentiment experiment (Rafailov et al. 2023, §6.1, Fig. 2 left):
prompts are prefixes of IMDb reviews, the reward is a sentiment classifier's score, DPO's preference
data are completions sampled from the reference and ranked by that classifier, and every method is
plotted as gold reward against KL(π‖π_ref) over several betas / KL coefficients.

Stages (each reused when its config and its inputs are unchanged):

* ``sft``   SmolLM2-135M-Instruct fine-tuned on IMDb train review text (prefix -> continuation, raw
            text, no chat template): the reference π_ref.
* ``gold``  the sentiment classifier: all-MiniLM-L6-v2 fine-tuned on IMDb train labels; its
            standardised log-odds of "positive" is the gold reward r(x, y). VADER is reported beside it.
* ``prefs`` K completions of every training prefix sampled from π_ref, ranked by the gold reward:
            K-way rankings (InstructGPT) and all C(K, 2) DPO pairs; π_ref's completions of the held-out
            test prefixes (the win-rate baseline).
* ``proxy`` a MiniLM reward model trained on those rankings with the K-way ranking loss.

Arms (each over ``seeds``): PPO on the gold reward over KL coefficients; DPO over betas; IPO; RLOO;
Plackett–Luce DPO on the whole K-way ranking (DPO paper, appendix A.3); PPO on the proxy reward (the
reward-hacking arm). Every arm is evaluated the same way (:class:`jaxrlhf.policy_eval.PolicyEvaluator`)
at several points: gold, proxy and VADER scores, sequence KL to π_ref, gold win rate against π_ref,
completion length, distinct-1/2.

Run: ``jaxrlhf study experiments/imdb_sentiment_study.py`` (quick, a 2-core CPU);
``--arg full`` for the paper-sized study on an accelerator; ``--dry-run`` prints the grid.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

import numpy as np

from jaxrlhf import config as C
from jaxrlhf.drivers import run_experiment

from configs.assets import IMDB_TEST, IMDB_TRAIN
from jaxrlhf.data.tokenize import eos_ids_for, pad_id_for
from jaxrlhf.study import Stage, Study, arm_run_dir, expand_grid

QUICK = dict(
    seeds=[0, 1], kl_coefs=[0.02, 0.1, 0.5], betas=[0.05, 0.1, 0.5], ipo_beta=0.1, pl_beta=0.1,
    rloo_kl_coef=0.1, proxy_kl_coef=0.02,
    prefix_words=(2, 8), max_prompt_length=12, max_new_tokens=16,
    sft_rows=512, sft_completion_words=30, sft_steps=30, sft_batch=8, sft_max_length=40, sft_lr=5e-5,
    gold_steps=80, gold_batch=16, gold_max_length=128, gold_eval_rows=500,
    prefs_prompts=128, k=4, eval_prompts=32, eval_batch=16,
    proxy_steps=40, proxy_batch=8, proxy_eval_rows=16,
    dpo_steps=8, dpo_batch=8, dpo_lr=2e-5, rl_steps=8, rl_batch=8, rl_lr=2e-5, rloo_k=2, ppo_epochs=1,
    eval_points=3,
)
# The "longer CPU run" (about an hour on 2 cores): the same grid at 3 seeds, 3x (DPO family) and 2x (RL) the
# steps, a larger DPO learning rate (in the quick run the DPO family barely left π_ref: KL ~0.03 nats),
# 48 held-out prompts, 4 evaluation points.
LONG = dict(QUICK, seeds=[0, 1, 2], dpo_steps=24, dpo_lr=5e-5, rl_steps=16, eval_prompts=48, eval_points=4)
FULL = dict(
    seeds=[0, 1, 2], kl_coefs=[0.01, 0.03, 0.1, 0.3], betas=[0.05, 0.1, 1.0, 5.0], ipo_beta=0.1, pl_beta=0.1,
    rloo_kl_coef=0.05, proxy_kl_coef=0.01,
    prefix_words=(2, 8), max_prompt_length=24, max_new_tokens=48,
    sft_rows=0, sft_completion_words=80, sft_steps=400, sft_batch=32, sft_max_length=128, sft_lr=2e-5,
    gold_steps=400, gold_batch=32, gold_max_length=512, gold_eval_rows=0,
    prefs_prompts=2000, k=4, eval_prompts=256, eval_batch=64,
    proxy_steps=400, proxy_batch=32, proxy_eval_rows=200,
    dpo_steps=400, dpo_batch=32, dpo_lr=1e-6, rl_steps=200, rl_batch=64, rl_lr=1.4e-6, rloo_k=4, ppo_epochs=4,
    eval_points=5,
)


# The whole pipeline in a few minutes (every stage and method, one seed, two or three steps each): a check
# that the study runs end to end, not a result.
SMOKE = dict(QUICK, seeds=[0], kl_coefs=[0.1], betas=[0.1], sft_rows=64, sft_steps=2, gold_steps=2,
             gold_eval_rows=32, prefs_prompts=16, eval_prompts=16, proxy_steps=2, proxy_eval_rows=4,
             dpo_steps=2, rl_steps=2, eval_points=2, max_new_tokens=8)


def sizes(arg: str | None) -> dict:
    """The study's sizes: quick (default, a 2-core CPU), ``full`` (the paper's scale), ``smoke``."""
    table = {None: QUICK, "": QUICK, "quick": QUICK, "long": LONG, "full": FULL, "smoke": SMOKE}
    if arg not in table:
        raise ValueError(f"unknown --arg {arg!r}; use 'long', 'full', 'smoke' or nothing")
    return dict(table[arg])


POLICY = "smollm2-135m-instruct"
ENCODER = "all-minilm-l6-v2"
VADER = "jaxrlhf.rewards:vader_sentiment"


# ------------------------------------------------------------------------------------------- stages

def _imdb_rows(source: str, split: str, n: int, seed: int):
    """``n`` reviews drawn by a seeded sample (the asset files are sorted by label: never the first n)."""
    from jaxrlhf.data.sources import load_rows

    rows = load_rows(source, split=split)
    idx = np.random.default_rng(seed).permutation(len(rows))
    return [rows[int(i)] for i in (idx[:n] if n else idx)]


def _prefix_split(text: str, n_words: int, max_words: int) -> tuple[str, str]:
    """``(first n_words words, the next max_words words)`` of a review with ``<br />`` removed."""
    words = text.replace("<br />", " ").replace("<br/>", " ").split()
    return " ".join(words[:n_words]), " " + " ".join(words[n_words:n_words + max_words])


def run_sft(c: dict, outputs: dict, folder: pathlib.Path) -> dict:
    """π_ref: SFT of the policy on IMDb train reviews as prefix -> continuation (raw text)."""
    from jaxrlhf.labeling import write_jsonl

    rng = np.random.default_rng(c["seed"])
    rows = []
    for r in _imdb_rows(c["source"], "train", c["rows"], c["seed"]):
        prompt, completion = _prefix_split(r["text"], int(rng.integers(c["prefix_words"][0], c["prefix_words"][1] + 1)),
                                           c["completion_words"])
        rows.append({"prompt": prompt, "completion": completion})
    data = write_jsonl(rows, folder / "sft.jsonl")
    cfg = C.ExperimentConfig(
        name="run", model=C.ModelSpec(name=c["model"]),
        optim=C.OptimConfig(lr=c["lr"], warmup_steps=3, schedule="cosine"),
        data=C.DataConfig(source=str(data), format="prompt_completion", batch_size=c["batch"],
                          max_length=c["max_length"], max_prompt_length=c["max_prompt_length"], eval_size=32,
                          use_chat_template=False, seed=c["seed"]),
        train=C.TrainConfig(keep_checkpoints=1, steps=c["steps"], save_every=c["steps"], num_samples=2,
                            run_dir=str(folder)),
        algo=C.SFTConfig())
    summary = run_experiment(cfg, resume=True)
    return {"policy": str(folder / "run" / "hf"), "eval_loss_before": (summary["eval_before"] or {}).get("loss"),
            "eval_loss_after": (summary["eval_after"] or {}).get("loss")}


def run_gold(c: dict, outputs: dict, folder: pathlib.Path) -> dict:
    """The gold reward: a MiniLM sentiment classifier on IMDb train labels (test accuracy reported)."""
    cfg = C.ExperimentConfig(
        name="run", model=C.ModelSpec(name=c["model"]),
        optim=C.OptimConfig(lr=5e-5, warmup_steps=10, schedule="cosine", weight_decay=0.01),
        data=C.DataConfig(source=c["source"], split="train", batch_size=c["batch"], max_length=c["max_length"],
                          max_prompt_length=64, eval_size=c["eval_rows"], seed=0),
        train=C.TrainConfig(keep_checkpoints=1, steps=c["steps"], log_every=5, save_every=c["steps"], num_samples=0,
                            run_dir=str(folder)),
        algo=C.RewardConfig(objective="classification", num_labels=2, score_label=1, pooling="mean",
                            normalize_examples=512, eval_source=c["eval_source"], eval_split="test"))
    summary = run_experiment(cfg, resume=True)
    return {"reward_model": str(folder / "run" / "reward_model"),
            "test_accuracy": (summary["eval_after"] or {}).get("accuracy")}


def _prompt_ids(tokenizer, texts, max_prompt_length: int) -> list[np.ndarray]:
    from jaxrlhf.data.tokenize import encode_prompt

    return [encode_prompt(tokenizer, t)[-max_prompt_length:] for t in texts]


def run_prefs(c: dict, outputs: dict, folder: pathlib.Path) -> dict:
    """K samples of π_ref per training prefix, ranked by the gold reward; π_ref's test completions."""
    import jax
    from flax import nnx

    from jaxrlhf.labeling import pair_rows, ranking_rows, sample_and_score, write_jsonl
    from jaxrlhf.models.hub import load_pretrained
    from jaxrlhf.rewards import RewardModelReward

    pre = load_pretrained(outputs["sft"]["policy"])
    graphdef, params = nnx.split(pre.model)
    tok = pre.tokenizer
    gold = RewardModelReward.from_folder(outputs["gold"]["reward_model"], name="gold")
    sampling = _sampling(pre.cfg, tok, c["max_new_tokens"])
    rng = np.random.default_rng(c["seed"])
    lo, hi = c["prefix_words"]

    def prefixes(source, split, n, seed):
        return [_prefix_split(r["text"], int(rng.integers(lo, hi + 1)), 0)[0]
                for r in _imdb_rows(source, split, n, seed)]

    common = dict(reward=gold, sampling=sampling, prompt_len=c["max_prompt_length"], pad_id=pad_id_for(tok))
    train_prompts = prefixes(c["source"], "train", c["prompts"], c["seed"] + 1)
    scored = sample_and_score(graphdef, params, tok, _prompt_ids(tok, train_prompts, c["max_prompt_length"]),
                              train_prompts, k=c["k"], key=jax.random.key(c["seed"]), **common)
    eval_prompts = prefixes(c["eval_source"], "test", c["eval_prompts"], c["seed"] + 2)
    ref = sample_and_score(graphdef, params, tok, _prompt_ids(tok, eval_prompts, c["max_prompt_length"]),
                           eval_prompts, k=1, key=jax.random.key(c["seed"] + 1), **common)
    pairs = pair_rows(scored)
    out = {
        "rankings": str(write_jsonl(ranking_rows(scored), folder / "rankings.jsonl")),
        "pairs": str(write_jsonl(pairs, folder / "pairs.jsonl")),
        "prompts": str(write_jsonl([{"prompt": p} for p in train_prompts], folder / "prompts.jsonl")),
        "eval": str(write_jsonl([{"prompt": p, "reference_completion": cs[0], "reference_gold": float(s[0])}
                                 for p, cs, s in ref], folder / "eval.jsonl")),
        "num_pairs": len(pairs),
        "reference_gold_mean": float(np.mean([s[0] for _, _, s in ref])),
        "sample_gold_mean": float(np.mean([s.mean() for _, _, s in scored])),
    }
    return out


def run_proxy(c: dict, outputs: dict, folder: pathlib.Path) -> dict:
    """The proxy reward model: MiniLM + K-way ranking loss on π_ref's gold-ranked samples."""
    cfg = C.ExperimentConfig(
        name="run", model=C.ModelSpec(name=c["model"]),
        optim=C.OptimConfig(lr=5e-5, warmup_steps=5, schedule="cosine", weight_decay=0.01),
        data=C.DataConfig(source=outputs["prefs"]["rankings"], batch_size=c["batch"], max_length=c["max_length"],
                          max_prompt_length=c["max_prompt_length"], eval_size=c["eval_rows"],
                          use_chat_template=False, seed=0),
        train=C.TrainConfig(keep_checkpoints=1, steps=c["steps"], log_every=5, save_every=c["steps"], num_samples=0,
                            run_dir=str(folder)),
        algo=C.RewardConfig(objective="ranking", pooling="mean", normalize_examples=256))
    summary = run_experiment(cfg, resume=True)
    return {"reward_model": str(folder / "run" / "reward_model"),
            "heldout_pair_accuracy": (summary["eval_after"] or {}).get("accuracy")}


def _sampling(model_cfg, tokenizer, max_new_tokens: int):
    from jaxrlhf.sampling import SamplingConfig

    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0,
                          eos_token_ids=eos_ids_for(tokenizer, model_cfg), pad_token_id=pad_id_for(tokenizer))


# ------------------------------------------------------------------------------------------- arms

def _eval_spec(z: dict, o: dict):
    gold = C.RewardSpec(reward_model=o["gold"]["reward_model"])
    proxy = C.RewardSpec(reward_model=o["proxy"]["reward_model"])
    return C.PolicyEvalSpec(prompts=o["prefs"]["eval"], reference=o["sft"]["policy"],
                            judges=(("gold", gold), ("proxy", proxy), ("vader", C.RewardSpec(functions=(VADER,)))),
                            max_new_tokens=z["max_new_tokens"], max_prompt_length=z["max_prompt_length"],
                            batch_size=z["eval_batch"], seed=1234)


def _base(z: dict, o: dict, seed: int, *, source: str, steps: int, batch: int, max_length: int, lr: float):
    run_dir, name = arm_run_dir(o)
    every = max(steps // max(z["eval_points"] - 1, 1), 1)
    return dict(
        name=name, model=C.ModelSpec(name=o["sft"]["policy"]),
        optim=C.OptimConfig(lr=lr, schedule="constant", warmup_steps=0),
        data=C.DataConfig(source=source, batch_size=batch, max_length=max_length,
                          max_prompt_length=z["max_prompt_length"], eval_size=0, use_chat_template=False, seed=seed),
        train=C.TrainConfig(keep_checkpoints=1, steps=steps, seed=seed, eval_every=every, save_every=every,
                            num_samples=0, run_dir=run_dir),
        policy_eval=_eval_spec(z, o))


def _rl_arm(z: dict, algo_of: Callable, reward_key: str):
    def make_for(hp: dict, seed: int):
        def make(o):
            base = _base(z, o, seed, source=o["prefs"]["prompts"], steps=z["rl_steps"], batch=z["rl_batch"],
                         max_length=z["max_prompt_length"] + z["max_new_tokens"], lr=z["rl_lr"])
            reward = C.RewardSpec(reward_model=o[reward_key]["reward_model"])
            return C.ExperimentConfig(**base, algo=algo_of(hp, reward))
        return make
    return make_for


def _pref_arm(z: dict, loss: str, data_key: str):
    def make_for(hp: dict, seed: int):
        def make(o):
            base = _base(z, o, seed, source=o["prefs"][data_key], steps=z["dpo_steps"], batch=z["dpo_batch"],
                         max_length=z["max_prompt_length"] + z["max_new_tokens"] + 4, lr=z["dpo_lr"])
            return C.ExperimentConfig(**base, algo=C.DPOConfig(loss=loss, beta=hp["beta"]))
        return make
    return make_for


def get_study(arg=None) -> Study:
    z = sizes(arg)
    name = "imdb_sentiment" + (f"_{arg}" if arg in ("long", "full", "smoke") else "")
    lo_hi = list(z["prefix_words"])
    stages = (
        Stage("sft", dict(model=POLICY, source=IMDB_TRAIN(), rows=z["sft_rows"], seed=0, prefix_words=lo_hi,
                          completion_words=z["sft_completion_words"], lr=z["sft_lr"], batch=z["sft_batch"],
                          steps=z["sft_steps"], max_length=z["sft_max_length"],
                          max_prompt_length=z["max_prompt_length"]), run_sft, cost=z["sft_steps"] / 3),
        Stage("gold", dict(model=ENCODER, source=IMDB_TRAIN(), eval_source=IMDB_TEST(), steps=z["gold_steps"],
                           batch=z["gold_batch"], max_length=z["gold_max_length"], eval_rows=z["gold_eval_rows"]),
              run_gold, cost=z["gold_steps"] / 10),
        Stage("prefs", dict(source=IMDB_TRAIN(), eval_source=IMDB_TEST(), prompts=z["prefs_prompts"], k=z["k"],
                            eval_prompts=z["eval_prompts"], prefix_words=lo_hi, seed=0,
                            max_prompt_length=z["max_prompt_length"], max_new_tokens=z["max_new_tokens"]),
              run_prefs, deps=("sft", "gold"), cost=z["prefs_prompts"] / 32),
        Stage("proxy", dict(model=ENCODER, steps=z["proxy_steps"], batch=z["proxy_batch"], max_length=48,
                            max_prompt_length=z["max_prompt_length"], eval_rows=z["proxy_eval_rows"]),
              run_proxy, deps=("prefs",), cost=z["proxy_steps"] / 10),
    )
    seeds = z["seeds"]
    rl_cost, dpo_cost = z["rl_steps"], z["dpo_steps"] / 2

    def ppo(hp, reward):
        return C.PPOConfig(rollout=C.RolloutConfig(max_new_tokens=z["max_new_tokens"]), reward=reward,
                           kl=C.KLConfig(coef=hp["kl_coef"]),
                           update=dataclasses.replace(C.PPOConfig().update, epochs=z["ppo_epochs"]))

    def rloo(hp, reward):
        return C.RLOOConfig(rollout=C.RolloutConfig(max_new_tokens=z["max_new_tokens"], num_completions=z["rloo_k"]),
                            reward=reward, kl=C.KLConfig(coef=hp["kl_coef"]))

    arms = [
        *expand_grid("ppo", {}, {"kl_coef": z["kl_coefs"]}, seeds, _rl_arm(z, ppo, "gold"), cost=rl_cost),
        *expand_grid("dpo", {}, {"beta": z["betas"]}, seeds, _pref_arm(z, "dpo", "pairs"), cost=dpo_cost),
        *expand_grid("ipo", {}, {"beta": [z["ipo_beta"]]}, seeds, _pref_arm(z, "ipo", "pairs"), cost=dpo_cost),
        *expand_grid("pl_dpo", {}, {"beta": [z["pl_beta"]]}, seeds, _pref_arm(z, "plackett_luce", "rankings"),
                     cost=dpo_cost * 2),
        *expand_grid("rloo", {}, {"kl_coef": [z["rloo_kl_coef"]]}, seeds, _rl_arm(z, rloo, "gold"), cost=rl_cost),
        *expand_grid("ppo_proxy", {}, {"kl_coef": [z["proxy_kl_coef"]]}, seeds, _rl_arm(z, ppo, "proxy"),
                     cost=rl_cost),
    ]
    return Study(name=name, stages=stages, arms=tuple(arms))
