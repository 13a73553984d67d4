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


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory, shared_assets) -> pathlib.Path:
    """A randomly initialised 2-layer Llama saved by ``transformers`` (safetensors + config) together
    with the real GPT-2 tokenizer: a Hugging Face folder small enough for end-to-end runs in tests."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    tok_dir = shared_assets / "gpt2-tokenizer"
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, folder / name)
    config = LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def restore_jax_cache_config():
    """Restore JAX's process-wide persistent-cache settings after a test that points them at a tmp folder
    (``jaxrlhf.study.setup_compilation_cache``)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {n: getattr(jax.config, n) for n in names}
    yield
    for n, v in saved.items():
        jax.config.update(n, v)
    cc.reset_cache()
