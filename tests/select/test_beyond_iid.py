"""Beyond-IID file jobs: `jraise select mixture` and `jraise curriculum` on testbed files."""

import json
from collections import Counter

import numpy as np
import pytest

from jraise.data.order import read_order
from jraise.testbed import CATEGORY_PREREQUISITES, write_testbed
from jraise.data.gamma import save_gamma
from jraise.jobs.beyond_iid import curriculum_job, mixture_job, read_categorised

CATS = ["first", "last", "upper", "reverse", "reverse_upper"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("biid")
    pool = write_testbed(root / "a", n_train=200, seed=0, n_val_per_category=1, n_test_per_category=1,
                         categories=CATS)["pool"]
    cand = write_testbed(root / "b", n_train=400, seed=1, n_val_per_category=1, n_test_per_category=1,
                         categories=CATS)["pool"]
    rng = np.random.default_rng(0)
    gamma = rng.normal(0, 0.3, (len(CATS), len(CATS)))
    np.fill_diagonal(gamma, 1.0)
    gamma[:, CATS.index("reverse")] += 1.0  # one source that helps every target: it should grow
    save_gamma(gamma, CATS, root / "gamma")
    return root, pool, cand


def test_mixture_job_budget_exact_edits_bounded_no_duplicates(files, tmp_path):
    root, pool, cand = files
    out = tmp_path / "mix.jsonl"
    meta = mixture_job(pool, root / "gamma" / "gamma.json", out, edit_fraction=0.05, candidates_file=cand, seed=3)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 200 == meta["budget"]
    assert meta["edits"] <= 2 * meta["edit_budget"] and meta["edit_budget"] == 10
    assert meta["counts_after"]["reverse"] > meta["counts_before"]["reverse"]
    assert len({json.dumps({k: v for k, v in r.items() if k != "id"}, sort_keys=True) for r in lines}) == len(lines)
    assert dict(Counter(r["category"] for r in lines)) == {k: v for k, v in meta["counts_after"].items() if v}
    assert len(meta["added_ids"]) == len(meta["removed_ids"])
    again = tmp_path / "again.jsonl"
    mixture_job(pool, root / "gamma" / "gamma.json", again, edit_fraction=0.05, candidates_file=cand, seed=3)
    assert again.read_bytes() == out.read_bytes()  # deterministic for a seed


def test_curriculum_job_every_example_three_times_base_early(files, tmp_path):
    root, pool, _ = files
    tiers = {c: min(2, len(CATEGORY_PREREQUISITES.get(c, ())) * 2) for c in CATS}
    (tmp_path / "tiers.json").write_text(json.dumps(tiers))
    out = tmp_path / "order.txt"
    meta = curriculum_job(pool, out, tiers_file=tmp_path / "tiers.json", seed=1)
    records = read_categorised(pool)
    ids = [records.ids[i] for i in read_order(out, records.ids)]
    assert Counter(ids) == {i: 3 for i in records.ids}
    cat = dict(zip(records.ids, records.categories))
    s1, s2, _ = meta["stage_lengths"]
    first, last = ids[:s1], ids[s1 + s2:]
    share = lambda part, tier: sum(tiers[cat[i]] == tier for i in part) / len(part)
    assert share(first, 0) > share(last, 0) and share(last, 2) > share(first, 2)
    # From Gamma instead of a tiers file.
    meta2 = curriculum_job(pool, tmp_path / "o2.txt", gamma_file=root / "gamma" / "gamma.csv")
    assert set(meta2["tiers"]) == set(CATS)


def test_missing_category_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"instruction": "a", "output": "b", "category": "x"}\n{"id": "r2", "instruction": "c", "output": "d"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl: line 2: field 'category'"):
        read_categorised(path)
    (tmp_path / "cats.json").write_text(json.dumps({"r2": "y"}))
    assert read_categorised(path, tmp_path / "cats.json").categories == ["x", "y"]
    with pytest.raises(ValueError, match="exactly one"):
        curriculum_job(path, tmp_path / "o.txt")
