"""Tests for DT-CSFT (jraise.select.curriculum): dependency tiers and the 3-stage schedule."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from jraise.select.curriculum import (
    BASE,
    DEPENDENT,
    MIDDLE,
    curriculum_m,
    dependency_taxonomy,
    dependency_tiers,
    dt_csft_schedule,
    dt_csft_stages,
    example_tiers,
    prerequisite_edges,
    prerequisite_matrix,
    replicated_prerequisite_matrix,
    replicated_taxonomy,
)
from jraise.data.gamma import load_digitized_fixture

FIXTURE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "beyond_iid_gamma_qwen.json"
needs_fixture = pytest.mark.skipif(
    not FIXTURE.is_file(), reason=f"digitized Beyond-IID fixture not found at {FIXTURE}"
)


def gamma_from_edges(names, edges, strong=0.8, weak=0.1, background=0.3):
    """Gamma[target, source] where each edge (a, b) makes a a clear prerequisite of b."""
    idx = {n: k for k, n in enumerate(names)}
    g = np.full((len(names), len(names)), background)
    for a, b in edges:
        g[idx[b], idx[a]] = strong  # source a helps target b a lot
        g[idx[a], idx[b]] = weak  # source b helps target a little
    np.fill_diagonal(g, 1.0)
    return g


# ---------------------------------------------------------------------------------------------
# Prerequisite graph and tiers
# ---------------------------------------------------------------------------------------------


def test_prerequisite_rule_and_threshold():
    names = ["a", "b"]
    g = np.array([[1.0, 0.2], [0.5, 1.0]])  # Gamma[b, a] = 0.5 > Gamma[a, b] = 0.2
    assert prerequisite_edges(g, names, threshold=0.1) == [("a", "b")]
    assert prerequisite_edges(g, names, threshold=0.3) == []  # 0.3 is not > 0.3 (strict)
    assert prerequisite_edges(g, names, threshold=0.35) == []
    assert prerequisite_edges(g.T, names, threshold=0.1) == [("b", "a")]
    adj = prerequisite_matrix(g, 0.1)
    assert adj.dtype == bool and adj[0, 1] and not adj[1, 0]


def test_chain_gives_three_tiers():
    names = ["c", "a", "b"]  # listed out of order on purpose
    g = gamma_from_edges(names, [("a", "b"), ("b", "c")])
    assert sorted(prerequisite_edges(g, names)) == [("a", "b"), ("b", "c")]
    tax = dependency_taxonomy(g, names)
    assert dict(zip(names, tax.depth.tolist())) == {"c": 2, "a": 0, "b": 1}
    assert tax.tiers == {"a": BASE, "b": MIDDLE, "c": DEPENDENT}
    assert dependency_tiers(g, names) == tax.tiers


def test_cycle_is_condensed_and_isolated_goes_middle():
    # Cycle p -> q -> r -> p feeding s; s -> t; u has no dependency information.
    names = ["p", "q", "r", "s", "t", "u"]
    edges = [("p", "q"), ("q", "r"), ("r", "p"), ("r", "s"), ("s", "t")]
    g = gamma_from_edges(names, edges)
    tax = dependency_taxonomy(g, names)
    comp = dict(zip(names, tax.component.tolist()))
    assert comp["p"] == comp["q"] == comp["r"]
    assert len({comp["p"], comp["s"], comp["t"], comp["u"]}) == 4
    depth = dict(zip(names, tax.depth.tolist()))
    assert depth["p"] == depth["q"] == depth["r"] == 0
    assert depth["s"] == 1 and depth["t"] == 2
    assert tax.tiers == {"p": 0, "q": 0, "r": 0, "s": 1, "t": 2, "u": 1}


def test_replicated_edges_need_agreeing_replicates():
    names = ["a", "b", "c"]
    base = np.eye(3)
    # a -> b: asymmetry +0.6, +0.5, +0.7 (agreeing); a -> c: +1.6, -0.6, +0.6 (mean 0.53, disagreeing).
    gammas = []
    for ab, ac in ((0.6, 1.6), (0.5, -0.6), (0.7, 0.6)):
        g = base.copy()
        g[1, 0] = ab  # Gamma[b, a]: source a helps target b
        g[2, 0] = ac
        gammas.append(g)
    gammas = np.stack(gammas)
    adj = replicated_prerequisite_matrix(gammas, threshold=0.1, alpha=0.05)
    assert adj[0, 1] and not adj[0, 2] and adj.sum() == 1
    # The single-matrix rule on the mean Gamma draws both edges: the test is what drops a -> c.
    assert prerequisite_matrix(gammas.mean(axis=0), 0.1)[0, 2]
    # The threshold still applies on top of the test: a consistent but small asymmetry is no edge.
    assert not replicated_prerequisite_matrix(gammas * 0.1 + np.eye(3) * 0.9, threshold=0.1)[0, 1]
    tax = replicated_taxonomy(gammas, names)
    assert tax.tiers == {"a": BASE, "b": DEPENDENT, "c": MIDDLE}  # c has no significant edge
    np.testing.assert_allclose(tax.score, dependency_taxonomy(gammas.mean(axis=0), names).score)


def test_replicated_edges_match_scipy_one_sided_t_test():
    from scipy.stats import ttest_1samp

    rng = np.random.default_rng(0)
    gammas = rng.normal(0.0, 0.5, size=(4, 6, 6)) + rng.normal(0.0, 0.6, size=(1, 6, 6))
    for g in gammas:
        np.fill_diagonal(g, 1.0)
    asym = np.swapaxes(gammas, 1, 2) - gammas
    p = ttest_1samp(asym, 0.0, axis=0, alternative="greater").pvalue
    want = (p < 0.1) & (asym.mean(axis=0) > 0.05)
    np.fill_diagonal(want, False)
    got = replicated_prerequisite_matrix(gammas, threshold=0.05, alpha=0.1)
    np.testing.assert_array_equal(got, want)
    assert want.any() and not want.all()  # the case exercises both outcomes


def test_replicated_edges_input_errors():
    with pytest.raises(ValueError, match="at least 2 replicate"):
        replicated_prerequisite_matrix(np.eye(3)[None])
    with pytest.raises(ValueError, match=r"stack \(S, C, C\)"):
        replicated_prerequisite_matrix(np.eye(3))
    with pytest.raises(ValueError, match="alpha"):
        replicated_prerequisite_matrix(np.stack([np.eye(2)] * 2), alpha=1.5)
    with pytest.raises(ValueError, match="non-finite"):
        replicated_prerequisite_matrix(np.stack([np.eye(2), np.full((2, 2), np.nan)]))


def test_chain_with_cycle_longest_path_depth():
    # a -> b -> c plus the shortcut a -> c: the longest path puts c at depth 2 (not 1); c feeds
    # the cycle x -> y -> z -> x, which is condensed to one node at depth 3.
    names = ["z", "a", "b", "c", "x", "y"]
    edges = [("a", "b"), ("b", "c"), ("a", "c"), ("c", "x"), ("x", "y"), ("y", "z"), ("z", "x")]
    g = gamma_from_edges(names, edges)
    tax = dependency_taxonomy(g, names)
    comp = dict(zip(names, tax.component.tolist()))
    assert comp["x"] == comp["y"] == comp["z"]
    assert len({comp["a"], comp["b"], comp["c"], comp["x"]}) == 4
    depth = dict(zip(names, tax.depth.tolist()))
    assert depth == {"a": 0, "b": 1, "c": 2, "x": 3, "y": 3, "z": 3}
    # Tier = floor(2 * depth / 3 + 1/2): 0, 1, 1, 2.
    assert tax.tiers == {"a": 0, "b": 1, "c": 1, "x": 2, "y": 2, "z": 2}


def test_no_edges_all_middle_and_single_edge_spans_tiers():
    names = ["a", "b", "c"]
    assert dependency_tiers(np.eye(3), names) == {"a": 1, "b": 1, "c": 1}
    g = gamma_from_edges(names, [("a", "b")])
    assert dependency_tiers(g, names) == {"a": 0, "b": 2, "c": 1}


def test_net_asymmetry_method():
    names = ["c", "a", "b", "d"]
    edges = [("a", "b"), ("b", "c"), ("a", "c"), ("c", "d"), ("b", "d")]
    g = gamma_from_edges(names, edges)
    tax = dependency_taxonomy(g, names, method="net_asymmetry")
    score = dict(zip(names, tax.score.tolist()))
    # score = mean over others of (Gamma[b, a] - Gamma[a, b]) = (0.8 - 0.1) * (out - in) / 3
    np.testing.assert_allclose([score[k] for k in "abcd"], np.array([2, 1, -1, -2]) * 0.7 / 3)
    # Ranked a, b, c, d cut into [2, 1, 1] (numpy.array_split).
    assert tax.tiers == {"a": 0, "b": 0, "c": 1, "d": 2}
    with pytest.raises(ValueError, match="method"):
        dependency_taxonomy(g, names, method="nope")


def test_user_tiers():
    names = ["math", "code", "summ"]
    tiers = dependency_tiers(None, names, user_tiers={"math": 0, "code": 0, "summ": 2})
    assert tiers == {"math": 0, "code": 0, "summ": 2}
    with pytest.raises(ValueError, match="lacks a tier.*summ"):
        dependency_tiers(None, names, user_tiers={"math": 0, "code": 0})
    with pytest.raises(ValueError, match="unknown categories.*poetry"):
        dependency_tiers(None, names, user_tiers={"math": 0, "code": 0, "summ": 2, "poetry": 1})
    with pytest.raises(ValueError, match="not a tier"):
        dependency_tiers(None, names, user_tiers={"math": 0, "code": 3, "summ": 2})
    with pytest.raises(ValueError, match="gamma or user_tiers"):
        dependency_tiers(None, names)


def test_example_tiers():
    out = example_tiers(["summ", "math", "qa"], {"math": 0, "qa": 1, "summ": 2})
    np.testing.assert_array_equal(out, [2, 0, 1])
    with pytest.raises(ValueError, match="example 1.*'poetry'"):
        example_tiers(["math", "poetry"], {"math": 0})


@needs_fixture
def test_fixture_taxonomy_is_well_formed():
    names, g = load_digitized_fixture(FIXTURE)
    for method in ("depth", "net_asymmetry"):
        tax = dependency_taxonomy(g, names, method=method)
        assert set(tax.tiers) == set(names)
        assert set(tax.tiers.values()) <= {0, 1, 2}
        # Along every edge the depth never decreases (equal only inside one component).
        a, b = np.nonzero(tax.adjacency)
        same = tax.component[a] == tax.component[b]
        assert np.all(tax.depth[b][~same] > tax.depth[a][~same])
        assert np.all(tax.depth[b][same] == tax.depth[a][same])


# ---------------------------------------------------------------------------------------------
# The 3-stage schedule
# ---------------------------------------------------------------------------------------------


def test_curriculum_m():
    assert curriculum_m(100) == 10
    assert curriculum_m(49_999) == 4_999
    assert curriculum_m(50_000) == 2_500
    assert curriculum_m(123_457) == 6_172


def _random_tiers(n, seed, p=(0.3, 0.4, 0.3)):
    return np.random.default_rng(seed).choice(3, size=n, p=p).astype(np.int64)


@pytest.mark.parametrize("n, seed", [(100, 0), (1000, 1), (57, 2)])
def test_schedule_every_example_three_times_and_stage_contents(n, seed):
    tiers = _random_tiers(n, seed)
    st = dt_csft_stages(tiers, seed=seed)
    seq = dt_csft_schedule(tiers, seed=seed)
    np.testing.assert_array_equal(seq, st.sequence())
    assert seq.shape == (3 * n,)
    np.testing.assert_array_equal(np.bincount(seq, minlength=n), np.full(n, 3))

    m = n // 10
    base = set(np.flatnonzero(tiers == BASE).tolist())
    middle = set(np.flatnonzero(tiers == MIDDLE).tolist())
    dep = set(np.flatnonzero(tiers == DEPENDENT).tolist())
    early, late = set(st.early_base.tolist()), set(st.late_dependent.tolist())
    assert len(early) == st.m_base == min(m, len(base)) and early <= base
    assert len(late) == st.m_dependent == min(m, len(dep)) and late <= dep

    # Stage 1 = base + first m base + middle + dependent minus its last m.
    want1 = Counter(base) + Counter(early) + Counter(middle) + Counter(dep - late)
    assert Counter(st.stage1.tolist()) == want1
    # Stage 2 = everything once.
    assert Counter(st.stage2.tolist()) == Counter(range(n))
    # Stage 3 = base minus first m + middle + dependent + last m dependent again.
    want3 = Counter(base - early) + Counter(middle) + Counter(dep) + Counter(late)
    assert Counter(st.stage3.tolist()) == want3
    # The sequence is exactly stage 1, then 2, then 3.
    l1, l2 = len(st.stage1), len(st.stage2)
    assert l1 == n + st.m_base - st.m_dependent and l2 == n
    assert Counter(seq[:l1].tolist()) == want1
    assert Counter(seq[l1 + l2 :].tolist()) == want3


def test_schedule_tier_order():
    n = 2000
    tiers = _random_tiers(n, 5)
    seq = dt_csft_schedule(tiers, seed=5)
    pos_tier = tiers[seq]
    positions = np.arange(seq.size)
    mean_base = positions[pos_tier == BASE].mean()
    mean_mid = positions[pos_tier == MIDDLE].mean()
    mean_dep = positions[pos_tier == DEPENDENT].mean()
    assert mean_base < mean_mid < mean_dep
    # Stage 1 is richer in base records than stage 3, stage 3 richer in dependent ones.
    l1 = n + n // 10 - n // 10
    assert np.sum(pos_tier[:l1] == BASE) > np.sum(pos_tier[2 * n :] == BASE)
    assert np.sum(pos_tier[:l1] == DEPENDENT) < np.sum(pos_tier[2 * n :] == DEPENDENT)


def test_schedule_is_shuffled_and_deterministic():
    tiers = _random_tiers(500, 9)
    a = dt_csft_schedule(tiers, seed=1)
    b = dt_csft_schedule(tiers, seed=1)
    c = dt_csft_schedule(tiers, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    st = dt_csft_stages(tiers, seed=1)
    # Stages are shuffled, not laid out tier by tier.
    assert not np.array_equal(st.stage2, np.arange(500))
    assert np.any(np.diff(tiers[st.stage1]) < 0)
    assert np.any(np.diff(tiers[st.stage3]) < 0)


def test_schedule_large_n_uses_n_over_20():
    n = 50_000
    tiers = _random_tiers(n, 3)
    st = dt_csft_stages(tiers, seed=0)
    assert st.m_base == st.m_dependent == 2_500
    np.testing.assert_array_equal(np.bincount(st.sequence(), minlength=n), np.full(n, 3))


def test_schedule_small_tiers_clip_m():
    tiers = np.array([0] * 3 + [1] * 90 + [2] * 7)  # N = 100 -> m = 10 > |base|, |dependent|
    st = dt_csft_stages(tiers, seed=0)
    assert st.m_base == 3 and st.m_dependent == 7
    seq = st.sequence()
    np.testing.assert_array_equal(np.bincount(seq, minlength=100), np.full(100, 3))
    # No dependent record in stage 1, every base record twice in stage 1, none in stage 3.
    assert not np.any(tiers[st.stage1] == 2)
    assert Counter(st.stage1.tolist())[0] == 2 and not np.any(tiers[st.stage3] == 0)
    # Explicit m and no middle tier.
    st = dt_csft_stages(np.array([0, 0, 2, 2]), seed=0, m=1)
    assert len(st.stage1) == len(st.stage2) == len(st.stage3) == 4


def test_schedule_input_errors():
    with pytest.raises(ValueError, match=r"\{0, 1, 2\}"):
        dt_csft_schedule(np.array([0, 3, 1]))
    with pytest.raises(ValueError, match="1-D"):
        dt_csft_schedule(np.zeros((2, 2), dtype=int))
    assert dt_csft_schedule(np.zeros(0, dtype=int)).size == 0
