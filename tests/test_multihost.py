"""Multi-host: two CPU processes under ``jax.distributed`` (gloo collectives), started through the same
environment variables a user's launcher sets, run the same SFT steps as one process with the same 8
devices; each tokenises only its own rows and feeds only its slice of the global batch.

Reference: the single-process run of the same code (losses, parameters, the global batches' examples)."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxrlhf.distributed import process_block

HERE = pathlib.Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process():
    if jax.device_count() != 8:
        pytest.skip("needs the 8 fake CPU devices of conftest")
    sys.path.insert(0, str(HERE))
    from multihost_common import N_ROWS, run_sft_steps

    ref_losses, ref_checksum, ref_reads = run_sft_steps()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",) and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(JAXRLHF_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAXRLHF_NUM_PROCESSES="2")
    procs = [subprocess.Popen([sys.executable, str(HERE / "multihost_worker.py")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(env, JAXRLHF_PROCESS_ID=str(i)))
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
               for out, _ in outs]
    for i, r in enumerate(results):
        assert r["process"] == i and r["devices"] == 8 and r["local"] == 4
        np.testing.assert_allclose(r["losses"], ref_losses, rtol=1e-5)
        np.testing.assert_allclose(r["checksum"], ref_checksum, rtol=1e-5)
        assert r["gathered"] == list(range(8))  # host_copy: both halves on each host
    # Each process drew a different slice of every global batch, and the two slices in process order are
    # the single process's global batch.
    a, b = (r["reads"] for r in results)
    for sa, sb, ref in zip(a["slices"], b["slices"], ref_reads["slices"]):
        assert len(sa) == len(sb) == len(ref) // 2 and not set(sa) & set(sb)
        assert sa + sb == ref
    # Each process tokenised only its block of rows and the rows of its own slices: different rows, not all.
    for p, reads in enumerate((a, b)):
        lo, hi = process_block(N_ROWS, p, 2)
        assert set(reads["tokenized_rows"]) == set(range(lo, hi)) | set(reads["slice_rows"])
        assert len(reads["tokenized_rows"]) < N_ROWS
    assert set(a["tokenized_rows"]) != set(b["tokenized_rows"])
    assert sorted(set(a["slice_rows"]) | set(b["slice_rows"])) == ref_reads["slice_rows"]


EXPERIMENT = '''
from jaxrlhf.config import DataConfig, ExperimentConfig, MeshConfig, ModelSpec, OptimConfig, SFTConfig, TrainConfig


def get_config(arg=None):
    return ExperimentConfig(
        name="sft", model=ModelSpec(name={model!r}), mesh=MeshConfig(data=1, fsdp=8, tensor=1),
        optim=OptimConfig(lr=1e-3, warmup_steps=1, schedule="cosine"),
        data=DataConfig(source={source!r}, batch_size=8, max_length=48, max_prompt_length=24, eval_size=8,
                        use_chat_template=False, limit=40),
        train=TrainConfig(steps=3, save_every=2, num_samples=2, sample_max_new_tokens=4, run_dir={run_dir!r}),
        algo=SFTConfig())
'''


@pytest.mark.slow
def test_cli_run_on_two_processes_equals_one(tiny_llama_folder, shared_assets, tmp_path):
    """``jaxrlhf run`` started twice with the JAXRLHF_* variables (parameters sharded over both processes:
    fsdp=8) writes the run a single process writes: metrics, samples and the exported weights."""
    if jax.device_count() != 8:
        pytest.skip("needs the 8 fake CPU devices of conftest")
    from safetensors.numpy import load_file

    from jaxrlhf.config import load_config
    from jaxrlhf.drivers import run_experiment

    source = str(shared_assets / "alpaca-seed-tasks" / "seed_tasks.jsonl")
    exp = tmp_path / "exp.py"
    exp.write_text(EXPERIMENT.format(model=str(tiny_llama_folder), source=source, run_dir=str(tmp_path / "two")))
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",) and not k.startswith("SLURM_")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               JAXRLHF_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAXRLHF_NUM_PROCESSES="2",
               PYTHONPATH=str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-m", "jaxrlhf.cli", "run", str(exp)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(env, JAXRLHF_PROCESS_ID=str(i)))
             for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    cfg = load_config(str(exp), ["--config.train.run_dir=" + str(tmp_path / "one")])
    run_experiment(cfg)
    two, one = tmp_path / "two" / "sft", tmp_path / "one" / "sft"

    def lines(run, name):
        return [{k: v for k, v in json.loads(x).items() if k not in ("step_time_s", "tokens_per_s")}
                for x in (run / name).read_text().splitlines()]

    for a, b in zip(lines(two, "metrics.jsonl"), lines(one, "metrics.jsonl"), strict=True):
        assert a.pop("split") == b.pop("split")
        assert a == pytest.approx(b, rel=1e-4), (a, b)
    assert lines(two, "samples.jsonl") == lines(one, "samples.jsonl")
    wa, wb = load_file(two / "hf" / "model.safetensors"), load_file(one / "hf" / "model.safetensors")
    assert sorted(wa) == sorted(wb)
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], atol=1e-5)
