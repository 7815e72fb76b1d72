"""Beyond-IID intervention runs as ONE vmapped JAX program: N+1 fine-tunes -> per-category
performance -> the interaction matrix Gamma.

Method: Beyond IID (Zhao, Du, Ju, Wu, Pan 2024, arXiv 2409.07045), section 2 of
``shared/methods/beyond_iid.md``. From a baseline subset D0 of the pool (``n0_k`` examples of
category k) build R = N+1 training sets: run 0 is D0, run k (1-based) is D0 with category k-1
changed by ``Delta_k``. Fine-tune the same starting model on each set with the same
hyperparameters, measure the performance of every run on every category of a held-out pool and
turn the (R, N) table into ``Gamma[target, source]`` with
`jraise.select.interactions.interaction_matrix`.

Data flow::

    pool.categories --intervention_sets--> D0, R index sets, deltas [N], names
    R sets --run_orders--> pool indices [R, steps, batch]
    per step s: R batches padded to ONE common length bucket -> arrays [R, A, B/A, L]
    (stacked trainable [R, ...], stacked Adam state [R, ...], shared frozen weights)
        --make_stacked_train_step (jax.vmap over the run axis, jit, donated)--> next stacked state
    stacked trainable --evaluate_runs--> perf [R, N] --interaction_from_runs--> Gamma [N, N]

Design choices (each also written where it is implemented):

* Fixed step budget. Every run takes exactly ``config.steps`` optimizer steps of ``batch_size``
  examples, cycling through reshuffled epochs of its own set. The sets differ in size by
  ``Delta_k``, so "one epoch each" would give runs different numbers of updates (and a different
  learning-rate schedule); equal steps keeps the runs' optimisation identical except for the data,
  and is what lets R runs share one program step for step. The effect measured is therefore "the
  same compute spent on a mix with Delta_k more (fewer) category-k examples".
  The price: added records of one category dilute the others (each gets fewer passes), which
  biases every row toward negative entries, most for categories learnt by memorisation.
  ``budget="epochs"`` is the alternative: each run takes ``epochs`` passes over its own set
  (`run_steps`) with its own lr schedule, sequential mode only.
* Common random numbers. An epoch's order comes from one random key per (seed, epoch, pool
  index), shared by all runs: each run visits its own examples sorted by that key, so run k's
  order is run 0's with its Delta examples interleaved (or taken out). Runs then differ as little
  as possible beyond the intervention, which lowers the noise of the differences
  ``P_j(D^(k)) - P_j(D0)`` that Gamma is built from. Dropout keys are shared too.
* Common bucket. The R batches of a step are padded to the smallest length bucket that holds the
  longest of them, so the step has one static shape. Buckets are fitted to the whole pool's
  lengths (as `jraise.train.loop.train` does), so the compiled shapes depend on the pool, not on
  the seed or the sets. The sequential mode trains on exactly the same padded batches, so both
  modes do the same math.
* Run axis on devices. With several devices the run axis is sharded over a 1-D
  ``jax.sharding.Mesh`` named ``"runs"`` (``NamedSharding(mesh, P("runs"))``) when R is a
  multiple of the device count; runs are independent, so XLA partitions the vmapped step with no
  communication. Otherwise every array is replicated (each device computes all runs: correct, not
  faster). The frozen weights and the step's dropout key are always replicated. On one device the
  mesh has one device and sharding is a no-op.
* Memory. The stacked state holds R copies of the trainable weights and of both Adam moments:
  about 3 R x the trainable size. Full fine-tuning is fine for small models; use LoRA adapters
  (``add_lora``) for large ones, where the frozen base is shared, not copied.
* Speed. The vmapped program pays off where one run leaves the device underused (GPU/TPU, many
  small runs). On XLA:CPU it is slower than running the runs one after another: batched
  ``dot_general`` (per-run weights) takes a slower path than plain GEMMs and the R-times larger
  activations leave the caches; ``benchmarks/interaction_vmap.py`` measures the ratio.
* Compilation. Every step shape (one per bucket length used) is compiled ahead of time
  (``jit(...).lower(...).compile()``) before the timed loop, so compile time and training time
  are measured apart; compiled programs are cached per model structure, optimizer and shape.

Categories come from ``pool.categories``; an example without one is an error naming the pool's
source (derive categories first). Category names are sorted, the order of ``deltas``, of the
columns of ``perf`` and of Gamma's rows and columns.

The whole measurement end to end (sets, runs, performance, Gamma) with its files
(``interactions.json`` and the Gamma files) is `jraise.jobs.intervention.measure_interactions`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from jraise.compile_cache import CompiledCache, dtypes_key
from jraise.data.batching import (
    PAD_INDEX,
    iterate_batches,
    length_buckets,
    make_batch,
    pick_bucket,
)
from jraise.data.pool import InstructionPool
from jraise.select.interactions import interaction_matrix
from jraise.train.loop import accumulation_batch
from jraise.train.step import (
    MODEL_KEYS,
    SCHEDULES,
    accumulated_grads,
    assign_trainable,
    make_eval_step,
    make_optimizer,
    make_train_step,
    param_dtypes,
    split_trainable,
)

__all__ = [
    "METRICS",
    "MODES",
    "RUN_AXIS",
    "InterventionConfig",
    "eval_names",
    "evaluate_runs",
    "interaction_from_runs",
    "intervention_sets",
    "make_stacked_train_step",
    "pool_categories",
    "run_mesh",
    "run_orders",
    "train_interventions",
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
    "exact_match" (greedy-decoding accuracy per category); ``eval_batch_size`` rows per batch;
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


def pool_categories(pool: InstructionPool) -> tuple[str, ...]:
    """The pool's category of every example; an example without one is an error naming the pool."""
    for i, c in enumerate(pool.categories):
        if c is None or (isinstance(c, str) and not c):
            raise ValueError(
                f"{pool.source}: example index {i} (id {pool.ids[i]!r}) has no category; the "
                "Beyond-IID intervention needs one category per example (derive categories first)")
    return tuple(str(c) for c in pool.categories)


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

    In: one category label per pool example (`pool_categories`), the config. Out:

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
# Placement of the run axis


def run_mesh(n_runs: int) -> tuple[NamedSharding, NamedSharding]:
    """(sharding of stacked [R, ...] arrays, replicated sharding) on a 1-D mesh of all devices.

    The stacked sharding splits the leading run axis over the ``"runs"`` mesh axis when ``n_runs``
    is a multiple of the device count, else it replicates. One device: both are that device.
    """
    devices = np.array(jax.devices())
    mesh = Mesh(devices, (RUN_AXIS,))
    stacked = P(RUN_AXIS) if n_runs % devices.size == 0 else P()
    return NamedSharding(mesh, stacked), NamedSharding(mesh, P())


# ----------------------------------------------------------------------------------------------
# Steps


def make_stacked_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                            dtypes: Pytree | None = None, donate: bool = True) -> Callable:
    """A jitted ``step(trainable, opt_state, frozen, batch, key=None) -> (trainable, opt_state,
    metrics)`` over R independent runs.

    ``trainable`` and ``opt_state`` carry a leading run axis [R, ...]; ``batch`` arrays are
    [R, A, B, L] (A micro-batches per run); ``frozen`` (the base weights under LoRA, RNG streams)
    and the dropout ``key`` are shared by all runs (``in_axes=None``). Each run's update is exactly
    `jraise.train.step.make_train_step`'s: the response-token mean NLL gradient accumulated over
    the A micro-batches (`accumulated_grads`), then ``tx.update``. Metrics are [R] each. The
    trainable and optimizer buffers are donated unless ``donate=False``.
    """

    def one_run(trainable, opt_state, frozen, batch, key):
        grads, loss, resp, tokens = accumulated_grads(graphdef, dtypes, trainable, frozen, batch, key)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "response_tokens": resp,
                   "tokens": tokens}
        return trainable, opt_state, metrics

    runs = jax.vmap(one_run, in_axes=(0, 0, None, 0, None))

    def stacked_step(trainable, opt_state, frozen, batch, key=None):
        return runs(trainable, opt_state, frozen, batch, key)

    return jax.jit(stacked_step, donate_argnums=(0, 1) if donate else ())


# Jitted step functions and their ahead-of-time compiled programs, keyed by model structure,
# optimizer, dtypes and (for programs) the exact argument shapes and shardings, so repeated calls
# (tests, benchmark rounds, measure after train) compile once.
_FUNCTIONS = CompiledCache(16)
_PROGRAMS = CompiledCache(16)


def _step_function(kind: str, graphdef, opt_args: dict, dtypes) -> tuple:
    """(tx, jitted step) with kind "vmap" (stacked) or "sequential" (plain `make_train_step`)."""
    key = (kind, graphdef, tuple(sorted(opt_args.items())), dtypes_key(dtypes))

    def build():
        tx, _ = make_optimizer(**opt_args)
        maker = make_stacked_train_step if kind == "vmap" else make_train_step
        return tx, maker(graphdef, tx, dtypes)

    return _FUNCTIONS.get(key, build)


def _signature(args) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    return (str(treedef), tuple((tuple(x.shape), str(x.dtype), getattr(x, "sharding", None)) for x in leaves))


def _compiled(kind: str, graphdef, opt_args: dict, dtypes, jitted, args) -> tuple[Callable, float]:
    """(compiled program for these argument shapes, seconds spent compiling it; 0 if cached)."""
    key = (kind, graphdef, tuple(sorted(opt_args.items())), dtypes_key(dtypes), _signature(args))
    spent = [0.0]

    def build():
        start = time.perf_counter()
        program = jitted.lower(*args).compile()
        spent[0] = time.perf_counter() - start
        return program

    return _PROGRAMS.get(key, build), spent[0]


def _batch_spec(lead: tuple[int, ...], accum: int, rows: int, length: int, sharding) -> dict:
    """Abstract batch arrays (what `make_batch` + `accumulation_batch` give), for lowering."""
    shape = (*lead, accum, rows // accum)
    dtypes = {"input_ids": jnp.int32, "attention_mask": jnp.int32, "loss_mask": jnp.float32,
              "example_mask": jnp.float32}
    return {k: jax.ShapeDtypeStruct(shape + ((length,) if k != "example_mask" else ()), dtypes[k],
                                    sharding=sharding) for k in MODEL_KEYS}


# ----------------------------------------------------------------------------------------------
# Training


def _step_buckets(pool: InstructionPool, orders: np.ndarray, n_buckets: int) -> tuple[tuple[int, ...], list[int]]:
    """(bucket lengths fitted to the pool, the common bucket of each step)."""
    buckets = length_buckets(pool.lengths, n_buckets)
    longest = pool.lengths[orders].max(axis=(0, 2))  # [steps]: longest example of any run
    return buckets, [pick_bucket(int(n), buckets) for n in longest]


def _run_batch(pool: InstructionPool, indices: np.ndarray, bucket: int, accum: int) -> dict:
    """One run's batch [A, B/A, L] of model inputs (numpy)."""
    return accumulation_batch(make_batch(pool, indices, bucket), accum)


def _stacked_batch(pool: InstructionPool, step_orders: np.ndarray, bucket: int, accum: int) -> dict:
    """All runs' batches of one step, stacked [R, A, B/A, L] (numpy)."""
    rows = [_run_batch(pool, idx, bucket, accum) for idx in step_orders]
    return {k: np.stack([b[k] for b in rows]) for k in MODEL_KEYS}


def _check_sets(pool: InstructionPool, sets: Sequence[np.ndarray]) -> list[np.ndarray]:
    out = []
    for r, s in enumerate(sets):
        s = np.asarray(s, np.int64).reshape(-1)
        bad = s[(s < 0) | (s >= len(pool))]
        if bad.size:
            raise IndexError(f"run {r}: indices outside the pool of {len(pool)} ({pool.source}): "
                             f"{bad[:5].tolist()}")
        out.append(s)
    return out


def train_interventions(model: nnx.Module, pool: InstructionPool, config: InterventionConfig,
                        mode: str = "vmap", progress: bool = True, *,
                        sets: Sequence[Sequence[int]] | None = None, stats: dict | None = None) -> dict:
    """Fine-tunes R copies of ``model`` (not modified) and returns their trainable states stacked
    along a leading run axis: a nested dict of float32 arrays [R, ...].

    What trains is what `jraise.train.step.split_trainable` picks: the LoRA adapters when attached,
    else every parameter. ``sets`` (R pool-index arrays) defaults to `intervention_sets` of the
    pool's categories. All runs use ``config``'s optimizer and step budget (see the module
    docstring for the data order and padding).

    ``mode="vmap"``: all R runs as one program per step (`make_stacked_train_step`), the run axis
    sharded over the devices when R is a multiple of their number (`run_mesh`).
    ``mode="sequential"``: the runs one after another with the plain jitted step
    (`jraise.train.step.make_train_step`) on the same padded batches and dropout keys: the same
    math, so the results agree to float tolerance; the speed baseline.

    ``stats``, when given, is filled with ``mode``, ``runs``, ``steps``, ``compile_s`` (ahead-of-
    time compilation of every step shape used; 0 when already compiled in this process),
    ``train_s`` (the training loop, batch building included), ``bucket_lengths`` and
    ``train_loss`` (float64 [R, steps], each step's mean response NLL per run; under
    ``budget="epochs"`` ``steps`` is the longest run's length, ``run_steps`` lists every run's, and a
    shorter run's row is NaN after its last step).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if config.budget == "epochs" and mode == "vmap":
        raise ValueError("budget='epochs' gives the runs different numbers of steps, which one vmapped "
                         "program cannot take; use mode='sequential'")
    if sets is None:
        _, sets, _, _ = intervention_sets(pool_categories(pool), config)
    sets = _check_sets(pool, sets)
    n_runs = len(sets)
    lengths = run_steps(sets, config)
    longest = max(lengths)
    # Orders for the longest run; a shorter run trains on the first steps of its own row (its
    # epochs, then a partial one), and every run pads a step to the same bucket.
    orders = run_orders(sets, longest, config.batch_size, config.seed)
    _, step_buckets = _step_buckets(pool, orders, config.n_buckets)
    opt_args = config.optimizer_args()

    graphdef, trainable, frozen = split_trainable(model)
    dtypes = param_dtypes(model)
    tx, jitted = _step_function(mode, graphdef, opt_args, dtypes)
    base_key = jax.random.key(config.seed)
    rows = config.batch_size
    bar = tqdm(total=config.steps if mode == "vmap" else sum(lengths), disable=None if progress else True,
               desc=f"interventions ({mode}, {n_runs} runs)", unit="step", dynamic_ncols=True)
    compile_s = 0.0
    try:
        if mode == "vmap":
            stacked_sharding, replicated = run_mesh(n_runs)
            frozen = jax.device_put(frozen, replicated)
            keys = [jax.device_put(jax.random.fold_in(base_key, s), replicated) for s in range(config.steps)]
            state = jax.device_put(jax.tree.map(lambda x: jnp.broadcast_to(x, (n_runs, *x.shape)), trainable),
                                   stacked_sharding)
            opt_state = jax.device_put(jax.jit(jax.vmap(tx.init))(state), stacked_sharding)
            programs = {}
            for length in sorted(set(step_buckets)):
                args = (state, opt_state, frozen,
                        _batch_spec((n_runs,), config.accum, rows, length, stacked_sharding), keys[0])
                programs[length], spent = _compiled(mode, graphdef, opt_args, dtypes, jitted, args)
                compile_s += spent

            def batch_at(s):
                return jax.device_put(_stacked_batch(pool, orders[:, s], step_buckets[s], config.accum),
                                      stacked_sharding)

            losses = []
            start = time.perf_counter()
            upcoming = batch_at(0)
            for s in range(config.steps):
                batch = upcoming
                state, opt_state, metrics = programs[step_buckets[s]](state, opt_state, frozen, batch, keys[s])
                losses.append(metrics["loss"])
                if s + 1 < config.steps:
                    upcoming = batch_at(s + 1)  # built while the step runs
                bar.update(1)
            jax.block_until_ready(state)
            train_s = time.perf_counter() - start
            train_loss = np.stack(jax.device_get(losses), axis=1)
        else:
            keys = [jax.random.fold_in(base_key, s) for s in range(longest)]
            device = jax.devices()[0]
            fresh_state = jax.device_put(trainable, device)
            opt_state0 = jax.jit(tx.init)(fresh_state)
            programs = {}  # (run length, bucket) -> compiled step: the lr schedule depends on the length
            for n_steps in sorted(set(lengths)):
                run_args = config.optimizer_args(n_steps)
                _, run_jitted = _step_function(mode, graphdef, run_args, dtypes)
                for length in sorted(set(step_buckets[:n_steps])):
                    args = (fresh_state, opt_state0, frozen, _batch_spec((), config.accum, rows, length, None),
                            keys[0])
                    programs[n_steps, length], spent = _compiled(mode, graphdef, run_args, dtypes, run_jitted, args)
                    compile_s += spent
            finals = []
            train_loss = np.full((n_runs, longest), np.nan)  # NaN after a shorter run's last step
            start = time.perf_counter()
            for r, n_steps in enumerate(lengths):
                state = jax.tree.map(jnp.copy, fresh_state)  # every run starts from the same weights
                opt_state = jax.jit(tx.init)(state)
                run_losses = []
                upcoming = _run_batch(pool, orders[r, 0], step_buckets[0], config.accum)
                for s in range(n_steps):
                    batch = upcoming
                    program = programs[n_steps, step_buckets[s]]
                    state, opt_state, metrics = program(state, opt_state, frozen, batch, keys[s])
                    run_losses.append(metrics["loss"])
                    if s + 1 < n_steps:
                        upcoming = _run_batch(pool, orders[r, s + 1], step_buckets[s + 1], config.accum)
                    bar.update(1)
                finals.append(state)
                train_loss[r, :n_steps] = np.asarray(jax.device_get(run_losses), np.float64)
            state = jax.tree.map(lambda *xs: jnp.stack(xs), *finals)
            jax.block_until_ready(state)
            train_s = time.perf_counter() - start
    finally:
        bar.close()
    if stats is not None:
        stats.update({"mode": mode, "runs": n_runs, "steps": longest, "run_steps": lengths, "compile_s": compile_s,
                      "train_s": train_s, "bucket_lengths": sorted(set(step_buckets)),
                      "devices": jax.device_count(), "train_loss": np.asarray(train_loss, np.float64)})
    return state


# ----------------------------------------------------------------------------------------------
# Evaluation


def _stacked_eval_function(graphdef, dtypes) -> Callable:
    """jit(vmap(eval step)): per-row (NLL, response tokens) [R, B] of R runs on one shared batch."""
    key = ("eval", graphdef, dtypes_key(dtypes))
    return _FUNCTIONS.get(key, lambda: jax.jit(
        jax.vmap(make_eval_step(graphdef, dtypes), in_axes=(0, None, None))))


def _run_count(stacked: Pytree, reference: Pytree) -> int:
    """R of a stacked trainable state, after checking it matches the model's trainable state."""
    if jax.tree.structure(stacked) != jax.tree.structure(reference):
        raise ValueError("the stacked trainable state does not match the model's trainable weights (a LoRA "
                         "state needs the model with the same adapters, a full one the plain model)")
    leads = set()
    for got, want in zip(jax.tree.leaves(stacked), jax.tree.leaves(reference)):
        if tuple(got.shape[1:]) != tuple(want.shape):
            raise ValueError(f"stacked leaf of shape {tuple(got.shape)} does not stack weights of shape "
                             f"{tuple(want.shape)}")
        leads.add(int(got.shape[0]))
    if len(leads) != 1:
        raise ValueError(f"stacked leaves disagree on the number of runs: {sorted(leads)}")
    return leads.pop()


def eval_names(eval_pool: InstructionPool, names: Sequence[str] | None) -> tuple[tuple[str, ...], np.ndarray]:
    """(the categories to evaluate: ``names``, default the eval pool's sorted; each eval example's
    category [M]). A category without an example in ``eval_pool`` is a ValueError naming the pool."""
    cats = np.array(pool_categories(eval_pool), dtype=object)
    present = set(cats.tolist())
    names = tuple(sorted(present)) if names is None else tuple(str(n) for n in names)
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(f"{eval_pool.source}: no evaluation examples of categories {missing}")
    return names, cats


def evaluate_runs(model: nnx.Module, stacked_trainable: Pytree, eval_pool: InstructionPool,
                  metric: str = "loss", *, names: Sequence[str] | None = None, batch_size: int = 16,
                  n_buckets: int = 4, tokenizer=None, max_new_tokens: int = 32) -> np.ndarray:
    """Per-category performance of each run: float64 [R, N], columns in ``names`` order (default:
    the eval pool's categories, sorted). ``model`` gives the structure and frozen weights and is
    not modified.

    ``metric="loss"``: mean response-token NLL per category (total NLL / total response tokens of
    the category's examples, the rule of `jraise.train.loop.evaluate_loss`), all R runs at once:
    the trainer's eval step vmapped over the run axis, each eval batch shared by the runs.
    ``metric="exact_match"``: greedy-decoding accuracy per category via `jraise.eval.evaluate`,
    one run after another on a copy of the model (needs ``tokenizer``).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if len(eval_pool) == 0:
        raise ValueError(f"{eval_pool.source}: no evaluation examples")
    names, cats = eval_names(eval_pool, names)
    graphdef, reference, frozen = split_trainable(model)
    n_runs = _run_count(stacked_trainable, reference)
    perf = np.zeros((n_runs, len(names)), np.float64)

    if metric == "loss":
        dtypes = param_dtypes(model)
        eval_fn = _stacked_eval_function(graphdef, dtypes)
        stacked_sharding, replicated = run_mesh(n_runs)
        stacked = jax.device_put(stacked_trainable, stacked_sharding)
        frozen = jax.device_put(frozen, replicated)
        order = np.argsort(eval_pool.lengths, kind="stable")  # similar lengths together: less padding
        buckets = length_buckets(eval_pool.lengths, n_buckets)
        pending = []
        for batch in iterate_batches(eval_pool, order, batch_size, buckets):
            inputs = jax.device_put({k: batch[k] for k in MODEL_KEYS}, replicated)
            pending.append((batch["index"], eval_fn(stacked, frozen, inputs)))  # no sync per batch
        sum_nll = np.zeros((n_runs, len(eval_pool)), np.float64)
        tokens = np.zeros(len(eval_pool), np.float64)
        for index, (nll, count) in pending:
            real = index != PAD_INDEX
            sum_nll[:, index[real]] = np.asarray(nll, np.float64)[:, real]
            tokens[index[real]] = np.asarray(count, np.float64)[0, real]
        for k, name in enumerate(names):
            rows = cats == name
            if tokens[rows].sum() <= 0:
                raise ValueError(f"{eval_pool.source}: category {name!r} has no response tokens to score")
            perf[:, k] = sum_nll[:, rows].sum(axis=1) / tokens[rows].sum()
        return perf

    if tokenizer is None:
        raise ValueError("metric='exact_match' needs the tokenizer (evaluate_runs(..., tokenizer=tok))")
    from jraise.eval.report import evaluate

    clone = nnx.clone(model)
    for r in range(n_runs):
        assign_trainable(clone, jax.tree.map(lambda x, r=r: x[r], stacked_trainable))
        result = evaluate(clone, tokenizer, eval_pool, kinds=("exact_match",), batch_size=batch_size,
                          max_new_tokens=max_new_tokens)
        per = result["exact_match"]["per_category"]
        for k, name in enumerate(names):
            if name not in per or per[name]["accuracy"] is None:
                raise ValueError(f"{eval_pool.source}: exact match gave no accuracy for category {name!r}")
            perf[r, k] = per[name]["accuracy"]
    return perf


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
