"""Order files and exact copies through the command line, as a user runs it.

`jraise curriculum` writes an order that `jraise train --order` follows exactly, whatever the ids hold;
an order for another pool is refused; a pool with exact copies trains, selects and evaluates by
default, and `--dedupe` drops the copies.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

# Ids that one-per-line order files misread: end spaces, other examples' indices, a line break, quotes.
AWKWARD_IDS = ["7 ", " 3", "0", "two words", "line\nbreak", 'quote"d', "ünï", "1", "12", "{x}", "a\tb", "11"]


def _jraise(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "JRAISE_DEBUG"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "jraise.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def _short_error(proc, *named):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 5, proc.stderr
    for text in named:
        assert text in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def bed(tmp_path_factory, make_testbed, make_model_dir):
    """A pool of 12 records with awkward ids, its first 4 twice (exact copies: 16 examples), and a tiny
    model (the suite's shared directory: read-only)."""
    from jraise.model import load_tokenizer

    root = tmp_path_factory.mktemp("order_copies")
    paths = make_testbed(n_train=12, n_val_per_category=1, n_test_per_category=1, categories=["first", "upper"])
    records = [json.loads(line) for line in paths["pool"].read_text().splitlines()]
    for record, rid in zip(records, AWKWARD_IDS, strict=True):
        record["id"] = rid
    pool = root / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in records + records[:4]))
    model = make_model_dir(paths["tokenizer"], seed=0, bos_token_id=load_tokenizer(paths["tokenizer"]).bos_token_id)
    (root / "tiers.json").write_text(json.dumps({"first": 0, "upper": 2}))
    return {"root": root, "pool": pool, "model": model, "n": len(records)}


@pytest.fixture(scope="module")
def order(bed):
    out = bed["root"] / "order.jsonl"
    proc = _jraise("curriculum", "--pool", bed["pool"], "--tiers", bed["root"] / "tiers.json", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


def test_curriculum_order_is_followed_exactly_and_copies_train(bed, order, tmp_path):
    from jraise.train.checkpoint import load_meta
    from jraise.train.loop import order_fingerprint

    pool_ids = AWKWARD_IDS + [f"{rid}~2" for rid in AWKWARD_IDS[:4]]  # what the pool's examples are called
    entries = [json.loads(line) for line in order.read_text(encoding="utf-8").splitlines()[1:]]
    assert len(entries) == 3 * len(pool_ids)
    assert all(pool_ids[e["index"]] == e["id"] for e in entries)
    assert sorted(e["index"] for e in entries) == sorted(list(range(len(pool_ids))) * 3)
    proc = _jraise("train", "--model", bed["model"], "--data", bed["pool"], "--out", tmp_path / "run", "--order", order,
                   "--max-steps", 1, "--batch-size", 4, "--save-every", 1, "--max-len", 128)
    assert proc.returncode == 0, proc.stderr
    assert "4 exact copies" in proc.stderr  # one line about the copies
    followed = load_meta(tmp_path / "run")["order_fingerprint"]
    assert followed == order_fingerprint([np.array([e["index"] for e in entries], np.int64)])


def test_order_for_another_pool_or_ambiguous_is_refused(bed, order, tmp_path):
    proc = _jraise("train", "--model", bed["model"], "--data", bed["pool"], "--out", tmp_path / "run", "--order", order,
                   "--dedupe", "--max-steps", 1, "--max-len", 128)
    _short_error(proc, "order.jsonl: line 1: field 'pool_ids_sha256': written for another pool")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before training
    legacy = tmp_path / "legacy.json"
    legacy.write_text(json.dumps(["two words", 3]))  # 3: the index of one example, the id " 3" of another up to spaces
    proc = _jraise("train", "--model", bed["model"], "--data", bed["pool"], "--out", tmp_path / "run", "--order", legacy,
                   "--max-steps", 1, "--max-len", 128)
    _short_error(proc, "legacy.json: field '[1]':", "ambiguous")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_copies_evaluate_by_default_and_dedupe_drops_them_from_a_selection(bed, tmp_path):
    from typer.testing import CliRunner

    from jraise.cli import app

    n, runner = bed["n"], CliRunner()
    result = runner.invoke(app, ["select", "random", "--pool", str(bed["pool"]), "--tokenizer", str(bed["model"]),
                                 "--fraction", "1", "--out", str(tmp_path / "deduped.jsonl"), "--max-len", "128",
                                 "--dedupe"])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "deduped.jsonl").read_text().splitlines()) == n
    assert "dropped 4 exact copies" in result.output
    result = runner.invoke(app, ["eval", "--model", str(bed["model"]), "--data", str(bed["pool"]), "--kinds", "loss",
                                 "--out", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval.json").read_text())["loss"]["overall"]["n_examples"] == n + 4
