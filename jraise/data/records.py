"""Instruction-data records as the loaders see them: where each came from, what was wrong with a
bad one, and what validating and tokenising make of a good one.

The types every record format shares, below the readers and renderers that produce them
(`jraise.data.formats` for the chat template, `jraise.data.less_tulu` for LESS's own rendering):

* where: `Location` (file and line, or record index), `SourceRecord` (a record as stored);
* what was wrong: `RecordError` with a reason from `REASONS`; `ProblemLog` raises each one, or
  with ``skip_bad`` counts it into a `LoadReport` (counts by reason, the first
  `MAX_REPORTED_PROBLEMS` problems, copies loaded or dropped);
* a validated record: `ParsedRecord` (id, shape, category, one `Conversation` per side, each a
  tuple of `Message` (role, content) pairs);
* a tokenised record: `EncodedRecord`, one `Encoded` (token ids, loss mask, cuttable positions)
  per side.

Field-value helpers shared by the validators: `is_absent` (null or NaN), `type_name`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from jraise.errors import JraiseError

REASONS = (
    "malformed-json",  # a JSON line that does not parse
    "not-an-object",  # a record that is not a JSON object
    "missing-field",  # a required field is absent or null
    "wrong-type",  # a field has the wrong type
    "empty-prompt",  # instruction / prompt text is empty
    "empty-response",  # a response / assistant turn is empty or whitespace only
    "bad-messages",  # a message list with no assistant reply at its end
    "wrong-shape",  # e.g. a preference pair given to the instruction loader
    "template-error",  # the chat template failed or rewrote earlier turns
    "over-long",  # longer than max_len tokens (after any allowed truncation)
    "duplicate-id",  # an explicit id already used by a record of other content or category
    "invalid-utf8",  # a JSON line that is not valid UTF-8
    "identical-pair",  # a preference pair whose chosen and rejected replies are the same
)
MAX_REPORTED_PROBLEMS = 5  # how many problems a LoadReport keeps verbatim
COPY_MARK = "~"  # a copy's id is <base id>~<k>, k >= 2 (see "Ids" in `jraise.data.formats`)


# ----------------------------------------------------------------------------------------------
# Where a record came from, what was wrong with it


@dataclass(frozen=True)
class Location:
    """Where a record came from: ``line`` (1-based) for JSON lines, else ``index`` (0-based)."""

    file: str
    index: int
    line: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.file}: line {self.line}"
        return f"{self.file}: record index {self.index}"


class RecordError(JraiseError, ValueError):
    """A record that cannot be used; the message names file, record, field and reason."""

    def __init__(self, location: Location, field: str | None, reason: str, detail: str):
        assert reason in REASONS, reason
        where = f"{location}: field {field!r}" if field else str(location)
        record = location.line if location.line is not None else location.index
        super().__init__(f"{where}: {reason}: {detail}", path=location.file, record=record, field=field)
        self.location, self.reason, self.detail = location, reason, detail


@dataclass(frozen=True)
class Problem:
    """One skipped record, as kept in a `LoadReport`."""

    file: str
    line: int | None
    index: int
    field: str | None
    reason: str
    message: str

    @classmethod
    def from_error(cls, err: RecordError) -> Problem:
        loc = err.location
        return cls(loc.file, loc.line, loc.index, err.field, err.reason, str(err))


@dataclass(frozen=True)
class LoadReport:
    """What loading did: records read and kept, examples truncated, skipped records by reason,
    exact copies loaded as distinct examples (``n_copies``) or dropped by ``dedupe`` (``n_deduped``).

    ``first_copy`` names the first copy and its original (``"line 7 copies line 2"``), or None."""

    source: str
    n_read: int
    n_kept: int
    n_truncated: int
    skipped: Mapping[str, int]  # reason -> count (read-only)
    problems: tuple[Problem, ...]  # the first MAX_REPORTED_PROBLEMS skipped records
    n_copies: int = 0
    n_deduped: int = 0
    first_copy: str | None = None

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        text = f"{self.source}: kept {self.n_kept} of {self.n_read} records"
        if self.n_truncated:
            text += f", {self.n_truncated} truncated"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items()))
        if self.n_copies:
            text += f"; {_copies(self.n_copies)} kept as distinct examples"
        if self.n_deduped:
            text += f"; {_copies(self.n_deduped)} dropped (dedupe)"
        return text

    def duplicates_line(self) -> str | None:
        """One line saying how many exact copies were loaded or dropped, or None when there were none."""
        if self.n_copies:
            return (f"{self.source}: {_copies(self.n_copies)} of earlier records ({self.first_copy}) loaded as "
                    f"distinct examples with ids <id>{COPY_MARK}2, {COPY_MARK}3, ...; --dedupe keeps the first "
                    "copy only")
        if self.n_deduped:
            return f"{self.source}: dropped {_copies(self.n_deduped)} of earlier records ({self.first_copy}; --dedupe)"
        return None


def _copies(n: int) -> str:
    return f"{n} exact {'copy' if n == 1 else 'copies'}"


class ProblemLog:
    """Raises each `RecordError`, or with ``skip_bad`` counts it for the report."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.counts: Counter[str] = Counter()
        self.problems: list[Problem] = []

    def reject(self, err: RecordError) -> None:
        if not self.skip_bad:
            raise err
        self.counts[err.reason] += 1
        if len(self.problems) < MAX_REPORTED_PROBLEMS:
            self.problems.append(Problem.from_error(err))

    def report(self, source: str, n_read: int, n_kept: int, n_truncated: int, n_copies: int = 0,
               n_deduped: int = 0, first_copy: str | None = None) -> LoadReport:
        """The `LoadReport` of a load: the counts given, and the skipped records logged here."""
        skipped = MappingProxyType(dict(sorted(self.counts.items())))
        return LoadReport(source, n_read, n_kept, n_truncated, skipped, tuple(self.problems), n_copies, n_deduped,
                          first_copy)


@dataclass(frozen=True)
class SourceRecord:
    """One record as stored, with where it came from."""

    location: Location
    record: dict


# ----------------------------------------------------------------------------------------------
# Validated and tokenised records


Message = tuple[str, str]  # (role, content)


@dataclass(frozen=True)
class Conversation:
    """Messages to render. Assistant turns at positions >= ``n_context`` are trained.

    ``prompt_field`` / ``response_field`` are the record fields an over-long error names.
    """

    messages: tuple[Message, ...]
    n_context: int
    prompt_field: str
    response_field: str


@dataclass(frozen=True)
class ParsedRecord:
    """A validated record: its id, category, shape and conversations (one, or chosen+rejected).

    ``content_sha256`` is the hex sha256 of its canonical content fields (see "Ids" in
    `jraise.data.formats`); ``id`` is the base id until `jraise.data.formats.resolve_duplicates`
    gives a later record with the same base id its copy id."""

    source: SourceRecord
    id: str
    shape: str
    category: str | None
    conversations: tuple[Conversation, ...]
    content_sha256: str = ""

    @property
    def has_explicit_id(self) -> bool:
        value = self.source.record.get("id")
        return not (is_absent(value) or value == "")


def type_name(value) -> str:
    """A value's JSON-ish type name for messages: 'null' for None, else the Python type's name."""
    return "null" if value is None else type(value).__name__


def is_absent(value) -> bool:
    """Null, or a float NaN (how pandas-built parquet files store a missing string)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


@dataclass(frozen=True)
class Encoded:
    """One conversation's token ids (int32), loss mask (bool) and truncatable token positions."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    cuttable: np.ndarray  # positions (ascending) of tokens inside the first user turn's content


@dataclass(frozen=True)
class EncodedRecord:
    """A record ready for a pool: id, category, original record and one Encoded per side."""

    id: str
    category: str | None
    record: dict
    location: Location
    sides: tuple[Encoded, ...]
    truncated: bool


# Joins instruction and input into one user message (Alpaca convention).
PROMPT_SEPARATOR = "\n\n"


def user_prompt(instruction: str, input_text: str = "") -> str:
    """Instruction and input as one user message: joined by a blank line; input omitted if empty."""
    return f"{instruction}{PROMPT_SEPARATOR}{input_text}" if input_text else instruction
