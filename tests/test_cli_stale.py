"""Nothing stale, as a user runs it: a model or warmup run replaced at the same path is refused
(not reused) by `jraise select less`, and an edited CSV pool is read anew."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from jraise.model import init_model, load_tokenizer, preset_config, save_model
from jraise.jobs.influence import InfluenceRunConfig, run_influence_selection

SMALL = dict(fraction=0.1, warmup_fraction=0.25, warmup_epochs=1, warmup_lr=1e-3, warmup_batch_size=8,
             lora_rank=2, lora_alpha=4.0, lora_dropout=0.0, proj_dim=32, chunk=4, group=8)
LESS_OPTIONS = ["--fraction", "0.1", "--warmup-fraction", "0.25", "--warmup-epochs", "1", "--warmup-lr", "1e-3",
                "--warmup-batch-size", "8", "--lora-rank", "2", "--lora-alpha", "4", "--proj-dim", "32"]


def _jraise(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "JRAISE_DEBUG"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "jraise.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def _refused(proc) -> list[str]:
    """The stderr lines of a readable refusal (exit 2, at most 5 lines, no traceback)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and 1 <= len(lines) <= 5 and lines[0].startswith("error: ")
    return lines


def _write_model(path, tok, seed: int):
    config = preset_config("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    save_model(init_model(config, seed=seed), config, path)
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def less_run(tmp_path_factory, make_testbed):
    """A finished LESS selection (in process) whose work directory later runs reuse; --max-len
    above the tiny model's 256 positions."""
    root = tmp_path_factory.mktemp("stale")
    paths = make_testbed(n_train=40, noise=0.25, n_val_per_category=1, n_test_per_category=1,
                         categories=["first", "reverse", "add"])
    tok = load_tokenizer(paths["tokenizer"])
    model = _write_model(root / "model", tok, seed=0)
    out = root / "sel" / "sel.jsonl"
    lines = []
    run_influence_selection(model, paths["pool"], paths["val"], out,
                            InfluenceRunConfig(method="less", max_len=1000, **SMALL), echo=lines.append)
    return root, paths, tok, out, lines


def test_max_len_above_the_model_limit_is_clamped_with_a_note(less_run):
    _, _, _, out, lines = less_run
    assert lines[0] == ("note: --max-len 1000 is more than the model's max_position_embeddings (256); sequences are "
                        "limited to 256 tokens")
    assert json.loads(out.with_name("sel.jsonl.meta.json").read_text())["config"]["max_len"] == 256


def test_warmup_run_replaced_at_the_same_path_is_refused(less_run):
    """Features of a user's --warmup-run are keyed by its checkpoint's content: after the run is
    rewritten in place, the stored features are refused, naming the run fingerprint."""
    root, paths, _, out, _ = less_run
    run = root / "my-warmup"
    shutil.copytree(out.with_name("sel.jsonl.work") / "warmup", run)
    work, sel = root / "w-run", root / "sel-run" / "sel.jsonl"
    config = InfluenceRunConfig(method="less", max_len=256, **SMALL)
    run_influence_selection(root / "model", paths["pool"], paths["val"], sel, config, work_dir=work,
                            warmup_run=run, echo=lambda *_: None)
    meta = next(run.glob("checkpoints/*/meta/metadata"))
    meta.write_text(json.dumps(json.loads(meta.read_text()), indent=1))  # same checkpoint, other bytes
    before = sel.read_bytes()
    proc = _jraise("select", "less", "--model", root / "model", "--pool", paths["pool"], "--val", paths["val"],
                   "--out", sel, "--work-dir", work, "--warmup-run", run, "--max-len", "256", *LESS_OPTIONS)
    text = "\n".join(_refused(proc))
    assert str(work / "features") in text and "identity.run_fingerprint" in text
    assert sel.read_bytes() == before


def test_model_replaced_at_the_same_path_is_refused_naming_what_changed(less_run):
    """Today's failure: the old model's warmup and features reused for a new model, exit 0."""
    root, paths, tok, out, _ = less_run
    work = out.with_name("sel.jsonl.work")
    before = {p.name: p.read_bytes() for p in out.parent.iterdir() if p.is_file()}
    _write_model(root / "model", tok, seed=1)  # another model, same path, same config
    proc = _jraise("select", "less", "--model", root / "model", "--pool", paths["pool"], "--val", paths["val"],
                   "--out", out, "--max-len", "1000", *LESS_OPTIONS)
    text = "\n".join(_refused(proc))
    assert str(work) in text and "model.safetensors (changed)" in text and "config.json" not in text
    assert "--work-dir" in text
    assert {p.name: p.read_bytes() for p in out.parent.iterdir() if p.is_file()} == before  # selection kept


def test_csv_pool_edited_in_place_is_read_anew(tmp_path):
    """The first read (in process) is what filled the shared ``datasets`` cache before; the CLI
    run after an edit that keeps size and timestamps must see the new rows."""
    from jraise.data.pool import load_pool
    from jraise.model.tokenizer import build_char_tokenizer

    build_char_tokenizer(tmp_path / "tok", texts=["abcdefghijklmnopqrstuvwxyz,"])
    pool = tmp_path / "pool.csv"
    pool.write_text("instruction,output\nsay,aaa\nsay,bbb\n")
    stat = pool.stat()
    assert [r["output"] for r in load_pool(pool, load_tokenizer(tmp_path / "tok"), max_len=64).records] == ["aaa", "bbb"]
    pool.write_text("instruction,output\nsay,xyz\nsay,bbb\n")
    os.utime(pool, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    proc = _jraise("select", "random", "--pool", pool, "--tokenizer", tmp_path / "tok", "--fraction", "1",
                   "--out", tmp_path / "sel.jsonl")
    assert proc.returncode == 0, proc.stderr
    outputs = sorted(json.loads(line)["output"] for line in (tmp_path / "sel.jsonl").read_text().splitlines())
    assert outputs == ["bbb", "xyz"]


def test_work_directory_without_a_model_record_is_refused(less_run, tmp_path):
    """A work directory from before model records (or with a broken one) is not trusted."""
    from jraise.errors import JraiseError
    from jraise.jobs.influence import WORK_MODEL_FILE, check_work_model

    root = less_run[0]
    (tmp_path / "features").mkdir()
    with pytest.raises(JraiseError, match="no record of the model"):
        check_work_model(tmp_path, root / "model")
    (tmp_path / WORK_MODEL_FILE).write_text("{")
    with pytest.raises(JraiseError, match="not a readable model record"):
        check_work_model(tmp_path, root / "model")
    fresh = tmp_path / "fresh"
    assert check_work_model(fresh, root / "model") == json.loads((fresh / WORK_MODEL_FILE).read_text())["fingerprint"]
