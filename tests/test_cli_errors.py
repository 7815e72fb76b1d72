"""The CLI's error boundary: expected failures are a short message and exit 2, bugs a traceback and exit 1."""

import os
import subprocess
import sys

import pytest

from jraise.errors import JraiseError, is_expected, short_message


def _jraise(*args, env=None, cwd=None):
    full_env = {k: v for k, v in os.environ.items() if k != "JRAISE_DEBUG"}
    full_env.update({"HF_HUB_OFFLINE": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "jraise.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=120)


def test_missing_input_file_is_a_short_message_and_exit_2(tmp_path):
    proc = _jraise("select", "mixture", "--pool", "no_such_file.jsonl", "--gamma", "g.json", "--out", "o.jsonl",
                   cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 5 and "Traceback" not in proc.stderr
    assert "no_such_file.jsonl" in proc.stderr and lines[0].startswith("error: ")
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(tmp_path, how):
    args = ["select", "mixture", "--pool", "no_such_file.jsonl", "--gamma", "g.json", "--out", "o.jsonl"]
    proc = _jraise(*(args + ["--debug"] if how == "flag" else args),
                   env={"JRAISE_DEBUG": "1"} if how == "env" else None, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr


def test_bad_option_value_is_a_usage_error(tmp_path):
    proc = _jraise("fetch", "no-such-target", "--cache", str(tmp_path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "no-such-target" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_bad_record_names_file_line_and_field(tmp_path):
    from jraise.model.tokenizer import build_char_tokenizer

    build_char_tokenizer(tmp_path / "tok", texts=["abc"])
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    proc = _jraise("select", "random", "--pool", str(pool), "--tokenizer", str(tmp_path / "tok"),
                   "--out", str(tmp_path / "sel.jsonl"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "pool.jsonl: line 2: field 'output'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 5


def _raise_value_error_here():
    raise ValueError("raised outside jraise")


def test_expected_is_jraise_checks_and_file_errors_not_foreign_value_errors():
    from jraise.train import TrainConfig

    with pytest.raises(ValueError) as ours:
        TrainConfig(lr=-1.0)
    assert is_expected(ours.value)
    with pytest.raises(ValueError) as foreign:
        _raise_value_error_here()
    assert not is_expected(foreign.value)
    with pytest.raises(FileNotFoundError) as missing:
        open("/no/such/file/anywhere")
    assert is_expected(missing.value)
    assert is_expected(JraiseError("x", path="p", record=3, field="f"))
    assert not is_expected(RuntimeError("bug"))


def test_short_message_is_short():
    text = short_message(ValueError("\n".join(f"line {i}" for i in range(20))), max_lines=4)
    lines = text.splitlines()
    assert len(lines) == 4 and lines[0] == "error: line 0" and lines[-1] == "..."
    assert "byte 3" in short_message(UnicodeDecodeError("utf-8", b"abc\xff", 3, 4, "invalid start byte"))
