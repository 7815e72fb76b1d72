"""A Gamma with an infinite, NaN or non-positive diagonal entry is refused, naming the file and the entry."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jraise.jobs.beyond_iid import curriculum_job, mixture_job
from jraise.select.curriculum import dependency_tiers
from jraise.data.gamma import load_gamma, save_gamma
from jraise.select.mixture import ee_cpo_plan

NAMES = ["math", "code", "summ"]


def _json_gamma(path, matrix):
    path.write_text(json.dumps({"names": NAMES, "orientation": "gamma[target][source]", "matrix": matrix}))
    return path


def _csv_gamma(path, rows):
    path.write_text("target\\source," + ",".join(NAMES) + "\n"
                    + "".join(f"{n}," + ",".join(r) + "\n" for n, r in zip(NAMES, rows)))
    return path


@pytest.mark.parametrize("text, detail", [
    ("NaN", "value nan is not finite"), ("Infinity", "value inf is not finite"), ("1e999", "is not finite"),
    ("-Infinity", "value -inf is not finite"),
])
def test_json_non_finite_entry_names_file_target_and_source(tmp_path, text, detail):
    path = tmp_path / "gamma.json"
    body = json.dumps({"names": NAMES, "matrix": [[1, 0, 0], [0, 1, 0.5], [0, 0, 1]]}).replace("0.5", text)
    path.write_text(body)
    with pytest.raises(ValueError) as err:
        load_gamma(path)
    assert str(err.value).startswith(f"{path}: field 'matrix'[1][2] (target 'code', source 'summ'): ")
    assert detail in str(err.value)


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_json_non_positive_diagonal_names_the_entry(tmp_path, value):
    path = _json_gamma(tmp_path / "gamma.json", [[1, 0, 0], [0, value, 0], [0, 0, 1]])
    with pytest.raises(ValueError) as err:
        load_gamma(path)
    assert str(err.value).startswith(f"{path}: field 'matrix'[1][1] (target = source = 'code'): diagonal entry "
                                     f"{value!r} is not positive")


@pytest.mark.parametrize("cell, detail", [("nan", "value 'nan' is not finite"), ("inf", "value 'inf' is not finite"),
                                          ("0", "diagonal entry 0.0 is not positive"),
                                          ("-0.5", "diagonal entry -0.5 is not positive")])
def test_csv_bad_diagonal_names_row_and_column(tmp_path, cell, detail):
    path = _csv_gamma(tmp_path / "gamma.csv", [["1", "0", "0"], ["0", "1", "0"], ["0", "0", cell]])
    with pytest.raises(ValueError) as err:
        load_gamma(path)
    assert str(err.value).startswith(f"{path}: row 4") and "column 'summ'" in str(err.value)
    assert detail in str(err.value)


def test_csv_with_a_byte_order_mark_reads_and_invalid_utf8_names_the_line(tmp_path):
    path = _csv_gamma(tmp_path / "gamma.csv", [["1", "0", "0"], ["0", "1", "0"], ["0", "0", "1"]])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_gamma(path)[0] == NAMES
    path.write_bytes(path.read_bytes().replace(b"summ,0,0,1", b"summ,0,0,\xff"))
    with pytest.raises(ValueError, match=r"gamma\.csv: line 4: invalid UTF-8"):
        load_gamma(path)


def test_save_refuses_what_load_would_refuse(tmp_path):
    g = np.eye(3)
    g[2, 2] = 0.0
    with pytest.raises(ValueError, match=r"gamma\[2, 2\] \(target = source = 'summ'\): diagonal entry 0.0"):
        save_gamma(g, NAMES, tmp_path / "out")
    g[2, 2], g[0, 1] = 1.0, np.inf
    with pytest.raises(ValueError, match=r"gamma\[0, 1\] \(target 'math', source 'code'\) is inf"):
        save_gamma(g, NAMES, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_array_checks_name_the_non_finite_entry():
    g = np.eye(3)
    g[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"gamma\[1, 0\] \(target 'code', source 'math'\) is nan"):
        dependency_tiers(g, NAMES)
    with pytest.raises(ValueError, match=r"non-finite.*gamma\[1, 0\] is nan"):
        ee_cpo_plan(g, np.array([10, 10, 10]))


# ---------------------------------------------------------------------------------------------
# The jobs and the command line


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("gamma_pool")
    records = [{"instruction": f"q{k}", "output": f"a{k}", "category": NAMES[k % 3]} for k in range(30)]
    path = root / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    bad = _json_gamma(root / "bad_gamma.json", [[1, 0, 0], [0, -2, 0], [0, 0, 1]])
    return path, bad


def test_jobs_refuse_a_bad_gamma_file_and_write_nothing(pool, tmp_path):
    path, bad = pool
    for job in (lambda out: mixture_job(path, bad, out), lambda out: curriculum_job(path, out, gamma_file=bad)):
        with pytest.raises(ValueError, match=r"bad_gamma\.json: field 'matrix'\[1\]\[1\] \(target = source = 'code'\)"):
            job(tmp_path / "out.jsonl")
        assert not (tmp_path / "out.jsonl").exists()


def test_cli_bad_gamma_is_exit_2_naming_file_and_entry(pool, tmp_path):
    path, bad = pool
    env = {k: v for k, v in os.environ.items() if k != "JRAISE_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "jraise.cli", "curriculum", "--pool", str(path), "--gamma", str(bad),
                           "--out", str(tmp_path / "order.jsonl")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 5
    assert "bad_gamma.json: field 'matrix'[1][1] (target = source = 'code'): diagonal entry -2" in proc.stderr
    assert not (tmp_path / "order.jsonl").exists()
