"""Feature store: round trips, byte-identical resume, crash safety, identity checks, blockwise reads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jraise.data.feature_store import (
    SECONDS_FILE,
    FeatureStore,
    ShardedMatrix,
    StoreMeta,
    blockwise_scores,
    normalise_rows,
)

REPO = Path(__file__).resolve().parents[2]
IDENTITY = {"pool_fingerprint": "aaa", "model": "tiny", "checkpoint": "step-100",
            "projection": {"kind": "rademacher", "seed": 0, "dim": 8}, "side": "train"}


def features(start: int, stop: int, dim: int = 8) -> np.ndarray:
    """Deterministic raw features for rows [start, stop): the same rows always give the same values."""
    return np.stack([np.random.default_rng(k).standard_normal(dim) * (k + 1) for k in range(start, stop)])


def dir_bytes(path: Path) -> dict[str, bytes]:
    """The store's files but its compute times (``seconds.json``, which differ run to run)."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != SECONDS_FILE}


def make(tmp_path: Path, n=10, dim=8, shard_rows=4, identity=IDENTITY, name="store") -> FeatureStore:
    return FeatureStore.create_or_open(tmp_path / name, n=n, dim=dim, identity=identity, shard_rows=shard_rows)


def test_round_trip_shard_boundaries_and_normalisation(tmp_path):
    store = make(tmp_path, n=10, shard_rows=4)
    assert store.n_shards == 3 and store.missing_shards() == [0, 1, 2] and not store.is_complete
    assert [store.shard_range(i) for i in range(3)] == [(0, 4), (4, 8), (8, 10)]
    raw = features(0, 10)
    raw[5] = 0.0  # a zero row stays zero
    raw[7] *= 1e30  # huge rows normalise without overflow (float64 in, fits float32)
    for i in (2, 0, 1):  # any order
        start, stop = store.shard_range(i)
        store.write_shard(i, raw[start:stop])
    assert store.is_complete and store.missing_shards() == []

    shard = np.load(store.shard_path(2))  # a standard .npy file
    assert shard.dtype == np.float16 and shard.shape == (2, 8)
    got = store.matrix().rows(0, 10)
    assert got.dtype == np.float32 and got.shape == (10, 8)
    expected = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-300)
    np.testing.assert_allclose(got, expected, atol=1e-3)
    norms = np.linalg.norm(got, axis=1)
    np.testing.assert_allclose(np.delete(norms, 5), 1.0, atol=2e-3)
    assert np.all(got[5] == 0)

    reopened = FeatureStore.open(tmp_path / "store")
    np.testing.assert_array_equal(reopened.matrix().rows(0, 10), got)
    assert reopened.identity == IDENTITY


def test_store_smaller_than_one_shard_and_unnormalised(tmp_path):
    store = make(tmp_path, n=3, dim=5, shard_rows=4096)
    assert store.n_shards == 1 and store.shard_range(0) == (0, 3)
    raw = np.arange(15, dtype=np.float32).reshape(3, 5) - 7
    store.write_shard(0, raw, normalise=False)
    m = store.matrix()
    assert m.shape == (3, 5) and len(m) == 3
    np.testing.assert_array_equal(m.rows(0, 3), raw)  # small integers are exact in float16


def test_jax_bfloat16_features_accepted(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    store = make(tmp_path, n=4, dim=8, shard_rows=4)
    raw = features(0, 4)
    store.write_shard(0, jnp.asarray(raw, dtype=jnp.bfloat16))
    np.testing.assert_allclose(store.matrix().rows(0, 4), normalise_rows(raw), atol=1e-2)


def test_meta_json_contents(tmp_path):
    store = make(tmp_path, identity={**IDENTITY, "layers": (1, 2)})
    saved = json.loads((store.dir / "meta.json").read_text())
    assert saved["n"] == 10 and saved["dim"] == 8 and saved["shard_rows"] == 4 and saved["dtype"] == "float16"
    assert saved["identity"]["layers"] == [1, 2] and saved["format_version"] == store.meta.format_version
    assert StoreMeta.read(store.dir / "meta.json") == store.meta
    # A tuple equals the list it reads back as: reopening with the same identity works.
    make(tmp_path, identity={**IDENTITY, "layers": (1, 2)})


def test_resume_after_crash_is_byte_identical(tmp_path):
    n, shard_rows = 22, 4  # 6 shards, the last one of 2 rows
    reference = make(tmp_path, n=n, shard_rows=shard_rows, name="reference")
    assert reference.fill(features, progress=False) == 6

    store = make(tmp_path, n=n, shard_rows=shard_rows, name="resumed")

    def crashing(start, stop):
        if start == 3 * shard_rows:
            raise RuntimeError("killed")
        return features(start, stop)

    with pytest.raises(RuntimeError, match="killed"):
        store.fill(crashing, progress=False)
    assert store.missing_shards() == [3, 4, 5]

    calls = []

    def recording(start, stop):
        calls.append((start, stop))
        return features(start, stop)

    reopened = make(tmp_path, n=n, shard_rows=shard_rows, name="resumed")
    assert reopened.fill(recording, progress=True) == 3
    assert calls == [(12, 16), (16, 20), (20, 22)]
    assert reopened.is_complete
    assert dir_bytes(reopened.dir) == dir_bytes(reference.dir)
    assert reopened.fill(recording) == 0 and len(calls) == 3  # nothing left to do
    # Both runs' shard times are on record: the store's cost is known though it took two runs.
    recorded = json.loads((reopened.dir / SECONDS_FILE).read_text())["shards"]
    assert sorted(recorded, key=int) == [str(i) for i in range(6)]
    assert reopened.compute_seconds() == pytest.approx(sum(recorded.values()))


def test_compute_seconds_sums_every_shard_and_is_none_for_an_untimed_one(tmp_path):
    import time

    def slow(start, stop):
        time.sleep(0.02)
        return features(start, stop)

    store = make(tmp_path)  # 10 rows, 3 shards
    assert store.compute_seconds() is None  # nothing computed yet
    store.fill(slow, progress=False)
    assert 0.06 <= store.compute_seconds() < 5
    # A shard written without a time (as by code from before seconds.json): the total is unknown.
    untimed = make(tmp_path, name="untimed")
    untimed.fill(slow, progress=False)
    untimed.write_shard(1, features(4, 8))
    (untimed.dir / SECONDS_FILE).write_text(json.dumps({"shards": {"0": 0.1, "2": 0.1}}))
    assert untimed.compute_seconds() is None
    (untimed.dir / SECONDS_FILE).write_text("not json")
    assert untimed.compute_seconds() is None and untimed.is_complete


def test_crash_during_write_leaves_no_partial_shard(tmp_path, monkeypatch):
    store = make(tmp_path)
    store.write_shard(0, features(0, 4))
    before = store.shard_path(0).read_bytes()
    real_replace = os.replace
    seen_temp = []

    def failing_replace(src, dst):
        seen_temp.append(Path(src).exists())
        raise OSError("disk died during rename")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk died"):
        store.write_shard(1, features(4, 8))
    monkeypatch.setattr(os, "replace", real_replace)

    assert seen_temp == [True]  # the data had been written to a temporary file
    assert sorted(p.name for p in store.dir.iterdir()) == ["meta.json", "shard-00000.npy"]
    assert store.shard_path(0).read_bytes() == before
    assert store.missing_shards() == [1, 2]

    reference = make(tmp_path, name="reference")
    reference.fill(features, progress=False)
    store.fill(features, progress=False)
    assert dir_bytes(store.dir) == dir_bytes(reference.dir)


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_killed_writer_temp_file_is_ignored_and_cleaned(tmp_path):
    store = make(tmp_path)
    store.write_shard(0, features(0, 4))
    script = textwrap.dedent(f"""
        import os, signal
        import numpy as np
        from jraise.data.feature_store import FeatureStore
        store = FeatureStore.create_or_open({str(store.dir)!r}, n=10, dim=8, identity={IDENTITY!r}, shard_rows=4)
        os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
        store.write_shard(1, np.ones((4, 8)))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", script], check=False, env=env, cwd=REPO,
                          capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    temps = [p for p in store.dir.iterdir() if p.name.endswith(".tmp")]
    assert len(temps) == 1 and temps[0].name.startswith(".shard-00001.npy.")
    assert store.missing_shards() == [1, 2]  # a temporary file is not a shard

    reopened = make(tmp_path)
    assert not temps[0].exists()
    reopened.fill(features, progress=False)
    reference = make(tmp_path, name="reference")
    reference.fill(features, progress=False)
    assert dir_bytes(reopened.dir) == dir_bytes(reference.dir)


def test_metadata_mismatch_names_every_field(tmp_path):
    store = make(tmp_path)
    store.write_shard(0, features(0, 4))

    with pytest.raises(ValueError) as info:
        make(tmp_path, identity={**IDENTITY, "pool_fingerprint": "bbb"})
    msg = str(info.value)
    assert str(store.dir) in msg and "another store directory" in msg
    assert 'identity.pool_fingerprint: saved "aaa", requested "bbb"' in msg
    assert "checkpoint" not in msg

    other = {**IDENTITY, "projection": {**IDENTITY["projection"], "seed": 1, "dim": 16}, "extra": True}
    with pytest.raises(ValueError) as info:
        make(tmp_path, n=12, dim=16, identity=other)
    msg = str(info.value)
    for part in ("n: saved 10, requested 12", "dim: saved 8, requested 16",
                 "identity.projection.seed: saved 0, requested 1",
                 "identity.projection.dim: saved 8, requested 16",
                 "identity.extra: saved <absent>, requested true"):
        assert part in msg, (part, msg)
    assert "shard_rows" not in msg and "pool_fingerprint" not in msg

    with pytest.raises(ValueError, match="shard_rows: saved 4, requested 5"):
        make(tmp_path, shard_rows=5)
    with pytest.raises(ValueError, match="identity.projection.seed: saved 0, requested 0.0"):
        make(tmp_path, identity={**IDENTITY, "projection": {**IDENTITY["projection"], "seed": 0.0}})

    # Nothing was changed by the refused opens; the same request opens and keeps the shard.
    assert make(tmp_path).missing_shards() == [1, 2]


def test_shards_without_meta_are_refused(tmp_path):
    store = make(tmp_path)
    store.write_shard(0, features(0, 4))
    (store.dir / "meta.json").unlink()
    with pytest.raises(ValueError, match="no meta.json"):
        make(tmp_path)


def test_corrupt_meta_is_reported(tmp_path):
    store = make(tmp_path)
    (store.dir / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json"):
        make(tmp_path)


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="dim"):
        make(tmp_path, dim=0)
    with pytest.raises(ValueError, match="shard_rows"):
        make(tmp_path, shard_rows=0)
    with pytest.raises(TypeError, match="JSON"):
        make(tmp_path, identity={"x": object()})
    with pytest.raises(TypeError, match="JSON"):
        make(tmp_path, identity={"x": float("nan")})


def test_shape_dtype_and_nan_errors_name_the_shard(tmp_path):
    store = make(tmp_path)
    with pytest.raises(ValueError, match=r"shard 1 \(rows 4:8\) needs features of shape \(4, 8\), got \(3, 8\)"):
        store.write_shard(1, features(4, 7))
    with pytest.raises(ValueError, match=r"shard 2 .*shape \(2, 8\), got \(2, 7\)"):
        store.write_shard(2, np.zeros((2, 7)))
    bad = features(4, 8)
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match=r"shard 1: non-finite .* row 2 of the shard \(example 6\)"):
        store.write_shard(1, bad)
    bad[2, 3], bad[1, 0] = 0.0, -np.inf
    with pytest.raises(ValueError, match=r"shard 1: non-finite .* row 1 "):
        store.write_shard(1, bad)
    with pytest.raises(ValueError, match=r"shard 0: row 3 .*overflows float16"):
        store.write_shard(0, np.full((4, 8), 1e5).astype(np.float32) * (np.arange(4) == 3)[:, None],
                          normalise=False)
    with pytest.raises(TypeError, match="shard 0: features must be floating point"):
        store.write_shard(0, np.ones((4, 8), dtype=np.int32))
    with pytest.raises(IndexError, match="shard index 3"):
        store.write_shard(3, np.ones((4, 8)))
    assert store.missing_shards() == [0, 1, 2]  # nothing was written by the failed calls


def test_incomplete_store_read_names_missing_shards(tmp_path):
    store = make(tmp_path, n=30, shard_rows=4)  # shards 0..7
    for i in (0, 2, 6):
        store.write_shard(i, features(*store.shard_range(i)))
    with pytest.raises(FileNotFoundError, match=r"5 of 8 shards missing \(shards 1, 3-5, 7\)"):
        store.matrix()


def test_rows_and_blocks_across_shard_boundaries(tmp_path):
    store = make(tmp_path, n=23, dim=6, shard_rows=5)
    store.fill(lambda a, b: features(a, b, dim=6), progress=False)
    m = store.matrix()
    dense = np.concatenate([np.load(store.shard_path(i)) for i in range(store.n_shards)]).astype(np.float32)
    assert dense.shape == (23, 6)
    np.testing.assert_array_equal(m.rows(0, 23), dense)
    for start, stop in [(3, 17), (5, 10), (4, 6), (22, 23), (7, 7)]:
        np.testing.assert_array_equal(m.rows(start, stop), dense[start:stop])
    blocks = list(m.iter_blocks(7))
    assert [s for s, _ in blocks] == [0, 7, 14, 21] and [len(b) for _, b in blocks] == [7, 7, 7, 2]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), dense)
    assert [s for s, _ in m.iter_blocks(100)] == [0]
    with pytest.raises(IndexError):
        m.rows(20, 24)
    with pytest.raises(IndexError):
        m.rows(5, 4)


def test_sharded_matrix_rejects_wrong_shard_files(tmp_path):
    store = make(tmp_path)
    store.fill(features, progress=False)
    np.save(store.shard_path(1), np.zeros((4, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=r"shard-00001.npy: expected a C-order float16 array of shape \(4, 8\)"):
        store.matrix()
    with pytest.raises(ValueError, match="shard files"):
        ShardedMatrix([store.shard_path(0)], n=10, dim=8, shard_rows=4)


def test_blockwise_scores_match_dense_on_a_large_store(tmp_path):
    n, dim, m = 200_000, 64, 16
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((n, dim), dtype=np.float32)
    store = make(tmp_path, n=n, dim=dim, shard_rows=16384, identity={"side": "train"})
    store.fill(lambda a, b: raw[a:b], progress=False)
    train = store.matrix()
    assert train.shape == (n, dim) and store.n_shards == 13

    val = normalise_rows(rng.standard_normal((m, dim)))
    scores = blockwise_scores(train, val, block_rows=7000)  # blocks straddle shard boundaries
    dense = train.rows(0, n)
    np.testing.assert_allclose(dense, normalise_rows(raw), atol=1e-3)
    expected = dense @ val.T
    assert scores.shape == (n, m) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected, atol=1e-5, rtol=0)

    # A val store works as the val side too.
    val_store = make(tmp_path, n=m, dim=dim, shard_rows=5, identity={"side": "val"}, name="val")
    val_store.fill(lambda a, b: val[a:b], progress=False)
    small = ShardedMatrix([store.shard_path(0)], n=16384, dim=dim, shard_rows=16384)
    np.testing.assert_allclose(blockwise_scores(small, val_store.matrix(), block_rows=1000),
                               dense[:16384] @ val_store.matrix().rows(0, m).T, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"val must have shape \[M, 64\]"):
        blockwise_scores(train, val[:, :10])
