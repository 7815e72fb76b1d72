"""The real-model study's pipeline end to end on a small slice of the real pool with the real
SmolLM2-135M-Instruct (LoRA fine-tunes, real selection methods, real scores), and its resumption.

The default suite runs the pipeline through `jraise demo --real` (random and the oracle); the
fuller run (ROSE with its shared influence work, RAISE) is ``slow`` (about 6 CPU minutes, mostly
XLA compiles of the 30-layer model) and is covered by ``benchmarks/real_study.py``."""

import json

import numpy as np
import pytest

from jraise.study_real import RealStudyConfig, run_real_study, write_report

SLICE = dict(categories=("piqa", "openbookqa", "asdiv"), targets=("piqa",), generative=("piqa",), per_category=8,
             per_target=8, max_tokens=64, max_len=112, fraction=0.25, n_val=2, n_val_other=2, n_test=3, n_test_other=2,
             steps=2, batch_size=4, raise_episodes=1, raise_steps=2, raise_clusters=2, influence_proj_dim=64,
             influence_warmup_epochs=1, seeds=(0,))


@pytest.fixture(scope="module")
def study(tmp_path_factory, smollm2_dir, eval_data_dir):
    work = tmp_path_factory.mktemp("real_study")
    config = RealStudyConfig(methods=("random", "rose", "raise", "oracle"), **SLICE)
    return work, config, run_real_study(work, config, echo=lambda *_: None)


@pytest.mark.slow
def test_every_row_is_scored_on_every_category_and_shares_follow_the_truth(study):
    work, config, result = study
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"random", "rose", "raise", "oracle"}
    test = [json.loads(line) for line in (work / "pool" / "test.jsonl").read_text().splitlines()]
    assert sorted({r["category"] for r in test}) == ["asdiv", "openbookqa", "piqa"]
    for row in [result["base"], *rows.values()]:
        assert set(row["per_category"]) == {"asdiv", "openbookqa", "piqa"}
        assert row["per_category"]["piqa"] in (0.0, 1 / 3, 2 / 3, 1.0)  # 3 test records
        assert row["per_category"]["asdiv"] in (0.0, 0.5, 1.0)  # 2 test records
        assert row["target_acc"] == row["per_category"]["piqa"]
        assert row["all_acc"] == pytest.approx(np.mean(list(row["per_category"].values())))
    # The oracle trains on clean target records only; every selector's shares are within [0, 1].
    assert rows["oracle"]["noisy_share"] == 0.0 and rows["oracle"]["clean_target_share"] == 1.0
    pool = result["pool"]
    noisy = {json.loads(line)["id"] for line in (work / "pool" / "noise.jsonl").read_text().splitlines()}
    records = [json.loads(line) for line in (work / "pool" / "pool.jsonl").read_text().splitlines()]
    assert pool["noisy_share"] == pytest.approx(len(noisy) / len(records))
    assert pool["target_share"] == pytest.approx(np.mean([r["category"] == "piqa" for r in records]))
    selected = [json.loads(line) for line in (work / "seed0" / "rose" / "selection.jsonl").read_text().splitlines()]
    assert len(selected) == round(0.25 * len(records))
    share = np.mean([r["category"] == "piqa" and r["id"] not in noisy for r in selected])
    assert rows["rose"]["clean_target_share"] == pytest.approx(share)
    # The influence rows of a seed keep their warmup and train-side features in one shared directory.
    assert (work / "seed0" / "influence_work" / "warmup").is_dir()
    assert not (work / "seed0" / "rose" / "selection.jsonl.work").exists()


@pytest.mark.slow
def test_report_and_resume(study, tmp_path):
    work, config, result = study
    text = write_report(result, config, tmp_path / "real_study", "test", 1.0)
    assert "oracle vs base" in text and "rose top 25%" in text and "| base (no fine-tune) |" in text
    saved = json.loads((tmp_path / "real_study.json").read_text())
    assert [r["method"] for r in saved["rows"]] == [r["method"] for r in result["rows"]]
    assert (tmp_path / "real_study.png").stat().st_size > 0
    lines = (work / "rows.jsonl").read_text().splitlines()
    again = run_real_study(work, config, echo=lambda *_: None)
    assert (work / "rows.jsonl").read_text().splitlines() == lines
    assert [r["total_seconds"] for r in again["rows"]] == [r["total_seconds"] for r in result["rows"]]


def test_demo_real_prints_the_table_and_verdict_and_writes_chart(tmp_path, smollm2_dir, eval_data_dir):
    from jraise.demo import run_demo

    lines = []
    sizes = {k: v for k, v in SLICE.items() if k != "seeds"}
    result = run_demo(tmp_path, real=True, methods=("random", "oracle"), echo=lines.append, **sizes)
    text = "\n".join(lines)
    assert "jraise demo --real" in text and "Verdict: best on the target categories" in text
    assert "oracle vs random" in text and [r["method"] for r in result["rows"]] == ["random", "oracle"]
    assert (tmp_path / "study.md").read_text().endswith(".\n") and (tmp_path / "study.png").stat().st_size > 0
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["oracle"]["noisy_share"] == 0.0 and rows["oracle"]["clean_target_share"] == 1.0
    assert set(result["base"]["per_category"]) == {"piqa", "openbookqa", "asdiv"}
    # Resuming reads every row back, the base model's scores included.
    before = (tmp_path / "rows.jsonl").read_text()
    assert json.loads(before.splitlines()[0])["method"] == "base (no fine-tune)"
    again = run_demo(tmp_path, real=True, methods=("random", "oracle"), echo=lambda *_: None, **sizes)
    assert (tmp_path / "rows.jsonl").read_text() == before and again["rows"] == result["rows"]
    # A fresh work directory given the report's rows (`real_study.py --rows-from`) resumes from them:
    # the pool is rebuilt by seed, and nothing is fine-tuned or scored again.
    from jraise.study_real import rows_from_report

    fresh = tmp_path / "fresh"
    assert rows_from_report(fresh, tmp_path / "study.json") == 3  # the base row, random, oracle
    resumed = run_demo(fresh, real=True, methods=("random", "oracle"), echo=lambda *_: None, **sizes)
    assert resumed["rows"] == result["rows"] and resumed["base"] == result["base"]
    assert (fresh / "pool" / "pool.jsonl").read_bytes() == (tmp_path / "pool" / "pool.jsonl").read_bytes()
    # Every seed scores the same test set: another seed reads the base row back.
    run_demo(tmp_path, seed=1, real=True, methods=("random",), echo=lambda *_: None, **sizes)
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows if r["method"] == "base (no fine-tune)"] == [0]
    assert (rows[-1]["method"], rows[-1]["seed"]) == ("random", 1)
