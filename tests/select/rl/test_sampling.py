"""Per-cluster sampling for RAISE: layout, Plackett-Luce log-probabilities, Gumbel-top-b, top-b."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from jraise.select.rl.sampling import (
    cluster_layout,
    gumbel_top_b,
    pl_first_pick_entropy,
    plackett_luce_logp,
    top_b,
)

# Jitted once per shape: eager dispatch compiles every primitive separately, which is slow on a shared CPU.
pl_logp = jax.jit(plackett_luce_logp)
sample = jax.jit(gumbel_top_b, static_argnames="b")
greedy = jax.jit(top_b, static_argnames="b")
entropy = jax.jit(pl_first_pick_entropy)


def brute_force_pl(z, pickable, order):
    """Probability of an ordered tuple under Plackett-Luce, one factor at a time (float64)."""
    remaining = set(np.flatnonzero(pickable).tolist())
    p = 1.0
    for i in order:
        assert i in remaining
        p *= np.exp(z[i]) / sum(np.exp(z[k]) for k in remaining)
        remaining.remove(i)
    return p


# Two clusters padded to M = 4: the second has 3 real items (the pad carries the largest score, so a
# bug that lets padding in would change every number below).
SCORES = np.array([[0.3, -1.2, 2.0, 0.7], [1.5, -0.4, 0.1, 9.0]], np.float32)
VALID = np.array([[True, True, True, True], [True, True, True, False]])


def ordered_tuples(pickable_row, b):
    return list(itertools.permutations(np.flatnonzero(pickable_row).tolist(), b))


def test_cluster_layout_pads_and_orders():
    layout = cluster_layout(np.array([0, 1, 0, 2, 1, 0]), 4)
    np.testing.assert_array_equal(layout.members, [[0, 2, 5], [1, 4, -1], [3, -1, -1], [-1, -1, -1]])
    np.testing.assert_array_equal(layout.valid, np.asarray(layout.members) >= 0)
    assert layout.members.dtype == jnp.int32 and layout.valid.dtype == jnp.bool_
    assert (layout.n_clusters, layout.max_size) == (4, 3)
    np.testing.assert_array_equal(layout.sizes(), [3, 2, 1, 0])


def test_cluster_layout_errors_and_budget():
    with pytest.raises(ValueError, match="labels must be in"):
        cluster_layout(np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="labels must be in"):
        cluster_layout(np.array([0, -1]), 3)
    with pytest.raises(ValueError, match="integers"):
        cluster_layout(np.array([0.0, 1.0]), 2)
    layout = cluster_layout(np.array([0, 1, 0, 1, 0]), 2)
    layout.check_budget(2)
    with pytest.raises(ValueError, match=r"cluster\(s\) \[1\] have only \[2\]"):
        layout.check_budget(3)
    with pytest.raises(ValueError, match=r"cluster\(s\) \[2\] have only \[0\]"):
        cluster_layout(np.array([0, 1, 0, 1]), 3).check_budget(1)


def test_layout_gather_and_pool_indices_under_jit():
    layout = cluster_layout(np.array([1, 0, 1, 1, 0]), 2)
    values = np.arange(5, dtype=np.float32) * 10
    feats = np.arange(10, dtype=np.float32).reshape(5, 2)
    picked = np.array([[1, -1], [2, 0]])

    @jax.jit
    def run(layout):
        return layout.gather(values, fill=-1.0), layout.gather(feats), layout.pool_indices(picked)

    by_cluster, feats_by_cluster, pool = run(layout)
    np.testing.assert_array_equal(by_cluster, [[10, 40, -1], [0, 20, 30]])
    assert feats_by_cluster.shape == (2, 3, 2)
    np.testing.assert_array_equal(feats_by_cluster[0], [[2, 3], [8, 9], [0, 0]])
    np.testing.assert_array_equal(pool, [[4, -1], [3, 0]])


def test_plackett_luce_matches_enumeration():
    batched = jax.jit(jax.vmap(plackett_luce_logp, in_axes=(None, None, 0, None)))
    for b, tau in itertools.product([1, 2, 3], [1.0, 0.5]):
        z = SCORES.astype(np.float64) / tau
        for c in range(2):
            tuples = ordered_tuples(VALID[c], b)
            picked = np.zeros((len(tuples), 2, b), np.int32)
            picked[:, c] = tuples
            logp = np.asarray(batched(SCORES, VALID, picked, tau))[:, c]
            brute = np.array([brute_force_pl(z[c], VALID[c], t) for t in tuples])
            np.testing.assert_allclose(brute.sum(), 1.0, rtol=1e-12)
            np.testing.assert_allclose(np.exp(logp), brute, rtol=2e-5, atol=1e-7)
            np.testing.assert_allclose(np.exp(logp.astype(np.float64)).sum(), 1.0, rtol=1e-5)


def test_plackett_luce_with_available_mask():
    available = np.array([[True, False, True, True], [True, True, True, True]])
    pickable = VALID & available
    for t in ordered_tuples(pickable[0], 2):
        picked = jnp.array([t, [0, 1]])
        logp = pl_logp(SCORES, VALID, picked, 1.0, available)
        np.testing.assert_allclose(np.exp(logp[0]), brute_force_pl(SCORES[0].astype(np.float64), pickable[0], t),
                                   rtol=2e-5)


def test_plackett_luce_is_stable_and_shift_invariant():
    big = SCORES * 100.0  # scores / tau in the thousands: a naive exp would overflow
    valid = np.ones_like(VALID)
    picked = np.array([[1, 3, 0], [0, 3, 2]])  # far from the greedy order: large negative log-probs
    logp = np.asarray(pl_logp(big, valid, jnp.asarray(picked), 0.5))
    z = big.astype(np.float64) / 0.5
    for c in range(2):
        remaining, ref = list(range(4)), 0.0
        for i in picked[c]:
            ref += z[c, i] - special.logsumexp(z[c, remaining])
            remaining.remove(i)
        np.testing.assert_allclose(logp[c], ref, rtol=1e-5)
    assert logp.max() < -100
    shifted = pl_logp(big + jnp.array([[500.0], [-700.0]]), valid, jnp.asarray(picked), 0.5)
    np.testing.assert_allclose(logp, shifted, rtol=1e-5)
    # A near-deterministic choice has log-probability ~0 rather than cancelling to garbage.
    np.testing.assert_allclose(pl_logp(big, valid, jnp.array([[2, 3], [3, 0]]), 0.5), 0.0, atol=1e-6)


def test_plackett_luce_padded_picks_and_gradient_are_finite():
    available = np.array([[True, False, False, True], [False, False, False, True]])
    picked = jnp.array([[3, 0, -1], [-1, -1, -1]])  # cluster 0: 2 pickable items; cluster 1: none
    logp, grad = jax.jit(jax.value_and_grad(lambda s: plackett_luce_logp(s, VALID, picked, 1.0, available).sum()))(
        jnp.asarray(SCORES))
    # Two pickable items in cluster 0: the first pick is a coin flip, the second forced.
    z = SCORES[0].astype(np.float64)
    np.testing.assert_allclose(logp, z[3] - np.logaddexp(z[0], z[3]), rtol=1e-5)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.asarray(grad)[:, [1, 2]], 0.0)  # unpickable items get no gradient
    np.testing.assert_array_equal(np.asarray(grad)[1], 0.0)


@pytest.mark.parametrize("b", [2, 3])
def test_gumbel_top_b_frequencies_match_plackett_luce(b):
    """Ordered-tuple frequencies of 20,000 draws against the PL probabilities (chi-square test)."""
    n = 20_000
    tau = 0.7
    keys = jax.random.split(jax.random.key(1234), n)
    picked, logp = jax.jit(jax.vmap(lambda k: gumbel_top_b(k, SCORES, VALID, b, tau)))(keys)
    picked = np.asarray(picked)
    z = SCORES.astype(np.float64) / tau
    for row, row_logp in zip(picked[:50].tolist(), np.asarray(logp[:50])):  # logp is that of the drawn tuple
        for c in range(2):
            np.testing.assert_allclose(np.exp(row_logp[c]), brute_force_pl(z[c], VALID[c], row[c]), rtol=2e-5)
    for c in range(2):
        tuples = ordered_tuples(VALID[c], b)
        expected = np.array([brute_force_pl(z[c], VALID[c], t) for t in tuples]) * n
        index = {t: i for i, t in enumerate(tuples)}
        observed = np.bincount([index[tuple(row)] for row in picked[:, c].tolist()], minlength=len(tuples))
        assert observed.sum() == n  # every draw is a tuple of distinct valid items
        # Pool cells with expected count < 5 so the chi-square approximation holds.
        small = expected < 5
        obs = np.append(observed[~small], observed[small].sum())
        exp = np.append(expected[~small], expected[small].sum())
        if exp[-1] == 0:
            obs, exp = obs[:-1], exp[:-1]
        chi2 = ((obs - exp) ** 2 / exp).sum()
        # Fixed seed, so this is deterministic; at p = 1e-4 a correct sampler fails 1 seed in 10,000.
        assert chi2 < stats.chi2.ppf(1 - 1e-4, df=len(obs) - 1), (c, chi2)
        # Max deviation of any tuple's frequency: its std is <= sqrt(0.25 / n) = 0.0035; allow 5 sigma.
        assert np.max(np.abs(observed - expected)) / n < 5 * np.sqrt(0.25 / n)


def test_gumbel_top_b_never_picks_invalid_or_unavailable():
    valid = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    available = np.array([[1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 1, 0]], bool)
    pickable = valid & available
    scores = np.where(pickable, np.random.default_rng(7).normal(size=(3, 6)), 50.0)  # excluded items look best
    draws = jax.jit(jax.vmap(lambda k: gumbel_top_b(k, scores, valid, 3, 1.0, available)[0]))(
        jax.random.split(jax.random.key(7), 500))
    draws = np.asarray(draws)
    for c in range(3):
        assert pickable[c][draws[:, c]].all()
        assert all(len(set(row)) == 3 for row in draws[:, c].tolist())


def test_gumbel_top_b_short_cluster_fills_minus_one():
    available = np.array([[True, False, False, True], [False, True, False, False]])
    picked, logp = sample(jax.random.key(3), SCORES, VALID, b=3, tau=1.0, available=available)
    picked = np.asarray(picked)
    assert sorted(picked[0, :2].tolist()) == [0, 3] and picked[0, 2] == -1
    np.testing.assert_array_equal(picked[1], [1, -1, -1])
    assert logp[1] == 0.0  # a forced choice
    assert np.all(np.isfinite(logp))


def test_argument_checks():
    with pytest.raises(ValueError, match="b must be"):
        gumbel_top_b(jax.random.key(0), SCORES, VALID, 5)
    with pytest.raises(ValueError, match="b must be"):
        top_b(SCORES, VALID, 0)
    with pytest.raises(ValueError, match="tau"):
        gumbel_top_b(jax.random.key(0), SCORES, VALID, 2, tau=0.0)


def test_top_b_picks_largest_with_index_ties():
    scores = jnp.array([[1.0, 3.0, 3.0, 2.0, 9.0], [0.5, 0.5, 0.5, 0.1, 0.0]])
    valid = jnp.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(greedy(scores, valid, b=3), [[1, 2, 3], [0, 1, 2]])
    available = jnp.array([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(greedy(scores, valid, b=3, available=available), [[2, 3, 0], [0, 1, 2]])
    rng = np.random.default_rng(0)
    s = rng.normal(size=(4, 9)).astype(np.float32)
    got = np.asarray(greedy(jnp.asarray(s), jnp.ones((4, 9), bool), b=4))
    np.testing.assert_array_equal(got, np.argsort(-s, axis=1, kind="stable")[:, :4])


def test_padded_clusters_under_jit_and_vmap():
    labels = np.array([0, 1, 2, 0, 1, 0, 2, 0, 1])
    layout = cluster_layout(labels, 3)
    layout.check_budget(2)

    @jax.jit
    def step(key, layout, pool_scores):
        scores = layout.gather(pool_scores)
        picked, logp = gumbel_top_b(key, scores, layout.valid, 2, 0.5)
        return layout.pool_indices(picked), logp, layout.pool_indices(top_b(scores, layout.valid, 2))

    keys = jax.random.split(jax.random.key(0), 3)
    pool_scores = np.random.default_rng(1).normal(size=(3, 9)).astype(np.float32)
    idx, logp, best = jax.jit(jax.vmap(step, in_axes=(0, None, 0)))(keys, layout, pool_scores)
    assert idx.shape == (3, 3, 2) and logp.shape == (3, 3) and best.shape == (3, 3, 2)
    one_idx, one_logp, one_best = step(keys[2], layout, pool_scores[2])  # vmap lane == single call
    np.testing.assert_array_equal(idx[2], one_idx)
    np.testing.assert_allclose(logp[2], one_logp, rtol=1e-6)
    np.testing.assert_array_equal(best[2], one_best)
    for e in range(3):
        for c in range(3):
            assert (labels[np.asarray(idx[e, c])] == c).all()  # each cluster's picks come from that cluster
            members = np.flatnonzero(labels == c)
            expected = members[np.argsort(-pool_scores[e, members], kind="stable")[:2]]
            np.testing.assert_array_equal(best[e, c], expected)


def test_first_pick_entropy():
    valid = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], bool)
    scores = jnp.array([[0.0, 0.0, 0.0, 0.0], [4.0, 4.0, 99.0, 99.0], [0.0, 1.0, -2.0, 5.0]])
    h = np.asarray(entropy(scores, valid, 2.0))
    np.testing.assert_allclose(h[:2], [np.log(4), np.log(2)], rtol=1e-6)
    p = np.exp(np.array([0.0, 1.0, -2.0]) / 2.0)
    p /= p.sum()
    np.testing.assert_allclose(h[2], -(p * np.log(p)).sum(), rtol=1e-6)
    assert entropy(jnp.array([[0.0, 80.0]]), jnp.ones((1, 2), bool), 0.1)[0] < 1e-6
    none = entropy(scores, valid, 1.0, jnp.zeros_like(valid))
    np.testing.assert_array_equal(none, 0.0)
    grad = jax.jit(jax.grad(lambda s: pl_first_pick_entropy(s, valid, 1.0, valid.at[0, 0].set(False)).sum()))(
        scores)
    assert np.all(np.isfinite(grad))
