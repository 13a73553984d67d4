"""LoRA (jaxrlhf.models.lora; Hu et al. 2021): the factored projection against a numpy re-derivation (and
its dropout against a hand computation), the adapters' gradient against the full model's weight gradient
(dL/dB = (α/r) Aᵀ dL/dW at B = 0), LoRA DPO against full DPO, a LoRA SFT export read back by
``transformers`` (PyTorch), the config section, and (slow) reward-model and PPO runs whose checkpoints
hold only the adapters and heads."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrlhf import config as C
from jaxrlhf.algos.dpo import dpo_extra, dpo_family_loss, dpo_step
from jaxrlhf.data.batching import build_preference_batch
from jaxrlhf.drivers import core, run_experiment
from jaxrlhf.errors import ModelError
from jaxrlhf.models import lora as L
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.gpt2 import GPT2
from jaxrlhf.models.layers import dense
from jaxrlhf.models.llama import Llama
from jaxrlhf.sharding import MeshConfig, make_mesh, place_batch
from jaxrlhf.train_state import init_sharded_state, jit_step

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=64)
ALL = ("q", "k", "v", "o", "gate", "up", "down")
T = 16


@functools.cache
def tiny(seed: int, cfg: ModelConfig = CFG, cls=Llama):
    """``(graphdef, params)`` of a random model: matrices ~ N(0, 0.1²), vectors (norms, biases) ~ 1 + N(0, 0.1²),
    drawn with numpy into the abstract model's tree (no init kernels to compile)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(seed))))
    rng = np.random.default_rng(seed)
    draw = lambda x: jnp.asarray((0.0 if len(x.shape) >= 2 else 1.0) + 0.1 * rng.normal(size=x.shape), x.dtype)  # noqa: E731
    return graphdef, jax.tree.map(draw, abstract)


def lora_cfg(**kw):
    return C.LoraConfig(**{"rank": 4, "alpha": 8.0, "targets": ALL, **kw})


def expected_adapter_params(cfg: ModelConfig, targets, r: int) -> int:
    """Σ over targets of L·(n_in·r + r·n_out), from the architecture's widths (not from our trees)."""
    D, H, K, d, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    io = {"q": (D, H * d), "k": (D, K * d), "v": (D, K * d), "o": (H * d, D), "gate": (D, F), "up": (D, F),
          "down": (F, D)}
    return cfg.num_layers * sum(r * (io[t][0] + io[t][1]) for t in targets)


# ------------------------------------------------------------------------------------------- the projection

@pytest.mark.parametrize("in_axes", [1, 2])
def test_lora_dense_equals_numpy_wx_plus_scaled_bax(in_axes):
    rng = np.random.default_rng(0)
    ins, outs = ((6,), (2, 4)) if in_axes == 1 else ((2, 3), (5,))  # q-like [D, H, d] / o-like [H, d, D]
    r, scale = 3, 8.0 / 3
    x = rng.normal(size=(2, 3, *ins)).astype(np.float32)
    w = rng.normal(size=(*ins, *outs)).astype(np.float32)
    a = rng.normal(size=(*ins, r)).astype(np.float32)
    b = rng.normal(size=(r, *outs)).astype(np.float32)
    n_in, n_out = math.prod(ins), math.prod(outs)
    x2 = x.reshape(-1, n_in).astype(np.float64)
    want = x2 @ w.reshape(n_in, n_out) + scale * (x2 @ a.reshape(n_in, r)) @ b.reshape(r, n_out)
    got = dense(jnp.asarray(x), L.LoraWeight(w, a, b, scale), in_axes=in_axes)
    assert got.shape == (2, 3, *outs)
    np.testing.assert_allclose(np.asarray(got).reshape(-1, n_out), want, rtol=1e-5, atol=1e-5)


def test_lora_dropout_rate_zero_is_no_dropout_and_rate_half_matches_hand_computation():
    rng = np.random.default_rng(1)
    D, O, r, scale, p = 8, 6, 2, 2.0, 0.5
    x = rng.normal(size=(3, 5, D)).astype(np.float32)
    w, a, b = (rng.normal(size=s).astype(np.float32) for s in ((D, O), (D, r), (r, O)))
    key = jax.random.key(7)
    plain = np.asarray(dense(jnp.asarray(x), L.LoraWeight(w, a, b, scale)))
    rate0 = np.asarray(dense(jnp.asarray(x), L.LoraWeight(w, a, b, scale, 0.0, key)))
    np.testing.assert_array_equal(rate0, plain)
    got = np.asarray(dense(jnp.asarray(x), L.LoraWeight(w, a, b, scale, p, key)))
    # By hand: the mask is bernoulli(key, 1 - p) over the [rows, D] input of the adapter; kept entries are
    # scaled by 1/(1-p); the frozen path sees the undropped x.
    x2 = x.reshape(-1, D).astype(np.float64)
    keep = np.asarray(jax.random.bernoulli(key, 1 - p, x2.shape))
    assert 0 < keep.mean() < 1
    want = x2 @ w + scale * ((x2 * keep / (1 - p)) @ a) @ b
    np.testing.assert_allclose(got.reshape(-1, O), want, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(got - plain)) > 1e-2


# ------------------------------------------------------------------------------------------- trees

def test_adapters_start_at_the_base_model_and_merge_equals_factored():
    gd, params = tiny(0)
    lc = lora_cfg()
    train, frozen = L.init_lora(params, lc, CFG, jax.random.key(1))
    assert L.num_params(train) == expected_adapter_params(CFG, ALL, 4)
    assert train["layers"]["o"]["lora_a"].shape == (2, 4, 8, 4) and train["layers"]["o"]["lora_b"].shape == (2, 4, 32)
    assert train["layers"]["q"]["lora_a"].logical_axes == ("layers", "embed", None)  # rank axis unsharded
    assert train["layers"]["q"]["lora_b"].logical_axes == ("layers", None, "heads", "head_dim")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, T)), jnp.int32)
    logits = jax.jit(lambda st: nnx.merge(gd, st)(tokens).logits_BTV)
    base_logits = logits(params)
    np.testing.assert_array_equal(np.asarray(logits(L.with_adapters(frozen, train, lc))),
                                  np.asarray(base_logits))  # B = 0: exactly the base
    rng = np.random.default_rng(2)
    moved = jax.tree.map(lambda v: v + 0.05 * rng.normal(size=v.shape).astype(np.float32), train)
    factored = np.asarray(logits(L.with_adapters(frozen, moved, lc)))
    merged = np.asarray(logits(L.merge_weights(frozen, moved, lc)))
    np.testing.assert_allclose(factored, merged, atol=2e-5)
    assert np.max(np.abs(factored - np.asarray(base_logits))) > 1e-2
    # GPT-2 has no gate projection.
    g2 = ModelConfig(family="gpt2", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                     num_kv_heads=2, max_position_embeddings=32, tie_word_embeddings=True, hidden_act="gelu_new")
    _, p2 = tiny(0, g2, GPT2)
    with pytest.raises(ModelError, match="gate"):
        L.add_adapters(p2, lc, g2, jax.random.key(0))
    assert L.num_params(L.add_adapters(p2, lora_cfg(targets=("q", "o", "up")), g2, jax.random.key(0))) == \
        4 * (16 + 16) + 4 * (16 + 16) + 4 * (16 + 32)


# ------------------------------------------------------------------------------------------- DPO

def _pairs(n=8):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        p = rng.integers(1, 64, int(rng.integers(2, 6)))
        out.append((p, rng.integers(1, 64, int(rng.integers(1, T - len(p) + 1))),
                    rng.integers(1, 64, int(rng.integers(1, T - len(p) + 1)))))
    return build_preference_batch(out, T, pad_id=0)


def test_lora_dpo_starts_at_full_dpo_trains_only_adapters_and_its_reference_is_the_base():
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    batch = place_batch(_pairs(), mesh)
    gd, pol = tiny(0)
    _, ref = tiny(1)  # a reference other than the policy: the step-0 loss is not log 2
    dcfg = C.DPOConfig(beta=0.5)
    # Full DPO's loss (jaxrlhf's own full-model path); its logps/chosen is the base policy's mean chosen logp.
    full = jax.jit(lambda p, r, b: dpo_family_loss(p, b, r, graphdef=gd, cfg=dcfg, beta=dcfg.beta))
    sum_f, (n_f, m_f) = full(pol, ref, batch)
    loss_f = float(sum_f / n_f)
    assert abs(loss_f - math.log(2)) > 1e-3
    # LoRA DPO on the same policy (B = 0), through the drivers' Trainable and jit_step.
    cfg = C.ExperimentConfig(model=C.ModelSpec(lora=lora_cfg()), train=C.TrainConfig(seed=3))
    tr = core.trainable(cfg, jax.tree.map(jnp.copy, pol), CFG, mesh)
    base0 = jax.device_get(tr.base)
    tx = optax.adam(1e-2)
    state, sh = init_sharded_state(tr.params, tx, mesh, dpo_extra(dcfg))
    step = jit_step(tr.step(dpo_step), mesh, sh, static_kwargs=dict(graphdef=gd, cfg=dcfg, tx=tx))
    state, m = step(state, batch, *tr.step_args, ref)
    np.testing.assert_allclose(float(m["loss"]), loss_f, rtol=1e-6)
    # Train on with the policy's own reference (adapters disabled = the base, the same arrays).
    _, (_, m_base) = full(pol, pol, batch)
    losses = []
    for _ in range(4):
        state, m = step(state, batch, *tr.step_args, tr.base)
        losses.append(float(m["loss"]))
        # rewards/chosen = β (log π - log π_ref) averaged over pairs; logps/chosen = the mean log π.
        ref_chosen = float(m["logps/chosen"]) - float(m["rewards/chosen"]) / dcfg.beta
        np.testing.assert_allclose(ref_chosen, float(m_base["logps/chosen"]), rtol=1e-5, atol=1e-4)
    assert losses[0] < math.log(2) and losses[-1] < losses[0] - 1e-3, losses  # B != 0 after step 1, and falling
    for x, y in zip(jax.tree.leaves(jax.device_get(tr.base)), jax.tree.leaves(base0)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # the base is untouched
    assert {p[-1] for p, _ in nnx.to_flat_state(state.params)} == {"lora_a", "lora_b"}
    assert np.abs(np.asarray(state.params["layers"]["v"]["lora_b"][...])).max() > 0
    assert L.num_params(state.opt_state) == 2 * L.num_params(state.params) + 1  # Adam's mu, nu, count: adapters only


@pytest.mark.slow
def test_adapter_gradient_is_the_chain_rule_of_the_full_weight_gradient():
    """At B = 0: dL/dB = (α/r) Aᵀ dL/dW and dL/dA = 0 (W = W0 + (α/r) A B), per layer, for the DPO loss."""
    batch = jax.tree.map(jnp.asarray, _pairs())
    gd, pol = tiny(0)
    _, ref = tiny(1)
    dcfg, lc = C.DPOConfig(beta=0.5), lora_cfg()
    adapters, base = L.init_lora(pol, lc, CFG, jax.random.key(3))
    full = jax.jit(jax.grad(lambda p: dpo_family_loss(p, batch, ref, graphdef=gd, cfg=dcfg, beta=0.5)[0]))
    lora = jax.jit(jax.grad(lambda ad, b: dpo_family_loss(ad, batch, ref, graphdef=L.bind(gd, b, lc), cfg=dcfg,
                                                          beta=0.5)[0]))
    g_full, g_lora = full(pol), lora(adapters, base)
    s = lc.alpha / lc.rank
    for name in ALL:
        gw = np.asarray(g_full["layers"][name][...], np.float64)
        a = np.asarray(adapters["layers"][name]["lora_a"][...], np.float64)
        gb = np.asarray(g_lora["layers"][name]["lora_b"][...])
        for layer in range(CFG.num_layers):
            a2 = a[layer].reshape(-1, lc.rank)
            want = s * a2.T @ gw[layer].reshape(a2.shape[0], -1)
            np.testing.assert_allclose(gb[layer].reshape(lc.rank, -1), want, rtol=1e-4, atol=1e-7)
        assert np.abs(gw).max() > 0
        np.testing.assert_array_equal(np.asarray(g_lora["layers"][name]["lora_a"][...]), 0.0)


# ------------------------------------------------------------------------------------------- config

def test_config_section_overrides_and_errors_name_the_field():
    cfg = C.ExperimentConfig(data=C.DataConfig(source="x"))
    cfg = C.apply_override(cfg, "model.lora.rank", "4")
    cfg = C.apply_override(cfg, "model.lora.targets", "(q,k,v,o)")
    assert cfg.model.lora == C.LoraConfig(rank=4, targets=("q", "k", "v", "o"))
    C.validate(cfg)
    assert C.apply_override(cfg, "model.lora", "none").model.lora is None
    for field, value, match in [("rank", 0, "model.lora.rank"), ("dropout", 1.0, "model.lora.dropout"),
                                ("targets", ("q", "wq"), "model.lora.targets"), ("alpha", 0.0, "model.lora.alpha")]:
        bad = C.apply_override(cfg, f"model.lora.{field}", str(value).replace("'", ""))
        with pytest.raises(C.ConfigError, match=match):
            C.validate(bad)
    ppo = C.ExperimentConfig(data=C.DataConfig(source="x"), algo=C.PPOConfig(),
                             model=C.ModelSpec(lora=C.LoraConfig(dropout=0.1)))
    with pytest.raises(C.ConfigError, match="model.lora.dropout must be 0 for ppo"):
        C.validate(ppo)
    g2 = ModelConfig(family="gpt2", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                     num_kv_heads=2, max_position_embeddings=32, hidden_act="gelu_new")
    _, p2 = tiny(0, g2, GPT2)
    with pytest.raises(C.ConfigError, match=r"model.lora.targets \['gate'\]"):
        core.trainable(C.ExperimentConfig(model=C.ModelSpec(lora=C.LoraConfig(targets=("q", "gate")))), p2, g2,
                       make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]))


# ------------------------------------------------------------------------------------------- end to end

def experiment(folder, run_dir, name, algo, data, lora, steps=3, **train):
    return C.ExperimentConfig(
        name=name, model=C.ModelSpec(name=str(folder), lora=lora),
        optim=C.OptimConfig(lr=2e-2, schedule="constant"),
        data=C.DataConfig(batch_size=8, use_chat_template=False, **data),
        train=C.TrainConfig(**{"steps": steps, "num_samples": 1, "sample_max_new_tokens": 4, "run_dir": str(run_dir),
                               **train}),
        algo=algo)


def checkpoint_leaves(run_dir: str) -> dict[str, tuple]:
    """``{path: shape}`` of the last checkpoint's train state, read from orbax's metadata."""
    from jaxrlhf.checkpoint import Checkpointer

    ck = Checkpointer(f"{run_dir}/checkpoints")
    meta = ck.manager.item_metadata(ck.latest_step())["state"]
    out = {jax.tree_util.keystr(p): tuple(getattr(x, "shape", ())) for p, x in jax.tree_util.tree_leaves_with_path(meta)}
    ck.close()
    return out


def test_lora_sft_export_reloads_in_transformers_with_our_merged_logits(tiny_llama_folder, shared_assets, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    data = dict(source=str(shared_assets / "alpaca-seed-tasks" / "seed_tasks.jsonl"), max_length=48,
                max_prompt_length=24, eval_size=0, limit=24)
    lc = lora_cfg(dropout=0.1)  # exercises the dropout path in a real step
    # No eval and no samples here (the slow reward/PPO test runs both on LoRA params): one compile.
    out = run_experiment(experiment(tiny_llama_folder, tmp_path, "lora_sft", C.SFTConfig(), data, lc,
                                    num_samples=0))
    adapters = jax.device_get(out["state"].params)
    model_cfg = core.load_policy(C.ModelSpec(name=str(tiny_llama_folder))).model_cfg
    assert L.num_params(adapters) == expected_adapter_params(model_cfg, ALL, 4)
    assert {p[-1] for p, _ in nnx.to_flat_state(adapters)} == {"lora_a", "lora_b"}
    # The checkpoint holds the adapters and their optimizer state, nothing of the base's size.
    leaves = checkpoint_leaves(out["run_dir"])
    n_ckpt = sum(math.prod(s) for s in leaves.values())
    assert n_ckpt <= 3 * L.num_params(adapters) + 8, (n_ckpt, L.num_params(adapters))

    base = core.load_policy(C.ModelSpec(name=str(tiny_llama_folder)))  # the base, reloaded from model.name
    tokens = np.random.default_rng(0).integers(0, model_cfg.vocab_size, (2, 12)).astype(np.int32)
    logits = jax.jit(lambda st: nnx.merge(base.graphdef, st)(jnp.asarray(tokens)).logits_BTV)
    ours = np.asarray(logits(L.merge_weights(base.params, adapters, lc)))
    factored = np.asarray(logits(L.with_adapters(base.params, adapters, lc)))
    plain = np.asarray(logits(base.params))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out["export_dir"], dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    # Tolerance: float32 on both sides, different kernels and summation orders (logits of size ~1).
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(factored, ours, atol=1e-4, rtol=1e-4)
    assert np.max(np.abs(ours - plain)) > 1e-3  # the adapters trained, and the export carries them


@pytest.mark.slow
def test_lora_reward_model_and_ppo_checkpoints_hold_only_adapters_and_heads(tiny_llama_folder, shared_assets,
                                                                             tmp_path):
    model_cfg = core.load_policy(C.ModelSpec(name=str(tiny_llama_folder))).model_cfg
    D = model_cfg.hidden_size
    hh = str(shared_assets / "hh-rlhf-harmless-base-test" / "test.jsonl.gz")
    pairs = dict(source=hh, split="test", max_length=48, max_prompt_length=24, eval_size=8, limit=16)
    lc = lora_cfg(targets=("q", "v"))
    n_adapters = expected_adapter_params(model_cfg, ("q", "v"), 4)

    rm = run_experiment(experiment(tiny_llama_folder, tmp_path, "lora_rm", C.RewardConfig(normalize_examples=8),
                                   pairs, lc, save_every=2))
    st = rm["state"]
    assert sorted(st.params) == ["backbone", "head"]
    assert L.num_params(st.params) == n_adapters + D + 1  # adapters + the scalar head's kernel and bias
    assert 2 * L.num_params(st.params) <= L.num_params(st.opt_state) <= 2 * L.num_params(st.params) + 4  # mu, nu, counts
    assert rm["export_dir"] and rm["hf_export_dir"]
    n_ckpt = sum(math.prod(s) for s in checkpoint_leaves(rm["run_dir"]).values())
    assert n_ckpt <= 3 * L.num_params(st.params) + 8

    import json
    rows = [{"prompt": f"The film number {i} was"} for i in range(16)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ppo = C.PPOConfig(rollout=C.RolloutConfig(max_new_tokens=4), kl=C.KLConfig(coef=0.05),
                      reward=C.RewardSpec(functions=("jaxrlhf.rewards:word_count",)),
                      update=C.UpdateConfig(epochs=1, num_minibatches=1))
    out = run_experiment(experiment(tiny_llama_folder, tmp_path, "lora_ppo", ppo,
                                    dict(source=str(prompts), max_length=16, max_prompt_length=8, eval_size=8), lc))
    st = out["state"]
    assert sorted(st.params) == ["critic", "policy", "value_head"]  # separate critic: its own adapters
    assert L.num_params(st.params["policy"]) == L.num_params(st.params["critic"]) == n_adapters
    assert L.num_params(st.params) == 2 * n_adapters + D + 1
    assert 2 * L.num_params(st.params) <= L.num_params(st.opt_state) <= 2 * L.num_params(st.params) + 4
    n_ckpt = sum(math.prod(s) for s in checkpoint_leaves(out["run_dir"]).values())
    assert n_ckpt <= 3 * L.num_params(st.params) + 16
    assert out["export_dir"] and out["eval_after"]["kl"] != 0.0  # the adapters moved the policy off its base


@pytest.mark.slow
def test_lora_dpo_driver_starts_at_its_reference_and_samples_from_the_adapted_policy(tiny_llama_folder, shared_assets,
                                                                                      tmp_path):
    hh = str(shared_assets / "hh-rlhf-harmless-base-test" / "test.jsonl.gz")
    pairs = dict(source=hh, split="test", max_length=48, max_prompt_length=24, eval_size=8, limit=16)
    out = run_experiment(experiment(tiny_llama_folder, tmp_path, "lora_dpo", C.DPOConfig(beta=0.1), pairs,
                                    lora_cfg(targets=("q", "k", "v", "o"), dropout=0.05)))
    # Step 0: the policy (B = 0) equals its reference (the base), so every implicit reward is exactly 0.
    assert out["eval_before"]["reward_chosen"] == 0.0 and out["eval_before"]["reward_margin"] == 0.0
    assert out["eval_after"]["reward_chosen"] != 0.0
    assert len(out["samples_before"]) == len(out["samples_after"]) == 1
    st = out["state"]
    assert {p[-1] for p, _ in nnx.to_flat_state(st.params)} == {"lora_a", "lora_b"}
    assert 2 * L.num_params(st.params) <= L.num_params(st.opt_state) <= 2 * L.num_params(st.params) + 4
    assert out["export_dir"]
