"""Tests of the study report (jaxrlhf/study_report.py) on a fake study (fakes from tests/test_study.py):
table numbers against a hand mean / sample std, plotted series against the fake metric formula, the
Gao fit against synthetic points, failed arms listed, valid PNGs."""

from __future__ import annotations

import importlib.metadata
import json
import math
import re
import statistics

import numpy as np
import pytest
from test_study import STEPS, FakeRunner, fake_metric_rows, make_fake_study

from jaxrlhf import study as S
from jaxrlhf import study_report as R


@pytest.fixture(autouse=True)
def _restore_jax_cache(restore_jax_cache_config):
    """``run_study`` points JAX's persistent cache at a tmp folder."""


@pytest.fixture
def study_dir(tmp_path):
    """The fake study run once, with seed 1 of both dpo groups failing."""
    S.run_study(make_fake_study(tmp_path, fail_dpo_seed1=True), run_arm=FakeRunner(), progress=False)
    return tmp_path / "fake"


@pytest.fixture
def ok_study_dir(tmp_path):
    S.run_study(make_fake_study(tmp_path, seeds=(0, 1, 2)), run_arm=FakeRunner(), progress=False)
    return tmp_path / "fake"


def _table(md: str) -> dict[str, dict[str, str]]:
    """The first markdown table: {group: {column: cell}}."""
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[1:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) != len(header):
            break
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_table_equals_hand_mean_and_sample_std(ok_study_dir):
    path = R.write_study_report(ok_study_dir)
    table = _table(path.read_text())
    for group in ("dpo-beta0.1", "dpo-beta1", "ppo_proxy-kl_coef0.05"):
        finals = []
        for seed in (0, 1, 2):  # read the arm's own file, keep the eval line with the largest step
            lines = (ok_study_dir / "arms" / f"{group}-s{seed}" / "metrics.jsonl").read_text().splitlines()
            evals = [json.loads(ln) for ln in lines if json.loads(ln)["split"] == "eval"]
            finals.append(max(evals, key=lambda r: r["step"]))
        row = table[group]
        assert row["n"] == "3" and row["failed"] == ""
        for metric in ("gold", "proxy", "kl", "win_rate", "length"):
            vals = [f[metric] for f in finals]
            mean, std = statistics.fmean(vals), statistics.stdev(vals)
            shown_mean, shown_std = (float(v) for v in row[metric].split(" ± "))
            assert shown_mean == pytest.approx(mean, rel=1e-3, abs=1e-9)
            assert shown_std == pytest.approx(std, rel=5e-3, abs=1e-9)
        rec = next(r for r in R.summary_table(R.load_arm_records(ok_study_dir)) if r["group"] == group)
        g = [f["gold"] for f in finals]
        assert rec["stats"]["gold"] == pytest.approx((statistics.fmean(g), statistics.stdev(g), 3), rel=1e-12)
    assert "vader" not in table["dpo-beta1"]  # a metric no arm logged is left out


def test_failed_arms_listed(study_dir):
    md = R.write_study_report(study_dir).read_text()
    table = _table(md)
    assert table["dpo-beta1"]["n"] == "1" and table["dpo-beta1"]["failed"] == "dpo-beta1-s1"
    assert table["ppo_proxy-kl_coef0.05"]["n"] == "2"
    assert "**dpo-beta1-s1** failed: RuntimeError: fake divergence in dpo-beta1-s1" in md
    # n = 1: no std is shown, the mean is the single seed's final value
    final = [r for r in fake_metric_rows("dpo", {"beta": 1.0}, 0) if r["split"] == "eval"][-1]
    assert float(table["dpo-beta1"]["gold"]) == pytest.approx(final["gold"], rel=1e-3)


def test_plotted_series_match_fake_metrics(ok_study_dir):
    recs = R.load_arm_records(ok_study_dir)
    front = R.frontier_series(recs, "kl", "gold")
    assert set(front) == {"dpo", "ppo_proxy"} and len(front["dpo"]) == 2
    path = next(p for p in front["dpo"] if p["group"] == "dpo-beta0.1")
    evals = [[r for r in fake_metric_rows("dpo", {"beta": 0.1}, s) if r["split"] == "eval"] for s in (0, 1, 2)]
    assert path["steps"] == [0, 2, 4]
    np.testing.assert_allclose(path["x"], [np.mean([e[i]["kl"] for e in evals]) for i in range(3)], rtol=1e-12)
    np.testing.assert_allclose(path["y"], [np.mean([e[i]["gold"] for e in evals]) for i in range(3)], rtol=1e-12)

    curves = R.curve_series(recs, "train", "loss")
    steps, loss = curves["ppo_proxy"]["ppo_proxy-kl_coef0.05"]
    assert steps == list(range(1, STEPS + 1))
    np.testing.assert_allclose(loss, [np.mean([1 / (t + 0.05) + 0.01 * s for s in (0, 1, 2)]) for t in steps])

    hack = R.hacking_series(recs)
    assert list(hack) == ["ppo_proxy-kl_coef0.05"]  # only the proxy arm is the reward-hacking arm
    d, proxy, gold = [], [], []
    for s in (0, 1, 2):
        ev = [r for r in fake_metric_rows("ppo_proxy", {"kl_coef": 0.05}, s) if r["split"] == "eval"]
        d += [math.sqrt(r["kl"]) for r in ev]
        proxy += [r["proxy"] - ev[0]["proxy"] for r in ev]
        gold += [r["gold"] - ev[0]["gold"] for r in ev]
    np.testing.assert_allclose(hack["ppo_proxy-kl_coef0.05"]["d"], d, rtol=1e-12)
    np.testing.assert_allclose(hack["ppo_proxy-kl_coef0.05"]["proxy"], proxy, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(hack["ppo_proxy-kl_coef0.05"]["gold"], gold, rtol=1e-12, atol=1e-15)


def test_report_writes_valid_pngs(study_dir):
    md = R.write_study_report(study_dir).read_text()
    for name in ("frontier.png", "curves.png", "hacking.png"):
        data = (study_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
        assert f"![{name}]({name})" in md
        import matplotlib.image

        img = matplotlib.image.imread(study_dir / name)
        assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0  # not a blank canvas


def test_gao_fit_recovers_alpha_beta():
    d = np.linspace(0.2, 4.0, 25)
    alpha, beta = 0.8, 0.3
    r = d * (alpha - beta * np.log(d))  # Gao et al. (2022) RL form, computed here independently
    fit = R._fit_gao(np.concatenate([[0.0], d]), np.concatenate([[0.0], r]))
    assert (fit.alpha, fit.beta) == pytest.approx((alpha, beta), rel=1e-6)
    noisy = r + np.random.default_rng(0).normal(0, 0.01, r.shape)
    fit = R._fit_gao(d, noisy)
    assert (fit.alpha, fit.beta) == pytest.approx((alpha, beta), abs=0.03)
    assert R._fit_gao(np.array([0.0, 1.0]), np.array([0.0, 1.0])) is None  # too few points to fit


def test_samples_table_links_and_environment(study_dir):
    md = R.write_study_report(study_dir).read_text()
    rows = R.sample_rows(R.load_arm_records(study_dir), n_prompts=2)
    assert [(r["method"], r["arm"]) for r in rows] == [("dpo", "dpo-beta0.1-s0")] * 2 + \
        [("ppo_proxy", "ppo_proxy-kl_coef0.05-s0")] * 2
    assert rows[1] == {"method": "dpo", "arm": "dpo-beta0.1-s0", "prompt": "prompt 1",
                       "before": "dpo eval_before 1", "after": "dpo eval_after 1"}
    assert "| dpo (dpo-beta0.1-s0) | prompt 0 | dpo eval_before 0 | dpo eval_after 0 |" in md
    assert "[config](arms/dpo-beta1-s1/config.json)" in md and "[TensorBoard](arms/dpo-beta0.1-s0/tb)" in md
    assert f"jax {importlib.metadata.version('jax')}" in md and re.search(r"device: .+ \(cpu\) x \d+", md)


def test_report_from_arm_objects_equals_report_from_study_json(ok_study_dir, tmp_path):
    arms = make_fake_study(tmp_path, seeds=(0, 1, 2)).arms
    a = R.write_study_report(ok_study_dir, arms, out=tmp_path / "from_arms" / "report.md").read_text()
    b = R.write_study_report(ok_study_dir).read_text()
    assert _table(a) == _table(b)


def test_samples_fall_back_to_steps_and_tags():
    rec = {"method": "m", "name": "m-s0", "status": {"status": "done"}, "samples": [
        {"step": 5, "prompt": "p", "completion": "late"}, {"step": 0, "prompt": "p", "completion": "early"}]}
    assert R.sample_rows([rec]) == [{"method": "m", "arm": "m-s0", "prompt": "p", "before": "early",
                                     "after": "late"}]
    rec["samples"] = [{"step": 0, "tag": "before", "prompt": "p", "completion": "b"},
                      {"step": 0, "tag": "after", "prompt": "p", "completion": "a"}]
    assert R.sample_rows([rec])[0]["before"] == "b" and R.sample_rows([rec])[0]["after"] == "a"


def test_stage_outputs_are_listed_with_numbers_not_paths(ok_study_dir):
    md = R.write_study_report(ok_study_dir).read_text()
    section = md.split("## Stages", 1)[1].split("\n## ", 1)[0]
    rows = {tuple(c.strip() for c in ln.strip("|").split("|")[:2]): ln.strip("|").split("|")[2].strip()
            for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith("| stage")}
    for name in ("sft", "gold", "prefs"):  # each stage's own done.json, read independently here
        done = json.loads((ok_study_dir / "stages" / name / "done.json").read_text())
        for key, value in done["outputs"].items():
            if isinstance(value, str):  # a path: not a figure
                assert (name, key) not in rows
            else:
                assert float(rows[(name, key)]) == pytest.approx(value, rel=1e-3)
        assert float(rows[(name, "wall time (s)")]) == pytest.approx(done["wall_s"], abs=0.5)
