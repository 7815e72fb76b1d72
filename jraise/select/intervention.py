"""Beyond-IID intervention runs for jraise's own model: N+1 fine-tunes of a ``CausalLM`` on an
``InstructionPool`` -> per-category performance -> the interaction matrix Gamma.

Method: Beyond IID (Zhao, Du, Ju, Wu, Pan 2024, arXiv 2409.07045, the interaction
estimate). From a baseline subset D0 of the pool (``n0_k`` examples of
category k) build R = N+1 training sets: run 0 is D0, run k (1-based) is D0 with category k-1
changed by ``Delta_k``. Fine-tune the same starting model on each set with the same
hyperparameters, measure the performance of every run on every category of a held-out pool and
turn the (R, N) table into ``Gamma[target, source]`` with
`jraise.select.interactions.interaction_matrix`.

This module is an adapter: the design (`InterventionConfig`, `intervention_sets`, `run_steps`,
`run_orders`, `run_mesh`, `interaction_from_runs`, re-exported here) and the runs themselves
(`train_runs_fn`, `evaluate_runs_fn`) are the model-agnostic ones of
`jraise.select.interventions_agnostic`, with jraise's trainer as the user's step::

    train_step((trainable, adam state), batch [A, B/A, L], frozen, key) -> (state, loss)
    batch_fn(indices, s) = the pool rows padded to step s's bucket, split into A micro-batches
    shared = frozen (base weights under LoRA, RNG streams); step_inputs(s) = fold_in(key(seed), s)

Data flow::

    pool.categories --intervention_sets--> D0, R index sets, deltas [N], names
    R sets --run_orders--> pool indices [R, steps, batch]
    per step s: R batches padded to ONE common length bucket -> arrays [R, A, B/A, L]
    (stacked trainable [R, ...], stacked Adam state [R, ...]; frozen weights and key shared)
        --train_runs_fn (jit(vmap(step)) over the run axis, donated)--> next stacked state
    stacked trainable --evaluate_runs--> perf [R, N] --interaction_from_runs--> Gamma [N, N]

jraise-specific choices (the fixed step budget, common random numbers and the run axis on
devices are the agnostic module's):

* The step. Each run's update is exactly `jraise.train.step.make_train_step`'s: the
  response-token mean NLL gradient accumulated over the A micro-batches (`accumulated_grads`),
  then AdamW (`make_optimizer` with `InterventionConfig.optimizer_args`). What trains is what
  `split_trainable` picks: the LoRA adapters when attached, else every parameter.
* Common bucket. The R batches of a step are padded to the smallest length bucket that holds the
  longest of them, so the step has one static shape. Buckets are fitted to the whole pool's
  lengths (as `jraise.train.loop.train` does), so the compiled shapes depend on the pool, not on
  the seed or the sets; one program per bucket used. The sequential mode trains on exactly the
  same padded batches, so both modes do the same math.
* Epoch budget. Under ``budget="epochs"`` runs differ in length and each length has its own lr
  schedule: the runs of one length are one `train_runs_fn` call (sequential mode), on the first
  steps of the shared orders, padded to the same per-step buckets.
* Memory. The stacked state holds R copies of the trainable weights and of both Adam moments:
  about 3 R x the trainable size. Full fine-tuning is fine for small models; use LoRA adapters
  (``add_lora``) for large ones, where the frozen base is shared, not copied.
* Speed. The vmapped program pays off where one run leaves the device underused (GPU/TPU, many
  small runs). On XLA:CPU it is slower than running the runs one after another: batched
  ``dot_general`` (per-run weights) takes a slower path than plain GEMMs and the R-times larger
  activations leave the caches; ``benchmarks/interaction_vmap.py`` measures the ratio.
* Compilation. Each step shape is compiled once, on first use, and kept per model structure,
  optimizer and shape (`train_runs_fn`'s cache); ``compile_s`` and ``train_s`` are reported apart.

Categories come from ``pool.categories``; an example without one is an error naming the pool's
source (derive categories first). Category names are sorted, the order of ``deltas``, of the
columns of ``perf`` and of Gamma's rows and columns.

The whole measurement end to end (sets, runs, performance, Gamma) with its files
(``interactions.json`` and the Gamma files) is `jraise.jobs.intervention.measure_interactions`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
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
from jraise.select.interventions_agnostic import (
    BUDGETS,
    METRICS,
    MODES,
    RUN_AXIS,
    InterventionConfig,
    evaluate_runs_fn,
    interaction_from_runs,
    intervention_sets,
    run_mesh,
    run_orders,
    run_steps,
    train_runs_fn,
)
from jraise.train.loop import accumulation_batch
from jraise.train.step import (
    MODEL_KEYS,
    accumulated_grads,
    assign_trainable,
    make_eval_step,
    make_optimizer,
    param_dtypes,
    split_trainable,
)

__all__ = [
    "BUDGETS",
    "METRICS",
    "MODES",
    "RUN_AXIS",
    "InterventionConfig",
    "eval_names",
    "evaluate_runs",
    "interaction_from_runs",
    "intervention_sets",
    "pool_categories",
    "run_mesh",
    "run_orders",
    "run_steps",
    "train_interventions",
]

Pytree = Any


def pool_categories(pool: InstructionPool) -> tuple[str, ...]:
    """The pool's category of every example; an example without one is an error naming the pool."""
    for i, c in enumerate(pool.categories):
        if c is None or (isinstance(c, str) and not c):
            raise ValueError(
                f"{pool.source}: example index {i} (id {pool.ids[i]!r}) has no category; the "
                "Beyond-IID intervention needs one category per example (derive categories first)")
    return tuple(str(c) for c in pool.categories)


# ----------------------------------------------------------------------------------------------
# Training: jraise's trainer as the user's step


# (tx, step) per model structure, optimizer and dtypes, and the stacked eval step: the same step
# object on every call lets `train_runs_fn` reuse its compiled programs.
_FUNCTIONS = CompiledCache(16)
# Bytes of float32 logits one stacked call may hold (all its runs x rows x length x vocabulary,
# with what is computed beside them): `eval_rows_per_call` shrinks an evaluation batch to fit,
# `train_runs_per_call` splits the runs of a vmapped training step into groups that fit.
LOGITS_BUDGET = 2 * 2**30


def train_runs_per_call(n_runs: int, rows: int, max_len: int, vocab_size: int, n_devices: int = 1,
                        budget: int | None = None) -> int:
    """Runs of one vmapped training call: all ``n_runs``, or fewer (at least ``n_devices``, and a
    multiple of it where possible, so the run axis stays sharded) where their float32 logits, the
    log-softmax and the logits' gradient, ``3 * 4 * runs * rows * max_len * vocab`` bytes with
    ``rows`` the micro-batch, would exceed ``budget`` (default `LOGITS_BUDGET`). SmolLM2's 49k
    vocabulary with 8 rows of 192 tokens needs about 0.9 GB a run, so 11 runs would need 10 GB."""
    per_run = 3 * 4 * rows * max_len * vocab_size
    budget = LOGITS_BUDGET if budget is None else budget
    fit = max(1, budget // per_run)
    if fit >= n_runs:
        return n_runs
    return max(n_devices, fit - fit % n_devices)


def _run_step(graphdef: nnx.GraphDef, opt_args: dict, dtypes: Pytree) -> tuple[optax.GradientTransformation, Callable]:
    """(tx, ``step((trainable, opt_state), batch, frozen, key) -> ((trainable, opt_state), loss)``):
    one update of `jraise.train.step.make_train_step` (mean response-token NLL over the batch's A
    micro-batches, AdamW of ``opt_args``), unjitted, for `train_runs_fn` to jit or vmap."""
    key = ("step", graphdef, tuple(sorted(opt_args.items())), dtypes_key(dtypes))

    def build():
        tx, _ = make_optimizer(**opt_args)

        def step(state, batch, frozen, key):
            trainable, opt_state = state
            grads, loss, _, _ = accumulated_grads(graphdef, dtypes, trainable, frozen, batch, key)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return (optax.apply_updates(trainable, updates), opt_state), loss

        return tx, step

    return _FUNCTIONS.get(key, build)


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

    ``sets`` (R pool-index arrays) defaults to `intervention_sets` of the pool's categories. All
    runs use ``config``'s optimizer and step budget (see the module docstring for the step, the
    data order and padding); `train_runs_fn` runs them.

    ``mode="vmap"``: all R runs as one program per step, the run axis sharded over the devices
    when R is a multiple of their number (`run_mesh`); where the R runs' logits would not fit
    `LOGITS_BUDGET` (a real vocabulary), groups of `train_runs_per_call` runs one after another,
    with the same results. ``mode="sequential"``: the runs one after another with the plain jitted
    step on the same padded batches and dropout keys: the same math, so the results agree to float
    tolerance; the speed baseline. ``budget="epochs"`` needs
    ``mode="sequential"``.

    ``stats``, when given, is filled with ``mode``, ``runs``, ``runs_per_call``, ``steps``,
    ``compile_s`` (compilation of every step shape used; 0 when already compiled in this process),
    ``train_s`` (the training loop, batch building included), ``bucket_lengths``, ``devices`` and
    ``train_loss`` (float64 [R, steps], each step's mean response NLL per run; under
    ``budget="epochs"`` ``steps`` is the longest run's length, ``run_steps`` lists every run's, and
    a shorter run's row is NaN after its last step).
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
    # epochs, then a partial one), and every run pads a step to the same bucket: the smallest
    # that holds the longest example any run sees at that step.
    orders = run_orders(sets, longest, config.batch_size, config.seed)
    buckets = length_buckets(pool.lengths, config.n_buckets)
    step_buckets = [pick_bucket(int(n), buckets) for n in pool.lengths[orders].max(axis=(0, 2))]

    def batch_fn(indices: np.ndarray, s: int) -> dict:
        return accumulation_batch(make_batch(pool, indices, step_buckets[s]), config.accum)

    graphdef, trainable, frozen = split_trainable(model)
    dtypes = param_dtypes(model)
    base_key = jax.random.key(config.seed)
    train_loss = np.full((n_runs, longest), np.nan)  # NaN after a shorter run's last step
    runs_by_length = {n: [r for r, m in enumerate(lengths) if m == n] for n in sorted(set(lengths))}
    per_call = n_runs
    if mode == "vmap":  # groups of runs whose logits fit the budget (all of them on a small vocabulary)
        per_call = train_runs_per_call(n_runs, config.batch_size // config.accum, max(step_buckets),
                                       model.config.vocab_size, jax.device_count())
    groups = [(n, runs[i:i + per_call]) for n, runs in runs_by_length.items() for i in range(0, len(runs), per_call)]
    states, compile_s, train_s = [], 0.0, 0.0
    bar = tqdm(total=sum(n for n, _ in groups) if mode == "vmap" else sum(lengths),
               disable=None if progress else True, desc=f"interventions ({mode}, {n_runs} runs)", unit="step",
               dynamic_ncols=True)
    try:
        for n_steps, runs in groups:  # one length under the fixed step budget
            tx, step = _run_step(graphdef, config.optimizer_args(n_steps), dtypes)
            part: dict = {}
            (trained, _), loss = train_runs_fn(
                step, (trainable, tx.init(trainable)), batch_fn, orders[runs, :n_steps], mode=mode, stats=part,
                shared=frozen, step_inputs=lambda s: jax.random.fold_in(base_key, s), has_aux=True,
                per_step_batches=True, on_step=lambda: bar.update(1))
            states.append(trained)
            train_loss[runs, :n_steps] = loss
            compile_s += part["compile_s"]
            train_s += part["train_s"]
    finally:
        bar.close()
    if len(states) == 1:
        state = states[0]
    else:  # runs grouped by length and by the logits budget -> back in run order
        back = np.argsort(np.concatenate([runs for _, runs in groups]), kind="stable")
        state = jax.tree.map(lambda *xs: jnp.concatenate(xs)[back], *states)
    if stats is not None:
        stats.update({"mode": mode, "runs": n_runs, "runs_per_call": per_call, "steps": longest,
                      "run_steps": lengths, "compile_s": compile_s, "train_s": train_s,
                      "bucket_lengths": sorted(set(step_buckets)), "devices": jax.device_count(),
                      "train_loss": train_loss})
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


def eval_rows_per_call(n_runs: int, max_len: int, vocab_size: int, batch_size: int,
                       budget: int | None = None) -> int:
    """Rows of one stacked evaluation call: ``batch_size``, or fewer (at least 1) where the R
    runs' float32 logits and their log-softmax, ``2 * 4 * R * rows * max_len * vocab`` bytes, would
    exceed ``budget`` (default `LOGITS_BUDGET`). A 49k-token vocabulary (SmolLM2) with 11 runs
    and 192 tokens needs about 0.8 GB per row, so 64 rows would need 53 GB; a testbed vocabulary
    fits any batch."""
    per_row = 2 * 4 * n_runs * max_len * vocab_size
    budget = LOGITS_BUDGET if budget is None else budget
    return max(1, min(batch_size, budget // per_row))


def evaluate_runs(model: nnx.Module, stacked_trainable: Pytree, eval_pool: InstructionPool,
                  metric: str = "loss", *, names: Sequence[str] | None = None, batch_size: int = 16,
                  n_buckets: int = 4, tokenizer=None, max_new_tokens: int = 32) -> np.ndarray:
    """Per-category performance of each run: float64 [R, N], columns in ``names`` order (default:
    the eval pool's categories, sorted). ``model`` gives the structure and frozen weights and is
    not modified.

    ``metric="loss"``: mean response-token NLL per category (total NLL / total response tokens of
    the category's examples, the rule of `jraise.train.loop.evaluate_loss`), all R runs at once:
    the trainer's eval step vmapped over the run axis, each eval batch shared by the runs (at most
    ``batch_size`` rows, fewer where the runs' logits would not fit `LOGITS_BUDGET`:
    `eval_rows_per_call`).
    ``metric="exact_match"``: greedy-decoding accuracy per category via `jraise.eval.evaluate`,
    one run after another on a copy of the model (needs ``tokenizer``): the eager ``eval_fn`` of
    `evaluate_runs_fn` (``jit_eval=False``).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if len(eval_pool) == 0:
        raise ValueError(f"{eval_pool.source}: no evaluation examples")
    names, cats = eval_names(eval_pool, names)
    graphdef, reference, frozen = split_trainable(model)
    n_runs = _run_count(stacked_trainable, reference)

    if metric == "loss":
        perf = np.zeros((n_runs, len(names)), np.float64)
        dtypes = param_dtypes(model)
        eval_fn = _stacked_eval_function(graphdef, dtypes)
        stacked_sharding, replicated = run_mesh(n_runs)
        stacked = jax.device_put(stacked_trainable, stacked_sharding)
        frozen = jax.device_put(frozen, replicated)
        order = np.argsort(eval_pool.lengths, kind="stable")  # similar lengths together: less padding
        buckets = length_buckets(eval_pool.lengths, n_buckets)
        rows = eval_rows_per_call(n_runs, max(buckets), model.config.vocab_size, batch_size)
        pending = []
        for batch in iterate_batches(eval_pool, order, rows, buckets):
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

    def accuracy(trainable) -> dict:
        """One run's accuracy per category (an eager ``eval_fn`` of `evaluate_runs_fn`)."""
        assign_trainable(clone, trainable)
        result = evaluate(clone, tokenizer, eval_pool, kinds=("exact_match",), batch_size=batch_size,
                          max_new_tokens=max_new_tokens)
        per = result["exact_match"]["per_category"]
        for name in names:
            if name not in per or per[name]["accuracy"] is None:
                raise ValueError(f"{eval_pool.source}: exact match gave no accuracy for category {name!r}")
        return {name: per[name]["accuracy"] for name in names}

    return evaluate_runs_fn(accuracy, stacked_trainable, names, jit_eval=False)
