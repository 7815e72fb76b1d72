"""Gamma files: the category interaction matrix ``gamma[target, source]`` on disk, and the
digitized paper figure.

`save_gamma` writes ``gamma.csv`` (header ``target\\source, <names...>``, one row per target),
``gamma.json`` (``names``, ``matrix``, ``orientation = "gamma[target][source]"``) and
``gamma_heatmap.png`` (rows and columns in `cluster_order`); `load_gamma` reads the CSV or the
JSON back, refusing malformed input with the file and the entry named;
`load_digitized_fixture` reads the digitized Beyond IID figure
(``shared/data/beyond_iid_gamma_qwen.json``). The matrix itself comes from
`jraise.select.interactions.interaction_matrix`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jraise.atomic import atomic_write_bytes

ORIENTATION = "gamma[target][source]"

__all__ = [
    "ORIENTATION",
    "cluster_order",
    "save_gamma",
    "load_gamma",
    "load_digitized_fixture",
]


def cluster_order(gamma: np.ndarray) -> np.ndarray:
    """Permutation of categories from average-linkage hierarchical clustering.

    Each category is described by both how it is affected (its row of Gamma) and how it affects
    the others (its column), so that categories with similar interaction profiles sit together.
    The same order is used for rows and columns, keeping the unit diagonal on the diagonal.
    """
    g = np.asarray(gamma, dtype=np.float64)
    c = g.shape[0]
    if c <= 2:
        return np.arange(c)
    from scipy.cluster.hierarchy import leaves_list, linkage

    features = np.concatenate([g, g.T], axis=1)
    z = linkage(features, method="average", metric="euclidean", optimal_ordering=True)
    return np.asarray(leaves_list(z), dtype=np.int64)


def check_gamma(gamma, names: Sequence[str] | None = None) -> np.ndarray:
    """``gamma`` as a float64 (C, C) array, refused (ValueError naming the entry) when it is not
    square, has non-finite entries, or ``names`` (if given) are not C unique names."""
    g = np.asarray(gamma, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"gamma must be a square (C, C) matrix, got shape {g.shape}")
    if names is not None:
        if len(names) != g.shape[0]:
            raise ValueError(f"names has {len(names)} entries, gamma is {g.shape}")
        if len(set(names)) != len(names):
            raise ValueError("category names must be unique")
    bad = np.argwhere(~np.isfinite(g))
    if len(bad):
        r, k = (int(x) for x in bad[0])
        which = f" (target {names[r]!r}, source {names[k]!r})" if names is not None else ""
        raise ValueError(f"gamma contains non-finite values: gamma[{r}, {k}]{which} is {g[r, k]}")
    return g


def _check_gamma_names(gamma: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    names = [str(n) for n in names]
    g = check_gamma(gamma, names)
    _check_diagonal(g, names, lambda r: f"gamma[{r}, {r}]")
    return g, names


def _check_diagonal(g: np.ndarray, names: Sequence[str], entry) -> None:
    """Refuses a non-positive diagonal entry (a category's effect on itself, 1 by construction);
    ``entry(r)`` names the entry of row r in the message."""
    bad = np.flatnonzero(~(np.diag(g) > 0))
    if len(bad):
        r = int(bad[0])
        raise ValueError(f"{entry(r)} (target = source = {names[r]!r}): diagonal entry {float(g[r, r])!r} is not "
                         "positive; Gamma's diagonal is a category's effect on itself (1 by construction)")


def save_gamma(
    gamma: np.ndarray, names: Sequence[str], out_dir: str | os.PathLike
) -> dict[str, Path]:
    """Write ``gamma.csv``, ``gamma.json`` and ``gamma_heatmap.png`` into ``out_dir``.

    In: ``gamma[target, source]`` (C, C) and C category names. Out: the three paths by kind
    (``{"csv", "json", "png"}``). Each file is written to a temporary name in ``out_dir`` and
    then ``os.replace``-d, so readers never see a half-written file. The CSV has a header row
    ``target\\source, <names...>`` and one row per target; the JSON holds ``names``, ``matrix``
    and ``orientation = "gamma[target][source]"``; the heatmap orders rows and columns by
    :func:`cluster_order` (same order on both axes).
    """
    g, names = _check_gamma_names(gamma, names)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "gamma.csv", "json": out / "gamma.json", "png": out / "gamma_heatmap.png"}

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["target\\source", *names])
    for name, row in zip(names, g):
        writer.writerow([name, *(repr(float(v)) for v in row)])
    atomic_write_bytes(paths["csv"], buf.getvalue().encode("utf-8"))

    doc = {
        "names": names,
        "orientation": ORIENTATION,
        "matrix": [[float(v) for v in row] for row in g],
    }
    atomic_write_bytes(paths["json"], (json.dumps(doc, indent=1) + "\n").encode("utf-8"))

    atomic_write_bytes(paths["png"], _heatmap_png(g, names))
    return paths


def _heatmap_png(g: np.ndarray, names: list[str]) -> bytes:
    # Figure + FigureCanvasAgg directly: the Agg backend without touching pyplot's global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    order = cluster_order(g)
    sub = g[np.ix_(order, order)]
    labels = [names[k] for k in order]
    c = len(names)
    size = max(4.0, 0.28 * c + 2.5)
    fig = Figure(figsize=(size + 1.0, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    vmax = float(np.max(np.abs(sub))) or 1.0
    im = ax.imshow(sub, cmap="bwr", vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(c), labels=labels, rotation=90, fontsize=7)
    ax.set_yticks(range(c), labels=labels, fontsize=7)
    ax.set_xlabel("source (intervened category i)")
    ax.set_ylabel("target (measured category j)")
    ax.set_title("Gamma[target, source] (Beyond IID effect equivalence)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _parse_float(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    try:
        v = float(value)
    except ValueError:
        raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{where}: value {value!r} is not finite")
    return v


def load_gamma(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Read a Gamma written by :func:`save_gamma` back as ``(names, gamma[target, source])``.

    ``path`` is ``gamma.json``, ``gamma.csv`` (chosen by suffix) or a directory holding
    ``gamma.json``. Malformed input raises ``ValueError`` naming the file and the entry (its
    target and source category): invalid UTF-8, a missing or non-numeric value, an infinite or
    NaN value, or a diagonal entry that is not positive.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "gamma.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such Gamma file")
    suffix = p.suffix.lower()
    if suffix == ".json":
        return _load_gamma_json(p)
    if suffix == ".csv":
        return _load_gamma_csv(p)
    raise ValueError(f"{p}: unsupported Gamma file type {suffix!r} (expected .json or .csv)")


def _read_utf8(p: Path) -> str:
    data = p.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{p}: line {line}: invalid UTF-8 ({err.reason}); a Gamma file is UTF-8 text") from err


def _load_gamma_json(p: Path) -> tuple[list[str], np.ndarray]:
    try:
        doc = json.loads(_read_utf8(p))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{p}: top level must be an object with 'names' and 'matrix'")
    orientation = doc.get("orientation", ORIENTATION)
    if orientation != ORIENTATION:
        raise ValueError(
            f"{p}: field 'orientation' is {orientation!r}; only {ORIENTATION!r} is supported"
        )
    names = doc.get("names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{p}: field 'names' must be a list of strings")
    if len(set(names)) != len(names):
        raise ValueError(f"{p}: field 'names' has duplicate entries")
    matrix = doc.get("matrix")
    c = len(names)
    if not isinstance(matrix, list) or len(matrix) != c:
        raise ValueError(f"{p}: field 'matrix' must be a list of {c} rows (one per name)")
    g = np.empty((c, c), dtype=np.float64)
    for r, row in enumerate(matrix):
        if not isinstance(row, list) or len(row) != c:
            raise ValueError(f"{p}: field 'matrix', row {r}: expected a list of {c} numbers")
        for k, v in enumerate(row):
            g[r, k] = _parse_float(v, f"{p}: field 'matrix'[{r}][{k}] (target {names[r]!r}, source {names[k]!r})")
    _check_diagonal(g, names, lambda r: f"{p}: field 'matrix'[{r}][{r}]")
    return names, g


def _load_gamma_csv(p: Path) -> tuple[list[str], np.ndarray]:
    rows = [r for r in csv.reader(io.StringIO(_read_utf8(p), newline="")) if r]
    if not rows:
        raise ValueError(f"{p}: empty CSV (expected a header row of category names)")
    header = rows[0]
    names = header[1:]
    c = len(names)
    if c == 0:
        raise ValueError(f"{p}: header row has no category names")
    if len(set(names)) != c:
        raise ValueError(f"{p}: header row has duplicate category names")
    body = rows[1:]
    if len(body) != c:
        raise ValueError(f"{p}: expected {c} data rows (one per target), got {len(body)}")
    g = np.empty((c, c), dtype=np.float64)
    for r, row in enumerate(body):
        if len(row) != c + 1:
            raise ValueError(f"{p}: row {r + 2} has {len(row)} fields, expected {c + 1}")
        if row[0] != names[r]:
            raise ValueError(
                f"{p}: row {r + 2}, field 'target': {row[0]!r} does not match column {names[r]!r}"
                " (rows and columns must list the categories in the same order)"
            )
        for k, v in enumerate(row[1:]):
            g[r, k] = _parse_float(v, f"{p}: row {r + 2} (target {names[r]!r}), column {names[k]!r}")
    _check_diagonal(g, names, lambda r: f"{p}: row {r + 2}, column {names[r]!r}")
    return names, g


def load_digitized_fixture(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Turn the digitized paper figure (``shared/data/beyond_iid_gamma_qwen.json``) into Gamma.

    The file holds ``rows`` (names top to bottom), ``cols`` (names left to right, = ``rows``
    reversed) and ``M`` with ``M[r][c]`` the cell at row r, column c, so the unit diagonal is
    ``M[i][C-1-i]``. Out: ``(names, gamma[target, source])`` with ``names = rows`` and
    ``gamma = M[:, ::-1]``.

    Assumptions (the figure does not say which axis is the intervened one):
      * rows are taken as targets and columns as sources;
      * null cells (hidden by annotation boxes) become 0 ("no interaction"), except on the
        diagonal, which is set to exactly 1 by definition (digitized values read about 1.01).
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{p}: top level must be an object with 'rows', 'cols' and 'M'")
    rows, cols, m = doc.get("rows"), doc.get("cols"), doc.get("M")
    if not isinstance(rows, list) or not all(isinstance(n, str) for n in rows):
        raise ValueError(f"{p}: field 'rows' must be a list of strings")
    if cols != rows[::-1]:
        raise ValueError(f"{p}: field 'cols' must be field 'rows' reversed")
    c = len(rows)
    if not isinstance(m, list) or len(m) != c:
        raise ValueError(f"{p}: field 'M' must be a list of {c} rows")
    raw = np.zeros((c, c), dtype=np.float64)
    for r, row in enumerate(m):
        if not isinstance(row, list) or len(row) != c:
            raise ValueError(f"{p}: field 'M', row {r}: expected a list of {c} values")
        for k, v in enumerate(row):
            raw[r, k] = 0.0 if v is None else _parse_float(v, f"{p}: field 'M'[{r}][{k}]")
    gamma = raw[:, ::-1].copy()  # un-reverse the columns: gamma[i, k] = M[i][C-1-k]
    np.fill_diagonal(gamma, 1.0)
    return list(rows), gamma
