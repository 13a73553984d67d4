"""SFT step: sharded == unsharded, exact gradient accumulation, prompt masking, padding invariance."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrlhf.algos.sft import sft_loss, sft_step
from jaxrlhf.config import OptimConfig, SFTConfig
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.llama import Llama
from jaxrlhf.sharding import MeshConfig, make_mesh, place_batch
from jaxrlhf.train_state import init_sharded_state, jit_step, make_optimizer

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=64)


def make_batch(rng: np.random.Generator, B=8, T=16, padding_side="right"):
    """Random prompt/completion rows of different lengths, padded to T."""
    tokens = np.zeros((B, T), np.int32)
    mask = np.zeros((B, T), np.float32)
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        n = int(rng.integers(5, T + 1))
        p = int(rng.integers(1, n - 1))
        row = rng.integers(1, CFG.vocab_size, n)
        sl = slice(0, n) if padding_side == "right" else slice(T - n, T)
        tokens[b, sl] = row
        seg[b, sl] = 1
        pos[b, sl] = np.arange(n)
        m = np.zeros(n, np.float32)
        m[p:] = 1
        mask[b, sl] = m
    return {"tokens": tokens, "completion_mask": mask, "segment_ids": seg, "positions": pos}


def params_of(seed=0):
    model = Llama(CFG, rngs=nnx.Rngs(seed))
    return nnx.split(model)


def run_step(mesh_cfg, batch, grad_accum=1, devices=None):
    graphdef, params = params_of()
    mesh = make_mesh(mesh_cfg, devices)
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"), 10)
    state, sh = init_sharded_state(params, tx, mesh)
    if mesh.shape["fsdp"] * mesh.shape["tensor"] > 1:  # the layout really is sharded
        q = state.params["layers"]["q"]
        assert len(q[...].sharding.device_set) == mesh.size and not q[...].sharding.is_fully_replicated
    step = jit_step(sft_step, mesh, sh, static_kwargs=dict(graphdef=graphdef, tx=tx, cfg=SFTConfig(),
                                                           grad_accum_steps=grad_accum))
    state, metrics = step(state, place_batch(batch, mesh))
    return jax.device_get(state.params), jax.device_get(metrics)


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def reference():
    batch = make_batch(np.random.default_rng(0))
    params, metrics = run_step(MeshConfig(1, 1, 1), batch, devices=jax.devices()[:1])
    return batch, params, metrics


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_step_equals_single_device(reference, mesh_shape):
    batch, params_1, metrics_1 = reference
    params_n, metrics_n = run_step(MeshConfig(*mesh_shape), batch)
    assert abs(float(metrics_n["loss"]) - float(metrics_1["loss"])) < 1e-5
    # One AdamW step with lr 1e-2: parameters agree to float32 reduction-order noise.
    assert max_diff(params_n, params_1) < 2e-5


def test_grad_accumulation_equals_big_batch(reference):
    batch, params_1, metrics_1 = reference
    params_4, metrics_4 = run_step(MeshConfig(1, 1, 1), batch, grad_accum=4, devices=jax.devices()[:1])
    assert abs(float(metrics_4["loss"]) - float(metrics_1["loss"])) < 1e-5
    assert max_diff(params_4, params_1) < 2e-5


def test_loss_is_token_weighted_mean_over_completion_tokens():
    """Independent numpy re-derivation of the loss from the model's logits."""
    graphdef, params = params_of()
    batch = make_batch(np.random.default_rng(1))
    loss_sum, (n, _) = sft_loss(params, jax.tree.map(jnp.asarray, batch), graphdef=graphdef, cfg=SFTConfig())
    logits = np.asarray(nnx.merge(graphdef, params)(batch["tokens"], batch["positions"],
                                                     batch["segment_ids"]).logits_BTV, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    total, count = 0.0, 0.0
    for b in range(batch["tokens"].shape[0]):
        for t in range(1, batch["tokens"].shape[1]):
            if batch["completion_mask"][b, t]:
                total -= logp[b, t - 1, batch["tokens"][b, t]]
                count += 1
    assert float(n) == count
    np.testing.assert_allclose(float(loss_sum) / float(n), total / count, rtol=1e-5)


def test_prompt_tokens_carry_no_loss():
    """Changing prompt tokens' *targets* weight nothing: gradient wrt logits at prompt positions is 0."""
    graphdef, params = params_of()
    batch = jax.tree.map(jnp.asarray, make_batch(np.random.default_rng(2)))
    model = nnx.merge(graphdef, params)
    logits = model(batch["tokens"], batch["positions"], batch["segment_ids"]).logits_BTV

    def loss_of_logits(lg):
        from jaxrlhf.algos.sft import sft_token_losses
        return jnp.sum(sft_token_losses(lg, batch["tokens"]) * batch["completion_mask"])

    g = np.asarray(jax.grad(loss_of_logits)(logits))
    # logits at t predict token t+1: nonzero gradient exactly where completion_mask[t+1] == 1.
    predicts_completion = np.zeros(batch["tokens"].shape, bool)
    predicts_completion[:, :-1] = np.asarray(batch["completion_mask"])[:, 1:] > 0
    assert np.all(np.abs(g[~predicts_completion]).max(-1) == 0)
    assert np.all(np.abs(g[predicts_completion]).max(-1) > 0)


def test_left_and_right_padding_give_the_same_loss():
    graphdef, params = params_of()
    rng_state = np.random.default_rng(3)
    right = make_batch(rng_state, padding_side="right")
    left = make_batch(np.random.default_rng(3), padding_side="left")
    fn = functools.partial(sft_loss, graphdef=graphdef, cfg=SFTConfig())
    lr, (nr, _) = fn(params, jax.tree.map(jnp.asarray, right))
    ll, (nl, _) = fn(params, jax.tree.map(jnp.asarray, left))
    assert float(nr) == float(nl)
    np.testing.assert_allclose(float(lr), float(ll), rtol=1e-5)


def test_packed_equals_unpacked():
    """Several examples packed into one row (segment ids, restarted positions) give the same summed loss
    and token count as the same examples one per row: no attention or loss leaks across segments."""
    from jaxrlhf.data.batching import build_lm_batch, pack_lm_examples

    rng = np.random.default_rng(4)
    examples = [(rng.integers(1, 64, int(rng.integers(2, 6))), rng.integers(1, 64, int(rng.integers(1, 8))))
                for _ in range(9)]
    graphdef, params = params_of()
    fn = functools.partial(sft_loss, graphdef=graphdef, cfg=SFTConfig())
    packed = pack_lm_examples(examples, 32, 0)
    assert packed["tokens"].shape[0] < len(examples)  # really packed
    one_per_row = build_lm_batch(examples, 16, 0)
    lp, (np_, _) = fn(params, jax.tree.map(jnp.asarray, packed))
    lu, (nu, _) = fn(params, jax.tree.map(jnp.asarray, one_per_row))
    assert float(np_) == float(nu)
    np.testing.assert_allclose(float(lp), float(lu), rtol=1e-5)


def test_remat_and_bf16_policy():
    """Rematerialised blocks give the same gradients; bf16 compute keeps f32 master weights and a loss
    within bf16 rounding of the f32 loss."""
    graphdef, params = params_of()
    batch = jax.tree.map(jnp.asarray, make_batch(np.random.default_rng(5)))

    def grads_for(cfg):
        model = nnx.merge(graphdef, params)
        model.cfg = cfg
        g, p = nnx.split(model)
        return jax.jit(jax.grad(lambda p: sft_loss(p, batch, graphdef=g, cfg=SFTConfig())[0]))(p), g, p

    g_ref, _, _ = grads_for(CFG)
    g_remat, _, _ = grads_for(CFG.replace(remat="block"))
    assert max_diff(g_ref, g_remat) < 1e-6
    g_bf16, gd, p = grads_for(CFG.replace(dtype="bfloat16"))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g_bf16))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
    l32 = sft_loss(params, batch, graphdef=graphdef, cfg=SFTConfig())
    l16 = sft_loss(p, batch, graphdef=gd, cfg=SFTConfig())
    np.testing.assert_allclose(float(l16[0]) / float(l16[1][0]), float(l32[0]) / float(l32[1][0]), rtol=2e-2)
