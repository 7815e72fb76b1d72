"""Instruction-data records: reading files, validating record shapes, tokenising with loss masks.

Files
-----
The format follows the file name: ``.jsonl``/``.ndjson`` (one JSON object per line), ``.json``
(a JSON array of objects; a ``.json`` file that does not start with ``[`` is read as JSON lines),
``.parquet``, ``.csv``, or a directory written by ``datasets.Dataset.save_to_disk``.

JSON and JSON-lines files are parsed record by record with the standard ``json`` module rather than
``datasets``' JSON builder, for two reasons: ``datasets`` reports neither the line of a malformed
line nor which record has a mistyped field, and it unifies the schema across rows (absent keys
come back as ``None``, nested objects gain every other row's keys), so the records could not be
written back unchanged. Parquet, CSV and saved dataset directories are columnar already and go
through ``datasets`` (``Dataset.from_parquet``, ``Dataset.from_csv``, ``datasets.load_from_disk``).
CSV cells are all read as strings with no NA guessing, so an ``id`` of ``007`` stays ``"007"`` and
an answer ``NA`` stays ``"NA"``; an empty cell is an empty string.

Text files must be UTF-8 (a leading byte-order mark is allowed). Invalid UTF-8 is reported with the
file and where it is: in a JSON-lines file it makes that line an ``invalid-utf8`` record (skippable
with ``skip_bad``, like a malformed line); in a JSON array or CSV file, whose records cannot be told
apart without decoding, it is an error for the whole file naming the line and the byte offset.

Where a problem is reported: ``<file>: line <n>`` (1-based line) for JSON lines and
``<file>: record index <i>`` (0-based row) for every other format, then the field, e.g.
``train.jsonl: line 7: field 'output': empty-response: ...``.

Record shapes
-------------
The shape is recognised per record from the fields that are present and not null, in this order:

* chat: ``messages``, a list of ``{"role", "content"}``; the last message must be the assistant's.
  Every assistant turn is trained on (multi-turn: loss on all assistant turns, nothing else).
* preference: ``prompt`` + ``chosen`` + ``rejected`` (only via ``kind="preference"``). ``prompt``
  is a string (one user turn) or a message list; ``chosen``/``rejected`` are strings (the assistant
  reply) or message lists ending in the assistant reply. A message list that repeats the prompt
  messages first (the "full conversation" style) has that repetition dropped. A pair whose two
  replies are the same after that (a string and a one-message list with the same text count as the
  same) is an ``identical-pair`` record, named by its ``rejected`` field: it has no preference.
* Alpaca: ``instruction``, optional ``input``, ``output``. The user turn is the instruction, plus
  ``"\\n\\n" + input`` when the input is not empty (the usual Alpaca convention, where the input is a
  document or an example the instruction talks about).
* prompt/response: ``prompt``, ``response``.

Optional ``category`` (string) and ``id`` (string or integer) fields are read; an empty string
counts as absent. Every other field is ignored here and kept untouched in the record. Only
``role`` and ``content`` of a message are given to the chat template.

Errors and ``skip_bad``
-----------------------
A bad record raises `RecordError` (a ``ValueError`` and a `jraise.errors.JraiseError`) naming
file, record and field, with a reason from `jraise.data.records.REASONS`. With ``skip_bad=True``
bad records are dropped instead and counted in a `LoadReport` (counts by reason plus the first
few problems with their location). These record types live in `jraise.data.records`, shared with
`jraise.data.less_tulu`. A file that cannot be read at all (an unreadable JSON array, invalid UTF-8 outside
a JSON-lines file, a missing file) raises either way.

Ids
---
A record's base id is its ``id`` field as a string when present, otherwise the first 16 hex digits
of the sha256 of the canonical JSON (sorted keys, no spaces, UTF-8) of its content fields only:
``{instruction, input ("" when absent), output}``, ``{prompt, response}``, ``{messages: [{role,
content}]}`` or ``{prompt, chosen, rejected}``. So the hash does not depend on the file format,
field order or passthrough fields.

Duplicates are data: real pools hold exact copies of records. A record is a *copy* of an earlier
one when both have the same base id, the same content fields and the same category (passthrough
fields are not compared). Every record keeps its base id the first time that id occurs; a later
record with an id already used gets ``<base id>~<k>``, k = 2, 3, ... in file order (the next
number that is no other record's id), so ids stay unique and stable, and the ids of records without
copies are exactly their base ids. Copies are loaded as distinct examples by default and counted
(`LoadReport.n_copies`, one line from `LoadReport.duplicates_line`); with ``dedupe=True`` only the
first of each set of copies is loaded (`LoadReport.n_deduped` counts the rest). Records that share
a base id without being copies are:

* without ``id`` fields (same content, different category): distinct examples, numbered as above;
* otherwise (an explicit ``id`` given to records of different content or category): an error
  naming both records (reason ``duplicate-id``; with ``skip_bad`` the later one is dropped).

An explicit ``id`` repeated on identical records is therefore a copy, like any other.

Tokenisation and the loss mask
------------------------------
Text always goes through ``tokenizer.apply_chat_template(..., tokenize=False)``; the rendered string
is then tokenised once, whole, with ``add_special_tokens=False`` (the template writes any BOS it
wants) and ``return_offsets_mapping=True``, so a fast tokenizer is required. The token ids are the
tokenizer's own tokenisation of the full text, never a concatenation of separately tokenised pieces.

Which characters are assistant text is found by rendering prefixes of the conversation: for
assistant turn k, ``render(messages[:k], add_generation_prompt=True)`` must be a prefix of
``render(messages[:k+1])``, which must be a prefix of the whole rendering (templates that rewrite
earlier turns are rejected as ``template-error``). Inside the text turn k adds, the content's
offset is found by rendering the same prefix with a sentinel in place of the content (so template
scaffolding that happens to contain the content's characters is never mistaken for it) and checked
to be verbatim. The trained character span is the content plus the tokenizer's EOS token when the
template writes it immediately after the content; trailing scaffolding (e.g. the ``"\\n\\n"`` the
default template writes after EOS) is not trained.

A token is a loss token when its first character lies in a trained span. Convention:
``loss_mask[t] == 1`` means token t is response text the model must predict from position t-1, so
``loss_mask[0]`` is always 0.

Truncation (``max_len``)
------------------------
* ``truncation="error"`` (default): a rendering longer than ``max_len`` tokens is an ``over-long``
  record: an error naming the prompt field (``input`` or ``instruction``, ``prompt``, ``messages``),
  or dropped and counted with ``skip_bad=True``. Dropping rather than cutting keeps every trained
  example exactly what the data says.
* ``truncation="left_prompt"``: tokens are cut from the left of the first user turn's content
  (the start of a long document is usually the least needed part, and the instruction's end sits
  next to the response) until the example fits, all of it if needed. When even that is not
  enough, the record is ``over-long`` naming the response field, since the response (or the rest
  of the conversation) alone does not fit. For a preference pair both sides lose the same number
  of prompt tokens, so the two prompts stay identical. Cut examples are counted in
  ``LoadReport.n_truncated``.

Record formats
--------------
Everything above is ``record_format="chat"`` (the default). ``record_format="less-tulu"`` keeps
the reading, validation and ids of this module but renders and masks as the LESS code does, with
separate rules for training and validation records (``side``) and its own truncation modes: see
`jraise.data.less_tulu`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from jraise.data import less_tulu
from jraise.data.records import (
    COPY_MARK,
    Conversation,
    Encoded,
    EncodedRecord,
    LoadReport,
    Location,
    Message,
    ParsedRecord,
    ProblemLog,
    RecordError,
    SourceRecord,
    user_prompt,
    is_absent,
    type_name,
)

TRUNCATION_MODES = ("error", "left_prompt")
KINDS = ("instruction", "preference")
# "chat": the chat template (this module); "less-tulu": LESS's own rendering (`jraise.data.less_tulu`).
RECORD_FORMATS = ("chat", "less-tulu")
SIDES = ("train", "validation")  # which rule set of a format that has two (less-tulu)
_UTF8_CHUNK = 1 << 20  # bytes per read when checking a CSV file's encoding
PROGRESS_THRESHOLD = 2000  # show a progress bar when tokenising more records than this
_TOKENISE_CHUNK = 512  # records tokenised per batched tokenizer call
# Stands in for a message's content to locate where the template puts the content.
_SENTINEL = "\u27e6jraise-content-sentinel\u27e7"


# ----------------------------------------------------------------------------------------------
# Reading files


def file_format(path: Path) -> str:
    """'jsonl', 'json', 'parquet', 'csv' or 'dataset_dir', from the path."""
    if path.is_dir():
        return "dataset_dir"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        with open(path, "rb") as fh:  # bytes: invalid UTF-8 is reported by the reader, with its line
            head = fh.read(4096).removeprefix(_BOM).lstrip()
        return "json" if head.startswith(b"[") else "jsonl"
    if suffix in (".parquet", ".csv"):
        return suffix[1:]
    raise ValueError(
        f"{path}: unknown data format {suffix!r}; expected .jsonl, .json, .parquet, .csv "
        "or a directory saved with datasets' save_to_disk"
    )


def read_records(path: str | os.PathLike, problems: ProblemLog) -> tuple[list[SourceRecord], int]:
    """All records in the file at ``path`` and how many were read (bad ones included)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: data file does not exist")
    fmt = file_format(path)
    if fmt == "jsonl":
        return _read_jsonl(path, problems)
    if fmt == "json":
        rows = _read_json_array(path)
    else:
        if fmt == "csv":
            _require_utf8(path)
        rows = _read_with_datasets(path, fmt)
    records = []
    for index, row in enumerate(rows):
        location = Location(str(path), index)
        if isinstance(row, dict):
            records.append(SourceRecord(location, row))
        else:
            problems.reject(RecordError(location, None, "not-an-object", type_name(row)))
    return records, len(rows)


_BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark, tolerated at the start of a file


def _utf8_detail(data: bytes, err: UnicodeDecodeError) -> str:
    """What is wrong, e.g. ``byte 0xff (invalid start byte)``."""
    bad = data[err.start : err.end]
    what = "byte" if len(bad) == 1 else "bytes"
    return f"{what} {' '.join(f'0x{b:02x}' for b in bad)} ({err.reason})"


def _invalid_utf8(path: Path, data: bytes, err: UnicodeDecodeError, offset: int = 0, lines_before: int = 0
                  ) -> ValueError:
    """A whole-file error naming the line and byte offset of invalid UTF-8 in ``data``, which
    starts at byte ``offset`` of the file, after ``lines_before`` line breaks."""
    line = lines_before + data.count(b"\n", 0, err.start) + 1
    return ValueError(
        f"{path}: line {line}: invalid UTF-8 at byte offset {offset + err.start}: {_utf8_detail(data, err)}; "
        "the file must be UTF-8 text"
    )


def _require_utf8(path: Path) -> None:
    """Raises a `ValueError` naming the line and byte offset of the first invalid UTF-8 in the file.

    Read in chunks, so a large file is never held whole; a character cut by a chunk boundary is
    carried over to the next chunk."""
    offset, lines, carry = 0, 0, b""
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(_UTF8_CHUNK)
            data, final = carry + chunk, not chunk
            try:
                data.decode("utf-8")
                good = len(data)
            except UnicodeDecodeError as err:
                if final or err.reason != "unexpected end of data":
                    raise _invalid_utf8(path, data, err, offset, lines) from err
                good = err.start
            lines += data.count(b"\n", 0, good)
            offset += good
            carry = data[good:]
            if final:
                return


def _read_jsonl(path: Path, problems: ProblemLog) -> tuple[list[SourceRecord], int]:
    """One record per non-blank line; a malformed line (bad JSON, invalid UTF-8) is reported with its
    1-based number. Lines end at ``\\n`` bytes."""
    records, n_read, offset = [], 0, 0
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            start, offset = offset, offset + len(raw)
            if line_no == 1 and raw.startswith(_BOM):
                raw, start = raw[len(_BOM) :], start + len(_BOM)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                location = Location(str(path), n_read, line_no)
                n_read += 1
                problems.reject(RecordError(
                    location, None, "invalid-utf8",
                    f"{_utf8_detail(raw, err)} at byte {err.start + 1} of the line (byte offset {start + err.start} "
                    "of the file); the file must be UTF-8 text"))
                continue
            if not line.strip():
                continue
            location = Location(str(path), n_read, line_no)
            n_read += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                problems.reject(
                    RecordError(location, None, "malformed-json", err.msg + f" (column {err.colno})")
                )
                continue
            if not isinstance(row, dict):
                problems.reject(RecordError(location, None, "not-an-object", type_name(row)))
                continue
            records.append(SourceRecord(location, row))
    return records, n_read


def _read_json_array(path: Path) -> list:
    """A JSON array; a syntax error or invalid UTF-8 anywhere makes the whole file unreadable."""
    data = path.read_bytes()
    start = len(_BOM) if data.startswith(_BOM) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        raise _invalid_utf8(path, data[start:], err, offset=start) from err
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: line {err.lineno}: malformed JSON: {err.msg} (column {err.colno})"
        ) from err
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON array of records, got {type_name(rows)}")
    return rows


def _read_with_datasets(path: Path, fmt: str) -> list[dict]:
    """Rows of a parquet file, CSV file or saved dataset directory, read through ``datasets``.

    Parquet and CSV are converted in a fresh temporary ``datasets`` cache and held in memory, so
    every call reads the file as it is now: the shared cache keys a file by its path and
    modification time, and served the old rows after an edit that kept the mtime.
    """
    import tempfile

    import datasets

    if fmt in ("parquet", "csv"):
        with tempfile.TemporaryDirectory(prefix="jraise-datasets-") as cache_dir:
            return _read_file_uncached(datasets, path, fmt, cache_dir)
    table = datasets.load_from_disk(str(path))  # a saved dataset is read where it is: no cache
    if isinstance(table, datasets.DatasetDict):
        if len(table) != 1:
            raise ValueError(
                f"{path}: a DatasetDict with splits {sorted(table)}; pass one split's directory"
            )
        table = next(iter(table.values()))
    return table.to_list()


def _read_file_uncached(datasets, path: Path, fmt: str, cache_dir: str) -> list[dict]:
    """Rows of a parquet or CSV file, converted by ``datasets`` in ``cache_dir`` and kept in memory."""
    if fmt == "parquet":
        return datasets.Dataset.from_parquet(str(path), cache_dir=cache_dir, keep_in_memory=True).to_list()
    with open(path, newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), None)
    if not header:
        return []
    # Every column a string column, no NA guessing: what the cell says is what we get.
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return datasets.Dataset.from_csv(str(path), features=features, keep_default_na=False, cache_dir=cache_dir,
                                     keep_in_memory=True).to_list()


# ----------------------------------------------------------------------------------------------
# Validating records


def _text(rec: dict, field: str, loc: Location, empty_reason: str | None = None) -> str:
    """A required string field; with ``empty_reason`` a blank string is an error too."""
    value = rec.get(field)
    if is_absent(value):
        raise RecordError(loc, field, "missing-field", "required field is absent or null")
    if not isinstance(value, str):
        raise RecordError(loc, field, "wrong-type", f"expected a string, got {type_name(value)}")
    if empty_reason and not value.strip():
        raise RecordError(loc, field, empty_reason, "text is empty")
    return value


def _optional_text(rec: dict, field: str, loc: Location) -> str | None:
    """An optional string field; absent, null and "" all give None."""
    value = rec.get(field)
    if is_absent(value) or value == "":
        return None
    if not isinstance(value, str):
        raise RecordError(loc, field, "wrong-type", f"expected a string or null, got {type_name(value)}")
    return value


def _messages(value, field: str, loc: Location) -> tuple[Message, ...]:
    """A list of {role, content} dicts as (role, content) pairs; assistant contents non-blank."""
    if is_absent(value):
        raise RecordError(loc, field, "missing-field", "required field is absent or null")
    if not isinstance(value, list):
        raise RecordError(loc, field, "wrong-type", f"expected a list of messages, got {type_name(value)}")
    if not value:
        raise RecordError(loc, field, "bad-messages", "the message list is empty")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RecordError(
                loc, f"{field}[{i}]", "wrong-type", f"expected an object, got {type_name(message)}"
            )
        role, content = message.get("role"), message.get("content")
        for key, item in (("role", role), ("content", content)):
            if is_absent(item):
                raise RecordError(
                    loc, f"{field}[{i}].{key}", "missing-field", "required field is absent or null"
                )
            if not isinstance(item, str):
                raise RecordError(
                    loc, f"{field}[{i}].{key}", "wrong-type", f"expected a string, got {type_name(item)}"
                )
        if role == "assistant" and not content.strip():
            raise RecordError(loc, f"{field}[{i}].content", "empty-response", "assistant text is empty")
        messages.append((role, content))
    return tuple(messages)


def _ending_in_reply(messages: tuple[Message, ...], field: str, loc: Location) -> tuple[Message, ...]:
    if messages[-1][0] != "assistant":
        raise RecordError(
            loc, field, "bad-messages", f"the last message is from {messages[-1][0]!r}, not the assistant"
        )
    return messages


def _as_json_messages(messages: Sequence[Message]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in messages]


def detect_shape(rec: dict) -> str | None:
    """'chat', 'preference', 'alpaca', 'prompt_response' or None, from the non-null fields."""

    def present(field: str) -> bool:
        return not is_absent(rec.get(field))

    if present("messages"):
        return "chat"
    if present("chosen") or present("rejected"):
        return "preference"
    if present("instruction"):
        return "alpaca"
    if present("prompt") or present("response"):
        return "prompt_response"
    return None


def _alpaca(rec: dict, loc: Location) -> tuple[dict, Conversation]:
    instruction = _text(rec, "instruction", loc, "empty-prompt")
    document = _optional_text(rec, "input", loc) or ""
    output = _text(rec, "output", loc, "empty-response")
    user = user_prompt(instruction, document)
    content = {"instruction": instruction, "input": document, "output": output}
    conv = Conversation(
        (("user", user), ("assistant", output)), 0, "input" if document else "instruction", "output"
    )
    return content, conv


def _prompt_response(rec: dict, loc: Location) -> tuple[dict, Conversation]:
    prompt = _text(rec, "prompt", loc, "empty-prompt")
    response = _text(rec, "response", loc, "empty-response")
    conv = Conversation((("user", prompt), ("assistant", response)), 0, "prompt", "response")
    return {"prompt": prompt, "response": response}, conv


def _chat(rec: dict, loc: Location) -> tuple[dict, Conversation]:
    messages = _ending_in_reply(_messages(rec.get("messages"), "messages", loc), "messages", loc)
    conv = Conversation(messages, 0, "messages", "messages")
    return {"messages": _as_json_messages(messages)}, conv


def _preference(rec: dict, loc: Location) -> tuple[dict, tuple[Conversation, Conversation]]:
    raw_prompt = rec.get("prompt")
    if isinstance(raw_prompt, list):
        prompt = _messages(raw_prompt, "prompt", loc)
        prompt_content = _as_json_messages(prompt)
    else:
        prompt_content = _text(rec, "prompt", loc, "empty-prompt")
        prompt = (("user", prompt_content),)
    content = {"prompt": prompt_content}
    conversations = []
    for side in ("chosen", "rejected"):
        raw = rec.get(side)
        if isinstance(raw, list):
            reply = _ending_in_reply(_messages(raw, side, loc), side, loc)
            content[side] = _as_json_messages(reply)
            if len(reply) > len(prompt) and reply[: len(prompt)] == prompt:
                reply = reply[len(prompt) :]  # full-conversation style: the prompt is repeated
        else:
            content[side] = _text(rec, side, loc, "empty-response")
            reply = (("assistant", content[side]),)
        conversations.append(Conversation(prompt + reply, len(prompt), "prompt", side))
    if conversations[0].messages == conversations[1].messages:
        raise RecordError(
            loc, "rejected", "identical-pair",
            "the rejected reply is the same as the chosen one (compared as the loader reads them: after "
            "dropping a repeated prompt); a preference pair needs two different replies",
        )
    return content, (conversations[0], conversations[1])


# Instruction shapes -> (canonical content for the hash id, conversation to render).
_INSTRUCTION_PARSERS = {"alpaca": _alpaca, "prompt_response": _prompt_response, "chat": _chat}


def content_sha256(content: dict) -> str:
    """Hex sha256 over the canonical JSON of ``content`` (sorted keys, no spaces, UTF-8)."""
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def content_hash_id(content: dict) -> str:
    """First 16 hex digits of sha256 over the canonical JSON of ``content``."""
    return content_sha256(content)[:16]


def _record_id(rec: dict, content: dict, loc: Location) -> str:
    value = rec.get("id")
    if is_absent(value) or value == "":
        return content_hash_id(content)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordError(loc, "id", "wrong-type", f"expected a string or integer, got {type_name(value)}")
    return str(value)


def parse_record(source: SourceRecord, kind: str = "instruction") -> ParsedRecord:
    """Validates one record for ``kind`` ('instruction' or 'preference'); raises `RecordError`."""
    rec, loc = source.record, source.location
    shape = detect_shape(rec)
    if kind == "preference":
        if shape != "preference":
            for field in ("prompt", "chosen", "rejected"):
                _require_present(rec, field, loc)
        content, conversations = _preference(rec, loc)
    else:
        if shape is None:
            _require_present(rec, "instruction", loc)
        if shape == "preference":
            raise RecordError(
                loc, "chosen", "wrong-shape", "a preference pair; load it with load_preference_pool"
            )
        content, conversation = _INSTRUCTION_PARSERS[shape](rec, loc)
        conversations = (conversation,)
    category = _optional_text(rec, "category", loc)
    return ParsedRecord(source, _record_id(rec, content, loc), shape, category, tuple(conversations),
                        content_sha256(content))


def _require_present(rec: dict, field: str, loc: Location) -> None:
    if is_absent(rec.get(field)):
        shapes = (
            "instruction+output, prompt+response, messages"
            if field == "instruction"
            else "prompt+chosen+rejected"
        )
        raise RecordError(
            loc, field, "missing-field", f"required field is absent or null (expected {shapes})"
        )


@dataclass(frozen=True)
class Duplicates:
    """Records with unique ids (`resolve_duplicates`), and how many were copies of earlier ones."""

    records: list[ParsedRecord]
    n_copies: int  # copies loaded as distinct examples, with copy ids
    n_dropped: int  # copies left out (dedupe)
    first_copy: str | None  # e.g. "line 7 copies line 2"


def _where(location: Location) -> str:
    return f"line {location.line}" if location.line is not None else f"record index {location.index}"


def resolve_duplicates(
    parsed: Sequence[ParsedRecord], problems: ProblemLog, dedupe: bool = False
) -> Duplicates:
    """Unique ids for ``parsed`` (in file order) by the rules of "Ids" in the module docstring.

    A copy (same base id, content and category as an earlier record) gets the id
    ``<base id>~<k>`` or, with ``dedupe``, is left out; records without ``id`` fields that share a
    content hash but not a category are numbered the same way; an explicit id on records that are
    not copies is a ``duplicate-id`` `RecordError` naming both (passed to ``problems``)."""
    taken = {item.id for item in parsed}
    first_with: dict[str, ParsedRecord] = {}
    loaded_keys: dict[str, set[tuple[str, str | None]]] = {}
    next_number: dict[str, int] = {}
    records: list[ParsedRecord] = []
    n_copies = n_dropped = 0
    first_copy = None
    for item in parsed:
        base, key = item.id, (item.content_sha256, item.category)
        first = first_with.get(base)
        if first is None:
            first_with[base], loaded_keys[base] = item, {key}
            records.append(item)
            continue
        is_copy = key in loaded_keys[base]
        if not is_copy and (item.has_explicit_id or first.has_explicit_id):
            what = "content" if item.content_sha256 != first.content_sha256 else "category"
            problems.reject(RecordError(
                item.source.location, "id", "duplicate-id",
                f"id {base!r} is already the id of {first.source.location}, a record with other {what}; "
                "records may share an id only when they are exact copies"))
            continue
        if is_copy and first_copy is None:
            first_copy = f"{_where(item.source.location)} copies {_where(first.source.location)}"
        if is_copy and dedupe:
            n_dropped += 1
            continue
        number = next_number.get(base, 2)
        while f"{base}{COPY_MARK}{number}" in taken:
            number += 1
        copy_id = f"{base}{COPY_MARK}{number}"
        next_number[base] = number + 1
        taken.add(copy_id)
        loaded_keys[base].add(key)
        records.append(replace(item, id=copy_id))
        n_copies += is_copy
    return Duplicates(records, n_copies, n_dropped, first_copy)


def drop_duplicate_ids(parsed: list[ParsedRecord], problems: ProblemLog) -> list[ParsedRecord]:
    """The records of `resolve_duplicates` (copies loaded, with copy ids); kept for existing callers."""
    return resolve_duplicates(parsed, problems).records


# ----------------------------------------------------------------------------------------------
# Rendering: the chat template's text and the character spans to train on


@dataclass(frozen=True)
class Rendered:
    """A conversation's full text, its trained character spans and its truncatable span."""

    text: str
    loss_spans: tuple[tuple[int, int], ...]
    cut_span: tuple[int, int] | None  # first user turn's content, cut from the left if allowed


class TemplateError(ValueError):
    """The chat template failed, or its output cannot be split into turns."""


def _render(tokenizer, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(
            _as_json_messages(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # arbitrary template code can raise anything; reported per record
        raise TemplateError(f"chat template failed: {type(err).__name__}: {err}") from err
    if not isinstance(text, str):
        raise TemplateError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
    return text


def _require_prefix(prefix: str, text: str, what: str) -> None:
    if not text.startswith(prefix):
        raise TemplateError(f"the chat template is not prefix-stable: {what}")


def _content_span(
    tokenizer, messages: Sequence[Message], k: int, full: str, assistant: bool
) -> tuple[int, int]:
    """Character span of message k's content in ``full`` (the whole conversation's text)."""
    role, content = messages[k]
    # Text before turn k's own text; transformers refuses to render an empty conversation.
    before = _render(tokenizer, messages[:k], add_generation_prompt=assistant) if k else ""
    through = _render(tokenizer, messages[: k + 1], add_generation_prompt=False)
    _require_prefix(before, through, f"rendering of messages[:{k}] is not a prefix of messages[:{k + 1}]")
    _require_prefix(through, full, f"rendering of messages[:{k + 1}] is not a prefix of the whole")
    probe = _render(tokenizer, [*messages[:k], (role, _SENTINEL)], add_generation_prompt=False)
    lead = probe.find(_SENTINEL, len(before)) - len(before) if probe.startswith(before) else -1
    segment = through[len(before) :]
    if lead < 0 or segment[lead : lead + len(content)] != content:
        raise TemplateError(
            f"messages[{k}] ({role}) content does not appear verbatim where the template puts it"
        )
    return len(before) + lead, len(before) + lead + len(content)


def render_conversation(tokenizer, conversation: Conversation, need_cut_span: bool = False) -> Rendered:
    """The chat-template text and trained spans (assistant contents + the EOS right after)."""
    messages = conversation.messages
    full = _render(tokenizer, messages, add_generation_prompt=False)
    eos = tokenizer.eos_token or ""
    spans = []
    for k in range(conversation.n_context, len(messages)):
        if messages[k][0] != "assistant":
            continue
        start, end = _content_span(tokenizer, messages, k, full, assistant=True)
        if eos and full.startswith(eos, end):
            end += len(eos)
        spans.append((start, end))
    cut_span = None
    if need_cut_span:
        first_user = next((k for k, (role, _) in enumerate(messages) if role == "user"), None)
        if first_user is not None:
            cut_span = _content_span(tokenizer, messages, first_user, full, assistant=False)
    return Rendered(full, tuple(spans), cut_span)


# ----------------------------------------------------------------------------------------------
# Tokenising and fitting into max_len


def encode_rendered(
    rendered: Rendered, token_ids: Sequence[int], offsets: Sequence[tuple[int, int]]
) -> Encoded:
    """Loss mask from offsets: a token is trained when its first character is in a trained span."""
    tokens = np.asarray(token_ids, dtype=np.int32)
    offsets_arr = np.asarray(offsets, dtype=np.int64).reshape(len(tokens), 2)
    starts, ends = offsets_arr[:, 0], offsets_arr[:, 1]
    mask = np.zeros(len(tokens), dtype=bool)
    for start, end in rendered.loss_spans:
        mask |= (starts >= start) & (starts < end)
    if len(mask):
        mask[0] = False  # nothing predicts the first token
    if rendered.cut_span is None:
        cuttable = np.zeros(0, dtype=np.int64)
    else:
        start, end = rendered.cut_span
        cuttable = np.flatnonzero((starts >= start) & (ends <= end) & (ends > starts))
    return Encoded(tokens, mask, cuttable)


class _OverLong(Exception):
    """Too long; ``side`` is the side whose response does not fit, None when the prompt is to blame."""

    def __init__(self, side: int | None, detail: str):
        super().__init__(detail)
        self.side, self.detail = side, detail


def fit_to_max_len(
    sides: Sequence[Encoded], max_len: int, truncation: str
) -> tuple[tuple[Encoded, ...], bool]:
    """The sides cut to ``max_len`` per the truncation policy, and whether anything was cut.

    All sides (chosen and rejected of a pair) lose the same number of leading prompt tokens.
    """
    longest = max(len(side.tokens) for side in sides)
    excess = longest - max_len
    if excess <= 0:
        return tuple(sides), False
    if truncation == "error":
        raise _OverLong(None, f"{longest} tokens > max_len {max_len}")
    fitted = []
    for number, side in enumerate(sides):
        if len(side.cuttable) < excess:
            raise _OverLong(
                number,
                f"{longest} tokens > max_len {max_len}; cutting the whole first user turn "
                f"({len(side.cuttable)} tokens) is not enough",
            )
        keep = np.ones(len(side.tokens), dtype=bool)
        keep[side.cuttable[:excess]] = False
        mask = side.loss_mask[keep].copy()
        if len(mask):
            mask[0] = False
        fitted.append(Encoded(side.tokens[keep], mask, np.zeros(0, dtype=np.int64)))
    return tuple(fitted), True


def _encode_chunk(
    tokenizer, chunk: list[ParsedRecord], max_len: int, truncation: str, problems: ProblemLog
) -> list[EncodedRecord]:
    need_cut = truncation == "left_prompt"
    rendered_items = []
    for item in chunk:
        try:
            rendered = [render_conversation(tokenizer, conv, need_cut) for conv in item.conversations]
        except TemplateError as err:
            problems.reject(
                RecordError(
                    item.source.location, item.conversations[0].response_field, "template-error", str(err)
                )
            )
            continue
        rendered_items.append((item, rendered))
    texts = [r.text for _, rendered in rendered_items for r in rendered]
    if not texts:
        return []
    batch = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out, pos = [], 0
    for item, rendered in rendered_items:
        sides = []
        for r in rendered:
            sides.append(encode_rendered(r, batch["input_ids"][pos], batch["offset_mapping"][pos]))
            pos += 1
        try:
            fitted, truncated = fit_to_max_len(sides, max_len, truncation)
        except _OverLong as err:
            conv = item.conversations[err.side or 0]
            field = conv.prompt_field if err.side is None else conv.response_field
            problems.reject(RecordError(item.source.location, field, "over-long", err.detail))
            continue
        if any(not side.loss_mask.any() for side in fitted):
            # Only reachable with a template that cuts the reply away; never train on nothing.
            problems.reject(
                RecordError(
                    item.source.location,
                    item.conversations[0].response_field,
                    "template-error",
                    "no response tokens",
                )
            )
            continue
        out.append(
            EncodedRecord(item.id, item.category, item.source.record, item.source.location, fitted, truncated)
        )
    return out


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def load_encoded(
    path: str | os.PathLike,
    tokenizer,
    *,
    kind: str = "instruction",
    max_len: int = 512,
    skip_bad: bool = False,
    truncation: str | None = None,
    record_format: str = "chat",
    side: str = "train",
    dedupe: bool = False,
) -> tuple[list[EncodedRecord], LoadReport]:
    """Reads, validates, gives unique ids to and tokenises every record of a file, in file order.

    ``record_format``: "chat" (the chat template) or "less-tulu" (`jraise.data.less_tulu`, where
    ``side`` "train" or "validation" picks LESS's rules; the chat format renders both alike).
    ``truncation``: None is the format's default ("error" for chat, "right" for less-tulu).
    ``dedupe``: leave out exact copies of earlier records instead of loading them as distinct
    examples (see "Ids" in the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if record_format not in RECORD_FORMATS:
        raise ValueError(f"record_format must be one of {RECORD_FORMATS}, got {record_format!r}")
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    if record_format == "chat":
        encode_chunk = _encode_chunk
        modes = TRUNCATION_MODES
    else:
        if kind != "instruction":
            raise ValueError(f"record_format {record_format!r} renders instruction records only, not {kind}")
        encode_chunk = partial(less_tulu.encode_chunk, side=side)
        modes = less_tulu.TRUNCATION_MODES
    if truncation is None:
        truncation = modes[0]
    if truncation not in modes:
        raise ValueError(f"truncation must be one of {modes} with record_format {record_format!r}, "
                         f"got {truncation!r}")
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("a fast (Rust) tokenizer is needed: loss masks come from offset mappings")
    problems = ProblemLog(skip_bad)
    sources, n_read = read_records(path, problems)
    parsed = []
    for source in sources:
        try:
            parsed.append(parse_record(source, kind))
        except RecordError as err:
            problems.reject(err)
    copies = resolve_duplicates(parsed, problems, dedupe)
    parsed = copies.records

    from tqdm.auto import tqdm

    encoded = []
    disable = None if len(parsed) > PROGRESS_THRESHOLD else True  # None: shown on a terminal only
    with tqdm(total=len(parsed), desc=f"tokenising {Path(path).name}", unit="rec", disable=disable) as bar:
        for chunk in _chunks(parsed, _TOKENISE_CHUNK):
            encoded.extend(encode_chunk(tokenizer, chunk, max_len, truncation, problems))
            bar.update(len(chunk))
    n_truncated = sum(item.truncated for item in encoded)
    return encoded, problems.report(str(path), n_read, len(encoded), n_truncated, copies.n_copies,
                                    copies.n_dropped, copies.first_copy)
