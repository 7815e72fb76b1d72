"""The selection files: a `jraise.select.Selection` written to disk and read back.

A selection written to ``out`` is three files (`selection_paths`):

* ``out``: the selected records, unchanged, best first (JSONL, `jraise.data.pool.selection_jsonl_text`);
* ``out``.scores.npy: every example's score (float32 [N], ``.npy``), only for a method with scores;
* ``out``.meta.json: the selection's `Selection.metadata` (method, pool fingerprint, options,
  indices), the bad records skipped on loading (``"skipped"``) and the sha256 of the records and
  scores files (``"files"``).

`write_selection` commits the three together; `read_selection` returns a complete set or None.
The selection is any object with the `Selection` fields (``indices``, ``scores``,
``pool_fingerprint``) and ``metadata()``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

import numpy as np

from jraise.atomic import atomic_write_group
from jraise.data.pool import InstructionPool, selection_jsonl_text, with_skipped, write_selection_jsonl


def selection_to_jsonl(selection, pool: InstructionPool, path: str | os.PathLike) -> Path:
    """The selected records of ``selection``, unchanged, best first (atomic write). Refuses another pool.

    ``selection.indices`` refer to the loaded (kept) examples of ``pool``; what is written is
    ``pool.records[i]``, the original record as read (with its stable ``id`` when it has one),
    so a record skipped as bad on loading never shifts which records are written."""
    if pool.fingerprint != selection.pool_fingerprint:
        raise ValueError(f"{path}: this selection was made on pool {selection.pool_fingerprint[:12]}..., "
                         f"not on {pool.source} ({pool.fingerprint[:12]}...)")
    return write_selection_jsonl(pool, selection.indices, path)


def write_selection(selection, pool: InstructionPool, out: str | os.PathLike,
                    inputs: Sequence = ()) -> dict[str, Path]:
    """``out`` (selected records), ``out``.scores.npy (when scored) and ``out``.meta.json, as
    one commit (`jraise.atomic.atomic_write_group`): all three are written to temporary files
    first, so a failed write (a full disk) leaves any earlier selection at ``out`` whole; then
    the scores and the meta file are renamed into place and the records file last, the commit
    marker. The meta file records the sha256 of the records and scores files (``"files"``);
    `read_selection` treats a set whose files disagree with it as absent. An earlier
    ``.scores.npy`` is removed when this selection has no scores.

    The selected records are the original records of the file (see `selection_to_jsonl`), while
    the indices in the meta file and the scores' positions refer to the loaded (kept) examples.
    When bad records were skipped loading ``pool`` or ``inputs`` (other pools the selection
    used, e.g. the validation set), the meta file has them under ``"skipped"`` (count, per
    file, per reason, and the problems with file, line, field and reason; see
    `jraise.data.pool.skipped_summary`)."""
    out = Path(out)
    if pool.fingerprint != selection.pool_fingerprint:
        raise ValueError(f"{out}: this selection was made on pool {selection.pool_fingerprint[:12]}..., "
                         f"not on {pool.source} ({pool.fingerprint[:12]}...)")
    paths = selection_paths(out)
    records = selection_jsonl_text(pool, selection.indices).encode("utf-8")
    scores = _npy_bytes(selection.scores) if selection.scores is not None else None
    files = {"records": {"name": out.name, "sha256": _sha256(records)},
             "scores": None if scores is None else {"name": paths["scores"].name, "sha256": _sha256(scores)}}
    meta = {**with_skipped(selection.metadata(), pool, *inputs), "files": files}
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
