"""The IMDb sentiment study file: its grid (methods x hparams x seeds) and every arm's config.

The arms' configs are built from fake stage outputs (paths that the stages would write) and validated by
the same ``config.validate`` a run uses; each is checked for the hparam its name claims.
"""

import collections
import pathlib

import pytest

from jaxrlhf import config as C
from jaxrlhf.cli import load_study

STUDY = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "imdb_sentiment_study.py"


def fake_outputs(tmp_path, arm_name):
    return {"sft": {"policy": "runs/s/stages/sft/run/hf"},
            "gold": {"reward_model": "runs/s/stages/gold/run/reward_model"},
            "prefs": {"pairs": "p.jsonl", "rankings": "r.jsonl", "prompts": "q.jsonl", "eval": "e.jsonl"},
            "proxy": {"reward_model": "runs/s/stages/proxy/run/reward_model"},
            "_arm_dir": str(tmp_path / "arms" / arm_name), "_study_dir": str(tmp_path)}


def test_quick_grid_has_every_method_over_seeds_and_sweeps():
    study = load_study(str(STUDY), None)
    assert [s.name for s in study.stages] == ["sft", "gold", "prefs", "proxy"]
    assert dict(prefs=("sft", "gold"), proxy=("prefs",)) == {s.name: s.deps for s in study.stages if s.deps}
    by_method = collections.defaultdict(list)
    for arm in study.arms:
        by_method[arm.method].append(arm)
    assert set(by_method) == {"ppo", "dpo", "ipo", "pl_dpo", "rloo", "ppo_proxy"}
    for method, arms in by_method.items():
        assert {a.seed for a in arms} == {0, 1}, method  # every method over >= 2 seeds
    assert sorted({a.hparams["kl_coef"] for a in by_method["ppo"]}) == [0.02, 0.1, 0.5]
    assert sorted({a.hparams["beta"] for a in by_method["dpo"]}) == [0.05, 0.1, 0.5]
    assert len(study.arms) == 2 * (3 + 3 + 1 + 1 + 1 + 1)
    assert len({a.name for a in study.arms}) == len(study.arms)


@pytest.mark.parametrize("arg", [None, "long", "full", "smoke"])
def test_every_arm_config_validates_and_carries_its_hparams(arg, tmp_path):
    study = load_study(str(STUDY), arg)
    for arm in study.arms:
        o = fake_outputs(tmp_path, arm.name)
        cfg = arm.make_config(o)
        C.validate(cfg)
        assert pathlib.Path(cfg.train.run_dir) / cfg.name == pathlib.Path(o["_arm_dir"])
        assert cfg.model.name == o["sft"]["policy"] and cfg.train.seed == arm.seed == cfg.data.seed
        pe = cfg.policy_eval
        assert [n for n, _ in pe.judges] == ["gold", "proxy", "vader"] and pe.prompts == "e.jsonl"
        assert pe.reference == o["sft"]["policy"]
        a = cfg.algo
        if arm.method in ("dpo", "ipo", "pl_dpo"):
            assert a.loss == {"dpo": "dpo", "ipo": "ipo", "pl_dpo": "plackett_luce"}[arm.method]
            assert a.beta == arm.hparams["beta"]
            assert cfg.data.source == ("r.jsonl" if arm.method == "pl_dpo" else "p.jsonl")
        else:
            assert a.kl.coef == arm.hparams["kl_coef"] and cfg.data.source == "q.jsonl"
            judge = "proxy" if arm.method == "ppo_proxy" else "gold"
            assert a.reward.reward_model == o[judge]["reward_model"]
            assert isinstance(a, C.RLOOConfig if arm.method == "rloo" else C.PPOConfig)


def test_unknown_arg_is_refused():
    with pytest.raises(ValueError, match="unknown --arg 'huge'"):
        load_study(str(STUDY), "huge")


def test_a_study_file_is_not_an_experiment():
    with pytest.raises(C.ConfigError, match="must define get_config.*jaxrlhf study"):
        C.load_config(STUDY)
