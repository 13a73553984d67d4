"""The SFT run shared by the multi-process worker and the single-process reference."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.algos.sft import sft_step
from jaxrlhf.config import OptimConfig, SFTConfig
from jaxrlhf.data.batching import stack_examples
from jaxrlhf.data.iterator import BatchIterator
from jaxrlhf.data.tokenize import TruncationReport
from jaxrlhf.distributed import tokenize_rows
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.llama import Llama
from jaxrlhf.sharding import MeshConfig, make_mesh, place_batch
from jaxrlhf.train_state import init_sharded_state, jit_step, make_optimizer

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=64)
T = 16
N_ROWS = 40


def raw_rows(n=N_ROWS, seed=0):
    """Untokenised rows: a token list of 4 to T tokens each."""
    rng = np.random.default_rng(seed)
    return [{"ids": rng.integers(1, 64, int(rng.integers(4, T + 1))).tolist()} for _ in range(n)]


def tokenize(rows):
    """Rows -> (LM examples, report): rows shorter than 7 tokens are dropped (reason ``empty_response``),
    so the examples are not the rows one to one."""
    out, report = [], TruncationReport()
    for i, row in enumerate(rows):
        k = len(row["ids"])
        if k < 7:
            report.dropped.append((i, "empty_response"))
            continue
        report.kept += 1
        tokens = np.zeros(T, np.int32)
        tokens[:k] = row["ids"]
        mask = np.zeros(T, np.float32)
        mask[3:k] = 1
        out.append({"tokens": tokens, "completion_mask": mask, "segment_ids": (np.arange(T) < k).astype(np.int32),
                    "positions": np.where(np.arange(T) < k, np.arange(T), 0).astype(np.int32)})
    return out, report


def run_sft_steps(steps=3, batch_size=8):
    """Train a tiny Llama for ``steps`` steps on a mesh over all global devices; each process tokenises
    its own rows (``tokenize_rows``) and feeds its own slice of each global batch.

    Returns ``(losses, sum of squared parameters, reads)``; ``reads``: the rows this process tokenised,
    the example indices of its slices (per step) and those examples' rows."""
    graphdef, params = nnx.split(Llama(CFG, rngs=nnx.Rngs(0)))
    mesh = make_mesh(MeshConfig(data=-1, fsdp=2, tensor=1))
    tx = make_optimizer(OptimConfig(lr=1e-2, schedule="constant"), 100)
    state, sharding = init_sharded_state(params, tx, mesh)
    step = jit_step(sft_step, mesh, sharding, static_kwargs=dict(graphdef=graphdef, tx=tx, cfg=SFTConfig()))
    examples, _ = tokenize_rows(raw_rows(), tokenize)
    it = BatchIterator(examples, batch_size, stack_examples, seed=0,
                       process_index=jax.process_index(), process_count=jax.process_count())
    losses, slices = [], []
    for _ in range(steps):
        epoch, index = it.get_state()["epoch"], it.get_state()["index"]
        epoch, index = (epoch + 1, 0) if index >= len(it) else (epoch, index)  # the next batch opens an epoch
        slices.append(it.local_batch_indices(epoch, index).tolist())
        state, metrics = step(state, place_batch(next(it), mesh))
        losses.append(float(metrics["loss"]))
    checksum = jax.jit(lambda p: sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(p)),
                       out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    with jax.set_mesh(mesh):
        total = float(checksum(state.params))
    counts = getattr(examples, "counts", None)
    if counts is None:  # one process: the plain list, every row tokenised
        kept = [i for i, r in enumerate(raw_rows()) if len(r["ids"]) >= 7]
        tokenized, row_of = list(range(N_ROWS)), lambda j: kept[j]
    else:
        tokenized = examples.tokenized_rows
        row_of = lambda j: int(np.searchsorted(np.cumsum(counts), j, side="right"))  # noqa: E731
    reads = {"tokenized_rows": tokenized, "slices": slices,
             "slice_rows": sorted({row_of(j) for s in slices for j in s})}
    return losses, total, reads
