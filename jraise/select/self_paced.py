"""Self-paced learning (SSPL): a dynamic selector that trains on easy examples first.

Self-paced learning (Kumar, Packer & Koller, "Self-Paced Learning for Latent Variable Models",
NeurIPS 2010) lets the current model decide what is easy: examples with a low loss under it are
learned first and harder ones are admitted as training goes on. This is the SSPL baseline of the
RAISE paper (Reinforced Adaptive Instruction Selection), in its bucketed form:

* the current model scores every pool example by its mean response NLL, l_i;
* the examples are cut into ``n_buckets`` = n equal-count buckets by that loss (`pace_buckets`:
  bucket 0 = the lowest losses, the easiest);
* at step t of T (1-based) the buckets 0..k are open, k = floor((t - 1) * n / T) (`open_bucket`):
  the first T / n steps see only the easiest bucket, the last ones the whole pool;
* each step's batch is ``batch_size`` distinct examples drawn uniformly from the open buckets
  (`self_paced_batch`, a Gumbel-top-k over a mask: static shapes, jit-able).

`self_paced_selector` packages that rule as a `jraise.select.Selector` (pure ``init`` / ``select``)
for a user's own JAX loop, which refreshes the losses whenever it likes and passes them in
``StepInfo(losses=...)``. `self_paced_finetune` runs the loop with the repository's own jitted
train step (losses refreshed every ``refresh_every`` steps, by one batched jitted pass); the
file-level job behind ``jraise select sspl`` is `jraise.jobs.self_paced.run_self_paced`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jraise.data.batching import (
    PAD_INDEX,
    length_buckets,
    make_batch,
    pick_bucket,
)
from jraise.data.pool import InstructionPool
from jraise.select.rl.selector import Selector, StepInfo, add_selections
from jraise.train.loop import per_example_nll, step_functions
from jraise.train.step import (
    MODEL_KEYS,
    SCHEDULES,
    assign_trainable,
    param_dtypes,
    split_trainable,
)


def pace_buckets(losses: jax.Array, n_buckets: int) -> jax.Array:
    """int32 [N]: each example's bucket by the quantile of its loss, 0 = easiest (lowest loss).

    Example of rank r (0-based, ascending loss, ties by the lower index) goes to bucket
    floor(r * n_buckets / N), so bucket sizes differ by at most one. For distinct losses this is
    the number of thresholds ``quantile(losses, j / n_buckets)`` (inverted CDF, j = 1..n-1) strictly
    below the loss. Pure and jit-able (``n_buckets`` static).
    """
    if n_buckets < 1:
        raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
    losses = jnp.asarray(losses)
    n = losses.shape[0]
    order = jnp.argsort(losses, stable=True)
    ranks = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return (ranks * n_buckets // max(n, 1)).astype(jnp.int32)


def open_bucket(step: jax.Array, total_steps: jax.Array, n_buckets: int) -> jax.Array:
    """The last open bucket k at 1-based ``step`` of ``total_steps``: floor((step-1) * n / T), in [0, n-1]."""
    k = (jnp.asarray(step, jnp.int32) - 1) * n_buckets // jnp.maximum(jnp.asarray(total_steps, jnp.int32), 1)
    return jnp.clip(k, 0, n_buckets - 1)


@partial(jax.jit, static_argnames=("n_buckets", "batch_size"))
def self_paced_batch(key: jax.Array, bucket_ids: jax.Array, step: jax.Array, total_steps: jax.Array,
                     n_buckets: int, batch_size: int) -> jax.Array:
    """int32 [batch_size]: distinct pool indices drawn uniformly from the open buckets 0..k.

    Gumbel-top-k over the open mask: every subset of the open examples is equally likely. When
    fewer than ``batch_size`` examples are open, the remaining entries are -1 (padding rows for
    `jraise.data.batching.make_batch`).
    """
    if batch_size > bucket_ids.shape[0]:
        raise ValueError(f"batch_size ({batch_size}) must be <= the pool size ({bucket_ids.shape[0]})")
    is_open = bucket_ids <= open_bucket(step, total_steps, n_buckets)
    noise = jax.random.gumbel(key, bucket_ids.shape)
    values, indices = jax.lax.top_k(jnp.where(is_open, noise, -jnp.inf), batch_size)
    return jnp.where(jnp.isfinite(values), indices, PAD_INDEX).astype(jnp.int32)


@struct.dataclass
class SelfPacedState:
    """The state of `self_paced_selector`.

    ``counts``: float32 [N], how often each example was selected (as RAISE's `SelectorState`).
    ``key``: the PRNG key from ``init``; it never changes: step t draws with
    ``fold_in(key, t)``, so a batch is a function of (key, t, bucket_ids) alone.
    ``bucket_ids``: int32 [N], each example's loss bucket from the latest losses given
    (`pace_buckets`), or None before any were given.
    """

    counts: jax.Array
    key: jax.Array
    bucket_ids: jax.Array | None = None


def self_paced_selector(n_examples: int, batch_size: int, *, n_buckets: int = 4) -> Selector:
    """SSPL as a `Selector` over a pool of ``n_examples`` (N) examples: ``batch_size`` (B) per step.

    ``init(key) -> SelfPacedState``: zero counts, the key, no buckets yet.
    ``select(state, info) -> (indices int32 [B], state)``: when ``info.losses`` (float [N], the
    current model's per-example response losses) is given, the pool is re-bucketed,
    ``bucket_ids = pace_buckets(losses, n_buckets)``, and the buckets are kept in the state
    until the next losses; otherwise the stored buckets are used. The batch is
    ``self_paced_batch(fold_in(key, step), bucket_ids, step, total_steps, n_buckets, B)``: B
    distinct examples uniform over buckets 0..floor((step - 1) * n_buckets / total_steps), and
    ``counts`` gains one for each. ``info.val_loss`` is not used.

    Pure and jit-able (``jax.jit(selector.select)``), static shapes. ``info.losses`` is a
    trace-time choice: None (keep the buckets) or an array (re-bucket). Since ``bucket_ids`` is
    None until the first losses arrive, a jitted ``select`` traces once for the first call and
    again for later ones (or pass losses on every call). The first call without any losses ever
    given raises ValueError. ``batch_size`` must be <= ceil(N / n_buckets), the easiest
    bucket's size, so every batch is full (no -1 padding).
    """
    problems = []
    for name, value in (("n_examples", n_examples), ("batch_size", batch_size), ("n_buckets", n_buckets)):
        if value < 1:
            problems.append(f"{name} must be >= 1, got {value}")
    if not problems and n_buckets > n_examples:
        problems.append(f"n_buckets ({n_buckets}) must be <= n_examples ({n_examples})")
    elif not problems and batch_size > math.ceil(n_examples / n_buckets):
        problems.append(f"batch_size ({batch_size}) must be <= the easiest bucket's size "
                        f"(ceil({n_examples} / n_buckets={n_buckets}) = {math.ceil(n_examples / n_buckets)})")
    if problems:
        raise ValueError("self_paced_selector: " + "; ".join(problems))

    def init(key: jax.Array) -> SelfPacedState:
        return SelfPacedState(counts=jnp.zeros((n_examples,), jnp.float32), key=key)

    def select(state: SelfPacedState, info: StepInfo) -> tuple[jax.Array, SelfPacedState]:
        bucket_ids = state.bucket_ids
        if info.losses is not None:
            losses = jnp.asarray(info.losses)
            if losses.shape != (n_examples,):
                raise ValueError(f"self_paced_selector: StepInfo.losses must have shape ({n_examples},) "
                                 f"(one loss per pool example), got {losses.shape}")
            bucket_ids = pace_buckets(losses, n_buckets)
        elif bucket_ids is None:
            raise ValueError("self_paced_selector: no per-example losses were given yet. SSPL buckets the pool by "
                             "the current model's losses, so pass StepInfo(..., losses=<float [N]>) at least on "
                             "the first step (and again whenever you refresh them).")
        indices = self_paced_batch(jax.random.fold_in(state.key, info.step), bucket_ids, info.step,
                                   info.total_steps, n_buckets, batch_size)
        return indices, SelfPacedState(counts=add_selections(state.counts, indices), key=state.key,
                                       bucket_ids=bucket_ids)

    return Selector(init=init, select=select, batch_size=batch_size)


def response_losses(eval_step: Callable, trainable, frozen, pool: InstructionPool, batch_size: int,
                    buckets) -> np.ndarray:
    """float32 [N]: every example's mean response NLL under the model (0 for no response tokens),
    by ``eval_step`` (from `make_eval_step`) over length-sorted batches padded to ``buckets``."""
    order = np.argsort(pool.lengths, kind="stable")  # similar lengths share a batch: less padding
    nll, tokens = per_example_nll(eval_step, trainable, frozen, pool, batch_size, buckets, order)
    return (nll / np.maximum(tokens, 1.0)).astype(np.float32)


def _check_args(pool: InstructionPool, steps: int, batch_size: int, lr: float, refresh_every: int, n_buckets: int,
                schedule: str) -> None:
    problems = []
    for name, value in (("steps", steps), ("batch_size", batch_size), ("refresh_every", refresh_every),
                        ("n_buckets", n_buckets)):
        if value < 1:
            problems.append(f"{name} must be >= 1, got {value}")
    if not lr > 0:
        problems.append(f"lr must be > 0, got {lr}")
    if schedule not in SCHEDULES:
        problems.append(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if n_buckets > len(pool):
        problems.append(f"n_buckets ({n_buckets}) must be <= the pool size ({len(pool)})")
    elif n_buckets >= 1 and batch_size > math.ceil(len(pool) / n_buckets):
        problems.append(f"batch_size ({batch_size}) must be <= the easiest bucket's size "
                        f"(ceil({len(pool)} / n_buckets={n_buckets}) = {math.ceil(len(pool) / n_buckets)})")
    if problems:
        raise ValueError("self_paced_finetune: " + "; ".join(problems))


def self_paced_finetune(model, pool: InstructionPool, steps: int, batch_size: int, lr: float, refresh_every: int = 10,
                        n_buckets: int = 4, seed: int = 0, schedule: str = "constant",
                        max_grad_norm: float | None = 1.0, shape_buckets: int = 4,
                        echo: Callable[[str], None] | None = None):
    """Fine-tunes ``model`` in place for ``steps`` self-paced steps (see the module docstring).

    The losses are refreshed before steps 1, 1 + refresh_every, ...; each step is one AdamW update
    (`make_optimizer` with ``schedule`` over ``steps``) on the batch `self_paced_selector` draws
    (initialised with the first half of ``jax.random.split(jax.random.key(seed))``).
    ``shape_buckets``: padded batch lengths to compile for. ``echo(line)`` gets progress lines.
    Returns (model, indices int64 [steps, batch_size]: the pool rows of each step's batch).
    """
    _check_args(pool, steps, batch_size, lr, refresh_every, n_buckets, schedule)
    graphdef, trainable, frozen = split_trainable(model)
    dtypes = param_dtypes(model)
    tx, train_step, eval_step = step_functions(
        graphdef, {"lr": lr, "total_steps": steps, "schedule": schedule, "max_grad_norm": max_grad_norm}, dtypes)
    opt_state = jax.jit(tx.init)(trainable)
    buckets = length_buckets(pool.lengths, shape_buckets)
    pick_key, dropout_key = jax.random.split(jax.random.key(seed))
    selector = self_paced_selector(len(pool), batch_size, n_buckets=n_buckets)
    pick_state = selector.init(pick_key)
    chosen = np.zeros((steps, batch_size), np.int64)
    for step in range(1, steps + 1):
        fresh = None
        if (step - 1) % refresh_every == 0:
            losses = response_losses(eval_step, trainable, frozen, pool, batch_size, buckets)
            fresh = jnp.asarray(losses)
            if echo is not None:
                echo(f"sspl: step {step}, pool loss {float(losses.mean()):.4f}, open buckets "
                     f"0..{int(open_bucket(step, steps, n_buckets))} of {n_buckets}")
        picked, pick_state = selector.select(pick_state, StepInfo(step=step, total_steps=steps, losses=fresh))
        rows = np.asarray(picked, np.int64)
        real = rows[rows != PAD_INDEX]
        batch = make_batch(pool, rows, pick_bucket(int(pool.lengths[real].max()), buckets))
        trainable, opt_state, metrics = train_step(trainable, opt_state, frozen,
                                                   {k: batch[k][None] for k in MODEL_KEYS},
                                                   jax.random.fold_in(dropout_key, step))
        chosen[step - 1] = rows
        if echo is not None and (step % refresh_every == 0 or step == steps):
            echo(f"sspl: step {step}/{steps}, batch loss {float(metrics['loss']):.4f}")
    assign_trainable(model, trainable)
    return model, chosen
