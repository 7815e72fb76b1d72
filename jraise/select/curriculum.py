"""DT-CSFT: dependency-taxonomy-guided curriculum for supervised fine-tuning.

Method: Beyond IID (Zhao et al. 2024, arXiv 2409.07045, the dependency
curriculum). Categories are split into three tiers -- base (root skills
such as math and code), middle, dependent (e.g. summarization, creative writing, knowledge QA) --
and the N training records are laid out as a 3-stage, 3N-record sequence that shows base skills
early and dependent ones late while every record is seen exactly three times.

Tiers come either from the user (``user_tiers``) or from the asymmetry of the interaction matrix
``gamma[target, source]`` (see :func:`prerequisite_edges`): edges -> strongly connected
components (cycles condensed) -> topological order -> longest-path depth -> tiers.

Numpy in / numpy out. Tier codes: 0 = base, 1 = middle, 2 = dependent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from jraise.data.gamma import check_gamma

BASE, MIDDLE, DEPENDENT = 0, 1, 2
DEFAULT_THRESHOLD = 0.1

__all__ = [
    "BASE",
    "MIDDLE",
    "DEPENDENT",
    "DEFAULT_THRESHOLD",
    "DependencyTaxonomy",
    "prerequisite_matrix",
    "prerequisite_edges",
    "adjacency_edges",
    "dependency_taxonomy",
    "replicated_prerequisite_matrix",
    "replicated_taxonomy",
    "dependency_tiers",
    "example_tiers",
    "curriculum_m",
    "CurriculumStages",
    "dt_csft_stages",
    "dt_csft_schedule",
]


def prerequisite_matrix(gamma: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Boolean ``(C, C)`` adjacency ``A[a, b]``: category a is a prerequisite of b.

    Rule: ``Gamma[b, a] - Gamma[a, b] > threshold``, i.e. one source-a instruction is worth more
    to target b (in b-equivalents) than one source-b instruction is worth to target a; training
    on a helps b more than b helps a. With ``threshold >= 0`` an edge never has a reverse edge.
    """
    g = check_gamma(gamma, None)
    asym = g.T - g  # asym[a, b] = Gamma[b, a] - Gamma[a, b]
    adj = asym > threshold
    np.fill_diagonal(adj, False)
    return adj


def prerequisite_edges(
    gamma: np.ndarray, names: Sequence[str], threshold: float = DEFAULT_THRESHOLD
) -> list[tuple[str, str]]:
    """Edges ``(a, b)`` = "a is a prerequisite of b" by the rule of :func:`prerequisite_matrix`.

    The default threshold 0.1 (in units of "equivalent own-category instructions") sits well
    above the +-0.02 per-cell precision of the digitized paper matrix (so +-0.04 on a difference)
    and keeps only clear asymmetries. Edges are listed in (a, b) index order.
    """
    check_gamma(gamma, names)
    return adjacency_edges(prerequisite_matrix(gamma, threshold), names)


def adjacency_edges(adjacency: np.ndarray, names: Sequence[str]) -> list[tuple[str, str]]:
    """Edges ``(a, b)`` of a boolean adjacency (``adjacency[a, b]``: a is a prerequisite of b), by
    name, in (a, b) index order."""
    return [(names[a], names[b]) for a, b in zip(*np.nonzero(adjacency))]


@dataclass(frozen=True, eq=False)
class DependencyTaxonomy:
    """Dependency graph of categories (Beyond IID section 4).

    Attributes:
      names: category names.
      adjacency: ``(C, C)`` bool, ``adjacency[a, b]`` = a is a prerequisite of b.
      component: ``(C,)`` strongly connected component id of each category (cycles condensed).
      depth: ``(C,)`` longest-path depth of each category's component in the condensed DAG
        (0 = no prerequisite).
      score: ``(C,)`` net asymmetry ``mean_b (Gamma[b, a] - Gamma[a, b])`` of each category a
        (> 0: it helps the others more than they help it).
      tiers: ``{name: tier}`` with 0 base, 1 middle, 2 dependent (for n_tiers = 3).
      method: how the tiers were derived ("depth" or "net_asymmetry").
    """

    names: tuple[str, ...]
    adjacency: np.ndarray
    component: np.ndarray
    depth: np.ndarray
    score: np.ndarray
    tiers: dict[str, int]
    method: str


def _condensed_depth(adj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SCC labels and longest-path depth per category (depth shared within a component)."""
    c = adj.shape[0]
    n_comp, comp = connected_components(
        csr_matrix(adj.astype(np.int8)), directed=True, connection="strong"
    )
    # Condensed DAG edges between distinct components.
    src, dst = np.nonzero(adj)
    cross = comp[src] != comp[dst]
    cedges = set(zip(comp[src][cross].tolist(), comp[dst][cross].tolist()))
    succ: list[list[int]] = [[] for _ in range(n_comp)]
    indeg = np.zeros(n_comp, dtype=np.int64)
    for u, v in sorted(cedges):
        succ[u].append(v)
        indeg[v] += 1
    # Kahn's algorithm gives a topological order; depth relaxes along it (longest path).
    depth = np.zeros(n_comp, dtype=np.int64)
    queue = [u for u in range(n_comp) if indeg[u] == 0]
    seen = 0
    while queue:
        u = queue.pop(0)
        seen += 1
        for v in succ[u]:
            depth[v] = max(depth[v], depth[u] + 1)
            indeg[v] -= 1
            if indeg[v] == 0:
                queue.append(v)
    assert seen == n_comp, "condensed graph must be acyclic"
    return comp.astype(np.int64), depth[comp] if c else np.zeros(0, dtype=np.int64)


def _validate_user_tiers(
    names: Sequence[str], user_tiers: Mapping[str, int], n_tiers: int
) -> dict[str, int]:
    unknown = sorted(set(user_tiers) - set(names))
    if unknown:
        raise ValueError(f"user_tiers names unknown categories: {unknown}")
    missing = [n for n in names if n not in user_tiers]
    if missing:
        raise ValueError(f"user_tiers lacks a tier for categories: {missing}")
    out = {}
    for n in names:
        t = user_tiers[n]
        if isinstance(t, bool) or int(t) != t or not 0 <= int(t) < n_tiers:
            raise ValueError(f"user_tiers[{n!r}] = {t!r} is not a tier in 0..{n_tiers - 1}")
        out[n] = int(t)
    return out


def dependency_taxonomy(
    gamma: np.ndarray,
    names: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
    n_tiers: int = 3,
    method: str = "depth",
) -> DependencyTaxonomy:
    """Gamma -> prerequisite graph -> condensed DAG -> depths -> tiers.

    ``method="depth"`` (default). Depth to tier: with D the largest depth, a category of depth
    d gets tier ``floor((n_tiers - 1) * d / D + 1/2)`` (depths spread linearly over the tiers,
    so roots are base and the deepest categories dependent; a chain a->b->c gives 0, 1, 2; a
    single edge a->b gives 0 and 2). Categories with no edge at all (no dependency information)
    go to the middle tier ``n_tiers // 2``; so does everything when the graph has no edges.
    Members of one cycle share a component and therefore a depth and a tier.

    ``method="net_asymmetry"``: dense, noisy matrices (such as the digitized paper figure) form
    one large strongly connected component, which flattens the depth method. This alternative
    ranks categories by their net asymmetry score (descending, ties by index) and cuts the
    ranking into ``n_tiers`` groups of (nearly) equal size (``numpy.array_split``); no threshold
    is involved.
    """
    g = check_gamma(gamma, names)
    return _taxonomy(g, prerequisite_matrix(g, threshold), names, n_tiers, method)


def _taxonomy(g: np.ndarray, adj: np.ndarray, names: Sequence[str], n_tiers: int, method: str) -> DependencyTaxonomy:
    """Tiers from a prerequisite adjacency (depth method) or from Gamma's net asymmetry."""
    if n_tiers < 1:
        raise ValueError(f"n_tiers must be >= 1, got {n_tiers}")
    if method not in ("depth", "net_asymmetry"):
        raise ValueError(f"method must be 'depth' or 'net_asymmetry', got {method!r}")
    c = g.shape[0]
    comp, depth = _condensed_depth(adj)
    score = (g - g.T).sum(axis=0) / max(c - 1, 1)  # score[a] = mean_b Gamma[b,a] - Gamma[a,b]
    tiers = {}
    if method == "depth":
        d_max = int(depth.max()) if depth.size else 0
        isolated = ~(adj.any(axis=0) | adj.any(axis=1))
        middle = n_tiers // 2
        for k, name in enumerate(names):
            if isolated[k] or d_max == 0:
                tiers[name] = middle
            else:
                tiers[name] = int(math.floor((n_tiers - 1) * depth[k] / d_max + 0.5))
    else:
        order = np.lexsort((np.arange(c), -score))
        for tier, group in enumerate(np.array_split(order, n_tiers)):
            for k in group:
                tiers[names[int(k)]] = tier
    return DependencyTaxonomy(
        names=tuple(names),
        adjacency=adj,
        component=comp,
        depth=depth,
        score=score,
        tiers=tiers,
        method=method,
    )


def replicated_prerequisite_matrix(
    gammas: np.ndarray, threshold: float = DEFAULT_THRESHOLD, alpha: float = 0.05
) -> np.ndarray:
    """Prerequisite adjacency from S >= 2 independently measured Gammas ``(S, C, C)``.

    Rule: a -> b when the mean asymmetry ``mean_s(Gamma_s[b, a] - Gamma_s[a, b])`` exceeds
    ``threshold`` AND a one-sided one-sample t-test over the S replicates rejects "mean
    asymmetry <= 0" at level ``alpha`` (t = mean / (sd / sqrt(S)) above Student's t quantile
    with S - 1 degrees of freedom). One Gamma's asymmetries carry the run-to-run noise of every
    intervention fine-tune (on the testbed about as large as the asymmetries themselves), so a
    fixed threshold alone draws an edge for most pairs in one direction or the other; the test
    keeps only asymmetries that the replicates agree on. A zero spread with a positive mean
    counts as significant.
    """
    from scipy.stats import t as student_t

    gs = np.asarray(gammas, dtype=np.float64)
    if gs.ndim != 3 or gs.shape[1] != gs.shape[2]:
        raise ValueError(f"gammas must be a stack (S, C, C) of square matrices, got shape {gs.shape}")
    if gs.shape[0] < 2:
        raise ValueError(f"a significance test needs at least 2 replicate Gammas, got {gs.shape[0]}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    for g in gs:
        check_gamma(g, None)
    asym = np.swapaxes(gs, 1, 2) - gs  # asym[s, a, b] = Gamma_s[b, a] - Gamma_s[a, b]
    s = gs.shape[0]
    mean, sd = asym.mean(axis=0), asym.std(axis=0, ddof=1)
    critical = float(student_t.ppf(1.0 - alpha, s - 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        t_stat = np.where(sd > 0, mean / (sd / math.sqrt(s)), np.where(mean > 0, np.inf, -np.inf))
    adj = (mean > threshold) & (t_stat > critical)
    np.fill_diagonal(adj, False)
    return adj


def replicated_taxonomy(
    gammas: np.ndarray,
    names: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
    alpha: float = 0.05,
    n_tiers: int = 3,
    method: str = "depth",
) -> DependencyTaxonomy:
    """`dependency_taxonomy` from S >= 2 replicate Gammas ``(S, C, C)`` (e.g. one per seed):
    edges by :func:`replicated_prerequisite_matrix`, scores (and the ``net_asymmetry`` ranking)
    from the mean Gamma. Tier rules as in `dependency_taxonomy`."""
    adj = replicated_prerequisite_matrix(gammas, threshold, alpha)
    mean = np.asarray(gammas, dtype=np.float64).mean(axis=0)
    check_gamma(mean, names)
    return _taxonomy(mean, adj, names, n_tiers, method)


def dependency_tiers(
    gamma: np.ndarray | None,
    names: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
    n_tiers: int = 3,
    user_tiers: Mapping[str, int] | None = None,
    method: str = "depth",
) -> dict[str, int]:
    """``{category name: tier}`` (0 base, 1 middle, 2 dependent for n_tiers = 3).

    With ``user_tiers`` the given tiers are validated (every name present, tiers in range) and
    returned as is, ``gamma`` may then be None; otherwise they are derived from ``gamma`` by
    :func:`dependency_taxonomy`.
    """
    if user_tiers is not None:
        if len(set(names)) != len(names):
            raise ValueError("category names must be unique")
        return _validate_user_tiers(names, user_tiers, n_tiers)
    if gamma is None:
        raise ValueError("pass gamma or user_tiers")
    return dependency_taxonomy(gamma, names, threshold, n_tiers, method).tiers


def example_tiers(categories_of_examples: Sequence[str], tiers: Mapping[str, int]) -> np.ndarray:
    """Tier code per example ``(N,)`` int8 from its category; unknown categories raise."""
    out = np.empty(len(categories_of_examples), dtype=np.int8)
    for i, cat in enumerate(categories_of_examples):
        if cat not in tiers:
            raise ValueError(f"example {i} has category {cat!r} with no tier")
        out[i] = tiers[cat]
    return out


# --------------------------------------------------------------------------------------------
# The 3-stage schedule
# --------------------------------------------------------------------------------------------


def curriculum_m(n: int) -> int:
    """Number of records shifted between stages: m = N // 10 if N < 50,000 else N // 20.

    N is the size of the whole training set (as in the released script), not of a tier.
    """
    return n // 10 if n < 50_000 else n // 20


@dataclass(frozen=True, eq=False)
class CurriculumStages:
    """The three stages of DT-CSFT as example-index arrays (each already shuffled).

    ``early_base`` are the base records shown twice in stage 1 (and not in stage 3);
    ``late_dependent`` the dependent records held out of stage 1 and shown twice in stage 3.
    """

    stage1: np.ndarray
    stage2: np.ndarray
    stage3: np.ndarray
    early_base: np.ndarray
    late_dependent: np.ndarray
    m_base: int
    m_dependent: int

    def sequence(self) -> np.ndarray:
        return np.concatenate([self.stage1, self.stage2, self.stage3])


def dt_csft_stages(
    tiers_of_examples: np.ndarray, seed: int = 0, m: int | None = None
) -> CurriculumStages:
    """Build the three DT-CSFT stages (Beyond IID section 4).

    In: ``tiers_of_examples`` ``(N,)`` with values in {0, 1, 2}; ``seed``; ``m`` (default
    :func:`curriculum_m` of N, the whole-set size).

    Procedure (one ``numpy`` Generator from ``seed``, draws in this fixed order):
      1. shuffle the base tier and the dependent tier; "first m base" / "last m dependent" are
         taken in these shuffled orders, i.e. uniformly random subsets (as in the released
         script, which shuffles before slicing). m is clipped to the tier size (m_base =
         min(m, |base|), m_dependent = min(m, |dependent|)).
      2. stage 1 = shuffle(base + first m base + middle + dependent minus its last m);
      3. stage 2 = shuffle(all N);
      4. stage 3 = shuffle(base minus its first m + middle + dependent + last m dependent).
    Every record appears exactly 3 times in total; stage lengths are N + m_b - m_d, N,
    N - m_b + m_d.
    """
    tiers = np.asarray(tiers_of_examples)
    if tiers.ndim != 1:
        raise ValueError(f"tiers_of_examples must be 1-D, got shape {tiers.shape}")
    if tiers.size and (tiers.dtype.kind not in "iu" or tiers.min() < 0 or tiers.max() > 2):
        raise ValueError("tiers_of_examples must hold integers in {0, 1, 2}")
    n = tiers.shape[0]
    if m is None:
        m = curriculum_m(n)
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    rng = np.random.default_rng(seed)
    base = rng.permutation(np.flatnonzero(tiers == BASE))
    middle = np.flatnonzero(tiers == MIDDLE)
    dep = rng.permutation(np.flatnonzero(tiers == DEPENDENT))
    m_b = min(m, base.size)
    m_d = min(m, dep.size)
    early_base = base[:m_b]
    late_dep = dep[dep.size - m_d :]
    stage1 = rng.permutation(np.concatenate([base, early_base, middle, dep[: dep.size - m_d]]))
    stage2 = rng.permutation(n)
    stage3 = rng.permutation(np.concatenate([base[m_b:], middle, dep, late_dep]))
    return CurriculumStages(
        stage1=stage1.astype(np.int64),
        stage2=stage2.astype(np.int64),
        stage3=stage3.astype(np.int64),
        early_base=np.sort(early_base).astype(np.int64),
        late_dependent=np.sort(late_dep).astype(np.int64),
        m_base=m_b,
        m_dependent=m_d,
    )


def dt_csft_schedule(
    tiers_of_examples: np.ndarray, seed: int = 0, m: int | None = None
) -> np.ndarray:
    """The 3N-long DT-CSFT example-index sequence; read it in order (no reshuffling).

    See :func:`dt_csft_stages` for the exact construction.
    """
    return dt_csft_stages(tiers_of_examples, seed=seed, m=m).sequence()
