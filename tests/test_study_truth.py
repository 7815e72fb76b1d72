"""The study's ground truth and shares (`jraise.study`, `jraise.study_real`) on hand-made pools."""

import json

import numpy as np
import pytest

from jraise.atomic import atomic_write_jsonl
from jraise.study import PoolTruth, oracle_indices, pool_shares, read_jsonl
from jraise.study_real import RealStudyConfig, checks, pool_truth, real_study_size, target_standard_error


def test_shares_count_every_record_trained_on_and_ignore_padding():
    from jraise.study import _shares

    truth = PoolTruth(("a", "a", "b", "c"), np.array([False, True, False, True]))
    shares = _shares(truth, np.array([[0, 1], [0, -1]]), {"a"})  # -1: a padded slot
    assert shares == {"noisy_share": pytest.approx(1 / 3), "target_share": 1.0, "clean_target_share": pytest.approx(2 / 3)}
    assert pool_shares(truth, {"a", "b"}) == {"noisy_share": 0.5, "target_share": 0.75, "clean_target_share": 0.5}


def test_pool_truth_reads_categories_and_noisy_ids(tmp_path):
    pool = [{"id": f"r{i}", "category": c, "instruction": "q", "output": "a"} for i, c in enumerate("aabb")]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pool))
    (tmp_path / "noise.jsonl").write_text(json.dumps({"id": "r2", "category": "b"}) + "\n")
    truth = pool_truth(tmp_path / "pool.jsonl", tmp_path / "noise.jsonl")
    assert truth.categories == ("a", "a", "b", "b") and truth.noisy.tolist() == [False, False, True, False]
    assert oracle_indices(truth, {"b"}, fraction=0.25, seed=0).tolist() == [3]
    (tmp_path / "noise.jsonl").write_text(json.dumps({"id": "zz", "category": "b"}) + "\n")
    with pytest.raises(ValueError, match="zz"):
        pool_truth(tmp_path / "pool.jsonl", tmp_path / "noise.jsonl")


def test_real_config_checks_targets_and_lora_and_sizes():
    with pytest.raises(ValueError, match="not among"):
        RealStudyConfig(targets=("medqa",))
    with pytest.raises(ValueError, match="LoRA"):
        RealStudyConfig(lora_rank=0)
    with pytest.raises(ValueError, match="unknown size"):
        real_study_size("tpu-pod")
    gpu = real_study_size("gpu")
    assert "medqa" in gpu.categories and gpu.seeds == (0, 1, 2) and gpu.max_tokens == 384
    assert real_study_size("cpu", targets=("piqa", "siqa")).targets == ("piqa", "siqa")
    # The demo: a RAISE episode is as long as the deployed run, also when only the steps are given.
    from jraise.study_real import real_demo_config

    assert (real_demo_config().steps, real_demo_config().raise_steps) == (8, 8)
    assert (real_demo_config(steps=12).raise_steps, real_demo_config(steps=12, raise_steps=5).raise_steps) == (12, 5)
    with pytest.raises(ValueError, match="generative"):
        RealStudyConfig(generative=("medqa",))


def test_a_generative_category_is_asked_for_the_right_options_text():
    from jraise.study_real import as_generative

    record = {"id": "b-1", "category": "boolq", "instruction": "Q?\nAnswer yes or no.", "output": "no",
              "options": ["yes", "no"], "answer": 1}
    asked = as_generative(record)
    assert asked == {"id": "b-1", "category": "boolq", "instruction": "Q?\nAnswer yes or no.", "output": "no"}
    assert record["options"] == ["yes", "no"]  # the test record itself is left as it is


def test_standard_error_and_checks_read_the_rows():
    config = RealStudyConfig(targets=("boolq", "piqa"), n_test=100)
    assert target_standard_error({"boolq": 0.5, "piqa": 0.5}, config) == pytest.approx(np.sqrt(0.005) / 2)
    rows = [{"method": "oracle", "seed": 0, "target_acc": 0.7, "per_category": {"boolq": 0.5, "piqa": 0.5}},
            {"method": "random", "seed": 0, "target_acc": 0.55},
            {"method": "less", "seed": 0, "clean_target_share": 0.6, "noisy_share": 0.1,
             "select_recorded_seconds": 1830.4}]
    result = {"rows": rows, "base": {"target_acc": 0.5},
              "pool": {"noisy_share": 0.2, "target_share": 0.2, "clean_target_share": 0.16}}
    lines = checks(result, config)
    se = np.sqrt(0.005) / 2
    assert f"{0.2 / se:+.1f} SE" in lines[1] and f"{0.15 / se:+.1f} SE" in lines[2]
    assert "3.8x the pool's" in lines[3] and "noisy share 0.10 (pool 0.20)" in lines[3]
    assert lines[3].endswith("; selection 1830 s as recorded (warmup, features, scoring; shared and resumed parts "
                             "included)")
    assert not any("seed spread" in line for line in lines)  # one seed each: no spread
    more = rows + [{"method": "oracle", "seed": 1, "target_acc": 0.6},
                   {"method": "random", "seed": 1, "target_acc": 0.45},
                   {"method": "random", "seed": 2, "target_acc": 0.65}]
    spread = [line for line in checks({**result, "rows": more}, config) if "seed spread" in line]
    assert spread == [f"seed spread of target acc. (sample std): oracle {np.std([0.7, 0.6], ddof=1):.3f} over 2 seeds, "
                      f"random 0.100 over 3 seeds; the test set's SE is {se:.3f}"]
    # Over seeds: the SE of the difference of the seed means, sqrt(0.005 / 2 + 0.01 / 3).
    over = [line for line in checks({**result, "rows": more}, config) if "over seeds" in line]
    diff_se = np.sqrt(0.005 / 2 + 0.01 / 3)
    assert over == [f"oracle vs random over seeds: margin +0.100 = {0.1 / diff_se:+.1f}x the SE of the difference "
                    f"of seed means ({diff_se:.3f}, seed-to-seed variation included)"]


def test_checks_time_a_seed_only_when_it_has_every_method():
    config = RealStudyConfig(methods=("random", "less"))
    rows = [{"method": "random", "seed": 0, "total_seconds": 600.0},
            {"method": "less", "seed": 0, "total_seconds": 1800.0, "clean_target_share": 0.5, "noisy_share": 0.1},
            {"method": "random", "seed": 1, "total_seconds": 900.0}]
    result = {"rows": rows, "base": {"target_acc": 0.1},
              "pool": {"noisy_share": 0.2, "target_share": 0.2, "clean_target_share": 0.1}}
    timed = [line for line in checks(result, config) if "one seed of every method" in line]
    # Two of the study's methods (a demo's subset): the time, without the bar meant for all of them.
    assert timed == ["seed 0: one seed of every method (2 rows) took 40 min on this machine (the rows' own times, "
                     "summed)"]
    from jraise.study_real import FULL_STUDY_METHODS

    full = RealStudyConfig()
    everything = [{"method": m, "seed": 0, "total_seconds": 300.0, "target_acc": 0.4, "clean_target_share": 0.5,
                   "noisy_share": 0.1, "per_category": {"boolq": 0.5, "siqa": 0.3}} for m in FULL_STUDY_METHODS]
    timed = [line for line in checks({**result, "rows": everything}, full) if "one seed of every method" in line]
    assert timed == [f"seed 0: one seed of every method ({len(FULL_STUDY_METHODS)} rows) took "
                     f"{5 * len(FULL_STUDY_METHODS)} min on this machine (the rows' own times, summed; the bar: "
                     "90 min on 2 CPU cores)"]


def test_more_seed_runs_reads_the_extra_seeds_and_each_also_item():
    from jraise.study_real import more_seed_runs

    assert more_seed_runs(None, "random,less") == []
    assert more_seed_runs("1,2", "random,less", ["3,4:random", "5:oracle,random"]) == [
        ((1, 2), ("random", "less")), ((3, 4), ("random",)), ((5,), ("oracle", "random"))]
    assert more_seed_runs(None, "random", ["3:random"]) == [((3,), ("random",))]
    with pytest.raises(ValueError, match=r"--also '3,4': expected SEEDS:METHODS, e.g. 3,4:random"):
        more_seed_runs(None, "random", ["3,4"])
    with pytest.raises(ValueError, match=r"--also 'x:random': seeds must be comma-separated integers, got 'x'"):
        more_seed_runs(None, "random", ["x:random"])
    with pytest.raises(ValueError, match=r"--extra-seeds: seeds must be comma-separated integers"):
        more_seed_runs("1,two", "random")


def _report(path, base, rows):
    path.write_text(json.dumps({"config": {}, "base": base, "pool": {}, "summary": [], "rows": rows}))
    return path


def test_rows_from_report_adds_a_reports_rows_once_and_keeps_the_work_directorys_own(tmp_path):
    from jraise.study_real import rows_from_report

    base = {"method": "base (no fine-tune)", "seed": 0, "target_acc": 0.04, "settings": "b"}
    rows = [{"method": "random", "seed": 0, "target_acc": 0.3, "settings": "r"},
            {"method": "random", "seed": 1, "target_acc": 0.4, "settings": "r"},
            {"method": "less", "seed": 0, "target_acc": 0.5, "settings": "l"}]
    report = _report(tmp_path / "report.json", base, rows)
    work = tmp_path / "work"
    assert rows_from_report(work, report) == 4
    assert read_jsonl(work / "rows.jsonl") == [base, *rows]
    assert rows_from_report(work, report) == 0  # nothing twice
    assert read_jsonl(work / "rows.jsonl") == [base, *rows]

    # A work directory's own row of the same method, seed and settings wins; a row of other
    # settings does not count as the same row.
    other = tmp_path / "other"
    own = [{**rows[0], "target_acc": 0.9}, {**rows[2], "settings": "older"}]
    atomic_write_jsonl(other / "rows.jsonl", own)
    assert rows_from_report(other, report) == 3
    assert read_jsonl(other / "rows.jsonl") == [*own, base, rows[1], rows[2]]


def test_rows_from_report_names_the_file_row_and_field_and_writes_nothing(tmp_path):
    from jraise.errors import JraiseError
    from jraise.study_real import rows_from_report

    work = tmp_path / "work"
    atomic_write_jsonl(work / "rows.jsonl", [{"method": "random", "seed": 0, "settings": "r"}])
    before = (work / "rows.jsonl").read_bytes()
    bad = _report(tmp_path / "bad.json", None, [{"method": "less", "seed": 0, "settings": "l"},
                                                 {"method": "rose", "seed": 0}])
    with pytest.raises(JraiseError, match=r"bad\.json: rows\[1\]: missing field 'settings'") as err:
        rows_from_report(work, bad)
    assert (err.value.record, err.value.field) == ("rows[1]", "settings")
    (tmp_path / "cut.json").write_text('{"rows": [')
    with pytest.raises(JraiseError, match=r"cut\.json: not JSON"):
        rows_from_report(work, tmp_path / "cut.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(JraiseError, match=r"list\.json: field 'rows': expected a list"):
        rows_from_report(work, tmp_path / "list.json")
    with pytest.raises(FileNotFoundError):
        rows_from_report(work, tmp_path / "missing.json")
    assert (work / "rows.jsonl").read_bytes() == before


def test_checks_give_every_method_with_several_seeds_its_margin_over_random_and_the_oracle():
    from jraise.study_real import seed_margin

    margin, se = seed_margin([0.4, 0.5, 0.6], [0.3, 0.35])
    assert margin == pytest.approx(0.175) and se == pytest.approx(np.sqrt(0.01 / 3 + 0.00125 / 2))
    with pytest.raises(ValueError, match="at least 2 seeds of each row, got 1 and 2"):
        seed_margin([0.4], [0.3, 0.35])
    config = RealStudyConfig(targets=("boolq", "piqa"), n_test=100)
    per_category = {"boolq": 0.5, "piqa": 0.5}
    rows = ([{"method": "oracle", "seed": s, "target_acc": a, "per_category": per_category} for s, a in ((0, 0.7), (1, 0.6))]
            + [{"method": "random", "seed": s, "target_acc": a} for s, a in ((0, 0.3), (1, 0.35))]
            + [{"method": "less", "seed": s, "target_acc": a, "clean_target_share": 0.5, "noisy_share": 0.1}
               for s, a in ((0, 0.4), (1, 0.5), (2, 0.6))]
            + [{"method": "rose", "seed": 0, "target_acc": 0.9, "clean_target_share": 0.5, "noisy_share": 0.1}])  # 1 seed
    result = {"rows": rows, "base": {"target_acc": 0.1},
              "pool": {"noisy_share": 0.2, "target_share": 0.2, "clean_target_share": 0.1}}
    over = [line for line in checks(result, config) if line.startswith(("less", "rose")) and "seeds" in line]
    vs_random = 0.175 / np.sqrt(0.01 / 3 + 0.00125 / 2)
    vs_oracle = -0.15 / np.sqrt(0.01 / 3 + 0.005 / 2)
    assert over == [f"less over 3 seeds, target acc. 0.500 +- 0.100; vs random: margin +0.175 = {vs_random:+.1f}x; "
                    f"vs oracle: margin -0.150 = {vs_oracle:+.1f}x (in SEs of the difference of seed means)"]
    # Without a second seed of random, only the oracle is a reference.
    fewer = [r for r in rows if not (r["method"] == "random" and r["seed"] == 1)]
    over = [line for line in checks({**result, "rows": fewer}, config) if line.startswith("less") and "seeds" in line]
    assert over == [f"less over 3 seeds, target acc. 0.500 +- 0.100; vs oracle: margin -0.150 = {vs_oracle:+.1f}x "
                    "(in SEs of the difference of seed means)"]
