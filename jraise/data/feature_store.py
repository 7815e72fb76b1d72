"""Gradient-feature store for LESS/ROSE data selection: sharded, resumable, memory-mapped.

For one model checkpoint (and one side: the training pool or the validation set), the store
holds an N x d matrix: row k is the projected per-example gradient feature of example k,
L2-normalised and kept as float16. Features are computed chunk by chunk and written one shard
at a time, so a killed run loses at most the shard it was computing.

Layout
------
::

    <store_dir>/meta.json          written once, atomically, when the store is created
    <store_dir>/shard-00000.npy    rows [0, shard_rows)
    <store_dir>/shard-00001.npy    rows [shard_rows, 2 * shard_rows)
    ...                            the last shard may be shorter
    <store_dir>/seconds.json       {"shards": {"<i>": seconds}}: what computing each shard took
                                   (`FeatureStore.fill`), so a store filled across several runs
                                   still tells its whole cost (`FeatureStore.compute_seconds`)

Each shard is a standard ``.npy`` file (``numpy.lib.format``, C order, little-endian float16)
of shape ``[rows, dim]``; ``np.load`` reads it. ``meta.json`` holds the `StoreMeta`: the
``format_version``, ``n``, ``dim``, ``shard_rows``, ``dtype`` and a free-form JSON ``identity``
(pool fingerprint, model and checkpoint with their content fingerprints from
`jraise.model.fingerprint`, projection kind/seed/dim, side "train"/"val", options...) that says
which features these are.

Atomicity and resume
--------------------
A shard is serialised in memory, written to a hidden temporary file beside its final name,
flushed and fsynced, then renamed into place (`jraise.atomic.atomic_write_bytes`), so a file
named ``shard-XXXXX.npy`` is complete by construction and "done" means "the file exists".
`FeatureStore.fill` computes only the missing shards, in order; re-running it after a crash
continues at the first missing shard. The bytes of a shard depend only on its features (the
``.npy`` header is fixed by shape and dtype, normalisation is deterministic numpy), so with a
deterministic ``compute_fn`` a resumed run ends with files byte-identical to an uninterrupted one.
Writing a shard twice (two processes filling one store) replaces it atomically; readers see one
whole version.

Temporary files of a killed writer (``.shard-XXXXX.npy.<pid>.<hex>.tmp``) are never mistaken for
shards. Opening the store removes those whose writer process is no longer alive on this machine.
A process on another machine sharing the directory cannot be seen, so its in-flight temporary
file may be removed: its rename then fails loudly, and the shard stays missing, not corrupt.

``meta.json`` is created exclusively: a temporary file is hard-linked to the final name, which
fails if another process created it first, so two creators cannot both win. The loser's request
is then checked against the winner's metadata like any reopen. A directory that has shard files
but no ``meta.json`` is refused rather than adopted.

Identity checks
---------------
`FeatureStore.create_or_open` on an existing store compares ``n``, ``dim``, ``shard_rows``,
``dtype``, ``format_version`` and every ``identity`` key (nested dicts key by key, as dotted
names like ``identity.projection.seed``) with the request, after a JSON round trip (so tuples
equal lists). Values are compared by their JSON text, so 1 and 1.0 or 1 and true differ. Any
difference raises ValueError listing every differing field with its saved and requested value,
so features of another pool, model, checkpoint, seed or dim are never mixed in silently (a
model or checkpoint replaced at the same path differs in its fingerprint).
An identity key added after some stores were written can be given a meaning for its absence
(``absent_means``, e.g. ``{"features.projection.mode": "dense"}``): a saved identity without the
key then compares as that value, so older stores stay usable where nothing changed for them.

Normalisation
-------------
`FeatureStore.write_shard` converts features to float32, rejects NaN/inf, divides each row by its
L2 norm (computed after scaling by the row's max-abs value, so huge or tiny rows neither overflow
nor underflow), then casts to float16. A zero row has no direction and stays all zeros; its
cosine score with anything is 0. With ``normalise=False`` the values are stored as given (cast
to float16, which must not overflow); record that choice in ``identity`` if it is ever used.

Reading and scoring
-------------------
`FeatureStore.matrix` returns a `ShardedMatrix`: a read-only N x d view that memory-maps one
shard at a time (``np.load(mmap_mode="r")``) and returns float32 copies of row ranges
(`ShardedMatrix.rows`) or consecutive blocks (`ShardedMatrix.iter_blocks`), so peak memory is one
block, never N x d. `blockwise_scores` computes train x val cosine scores block by block: rows
are unit vectors, so a float32 matmul per block, in memory block_rows * (d + M) floats besides
the N x M result.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jraise.atomic import atomic_write_bytes, atomic_write_text, temp_sibling

FORMAT_VERSION = 1
STORE_KIND = "jraise.grads.FeatureStore"
META_FILE = "meta.json"
SECONDS_FILE = "seconds.json"
DTYPE = "float16"
DEFAULT_SHARD_ROWS = 4096

_SHARD_RE = re.compile(r"shard-(\d{5,})\.npy")
_TEMP_RE = re.compile(r"\.(?:meta\.json|seconds\.json|shard-\d{5,}\.npy)\.(\d+)\.[0-9a-f]+\.tmp")
_ABSENT = object()


def _canonical_identity(identity: dict) -> dict:
    """The identity as it reads back from JSON (tuples become lists, keys strings)."""
    if not isinstance(identity, dict):
        raise TypeError(f"identity must be a dict, got {type(identity).__name__}")
    try:
        return json.loads(json.dumps(identity, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"identity must be JSON-serialisable without NaN/inf: {e}") from None


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class StoreMeta:
    """What ``meta.json`` records: the matrix shape, shard size, dtype and feature identity."""

    n: int
    dim: int
    shard_rows: int
    identity: dict = field(default_factory=dict)
    dtype: str = DTYPE
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        _check_int("n", self.n, 0)
        _check_int("dim", self.dim, 1)
        _check_int("shard_rows", self.shard_rows, 1)
        for name in ("n", "dim", "shard_rows", "format_version"):
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "identity", _canonical_identity(self.identity))

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n / self.shard_rows)

    def to_dict(self) -> dict:
        return {"kind": STORE_KIND, "format_version": self.format_version, "n": self.n, "dim": self.dim,
                "shard_rows": self.shard_rows, "dtype": self.dtype, "identity": self.identity}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"

    @classmethod
    def read(cls, path: str | os.PathLike) -> StoreMeta:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(d, dict) or d.get("kind") != STORE_KIND:
                raise ValueError(f"kind is {d.get('kind') if isinstance(d, dict) else None!r}, not {STORE_KIND!r}")
            return cls(n=d["n"], dim=d["dim"], shard_rows=d["shard_rows"], identity=d["identity"],
                       dtype=d["dtype"], format_version=d["format_version"])
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{path}: not a readable feature-store meta.json ({type(e).__name__}: {e})") from None


def _json_text(value) -> str:
    return "<absent>" if value is _ABSENT else json.dumps(value, sort_keys=True)


def _diff(saved, requested, name: str, absent_means: dict | None = None) -> list[str]:
    if isinstance(saved, dict) and isinstance(requested, dict):
        out = []
        for key in sorted(set(saved) | set(requested)):
            out += _diff(saved.get(key, _ABSENT), requested.get(key, _ABSENT), f"{name}.{key}", absent_means)
        return out
    shown = _json_text(saved)
    if saved is _ABSENT and absent_means and name in absent_means:
        saved = absent_means[name]
        shown = f"<absent, meaning {_json_text(saved)}>"
    if _json_text(saved) == _json_text(requested):
        return []
    return [f"{name}: saved {shown}, requested {_json_text(requested)}"]


def meta_differences(saved: StoreMeta, requested: StoreMeta, absent_means: dict | None = None) -> list[str]:
    """One "field: saved X, requested Y" line per differing field (identity keys as dotted names).

    ``absent_means``: {dotted identity key (without the ``identity.`` prefix): value} for keys
    added after a store was written: a saved identity without the key compares as that value.
    """
    out = []
    for name in ("format_version", "dtype", "n", "dim", "shard_rows"):
        out += _diff(getattr(saved, name), getattr(requested, name), name)
    absent = {f"identity.{key}": _canonical_identity({"v": value})["v"] for key, value in (absent_means or {}).items()}
    return out + _diff(saved.identity, requested.identity, "identity", absent)


def _create_exclusive(path: Path, text: str) -> None:
    """Puts a complete file at `path` unless one is already there (then leaves it alone)."""
    tmp = temp_sibling(path)
    try:
        with open(tmp, "xb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created it first; the caller checks it against the request
        except OSError:  # no hard links on this filesystem: an atomic rename, last creator wins
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":  # os.kill(pid, 0) terminates on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def _format_indices(indices: Sequence[int], max_runs: int = 10) -> str:
    """[1, 3, 4, 5, 9] -> "1, 3-5, 9"; long lists are cut after `max_runs` runs."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:max_runs])
    return text + (f", ... ({len(runs) - max_runs} more runs)" if len(runs) > max_runs else "")


def normalise_rows(x) -> np.ndarray:
    """Each row of the 2-D `x` divided by its L2 norm, in float32; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.max(np.abs(x), axis=1, keepdims=True, initial=np.float32(0))
    y = x / np.where(scale > 0, scale, np.float32(1))
    norm = np.sqrt(np.sum(y * y, axis=1, keepdims=True))
    return np.where(norm > 0, y / np.where(norm > 0, norm, np.float32(1)), np.float32(0)).astype(np.float32)


def _first_bad_row(x: np.ndarray) -> int | None:
    bad = ~np.isfinite(x).all(axis=1)
    return int(np.argmax(bad)) if bad.any() else None


class ShardedMatrix:
    """Read-only N x d view of a store's shards; rows come back as float32 copies.

    Only the shards a request touches are memory-mapped, and only while it is served, so peak
    memory is the requested rows (plus page cache), never the whole matrix.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], n: int, dim: int, shard_rows: int):
        self.paths = [Path(p) for p in paths]
        self.n, self.dim, self.shard_rows = int(n), int(dim), int(shard_rows)
        if len(self.paths) != math.ceil(self.n / self.shard_rows):
            raise ValueError(f"{len(self.paths)} shard files for {self.n} rows of {self.shard_rows} per shard")
        for i, path in enumerate(self.paths):
            expected = (min(self.shard_rows, self.n - i * self.shard_rows), self.dim)
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                         else np.lib.format.read_array_header_2_0(f))
            if shape != expected or dtype != np.dtype(DTYPE) or fortran:
                raise ValueError(f"{path}: expected a C-order float16 array of shape {expected}, found "
                                 f"{dtype} {shape}{' (Fortran order)' if fortran else ''}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.dim)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"ShardedMatrix(shape={self.shape}, shards={len(self.paths)})"

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a new float32 array of shape [stop - start, dim]."""
        if not 0 <= start <= stop <= self.n:
            raise IndexError(f"rows({start}, {stop}) outside [0, {self.n}]")
        out = np.empty((stop - start, self.dim), dtype=np.float32)
        at = start
        while at < stop:
            i = at // self.shard_rows
            lo = i * self.shard_rows
            end = min(stop, lo + self.shard_rows)
            shard = np.load(self.paths[i], mmap_mode="r", allow_pickle=False)
            out[at - start:end - start] = shard[at - lo:end - lo]
            del shard  # unmaps
            at = end
        return out

    def iter_blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yields (start, rows[start:start + block_rows]) in order; the last block may be shorter."""
        _check_int("block_rows", block_rows, 1)
        for start in range(0, self.n, block_rows):
            yield start, self.rows(start, min(self.n, start + block_rows))


class FeatureStore:
    """One directory of float16 feature shards plus ``meta.json``; see the module docstring.

    Get one with `create_or_open` (to write, with identity checks) or `open` (to read).
    """

    def __init__(self, store_dir: str | os.PathLike, meta: StoreMeta):
        self.dir = Path(store_dir)
        self.meta = meta

    @classmethod
    def create_or_open(cls, store_dir: str | os.PathLike, n: int, dim: int, identity: dict,
                       shard_rows: int = DEFAULT_SHARD_ROWS, absent_means: dict | None = None) -> FeatureStore:
        """Creates the store, or opens an existing one whose metadata equals the request.

        ``absent_means`` (see `meta_differences`): identity keys newer than some stores, with the
        value a saved identity lacking them stands for; the saved ``meta.json`` is left as it is.
        Raises ValueError naming the directory and every differing field (saved vs requested).
        """
        store_dir = Path(store_dir)
        requested = StoreMeta(n=n, dim=dim, shard_rows=shard_rows, identity=identity)
        store_dir.mkdir(parents=True, exist_ok=True)
        meta_path = store_dir / META_FILE
        if not meta_path.exists():
            strays = sorted(name for name in os.listdir(store_dir) if _SHARD_RE.fullmatch(name))
            if strays:
                raise ValueError(f"{store_dir}: holds shard files ({strays[0]}, ...) but no {META_FILE}, so "
                                 "their identity is unknown; use another directory or delete them")
            _create_exclusive(meta_path, requested.to_json())
        saved = StoreMeta.read(meta_path)
        diffs = meta_differences(saved, requested, absent_means)
        if diffs:
            raise ValueError(f"{store_dir}: holds features that differ from the requested ones in "
                             + "; ".join(diffs) + ". Use another store directory for these features "
                             "(or delete this one to recompute).")
        store = cls(store_dir, saved)
        store.remove_stale_temps()
        return store

    @classmethod
    def open(cls, store_dir: str | os.PathLike) -> FeatureStore:
        """Opens an existing store for reading (no identity check: compare ``identity`` yourself)."""
        return cls(store_dir, StoreMeta.read(Path(store_dir) / META_FILE))

    def __repr__(self) -> str:
        return (f"FeatureStore({str(self.dir)!r}, n={self.n}, dim={self.dim}, "
                f"shards={self.n_shards - len(self.missing_shards())}/{self.n_shards})")

    @property
    def n(self) -> int:
        return self.meta.n

    @property
    def dim(self) -> int:
        return self.meta.dim

    @property
    def shard_rows(self) -> int:
        return self.meta.shard_rows

    @property
    def identity(self) -> dict:
        return self.meta.identity

    @property
    def n_shards(self) -> int:
        return self.meta.n_shards

    def _check_shard(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.n_shards:
            raise IndexError(f"{self.dir}: shard index {i!r} outside [0, {self.n_shards})")
        return int(i)

    def shard_path(self, i: int) -> Path:
        return self.dir / f"shard-{self._check_shard(i):05d}.npy"

    def shard_range(self, i: int) -> tuple[int, int]:
        """Rows [start, stop) that shard `i` holds."""
        start = self._check_shard(i) * self.shard_rows
        return start, min(self.n, start + self.shard_rows)

    def missing_shards(self) -> list[int]:
        """Indices of the shards not written yet, ascending."""
        present = {int(m.group(1)) for name in os.listdir(self.dir) if (m := _SHARD_RE.fullmatch(name))}
        return [i for i in range(self.n_shards) if i not in present]

    @property
    def is_complete(self) -> bool:
        return not self.missing_shards()

    def remove_stale_temps(self) -> list[Path]:
        """Deletes temporary files left by writers that are no longer running; returns them."""
        removed = []
        for name in os.listdir(self.dir):
            m = _TEMP_RE.fullmatch(name)
            if m and not _pid_alive(int(m.group(1))):
                (self.dir / name).unlink(missing_ok=True)
                removed.append(self.dir / name)
        return removed

    def write_shard(self, i: int, features, *, normalise: bool = True) -> Path:
        """Validates, L2-normalises (unless `normalise` is False) and atomically writes shard `i`.

        `features`: [rows of shard i, dim], any floating dtype, numpy or jax. Returns the path.
        """
        start, stop = self.shard_range(i)
        x = np.asarray(features)
        if not (x.dtype.kind == "f" or (x.dtype.kind == "V" and "float" in x.dtype.name)):
            raise TypeError(f"{self.dir}: shard {i}: features must be floating point, got dtype {x.dtype}")
        expected = (stop - start, self.dim)
        if x.shape != expected:
            raise ValueError(f"{self.dir}: shard {i} (rows {start}:{stop}) needs features of shape "
                             f"{expected}, got {x.shape}")
        x = x.astype(np.float32)
        bad = _first_bad_row(x)
        if bad is not None:
            raise ValueError(f"{self.dir}: shard {i}: non-finite value (NaN or inf, as float32) in row {bad} "
                             f"of the shard (example {start + bad})")
        if normalise:
            x = normalise_rows(x)
        with np.errstate(over="ignore"):  # reported below, naming the row
            out = x.astype(np.float16)
        bad = _first_bad_row(out)
        if bad is not None:
            raise ValueError(f"{self.dir}: shard {i}: row {bad} of the shard (example {start + bad}) "
                             "overflows float16 (|value| > 65504)")
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.ascontiguousarray(out), allow_pickle=False)
        return atomic_write_bytes(self.shard_path(i), buf.getvalue())

    def fill(self, compute_fn: Callable[[int, int], object], progress: bool = True, *,
             normalise: bool = True, shards: Sequence[int] | None = None, write: bool = True) -> int:
        """Computes and writes every missing shard in order: ``write_shard(i, compute_fn(start, stop))``.

        The resume mechanism: after a crash, calling it again computes only the missing shards.
        A shard that appears meanwhile (another process filling the same store) is skipped.
        ``shards``: compute exactly these, none skipped (a multi-process run fixes the list on
        every process before any shard is written, so all run the same collective programs);
        ``write=False`` computes without writing (the processes other than the writer).
        Returns the number of shards written.
        """
        from tqdm.auto import tqdm

        fixed = shards is not None
        todo = [self._check_shard(i) for i in shards] if fixed else self.missing_shards()
        written = 0
        with tqdm(total=self.n_shards, initial=self.n_shards - len(todo), disable=None if progress else True,
                  desc=f"features {self.dir.name}", unit="shard", dynamic_ncols=True) as bar:
            for i in todo:
                if fixed or not self.shard_path(i).exists():
                    start, stop = self.shard_range(i)
                    t0 = time.perf_counter()
                    features = np.asarray(compute_fn(start, stop))  # waits for an asynchronous result
                    seconds = time.perf_counter() - t0
                    if write:
                        self.write_shard(i, features, normalise=normalise)
                        self._record_seconds(i, seconds)
                        written += 1
                bar.update(1)
        return written

    def _record_seconds(self, i: int, seconds: float) -> None:
        """Adds shard ``i``'s compute seconds to ``seconds.json`` (rewritten atomically)."""
        recorded = self._recorded_seconds()
        recorded[str(i)] = round(float(seconds), 3)
        atomic_write_text(self.dir / SECONDS_FILE, json.dumps({"shards": recorded}, sort_keys=True) + "\n")

    def _recorded_seconds(self) -> dict[str, float]:
        try:
            shards = json.loads((self.dir / SECONDS_FILE).read_text())["shards"]
            return {str(k): float(v) for k, v in shards.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}  # absent (a store written before the file existed) or unreadable: no times

    def compute_seconds(self) -> float | None:
        """Seconds spent computing the store's shards, summed over every run that filled it; None
        when a shard's time is not on record (a store filled before ``seconds.json`` existed)."""
        recorded = self._recorded_seconds()
        if any(str(i) not in recorded for i in range(self.n_shards)):
            return None
        return float(sum(recorded[str(i)] for i in range(self.n_shards)))

    def matrix(self) -> ShardedMatrix:
        """The complete N x d matrix as a memory-mapped `ShardedMatrix`.

        Raises FileNotFoundError naming the missing shards if the store is incomplete.
        """
        missing = self.missing_shards()
        if missing:
            raise FileNotFoundError(f"{self.dir}: incomplete feature store, {len(missing)} of {self.n_shards} "
                                    f"shards missing (shards {_format_indices(missing)}); run fill() to "
                                    "compute them")
        return ShardedMatrix([self.shard_path(i) for i in range(self.n_shards)], self.n, self.dim, self.shard_rows)


def blockwise_scores(train: ShardedMatrix, val, block_rows: int = 65536) -> np.ndarray:
    """Cosine scores [N, M] float32 of every train row against every val row.

    Both sides must already be L2-normalised (store rows are; use `normalise_rows` for others),
    so this is ``train @ val.T`` in float32, one block of `block_rows` train rows at a time.
    `val` is an [M, d] array or a `ShardedMatrix` (read whole).
    """
    v = val.rows(0, len(val)) if isinstance(val, ShardedMatrix) else np.asarray(val, dtype=np.float32)
    if v.ndim != 2 or v.shape[1] != train.shape[1]:
        raise ValueError(f"val must have shape [M, {train.shape[1]}], got {v.shape}")
    vt = np.ascontiguousarray(v.T, dtype=np.float32)
    out = np.empty((len(train), v.shape[0]), dtype=np.float32)
    for start, block in train.iter_blocks(block_rows):
        np.matmul(block, vt, out=out[start:start + len(block)])
    return out
