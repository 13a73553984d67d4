"""One process of a 2-process ``jax.distributed`` run on CPU (launched by tests/test_multihost.py).

Each process owns 4 of the 8 global CPU devices and feeds only its slice of every global batch; the
jitted SFT step is the same code as on one host. Process 0 prints the per-step losses and a parameter
checksum as JSON.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(port: int, process_id: int) -> None:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id, initialization_timeout=120)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from multihost_common import run_sft_steps

    losses, checksum = run_sft_steps()
    if jax.process_index() == 0:
        print("RESULT " + json.dumps({"losses": losses, "checksum": checksum,
                                      "devices": jax.device_count(), "local": jax.local_device_count()}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
