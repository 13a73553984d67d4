"""The SFT run shared by the multi-process worker and the single-process reference."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.algos.sft import sft_step
from jaxrlhf.config import OptimConfig, SFTConfig
from jaxrlhf.data.iterator import BatchIterator
from jaxrlhf.data.batching import stack_examples
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.llama import Llama
from jaxrlhf.sharding import MeshConfig, make_mesh
from jaxrlhf.sharding import place_batch
from jaxrlhf.train_state import init_sharded_state, jit_step, make_optimizer

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=64)


def rows(n=32, T=16, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(6, T + 1))
        tokens = np.zeros(T, np.int32)
        tokens[:k] = rng.integers(1, 64, k)
        mask = np.zeros(T, np.float32)
        mask[3:k] = 1
        out.append({"tokens": tokens, "completion_mask": mask, "segment_ids": (np.arange(T) < k).astype(np.int32),
                    "positions": np.where(np.arange(T) < k, np.arange(T), 0).astype(np.int32)})
    return out


def run_sft_steps(steps=3, batch_size=8):
    """Train a tiny Llama for ``steps`` steps on a mesh over all global devices; each process feeds its
    own slice of each global batch. Returns (losses, sum of squared parameters)."""
    graphdef, params = nnx.split(Llama(CFG, rngs=nnx.Rngs(0)))
    mesh = make_mesh(MeshConfig(data=-1, fsdp=2, tensor=1))
    tx = make_optimizer(OptimConfig(lr=1e-2, schedule="constant"), 100)
    state, sharding = init_sharded_state(params, tx, mesh)
    step = jit_step(sft_step, mesh, sharding, static_kwargs=dict(graphdef=graphdef, tx=tx, cfg=SFTConfig()))
    it = BatchIterator(rows(), batch_size, stack_examples, seed=0,
                       process_index=jax.process_index(), process_count=jax.process_count())
    losses = []
    for _ in range(steps):
        state, metrics = step(state, place_batch(next(it), mesh))
        losses.append(float(metrics["loss"]))
    checksum = jax.jit(lambda p: sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(p)),
                       out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    with jax.set_mesh(mesh):
        total = float(checksum(state.params))
    return losses, total
