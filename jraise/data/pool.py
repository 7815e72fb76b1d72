"""Tokenised instruction pools: the candidates that data selection chooses from.

`load_pool` reads a file (see `jraise.data.formats` for formats, record shapes, the loss-mask
convention and the truncation policy) into an `InstructionPool`; `load_preference_pool` reads
prompt/chosen/rejected pairs into a `PreferencePool`. The load report (counts of kept, truncated
and skipped records) is attached to the pool as its ``report`` attribute, so a loader returns one
thing. `write_selection_jsonl` writes chosen records back, unchanged, as JSON lines.
`skipped_summary`, `with_skipped` and `skip_lines` turn the reports of pools loaded with ``skip_bad=True`` into
what a command records under ``"skipped"`` in its metadata JSON and the line it prints.

Fingerprint
-----------
``fingerprint`` is the sha256 hex digest over, in this order: a format version, the pool kind, the
tokenizer's name (last component of ``name_or_path``, so the same tokenizer in another directory
gives the same fingerprint) and vocabulary size (``len(tokenizer)``, added tokens included),
``max_len``, then per example in pool order its id, category, and for each side its token ids
(int32 little-endian) and loss mask (uint8), each length-prefixed. It depends neither on the file
format nor on the path nor on passthrough fields, so the same records read from JSONL, parquet,
CSV or a saved dataset give the same fingerprint, and any change to the trained text, masks, ids,
categories, order or truncation changes it. Use it as a cache key for per-example statistics.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from jraise.atomic import atomic_write_text
from jraise.data.formats import load_encoded
from jraise.data.records import MAX_REPORTED_PROBLEMS, EncodedRecord, LoadReport

FINGERPRINT_VERSION = 2


@dataclass(frozen=True, eq=False)
class InstructionPool:
    """Ragged tokenised examples with loss masks, in file order (bad records dropped).

    ``tokens[i]`` is int32 ``[lengths[i]]``; ``loss_masks[i]`` is bool ``[lengths[i]]`` with
    ``loss_masks[i][t]`` true when token t is response text predicted from position t-1.
    ``records[i]`` is the original record, unchanged. ``==`` is identity (arrays inside);
    compare ``fingerprint`` to know whether two pools hold the same tokenised data.
    """

    ids: tuple[str, ...]
    tokens: list[np.ndarray]
    loss_masks: list[np.ndarray]
    lengths: np.ndarray  # int32 [N]
    categories: tuple[str | None, ...]
    records: list[dict]
    source: str
    fingerprint: str
    pad_id: int
    max_len: int
    report: LoadReport | None = field(default=None, repr=False)

    def __post_init__(self):
        n = len(self.ids)
        sizes = (
            len(self.tokens),
            len(self.loss_masks),
            len(self.lengths),
            len(self.categories),
            len(self.records),
        )
        if any(size != n for size in sizes):
            raise ValueError(f"pool fields disagree on the number of examples: {n} ids vs {sizes}")

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, eq=False)
class PreferencePool:
    """Prompt/chosen/rejected pairs, each side tokenised like an `InstructionPool` example.

    ``chosen_masks`` / ``rejected_masks`` mark the reply tokens only (prompt turns are context,
    even assistant turns inside a message-list prompt). ``lengths`` (int32 [N]) is the longer
    side's length, what a batch of pairs must fit.
    """

    ids: tuple[str, ...]
    chosen_tokens: list[np.ndarray]
    chosen_masks: list[np.ndarray]
    rejected_tokens: list[np.ndarray]
    rejected_masks: list[np.ndarray]
    chosen_lengths: np.ndarray  # int32 [N]
    rejected_lengths: np.ndarray  # int32 [N]
    lengths: np.ndarray  # int32 [N], max of the two sides
    categories: tuple[str | None, ...]
    records: list[dict]
    source: str
    fingerprint: str
    pad_id: int
    max_len: int
    report: LoadReport | None = field(default=None, repr=False)

    def __post_init__(self):
        n = len(self.ids)
        fields = (
            self.chosen_tokens,
            self.chosen_masks,
            self.rejected_tokens,
            self.rejected_masks,
            self.lengths,
            self.categories,
            self.records,
        )
        if any(len(f) != n for f in fields):
            raise ValueError(f"preference pool fields disagree on the number of examples ({n} ids)")

    def __len__(self) -> int:
        return len(self.ids)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an EOS token id; load it with load_tokenizer")
    return int(pad)


def pool_fingerprint(kind: str, tokenizer, max_len: int, encoded: Sequence[EncodedRecord]) -> str:
    """sha256 hex over the vocabulary size, max_len and every example's id, category, tokens, mask.

    The tokenizer enters only through what it produced (the tokens) and its size, not through its
    name or directory: the same tokenizer loaded from a model directory or from its own gives the
    same fingerprint (version 1 also hashed the directory name)."""
    digest = hashlib.sha256()
    header = {
        "version": FINGERPRINT_VERSION,
        "kind": kind,
        "vocab_size": len(tokenizer),
        "max_len": max_len,
    }
    digest.update(json.dumps(header, sort_keys=True).encode("utf-8"))

    def put(chunk: bytes) -> None:  # length-prefixed, so field boundaries are unambiguous
        digest.update(struct.pack("<Q", len(chunk)))
        digest.update(chunk)

    for item in encoded:
        put(item.id.encode("utf-8"))
        put(b"\x00" if item.category is None else b"\x01" + item.category.encode("utf-8"))
        for side in item.sides:
            put(side.tokens.astype("<i4").tobytes())
            put(side.loss_mask.astype(np.uint8).tobytes())
    return digest.hexdigest()


def load_pool(
    path: str | os.PathLike,
    tokenizer,
    max_len: int = 512,
    skip_bad: bool = False,
    truncation: str | None = None,
    record_format: str = "chat",
    side: str = "train",
    dedupe: bool = False,
) -> InstructionPool:
    """Reads Alpaca, prompt/response and chat records into an `InstructionPool`.

    Raises `jraise.data.formats.RecordError` on the first bad record unless ``skip_bad``; the
    `LoadReport` is ``pool.report``. ``record_format``: 'chat' (the chat template, the default) or
    'less-tulu' (LESS's own rendering, `jraise.data.less_tulu`; ``side`` 'train' or 'validation'
    picks its rules for training or few-shot validation records). ``truncation``: None is the
    format's default; chat: 'error' (over-long records are bad) or 'left_prompt' (cut the first
    user turn from the left); less-tulu: 'right' (keep the first max_len tokens, as LESS) or 'error'.
    Exact copies of earlier records are distinct examples with ids ``<id>~2``, ``<id>~3``, ...
    (counted in the report); ``dedupe=True`` keeps the first copy only (`jraise.data.formats`, "Ids").
    """
    encoded, report = load_encoded(
        path, tokenizer, kind="instruction", max_len=max_len, skip_bad=skip_bad, truncation=truncation,
        record_format=record_format, side=side, dedupe=dedupe,
    )
    tokens = [item.sides[0].tokens for item in encoded]
    return InstructionPool(
        ids=tuple(item.id for item in encoded),
        tokens=tokens,
        loss_masks=[item.sides[0].loss_mask for item in encoded],
        lengths=np.array([len(t) for t in tokens], dtype=np.int32),
        categories=tuple(item.category for item in encoded),
        records=[item.record for item in encoded],
        source=str(path),
        fingerprint=pool_fingerprint("instruction", tokenizer, max_len, encoded),
        pad_id=_pad_id(tokenizer),
        max_len=max_len,
        report=report,
    )


def load_preference_pool(
    path: str | os.PathLike,
    tokenizer,
    max_len: int = 512,
    skip_bad: bool = False,
    truncation: str = "error",
    dedupe: bool = False,
) -> PreferencePool:
    """Reads prompt/chosen/rejected records into a `PreferencePool` (report as ``pool.report``);
    exact copies and ``dedupe`` as in `load_pool`."""
    encoded, report = load_encoded(
        path, tokenizer, kind="preference", max_len=max_len, skip_bad=skip_bad, truncation=truncation,
        dedupe=dedupe,
    )
    chosen = [item.sides[0] for item in encoded]
    rejected = [item.sides[1] for item in encoded]
    chosen_lengths = np.array([len(s.tokens) for s in chosen], dtype=np.int32)
    rejected_lengths = np.array([len(s.tokens) for s in rejected], dtype=np.int32)
    return PreferencePool(
        ids=tuple(item.id for item in encoded),
        chosen_tokens=[s.tokens for s in chosen],
        chosen_masks=[s.loss_mask for s in chosen],
        rejected_tokens=[s.tokens for s in rejected],
        rejected_masks=[s.loss_mask for s in rejected],
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        lengths=np.maximum(chosen_lengths, rejected_lengths),
        categories=tuple(item.category for item in encoded),
        records=[item.record for item in encoded],
        source=str(path),
        fingerprint=pool_fingerprint("preference", tokenizer, max_len, encoded),
        pad_id=_pad_id(tokenizer),
        max_len=max_len,
        report=report,
    )


def write_selection_jsonl(
    pool: InstructionPool | PreferencePool, indices: Sequence[int], path: str | os.PathLike
) -> Path:
    """Writes ``pool.records[i]`` for i in ``indices`` (in that order) as JSON lines, atomically.

    The text goes to a temporary file beside ``path`` that then replaces it, so a reader never
    sees half a file. Negative indices are refused (no Python wrap-around). Returns the path.
    ``indices`` count the loaded examples (with ``skip_bad``, the kept records, not file lines);
    what is written is each record as read, so skipped records never shift it.
    """
    return atomic_write_text(path, selection_jsonl_text(pool, indices))


def selection_jsonl_text(pool: InstructionPool | PreferencePool, indices: Sequence[int]) -> str:
    """``pool.records[i]`` for i in ``indices``, one JSON line each (what `write_selection_jsonl`
    writes). Negative or too large indices are refused (no Python wrap-around)."""
    chosen = [int(i) for i in indices]
    bad = [i for i in chosen if not 0 <= i < len(pool)]
    if bad:
        raise IndexError(f"indices out of range for a pool of {len(pool)}: {bad[:5]}")
    return "".join(json.dumps(pool.records[i], ensure_ascii=False) + "\n" for i in chosen)


def _skip_reports(pools) -> list[LoadReport]:
    reports = [getattr(pool, "report", None) for pool in pools if pool is not None]
    return [r for r in reports if r is not None and r.n_skipped]


def skipped_summary(*pools: InstructionPool | PreferencePool | None) -> dict | None:
    """The bad records skipped while loading ``pools`` (``skip_bad=True``), JSON-ready, or None
    when none was skipped (None entries and pools without a report are ignored).

    ``{"count": total, "by_file": {source: n}, "by_reason": {reason: n}, "problems": [{"file",
    "line", "index", "field", "reason", "message"}, ...]}``; ``line`` is the 1-based line of a
    JSON-lines file (else null, and ``index`` the 0-based record index); ``problems`` lists the
    first few skipped records of each file (`jraise.data.formats.MAX_REPORTED_PROBLEMS`).
    """
    reports = _skip_reports(pools)
    if not reports:
        return None
    by_reason: dict[str, int] = {}
    for report in reports:
        for reason, n in report.skipped.items():
            by_reason[reason] = by_reason.get(reason, 0) + n
    return {
        "count": sum(r.n_skipped for r in reports),
        "by_file": {r.source: r.n_skipped for r in reports},
        "by_reason": dict(sorted(by_reason.items())),
        "problems": [asdict(p) for r in reports for p in r.problems],
        "problems_listed_per_file": MAX_REPORTED_PROBLEMS,
    }


def with_skipped(record: dict, *pools: InstructionPool | PreferencePool | None) -> dict:
    """``record`` plus ``"skipped"`` (`skipped_summary`) when bad records of ``pools`` were skipped."""
    skipped = skipped_summary(*pools)
    return record if skipped is None else {**record, "skipped": skipped}


def skip_lines(*pools: InstructionPool | PreferencePool | None, where: str | os.PathLike | None = None) -> list[str]:
    """One line per pool that had records skipped on loading, e.g. ``skipped 2 bad records of
    pool.jsonl (1 malformed-json, 1 missing-field; see "skipped" in out.meta.json)``; ``where``
    names the file that records them (default: the first problem's message is quoted instead).
    Then one line per pool with exact copies of records, loaded or dropped
    (`jraise.data.formats.LoadReport.duplicates_line`)."""
    lines = []
    for report in _skip_reports(pools):
        n = report.n_skipped
        reasons = ", ".join(f"{k} {r}" for r, k in report.skipped.items())
        see = f'see "skipped" in {where}' if where is not None else f"first: {report.problems[0].message}"
        lines.append(f"skipped {n} bad record{'s' if n != 1 else ''} of {report.source} ({reasons}; {see})")
    reports = [getattr(pool, "report", None) for pool in pools if pool is not None]
    lines += [line for r in reports if r is not None and (line := r.duplicates_line())]
    return lines
