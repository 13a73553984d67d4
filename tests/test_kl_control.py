"""Tests for jaxrlhf.kl_control (Ziegler et al. 2019 adaptive KL controller)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.kl_control import KLControllerState, adaptive_kl_update, fixed_kl_update, init_kl_controller


def np_rule(coef, kl, n_steps, target, horizon):
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)


@pytest.mark.parametrize(
    "kl,expected_direction",
    [(6.5, +1), (5.5, -1), (100.0, +1), (0.0, -1), (6.0, 0)],
)
def test_adaptive_update_rule(kl, expected_direction):
    target, horizon, n_steps = 6.0, 10000, 256
    state = init_kl_controller(0.2)
    new = jax.jit(adaptive_kl_update, static_argnames=("target", "horizon"))(
        state, jnp.float32(kl), n_steps, target=target, horizon=horizon
    )
    assert isinstance(new, KLControllerState) and new.coef.dtype == jnp.float32 and new.coef.shape == ()
    np.testing.assert_allclose(new.coef, np_rule(0.2, kl, n_steps, target, horizon), rtol=1e-6)
    assert np.sign(float(new.coef) - float(np.float32(0.2))) == expected_direction


def test_adaptive_update_clipping():
    state = KLControllerState(coef=jnp.float32(1.0))
    # Error clipped to +0.2 and -0.2 respectively.
    up = adaptive_kl_update(state, 50.0, 100, target=1.0, horizon=100)
    down = adaptive_kl_update(state, 0.1, 100, target=1.0, horizon=100)
    np.testing.assert_allclose(up.coef, 1.2, rtol=1e-6)
    np.testing.assert_allclose(down.coef, 0.8, rtol=1e-6)
    # Inside the band: not clipped (KL/target - 1 = 0.1).
    inside = adaptive_kl_update(state, 1.1, 50, target=1.0, horizon=100)
    np.testing.assert_allclose(inside.coef, 1.0 + 0.1 * 0.5, rtol=1e-6)


def test_repeated_updates_and_pytree():
    state = init_kl_controller(0.1)
    coef = 0.1
    for kl in (3.0, 9.0, 7.0, 2.0):
        state = adaptive_kl_update(state, kl, 512, target=6.0, horizon=10000)
        coef = np_rule(coef, kl, 512, 6.0, 10000)
    np.testing.assert_allclose(state.coef, coef, rtol=1e-5)
    leaves = jax.tree_util.tree_leaves(state)
    assert len(leaves) == 1
    # Works inside a scan (state carried in a train-state-like loop).
    kls = jnp.array([3.0, 9.0, 7.0, 2.0])
    final, _ = jax.lax.scan(
        lambda s, kl: (adaptive_kl_update(s, kl, 512, target=6.0, horizon=10000), None), init_kl_controller(0.1), kls
    )
    np.testing.assert_allclose(final.coef, coef, rtol=1e-5)


def test_fixed_update_and_validation():
    state = init_kl_controller(0.05)
    assert fixed_kl_update(state, 100.0, 10, target=1.0, horizon=5) is state
    with pytest.raises(ValueError, match="target"):
        adaptive_kl_update(state, 1.0, 1, target=0.0, horizon=10)
    with pytest.raises(ValueError, match="horizon"):
        adaptive_kl_update(state, 1.0, 1, target=1.0, horizon=0)
    with pytest.raises(ValueError, match="init_coef"):
        init_kl_controller(-1.0)
