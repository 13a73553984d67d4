"""DPO training throughput: jaxrlhf's jitted ``dpo_step`` vs TRL's ``DPOTrainer`` vs a plain PyTorch loop.

Same machine, same model (SmolLM2-135M-Instruct dequantised from the same GGUF, f32 master weights), same
precision (``--dtype``), same shapes: ``B`` preference pairs of ``T`` tokens each (prompt = first ``T/2``
tokens, completion = the rest), policy + frozen reference (computed in the step), sigmoid DPO loss with
beta 0.1, global-norm clipping 1.0, AdamW. Per step every implementation runs the policy forward+backward
over ``2B`` sequences and the reference forward over ``2B`` sequences.

* jaxrlhf: ``jit_step(dpo_step)`` with the reference params as the extra argument, batch ``[B, 2, T]``;
  ``--dtype bfloat16`` = the mixed-precision policy (``model.dtype=bfloat16``: bf16 matmuls with f32
  accumulation, f32 masters/logits/loss; ``model.scan_unroll=0`` unless ``--scan-unroll`` says otherwise).
* TRL 1.16 ``DPOTrainer`` (``loss_type=["sigmoid"]``, reference = the same frozen copy the plain loop uses,
  no precompute; ``bf16=True`` for ``--dtype bfloat16``, i.e. accelerate's CPU autocast). TRL runs its own
  ``train()`` loop; :class:`common.TrainerStepper` runs it in a worker thread and parks it at the end of
  every step, so each call is exactly one step of TRL's own loop (batch fetch + collation + step), which
  can be interleaved with the other sides. The callback's own ``on_step_begin -> on_step_end`` times are
  recorded too (``callback_step_times_s``).
* plain PyTorch: the same step written out (concatenated chosen/rejected forward, log-softmax gather,
  reference under ``no_grad``, loss, backward, clip, AdamW); f32 weights, forward + loss under
  ``torch.autocast("cpu", bfloat16)`` for ``--dtype bfloat16``.

The sides run alternately in one process (each warmed up, then rounds of one timed step per side), so
load drift on the shared machine hits all of them. Reported per side: median/min/max step time, fraction
of the XLA matmul peak measured in the same run at the same precision (``common.matmul_peak_gflops``),
speed-up vs jaxrlhf.

    python bench/bench_dpo.py                      # f32, 8 pairs x 256 tokens, 1 warm-up + 3 rounds -> results/dpo.json
    python bench/bench_dpo.py --dtype bfloat16     # -> results/dpo_bf16.json
    python bench/bench_dpo.py --quick              # 2 pairs x 64 tokens -> results/dpo[_bf16]_quick.json
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (SMOLLM2_135M, TrainerStepper, pair_step_benchmark, smollm2_gguf, step_flops,  # noqa: E402
                    torch_autocast)

BETA = 0.1


def make_batch(B: int, T: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (B, 2, T)).astype(np.int32)
    tokens[:, 1, : T // 2] = tokens[:, 0, : T // 2]  # shared prompt
    mask = np.zeros((B, 2, T), np.float32)
    mask[:, :, T // 2:] = 1.0
    return {"tokens": tokens, "completion_mask": mask, "segment_ids": np.ones((B, 2, T), np.int32),
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, 2, T)).copy()}


def make_jax(batch_np, dtype: str, scan_unroll: int):
    """One jitted DPO step (state carried between calls) at ``dtype``/``scan_unroll``."""
    import jax
    from flax import nnx

    from jaxrlhf.algos.dpo import dpo_extra, dpo_step
    from jaxrlhf.config import DPOConfig, OptimConfig
    from jaxrlhf.models.hub import load_pretrained
    from jaxrlhf.sharding import MeshConfig, make_mesh, place_batch
    from jaxrlhf.train_state import init_sharded_state, jit_step, make_optimizer

    pre = load_pretrained("smollm2-135m-instruct", dtype=dtype)
    pre.model.cfg = pre.cfg.replace(dtype=dtype, scan_unroll=scan_unroll)  # static: lives in the graphdef
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

    return one


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


def make_torch(batch_np, dtype: str):
    """One step of the plain PyTorch loop (f32 weights; autocast bf16 around the forwards + loss for bf16)."""
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
        with torch_autocast(dtype):
            pol = seq_logps(model, ids)
            with torch.no_grad():
                r = seq_logps(ref, ids)
            h = BETA * ((pol[:B] - r[:B]) - (pol[B:] - r[B:]))
            loss = -F.logsigmoid(h).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return one


def make_trl(B: int, T: int, dtype: str, steps: int):
    """``(TrainerStepper, input_ids_shape)``: TRL's DPOTrainer with ``max_steps=steps``, one step per call."""
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
    rows = [{"prompt": text(T // 2), "chosen": text(T), "rejected": text(T)} for _ in range(B * steps)]
    out = tempfile.mkdtemp(prefix="bench_dpo_trl_")  # nothing is saved (save_strategy="no")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    args = TRLDPOConfig(output_dir=out, per_device_train_batch_size=B, gradient_accumulation_steps=1,
                        max_steps=steps, learning_rate=1e-6, max_grad_norm=1.0, beta=BETA,
                        loss_type=["sigmoid"], max_length=T, truncation_mode="keep_start",
                        precompute_ref_log_probs=False, save_strategy="no", report_to=[], logging_steps=10_000,
                        use_cpu=True, bf16=(dtype == "bfloat16"), dataloader_num_workers=0, disable_tqdm=True,
                        lr_scheduler_type="constant", weight_decay=0.0, seed=0)
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok)
    first = trainer.get_train_dataloader().collate_fn([trainer.train_dataset[i] for i in range(B)])
    return TrainerStepper(trainer), tuple(first["input_ids"].shape)


def torch_side(B: int, T: int, dtype: str):
    """The plain PyTorch side (built in a child process by ``common.RemoteSide``)."""
    return make_torch(make_batch(B, T, 49152), dtype)


def trl_side(B: int, T: int, dtype: str, steps: int):
    """The TRL side (built in a child process by ``common.RemoteSide``): ``(TrainerStepper, input shape)``."""
    return make_trl(B, T, dtype, steps)


def main():
    def flops(B, T):  # policy forward+backward and reference forward over 2B sequences
        return step_flops(2 * B, T, **SMOLLM2_135M) + step_flops(2 * B, T, backward=False, **SMOLLM2_135M)

    pair_step_benchmark(
        name="dpo", title="DPO step (policy + frozen reference)", trl_label="TRL 1.16 DPOTrainer", flops=flops,
        meta={"benchmark": "dpo_step", "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised, f32 masters)",
              "work_per_step": "policy fwd+bwd and reference fwd over 2B sequences of T tokens; AdamW; clip 1.0",
              "trl_timing": "TrainerStepper: one step of DPOTrainer's own train() loop per call, interleaved"},
        make_jax=lambda B, T, dtype, unroll: make_jax(make_batch(B, T, 49152), dtype, unroll),
        make_torch=torch_side,
        make_trl=trl_side)


if __name__ == "__main__":
    main()
