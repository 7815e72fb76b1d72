"""Order files: the pool examples a training run visits, in order (`jraise train --order FILE`).

Format (``jraise-order`` version 1), UTF-8 JSON lines written by `write_order`
(``jraise curriculum`` writes it)::

    {"format": "jraise-order", "version": 1, "pool_ids_sha256": "<hex>", "pool_size": 60, "n": 180}
    {"index": 17, "id": "a1b2c3d4e5f60718"}
    {"index": 3, "id": "item 3"}
    ...

The header is line 1; then one line per step of the order, ``n`` of them, with no blank lines.
Every entry names its example twice, by position in the pool (``index``, 0-based) and by id
(``id``, the pool's id, JSON-escaped, so spaces, newlines and any other character survive).
``pool_ids_sha256`` is `pool_ids_fingerprint` of the pool's ids in pool order; it depends only on
the ids, since an order does not depend on the tokenizer or ``max_len`` (which the pool's own
``fingerprint`` includes).

`read_order` checks, and names the file, the line and the field of the first problem: the header;
that the pool loaded now has the same ids in the same order as the pool the order was written for
(else both fingerprints and sizes are named: a pool loaded with other ``--skip-bad`` or
``--dedupe`` choices, or an edited file, has other ids or positions); that every index is in range
and that the pool's example at that index has that id; that there are ``n`` entries.

Older order files are still read when what they say is unambiguous: a JSON list (JSON numbers are
indices, strings are ids or decimal indices) or one entry per line (each line, without its line
break, is an id or a decimal index; a file whose first line starts with ``{`` is read as
``jraise-order``, one whose text starts with ``[`` as a JSON list). An entry that is exactly an id
names that example; one that matches an id only when spaces at the ends are ignored names it when
nothing else could be meant. An entry is refused when it could name two examples (the id of one
and the index of another; not an id, but an id up to spaces, and an index or another such id) or
none; a one-per-line file is refused outright for a pool whose ids hold line breaks. Such files
carry no fingerprint, so no other check is possible.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jraise.atomic import atomic_write_text
from jraise.errors import JraiseError

ORDER_FORMAT = "jraise-order"
ORDER_VERSION = 1
_HEADER_KEYS = ("format", "version", "pool_ids_sha256", "pool_size", "n")
_ENTRY_KEYS = ("index", "id")

__all__ = ["ORDER_FORMAT", "ORDER_VERSION", "OrderFileError", "order_text", "pool_ids_fingerprint", "read_order",
           "write_order"]


class OrderFileError(JraiseError, ValueError):
    """An order file that cannot be used with the pool; the message names file, line and field."""


def _error(path: Path, line: int | None, field: str | None, detail: str) -> OrderFileError:
    where = str(path) + (f": line {line}" if line is not None else "") + (f": field {field!r}" if field else "")
    return OrderFileError(f"{where}: {detail}", path=path, record=line, field=field)


def pool_ids_fingerprint(ids: Sequence[str]) -> str:
    """Hex sha256 over the ids in order (each UTF-8, length-prefixed), with a format tag."""
    digest = hashlib.sha256(f"{ORDER_FORMAT}/ids/{ORDER_VERSION}".encode())
    for item in ids:
        data = str(item).encode("utf-8")
        digest.update(struct.pack("<Q", len(data)))
        digest.update(data)
    return digest.hexdigest()


def _pool_ids(pool) -> tuple[str, ...]:
    return tuple(pool.ids) if hasattr(pool, "ids") else tuple(pool)


def order_text(ids: Sequence[str], indices: Sequence[int]) -> str:
    """The ``jraise-order`` file text of the order ``indices`` (positions in a pool whose ids are ``ids``)."""
    ids = tuple(str(i) for i in ids)
    order = [int(i) for i in indices]
    bad = [i for i in order if not 0 <= i < len(ids)]
    if bad:
        raise ValueError(f"order indices out of range for a pool of {len(ids)}: {bad[:5]}")
    header = {"format": ORDER_FORMAT, "version": ORDER_VERSION, "pool_ids_sha256": pool_ids_fingerprint(ids),
              "pool_size": len(ids), "n": len(order)}
    lines = [json.dumps(header)]
    lines += [json.dumps({"index": i, "id": ids[i]}, ensure_ascii=False) for i in order]
    return "\n".join(lines) + "\n"


def write_order(path: str | os.PathLike, ids: Sequence[str], indices: Sequence[int]) -> Path:
    """Writes the order ``indices`` atomically as a ``jraise-order`` file (`order_text`). Returns the path."""
    return atomic_write_text(path, order_text(ids, indices))


def read_order(path: str | os.PathLike, pool) -> np.ndarray:
    """The order in an order file as int64 pool indices, checked against ``pool`` (an object with
    ``ids``, e.g. an `InstructionPool`, or the sequence of ids itself); see the module docstring."""
    path = Path(path)
    ids = _pool_ids(pool)
    source = getattr(pool, "source", None)
    text = _decode(path, path.read_bytes())
    lines = text.split("\n")
    first = lines[0].strip()
    if first.startswith("{"):
        header = _json(path, 1, first)
        if isinstance(header, dict) and "format" in header:
            return _read_v1(path, lines, header, ids, source)
        raise _error(path, 1, "format", f"not a {ORDER_FORMAT} file: the first line is a JSON object without "
                                        f"'format': {ORDER_FORMAT!r}")
    if text.lstrip().startswith("["):
        entries = _json(path, None, text)
        if not isinstance(entries, list):
            raise _error(path, None, None, "not a JSON list of order entries")
        order = [_legacy_json_entry(path, k, entry, ids) for k, entry in enumerate(entries, 1)]
    else:
        order = _legacy_lines(path, lines, ids)
    if not order:
        raise _error(path, None, None, "the order file has no entries")
    return np.asarray(order, np.int64)


def _decode(path: Path, data: bytes) -> str:
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise _error(path, line, None, f"invalid UTF-8 at byte offset {err.start} ({err.reason}); an order "
                                       "file is UTF-8 text") from err


def _json(path: Path, line: int | None, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = line if line is not None else err.lineno
        raise _error(path, where, None, f"malformed JSON: {err.msg} (column {err.colno})") from err


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_v1(path: Path, lines: list[str], header: dict, ids: tuple[str, ...], source: str | None) -> np.ndarray:
    if header.get("format") != ORDER_FORMAT:
        raise _error(path, 1, "format", f"{header.get('format')!r} is not {ORDER_FORMAT!r}")
    if header.get("version") != ORDER_VERSION:
        raise _error(path, 1, "version", f"version {header.get('version')!r} is not supported (this jraise reads "
                                         f"version {ORDER_VERSION})")
    for key in _HEADER_KEYS[2:]:
        value = header.get(key)
        if not (isinstance(value, str) if key == "pool_ids_sha256" else _int(value) and value >= 0):
            raise _error(path, 1, key, f"missing or invalid ({value!r})")
    unknown = sorted(set(header) - set(_HEADER_KEYS))
    if unknown:
        raise _error(path, 1, unknown[0], "unknown header field")
    fingerprint = pool_ids_fingerprint(ids)
    if header["pool_ids_sha256"] != fingerprint or header["pool_size"] != len(ids):
        pool_name = f"the pool {source}" if source else "the pool"
        raise _error(path, 1, "pool_ids_sha256",
                     f"written for another pool (ids sha256 {header['pool_ids_sha256'][:16]}..., "
                     f"{header['pool_size']} examples) than {pool_name} (ids sha256 {fingerprint[:16]}..., "
                     f"{len(ids)} examples); write the order again for this pool (with the same --skip-bad and "
                     "--dedupe choices)")
    body = lines[1:]
    if body and body[-1] == "":
        body = body[:-1]  # the final line break
    order = []
    for number, text in enumerate(body, start=2):
        entry = _json(path, number, text) if text.strip() else None
        if not isinstance(entry, dict):
            raise _error(path, number, None, "expected an entry {\"index\": i, \"id\": ...}" +
                         (" (a blank line)" if entry is None else ""))
        for key in _ENTRY_KEYS:
            if key not in entry:
                raise _error(path, number, key, "missing")
        unknown = sorted(set(entry) - set(_ENTRY_KEYS))
        if unknown:
            raise _error(path, number, unknown[0], "unknown entry field")
        index, pid = entry["index"], entry["id"]
        if not _int(index) or not 0 <= index < len(ids):
            raise _error(path, number, "index", f"{index!r} is not an index of the pool (0 to {len(ids) - 1})")
        if pid != ids[index]:
            raise _error(path, number, "id", f"{pid!r} is not the id of pool example {index} ({ids[index]!r})")
        order.append(index)
    if len(order) != header["n"]:
        raise _error(path, 1, "n", f"the header says {header['n']} entries, the file has {len(order)}")
    if not order:
        raise _error(path, None, None, "the order file has no entries")
    return np.asarray(order, np.int64)


def _decimal_index(text: str, n: int) -> int | None:
    """``int(text)`` when text is a plain decimal index below n ("7", not "07", " 7" or "+7")."""
    if text.isascii() and text.isdigit() and str(int(text)) == text and int(text) < n:
        return int(text)
    return None


class _Resolver:
    """Maps a legacy entry to one pool index, or says why it cannot."""

    def __init__(self, ids: tuple[str, ...]):
        self.ids = ids
        self.position = {pid: i for i, pid in enumerate(ids)}
        self.by_stripped: dict[str, list[int]] = {}
        for i, pid in enumerate(ids):
            self.by_stripped.setdefault(pid.strip(), []).append(i)

    def resolve(self, text: str, index: int | None) -> int | str:
        """The index that ``text`` (read as an id, or as the index ``index`` when not None) names,
        or why it names none or more than one."""
        by_id = self.position.get(text)
        if by_id is not None:
            if index is not None and index != by_id:
                return (f"{text!r} is the id of example {by_id} and the index of example {index} "
                        f"(id {self.ids[index]!r}): ambiguous")
            return by_id
        near = [i for i in self.by_stripped.get(text.strip(), []) if i != index]
        if near and (index is not None or len(near) > 1):
            return (f"{text!r} is not an id of the pool, but differs only in spaces from the id of example "
                    f"{near[0]} ({self.ids[near[0]]!r}): ambiguous")
        if near:
            return near[0]
        if index is not None:
            return index
        return f"{text!r} is neither an id of the pool nor an index below {len(self.ids)}"


def _legacy_json_entry(path: Path, k: int, entry, ids: tuple[str, ...]) -> int:
    resolver = _Resolver(ids)
    if _int(entry):
        if not 0 <= entry < len(ids):
            raise _error(path, None, f"[{k - 1}]", f"{entry} is not an index of the pool (0 to {len(ids) - 1})")
        found = resolver.resolve(str(entry), entry)
    elif isinstance(entry, str):
        found = resolver.resolve(entry, _decimal_index(entry, len(ids)))
    else:
        found = f"expected a pool index (number) or id (string), got {json.dumps(entry)}"
    if isinstance(found, str):
        raise _error(path, None, f"[{k - 1}]", found)
    return found


def _legacy_lines(path: Path, lines: list[str], ids: tuple[str, ...]) -> list[int]:
    broken = next((i for i, pid in enumerate(ids) if "\n" in pid or "\r" in pid), None)
    if broken is not None:
        raise _error(path, None, None, f"a one-entry-per-line order file cannot name the pool's examples: the id "
                                       f"of example {broken} ({ids[broken]!r}) holds a line break; write the "
                                       f"order as a {ORDER_FORMAT} file (jraise curriculum does)")
    resolver = _Resolver(ids)
    order = []
    for number, text in enumerate(lines, start=1):
        text = text.removesuffix("\r")
        if text == "":
            continue
        found = resolver.resolve(text, _decimal_index(text, len(ids)))
        if isinstance(found, str):
            raise _error(path, number, None, found)
        order.append(found)
    return order
