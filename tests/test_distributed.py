"""jaxrlhf.distributed: which launch environment gives which ``jax.distributed.initialize`` call, and
process-sharded tokenisation.

References: the expected ``initialize`` arguments are written out by hand from the rules (SLURM's and
JAX's variables); the sharded examples and report are compared with one process's ``tokenize(rows)``
(the real ``tokenize_sft_dataset`` with the GPT-2 tokenizer), and the processes' batches with one
process's ``BatchIterator`` global batch. Several processes are simulated by threads whose all-gather
meets at a barrier (the real two-process run is tests/test_multihost.py).
"""

import functools
import os
import threading

import numpy as np
import pytest

from jaxrlhf.config import ConfigError
from jaxrlhf.data.batching import build_lm_batch
from jaxrlhf.data.iterator import BatchIterator
from jaxrlhf.distributed import (
    ShardedExamples,
    distributed_args,
    initialize_from_env,
    process_block,
    tokenize_rows,
)
from jaxrlhf.errors import DataError

EXPLICIT = {"JAXRLHF_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAXRLHF_NUM_PROCESSES": "4", "JAXRLHF_PROCESS_ID": "2"}
SRUN = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
        "SLURM_NODEID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}


# ------------------------------------------------------------------------------------------- environment

@pytest.mark.parametrize("env, tpu, expected", [
    ({}, False, None),                                       # a plain process: nothing to initialise
    ({"HOME": "/root", "SLURM_JOB_ID": "5"}, False, None),  # salloc / the batch script itself: no srun step
    (EXPLICIT, False, {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2,
                       "cluster_detection_method": "deactivate"}),
    ({"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, False,
     {"coordinator_address": "h:9", "num_processes": 2, "process_id": 0, "cluster_detection_method": "deactivate"}),
    ({**EXPLICIT, "JAXRLHF_LOCAL_DEVICE_IDS": "0,1"}, False,
     {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2,
      "cluster_detection_method": "deactivate", "local_device_ids": [0, 1]}),
    ({**EXPLICIT, "JAXRLHF_NUM_PROCESSES": "1", "JAXRLHF_PROCESS_ID": "0"}, False, None),  # a group of one
    ({**EXPLICIT, **SRUN}, False, {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2,
                                   "cluster_detection_method": "deactivate"}),  # explicit beats SLURM
    # srun, one task per node on 4-GPU nodes: JAX's detection, every GPU of the node (not JAX's one per task)
    ({**SRUN, "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, False,
     {"cluster_detection_method": "slurm", "num_processes": 2, "process_id": 1, "local_device_ids": [0, 1, 2, 3]}),
    ({**SRUN, "SLURM_GPUS_ON_NODE": "8"}, False,
     {"cluster_detection_method": "slurm", "num_processes": 2, "process_id": 1,
      "local_device_ids": list(range(8))}),
    # srun, 8 tasks per node seeing all 8 GPUs: JAX's default (GPU number SLURM_LOCALID)
    ({**SRUN, "SLURM_STEP_NUM_TASKS": "16", "SLURM_NTASKS": "16", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
      "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, False,
     {"cluster_detection_method": "slurm", "num_processes": 16, "process_id": 1}),
    # --gpus-per-task=1: each task sees its one GPU as device 0
    ({**SRUN, "SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "CUDA_VISIBLE_DEVICES": "5"},
     False, {"cluster_detection_method": "slurm", "num_processes": 16, "process_id": 1, "local_device_ids": [0]}),
    ({**SRUN, "CUDA_VISIBLE_DEVICES": "0,1", "JAX_LOCAL_DEVICE_IDS": "1"}, False,  # JAX reads its own variable
     {"cluster_detection_method": "slurm", "num_processes": 2, "process_id": 1}),
    ({**SRUN, "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}, False, None),  # srun -n 1
    ({}, True, {}),                                          # a TPU VM: JAX reads the slice from the metadata
    ({**SRUN, "JAXRLHF_DISTRIBUTED": "off"}, True, None),
    ({"JAXRLHF_DISTRIBUTED": "auto"}, False, {}),
    ({"JAXRLHF_DISTRIBUTED": "mpi4py"}, False, {"cluster_detection_method": "mpi4py"}),
])
def test_environment_gives_initialize_arguments(env, tpu, expected):
    assert distributed_args(env, on_tpu_vm=tpu) == expected


def test_slurm_tasks_on_a_node_from_the_compressed_list():
    # "2(x3),1": nodes 0-2 run 2 tasks, node 3 runs 1 -> on node 3 the single task gets all 4 GPUs.
    env = {**SRUN, "SLURM_STEP_NUM_TASKS": "7", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3",
           "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert distributed_args(env)["local_device_ids"] == [0, 1, 2, 3]
    assert "local_device_ids" not in distributed_args({**env, "SLURM_NODEID": "2"})


@pytest.mark.parametrize("env, match", [
    ({"JAXRLHF_NUM_PROCESSES": "2", "JAXRLHF_PROCESS_ID": "0"}, "JAXRLHF_COORDINATOR_ADDRESS"),
    ({**EXPLICIT, "JAXRLHF_PROCESS_ID": "4"}, "JAXRLHF_PROCESS_ID=4 must be < JAXRLHF_NUM_PROCESSES=4"),
    ({**EXPLICIT, "JAXRLHF_NUM_PROCESSES": "four"}, "JAXRLHF_NUM_PROCESSES='four' is not an integer"),
    ({"JAXRLHF_COORDINATOR_ADDRESS": "h:1", "JAXRLHF_NUM_PROCESSES": "2"}, "JAXRLHF_PROCESS_ID"),
    ({"JAXRLHF_COORDINATOR_ADDRESS": "h:1"}, "JAXRLHF_NUM_PROCESSES and JAXRLHF_PROCESS_ID are not"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_COORDINATOR_ADDRESS is set"),
    ({**EXPLICIT, "JAXRLHF_LOCAL_DEVICE_IDS": "a,b"}, "comma-separated device ids"),
    ({"JAXRLHF_DISTRIBUTED": "mpi"}, "JAXRLHF_DISTRIBUTED='mpi'"),
])
def test_malformed_launch_environment_is_a_config_error(env, match):
    with pytest.raises(ConfigError, match=match):
        distributed_args(env)


def test_initialize_from_env_calls_initialize_once_or_never(monkeypatch):
    calls = []
    fake = lambda **kw: calls.append(kw)  # noqa: E731
    assert initialize_from_env({}, initialize=fake, on_tpu_vm=False) is False
    assert calls == []
    assert initialize_from_env(EXPLICIT, initialize=fake, on_tpu_vm=False) is True
    assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2,
                      "cluster_detection_method": "deactivate"}]
    # The default path (os.environ, jax.distributed.initialize) with no launch variables does not call JAX.
    import jax

    for name in list(os.environ):
        if name.startswith(("SLURM_", "JAXRLHF_", "JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS_ID")):
            monkeypatch.delenv(name)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: pytest.fail(f"initialize({kw}) called"))
    assert initialize_from_env(on_tpu_vm=False) is False


def test_cli_initialises_before_dispatching(monkeypatch):
    import jaxrlhf.distributed as D
    from jaxrlhf import cli

    class Called(Exception):
        pass

    def fake():
        raise Called

    monkeypatch.setattr(D, "initialize_from_env", fake)
    with pytest.raises(Called):
        cli.main(["run", "no_such_experiment.py"])


# ------------------------------------------------------------------------------------------- sharded tokenisation

@pytest.fixture(scope="module")
def gpt2(shared_assets):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(shared_assets / "gpt2-tokenizer/tokenizer.json"),
                                   eos_token="<|endoftext|>")


def sft_rows(n=23):
    """Mixed rows: self-instruct with 1-3 instances, and long prompt/response rows that truncation drops."""
    rows = []
    for i in range(n):
        if i % 4 == 3:
            rows.append({"prompt": f"row {i} " + "word " * 40, "response": "too long " * 30})
        else:
            rows.append({"instruction": f"Task {i}: say something.",
                         "instances": [{"input": f"x{i}{k}", "output": f"answer {i} {k}"} for k in range(1 + i % 3)]})
    return rows


def sft_tokenize(rows, tok, on_overflow="drop"):
    from jaxrlhf.data.tokenize import tokenize_sft_dataset

    return tokenize_sft_dataset(rows, tok, max_length=24, max_prompt_length=16, on_overflow=on_overflow,
                                instances="all")


def sft_instances(row):
    from jaxrlhf.data.formats import sft_example

    return len(sft_example(row, instances="all"))


def run_processes(P, make):
    """Call ``make(p, allgather)`` for p = 0..P-1 in P threads whose all-gathers meet; the results (or the
    exceptions) in process order."""
    barrier, slots, out = threading.Barrier(P), [None] * P, [None] * P

    def gather_for(p):
        def gather(x):
            slots[p] = np.asarray(x)
            barrier.wait()
            stacked = np.stack(slots)
            barrier.wait()
            return stacked
        return gather

    def run(p):
        try:
            out[p] = make(p, gather_for(p))
        except Exception as e:  # noqa: BLE001 -- returned to the test
            out[p] = e

    threads = [threading.Thread(target=run, args=(p,)) for p in range(P)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def same_example(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def test_sharded_examples_equal_one_process_tokenisation(gpt2):
    rows = sft_rows()
    full, full_report = sft_tokenize(rows, gpt2)
    assert full_report.dropped and len(full) > len(rows) - full_report.n_dropped  # drops and multi-instance rows
    P = 3
    shards = run_processes(P, lambda p, g: ShardedExamples(rows, functools.partial(sft_tokenize, tok=gpt2),
                                                           instances=sft_instances, process_index=p,
                                                           process_count=P, allgather=g))
    for p, ex in enumerate(shards):
        assert isinstance(ex, ShardedExamples), ex
        lo, hi = process_block(len(rows), p, P)
        assert ex.tokenized_rows == list(range(lo, hi))      # only its own block so far
        assert ex.report == full_report                        # the whole dataset's report
        assert len(ex) == len(full)
    # Every process indexes the examples as one process does, reading the other rows on demand.
    order = np.random.default_rng(0).permutation(len(full))
    for p, ex in enumerate(shards):
        for j in order[:9]:
            assert same_example(ex[int(j)], full[int(j)]), (p, j)
        assert same_example(ex[-1], full[-1])
    # The global batch of P processes = one process's batch; each read its block and its slices only.
    collate = functools.partial(build_lm_batch, seq_len=24, pad_id=0)
    fresh = run_processes(P, lambda p, g: ShardedExamples(rows, functools.partial(sft_tokenize, tok=gpt2),
                                                          instances=sft_instances, process_index=p,
                                                          process_count=P, allgather=g))
    one = BatchIterator(full, 6, collate, seed=3)
    its = [BatchIterator(ex, 6, collate, seed=3, process_index=p, process_count=P) for p, ex in enumerate(fresh)]
    for _ in range(2):
        want = next(one)
        got = [next(it) for it in its]
        for k in want:
            np.testing.assert_array_equal(np.concatenate([b[k] for b in got]), want[k])
    for p, (ex, it) in enumerate(zip(fresh, its)):
        lo, hi = process_block(len(rows), p, P)
        drawn = np.concatenate([it.local_batch_indices(0, i) for i in range(2)])
        drawn_rows = {int(np.searchsorted(np.cumsum(ex.counts), j, side="right")) for j in drawn}
        assert set(ex.tokenized_rows) == set(range(lo, hi)) | drawn_rows
        assert len(ex.tokenized_rows) < len(rows)


def test_a_block_dropped_whole_is_fine_but_a_dataset_dropped_whole_is_an_error(gpt2):
    rows = sft_rows(8)
    rows[4:] = [{"prompt": "p " * 30, "response": "r " * 30}] * 4  # process 1's block: every row too long
    full, full_report = sft_tokenize(rows, gpt2)
    shards = run_processes(2, lambda p, g: ShardedExamples(rows, functools.partial(sft_tokenize, tok=gpt2),
                                                           instances=sft_instances, process_index=p,
                                                           process_count=2, allgather=g))
    for ex in shards:
        assert ex.report == full_report and len(ex) == len(full)
        assert all(same_example(a, b) for a, b in zip(ex, full))
    long_rows = rows[4:]
    with pytest.raises(DataError):
        sft_tokenize(long_rows, gpt2)                           # one process: every row dropped
    errors = run_processes(2, lambda p, g: ShardedExamples(long_rows, functools.partial(sft_tokenize, tok=gpt2),
                                                           process_index=p, process_count=2, allgather=g))
    assert all(isinstance(e, DataError) and "were dropped by truncation" in str(e) for e in errors), errors


def test_a_failing_process_stops_every_process(gpt2):
    rows = sft_rows(8)
    rows[6] = {"nothing": "here"}                               # a malformed row in process 1's block
    errors = run_processes(2, lambda p, g: ShardedExamples(rows, functools.partial(sft_tokenize, tok=gpt2),
                                                           instances=sft_instances, process_index=p,
                                                           process_count=2, allgather=g))
    assert isinstance(errors[1], DataError)                     # its own error
    assert isinstance(errors[0], RuntimeError) and "[1]" in str(errors[0])  # the others do not wait forever


def test_tokenize_rows_with_one_process_is_the_plain_call():
    sentinel = (["a", "b"], object())
    assert tokenize_rows([1, 2], lambda rows: sentinel, process_index=0, process_count=1) is sentinel
    assert tokenize_rows([1, 2], lambda rows: sentinel, shard=False, process_index=1, process_count=2) is sentinel
    assert [process_block(10, p, 3) for p in range(3)] == [(0, 3), (3, 6), (6, 10)]
