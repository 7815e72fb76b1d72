"""`raise_selector`: a trained RAISE policy as a selector for a user's own JAX training loop.

    selector = raise_selector(policy, static, layout, per_cluster=b)
    state = selector.init(jax.random.key(0))
    for t in range(1, T + 1):
        indices, state = selector.select(state, StepInfo(step=t, total_steps=T, val_loss=last_val_loss))
        ... one optimizer step on pool rows ``indices`` (-1 entries are padding: skip them) ...

``init`` and ``select`` are pure; ``select`` is jit-able (``jax.jit(selector.select)``): the state
is a pytree (selection counts and a key), every shape is static (B = C x b indices per step).
Deployment takes the deterministic top-b of each cluster; ``stochastic=True`` samples as in
training. `Selector` is the contract every dynamic selector meets (SSPL's
`jraise.select.self_paced.self_paced_selector` too); ``raise_policy`` is the older name of
`raise_selector`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

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
    """What a selector needs from the training loop about the step about to be taken.

    ``step``: 1-based index of that step; ``total_steps``: T; ``val_loss``: validation loss of
    the current model M_{t-1} (RAISE's stage features read it); ``losses``: optional float [N],
    the per-example response losses of the current model over the pool (SSPL re-buckets the pool
    whenever they are given; the loop refreshes them as often as it likes and passes None in
    between). Selectors ignore the fields they do not use.
    """

    step: jax.Array
    total_steps: jax.Array
    val_loss: jax.Array = 0.0
    losses: jax.Array | None = None


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


class Selector(NamedTuple):
    """A dynamic selector: a pair of pure functions, like an optax transformation.

    ``init(key) -> state``: the starting state (a pytree) from a PRNG key.
    ``select(state, info: StepInfo) -> (indices, state)``: the pool rows of the step
    ``info.step``'s batch, int32 [batch_size] (-1 entries: padding, skip them), and the next
    state. Both are pure and ``select`` is jit-able with static shapes.
    ``batch_size``: B, the length of ``indices``.
    """

    init: Callable[[jax.Array], Any]
    select: Callable[[Any, StepInfo], tuple[jax.Array, Any]]
    batch_size: int


def raise_selector(actor: AcquisitionMLP, static: jax.Array, layout: ClusterLayout, per_cluster: int,
                   stage: str = "progress_and_perf", tau: float = 1.0, stochastic: bool = False) -> Selector:
    """A `Selector` over a pool with static features ``static`` [N, S] and clusters ``layout``.

    State: `SelectorState` (counts [N] float32, key). Each step scores the fused state (stage
    features from ``info.step``, ``info.total_steps``, ``info.val_loss``; static features;
    log1p(counts)) with ``actor`` and takes ``per_cluster`` examples of each of the C clusters
    (top-b, or Gumbel-top-b at temperature ``tau`` when ``stochastic``): B = C x per_cluster.
    """
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


raise_policy = raise_selector  # the older name, kept for existing callers
