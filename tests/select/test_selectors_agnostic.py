"""The `Selector` contract for a user's own JAX loop: SSPL's `self_paced_selector` under jit in a
toy pure-JAX regression loop, RAISE's `raise_selector`, and `self_paced_finetune`'s pinned picks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jraise.select
from jraise.select import (
    Selector,
    SelfPacedState,
    StepInfo,
    raise_policy,
    raise_selector,
    self_paced_selector,
)
from jraise.select.rl.policy import AcquisitionMLP, PolicyConfig
from jraise.select.rl.sampling import cluster_layout
from jraise.select.self_paced import open_bucket, pace_buckets

# A toy user problem: linear regression, y = x . w* + noise whose scale differs per example, so
# the per-example losses spread out and the easy/hard split is meaningful.
N, D, B, T, N_BUCKETS, REFRESH = 40, 3, 5, 8, 4, 2
_rng = np.random.default_rng(0)
X = jnp.asarray(_rng.normal(size=(N, D)), jnp.float32)
Y = X @ jnp.array([1.0, -2.0, 0.5]) + jnp.asarray(_rng.normal(size=N) * np.linspace(0.0, 3.0, N), jnp.float32)


def example_losses(w):
    """float32 [N]: the user's per-example squared errors under the current weights."""
    return (X @ w - Y) ** 2


@jax.jit
def sgd_step(w, indices):
    def batch_loss(w):
        return jnp.mean(example_losses(w)[indices])

    return w - 0.05 * jax.grad(batch_loss)(w)


def run_loop(key, refresh_every=REFRESH):
    """The user's loop: refresh the losses every ``refresh_every`` steps, select (jitted), step."""
    selector = self_paced_selector(N, B, n_buckets=N_BUCKETS)
    select = jax.jit(selector.select)
    w, state = jnp.zeros(D), selector.init(key)
    picks, buckets, latest = [], [], []
    for t in range(1, T + 1):
        losses = None
        if (t - 1) % refresh_every == 0:
            losses = example_losses(w)
            latest.append(np.asarray(losses))
        indices, state = select(state, StepInfo(step=t, total_steps=T, losses=losses))
        picks.append(np.asarray(indices))
        buckets.append((np.asarray(state.bucket_ids), latest[-1]))
        w = sgd_step(w, indices)
    return np.stack(picks), buckets, state


def test_sspl_selector_in_a_jitted_user_loop():
    picks, buckets, state = run_loop(jax.random.key(0))
    assert picks.shape == (T, B) and picks.dtype == np.int32
    for t, (row, (bucket_ids, losses)) in enumerate(zip(picks, buckets, strict=True), start=1):
        assert len(set(row.tolist())) == B and row.min() >= 0 and row.max() < N  # distinct, no padding
        # The buckets are those of the latest losses given; the batch comes from the open ones only.
        np.testing.assert_array_equal(bucket_ids, np.asarray(pace_buckets(jnp.asarray(losses), N_BUCKETS)))
        k = (t - 1) * N_BUCKETS // T
        assert int(open_bucket(t, T, N_BUCKETS)) == k
        assert bucket_ids[row].max() <= k
    # Easiest first: steps 1-2 (k = 0) draw only from the lowest-loss quarter of the pool.
    first = buckets[0][1]
    assert np.all(first[picks[:2]] <= np.sort(first)[N // N_BUCKETS - 1])
    # Steps without losses keep the buckets of the last refresh.
    np.testing.assert_array_equal(buckets[1][0], buckets[0][0])
    # Counts add up: one per pick.
    counts = np.asarray(state.counts)
    np.testing.assert_array_equal(counts, np.bincount(picks.ravel(), minlength=N))
    assert counts.sum() == T * B and state.counts.dtype == jnp.float32
    assert isinstance(state, SelfPacedState)


def test_sspl_selector_is_reproducible_from_its_key():
    same_a, same_b = run_loop(jax.random.key(7))[0], run_loop(jax.random.key(7))[0]
    np.testing.assert_array_equal(same_a, same_b)
    assert not np.array_equal(same_a, run_loop(jax.random.key(8))[0])
    # Pure: selecting again from the same state and step gives the same batch.
    selector = self_paced_selector(N, B, n_buckets=N_BUCKETS)
    state = selector.init(jax.random.key(1))
    info = StepInfo(step=3, total_steps=T, losses=example_losses(jnp.zeros(D)))
    np.testing.assert_array_equal(selector.select(state, info)[0], selector.select(state, info)[0])


def test_sspl_selector_inside_lax_scan():
    """After a first call with losses the state's structure is fixed: the rest of the loop can be
    one `lax.scan` (losses given every step) and matches the same loop run step by step."""
    selector = self_paced_selector(N, B, n_buckets=N_BUCKETS)
    key = jax.random.key(3)

    def body(carry, t):
        w, state = carry
        indices, state = selector.select(state, StepInfo(step=t, total_steps=T, losses=example_losses(w)))
        return (sgd_step(w, indices), state), indices

    @jax.jit
    def whole_loop(key):
        w, state = jnp.zeros(D), selector.init(key)
        (w, state), first = body((w, state), 1)
        (w, state), rest = jax.lax.scan(body, (w, state), jnp.arange(2, T + 1))
        return jnp.concatenate([first[None], rest]), state

    scanned, state = whole_loop(key)
    stepwise = run_loop(key, refresh_every=1)[0]
    np.testing.assert_array_equal(np.asarray(scanned), stepwise)
    assert float(state.counts.sum()) == T * B


def test_sspl_selector_needs_losses_on_the_first_step():
    selector = self_paced_selector(N, B, n_buckets=N_BUCKETS)
    state = selector.init(jax.random.key(0))
    info = StepInfo(step=1, total_steps=T, val_loss=1.0)
    assert info.losses is None  # StepInfo without losses: as before
    with pytest.raises(ValueError, match=r"StepInfo\(.*losses="):
        selector.select(state, info)
    with pytest.raises(ValueError, match=r"StepInfo\(.*losses="):
        jax.jit(selector.select)(state, info)  # a trace-time error, not a silent garbage batch
    with pytest.raises(ValueError, match=r"shape \(40,\)"):
        selector.select(state, StepInfo(step=1, total_steps=T, losses=jnp.zeros(N - 1)))


def test_sspl_selector_rejects_bad_sizes():
    with pytest.raises(ValueError, match="easiest bucket"):
        self_paced_selector(N, N // N_BUCKETS + 1, n_buckets=N_BUCKETS)
    with pytest.raises(ValueError, match="n_buckets"):
        self_paced_selector(3, 1, n_buckets=4)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        self_paced_selector(N, 0)


def test_selector_is_a_named_tuple_and_raise_selector_returns_one():
    assert issubclass(Selector, tuple) and Selector._fields == ("init", "select", "batch_size")
    assert raise_policy is raise_selector
    for name in ("Selector", "StepInfo", "raise_selector", "raise_policy", "self_paced_selector"):
        assert name in jraise.select.__all__
    sspl = self_paced_selector(N, B, n_buckets=N_BUCKETS)
    assert isinstance(sspl, Selector) and sspl.batch_size == B

    labels = np.arange(12) % 3
    static = np.random.default_rng(0).normal(size=(12, 36)).astype(np.float32)
    actor = AcquisitionMLP(PolicyConfig(), rngs=nnx.Rngs(0))
    selector = raise_selector(actor, static, cluster_layout(labels, 3), per_cluster=2)
    assert isinstance(selector, Selector) and selector.batch_size == 6
    init, select, batch_size = selector  # unpacks like any NamedTuple
    select = jax.jit(select)
    state = init(jax.random.key(0))
    indices, state = select(state, StepInfo(step=1, total_steps=4, val_loss=2.0))
    assert indices.shape == (batch_size,) and int(state.counts.sum()) == batch_size
    assert np.bincount(labels[np.asarray(indices)], minlength=3).tolist() == [2, 2, 2]
    # RAISE ignores the losses field.
    again, _ = select(init(jax.random.key(0)), StepInfo(step=1, total_steps=4, val_loss=2.0, losses=jnp.zeros(12)))
    np.testing.assert_array_equal(again, indices)


# `self_paced_finetune`'s picks on the tiny model, recorded from the loop as it was before it drew
# its batches through `self_paced_selector`: the study's SSPL numbers depend on them staying put.
PINNED_SSPL_INDICES = [[23, 9, 4, 10], [10, 5, 29, 13], [22, 4, 29, 5], [4, 24, 7, 18], [8, 0, 12, 2],
                       [16, 30, 11, 18]]


def test_self_paced_finetune_picks_are_pinned(make_testbed):
    from jraise.data.pool import load_pool
    from jraise.model import init_model, load_tokenizer, preset_config
    from jraise.select.self_paced import self_paced_finetune

    paths = make_testbed(n_train=32, n_val_per_category=1, n_test_per_category=1, categories=["first", "upper"])
    tok = load_tokenizer(paths["tokenizer"])
    pool = load_pool(paths["pool"], tok, max_len=128)
    model = init_model(preset_config("tiny", vocab_size=len(tok)), seed=0)
    _, indices = self_paced_finetune(model, pool, steps=6, batch_size=4, lr=3e-3, refresh_every=2, n_buckets=2,
                                     seed=3, shape_buckets=2)
    np.testing.assert_array_equal(indices, np.asarray(PINNED_SSPL_INDICES, np.int64))
