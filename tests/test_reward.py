"""Reward models: last-token reads and padding, ranking == mean of its pairwise BT losses, numpy
re-derivations, sharded == unsharded, normalisation, save/load, the driver end to end, experiment files."""

import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrlhf.algos.reward import eval_metrics, normalization_stats, reward_loss, reward_outputs, reward_step
from jaxrlhf.config import RewardConfig, load_config
from jaxrlhf.data.batching import build_classification_batch, build_preference_batch, build_ranked_batch
from jaxrlhf.models.bert import Encoder
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.llama import Llama
from jaxrlhf.models.reward_model import (RewardModel, load_reward_model, save_reward_model, split_reward_model,
                                         stats_of, with_stats)
from jaxrlhf.sharding import MeshConfig, make_mesh, place_batch
from jaxrlhf.train_state import init_sharded_state, jit_step

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=64)
BERT = ModelConfig(family="bert", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=4, max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu",
                   norm_eps=1e-12, attention_bias=True, mlp_bias=True)
T = 16
REPO = pathlib.Path(__file__).resolve().parents[1]


def rm_of(num_outputs=1, seed=0, cfg=CFG, pooling="auto"):
    backbone = (Llama if cfg.family == "llama" else Encoder)(cfg, rngs=nnx.Rngs(seed))
    return RewardModel(backbone, num_outputs=num_outputs, pooling=pooling, rngs=nnx.Rngs(seed + 100))


def seq(rng, lo=1, hi=8):
    return rng.integers(1, CFG.vocab_size, int(rng.integers(lo, hi + 1)))


def make_pairs(rng, n=8):
    return [(seq(rng, 2, 5), seq(rng), seq(rng)) for _ in range(n)]


def jnp_batch(b):
    return jax.tree.map(jnp.asarray, b)


@jax.jit
def _forward(state, tokens, positions, segment_ids):
    return nnx.merge(*state)(tokens, positions, segment_ids)


def forward(rm, b):
    """The reward model on a batch dict, jitted (one compilation per shape)."""
    return np.asarray(_forward(nnx.split(rm), jnp.asarray(b["tokens"]), jnp.asarray(b["positions"]),
                               jnp.asarray(b["segment_ids"])))


def rewards_one_by_one(rm, sequences):
    """Reward of each sequence, recomputed without jaxrlhf's padding/pooling code: every sequence in its own
    row with no segment ids (junk tokens after its end; causal attention keeps them out of positions < n),
    the backbone's hidden state at position n - 1, then the head."""
    n = [len(x) for x in sequences]
    ids = np.full((len(sequences), max(n)), 7, np.int32)
    for i, x in enumerate(sequences):
        ids[i, :n[i]] = x
    hidden = np.asarray(rm.backbone(jnp.asarray(ids)).hidden_BTD)
    last = np.stack([hidden[i, n[i] - 1] for i in range(len(n))])
    return np.asarray(rm.head(jnp.asarray(last)), np.float64)


def test_reward_reads_last_token_invariant_to_padding():
    rng = np.random.default_rng(0)
    pairs = make_pairs(rng)
    rm = rm_of()
    out = {}
    for name, kw in {"right": dict(seq_len=T), "more_right": dict(seq_len=T + 9, pad_id=3),
                     "left": dict(seq_len=T, padding_side="left")}.items():
        out[name] = forward(rm, build_preference_batch(pairs, pad_id=kw.pop("pad_id", 0), **kw))
    assert out["right"].shape == (8, 2)
    np.testing.assert_allclose(out["more_right"], out["right"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["left"], out["right"], rtol=1e-5, atol=1e-5)
    # and equal to each sequence scored on its own, without any padding
    alone = rewards_one_by_one(rm, [np.concatenate([p, c]) for p, c, _ in pairs])
    np.testing.assert_allclose(out["right"][:, 0], alone, rtol=1e-5, atol=1e-5)
    # the reward changes when the last real token changes (it is read there, not at a pad slot)
    b = build_preference_batch(pairs, T, pad_id=0)
    n0 = int(b["segment_ids"][0, 0].sum())
    b["tokens"][0, 0, n0 - 1] = (b["tokens"][0, 0, n0 - 1] + 1) % CFG.vocab_size
    assert abs(float(forward(rm, b)[0, 0]) - out["right"][0, 0]) > 1e-6


def _ranked(rng, B=3, N=4):
    ex = []
    for _ in range(B):
        ex.append((seq(rng, 2, 4), [seq(rng) for _ in range(N)], list(rng.permutation(N))))
    return ex


def test_ranking_loss_in_step_is_mean_of_pairwise_bradley_terry():
    rng = np.random.default_rng(1)
    ex = _ranked(rng)
    rm = rm_of()
    gd, params, stats = split_reward_model(rm)
    batch = jnp_batch(build_ranked_batch(ex, T, pad_id=0))
    loss_sum, (n, metrics) = reward_loss(params, batch, graphdef=gd, stats=stats, cfg=RewardConfig(objective="ranking"))
    # independent recomputation: each completion scored alone, then the 6 BT losses of each prompt
    per_prompt = []
    for p, comps, ranks in ex:
        r = rewards_one_by_one(rm, [np.concatenate([p, c]) for c in comps])
        pair_losses = [np.logaddexp(0.0, -(r[i] - r[j])) for i, j in itertools.permutations(range(4), 2)
                       if ranks[i] < ranks[j]]
        assert len(pair_losses) == 6
        per_prompt.append(np.mean(pair_losses))
    assert float(n) == 3
    np.testing.assert_allclose(float(loss_sum / n), np.mean(per_prompt), rtol=1e-5)
    assert 0.0 <= float(metrics["rewards/accuracy"]) <= 1.0 and "rewards/std" in metrics


def test_pairwise_loss_with_margin_and_centring_matches_numpy():
    rng = np.random.default_rng(2)
    pairs = make_pairs(rng)
    rm = rm_of()
    gd, params, stats = split_reward_model(rm)
    batch = build_preference_batch(pairs, T, pad_id=0)
    batch["margin"] = rng.uniform(0, 1, len(pairs)).astype(np.float32)
    cfg = RewardConfig(margin=0.5, center_rewards_coef=0.1)
    loss_sum, (n, metrics) = reward_loss(params, jnp_batch(batch), graphdef=gd, stats=stats, cfg=cfg)
    rc = rewards_one_by_one(rm, [np.concatenate([p, c]) for p, c, _ in pairs])
    rr = rewards_one_by_one(rm, [np.concatenate([p, r]) for p, _, r in pairs])
    want = np.mean(np.logaddexp(0.0, -(rc - rr - 0.5 - batch["margin"]))) + 0.1 * np.mean((rc + rr) ** 2)
    np.testing.assert_allclose(float(loss_sum / n), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/accuracy"]), np.mean(rc > rr))
    np.testing.assert_allclose(float(metrics["rewards/std"]), np.std(np.concatenate([rc, rr])), rtol=1e-4)


@pytest.mark.parametrize("cfg", [CFG, BERT], ids=["decoder_last_token", "encoder_mean_pool"])
def test_classification_loss_matches_numpy(cfg):
    rng = np.random.default_rng(3)
    ex = [(seq(rng, 2, 12), int(rng.integers(0, 3))) for _ in range(4)]
    rm = rm_of(num_outputs=3, cfg=cfg)
    gd, params, stats = split_reward_model(rm)
    batch = jnp_batch(build_classification_batch(ex, T, pad_id=0))
    rcfg = RewardConfig(objective="classification", num_labels=3, score_label=1, label_smoothing=0.1)
    loss_sum, (n, metrics) = reward_loss(params, batch, graphdef=gd, stats=stats, cfg=rcfg)
    model = nnx.merge(gd, params, stats)  # each text alone, unpadded (no padding or masking involved)
    logits = np.stack([forward(model, {"tokens": x[None], "positions": np.arange(len(x))[None],
                                       "segment_ids": np.ones((1, len(x)), np.int32)})[0] for x, _ in ex])
    logits = logits.astype(np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    y = np.array([label for _, label in ex])
    target = 0.9 * np.eye(3)[y] + 0.1 / 3
    np.testing.assert_allclose(float(loss_sum / n), np.mean(-(target * logp).sum(-1)), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(logits.argmax(-1) == y))
    # the classifier's reward is the log-odds of score_label: log p1 - log(1 - p1)
    r = np.asarray(reward_outputs(params, stats, batch, graphdef=gd)["rewards"])
    np.testing.assert_allclose(r, logp[:, 1] - np.log1p(-np.exp(logp[:, 1])), rtol=1e-4, atol=1e-5)


def _run(mesh_cfg, batch, cfg, devices=None, grad_accum=1):
    gd, params, stats = split_reward_model(rm_of())
    mesh = make_mesh(mesh_cfg, devices)
    tx = optax.sgd(1.0)  # the parameter change is the gradient (no AdamW sign amplification of noise)
    state, sh = init_sharded_state(params, tx, mesh, extra=stats)
    step = jit_step(reward_step, mesh, sh, static_kwargs=dict(graphdef=gd, tx=tx, cfg=cfg, grad_accum_steps=grad_accum))
    state, metrics = step(state, place_batch(batch, mesh))
    return jax.device_get(state.params), jax.device_get(metrics)


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def pair_batch_and_reference():
    batch = build_preference_batch(make_pairs(np.random.default_rng(4)), T, pad_id=0)
    cfg = RewardConfig(center_rewards_coef=0.01)
    return batch, cfg, _run(MeshConfig(1, 1, 1), batch, cfg, devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_reward_step_equals_single_device(pair_batch_and_reference, mesh_shape):
    batch, cfg, (params_1, metrics_1) = pair_batch_and_reference
    params_n, metrics_n = _run(MeshConfig(*mesh_shape), batch, cfg)
    # Tolerance: float32 reduction-order noise on gradients of size ~1e-2..1.
    assert abs(float(metrics_n["loss"]) - float(metrics_1["loss"])) < 1e-5
    assert max_diff(params_n, params_1) < 1e-5


def test_ranking_step_sharded_equals_single_device():
    batch = build_ranked_batch(_ranked(np.random.default_rng(5), B=8), T, pad_id=0)
    cfg = RewardConfig(objective="ranking")
    params_1, metrics_1 = _run(MeshConfig(1, 1, 1), batch, cfg, devices=jax.devices()[:1])
    params_n, metrics_n = _run(MeshConfig(2, 2, 2), batch, cfg)
    assert abs(float(metrics_n["loss"]) - float(metrics_1["loss"])) < 1e-5
    assert max_diff(params_n, params_1) < 1e-5


def test_normalisation_gives_mean_zero_std_one_and_survives_save_load(tmp_path):
    rng = np.random.default_rng(6)
    rm = rm_of()
    gd, params, stats = split_reward_model(rm)
    batch = build_preference_batch(make_pairs(rng, 12), T, pad_id=0)
    raw = np.asarray(reward_outputs(params, stats, jnp_batch(batch), graphdef=gd)["rewards"])
    mean, std = normalization_stats(raw.reshape(-1))
    model = nnx.merge(gd, params, with_stats(stats, mean, std))
    b = jnp_batch(batch)
    scored = np.asarray(model.score(b["tokens"], b["positions"], b["segment_ids"]), np.float64)
    np.testing.assert_allclose([scored.mean(), scored.std()], [0.0, 1.0], atol=1e-5)
    assert stats_of(stats) == (0.0, 1.0)  # with_stats copies
    folder = save_reward_model(model, tmp_path / "rm")
    loaded, tok = load_reward_model(folder)
    assert tok is None and loaded.pooling == "last"
    again = np.asarray(loaded.score(b["tokens"], b["positions"], b["segment_ids"]))
    np.testing.assert_allclose(again, scored, rtol=1e-5, atol=1e-5)


def test_eval_metrics_skip_padding_rows():
    seg = np.ones((3, 2, 4), np.int32)
    seg[2] = 0
    m = eval_metrics("pairwise", {"rewards": np.array([[1.0, 0.0], [0.0, 2.0], [5.0, -5.0]])}, {"segment_ids": seg})
    assert m["pairs"] == 2 and m["accuracy"] == 0.5 and m["margin"] == pytest.approx(-0.5)
    m = eval_metrics("classification", {"rewards": np.zeros(3), "logits": np.array([[0, 1.0], [1.0, 0], [0, 9.0]])},
                     {"labels": np.array([1, 1, -1])})
    assert m["examples"] == 2 and m["accuracy"] == 0.5


@pytest.mark.parametrize("name", ["reward_hh_smollm2.py", "classifier_imdb_minilm.py"])
def test_experiment_files_load_and_validate(name):
    for arg in (None, "full"):
        cfg = load_config(REPO / "experiments" / name, arg=arg)
        assert cfg.algo.kind == "reward"
    cfg = load_config(REPO / "experiments" / name)
    if name.startswith("reward"):
        assert cfg.data.eval_size == 312 and cfg.algo.objective == "pairwise"
    else:
        assert cfg.algo.objective == "classification" and cfg.algo.eval_source


def test_config_errors_name_the_field():
    from jaxrlhf.config import ConfigError
    path = REPO / "experiments" / "classifier_imdb_minilm.py"
    with pytest.raises(ConfigError, match="algo.score_label"):
        load_config(path, ["--config.algo.score_label=2"])
    with pytest.raises(ConfigError, match="algo.margin"):
        load_config(path, ["--config.algo.margin=1.0"])
