"""One process at a time in a run or work directory: a lock file naming its holder.

`directory_lock(dir)` creates ``dir/.jraise.lock`` with ``O_CREAT | O_EXCL`` (so exactly one of
several contenders creates it) holding the holder's pid, host name, start time and a random
nonce, and removes it when the ``with`` block ends, by an exception too. A second process that
finds the lock held raises `DirectoryLocked` naming the holder (pid, host, since); the CLI prints
it and exits 2.

Stale locks. A lock whose holder is gone is taken over: on the holder's own host, a pid that no
longer runs (``os.kill(pid, 0)`` fails, or the process is a zombie, or the pid now belongs to a
process started after the lock was taken) marks it stale; a lock file that is still unreadable a
minute after it was created (its writer died between creating and filling it) is stale too. A
lock held on another host is never judged stale (its pid means nothing here): the message says
to remove the file by hand if that process is gone. Taking over happens under an exclusive
`fcntl.flock` on ``dir/.jraise.lock.break`` (only processes of one host ever break a lock, and
the kernel releases a flock when its process dies): the breaker re-reads the lock, removes it
only if it is still the very file judged stale (same inode and content), and then contends for a
fresh lock with ``O_EXCL`` like everyone else. A live lock is never removed, so two contenders
cannot both win.

Within one process the lock is re-entrant (a function holding it may call another that takes
it); it is released when the outermost holder exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from jraise.errors import JraiseError

LOCK_NAME = ".jraise.lock"
BREAK_SUFFIX = ".break"
UNREADABLE_GRACE_S = 60.0  # an unreadable lock file younger than this is being written
_REUSE_MARGIN_S = 1.0  # clock-tick rounding of /proc start times

_held: dict[Path, tuple[int, str]] = {}  # this process's locks: path -> (nesting depth, nonce)


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: process id, host name, when it took the lock (Unix time) and a nonce
    that tells two lock files of the same process apart."""

    pid: int
    host: str
    since: float
    nonce: str

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"process {self.pid} on host {self.host} since {when}"

    def to_json(self) -> str:
        return json.dumps({"pid": self.pid, "host": self.host, "since": self.since, "nonce": self.nonce}) + "\n"


class DirectoryLocked(JraiseError):
    """Another process holds the directory's lock."""

    def __init__(self, directory: Path, lock: Path, holder: Holder | None):
        who = holder.describe() if holder is not None else "a process that is still writing the lock file"
        super().__init__(f"{directory} is in use by {who}; wait for it to finish. If that process is gone, "
                         f"remove {lock}", path=directory)
        self.holder = holder


def this_host() -> str:
    return socket.gethostname()


def parse_holder(text: str) -> Holder | None:
    """The holder recorded in a lock file's text, or None when the text is not a complete record."""
    try:
        data = json.loads(text)
        return Holder(int(data["pid"]), str(data["host"]), float(data["since"]), str(data["nonce"]))
    except (ValueError, KeyError, TypeError):
        return None


def _process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (Unix time), from /proc on Linux; None elsewhere or when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime, in clock ticks after boot
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def process_alive(pid: int, since: float | None = None) -> bool:
    """Whether ``pid`` runs on this host (and, given ``since``, is the process that was running
    then: a pid reused by a process started later does not count)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    if _is_zombie(pid):
        return False
    if since is not None:
        started = _process_start_time(pid)
        if started is not None and started > since + _REUSE_MARGIN_S:
            return False
    return True


def _read(lock: Path) -> tuple[os.stat_result, str] | None:
    """(stat, text) of the lock file, or None when there is none."""
    try:
        with open(lock, encoding="utf-8", errors="replace") as fh:
            return os.fstat(fh.fileno()), fh.read()
    except FileNotFoundError:
        return None


def is_stale(holder: Holder | None, stat: os.stat_result, host: str, now: float) -> bool:
    """A lock (its holder, or None when unreadable) that no live process holds (module docstring)."""
    if holder is None:
        return now - stat.st_mtime > UNREADABLE_GRACE_S
    return holder.host == host and not process_alive(holder.pid, holder.since)


def _create(lock: Path, holder: Holder) -> bool:
    """Creates the lock file holding ``holder``; False when it exists already."""
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, holder.to_json().encode("utf-8"))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        lock.unlink(missing_ok=True)
        raise
    os.close(fd)
    return True


def _break_stale(lock: Path, seen: tuple[os.stat_result, str]) -> None:
    """Removes ``lock`` if it is still the file ``seen`` (judged stale), under the break flock."""
    import fcntl

    fd = os.open(str(lock) + BREAK_SUFFIX, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        now = _read(lock)
        if now is not None and (now[0].st_ino, now[0].st_dev, now[1]) == (seen[0].st_ino, seen[0].st_dev, seen[1]):
            lock.unlink()
    finally:
        os.close(fd)  # releases the flock


def acquire(directory: str | os.PathLike, attempts: int = 5) -> Path:
    """Takes ``directory``'s lock (creating the directory) and returns the lock file's path;
    raises `DirectoryLocked` when a live process holds it. Pair with `release`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = (directory / LOCK_NAME).resolve()
    if lock in _held:
        depth, nonce = _held[lock]
        _held[lock] = (depth + 1, nonce)
        return lock
    host = this_host()
    mine = Holder(os.getpid(), host, time.time(), secrets.token_hex(8))
    for _ in range(attempts):
        if _create(lock, mine):
            _held[lock] = (1, mine.nonce)
            return lock
        seen = _read(lock)
        if seen is None:
            continue  # released meanwhile: try again
        holder = parse_holder(seen[1])
        if not is_stale(holder, seen[0], host, time.time()):
            raise DirectoryLocked(directory, lock, holder)
        _break_stale(lock, seen)
    seen = _read(lock)
    raise DirectoryLocked(directory, lock, parse_holder(seen[1]) if seen else None)


def release(lock: Path) -> None:
    """Drops one level of this process's hold on ``lock``; the outermost removes the file (only
    if it is still this process's own lock file)."""
    depth, nonce = _held.get(lock, (0, None))
    if depth > 1:
        _held[lock] = (depth - 1, nonce)
        return
    _held.pop(lock, None)
    seen = _read(lock)
    holder = parse_holder(seen[1]) if seen else None
    if holder is not None and holder.nonce == nonce:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike) -> Iterator[Path]:
    """``with directory_lock(run_dir):`` holds ``run_dir``'s lock for the block (see the module
    docstring); yields the lock file's path. A directory it had to create is removed again when
    the block leaves it empty (a command that failed before writing anything)."""
    created = not Path(directory).exists()
    lock = acquire(directory)
    try:
        yield lock
    finally:
        release(lock)
        if created and lock not in _held:  # nothing was written: leave no empty directory behind
            with contextlib.suppress(OSError):
                Path(directory).rmdir()


__all__ = ["LOCK_NAME", "DirectoryLocked", "Holder", "acquire", "directory_lock", "process_alive", "release"]
