"""Experiment files load and validate; bad overrides fail naming the field; sections are frozen."""

import dataclasses
import pathlib

import pytest

from jaxrlhf import config as C

REPO = pathlib.Path(__file__).resolve().parents[1]
# Experiment files (get_config); study files (get_study) are checked in test_study_file.py.
EXPERIMENTS = sorted(p for p in (REPO / "experiments").glob("*.py") if "def get_study(" not in p.read_text())
SFT = REPO / "experiments" / "sft_smollm2_seed_tasks.py"
# Each experiment file's algorithm, by the file-name prefix the README uses.
ALGO_BY_PREFIX = {"sft": C.SFTConfig, "dpo": C.DPOConfig, "reward": C.RewardConfig, "classifier": C.RewardConfig,
                  "ppo": C.PPOConfig, "grpo": C.GRPOConfig, "rloo": C.RLOOConfig}
SHARED = REPO.parent / "shared" / "assets"


def _check_experiment(path, cfg):
    expected = ALGO_BY_PREFIX[path.name.split("_")[0]]
    assert type(cfg.algo) is expected, (path.name, type(cfg.algo))
    assert cfg.name.startswith(path.stem)
    assert cfg.data.batch_size % cfg.optim.grad_accum_steps == 0
    assert 0 < cfg.data.max_prompt_length < cfg.data.max_length
    if SHARED.is_dir():  # offline machines: every data source is a file of the shared assets
        assert pathlib.Path(cfg.data.source).is_file(), cfg.data.source
        if isinstance(cfg.algo, C.RewardConfig) and cfg.algo.eval_source:
            assert pathlib.Path(cfg.algo.eval_source).is_file(), cfg.algo.eval_source
    if isinstance(cfg.algo, (C.PPOConfig, C.GRPOConfig, C.RLOOConfig)):
        rows = cfg.data.batch_size * cfg.algo.rollout.num_completions
        assert rows % (cfg.algo.update.num_minibatches * cfg.optim.grad_accum_steps) == 0
        assert cfg.data.max_prompt_length + cfg.algo.rollout.max_new_tokens <= cfg.data.max_length


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_loads_and_validates(path):
    cfg = C.load_config(path)
    C.validate(cfg, num_devices=1)
    _check_experiment(path, cfg)
    module = C.load_experiment_module(path)
    for overrides in getattr(module, "sweep", lambda: [])():
        swept = C.load_config(path, [f"--config.{k}={v}" for k, v in overrides.items()])
        C.validate(swept, num_devices=1)
        _check_experiment(path, swept)
        for key, value in overrides.items():  # every swept value arrived, parsed by its field's type
            node = swept
            for part in key.split("."):
                node = getattr(node, part)
            assert str(node) == value or node == type(node)(value), (key, node, value)


def test_override_is_typed():
    cfg = C.load_config(SFT, ["--config.optim.lr=3e-4", "--config.data.packing=true",
                              "--config.optim.schedule=linear", "--config.train.steps=7"])
    assert cfg.optim.lr == 3e-4 and cfg.data.packing is True and cfg.optim.schedule == "linear"
    assert cfg.train.steps == 7


@pytest.mark.parametrize("override, message", [
    ("--config.optim.lr=abc", "optim.lr"),
    ("--config.optim.learning_rate=1e-5", "has no field 'learning_rate'"),
    ("--config.optim.schedule=exp", "must be one of"),
    ("--config.optim.lr=-1", "optim.lr must be > 0"),
    ("--config.data.max_prompt_length=999", "data.max_prompt_length"),
    ("--lr=1e-5", "unrecognised argument"),
])
def test_bad_override_names_the_field(override, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load_config(SFT, [override])


def test_batch_not_divisible_by_mesh_is_rejected_before_compute():
    cfg = C.load_config(SFT, ["--config.data.batch_size=6", "--config.mesh.data=4"])
    with pytest.raises(C.ConfigError, match="data.batch_size=6.*data\\*fsdp=4"):
        C.validate(cfg, num_devices=4)
    with pytest.raises(ValueError, match="mesh"):
        C.validate(C.load_config(SFT, ["--config.mesh.data=3"]), num_devices=8)


def test_sections_are_frozen_and_overrides_return_a_new_config():
    cfg = C.load_config(SFT)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "x"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.batch_size = 3
    new = C.apply_override(cfg, "data.batch_size", "16")
    assert new.data.batch_size == 16 and cfg.data.batch_size == 8
    assert new.data == dataclasses.replace(cfg.data, batch_size=16) and new.optim is cfg.optim
    with pytest.raises(TypeError):
        C.DataConfig("x")  # keyword-only
    with pytest.raises(C.ConfigError, match="algo must be one of"):
        C.validate(dataclasses.replace(cfg, algo=C.RolloutConfig()))
    with pytest.raises(C.ConfigError, match="is a section"):
        C.apply_override(cfg, "train", "3")


def test_rl_configs_share_one_update_section():
    """PPO, GRPO and RLOO read the same UpdateConfig fields, overridable at algo.update.<field>; each keeps
    its own defaults (PPO 4 epochs with whitened advantages, GRPO sequence aggregation)."""
    for algo in (C.PPOConfig(), C.GRPOConfig(), C.RLOOConfig()):
        assert type(algo.update) is C.UpdateConfig
        shared = {f.name for f in dataclasses.fields(C.UpdateConfig)}
        assert not shared & {f.name for f in dataclasses.fields(algo)}  # no field repeated at algo level
    assert (C.PPOConfig().update.epochs, C.PPOConfig().update.whiten_advantages) == (4, True)
    assert C.GRPOConfig().update.aggregation == "sequence" and C.RLOOConfig().update.aggregation == "token"
    path = REPO / "experiments" / "grpo_imdb_smollm2.py"
    cfg = C.load_config(path, ["--config.algo.update.epochs=3", "--config.algo.update.clip_eps_high=0.28"])
    assert cfg.algo.update.epochs == 3 and cfg.algo.update.clip_eps_high == 0.28
    with pytest.raises(C.ConfigError, match=r"algo\.update\.num_minibatches"):
        C.load_config(path, ["--config.algo.update.num_minibatches=3"])
    with pytest.raises(C.ConfigError, match="has no field 'epochs'"):
        C.load_config(path, ["--config.algo.epochs=2"])
