"""Category interaction ("effect equivalence") matrix Gamma.

Method: Beyond IID (Zhao, Du, Ju, Wu, Pan 2024, arXiv 2409.07045, the interaction
estimate). From a baseline set D0 one fine-tune per source category i is
run with the amount of category i changed by ``Delta_i``; the performance ``P_j`` on every
target category j is measured. The per-instruction effect is

    e_ij = (P_j(D^(i)) - P_j(D0)) / Delta_i          (sign flipped for lower-is-better metrics)

and the effect-equivalence matrix is ``Gamma[j, i] = e_ij / e_jj``: how many category-j
instructions give category j the same gain as one category-i instruction. It has a unit
diagonal; > 0 is synergy, < 0 antagonism.

Orientation everywhere in jraise: ``gamma[target, source]`` (row = measured category j,
column = intervened category i).

Pure numpy in / numpy out. The Gamma files (``gamma.csv``, ``gamma.json``, the heatmap) and the
digitized paper figure are `jraise.data.gamma`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "interaction_matrix",
]


def _category_label(names: Sequence[str] | None, j: int) -> str:
    return f"{names[j]!r} (index {j})" if names is not None else f"index {j}"


def interaction_matrix(
    perf_base: np.ndarray,
    perf_intervened: np.ndarray,
    deltas: np.ndarray,
    higher_is_better: bool = True,
    *,
    names: Sequence[str] | None = None,
    self_effect_floor: float | None = None,
    relative_self_effect_floor: float | None = None,
    atol: float = 1e-12,
) -> np.ndarray:
    """Effect-equivalence matrix ``Gamma[target, source]`` from N+1 intervention runs.

    Beyond IID (arXiv 2409.07045), section 2: ``e_ij = (P_j(D^(i)) - P_j(D0)) / Delta_i`` and
    ``Gamma[j, i] = e_ij / e_jj``.

    Args:
      perf_base: ``(C,)`` per-category performance of the baseline model trained on D0.
      perf_intervened: ``(C, C)``; row ``i`` is the per-category performance (columns = target
        categories) of the model trained with source category ``i`` changed by ``deltas[i]``.
      deltas: ``(C,)`` change in the number of category-i instructions (non-zero; may be
        negative for removal interventions).
      higher_is_better: ``True`` for accuracy-like metrics; ``False`` for loss-like metrics, in
        which case the sign of every effect is flipped so that "positive effect = helps".
      names: optional category names, only used in error messages.
      self_effect_floor: policy for categories whose own effect ``e_jj`` is not positive.
        ``None`` (default): raise ``ValueError`` naming the category, because a row of Gamma
        cannot be expressed in "equivalent own-category instructions" when adding own data does
        not help (``e_jj ~ 0`` divides by zero; ``e_jj < 0`` would flip every sign of the row).
        A positive float: clip, i.e. divide every row j by ``max(e_jj, self_effect_floor)``.
      relative_self_effect_floor: ``r`` in (0, 1] or ``None`` (default, off). Floor every own
        effect at ``r * median(e_kk over the categories with e_kk > atol)``: row j is divided by
        ``max(e_jj, floor)``, always (also when every own effect is positive). On small runs a
        nearly learned category has a tiny positive own effect, and dividing its row by it
        magnifies that row's noise (a row that then dominates the EE-CPO LP). With both floors
        given the effective floor is ``max(self_effect_floor, r * median)``. A non-positive own
        effect is clipped to the floor (no error); when no own effect is positive and
        ``self_effect_floor`` is not given, ``ValueError``.
      atol: ``e_jj <= atol`` counts as "not positive".

    Returns:
      ``(C, C)`` float64 array ``Gamma[target, source]`` with an exactly unit diagonal.
    """
    base = np.asarray(perf_base, dtype=np.float64)
    inter = np.asarray(perf_intervened, dtype=np.float64)
    delta = np.asarray(deltas, dtype=np.float64)
    if base.ndim != 1:
        raise ValueError(f"perf_base must be 1-D (C,), got shape {base.shape}")
    c = base.shape[0]
    if inter.shape != (c, c):
        raise ValueError(
            f"perf_intervened must have shape (C_src, C_tgt) = ({c}, {c}), got {inter.shape}"
        )
    if delta.shape != (c,):
        raise ValueError(f"deltas must have shape ({c},), got {delta.shape}")
    if names is not None and len(names) != c:
        raise ValueError(f"names has {len(names)} entries, expected {c}")
    for label, arr in (("perf_base", base), ("perf_intervened", inter), ("deltas", delta)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{label} contains non-finite values")
    zero = np.flatnonzero(delta == 0)
    if zero.size:
        raise ValueError(
            f"deltas must be non-zero; category {_category_label(names, int(zero[0]))} has "
            "Delta = 0 (no intervention, the effect is undefined)"
        )
    if self_effect_floor is not None and not self_effect_floor > 0:
        raise ValueError(f"self_effect_floor must be > 0, got {self_effect_floor}")
    r = relative_self_effect_floor
    if r is not None and (
        isinstance(r, bool) or not isinstance(r, (int, float, np.integer, np.floating)) or not 0 < r <= 1
    ):
        raise ValueError(f"relative_self_effect_floor must be in (0, 1], got {r!r}")

    sign = 1.0 if higher_is_better else -1.0
    # effect[i, j] = e_ij: source i (row of the intervention table), target j.
    effect = sign * (inter - base[None, :]) / delta[:, None]
    self_effect = np.diag(effect).copy()
    if r is not None:
        self_effect = np.maximum(self_effect, _relative_floor(self_effect, r, self_effect_floor, atol))
    if self_effect_floor is not None:
        self_effect = np.maximum(self_effect, self_effect_floor)
    bad = np.flatnonzero(self_effect <= atol)
    if bad.size:
        j = int(bad[0])
        raise ValueError(
            f"cannot normalise Gamma row of category {_category_label(names, j)}: its own "
            f"effect e_jj = {self_effect[j]:.3g} is not positive (adding category-j data did "
            "not improve category j); pass self_effect_floor=<small positive> to clip"
        )
    # gamma[j, i] = effect[i, j] / e_jj  ->  transpose, then divide row j.
    gamma = effect.T / self_effect[:, None]
    # Unit diagonal by definition (it is e_jj / e_jj); set exactly to avoid rounding / clipping.
    np.fill_diagonal(gamma, 1.0)
    return gamma


def _relative_floor(self_effect: np.ndarray, r: float, self_effect_floor: float | None, atol: float) -> float:
    """``max(self_effect_floor, r * median(positive own effects))`` for `interaction_matrix`."""
    positive = self_effect[self_effect > atol]
    if positive.size == 0:
        if self_effect_floor is None:
            raise ValueError(
                "relative_self_effect_floor needs at least one positive own effect e_jj, but none "
                "is positive (adding a category's data improved no category); pass "
                "self_effect_floor=<small positive> to clip to an absolute floor"
            )
        return float(self_effect_floor)
    floor = float(r) * float(np.median(positive))
    return floor if self_effect_floor is None else max(floor, float(self_effect_floor))
