"""jraise.beyond_iid_study and its command line benchmarks/beyond_iid_study.py: a tiny real run end
to end (files, Gamma, equal budgets of the compared arms, DT-CSFT's every-record-three-times order,
score ranges), the script resuming it, and the pure helpers."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jraise import beyond_iid_study as bis
from jraise.data.gamma import load_gamma

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "beyond_iid_study.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("beyond_iid")
    argv = ["--quick", "--work", str(tmp / "work"), "--out-dir", str(tmp / "out")]
    command = " ".join(["python benchmarks/beyond_iid_study.py", *argv])
    document, _ = bis.write_study(bis.BeyondIIDStudyConfig(**bis.QUICK), tmp / "work", tmp / "out", command)
    return {"doc": document, "work": tmp / "work", "out": tmp / "out", "argv": argv}


def test_writes_report_files_and_gamma_with_unit_diagonal(quick_run):
    out, doc = quick_run["out"], quick_run["doc"]
    for name in ("beyond_iid_study.md", "beyond_iid_study.json", "beyond_iid_study.png"):
        assert (out / name).stat().st_size > 500, name
    assert json.loads((out / "beyond_iid_study.json").read_text())["names"] == doc["names"]
    names = sorted(bis.QUICK["categories"])
    assert doc["names"] == names
    seed_dir = out / "beyond_iid_gamma" / "seed0"
    for path in (out / "beyond_iid_gamma" / "gamma.csv", out / "beyond_iid_gamma" / "gamma_heatmap.png",
                 seed_dir / "interactions.json", seed_dir / "gamma.csv"):
        assert path.stat().st_size > 0, path
    for path in (out / "beyond_iid_gamma" / "gamma.json", seed_dir / "gamma.json"):
        got_names, gamma = load_gamma(path)
        assert got_names == names
        np.testing.assert_array_equal(np.diag(gamma), 1.0)
    row = doc["rows"][0]
    np.testing.assert_allclose(load_gamma(seed_dir / "gamma.json")[1], row["gamma"])
    np.testing.assert_allclose(doc["mean_gamma"], np.mean([r["gamma"] for r in doc["rows"]], axis=0))
    # Tiers from the mean Gamma: every category in a tier 0..2, the check counts every composition pair.
    pairs = bis.composition_pairs(names)
    for method in ("depth", "net_asymmetry"):
        assert set(doc["pooled_tiers"][method]) == {"mean"}  # one seed: no replicate test
        pooled = doc["pooled_tiers"][method]["mean"]
        assert sorted(pooled["tiers"]) == names and set(pooled["tiers"].values()) <= {0, 1, 2}
        check = pooled["check"]
        assert check["prerequisite_first"] + check["same_tier"] + check["composite_first"] == len(pairs)
        assert check == bis.tiers_order_pairs(pooled["tiers"], pairs)
    runs = json.loads((seed_dir / "interactions.json").read_text())
    assert np.asarray(runs["perf"]).shape == (len(names) + 1, len(names))
    assert all(d != 0 for d in runs["deltas"]) and len(runs["base_ids"]) == doc["config"]["budget"]
    # The Gamma runs trained for as many steps as the arms do.
    assert runs["config"]["steps"] == doc["steps_per_run"] == row["arms"]["baseline"]["steps"]
    report = (out / "beyond_iid_study.md").read_text()
    assert " ".join(quick_run["argv"]) in report and "Gamma[c, p]" in report and "DT-CSFT" in report


def test_compared_arms_have_equal_budgets_and_scores_in_range(quick_run):
    doc = quick_run["doc"]
    budget = doc["config"]["budget"]
    for row in doc["rows"]:
        arms = row["arms"]
        assert set(arms) == set(bis.ARMS)
        for arm in arms.values():
            assert arm["steps"] == doc["steps_per_run"]
            assert arm["sequence_length"] == 3 * budget and arm["set_size"] == budget
            assert sum(arm["category_counts"]) == budget
            assert arm["min_occurrences"] == arm["max_occurrences"] == 3
            for c in doc["names"]:
                assert 0.0 <= arm["em"][c] <= 1.0 and np.isfinite(arm["loss"][c]) and arm["loss"][c] > 0
            assert arm["avg_em"] == pytest.approx(np.mean(list(arm["em"].values())))
        # EE-CPO keeps the budget, respects the edit bound and realises the planned counts.
        plan = row["plan"]
        assert sum(plan["counts_after"]) == sum(plan["counts_before"]) == budget
        assert plan["edits"] == int(np.abs(np.subtract(plan["counts_after"], plan["counts_before"])).sum())
        assert plan["edits"] <= 2 * plan["edit_budget"]
        assert arms["ee_cpo"]["category_counts"] == plan["counts_after"]
        assert arms["baseline"]["category_counts"] == plan["counts_before"] == row["base_counts"]
        assert set(row["tiers"].values()) <= {0, 1, 2} and set(row["tiers"]) == set(doc["names"])


def test_orders_on_disk_show_every_record_exactly_three_times(quick_run):
    orders = quick_run["work"] / "seed0" / "orders"
    base = np.load(orders / "baseline.npy")
    d0 = np.unique(base)
    assert len(d0) == quick_run["doc"]["config"]["budget"]
    for arm in ("dt_csft", "dt_csft_true_tiers"):
        order = np.load(orders / f"{arm}.npy")
        # The same multiset as the shuffled arm: D0, every record exactly 3 times, in another order.
        np.testing.assert_array_equal(np.sort(order), np.sort(base))
        values, counts = np.unique(order, return_counts=True)
        np.testing.assert_array_equal(values, d0)
        assert set(counts.tolist()) == {3}
    ee = np.load(orders / "ee_cpo.npy")
    assert len(ee) == len(base) and set(np.unique(ee, return_counts=True)[1].tolist()) == {3}


def test_the_command_line_resumes_the_run_and_reads_the_finished_seed_back(quick_run):
    # `--quick` on the command line is the configuration the fixture ran, so nothing is recomputed.
    rows_file = quick_run["work"] / "rows.jsonl"
    before = rows_file.read_text()
    run = subprocess.run([sys.executable, str(SCRIPT), *quick_run["argv"]], check=False, capture_output=True,
                         text=True, timeout=600, cwd=quick_run["work"].parent)
    assert run.returncode == 0, run.stderr
    assert rows_file.read_text() == before
    assert "seed 0: finished earlier" in run.stdout and "# Beyond IID on the built-in testbed" in run.stdout
    again = json.loads((quick_run["out"] / "beyond_iid_study.json").read_text())
    assert again["rows"][0]["seconds"] == quick_run["doc"]["rows"][0]["seconds"]
    assert again["command"] == " ".join(["python benchmarks/beyond_iid_study.py", *quick_run["argv"]])
    assert again["config"] == json.loads(json.dumps(quick_run["doc"]["config"]))
    assert (quick_run["out"] / "beyond_iid_study.md").read_text() in run.stdout


# ----------------------------------------------------------------------------------------------
# Pure helpers


def test_composition_pairs_and_true_tiers_follow_the_testbed_graph():
    cats = ("reverse", "upper", "sort", "reverse_upper", "sort_reverse", "first")
    pairs = bis.composition_pairs(cats)
    assert set(pairs) == {("reverse", "reverse_upper"), ("upper", "reverse_upper"), ("sort", "sort_reverse"),
                          ("reverse", "sort_reverse")}
    assert bis.true_tiers(cats) == {"reverse": 0, "upper": 0, "sort": 0, "reverse_upper": 2, "sort_reverse": 2,
                                    "first": 1}
    # A composite whose prerequisites are absent has no pair and sits in the middle tier.
    assert bis.composition_pairs(("reverse_upper", "first")) == []
    assert bis.true_tiers(("reverse_upper", "first")) == {"reverse_upper": 1, "first": 1}


def test_repeated_epochs_and_occurrence_range():
    idx = np.array([3, 7, 9, 20])
    order = bis.repeated_epochs(idx, 3, seed=5)
    assert len(order) == 12 and bis.occurrence_range(order, idx) == (3, 3)
    assert [sorted(order[k * 4:(k + 1) * 4].tolist()) for k in range(3)] == [[3, 7, 9, 20]] * 3
    np.testing.assert_array_equal(order, bis.repeated_epochs(idx, 3, seed=5))
    assert not np.array_equal(order, bis.repeated_epochs(idx, 3, seed=6))
    assert bis.occurrence_range(np.array([3, 3, 7]), idx) == (0, 2)
    assert bis.occurrence_range(np.array([3, 7, 9, 20, 21]), idx) == (0, 0)  # a foreign index


def test_dependency_entries_asymmetries_and_tier_checks():
    names = ["a", "ab", "b", "x"]
    gamma = np.array([[1.0, 0.1, 0.0, 0.2],
                      [0.6, 1.0, 0.3, 0.0],
                      [0.0, 0.5, 1.0, 0.0],
                      [0.1, 0.0, 0.4, 1.0]])
    entries = bis.dependency_entries(gamma, names, [("a", "ab"), ("b", "ab")])
    assert entries[0]["gamma_composite_from_prerequisite"] == 0.6
    assert entries[0]["gamma_prerequisite_from_composite"] == 0.1
    assert entries[0]["asymmetry"] == pytest.approx(0.5)
    assert entries[1]["asymmetry"] == pytest.approx(-0.2)
    others = bis.other_asymmetries(gamma, names, [("a", "ab"), ("b", "ab")])
    assert sorted(others) == pytest.approx([0.0, 0.0, 0.1, 0.4])  # (a,b), (ab,x), (a,x), (b,x)
    check = bis.tiers_order_pairs({"a": 0, "b": 2, "ab": 2, "x": 1}, [("a", "ab"), ("b", "ab")])
    assert check == {"pairs": 2, "prerequisite_first": 1, "same_tier": 1, "composite_first": 0}


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown categories"):
        bis.BeyondIIDStudyConfig(categories=("reverse", "juggle"))
    with pytest.raises(ValueError, match="budget"):
        bis.BeyondIIDStudyConfig(n_pool=100, budget=100)
    with pytest.raises(ValueError, match="epochs must be 3"):
        bis.BeyondIIDStudyConfig(epochs=2)
    assert bis.BeyondIIDStudyConfig(budget=1200, batch_size=16).steps == 225
    with pytest.raises(ValueError, match="gamma_budget must be"):
        bis.BeyondIIDStudyConfig(gamma_budget="tokens")
    with pytest.raises(ValueError, match="different lengths"):
        bis.BeyondIIDStudyConfig(gamma_budget="epochs", gamma_mode="vmap")
    assert bis.resolved_gamma_mode(bis.BeyondIIDStudyConfig(gamma_budget="epochs")) == "sequential"
