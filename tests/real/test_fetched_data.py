"""The real evaluation sets in the cache: manifest, record shapes, idempotent fetch."""

import json

from jraise.fetch import fetch_eval_data
from jraise.fetch.eval_data import SOURCES
from jraise.fetch.eval_sets import EVAL_SETS


def test_manifest_counts_and_records_are_well_formed(eval_data_dir):
    manifest = json.loads((eval_data_dir / "manifest.json").read_text())["files"]
    for spec in EVAL_SETS:
        entry = manifest[f"{spec.name}.jsonl"]
        assert entry["sha256"] == SOURCES[spec.package].sha256 and entry["licence"]
        assert entry["version"] == SOURCES[spec.package].version
        with open(eval_data_dir / f"{spec.name}.jsonl", encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        assert len(records) == entry["records"] > 100
        assert entry["records"] + sum(entry["dropped"].values()) == entry["rows"]
        assert len({r["id"] for r in records}) == len(records)
        for r in records:
            assert r["category"] == spec.name and r["instruction"].strip() and r["output"].strip()
            if spec.kind == "mc":
                assert r["options"][r["answer"]] == r["output"] and len(set(r["options"])) == len(r["options"])
            else:
                assert r["reference"] == r["output"]
    assert manifest["mmlu.jsonl"]["records"] >= 2800 and manifest["boolq.jsonl"]["records"] == 3270
    assert manifest["hellaswag.jsonl"]["records"] == 10042  # the whole labelled validation split
    assert manifest["bbh_cot_fewshot.jsonl"]["records"] == 81


def test_fetching_again_reuses_the_directory(eval_data_dir):
    before = (eval_data_dir / "manifest.json").stat().st_mtime_ns
    assert fetch_eval_data() == eval_data_dir
    assert (eval_data_dir / "manifest.json").stat().st_mtime_ns == before
