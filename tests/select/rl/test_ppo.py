"""PPO pieces for RAISE: GAE, the per-cluster clipped surrogate, the value loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jraise.select.rl.ppo import clip_fraction, gae, ppo_loss, value_loss

gae_jit = jax.jit(gae)
loss_jit = jax.jit(ppo_loss, static_argnames="clip_eps")


def numpy_gae(rewards, values, gamma, lam):
    advantages = np.zeros(len(rewards))
    running = 0.0
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * values[t + 1] - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_recursion(gamma, lam):
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=7).astype(np.float32)
    values = np.append(rng.normal(size=7), 0.0).astype(np.float32)
    np.testing.assert_allclose(gae_jit(rewards, values, gamma, lam), numpy_gae(rewards, values, gamma, lam),
                               rtol=1e-5, atol=1e-6)


def test_gae_undiscounted_monte_carlo():
    # gamma = lam = 1 with a terminal value of 0: advantage = return-to-go minus the value.
    rewards = np.array([0.5, -0.25, 1.0], np.float32)
    values = np.array([0.2, 0.1, -0.3, 0.0], np.float32)
    np.testing.assert_allclose(gae_jit(rewards, values, 1.0, 1.0), [1.25 - 0.2, 0.75 - 0.1, 1.0 + 0.3], rtol=1e-6)
    with pytest.raises(AssertionError):
        gae(rewards, values[:3], 1.0, 1.0)


# Two steps x three clusters covering every case of the clip at eps = 0.2.
LOG_RATIOS = np.log(np.array([[1.1, 1.5, 0.6], [1.5, 0.6, 0.9]]))
OLD = np.array([[-1.0, -2.0, -0.5], [-3.0, -1.5, -2.5]])
NEW = OLD + LOG_RATIOS
ADV = np.array([2.0, -1.0])
ENTROPY = np.array([[0.5, 1.0, 1.5], [2.0, 0.1, 0.3]])
# Step 0 (A = +2): 1.1 in range; 1.5 clipped to 1.2 (upper side); 0.6 below the range but the min keeps 0.6 A.
# Step 1 (A = -1): 1.5 above the range, the min keeps 1.5 A; 0.6 clipped to 0.8 (lower side); 0.9 in range.
CLIPPED = np.array([[False, True, False], [False, True, False]])


def test_ppo_loss_hand_computation():
    surrogate = np.array([[1.1 * 2, 1.2 * 2, 0.6 * 2], [1.5 * -1, 0.8 * -1, 0.9 * -1]])
    expected = -surrogate.mean() - 0.01 * ENTROPY.mean()
    got = loss_jit(NEW.astype(np.float32), OLD.astype(np.float32), ADV.astype(np.float32), clip_eps=0.2,
                   entropy=ENTROPY.astype(np.float32), entropy_coef=0.01)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(ppo_loss(NEW, OLD, ADV, 0.2), -surrogate.mean(), rtol=1e-5)
    np.testing.assert_allclose(clip_fraction(NEW, OLD, 0.2), 4 / 6)
    with pytest.raises(ValueError, match="entropy"):
        ppo_loss(NEW, OLD, ADV, 0.2, entropy_coef=0.1)


def test_ppo_loss_gradient_is_zero_where_clipped():
    grad = np.asarray(jax.jit(jax.grad(ppo_loss), static_argnums=3)(
        jnp.asarray(NEW, jnp.float32), jnp.asarray(OLD, jnp.float32), jnp.asarray(ADV, jnp.float32), 0.2))
    np.testing.assert_array_equal(grad[CLIPPED], 0.0)
    # Unclipped: d/d new_logp of -mean(r A) is -r A / (T C), since dr / d new_logp = r.
    ratios = np.exp(LOG_RATIOS)
    expected = -ratios * ADV[:, None] / ratios.size
    np.testing.assert_allclose(grad[~CLIPPED], expected[~CLIPPED], rtol=1e-5)
    # No gradient reaches the rollout log-probabilities or the advantages.
    g_old, g_adv = jax.grad(ppo_loss, argnums=(1, 2))(jnp.asarray(NEW), jnp.asarray(OLD), jnp.asarray(ADV), 0.2)
    np.testing.assert_array_equal(g_old, 0.0)
    np.testing.assert_array_equal(g_adv, 0.0)


def test_value_loss():
    values = jnp.array([0.5, -1.0, 2.0])
    returns = jnp.array([1.0, -1.0, 0.0])
    loss, (g_values, g_returns) = jax.value_and_grad(value_loss, argnums=(0, 1))(values, returns)
    np.testing.assert_allclose(loss, 0.5 * np.mean([0.25, 0.0, 4.0]), rtol=1e-6)
    np.testing.assert_allclose(g_values, (values - returns) / 3, rtol=1e-6)
    np.testing.assert_array_equal(g_returns, 0.0)
