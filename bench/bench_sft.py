"""SFT training throughput: jaxrlhf's jitted step vs a plain PyTorch/transformers loop, same machine,
same model (SmolLM2-135M-Instruct, dequantised from the same GGUF), same shapes, same precision.

Both sides do the same work per step: forward over [B, T] tokens, cross-entropy on completion tokens,
backward, global-norm clipping to 1.0, AdamW, f32 master weights and optimiser state.

* ``--dtype float32``: both sides in f32.
* ``--dtype bfloat16``: jaxrlhf's mixed-precision policy (``model.dtype=bfloat16``: bf16 matmuls with f32
  accumulation, f32 logits/loss/masters; ``model.scan_unroll=0`` unless ``--scan-unroll`` says otherwise)
  against PyTorch AMP (``torch.autocast("cpu", bfloat16)`` around forward + loss, f32 weights).

The sides run alternately (all warmed up, then rounds of one step each), so load drift on the shared
machine hits both; the PyTorch side runs in a child process with glibc's default allocator
(``common.RemoteSide``), jaxrlhf in this one with ``jaxrlhf.host_memory.reuse_host_memory``. MFU = model FLOPs / step time / the matmul peak measured in the same run
(``common.matmul_peak_gflops(dtype)``: XLA at the model's [2048x576].[576x1536] projection shape).

    python bench/bench_sft.py [--dtype bfloat16]          # batch 8 x 256, 2 warm-up + 5 timed rounds
    python bench/bench_sft.py --quick                     # batch 2 x 64
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (RemoteSide, machine, matmul_peak_gflops, print_table, smollm2_gguf, step_flops,  # noqa: E402
                    time_alternating, torch_autocast, write_results)


def train_flops(cfg, B: int, T: int) -> float:
    """Forward+backward matmul FLOPs of one step (:func:`common.step_flops` for ``cfg``'s shapes)."""
    return step_flops(B, T, L=cfg.num_layers, D=cfg.hidden_size, H=cfg.num_heads, K=cfg.num_kv_heads,
                      d=cfg.head_dim, F=cfg.intermediate_size, V=cfg.vocab_size)


def setup_jax(B, T, tokens_np, dtype: str, scan_unroll: int):
    """``(one_step, model_cfg)``: the jitted SFT step on a placed batch."""
    import jax
    from flax import nnx

    from jaxrlhf.algos.sft import sft_step
    from jaxrlhf.config import OptimConfig, SFTConfig
    from jaxrlhf.models.hub import load_pretrained
    from jaxrlhf.sharding import MeshConfig, make_mesh, place_batch
    from jaxrlhf.train_state import init_sharded_state, jit_step, make_optimizer

    pre = load_pretrained("smollm2-135m-instruct")
    pre.model.cfg = pre.cfg.replace(dtype=dtype, scan_unroll=scan_unroll)
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

    return one, pre.model.cfg


def setup_torch(tokens_np, dtype: str):
    """One step of the plain PyTorch loop (f32 weights; autocast bf16 around forward + loss for bf16)."""
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
        with torch_autocast(dtype):
            loss = model(input_ids=tokens, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return one


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--scan-unroll", type=int, default=None,
                    help="model.scan_unroll (default: 0 = fully unrolled for bf16, 1 = rolled scan for f32)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.seq_len, args.warmup, args.repeats = 2, 64, 1, 3
    unroll = args.scan_unroll if args.scan_unroll is not None else (0 if args.dtype == "bfloat16" else 1)
    B, T = args.batch, args.seq_len
    tokens = np.random.default_rng(0).integers(0, 49152, (B, T)).astype(np.int32)

    jax_one, cfg = setup_jax(B, T, tokens, args.dtype, unroll)
    sides = {"jax": jax_one}
    if not args.skip_torch:
        sides["torch"] = RemoteSide(__file__, "setup_torch", tokens, args.dtype)  # child process, default malloc
    try:
        stats = time_alternating(sides, warmup=args.warmup, repeats=args.repeats)
    finally:
        if "torch" in sides:
            sides["torch"].close()
    peak = matmul_peak_gflops(args.dtype)
    flops = train_flops(cfg, B, T)
    labels = {"jax": f"jaxrlhf sft_step (jit, {args.dtype})",
              "torch": "PyTorch loop (transformers" + (", autocast bf16)" if args.dtype == "bfloat16" else ", f32)")}
    rows = [{"impl": labels[k], "median_s": v["median_s"], "min_s": v["min_s"], "max_s": v["max_s"],
             "tokens_per_s": B * T / v["median_s"], "frac_of_peak": flops / v["median_s"] / (peak * 1e9)}
            for k, v in stats.items()]
    result = {"benchmark": "sft_step", "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to f32 masters)",
              "batch": B, "seq_len": T, "dtype": args.dtype, "scan_unroll": unroll, "warmup": args.warmup,
              "repeats": args.repeats, "alternating": True, "train_flops_per_step": flops,
              "matmul_peak_gflops": peak, "matmul_peak_shape": [2048, 576, 1536], **stats, "machine": machine(),
              "loadavg_at_end": os.getloadavg()}
    if "torch" in stats:
        result["speedup_vs_torch"] = stats["torch"]["median_s"] / stats["jax"]["median_s"]
    print(f"\nSFT step, SmolLM2-135M {args.dtype}, batch {B} x {T} tokens, {os.cpu_count()} CPUs; "
          f"measured {args.dtype} matmul peak {peak:.1f} GFLOP/s; {flops / 1e12:.2f} TFLOP/step")
    print_table(rows, ["impl", "median_s", "min_s", "max_s", "tokens_per_s", "frac_of_peak"])
    if "speedup_vs_torch" in result:
        print(f"speed-up vs PyTorch loop: {result['speedup_vs_torch']:.2f}x (median step time ratio)")
    name = "sft" + ("_bf16" if args.dtype == "bfloat16" else "") + ("_quick" if args.quick else "")
    print(f"written {write_results(name, result)}")


if __name__ == "__main__":
    main()
