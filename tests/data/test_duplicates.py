"""Exact copies in a pool are data: distinct examples with stable ids, counted; ``dedupe`` keeps the first."""

from __future__ import annotations

import json
import string

import numpy as np
import pytest

from jraise.data.formats import COPY_MARK, RecordError, content_hash_id
from jraise.data.pool import load_pool, load_preference_pool
from jraise.model.tokenizer import build_char_tokenizer, load_tokenizer

A = {"instruction": "add 2 and 3", "output": "5"}
B = {"instruction": "upper abc", "output": "ABC"}
C = {"prompt": "say hi", "response": "hi"}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("char_tok")
    build_char_tokenizer(out, [string.printable])
    return load_tokenizer(out)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def hash_of(record):
    if "instruction" in record:
        return content_hash_id({"instruction": record["instruction"], "input": record.get("input", ""),
                                "output": record["output"]})
    return content_hash_id({"prompt": record["prompt"], "response": record["response"]})


def test_copies_are_distinct_examples_with_numbered_ids(tmp_path, tok):
    path = write_jsonl(tmp_path / "pool.jsonl", [A, B, A, C, {**A, "source": "flan"}])
    pool = load_pool(path, tok)
    a = hash_of(A)
    assert pool.ids == (a, hash_of(B), f"{a}~2", hash_of(C), f"{a}~3")
    assert pool.records[4]["source"] == "flan"  # records are kept as read; passthrough fields not compared
    report = pool.report
    assert (report.n_read, report.n_kept, report.n_copies, report.n_deduped, report.n_skipped) == (5, 5, 2, 0, 0)
    assert report.first_copy == "line 3 copies line 1"
    line = report.duplicates_line()
    assert line.startswith(f"{path}: 2 exact copies of earlier records (line 3 copies line 1) loaded as distinct")
    assert "--dedupe" in line and len(line.splitlines()) == 1
    assert "2 exact copies kept as distinct examples" in report.summary()


def test_ids_of_records_without_copies_do_not_change(tmp_path, tok):
    unique = load_pool(write_jsonl(tmp_path / "u.jsonl", [A, B, C]), tok)
    with_copies = load_pool(write_jsonl(tmp_path / "d.jsonl", [A, B, B, C]), tok)
    assert unique.ids == (hash_of(A), hash_of(B), hash_of(C))
    assert [i for i in with_copies.ids if COPY_MARK not in i] == list(unique.ids)
    assert unique.report.duplicates_line() is None and unique.report.n_copies == 0


def test_dedupe_keeps_the_first_copy_only(tmp_path, tok):
    path = write_jsonl(tmp_path / "pool.jsonl", [A, B, A, C, A])
    pool = load_pool(path, tok, dedupe=True)
    assert pool.ids == (hash_of(A), hash_of(B), hash_of(C))
    assert [r for r in pool.records] == [A, B, C]
    report = pool.report
    assert (report.n_read, report.n_kept, report.n_copies, report.n_deduped) == (5, 3, 0, 2)
    assert report.duplicates_line() == f"{path}: dropped 2 exact copies of earlier records (line 3 copies line 1; --dedupe)"
    assert "2 exact copies dropped (dedupe)" in report.summary()
    # The same pool without copies in the file: the same ids, tokens and fingerprint.
    plain = load_pool(write_jsonl(tmp_path / "plain.jsonl", [A, B, C]), tok)
    assert plain.fingerprint == pool.fingerprint


def test_explicit_id_on_identical_records_is_a_copy(tmp_path, tok):
    records = [{"id": "x", **A}, {"id": "x", **A}, {"id": 7, **B}, {"id": 7, **B}]
    pool = load_pool(write_jsonl(tmp_path / "ids.jsonl", records), tok)
    assert pool.ids == ("x", "x~2", "7", "7~2") and pool.report.n_copies == 2
    assert load_pool(tmp_path / "ids.jsonl", tok, dedupe=True).ids == ("x", "7")


@pytest.mark.parametrize("second, what", [({"id": "x", **B}, "content"), ({"id": "x", **A, "category": "math"},
                                                                           "category")])
def test_explicit_id_on_different_records_stays_an_error_naming_both(tmp_path, tok, second, what):
    path = write_jsonl(tmp_path / "ids.jsonl", [{"id": "x", **A}, C, second])
    with pytest.raises(RecordError) as err:
        load_pool(path, tok)
    assert (err.value.reason, err.value.field, err.value.location.line) == ("duplicate-id", "id", 3)
    assert f"{path}: line 3: field 'id': duplicate-id: id 'x' is already the id of {path}: line 1" in str(err.value)
    assert f"other {what}" in str(err.value)
    pool = load_pool(path, tok, skip_bad=True)
    assert pool.ids == ("x", hash_of(C)) and dict(pool.report.skipped) == {"duplicate-id": 1}


def test_same_content_other_category_without_ids_is_numbered_but_not_a_copy(tmp_path, tok):
    path = write_jsonl(tmp_path / "cats.jsonl", [{**A, "category": "math"}, {**A, "category": "arith"}])
    for dedupe in (False, True):
        pool = load_pool(path, tok, dedupe=dedupe)
        assert pool.ids == (hash_of(A), f"{hash_of(A)}~2") and pool.categories == ("math", "arith")
        assert pool.report.n_copies == pool.report.n_deduped == 0


def test_copy_ids_skip_ids_that_records_already_have(tmp_path, tok):
    a = hash_of(A)
    pool = load_pool(write_jsonl(tmp_path / "p.jsonl", [A, {"id": f"{a}~2", **B}, A, A]), tok)
    assert pool.ids == (a, f"{a}~2", f"{a}~3", f"{a}~4")


def test_ids_are_the_same_in_every_file_format(tmp_path, tok):
    import pandas as pd

    jsonl = load_pool(write_jsonl(tmp_path / "p.jsonl", [A, B, A]), tok)
    (tmp_path / "p.json").write_text(json.dumps([A, B, A]))
    pd.DataFrame([A, B, A]).to_csv(tmp_path / "p.csv", index=False)
    for name in ("p.json", "p.csv"):
        other = load_pool(tmp_path / name, tok)
        assert other.ids == jsonl.ids and other.fingerprint == jsonl.fingerprint
        assert other.report.first_copy == "record index 2 copies record index 0"


def test_preference_pool_copies_and_dedupe(tmp_path, tok):
    pair = {"prompt": "q", "chosen": "yes", "rejected": "no"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair, {"prompt": "r", "chosen": "a", "rejected": "b"}, pair])
    pool = load_preference_pool(path, tok)
    assert len(pool) == 3 and pool.ids[2] == pool.ids[0] + "~2" and pool.report.n_copies == 1
    assert len(load_preference_pool(path, tok, dedupe=True)) == 2


# ---------------------------------------------------------------------------------------------
# A pool with exact copies trains, selects and evaluates by default; dedupe drops the copies.


@pytest.fixture(scope="module")
def dup_testbed(tmp_path_factory, make_testbed, tiny_config):
    from jraise.model import init_model

    root = tmp_path_factory.mktemp("dups")
    paths = make_testbed(n_train=12, n_val_per_category=1, n_test_per_category=1, categories=["first", "upper"])
    lines = paths["pool"].read_text().splitlines()
    pool_file = root / "pool_with_copies.jsonl"
    pool_file.write_text("\n".join(lines + lines[:4]) + "\n")  # the first 4 records twice
    tok = load_tokenizer(paths["tokenizer"])
    return {"paths": paths, "pool_file": pool_file, "tok": tok, "model": init_model(tiny_config(tok), seed=0),
            "n": len(lines)}


def test_pool_with_copies_trains_selects_and_evaluates(dup_testbed, tmp_path):
    from jraise.eval import evaluate
    from jraise.jobs.baselines import run_baseline
    from jraise.train import TrainConfig, train

    tb, n = dup_testbed, dup_testbed["n"]
    pool = load_pool(tb["pool_file"], tb["tok"], max_len=128)
    assert len(pool) == n + 4 and len(set(pool.ids)) == n + 4 and pool.report.n_copies == 4
    config = TrainConfig(lr=1e-3, epochs=1, batch_size=4, max_steps=2, n_buckets=1)
    result = train(tb["model"], pool, config, tmp_path / "run", order=np.arange(len(pool))[::-1].copy())
    assert result.steps == 2
    selection = run_baseline("random", tb["pool_file"], tmp_path / "sel.jsonl", tokenizer_dir=tb["paths"]["tokenizer"],
                             fraction=1.0, max_len=128, echo=None)
    assert len(selection.indices) == n + 4
    assert len((tmp_path / "sel.jsonl").read_text().splitlines()) == n + 4
    report = evaluate(tb["model"], tb["tok"], tb["pool_file"], kinds=("loss",), max_len=128)
    assert report["loss"]["overall"]["n_examples"] == n + 4
    deduped = load_pool(tb["pool_file"], tb["tok"], max_len=128, dedupe=True)
    assert len(deduped) == n and deduped.report.n_deduped == 4
    assert deduped.ids == load_pool(tb["paths"]["pool"], tb["tok"], max_len=128).ids
