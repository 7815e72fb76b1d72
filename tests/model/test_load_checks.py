"""Degenerate models refused or flagged where they are loaded: NaN/infinite weights, a tokenizer
larger than the embedding table, a --max-len past max_position_embeddings."""

from __future__ import annotations

import os
import string
import subprocess
import sys

import numpy as np
import pytest

from jraise.model import init_model, load_model, load_tokenizer, preset_config, save_model
from jraise.model.config import read_config
from jraise.model.hf import (
    ModelError,
    check_model_inputs,
    check_tokenizer_fits,
    fit_max_len,
    tokenizer_size,
)
from jraise.model.tokenizer import build_char_tokenizer

BAD_TENSOR = "model.layers.1.mlp.down_proj.weight"


def _jraise(*args):
    env = {k: v for k, v in os.environ.items() if k != "JRAISE_DEBUG"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "jraise.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def _refused(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    # notes (such as a --max-len clamp) may come before the error line
    assert "Traceback" not in proc.stderr and 1 <= len(lines) <= 5 and any(ln.startswith("error: ") for ln in lines)
    return proc.stderr


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    build_char_tokenizer(out, [string.ascii_letters + string.digits + " .,"])
    return out


def _model(path, tok, vocab_size=None):
    config = preset_config("tiny", vocab_size=vocab_size or tokenizer_size(tok), eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    save_model(init_model(config, seed=0), config, path)
    tok.save_pretrained(str(path))
    return path


def _poison(model_dir, name: str, value: float, count: int = 1):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(model_dir / "model.safetensors"))
    names = [name] + sorted(n for n in tensors if n != name)[: count - 1]
    for n in names:
        tensors[n] = tensors[n].copy()
        tensors[n].flat[7] = value
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_naming_file_and_tensor(tmp_path, tok_dir, value):
    model_dir = _model(tmp_path / "m", load_tokenizer(tok_dir))
    _poison(model_dir, BAD_TENSOR, value)
    with pytest.raises(ModelError, match="NaN or infinite") as err:
        load_model(model_dir)
    assert str(model_dir / "model.safetensors") in str(err.value) and repr(BAD_TENSOR) in str(err.value)
    assert err.value.field == BAD_TENSOR


def test_several_bad_tensors_are_counted(tmp_path, tok_dir):
    model_dir = _model(tmp_path / "m", load_tokenizer(tok_dir))
    _poison(model_dir, BAD_TENSOR, np.nan, count=3)
    with pytest.raises(ModelError, match=r"and 2 more tensors"):
        load_model(model_dir, dtype="bfloat16")


def test_tokenizer_size_counts_added_tokens(tok_dir):
    tok = load_tokenizer(tok_dir)
    base = tokenizer_size(tok)
    assert base == len(tok)
    tok.add_tokens(["<extra_1>", "<extra_2>"])
    assert tokenizer_size(tok) == base + 2


def test_tokenizer_larger_than_the_embedding_table_is_refused(tmp_path, tok_dir):
    tok = load_tokenizer(tok_dir)
    config = preset_config("tiny", vocab_size=len(tok))
    check_tokenizer_fits(tok, config, tmp_path / "model")  # equal: fits
    check_tokenizer_fits(tok, preset_config("tiny", vocab_size=len(tok) + 64), tmp_path / "model")  # padded table
    tok.add_tokens(["<extra>"])
    with pytest.raises(ModelError) as err:
        check_tokenizer_fits(tok, config, tmp_path / "model")
    text = str(err.value)
    assert f"{len(tok)} tokens" in text and f"{len(tok) - 1} rows" in text
    assert str(tok_dir) in text and str(tmp_path / "model") in text


def test_max_len_is_clamped_to_max_position_embeddings(tmp_path, tok_dir):
    config = preset_config("tiny", vocab_size=100)
    assert fit_max_len(256, config) == (256, None)
    assert fit_max_len(100, config) == (100, None)
    usable, note = fit_max_len(2048, config, option="--max-len")
    assert usable == 256 and "--max-len 2048" in note and "max_position_embeddings (256)" in note
    tok = load_tokenizer(tok_dir)
    model_dir = _model(tmp_path / "m", tok)
    notes = []
    assert check_model_inputs(model_dir, tok, 4096, echo=notes.append) == read_config(model_dir).max_position_embeddings
    assert len(notes) == 1


def test_cli_refuses_a_model_with_nan_weights(tmp_path, tok_dir):
    model_dir = _model(tmp_path / "m", load_tokenizer(tok_dir))
    _poison(model_dir, BAD_TENSOR, np.nan)
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"instruction": "a b", "output": "c"}\n{"instruction": "d", "output": "e f"}\n')
    proc = _jraise("select", "perplexity", "--model", model_dir, "--pool", pool, "--out", tmp_path / "sel.jsonl",
                   "--fraction", "0.5")
    text = _refused(proc)
    assert str(model_dir / "model.safetensors") in text and BAD_TENSOR in text
    assert not (tmp_path / "sel.jsonl").exists()


def test_cli_less_refuses_a_tokenizer_larger_than_the_model(tmp_path, tok_dir):
    tok = load_tokenizer(tok_dir)
    model_dir = _model(tmp_path / "m", tok, vocab_size=len(tok) - 8)
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"instruction": "a b", "output": "c"}\n')
    proc = _jraise("select", "less", "--model", model_dir, "--pool", pool, "--val", pool, "--out",
                   tmp_path / "sel.jsonl", "--max-len", "64")
    text = _refused(proc)
    assert f"{len(tok)} tokens" in text and f"{len(tok) - 8} rows" in text and str(model_dir) in text
    work = tmp_path / "sel.jsonl.work"
    assert not any((work / name).exists() for name in ("model.json", "warmup", "features"))
