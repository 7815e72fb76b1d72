"""`export_model` copies only tokenizer files from the tokenizer (or base model) directory and
never follows a symlink out of it."""

from __future__ import annotations

import string

import pytest

from jraise.errors import JraiseError
from jraise.model import build_char_tokenizer, init_model, preset_config, save_model
from jraise.train import export_model
from jraise.train.checkpoint import tokenizer_files


@pytest.fixture()
def base(tmp_path):
    """A base model directory with its tokenizer, the base model's own files, and strays."""
    tok = build_char_tokenizer(tmp_path / "base", [string.ascii_lowercase])
    config = preset_config("tiny", vocab_size=len(tok))
    save_model(init_model(config, seed=0), config, tmp_path / "base")
    (tmp_path / "base" / "generation_config.json").write_text('{"max_new_tokens": 7}\n')
    with open(tmp_path / "base" / "huge.bin", "wb") as fh:  # a sparse 10 GB stray file
        fh.truncate(10 * 1024**3)
    (tmp_path / "base" / "notes.txt").write_text("not a model file\n")
    return tmp_path / "base", config


def test_only_tokenizer_files_are_copied(base, tmp_path):
    src, config = base
    names = [p.name for p in tokenizer_files(src)]
    assert names == ["chat_template.jinja", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    out = export_model(init_model(config, seed=1), tmp_path / "final", tokenizer_dir=src)
    assert sorted(p.name for p in out.iterdir()) == ["chat_template.jinja", "config.json", "generation_config.json",
                                                     "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_a_symlink_out_of_the_directory_is_refused_before_anything_is_written(base, tmp_path):
    src, config = base
    secret = tmp_path / "elsewhere" / "secret.json"
    secret.parent.mkdir()
    secret.write_text("{}")
    (src / "special_tokens_map.json").symlink_to(secret)
    with pytest.raises(JraiseError, match=r"special_tokens_map.json: a symlink to .*secret.json, outside"):
        export_model(init_model(config, seed=1), tmp_path / "final", tokenizer_dir=src)
    assert not (tmp_path / "final").exists()


def test_symlinks_inside_the_directory_and_into_a_hub_cache_blob_are_followed(tmp_path):
    repo = tmp_path / "models--org--name"
    snapshot = repo / "snapshots" / "abc123"
    build_char_tokenizer(tmp_path / "tok", ["ab"])
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (repo / "blobs" / f"sha-{name}").write_bytes((tmp_path / "tok" / name).read_bytes())
        (snapshot / name).symlink_to(f"../../blobs/sha-{name}")
    (snapshot / "chat_template.jinja").write_text((tmp_path / "tok" / "chat_template.jinja").read_text())
    (snapshot / "tokenizer.model").symlink_to(snapshot / "chat_template.jinja")  # inside the directory
    assert [p.name for p in tokenizer_files(snapshot)] == ["chat_template.jinja", "tokenizer.json",
                                                          "tokenizer.model", "tokenizer_config.json"]


def test_a_directory_without_tokenizer_files_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(JraiseError, match="no tokenizer files"):
        tokenizer_files(tmp_path / "empty")
