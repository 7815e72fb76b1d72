"""LESS and ROSE scoring: checkpoint-weighted cosine influence, aggregated over validation subtasks.

For train example z and validation example v, with checkpoints i = 1..K:

    score(z, v) = sum_i w_i * cos(Gamma_i(z), val_i(v)),  w_i = mean lr of epoch i / sum of those

where Gamma_i(z) is the Adam-preconditioned projected gradient of z at checkpoint i and val_i(v) the
plain projected gradient of v there (LESS: SFT loss; ROSE: DPO loss, or its reference-free form).
Both come L2-normalised, so cosine is a dot product. Per train example, scores are averaged within
each validation subtask (group) and the maximum over subtasks is its final score.

The budget over subtasks (``group_budget``): ``"max"`` (the LESS paper's) keeps the top k by the
final score, so one subtask whose validation gradients sit close together (short, aligned answers)
can take the whole budget; ``"split"`` gives each of the G subtasks k // G picks (the first
k mod G subtasks in name order one more) taken by that subtask's own mean score, best first,
skipping records another subtask already took (`split_by_group`): a per-target budget, jraise's
option for several targets at once, not the paper's.

Memory: train features are read one block of rows of one checkpoint at a time (`ShardedMatrix.rows`
or array slices) and added into a running [b, M] total; then [b, M] x [M, G] gives the group
means. Peak memory is O(b * (d + M)) plus the outputs [N] and [N, G], never N x M
(`benchmarks/grad_features.py` measures it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jraise.data.feature_store import ShardedMatrix, normalise_rows
from jraise.select.base import Selection, top_fraction

METHODS = ("less", "rose")
GROUP_BUDGETS = ("max", "split")


def checkpoint_weights(epoch_mean_lrs: Sequence[float]) -> np.ndarray:
    """LESS's checkpoint weights: each checkpoint's epoch-mean learning rate, renormalised to 1."""
    w = np.asarray(epoch_mean_lrs, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"checkpoint weights need finite, non-negative learning rates with a positive sum, got {w}")
    return w / w.sum()


def group_matrix(groups: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """([M, G] averaging matrix: column g is 1/|g| on g's members, the group names in order of
    first appearance)."""
    names = list(dict.fromkeys(str(g) for g in groups))
    column = {name: j for j, name in enumerate(names)}
    a = np.zeros((len(groups), len(names)), np.float32)
    for m, g in enumerate(groups):
        a[m, column[str(g)]] = 1.0
    return a / a.sum(axis=0, keepdims=True), names


def _rows(train, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of one checkpoint's train features, L2-normalised: a feature store's rows
    are normalised when written (`FeatureStore.write_shard`), any other array is normalised here."""
    if isinstance(train, ShardedMatrix):
        return train.rows(start, stop)
    return normalise_rows(np.asarray(train[start:stop], dtype=np.float32))


def influence_scores(train: Sequence, val: Sequence, weights: Sequence[float], groups: Sequence[str] | None = None,
                     block_rows: int = 16384, return_groups: bool = False):
    """Final score [N] float32 of each train example (see the module docstring).

    ``train``: K feature matrices [N, d] (`ShardedMatrix` or arrays), one per checkpoint; arrays
    are L2-normalised here row by row, a `ShardedMatrix` is read as stored (feature stores
    normalise their rows when written);
    ``val``: K arrays [M, d] (normalised here too, so raw projected gradients are fine on both sides);
    ``weights``: K checkpoint weights; ``groups``: M subtask names (None: one group).
    With ``return_groups`` also the per-group scores [N, G] and the group names.
    """
    if not (len(train) == len(val) == len(weights)) or len(train) == 0:
        raise ValueError(f"need one train matrix, one val matrix and one weight per checkpoint, got "
                         f"{len(train)}, {len(val)}, {len(weights)}")
    n, d = train[0].shape
    vals = [normalise_rows(np.asarray(v, dtype=np.float32)) for v in val]
    m = vals[0].shape[0]
    for i, (t, v) in enumerate(zip(train, vals)):
        if tuple(t.shape) != (n, d) or v.shape != (m, d):
            raise ValueError(f"checkpoint {i}: train features {tuple(t.shape)} and val features {v.shape} "
                             f"do not match checkpoint 0's ({n}, {d}) and ({m}, {d})")
    a, names = group_matrix(groups if groups is not None else ["all"] * m)
    if a.shape[0] != m:
        raise ValueError(f"groups has {a.shape[0]} entries for {m} validation examples")
    weighted_vt = [np.ascontiguousarray((float(w) * v).T) for w, v in zip(weights, vals)]
    per_group = np.empty((n, len(names)), np.float32)
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        acc = np.zeros((stop - start, m), np.float32)
        for t, vt in zip(train, weighted_vt):  # one checkpoint's block in memory at a time
            acc += _rows(t, start, stop) @ vt
        per_group[start:stop] = acc @ a
    final = per_group.max(axis=1)
    return (final, per_group, names) if return_groups else final


def split_by_group(per_group: np.ndarray, k: int, names: Sequence[str] | None = None) -> np.ndarray:
    """k row indices, a per-group budget: group g (column g of ``per_group`` [N, G]; groups taken in
    the sorted order of ``names``, default column order) gets ``k // G`` picks, the first ``k % G``
    groups one more; each takes its highest-scoring rows not yet taken (ties: lower index first).
    Returned in pick order, round by round over the groups (every group's best, then every group's
    second best, ...), so a prefix is again balanced. Raises ValueError on scores that are not
    [N, G] or hold NaN, ``k`` outside [1, N], or ``names`` not of length G."""
    per_group = np.asarray(per_group)
    if per_group.ndim != 2 or per_group.shape[1] == 0:
        raise ValueError(f"per-group scores must be [N, G] with G >= 1, got shape {per_group.shape}")
    n, g = per_group.shape
    if names is not None and len(names) != g:
        raise ValueError(f"{len(names)} group names for {g} score columns")
    if not 1 <= k <= n:
        raise ValueError(f"cannot select {k} of {n} examples")
    if np.isnan(per_group).any():
        raise ValueError("per-group scores contain NaN")
    columns = list(range(g)) if names is None else sorted(range(g), key=lambda j: str(names[j]))
    quota = {j: k // g + (rank < k % g) for rank, j in enumerate(columns)}
    orders = {j: np.lexsort((np.arange(n), -per_group[:, j])) for j in columns}
    cursor = dict.fromkeys(columns, 0)
    taken = np.zeros(n, bool)
    picks: list[int] = []
    for round_ in range(max(quota.values())):
        for j in columns:
            if round_ >= quota[j]:
                continue
            order = orders[j]
            while taken[order[cursor[j]]]:  # n >= k rows, so a group always finds an untaken one
                cursor[j] += 1
            row = int(order[cursor[j]])
            taken[row] = True
            picks.append(row)
    return np.asarray(picks, np.int64)


def select_by_influence(method: str, train: Sequence, val: Sequence, weights: Sequence[float],
                        pool_fingerprint: str, fraction: float = 0.05, groups: Sequence[str] | None = None,
                        config: dict | None = None, block_rows: int = 16384, group_budget: str = "max") -> Selection:
    """Scores (`influence_scores`) and keeps the top ``fraction``: a `Selection` named ``method``.
    ``group_budget``: "max" (top by the max over groups, LESS) or "split" (`split_by_group`); the
    Selection's ``scores`` are the max over groups either way."""
    if method not in METHODS:
        raise ValueError(f"unknown influence method {method!r}; choose from {', '.join(METHODS)}")
    if group_budget not in GROUP_BUDGETS:
        raise ValueError(f"unknown group_budget {group_budget!r}; choose from {', '.join(GROUP_BUDGETS)}")
    scores, per_group, names = influence_scores(train, val, weights, groups, block_rows, return_groups=True)
    if group_budget == "max":
        indices = top_fraction(scores, fraction=fraction)
    else:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        indices = split_by_group(per_group, max(1, round(fraction * len(scores))), names)
    cfg = {"fraction": fraction, "checkpoint_weights": [float(w) for w in weights], **(config or {}),
           "group_budget": group_budget}
    return Selection(indices=indices, method=method, pool_fingerprint=pool_fingerprint, scores=scores, config=cfg)


def less(train, val, weights, pool_fingerprint: str, fraction: float = 0.05, groups=None, *,
         group_budget: str = "max", **config) -> Selection:
    """LESS: ``val`` holds SFT-loss gradient features of the few-shot validation examples;
    ``group_budget`` as `select_by_influence`; other keywords are recorded in the config."""
    return select_by_influence("less", train, val, weights, pool_fingerprint, fraction, groups, config,
                               group_budget=group_budget)


def rose(train, val, weights, pool_fingerprint: str, fraction: float = 0.05, groups=None, *,
         group_budget: str = "max", **config) -> Selection:
    """ROSE: ``val`` holds DPO-loss (or reference-free margin) gradient features of preference
    pairs; ``group_budget`` as `select_by_influence`; other keywords are recorded in the config."""
    return select_by_influence("rose", train, val, weights, pool_fingerprint, fraction, groups, config,
                               group_budget=group_budget)
