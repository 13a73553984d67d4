"""SFT training throughput: jaxrlhf's jitted step vs a plain PyTorch/transformers loop, same machine,
same model (SmolLM2-135M-Instruct, dequantised from the same GGUF), same shapes, f32.

Both sides do the same work per step: forward over [B, T] tokens, cross-entropy on completion tokens,
backward, global-norm clipping to 1.0, AdamW. MFU is model FLOPs / time / the f32 matmul rate measured
in the same run (XLA's own 2048^3 matmul).

    python bench/bench_sft.py            # batch 8 x 256, 2 warm-up + 5 timed steps per side
    python bench/bench_sft.py --quick    # batch 2 x 64
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (jax_matmul_peak_gflops, machine, print_table, smollm2_gguf, step_flops, time_fn,  # noqa: E402
                    torch_matmul_peak_gflops, write_results)


def train_flops(cfg, B: int, T: int) -> float:
    """Forward+backward matmul FLOPs of one step (:func:`common.step_flops` for ``cfg``'s shapes)."""
    return step_flops(B, T, L=cfg.num_layers, D=cfg.hidden_size, H=cfg.num_heads, K=cfg.num_kv_heads,
                      d=cfg.head_dim, F=cfg.intermediate_size, V=cfg.vocab_size)


def bench_jax(B, T, warmup, repeats, tokens_np):
    import jax
    from flax import nnx

    from jaxrlhf.algos.sft import sft_step
    from jaxrlhf.config import OptimConfig, SFTConfig
    from jaxrlhf.models.hub import load_pretrained
    from jaxrlhf.sharding import MeshConfig, make_mesh, place_batch
    from jaxrlhf.train_state import init_sharded_state, jit_step, make_optimizer

    pre = load_pretrained("smollm2-135m-instruct")
    graphdef, params = nnx.split(pre.model)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    tx = make_optimizer(OptimConfig(lr=1e-5, max_grad_norm=1.0, schedule="constant"), 1000)
    state, sharding = init_sharded_state(params, tx, mesh)
    step = jit_step(sft_step, mesh, sharding, static_kwargs=dict(graphdef=graphdef, tx=tx, cfg=SFTConfig()))
    mask = np.ones((B, T), np.float32)
    mask[:, 0] = 0
    batch = place_batch({"tokens": tokens_np, "completion_mask": mask, "segment_ids": np.ones((B, T), np.int32),
                         "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}, mesh)
    holder = {"state": state}

    def one():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    stats = time_fn(one, warmup=warmup, repeats=repeats)
    return stats, pre.cfg


def bench_torch(B, T, warmup, repeats, tokens_np):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count())
    folder, fname = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    tokens = torch.tensor(tokens_np, dtype=torch.long)
    labels = tokens.clone()
    labels[:, 0] = -100

    def one():
        loss = model(input_ids=tokens, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return time_fn(one, warmup=warmup, repeats=repeats)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.seq_len, args.warmup, args.repeats = 2, 64, 1, 3
    B, T = args.batch, args.seq_len
    tokens = np.random.default_rng(0).integers(0, 49152, (B, T)).astype(np.int32)

    peak = jax_matmul_peak_gflops()
    jax_stats, cfg = bench_jax(B, T, args.warmup, args.repeats, tokens)
    flops = train_flops(cfg, B, T)
    rows = [{"impl": "jaxrlhf sft_step (jit)", "median_s": jax_stats["median_s"], "min_s": jax_stats["min_s"],
             "max_s": jax_stats["max_s"], "tokens_per_s": B * T / jax_stats["median_s"],
             "mfu": flops / jax_stats["median_s"] / (peak * 1e9)}]
    result = {"benchmark": "sft_step", "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised, f32)",
              "batch": B, "seq_len": T, "dtype": "float32", "warmup": args.warmup, "repeats": args.repeats,
              "train_flops_per_step": flops, "jax_matmul_peak_gflops": peak, "jax": jax_stats,
              "machine": machine()}
    if not args.skip_torch:
        torch_stats = bench_torch(B, T, args.warmup, args.repeats, tokens)
        result["torch"] = torch_stats
        result["torch_matmul_peak_gflops"] = torch_matmul_peak_gflops()
        rows.append({"impl": "PyTorch loop (transformers)", "median_s": torch_stats["median_s"],
                     "min_s": torch_stats["min_s"], "max_s": torch_stats["max_s"],
                     "tokens_per_s": B * T / torch_stats["median_s"],
                     "mfu": flops / torch_stats["median_s"] / (peak * 1e9)})
        result["speedup_vs_torch"] = torch_stats["median_s"] / jax_stats["median_s"]
    print(f"\nSFT step, SmolLM2-135M f32, batch {B} x {T} tokens, {os.cpu_count()} CPUs; "
          f"measured f32 matmul peak {peak:.1f} GFLOP/s; {flops / 1e12:.2f} TFLOP/step")
    print_table(rows, ["impl", "median_s", "min_s", "max_s", "tokens_per_s", "mfu"])
    if "speedup_vs_torch" in result:
        print(f"speed-up vs PyTorch loop: {result['speedup_vs_torch']:.2f}x (median step time ratio)")
    print(f"written {write_results('sft', result)}")


if __name__ == "__main__":
    main()
