"""Shared test fixtures.

The suite runs on CPU. JAX is asked for 8 fake host devices so that sharded and unsharded steps can be
compared in one process; single-device tests simply use ``jax.devices()[0]``.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pathlib

import pytest

SHARED_ASSETS = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "assets"


@pytest.fixture(scope="session")
def shared_assets() -> pathlib.Path:
    """Path to ``../shared/assets`` (real data); skips the test when it is absent."""
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"real assets not found at {SHARED_ASSETS}")
    return SHARED_ASSETS


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")
