"""Beyond-IID intervention runs over the user's own JAX training step: N+1 fine-tunes of any model
-> per-category performance -> the interaction matrix Gamma.

Method: Beyond IID (Zhao, Du, Ju, Wu, Pan 2024, arXiv 2409.07045), section 2 of
``shared/methods/beyond_iid.md``. From a baseline subset D0 of the pool build R = N+1 training
sets (run 0 = D0, run k+1 = D0 with category ``names[k]`` changed by ``deltas[k]``), fine-tune the
same starting state on each with the same step, measure every run on every category and turn the
[R, N] table into ``Gamma[target, source]``::

    e_ij = (P_j(D^(i)) - P_j(D0)) / Delta_i      (sign flipped for the lower-is-better "loss")
    Gamma[j, i] = e_ij / e_jj                    (`jraise.select.interactions.interaction_matrix`)

Stage: ``jraise.select``, for callers outside jraise's own ``CausalLM`` and ``InstructionPool``.
`jraise.select.intervention` does the same for jraise's NNX model; this module shares its design
(`intervention_sets`, the common-random-number orders of `run_orders`, the fixed step budget,
`interaction_from_runs`, the ``"runs"`` device mesh of `run_mesh`) and asks the user only for::

    train_step(state, batch) -> state          pure, jit-able; one update on one batch
    batch_fn(indices) -> batch                 plain NumPy/JAX, called outside jit
    eval_fn(state) -> perf                     float [N] in ``names`` order, or {name: scalar}

Data flow::

    categories --intervention_sets--> D0, R index sets, deltas [N], names (sorted)
    R sets --run_orders--> pool indices [R, steps, B]
    per step s: batch_fn(orders[r, s]) for r < R, leaves stacked -> batch [R, ...]
    init_state stacked R times [R, ...] --jit(vmap(train_step)) x steps--> final states [R, ...]
    --jit(vmap(eval_fn))--> perf [R, N] --interaction_from_runs--> Gamma [N, N]

The contract, in full:

* ``state``: a pytree of arrays (and scalars); the whole of what changes during training (weights,
  optimizer moments, step counter, and any PRNG key the step splits). All runs start from the same
  ``init_state``, so a key kept in the state gives every run the same dropout draws (common random
  numbers, as jraise's own runs share theirs). ``train_step`` must return a state of the same
  structure, shapes and dtypes; it owns the optimizer, learning-rate schedule and loss, so the
  ``InterventionConfig`` fields about those (``lr``, ``schedule``, ``warmup_ratio``,
  ``weight_decay``, ``max_grad_norm``, ``accum``, ``n_buckets``, ``eval_batch_size``) are not read.
* ``indices``: int32 [B], ``B = config.batch_size``, every entry a real pool row (0 <= i <
  ``len(categories)``). There is no padding: `run_orders` cycles reshuffled epochs of each run's
  set, so every batch is full (a set smaller than B repeats records within a batch), and the step
  needs no mask.
* ``batch``: any pytree of arrays; every call must return the same structure, shapes and dtypes
  (one compiled program for all steps), e.g. ``{"x": X[indices], "y": Y[indices]}``.
* ``eval_fn``: jit-able; per-category performance on the user's held-out data. A float array [N]
  must follow ``names`` (the sorted distinct categories, `category_names`); a mapping is read by
  name. ``config.metric`` says how to read it: ``"loss"`` = lower is better (any loss),
  ``"exact_match"`` = higher is better (any accuracy or score).

Modes: ``"vmap"`` runs all R fine-tunes as one program per step, ``jit(vmap(train_step))`` over the
run axis, the run axis sharded over the devices when R is a multiple of their number
(`jraise.select.intervention.run_mesh`); ``"sequential"`` runs them one after another with
``jit(train_step)`` on the same batches, the same math up to float rounding.

Only the fixed step budget (``config.budget == "steps"``) is offered: every run takes
``config.steps`` updates, so the runs differ only in their data (see `jraise.select.intervention`).
Under ``budget="epochs"`` runs differ in length and each needs its own schedule length, which lives
inside the user's step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jraise.select.intervention import (
    MODES,
    InterventionConfig,
    interaction_from_runs,
    intervention_sets,
    run_mesh,
    run_orders,
)

__all__ = ["category_names", "evaluate_runs_fn", "measure_interactions_fn", "train_runs_fn"]

Pytree = Any


def category_names(categories: Sequence[str]) -> tuple[str, ...]:
    """The N category names in the order of ``perf``'s columns, ``deltas`` and Gamma's rows and
    columns: the distinct labels, as strings, sorted (as `intervention_sets` orders them)."""
    return tuple(sorted({str(c) for c in categories}))


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


def _signature(tree: Pytree) -> tuple:
    """(structure, (shape, dtype) per leaf): what must stay fixed for one compiled program."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(np.shape(x)), x.dtype if hasattr(x, "dtype") else jnp.result_type(x))
                          for x in leaves)


def _describe(signature: tuple) -> str:
    treedef, leaves = signature
    return f"{treedef} with leaves {[(s, str(d)) for s, d in leaves]}"


def _check_orders(orders: np.ndarray) -> np.ndarray:
    orders = np.asarray(orders)
    if orders.ndim != 3 or 0 in orders.shape or not np.issubdtype(orders.dtype, np.integer):
        raise ValueError(f"orders must be a non-empty integer array [R, steps, B], got {orders.dtype} "
                         f"{orders.shape}")
    if orders.min() < 0 or orders.max() > np.iinfo(np.int32).max:
        raise ValueError("orders must hold pool indices in [0, 2**31)")
    return orders.astype(np.int32)


def _stack(batches: Sequence[Pytree]) -> Pytree:
    """R batch pytrees -> one with leaves [R, ...] (host NumPy when every leaf is NumPy)."""
    return jax.tree.map(lambda *xs: np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs)
                        else jnp.stack(xs), *batches)


def _checked_batch(batch_fn: Callable, indices: np.ndarray, expected: tuple | None, where: str
                   ) -> tuple[Pytree, tuple]:
    batch = batch_fn(indices)
    got = _signature(batch)
    if expected is not None and got != expected:
        raise ValueError(f"batch_fn must return the same structure, shapes and dtypes for every batch "
                         f"(one compiled step); {where} gave {_describe(got)}, the first batch "
                         f"{_describe(expected)}")
    return batch, got


def _check_step(train_step: Callable, init_state: Pytree, batch: Pytree) -> None:
    """Trace one step abstractly: its state out must match its state in (fail before training)."""
    out = jax.eval_shape(train_step, init_state, batch)
    if _signature(out) != _signature(init_state):
        raise ValueError(f"train_step must return a state of the same structure, shapes and dtypes as it "
                         f"takes; got {_describe(_signature(out))} for {_describe(_signature(init_state))}")


def train_runs_fn(train_step: Callable[[Pytree, Pytree], Pytree], init_state: Pytree,
                  batch_fn: Callable[[np.ndarray], Pytree], orders: np.ndarray, *, mode: str = "vmap",
                  stats: dict | None = None) -> Pytree:
    """R fine-tunes of ``init_state`` (not modified) with the user's step; returns the final states
    stacked along a leading run axis (every leaf [R, ...]).

    ``orders``: pool indices [R, steps, B] (`run_orders`); at step s run r trains on
    ``batch_fn(orders[r, s])`` (int32 [B]). ``mode="vmap"``: one ``jit(vmap(train_step))`` call per
    step on the R batches stacked, the stacked state's buffers donated; ``mode="sequential"``: run
    after run with ``jit(train_step)`` on the same batches. See the module docstring for the
    contract. ``stats``, when given, gets ``mode``, ``runs``, ``steps`` and ``train_s`` (the loop,
    batch building and compilation included).
    """
    _check_mode(mode)
    orders = _check_orders(orders)
    n_runs, steps, _ = orders.shape
    first, expected = _checked_batch(batch_fn, orders[0, 0], None, "run 0, step 0")
    _check_step(train_step, init_state, first)

    start = time.perf_counter()
    if mode == "vmap":
        stacked_sharding, _ = run_mesh(n_runs)
        stack_state = jax.jit(
            lambda s: jax.tree.map(lambda x: jnp.broadcast_to(x, (n_runs, *jnp.shape(x))), s),
            out_shardings=stacked_sharding)
        step = jax.jit(jax.vmap(train_step), donate_argnums=0)

        def batch_at(s: int) -> Pytree:
            rows = [first if (r, s) == (0, 0) else
                    _checked_batch(batch_fn, orders[r, s], expected, f"run {r}, step {s}")[0]
                    for r in range(n_runs)]
            return jax.device_put(_stack(rows), stacked_sharding)

        state = stack_state(init_state)  # fresh buffers: donating them leaves init_state intact
        upcoming = batch_at(0)
        for s in range(steps):
            batch = upcoming
            state = step(state, batch)
            if s + 1 < steps:
                upcoming = batch_at(s + 1)  # built while the step runs
    else:
        step = jax.jit(train_step, donate_argnums=0)
        finals = []
        for r in range(n_runs):
            state = jax.tree.map(lambda x: jnp.array(x, copy=True), init_state)  # donated below
            for s in range(steps):
                batch = first if (r, s) == (0, 0) else _checked_batch(batch_fn, orders[r, s], expected,
                                                                      f"run {r}, step {s}")[0]
                state = step(state, batch)
            finals.append(state)
        state = jax.tree.map(lambda *xs: jnp.stack(xs), *finals)
    jax.block_until_ready(state)
    if stats is not None:
        stats.update({"mode": mode, "runs": n_runs, "steps": steps, "train_s": time.perf_counter() - start})
    return state


def _perf_columns(out, names: Sequence[str]):
    """eval_fn's output -> an array [..., N] in ``names`` order (a mapping is read by name)."""
    if isinstance(out, Mapping):
        missing = [n for n in names if n not in out]
        if missing:
            raise ValueError(f"eval_fn's mapping lacks categories {missing} (has {sorted(map(str, out))})")
        return jnp.stack([jnp.asarray(out[n]) for n in names], axis=-1)
    return out


def _check_eval(eval_fn: Callable, state: Pytree, names: Sequence[str]) -> None:
    """Trace eval_fn abstractly on one (unstacked) state: it must give N per-category numbers."""
    out = jax.eval_shape(lambda s: _perf_columns(eval_fn(s), names), state)
    shape = getattr(out, "shape", None)
    if shape != (len(names),):
        raise ValueError(f"eval_fn must return per-category performance of shape ({len(names)},) in the "
                         f"order of {list(names)} (or a mapping name -> scalar), got "
                         f"{shape if shape is not None else type(out).__name__}")


def evaluate_runs_fn(eval_fn: Callable[[Pytree], Any], stacked_states: Pytree, names: Sequence[str], *,
                     mode: str = "vmap") -> np.ndarray:
    """Per-category performance of each run: float64 [R, N], columns in ``names`` order.

    ``mode="vmap"``: ``jit(vmap(eval_fn))`` over the run axis of ``stacked_states``;
    ``mode="sequential"``: ``jit(eval_fn)`` on one run's state after another.
    """
    _check_mode(mode)
    names = tuple(names)
    leads = {int(np.shape(x)[0]) if np.ndim(x) else None for x in jax.tree.leaves(stacked_states)}
    if len(leads) != 1 or None in leads:
        raise ValueError(f"stacked_states must have one leading run axis on every leaf, got leading sizes "
                         f"{sorted(leads, key=str)}")
    n_runs = leads.pop()
    _check_eval(eval_fn, jax.tree.map(lambda x: x[0], stacked_states), names)
    columns = lambda s: _perf_columns(eval_fn(s), names)  # noqa: E731
    if mode == "vmap":
        perf = jax.jit(jax.vmap(columns))(stacked_states)
    else:
        one = jax.jit(columns)
        perf = jnp.stack([one(jax.tree.map(lambda x, r=r: x[r], stacked_states)) for r in range(n_runs)])
    return np.asarray(jax.device_get(perf), np.float64)


def measure_interactions_fn(train_step: Callable[[Pytree, Pytree], Pytree], eval_fn: Callable[[Pytree], Any],
                            init_state: Pytree, categories: Sequence[str],
                            batch_fn: Callable[[np.ndarray], Pytree], config: InterventionConfig, *,
                            mode: str = "vmap") -> dict:
    """The whole Beyond-IID measurement over the user's step: sets, R fine-tunes, perf, Gamma.

    Args:
      train_step: ``train_step(state, batch) -> state``, pure and jit-able (module docstring).
      eval_fn: ``eval_fn(state) -> perf``: float [N] in `category_names` order, or {name: scalar}.
      init_state: the starting state, the same for every run; not modified.
      categories: one category label per pool record (the pool is whatever ``batch_fn`` indexes).
      batch_fn: ``batch_fn(indices int32 [B]) -> batch``, called outside jit.
      config: the design and budget. Read: ``delta_fraction``, ``base_fraction``/``base_size``
        (D0 and Delta_k, `intervention_sets`), ``steps`` and ``batch_size`` (the fixed step
        budget, `run_orders`), ``seed`` (D0, the added/removed records, the data orders: the only
        randomness here), ``metric`` ("loss": lower is better; "exact_match": higher is better),
        ``self_effect_floor`` and ``relative_self_effect_floor`` (passed to `interaction_matrix`),
        ``budget`` (must be "steps"). The optimizer fields belong to ``train_step``.
      mode: "vmap" (one program per step over all runs) or "sequential" (same numbers).

    Returns a dict: ``names`` (N sorted categories), ``deltas`` int64 [N], ``base_counts`` (n0 per
    category), ``set_sizes`` [R], ``base_indices`` (D0, sorted pool rows), ``perf`` float64 [R, N]
    (row 0 = D0, row k+1 = ``names[k]`` changed by ``deltas[k]``), ``gamma`` float64 [N, N]
    (``gamma[target, source]``, unit diagonal), ``metric``, ``higher_is_better``, ``mode``,
    ``stacked_states`` (the R final states, leaves [R, ...]) and ``timings`` (sets_s, train_s,
    eval_s, total_s).

    Raises ValueError before training on a bad design, ``budget="epochs"``, or a step/eval whose
    shapes break the contract. When Gamma itself fails (a category whose own effect is not positive
    and no floor is set), the ValueError carries the finished runs as its ``result`` attribute
    (the dict above with ``gamma`` None), so the training is not lost.
    """
    _check_mode(mode)
    if config.budget != "steps":
        raise ValueError(f"budget={config.budget!r}: only the fixed step budget ('steps') is supported over a "
                         "user's train_step (runs of different lengths need per-run schedules, which live "
                         "inside the step)")
    total_start = time.perf_counter()
    start = time.perf_counter()
    labels = list(categories)
    base, sets, deltas, names = intervention_sets(labels, config)
    orders = run_orders(sets, config.steps, config.batch_size, config.seed)
    sets_s = time.perf_counter() - start
    _check_eval(eval_fn, init_state, names)  # fail before training

    stats: dict = {}
    stacked = train_runs_fn(train_step, init_state, batch_fn, orders, mode=mode, stats=stats)
    start = time.perf_counter()
    perf = evaluate_runs_fn(eval_fn, stacked, names, mode=mode)
    eval_s = time.perf_counter() - start

    labels = np.array([str(c) for c in labels], dtype=object)
    result = {
        "names": list(names), "deltas": deltas,
        "base_counts": [int(np.sum(labels[base] == name)) for name in names],
        "set_sizes": [int(s.size) for s in sets], "base_indices": base, "perf": perf, "gamma": None,
        "metric": config.metric, "higher_is_better": config.metric != "loss", "mode": mode,
        "stacked_states": stacked,
        "timings": {"sets_s": sets_s, "train_s": stats["train_s"], "eval_s": eval_s},
    }
    try:
        result["gamma"] = interaction_from_runs(perf, deltas, names, config.metric, config.self_effect_floor,
                                                relative_self_effect_floor=config.relative_self_effect_floor)
    except ValueError as err:
        err.result = result
        raise
    finally:
        result["timings"]["total_s"] = time.perf_counter() - total_start
    return result
