"""Sweeps: an arm re-run gives the same bits; a swept beta / KL coefficient compiles nothing new.

Each case runs a real driver three times on the tiny Llama with JAX's persistent compilation cache in a
fresh folder (as ``jaxrlhf study`` sets it up): arm ``a``, arm ``a`` again under another name (every metric
and sample must be bitwise equal: same data order, same sampling keys), and arm ``c`` that differs only in
the swept hyper-parameter (beta, or the KL coefficient), which must trigger zero XLA compilations: the
value is a traced input (``TrainState.extra``), so ``c``'s programs are the ones ``a`` already compiled.
A control run that changes a static setting (the loss) must compile, so the counter can fail.
"""

import dataclasses
import json

import pytest

from jaxrlhf import config as C
from jaxrlhf.drivers import run_experiment
from jaxrlhf.study import CompilationCounter, setup_compilation_cache

TIMING = ("step_time_s", "tokens_per_s", "time/generate_s", "time/score_s")


@pytest.fixture(autouse=True)
def _restore_jax_cache(restore_jax_cache_config):
    """``run_study`` / ``setup_compilation_cache`` point JAX's persistent cache at a tmp folder."""


def _read(run_dir, name):
    metrics = [{k: v for k, v in json.loads(x).items() if k not in TIMING}
               for x in (run_dir / name / "metrics.jsonl").read_text().splitlines()]
    samples_path = run_dir / name / "samples.jsonl"
    samples = [json.loads(x) for x in samples_path.read_text().splitlines()] if samples_path.exists() else []
    return metrics, samples


def _sweep(tmp_path, base: C.ExperimentConfig, swept: C.ExperimentConfig, static_change: C.ExperimentConfig):
    setup_compilation_cache(tmp_path / "cache")
    runs = tmp_path / "runs"
    counts = {}
    for name, cfg in (("a", base), ("a_again", base), ("swept", swept), ("static", static_change)):
        with CompilationCounter() as counter:
            run_experiment(dataclasses.replace(cfg, name=name, train=dataclasses.replace(cfg.train, run_dir=str(runs))))
        counts[name] = counter.compilations
    return runs, counts


def _experiment(folder, data, algo, steps=2):
    return C.ExperimentConfig(
        name="x", model=C.ModelSpec(name=str(folder)), optim=C.OptimConfig(lr=1e-3, schedule="constant"),
        data=C.DataConfig(batch_size=8, use_chat_template=False, **data),
        train=C.TrainConfig(steps=steps, save_every=steps, num_samples=2, sample_max_new_tokens=4),
        algo=algo)


def test_dpo_rerun_is_bitwise_identical_and_beta_does_not_recompile(tiny_llama_folder, shared_assets, tmp_path):
    hh = str(shared_assets / "hh-rlhf-harmless-base-test" / "test.jsonl.gz")
    data = dict(source=hh, split="test", max_length=32, max_prompt_length=16, eval_size=4, limit=16)
    base = _experiment(tiny_llama_folder, data, C.DPOConfig(loss="dpo", beta=0.1))
    runs, counts = _sweep(tmp_path, base, dataclasses.replace(base, algo=C.DPOConfig(loss="dpo", beta=0.5)),
                          dataclasses.replace(base, algo=C.DPOConfig(loss="ipo", beta=0.1)))
    assert _read(runs, "a") == _read(runs, "a_again")
    assert _read(runs, "a")[0] != _read(runs, "swept")[0]  # beta did change the run
    assert counts["a"] > 0 and counts["a_again"] == 0
    assert counts["swept"] == 0, counts
    assert counts["static"] > 0, counts  # another loss is another program: the counter sees compiles


def test_ppo_rerun_is_bitwise_identical_and_kl_coef_does_not_recompile(tiny_llama_folder, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"The film number {i} was"}) + "\n" for i in range(16)))
    data = dict(source=str(prompts), max_length=16, max_prompt_length=8, eval_size=4)

    def ppo(coef, epochs=1):
        return C.PPOConfig(rollout=C.RolloutConfig(max_new_tokens=4),
                           reward=C.RewardSpec(functions=("jaxrlhf.rewards:word_count",)), kl=C.KLConfig(coef=coef),
                           update=dataclasses.replace(C.PPOConfig().update, epochs=epochs))

    base = _experiment(tiny_llama_folder, data, ppo(0.05))
    runs, counts = _sweep(tmp_path, base, dataclasses.replace(base, algo=ppo(0.5)),
                          dataclasses.replace(base, algo=ppo(0.05, epochs=2)))
    assert _read(runs, "a") == _read(runs, "a_again")
    assert _read(runs, "a")[0] != _read(runs, "swept")[0]
    assert counts["a"] > 0 and counts["a_again"] == 0
    assert counts["swept"] == 0, counts
    assert counts["static"] > 0, counts
