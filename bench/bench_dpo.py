"""DPO training throughput: jaxrlhf's jitted ``dpo_step`` vs TRL's ``DPOTrainer`` vs a plain PyTorch loop.

Same machine, same model (SmolLM2-135M-Instruct dequantised from the same GGUF, f32), same shapes:
``B`` preference pairs of ``T`` tokens each (prompt = first ``T/2`` tokens, completion = the rest), policy
+ frozen reference (computed in the step), sigmoid DPO loss with beta 0.1, global-norm clipping 1.0, AdamW.
Per step every implementation runs the policy forward+backward over ``2B`` sequences and the reference
forward over ``2B`` sequences.

* jaxrlhf: ``jit_step(dpo_step)`` with the reference params as the extra argument, batch ``[B, 2, T]``.
* TRL 1.16 ``DPOTrainer`` (``loss_type=["sigmoid"]``, reference = a frozen copy TRL makes itself, no
  precompute); step times from a ``TrainerCallback`` (``on_step_begin`` -> ``on_step_end``), so data
  loading and collation inside the step are counted, as a user would see them.
* plain PyTorch: the same step written out (concatenated chosen/rejected forward, log-softmax gather,
  reference under ``no_grad``, loss, backward, clip, AdamW).

    python bench/bench_dpo.py            # 8 pairs x 256 tokens, 1 warm-up + 3 timed steps per side
    python bench/bench_dpo.py --quick    # 2 pairs x 64 tokens
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SMOLLM2_135M, pair_step_benchmark, smollm2_gguf, step_flops, time_fn  # noqa: E402

BETA = 0.1


def make_batch(B: int, T: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (B, 2, T)).astype(np.int32)
    tokens[:, 1, : T // 2] = tokens[:, 0, : T // 2]  # shared prompt
    mask = np.zeros((B, 2, T), np.float32)
    mask[:, :, T // 2:] = 1.0
    return {"tokens": tokens, "completion_mask": mask, "segment_ids": np.ones((B, 2, T), np.int32),
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, 2, T)).copy()}


def bench_jax(batch_np, warmup, repeats):
    import jax
    from flax import nnx

    from jaxrlhf.algos.dpo import dpo_extra, dpo_step
    from jaxrlhf.config import DPOConfig, OptimConfig
    from jaxrlhf.models.hub import load_pretrained
    from jaxrlhf.sharding import MeshConfig, make_mesh, place_batch
    from jaxrlhf.train_state import init_sharded_state, jit_step, make_optimizer

    pre = load_pretrained("smollm2-135m-instruct")
    graphdef, params = nnx.split(pre.model)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    tx = make_optimizer(OptimConfig(lr=1e-6, max_grad_norm=1.0, schedule="constant"), 1000)
    ref = jax.tree.map(lambda x: x.copy(), params)
    cfg = DPOConfig(beta=BETA)
    state, sharding = init_sharded_state(params, tx, mesh, dpo_extra(cfg))
    ref = jax.device_put(ref, sharding.params)
    step = jit_step(dpo_step, mesh, sharding, static_kwargs=dict(graphdef=graphdef, tx=tx, cfg=cfg))
    batch = place_batch(batch_np, mesh)
    holder = {"state": state}

    def one():
        holder["state"], metrics = step(holder["state"], batch, ref)
        jax.block_until_ready(metrics["loss"])

    return time_fn(one, warmup=warmup, repeats=repeats)


def load_torch_model():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count())
    folder, fname = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    return dequantized(model), tok


def dequantized(model):
    """transformers dequantises GGUF weights to float32 at load but still flags the model as quantized,
    and ``Trainer`` then refuses to train it; clear the flags (the weights are plain f32 tensors)."""
    model.is_quantized = False
    model.hf_quantizer = None
    return model


def bench_torch(batch_np, warmup, repeats):
    import copy

    import torch
    import torch.nn.functional as F

    model, _ = load_torch_model()
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    B, _, T = batch_np["tokens"].shape
    ids = torch.tensor(batch_np["tokens"], dtype=torch.long).permute(1, 0, 2).reshape(2 * B, T)  # chosen; rejected
    mask = torch.tensor(batch_np["completion_mask"]).permute(1, 0, 2).reshape(2 * B, T)[:, 1:]

    def seq_logps(m, x):
        logits = m(input_ids=x).logits[:, :-1].float()
        lp = torch.gather(F.log_softmax(logits, -1), 2, x[:, 1:, None])[..., 0]
        return (lp * mask).sum(-1)

    def one():
        pol = seq_logps(model, ids)
        with torch.no_grad():
            r = seq_logps(ref, ids)
        h = BETA * ((pol[:B] - r[:B]) - (pol[B:] - r[B:]))
        loss = -F.logsigmoid(h).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return time_fn(one, warmup=warmup, repeats=repeats)


class StepTimer:
    """A ``transformers.TrainerCallback`` recording wall time from step begin to step end."""

    def __new__(cls):
        import time

        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.times, self._t = [], None

            def on_step_begin(self, args, state, control, **kw):
                self._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                self.times.append(time.perf_counter() - self._t)

        return _Timer()


def summarize(times, warmup):
    import statistics

    timed = times[warmup:]
    return {"median_s": statistics.median(timed), "min_s": min(timed), "max_s": max(timed), "times_s": timed,
            "warmup_times_s": times[:warmup]}


def bench_trl(B, T, warmup, repeats):
    import datasets
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    import copy

    model, tok = load_torch_model()
    # TRL would rebuild the reference from `model.name_or_path`, which needs the gguf_file argument; give it the
    # same frozen copy the plain loop uses.
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    words = [" the", " of", " and", " to", " in", " is", " that", " it"]
    rng = np.random.default_rng(0)
    text = lambda n: "".join(rng.choice(words, n))  # noqa: E731  (each word is one token)
    rows = [{"prompt": text(T // 2), "chosen": text(T), "rejected": text(T)} for _ in range(B * (warmup + repeats))]
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        args = TRLDPOConfig(output_dir=out, per_device_train_batch_size=B, gradient_accumulation_steps=1,
                            max_steps=warmup + repeats, learning_rate=1e-6, max_grad_norm=1.0, beta=BETA,
                            loss_type=["sigmoid"], max_length=T, truncation_mode="keep_start",
                            precompute_ref_log_probs=False, save_strategy="no", report_to=[], logging_steps=10_000,
                            use_cpu=True, bf16=False, dataloader_num_workers=0, disable_tqdm=True,
                            lr_scheduler_type="constant", weight_decay=0.0, seed=0)
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok, callbacks=[timer])
        first = trainer.get_train_dataloader().collate_fn([trainer.train_dataset[i] for i in range(B)])
        shape = tuple(first["input_ids"].shape)
        trainer.train()
    return summarize(timer.times, warmup), shape


def main():
    def flops(B, T):  # policy forward+backward and reference forward over 2B sequences
        return step_flops(2 * B, T, **SMOLLM2_135M) + step_flops(2 * B, T, backward=False, **SMOLLM2_135M)

    pair_step_benchmark(
        name="dpo", title="DPO step (policy + frozen reference)", trl_label="TRL 1.16 DPOTrainer", flops=flops,
        meta={"benchmark": "dpo_step", "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised, f32)",
              "work_per_step": "policy fwd+bwd and reference fwd over 2B sequences of T tokens; AdamW; clip 1.0"},
        run_jax=lambda B, T, w, r: bench_jax(make_batch(B, T, 49152), w, r),
        run_torch=lambda B, T, w, r: bench_torch(make_batch(B, T, 49152), w, r),
        run_trl=bench_trl)


if __name__ == "__main__":
    main()
