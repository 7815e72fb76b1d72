"""EE-CPO: effect-equivalence-based category proportion optimisation by linear programming.

Method: Beyond IID (Zhao et al. 2024, arXiv 2409.07045, the mixture
optimisation). The paper maximises ``alpha^T Gamma w`` (alpha = importance of
each target category, by default the baseline proportions; w = amount per source category) and
then moves a small share (3%) of the data. jraise solves the clean LP of the method page:

    maximise   c^T n,            c = Gamma^T alpha      (Gamma[target, source])
    subject to sum_k n_k = N
               max(min_k, n0_k - T, n0_k - M) <= n_k <= n0_k + min(T, extra_k, M)
               sum_k |n_k - n0_k| <= 2 T                (linearised with d_k >= |n_k - n0_k|)

where M = ``max_change`` is an optional per-category cap, |n_k - n0_k| <= M (default: none, i.e.
M = inf). The objective is linear, so without a cap the LP moves the whole edit budget into the
category with the largest coefficient c_k, and one noisy row of Gamma decides everything; a cap
spreads the edits over several categories.

The LP is solved with HiGHS (``scipy.optimize.linprog(method="highs")``) and then its exact
integer optimum with ``scipy.optimize.milp`` (HiGHS branch and bound), so the budget, the bounds,
the cap and the edit bound hold exactly for the integer counts. :func:`realise_subset` turns the counts into concrete indices.

Numpy in / numpy out; no JAX needed (28 variables).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

__all__ = [
    "MixturePlan",
    "edit_budget",
    "count_bounds",
    "ee_cpo_plan",
    "ee_cpo_counts",
    "realise_subset",
]


@dataclass(frozen=True, eq=False)
class MixturePlan:
    """Result of EE-CPO for one instruction set.

    Attributes:
      counts_before: ``(C,)`` int64 current counts n0.
      counts_after: ``(C,)`` int64 optimal integer counts n.
      coefficients: ``(C,)`` ``c = Gamma^T alpha``: value of one more source-k instruction.
      importance: ``(C,)`` alpha used (sums to 1).
      budget: N = ``counts_after.sum()``.
      edit_budget: T (integer); ``sum |n - n0| <= 2 T``.
      edits: ``sum |counts_after - counts_before|``.
      max_change: per-category cap M used (``|n_k - n0_k| <= M``), or None for no cap.
      objective_before / objective_after: ``c^T n0`` and ``c^T n``.
      lp_objective: optimum of the continuous LP (an upper bound on ``objective_after``).
      lp_counts: ``(C,)`` float continuous LP solution.
      lp_status: HiGHS message of the LP; milp_status: message of the integer solve.
    """

    counts_before: np.ndarray
    counts_after: np.ndarray
    coefficients: np.ndarray
    importance: np.ndarray
    budget: int
    edit_budget: int
    edits: int
    objective_before: float
    objective_after: float
    lp_objective: float
    lp_counts: np.ndarray
    lp_status: str
    milp_status: str
    max_change: int | None = None


def edit_budget(budget: int, edit_fraction: float) -> int:
    """T = floor(edit_fraction * N): an integer number of moved records ("at most 3%").

    A tiny tolerance keeps products like 0.07 * 100 = 7.000000000000001 or 0.29 * 100 =
    28.999999999999996 at the intended integer.
    """
    if not 0.0 <= edit_fraction <= 1.0:
        raise ValueError(f"edit_fraction must be in [0, 1], got {edit_fraction}")
    x = edit_fraction * budget
    return int(math.floor(x + 1e-9 * max(1.0, x)))


def _as_counts(x, name: str, c: int | None = None) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if c is not None and a.shape[0] != c:
        raise ValueError(f"{name} has {a.shape[0]} entries, expected {c} (one per category)")
    if a.dtype.kind not in "iu":
        if a.dtype.kind != "f" or not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise ValueError(f"{name} must hold non-negative integers")
    a = a.astype(np.int64)
    if np.any(a < 0):
        raise ValueError(f"{name} must hold non-negative integers, got {a.min()}")
    return a


def _check_max_change(max_change) -> int | None:
    if max_change is None:
        return None
    if isinstance(max_change, bool) or not isinstance(max_change, (int, np.integer)) or max_change < 0:
        raise ValueError(f"max_change must be a non-negative int or None, got {max_change!r}")
    return int(max_change)


def count_bounds(
    current_counts: np.ndarray,
    t: int,
    min_per_category: int = 5,
    available_extra: np.ndarray | None = None,
    *,
    max_change: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-category integer bounds ``lo <= n <= hi`` of the EE-CPO LP.

    ``lo_k = max(min(min_per_category, n0_k), n0_k - T)``: deletions never take a category below
    the minimum, but a category that already holds fewer than the minimum is not forced to grow
    (the released script only protects categories from deletion). ``hi_k = n0_k + min(T,
    extra_k)`` with ``extra_k = inf`` when no pool size is given. With ``max_change`` M (a
    non-negative int; None = no cap) additionally ``lo_k >= n0_k - M`` and ``hi_k <= n0_k + M``.
    """
    cap = _check_max_change(max_change)
    n0 = np.asarray(current_counts, dtype=np.int64)
    lo = np.maximum(np.minimum(min_per_category, n0), n0 - t)
    if available_extra is None:
        hi = n0 + t
    else:
        hi = n0 + np.minimum(t, np.asarray(available_extra, dtype=np.int64))
    if cap is not None:
        lo = np.maximum(lo, n0 - cap)
        hi = np.minimum(hi, n0 + cap)
    return lo.astype(np.int64), hi.astype(np.int64)


def _smallest_cap(room: np.ndarray, need: int) -> int:
    """Smallest M with ``sum_k min(room_k, M) >= need`` (the caller ensures one exists)."""
    for m in range(int(room.max(initial=0)) + 1):
        if int(np.minimum(room, m).sum()) >= need:
            return m
    return int(room.max(initial=0))


def _infeasible_hint(default: str, max_change: int | None, room: np.ndarray, need: int) -> str:
    """The advice of an infeasible-bounds error; ``room`` = per-category room without the cap."""
    if max_change is None:
        return default
    if int(room.sum()) >= need:  # feasible without the cap: the cap is what makes it infeasible
        return (
            f"max_change = {max_change} makes it infeasible, the other bounds allow it; raise "
            f"max_change to at least {_smallest_cap(room, need)} or drop it"
        )
    return f"{default}; max_change = {max_change} also limits every category"


def _check_feasible(
    n0: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    n: int,
    t: int,
    max_change: int | None = None,
    free_bounds: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    # n0 always lies inside [lo, hi], so these three conditions are necessary and sufficient:
    # any budget between sum(lo) and sum(hi) is reachable with exactly |N - N0| edits.
    # free_bounds: the bounds without the max_change cap (to tell whether the cap is the cause).
    n_cur = int(n0.sum())
    if abs(n - n_cur) > 2 * t:
        raise ValueError(
            f"EE-CPO infeasible: budget {n} differs from the current total {n_cur} by "
            f"{abs(n - n_cur)} > 2T = {2 * t} (constraint sum_k |n_k - n0_k| <= 2T; raise "
            "edit_fraction)"
        )
    lo_free, hi_free = (lo, hi) if free_bounds is None else free_bounds
    lo_cap, hi_cap = ("", "") if max_change is None else (", n0_k - max_change", ", max_change")
    if n < int(lo.sum()):
        hint = _infeasible_hint(
            "raise the budget or the edit_fraction, or lower min_per_category",
            max_change, n0 - lo_free, n_cur - n,
        )
        raise ValueError(
            f"EE-CPO infeasible: budget {n} is below the sum of lower bounds {int(lo.sum())} "
            f"(constraint n_k >= max(min_per_category, n0_k - T{lo_cap}); {hint})"
        )
    if n > int(hi.sum()):
        hint = _infeasible_hint(
            "the candidate pool or the edit budget is too small", max_change, hi_free - n0, n - n_cur
        )
        raise ValueError(
            f"EE-CPO infeasible: budget {n} exceeds the sum of upper bounds {int(hi.sum())} "
            f"(constraint n_k <= n0_k + min(T, available_extra_k{hi_cap}); {hint})"
        )


def ee_cpo_plan(
    gamma: np.ndarray,
    current_counts: np.ndarray,
    budget: int | None = None,
    edit_fraction: float = 0.03,
    min_per_category: int = 5,
    available_extra: np.ndarray | None = None,
    importance: np.ndarray | None = None,
    *,
    max_change: int | None = None,
) -> MixturePlan:
    """Solve EE-CPO (Beyond IID section 3) and return the full :class:`MixturePlan`.

    In: ``gamma[target, source]`` (C, C); ``current_counts`` n0 (C,) non-negative ints;
    ``budget`` N (default ``n0.sum()``); ``edit_fraction`` (T = floor(fraction * N));
    ``min_per_category``; ``available_extra`` (C,) size of the extra pool per category (None =
    unlimited); ``importance`` alpha (C,) non-negative (default: baseline proportions n0 / N0),
    normalised to sum 1; ``max_change`` M, a non-negative int capping every category's change,
    ``|n_k - n0_k| <= M`` (default None: no cap). The objective is linear, so without a cap the
    whole edit budget goes to the category with the largest coefficient (one noisy row of Gamma
    decides everything); a cap spreads the edits. ``max_change=0`` returns n0 unchanged (when
    the budget is the current total).

    Out: the plan, whose ``counts_after`` is an exact integer optimum of the LP restricted to
    integers. Among equally good integer optima the one with the fewest edits is returned (a
    second HiGHS solve), so ties never cause pointless moves.

    Raises ``ValueError`` naming the violated constraint when the problem is infeasible (and
    ``max_change`` when the cap is what makes it infeasible).
    """
    cap = _check_max_change(max_change)
    g = np.asarray(gamma, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"gamma must be a square (C, C) matrix, got shape {g.shape}")
    bad = np.argwhere(~np.isfinite(g))
    if len(bad):
        r, k = (int(x) for x in bad[0])
        raise ValueError(f"gamma contains non-finite values (fill or drop them first): gamma[{r}, {k}] is {g[r, k]}")
    c_dim = g.shape[0]
    n0 = _as_counts(current_counts, "current_counts", c_dim)
    n_cur = int(n0.sum())
    n = n_cur if budget is None else int(budget)
    if budget is not None and (n != budget or n <= 0):
        raise ValueError(f"budget must be a positive integer, got {budget!r}")
    if n <= 0:
        raise ValueError("current_counts sum to 0 and no budget was given")
    if min_per_category < 0:
        raise ValueError(f"min_per_category must be >= 0, got {min_per_category}")
    extra = None
    if available_extra is not None:
        extra = _as_counts(available_extra, "available_extra", c_dim)

    if importance is None:
        if n_cur == 0:
            raise ValueError("current_counts sum to 0: pass importance explicitly")
        alpha = n0 / n_cur
    else:
        alpha = np.asarray(importance, dtype=np.float64)
        if alpha.shape != (c_dim,) or not np.all(np.isfinite(alpha)) or np.any(alpha < 0):
            raise ValueError(f"importance must be ({c_dim},) finite and non-negative")
        if alpha.sum() <= 0:
            raise ValueError("importance must not be all zero")
        alpha = alpha / alpha.sum()
    coef = g.T @ alpha  # c_i = sum_j alpha_j Gamma[j, i]: worth of one source-i instruction

    t = edit_budget(n, edit_fraction)
    lo, hi = count_bounds(n0, t, min_per_category, extra, max_change=cap)
    free = None if cap is None else count_bounds(n0, t, min_per_category, extra)
    _check_feasible(n0, lo, hi, n, t, cap, free)

    # Optimise over the change u = n - n0 (magnitudes ~T instead of ~N: better conditioned).
    # Variables x = [u (C), d (C)] with d_k >= |u_k|.
    eye = np.eye(c_dim)
    a_ub = np.block(
        [
            [eye, -eye],  # u_k - d_k <= 0
            [-eye, -eye],  # -u_k - d_k <= 0
            [np.zeros((1, c_dim)), np.ones((1, c_dim))],  # sum d <= 2T
        ]
    )
    b_ub = np.concatenate([np.zeros(2 * c_dim), [2.0 * t]])
    a_eq = np.concatenate([np.ones(c_dim), np.zeros(c_dim)])[None, :]
    b_eq = np.array([float(n - n_cur)])
    u_lo = (lo - n0).astype(np.float64)
    u_hi = (hi - n0).astype(np.float64)
    obj = np.concatenate([-coef, np.zeros(c_dim)])
    bounds = [(float(a), float(b)) for a, b in zip(u_lo, u_hi)] + [(0.0, None)] * c_dim

    lp = linprog(obj, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, bounds=bounds, method="highs")
    if lp.status != 0:
        # The pre-check above covers every infeasibility; reaching here is a solver problem.
        raise RuntimeError(f"EE-CPO LP failed: status {lp.status}: {lp.message}")
    lp_counts = n0 + lp.x[:c_dim]

    cons = [
        LinearConstraint(a_ub, -np.inf, b_ub),
        LinearConstraint(a_eq, b_eq, b_eq),
    ]
    var_bounds = Bounds(
        np.concatenate([u_lo, np.zeros(c_dim)]), np.concatenate([u_hi, np.full(c_dim, np.inf)])
    )
    integrality = np.concatenate([np.ones(c_dim), np.zeros(c_dim)])
    opts = {"mip_rel_gap": 0.0}
    ip = milp(obj, integrality=integrality, bounds=var_bounds, constraints=cons, options=opts)
    if ip.status != 0 or ip.x is None:
        raise RuntimeError(f"EE-CPO integer solve failed: status {ip.status}: {ip.message}")
    u = np.rint(ip.x[:c_dim]).astype(np.int64)
    milp_status = str(ip.message)

    # Tie-break: among integer optima, fewest edits. Keep the first solution if this fails.
    best = float(coef @ u)
    tol = 1e-9 * (1.0 + abs(best))
    value_row = np.concatenate([coef, np.zeros(c_dim)])[None, :]
    keep_value = LinearConstraint(value_row, best - tol, np.inf)
    cons2 = cons + [keep_value]
    obj2 = np.concatenate([np.zeros(c_dim), np.ones(c_dim)])
    ip2 = milp(obj2, integrality=integrality, bounds=var_bounds, constraints=cons2, options=opts)
    if ip2.status == 0 and ip2.x is not None:
        u2 = np.rint(ip2.x[:c_dim]).astype(np.int64)
        if _valid(u2, u_lo, u_hi, n - n_cur, t) and float(coef @ u2) >= best - tol:
            u = u2

    if not _valid(u, u_lo, u_hi, n - n_cur, t):  # exact integer re-check of every constraint
        raise RuntimeError("EE-CPO integer solution violates a constraint after rounding")
    counts = n0 + u
    return MixturePlan(
        counts_before=n0,
        counts_after=counts,
        coefficients=coef,
        importance=alpha,
        budget=n,
        edit_budget=t,
        edits=int(np.abs(u).sum()),
        objective_before=float(coef @ n0),
        objective_after=float(coef @ counts),
        lp_objective=float(coef @ lp_counts),
        lp_counts=lp_counts,
        lp_status=str(lp.message),
        milp_status=milp_status,
        max_change=cap,
    )


def _valid(u: np.ndarray, u_lo: np.ndarray, u_hi: np.ndarray, net: int, t: int) -> bool:
    in_bounds = np.all(u >= u_lo) and np.all(u <= u_hi)
    return bool(in_bounds and int(u.sum()) == net and int(np.abs(u).sum()) <= 2 * t)


def ee_cpo_counts(
    gamma: np.ndarray,
    current_counts: np.ndarray,
    budget: int | None = None,
    edit_fraction: float = 0.03,
    min_per_category: int = 5,
    available_extra: np.ndarray | None = None,
    importance: np.ndarray | None = None,
    *,
    max_change: int | None = None,
) -> np.ndarray:
    """Optimal integer category counts ``(C,)`` int64; see :func:`ee_cpo_plan`."""
    return ee_cpo_plan(
        gamma,
        current_counts,
        budget=budget,
        edit_fraction=edit_fraction,
        min_per_category=min_per_category,
        available_extra=available_extra,
        importance=importance,
        max_change=max_change,
    ).counts_after


# --------------------------------------------------------------------------------------------
# Realising counts as a concrete subset
# --------------------------------------------------------------------------------------------


def _norm_label(x) -> Hashable:
    # numpy scalars (np.int64, np.str_) compare equal to Python ones but keep labels uniform.
    return x.item() if isinstance(x, np.generic) else x


def usable_extra(names: Sequence[str | int], current_keys: Sequence[Hashable],
                 candidate_categories: Sequence[str | int], candidate_keys: Sequence[Hashable]) -> np.ndarray:
    """(C,) int64: how many records of each category of ``names`` `realise_subset` can add from
    the candidates when it deduplicates by content key: distinct keys not already in the current
    set. This, not the raw candidate count, is the ``available_extra`` to give `ee_cpo_plan`
    when a pool repeats texts (else the plan can ask for additions that do not exist)."""
    if len(candidate_keys) != len(candidate_categories):
        raise ValueError("candidate_categories and candidate_keys must have the same length")
    index = {_norm_label(n): k for k, n in enumerate(names)}
    seen = set(current_keys)
    counts = np.zeros(len(index), np.int64)
    for label, key in zip(candidate_categories, candidate_keys):
        k = index.get(_norm_label(label))
        if k is not None and key not in seen:
            seen.add(key)
            counts[k] += 1
    return counts


def realise_subset(
    categories_of_current: Sequence[str | int],
    counts_target: Mapping[Hashable, int] | np.ndarray | Sequence[int],
    candidates_categories: Sequence[str | int] | None = None,
    candidate_quality: np.ndarray | None = None,
    seed: int = 0,
    *,
    names: Sequence[str | int] | None = None,
    current_keys: Sequence[Hashable] | None = None,
    candidate_keys: Sequence[Hashable] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Concrete records realising EE-CPO counts (Beyond IID section 3).

    In:
      categories_of_current: category label of each current record.
      counts_target: target count per category, either a mapping label -> count or a
        ``(C,)`` array whose position k means label ``names[k]`` (or ``k`` when ``names`` is
        None, i.e. integer category ids).
      candidates_categories / candidate_quality: category label (and optional score, higher is
        better) of each record of the extra pool.
      seed: seeds one ``numpy`` Generator per category (``default_rng((seed, k))``), so the draw
        of one category does not depend on the others.
      current_keys / candidate_keys: optional content keys (e.g. text hashes); a candidate whose
        key is already in the current set, or equals a candidate already taken, is skipped.

    Out: ``(keep_indices, add_candidate_indices)``, both sorted int64. Shrinking categories
    keep a uniformly random subset; growing categories keep everything and add candidates
    best-first by quality (ties by index) or uniformly at random without quality.

    Raises ``ValueError`` when a category of the current set has no target, or when the pool
    lacks enough (non-duplicate) records of a growing category.
    """
    cur = [_norm_label(x) for x in categories_of_current]
    if isinstance(counts_target, Mapping):
        target = {_norm_label(k): int(v) for k, v in counts_target.items()}
    else:
        arr = np.asarray(counts_target)
        if arr.ndim != 1:
            raise ValueError(f"counts_target must be 1-D or a mapping, got shape {arr.shape}")
        labels = list(range(arr.shape[0])) if names is None else [_norm_label(x) for x in names]
        if len(labels) != arr.shape[0]:
            raise ValueError(f"names has {len(labels)} entries, counts_target {arr.shape[0]}")
        if arr.dtype.kind == "f" and np.any(arr != np.round(arr)):
            raise ValueError("counts_target must hold integers")
        target = {lab: int(v) for lab, v in zip(labels, arr)}
    for lab, v in target.items():
        if v < 0:
            raise ValueError(f"counts_target for category {lab!r} is negative ({v})")
    missing = sorted({str(x) for x in cur if x not in target})
    if missing:
        raise ValueError(f"categories of the current set without a target count: {missing}")

    cand = [] if candidates_categories is None else [_norm_label(x) for x in candidates_categories]
    quality = None
    if candidate_quality is not None:
        quality = np.asarray(candidate_quality, dtype=np.float64)
        if quality.shape != (len(cand),):
            raise ValueError(
                f"candidate_quality has shape {quality.shape}, expected ({len(cand)},)"
            )
        if np.any(np.isnan(quality)):
            raise ValueError("candidate_quality contains NaN")
    if (current_keys is None) != (candidate_keys is None):
        raise ValueError("pass both current_keys and candidate_keys, or neither")
    if current_keys is not None:
        if len(current_keys) != len(cur) or len(candidate_keys) != len(cand):
            raise ValueError("current_keys / candidate_keys must match the record counts")
        seen = set(current_keys)
    else:
        seen = None

    cur_arr = np.empty(len(cur), dtype=object)
    cur_arr[:] = cur
    cand_arr = np.empty(len(cand), dtype=object)
    cand_arr[:] = cand
    keep: list[np.ndarray] = []
    add: list[int] = []
    for k, (lab, want) in enumerate(target.items()):
        idx = np.flatnonzero(cur_arr == lab) if len(cur) else np.zeros(0, dtype=np.int64)
        rng = np.random.default_rng((int(seed), k))
        if want <= idx.size:
            # Uniform removal within the category.
            if want < idx.size:
                idx = np.sort(rng.choice(idx, size=want, replace=False))
            keep.append(idx)
            continue
        keep.append(idx)
        need = want - idx.size
        pool = np.flatnonzero(cand_arr == lab) if len(cand) else np.zeros(0, dtype=np.int64)
        if quality is not None:
            pool = pool[np.lexsort((pool, -quality[pool]))]  # best first, ties by index
        else:
            pool = rng.permutation(pool)
        taken: list[int] = []
        for j in pool:
            if len(taken) == need:
                break
            if seen is not None:
                key = candidate_keys[int(j)]
                if key in seen:
                    continue
                seen.add(key)
            taken.append(int(j))
        if len(taken) < need:
            raise ValueError(
                f"candidate pool lacks records of category {lab!r}: need {need} more, "
                f"{len(taken)} usable (of {pool.size} in the pool)"
            )
        add.extend(taken)
    keep_idx = np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
    return keep_idx.astype(np.int64), np.sort(np.asarray(add, dtype=np.int64))
