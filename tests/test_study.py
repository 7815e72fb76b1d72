"""The selection study and the demo: real (tiny) runs end to end, and the summary arithmetic.

The study's base model (`build_base`: the same for every TINY run) is trained once by the suite's
`study_work` fixture and copied into each run's work directory, where `run_study` reuses it as it
reuses a finished base of its own."""

import json

import numpy as np
import pytest

from jraise.study import StudyConfig, markdown_table, run_study, summarise

TINY = dict(seeds=(0,), n_pool=280, steps=4, batch_size=8, n_test=2, base_pool=280, base_steps=6, fraction=0.1,
            raise_clusters=2)


def _rows(method, values):
    cols = ("target_em", "all_em", "target_loss", "noisy_share", "target_share", "select_seconds")
    return [{"method": method, "seed": s, **{c: v + i for i, c in enumerate(cols)}} for s, v in enumerate(values)]


def test_summary_is_mean_and_sample_std_over_seeds():
    rows = _rows("a", [0.1, 0.3, 0.5]) + _rows("b", [0.2])
    summary = summarise(rows)
    assert [e["method"] for e in summary] == ["a", "b"]
    a, b = summary
    assert a["n_seeds"] == 3 and a["target_em"] == pytest.approx(0.3) and a["target_em_std"] == pytest.approx(0.2)
    assert a["all_em"] == pytest.approx(1.3) and b["target_em_std"] == 0.0
    table = markdown_table(summary)
    assert "| a | 0.30 ± 0.20 |" in table and "| b | 0.20 |" in table


def test_study_config_rejects_unknown_methods_and_bad_fraction():
    with pytest.raises(ValueError, match="rose_pairs must be model or testbed"):
        StudyConfig(rose_pairs="human")
    with pytest.raises(ValueError, match="unknown methods"):
        StudyConfig(methods=("random", "psychic"))
    with pytest.raises(ValueError, match="fraction"):
        StudyConfig(fraction=0.0)


def test_oracle_indices_draw_the_clean_target_records():
    from jraise.study import oracle_indices, truth_from_meta

    records = [{"meta": {"category": c, "noisy": n}} for c in ("a", "b", "c") for n in (False, True) for _ in range(10)]
    truth = truth_from_meta(records)
    picked = oracle_indices(truth, {"a", "b"}, fraction=0.25, seed=0)
    assert len(picked) == 15 and len(set(picked.tolist())) == 15  # round(0.25 x 60), no repeats
    assert all(records[i]["meta"]["category"] in "ab" and not records[i]["meta"]["noisy"] for i in picked)
    assert np.array_equal(picked, oracle_indices(truth, {"a", "b"}, fraction=0.25, seed=0))
    assert not np.array_equal(picked, oracle_indices(truth, {"a", "b"}, fraction=0.25, seed=1))
    # Fewer clean target records than the budget: all of them.
    assert sorted(oracle_indices(truth, {"a"}, fraction=0.5, seed=0).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="no clean records"):
        oracle_indices(truth, {"z"}, fraction=0.25, seed=0)


def test_settings_key_of_a_row_ignores_other_methods_options():
    from jraise.study import settings_key

    a, b = StudyConfig(), StudyConfig(raise_steps=30)
    assert settings_key(a, "random") == settings_key(b, "random")
    assert settings_key(a, "less") == settings_key(b, "less")
    assert settings_key(a, "raise") != settings_key(b, "raise")
    assert settings_key(a, "raise_sampled") != settings_key(b, "raise_sampled")
    c = StudyConfig(influence_proj_dim=512)
    assert settings_key(a, "rose") != settings_key(c, "rose") and settings_key(a, "raise") == settings_key(c, "raise")
    g = StudyConfig(rose_pairs="testbed")  # ROSE's own group: LESS's rows are kept
    assert settings_key(a, "rose") != settings_key(g, "rose") and settings_key(a, "less") == settings_key(g, "less")
    d = StudyConfig(gamma_steps=40)  # shared by EE-CPO and DT-CSFT
    assert settings_key(a, "ee_cpo") != settings_key(d, "ee_cpo") and settings_key(a, "dt_csft") != settings_key(d, "dt_csft")
    e = StudyConfig(lr=3e-4)  # common options change every row
    assert all(settings_key(a, m) != settings_key(e, m) for m in ("random", "less", "raise", "ee_cpo"))
    assert settings_key(a, "random") != settings_key(a, "full")
    f = StudyConfig(full_run_epochs=5)  # a reference row's own option
    assert settings_key(a, "full_run") != settings_key(f, "full_run") and settings_key(a, "full") == settings_key(f, "full")
    # The per-seed Gamma cache uses the same mechanism: common options and the gamma_* group.
    from jraise.study_beyond_iid import _gamma_settings

    assert _gamma_settings(a, 0) == _gamma_settings(b, 0) == _gamma_settings(StudyConfig(ee_cpo_edit=0.5), 0)
    assert _gamma_settings(a, 0) != _gamma_settings(d, 0) and _gamma_settings(a, 0) != _gamma_settings(a, 1)
    assert _gamma_settings(a, 0) != _gamma_settings(StudyConfig(base_preset="tiny"), 0)  # another base model


def test_ee_cpo_floor_decides_whether_a_small_d0_can_be_edited():
    """D0 of 2-3 records per category (the real study's 5% of 480): with the testbed's floor of 5
    no category may lose a record, so the re-mix is D0 unchanged; a floor of 1 lets EE-CPO move
    records from the categories Gamma says hurt the target to the one that helps it."""
    from jraise.study_beyond_iid import ee_cpo_subset
    from jraise.study_common import options_key

    names = [f"c{k}" for k in range(10)]
    categories = [names[k % 10] for k in range(480)]
    keys = [f"text {k}" for k in range(480)]
    d0 = np.arange(24)  # categories c0..c9: 3, 3, 3, 3, 2, 2, 2, 2, 2, 2 records
    gamma = np.full((10, 10), -0.1)
    gamma[:, 1] = 1.0  # every category's loss falls most with c1 records
    measured = {"names": names, "gamma": gamma.tolist(), "base_indices": d0.tolist()}
    config = StudyConfig(targets=("c0",), ee_cpo_edit=0.25, ee_cpo_max_change=0.34)
    chosen, plan = ee_cpo_subset(measured, categories, config, 0, keys)
    assert plan["edits"] == 0 and chosen.tolist() == d0.tolist()
    floor1 = StudyConfig(targets=("c0",), ee_cpo_edit=0.25, ee_cpo_max_change=0.34, ee_cpo_min_per_category=1)
    chosen, plan = ee_cpo_subset(measured, categories, floor1, 0, keys)
    # T = 6 edits; at most ceil(0.34 x 6) = 3 per category: c1 gains 3, others lose 3 in all.
    assert plan["edits"] > 0 and plan["counts_after"]["c1"] == 6 and len(chosen) == 24
    assert all(plan["counts_after"][n] >= 1 for n in names)
    assert sum(plan["counts_after"].values()) == 24
    assert [categories[i] for i in chosen].count("c1") == 6
    # Only EE-CPO's rows depend on the floor.
    assert options_key(config, "ee_cpo", ("gamma_", "ee_cpo_")) != options_key(floor1, "ee_cpo", ("gamma_", "ee_cpo_"))
    from jraise.study import settings_key

    assert settings_key(config, "dt_csft") == settings_key(floor1, "dt_csft")


def test_study_runs_end_to_end_and_resumes(tmp_path, study_work):
    from jraise.study import full_run_steps

    config = StudyConfig(methods=("random", "full", "longest", "full_run", "oracle"), full_run_epochs=2, **TINY)
    study_work(tmp_path, config)  # the base model, trained once for the module
    result = run_study(tmp_path, config, echo=lambda *_: None)
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"random", "full", "longest", "full_run", "oracle"}
    # The oracle reference trains on clean target records only.
    assert rows["oracle"]["noisy_share"] == 0.0 and rows["oracle"]["target_share"] == 1.0
    # "full" stops at the common budget; the "full_run" reference makes whole epochs over the pool.
    def last_step(method):
        lines = (tmp_path / "seed0" / method / "finetune" / "metrics.jsonl").read_text().splitlines()
        return max(json.loads(line)["step"] for line in lines)

    assert last_step("full") == config.steps
    assert last_step("full_run") == full_run_steps(config) == 2 * 35  # 280 records / batch 8, twice
    assert rows["full_run"]["target_share"] == rows["full"]["target_share"]
    pool = [json.loads(line) for line in open(tmp_path / "seed0" / "testbed" / "pool.jsonl")]
    noisy = np.mean([r["meta"]["noisy"] for r in pool])
    targets = np.mean([r["meta"]["category"] in config.targets for r in pool])
    # Full data trains on every record: its shares are the pool's.
    assert rows["full"]["noisy_share"] == pytest.approx(noisy)
    assert rows["full"]["target_share"] == pytest.approx(targets)
    # Longest picks the records with the most response tokens: never an empty-answer record.
    selected = [json.loads(line) for line in open(tmp_path / "seed0" / "longest" / "selection.jsonl")]
    assert len(selected) == round(0.1 * len(pool))
    assert min(len(r["output"]) for r in selected) >= np.median([len(r["output"]) for r in pool])
    for row in rows.values():
        assert 0 <= row["target_em"] <= 1 and 0 <= row["all_em"] <= 1 and np.isfinite(row["target_loss"])
    assert result["base"]["method"].startswith("base")
    # A second run reads the finished rows back instead of recomputing them.
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    again = run_study(tmp_path, config, echo=lambda *_: None)
    assert (tmp_path / "rows.jsonl").read_text().splitlines() == lines
    assert [r["total_seconds"] for r in again["rows"]] == [r["total_seconds"] for r in result["rows"]]


def test_demo_prints_table_and_verdict_and_writes_chart(tmp_path, study_work):
    from jraise.demo import run_demo

    said = []
    study_work(tmp_path, StudyConfig(**TINY))
    out = run_demo(tmp_path, methods=("random", "sspl"), echo=said.append, **TINY)
    text = "\n".join(said)
    assert "| random |" in text and "| sspl |" in text and "Verdict:" in text
    assert (tmp_path / "study.png").stat().st_size > 1000
    assert {e["method"] for e in out["summary"]} == {"random", "sspl"}


def test_ee_cpo_and_dt_csft_rows_share_one_gamma_and_keep_their_invariants(tmp_path, study_work):
    from jraise.select.curriculum import dependency_taxonomy

    config = StudyConfig(methods=("ee_cpo", "dt_csft"), **{**TINY, "fraction": 0.5, "gamma_steps": 3})
    study_work(tmp_path, config)
    result = run_study(tmp_path, config, echo=lambda *_: None)
    rows = {r["method"]: r for r in result["rows"]}
    measured = json.loads((tmp_path / "seed0" / "gamma" / "study_gamma.json").read_text())
    # One Gamma measurement per seed, counted in both rows' selection time.
    assert rows["ee_cpo"]["select_seconds"] >= measured["seconds"]
    assert rows["dt_csft"]["select_seconds"] >= measured["seconds"]
    pool = [json.loads(line) for line in open(tmp_path / "seed0" / "testbed" / "pool.jsonl")]
    names = measured["names"]
    assert sorted(names) == sorted({r["category"] for r in pool})
    gamma = np.array(measured["gamma"])
    assert gamma.shape == (len(names), len(names)) and np.allclose(np.diag(gamma), 1.0)

    # EE-CPO: |D0| records, counts as planned, at most max_change moved per category, value of a
    # source = mean of the target rows of Gamma, and no move from a more to a less valuable category.
    plan = json.loads((tmp_path / "seed0" / "ee_cpo" / "plan.json").read_text())
    d0 = measured["base_indices"]
    assert len(d0) == round(0.5 * len(pool)) and sum(plan["counts_after"].values()) == len(d0)
    rows_of_targets = [names.index(t) for t in config.targets]
    value = dict(zip(names, gamma[rows_of_targets].mean(axis=0)))
    assert plan["coefficients"] == pytest.approx(value)
    change = {n: plan["counts_after"][n] - plan["counts_before"][n] for n in names}
    assert plan["edits"] > 0 and max(abs(c) for c in change.values()) <= plan["max_change"]
    grown = [n for n in names if change[n] > 0]
    shrunk = [n for n in names if change[n] < 0]
    assert min(value[n] for n in grown) >= max(value[n] for n in shrunk) - 1e-9
    picked = [pool[i]["category"] for i in np.load(tmp_path / "seed0" / "ee_cpo" / "indices.npy")]
    assert {n: picked.count(n) for n in names} == {n: plan["counts_after"][n] for n in names}

    # DT-CSFT: steps x batch // 3 records, each exactly three times, tiers from the same Gamma.
    tiers = json.loads((tmp_path / "seed0" / "dt_csft" / "tiers.json").read_text())
    assert tiers == dependency_taxonomy(gamma, names, method="net_asymmetry").tiers
    assert sorted(set(tiers.values())) == [0, 1, 2]  # thirds of the asymmetry ranking
    order = np.load(tmp_path / "seed0" / "dt_csft" / "order.npy")
    n = config.steps * config.batch_size // 3
    assert len(order) == 3 * n and set(np.unique(order, return_counts=True)[1]) == {3}
    for row in rows.values():
        assert 0 <= row["target_em"] <= 1 and np.isfinite(row["target_loss"])
    # A rerun reads both rows back, and asking for the seed's Gamma again reads it from its file.
    stamp = (tmp_path / "seed0" / "gamma" / "study_gamma.json").stat().st_mtime_ns
    run_study(tmp_path, config, echo=lambda *_: None)
    from jraise.data.pool import load_pool
    from jraise.model import load_tokenizer
    from jraise.study import seed_data
    from jraise.study_beyond_iid import seed_gamma

    base_dir = tmp_path / "base" / "run" / "final"
    paths = seed_data(tmp_path, config, 0)
    again = seed_gamma(base_dir, load_pool(paths["pool"], load_tokenizer(base_dir), max_len=config.max_len), paths,
                       config, 0, tmp_path)
    assert again == measured
    assert (tmp_path / "seed0" / "gamma" / "study_gamma.json").stat().st_mtime_ns == stamp


def test_raise_rows_share_one_policy_and_differ_only_in_deployment(tmp_path, study_work):
    config = StudyConfig(methods=("raise", "raise_sampled"), **{**TINY, "raise_episodes": 1, "raise_steps": 2})
    study_work(tmp_path, config)
    result = run_study(tmp_path, config, echo=lambda *_: None)
    rows = {r["method"]: r for r in result["rows"]}
    stamp = json.loads((tmp_path / "seed0" / "raise_policy" / "study_settings.json").read_text())
    assert rows["raise"]["select_seconds"] == rows["raise_sampled"]["select_seconds"] == stamp["seconds"]
    top = json.loads((tmp_path / "seed0" / "raise" / "deployed" / "selections.json").read_text())
    drawn = json.loads((tmp_path / "seed0" / "raise_sampled" / "deployed" / "selections.json").read_text())
    assert (top["deployment"], drawn["deployment"]) == ("top_b", "sample")
    steps = config.steps
    assert np.shape(top["indices"]) == np.shape(drawn["indices"]) == (steps, config.batch_size)
    # Top-b of a fixed policy only changes through the availability feature; draws differ.
    assert top["indices"] != drawn["indices"]
    for picks in (top["indices"], drawn["indices"]):
        for batch in picks:
            assert len(set(batch)) == len(batch)  # no record twice in one batch


def test_rose_row_builds_its_pairs_from_the_base_models_answers(tmp_path, study_work):
    config = StudyConfig(methods=("rose",), influence_lora_rank=2, influence_proj_dim=16, **TINY)
    study_work(tmp_path, config)
    result = run_study(tmp_path, config, echo=lambda *_: None)
    assert [r["method"] for r in result["rows"]] == ["rose"]
    pairs = [json.loads(line) for line in open(tmp_path / "seed0" / "rose" / "val_pref_model.jsonl")]
    val = [json.loads(line) for line in open(tmp_path / "seed0" / "testbed" / "val_target.jsonl")]
    near_miss = [json.loads(line) for line in open(tmp_path / "seed0" / "testbed" / "val_pref_target.jsonl")]
    meta = json.loads((tmp_path / "seed0" / "rose" / "val_pref_model.jsonl.meta.json").read_text())
    assert len(pairs) == len(val) == meta["model_answer_pairs"] + meta["near_miss_fallbacks"]
    # Pair i is about val record i, chosen = its right answer; rejected = the base model's own answer,
    # or the testbed's near miss where the base answered right or with nothing (this 6-step base
    # stops at once: every record falls back).
    for i, (pair, record) in enumerate(zip(pairs, val)):
        assert pair["chosen"] == record["output"] and pair["category"] == record["category"] in config.targets
        assert (pair == near_miss[i]) == (i in meta["fallback_indices"])
    assert meta["near_miss_fallbacks"] == len(meta["skipped"]["empty"]) + len(meta["skipped"]["correct"])
    selection = json.loads((tmp_path / "seed0" / "rose" / "selection.jsonl.meta.json").read_text())
    assert selection["method"] == "rose" and len(selection["indices"]) == round(0.1 * 280)
    # The row carries the selection's recorded cost beside this call's wall time.
    row = result["rows"][0]
    assert row["select_recorded_seconds"] == pytest.approx(selection["seconds"]["total"])
    assert row["select_recorded_seconds"] > 0


def test_model_answer_pairs_of_a_model_that_answers_take_its_answers(tmp_path):
    from jraise.model import init_model, load_tokenizer, preset_config, save_model
    from jraise.study import _model_answer_pairs, seed_data

    config = StudyConfig(**TINY)
    paths = seed_data(tmp_path, config, 0)
    tok = load_tokenizer(paths["tokenizer"])
    model_config = preset_config("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
    save_model(init_model(model_config, seed=0), model_config, tmp_path / "m")  # random: answers, all wrong
    tok.save_pretrained(str(tmp_path / "m"))
    out = _model_answer_pairs(tmp_path / "m", paths, tmp_path / "pairs.jsonl")
    pairs = [json.loads(line) for line in open(out)]
    near_miss = [json.loads(line) for line in open(paths["val_pref_target"])]
    meta = json.loads((tmp_path / "pairs.jsonl.meta.json").read_text())
    assert meta == {**meta, "model_answer_pairs": len(pairs), "near_miss_fallbacks": 0, "fallback_indices": []}
    assert [p["chosen"] for p in pairs] == [p["chosen"] for p in near_miss]
    assert all(p["rejected"] != q["rejected"] for p, q in zip(pairs, near_miss))
