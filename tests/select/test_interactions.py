"""Tests for the Beyond-IID interaction matrix (jraise.select.interactions) and its files (jraise.data.gamma)."""

import json
from pathlib import Path

import numpy as np
import pytest

from jraise.data.gamma import (
    ORIENTATION,
    cluster_order,
    load_digitized_fixture,
    load_gamma,
    save_gamma,
)
from jraise.select.interactions import interaction_matrix

FIXTURE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "beyond_iid_gamma_qwen.json"
needs_fixture = pytest.mark.skipif(
    not FIXTURE.is_file(), reason=f"digitized Beyond-IID fixture not found at {FIXTURE}"
)

# Three categories; accuracy-like metric.
BASE = np.array([0.50, 0.60, 0.70])
DELTAS = np.array([100.0, 50.0, 200.0])
# Row i: performance on targets 0, 1, 2 after adding DELTAS[i] records of category i.
INTER = np.array(
    [
        [0.60, 0.65, 0.68],  # +100 of cat 0
        [0.55, 0.70, 0.70],  # +50 of cat 1
        [0.52, 0.64, 0.90],  # +200 of cat 2
    ]
)


def test_interaction_matrix_matches_hand_computation():
    g = interaction_matrix(BASE, INTER, DELTAS, higher_is_better=True)
    # e_ij = (P_j(D^i) - P_j(D0)) / Delta_i, by hand:
    # e_00 = 0.10/100 = 1e-3, e_01 = 0.05/100 = 5e-4, e_02 = -0.02/100 = -2e-4
    # e_10 = 0.05/50  = 1e-3, e_11 = 0.10/50  = 2e-3, e_12 =  0.00/50  = 0
    # e_20 = 0.02/200 = 1e-4, e_21 = 0.04/200 = 2e-4, e_22 =  0.20/200 = 1e-3
    # Gamma[j, i] = e_ij / e_jj
    expected = np.array(
        [
            [1.0, 1e-3 / 1e-3, 1e-4 / 1e-3],  # target 0: sources 0, 1, 2
            [5e-4 / 2e-3, 1.0, 2e-4 / 2e-3],  # target 1
            [-2e-4 / 1e-3, 0.0, 1.0],  # target 2
        ]
    )
    np.testing.assert_allclose(g, expected, rtol=1e-9, atol=1e-12)
    assert np.array_equal(np.diag(g), np.ones(3))


def test_interaction_matrix_matches_direct_loops_random():
    rng = np.random.default_rng(3)
    c = 6
    base = rng.uniform(0, 1, c)
    deltas = rng.choice([-80.0, 40.0, 120.0], size=c)
    inter = base[None, :] + rng.normal(0, 0.05, (c, c))
    # Make sure each category's own effect is positive for its own sign of delta.
    inter[np.arange(c), np.arange(c)] = base + 0.2 * np.sign(deltas)
    g = interaction_matrix(base, inter, deltas)
    want = np.empty((c, c))
    for i in range(c):
        for j in range(c):
            e_ij = (inter[i, j] - base[j]) / deltas[i]
            e_jj = (inter[j, j] - base[j]) / deltas[j]
            want[j, i] = e_ij / e_jj
    np.testing.assert_allclose(g, want, rtol=1e-10)
    assert np.all(np.diag(g) == 1.0)


def test_lower_is_better_flips_sign():
    # Losses: lower is better. Using loss = 1 - accuracy gives the same Gamma.
    g_acc = interaction_matrix(BASE, INTER, DELTAS, higher_is_better=True)
    g_loss = interaction_matrix(1 - BASE, 1 - INTER, DELTAS, higher_is_better=False)
    np.testing.assert_allclose(g_loss, g_acc, rtol=1e-9, atol=1e-12)
    # And a loss read as higher-is-better has non-positive own effects -> refused.
    with pytest.raises(ValueError, match="not positive"):
        interaction_matrix(1 - BASE, 1 - INTER, DELTAS, higher_is_better=True)


def test_degenerate_self_effect_names_category_or_clips():
    inter = INTER.copy()
    inter[1, 1] = BASE[1]  # e_11 = 0
    with pytest.raises(ValueError, match="'b' \\(index 1\\)"):
        interaction_matrix(BASE, inter, DELTAS, names=["a", "b", "c"])
    g = interaction_matrix(BASE, inter, DELTAS, self_effect_floor=1e-3)
    assert np.all(np.isfinite(g)) and np.all(np.diag(g) == 1.0)
    # Row 1 divided by the floor: Gamma[1, 0] = e_01 / 1e-3 = 5e-4 / 1e-3.
    assert g[1, 0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="self_effect_floor"):
        interaction_matrix(BASE, inter, DELTAS, self_effect_floor=0.0)


def test_interaction_matrix_input_errors():
    with pytest.raises(ValueError, match="Delta = 0"):
        interaction_matrix(BASE, INTER, np.array([1.0, 0.0, 1.0]), names=["a", "b", "c"])
    with pytest.raises(ValueError, match="shape"):
        interaction_matrix(BASE, INTER[:2], DELTAS)
    with pytest.raises(ValueError, match="non-finite"):
        interaction_matrix(BASE, np.where(INTER > 0.69, np.nan, INTER), DELTAS)


def _random_gamma(c, seed):
    rng = np.random.default_rng(seed)
    g = rng.uniform(-1, 1, (c, c))
    np.fill_diagonal(g, 1.0)
    return g


def test_save_and_load_roundtrip(tmp_path):
    names = ["Python, Java", "Math \"calc\"", "Summ", "QA"]  # commas and quotes survive CSV
    g = _random_gamma(4, 0)
    paths = save_gamma(g, names, tmp_path / "out")
    assert set(paths) == {"csv", "json", "png"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "gamma.csv",
        "gamma.json",
        "gamma_heatmap.png",
    ]  # no temporary files left behind
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(paths["json"].read_text())
    assert doc["orientation"] == ORIENTATION == "gamma[target][source]"
    for p in (paths["json"], paths["csv"], tmp_path / "out"):
        n2, g2 = load_gamma(p)
        assert n2 == names
        np.testing.assert_array_equal(g2, g)  # repr(float) round-trips exactly


def test_save_overwrites_atomically(tmp_path):
    save_gamma(_random_gamma(3, 1), ["a", "b", "c"], tmp_path)
    g = _random_gamma(3, 2)
    save_gamma(g, ["a", "b", "c"], tmp_path)
    np.testing.assert_array_equal(load_gamma(tmp_path / "gamma.csv")[1], g)
    assert len(list(tmp_path.iterdir())) == 3


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="names"):
        save_gamma(np.eye(3), ["a", "b"], tmp_path)
    with pytest.raises(ValueError, match="unique"):
        save_gamma(np.eye(2), ["a", "a"], tmp_path)


@pytest.mark.parametrize(
    "doc, field",
    [
        ({"matrix": [[1.0]]}, "'names'"),
        ({"names": ["a", "b"], "matrix": [[1.0, 0.0]]}, "'matrix'"),
        ({"names": ["a", "b"], "matrix": [[1.0, 0.0], [0.0, "x"]]}, r"'matrix'\[1\]\[1\]"),
        ({"names": ["a"], "matrix": [[1.0]], "orientation": "gamma[source][target]"}, "'orientation'"),
        ([1, 2], "top level"),
    ],
)
def test_load_gamma_json_errors_name_file_and_field(tmp_path, doc, field):
    p = tmp_path / "g.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=field) as err:
        load_gamma(p)
    assert str(p) in str(err.value)


def test_load_gamma_csv_errors(tmp_path):
    p = tmp_path / "g.csv"
    p.write_text("target\\source,a,b\nb,1,0\na,0,1\n")
    with pytest.raises(ValueError, match="'target'") as err:
        load_gamma(p)
    assert str(p) in str(err.value)
    p.write_text("target\\source,a,b\na,1,zz\nb,0,1\n")
    with pytest.raises(ValueError, match="column 'b'"):
        load_gamma(p)
    p.write_text("target\\source,a,b\na,1,0\n")
    with pytest.raises(ValueError, match="data rows"):
        load_gamma(p)
    with pytest.raises(FileNotFoundError):
        load_gamma(tmp_path / "missing.json")


def test_cluster_order_groups_blocks():
    # Two interleaved groups {0, 2, 4} and {1, 3, 5}: strong synergy inside, antagonism across.
    grp = np.array([0, 1, 0, 1, 0, 1])
    g = np.where(grp[:, None] == grp[None, :], 0.9, -0.8)
    g += 0.01 * np.arange(36).reshape(6, 6) / 36  # break exact ties
    np.fill_diagonal(g, 1.0)
    order = cluster_order(g)
    assert sorted(order.tolist()) == list(range(6))
    labels = grp[order]
    assert np.count_nonzero(np.diff(labels)) == 1  # each group contiguous


def _write_fixture(path, rows, m):
    path.write_text(json.dumps({"about": "test", "rows": rows, "cols": rows[::-1], "M": m}))


def test_load_digitized_fixture_synthetic(tmp_path):
    rows = ["a", "b", "c"]
    # Drawn cells: column order c, b, a; diagonal M[i][2 - i]; one hidden diagonal, one null.
    m = [
        [0.3, None, 1.01],  # row a: source c = 0.3, source b = null, source a = diag
        [0.2, 1.01, -0.4],  # row b: source c = 0.2, source b = diag, source a = -0.4
        [None, 0.5, 0.7],  # row c: diag hidden (null), source b = 0.5, source a = 0.7
    ]
    p = tmp_path / "fx.json"
    _write_fixture(p, rows, m)
    names, g = load_digitized_fixture(p)
    assert names == rows
    want = np.array([[1.0, 0.0, 0.3], [-0.4, 1.0, 0.2], [0.7, 0.5, 1.0]])
    np.testing.assert_array_equal(g, want)


def test_load_digitized_fixture_rejects_wrong_cols(tmp_path):
    p = tmp_path / "fx.json"
    p.write_text(json.dumps({"rows": ["a", "b"], "cols": ["a", "b"], "M": [[0, 1], [1, 0]]}))
    with pytest.raises(ValueError, match="'cols'"):
        load_digitized_fixture(p)


@needs_fixture
def test_load_shared_digitized_fixture():
    raw = json.loads(FIXTURE.read_text())
    names, g = load_digitized_fixture(FIXTURE)
    c = len(raw["rows"])
    assert c == 28 and names == raw["rows"] and g.shape == (c, c)
    assert np.all(np.diag(g) == 1.0)
    m = raw["M"]
    for i in range(c):
        for k in range(c):
            v = m[i][c - 1 - k]
            if i == k:
                # The drawn diagonal is the unit diagonal (digitized as ~1.01) or hidden.
                assert v is None or abs(v - 1.0) < 0.05
            elif v is None:
                assert g[i, k] == 0.0
            else:
                assert g[i, k] == v
    # A known hidden off-diagonal cell: row 'Concept Understanding', drawn column 9.
    assert m[9][9] is None
    assert g[9, names.index(raw["cols"][9])] == 0.0


# ---------------------------------------------------------------------------------------------
# Relative self-effect floor
# ---------------------------------------------------------------------------------------------

# Four categories, accuracy-like; category 3 is nearly learned: its own effect is tiny but positive.
BASE4 = np.array([0.50, 0.60, 0.70, 0.95])
DELTAS4 = np.array([100.0, 50.0, 200.0, 10.0])
INTER4 = np.array(
    [
        [0.60, 0.65, 0.68, 0.9510],  # +100 of cat 0
        [0.55, 0.70, 0.70, 0.9490],  # +50 of cat 1
        [0.52, 0.64, 0.90, 0.9520],  # +200 of cat 2
        [0.51, 0.61, 0.71, 0.9501],  # +10 of cat 3: e_33 = 1e-5
    ]
)


def _effects(base, inter, deltas):
    return (inter - base[None, :]) / deltas[:, None]  # e[source, target]


def test_relative_floor_divides_tiny_rows_by_r_times_median():
    e = _effects(BASE4, INTER4, DELTAS4)
    own = np.diag(e)  # 1e-3, 2e-3, 1e-3, 1e-5: all positive, median 1e-3
    assert np.all(own > 0) and own[3] == pytest.approx(1e-5)
    r = 0.25
    floor = r * np.median(own)  # 2.5e-4
    g = interaction_matrix(BASE4, INTER4, DELTAS4, relative_self_effect_floor=r)
    want = e.T / np.maximum(own, floor)[:, None]
    np.fill_diagonal(want, 1.0)
    np.testing.assert_allclose(g, want, rtol=1e-9, atol=1e-12)
    # Row 3 (nearly learned) is divided by the floor, not by its own effect 1e-5.
    assert g[3, 0] == pytest.approx(e[0, 3] / 2.5e-4)
    assert g[3, 2] == pytest.approx(e[2, 3] / 2.5e-4)
    # The other rows are unchanged (their own effects are above the floor).
    plain = interaction_matrix(BASE4, INTER4, DELTAS4)
    np.testing.assert_allclose(g[:3], plain[:3], rtol=1e-12)
    assert abs(plain[3, 0]) > 20 * abs(g[3, 0])  # the unfloored row is blown up
    # r = 1: every own effect below the median is raised to it.
    g1 = interaction_matrix(BASE4, INTER4, DELTAS4, relative_self_effect_floor=1.0)
    want1 = e.T / np.maximum(own, np.median(own))[:, None]
    np.fill_diagonal(want1, 1.0)
    np.testing.assert_allclose(g1, want1, rtol=1e-9, atol=1e-12)


def test_relative_floor_median_over_positive_own_effects_and_clips_non_positive():
    inter = INTER4.copy()
    inter[1, 1] = BASE4[1] - 0.01  # e_11 < 0: excluded from the median, clipped to the floor
    e = _effects(BASE4, inter, DELTAS4)
    own = np.diag(e)
    positive = own[own > 1e-12]  # 1e-3, 1e-3, 1e-5
    floor = 0.5 * np.median(positive)  # 5e-4
    with pytest.raises(ValueError, match="not positive"):  # no floor: still an error
        interaction_matrix(BASE4, inter, DELTAS4)
    g = interaction_matrix(BASE4, inter, DELTAS4, relative_self_effect_floor=0.5)
    want = e.T / np.maximum(own, floor)[:, None]
    np.fill_diagonal(want, 1.0)
    np.testing.assert_allclose(g, want, rtol=1e-9, atol=1e-12)
    assert g[1, 0] == pytest.approx(e[0, 1] / 5e-4)  # negative e_11 clipped, row sign kept


def test_relative_and_absolute_floor_take_the_max():
    e = _effects(BASE4, INTER4, DELTAS4)
    own = np.diag(e)
    rel = 0.1 * np.median(own)  # 1e-4
    for absolute, floor in ((1e-6, rel), (6e-4, 6e-4)):  # the larger of both floors wins
        g = interaction_matrix(BASE4, INTER4, DELTAS4, self_effect_floor=absolute,
                               relative_self_effect_floor=0.1)
        want = e.T / np.maximum(own, floor)[:, None]
        np.fill_diagonal(want, 1.0)
        np.testing.assert_allclose(g, want, rtol=1e-9, atol=1e-12)
    # The absolute floor alone applies to every own effect too (here all are positive).
    want = e.T / np.maximum(own, 6e-4)[:, None]
    np.fill_diagonal(want, 1.0)
    np.testing.assert_allclose(interaction_matrix(BASE4, INTER4, DELTAS4, self_effect_floor=6e-4), want,
                               rtol=1e-9, atol=1e-12)
    assert not np.allclose(want, interaction_matrix(BASE4, INTER4, DELTAS4))


def test_relative_floor_errors():
    for bad in (0.0, -0.5, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="relative_self_effect_floor"):
            interaction_matrix(BASE4, INTER4, DELTAS4, relative_self_effect_floor=bad)
    # No own effect is positive: the relative floor has no reference.
    flat = np.tile(BASE4, (4, 1)) - 0.01
    with pytest.raises(ValueError, match="relative_self_effect_floor.*none is positive"):
        interaction_matrix(BASE4, flat, DELTAS4, relative_self_effect_floor=0.5)
    # ... unless an absolute floor is given too: then it alone is used.
    g = interaction_matrix(BASE4, flat, DELTAS4, self_effect_floor=1e-3, relative_self_effect_floor=0.5)
    e = _effects(BASE4, flat, DELTAS4)
    want = e.T / 1e-3
    np.fill_diagonal(want, 1.0)
    np.testing.assert_allclose(g, want, rtol=1e-9, atol=1e-12)
