"""LESS/ROSE scoring against a brute-force numpy implementation of the formula; Selection files."""

import json

import numpy as np
import pytest

from jraise.data.feature_store import FeatureStore
from jraise.data.selections import selection_to_jsonl, write_selection
from jraise.select.base import Selection, top_fraction
from jraise.select.influence import (checkpoint_weights, influence_scores, less, rose, select_by_influence,
                                     split_by_group)


def _brute_force(train, val, lrs, groups):
    """The LESS formula written out loop by loop."""
    w = np.array(lrs) / np.sum(lrs)
    n, m = train[0].shape[0], val[0].shape[0]
    score = np.zeros((n, m))
    for i in range(len(train)):
        for z in range(n):
            for v in range(m):
                a, b = train[i][z], val[i][v]
                score[z, v] += w[i] * a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    names = list(dict.fromkeys(groups))
    per_group = np.stack([score[:, [g == name for g in groups]].mean(axis=1) for name in names], axis=1)
    return per_group.max(axis=1)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_scores_equal_brute_force_less_formula(tmp_path):
    rng = np.random.default_rng(0)
    k, n, m, d = 3, 37, 9, 16
    train = [_unit(rng.normal(size=(n, d))).astype(np.float32) for _ in range(k)]
    val = [rng.normal(size=(m, d)).astype(np.float32) * 5 for _ in range(k)]  # unnormalised on purpose
    lrs = [2e-5, 1.5e-5, 0.5e-5]
    groups = ["a", "b", "a", "c", "b", "a", "c", "c", "b"]
    want = _brute_force(train, val, lrs, groups)
    got = influence_scores(train, val, checkpoint_weights(lrs), groups, block_rows=5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The same through memory-mapped stores (float16 rows: looser tolerance).
    mats = []
    for i, t in enumerate(train):
        store = FeatureStore.create_or_open(tmp_path / f"ckpt{i}", n=n, dim=d, identity={"i": i}, shard_rows=8)
        store.fill(lambda a, b, t=t: t[a:b], progress=False)
        mats.append(store.matrix())
    np.testing.assert_allclose(influence_scores(mats, val, checkpoint_weights(lrs), groups, block_rows=7), want,
                               atol=2e-3)


def test_per_group_scores_and_single_group_default():
    rng = np.random.default_rng(1)
    train = [_unit(rng.normal(size=(10, 4)))]
    val = [rng.normal(size=(3, 4))]
    final, per_group, names = influence_scores(train, val, [1.0], ["x", "y", "x"], return_groups=True)
    assert names == ["x", "y"] and per_group.shape == (10, 2)
    np.testing.assert_allclose(final, per_group.max(axis=1))
    one = influence_scores(train, val, [1.0])
    np.testing.assert_allclose(one, (train[0] @ _unit(val[0]).T).mean(axis=1), rtol=1e-5)


def test_checkpoint_weights_and_errors():
    np.testing.assert_allclose(checkpoint_weights([1, 3]), [0.25, 0.75])
    with pytest.raises(ValueError):
        checkpoint_weights([0, 0])
    with pytest.raises(ValueError, match="one weight per checkpoint"):
        influence_scores([np.zeros((2, 3))], [np.zeros((1, 3))] * 2, [1.0])
    with pytest.raises(ValueError, match="do not match"):
        influence_scores([np.zeros((2, 3)), np.zeros((2, 4))], [np.zeros((1, 3)), np.zeros((1, 4))], [0.5, 0.5])


def test_top_fraction_is_deterministic_with_ties():
    scores = np.array([0.1, 0.5, 0.5, 0.9, 0.2], np.float32)
    assert top_fraction(scores, k=3).tolist() == [3, 1, 2]
    assert top_fraction(scores, fraction=0.4).tolist() == [3, 1]
    assert len(top_fraction(scores, fraction=0.01)) == 1
    with pytest.raises(ValueError):
        top_fraction(np.array([np.nan, 1.0]), k=1)


def test_selection_files(tmp_path, testbed, testbed_tok):
    from jraise.data.pool import load_pool

    pool = load_pool(testbed["pool"], testbed_tok, max_len=256)  # the suite's standard 40-record testbed
    rng = np.random.default_rng(2)
    train = [_unit(rng.normal(size=(len(pool), 8)))]
    sel = rose(train, [rng.normal(size=(2, 8))], [1.0], pool.fingerprint, fraction=0.1, proj_dim=8)
    assert sel.method == "rose" and len(sel.indices) == 4
    written = write_selection(sel, pool, tmp_path / "out" / "sel.jsonl")
    lines = [json.loads(x) for x in written["selection"].read_text().splitlines()]
    assert lines == [pool.records[i] for i in sel.indices]
    meta = json.loads(written["meta"].read_text())
    assert meta["indices"] == sel.indices.tolist() and meta["config"]["proj_dim"] == 8
    np.testing.assert_array_equal(np.load(written["scores"]), sel.scores)
    other = less(train, [rng.normal(size=(2, 8))], [1.0], "another-pool")
    with pytest.raises(ValueError, match="this selection was made on pool"):
        selection_to_jsonl(other, pool, tmp_path / "x.jsonl")
    assert isinstance(other, Selection)


def test_raw_train_features_are_normalised_too():
    rng = np.random.default_rng(2)
    unit = _unit(rng.normal(size=(12, 6))).astype(np.float32)
    scale = rng.uniform(0.1, 50.0, size=(12, 1)).astype(np.float32)  # raw gradients have any norm
    val = [rng.normal(size=(4, 6)).astype(np.float32)]
    np.testing.assert_allclose(influence_scores([unit * scale], val, [1.0]), influence_scores([unit], val, [1.0]),
                               rtol=1e-5, atol=1e-6)


def test_split_by_group_gives_each_group_its_share_by_its_own_score():
    rng = np.random.default_rng(0)
    per_group = rng.normal(size=(50, 3)).astype(np.float32)
    picks = split_by_group(per_group, 10, names=["c", "a", "b"])
    assert len(picks) == len(set(picks.tolist())) == 10
    # names sorted: a (column 1) and b (column 2) get 4 and 3... k=10, G=3: the first in name order gets 4
    rounds = [picks[i:i + 3] for i in range(0, 10, 3)]
    assert [int(r[0]) for r in rounds[:1]] == [int(np.argmax(per_group[:, 1]))]  # a's best comes first
    # brute force: greedy round robin over the sorted names, each taking its best untaken row
    taken, expected, quota = set(), [], {1: 4, 2: 3, 0: 3}
    for round_ in range(4):
        for j in (1, 2, 0):
            if round_ < quota[j]:
                row = next(int(i) for i in np.lexsort((np.arange(50), -per_group[:, j])) if int(i) not in taken)
                taken.add(row)
                expected.append(row)
    assert picks.tolist() == expected


def test_split_by_group_one_group_is_top_k_and_errors():
    scores = np.array([0.1, 0.5, 0.5, -1.0, 2.0], np.float32)
    assert split_by_group(scores[:, None], 3).tolist() == top_fraction(scores, k=3).tolist()
    with pytest.raises(ValueError, match="cannot select"):
        split_by_group(scores[:, None], 6)
    with pytest.raises(ValueError, match=r"\[N, G\]"):
        split_by_group(scores, 2)


def test_select_by_influence_split_balances_targets_where_max_does_not():
    # train rows 0-5 align with group "x"'s validation direction far more than rows 6-11 with "y"'s
    d = 4
    x_dir, y_dir = np.eye(d)[0], np.eye(d)[1]
    train = np.stack([x_dir + 0.01 * i * np.eye(d)[2] for i in range(6)]
                     + [0.6 * y_dir + 0.8 * np.eye(d)[3] + 0.01 * i * np.eye(d)[2] for i in range(6)]).astype(np.float32)
    val = np.stack([x_dir, x_dir, y_dir, y_dir]).astype(np.float32)
    groups = ["x", "x", "y", "y"]
    top = select_by_influence("less", [train], [val], [1.0], "fp", fraction=4 / 12, groups=groups)
    split = select_by_influence("less", [train], [val], [1.0], "fp", fraction=4 / 12, groups=groups,
                                group_budget="split")
    assert set(top.indices.tolist()) <= set(range(6))
    assert sorted(split.indices.tolist()) == [0, 1, 6, 7]
    assert np.array_equal(top.scores, split.scores) and split.config["group_budget"] == "split"
    with pytest.raises(ValueError, match="group_budget"):
        select_by_influence("less", [train], [val], [1.0], "fp", groups=groups, group_budget="mean")


def test_less_and_rose_wrappers_pass_the_group_budget_on():
    rng = np.random.default_rng(1)
    train, val = rng.normal(size=(20, 6)).astype(np.float32), rng.normal(size=(4, 6)).astype(np.float32)
    groups = ["a", "a", "b", "b"]
    for fn, name in ((less, "less"), (rose, "rose")):
        split = fn([train], [val], [1.0], "fp", 0.3, groups, group_budget="split", note="x")
        direct = select_by_influence(name, [train], [val], [1.0], "fp", 0.3, groups, group_budget="split")
        assert split.indices.tolist() == direct.indices.tolist()
        assert split.config["group_budget"] == "split" and split.config["note"] == "x"
        assert fn([train], [val], [1.0], "fp", 0.3, groups).config["group_budget"] == "max"
    with pytest.raises(ValueError, match="group names"):
        split_by_group(rng.normal(size=(5, 2)), 2, names=["a"])
