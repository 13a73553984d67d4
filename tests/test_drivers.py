"""Every driver end to end on a tiny 2-layer Llama: what it writes, and resume == uninterrupted.

Each case runs three times: straight to ``steps``; interrupted by a real SIGTERM at a random step, then
``--resume``d. The
resumed run must end with the same train/eval metrics (float tolerance) and the same parameters as the
straight one -- not only the same step count. Reference values come from the straight run of the same
config, an independent execution path (restore from orbax + iterator position + PRNG by step number).
"""

import contextlib
import dataclasses
import json
import math
import os
import random
import signal

import jax
import numpy as np
import pytest

from jaxrlhf import config as C
from jaxrlhf.checkpoint import Checkpointer
from jaxrlhf.drivers import core, run_experiment
from jaxrlhf.errors import Preempted

STEPS, SAVE = 3, 2
TIMING = ("step_time_s", "tokens_per_s", "time/generate_s", "time/score_s")


def prompts_file(tmp_path):
    rows = [{"prompt": f"The film number {i} was"} for i in range(32)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rl_algo(cls, **kw):
    reward = C.RewardSpec(functions=("jaxrlhf.rewards:word_count",))
    return cls(rollout=C.RolloutConfig(max_new_tokens=4, num_completions=kw.pop("G", 1)), reward=reward,
               update=dataclasses.replace(cls().update, epochs=1, num_minibatches=1), **kw)


def make_case(name, assets, tmp_path):
    """``(algo, data, writes)``: ``writes`` = (samples written, export folder or None)."""
    hh = str(assets / "hh-rlhf-harmless-base-test" / "test.jsonl.gz")
    pairs = dict(source=hh, split="test", max_length=48, max_prompt_length=24, eval_size=8, limit=16)
    if name == "sft":
        return (C.SFTConfig(), dict(source=str(assets / "alpaca-seed-tasks" / "seed_tasks.jsonl"), max_length=48,
                                    max_prompt_length=24, eval_size=8, limit=24), (True, "hf"))
    if name == "reward":
        return C.RewardConfig(normalize_examples=8), pairs, (False, "reward_model")
    if name == "classifier":
        imdb = str(assets / "imdb-reviews-subset" / "test.jsonl.gz")
        return (C.RewardConfig(objective="classification", normalize_examples=8),
                dict(source=imdb, split="test", max_length=32, max_prompt_length=16, eval_size=8, limit=16), (False, "reward_model"))
    if name == "dpo":
        return C.DPOConfig(loss="dpo", beta=0.1), pairs, (True, None)
    if name == "simpo":
        return C.DPOConfig(loss="simpo", beta=2.0), pairs, (True, None)
    rl = dict(source=prompts_file(tmp_path), max_length=16, max_prompt_length=8, eval_size=8)
    if name == "ppo":
        return rl_algo(C.PPOConfig, kl=C.KLConfig(coef=0.05, controller="adaptive", target=1.0, horizon=100.0)), \
            rl, (True, None)
    if name == "grpo":
        return rl_algo(C.GRPOConfig, G=2), rl, (True, None)
    if name == "rloo":
        return rl_algo(C.RLOOConfig, G=2), rl, (True, None)
    raise KeyError(name)


def experiment(folder, run_dir, name, algo, data, stop_after=0):
    return C.ExperimentConfig(
        name=name, model=C.ModelSpec(name=str(folder)), optim=C.OptimConfig(lr=1e-3, schedule="constant"),
        data=C.DataConfig(batch_size=8, use_chat_template=False, **data),
        train=C.TrainConfig(steps=STEPS, save_every=SAVE, num_samples=2, sample_max_new_tokens=4, run_dir=str(run_dir),
                            stop_after=stop_after),
        algo=algo)


@contextlib.contextmanager
def sigterm_after_step(monkeypatch, k):
    """Send this process a real SIGTERM right after the loop dispatches step ``k`` (through the loop's
    ``after_step`` hook, wrapped around the driver's own)."""
    real_loop = core.train_loop

    def loop(**kw):
        hooks = kw["hooks"]

        def after_step(step, state, metrics, aux):
            if hooks.after_step is not None:
                hooks.after_step(step, state, metrics, aux)
            if step == k:
                os.kill(os.getpid(), signal.SIGTERM)

        return real_loop(**dict(kw, hooks=dataclasses.replace(hooks, after_step=after_step)))

    monkeypatch.setattr(core, "train_loop", loop)
    yield
    monkeypatch.setattr(core, "train_loop", real_loop)


def rows(run, split):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k not in TIMING} for m in lines if m["split"] == split]


def assert_same_params(a, b):
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=2e-5, atol=2e-6)


# The default suite runs the classifier case (+ SFT resume in test_run.py); the rest are slow (~1-2 min each
# on 2 busy cores: three runs, each compiling its step, sampler and eval).
DEFAULT = ["classifier"]
SLOW = ["sft", "reward", "dpo", "simpo", "ppo", "grpo", "rloo"]


@pytest.mark.parametrize("name", DEFAULT + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW])
def test_driver_writes_its_run_and_resume_equals_straight(name, tiny_llama_folder, shared_assets, tmp_path,
                                                          monkeypatch):
    algo, data, (samples, export) = make_case(name, shared_assets, tmp_path)
    runs = tmp_path / "runs"
    straight = run_experiment(experiment(tiny_llama_folder, runs, "straight", algo, data))
    run = runs / "straight"

    # metrics.jsonl: a finite loss at every step; eval at step 0 and at the last step.
    train = rows(run, "train")
    assert [m["step"] for m in train] == list(range(1, STEPS + 1))
    assert all(math.isfinite(m["loss"]) for m in train)
    evals = rows(run, "eval")
    assert [m["step"] for m in evals] == [0, STEPS]
    assert straight["eval_before"]["step"] == 0 and straight["eval_after"]["step"] == STEPS
    assert (run / "checkpoints" / str(STEPS)).is_dir()
    assert int(jax.device_get(straight["state"].step)) == STEPS
    if samples:
        lines = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
        tags = [s["tag"] for s in lines]
        assert tags.count("before") == 2 and tags.count("after") == 2
        assert {s["step"] for s in lines if s["tag"] == "before"} == {0}
        assert {s["step"] for s in lines if s["tag"] == "after"} == {STEPS}
    if export:
        assert (run / export / "config.json").exists()

    # SIGTERM (a preemption) at a random step k: the loop finishes step k, saves it and stops; the resumed
    # run restores params, optimiser, extra (KL controller, reward normaliser), data position and the
    # step-derived PRNG, and must end with the same metrics and parameters as the straight run.
    k = random.Random(name).randint(1, STEPS - 1)
    with pytest.raises(Preempted) as stopped:
        with sigterm_after_step(monkeypatch, k):
            run_experiment(experiment(tiny_llama_folder, runs, "resumed", algo, data))
    assert stopped.value.step == k
    assert Checkpointer(runs / "resumed" / "checkpoints").latest_step() == k
    assert [m["step"] for m in rows(runs / "resumed", "train")] == list(range(1, k + 1))
    resumed = run_experiment(experiment(tiny_llama_folder, runs, "resumed", algo, data), resume=True)
    for split in ("train", "eval"):
        a, b = rows(run, split), rows(runs / "resumed", split)
        assert [m["step"] for m in a] == [m["step"] for m in b]
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            for k in x:
                if isinstance(x[k], float):
                    assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-5), (split, x["step"], k)
    assert_same_params(straight["state"].params, resumed["state"].params)
    assert_same_params(straight["state"].extra, resumed["state"].extra)


def test_reward_checkpoint_holds_the_exported_normalisation(tiny_llama_folder, shared_assets, tmp_path):
    """The final checkpoint and the exported folder carry the same (mean, std), equal to the statistics of
    the reference rewards re-scored from the exported model."""
    from flax import nnx

    from jaxrlhf.models.reward_model import load_reward_model, stats_of

    algo, data, _ = make_case("reward", shared_assets, tmp_path)
    runs = tmp_path / "runs"
    cfg = experiment(tiny_llama_folder, runs, "rm", algo, data)
    done = run_experiment(cfg)
    norm = json.loads((runs / "rm" / "reward_normalization.json").read_text())
    mean, std = done["stats"]
    assert (mean, std) == pytest.approx((norm["reward_mean"], norm["reward_std"])) and std != 1.0
    rm, _ = load_reward_model(done["export_dir"])
    assert stats_of(nnx.state(rm, nnx.Variable)) == pytest.approx((mean, std))
    # Resuming the finished run restores the final checkpoint: its stats are the exported ones.
    again = run_experiment(cfg, resume=True)
    assert again["stats"] == pytest.approx((mean, std))
    assert [m["step"] for m in rows(runs / "rm", "train")] == list(range(1, STEPS + 1))  # nothing re-run


def test_dispatch_is_by_config_type():
    from jaxrlhf import drivers

    assert set(drivers.DRIVERS) == {C.SFTConfig, C.RewardConfig, C.DPOConfig, C.PPOConfig, C.GRPOConfig,
                                    C.RLOOConfig}
    assert drivers.DRIVERS[C.GRPOConfig] is drivers.rl.train and drivers.DRIVERS[C.SFTConfig] is drivers.sft.train

    @dataclasses.dataclass(frozen=True)
    class Unknown:
        kind: str = "sft"  # a string kind no longer selects a driver

    with pytest.raises(C.ConfigError, match="Unknown"):
        run_experiment(dataclasses.replace(C.ExperimentConfig(), algo=Unknown()))
