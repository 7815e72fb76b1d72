"""Nothing lost, nothing overwritten by surprise: outputs that would overwrite inputs, re-runs into
another run's directory, selections written as one commit, one process per run directory, prompts
past --max-len and messages that name the user's file. CLI cases run as a user runs them (a
subprocess), or in-process through the same `main` where only the refusal is checked."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jraise.cli import main, output_overlap

MAX_STDERR_LINES = 5


def _jraise(*args, cwd=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "JRAISE_DEBUG"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "jraise.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def _assert_short_error(stderr: str, *names: str) -> None:
    lines = stderr.strip().splitlines()
    assert 1 <= len(lines) <= MAX_STDERR_LINES and "Traceback" not in stderr, stderr
    assert lines[0].startswith("error: "), stderr
    for name in names:
        assert name in stderr, (name, stderr)


def _digest(path: Path) -> str:
    """sha256 of a file, or of every file under a directory (names and bytes)."""
    digest = hashlib.sha256()
    for item in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if item.is_file():
            digest.update(str(item.relative_to(path) if path.is_dir() else item.name).encode())
            digest.update(item.read_bytes())
    return digest.hexdigest()


def _main(args, capsys) -> tuple[int, str]:
    """The console entry point in-process: (exit status, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    return exit_.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def bed(make_testbed, make_model_dir):
    """A 40-record testbed and two tiny model directories (seeds 0 and 1, with the tokenizer): the
    suite's shared ones, read-only (every refusal below also checks that its input is unchanged)."""
    paths = make_testbed(n_train=40, n_val_per_category=2, n_test_per_category=1, categories=["first", "add"])
    return {"model": make_model_dir(paths["tokenizer"], seed=0), "other_model": make_model_dir(paths["tokenizer"], seed=1),
            **paths}


# ----------------------------------------------------------------------------------------------
# --out that is (or holds, or lies in) an input


def test_output_overlap_resolves_relative_parts_and_symlinks(tmp_path):
    data = tmp_path / "pool.jsonl"
    data.write_text("{}\n")
    (tmp_path / "link.jsonl").symlink_to(data)
    (tmp_path / "model").mkdir()
    assert output_overlap(tmp_path / "." / "pool.jsonl", False, data) == "is"
    assert output_overlap(tmp_path / "link.jsonl", False, data) == "is"
    assert output_overlap(tmp_path / "model" / "report.json", False, tmp_path / "model") == "inside"
    assert output_overlap(tmp_path, True, data) == "contains"
    assert output_overlap(tmp_path / "other.jsonl", False, data) is None
    assert output_overlap(tmp_path / "run", True, tmp_path / "model") is None


@pytest.mark.parametrize("spelling", ["same", "dot", "symlink"])
def test_select_random_onto_its_own_pool_is_refused_and_the_pool_kept(bed, tmp_path, spelling, capsys,
                                                                       monkeypatch):
    pool = tmp_path / "pool.jsonl"
    pool.write_bytes(bed["pool"].read_bytes())
    before = _digest(pool)
    out = {"same": "pool.jsonl", "dot": "./pool.jsonl", "symlink": "link.jsonl"}[spelling]
    if spelling == "symlink":
        (tmp_path / "link.jsonl").symlink_to(pool)
    args = ["select", "random", "--pool", "pool.jsonl", "--tokenizer", bed["tokenizer"], "--out", out,
            "--fraction", "0.1"]
    if spelling == "same":  # as a user runs it
        proc = _jraise(*args, cwd=tmp_path)
        code, stderr = proc.returncode, proc.stderr
    else:
        monkeypatch.chdir(tmp_path)
        code, stderr = _main(args, capsys)
    assert code == 2
    _assert_short_error(stderr, "--out", "--pool", "pool.jsonl")
    assert _digest(pool) == before and len(pool.read_text().splitlines()) == 40
    assert not (tmp_path / "pool.jsonl.meta.json").exists()


def _overlap_cases(bed, tmp: Path) -> dict[str, tuple[list, Path, tuple[str, ...]]]:
    """command -> (arguments, the input that must stay unchanged, names the message must hold)."""
    m, pool, val, tok = bed["model"], bed["pool"], bed["val"], bed["tokenizer"]
    gguf_dir = tmp / "gguf"
    gguf_dir.mkdir()
    (gguf_dir / "model.gguf").write_bytes(b"GGUF")
    (tmp / "run" / "final").mkdir(parents=True)
    (tmp / "run" / "final" / "config.json").write_text("{}")
    tiers = tmp / "tiers.json"
    tiers.write_text(json.dumps({"first": 0, "add": 2}))
    gamma = tmp / "gamma.json"
    gamma.write_text("{}")
    return {
        "train-into-model": (["train", "--model", m, "--data", pool, "--out", m], m, ("--out", "--model")),
        "train-holding-its-base": (["train", "--model", tmp / "run" / "final", "--data", pool, "--out", tmp / "run"],
                                   tmp / "run" / "final", ("--model", "inside the --out directory")),
        "eval-into-model-dir": (["eval", "--model", m, "--data", val, "--out", m / "report.json"], m,
                                ("--out", "inside the --model directory")),
        "eval-onto-data": (["eval", "--model", m, "--data", val, "--out", val], val, ("--out", "--data")),
        "pairs-onto-val": (["pairs", "--model", m, "--val", val, "--out", val], val, ("--out", "--val")),
        "less-onto-val": (["select", "less", "--model", m, "--pool", pool, "--val", val, "--out", val], val,
                          ("--out", "--val")),
        "rose-work-dir-in-model": (["select", "rose", "--model", m, "--pool", pool, "--val", val, "--out",
                                    tmp / "s.jsonl", "--work-dir", m / "work"], m, ("--work-dir", "--model")),
        "mixture-onto-gamma": (["select", "mixture", "--pool", pool, "--gamma", gamma, "--out", gamma], gamma,
                               ("--out", "--gamma")),
        "curriculum-onto-pool": (["curriculum", "--pool", pool, "--tiers", tiers, "--out", pool], pool,
                                 ("--out", "--pool")),
        "categories-onto-pool": (["categories", "--model", m, "--pool", pool, "--out", pool, "--k", "2"], pool,
                                 ("--out", "--pool")),
        "interactions-into-model": (["interactions", "--model", m, "--pool", pool, "--eval", val, "--out", m], m,
                                    ("--out", "--model")),
        "raise-into-model": (["select", "raise", "--model", m, "--pool", pool, "--val", val, "--out", m], m,
                             ("--out", "--model")),
        "sspl-into-model": (["select", "sspl", "--model", m, "--pool", pool, "--out", m, "--steps", "1",
                             "--batch-size", "1", "--lr", "1e-3"], m, ("--out", "--model")),
        "init-model-into-tokenizer": (["init-model", tok, "--tokenizer", tok], tok, ("OUT_DIR", "--tokenizer")),
        "convert-gguf-over-its-source": (["convert-gguf", gguf_dir / "model.gguf", gguf_dir, "--overwrite"],
                                         gguf_dir / "model.gguf", ("SRC", "OUT_DIR")),
    }


CASES = ["train-into-model", "train-holding-its-base", "eval-into-model-dir", "eval-onto-data", "pairs-onto-val",
         "less-onto-val", "rose-work-dir-in-model", "mixture-onto-gamma", "curriculum-onto-pool",
         "categories-onto-pool", "interactions-into-model", "raise-into-model", "sspl-into-model",
         "init-model-into-tokenizer", "convert-gguf-over-its-source"]


@pytest.mark.parametrize("case", CASES)
def test_every_writing_command_refuses_an_output_over_an_input(bed, tmp_path, capsys, case):
    args, kept, names = _overlap_cases(bed, tmp_path)[case]
    before = _digest(kept)
    code, stderr = _main(args, capsys)
    assert code == 2
    _assert_short_error(stderr, *names)
    assert _digest(kept) == before


def test_a_meta_file_beside_the_output_may_not_be_an_input(bed, tmp_path, capsys):
    val = tmp_path / "sel.jsonl.meta.json"
    val.write_bytes(bed["val"].read_bytes())
    code, stderr = _main(["select", "rds", "--model", bed["model"], "--pool", bed["pool"], "--val", val,
                          "--out", tmp_path / "sel.jsonl"], capsys)
    assert code == 2
    _assert_short_error(stderr, "--out's .meta.json", "--val")


# ----------------------------------------------------------------------------------------------
# Re-running train into another run's directory


def test_rerunning_a_finished_run_with_another_model_or_options_is_refused(bed, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--data", bed["pool"], "--out", run, "--max-steps", "2", "--batch-size", "4", "--max-len", "128",
              "--lr", "1e-3"]
    assert _main(["train", "--model", bed["model"], *common], capsys)[0] == 0
    final = _digest(run / "final")

    other = _jraise("train", "--model", bed["other_model"], *common)  # as a user runs it
    assert other.returncode == 2
    _assert_short_error(other.stderr, str(run), "starting weights", str(bed["other_model"]))

    code, stderr = _main(["train", "--model", bed["model"], *common, "--lora-rank", "2"], capsys)
    assert code == 2
    _assert_short_error(stderr, "trainable", "'full', now 'lora'")
    code, stderr = _main(["train", "--model", bed["model"], *common[:-4], "--max-len", "200", "--lr", "1e-3"],
                         capsys)
    assert code == 2
    _assert_short_error(stderr, "pool_fingerprint (the training data)")
    code, stderr = _main(["train", "--model", bed["model"], *common[:-2], "--lr", "2e-3"], capsys)
    assert code == 2
    _assert_short_error(stderr, "lr: saved 0.001, now 0.002")
    code, stderr = _main(["train", "--model", bed["model"], *common, "--selector", "raise", "--policy",
                          tmp_path / "policy", "--eval-data", bed["val"]], capsys)
    assert code == 2
    _assert_short_error(stderr, "holds a checkpointed training run")
    assert _digest(run / "final") == final  # nothing replaced

    assert _main(["train", "--model", bed["model"], *common], capsys)[0] == 0  # the same run: re-exported alike
    assert _digest(run / "final") == final


# ----------------------------------------------------------------------------------------------
# A selection's three files: one commit


def _random_selection(bed, out: Path, method: str = "random"):
    from jraise.jobs.baselines import run_baseline

    return run_baseline(method, bed["pool"], out, tokenizer_dir=bed["tokenizer"], fraction=0.1, max_len=128,
                        echo=None)


def test_a_failed_write_leaves_the_earlier_selection_whole(bed, tmp_path, monkeypatch):
    from jraise import atomic
    from jraise.data.selections import read_selection

    out = tmp_path / "sel.jsonl"
    _random_selection(bed, out)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert read_selection(out)["method"] == "random"

    calls = []
    real_fsync = os.fsync

    def full_disk_on_the_second_file(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", full_disk_on_the_second_file)
    with pytest.raises(OSError, match="No space left"):
        _random_selection(bed, out, "longest")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporaries, nothing new
    assert read_selection(out)["method"] == "random"


def test_a_selection_with_missing_or_foreign_files_reads_as_absent(bed, tmp_path):
    from jraise.data.selections import read_selection, selection_paths

    out = tmp_path / "sel.jsonl"
    _random_selection(bed, out)
    paths = selection_paths(out)
    complete = read_selection(out)
    assert complete is not None and complete["scores"].shape == (40,)

    scores = paths["scores"].read_bytes()
    paths["scores"].unlink()
    assert read_selection(out) is None  # records and meta without scores
    paths["scores"].write_bytes(scores)
    records = paths["selection"].read_bytes()
    paths["selection"].write_bytes(records.splitlines(keepends=True)[0])
    assert read_selection(out) is None  # another selection's records
    paths["selection"].unlink()
    assert read_selection(out) is None  # meta without records
    paths["selection"].write_bytes(records)
    assert read_selection(out) is not None
    _random_selection(bed, out, "full")  # no scores: an earlier scores file goes
    assert not paths["scores"].exists() and read_selection(out)["scores"] is None


# ----------------------------------------------------------------------------------------------
# One process per run directory


HOLD_LOCK = """
import sys, time
from jraise.lock import directory_lock
with directory_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_process_on_a_run_dir_exits_2_naming_the_holder(bed, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = _jraise("train", "--model", bed["model"], "--data", bed["pool"], "--out", run, "--max-steps", "1",
                       "--batch-size", "4", "--max-len", "128")
        assert proc.returncode == 2
        _assert_short_error(proc.stderr, str(run), f"process {holder.pid}", socket.gethostname(), "since")
        assert not (run / "metrics.jsonl").exists() and not (run / "train_config.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over(bed, tmp_path, capsys):
    from jraise.lock import LOCK_NAME, Holder

    run = tmp_path / "run"
    run.mkdir()
    stale = Holder(_dead_pid(), socket.gethostname(), time.time() - 60, "deadbeef")
    (run / LOCK_NAME).write_text(stale.to_json())
    code, stderr = _main(["train", "--model", bed["model"], "--data", bed["pool"], "--out", run, "--max-steps", "1",
                          "--batch-size", "4", "--max-len", "128"], capsys)
    assert code == 0, stderr
    assert not (run / LOCK_NAME).exists()  # released on exit
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


CONTEND = """
import sys, time
from jraise.lock import DirectoryLocked, acquire
try:
    acquire(sys.argv[1])
except DirectoryLocked:
    print("refused", flush=True)
else:
    print("won", flush=True)
    time.sleep(120)  # holds the lock until the test has every answer
"""


def test_of_many_contenders_for_a_stale_lock_exactly_one_wins(tmp_path):
    from jraise.lock import LOCK_NAME, Holder

    (tmp_path / LOCK_NAME).write_text(Holder(_dead_pid(), socket.gethostname(), time.time() - 60, "0").to_json())
    procs = [subprocess.Popen([sys.executable, "-c", CONTEND, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(6)]
    try:
        outcomes = sorted(p.stdout.readline().strip() for p in procs)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert outcomes == ["refused"] * 5 + ["won"]


def test_the_lock_is_released_on_an_exception_and_a_foreign_host_lock_kept(tmp_path):
    from jraise.lock import LOCK_NAME, DirectoryLocked, Holder, directory_lock

    with pytest.raises(RuntimeError, match="boom"):
        with directory_lock(tmp_path / "a"):
            with directory_lock(tmp_path / "a"):  # re-entrant within a process
                pass
            assert (tmp_path / "a" / LOCK_NAME).exists()
            raise RuntimeError("boom")
    assert not (tmp_path / "a" / LOCK_NAME).exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / LOCK_NAME).write_text(Holder(_dead_pid(), "another-host", time.time(), "1").to_json())
    with pytest.raises(DirectoryLocked, match="on host another-host"):
        with directory_lock(tmp_path / "b"):
            pass
    assert (tmp_path / "b" / LOCK_NAME).exists()


# ----------------------------------------------------------------------------------------------
# Messages name the user's file; prompts past --max-len never reach generation


def test_eval_names_the_users_file_and_line_not_a_temporary_copy(bed, tmp_path):
    records = [json.loads(line) for line in bed["val"].read_text().splitlines()[:3]]
    records[0]["id"] = records[2]["id"] = "same-id"  # one id, two contents
    data = tmp_path / "dup.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = _jraise("eval", "--model", bed["model"], "--data", data, "--kinds", "loss")
    assert proc.returncode == 2
    _assert_short_error(proc.stderr, "dup.jsonl: line 3", "'id'", "dup.jsonl: line 1")
    assert "records.jsonl" not in proc.stderr and "jraise-eval-" not in proc.stderr


def _with_long_prompt(bed, tmp_path) -> Path:
    records = [json.loads(line) for line in bed["val"].read_text().splitlines()[:3]]
    records[1]["instruction"] = "abc " * 200  # far past the tiny model's 256 positions
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return data


def test_pairs_refuses_a_prompt_past_max_len_or_skips_it(bed, tmp_path, capsys):
    data = _with_long_prompt(bed, tmp_path)
    proc = _jraise("pairs", "--model", bed["model"], "--val", data, "--out", tmp_path / "pairs.jsonl",
                   "--max-new-tokens", "4")
    assert proc.returncode == 2
    _assert_short_error(proc.stderr, "val.jsonl: record index 1", "field 'instruction'", "over-long", "--max-len")
    assert not (tmp_path / "pairs.jsonl").exists() and not (tmp_path / "pairs.jsonl.meta.json").exists()

    code, stderr = _main(["pairs", "--model", bed["model"], "--val", data, "--out", tmp_path / "pairs.jsonl",
                          "--max-new-tokens", "4", "--skip-bad"], capsys)
    assert code == 0, stderr
    assert "skipped 1 record of" in stderr and "record index 1" in stderr
    meta = json.loads((tmp_path / "pairs.jsonl.meta.json").read_text())
    assert meta["skipped"]["over-long"] == [1] and meta["n_records"] == 3


def test_eval_exact_match_refuses_a_prompt_past_max_len_or_skips_it(bed, tmp_path, capsys):
    data = _with_long_prompt(bed, tmp_path)
    args = ["eval", "--model", bed["model"], "--data", data, "--kinds", "exact_match", "--max-new-tokens", "4",
            "--max-len", "200"]
    proc = _jraise(*args)
    assert proc.returncode == 2
    _assert_short_error(proc.stderr, "val.jsonl: record index 1", "field 'instruction'", "196")
    code, stderr = _main([*args, "--skip-bad", "--out", tmp_path / "report.json"], capsys)
    assert code == 0, stderr
    assert "exact_match: skipped 1 record" in stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["exact_match"]["skipped"] == {"over-long": [1]} and report["exact_match"]["overall"]["n"] == 2
