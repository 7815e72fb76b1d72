"""The Beyond-IID intervention over a user's own JAX step: a toy pure-JAX regression with an
engineered interaction (category B's labels follow category A's, C is unrelated), vmap vs
sequential parity, determinism, the design (D0, distinct runs) and the contract's errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jraise.select
from jraise.select.intervention import InterventionConfig, intervention_sets, run_orders
from jraise.select.interventions_agnostic import (
    category_names,
    evaluate_runs_fn,
    measure_interactions_fn,
    train_runs_fn,
)

# The user's problem: linear regression y = x . w* + noise on 4 features, where each category's
# inputs scatter around its own prototype. B's prototype lies close to A's (cosine 0.9) and w* is
# zero off A's direction, so B's labels correlate with A's and training on A fits most of B
# (A -> B synergy, and B -> A); C's prototype is orthogonal to both, so C's examples barely move
# A's or B's predictions. Training stops well before convergence, where more data of a category
# still helps it. With near-fixed inputs per category every example pulls the weights about the
# same way, so the effects depend on the categories' counts, not on which records were drawn.
NAMES = ["A", "B", "C"]
PER_CATEGORY, HELD_OUT, DIM, SPREAD = 80, 50, 4, 0.1
PROTOTYPE = {"A": np.array([1.0, 0.0, 0.0, 0.0]), "B": np.array([0.9, np.sqrt(1 - 0.81), 0.0, 0.0]),
             "C": np.array([0.0, 0.0, 1.0, 0.0])}
TRUE_W = np.array([2.0, 0.0, 2.0, 0.0])
_rng = np.random.default_rng(0)


def _examples(name, n):
    x = PROTOTYPE[name] + SPREAD * _rng.normal(size=(n, DIM))
    return x.astype(np.float32), (x @ TRUE_W + 0.1 * _rng.normal(size=n)).astype(np.float32)


_pool = [_examples(n, PER_CATEGORY) for n in NAMES]
_shuffle = _rng.permutation(3 * PER_CATEGORY)  # interleave the categories in the pool
POOL_X = np.concatenate([x for x, _ in _pool])[_shuffle]
POOL_Y = np.concatenate([y for _, y in _pool])[_shuffle]
CATEGORIES = [NAMES[i] for i in np.repeat(np.arange(3), PER_CATEGORY)[_shuffle]]
HELD = {n: _examples(n, HELD_OUT) for n in NAMES}

# 3 categories x 80 records: D0 = 40 each, Delta = +20 each (from the 40 left), R = 4 runs.
CONFIG = InterventionConfig(delta_fraction=0.5, base_fraction=0.5, steps=25, batch_size=32, seed=1)
LR, NOISE = 0.01, 1e-3


def init_state():
    """Weights, momentum, and a PRNG key the step splits (common random numbers across runs)."""
    return {"w": jnp.zeros(DIM), "m": jnp.zeros(DIM), "key": jax.random.key(7)}


def train_step(state, batch):
    """SGD with momentum on the batch's mean squared error, plus a little key-driven gradient noise."""
    def loss(w):
        return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)

    key, sub = jax.random.split(state["key"])
    grad = jax.grad(loss)(state["w"]) + NOISE * jax.random.normal(sub, (DIM,))
    m = 0.5 * state["m"] + grad
    return {"w": state["w"] - LR * m, "m": m, "key": key}


def batch_fn(indices):
    return {"x": POOL_X[indices], "y": POOL_Y[indices]}


def eval_fn(state):
    """float32 [3]: held-out MSE of A, B, C (the sorted category names)."""
    return jnp.stack([jnp.mean((HELD[n][0] @ state["w"] - HELD[n][1]) ** 2) for n in NAMES])


@pytest.fixture(scope="module")
def vmapped():
    return measure_interactions_fn(train_step, eval_fn, init_state(), CATEGORIES, batch_fn, CONFIG)


@pytest.fixture(scope="module")
def sequential():
    return measure_interactions_fn(train_step, eval_fn, init_state(), CATEGORIES, batch_fn, CONFIG,
                                   mode="sequential")


def test_exported():
    assert jraise.select.measure_interactions_fn is measure_interactions_fn


def test_shapes_names_and_design(vmapped):
    assert vmapped["names"] == NAMES == list(category_names(CATEGORIES))
    assert vmapped["gamma"].shape == (3, 3) and vmapped["perf"].shape == (4, 3)
    np.testing.assert_array_equal(np.diag(vmapped["gamma"]), 1.0)
    assert vmapped["deltas"].tolist() == [20, 20, 20] and vmapped["base_counts"] == [40, 40, 40]
    assert vmapped["set_sizes"] == [120, 140, 140, 140]
    assert vmapped["metric"] == "loss" and not vmapped["higher_is_better"] and vmapped["mode"] == "vmap"
    base, _, _, _ = intervention_sets(CATEGORIES, CONFIG)
    np.testing.assert_array_equal(vmapped["base_indices"], base)
    assert {k: v.shape for k, v in vmapped["stacked_states"].items()} == {"w": (4, DIM), "m": (4, DIM),
                                                                         "key": (4,)}


def test_vmap_matches_sequential(vmapped, sequential):
    rel = np.abs(vmapped["perf"] - sequential["perf"]) / np.abs(sequential["perf"])
    assert rel.max() < 1e-5
    np.testing.assert_allclose(vmapped["stacked_states"]["w"], sequential["stacked_states"]["w"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vmapped["gamma"], sequential["gamma"], rtol=1e-3, atol=1e-4)


def test_runs_differ(vmapped):
    perf = vmapped["perf"]
    for k in range(1, 4):
        assert not np.allclose(perf[k], perf[0], rtol=1e-6, atol=0), f"run {k} equals the baseline run"
    assert len({tuple(row) for row in perf.tolist()}) == 4
    # Own data helps: every intervened category's loss drops below the baseline's.
    assert all(perf[k + 1, k] < perf[0, k] for k in range(3))


def test_engineered_interaction(vmapped):
    """Loss is lower-is-better, so interaction_matrix flips the sign: Gamma > 0 means "helps". Adding
    A helps B (B's labels follow A's); A and C are unrelated, and under the fixed step budget adding
    one only dilutes the other's share of the updates, so their entries are negative. The margins
    hold across data and design seeds (Gamma[B, A] 0.7 to 1.2, Gamma[C, A] and Gamma[A, C] -0.4 to
    -1.7)."""
    g = dict(zip(NAMES, range(3)))
    gamma = vmapped["gamma"]
    assert gamma[g["B"], g["A"]] > 0.3
    assert gamma[g["B"], g["A"]] > gamma[g["C"], g["A"]] + 0.5
    assert gamma[g["B"], g["A"]] > gamma[g["A"], g["C"]] + 0.5


def test_deterministic_by_seed(vmapped):
    again = measure_interactions_fn(train_step, eval_fn, init_state(), CATEGORIES, batch_fn, CONFIG)
    np.testing.assert_array_equal(again["perf"], vmapped["perf"])
    np.testing.assert_array_equal(again["gamma"], vmapped["gamma"])
    other = measure_interactions_fn(train_step, eval_fn, init_state(), CATEGORIES, batch_fn,
                                    dataclasses.replace(CONFIG, seed=2))
    assert not np.array_equal(other["base_indices"], vmapped["base_indices"])
    assert not np.allclose(other["perf"], vmapped["perf"])


@pytest.mark.parametrize("mode", ["vmap", "sequential"])
def test_each_run_trains_on_its_own_set(mode):
    """batch_fn sees exactly the `run_orders` rows of each run; run 0 covers D0, run k+1 its set."""
    base, sets, _, _ = intervention_sets(CATEGORIES, CONFIG)
    orders = run_orders(sets, CONFIG.steps, CONFIG.batch_size, CONFIG.seed)
    seen = []

    def recording(indices):
        assert indices.dtype == np.int32 and indices.shape == (CONFIG.batch_size,) and indices.min() >= 0
        seen.append(indices.copy())
        return batch_fn(indices)

    train_runs_fn(train_step, init_state(), recording, orders, mode=mode)
    # One call per (run, step): the first batch is built once, for the up-front check, and reused.
    calls = np.stack(seen)
    if mode == "vmap":
        calls = calls.reshape(CONFIG.steps, 4, -1).transpose(1, 0, 2)
    else:
        calls = calls.reshape(4, CONFIG.steps, -1)
    np.testing.assert_array_equal(calls, orders)
    np.testing.assert_array_equal(np.unique(calls[0]), base)
    for r, s in enumerate(sets):
        np.testing.assert_array_equal(np.unique(calls[r]), s)


def test_init_state_untouched_and_mapping_eval(vmapped):
    state = init_state()
    stacked = train_runs_fn(train_step, state, batch_fn, np.zeros((2, 3, 4), np.int64))
    np.testing.assert_array_equal(state["w"], 0.0)  # donated buffers were the stacked copies
    by_name = evaluate_runs_fn(lambda s: dict(zip(NAMES, eval_fn(s))), stacked, NAMES)
    np.testing.assert_array_equal(by_name, evaluate_runs_fn(eval_fn, stacked, NAMES))
    seq = evaluate_runs_fn(eval_fn, stacked, NAMES, mode="sequential")
    np.testing.assert_allclose(seq, by_name, rtol=1e-6)


def test_contract_errors():
    with pytest.raises(ValueError, match="shape \\(3,\\)"):
        measure_interactions_fn(train_step, lambda s: eval_fn(s)[:2], init_state(), CATEGORIES, batch_fn, CONFIG)
    with pytest.raises(ValueError, match="lacks categories \\['C'\\]"):
        measure_interactions_fn(train_step, lambda s: {"A": s["w"][0], "B": s["w"][1]}, init_state(),
                                CATEGORIES, batch_fn, CONFIG)
    with pytest.raises(ValueError, match="same structure, shapes and dtypes as it takes"):
        measure_interactions_fn(lambda s, b: {**s, "w": s["w"][:2]}, eval_fn, init_state(), CATEGORIES,
                                batch_fn, CONFIG)
    with pytest.raises(ValueError, match="batch_fn must return the same"):
        train_runs_fn(train_step, init_state(), lambda i: batch_fn(i[: 1 + int(i[0] > 0)]),
                      np.arange(24).reshape(2, 3, 4))
    with pytest.raises(ValueError, match="budget='epochs'"):
        measure_interactions_fn(train_step, eval_fn, init_state(), CATEGORIES, batch_fn,
                                dataclasses.replace(CONFIG, budget="epochs"))
    with pytest.raises(ValueError, match="mode must be one of"):
        measure_interactions_fn(train_step, eval_fn, init_state(), CATEGORIES, batch_fn, CONFIG, mode="pmap")
    with pytest.raises(ValueError, match="orders must"):
        train_runs_fn(train_step, init_state(), batch_fn, np.full((2, 3, 4), -1))


def test_gamma_error_keeps_the_runs():
    """A metric that never moves gives no positive own effect: Gamma fails, the runs come back."""
    small = dataclasses.replace(CONFIG, steps=2)
    with pytest.raises(ValueError, match="own") as info:
        measure_interactions_fn(train_step, lambda s: jnp.zeros(3), init_state(), CATEGORIES, batch_fn, small)
    result = info.value.result
    assert result["gamma"] is None and result["perf"].shape == (4, 3)
    assert result["stacked_states"]["w"].shape == (4, DIM)


# ----------------------------------------------------------------------------------------------
# The options an adapter needs (jraise's own runs use all of them)


def step_with_extras(state, batch, shared, key):
    """The toy step with the learning rate and a noise scale shared by all runs, a per-step key
    from outside, and the batch loss as aux; the batch is zero-padded to a per-step length."""
    def loss(w):
        err = (batch["x"] @ w - batch["y"]) * batch["mask"]
        return jnp.sum(err ** 2) / jnp.sum(batch["mask"])

    value, grad = jax.value_and_grad(loss)(state["w"])
    grad = grad + shared["noise"][0] * jax.random.normal(key, (DIM,))
    m = 0.5 * state["m"] + grad
    return {"w": state["w"] - shared["lr"] * m, "m": m}, value


def padded_batch(indices, s):
    """Rows padded to 32 + 8 * (s % 2): two batch shapes, alternating by step."""
    pad = 8 * (s % 2)
    x = np.concatenate([POOL_X[indices], np.zeros((pad, DIM), np.float32)])
    y = np.concatenate([POOL_Y[indices], np.zeros(pad, np.float32)])
    return {"x": x, "y": y, "mask": np.concatenate([np.ones(len(indices), np.float32), np.zeros(pad, np.float32)])}


SHARED = {"lr": jnp.float32(LR), "noise": jnp.full((3,), NOISE, jnp.float32)}  # [3]: not the run axis (R = 4)


def _step_key(s):
    return jax.random.fold_in(jax.random.key(7), s)


@pytest.mark.parametrize("mode", ["vmap", "sequential"])
def test_shared_step_inputs_aux_and_per_step_shapes(mode):
    """shared is passed once (unbatched), step_inputs(s) per step, aux comes back [R, steps], and
    per-step shapes give one program per shape; the runs equal a plain loop of the step."""
    _, sets, _, _ = intervention_sets(CATEGORIES, CONFIG)
    orders = run_orders(sets, 6, CONFIG.batch_size, CONFIG.seed)
    init = {"w": jnp.zeros(DIM), "m": jnp.zeros(DIM)}
    steps_seen, stats = [], {}

    def batch_fn(indices, s):
        steps_seen.append(s)
        return padded_batch(indices, s)

    states, aux = train_runs_fn(step_with_extras, init, batch_fn, orders, mode=mode, shared=SHARED,
                                step_inputs=_step_key, has_aux=True, per_step_batches=True,
                                on_step=lambda: stats.setdefault("calls", []).append(1), stats=stats)
    assert aux.shape == (4, 6) and aux.dtype == np.float32
    assert states["w"].shape == (4, DIM)
    assert len(stats["calls"]) == (6 if mode == "vmap" else 24) and sorted(set(steps_seen)) == list(range(6))
    plain = jax.jit(step_with_extras)
    for r in range(4):
        state = init
        for s in range(6):
            state, loss = plain(state, padded_batch(orders[r, s].astype(np.int32), s), SHARED, _step_key(s))
            np.testing.assert_allclose(aux[r, s], loss, rtol=1e-5)
        np.testing.assert_allclose(states["w"][r], state["w"], rtol=1e-5, atol=1e-7)
    # Same step object, same shapes: the programs are reused.
    again = {}
    train_runs_fn(step_with_extras, init, padded_batch, orders, mode=mode, shared=SHARED, step_inputs=_step_key,
                  has_aux=True, per_step_batches=True, stats=again)
    assert again["compile_s"] == 0.0 and stats["compile_s"] > 0.0
    with pytest.raises(ValueError, match="for every run at a step"):
        train_runs_fn(step_with_extras, init, lambda i, s: padded_batch(i, s + int(i[0] % 2)), orders, mode=mode,
                      shared=SHARED, step_inputs=_step_key, has_aux=True, per_step_batches=True)


def test_measure_with_options_and_eager_eval(vmapped):
    """measure_interactions_fn passes the options through; an eager eval_fn (Python floats by
    name) gives the jitted eval's numbers."""
    init = {"w": jnp.zeros(DIM), "m": jnp.zeros(DIM)}

    def eager(state):
        return {n: float(v) for n, v in zip(NAMES, np.asarray(eval_fn(state)))}

    result = measure_interactions_fn(step_with_extras, eval_fn, init, CATEGORIES, padded_batch, CONFIG,
                                     shared=SHARED, step_inputs=_step_key, has_aux=True, per_step_batches=True)
    assert result["aux"].shape == (4, CONFIG.steps) and result["gamma"].shape == (3, 3)
    eager_perf = evaluate_runs_fn(eager, result["stacked_states"], NAMES, jit_eval=False)
    np.testing.assert_allclose(eager_perf, result["perf"], rtol=1e-6)
    assert set(result["timings"]) >= {"compile_s", "train_s", "eval_s", "total_s"}
    with pytest.raises(ValueError, match="shape \\(3,\\)"):
        evaluate_runs_fn(lambda s: np.zeros(2), result["stacked_states"], NAMES, jit_eval=False)
    # Without the options the contract is the original one: train_step(state, batch) -> state.
    assert vmapped["aux"] is None
