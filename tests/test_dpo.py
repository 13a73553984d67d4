"""DPO family step: log 2 at the reference, numpy re-derivation of every loss, precomputed == in-step
reference, padding invariance, sharded == unsharded, KTO mismatched pairs, experiment files."""

import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrlhf.algos.dpo import build_kto_batch, dpo_extra, dpo_family_loss, dpo_step, eval_metrics, kto_examples, sequence_logps
from jaxrlhf.algos.dpo_losses import PREFERENCE_LOSSES
from jaxrlhf.config import ConfigError, DataConfig, DPOConfig, ExperimentConfig, load_config
from jaxrlhf.data.batching import build_preference_batch
from jaxrlhf.drivers.dpo import WithReference, collate_with_reference, precompute_reference
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.llama import Llama
from jaxrlhf.sharding import MeshConfig, make_mesh, place_batch
from jaxrlhf.train_state import init_sharded_state, jit_step

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=64)
T = 16
REPO = pathlib.Path(__file__).resolve().parents[1]


def make_pairs(rng, n=8):
    """(prompt, chosen, rejected) token lists of different lengths, all fitting T."""
    out = []
    for _ in range(n):
        p = rng.integers(1, CFG.vocab_size, int(rng.integers(2, 6)))
        c = rng.integers(1, CFG.vocab_size, int(rng.integers(1, T - len(p) + 1)))
        r = rng.integers(1, CFG.vocab_size, int(rng.integers(1, T - len(p) + 1)))
        out.append((p, c, r))
    return out


def split(seed):
    return nnx.split(Llama(CFG, rngs=nnx.Rngs(seed)))


def numpy_seq_logps(graphdef, params, seqs):
    """Sum of log p(completion | prompt) per (prompt, completion), from a float64 numpy log-softmax of the
    model's logits. Independent of masks, padding and jaxrlhf.ops: each sequence is run unmasked in its own
    row (filled up to T with junk tokens after its end; causal attention keeps them out of positions < n)."""
    ids = np.full((len(seqs), T), 7, np.int32)
    for i, (p, c) in enumerate(seqs):
        ids[i, :len(p) + len(c)] = np.concatenate([p, c])
    logits = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(ids), None, None).logits_BTV, np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return np.array([sum(logp[i, t - 1, ids[i, t]] for t in range(len(p), len(p) + len(c)))
                     for i, (p, c) in enumerate(seqs)])


@pytest.fixture(scope="module")
def setup():
    pairs = make_pairs(np.random.default_rng(0))
    gd, pol = split(0)
    _, ref = split(1)
    batch = build_preference_batch(pairs, T, pad_id=0)
    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    np_pol = numpy_seq_logps(gd, pol, seqs).reshape(2, -1).T
    np_ref = numpy_seq_logps(gd, ref, seqs).reshape(2, -1).T
    counts = np.array([[len(c), len(r)] for _, c, r in pairs], np.float64)
    return dict(pairs=pairs, gd=gd, pol=pol, ref=ref, batch=batch, np_pol=np_pol, np_ref=np_ref, counts=counts)


def test_sequence_logps_match_numpy_and_padding_side(setup):
    s = setup
    fn = jax.jit(functools.partial(sequence_logps, s["gd"]))
    right = fn(s["pol"], s["batch"])
    left = fn(s["pol"], build_preference_batch(s["pairs"], T, pad_id=0, padding_side="left"))
    longer = fn(s["pol"], build_preference_batch(s["pairs"], T + 7, pad_id=5))
    np.testing.assert_allclose(np.asarray(right.sums), s["np_pol"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(left.sums), np.asarray(right.sums), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(longer.sums), np.asarray(right.sums), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(right.counts), s["counts"])


def test_policy_equal_to_reference_gives_log2(setup):
    s = setup
    loss_sum, (n, metrics) = dpo_family_loss(s["pol"], jax.tree.map(jnp.asarray, s["batch"]), s["pol"],
                                             graphdef=s["gd"], cfg=DPOConfig(beta=0.3), beta=0.3)
    np.testing.assert_allclose(float(loss_sum / n), math.log(2.0), rtol=1e-6)
    assert float(metrics["rewards/margin"]) == 0.0 and float(metrics["rewards/accuracy"]) == 0.0


def _numpy_loss(name, cfg, pol, ref, counts, desirable=None):
    """The loss of ``name`` re-derived in numpy from independent log-probs [B, 2]."""
    logsig = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
    pm, rm = pol / counts, ref / counts
    if name == "dpo":
        h = cfg.beta * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]))
        eps = cfg.label_smoothing
        return np.mean(-(1 - eps) * logsig(h) - eps * logsig(-h))
    if name == "hinge":  # TRL: relu(1 - β h)
        h = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
        return np.mean(np.maximum(0.0, 1.0 - cfg.beta * h))
    if name == "robust":  # TRL: (-(1-ε) log σ(βh) + ε log σ(-βh)) / (1 - 2ε)
        h = cfg.beta * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]))
        eps = cfg.label_smoothing
        return np.mean((-(1 - eps) * logsig(h) + eps * logsig(-h)) / (1 - 2 * eps))
    if name == "ipo":
        return np.mean(((pm[:, 0] - rm[:, 0]) - (pm[:, 1] - rm[:, 1]) - 1 / (2 * cfg.beta)) ** 2)
    if name == "simpo":
        z = cfg.beta * (pm[:, 0] - pm[:, 1]) - cfg.simpo_gamma_beta_ratio * cfg.beta
        return np.mean(-(1 - cfg.label_smoothing) * logsig(z) - cfg.label_smoothing * logsig(-z))
    if name == "orpo":
        lo = lambda x: x - np.log1p(-np.exp(x))  # noqa: E731
        return np.mean(-pm[:, 0]) + cfg.beta * np.mean(-logsig(lo(pm[:, 0]) - lo(pm[:, 1])))
    if name == "kto":  # index 0 = example, index 1 = its mismatched pair
        z0 = max(np.mean(pol[:, 1] - ref[:, 1]), 0.0)
        r = pol[:, 0] - ref[:, 0]
        sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
        v = np.where(desirable, sig(cfg.beta * (r - z0)), sig(cfg.beta * (z0 - r)))
        return np.mean(1.0 - v)
    raise AssertionError(name)


@pytest.mark.parametrize("name,cfg", [
    ("dpo", DPOConfig(loss="dpo", beta=0.5)),
    ("dpo", DPOConfig(loss="dpo", beta=0.5, label_smoothing=0.2)),  # cDPO
    ("ipo", DPOConfig(loss="ipo", beta=0.5)),
    ("hinge", DPOConfig(loss="hinge", beta=0.5)),
    ("robust", DPOConfig(loss="robust", beta=0.5, label_smoothing=0.2)),
    ("simpo", DPOConfig(loss="simpo", beta=2.0, simpo_gamma_beta_ratio=0.3)),
    ("orpo", DPOConfig(loss="orpo", beta=0.2)),
    ("kto", DPOConfig(loss="kto", beta=0.5)),
])
def test_step_loss_equals_numpy_rederivation(setup, name, cfg):
    s = setup
    batch = dict(s["batch"])
    desirable = np.arange(len(s["pairs"])) % 3 != 0
    if name == "kto":
        batch["desirable"] = desirable
    loss_sum, (n, metrics) = dpo_family_loss(s["pol"], jax.tree.map(jnp.asarray, batch), s["ref"],
                                             graphdef=s["gd"], cfg=cfg, beta=cfg.beta)
    want = _numpy_loss(name, cfg, s["np_pol"], s["np_ref"], s["counts"], desirable)
    np.testing.assert_allclose(float(loss_sum / n), want, rtol=2e-5, atol=1e-5)
    assert set(metrics) >= {"loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "logps/chosen"}


# What each paper says about its loss (independent of the table): summed or length-normalised log-probs,
# and whether a reference enters it (and its implicit reward β(π - ref), else β π).
PAPER_FORMS = {"dpo": ("sum", True), "ipo": ("mean", True), "hinge": ("sum", True), "robust": ("sum", True),
               "simpo": ("mean", False), "orpo": ("mean", False), "kto": ("sum", True),
               "plackett_luce": ("sum", True)}


@pytest.mark.parametrize("name", sorted(PAPER_FORMS))
def test_losses_table_entry_agrees_with_the_paper_everywhere_it_is_read(setup, name):
    """The table is the one description of each loss: config validation accepts its name and asks for a
    reference exactly when the paper uses one; the step's loss moves with the reference exactly then; the
    held-out implicit rewards (eval_metrics) and the loss function's own reward metrics equal β(π - ref) /
    β π on the paper's form of log-probs, re-derived in numpy."""
    assert set(PREFERENCE_LOSSES) == set(PAPER_FORMS)  # a new entry must state its paper form here
    s = setup
    form, with_ref = PAPER_FORMS[name]
    cfg = DPOConfig(loss=name, beta=0.7)
    cfg.validate(ExperimentConfig(data=DataConfig(source="x"), algo=cfg))
    assert cfg.uses_reference == with_ref
    batch = jax.tree.map(jnp.asarray, dict(s["batch"]))
    if name == "kto":
        batch["desirable"] = jnp.asarray(np.arange(len(s["pairs"])) % 2 == 0)
    if name == "plackett_luce":  # a pair is a ranking of two: chosen rank 0, rejected rank 1
        batch["ranks"] = jnp.tile(jnp.arange(2, dtype=jnp.int32), (len(s["pairs"]), 1))
    loss = lambda ref: float(dpo_family_loss(s["pol"], batch, ref, graphdef=s["gd"], cfg=cfg, beta=cfg.beta)[0])  # noqa: E731
    moved = abs(loss(s["ref"]) - loss(s["pol"]))
    assert (moved > 1e-4) if with_ref else (moved == 0.0), moved
    pol = s["np_pol"] / (s["counts"] if form == "mean" else 1.0)
    ref = s["np_ref"] / (s["counts"] if form == "mean" else 1.0)
    want = cfg.beta * (pol - ref if with_ref else pol)
    out = {"sums": s["np_pol"], "counts": s["counts"]}
    m = eval_metrics(cfg, out, {"segment_ids": np.asarray(s["batch"]["segment_ids"]), "reference_logps": s["np_ref"]})
    np.testing.assert_allclose([m["reward_chosen"], m["reward_rejected"]], want.mean(0), rtol=1e-9)
    assert m["reward_accuracy"] == np.mean(want[:, 0] > want[:, 1])
    if name != "kto":  # KTO's loss reports its rewards over desirable examples only
        _, (_, metrics) = dpo_family_loss(s["pol"], batch, s["ref"], graphdef=s["gd"], cfg=cfg, beta=cfg.beta)
        np.testing.assert_allclose(float(metrics["rewards/chosen"]), want[:, 0].mean(), rtol=2e-4, atol=1e-4)


def test_config_rejects_names_and_settings_the_table_does_not_allow():
    exp = ExperimentConfig(data=DataConfig(source="x"))
    with pytest.raises(ConfigError, match=r"algo\.loss must be one of \['dpo', 'hinge', 'ipo', 'kto', 'orpo'"):
        DPOConfig(loss="sigmoid").validate(exp)
    takes = sorted(n for n, e in PREFERENCE_LOSSES.items() if e.label_smoothing)
    assert takes == ["dpo", "robust", "simpo"]  # cDPO, rDPO's flip rate, SimPO's smoothing
    for name in PREFERENCE_LOSSES:
        cfg = DPOConfig(loss=name, label_smoothing=0.1)
        if name in takes:
            cfg.validate(exp)
        else:
            with pytest.raises(ConfigError, match="algo.label_smoothing"):
                cfg.validate(exp)
    with pytest.raises(ConfigError, match="data.batch_size"):
        DPOConfig(loss="kto").validate(ExperimentConfig(data=DataConfig(source="x", batch_size=1)))


def _run(mesh_cfg, batch, cfg, *, ref_mode, devices=None, grad_accum=1):
    gd, params = split(0)
    _, ref = split(1)
    mesh = make_mesh(mesh_cfg, devices)
    # Plain SGD with lr 1: the parameter change IS the gradient, so the comparison is not distorted by
    # AdamW's first step (~lr * sign(g)), which turns float32 noise on near-zero gradients into lr-sized jumps.
    tx = optax.sgd(1.0)
    state, sh = init_sharded_state(params, tx, mesh, dpo_extra(cfg))
    step = jit_step(dpo_step, mesh, sh, static_kwargs=dict(graphdef=gd, tx=tx, cfg=cfg, grad_accum_steps=grad_accum))
    args = (jax.device_put(ref, sh.params),) if ref_mode == "model" else ()
    state, metrics = step(state, place_batch(batch, mesh), *args)
    return jax.device_get(state.params), jax.device_get(metrics)


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def one_device(setup):
    return _run(MeshConfig(1, 1, 1), setup["batch"], DPOConfig(beta=0.5), ref_mode="model",
                devices=jax.devices()[:1])


def test_precomputed_reference_equals_in_step_reference(setup, one_device):
    s = setup
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    collate = functools.partial(build_preference_batch, seq_len=T, pad_id=0)
    ex = precompute_reference(s["gd"], s["ref"], s["pairs"], collate, 3, lambda b: place_batch(b, mesh))  # 8 = 3+3+2(padded)
    assert isinstance(ex[0], WithReference) and len(ex) == len(s["pairs"])
    np.testing.assert_allclose(np.stack([e.reference_logps for e in ex]), s["np_ref"], rtol=1e-5, atol=1e-4)
    batch = collate_with_reference(collate)(ex)
    params_p, metrics_p = _run(MeshConfig(1, 1, 1), batch, DPOConfig(beta=0.5, reference="precomputed"),
                               ref_mode="precomputed", devices=jax.devices()[:1])
    params_m, metrics_m = one_device
    np.testing.assert_allclose(float(metrics_p["loss"]), float(metrics_m["loss"]), rtol=1e-5)
    assert max_diff(params_p, params_m) < 1e-5


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_dpo_step_equals_single_device(setup, one_device, mesh_shape):
    params_1, metrics_1 = one_device
    params_n, metrics_n = _run(MeshConfig(*mesh_shape), setup["batch"], DPOConfig(beta=0.5), ref_mode="model")
    # Tolerance: float32 reduction-order noise on gradients of size ~1e-2..1.
    assert abs(float(metrics_n["loss"]) - float(metrics_1["loss"])) < 1e-5
    assert max_diff(params_n, params_1) < 1e-5


def test_grad_accumulation_equals_big_batch(setup, one_device):
    params_1, metrics_1 = one_device
    params_4, metrics_4 = _run(MeshConfig(1, 1, 1), setup["batch"], DPOConfig(beta=0.5), ref_mode="model",
                               devices=jax.devices()[:1], grad_accum=4)
    assert abs(float(metrics_4["loss"]) - float(metrics_1["loss"])) < 1e-5
    assert max_diff(params_4, params_1) < 1e-5


def test_kto_examples_pair_every_completion_with_another_prompt(setup):
    pairs = setup["pairs"]
    ex = kto_examples(pairs, seed=3)
    assert len(ex) == 2 * len(pairs) and sum(e.desirable for e in ex) == len(pairs)
    completions = {}
    for i, (p, c, r) in enumerate(pairs):
        completions[c.tobytes()] = i
        completions[r.tobytes()] = i
    for e in ex:
        own = completions[e.completion_ids.tobytes()]
        assert completions[np.asarray(e.kl_completion_ids).tobytes()] != own
    batch = build_kto_batch(ex[:5], T, pad_id=0, batch_size=6)
    assert batch["tokens"].shape == (6, 2, T) and batch["desirable"].tolist()[-1] is False
    np.testing.assert_array_equal(batch["tokens"][0, 1, :len(ex[0].prompt_ids)], ex[0].prompt_ids)


def test_eval_metrics_count_only_real_pairs():
    cfg = DPOConfig(beta=1.0)
    seg = np.ones((3, 2, 4), np.int32)
    seg[2] = 0  # padding row
    out = {"sums": np.array([[-1.0, -3.0], [-2.0, -1.0], [9.0, 9.0]]), "counts": np.ones((3, 2))}
    batch = {"segment_ids": seg, "reference_logps": np.zeros((3, 2))}
    m = eval_metrics(cfg, out, batch)
    assert m["pairs"] == 2 and m["reward_accuracy"] == 0.5 and m["reward_margin"] == pytest.approx(0.5)


def test_dpo_experiment_loads_validates_and_sweeps():
    path = REPO / "experiments" / "dpo_hh_smollm2.py"
    cfg = load_config(path)
    assert isinstance(cfg.algo, DPOConfig) and cfg.algo.kind == "dpo" and cfg.data.eval_size == 312
    load_config(path, arg="full")
    from jaxrlhf.config import load_experiment_module
    sweep = load_experiment_module(path).sweep()
    assert len({(s.get("algo.loss"), s.get("algo.beta")) for s in sweep}) == len(sweep) >= 4
    for overrides in sweep:
        load_config(path, [f"--config.{k}={v}" for k, v in overrides.items()])


def test_config_errors_name_the_field():
    from jaxrlhf.config import ConfigError
    path = REPO / "experiments" / "dpo_hh_smollm2.py"
    with pytest.raises(ConfigError, match="algo.beta"):
        load_config(path, ["--config.algo.beta=0"])
    with pytest.raises(ConfigError, match="algo.label_smoothing"):
        load_config(path, ["--config.algo.loss=ipo", "--config.algo.label_smoothing=0.1"])
