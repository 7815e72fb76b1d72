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
from collections.abc import Iterable
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
