"""ROSE validation pairs from right answers and the model's own greedy answers."""

import json

import pytest
from typer.testing import CliRunner

from jraise.cli import app
from jraise.data.pool import load_preference_pool
from jraise.eval.report import prompt_token_ids, greedy_completions, prompt_messages
from jraise.model import init_model, load_tokenizer
from jraise.jobs.preference_pairs import write_model_answer_pairs
from jraise.select.preference_pairs import model_answer_pairs


@pytest.fixture(scope="module")
def setup(make_testbed, make_model_dir, tiny_config):
    """(model directory, paths, tokenizer, the same model in memory, validation records, its answers);
    the directory and the testbed are the suite's shared ones (read-only)."""
    paths = make_testbed(n_train=10, n_val_per_category=3, n_test_per_category=1, categories=["first", "upper", "add"])
    tok = load_tokenizer(paths["tokenizer"])
    model = init_model(tiny_config(tok), seed=0)
    model_dir = make_model_dir(paths["tokenizer"], seed=0)
    records = [json.loads(line) for line in paths["val"].read_text().splitlines()]
    answers = greedy_completions(model, tok, prompt_token_ids(tok, [prompt_messages(r) for r in records]), 8)
    return model_dir, paths, tok, model, records, answers


def test_pairs_take_the_reference_as_chosen_and_the_models_answer_as_rejected(setup):
    model_dir, paths, tok, model, records, answers = setup
    assert all(a.strip() for a in answers)  # a random model answers with something
    pairs, report = model_answer_pairs(model, tok, records, max_new_tokens=8)
    assert [p["id"] for p in pairs] == [r["id"] for r in records]
    for pair, record, answer in zip(pairs, records, answers):
        assert pair["chosen"] == record["output"] and pair["rejected"] == answer.strip()
        assert pair["category"] == record["category"]
        assert pair["prompt"] == prompt_messages(record)[0]["content"]
    assert report["n_pairs"] == report["n_records"] == 9
    assert report["per_category"]["first"] == {"records": 3, "pairs": 3, "correct": 0, "empty": 0}
    # Deterministic (greedy).
    assert model_answer_pairs(model, tok, records, max_new_tokens=8)[0] == pairs


def test_records_the_model_answers_right_are_skipped(setup):
    model_dir, paths, tok, model, records, answers = setup
    # Make the model right on records 1 and 4 (under the testbed normaliser: case and spacing folded
    # where case is not the point; `first` and `add` fold case, `upper` does not).
    edited = [dict(r) for r in records]
    for i in (1, 4):
        edited[i]["output"] = "  " + answers[i].strip() + " "
    pairs, report = model_answer_pairs(model, tok, edited, max_new_tokens=8)
    assert report["skipped"]["correct"] == [1, 4] and report["n_pairs"] == 7
    assert [p["id"] for p in pairs] == [r["id"] for i, r in enumerate(records) if i not in (1, 4)]
    assert sum(c["correct"] for c in report["per_category"].values()) == 2


def test_every_record_answered_right_is_an_error(setup):
    model_dir, paths, tok, model, records, answers = setup
    edited = [{**r, "output": a} for r, a in zip(records, answers)]
    with pytest.raises(ValueError, match="no preference pair.*all 9 records right"):
        model_answer_pairs(model, tok, edited, max_new_tokens=8)


def test_bad_records_name_the_source_record_and_field(setup):
    model_dir, paths, tok, model, records, answers = setup
    with pytest.raises(ValueError, match=r"val.jsonl: record index 2 \(id 'x'\): field 'output'.*blank"):
        model_answer_pairs(model, tok, [*records[:2], {**records[2], "id": "x", "output": " "}], source="val.jsonl")
    with pytest.raises(ValueError, match=r"val.jsonl: record index 0.*no prompt"):
        model_answer_pairs(model, tok, [{"output": "a"}], source="val.jsonl")
    with pytest.raises(ValueError, match="no records"):
        model_answer_pairs(model, tok, [], source="val.jsonl")


def test_written_pairs_load_as_a_preference_pool_and_the_cli_writes_the_same(setup, tmp_path):
    model_dir, paths, tok, model, records, answers = setup
    out = tmp_path / "pairs.jsonl"
    report = write_model_answer_pairs(model_dir, paths["val"], out, max_new_tokens=8)
    meta = json.loads(out.with_name("pairs.jsonl.meta.json").read_text())
    assert meta["kind"] == "model_answer_pairs" and meta["n_pairs"] == report["n_pairs"] == 9
    pool = load_preference_pool(out, tok, max_len=256)
    assert len(pool) == 9 and list(pool.ids) == [str(r["id"]) for r in records]

    result = CliRunner().invoke(app, ["pairs", "--model", str(model_dir), "--val", str(paths["val"]),
                                      "--out", str(tmp_path / "cli.jsonl"), "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert "wrote 9 pairs from 9 records" in result.output
    assert (tmp_path / "cli.jsonl").read_text() == out.read_text()
