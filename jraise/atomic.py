"""Atomic file writes: a reader sees the old file or the whole new one, never half of one.

The data goes to a uniquely named hidden file beside the destination (same directory, so
`os.replace` is an atomic rename), is flushed to disk, then renamed into place. Opened with mode
"x" rather than `mkstemp`, so the file gets the usual umask permissions (mkstemp's are 0600). On
any failure the temporary file is removed and the error propagates; an older file stays intact.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path


def temp_sibling(path: str | os.PathLike) -> Path:
    """A fresh hidden name next to `path`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` atomically (parent directories are created). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text with "\\n" line ends, written atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """One JSON object per line (non-ASCII kept as is), written atomically."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def atomic_write_group(files: Sequence[tuple[str | os.PathLike, bytes | None]]) -> list[Path]:
    """Writes several files as one commit, in three phases:

    1. every file's bytes go to a temporary sibling and are flushed to disk; if any write fails
       (a full disk), every temporary file is removed and the error propagates, so nothing new is
       visible and the files already there are untouched;
    2. the temporaries are renamed into place in the given order; an entry whose bytes are None
       is an existing file to remove at its turn (a file the new set no longer has);
    3. nothing else: the last entry is the commit marker, so list the files that describe it
       first and the file readers look for last.

    A crash during phase 2 (renames do not fail for lack of space) can leave some files new and
    some old; a reader detects that by a checksum of the other files recorded in one of them
    (see `jraise.data.selections.read_selection`). Returns the paths written, in order."""
    pending: list[tuple[Path, Path | None]] = []
    try:
        for path, data in files:
            path = Path(path)
            if data is None:
                pending.append((path, None))
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_sibling(path)
            pending.append((path, tmp))
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        for _, tmp in pending:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        raise
    written = []
    try:
        for path, tmp in pending:
            if tmp is None:
                path.unlink(missing_ok=True)
            else:
                os.replace(tmp, path)
                written.append(path)
    finally:  # interrupted: no temporary file is left behind
        for _, tmp in pending:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
    return written
