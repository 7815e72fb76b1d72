"""The result every static selector returns: `Selection` (indices best first, or in the selector's
stated pick order, e.g. LESS/ROSE's per-group budget; scores, method,
options, pool fingerprint), and `top_fraction`, the ranking all of them share.

Writing a selection (the selected records, the scores, the meta file) and reading one back is
`jraise.data.selections`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, eq=False)
class Selection:
    """Chosen pool indices (best first; LESS/ROSE with ``group_budget="split"``: in pick order,
    round by round over the validation groups), every example's score where the method has scores, the
    method name, its options, and the fingerprint of the pool the indices refer to.

    Indices (``indices``, ``scores`` positions, the meta file's ``"indices"``) count the examples of
    the loaded pool, i.e. the records kept after any bad ones were skipped (``skip_bad=True``), not
    the lines or rows of the file. The records written are the original records (ids included),
    never shifted by the skipped ones.
    """

    indices: np.ndarray  # int64 [k]
    method: str
    pool_fingerprint: str
    scores: np.ndarray | None = None  # float32 [N] or None
    config: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)  # what the selection cost, by part, where the method records it

    def metadata(self) -> dict:
        meta = {"method": self.method, "pool_fingerprint": self.pool_fingerprint, "config": self.config,
                "n_selected": len(self.indices), "indices": [int(i) for i in self.indices]}
        return {**meta, "seconds": self.seconds} if self.seconds else meta


def top_fraction(scores: np.ndarray, fraction: float | None = None, k: int | None = None) -> np.ndarray:
    """Indices of the highest scores, best first; ties broken by the lower index (deterministic).
    Exactly one of ``fraction`` (of N, rounded, at least 1) or ``k``."""
    scores = np.asarray(scores)
    if (fraction is None) == (k is None):
        raise ValueError("give exactly one of fraction or k")
    if k is None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        k = max(1, round(fraction * len(scores)))
    if not 1 <= k <= len(scores):
        raise ValueError(f"cannot select {k} of {len(scores)} examples")
    if np.isnan(scores).any():
        raise ValueError(f"scores contain NaN at indices {np.flatnonzero(np.isnan(scores))[:5].tolist()}")
    order = np.lexsort((np.arange(len(scores)), -scores))
    return order[:k].astype(np.int64)
