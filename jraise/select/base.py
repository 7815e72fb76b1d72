"""The result every static selector returns: `Selection`, and how it is written to disk."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np

from jraise.atomic import atomic_write_group
from jraise.data.pool import InstructionPool, selection_jsonl_text, with_skipped, write_selection_jsonl


@dataclass(frozen=True, eq=False)
class Selection:
    """Chosen pool indices (best first), every example's score where the method has scores, the
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

    def to_jsonl(self, pool: InstructionPool, path: str | os.PathLike) -> Path:
        """The selected records, unchanged, best first (atomic write). Refuses another pool.

        ``indices`` refer to the loaded (kept) examples of ``pool``; what is written is
        ``pool.records[i]``, the original record as read (with its stable ``id`` when it has one),
        so a record skipped as bad on loading never shifts which records are written."""
        if pool.fingerprint != self.pool_fingerprint:
            raise ValueError(f"{path}: this selection was made on pool {self.pool_fingerprint[:12]}..., "
                             f"not on {pool.source} ({pool.fingerprint[:12]}...)")
        return write_selection_jsonl(pool, self.indices, path)

    def metadata(self) -> dict:
        return {"method": self.method, "pool_fingerprint": self.pool_fingerprint, "config": self.config,
                "n_selected": len(self.indices), "indices": [int(i) for i in self.indices]}

    def write(self, pool: InstructionPool, out: str | os.PathLike, inputs: Sequence = ()) -> dict[str, Path]:
        """``out`` (selected records), ``out``.scores.npy (when scored) and ``out``.meta.json, as
        one commit (`jraise.atomic.atomic_write_group`): all three are written to temporary files
        first, so a failed write (a full disk) leaves any earlier selection at ``out`` whole; then
        the scores and the meta file are renamed into place and the records file last, the commit
        marker. The meta file records the sha256 of the records and scores files (``"files"``);
        `read_selection` treats a set whose files disagree with it as absent. An earlier
        ``.scores.npy`` is removed when this selection has no scores.

        The selected records are the original records of the file (see `to_jsonl`), while the
        indices in the meta file and the scores' positions refer to the loaded (kept) examples.
        When bad records were skipped loading ``pool`` or ``inputs`` (other pools the selection
        used, e.g. the validation set), the meta file has them under ``"skipped"`` (count, per
        file, per reason, and the problems with file, line, field and reason; see
        `jraise.data.pool.skipped_summary`)."""
        out = Path(out)
        if pool.fingerprint != self.pool_fingerprint:
            raise ValueError(f"{out}: this selection was made on pool {self.pool_fingerprint[:12]}..., "
                             f"not on {pool.source} ({pool.fingerprint[:12]}...)")
        paths = selection_paths(out)
        records = selection_jsonl_text(pool, self.indices).encode("utf-8")
        scores = _npy_bytes(self.scores) if self.scores is not None else None
        files = {"records": {"name": out.name, "sha256": _sha256(records)},
                 "scores": None if scores is None else {"name": paths["scores"].name, "sha256": _sha256(scores)}}
        meta = {**with_skipped(self.metadata(), pool, *inputs), "files": files}
        atomic_write_group([(paths["scores"], scores),
                            (paths["meta"], (json.dumps(meta, indent=2) + "\n").encode("utf-8")),
                            (paths["selection"], records)])
        if scores is None:
            del paths["scores"]
        return paths


def selection_paths(out: str | os.PathLike) -> dict[str, Path]:
    """The files of a selection written to ``out``: selection (records), scores, meta."""
    out = Path(out)
    return {"selection": out, "scores": out.with_name(out.name + ".scores.npy"),
            "meta": out.with_name(out.name + ".meta.json")}


def read_selection(out: str | os.PathLike) -> dict | None:
    """The meta dict of the complete selection at ``out`` (with ``"scores"``: the float32 array,
    or None for a method without scores), or None when there is no complete one: the records
    file or the meta file is missing, the meta file is unreadable, or the records or scores file
    is not the one the meta file describes (an interrupted write, or files of two selections)."""
    paths = selection_paths(out)
    try:
        meta = json.loads(paths["meta"].read_text(encoding="utf-8"))
        records = paths["selection"].read_bytes()
    except (OSError, ValueError):
        return None
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not isinstance(files.get("records"), dict):
        return None
    if files["records"].get("sha256") != _sha256(records):
        return None
    scores = None
    if files.get("scores") is not None:
        try:
            data = paths["scores"].read_bytes()
        except OSError:
            return None
        if files["scores"].get("sha256") != _sha256(data):
            return None
        scores = np.load(BytesIO(data))
    return {**meta, "scores": scores}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = BytesIO()
    np.save(buffer, np.asarray(array))
    return buffer.getvalue()


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
