"""CSV and parquet inputs are read as they are now: an edit is never served from a stale
``datasets`` cache (whose key is the file's path and modification time), and nothing is written
into the shared ``datasets`` cache."""

from __future__ import annotations

import os
import string

import pytest

from jraise.data.pool import load_pool
from jraise.model.tokenizer import build_char_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("char_tok")
    build_char_tokenizer(out, [string.printable])
    return load_tokenizer(out)


@pytest.fixture(autouse=True)
def shared_cache(tmp_path, monkeypatch):
    """A private stand-in for the shared ``datasets`` cache, to see whether anything lands there."""
    import datasets

    cache = tmp_path / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def _outputs(path, tok) -> list[str]:
    return [r["output"] for r in load_pool(path, tok, max_len=64).records]


def _write_csv(path, outputs):
    path.write_text("instruction,output\n" + "".join(f"say,{o}\n" for o in outputs), encoding="utf-8")


def _write_parquet(path, outputs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": ["say"] * len(outputs), "output": list(outputs)}), path)


WRITERS = {"csv": _write_csv, "parquet": _write_parquet}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_edit_keeping_size_and_mtime_is_read_anew(tmp_path, tok, shared_cache, fmt):
    path = tmp_path / f"pool.{fmt}"
    WRITERS[fmt](path, ["aaa", "bbb"])
    stat = path.stat()
    assert _outputs(path, tok) == ["aaa", "bbb"]
    WRITERS[fmt](path, ["xyz", "bbb"])  # same size, then the old timestamps put back
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert _outputs(path, tok) == ["xyz", "bbb"]
    assert not shared_cache.exists() or not any(shared_cache.iterdir())


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_fast_edits_within_one_second_are_each_read(tmp_path, tok, fmt):
    path = tmp_path / f"pool.{fmt}"
    seen = []
    for i in range(3):  # three versions written and read back to back, well inside a second
        WRITERS[fmt](path, [f"v{i}"])
        seen.append(_outputs(path, tok))
    assert seen == [["v0"], ["v1"], ["v2"]]
