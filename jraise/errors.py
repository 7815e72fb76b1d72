"""The errors a user can act on, and how the command line tells them apart from bugs.

`JraiseError` is the base of jraise's own expected failures: bad input files, bad records, bad
model directories, failed downloads, stale caches. It carries where the problem is (`path`,
`record`: a line or index, `field`) so a message can name them.

`is_expected(err)` decides what the CLI reports as a short message with exit status 2 and what it
reports as a bug (traceback, exit status 1):

* a `JraiseError`, a file-system error (missing file, a directory where a file belongs, no
  permission), or a `UnicodeDecodeError` is expected;
* a `ValueError` (or `KeyError`, `TypeError`) is expected only when jraise's own code raised it,
  i.e. the innermost frame of its traceback lies in the ``jraise`` package: those are the library's
  argument and input checks, written for the user to read. The same exception raised inside JAX,
  NumPy or any other dependency is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_CHECK_TYPES = (ValueError, KeyError, TypeError)


class JraiseError(Exception):
    """An expected failure, naming the file, record and field where known."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, record: str | int | None = None,
                 field: str | None = None):
        super().__init__(message)
        self.path, self.record, self.field = path, record, field


def _raised_in_jraise(err: BaseException) -> bool:
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    try:
        return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)
    except OSError:
        return False


def is_expected(err: BaseException) -> bool:
    """True for a failure the user caused and can fix (see the module docstring)."""
    if isinstance(err, (JraiseError, OSError, UnicodeDecodeError)):
        return True
    return isinstance(err, _CHECK_TYPES) and _raised_in_jraise(err)


def short_message(err: BaseException, max_lines: int = 4) -> str:
    """``error: <message>`` in at most `max_lines` lines (longer messages are cut with '...')."""
    if isinstance(err, UnicodeDecodeError):
        text = f"invalid UTF-8 at byte {err.start}: {err.reason}"
    elif isinstance(err, KeyError) and len(err.args) == 1:
        text = str(err.args[0])
    else:
        text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{err.filename}: {err.strerror or text}"
    lines = text.strip().splitlines() or [type(err).__name__]
    lines[0] = f"error: {lines[0]}"
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + ["..."]
    return "\n".join(lines)
