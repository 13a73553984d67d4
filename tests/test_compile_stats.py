"""Compiled memory and FLOPs (jaxrlhf.compile_stats) against numpy / hand counts, the start-up report
against the step the run compiles, and the fsdp step free of XLA's "involuntary full rematerialization"."""

import json
import logging
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrlhf import compile_stats as cs
from jaxrlhf.algos.sft import sft_step
from jaxrlhf.config import OptimConfig, SFTConfig
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.llama import Llama
from jaxrlhf.sharding import MeshConfig, batch_sharding, make_mesh, place_batch, state_shardings
from jaxrlhf.study import CompilationCounter
from jaxrlhf.train_state import create_train_state, init_sharded_state, jit_step, make_optimizer

# Widths divisible by 8 so fsdp=8 really splits every ``embed`` axis.
CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
B, T = 8, 16
TX = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"), 10)
REMAT_WARNING = "Involuntary full rematerialization"


def abstract_step(mesh_shape):
    """``(step, abstract state, abstract batch, mesh)`` of the tiny model's SFT step: nothing allocated."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Llama(CFG, rngs=nnx.Rngs(0))))
    mesh = make_mesh(MeshConfig(*mesh_shape))
    st = jax.eval_shape(lambda p: create_train_state(p, TX), params)
    sh = state_shardings(st, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), st, sh)
    bs = batch_sharding(mesh, 2)
    batch = {k: jax.ShapeDtypeStruct((B, T), np.int32, sharding=bs) for k in ("tokens", "segment_ids", "positions")}
    batch["completion_mask"] = jax.ShapeDtypeStruct((B, T), np.float32, sharding=bs)
    step = jit_step(sft_step, mesh, sh, static_kwargs=dict(graphdef=graphdef, tx=TX, cfg=SFTConfig()))
    return step, state, batch, mesh


def param_shard_bytes(fsdp: int) -> int:
    """numpy: per-device f32 bytes of the Llama parameters when only the ``embed`` (D) axis is split ``fsdp``
    ways (the rules table with tensor=1), written out from the parameter list of the model docstring."""
    L, D, H, K, d, F, V = 2, 32, 4, 2, 8, 48, 64
    Ds = D // fsdp
    shapes = [(V, Ds), (L, D), (L, Ds, H, d), (L, Ds, K, d), (L, Ds, K, d), (L, H, d, Ds), (L, D),
              (L, Ds, F), (L, Ds, F), (L, F, Ds), (D,)]  # norms (L, D) and (D,) stay whole
    return 4 * sum(int(np.prod(s)) for s in shapes)


def analytic_train_flops(tokens: int, seqs: int) -> float:
    """Kaplan et al. (2020): 6 N per token (forward 2N + backward 4N), N the matmul parameters (the
    blocks' projections + the tied LM head), plus attention: QK^T and AV cost 4 T^2 H d per layer and
    sequence forward, x3 with the backward."""
    L, D, H, K, d, F, V = 2, 32, 4, 2, 8, 48, 64
    N = L * (D * H * d + 2 * D * K * d + H * d * D + 3 * D * F) + D * V
    return 6 * N * tokens + 3 * L * 4 * seqs * T * T * H * d


@pytest.fixture(scope="module")
def data_and_fsdp():
    out = {}
    for name, shape in (("data", (8, 1, 1)), ("fsdp", (1, 8, 1))):
        step, state, batch, mesh = abstract_step(shape)
        out[name] = cs.analyze(step, state, batch, name="sft step", mesh=mesh, arg_names=("state", "batch"))[0]
    return out


def test_argument_bytes_are_the_sharded_state(data_and_fsdp):
    """XLA's per-device argument bytes = params + Adam's two moments at the numpy shard size (+ int32
    scalars: the step and Adam's count) + the batch's 1/8; fsdp=8 holds ~1/8 of data=8."""
    batch_bytes = 4 * 4 * B * T // 8  # four [B, T] 4-byte arrays split over 8 devices
    for name, fsdp in (("data", 1), ("fsdp", 8)):
        s = data_and_fsdp[name]
        p = param_shard_bytes(fsdp)
        assert s.arguments["params"] == p
        assert s.arguments["batch"] == batch_bytes
        assert 0 <= s.arguments["opt_state"] - 2 * p <= 16  # mu, nu + count scalars
        assert s.argument_bytes == sum(s.arguments.values())  # every input is read, none unused
        assert s.unused_argument_bytes == 0
        assert 0 <= s.argument_bytes - (3 * p + batch_bytes) <= 32
        assert s.alias_bytes >= 3 * p  # the donated state is updated in place
    ratio = data_and_fsdp["fsdp"].arguments["params"] / data_and_fsdp["data"].arguments["params"]
    assert 1 / 8 < ratio < 1 / 8 * 1.15  # only the norms stay whole


def test_flops_match_6_n_tokens_plus_attention(data_and_fsdp):
    """The jaxpr count of the SFT forward+backward equals the analytic matmul FLOPs (to 1e-9; exact:
    every projection, the LM head and attention are dot_generals) on either mesh (global FLOPs)."""
    want = analytic_train_flops(B * T, B)
    for s in data_and_fsdp.values():
        assert s.flops == pytest.approx(want, rel=1e-9)
        assert s.flops_per_device == pytest.approx(want / 8, rel=1e-9)


def test_scan_counts_every_iteration_where_xla_counts_one():
    """A 5-step scan of [16,32]x[32,32] matmuls: matmul_flops = 5 x 2·16·32·32; XLA's cost_analysis counts
    the loop body once (why CompileStats.flops comes from the jaxpr)."""
    w = jnp.ones((32, 32))

    def f(x):
        return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0]

    stats, _ = cs.analyze(jax.jit(f), jnp.ones((16, 32)), name="scan")
    one = 2 * 16 * 32 * 32
    assert stats.flops == 5 * one
    assert stats.xla_flops_per_device == pytest.approx(one, rel=0.05)
    # a while_loop is counted once and flagged
    g = jax.jit(lambda x: jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ w, c[1] + 1), (x, 0))[0])
    assert cs.matmul_flops(g.trace(jnp.ones((16, 32))).jaxpr) == (one, 1)


class PeekableBatches:
    """A resumable iterator of identical host batches (the part of BatchIterator the report uses)."""

    def __init__(self, batch):
        self.batch, self.index = batch, 0

    def __next__(self):
        self.index += 1
        return self.batch

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = state["index"]


@pytest.mark.slow  # a full driver run on data 2 x fsdp 4 (~20 s idle); the bytes/FLOPs tests stay default
def test_startup_report_is_the_compiled_step(tmp_path, caplog, capfd):
    """report_startup logs and writes compile.json for the very executable the first step runs: the step
    compiles once (the report's AOT compile is a cache hit for the call), the JSON equals that
    executable's memory_analysis(), and the batch iterator is not advanced. The mesh is data=2 x fsdp=4,
    and the compile draws no "Involuntary full rematerialization" from XLA (the embedding lookup used to:
    jaxrlhf.sharding.embed_lookup; the slow control below shows the stream really carries XLA's log)."""
    graphdef, params = nnx.split(Llama(CFG, rngs=nnx.Rngs(0)))
    mesh = make_mesh(MeshConfig(2, 4, 1))
    state, sh = init_sharded_state(params, TX, mesh)
    step = jit_step(sft_step, mesh, sh, static_kwargs=dict(graphdef=graphdef, tx=TX, cfg=SFTConfig()))
    host = {"tokens": np.ones((B, T), np.int32), "completion_mask": np.ones((B, T), np.float32),
            "segment_ids": np.ones((B, T), np.int32), "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}
    batches = PeekableBatches(host)
    run = types.SimpleNamespace(dir=types.SimpleNamespace(path=tmp_path), mesh=mesh,
                                cfg=types.SimpleNamespace(train=types.SimpleNamespace(steps=3)))
    with CompilationCounter() as counter:
        with caplog.at_level(logging.INFO, logger="jaxrlhf"):
            [stats] = cs.report_startup(run, step, state, batches, lambda b: place_batch(b, mesh), name="sft step")
        assert batches.index == 0
        with jax.set_mesh(mesh):
            mem = step.jitted.lower(state, place_batch(host, mesh)).compile().memory_analysis()
        state, _ = step(state, place_batch(next(batches), mesh))
        jax.block_until_ready(state)
    assert counter.by_function["jit(sft_step)"] == 1
    err = capfd.readouterr().err
    assert REMAT_WARNING not in err, err[-2000:]
    report = json.loads((tmp_path / "compile.json").read_text())
    got = report["functions"]["sft step"]
    assert report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    for field, attr in (("argument_bytes", "argument_size_in_bytes"), ("output_bytes", "output_size_in_bytes"),
                        ("temp_bytes", "temp_size_in_bytes"), ("alias_bytes", "alias_size_in_bytes"),
                        ("generated_code_bytes", "generated_code_size_in_bytes")):
        assert got[field] == getattr(mem, attr) == getattr(stats, field)
    assert got["peak_bytes"] == mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes \
        + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes
    assert any(r.getMessage().startswith("sft step compiled: ") for r in caplog.records)
    # nothing left to train: no report, no compile
    done = types.SimpleNamespace(**{**vars(run), "cfg": types.SimpleNamespace(train=types.SimpleNamespace(steps=1))})
    assert cs.report_startup(done, step, state, batches, lambda b: place_batch(b, mesh)) is None


@pytest.mark.slow
def test_plain_embedding_lookup_draws_the_warning(capfd, monkeypatch):
    """The control of the check above, and the cause: with the plain ``jnp.take`` lookup the same data=2 x
    fsdp=4 step draws XLA's "Involuntary full rematerialization" (activations gathered with D split over
    fsdp, which XLA can bring to the batch split only by replicating them); with embed_lookup it does
    not."""
    import jaxrlhf.models.llama as llama_module

    monkeypatch.setattr(llama_module, "embed_lookup", lambda table, ids: jnp.take(table, ids, axis=0))
    step, state, batch, mesh = abstract_step((2, 4, 1))  # a fresh jit: traced with the plain lookup
    capfd.readouterr()
    cs.analyze(step, state, batch, mesh=mesh)
    assert REMAT_WARNING in capfd.readouterr().err
    monkeypatch.undo()
    step, state, batch, mesh = abstract_step((2, 4, 1))
    cs.analyze(step, state, batch, mesh=mesh)
    err = capfd.readouterr().err
    assert REMAT_WARNING not in err, err[-2000:]


@pytest.mark.slow
def test_drivers_report_what_they_compile(tiny_llama_folder, shared_assets, tmp_path):
    """End to end on 8 devices (data=2 x fsdp=4): an SFT run writes compile.json for its step and a PPO run
    for its rollout, experience and update, and each of those functions is compiled exactly once in the
    whole run (the start-up report's compiles are the ones the loop uses)."""
    from jaxrlhf import config as C
    from jaxrlhf.drivers import run_experiment

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"The film number {i} was"}) + "\n" for i in range(24)))
    sft = (C.SFTConfig(), dict(source=str(shared_assets / "alpaca-seed-tasks" / "seed_tasks.jsonl"),
                               max_length=48, max_prompt_length=24, eval_size=8, limit=16))
    ppo = (C.PPOConfig(rollout=C.RolloutConfig(max_new_tokens=4),
                       reward=C.RewardSpec(functions=("jaxrlhf.rewards:word_count",)),
                       update=C.UpdateConfig(epochs=1, num_minibatches=1)),
           dict(source=str(prompts), max_length=16, max_prompt_length=8, eval_size=8))
    expected = {"sft": {"sft step": "jit(sft_step)"},
                "ppo": {"rollout": "jit(gen)", "experience": "jit(exp_fn)", "update": "jit(upd_fn)"}}
    for name, (algo, data) in (("sft", sft), ("ppo", ppo)):
        cfg = C.ExperimentConfig(
            name=name, model=C.ModelSpec(name=str(tiny_llama_folder)), mesh=C.MeshConfig(data=2, fsdp=4, tensor=1),
            optim=C.OptimConfig(lr=1e-3, schedule="constant"),
            data=C.DataConfig(batch_size=8, use_chat_template=False, **data),
            train=C.TrainConfig(steps=2, num_samples=0, run_dir=str(tmp_path / "runs")), algo=algo)
        with CompilationCounter() as counter:
            run_experiment(cfg)
        report = json.loads((tmp_path / "runs" / name / "compile.json").read_text())["functions"]
        assert set(report) == set(expected[name])
        for fn, jit_name in expected[name].items():
            assert counter.by_function[jit_name] == 1, (fn, dict(counter.by_function))
            assert report[fn]["peak_bytes"] > report[fn]["temp_bytes"] > 0
