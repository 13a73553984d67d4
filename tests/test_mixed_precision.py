"""Mixed precision (``model.dtype="bfloat16"``): the matmul's maths and gradients against numpy, every model
family's bf16 gradient compiles, runs and tracks f32, master weights stay f32, and on the real
SmolLM2-135M: bf16 log-probs within a stated tolerance of f32 (and no worse than PyTorch autocast's),
greedy decoding equal to f32's until a near-tie, and short bf16 SFT/DPO runs whose loss follows f32's.
"""

import dataclasses
import gzip
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jaxrlhf.models.bert import Encoder
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.gpt2 import GPT2
from jaxrlhf.models.llama import Llama
from jaxrlhf.models.mixed_precision import matmul
from jaxrlhf.ops import next_token_logprobs

BF16 = ml_dtypes.bfloat16


def _round_bf16(a):
    return np.asarray(a, np.float32).astype(BF16).astype(np.float64)


@pytest.mark.parametrize("w_transposed", [False, True])
def test_matmul_and_its_gradients_equal_f64_products_of_the_bf16_operands(w_transposed):
    """Forward, input gradient and weight gradient are the exact products of the bf16-rounded operands
    accumulated in f32 (checked against f64 numpy); the weight gradient comes back f32 for an f32 master."""
    rng = np.random.default_rng(0)
    M, K, N = 48, 40, 24
    x = rng.normal(size=(M, K)).astype(np.float32)
    w = rng.normal(size=(N, K) if w_transposed else (K, N)).astype(np.float32)
    dy = rng.normal(size=(M, N)).astype(np.float32)
    xb = jnp.asarray(x).astype(jnp.bfloat16)

    y, vjp = jax.vjp(lambda a, b: matmul(a, b, jnp.float32, w_transposed=w_transposed), xb, jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(dy))
    assert y.dtype == jnp.float32 and dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32

    xr, wr, dyr = _round_bf16(x), _round_bf16(w), _round_bf16(dy)
    w_KN = wr.T if w_transposed else wr
    np.testing.assert_allclose(np.asarray(y), xr @ w_KN, rtol=1e-5, atol=1e-4)
    dw_KN = xr.T @ dyr
    np.testing.assert_allclose(np.asarray(dw), dw_KN.T if w_transposed else dw_KN, rtol=1e-5, atol=1e-4)
    # dx is rounded to bf16 (the activation dtype): compare within bf16's relative precision.
    np.testing.assert_allclose(np.asarray(dx, np.float32), dyr @ w_KN.T, rtol=1e-2, atol=2e-2)


def test_f32_matmul_is_the_plain_product():
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=(8, 5)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(matmul(jnp.asarray(x), jnp.asarray(w))), x @ w, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(matmul(jnp.asarray(x), jnp.asarray(w.T), w_transposed=True)), x @ w,
                               rtol=1e-6)


_TINY = dict(vocab_size=96, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=48,
             max_position_embeddings=64)
FAMILIES = {
    "llama-tied": (Llama, ModelConfig(family="llama", num_kv_heads=2, tie_word_embeddings=True, **_TINY)),
    "llama-untied-qkv-bias": (Llama, ModelConfig(family="llama", num_kv_heads=2, tie_word_embeddings=False,
                                                 attention_bias=True, **_TINY)),
    "gpt2": (GPT2, ModelConfig(family="gpt2", num_kv_heads=4, attention_bias=True, mlp_bias=True,
                               tie_word_embeddings=True, hidden_act="gelu_new", **_TINY)),
    "bert": (Encoder, ModelConfig(family="bert", num_kv_heads=4, attention_bias=True, mlp_bias=True,
                                  hidden_act="gelu", num_labels=2, type_vocab_size=2, **_TINY)),
}


def _family_loss(cfg, graphdef):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (4, 24)), jnp.int32)

    def loss(params):
        out = nnx.merge(graphdef, params)(tokens)
        if cfg.is_decoder:
            return -jnp.mean(next_token_logprobs(out.logits_BTV, tokens))
        logits = out.logits_BC if hasattr(out, "logits_BC") else out[0]
        return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[:, 0])

    return loss


@pytest.mark.parametrize("family,scan_unroll", [(f, 1) for f in FAMILIES] + [("llama-tied", 0)])
def test_bf16_gradient_of_every_family_runs_and_tracks_f32(family, scan_unroll):
    """Compiles and runs the bf16 backward pass (XLA:CPU rejects some bf16 dot layouts at run time, so
    this guards the custom VJP's layouts), with f32 gradients for the f32 masters that point the same way
    as the f32 model's (cosine > 0.99) and a loss within 1%."""
    module, cfg = FAMILIES[family]
    results = {}
    for dtype in ("float32", "bfloat16"):
        c = dataclasses.replace(cfg, dtype=dtype, scan_unroll=scan_unroll)
        graphdef, params = nnx.split(module(c, rngs=nnx.Rngs(0)))
        loss, grads = jax.jit(jax.value_and_grad(_family_loss(c, graphdef)))(params)
        leaves = jax.tree.leaves(grads)
        assert all(g.dtype == jnp.float32 for g in leaves)
        results[dtype] = (float(loss), np.concatenate([np.ravel(np.asarray(g)) for g in leaves]))
    (l32, g32), (l16, g16) = results["float32"], results["bfloat16"]
    assert abs(l16 - l32) <= 0.01 * abs(l32)
    cos = g16 @ g32 / (np.linalg.norm(g16) * np.linalg.norm(g32))
    assert cos > 0.99, cos


def test_bf16_sft_step_keeps_f32_master_weights_and_optimizer_state():
    from jaxrlhf.algos.sft import sft_step
    from jaxrlhf.config import OptimConfig, SFTConfig
    from jaxrlhf.sharding import MeshConfig, make_mesh, place_batch
    from jaxrlhf.train_state import init_sharded_state, jit_step, make_optimizer

    _, cfg = FAMILIES["llama-tied"]
    graphdef, params = nnx.split(Llama(dataclasses.replace(cfg, dtype="bfloat16"), rngs=nnx.Rngs(0)))
    before = jax.device_get(params)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    tx = make_optimizer(OptimConfig(lr=1e-3, schedule="constant"), 10)
    state, sh = init_sharded_state(params, tx, mesh)
    step = jit_step(sft_step, mesh, sh, static_kwargs=dict(graphdef=graphdef, tx=tx, cfg=SFTConfig()))
    rng = np.random.default_rng(0)
    B, T = 4, 16
    batch = {"tokens": rng.integers(1, cfg.vocab_size, (B, T)).astype(np.int32),
             "completion_mask": np.ones((B, T), np.float32), "segment_ids": np.ones((B, T), np.int32),
             "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}
    state, metrics = step(state, place_batch(batch, mesh))
    assert np.isfinite(float(metrics["loss"]))
    for leaf in jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32, leaf.dtype
    moved = [np.max(np.abs(np.asarray(a) - np.asarray(b)))
             for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before))]
    # Updates of lr 1e-3 are below bf16's resolution for weights of size ~1: a bf16 master would not move.
    assert max(moved) > 0 and min(m for m in moved if m > 0) < 1e-2


# ------------------------------------------------------------------------------ real SmolLM2-135M

@pytest.fixture(scope="module")
def smollm2():
    from jaxrlhf.models.hub import load_pretrained

    return load_pretrained("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def imdb_ids(smollm2, shared_assets):
    path = shared_assets / "imdb-reviews-subset/test.jsonl.gz"
    T, ids = 128, []
    with gzip.open(path, "rt") as f:  # the first 8 reviews of at least T tokens: no padding
        for line in f:
            row = smollm2.tokenizer(json.loads(line)["text"])["input_ids"]
            if len(row) >= T:
                ids.append(row[:T])
            if len(ids) == 8:
                break
    return np.asarray(ids, np.int32)


def _jax_logprobs(pre, dtype, ids):
    pre.model.cfg = pre.cfg.replace(dtype=dtype)
    graphdef, params = nnx.split(pre.model)
    f = jax.jit(lambda p, t: next_token_logprobs(nnx.merge(graphdef, p)(t).logits_BTV, t))
    return np.asarray(f(params, jnp.asarray(ids)))[:, 1:]


def test_smollm2_bf16_logprobs_within_tolerance_and_no_worse_than_pytorch_autocast(smollm2, imdb_ids):
    """bf16 per-token log-probs on 8 real IMDb reviews x 128 tokens vs f32. Stated tolerance: mean
    |error| <= 0.03 nats, 99th percentile <= 0.15 nats; and no larger than 1.1x the error of PyTorch
    autocast bf16 on the same weights and tokens (measured here: ours 0.017 / 0.07, autocast 0.027 / 0.12;
    the f32 residual stream and f32 logits are what keep ours below autocast's)."""
    import torch

    err = np.abs(_jax_logprobs(smollm2, "bfloat16", imdb_ids) - _jax_logprobs(smollm2, "float32", imdb_ids))
    print(f"jaxrlhf bf16 log-prob error: mean {err.mean():.4f}, p99 {np.quantile(err, 0.99):.4f}, max {err.max():.4f}")
    assert err.mean() <= 0.03 and np.quantile(err, 0.99) <= 0.15

    from test_hf_io import load_smol_reference   # transformers' GGUF loading, with or without accelerate

    hf = load_smol_reference().eval()
    ids = torch.as_tensor(imdb_ids, dtype=torch.long)

    def torch_logprobs(autocast):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = hf(input_ids=ids).logits.float()
        return torch.gather(torch.log_softmax(logits[:, :-1], -1), 2, ids[:, 1:, None])[..., 0].numpy()

    torch_err = np.abs(torch_logprobs(True) - torch_logprobs(False))
    print(f"PyTorch autocast bf16 log-prob error: mean {torch_err.mean():.4f}, p99 {np.quantile(torch_err, 0.99):.4f}")
    assert err.mean() <= 1.1 * torch_err.mean()


def test_smollm2_bf16_greedy_equals_f32_until_a_near_tie(smollm2):
    """Greedy decoding of a fixed chat prompt, bf16 (bf16 weights and KV cache) vs f32. The outputs agree
    token for token until the first position where f32's own top-2 logits are within bf16's error (0.2
    nats) of each other; there a different but equally likely continuation is legitimate."""
    from jaxrlhf.sampling import SamplingConfig, sample

    tok = smollm2.tokenizer
    prompt = tok(["<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n"])
    P = np.asarray(prompt["input_ids"], np.int32)
    cfg = SamplingConfig(max_new_tokens=24, temperature=0.0, eos_token_ids=(), pad_token_id=0)
    outs = {}
    for dtype in ("float32", "bfloat16"):
        smollm2.model.cfg = smollm2.cfg.replace(dtype=dtype)
        outs[dtype] = np.asarray(sample(smollm2.model, P, np.ones_like(P), jax.random.key(0), cfg)
                                 .completion_tokens_BN)[0]
    a, b = outs["float32"], outs["bfloat16"]
    differ = np.nonzero(a != b)[0]
    n_equal = int(differ[0]) if differ.size else len(a)
    print(f"greedy bf16 == f32 for the first {n_equal} of {len(a)} tokens")
    assert n_equal >= 3
    if differ.size:
        j = n_equal
        smollm2.model.cfg = smollm2.cfg.replace(dtype="float32")
        prefix = np.concatenate([P[0], a[:j]])[None]
        logits = np.asarray(smollm2.model(jnp.asarray(prefix)).logits_BTV[0, -1])
        assert int(np.argmax(logits)) == a[j]
        assert logits[a[j]] - logits[b[j]] < 0.2, (j, logits[a[j]] - logits[b[j]])


@pytest.fixture(scope="module")
def sft_dpo_batches(smollm2, imdb_ids):
    B, T = 2, 64
    tokens = imdb_ids[:B, :T]
    sft = {"tokens": tokens, "completion_mask": np.concatenate([np.zeros((B, 16)), np.ones((B, T - 16))], 1)
           .astype(np.float32), "segment_ids": np.ones((B, T), np.int32),
           "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}
    pairs = np.stack([imdb_ids[:B, :T], np.concatenate([imdb_ids[:B, :16], imdb_ids[B:2 * B, 16:T]], 1)], 1)
    dpo = {"tokens": pairs, "completion_mask": np.repeat(sft["completion_mask"][:, None], 2, 1),
           "segment_ids": np.ones((B, 2, T), np.int32), "positions": np.broadcast_to(sft["positions"][:, None],
                                                                                      (B, 2, T)).copy()}
    return sft, dpo


def _jax_run(pre, dtype, algo, sft_batch, dpo_batch, lr, steps):
    from jaxrlhf.algos.dpo import dpo_extra, dpo_step
    from jaxrlhf.algos.sft import sft_step
    from jaxrlhf.config import DPOConfig, OptimConfig, SFTConfig
    from jaxrlhf.sharding import MeshConfig, make_mesh, place_batch
    from jaxrlhf.train_state import init_sharded_state, jit_step, make_optimizer

    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    pre.model.cfg = pre.cfg.replace(dtype=dtype)
    graphdef, params = nnx.split(pre.model)
    tx = make_optimizer(OptimConfig(lr=lr, schedule="constant", max_grad_norm=1.0), 10)
    if algo == "sft":
        state, sh = init_sharded_state(params, tx, mesh)
        step = jit_step(sft_step, mesh, sh, static_kwargs=dict(graphdef=graphdef, tx=tx, cfg=SFTConfig()))
        batch, args = place_batch(sft_batch, mesh), ()
    else:
        cfg = DPOConfig(beta=0.1)
        state, sh = init_sharded_state(params, tx, mesh, dpo_extra(cfg))
        step = jit_step(dpo_step, mesh, sh, static_kwargs=dict(graphdef=graphdef, tx=tx, cfg=cfg))
        batch, args = place_batch(dpo_batch, mesh), (jax.device_put(params, sh.params),)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch, *args)
        losses.append(float(metrics["loss"]))
    return np.asarray(losses)


def _torch_run(autocast, algo, sft_batch, dpo_batch, lr, steps):
    """The same run as a plain PyTorch loop (AdamW, clip 1.0), f32 or AMP (autocast bf16, f32 weights)."""
    import copy

    import torch
    import torch.nn.functional as F

    from test_hf_io import load_smol_reference   # transformers' GGUF loading, with or without accelerate

    torch.manual_seed(0)
    model = load_smol_reference().train()
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, eps=1e-8)

    def logps(m, ids, mask):  # sum of completion-token log-probs (mask at the predicted position)
        logits = m(input_ids=ids).logits[:, :-1].float()
        lp = torch.gather(F.log_softmax(logits, -1), 2, ids[:, 1:, None])[..., 0]
        return (lp * mask[:, 1:]).sum(-1)

    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if algo == "sft":
                ids = torch.as_tensor(sft_batch["tokens"], dtype=torch.long)
                mask = torch.as_tensor(sft_batch["completion_mask"])
                loss = -logps(model, ids, mask).sum() / mask[:, 1:].sum()
            else:
                B = dpo_batch["tokens"].shape[0]
                ids = torch.as_tensor(dpo_batch["tokens"], dtype=torch.long).permute(1, 0, 2).reshape(2 * B, -1)
                mask = torch.as_tensor(dpo_batch["completion_mask"]).permute(1, 0, 2).reshape(2 * B, -1)
                pol = logps(model, ids, mask)
                with torch.no_grad():
                    r = logps(ref, ids, mask)
                loss = -F.logsigmoid(0.1 * ((pol[:B] - r[:B]) - (pol[B:] - r[B:]))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return np.asarray(losses)


@pytest.mark.slow  # ~3 min on 2 cores: make test-all runs it
@pytest.mark.parametrize("algo", ["sft", "dpo"])
def test_smollm2_short_bf16_run_follows_f32_as_closely_as_pytorch_amp(smollm2, sft_dpo_batches, algo):
    """Four SFT or DPO steps on real text (2 rows x 64 tokens, lr 1e-5), bf16 vs f32, with PyTorch's own
    f32 and AMP (autocast bf16) runs of the same steps as the reference.

    Stated tolerance: at every step, |bf16 - f32| <= 1.5 x |AMP - f32 (PyTorch)| + 0.02 nats. (A fixed
    tolerance would be the wrong yardstick: a weight update of lr 1e-5 is below bf16's resolution for most
    weights, so ANY bf16-compute run sees its f32 master's updates only as they cross rounding steps, and
    on a single repeated batch Adam's sign-like first steps amplify that.) Also: jaxrlhf's f32 run equals
    PyTorch's f32 run within 2% (an independent check of the steps themselves)."""
    sft_batch, dpo_batch = sft_dpo_batches
    lr, steps = 1e-5, 4
    ours = {d: _jax_run(smollm2, d, algo, sft_batch, dpo_batch, lr, steps) for d in ("float32", "bfloat16")}
    theirs = {a: _torch_run(a, algo, sft_batch, dpo_batch, lr, steps) for a in (False, True)}
    print(f"{algo}: jaxrlhf f32 {np.round(ours['float32'], 4)} bf16 {np.round(ours['bfloat16'], 4)}; "
          f"PyTorch f32 {np.round(theirs[False], 4)} AMP {np.round(theirs[True], 4)}")
    np.testing.assert_allclose(ours["float32"], theirs[False], rtol=0.02, atol=0.01)
    gap_ours = np.abs(ours["bfloat16"] - ours["float32"])
    gap_amp = np.abs(theirs[True] - theirs[False])
    assert np.all(gap_ours <= 1.5 * gap_amp + 0.02), (gap_ours, gap_amp)
    assert abs(ours["float32"][-1] - ours["float32"][0]) > 0.01  # the runs move
