"""Tests of the study runner (jaxrlhf/study.py) with fake stages and arms: no model is loaded.

The fake arm writes ``metrics.jsonl`` / ``samples.jsonl`` / ``config.json`` / ``checkpoints/`` the way
the real drivers do, with metrics a deterministic function of (method, hparams, seed, step)
(:func:`fake_metric_rows`); ``tests/test_study_report.py`` imports these fakes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import pytest

from jaxrlhf import study as S

STEPS = 4  # eval at steps 0, 2, 4; train rows at 1..4


@pytest.fixture(autouse=True)
def _restore_jax_cache(restore_jax_cache_config):
    """``run_study`` / ``setup_compilation_cache`` point JAX's persistent cache at a tmp folder."""


def fake_metric_rows(method: str, hparams: dict, seed: int) -> list[dict]:
    """The rows a fake arm logs: train loss at steps 1..STEPS, eval metrics at 0, STEPS/2, STEPS."""
    b = float(hparams.get("beta", hparams.get("kl_coef", 1.0)))
    rows = [{"step": t, "split": "train", "loss": 1.0 / (t + b) + 0.01 * seed} for t in range(1, STEPS + 1)]
    for t in range(0, STEPS + 1, 2):
        kl = t * 0.5 / b + 0.1 * seed * t
        rows.append({"step": t, "split": "eval", "kl": kl, "gold": 0.2 + 0.3 * math.sqrt(kl) - 0.05 * kl
                     + 0.02 * seed, "proxy": 0.2 + 0.4 * math.sqrt(kl), "length": 10 + t + seed,
                     "win_rate": 0.5 + 0.01 * t * (seed + 1)})
    return rows


def fake_config_for(method: str, fail: bool = False):
    """``make_config_for(hparams, seed)`` for :func:`jaxrlhf.study.expand_grid`: a plain-dict config that
    puts its run in the folder the runner chose (``outputs["_arm_dir"]``) and copies a stage output."""

    def make_config_for(hparams: dict, seed: int):
        def make_config(outputs: dict) -> dict:
            parent, name = S.arm_run_dir(outputs)  # as a real ExperimentConfig's train.run_dir and name
            return {"method": method, "hparams": hparams, "seed": seed, "run_dir": str(pathlib.Path(parent, name)),
                    "ref": outputs["sft"]["model"], "fail": fail and seed == 1}
        return make_config
    return make_config_for


class FakeRunner:
    """``run_arm(cfg, resume)``: records calls; writes the run folder like jaxrlhf.loop.RunDir. Raises
    RuntimeError when ``cfg["fail"]``; raises KeyboardInterrupt after the first checkpoint when the arm's
    run folder name is in ``interrupt``."""

    def __init__(self, interrupt: tuple[str, ...] = ()):
        self.calls: list[tuple[str, bool]] = []
        self.interrupt = set(interrupt)

    def __call__(self, cfg: dict, resume: bool) -> dict:
        run = pathlib.Path(cfg["run_dir"])
        self.calls.append((run.name, resume))
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(cfg))
        (run / "checkpoints" / "1").mkdir(parents=True, exist_ok=True)
        if run.name in self.interrupt:
            self.interrupt.discard(run.name)
            raise KeyboardInterrupt
        if cfg["fail"]:
            raise RuntimeError(f"fake divergence in {run.name}")
        rows = fake_metric_rows(cfg["method"], cfg["hparams"], cfg["seed"])
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        samples = [{"step": t, "tag": tag, "prompt": f"prompt {i}", "completion": f"{cfg['method']} {tag} {i}"}
                   for t, tag in ((0, "eval_before"), (STEPS, "eval_after")) for i in range(3)]
        (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        return {"run_dir": str(run), "eval_after": rows[-1], "state": object()}


def make_stages(calls: list[str], sft_lr: float = 1e-4) -> tuple[S.Stage, ...]:
    def sft(cfg, outs, folder):
        calls.append("sft")
        (folder / "model.txt").write_text(str(cfg["lr"]))
        return {"model": str(folder / "model.txt"), "lr": cfg["lr"]}

    def gold(cfg, outs, folder):
        calls.append("gold")
        return {"acc": 0.9}

    def prefs(cfg, outs, folder):
        calls.append("prefs")
        return {"pairs": 8, "ref": outs["sft"]["model"]}

    return (S.Stage("sft", {"lr": sft_lr}, sft), S.Stage("gold", {"n": 2}, gold),
            S.Stage("prefs", {"k": 4}, prefs, deps=("sft", "gold")))


def make_fake_study(root, calls=None, sft_lr=1e-4, fail_dpo_seed1=False, seeds=(0, 1)) -> S.Study:
    """Stages sft -> gold -> prefs; arms dpo x beta {0.1, 1} and ppo_proxy x kl_coef {0.05} x seeds."""
    calls = [] if calls is None else calls
    arms = (S.expand_grid("dpo", {"lr": 1e-5}, {"beta": [0.1, 1.0]}, list(seeds),
                          fake_config_for("dpo", fail=fail_dpo_seed1))
            + S.expand_grid("ppo_proxy", {}, {"kl_coef": [0.05]}, list(seeds), fake_config_for("ppo_proxy"),
                            cost=2.0))
    return S.Study("fake", make_stages(calls, sft_lr), tuple(arms), root=str(root))


def test_expand_grid_names_count_hparams_seeds():
    arms = S.expand_grid("dpo", {"lr": 1e-5, "beta": 9.0}, {"beta": [0.1, 1.0, 5.0], "lr": [1e-6, 3e-6]},
                         [0, 1], lambda hp, seed: (lambda outs: {"hp": hp, "seed": seed}))
    assert len(arms) == 3 * 2 * 2
    assert arms[0].name == "dpo-beta0.1-lr1e-06-s0"
    assert {a.name for a in arms} == {f"dpo-beta{b}-lr{lr}-s{s}" for b in ("0.1", "1", "5")
                                      for lr in ("1e-06", "3e-06") for s in (0, 1)}
    assert [a.seed for a in arms[:6]] == [0] * 6  # seed-major
    for a in arms:
        assert a.hparams["beta"] in (0.1, 1.0, 5.0) and a.hparams["lr"] in (1e-6, 3e-6)  # sweep overrides base
        assert a.make_config({}) == {"hp": a.hparams, "seed": a.seed}
        assert a.group_label == a.name.rsplit("-s", 1)[0]
    with pytest.raises(ValueError, match="seeds"):
        S.expand_grid("dpo", {}, {"beta": [1.0]}, [], lambda hp, s: None)
    with pytest.raises(ValueError, match="beta"):
        S.expand_grid("dpo", {}, {"beta": []}, [0], lambda hp, s: None)


def test_stage_cache_and_rerun_with_dependents(tmp_path):
    calls = []
    runner = FakeRunner()
    res = S.run_study(make_fake_study(tmp_path, calls), run_arm=runner, progress=False)
    assert calls == ["sft", "gold", "prefs"] and set(res.stage_actions.values()) == {"run"}
    done = json.loads((tmp_path / "fake/stages/prefs/done.json").read_text())
    assert done["outputs"] == {"pairs": 8, "ref": str(tmp_path / "fake/stages/sft/model.txt")}
    assert set(done["compilations"]) == {"compilations", "persistent_cache_hits", "compile_secs"}

    calls.clear()
    res = S.run_study(make_fake_study(tmp_path, calls), run_arm=runner, progress=False)
    assert calls == [] and set(res.stage_actions.values()) == {"cached"}
    assert res.stage_outputs["prefs"]["pairs"] == 8

    calls.clear()  # sft config changes: sft and prefs (depends on sft) re-run, gold does not
    n_before = len(runner.calls)
    res = S.run_study(make_fake_study(tmp_path, calls, sft_lr=3e-4), run_arm=runner, progress=False)
    assert calls == ["sft", "prefs"]
    assert res.stage_actions == {"sft": "run", "gold": "cached", "prefs": "run"}
    assert (tmp_path / "fake/stages/sft/model.txt").read_text() == "0.0003"
    assert list((tmp_path / "fake/stale").glob("sft-*"))  # the old stage folder was kept aside
    # a re-run stage re-runs every arm (their hash includes the stage hashes), fresh (not resumed)
    assert len(runner.calls) - n_before == 6 and not any(r for _, r in runner.calls[n_before:])


def test_finished_arms_skipped_and_study_json(tmp_path):
    runner = FakeRunner()
    res = S.run_study(make_fake_study(tmp_path), run_arm=runner, progress=False)
    names = [a.name for a in make_fake_study(tmp_path).arms]
    assert [c for c, _ in runner.calls] == names and not res.failed
    st = json.loads((tmp_path / "fake/arms/dpo-beta0.1-s1/status.json").read_text())
    assert st["status"] == "done" and st["seed"] == 1 and st["hparams"] == {"lr": 1e-5, "beta": 0.1}
    assert st["summary"]["eval_after"]["step"] == STEPS and "state" not in st["summary"]
    assert st["wall_s"] >= 0 and "compilations" in st["compilations"]
    # a finished arm's checkpoints are removed (they only serve to resume); metrics and config stay
    assert st["checkpoints_removed"] is True and not (tmp_path / "fake/arms/dpo-beta0.1-s1/checkpoints").exists()
    assert (tmp_path / "fake/arms/dpo-beta0.1-s1/metrics.jsonl").exists()
    rec = json.loads((tmp_path / "fake/study.json").read_text())
    assert {"jax", "jaxlib", "flax", "optax", "numpy"} <= set(rec["versions"])
    assert rec["device"]["platform"] == "cpu" and rec["device"]["count"] >= 1
    assert [a["name"] for a in rec["arms"]] == names
    assert rec["arms"][0]["config"]["run_dir"] == str(tmp_path / "fake/arms" / names[0])
    res = S.run_study(make_fake_study(tmp_path), run_arm=runner, progress=False)
    assert len(runner.calls) == len(names) and set(res.arm_actions.values()) == {"skip"}


def test_keep_checkpoints_keeps_them(tmp_path):
    study = dataclasses.replace(make_fake_study(tmp_path), keep_checkpoints=True)
    S.run_study(study, run_arm=FakeRunner(), progress=False)
    assert all((tmp_path / "fake/arms" / a.name / "checkpoints/1").is_dir() for a in study.arms)


def test_interrupted_arm_resumes(tmp_path):
    runner = FakeRunner(interrupt=("dpo-beta1-s0",))
    with pytest.raises(KeyboardInterrupt):
        S.run_study(make_fake_study(tmp_path), run_arm=runner, progress=False)
    assert runner.calls == [("dpo-beta0.1-s0", False), ("dpo-beta1-s0", False)]
    st = json.loads((tmp_path / "fake/arms/dpo-beta1-s0/status.json").read_text())
    assert st["status"] == "running"
    res = S.run_study(make_fake_study(tmp_path), run_arm=runner, progress=False)
    assert runner.calls[2] == ("dpo-beta1-s0", True)  # resumed; the finished first arm was skipped
    assert res.arm_actions["dpo-beta0.1-s0"] == "skip" and res.arm_actions["dpo-beta1-s0"] == "resume"
    assert json.loads((tmp_path / "fake/arms/dpo-beta1-s0/status.json").read_text())["resumed"] is True
    # a checkpoint folder with no status file at all is resumed too
    (tmp_path / "fake/arms/ppo_proxy-kl_coef0.05-s1/checkpoints/1").mkdir(parents=True)
    (tmp_path / "fake/arms/ppo_proxy-kl_coef0.05-s1/status.json").unlink()
    res = S.run_study(make_fake_study(tmp_path), run_arm=runner, progress=False)
    assert runner.calls[-1] == ("ppo_proxy-kl_coef0.05-s1", True)


def test_failing_arm_recorded_and_others_run(tmp_path):
    runner = FakeRunner()
    res = S.run_study(make_fake_study(tmp_path, fail_dpo_seed1=True), run_arm=runner, progress=False)
    assert sorted(res.failed) == ["dpo-beta0.1-s1", "dpo-beta1-s1"]
    assert len(runner.calls) == 6  # the ppo arms after the failures still ran
    st = json.loads((tmp_path / "fake/arms/dpo-beta1-s1/status.json").read_text())
    assert st["status"] == "failed" and st["error_type"] == "RuntimeError"
    assert st["error"] == "fake divergence in dpo-beta1-s1" and "Traceback" in st["traceback"]
    assert json.loads((tmp_path / "fake/arms/ppo_proxy-kl_coef0.05-s1/status.json").read_text())["status"] == "done"


def test_arm_writing_elsewhere_is_failed_and_bad_config_fails_its_arm(tmp_path):
    def bad_run(cfg, resume):
        return {"run_dir": str(tmp_path / "elsewhere")}

    def boom(outs):
        raise KeyError("missing_stage")

    arms = (S.Arm("a", "dpo", 0, {}, lambda o: {"x": 1}), S.Arm("b", "dpo", 0, {}, boom))
    res = S.run_study(S.Study("s", (), arms, root=str(tmp_path)), run_arm=bad_run, progress=False)
    assert res.statuses["a"]["error_type"] == "ValueError" and "_arm_dir" in res.statuses["a"]["error"]
    assert res.statuses["b"]["error_type"] == "KeyError"
    rec = json.loads((tmp_path / "s/study.json").read_text())
    assert rec["arms"][1]["config"] is None and "missing_stage" in rec["arms"][1]["config_error"]


def test_only_selects_by_pattern(tmp_path):
    runner = FakeRunner()
    res = S.run_study(make_fake_study(tmp_path), run_arm=runner, only=["dpo-*-s0", "ppo*s1"], progress=False)
    assert [c for c, _ in runner.calls] == ["dpo-beta0.1-s0", "dpo-beta1-s0", "ppo_proxy-kl_coef0.05-s1"]
    assert res.arm_actions["dpo-beta0.1-s1"] == "not selected"
    with pytest.raises(ValueError, match="matches no arm"):
        S.run_study(make_fake_study(tmp_path), run_arm=runner, only=["sft*"], progress=False)


def test_dry_run_runs_nothing(tmp_path, capsys):
    calls, runner = [], FakeRunner()
    res = S.run_study(make_fake_study(tmp_path, calls), run_arm=runner, dry_run=True)
    assert calls == [] and runner.calls == [] and not (tmp_path / "fake").exists()
    out = capsys.readouterr().out
    assert "stage sft" in out and "dpo-beta0.1-s0" in out and "beta=0.1" in out
    assert set(res.arm_actions.values()) == {"run"}
    S.run_study(make_fake_study(tmp_path, calls, fail_dpo_seed1=True), run_arm=runner, progress=False)
    calls.clear()
    n = len(runner.calls)
    res = S.run_study(make_fake_study(tmp_path, calls, fail_dpo_seed1=True), run_arm=runner, dry_run=True)
    out = capsys.readouterr().out
    assert calls == [] and len(runner.calls) == n
    assert set(res.stage_actions.values()) == {"cached"}
    assert res.arm_actions["dpo-beta0.1-s0"] == "skip"
    # failed arms left a checkpoint: they are resumed, and the plan says why they failed
    assert res.arm_actions["dpo-beta1-s1"].startswith("resume (failed: RuntimeError: fake divergence")
    assert "failed: RuntimeError" in out


def test_study_main_cli(tmp_path, capsys):
    runner = FakeRunner()
    reports = []

    def load(path, arg):
        assert path == "study.py"
        return make_fake_study(tmp_path, fail_dpo_seed1=(arg == "fail"))

    def report(study_dir):
        reports.append(study_dir)
        return study_dir / "report.md"

    assert S.study_main(["study.py", "--dry-run"], load, runner, write_report=report) == 0
    assert runner.calls == [] and reports == []
    assert S.study_main(["study.py", "--only", "dpo-beta1-*", "--no-progress"], load, runner,
                        write_report=report) == 0
    assert [c for c, _ in runner.calls] == ["dpo-beta1-s0", "dpo-beta1-s1"] and len(reports) == 1
    assert S.study_main(["study.py", "--arg", "fail", "--only", "dpo-beta0.1-*", "--no-progress"], load,
                        runner, write_report=report) == 1
    assert S.study_main(["study.py", "--report-only"], load, runner, write_report=report) == 0
    assert len(reports) == 3 and len(runner.calls) == 4
    assert S.study_main(["study.py", "--only", "nothing*"], load, runner, write_report=report) == 2


def test_compilation_counter_counts_fresh_jit_not_cached_call(tmp_path):
    import jax
    import jax.numpy as jnp

    S.setup_compilation_cache(tmp_path / "cache")
    x = jnp.arange(5.0)
    f = jax.jit(lambda v: jnp.sin(v) * 3.0 + v[::-1])
    with S.CompilationCounter() as fresh:
        f(x).block_until_ready()
    with S.CompilationCounter() as cached:
        f(x).block_until_ready()
    assert fresh.compilations >= 1 and fresh.compile_secs > 0
    assert cached.compilations == 0 and cached.backend_compiles == 0
    # the same program in a new jit object is served from the persistent cache: no XLA compilation
    g = jax.jit(lambda v: jnp.sin(v) * 3.0 + v[::-1])
    with S.CompilationCounter() as persisted:
        g(x).block_until_ready()
    assert persisted.cache_hits >= 1 and persisted.compilations == 0
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
