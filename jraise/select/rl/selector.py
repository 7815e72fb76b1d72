"""`raise_policy`: a trained RAISE policy as a selector for a user's own JAX training loop.

    selector = raise_policy(policy, static, layout, per_cluster=b, total_steps=T)
    state = selector.init(jax.random.key(0))
    for t in range(1, T + 1):
        indices, state = selector.select(state, StepInfo(step=t, total_steps=T, val_loss=last_val_loss))
        ... one optimizer step on pool rows ``indices`` (-1 entries are padding: skip them) ...

``init`` and ``select`` are pure; ``select`` is jit-able (``jax.jit(selector.select)``): the state
is a pytree (selection counts and a key), every shape is static (B = C x b indices per step).
Deployment takes the deterministic top-b of each cluster; ``stochastic=True`` samples as in
training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jraise.select.rl.policy import AcquisitionMLP, fused_state, stage_features
from jraise.select.rl.sampling import (
    ClusterLayout,
    gumbel_top_b,
    plackett_luce_logp,
    top_b,
)


@struct.dataclass
class StepInfo:
    """What the selector needs from the training loop: the 1-based step about to be taken, the
    total number of steps, and the validation loss of the current model (M_{t-1})."""

    step: jax.Array
    total_steps: jax.Array
    val_loss: jax.Array = 0.0


@struct.dataclass
class SelectorState:
    counts: jax.Array  # [N] how often each example was selected
    key: jax.Array


def add_selections(counts: jax.Array, indices: jax.Array) -> jax.Array:
    """``counts`` [N] plus one for every pool index in ``indices`` (-1 entries: padding, ignored)."""
    return counts.at[jnp.maximum(indices, 0)].add((indices >= 0).astype(counts.dtype))


def choose_batch(actor, static: jax.Array, counts: jax.Array, stage: jax.Array, layout: ClusterLayout,
                 key: jax.Array, per_cluster: int, tau: float, stochastic: bool):
    """One selection decision, shared by training episodes and deployment: score the fused state,
    then per cluster Gumbel-top-b (``stochastic``) or top-b. Returns (picks [C, b] within clusters,
    their Plackett-Luce log-probability [C], pool indices [B])."""
    scores = layout.gather(actor(fused_state(static, counts, stage)))
    if stochastic:
        picked, logp = gumbel_top_b(key, scores, layout.valid, per_cluster, tau)
    else:
        picked = top_b(scores, layout.valid, per_cluster)
        logp = plackett_luce_logp(scores, layout.valid, picked, tau)
    return picked, logp, layout.pool_indices(picked).reshape(-1)


@dataclass(frozen=True)
class Selector:
    """A pair of pure functions, like an optax transformation."""

    init: Callable[[jax.Array], SelectorState]
    select: Callable[[SelectorState, StepInfo], tuple[jax.Array, SelectorState]]
    batch_size: int


def raise_policy(actor: AcquisitionMLP, static: jax.Array, layout: ClusterLayout, per_cluster: int,
                 stage: str = "progress_and_perf", tau: float = 1.0, stochastic: bool = False) -> Selector:
    """A `Selector` over a pool with static features ``static`` [N, S] and clusters ``layout``."""
    layout.check_budget(per_cluster)
    graphdef, params = nnx.split(actor)
    static = jnp.asarray(static, jnp.float32)
    n = static.shape[0]

    def init(key: jax.Array) -> SelectorState:
        return SelectorState(counts=jnp.zeros((n,), jnp.float32), key=key)

    def select(state: SelectorState, info: StepInfo) -> tuple[jax.Array, SelectorState]:
        stage_vec = stage_features(info.step, info.total_steps, info.val_loss, stage)
        key, sub = jax.random.split(state.key)
        _, _, indices = choose_batch(nnx.merge(graphdef, params), static, state.counts, stage_vec, layout, sub,
                                     per_cluster, tau, stochastic)
        return indices, SelectorState(counts=add_selections(state.counts, indices), key=key)

    return Selector(init=init, select=select, batch_size=int(layout.members.shape[0]) * per_cluster)
