"""Experiment files load and validate; bad overrides fail naming the field."""

import pathlib

import pytest

from jaxrlhf import config as C

EXPERIMENTS = sorted((pathlib.Path(__file__).resolve().parents[1] / "experiments").glob("*.py"))
SFT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "sft_smollm2_seed_tasks.py"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_loads_and_validates(path):
    cfg = C.load_config(path)
    C.validate(cfg, num_devices=1)
    assert cfg.name and cfg.data.source
    module = C.load_experiment_module(path)
    for overrides in getattr(module, "sweep", lambda: [])():
        swept = C.load_config(path, [f"--config.{k}={v}" for k, v in overrides.items()])
        C.validate(swept, num_devices=1)


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
