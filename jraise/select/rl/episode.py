"""The fused policy-plus-learner step of RAISE, an episode as a `jax.lax.scan` over it, and the
O(T x B) rollout from which PPO recomputes everything it needs.

One step t (1-based), all on the device, one jitted function:

    stage_t = stage_features(t, T, val_loss(M_{t-1}))
    scores  = actor(fused_state(static, counts, stage_t))           [N]
    picks   = Gumbel-top-b per cluster on scores / tau  (or top-b)  [C, b] -> pool indices [B]
    batch   = rows ``indices`` of the device-resident token pool    [B, L]
    M_t     = one optimizer step of the LLM on the batch (LoRA or full)
    reward  = val_loss(M_{t-1}) - val_loss(M_t)                     (P = minus the validation loss)
    counts += how often each index was picked

The token pool lives on the device as [N, L] arrays padded to one length L (the longest example;
no buckets inside the scan, whose body has static shapes). The validation set is one fixed [V, L']
batch. A rollout keeps only the picks, their log-probabilities, rewards, validation losses and
stage features: O(T x B), never the [T, N] states, which `replay` rebuilds from the counts.

Keys: the sampling key of step t is ``fold_in(key, t)``, so a Python loop over `fused_step`
reproduces the scan exactly (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from jraise import parallel
from jraise.data.batching import make_batch
from jraise.data.pool import InstructionPool
from jraise.loglik import response_nll
from jraise.select.rl.policy import fused_state, stage_features
from jraise.select.rl.sampling import (
    ClusterLayout,
    pl_first_pick_entropy,
    plackett_luce_logp,
)
from jraise.select.rl.selector import add_selections, choose_batch
from jraise.train.step import accumulated_grads, cast_to


@struct.dataclass
class DevicePool:
    """A tokenised pool as device arrays padded to one length: ids, attention, loss mask [N, L]."""

    input_ids: jax.Array
    attention_mask: jax.Array
    loss_mask: jax.Array

    def rows(self, indices: jax.Array) -> dict:
        """The batch of ``indices`` [B] (-1: a padding row, masked out)."""
        safe = jnp.maximum(indices, 0)
        real = (indices >= 0).astype(jnp.float32)
        return {"input_ids": self.input_ids[safe], "attention_mask": self.attention_mask[safe] * (indices >= 0)[:, None],
                "loss_mask": self.loss_mask[safe] * real[:, None], "example_mask": real}


def device_pool(pool: InstructionPool, length: int | None = None) -> DevicePool:
    """Pads every example of ``pool`` to ``length`` (default: the longest) and moves it to the device."""
    length = int(length or max(pool.lengths))
    too_long = np.flatnonzero(np.asarray(pool.lengths) > length)
    if too_long.size:
        i = int(too_long[0])
        raise ValueError(f"{pool.source}: example {i} ({pool.ids[i]}) has {pool.lengths[i]} tokens, more than {length}")
    batch = make_batch(pool, np.arange(len(pool)), length)
    return DevicePool(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                      jnp.asarray(batch["loss_mask"]))


@dataclass(frozen=True)
class EpisodeConfig:
    """T steps of B = C x b examples; ``stochastic`` samples (training) else takes top-b."""

    steps: int
    per_cluster: int
    tau: float = 1.0
    stage: str = "progress_and_perf"
    stochastic: bool = True


@struct.dataclass
class Rollout:
    """What one episode keeps, O(T x B): picks [T, C, b] (positions in clusters), pool indices
    [T, B], log-probabilities [T, C], rewards [T], validation losses after each step [T], stage
    features [T, 2] and the validation loss before the first step []."""

    picked: jax.Array
    indices: jax.Array
    logp: jax.Array
    rewards: jax.Array
    val_losses: jax.Array
    stages: jax.Array
    val_loss0: jax.Array


def validation_loss(graphdef, dtypes, trainable, frozen, val: dict) -> jax.Array:
    """Mean response-token NLL of the fixed validation batch (dropout off)."""
    nll, tokens = response_nll(nnx.merge(graphdef, cast_to(trainable, dtypes), frozen, copy=True), val)
    return nll.sum() / jnp.maximum(tokens.sum(), 1.0)


LearnerStep = Callable[[Any, jax.Array], Any]
ValLossFn = Callable[[Any], jax.Array]


def make_raise_step(learner_step: LearnerStep, val_loss_fn: ValLossFn, actor_graphdef, config: EpisodeConfig,
                    learner_has_aux: bool = False):
    """``step(actor_state, carry, t, key, static, layout) -> (carry, outputs)``, pure; jit or scan it.

    carry = (learner state, counts [N] float32, validation loss of M_{t-1} [] float32); outputs:
    picked [C, b], indices [B] int32, logp [C], reward [], val_loss [], stage [2], and train_loss []
    when ``learner_has_aux`` (then ``learner_step`` returns ``(state, loss)``). ``t`` is 1-based;
    the sampling key is ``fold_in(key, t)``. See the module docstring for the equations.
    """

    def step(actor_state, carry, t, key, static, layout: ClusterLayout):
        state, counts, val_before = carry
        actor = nnx.merge(actor_graphdef, actor_state)
        stage = stage_features(t, config.steps, val_before, config.stage)
        picked, logp, indices = choose_batch(actor, static, counts, stage, layout, jax.random.fold_in(key, t),
                                             config.per_cluster, config.tau, config.stochastic)
        if learner_has_aux:
            state, train_loss = learner_step(state, indices)
        else:
            state, train_loss = learner_step(state, indices), None
        val_after = jnp.asarray(val_loss_fn(state), jnp.float32)
        counts = add_selections(counts, indices)
        outputs = {"picked": picked, "indices": indices, "logp": logp, "reward": val_before - val_after,
                   "val_loss": val_after, "stage": stage}
        if learner_has_aux:
            outputs["train_loss"] = jnp.asarray(train_loss, jnp.float32)
        return (state, counts, val_after), outputs

    return step


def make_raise_episode(learner_step: LearnerStep, val_loss_fn: ValLossFn, actor_graphdef, config: EpisodeConfig,
                       learner_has_aux: bool = False):
    """A jitted ``episode(actor_state, learner_state, static, layout, key) -> (learner_state,
    Rollout, train_losses)``: `make_raise_step` scanned over t = 1..T from ``learner_state`` (M_0).

    ``train_losses`` is [T] float32 when ``learner_has_aux``, else None. ``static`` [N, S] float32,
    ``layout`` a `ClusterLayout` over the same N rows; ``config.stochastic`` False takes top-b.
    """
    step = make_raise_step(learner_step, val_loss_fn, actor_graphdef, config, learner_has_aux)

    def episode(actor_state, learner_state, static, layout, key):
        val0 = jnp.asarray(val_loss_fn(learner_state), jnp.float32)
        counts = jnp.zeros((static.shape[0],), jnp.float32)

        def body(carry, t):
            return step(actor_state, carry, t, key, static, layout)

        (learner_state, _, _), out = jax.lax.scan(body, (learner_state, counts, val0),
                                                  jnp.arange(1, config.steps + 1))
        rollout = Rollout(out["picked"], out["indices"], out["logp"], out["reward"], out["val_loss"], out["stage"],
                          val0)
        return learner_state, rollout, out.get("train_loss")

    return jax.jit(episode)


def llm_learner(graphdef, tx, dtypes) -> tuple[LearnerStep, ValLossFn]:
    """jraise's LLM as a RAISE learner: ``(learner_step, val_loss_fn)`` over the state
    ``(trainable, opt_state, frozen, pool, val)``; ``learner_step`` returns ``(state, train loss)``
    (use it with ``learner_has_aux=True``). One step: the batch of ``indices`` from the device
    pool, one accumulated-gradient optimizer step (``tx``) of the trainable part; the validation
    loss is `validation_loss` of the fixed batch ``val``."""

    def learner_step(state, indices):
        trainable, opt_state, frozen, pool, val = state
        batch = jax.tree.map(lambda x: x[None], pool.rows(indices))
        grads, loss, _, _ = accumulated_grads(graphdef, dtypes, trainable, frozen, batch)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return (optax.apply_updates(trainable, updates), opt_state, frozen, pool, val), loss

    def val_loss_fn(state):
        trainable, _, frozen, _, val = state
        return validation_loss(graphdef, dtypes, trainable, frozen, val)

    return learner_step, val_loss_fn


def make_fused_step(graphdef, tx, dtypes, actor_graphdef, config: EpisodeConfig):
    """``step(actor_state, carry, t, key, static, layout, pool, val, frozen) -> (carry, outputs)``
    with carry = (trainable, opt_state, counts [N], val_loss []): `make_raise_step` around
    `llm_learner`. Pure; jit or scan it."""
    generic = make_raise_step(*llm_learner(graphdef, tx, dtypes), actor_graphdef, config, learner_has_aux=True)

    def step(actor_state, carry, t, key, static, layout: ClusterLayout, pool: DevicePool, val, frozen):
        trainable, opt_state, counts, val_before = carry
        (state, counts, val_after), outputs = generic(
            actor_state, ((trainable, opt_state, frozen, pool, val), counts, val_before), t, key, static, layout)
        return (state[0], state[1], counts, val_after), outputs

    return step


def make_episode(graphdef, tx, dtypes, actor_graphdef, config: EpisodeConfig):
    """A jitted ``episode(actor_state, trainable, opt_state, frozen, static, layout, pool, val, key)
    -> (trainable, opt_state, Rollout, train_losses [T])``: `make_raise_episode` around `llm_learner`.

    With an active `jraise.parallel` mesh the inputs are placed on it first: LLM weights and Adam
    state by the parameter rules (FSDP / tensor), the token pool and static features split by
    example over data x fsdp (kept whole when the mesh does not divide N), the rest replicated.
    """
    jitted = make_raise_episode(*llm_learner(graphdef, tx, dtypes), actor_graphdef, config, learner_has_aux=True)

    def run(actor_state, trainable, opt_state, frozen, static, layout, pool, val, key):
        mesh = parallel.active_mesh()
        if mesh is not None:  # see jraise.parallel: XLA partitions the scan from these placements
            trainable, opt_state, frozen = parallel.shard_params((trainable, opt_state, frozen), mesh)
            static, pool = parallel.shard_examples((static, pool), mesh)
            actor_state, layout, val, key = parallel.shard_replicated((actor_state, layout, val, key), mesh)
        state, rollout, train_losses = jitted(actor_state, (trainable, opt_state, frozen, pool, val), static, layout,
                                              key)
        return state[0], state[1], rollout, train_losses

    return run


def replay(actor, critic, static: jax.Array, layout: ClusterLayout, rollout: Rollout, tau: float):
    """Recomputes, under the CURRENT actor and critic, each step's Plackett-Luce log-probability of
    the stored picks [T, C], first-pick entropy [T, C] and state value [T] (the value of the state
    the step's decision was taken in). States are rebuilt from the counts, never stored."""

    steps = rollout.indices.shape[0]

    def body(_, xs):
        t, picked, stage = xs
        # The counts before step t, rebuilt from the O(T x B) picks of the earlier steps rather
        # than carried: a carried [N] vector would be saved at every step for the backward pass.
        earlier = jnp.where(jnp.arange(steps)[:, None] < t, rollout.indices, -1)
        counts = add_selections(jnp.zeros((static.shape[0],), jnp.float32), earlier.reshape(-1))
        state = fused_state(static, counts, stage)
        scores = layout.gather(actor(state))
        logp = plackett_luce_logp(scores, layout.valid, picked, tau)
        entropy = pl_first_pick_entropy(scores, layout.valid, tau)
        value = critic(state)
        return None, (logp, entropy, value)

    # Rematerialised, with no carry: differentiating the scan keeps only each step's O(B) inputs,
    # not the actor's [N, hidden] activations (nor an [N] carry) of every step, so the update's
    # memory does not grow with T x N.
    _, (logp, entropy, values) = jax.lax.scan(jax.checkpoint(body), None,
                                              (jnp.arange(steps), rollout.picked, rollout.stages))
    return logp, entropy, values
