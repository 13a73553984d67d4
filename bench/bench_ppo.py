"""One RL-from-feedback iteration at SmolLM2-135M: jaxrlhf's PPO and RLOO vs TRL's RLOOTrainer, same
machine, same model (SmolLM2-135M-Instruct dequantised from the same GGUF), same shapes, float32.

An iteration = rollout of 16 completions x 48 new tokens (generation runs the full 48 tokens on both
sides: no EOS stop), scoring (the same host text reward, plus the log-prob/value forward passes each
algorithm needs), and one epoch of one minibatch update (one AdamW step). Reported per phase:

* ``generate``: sampling with a KV cache (jaxrlhf: one jitted prefill + while-loop decode;
  TRL: ``transformers`` ``generate``);
* ``score``: reward + the forward passes over prompt + completion (jaxrlhf PPO: policy, reference and
  critic, then GAE; jaxrlhf RLOO: policy and reference; TRL RLOO: reference only — with one iteration
  per generation TRL reuses the training forward pass as the old log-probs);
* ``update``: forward + backward + AdamW (PPO also trains the separate critic).

TRL 1.16 has no PPO trainer any more (removed from the package), so TRL's ``RLOOTrainer`` is the
like-for-like baseline for jaxrlhf's RLOO (4 prompts x 4 completions); jaxrlhf's PPO (16 prompts x 1) is
shown next to it for its extra critic cost.

    python bench/bench_ppo.py              # 1 warm-up + 5 timed iterations per side
    python bench/bench_ppo.py --repeats 3  # fewer
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import machine, print_table, smollm2_gguf, write_results  # noqa: E402

ROWS, NEW_TOKENS, GROUP = 16, 48, 4


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


def bench_jax(kind: str, texts: list[str], warmup: int, repeats: int) -> dict:
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

    policy = load_policy(C.ModelSpec("smollm2-135m-instruct"))
    tok = policy.tokenizer
    G = 1 if kind == "ppo" else GROUP
    rollout = C.RolloutConfig(max_new_tokens=NEW_TOKENS, num_completions=G)
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
    ids = [tok(t)["input_ids"] for t in texts[:ROWS // G]]
    P = max(len(x) for x in ids)
    batch = repeat_prompts(build_prompt_batch(ids, P, pad), G)
    batch = place_batch(batch, mesh)
    reward = FunctionReward(reward_texts, name="lexicon")
    phases = {"generate": [], "score": [], "update": [], "total": []}
    for it in range(warmup + repeats):
        key = jax.random.key(it)
        t0 = time.perf_counter()
        sample = fns.generate(state.params["policy"], batch["prompt_tokens"], batch["prompt_mask"], key)
        jax.block_until_ready(sample)
        t1 = time.perf_counter()
        scores, _, _ = score_sample(reward, sample, tok, mesh)
        exp, metrics = fns.experience(state, ref, sample.lm_batch(), sample.truncated_B, scores)
        jax.block_until_ready(exp)
        t2 = time.perf_counter()
        state, m = fns.update(state, exp, key)
        jax.block_until_ready(m)
        t3 = time.perf_counter()
        if it >= warmup:
            for k, v in (("generate", t1 - t0), ("score", t2 - t1), ("update", t3 - t2), ("total", t3 - t0)):
                phases[k].append(v)
        else:
            print(f"jaxrlhf {kind}: warm-up (compile) iteration {t3 - t0:.1f}s", flush=True)
    assert int(np.asarray(sample.lengths_B).min()) == NEW_TOKENS
    return {"side": f"jaxrlhf {kind}", "rows": ROWS, "prompts": ROWS // G, "prompt_len": P,
            **{k: summarize(v) for k, v in phases.items()}}


def bench_trl(texts: list[str], warmup: int, repeats: int) -> dict:
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
    # a plain float32 folder and give TRL that folder.
    model.is_quantized, model.hf_quantizer = False, None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    f32 = tempfile.mkdtemp(prefix="smollm2_f32_")
    model.save_pretrained(f32, safe_serialization=True)
    tok.save_pretrained(f32)
    del model
    n_prompts = ROWS // GROUP
    ds = datasets.Dataset.from_list([{"prompt": t} for t in texts[:n_prompts]] * (warmup + repeats + 2))
    timers = {"generate": 0.0, "reward": 0.0, "gen_and_score": 0.0}

    def reward(prompts, completions, **kw):
        t = time.perf_counter()
        out = reward_texts(list(prompts), list(completions)).tolist()
        timers["reward"] += time.perf_counter() - t
        return out

    args = RLOOConfig(output_dir="/tmp/bench_trl_rloo", per_device_train_batch_size=ROWS, num_generations=GROUP,
                      gradient_accumulation_steps=1, max_completion_length=NEW_TOKENS, num_iterations=1,
                      beta=0.05, learning_rate=1e-6, max_steps=warmup + repeats, logging_steps=1,
                      save_strategy="no", report_to="none", use_cpu=True, bf16=False, fp16=False,
                      temperature=1.0, top_p=1.0, top_k=0, shuffle_dataset=False, seed=0,
                      generation_kwargs={"min_new_tokens": NEW_TOKENS}, dataloader_num_workers=0,
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
    phases = {"generate": [], "score": [], "update": [], "total": []}

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            for k in timers:
                timers[k] = 0.0
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            total = time.perf_counter() - self.t0
            if state.global_step > warmup:
                phases["generate"].append(timers["generate"])
                phases["score"].append(timers["gen_and_score"] - timers["generate"])
                phases["update"].append(total - timers["gen_and_score"])
                phases["total"].append(total)
            else:
                print(f"TRL rloo: warm-up iteration {total:.1f}s", flush=True)

    trainer.add_callback(Steps())
    trainer.train()
    return {"side": "TRL RLOOTrainer", "rows": ROWS, "prompts": n_prompts, "prompt_len": "padded per batch",
            **{k: summarize(v) for k, v in phases.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--only-trl", action="store_true", help="check the TRL side alone (no JSON written)")
    a = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    texts = prompt_texts(ROWS)
    results = []
    if not a.only_trl:
        results = [bench_jax("ppo", texts, a.warmup, a.repeats), bench_jax("rloo", texts, a.warmup, a.repeats)]
        write_results("ppo", {"partial": True, "results": results})  # kept if the TRL side fails
    if not a.skip_trl:
        results.append(bench_trl(texts, a.warmup, a.repeats))
    if a.only_trl:
        print({k: v for k, v in results[0].items()})
        return
    rows = []
    for r in results:
        row = {"side": r["side"], "rows": r["rows"]}
        for k in ("generate", "score", "update", "total"):
            row[f"{k}_s"] = r[k]["median_s"]
            row[f"{k}_spread"] = f"{r[k]['min_s']:.2f}-{r[k]['max_s']:.2f}"
        rows.append(row)
    ratio = None
    if len(results) == 3:
        ratio = {k: results[2][k]["median_s"] / results[1][k]["median_s"] for k in ("generate", "score", "update",
                                                                                       "total")}
    print(f"\none iteration, SmolLM2-135M-Instruct f32, {ROWS} completions x {NEW_TOKENS} new tokens, "
          f"1 epoch x 1 minibatch; median (min-max) of {a.repeats} after {a.warmup} warm-up")
    print_table(rows, ["side", "rows"] + [f"{k}{s}" for k in ("generate", "score", "update", "total")
                                          for s in ("_s", "_spread")])
    if ratio:
        print("TRL RLOO time / jaxrlhf RLOO time (>1: jaxrlhf faster): "
              + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
    path = write_results("ppo", {"machine": machine(), "shapes": {"rows": ROWS, "new_tokens": NEW_TOKENS,
                                                                   "group": GROUP, "dtype": "float32"},
                                 "warmup": a.warmup, "repeats": a.repeats, "results": results,
                                 "trl_over_jaxrlhf_rloo": ratio,
                                 "note": "shared 2-core CPU; other jobs ran concurrently, timings are noisy"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
