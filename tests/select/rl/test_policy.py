"""RAISE policy: stage features, the fused 39-number state, the acquisition MLP and the critic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jraise.select.rl.policy import (
    AVAILABILITY,
    DIFFICULTY,
    SEMANTIC,
    STAGE,
    AcquisitionMLP,
    Critic,
    PolicyConfig,
    critic_summary,
    fused_state,
    score_pool,
    stage_features,
)

N = 7
RNG = np.random.default_rng(0)
STATIC = RNG.normal(size=(N, 36)).astype(np.float32)
COUNTS = np.array([0, 3, 0, 1, 0, 0, 2], np.int32)
fuse = jax.jit(fused_state)
summarise = jax.jit(critic_summary)


def test_config_checks():
    config = PolicyConfig()
    assert (config.state_dim, config.static_dim, config.summary_dim) == (39, 36, 76)
    with pytest.raises(ValueError, match="stage"):
        PolicyConfig(stage="progress")
    with pytest.raises(ValueError, match="tau"):
        PolicyConfig(tau=0.0)
    with pytest.raises(ValueError, match="activation"):
        PolicyConfig(activation="sigmoid")
    with pytest.raises(ValueError, match="state_dim"):
        PolicyConfig(state_dim=3)
    with pytest.raises(AttributeError):
        config.tau = 2.0  # frozen


def test_stage_features():
    np.testing.assert_allclose(stage_features(3, 10, 2.5, "progress_and_perf"), [0.3, -2.5], rtol=1e-6)
    np.testing.assert_allclose(stage_features(3, 10, None, "progress_pair"), [0.2, 0.3], rtol=1e-6)
    np.testing.assert_allclose(stage_features(1, 4, 9.0, "progress_pair"), [0.0, 0.25])
    traced = jax.jit(stage_features, static_argnames="kind")(jnp.int32(5), 10, jnp.float32(1.0), kind="progress_and_perf")
    np.testing.assert_allclose(traced, [0.5, -1.0])
    with pytest.raises(ValueError, match="val_loss"):
        stage_features(1, 10, None, "progress_and_perf")
    with pytest.raises(ValueError, match="stage kind"):
        stage_features(1, 10, 1.0, "other")


def test_fused_state_layout():
    stage = np.array([0.25, -1.5], np.float32)
    state = np.asarray(fuse(STATIC, COUNTS, stage))
    assert state.shape == (N, 39) and state.dtype == np.float32
    np.testing.assert_array_equal(state[:, STAGE], np.broadcast_to(stage, (N, 2)))
    np.testing.assert_array_equal(state[:, DIFFICULTY], STATIC[:, :4])
    np.testing.assert_array_equal(state[:, SEMANTIC], STATIC[:, 4:])
    np.testing.assert_allclose(state[:, AVAILABILITY], np.log1p(COUNTS), rtol=1e-6)
    assert AVAILABILITY == 38 and state[COUNTS == 0, AVAILABILITY].max() == 0.0


def test_actor_shapes_and_purity():
    config = PolicyConfig()
    actor = AcquisitionMLP(config, rngs=nnx.Rngs(0))
    state = fuse(STATIC, COUNTS, np.array([0.1, -2.0], np.float32))
    graphdef, params = nnx.split(actor)

    @jax.jit
    def scores(params, state):
        return nnx.merge(graphdef, params)(state)

    s = np.asarray(scores(params, state))
    assert s.shape == (N,)
    np.testing.assert_array_equal(s, scores(params, state))  # same params and state: same scores
    # Same seed: same parameters; another seed: other scores.
    np.testing.assert_array_equal(s, scores(nnx.split(AcquisitionMLP(config, rngs=nnx.Rngs(0)))[1], state))
    assert not np.allclose(s, scores(nnx.split(AcquisitionMLP(config, rngs=nnx.Rngs(1)))[1], state))
    # Each instruction is scored on its own row: permuting rows permutes scores; batch dims pass through.
    perm = RNG.permutation(N)
    np.testing.assert_allclose(scores(params, state[perm]), s[perm], rtol=1e-6, atol=1e-7)
    assert scores(params, jnp.stack([state, state])).shape == (2, N)
    # The small output layer makes the initial policy near-uniform.
    assert np.abs(s).max() < 0.5
    with pytest.raises(AssertionError):
        actor(jnp.zeros((N, 38)))


def test_actor_scores_depend_on_stage_and_availability():
    actor = AcquisitionMLP(PolicyConfig(output_scale=1.0), rngs=nnx.Rngs(3))
    f = jax.jit(lambda counts, stage: score_pool(actor, STATIC, counts, stage))
    base = f(COUNTS, jnp.array([0.1, -2.0]))
    assert not np.allclose(base, f(COUNTS, jnp.array([0.9, -2.0])))
    assert not np.allclose(base, f(COUNTS + 1, jnp.array([0.1, -2.0])))


def test_critic_summary_values():
    static = np.array([[1.0, -1.0], [3.0, 0.0], [5.0, 2.0], [7.0, 7.0]], np.float32)
    counts = np.array([0, np.e - 1, 0, np.e ** 3 - 1], np.float32)  # availability 0, 1, 0, 3
    stage = np.array([0.5, -2.0], np.float32)
    summary = np.asarray(summarise(fuse(static, counts, stage)))
    assert summary.shape == (2 * 2 + 4,)
    w = np.array([0.0, 0.25, 0.0, 0.75])
    mean = w @ static
    std = np.sqrt(w @ (static - mean) ** 2)
    np.testing.assert_allclose(summary, np.concatenate([stage, mean, std, [1.0, 0.5]]), rtol=1e-5, atol=1e-5)
    # Nothing selected yet: weighted statistics are zero, everything is "never selected".
    fresh = np.asarray(summarise(fuse(static, np.zeros(4, np.float32), stage)))
    np.testing.assert_allclose(fresh, np.concatenate([stage, [0, 0, 0, 0], [0.0, 1.0]]), atol=1e-6)


def test_critic_value_shape_mask_and_invariance():
    config = PolicyConfig()
    critic = Critic(config, rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(critic)
    value = jax.jit(lambda p, s, m: nnx.merge(graphdef, p)(s, m))
    state = fuse(STATIC, COUNTS, np.array([0.4, -1.0], np.float32))
    mask = np.ones(N, bool)
    v = value(params, state, mask)
    assert v.shape == () and np.isfinite(v)
    perm = RNG.permutation(N)
    np.testing.assert_allclose(value(params, state[perm], mask), v, rtol=1e-5, atol=1e-7)
    # Padding rows with any content do not change the value when masked out.
    padded = jnp.concatenate([state, 100.0 * jnp.ones((3, 39))])
    np.testing.assert_allclose(value(params, padded, np.r_[mask, np.zeros(3, bool)]), v, rtol=1e-5, atol=1e-7)
    # Gradients reach every critic parameter and are finite even before any selection.
    fresh = fuse(STATIC, np.zeros(N, np.int32), np.array([0.0, -1.0], np.float32))
    grads = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p)(fresh, mask)))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
