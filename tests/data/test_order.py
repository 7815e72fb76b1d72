"""Order files (`jraise train --order`): written as jraise-order JSON lines, checked against the pool on reading."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from jraise.data.order import OrderFileError, pool_ids_fingerprint, read_order, write_order

# Ids a line-per-entry file misreads: spaces at the ends, digits that are other examples' indices,
# a line break, quotes, non-ASCII.
AWKWARD = ("7 ", " 3", "0", "two words", "line\nbreak", 'quote"d', "ünï", "1", "12", "{x}")


def pool_of(ids, source="pool.jsonl"):
    return SimpleNamespace(ids=tuple(ids), source=source)


def test_round_trip_maps_every_entry_to_its_own_example(tmp_path):
    rng = np.random.default_rng(0)
    order = rng.permutation(np.repeat(np.arange(len(AWKWARD)), 3))
    path = write_order(tmp_path / "order.jsonl", AWKWARD, order)
    lines = path.read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])
    assert header == {"format": "jraise-order", "version": 1, "pool_ids_sha256": pool_ids_fingerprint(AWKWARD),
                      "pool_size": len(AWKWARD), "n": len(order)}
    assert len(lines) == 1 + len(order)  # the id with a line break stays on its line
    assert json.loads(lines[1]) == {"index": int(order[0]), "id": AWKWARD[order[0]]}
    got = read_order(path, pool_of(AWKWARD))
    assert got.dtype == np.int64 and got.tolist() == order.tolist()
    assert read_order(path, AWKWARD).tolist() == order.tolist()  # a plain sequence of ids works too


def test_write_refuses_out_of_range_indices(tmp_path):
    with pytest.raises(ValueError, match=r"out of range for a pool of 2: \[2\]"):
        write_order(tmp_path / "o.jsonl", ["a", "b"], [0, 2])
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("pool_ids", [AWKWARD[:-1], AWKWARD[1:] + AWKWARD[:1], ("a",) + AWKWARD[1:]],
                         ids=["one-fewer", "reordered", "one-id-changed"])
def test_another_pool_is_refused_naming_both_fingerprints(tmp_path, pool_ids):
    path = write_order(tmp_path / "order.jsonl", AWKWARD, [0, 1, 2])
    with pytest.raises(OrderFileError) as err:
        read_order(path, pool_of(pool_ids, "data.jsonl"))
    message = str(err.value)
    assert message.startswith(f"{path}: line 1: field 'pool_ids_sha256': written for another pool")
    assert pool_ids_fingerprint(AWKWARD)[:16] in message and pool_ids_fingerprint(pool_ids)[:16] in message
    assert f"{len(AWKWARD)} examples" in message and "data.jsonl" in message
    assert (err.value.path, err.value.record, err.value.field) == (path, 1, "pool_ids_sha256")


def _edit_line(path, number, new_text):
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[number - 1] = new_text
    path.write_text("\n".join(lines), encoding="utf-8")


@pytest.mark.parametrize("line3, field, detail", [
    ('{"index": 1, "id": "7 "}', "id", "is not the id of pool example 1"),
    ('{"index": 99, "id": "7 "}', "index", "99 is not an index of the pool"),
    ('{"index": true, "id": " 3"}', "index", "True is not an index"),
    ('{"id": " 3"}', "index", "missing"),
    ('{"index": 1, "id": " 3", "step": 4}', "step", "unknown entry field"),
    ('{"index": 1, ', None, "malformed JSON"),
    ("", None, "a blank line"),
    ("[1]", None, "expected an entry"),
])
def test_bad_entries_name_file_line_and_field(tmp_path, line3, field, detail):
    path = write_order(tmp_path / "order.jsonl", AWKWARD, [0, 1, 2])
    _edit_line(path, 3, line3)
    with pytest.raises(OrderFileError) as err:
        read_order(path, pool_of(AWKWARD))
    where = f"{path}: line 3" + (f": field {field!r}" if field else "")
    assert str(err.value).startswith(where) and detail in str(err.value)


@pytest.mark.parametrize("change, field", [
    (lambda h: {**h, "n": 4}, "n"), (lambda h: {**h, "version": 2}, "version"),
    (lambda h: {**h, "format": "other"}, "format"), (lambda h: {k: v for k, v in h.items() if k != "pool_size"},
                                                      "pool_size"),
    (lambda h: {**h, "extra": 1}, "extra"),
])
def test_bad_headers_name_the_field(tmp_path, change, field):
    path = write_order(tmp_path / "order.jsonl", AWKWARD, [0, 1, 2])
    header = json.loads(path.read_text().splitlines()[0])
    _edit_line(path, 1, json.dumps(change(header)))
    with pytest.raises(OrderFileError, match=rf"line 1: field '{field}'"):
        read_order(path, pool_of(AWKWARD))


def test_truncated_file_is_refused(tmp_path):
    path = write_order(tmp_path / "order.jsonl", AWKWARD, [0, 1, 2, 3])
    path.write_text("\n".join(path.read_text().split("\n")[:3]) + "\n")
    with pytest.raises(OrderFileError, match="field 'n': the header says 4 entries, the file has 2"):
        read_order(path, pool_of(AWKWARD))


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "order.txt"
    path.write_bytes(b"a\nb\xff\n")
    with pytest.raises(OrderFileError, match=r"order\.txt: line 2: invalid UTF-8"):
        read_order(path, pool_of(["a", "b"]))


# ---------------------------------------------------------------------------------------------
# Older files: read when unambiguous, refused otherwise


def test_legacy_lines_of_ids_with_spaces_map_exactly(tmp_path):
    ids = [f" {k}" for k in range(60)]  # ids that old readers stripped into other examples' indices
    rng = np.random.default_rng(1)
    ids = [ids[k] for k in rng.permutation(60)]
    order = rng.permutation(np.repeat(np.arange(60), 3))
    path = tmp_path / "order.txt"
    path.write_text("".join(ids[i] + "\n" for i in order))
    assert read_order(path, pool_of(ids)).tolist() == order.tolist()


def test_legacy_lines_of_indices_and_plain_ids(tmp_path):
    path = tmp_path / "order.txt"
    path.write_text("2\n\n0\r\nb\n")
    assert read_order(path, pool_of(["a", "b", "c"])).tolist() == [2, 0, 1]


@pytest.mark.parametrize("ids, text, line, detail", [
    (["2", "x", "y"], "x\n2\n", 2, "is the id of example 0 and the index of example 2"),
    (["a", "b", " 1"], "a\n1\n", 2, "differs only in spaces from the id of example 2"),
    (["a", " b", "b "], "a\nb\n", 2, "differs only in spaces from the id of example 1"),
    (["a", "b"], "a\nc\n", 2, "'c' is neither an id of the pool nor an index below 2"),
    (["a", "b"], "a\n007\n", 2, "neither"),
    (["a", "b"], "a\n \n", 2, "' ' is neither"),
])
def test_legacy_lines_refuse_what_could_name_two_examples_or_none(tmp_path, ids, text, line, detail):
    path = tmp_path / "order.txt"
    path.write_text(text)
    with pytest.raises(OrderFileError) as err:
        read_order(path, pool_of(ids))
    assert str(err.value).startswith(f"{path}: line {line}: ") and detail in str(err.value)


def test_legacy_lines_accept_an_entry_only_one_example_can_mean(tmp_path):
    path = tmp_path / "order.txt"
    path.write_text("ex 1 \nex 2\n1 \n")  # ids up to end spaces; "1 " is no index (not a plain number)
    assert read_order(path, pool_of(["ex 1", "ex 2", " 1"])).tolist() == [0, 1, 2]
    path.write_text("1\n")  # no id is "1", none differs from it only in spaces: the index
    assert read_order(path, pool_of(["5", "x"])).tolist() == [1]


def test_legacy_lines_are_refused_for_a_pool_with_line_breaks_in_ids(tmp_path):
    path = tmp_path / "order.txt"
    path.write_text("a\n")
    with pytest.raises(OrderFileError, match=r"id of example 1 \('b\\nc'\) holds a line break"):
        read_order(path, pool_of(["a", "b\nc"]))


def test_legacy_json_list(tmp_path):
    path = tmp_path / "order.json"
    path.write_text(json.dumps([2, "a", "1", 0]))
    assert read_order(path, pool_of(["a", "b", "c"])).tolist() == [2, 0, 1, 0]
    for entries, detail in (([1], "is the id of example 0 and the index of example 1"), ([5], "'[0]'"),
                            ([1.0], "expected a pool index (number) or id (string)"), ([], "no entries")):
        path.write_text(json.dumps(entries))
        with pytest.raises(OrderFileError, match="order.json") as err:
            read_order(path, pool_of(["1", "b"]))
        assert detail in str(err.value)
    path.write_text("[1, 2")
    with pytest.raises(OrderFileError, match="malformed JSON"):
        read_order(path, pool_of(["a", "b", "c"]))


def test_first_line_object_without_format_is_refused(tmp_path):
    path = tmp_path / "order.jsonl"
    path.write_text('{"index": 0, "id": "a"}\n')
    with pytest.raises(OrderFileError, match="line 1: field 'format': not a jraise-order file"):
        read_order(path, pool_of(["a"]))
