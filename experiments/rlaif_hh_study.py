"""RLAIF against human labels: DPO on pairs labelled by a model judge vs DPO on the human labels (HH-RLHF).

Stage ``label`` (:mod:`jaxrlhf.judge`): the fixed 312 held-out HH-RLHF harmless-base pairs
(``train_eval_split(2312, 312, seed=0)``, the same as ``dpo_hh_smollm2.py`` and ``reward_hh_smollm2.py``)
are judged by SmolLM2-135M-Instruct in both orders: its agreement with the human labels and its
position-bias rate (the share of pairs whose verdict flips with the order) are the stage's outputs. A
seeded sample of ``train_pairs`` training pairs is judged too and written twice: with the judge's labels
(``train_ai.jsonl``, ``judge_prob`` kept per pair) and with the human labels (``train_human.jsonl``), the
same prompts and replies. The held-out pairs with their human labels go to ``heldout_human.jsonl``. Pairs
with an empty reply (a few HH dialogues end in one) are left out of both; the stage reports the counts.

Arms (each over ``seeds``): ``dpo-human`` and ``dpo-ai``, DPO (beta 0.1) from SmolLM2-135M-Instruct on
those two files, both evaluated on ``heldout_human.jsonl`` (``algo.eval_source``): held-out implicit-reward
accuracy (the policy's implicit reward prefers the human-chosen reply) and margin.

    jaxrlhf study experiments/rlaif_hh_study.py            # quick, a 2-core CPU
    jaxrlhf study experiments/rlaif_hh_study.py --arg full # an accelerator
    jaxrlhf label <pairs.jsonl> --out <labelled.jsonl>     # the labelling step alone, on any pair file
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from configs.assets import HH_RLHF_HARMLESS
from jaxrlhf import config as C
from jaxrlhf.study import Stage, Study, arm_run_dir, expand_grid

JUDGE = "smollm2-135m-instruct"
POLICY = "smollm2-135m-instruct"
HELDOUT = 312
QUICK = dict(seeds=[0, 1], heldout=HELDOUT, train_pairs=128, dpo_steps=16, dpo_batch=8, dpo_lr=2e-5, beta=0.1,
             max_length=128, max_prompt_length=64, judge_prompt_tokens=192, judge_reply_tokens=96, dtype="bfloat16")
FULL = dict(QUICK, seeds=[0, 1, 2], train_pairs=2000, dpo_steps=250, dpo_batch=16, dpo_lr=5e-7, max_length=512,
            max_prompt_length=256, judge_prompt_tokens=768, judge_reply_tokens=256)
SMOKE = dict(QUICK, seeds=[0], heldout=24, train_pairs=16, dpo_steps=2)  # a pipeline check, not a result


def sizes(arg: str | None) -> dict:
    table = {None: QUICK, "": QUICK, "full": FULL, "smoke": SMOKE}
    if arg not in table:
        raise ValueError(f"unknown --arg {arg!r}; use 'full', 'smoke' or nothing")
    return dict(table[arg])


def _write(rows, path: pathlib.Path) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_label(c: dict, outputs: dict, folder: pathlib.Path) -> dict:
    """Judge the held-out pairs (agreement, position bias) and a training sample (the AI-labelled file)."""
    from jaxrlhf.data.formats import preference_example
    from jaxrlhf.data.iterator import train_eval_split
    from jaxrlhf.data.sources import load_rows
    from jaxrlhf.judge import label_rows, load_judge

    rows = load_rows(c["source"], split="test")
    train_idx, eval_idx = train_eval_split(len(rows), c["heldout"], seed=0)
    pick = np.sort(np.random.default_rng(c["seed"]).permutation(train_idx)[:c["train_pairs"]])
    heldout = [rows[int(i)] for i in eval_idx]
    train = [rows[int(i)] for i in pick]

    def as_pair(row, i):  # the HH dialogue split into {prompt, chosen, rejected} (the human label)
        ex, _ = preference_example(row, i)
        return {"prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected}

    def usable(pairs):  # a few HH dialogues end in an empty reply: no pair to judge or train on
        return [p for p in pairs if p["chosen"].strip() and p["rejected"].strip()]

    judge = load_judge(c["judge"], c["dtype"])
    kw = dict(max_prompt_tokens=c["judge_prompt_tokens"], max_reply_tokens=c["judge_reply_tokens"])
    heldout_pairs = usable([as_pair(r, i) for i, r in enumerate(heldout)])
    heldout_labelled, heldout_report = label_rows(heldout_pairs, judge, **kw)
    train_pairs = usable([as_pair(r, i) for i, r in enumerate(train)])
    train_ai, train_report = label_rows(train_pairs, judge, **kw)
    _write(heldout_labelled, folder / "heldout_judged.jsonl")
    return {
        "heldout_human": _write(heldout_pairs, folder / "heldout_human.jsonl"),
        "train_human": _write(train_pairs, folder / "train_human.jsonl"),
        "train_ai": _write(train_ai, folder / "train_ai.jsonl"),
        "heldout_pairs": len(heldout_pairs), "train_pairs": len(train_pairs),
        "heldout_agreement": heldout_report["agreement"], "heldout_agreement_sem": heldout_report["agreement_sem"],
        "heldout_position_bias_rate": heldout_report["position_bias_rate"],
        "heldout_position_bias_rate_sem": heldout_report["position_bias_rate_sem"],
        "train_agreement": train_report["agreement"],
        "train_position_bias_rate": train_report["position_bias_rate"],
        "judge_mean_confidence": heldout_report["mean_confidence"],
        # Length preference: the share of held-out pairs whose preferred reply is the longer one (characters),
        # by the judge and by the human labels (a judge's length bias shows as a gap between the two).
        "heldout_judge_prefers_longer": _longer_share(heldout_labelled),
        "heldout_human_prefers_longer": _longer_share(heldout_pairs),
    }


def _longer_share(rows) -> float:
    return float(np.mean([len(r["chosen"]) > len(r["rejected"]) for r in rows])) if rows else float("nan")


def _dpo_arm(z: dict, data_key: str):
    def make_for(hp: dict, seed: int):
        def make(o):
            run_dir, name = arm_run_dir(o)
            return C.ExperimentConfig(
                name=name, model=C.ModelSpec(name=POLICY, dtype=z["dtype"]),
                optim=C.OptimConfig(lr=z["dpo_lr"], warmup_steps=2, schedule="cosine", weight_decay=0.0,
                                    max_grad_norm=10.0),
                data=C.DataConfig(source=o["label"][data_key], batch_size=z["dpo_batch"], max_length=z["max_length"],
                                  max_prompt_length=z["max_prompt_length"], eval_size=0, seed=seed),
                train=C.TrainConfig(keep_checkpoints=1, steps=z["dpo_steps"], seed=seed, save_every=z["dpo_steps"],
                                    num_samples=0, run_dir=run_dir),
                algo=C.DPOConfig(loss="dpo", beta=hp["beta"], reference="precomputed",
                                 eval_source=o["label"]["heldout_human"], eval_split="train"))
        return make
    return make_for


def get_study(arg=None) -> Study:
    z = sizes(arg)
    name = "rlaif_hh" + (f"_{arg}" if arg in ("full", "smoke") else "")
    stage = Stage("label", dict(source=HH_RLHF_HARMLESS(), judge=JUDGE, heldout=z["heldout"],
                                train_pairs=z["train_pairs"], seed=0, dtype=z["dtype"],
                                judge_prompt_tokens=z["judge_prompt_tokens"],
                                judge_reply_tokens=z["judge_reply_tokens"]),
                  run_label, cost=(z["heldout"] + z["train_pairs"]) / 16)
    arms = [*expand_grid("dpo-human", {}, {"beta": [z["beta"]]}, z["seeds"], _dpo_arm(z, "train_human"),
                         cost=z["dpo_steps"]),
            *expand_grid("dpo-ai", {}, {"beta": [z["beta"]]}, z["seeds"], _dpo_arm(z, "train_ai"),
                         cost=z["dpo_steps"])]
    return Study(name=name, stages=(stage,), arms=tuple(arms),
                 report_metrics=("reward_accuracy", "reward_margin", "loss"))
