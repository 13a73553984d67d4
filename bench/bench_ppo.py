"""One RL-from-feedback iteration at SmolLM2-135M: jaxrlhf's PPO and RLOO vs TRL's RLOOTrainer, same
machine, same model (SmolLM2-135M-Instruct dequantised from the same GGUF, f32 master weights), same
shapes, same precision (``--dtype``).

An iteration = rollout of 16 completions x 48 new tokens (generation runs the full 48 tokens on both
sides: no EOS stop), scoring (the same host text reward, plus the log-prob/value forward passes each
algorithm needs), and one epoch of one minibatch update (one AdamW step). Reported per phase:

* ``generate``: sampling with a KV cache (jaxrlhf: one jitted prefill + while-loop decode;
  TRL: ``transformers`` ``generate``);
* ``score``: reward + the forward passes over prompt + completion (jaxrlhf PPO: policy, reference and
  critic, then GAE; jaxrlhf RLOO: policy and reference; TRL RLOO: reference only — with one iteration
  per generation TRL reuses the training forward pass as the old log-probs);
* ``update``: forward + backward + AdamW (PPO also trains the separate critic).

Precision (``--dtype``): ``float32`` on every side, or ``bfloat16``: jaxrlhf's mixed-precision policy
(``model.dtype=bfloat16``: bf16 matmuls with f32 accumulation, f32 masters, bf16 weights and KV cache in
the sampler; ``model.scan_unroll=0`` unless ``--scan-unroll`` says otherwise) vs TRL with ``bf16=True``
(f32 weights, accelerate's CPU autocast around the forwards, generation included).

TRL 1.16 has no PPO trainer any more (removed from the package), so TRL's ``RLOOTrainer`` is the
like-for-like baseline for jaxrlhf's RLOO (4 prompts x 4 completions); jaxrlhf's PPO (16 prompts x 1) is
shown next to it for its extra critic cost.

Timing: the three sides run **alternately at the iteration level** in one process (all warmed up, then
rounds of one timed iteration per side: PPO, RLOO, TRL), so load drift on the shared machine hits all of
them. TRL's own ``train()`` loop is driven one iteration per call by :class:`common.TrainerStepper` (its
thread is parked at every ``on_step_end``); TRL's phases come from wrapping ``generate`` and
``_generate_and_score_completions``, its ``total`` from ``on_step_begin -> on_step_end`` (``call_s``
adds the Trainer's batch fetch between steps). Each jaxrlhf side also gets its fraction of the XLA matmul
peak measured in the same run at the same precision (``common.matmul_peak_gflops``), for the matmul
FLOPs its iteration does (:func:`iteration_flops`).

    python bench/bench_ppo.py                        # f32, 1 warm-up + 5 timed rounds -> results/ppo.json
    python bench/bench_ppo.py --dtype bfloat16       # -> results/ppo_bf16.json
    python bench/bench_ppo.py --repeats 3            # fewer
    python bench/bench_ppo.py --quick                # 8 completions x 8 new tokens, 2 rounds -> results/ppo[_bf16]_quick.json
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import (SMOLLM2_135M, RemoteSide, TrainerStepper, default_scan_unroll, generate_flops,  # noqa: E402
                    machine, matmul_peak_gflops, print_table, result_name, smollm2_gguf, step_flops,
                    time_alternating, write_results)

ROWS, NEW_TOKENS, GROUP = 16, 48, 4
QUICK_ROWS, QUICK_NEW_TOKENS = 8, 8
PHASES = ("generate", "score", "update", "total")


def prompt_texts(n: int) -> list[str]:
    from configs.assets import IMDB_TRAIN
    from jaxrlhf.data.formats import imdb_prompt_examples
    from jaxrlhf.data.sources import load_rows

    rows = load_rows(IMDB_TRAIN(), split="train").select(range(n))
    return [ex.prompt for ex in imdb_prompt_examples(rows, n_words=8)]


def reward_texts(prompts, completions):
    from jaxrlhf.rewards import lexicon_sentiment
    return lexicon_sentiment(prompts, completions)


def summarize(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times}


def iteration_flops(kind: str, rows: int, prompt_len: int, new_tokens: int) -> dict:
    """Matmul FLOPs of one jaxrlhf iteration per phase (:func:`common.step_flops`/``generate_flops``).

    ``generate``: prefill + decode of ``rows`` completions; ``score``: forwards over prompt + completion
    (RLOO: policy and reference; PPO: also the critic, without an LM head); ``update``: one
    forward+backward of the policy (PPO: and of the critic).
    """
    m, S = SMOLLM2_135M, prompt_len + new_tokens
    gen = generate_flops(rows, prompt_len, new_tokens, **m)
    score = 2 * step_flops(rows, S, backward=False, **m)
    update = step_flops(rows, S, **m)
    if kind == "ppo":
        score += step_flops(rows, S, backward=False, lm_head=False, **m)
        update += step_flops(rows, S, lm_head=False, **m)
    return {"generate": gen, "score": score, "update": update, "total": gen + score + update}


def make_jax(kind: str, texts: list[str], dtype: str, scan_unroll: int, rows: int, new_tokens: int):
    """``(one_iteration, info, phases)``: each call runs one full iteration and appends its phase times to
    ``phases`` (a list of dicts); the first call compiles."""
    import jax

    from jaxrlhf import config as C
    from jaxrlhf.algos import grpo, ppo
    from jaxrlhf.algos.rollout import init_extra, repeat_prompts, sampling_config
    from jaxrlhf.data.batching import build_prompt_batch
    from jaxrlhf.data.tokenize import pad_id_for
    from jaxrlhf.rewards import FunctionReward
    from jaxrlhf.drivers.core import load_policy
    from jaxrlhf.drivers.rl import make_rl_functions, score_sample
    from jaxrlhf.sharding import MeshConfig, make_mesh, place_batch
    from jaxrlhf.train_state import init_sharded_state, make_optimizer

    policy = load_policy(C.ModelSpec(name="smollm2-135m-instruct", dtype=dtype, scan_unroll=scan_unroll))
    tok = policy.tokenizer
    G = 1 if kind == "ppo" else GROUP
    rollout = C.RolloutConfig(max_new_tokens=new_tokens, num_completions=G)
    if kind == "ppo":
        algo, cfg = ppo.PPO, C.PPOConfig(rollout=rollout, update=C.UpdateConfig(epochs=1, whiten_advantages=True))
    else:
        algo, cfg = grpo.RLOO, C.RLOOConfig(rollout=rollout, update=C.UpdateConfig(epochs=1))
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    tx = make_optimizer(C.OptimConfig(lr=1e-6, schedule="constant"), 1000)
    params, graphs = algo.init_params(ppo.copy_tree(policy.params), policy.graphdef, policy.model_cfg, cfg,
                                      jax.random.key(0))
    state, sh = init_sharded_state(params, tx, mesh, init_extra(0.05))
    ref = ppo.copy_tree(policy.params)
    pad = pad_id_for(tok)
    fns = make_rl_functions(algo, graphs, cfg, tx, mesh, sh, sampling_config(rollout, (), pad))  # no EOS stop
    ids = [tok(t)["input_ids"] for t in texts[:rows // G]]
    P = max(len(x) for x in ids)
    batch = repeat_prompts(build_prompt_batch(ids, P, pad), G)
    batch = place_batch(batch, mesh)
    reward = FunctionReward(reward_texts, name="lexicon")
    holder = {"state": state, "it": 0}
    phases: list[dict] = []

    def one():
        key = jax.random.key(holder["it"])
        holder["it"] += 1
        t0 = time.perf_counter()
        sample = fns.generate(holder["state"].params["policy"], batch["prompt_tokens"], batch["prompt_mask"], key)
        jax.block_until_ready(sample)
        t1 = time.perf_counter()
        scores, _, _ = score_sample(reward, sample, tok, mesh)
        exp, metrics = fns.experience(holder["state"], ref, sample.lm_batch(), sample.truncated_B, scores)
        jax.block_until_ready(exp)
        t2 = time.perf_counter()
        holder["state"], m = fns.update(holder["state"], exp, key)
        jax.block_until_ready(m)
        t3 = time.perf_counter()
        assert int(np.asarray(sample.lengths_B).min()) == new_tokens
        phases.append({"generate": t1 - t0, "score": t2 - t1, "update": t3 - t2, "total": t3 - t0})
        if len(phases) == 1:
            print(f"jaxrlhf {kind}: first (compiling) iteration {t3 - t0:.1f}s", flush=True)

    info = {"side": f"jaxrlhf {kind}", "rows": rows, "prompts": rows // G, "prompt_len": P}
    return one, info, phases


def make_trl(texts: list[str], dtype: str, rows: int, new_tokens: int, steps: int):
    """``(TrainerStepper, info, phases)``: TRL's RLOOTrainer with ``max_steps=steps``, one iteration per call;
    the phase times of every iteration are appended to ``phases``."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    folder, gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    # The GGUF loader dequantises to float32 but flags the model as quantized (the Trainer then refuses to
    # fine-tune it), and RLOOTrainer builds its reference model from a path: write the dequantised weights as
    # a plain float32 folder and give TRL that folder (f32 masters also for bf16=True, which autocasts).
    model.is_quantized, model.hf_quantizer = False, None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    f32 = tempfile.mkdtemp(prefix="smollm2_f32_")
    atexit.register(shutil.rmtree, f32, ignore_errors=True)
    model.save_pretrained(f32, safe_serialization=True)
    tok.save_pretrained(f32)
    del model
    n_prompts = rows // GROUP
    ds = datasets.Dataset.from_list([{"prompt": t} for t in texts[:n_prompts]] * (steps + 2))
    timers = {"generate": 0.0, "reward": 0.0, "gen_and_score": 0.0}

    def reward(prompts, completions, **kw):
        t = time.perf_counter()
        out = reward_texts(list(prompts), list(completions)).tolist()
        timers["reward"] += time.perf_counter() - t
        return out

    out_dir = tempfile.mkdtemp(prefix="bench_trl_rloo_")  # nothing is saved (save_strategy="no")
    atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
    args = RLOOConfig(output_dir=out_dir, per_device_train_batch_size=rows, num_generations=GROUP,
                      gradient_accumulation_steps=1, max_completion_length=new_tokens, num_iterations=1,
                      beta=0.05, learning_rate=1e-6, max_steps=steps, logging_steps=1,
                      save_strategy="no", report_to="none", use_cpu=True, bf16=(dtype == "bfloat16"), fp16=False,
                      temperature=1.0, top_p=1.0, top_k=0, shuffle_dataset=False, seed=0,
                      generation_kwargs={"min_new_tokens": new_tokens}, dataloader_num_workers=0,
                      gradient_checkpointing=False)  # jaxrlhf does not rematerialise either
    trainer = RLOOTrainer(model=f32, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok)

    orig_generate = trainer.model.generate

    def timed_generate(*a, **k):
        t = time.perf_counter()
        out = orig_generate(*a, **k)
        timers["generate"] += time.perf_counter() - t
        return out

    trainer.model.generate = timed_generate
    orig_gs = trainer._generate_and_score_completions

    def timed_gs(*a, **k):
        t = time.perf_counter()
        out = orig_gs(*a, **k)
        timers["gen_and_score"] += time.perf_counter() - t
        return out

    trainer._generate_and_score_completions = timed_gs
    phases: list[dict] = []

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            for k in timers:
                timers[k] = 0.0
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            total = time.perf_counter() - self.t0
            phases.append({"generate": timers["generate"], "score": timers["gen_and_score"] - timers["generate"],
                           "update": total - timers["gen_and_score"], "total": total})
            if len(phases) == 1:
                print(f"TRL rloo: first iteration {total:.1f}s", flush=True)

    trainer.add_callback(Steps())  # before the stepper's gate, which parks the thread at on_step_end
    info = {"side": "TRL RLOOTrainer", "rows": rows, "prompts": n_prompts, "prompt_len": "padded per batch"}
    return TrainerStepper(trainer), info, phases


class _TRLSide:
    """The TRL side as ``common.RemoteSide`` runs it in a child process: a call is one iteration;
    ``step_times`` returns the per-iteration phase times (fetched by ``RemoteSide.close``)."""

    def __init__(self, stepper, phases):
        self.stepper, self.phases = stepper, phases

    def __call__(self):
        self.stepper()

    def close(self):
        self.stepper.close()

    @property
    def step_times(self):
        return self.phases


def trl_side(texts: list[str], dtype: str, rows: int, new_tokens: int, steps: int):
    """``(_TRLSide, info)`` for ``common.RemoteSide`` (PyTorch in a child process with glibc's default malloc)."""
    stepper, info, phases = make_trl(texts, dtype, rows, new_tokens, steps)
    return _TRLSide(stepper, phases), info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute precision of every side (bf16: jaxrlhf mixed precision, TRL bf16=True)")
    p.add_argument("--scan-unroll", type=int, default=None,
                   help="jaxrlhf model.scan_unroll (default: 0 = fully unrolled for bf16, 1 = rolled scan for f32)")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_ROWS} completions x {QUICK_NEW_TOKENS} new tokens, 1 warm-up + 2 rounds")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--only-trl", action="store_true", help="check the TRL side alone (no JSON written)")
    a = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    rows, new_tokens = (QUICK_ROWS, QUICK_NEW_TOKENS) if a.quick else (ROWS, NEW_TOKENS)
    if a.quick:
        a.warmup, a.repeats = 1, 2
    dtype, unroll = a.dtype, default_scan_unroll(a.dtype, a.scan_unroll)
    texts = prompt_texts(rows)
    sides, infos, phases = {}, {}, {}
    if not a.only_trl:
        for kind in ("ppo", "rloo"):
            sides[kind], infos[kind], phases[kind] = make_jax(kind, texts, dtype, unroll, rows, new_tokens)
    trl = None
    if not a.skip_trl:
        trl = RemoteSide(__file__, "trl_side", texts, dtype, rows, new_tokens, a.warmup + a.repeats)
        infos["trl"] = trl.info
        sides["trl"] = trl
    try:
        calls = time_alternating(sides, warmup=a.warmup, repeats=a.repeats)
    finally:
        if trl is not None:
            trl.close()
            phases["trl"] = trl.step_times
    results = []
    for k in sides:
        timed = phases[k][a.warmup:]
        r = {**infos[k], **{ph: summarize([x[ph] for x in timed]) for ph in PHASES},
             "call_s": calls[k], "warmup_total_s": [x["total"] for x in phases[k][:a.warmup]]}
        results.append(r)
    if a.only_trl:
        print({k: v for k, v in results[0].items()})
        return
    peak = matmul_peak_gflops(dtype)
    for r, k in zip(results, sides):
        if k in ("ppo", "rloo"):
            fl = iteration_flops(k, rows, r["prompt_len"], new_tokens)
            r["flops"] = fl
            r["frac_of_peak"] = {ph: fl[ph] / r[ph]["median_s"] / (peak * 1e9) for ph in PHASES}
    rows_out = []
    for r in results:
        row = {"side": r["side"], "rows": r["rows"]}
        for k in PHASES:
            row[f"{k}_s"] = r[k]["median_s"]
            row[f"{k}_spread"] = f"{r[k]['min_s']:.2f}-{r[k]['max_s']:.2f}"
        row["of_peak"] = f"{r['frac_of_peak']['total']:.1%}" if "frac_of_peak" in r else ""
        rows_out.append(row)
    by = dict(zip(sides, results))
    ratio = None
    if "trl" in by and "rloo" in by:
        ratio = {k: by["trl"][k]["median_s"] / by["rloo"][k]["median_s"] for k in PHASES}
    speedups = None
    if "trl" in by:
        speedups = {k: by["trl"]["total"]["median_s"] / by[k]["total"]["median_s"] for k in ("ppo", "rloo") if k in by}
    print(f"\none iteration, SmolLM2-135M-Instruct {dtype} (scan_unroll={unroll}), {rows} completions x "
          f"{new_tokens} new tokens, 1 epoch x 1 minibatch; median (min-max) of {a.repeats} alternating rounds "
          f"after {a.warmup} warm-up; measured {dtype} matmul peak {peak:.0f} GFLOP/s")
    print_table(rows_out, ["side", "rows"] + [f"{k}{s}" for k in PHASES for s in ("_s", "_spread")] + ["of_peak"])
    if ratio:
        print("TRL RLOO time / jaxrlhf RLOO time (>1: jaxrlhf faster): "
              + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
    if speedups:
        print("jaxrlhf speed-up vs TRL RLOOTrainer (median iteration): "
              + ", ".join(f"{k} {v:.2f}x" for k, v in speedups.items()))
    path = write_results(result_name("ppo", dtype, a.quick), {
        "machine": machine(), "shapes": {"rows": rows, "new_tokens": new_tokens, "group": GROUP, "dtype": dtype},
        "dtype": dtype, "scan_unroll": unroll, "warmup": a.warmup, "repeats": a.repeats, "alternating": True,
        "matmul_peak_gflops": peak, "matmul_peak_shape": [2048, 576, 1536], "results": results,
        "trl_over_jaxrlhf_rloo": ratio, "jaxrlhf_speedup_vs_trl_total": speedups, "loadavg_at_end": os.getloadavg(),
        "note": "TRL runs in a child process with glibc's default allocator (common.RemoteSide); sides alternate"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
