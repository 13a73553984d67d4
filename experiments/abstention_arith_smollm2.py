"""Abstention-aware rewards: does a penalty on wrong answers teach SmolLM2-135M-Instruct to say "I don't know"
where it would guess wrong, without abstaining where it knows? (issue 13, item 2)

Task (:mod:`jaxrlhf.abstention`): arithmetic questions generated on the fly, half ``easy`` (one-digit
addition: the model gets ~90% right) and half ``hard`` (3-digit x 2-digit multiplication: it gets ~0% right
and, before training, almost always guesses), each saying that "I don't know" is acceptable. Reward:
``+1`` correct, ``0`` abstain, ``-λ`` wrong (malformed = wrong), computed from the prompt text itself.

Arms: GRPO at ``λ = 0`` (abstaining is never better than guessing) and ``λ = 1`` (abstaining pays below
50% confidence), each over ``seeds`` (``--arg sweep`` adds ``λ = 0.5``: below 1/3). GRPO samples at temperature
0.6, where the base model answers only ~40-50% of the easy questions right (greedy: ~70%) and says "I'm
not sure" to ~10% of the hard ones (the exploration an abstention needs); advantages are centred, not
divided by the group std (``scale_rewards=False``), so one abstention in a group of wrong guesses does not
get a huge advantage. Note the threshold ``λ / (1 + λ)`` applies to the *sampled* policy's accuracy: at
``λ = 1`` answering an easy question starts out barely worth it. Evaluation: greedy completions of a fixed held-out question set
(``eval_questions``, half easy and half hard, drawn with another seed than the training questions; the easy
tier has only 81 distinct questions, so it overlaps the training set), graded, before (the base model:
deterministic, one number) and after training (mean ± std over seeds), per tier.

Stages: ``questions`` (the JSONL files), ``base`` (the base model's greedy evaluation). The report step
evaluates each finished arm's exported policy (``arms/<arm>/hf``; cached in ``abstention_eval.json``) and
writes ``runs/<study>/report.md``.

Run (this file is ``jaxrlhf study``'s front end with this task's report; the same flags)::

    python experiments/abstention_arith_smollm2.py                 # quick: 2 lambdas x 2 seeds (a 2-core CPU)
    python experiments/abstention_arith_smollm2.py --arg sweep     # + λ = 0.5 (reuses the quick arms)
    python experiments/abstention_arith_smollm2.py --arg long      # the sweep at seeds 0-3 (reuses the above)
    python experiments/abstention_arith_smollm2.py --arg smoke     # a few steps, one seed: runs end to end
    python experiments/abstention_arith_smollm2.py --report-only   # rewrite the report from disk

(``jaxrlhf study experiments/abstention_arith_smollm2.py`` trains the same arms with the generic report;
then ``--report-only`` here adds the abstention table.)
"""

from __future__ import annotations

import json
import pathlib
import sys

if __name__ == "__main__":  # run as a script: the repository root (configs/) on the path; malloc before JAX
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import jaxrlhf

    jaxrlhf.reuse_host_memory()

from configs.models import smollm2_135m
from jaxrlhf import abstention as A
from jaxrlhf import config as C
from jaxrlhf.study import Stage, Study, arm_run_dir, expand_grid

QUICK = dict(
    seeds=[0, 1], penalties=[0.0, 1.0], train_questions=512, eval_questions=64, hard_fraction=0.5,
    steps=10, batch=4, group=6, max_new_tokens=12, max_prompt_length=64, lr=1e-5, beta=0.04, epochs=1,
    minibatches=2, grad_accum=2, scale_rewards=False, temperature=0.6, dtype="bfloat16", eval_batch=32,
)
# The quick study plus λ = 0.5 (answering pays above 1/3 confidence): the same study folder, so the λ = 0 and
# λ = 1 arms of a finished quick run are reused and only the λ = 0.5 arms run.
SWEEP = dict(QUICK, penalties=[0.0, 0.5, 1.0])
# The sweep at 4 seeds (about 35 min on an idle 2-core CPU; again reuses every finished arm).
LONG = dict(SWEEP, seeds=[0, 1, 2, 3])
SMOKE = dict(QUICK, seeds=[0], penalties=[1.0], steps=2, eval_questions=16, eval_batch=16)
SIZES = {None: QUICK, "": QUICK, "quick": QUICK, "sweep": SWEEP, "long": LONG, "smoke": SMOKE}
POLICY = "smollm2-135m-instruct"
EVAL_FILE = "abstention_eval.json"
KEYS = [f"{t}/{lab}" for t in A.TIERS for lab in A.LABELS]


def sizes(arg: str | None) -> dict:
    """The study's sizes: quick (default, a 2-core CPU), ``sweep`` (+ λ = 0.5), ``long`` (the sweep at 4
    seeds) or ``smoke``."""
    if arg not in SIZES:
        raise ValueError(f"unknown --arg {arg!r}; use 'sweep', 'long', 'smoke' or nothing")
    return dict(SIZES[arg])


# ------------------------------------------------------------------------------------------- stages

def run_questions(c: dict, outputs: dict, folder: pathlib.Path) -> dict:
    """``train.jsonl`` and ``eval.jsonl`` of :func:`jaxrlhf.abstention.make_questions` (seeds 0 and 1)."""
    from jaxrlhf.labeling import write_jsonl

    train = A.question_rows(A.make_questions(c["train"], seed=c["seed"], hard_fraction=c["hard_fraction"]))
    held_out = A.question_rows(A.make_questions(c["eval"], seed=c["seed"] + 1, hard_fraction=c["hard_fraction"]))
    return {"train": str(write_jsonl(train, folder / "train.jsonl")),
            "eval": str(write_jsonl(held_out, folder / "eval.jsonl"))}


def _read_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


def evaluate_model(name: str, c: dict, eval_path: str) -> tuple[dict, list[dict]]:
    """Greedy per-tier rates of the model ``name`` (short name or exported folder) on ``eval_path``."""
    from jaxrlhf.data.tokenize import eos_ids_for
    from jaxrlhf.drivers.core import load_policy

    pol = load_policy(C.ModelSpec(name=name, dtype=c["dtype"]))
    return A.evaluate_abstention(pol.graphdef, pol.params, pol.tokenizer, _read_rows(eval_path),
                                 eos_token_ids=eos_ids_for(pol.tokenizer, pol.model_cfg),
                                 max_new_tokens=c["max_new_tokens"], batch_size=c["eval_batch"])


def run_base(c: dict, outputs: dict, folder: pathlib.Path) -> dict:
    """The base model's greedy evaluation ("before"; deterministic, shared by every arm)."""
    rates, records = evaluate_model(c["model"], c, outputs["questions"]["eval"])
    (folder / "records.json").write_text(json.dumps(records, indent=1))
    return {"rates": rates}


# ------------------------------------------------------------------------------------------- arms

def _arm(z: dict):
    def make_for(hp: dict, seed: int):
        def make(o: dict) -> C.ExperimentConfig:
            run_dir, name = arm_run_dir(o)
            return C.ExperimentConfig(
                name=name, model=smollm2_135m(dtype=z["dtype"]),
                optim=C.OptimConfig(lr=z["lr"], schedule="constant", warmup_steps=0, max_grad_norm=1.0,
                                    grad_accum_steps=z["grad_accum"]),
                data=C.DataConfig(source=o["questions"]["train"], batch_size=z["batch"],
                                  max_prompt_length=z["max_prompt_length"],
                                  max_length=z["max_prompt_length"] + z["max_new_tokens"], eval_size=0,
                                  use_chat_template=True, on_overflow="error", seed=seed),
                train=C.TrainConfig(steps=z["steps"], seed=seed, log_every=1, save_every=z["steps"],
                                    keep_checkpoints=1, num_samples=4, run_dir=run_dir),
                algo=C.GRPOConfig(rollout=C.RolloutConfig(max_new_tokens=z["max_new_tokens"],
                                                          num_completions=z["group"], temperature=z["temperature"]),
                                  reward=A.reward_spec(hp["wrong_penalty"]), beta=z["beta"],
                                  scale_rewards=z["scale_rewards"],
                                  update=C.UpdateConfig(epochs=z["epochs"], num_minibatches=z["minibatches"],
                                                        aggregation="sequence")))
        return make
    return make_for


def get_study(arg=None) -> Study:
    """Stages ``questions`` and ``base``; arms ``grpo-wrong_penalty<λ>-s<seed>``."""
    z = sizes(arg)
    name = "abstention_arith" + ("_smoke" if arg == "smoke" else "")
    common = dict(model=POLICY, dtype=z["dtype"], max_new_tokens=z["max_new_tokens"], eval_batch=z["eval_batch"])
    stages = (
        Stage("questions", dict(train=z["train_questions"], eval=z["eval_questions"], seed=0,
                                hard_fraction=z["hard_fraction"]), run_questions, cost=0.1),
        Stage("base", common, run_base, deps=("questions",), cost=1.0),
    )
    arms = expand_grid("grpo", {}, {"wrong_penalty": z["penalties"]}, z["seeds"], _arm(z), cost=z["steps"] / 4)
    return Study(name=name, stages=stages, arms=tuple(arms))


# ------------------------------------------------------------------------------------------- report

def _arm_eval(arm_dir: pathlib.Path, c: dict, eval_path: str) -> dict | None:
    """The cached (or fresh) greedy evaluation of a finished arm's exported policy; None if not done."""
    cached = arm_dir / EVAL_FILE
    if cached.exists():
        return json.loads(cached.read_text())
    status = json.loads((arm_dir / "status.json").read_text()) if (arm_dir / "status.json").exists() else {}
    if status.get("status") != "done" or not (arm_dir / "hf").is_dir():
        return None
    rates, records = evaluate_model(str(arm_dir / "hf"), c, eval_path)
    out = {"rates": rates, "records": records}
    cached.write_text(json.dumps(out, indent=1))
    return out


def _train_rates(arm_dir: pathlib.Path, k: int = 3) -> dict:
    """Rollout (sampled) rates of the first and last ``k`` steps from ``metrics.jsonl``."""
    rows = [json.loads(x) for x in (arm_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("split") == "train" and "reward/answer_correct" in r]
    out = {}
    for part, sel in (("first", rows[:k]), ("last", rows[-k:])):
        for lab, key in (("correct", "answer_correct"), ("abstain", "answer_abstained"), ("wrong", "answer_wrong")):
            vals = [r[f"reward/{key}"] for r in sel]
            out[f"{part}/{lab}"] = sum(vals) / len(vals) if vals else float("nan")
    return out


def write_report(study_dir: pathlib.Path) -> pathlib.Path:
    """Evaluate every finished arm (cached), write ``report.md`` (tables: greedy held-out rates before and
    after, per tier; rollout rates of the first/last steps; a few completions) and print the table."""
    study_dir = pathlib.Path(study_dir)
    record = json.loads((study_dir / "study.json").read_text())
    stages = {s["name"]: s for s in record["stages"]}
    c = stages["base"]["config"]
    base_done = json.loads((study_dir / "stages" / "base" / "done.json").read_text())
    eval_path = json.loads((study_dir / "stages" / "questions" / "done.json").read_text())["outputs"]["eval"]
    groups: dict[str, list[dict]] = {"before (base model)": [base_done["outputs"]["rates"]]}
    per_arm: dict[str, list[dict]] = {}
    train: dict[str, list[dict]] = {}
    examples: dict[str, list[dict]] = {}
    for arm in record["arms"]:
        arm_dir = study_dir / arm["dir"]
        ev = _arm_eval(arm_dir, c, eval_path)
        if ev is None:
            continue
        label = f"after, λ = {arm['hparams']['wrong_penalty']:g}"
        groups.setdefault(label, []).append(ev["rates"])
        per_arm[arm["name"]] = [ev["rates"]]
        train.setdefault(label, []).append(_train_rates(arm_dir))
        examples[arm["name"]] = ev["records"]
    n_eval = int(groups["before (base model)"][0]["easy/n"]), int(groups["before (base model)"][0]["hard/n"])
    table = A.mean_std_table(groups, KEYS)
    base_records = json.loads((study_dir / "stages" / "base" / "records.json").read_text())
    lines = [
        f"# Study {record['study']}: abstention-aware rewards (+1 correct, 0 abstain, -λ wrong)\n",
        (f"Greedy completions of {n_eval[0]} easy (one-digit addition) and {n_eval[1]} hard (3-digit x 2-digit "
         "multiplication) held-out questions, graded by `jaxrlhf.abstention.grade`; fraction of each tier "
         "answered correctly / abstained / answered wrong (malformed counts as wrong). After training: mean ± "
         "sample std (ddof = 1) over the seeds (n); before: the base model, deterministic.\n"),
        table,
        "\nEach seed on its own (the mean ± std above can hide a bimodal outcome):\n",
        A.mean_std_table(per_arm, KEYS) if per_arm else "",
        ("\nRollout rates while training (sampled at the rollout temperature, both tiers pooled): mean of the "
         "first and of the last 3 steps' `reward/answer_*` metrics, mean ± std over seeds.\n"),
        A.mean_std_table(train, [f"{p}/{lab}" for p in ("first", "last") for lab in A.LABELS]) if train else "",
        "\n## Greedy completions of the first held-out questions, before and after (each arm)\n",
        "| tier | question | before | " + " | ".join(examples) + " |\n|---|---|---|" + "---|" * len(examples),
    ]
    for i, r in enumerate(base_records[:8]):
        q = r["prompt"].split("?")[0].removeprefix("What is ")
        cells = [f"{x['completion']!r} ({x['label']})".replace("|", "/").replace("\n", " ")
                 for x in [r] + [examples[k][i] for k in examples]]
        lines.append(f"| {r['tier']} | {q} | " + " | ".join(cells) + " |")
    lines.append(f"\nDevice: {record.get('device')}; versions: {record.get('versions')}\n")
    path = study_dir / "report.md"
    path.write_text("\n".join(lines))
    print(table)
    return path


def main(argv: list[str]) -> int:
    """``jaxrlhf study`` on this file with :func:`write_report` (flags: ``--arg``, ``--only``, ``--dry-run``,
    ``--report-only``, ``--no-progress``)."""
    from jaxrlhf.cli import load_study
    from jaxrlhf.drivers import run_experiment
    from jaxrlhf.study import study_main

    return study_main([__file__, *argv], load_study, run_experiment, to_dict=C.to_dict, write_report=write_report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
