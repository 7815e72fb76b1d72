"""Model fingerprints: by content (config.json and weights), not by path, for model, adapter and
run directories; any edit changes them, a copy elsewhere does not."""

import os
import shutil

import pytest

from jraise.model import init_model, preset_config, save_model
from jraise.model.fingerprint import changed_files, model_files, model_fingerprint, model_label, model_record


def _model(path, seed=0, max_shard_bytes=2 * 1024**3):
    config = preset_config("tiny", vocab_size=64)
    save_model(init_model(config, seed=seed), config, path, max_shard_bytes=max_shard_bytes)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("fp") / "model")


def test_same_content_elsewhere_same_fingerprint_other_weights_differ(model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    (copy / "tokenizer_config.json").write_text("{}")  # not part of the model's identity
    assert model_fingerprint(copy) == model_fingerprint(model_dir)
    assert model_label(copy) == f"{copy.resolve()} (fingerprint {model_fingerprint(model_dir)})"
    assert model_fingerprint(_model(tmp_path / "other", seed=1)) != model_fingerprint(model_dir)


def test_an_in_place_edit_keeping_size_and_mtime_changes_it(model_dir, tmp_path):
    """The failure a (path, size, mtime) key would miss: one byte of one weight flipped in place."""
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    weights = copy / "model.safetensors"
    before = model_record(copy)
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # the last tensor's last value, far from the header
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = model_record(copy)
    assert after["fingerprint"] != before["fingerprint"]
    assert changed_files(before["files"], after["files"]) == ["model.safetensors (changed)"]


def test_config_json_is_part_of_it(model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    before = model_record(copy)
    (copy / "config.json").write_text((copy / "config.json").read_text().replace('"rms_norm_eps": 1e-06',
                                                                                  '"rms_norm_eps": 1e-05'))
    after = model_record(copy)
    assert changed_files(before["files"], after["files"]) == ["config.json (changed)"]


def test_sharded_checkpoint_hashes_index_and_every_shard(tmp_path):
    sharded = _model(tmp_path / "sharded", max_shard_bytes=20_000)
    kind, root, names = model_files(sharded)
    assert kind == "model" and root == sharded
    assert "model.safetensors.index.json" in names and sum(n.endswith(".safetensors") for n in names) > 1
    before = model_record(sharded)
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    assert changed_files(before["files"], model_record(sharded)["files"]) == [f"{shard.name} (changed)"]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        model_fingerprint(sharded)


def test_adapter_and_run_directories(model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 2}')
    with pytest.raises(FileNotFoundError, match="without weights"):
        model_fingerprint(adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    assert model_files(adapter)[2] == ["adapter_config.json", "adapter_model.safetensors"]
    first = model_fingerprint(adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"Weights")
    assert model_fingerprint(adapter) != first

    run = tmp_path / "run"
    (run / "checkpoints" / "3" / "trainable").mkdir(parents=True)
    (run / "checkpoints" / "3" / "trainable" / "data").write_bytes(b"adapters")
    (run / "checkpoints" / "3" / "meta").write_text("{}")
    with pytest.raises(FileNotFoundError, match="without a finished final/"):
        model_fingerprint(run)
    assert model_files(run, step=3)[2] == ["checkpoints/3/meta", "checkpoints/3/trainable/data"]
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 4"):
        model_fingerprint(run, step=4)
    at_3 = model_fingerprint(run, step=3)
    (run / "checkpoints" / "3" / "trainable" / "data").write_bytes(b"retrained")
    assert model_fingerprint(run, step=3) != at_3
    shutil.copytree(model_dir, run / "final")  # a finished run stands for its final/ model
    assert model_fingerprint(run) == model_fingerprint(model_dir)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model_fingerprint(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither a model directory"):
        model_fingerprint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        model_fingerprint(tmp_path)


def test_changed_files_marks_new_and_gone():
    assert changed_files({"a": "1", "b": "2"}, {"a": "1", "c": "3"}) == ["b (gone)", "c (new)"]
    assert changed_files({"a": "1"}, {"a": "1"}) == []
