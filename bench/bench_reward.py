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

import os
import sys
import tempfile


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dpo import StepTimer, dequantized, make_batch, summarize  # noqa: E402
from common import SMOLLM2_135M, pair_step_benchmark, smollm2_gguf, step_flops, time_fn  # noqa: E402


def bench_jax(batch_np, warmup, repeats):
    import jax
    from flax import nnx

    from jaxrlhf.algos.reward import reward_step
    from jaxrlhf.config import OptimConfig, RewardConfig
    from jaxrlhf.models.hub import load_pretrained
    from jaxrlhf.models.reward_model import RewardModel, split_reward_model
    from jaxrlhf.sharding import MeshConfig, make_mesh, place_batch
    from jaxrlhf.train_state import init_sharded_state, jit_step, make_optimizer

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
    pair_step_benchmark(
        name="reward", title="Reward-model step", trl_label="TRL 1.16 RewardTrainer",
        flops=lambda B, T: step_flops(2 * B, T, lm_head=False, **SMOLLM2_135M),
        meta={"benchmark": "reward_step", "model": "SmolLM2-135M-Instruct backbone + scalar head (f32)",
              "work_per_step": "fwd+bwd over 2B sequences of T tokens, Bradley-Terry loss, AdamW, clip 1.0"},
        run_jax=lambda B, T, w, r: bench_jax(make_batch(B, T, 49152), w, r),
        run_torch=lambda B, T, w, r: bench_torch(make_batch(B, T, 49152), w, r),
        run_trl=lambda B, T, w, r: bench_trl(make_batch(B, T, 49152), w, r))


if __name__ == "__main__":
    main()
