"""Reward-model training throughput: jaxrlhf's jitted ``reward_step`` vs TRL's ``RewardTrainer`` vs a
plain PyTorch loop.

Same machine, same backbone (SmolLM2-135M-Instruct dequantised from the same GGUF, f32) with a fresh
scalar head, same shapes: ``B`` preference pairs of ``T`` tokens each, pairwise Bradley–Terry loss,
global-norm clipping 1.0, AdamW. Per step every implementation runs forward+backward over ``2B``
sequences and reads the reward at the last token.

* jaxrlhf: ``jit_step(reward_step)`` on a ``[B, 2, T]`` batch (``RewardModel`` = backbone + ``ScalarHead``).
* TRL 1.16 ``RewardTrainer`` on a pre-tokenised dataset (``chosen_ids``/``rejected_ids`` of exactly ``T``
  tokens) with ``AutoModelForSequenceClassification(num_labels=1)``; step times from a callback.
* plain PyTorch: ``LlamaForSequenceClassification`` forward on the ``2B`` rows, ``-logsigmoid(r_c - r_r)``,
  backward, clip, AdamW.

    python bench/bench_reward.py            # 8 pairs x 256 tokens, 1 warm-up + 3 timed steps per side
    python bench/bench_reward.py --quick    # 2 pairs x 64 tokens
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dpo import StepTimer, dequantized, make_batch, summarize  # noqa: E402
from common import (SMOLLM2_135M, add_peak_bound, machine, print_table, smollm2_gguf, step_flops, time_fn,  # noqa: E402
                    write_results)


def bench_jax(batch_np, warmup, repeats):
    import jax
    from flax import nnx

    from jaxrlhf.algos.reward import reward_step
    from jaxrlhf.config import OptimConfig, RewardConfig
    from jaxrlhf.models.hub import load_pretrained
    from jaxrlhf.models.reward_model import RewardModel, split_reward_model
    from jaxrlhf.sharding import MeshConfig, make_mesh
    from jaxrlhf.train_state import init_sharded_state, jit_step, make_optimizer, place_batch

    pre = load_pretrained("smollm2-135m-instruct")
    graphdef, params, stats = split_reward_model(RewardModel(pre.model, rngs=nnx.Rngs(0)))
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    tx = make_optimizer(OptimConfig(lr=1e-5, max_grad_norm=1.0, schedule="constant"), 1000)
    state, sharding = init_sharded_state(params, tx, mesh, extra=stats)
    step = jit_step(reward_step, mesh, sharding, static_kwargs=dict(graphdef=graphdef, tx=tx, cfg=RewardConfig()))
    batch = place_batch(batch_np, mesh)
    holder = {"state": state}

    def one():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    return time_fn(one, warmup=warmup, repeats=repeats)


def load_classifier():
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(os.cpu_count())
    folder, fname = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForSequenceClassification.from_pretrained(folder, gguf_file=fname, num_labels=1,
                                                               dtype=torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    return dequantized(model), tok


def bench_torch(batch_np, warmup, repeats):
    import torch
    import torch.nn.functional as F

    model, _ = load_classifier()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    B, _, T = batch_np["tokens"].shape
    ids = torch.tensor(batch_np["tokens"], dtype=torch.long).permute(1, 0, 2).reshape(2 * B, T)
    ids[ids == model.config.pad_token_id] = 3  # no pad inside: the reward is read at the last token
    attn = torch.ones_like(ids)

    def one():
        r = model(input_ids=ids, attention_mask=attn).logits[:, 0]
        loss = -F.logsigmoid(r[:B] - r[B:]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return time_fn(one, warmup=warmup, repeats=repeats)


def bench_trl(batch_np, warmup, repeats):
    import datasets
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    model, tok = load_classifier()
    B, _, T = batch_np["tokens"].shape
    tokens = batch_np["tokens"].copy()
    tokens[tokens == tok.pad_token_id] = 3
    rows = [{"chosen_ids": tokens[i % B, 0].tolist(), "rejected_ids": tokens[i % B, 1].tolist()}
            for i in range(B * (warmup + repeats))]
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        args = TRLRewardConfig(output_dir=out, per_device_train_batch_size=B, gradient_accumulation_steps=1,
                               max_steps=warmup + repeats, learning_rate=1e-5, max_grad_norm=1.0, max_length=T,
                               save_strategy="no", report_to=[], logging_steps=10_000, use_cpu=True, bf16=False,
                               dataloader_num_workers=0, disable_tqdm=True, lr_scheduler_type="constant",
                               weight_decay=0.0, seed=0)
        trainer = RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                processing_class=tok, callbacks=[timer])
        first = trainer.get_train_dataloader().collate_fn([trainer.train_dataset[i] for i in range(B)])
        shape = tuple(first["input_ids"].shape)
        trainer.train()
    return summarize(timer.times, warmup), shape


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 pairs x 64 tokens")
    ap.add_argument("--skip", default="", help="comma list of: trl,torch")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.seq_len = 2, 64
    B, T = args.batch, args.seq_len
    skip = set(filter(None, args.skip.split(",")))
    batch = make_batch(B, T, 49152)
    result = {"benchmark": "reward_step", "model": "SmolLM2-135M-Instruct backbone + scalar head (f32)",
              "pairs_per_step": B, "seq_len": T, "dtype": "float32", "warmup": args.warmup, "repeats": args.repeats,
              "work_per_step": "fwd+bwd over 2B sequences of T tokens, Bradley-Terry loss, AdamW, clip 1.0",
              "machine": machine()}
    rows = []

    def add(name, key, stats):
        result[key] = stats
        rows.append({"impl": name, "median_s": stats["median_s"], "min_s": stats["min_s"], "max_s": stats["max_s"],
                     "pairs_per_s": B / stats["median_s"]})
        print(f"{name}: median {stats['median_s']:.3f} s/step over {stats['times_s']}", flush=True)

    add("jaxrlhf reward_step (jit)", "jax", bench_jax(batch, args.warmup, args.repeats))
    if "torch" not in skip:
        add("plain PyTorch loop", "torch", bench_torch(batch, args.warmup, args.repeats))
    if "trl" not in skip:
        stats, shape = bench_trl(batch, args.warmup, args.repeats)
        result["trl_input_ids_shape"] = shape
        add("TRL 1.16 RewardTrainer", "trl", stats)
    for r in rows:
        r["speed_vs_jaxrlhf"] = result["jax"]["median_s"] / r["median_s"]
    result["jax_speedup"] = {k: result[k]["median_s"] / result["jax"]["median_s"] for k in ("torch", "trl") if k in result}
    result["loadavg_at_end"] = os.getloadavg()
    peak_line = add_peak_bound(result, step_flops(2 * B, T, lm_head=False, **SMOLLM2_135M))
    print(f"\nReward-model step, SmolLM2-135M f32, {B} pairs x {T} tokens, {os.cpu_count()} CPUs, "
          f"load average {result['machine'].get('loadavg_at_start')} -> {result['loadavg_at_end']}")
    print_table(rows, ["impl", "median_s", "min_s", "max_s", "pairs_per_s", "speed_vs_jaxrlhf"])
    for k, v in result["jax_speedup"].items():
        print(f"jaxrlhf speed-up vs {k}: {v:.2f}x (median step time ratio)")
    print(peak_line)
    print(f"written {write_results('reward' + ('_quick' if args.quick else ''), result)}")


if __name__ == "__main__":
    main()
