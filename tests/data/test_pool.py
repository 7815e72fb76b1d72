"""Pools: every file format gives the same fingerprint, fingerprints track content, selections write back."""

from __future__ import annotations

import csv
import json
import string

import numpy as np
import pytest

from jraise.data.formats import RecordError
from jraise.data.pool import InstructionPool, load_pool, load_preference_pool, write_selection_jsonl
from jraise.model.tokenizer import build_char_tokenizer, load_tokenizer

# Flat string fields only, so the same records can be written as CSV too.
RECORDS = [
    {
        "id": "007",
        "instruction": "Reverse: abc",
        "input": "",
        "output": "cba",
        "category": "reverse",
        "source": "gen",
    },
    {"instruction": "Add", "input": "2 + 3", "output": "5", "category": "math", "source": "gen"},
    {"instruction": "Sort the letters", "input": "dcba", "output": "abcd", "category": "", "source": "web"},
    {
        "id": "x9",
        "instruction": "Say hello",
        "input": "",
        "output": "hello",
        "category": "chat",
        "source": "web",
    },
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_char_tokenizer(tmp_path_factory.mktemp("char_tok"), [string.printable])


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_csv(path, records):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]))
        writer.writeheader()
        for record in records:
            writer.writerow({k: record.get(k, "") for k in records[0]})
    return path


def test_pool_arrays_have_the_documented_types(tmp_path, tok):
    pool = load_pool(write_jsonl(tmp_path / "d.jsonl", RECORDS), tok)
    assert isinstance(pool, InstructionPool) and len(pool) == 4
    assert pool.ids[0] == "007" and pool.ids[3] == "x9" and len(pool.ids[1]) == 16
    assert pool.lengths.dtype == np.int32 and pool.lengths.tolist() == [len(t) for t in pool.tokens]
    assert all(
        t.dtype == np.int32 and m.dtype == bool and t.shape == m.shape
        for t, m in zip(pool.tokens, pool.loss_masks, strict=True)
    )
    assert pool.categories == ("reverse", "math", None, "chat")  # "" counts as no category
    assert pool.pad_id == tok.pad_token_id and pool.max_len == 512
    assert pool.source.endswith("d.jsonl") and len(pool.fingerprint) == 64
    assert pool.report.n_kept == 4 and pool.report.n_skipped == 0


def test_every_file_format_gives_the_jsonl_fingerprint(tmp_path, tok):
    import datasets

    reference = load_pool(write_jsonl(tmp_path / "d.jsonl", RECORDS), tok)
    (tmp_path / "d.json").write_text(json.dumps(RECORDS))
    table = datasets.Dataset.from_list(RECORDS)
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    write_csv(tmp_path / "d.csv", RECORDS)
    for name in ("d.json", "d.parquet", "saved", "d.csv"):
        pool = load_pool(tmp_path / name, tok)
        assert pool.ids == reference.ids, name
        assert pool.categories == reference.categories, name
        assert pool.fingerprint == reference.fingerprint, name


def test_csv_keeps_every_cell_as_written(tmp_path, tok):
    pool = load_pool(write_csv(tmp_path / "d.csv", RECORDS), tok)
    assert pool.records[0] == RECORDS[0]  # "007" is not turned into 7
    assert pool.ids[0] == "007"


def test_records_pass_through_unchanged(tmp_path, tok):
    records = [
        dict(RECORDS[0], meta={"license": "cc", "tags": ["a", "b"]}),
        {"prompt": "p", "response": "r", "extra": None},
    ]
    pool = load_pool(write_jsonl(tmp_path / "d.jsonl", records), tok)
    assert pool.records == records


def test_fingerprint_is_stable_and_tracks_content(tmp_path, tok, tmp_path_factory):
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    fingerprint = load_pool(path, tok).fingerprint
    assert load_pool(path, tok).fingerprint == fingerprint
    # the same tokenizer saved elsewhere, under another directory name, gives the same fingerprint
    other_dir = tmp_path_factory.mktemp("elsewhere") / "renamed-tokenizer"
    tok.save_pretrained(str(other_dir))
    assert load_pool(path, load_tokenizer(other_dir)).fingerprint == fingerprint

    def changed(**edit):
        records = [dict(RECORDS[0], **edit), *RECORDS[1:]]
        return load_pool(write_jsonl(tmp_path / "e.jsonl", records), tok).fingerprint

    assert changed(source="elsewhere") == fingerprint  # passthrough fields are not content
    assert changed(output="cbA") != fingerprint
    assert changed(category="other") != fingerprint
    assert changed(id="008") != fingerprint
    assert load_pool(path, tok, max_len=256).fingerprint != fingerprint
    reordered = write_jsonl(tmp_path / "r.jsonl", [RECORDS[1], RECORDS[0], *RECORDS[2:]])
    assert load_pool(reordered, tok).fingerprint != fingerprint


def test_write_selection_jsonl_writes_original_records_in_order(tmp_path, tok):
    records = [dict(r, meta={"n": i}) for i, r in enumerate(RECORDS)]
    pool = load_pool(write_jsonl(tmp_path / "d.jsonl", records), tok)
    out = tmp_path / "sel" / "chosen.jsonl"
    out.parent.mkdir()
    out.write_text("stale\n")
    assert write_selection_jsonl(pool, np.array([3, 0, 2]), out) == out
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [records[3], records[0], records[2]]
    assert sorted(p.name for p in out.parent.iterdir()) == ["chosen.jsonl"]  # no temp file left
    # the written selection loads back into the same examples
    again = load_pool(out, tok)
    assert again.ids == (pool.ids[3], pool.ids[0], pool.ids[2])


@pytest.mark.parametrize("bad", [[4], [-1]])
def test_write_selection_refuses_out_of_range_indices(tmp_path, tok, bad):
    pool = load_pool(write_jsonl(tmp_path / "d.jsonl", RECORDS), tok)
    out = tmp_path / "chosen.jsonl"
    with pytest.raises(IndexError):
        write_selection_jsonl(pool, bad, out)
    assert list(tmp_path.iterdir()) == [tmp_path / "d.jsonl"]


def test_preference_pool_sides_and_fingerprint(tmp_path, tok):
    records = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "five", "category": "math"},
        {"prompt": "Say hi", "chosen": "hi", "rejected": "no", "meta": 1},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", records)
    pool = load_preference_pool(path, tok, max_len=128)
    assert len(pool) == 2 and pool.categories == ("math", None) and pool.records == records
    for tokens, masks in (
        (pool.chosen_tokens, pool.chosen_masks),
        (pool.rejected_tokens, pool.rejected_masks),
    ):
        assert all(
            t.dtype == np.int32 and m.dtype == bool and t.shape == m.shape
            for t, m in zip(tokens, masks, strict=True)
        )
    assert pool.chosen_lengths.dtype == np.int32 and pool.lengths.dtype == np.int32
    assert pool.lengths.tolist() == np.maximum(pool.chosen_lengths, pool.rejected_lengths).tolist()
    assert load_preference_pool(path, tok, max_len=128).fingerprint == pool.fingerprint
    swapped = write_jsonl(tmp_path / "s.jsonl", [dict(records[0], chosen="five", rejected="4"), records[1]])
    assert load_preference_pool(swapped, tok, max_len=128).fingerprint != pool.fingerprint


def test_malformed_json_array_names_file_and_line(tmp_path, tok):
    path = tmp_path / "arr.json"
    path.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": oops}\n]')
    with pytest.raises(ValueError, match=r"arr\.json: line 3: malformed JSON"):
        load_pool(path, tok)


def test_parquet_bad_record_names_record_index_and_field(tmp_path, tok):
    import datasets

    datasets.Dataset.from_list([RECORDS[1], dict(RECORDS[2], output=" ")]).to_parquet(
        str(tmp_path / "b.parquet")
    )
    with pytest.raises(RecordError, match=r"b\.parquet: record index 1: field 'output': empty-response"):
        load_pool(tmp_path / "b.parquet", tok)


def test_unknown_extension_and_missing_file_are_refused(tmp_path, tok):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown data format"):
        load_pool(tmp_path / "d.txt", tok)
    with pytest.raises(FileNotFoundError):
        load_pool(tmp_path / "absent.jsonl", tok)
