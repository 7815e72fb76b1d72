"""Tests for EE-CPO (jraise.select.mixture): LP optimality, exact budget, bounds, subsets."""

from pathlib import Path

import numpy as np
import pytest

from jraise.data.gamma import load_digitized_fixture
from jraise.select.mixture import (
    count_bounds,
    edit_budget,
    ee_cpo_counts,
    ee_cpo_plan,
    realise_subset,
)

FIXTURE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "beyond_iid_gamma_qwen.json"
needs_fixture = pytest.mark.skipif(
    not FIXTURE.is_file(), reason=f"digitized Beyond-IID fixture not found at {FIXTURE}"
)


# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------


def brute_force_best(coef, n0, budget, t, minimum, extra, cap=None):
    """Best c^T n over every feasible integer n, or None (small instances only).

    Enumerates the constraints of the method page directly: n0 - T <= n <= n0 + T, n never
    below min(minimum, n0), additions <= extra, sum n = budget, sum |n - n0| <= 2T, and, with
    ``cap``, |n - n0| <= cap for every category.
    """
    ranges = [np.arange(max(0, a - t), a + t + 1) for a in n0]
    grids = np.meshgrid(*ranges, indexing="ij")
    cand = np.stack([x.ravel() for x in grids], axis=1)
    ok = (cand.sum(1) == budget) & (np.abs(cand - n0).sum(1) <= 2 * t)
    ok &= np.all(cand >= np.minimum(minimum, n0), axis=1)
    if extra is not None:
        ok &= np.all(cand - n0 <= extra, axis=1)
    if cap is not None:
        ok &= np.all(np.abs(cand - n0) <= cap, axis=1)
    if not ok.any():
        return None
    return float((cand[ok] @ coef).max())


def greedy_best(coef, n0, lo, hi, budget, t):
    """Exact integer optimum by an exchange argument (any size).

    For a total of `a` additions (so a - net deletions) the best plan fills the highest-c
    categories with additions and empties the lowest-c ones first; maximise over a.
    """
    up = hi - n0
    down = n0 - lo
    net = budget - int(n0.sum())
    by_c_desc = np.argsort(-coef, kind="stable")
    by_c_asc = np.argsort(coef, kind="stable")

    def fill(order, caps, amount):
        total, left = 0.0, amount
        for k in order:
            take = min(left, caps[k])
            total += take * coef[k]
            left -= take
        return total if left == 0 else None

    best = None
    for a in range(max(net, 0), int(up.sum()) + 1):
        if 2 * a - net > 2 * t:
            break
        add = fill(by_c_desc, up, a)
        rem = fill(by_c_asc, down, a - net)
        if add is None or rem is None:
            continue
        val = float(coef @ n0) + add - rem
        best = val if best is None else max(best, val)
    return best


def check_plan(plan, gamma, n0, budget, t, minimum, extra=None):
    n = plan.counts_after
    assert n.dtype.kind == "i"
    assert int(n.sum()) == budget  # budget exact
    assert int(np.abs(n - n0).sum()) <= 2 * t == 2 * plan.edit_budget  # edit bound
    assert np.all(n >= np.minimum(minimum, n0))  # minimum kept
    assert np.all(n >= n0 - t) and np.all(n <= n0 + t)
    if extra is not None:
        assert np.all(n - n0 <= extra)
    assert plan.objective_after == pytest.approx(float(plan.coefficients @ n))
    assert plan.objective_after <= plan.lp_objective + 1e-7 * (1 + abs(plan.lp_objective))


# ---------------------------------------------------------------------------------------------
# LP / integer optimum
# ---------------------------------------------------------------------------------------------


def test_edit_budget_rounding():
    assert edit_budget(1000, 0.03) == 30
    assert edit_budget(100, 0.07) == 7
    assert edit_budget(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996
    assert edit_budget(99, 0.03) == 2  # floor
    with pytest.raises(ValueError):
        edit_budget(10, 1.5)


def test_count_bounds():
    lo, hi = count_bounds(np.array([100, 7, 3, 0]), 10, 5, np.array([50, 2, 0, 4]))
    np.testing.assert_array_equal(lo, [90, 5, 3, 0])  # a category below the minimum keeps n0
    np.testing.assert_array_equal(hi, [110, 9, 3, 4])


def small_instance(rng, trial: int, fracs, jitter: int):
    """A random 3-4 category EE-CPO instance; ``trial`` varies which options are given (a budget
    every third trial, a candidate pool every second, importance every fourth)."""
    c = int(rng.integers(3, 5))
    gamma = rng.uniform(-1, 1, (c, c))
    np.fill_diagonal(gamma, 1.0)
    n0 = rng.integers(0, 25, size=c)
    n0[0] += 5  # never an all-zero set
    cur = int(n0.sum())
    frac = float(rng.choice(fracs))
    budget = None
    if trial % 3 == 1:
        budget = cur + int(rng.integers(-jitter, jitter + 1))
    extra = rng.integers(0, 6, size=c) if trial % 2 else None
    importance = rng.uniform(0, 1, c) if trial % 4 == 3 else None
    minimum = int(rng.integers(0, 8))
    return c, gamma, n0, cur, frac, budget, extra, importance, minimum


def test_small_instances_match_brute_force():
    rng = np.random.default_rng(1234)
    infeasible = 0
    for trial in range(60):
        c, gamma, n0, cur, frac, budget, extra, importance, minimum = small_instance(
            rng, trial, fracs=[0.05, 0.1, 0.2], jitter=2)
        n = cur if budget is None else budget
        t = edit_budget(n, frac)
        lo, hi = count_bounds(n0, t, minimum, extra)
        alpha = n0 / cur if importance is None else importance / importance.sum()
        coef = gamma.T @ alpha
        want = brute_force_best(coef, n0, n, t, minimum, extra)
        if want is None:
            infeasible += 1
            with pytest.raises(ValueError, match="infeasible"):
                ee_cpo_plan(gamma, n0, budget, frac, minimum, extra, importance)
            continue
        plan = ee_cpo_plan(gamma, n0, budget, frac, minimum, extra, importance)
        check_plan(plan, gamma, n0, n, t, minimum, extra)
        np.testing.assert_allclose(plan.coefficients, coef)
        assert plan.objective_after == pytest.approx(want, abs=1e-9)
        assert greedy_best(plan.coefficients, n0, lo, hi, n, t) == pytest.approx(want, abs=1e-9)
    assert 0 < infeasible < 30  # both branches exercised


def random_instance(rng, n0_low: int, jitter: int, c: int = 12):
    """A random 12-category EE-CPO instance: Gamma (unit diagonal), n0, extra pool sizes, budget."""
    gamma = rng.normal(0, 0.5, (c, c))
    np.fill_diagonal(gamma, 1.0)
    n0 = rng.integers(n0_low, 400, size=c)
    extra = rng.integers(0, 60, size=c)
    budget = int(n0.sum()) + int(rng.integers(-jitter, jitter + 1))
    return gamma, n0, extra, budget


def test_random_larger_instances_match_greedy_reference():
    rng = np.random.default_rng(7)
    for _ in range(10):
        gamma, n0, extra, budget = random_instance(rng, n0_low=0, jitter=20)
        plan = ee_cpo_plan(gamma, n0, budget=budget, edit_fraction=0.05, available_extra=extra)
        t = edit_budget(budget, 0.05)
        check_plan(plan, gamma, n0, budget, t, 5, extra)
        lo, hi = count_bounds(n0, t, 5, extra)
        want = greedy_best(plan.coefficients, n0, lo, hi, budget, t)
        assert plan.objective_after == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_ties_make_no_pointless_edits():
    # Identity Gamma and equal counts: every category is worth the same, nothing should move.
    n0 = np.full(4, 50)
    plan = ee_cpo_plan(np.eye(4), n0)
    np.testing.assert_array_equal(plan.counts_after, n0)
    assert plan.edits == 0


def test_moves_mass_towards_valuable_source():
    # Category 0 helps everyone; category 2 hurts everyone.
    gamma = np.array([[1.0, 0.1, -0.5], [0.9, 1.0, -0.5], [0.9, 0.1, 1.0]])
    n0 = np.array([100, 100, 100])
    counts = ee_cpo_counts(gamma, n0, edit_fraction=0.1)
    np.testing.assert_array_equal(counts, [130, 100, 70])


def test_minimum_per_category_is_kept():
    gamma = np.array([[1.0, -1.0], [2.0, 1.0]])  # category 1 is worth less than 0 everywhere
    counts = ee_cpo_counts(gamma, np.array([100, 8]), edit_fraction=0.5, min_per_category=5)
    np.testing.assert_array_equal(counts, [103, 5])
    counts = ee_cpo_counts(gamma, np.array([100, 3]), edit_fraction=0.5, min_per_category=5)
    np.testing.assert_array_equal(counts, [100, 3])  # already below the minimum: untouched


def test_budget_differs_from_current_total():
    gamma = np.eye(3) + 0.2
    n0 = np.array([100, 200, 300])
    plan = ee_cpo_plan(gamma, n0, budget=620, edit_fraction=0.03)  # T = 18, |diff| = 20 <= 36
    assert int(plan.counts_after.sum()) == 620
    assert plan.edits <= 2 * plan.edit_budget
    plan = ee_cpo_plan(gamma, n0, budget=590, edit_fraction=0.03)
    assert int(plan.counts_after.sum()) == 590


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"budget": 700}, r"2T"),  # |700 - 600| = 100 > 2T = 42
        ({"budget": 620, "available_extra": np.array([1, 1, 1])}, r"upper bounds"),
        ({"budget": 594, "min_per_category": 300, "edit_fraction": 0.1}, r"lower bounds"),
    ],
)
def test_infeasible_names_the_constraint(kwargs, match):
    n0 = np.array([100, 200, 300])
    with pytest.raises(ValueError, match=match):
        ee_cpo_plan(np.eye(3), n0, **kwargs)


def test_input_validation():
    with pytest.raises(ValueError, match="non-negative integers"):
        ee_cpo_counts(np.eye(2), np.array([1.5, 3.0]))
    with pytest.raises(ValueError, match="square"):
        ee_cpo_counts(np.ones((2, 3)), np.array([10, 10]))
    with pytest.raises(ValueError, match="one per category"):
        ee_cpo_counts(np.eye(2), np.array([10, 10, 10]))
    with pytest.raises(ValueError, match="non-finite"):
        ee_cpo_counts(np.array([[1.0, np.nan], [0.0, 1.0]]), np.array([10, 10]))


@needs_fixture
def test_fixture_lp_optimal_and_feasible():
    names, gamma = load_digitized_fixture(FIXTURE)
    rng = np.random.default_rng(2024)
    for trial in range(4):
        n0 = rng.integers(2, 1200, size=len(names))
        extra = rng.integers(0, 300, size=len(names)) if trial % 2 else None
        budget = int(n0.sum()) + (0 if trial < 2 else int(rng.integers(-50, 51)))
        plan = ee_cpo_plan(gamma, n0, budget=budget, available_extra=extra)
        t = edit_budget(budget, 0.03)
        assert plan.edit_budget == t
        check_plan(plan, gamma, n0, budget, t, 5, extra)
        lo, hi = count_bounds(n0, t, 5, extra)
        want = greedy_best(plan.coefficients, n0, lo, hi, budget, t)
        assert plan.objective_after == pytest.approx(want, rel=1e-9)
        assert plan.objective_after >= plan.objective_before - 1e-9 or budget < n0.sum()
        assert "Optimal" in plan.lp_status


@needs_fixture
def test_fixture_transposed_orientation_also_solves():
    # The figure's orientation is unknown: the LP must work for both readings.
    names, gamma = load_digitized_fixture(FIXTURE)
    n0 = np.full(len(names), 300)
    a = ee_cpo_plan(gamma, n0)
    b = ee_cpo_plan(gamma.T, n0)
    for plan in (a, b):
        check_plan(plan, gamma, n0, int(n0.sum()), edit_budget(int(n0.sum()), 0.03), 5)
        assert plan.objective_after > plan.objective_before


# ---------------------------------------------------------------------------------------------
# Realising the counts as a subset
# ---------------------------------------------------------------------------------------------


def _toy_sets(seed=0):
    rng = np.random.default_rng(seed)
    cats = ["math", "code", "summ", "qa"]
    current = list(rng.choice(cats, size=200))
    pool = list(rng.choice(cats, size=300))
    return cats, current, pool


def _per_category(labels, idx, cats):
    labels = np.asarray(labels, dtype=object)
    return {c: int(np.sum(labels[idx] == c)) for c in cats}


def test_realise_subset_counts_no_duplicates_and_determinism():
    cats, current, pool = _toy_sets()
    have = _per_category(current, np.arange(len(current)), cats)
    target = {"math": have["math"] + 12, "code": have["code"] - 7, "summ": have["summ"] - 5,
              "qa": have["qa"]}
    keep, add = realise_subset(current, target, pool, seed=3)
    assert len(set(keep.tolist())) == keep.size and len(set(add.tolist())) == add.size
    assert keep.size + add.size == sum(target.values())
    got = _per_category(current, keep, cats)
    got_add = _per_category(pool, add, cats)
    for c in cats:
        assert got[c] + got_add[c] == target[c]
    assert got_add == {"math": 12, "code": 0, "summ": 0, "qa": 0}
    assert got["math"] == have["math"] and got["qa"] == have["qa"]  # growing/unchanged keep all
    keep2, add2 = realise_subset(current, target, pool, seed=3)
    np.testing.assert_array_equal(keep, keep2)
    np.testing.assert_array_equal(add, add2)
    keep3, add3 = realise_subset(current, target, pool, seed=4)
    assert not (np.array_equal(keep, keep3) and np.array_equal(add, add3))


def test_realise_subset_array_targets_with_names_and_int_labels():
    current = [0, 0, 0, 1, 1, 2]
    keep, add = realise_subset(current, np.array([2, 2, 1]), [1, 0, 1], seed=0)
    assert _per_category(current, keep, [0, 1, 2]) == {0: 2, 1: 2, 2: 1}
    assert add.size == 0
    keep, add = realise_subset(["a", "b"], np.array([1, 3]), ["b", "a", "b", "b"], names=["a", "b"])
    np.testing.assert_array_equal(keep, [0, 1])
    assert add.size == 2 and set(add.tolist()) <= {0, 2, 3}


def test_realise_subset_quality_best_first():
    current = ["a"] * 3 + ["b"] * 3
    pool = ["a", "b", "a", "a", "b", "a"]
    quality = np.array([0.1, 9.0, 0.7, 0.7, 5.0, 0.3])
    keep, add = realise_subset(current, {"a": 5, "b": 3}, pool, quality, seed=0)
    np.testing.assert_array_equal(keep, np.arange(6))
    np.testing.assert_array_equal(add, [2, 3])  # the two best 'a' (tie broken by index)
    _, add = realise_subset(current, {"a": 6, "b": 3}, pool, quality, seed=0)
    np.testing.assert_array_equal(add, [2, 3, 5])


def test_realise_subset_removal_is_uniform():
    # Keeping 1 of 4 records of a category: each must be kept about 1/4 of the time.
    current = ["x"] * 4
    hits = np.zeros(4)
    for seed in range(400):
        keep, _ = realise_subset(current, {"x": 1}, seed=seed)
        hits[keep] += 1
    assert np.all(np.abs(hits / 400 - 0.25) < 0.08)


def test_realise_subset_pool_errors_and_dedup_by_key():
    current = ["a", "a", "b"]
    with pytest.raises(ValueError, match="'a'.*need 2"):
        realise_subset(current, {"a": 4, "b": 1}, ["a", "b"])
    with pytest.raises(ValueError, match="without a target"):
        realise_subset(current, {"a": 2})
    # The pool's first 'a' duplicates a current record and its third duplicates its second.
    pool = ["a", "a", "a", "a"]
    keys_cur = ["t1", "t2", "t3"]
    keys_pool = ["t1", "t9", "t9", "t8"]
    quality = np.array([4.0, 3.0, 2.0, 1.0])
    _, add = realise_subset(current, {"a": 4, "b": 1}, pool, quality,
                            current_keys=keys_cur, candidate_keys=keys_pool)
    np.testing.assert_array_equal(add, [1, 3])
    with pytest.raises(ValueError, match="need 3 more, 2 usable"):
        realise_subset(current, {"a": 5, "b": 1}, pool, quality,
                       current_keys=keys_cur, candidate_keys=keys_pool)


@needs_fixture
def test_fixture_plan_realised_end_to_end():
    names, gamma = load_digitized_fixture(FIXTURE)
    rng = np.random.default_rng(5)
    c = len(names)
    current = rng.integers(0, c, size=3000)
    pool = rng.integers(0, c, size=6000)
    n0 = np.bincount(current, minlength=c)
    extra = np.bincount(pool, minlength=c)
    counts = ee_cpo_counts(gamma, n0, available_extra=extra)
    quality = rng.uniform(size=pool.size)
    keep, add = realise_subset(list(current), counts, list(pool), quality, seed=11)
    assert keep.size + add.size == int(n0.sum())
    got = np.bincount(current[keep], minlength=c) + np.bincount(pool[add], minlength=c)
    np.testing.assert_array_equal(got, counts)
    assert len(np.unique(keep)) == keep.size and len(np.unique(add)) == add.size


# ---------------------------------------------------------------------------------------------
# Per-category change cap (max_change)
# ---------------------------------------------------------------------------------------------


def test_count_bounds_with_cap():
    n0 = np.array([100, 7, 3, 0])
    lo, hi = count_bounds(n0, 10, 5, np.array([50, 2, 0, 4]), max_change=3)
    np.testing.assert_array_equal(lo, [97, 5, 3, 0])
    np.testing.assert_array_equal(hi, [103, 9, 3, 3])
    lo0, hi0 = count_bounds(n0, 10, 5, max_change=0)
    np.testing.assert_array_equal(lo0, n0)
    np.testing.assert_array_equal(hi0, n0)


def test_capped_small_instances_match_brute_force():
    rng = np.random.default_rng(4321)
    infeasible = cap_binds = 0
    for trial in range(60):
        c, gamma, n0, cur, frac, budget, extra, importance, minimum = small_instance(
            rng, trial, fracs=[0.1, 0.2], jitter=3)
        cap = int(rng.integers(0, 4))
        n = cur if budget is None else budget
        t = edit_budget(n, frac)
        alpha = n0 / cur if importance is None else importance / importance.sum()
        coef = gamma.T @ alpha
        want = brute_force_best(coef, n0, n, t, minimum, extra, cap=cap)
        if want is None:
            infeasible += 1
            with pytest.raises(ValueError, match="infeasible"):
                ee_cpo_plan(gamma, n0, budget, frac, minimum, extra, importance, max_change=cap)
            continue
        plan = ee_cpo_plan(gamma, n0, budget, frac, minimum, extra, importance, max_change=cap)
        check_plan(plan, gamma, n0, n, t, minimum, extra)
        assert plan.max_change == cap
        assert np.all(np.abs(plan.counts_after - n0) <= cap)  # the cap holds
        assert plan.objective_after == pytest.approx(want, abs=1e-9)
        lo, hi = count_bounds(n0, t, minimum, extra, max_change=cap)
        assert greedy_best(plan.coefficients, n0, lo, hi, n, t) == pytest.approx(want, abs=1e-9)
        free = brute_force_best(coef, n0, n, t, minimum, extra)
        cap_binds += free is not None and free > want + 1e-9
    assert 0 < infeasible < 30  # both branches exercised
    assert cap_binds > 0  # and the cap changes the optimum on some instances


def test_cap_spreads_the_edits_on_larger_instances():
    rng = np.random.default_rng(11)
    for _ in range(6):
        gamma, n0, extra, budget = random_instance(rng, n0_low=50, jitter=10)
        t = edit_budget(budget, 0.05)
        cap = int(rng.integers(15, 40))
        plan = ee_cpo_plan(gamma, n0, budget=budget, edit_fraction=0.05, available_extra=extra, max_change=cap)
        check_plan(plan, gamma, n0, budget, t, 5, extra)
        assert np.abs(plan.counts_after - n0).max() <= cap
        lo, hi = count_bounds(n0, t, 5, extra, max_change=cap)
        want = greedy_best(plan.coefficients, n0, lo, hi, budget, t)
        assert plan.objective_after == pytest.approx(want, rel=1e-9, abs=1e-9)
        uncapped = ee_cpo_plan(gamma, n0, budget=budget, edit_fraction=0.05, available_extra=extra)
        assert plan.objective_after <= uncapped.objective_after + 1e-9
        assert uncapped.max_change is None


def test_cap_moves_mass_into_several_categories():
    # Without a cap the whole budget goes to category 0 (largest coefficient); a cap of 10
    # spreads the additions over 0 and then 1, and the deletions over 3 and then 2.
    gamma = np.array([[1.0, 0.5, 0.0, -0.5], [0.9, 1.0, 0.0, -0.5], [0.9, 0.5, 1.0, -0.5],
                      [0.9, 0.5, 0.0, 1.0]])
    n0 = np.full(4, 100)
    free = ee_cpo_counts(gamma, n0, edit_fraction=0.05)  # T = 20
    np.testing.assert_array_equal(free, [120, 100, 100, 80])
    capped = ee_cpo_counts(gamma, n0, edit_fraction=0.05, max_change=10)
    np.testing.assert_array_equal(capped, [110, 110, 90, 90])


def test_cap_zero_returns_current_counts():
    rng = np.random.default_rng(3)
    gamma = rng.normal(0, 1, (5, 5))
    n0 = rng.integers(10, 200, size=5)
    plan = ee_cpo_plan(gamma, n0, edit_fraction=0.2, max_change=0)
    np.testing.assert_array_equal(plan.counts_after, n0)
    assert plan.edits == 0 and plan.max_change == 0
    np.testing.assert_array_equal(ee_cpo_counts(gamma, n0, max_change=np.int64(0)), n0)


@pytest.mark.parametrize("bad", [-1, 2.5, 3.0, "3", True])
def test_bad_cap_is_refused(bad):
    with pytest.raises(ValueError, match="max_change"):
        ee_cpo_plan(np.eye(3), np.array([10, 10, 10]), max_change=bad)
    with pytest.raises(ValueError, match="max_change"):
        count_bounds(np.array([10, 10, 10]), 3, max_change=bad)


def test_infeasible_cap_names_max_change():
    n0 = np.array([100, 200, 300])
    # Growing by 12 with T = 18: feasible without a cap, but 3 categories x 3 < 12.
    with pytest.raises(ValueError, match=r"upper bounds.*max_change = 3 makes it infeasible.*at least 4"):
        ee_cpo_plan(np.eye(3), n0, budget=612, max_change=3)
    ee_cpo_plan(np.eye(3), n0, budget=612, max_change=4)  # the suggested cap is enough
    with pytest.raises(ValueError, match=r"lower bounds.*max_change = 3 makes it infeasible.*at least 4"):
        ee_cpo_plan(np.eye(3), n0, budget=588, max_change=3)
    with pytest.raises(ValueError, match=r"upper bounds.*max_change = 0 makes it infeasible"):
        ee_cpo_plan(np.eye(3), n0, budget=601, max_change=0)
    # The pool is too small anyway: the message still names the cap among the bounds.
    with pytest.raises(ValueError, match=r"available_extra_k, max_change\).*also limits"):
        ee_cpo_plan(np.eye(3), n0, budget=612, available_extra=np.array([1, 1, 1]), max_change=3)
    # Without a cap the messages do not mention it.
    with pytest.raises(ValueError) as err:
        ee_cpo_plan(np.eye(3), n0, budget=620, available_extra=np.array([1, 1, 1]))
    assert "max_change" not in str(err.value)


def test_usable_extra_counts_what_realise_subset_can_add():
    from jraise.select.mixture import usable_extra

    current_cats, current_keys = ["a", "a", "b"], ["a1", "a2", "b1"]
    # Candidates: a repeats a current text and itself; b has two distinct new texts; c is not a name.
    cand_cats = ["a", "a", "a", "a", "b", "b", "b", "c"]
    cand_keys = ["a1", "a3", "a3", "a4", "b2", "b3", "b1", "c1"]
    usable = usable_extra(["a", "b"], current_keys, cand_cats, cand_keys)
    assert usable.tolist() == [2, 2]  # a: a3, a4; b: b2, b3
    # Exactly that many additions are realisable, one more is not.
    keep, add = realise_subset(current_cats, {"a": 2 + 2, "b": 1 + 2}, cand_cats, None, 0,
                               current_keys=current_keys, candidate_keys=cand_keys)
    assert sorted(cand_keys[i] for i in add) == ["a3", "a4", "b2", "b3"]
    with pytest.raises(ValueError, match="lacks records of category 'a'"):
        realise_subset(current_cats, {"a": 2 + 3, "b": 1}, cand_cats, None, 0,
                       current_keys=current_keys, candidate_keys=cand_keys)
    with pytest.raises(ValueError, match="same length"):
        usable_extra(["a"], current_keys, cand_cats, cand_keys[:-1])
