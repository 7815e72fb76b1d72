"""Beyond-IID intervention runs over the user's own JAX training step: N+1 fine-tunes of any model
-> per-category performance -> the interaction matrix Gamma.

Method: Beyond IID (Zhao, Du, Ju, Wu, Pan 2024, arXiv 2409.07045, the interaction
estimate). From a baseline subset D0 of the pool build R = N+1 training
sets (run 0 = D0, run k+1 = D0 with category ``names[k]`` changed by ``deltas[k]``), fine-tune the
same starting state on each with the same step, measure every run on every category and turn the
[R, N] table into ``Gamma[target, source]``::

    e_ij = (P_j(D^(i)) - P_j(D0)) / Delta_i      (sign flipped for the lower-is-better "loss")
    Gamma[j, i] = e_ij / e_jj                    (`jraise.select.interactions.interaction_matrix`)

Stage: ``jraise.select``. This module owns the design (`InterventionConfig`, `intervention_sets`,
`run_steps`, `run_orders`, `run_mesh`, `interaction_from_runs`) and the runs over any model; it
asks the user only for::

    train_step(state, batch) -> state          pure, jit-able; one update on one batch
    batch_fn(indices) -> batch                 plain NumPy/JAX, called outside jit
    eval_fn(state) -> perf                     float [N] in ``names`` order, or {name: scalar}

`jraise.select.intervention` is jraise's ``CausalLM``, pool and trainer as one adapter onto
`train_runs_fn` and `evaluate_runs_fn` (it uses every option below).

Data flow::

    categories --intervention_sets--> D0, R index sets, deltas [N], names (sorted)
    R sets --run_orders--> pool indices [R, steps, B]
    per step s: batch_fn(orders[r, s]) for r < R, leaves stacked -> batch [R, ...]
    init_state stacked R times [R, ...] --jit(vmap(train_step)) x steps--> final states [R, ...]
    --jit(vmap(eval_fn))--> perf [R, N] --interaction_from_runs--> Gamma [N, N]

Design choices:

* Fixed step budget. Every run takes exactly ``config.steps`` updates of ``batch_size`` examples,
  cycling through reshuffled epochs of its own set. The sets differ in size by ``Delta_k``, so
  "one epoch each" would give runs different numbers of updates (and a different learning-rate
  schedule); equal steps keeps the runs' optimisation identical except for the data, and is what
  lets R runs share one program step for step. The effect measured is therefore "the same
  compute spent on a mix with Delta_k more (fewer) category-k examples". The price: added records
  of one category dilute the others (each gets fewer passes), which biases every row toward
  negative entries, most for categories learnt by memorisation. ``budget="epochs"`` is the
  alternative: each run takes ``epochs`` passes over its own set (`run_steps`), which needs a
  schedule per run length (`jraise.select.intervention` trains one length after another;
  `measure_interactions_fn` offers the fixed budget only).
* Common random numbers. An epoch's order comes from one random key per (seed, epoch, pool
  index), shared by all runs: each run visits its own examples sorted by that key, so run k's
  order is run 0's with its Delta examples interleaved (or taken out). Runs then differ as little
  as possible beyond the intervention, which lowers the noise of the differences
  ``P_j(D^(k)) - P_j(D0)`` that Gamma is built from. All runs start from the same state and get
  the same ``step_inputs(s)``, so dropout keys are shared too.
* Run axis on devices. With several devices the run axis is sharded over a 1-D
  ``jax.sharding.Mesh`` named ``"runs"`` (``NamedSharding(mesh, P("runs"))``) when R is a
  multiple of the device count; runs are independent, so XLA partitions the vmapped step with no
  communication. Otherwise every array is replicated (each device computes all runs: correct, not
  faster). ``shared`` and the step inputs are always replicated. On one device the mesh has one
  device and sharding is a no-op.

The contract, in full:

* ``state``: a pytree of arrays (and scalars); the whole of what changes during training (weights,
  optimizer moments, step counter, and any PRNG key the step splits). All runs start from the same
  ``init_state``, so a key kept in the state gives every run the same dropout draws (common random
  numbers). ``train_step`` must return a state of the same structure, shapes and dtypes; it owns
  the optimizer, learning-rate schedule and loss, so the ``InterventionConfig`` fields about those
  (``lr``, ``schedule``, ``warmup_ratio``, ``weight_decay``, ``max_grad_norm``, ``accum``,
  ``n_buckets``, ``eval_batch_size``) are not read here.
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

Options (keywords; the defaults give the contract above):

* ``shared`` (a pytree) and ``step_inputs`` (``s -> pytree``): when either is given the step is
  called as ``train_step(state, batch, shared, step_inputs(s))`` (None for the one not given);
  both are the same for every run (``in_axes=None`` under vmap: one copy, not R), e.g. frozen
  base weights and a per-step dropout key. Pass arrays here rather than closing over them: a
  closed-over array is a compile-time constant and can round differently.
* ``has_aux=True``: the step returns ``(state, aux)``; ``aux`` (e.g. the batch loss) comes back
  stacked, leaves [R, steps, ...].
* ``per_step_batches=True``: ``batch_fn(indices, s)`` gets the step too and may return other
  shapes at other steps (e.g. padded to a length bucket chosen for the step); the R batches of
  one step must agree. Each distinct step shape is compiled once.
* ``jit_eval=False``: ``eval_fn`` runs eagerly, one run after another (any Python: generation,
  external scorers); its output is read as float64.

Compiled programs are cached per ``train_step`` (the same object: define it once, not per call),
mode and argument shapes, so repeated measurements compile once; ``stats["compile_s"]`` is the
compilation of this call and ``stats["train_s"]`` the training loop without it.

Modes: ``"vmap"`` runs all R fine-tunes as one program per step, ``jit(vmap(train_step))`` over the
run axis (sharded by `run_mesh`); ``"sequential"`` runs them one after another with
``jit(train_step)`` on the same batches, the same math up to float rounding.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jraise.compile_cache import CompiledCache
from jraise.select.interactions import interaction_matrix
from jraise.train.step import SCHEDULES

__all__ = [
    "BUDGETS",
    "METRICS",
    "MODES",
    "RUN_AXIS",
    "InterventionConfig",
    "category_names",
    "evaluate_runs_fn",
    "interaction_from_runs",
    "intervention_sets",
    "measure_interactions_fn",
    "run_mesh",
    "run_orders",
    "run_steps",
    "train_runs_fn",
]

METRICS = ("loss", "exact_match")
MODES = ("vmap", "sequential")
BUDGETS = ("steps", "epochs")
RUN_AXIS = "runs"

Pytree = Any


# ----------------------------------------------------------------------------------------------
# Configuration


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class InterventionConfig:
    """The intervention design and the (shared) fine-tuning hyperparameters of all R runs.

    D0: ``base_fraction`` of each category of the pool (``max(1, round(f * count_k))``, so the
    pool's mix is kept), or ``base_size`` examples in all, allocated to categories in proportion
    to their pool counts (largest remainder, at least 1 each); give one of the two (leave
    ``base_fraction`` at 1.0 when setting ``base_size``). With ``base_fraction=1.0`` D0 is the
    whole pool, no category has examples left to add, and every intervention is a removal.

    Delta: ``+max(1, round(delta_fraction * n0_k))`` examples of category k drawn from the pool
    examples of k not in D0; when fewer than that are left, the run removes that many from D0
    instead (the delta is recorded as negative).

    Training: ``budget="steps"`` (default): ``steps`` AdamW updates of ``batch_size`` examples for
    every run (the fixed step budget, see the module docstring); ``budget="epochs"``: ``epochs``
    passes over each run's own set, ``ceil(epochs * |set| / batch_size)`` updates (the run's own
    length; ``steps`` is unused), sequential mode only (see `run_steps`). Learning rate ``lr`` with
    a linear warmup of ``ceil(warmup_ratio * T)`` steps then ``schedule`` ("linear", "cosine",
    "constant") over the run's length T;
    ``accum`` micro-batches per update, ``max_grad_norm`` None/0 disables clipping, ``n_buckets``
    length buckets. ``seed`` drives D0, the deltas' examples, data orders and dropout.

    Evaluation: ``metric`` "loss" (mean response-token NLL per category, lower is better) or
    "exact_match" (higher is better; jraise's adapter: greedy-decoding accuracy per category);
    ``eval_batch_size`` rows per batch;
    ``self_effect_floor`` is passed to `interaction_matrix` (None: a category whose own effect is
    not positive is an error); ``relative_self_effect_floor`` (None or a fraction in (0, 1]) too:
    every own effect is floored at that fraction of the median positive own effect, which damps
    the rows of nearly learned categories (tiny own effects magnify their rows' noise).
    """

    delta_fraction: float = 0.1
    base_fraction: float = 1.0
    base_size: int | None = None
    steps: int = 100
    budget: str = "steps"
    epochs: int = 3
    batch_size: int = 8
    lr: float = 1e-4
    schedule: str = "cosine"
    warmup_ratio: float = 0.05
    seed: int = 0
    metric: str = "loss"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    accum: int = 1
    n_buckets: int = 4
    eval_batch_size: int = 16
    self_effect_floor: float | None = None
    relative_self_effect_floor: float | None = None

    def __post_init__(self):
        problems = []
        if not (isinstance(self.delta_fraction, (int, float)) and math.isfinite(self.delta_fraction)
                and self.delta_fraction > 0):
            problems.append(f"delta_fraction must be a finite number > 0, got {self.delta_fraction!r}")
        if not (isinstance(self.base_fraction, (int, float)) and 0.0 < self.base_fraction <= 1.0):
            problems.append(f"base_fraction must be in (0, 1], got {self.base_fraction!r}")
        if self.base_size is not None:
            if not _is_int(self.base_size) or self.base_size < 1:
                problems.append(f"base_size must be an int >= 1 or None, got {self.base_size!r}")
            if self.base_fraction != 1.0:
                problems.append("give base_fraction or base_size, not both (leave base_fraction at 1.0 "
                                "when setting base_size)")
        if self.budget not in BUDGETS:
            problems.append(f"budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        for name in ("steps", "epochs", "batch_size", "accum", "n_buckets", "eval_batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                problems.append(f"{name} must be an int >= 1, got {value!r}")
        if not _is_int(self.seed) or self.seed < 0:
            problems.append(f"seed must be an int >= 0, got {self.seed!r}")
        if _is_int(self.batch_size) and _is_int(self.accum) and self.accum >= 1 and self.batch_size % self.accum:
            problems.append(f"batch_size ({self.batch_size}) must be a multiple of accum ({self.accum})")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            problems.append(f"lr must be > 0, got {self.lr!r}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not (isinstance(self.warmup_ratio, (int, float)) and 0.0 <= self.warmup_ratio <= 1.0):
            problems.append(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio!r}")
        if self.metric not in METRICS:
            problems.append(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not (isinstance(self.max_grad_norm, (int, float))
                                                   and self.max_grad_norm >= 0):
            problems.append(f"max_grad_norm must be >= 0 or None, got {self.max_grad_norm!r}")
        if self.self_effect_floor is not None and not (isinstance(self.self_effect_floor, (int, float))
                                                       and self.self_effect_floor > 0):
            problems.append(f"self_effect_floor must be > 0 or None, got {self.self_effect_floor!r}")
        rel = self.relative_self_effect_floor
        if rel is not None and not (isinstance(rel, (int, float)) and not isinstance(rel, bool) and 0 < rel <= 1):
            problems.append(f"relative_self_effect_floor must be in (0, 1] or None, got {rel!r}")
        if problems:
            raise ValueError("invalid InterventionConfig: " + "; ".join(problems))

    def optimizer_args(self, total_steps: int | None = None) -> dict:
        """`jraise.train.step.make_optimizer` keyword arguments for a run of ``total_steps`` updates
        (default ``steps``: every run of the fixed step budget)."""
        total = int(self.steps if total_steps is None else total_steps)
        return {"lr": float(self.lr), "total_steps": total,
                "warmup_steps": math.ceil(self.warmup_ratio * total), "schedule": self.schedule,
                "weight_decay": float(self.weight_decay), "max_grad_norm": self.max_grad_norm}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# The intervention sets (pure numpy)


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _base_counts(counts: np.ndarray, config: InterventionConfig, names: Sequence[str]) -> np.ndarray:
    """n0_k per category (see `InterventionConfig`)."""
    if config.base_size is None:
        return np.array([max(1, _round_half_up(config.base_fraction * c)) for c in counts], np.int64)
    total, n = int(counts.sum()), len(counts)
    if not n <= config.base_size <= total:
        raise ValueError(f"base_size {config.base_size} must lie between the number of categories ({n}) "
                         f"and the pool size ({total})")
    quota = config.base_size * counts / total
    n0 = np.maximum(1, np.floor(quota)).astype(np.int64)
    # Largest remainder, deterministic (ties to the lower category index), within [1, count_k].
    while n0.sum() < config.base_size:
        gap = np.where(n0 < counts, quota - n0, -np.inf)
        n0[int(np.argmax(gap))] += 1
    while n0.sum() > config.base_size:
        gap = np.where(n0 > 1, quota - n0, np.inf)
        n0[int(np.argmin(gap))] -= 1
    return n0


def intervention_sets(categories: Sequence[str], config: InterventionConfig
                      ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, tuple[str, ...]]:
    """(base_indices, sets, deltas, names) of the Beyond-IID intervention design.

    In: one category label per pool record, the config. Out:

    * ``base_indices``: D0, sorted pool indices (int64);
    * ``sets``: R = N+1 sorted int64 index arrays, ``sets[0]`` = D0 and ``sets[k+1]`` = D0 with
      category ``names[k]`` changed by ``deltas[k]``;
    * ``deltas``: int64 [N], non-zero, negative where a removal replaced the addition;
    * ``names``: the N category names, sorted.

    Category k's pool examples are shuffled once with ``default_rng([seed, 0, k])``; D0 takes the
    first ``n0_k``, an addition the next ``Delta_k``, a removal the last ``Delta_k`` of D0's part,
    so the design is a deterministic function of (categories, config). No set repeats an index.
    """
    labels = list(categories)
    for i, c in enumerate(labels):
        if c is None or (isinstance(c, str) and not c):
            raise ValueError(f"example index {i} has no category; the Beyond-IID intervention needs one "
                             "category per example (derive categories first)")
    labels = np.array([str(c) for c in labels], dtype=object)
    if labels.size == 0:
        raise ValueError("no examples: cannot build intervention sets from an empty pool")
    names = tuple(sorted(set(labels.tolist())))
    members = [np.flatnonzero(labels == name) for name in names]
    counts = np.array([len(m) for m in members], np.int64)
    n0 = _base_counts(counts, config, names)
    shuffled = [np.random.default_rng([config.seed, 0, k]).permutation(m) for k, m in enumerate(members)]
    base = np.sort(np.concatenate([s[: n0[k]] for k, s in enumerate(shuffled)])).astype(np.int64)

    sets, deltas = [base], []
    for k, name in enumerate(names):
        size = max(1, _round_half_up(config.delta_fraction * n0[k]))
        extra = counts[k] - n0[k]
        if extra >= size:
            changed = np.concatenate([base, shuffled[k][n0[k]: n0[k] + size]])
            deltas.append(size)
        elif size <= n0[k]:
            removed = shuffled[k][n0[k] - size: n0[k]]
            changed = np.setdiff1d(base, removed)
            deltas.append(-size)
        else:
            raise ValueError(f"category {name!r}: Delta = {size} cannot be added (only {extra} pool examples "
                             f"outside D0) nor removed (D0 holds only {n0[k]}); lower delta_fraction")
        if changed.size == 0:
            raise ValueError(f"category {name!r}: removing {size} examples leaves an empty training set")
        sets.append(np.sort(changed).astype(np.int64))
    return base, sets, np.array(deltas, np.int64), names


def run_steps(sets: Sequence[Sequence[int]], config: InterventionConfig) -> list[int]:
    """Optimizer updates of each run: ``config.steps`` for every run under the fixed step budget;
    ``ceil(epochs * |set| / batch_size)`` under ``budget="epochs"``, so a run with Delta_k more
    examples trains longer and no category is diluted by another's additions (the fixed step
    budget spends the same updates on a larger set, so every other category gets fewer passes)."""
    if config.budget == "steps":
        return [int(config.steps)] * len(sets)
    return [math.ceil(config.epochs * len(s) / config.batch_size) for s in sets]


def run_orders(sets: Sequence[Sequence[int]], steps: int, batch_size: int, seed: int) -> np.ndarray:
    """Pool indices ``[R, steps, batch_size]`` (int64): what each run trains on at each step.

    Run r cycles through epochs of its own set: every epoch visits each of its examples once, so a
    set is covered before anything repeats; the epochs are concatenated and cut into batches (a
    batch may straddle two epochs, and holds a repeat only when the set is smaller than a batch).
    Epoch e orders a set by one uniform key per pool index, ``default_rng([seed, 1, e])``, shared by
    all runs (common random numbers, see the module docstring).
    """
    if not _is_int(steps) or steps < 1 or not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"steps and batch_size must be ints >= 1, got {steps!r}, {batch_size!r}")
    arrays = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sets]
    if not arrays:
        raise ValueError("no run sets given")
    for r, s in enumerate(arrays):
        if s.size == 0:
            raise ValueError(f"run {r} has an empty training set")
        if s.min() < 0:
            raise ValueError(f"run {r} has negative pool indices: {s[s < 0][:5].tolist()}")
    need = steps * batch_size
    n_keys = int(max(s.max() for s in arrays)) + 1
    out = np.empty((len(arrays), need), np.int64)
    filled = np.zeros(len(arrays), np.int64)
    epoch = 0
    while (filled < need).any():
        keys = np.random.default_rng([seed, 1, epoch]).random(n_keys)
        for r, s in enumerate(arrays):
            if filled[r] < need:
                order = s[np.argsort(keys[s], kind="stable")]
                take = min(order.size, need - int(filled[r]))
                out[r, filled[r]: filled[r] + take] = order[:take]
                filled[r] += take
        epoch += 1
    return out.reshape(len(arrays), steps, batch_size)


# ----------------------------------------------------------------------------------------------
# Placement of the run axis and Gamma


def run_mesh(n_runs: int) -> tuple[NamedSharding, NamedSharding]:
    """(sharding of stacked [R, ...] arrays, replicated sharding) on a 1-D mesh of all devices.

    The stacked sharding splits the leading run axis over the ``"runs"`` mesh axis when ``n_runs``
    is a multiple of the device count, else it replicates. One device: both are that device.
    """
    devices = np.array(jax.devices())
    mesh = Mesh(devices, (RUN_AXIS,))
    stacked = P(RUN_AXIS) if n_runs % devices.size == 0 else P()
    return NamedSharding(mesh, stacked), NamedSharding(mesh, P())


def interaction_from_runs(perf: np.ndarray, deltas: Sequence[int], names: Sequence[str], metric: str = "loss",
                          self_effect_floor: float | None = None,
                          relative_self_effect_floor: float | None = None) -> np.ndarray:
    """``Gamma[target, source]`` [N, N] from ``perf`` [N+1, N] (row 0: the baseline run D0, row
    k+1: category k changed by ``deltas[k]``) via `interaction_matrix`; loss is lower-is-better.
    ``self_effect_floor`` and ``relative_self_effect_floor`` are passed through."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    perf = np.asarray(perf, np.float64)
    n = len(names)
    if perf.shape != (n + 1, n):
        raise ValueError(f"perf must have shape (N+1, N) = ({n + 1}, {n}) for {n} categories, got {perf.shape}")
    return interaction_matrix(perf[0], perf[1:], np.asarray(deltas), higher_is_better=metric != "loss",
                              names=list(names), self_effect_floor=self_effect_floor,
                              relative_self_effect_floor=relative_self_effect_floor)


# ----------------------------------------------------------------------------------------------
# The runs over the user's step


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


def _placed_signature(tree: Pytree) -> tuple:
    """`_signature` plus each leaf's sharding, hashable: the key of one compiled program."""
    treedef, leaves = _signature(tree)
    shardings = tuple(getattr(x, "sharding", None) for x in jax.tree.leaves(tree))
    return str(treedef), tuple((s, str(d)) for s, d in leaves), shardings


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


# The jitted step of each (train_step, mode, call form) (and the run-axis broadcast of each R and
# sharding) and the step's compiled programs per argument signature (shapes, dtypes, shardings),
# so repeated calls with the same step compile once.
_FUNCTIONS = CompiledCache(16)
_PROGRAMS = CompiledCache(16)


def _cache_key(train_step: Callable) -> Any:
    """The step itself when hashable, else a key no later call shares (no caching)."""
    try:
        hash(train_step)
        return train_step
    except TypeError:
        return object()


def _jitted_step(train_step: Callable, mode: str, extras: bool) -> tuple[Callable, tuple]:
    """(``jit(vmap(train_step))`` or ``jit(train_step)``, the state buffers donated; its cache key)."""
    key = (_cache_key(train_step), mode, extras)

    def build():
        fn = train_step
        if mode == "vmap":
            fn = jax.vmap(train_step, in_axes=(0, 0, None, None) if extras else 0)
        return jax.jit(fn, donate_argnums=0)

    return _FUNCTIONS.get(key, build), key


def train_runs_fn(train_step: Callable[..., Any], init_state: Pytree, batch_fn: Callable[..., Pytree],
                  orders: np.ndarray, *, mode: str = "vmap", stats: dict | None = None, shared: Pytree = None,
                  step_inputs: Callable[[int], Pytree] | None = None, has_aux: bool = False,
                  per_step_batches: bool = False, on_step: Callable[[], Any] | None = None):
    """R fine-tunes of ``init_state`` (not modified) with the user's step; returns the final states
    stacked along a leading run axis (every leaf [R, ...]), with ``has_aux`` ``(states, aux)``.

    ``orders``: pool indices [R, steps, B] (`run_orders`); at step s run r trains on
    ``batch_fn(orders[r, s])`` (int32 [B]; ``batch_fn(orders[r, s], s)`` with
    ``per_step_batches``). ``mode="vmap"``: one ``jit(vmap(train_step))`` call per step on the R
    batches stacked, the stacked state's buffers donated; ``mode="sequential"``: run after run with
    ``jit(train_step)`` on the same batches. See the module docstring for the contract and the
    options ``shared``, ``step_inputs``, ``has_aux`` (aux returned as host arrays [R, steps, ...])
    and ``per_step_batches``. ``on_step()`` is called after every step dispatched (one call per
    step of all runs under vmap, one per run and step sequentially). ``stats``, when given, gets
    ``mode``, ``runs``, ``steps``, ``compile_s`` (programs first compiled in this call) and
    ``train_s`` (the training loop with batch building, without compilation).
    """
    _check_mode(mode)
    orders = _check_orders(orders)
    n_runs, steps, _ = orders.shape
    extras = shared is not None or step_inputs is not None
    jitted, function_key = _jitted_step(train_step, mode, extras)
    firsts: dict[int, tuple] = {}  # step (0 for all under fixed shapes) -> the first batch's signature

    def build(r: int, s: int) -> Pytree:
        batch = batch_fn(orders[r, s], s) if per_step_batches else batch_fn(orders[r, s])
        got = _signature(batch)
        want = firsts.setdefault(s if per_step_batches else 0, got)
        if got != want:
            rule = ("for every run at a step (their batches are stacked)" if per_step_batches
                    else "for every batch (one compiled step)")
            raise ValueError(f"batch_fn must return the same structure, shapes and dtypes {rule}; run {r}, "
                             f"step {s} gave {_describe(got)}, the first batch {_describe(want)}")
        return batch

    compile_s = 0.0
    programs: dict[tuple, Callable] = {}  # this call's programs by (batch, step input) signature

    def program(state: Pytree, args: tuple) -> Callable:
        """The compiled step for ``(state, *args)``; traced, checked and compiled on first use."""
        nonlocal compile_s
        local = _placed_signature((args[0], args[2:]))  # ``shared`` (args[1]) is fixed in a call
        if local not in programs:
            key = (function_key, _placed_signature(state), _placed_signature(args[1:2]), local)
            start = time.perf_counter()
            compiled_here = []

            def compile_it():
                traced = jitted.trace(state, *args)
                out = traced.out_info[0] if has_aux else traced.out_info
                if _signature(out) != _signature(state):
                    raise ValueError(f"train_step must return a state of the same structure, shapes and dtypes "
                                     f"as it takes; got {_describe(_signature(out))} for "
                                     f"{_describe(_signature(state))}")
                compiled_here.append(True)
                return traced.lower().compile()

            programs[local] = _PROGRAMS.get(key, compile_it)
            if compiled_here:
                compile_s += time.perf_counter() - start
        return programs[local]

    def call_args(batch: Pytree, s: int, place: Callable) -> tuple:
        """(batch,) or (batch, shared, step input): the step's arguments after the state."""
        if not extras:
            return (batch,)
        return (batch, shared, None if step_inputs is None else place(step_inputs(s)))

    first = build(0, 0)  # built once, checked here and trained on below
    auxes = []
    if mode == "vmap":
        stacked_sharding, replicated = run_mesh(n_runs)
        put_shared = lambda x: jax.device_put(x, replicated)  # noqa: E731
        if shared is not None:
            shared = put_shared(shared)
        stack = _FUNCTIONS.get(("stack", n_runs, stacked_sharding), lambda: jax.jit(
            lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (n_runs, *jnp.shape(x))), tree),
            out_shardings=stacked_sharding))
        state = jax.block_until_ready(stack(init_state))  # fresh buffers: donating them leaves init_state intact

        def batch_at(s: int) -> Pytree:
            rows = [first if (r, s) == (0, 0) else build(r, s) for r in range(n_runs)]
            return jax.device_put(_stack(rows), stacked_sharding)

        loop_start = time.perf_counter()
        upcoming = batch_at(0)
        for s in range(steps):
            args = call_args(upcoming, s, put_shared)
            out = program(state, args)(state, *args)
            state, aux = out if has_aux else (out, None)
            auxes.append(aux)
            if on_step is not None:
                on_step()
            if s + 1 < steps:
                upcoming = batch_at(s + 1)  # built while the step runs
        jax.block_until_ready(state)
        train_s = time.perf_counter() - loop_start - compile_s
        if has_aux:
            auxes = jax.tree.map(lambda *xs: np.stack(xs, axis=1), *jax.device_get(auxes))
    else:
        finals, run_auxes = [], []
        loop_start = time.perf_counter()
        for r in range(n_runs):
            state = jax.tree.map(lambda x: jnp.array(x, copy=True), init_state)  # donated below
            auxes = []
            for s in range(steps):
                args = call_args(first if (r, s) == (0, 0) else build(r, s), s, lambda x: x)
                out = program(state, args)(state, *args)
                state, aux = out if has_aux else (out, None)
                auxes.append(aux)
                if on_step is not None:
                    on_step()
            finals.append(state)
            run_auxes.append(auxes)
        jax.block_until_ready(finals)
        train_s = time.perf_counter() - loop_start - compile_s
        state = jax.tree.map(lambda *xs: jnp.stack(xs), *finals)
        if has_aux:
            per_run = [jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(a)) for a in run_auxes]
            auxes = jax.tree.map(lambda *xs: np.stack(xs), *per_run)
    jax.block_until_ready(state)
    if stats is not None:
        stats.update({"mode": mode, "runs": n_runs, "steps": steps, "compile_s": compile_s, "train_s": train_s})
    return (state, auxes) if has_aux else state


def _perf_columns(out, names: Sequence[str]):
    """eval_fn's output -> an array [..., N] in ``names`` order (a mapping is read by name)."""
    if isinstance(out, Mapping):
        missing = [n for n in names if n not in out]
        if missing:
            raise ValueError(f"eval_fn's mapping lacks categories {missing} (has {sorted(map(str, out))})")
        return jnp.stack([jnp.asarray(out[n]) for n in names], axis=-1)
    return out


def _check_perf_shape(shape, out, names: Sequence[str]) -> None:
    if shape != (len(names),):
        raise ValueError(f"eval_fn must return per-category performance of shape ({len(names)},) in the "
                         f"order of {list(names)} (or a mapping name -> scalar), got "
                         f"{shape if shape is not None else type(out).__name__}")


def _check_eval(eval_fn: Callable, state: Pytree, names: Sequence[str]) -> None:
    """Trace eval_fn abstractly on one (unstacked) state: it must give N per-category numbers."""
    out = jax.eval_shape(lambda s: _perf_columns(eval_fn(s), names), state)
    _check_perf_shape(getattr(out, "shape", None), out, names)


def _eager_row(out, names: Sequence[str]) -> np.ndarray:
    """An eager eval_fn's output -> float64 [N] in ``names`` order."""
    if isinstance(out, Mapping):
        missing = [n for n in names if n not in out]
        if missing:
            raise ValueError(f"eval_fn's mapping lacks categories {missing} (has {sorted(map(str, out))})")
        out = [np.asarray(jax.device_get(out[n]), np.float64) for n in names]
    row = np.asarray(jax.device_get(out), np.float64)
    _check_perf_shape(row.shape, out, names)
    return row


def evaluate_runs_fn(eval_fn: Callable[[Pytree], Any], stacked_states: Pytree, names: Sequence[str], *,
                     mode: str = "vmap", jit_eval: bool = True) -> np.ndarray:
    """Per-category performance of each run: float64 [R, N], columns in ``names`` order.

    ``mode="vmap"``: ``jit(vmap(eval_fn))`` over the run axis of ``stacked_states``;
    ``mode="sequential"``: ``jit(eval_fn)`` on one run's state after another. ``jit_eval=False``
    (either mode): ``eval_fn`` called eagerly on one run's state after another, its output (array
    or mapping) read as float64.
    """
    _check_mode(mode)
    names = tuple(names)
    leads = {int(np.shape(x)[0]) if np.ndim(x) else None for x in jax.tree.leaves(stacked_states)}
    if len(leads) != 1 or None in leads:
        raise ValueError(f"stacked_states must have one leading run axis on every leaf, got leading sizes "
                         f"{sorted(leads, key=str)}")
    n_runs = leads.pop()
    run = lambda r: jax.tree.map(lambda x: x[r], stacked_states)  # noqa: E731
    if not jit_eval:
        return np.stack([_eager_row(eval_fn(run(r)), names) for r in range(n_runs)])
    _check_eval(eval_fn, run(0), names)
    columns = lambda s: _perf_columns(eval_fn(s), names)  # noqa: E731
    if mode == "vmap":
        perf = jax.jit(jax.vmap(columns))(stacked_states)
    else:
        one = jax.jit(columns)
        perf = jnp.stack([one(run(r)) for r in range(n_runs)])
    return np.asarray(jax.device_get(perf), np.float64)


def measure_interactions_fn(train_step: Callable[..., Any], eval_fn: Callable[[Pytree], Any],
                            init_state: Pytree, categories: Sequence[str], batch_fn: Callable[..., Pytree],
                            config: InterventionConfig, *, mode: str = "vmap", shared: Pytree = None,
                            step_inputs: Callable[[int], Pytree] | None = None, has_aux: bool = False,
                            per_step_batches: bool = False, jit_eval: bool = True) -> dict:
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
      shared, step_inputs, has_aux, per_step_batches: passed to `train_runs_fn`.
      jit_eval: passed to `evaluate_runs_fn` (False: an eager ``eval_fn``, run after run).

    Returns a dict: ``names`` (N sorted categories), ``deltas`` int64 [N], ``base_counts`` (n0 per
    category), ``set_sizes`` [R], ``base_indices`` (D0, sorted pool rows), ``perf`` float64 [R, N]
    (row 0 = D0, row k+1 = ``names[k]`` changed by ``deltas[k]``), ``gamma`` float64 [N, N]
    (``gamma[target, source]``, unit diagonal), ``metric``, ``higher_is_better``, ``mode``,
    ``stacked_states`` (the R final states, leaves [R, ...]), ``aux`` (with ``has_aux``: leaves
    [R, steps, ...]; else None) and ``timings`` (sets_s, compile_s, train_s, eval_s, total_s).

    Raises ValueError before training on a bad design, ``budget="epochs"``, or a step/eval whose
    shapes break the contract (with ``jit_eval=False`` the evaluation's output is checked only
    after training; with ``per_step_batches`` each new batch shape is checked when first reached).
    When Gamma itself fails (a category whose own effect is not positive
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
    if jit_eval:
        _check_eval(eval_fn, init_state, names)  # fail before training

    stats: dict = {}
    trained = train_runs_fn(train_step, init_state, batch_fn, orders, mode=mode, stats=stats, shared=shared,
                            step_inputs=step_inputs, has_aux=has_aux, per_step_batches=per_step_batches)
    stacked, aux = trained if has_aux else (trained, None)
    start = time.perf_counter()
    perf = evaluate_runs_fn(eval_fn, stacked, names, mode=mode, jit_eval=jit_eval)
    eval_s = time.perf_counter() - start

    labels = np.array([str(c) for c in labels], dtype=object)
    result = {
        "names": list(names), "deltas": deltas,
        "base_counts": [int(np.sum(labels[base] == name)) for name in names],
        "set_sizes": [int(s.size) for s in sets], "base_indices": base, "perf": perf, "gamma": None,
        "metric": config.metric, "higher_is_better": config.metric != "loss", "mode": mode,
        "stacked_states": stacked, "aux": aux,
        "timings": {"sets_s": sets_s, "compile_s": stats["compile_s"], "train_s": stats["train_s"],
                    "eval_s": eval_s},
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
