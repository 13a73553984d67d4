"""Scalar reward/value heads and last-token reads, checked against numpy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrlhf.models import bert
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.heads import ScalarHead, gather_last, last_token_index, sequence_reward
from jaxrlhf.models.hf import model_from_params


def _last_index_loop(seg: np.ndarray) -> np.ndarray:
    flat = seg.reshape(-1, seg.shape[-1])
    out = np.zeros(len(flat), np.int64)
    for i, row in enumerate(flat):
        for t in range(len(row)):
            if row[t] != 0:
                out[i] = t
    return out.reshape(seg.shape[:-1])


def _padded(lengths, T, left: bool) -> np.ndarray:
    seg = np.zeros((len(lengths), T), np.int32)
    for b, n in enumerate(lengths):
        if left:
            seg[b, T - n:] = 1
        else:
            seg[b, :n] = 1
    return seg


@pytest.mark.parametrize("left", [False, True])
def test_last_token_index_matches_loop(left):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 13, size=16)
    seg = _padded(lengths, 12, left)
    got = np.asarray(last_token_index(jnp.asarray(seg)))
    np.testing.assert_array_equal(got, _last_index_loop(seg))
    np.testing.assert_array_equal(got, 11 if left else lengths - 1)


def test_last_token_index_general_patterns_and_pair_axis():
    rng = np.random.default_rng(1)
    seg = rng.integers(0, 3, size=(4, 2, 10)).astype(np.int32)  # pads anywhere, packed ids, [B, 2, T]
    seg[0, 1] = 0  # a row with no real token -> 0
    got = np.asarray(last_token_index(jnp.asarray(seg)))
    assert got.shape == (4, 2)
    np.testing.assert_array_equal(got, _last_index_loop(seg))
    x = rng.normal(size=(4, 2, 10, 3)).astype(np.float32)
    picked = np.asarray(gather_last(jnp.asarray(x), jnp.asarray(got)))
    ref = np.stack([[x[b, p, got[b, p]] for p in range(2)] for b in range(4)])
    np.testing.assert_array_equal(picked, ref)
    with pytest.raises(ValueError, match="idx shape"):
        gather_last(jnp.asarray(x[:3]), jnp.asarray(got))


def test_sequence_reward_reads_last_token_and_ignores_right_padding():
    rng = np.random.default_rng(2)
    lengths = np.array([5, 1, 7, 3])
    seg = _padded(lengths, 7, left=False)
    values = rng.normal(size=(4, 7)).astype(np.float32)
    r = np.asarray(sequence_reward(jnp.asarray(values), jnp.asarray(seg)))
    np.testing.assert_array_equal(r, values[np.arange(4), lengths - 1])
    # longer T: extra padding columns hold junk values, the reward does not change
    values_long = np.concatenate([values, rng.normal(size=(4, 5)).astype(np.float32)], axis=1)
    seg_long = np.concatenate([seg, np.zeros((4, 5), np.int32)], axis=1)
    np.testing.assert_array_equal(np.asarray(sequence_reward(jnp.asarray(values_long), jnp.asarray(seg_long))), r)
    with pytest.raises(ValueError, match="segment_ids shape"):
        sequence_reward(jnp.asarray(values_long), jnp.asarray(seg))


def test_scalar_head_init_and_values():
    D = 4095
    head = ScalarHead(D, rngs=nnx.Rngs(0))
    w = np.asarray(head.kernel[...])
    assert w.shape == (D, 1) and head.kernel.logical_axes == ("embed", None)
    assert abs(w.std() / (1 / np.sqrt(D + 1)) - 1) < 0.05 and abs(w.mean()) < 3 / np.sqrt(D) / np.sqrt(D + 1)
    np.testing.assert_array_equal(np.asarray(head.bias[...]), 0.0)
    small = ScalarHead(6, rngs=nnx.Rngs(1))
    small.bias[...] = jnp.array([0.25])
    h = np.random.default_rng(3).normal(size=(2, 3, 6)).astype(np.float32)
    ref = h @ np.asarray(small.kernel[...])[:, 0] + 0.25
    out = small(jnp.asarray(h, jnp.bfloat16))
    assert out.dtype == jnp.float32 and out.shape == (2, 3)
    np.testing.assert_allclose(np.asarray(out), h.astype(jnp.bfloat16).astype(np.float32) @ np.asarray(
        small.kernel[...])[:, 0] + 0.25, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(small(jnp.asarray(h))), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="hidden_size"):
        ScalarHead(0, rngs=nnx.Rngs(0))


def test_reward_model_invariant_to_extra_padding():
    """Encoder + ScalarHead reward is unchanged by extra right padding (and, for RoBERTa, left padding)."""
    cfg = ModelConfig(family="roberta", vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=2,
                      intermediate_size=32, max_position_embeddings=32, hidden_act="gelu", type_vocab_size=1,
                      pad_token_id=1)
    shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: bert.Encoder(cfg, rngs=nnx.Rngs(0)))))
    rng = np.random.default_rng(4)
    params = jax.tree.map(lambda s: rng.normal(scale=0.2, size=s.shape).astype(np.float32), shapes)
    encoder = model_from_params(cfg, params)
    head = ScalarHead(cfg.hidden_size, rngs=nnx.Rngs(5))

    @nnx.jit
    def reward(encoder, head, tokens, seg):
        return sequence_reward(head(encoder(tokens, segment_ids_BT=seg).hidden_BTD), seg)

    lengths = [6, 2, 4]
    tokens = np.full((3, 6), 1, np.int32)
    for b, n in enumerate(lengths):
        tokens[b, :n] = rng.integers(3, 50, size=n)
    seg = (tokens != 1).astype(np.int32)
    r = np.asarray(reward(encoder, head, jnp.asarray(tokens), jnp.asarray(seg)))
    pad = np.ones((3, 5), np.int32)
    r_right = reward(encoder, head, jnp.asarray(np.concatenate([tokens, pad], 1)),
                     jnp.asarray(np.concatenate([seg, 0 * pad], 1)))
    np.testing.assert_allclose(np.asarray(r_right), r, atol=1e-5)
    left_tokens, left_seg = np.ones((3, 11), np.int32), np.zeros((3, 11), np.int32)
    for b, n in enumerate(lengths):
        left_tokens[b, 11 - n:], left_seg[b, 11 - n:] = tokens[b, :n], 1
    r_left = reward(encoder, head, jnp.asarray(left_tokens), jnp.asarray(left_seg))
    np.testing.assert_allclose(np.asarray(r_left), r, atol=1e-5)
    assert np.ptp(r) > 1e-3  # the rewards actually depend on the sequences
