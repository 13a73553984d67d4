"""Multi-host: two CPU processes under ``jax.distributed`` (gloo collectives) run the same SFT steps as
one process with the same 8 devices, each feeding only its slice of the global batch."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process():
    if jax.device_count() != 8:
        pytest.skip("needs the 8 fake CPU devices of conftest")
    sys.path.insert(0, str(HERE))
    from multihost_common import run_sft_steps

    ref_losses, ref_checksum = run_sft_steps()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, str(HERE / "multihost_worker.py"), str(port), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    line = next(x for x in outs[0][0].splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["devices"] == 8 and result["local"] == 4
    np.testing.assert_allclose(result["losses"], ref_losses, rtol=1e-5)
    np.testing.assert_allclose(result["checksum"], ref_checksum, rtol=1e-5)
