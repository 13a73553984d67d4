"""One process of a 2-process ``jax.distributed`` run on CPU (launched by tests/test_multihost.py).

It joins the group the way the ``jaxrlhf`` command does (:func:`jaxrlhf.distributed.initialize_from_env`
reading ``JAXRLHF_COORDINATOR_ADDRESS`` / ``JAXRLHF_NUM_PROCESSES`` / ``JAXRLHF_PROCESS_ID``). Each process
owns 4 of the 8 global CPU devices, tokenises only its own rows and feeds only its slice of every global
batch; the jitted SFT step is the same code as on one host. Each process prints its per-step losses, a
parameter checksum, the rows it read and a cross-process gather (``host_copy``) as JSON.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main() -> None:
    from jaxrlhf.distributed import host_copy, initialize_from_env

    assert initialize_from_env()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from multihost_common import run_sft_steps

    losses, checksum, reads = run_sft_steps()
    # An array sharded over all 8 devices of both processes, copied whole to each host.
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
    local = np.arange(4, dtype=np.float32) + 4 * jax.process_index()
    spread = jax.make_array_from_process_local_data(
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")), local)
    print("RESULT " + json.dumps({"losses": losses, "checksum": checksum, "reads": reads,
                                  "process": jax.process_index(), "devices": jax.device_count(),
                                  "local": jax.local_device_count(), "gathered": host_copy(spread).tolist()}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
