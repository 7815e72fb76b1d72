"""PPO pieces for RAISE on rlax: GAE advantages, the per-cluster clipped surrogate, the value loss.

Stage: ``jraise.select`` (RAISE, Lv, Li et al. 2025, arXiv 2504.07282; PPO: Schulman et al. 2017,
arXiv 1707.06347; GAE: Schulman et al. 2016, arXiv 1506.02438). One episode is T selection steps;
step t's action is C independent per-cluster choices, each with its Plackett-Luce log-probability
(`jraise.select.rl.sampling.plackett_luce_logp`), and one scalar reward R_t = P(M_t) - P(M_{t-1}).

    rewards [T], values [T + 1]                --gae-->       advantages [T]; returns = adv + values[:-1]
    new_logp, old_logp, entropy [T, C], adv [T] --ppo_loss-->  scalar
    values [T], returns [T]                    --value_loss--> scalar

Pure functions over one episode's arrays; vmap over episodes at the call site.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import rlax

__all__ = ["clip_fraction", "gae", "ppo_loss", "value_loss"]


def gae(rewards: jax.Array, values: jax.Array, gamma: float = 1.0, lam: float = 0.95) -> jax.Array:
    """Generalised advantage estimates ``[T]`` of one episode (`rlax.truncated_generalized_advantage_estimation`).

    ``A_t = sum_k (gamma lam)^k delta_{t+k}``, ``delta_t = r_t + gamma V(s_{t+1}) - V(s_t)``.

    Args:
      rewards: ``[T]`` reward of each step (R_t received after the action taken in state s_t).
      values: ``[T + 1]`` critic values of s_0..s_T. A RAISE episode ends after T steps, so pass
        ``values[T] = 0`` for a terminal end; pass V(s_T) to bootstrap a truncated rollout.
      gamma: discount (1.0 in RAISE: the undiscounted return telescopes to P(M_T) - P(M_0)).
      lam: GAE lambda.

    The value targets for `value_loss` are ``advantages + values[:-1]`` (lambda-returns).
    """
    chex.assert_rank([rewards, values], 1)
    chex.assert_shape(values, (rewards.shape[0] + 1,))
    rewards = jnp.asarray(rewards, jnp.float32)
    discounts = jnp.full(rewards.shape, gamma, jnp.float32)
    return rlax.truncated_generalized_advantage_estimation(rewards, discounts, lam, jnp.asarray(values, jnp.float32))


def ppo_loss(new_logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, clip_eps: float = 0.2,
             entropy: jax.Array | None = None, entropy_coef: float = 0.0) -> jax.Array:
    """Clipped-surrogate policy loss with one importance ratio per (step, cluster); scalar.

    ``r_{t,c} = exp(new_logp[t, c] - old_logp[t, c])``; every cluster's ratio multiplies its step's
    advantage ``A_t`` (the C per-cluster choices share the step's reward). The clipped surrogate
    ``-min(r A, clip(r, 1 - eps, 1 + eps) A)`` (`rlax.clipped_surrogate_pg_loss`) is averaged over
    steps and clusters, i.e. clusters are combined by their mean: each cluster's choice is clipped on
    its own, so one cluster moving far does not stop the others from learning, and the loss scale does
    not grow with C. Minus ``entropy_coef`` times the mean ``entropy`` (per step and cluster) is
    added, so higher entropy lowers the loss.

    Args:
      new_logp: ``[T, C]`` log-probabilities of the taken choices under the current policy.
      old_logp: ``[T, C]`` the same under the rollout policy (treated as constants).
      advantages: ``[T]`` (treated as constants; normalise them before if wanted).
      clip_eps: epsilon of the clip.
      entropy: optional ``[T, C]`` policy entropy (e.g. `pl_first_pick_entropy`); needed when
        ``entropy_coef != 0``.
      entropy_coef: weight of the entropy bonus.
    """
    chex.assert_rank([new_logp, old_logp, advantages], [2, 2, 1])
    chex.assert_equal_shape([new_logp, old_logp])
    chex.assert_equal_shape_prefix([new_logp, advantages], 1)
    ratios = jnp.exp(jnp.asarray(new_logp, jnp.float32) - jax.lax.stop_gradient(jnp.asarray(old_logp, jnp.float32)))
    adv = jnp.broadcast_to(jnp.asarray(advantages, jnp.float32)[:, None], ratios.shape)
    loss = rlax.clipped_surrogate_pg_loss(ratios.reshape(-1), adv.reshape(-1), clip_eps)
    if entropy is not None:
        chex.assert_equal_shape([new_logp, entropy])
        loss = loss - entropy_coef * jnp.mean(jnp.asarray(entropy, jnp.float32))
    elif entropy_coef != 0.0:
        raise ValueError("entropy_coef is non-zero but no entropy was given")
    return loss


def value_loss(values: jax.Array, returns: jax.Array) -> jax.Array:
    """``0.5 * mean((values - returns)^2)`` (`rlax.l2_loss`); returns are targets (no gradient)."""
    chex.assert_equal_shape([values, returns])
    return jnp.mean(rlax.l2_loss(jnp.asarray(values, jnp.float32),
                                 jax.lax.stop_gradient(jnp.asarray(returns, jnp.float32))))


def clip_fraction(new_logp: jax.Array, old_logp: jax.Array, clip_eps: float = 0.2) -> jax.Array:
    """Share of (step, cluster) ratios outside ``[1 - eps, 1 + eps]``: a PPO diagnostic (scalar)."""
    chex.assert_equal_shape([new_logp, old_logp])
    return jnp.mean(jnp.abs(jnp.exp(new_logp - old_logp) - 1.0) > clip_eps)
