"""Reward-model training throughput: jaxrlhf's jitted ``reward_step`` vs TRL's ``RewardTrainer`` vs a
plain PyTorch loop.

Same machine, same backbone (SmolLM2-135M-Instruct dequantised from the same GGUF, f32 master weights)
with a fresh scalar head, same precision (``--dtype``), same shapes: ``B`` preference pairs of ``T``
tokens each, pairwise Bradley–Terry loss, global-norm clipping 1.0, AdamW. Per step every implementation
runs forward+backward over ``2B`` sequences and reads the reward at the last token.

* jaxrlhf: ``jit_step(reward_step)`` on a ``[B, 2, T]`` batch (``RewardModel`` = backbone + ``ScalarHead``,
  built after setting the backbone's ``cfg``); ``--dtype bfloat16`` = the mixed-precision policy (bf16
  matmuls with f32 accumulation, f32 masters/rewards/loss; ``model.scan_unroll=0`` unless
  ``--scan-unroll`` says otherwise).
* TRL 1.16 ``RewardTrainer`` on a pre-tokenised dataset (``chosen_ids``/``rejected_ids`` of exactly ``T``
  tokens) with ``AutoModelForSequenceClassification(num_labels=1)``; ``bf16=True`` for ``--dtype
  bfloat16`` (accelerate's CPU autocast). Its own ``train()`` loop is driven one step per call by
  :class:`common.TrainerStepper` (worker thread parked at every ``on_step_end``), so it interleaves with
  the other sides; each call = batch fetch + collation + step (callback-only times are kept as
  ``callback_step_times_s``).
* plain PyTorch: ``LlamaForSequenceClassification`` forward on the ``2B`` rows, ``-logsigmoid(r_c - r_r)``,
  backward, clip, AdamW; f32 weights, forward + loss under ``torch.autocast("cpu", bfloat16)`` for bf16.

The sides run alternately in one process (each warmed up, then rounds of one timed step per side).
Reported per side: median/min/max step time, fraction of the XLA matmul peak measured in the same run at
the same precision (``common.matmul_peak_gflops``), speed-up vs jaxrlhf.

    python bench/bench_reward.py                      # f32, 8 pairs x 256 tokens, 1 warm-up + 3 rounds -> results/reward.json
    python bench/bench_reward.py --dtype bfloat16     # -> results/reward_bf16.json
    python bench/bench_reward.py --quick              # 2 pairs x 64 tokens -> results/reward[_bf16]_quick.json
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dpo import dequantized, make_batch  # noqa: E402
from common import (SMOLLM2_135M, TrainerStepper, pair_step_benchmark, smollm2_gguf, step_flops,  # noqa: E402
                    torch_autocast)


def make_jax(batch_np, dtype: str, scan_unroll: int):
    """One jitted reward-model step (state carried between calls) at ``dtype``/``scan_unroll``."""
    import jax
    from flax import nnx

    from jaxrlhf.algos.reward import reward_step
    from jaxrlhf.config import OptimConfig, RewardConfig
    from jaxrlhf.models.hub import load_pretrained
    from jaxrlhf.models.reward_model import RewardModel, split_reward_model
    from jaxrlhf.sharding import MeshConfig, make_mesh, place_batch
    from jaxrlhf.train_state import init_sharded_state, jit_step, make_optimizer

    pre = load_pretrained("smollm2-135m-instruct", dtype=dtype)
    pre.model.cfg = pre.cfg.replace(dtype=dtype, scan_unroll=scan_unroll)  # before the head is attached
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

    return one


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


def make_torch(batch_np, dtype: str):
    """One step of the plain PyTorch loop (f32 weights; autocast bf16 around forward + loss for bf16)."""
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
        with torch_autocast(dtype):
            r = model(input_ids=ids, attention_mask=attn).logits[:, 0].float()
            loss = -F.logsigmoid(r[:B] - r[B:]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return one


def make_trl(batch_np, dtype: str, steps: int):
    """``(TrainerStepper, input_ids_shape)``: TRL's RewardTrainer with ``max_steps=steps``, one step per call."""
    import datasets
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    model, tok = load_classifier()
    B, _, T = batch_np["tokens"].shape
    tokens = batch_np["tokens"].copy()
    tokens[tokens == tok.pad_token_id] = 3
    rows = [{"chosen_ids": tokens[i % B, 0].tolist(), "rejected_ids": tokens[i % B, 1].tolist()}
            for i in range(B * steps)]
    out = tempfile.mkdtemp(prefix="bench_reward_trl_")  # nothing is saved (save_strategy="no")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    args = TRLRewardConfig(output_dir=out, per_device_train_batch_size=B, gradient_accumulation_steps=1,
                           max_steps=steps, learning_rate=1e-5, max_grad_norm=1.0, max_length=T,
                           save_strategy="no", report_to=[], logging_steps=10_000, use_cpu=True,
                           bf16=(dtype == "bfloat16"), dataloader_num_workers=0, disable_tqdm=True,
                           lr_scheduler_type="constant", weight_decay=0.0, seed=0)
    trainer = RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                            processing_class=tok)
    first = trainer.get_train_dataloader().collate_fn([trainer.train_dataset[i] for i in range(B)])
    return TrainerStepper(trainer), tuple(first["input_ids"].shape)


def torch_side(B: int, T: int, dtype: str):
    """The plain PyTorch side (built in a child process by ``common.RemoteSide``)."""
    return make_torch(make_batch(B, T, 49152), dtype)


def trl_side(B: int, T: int, dtype: str, steps: int):
    """The TRL side (built in a child process by ``common.RemoteSide``): ``(TrainerStepper, input shape)``."""
    return make_trl(make_batch(B, T, 49152), dtype, steps)


def main():
    pair_step_benchmark(
        name="reward", title="Reward-model step", trl_label="TRL 1.16 RewardTrainer",
        flops=lambda B, T: step_flops(2 * B, T, lm_head=False, **SMOLLM2_135M),
        meta={"benchmark": "reward_step", "model": "SmolLM2-135M-Instruct backbone + scalar head (f32 masters)",
              "work_per_step": "fwd+bwd over 2B sequences of T tokens, Bradley-Terry loss, AdamW, clip 1.0",
              "trl_timing": "TrainerStepper: one step of RewardTrainer's own train() loop per call, interleaved"},
        make_jax=lambda B, T, dtype, unroll: make_jax(make_batch(B, T, 49152), dtype, unroll),
        make_torch=torch_side,
        make_trl=trl_side)


if __name__ == "__main__":
    main()
