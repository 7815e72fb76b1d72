"""Bad checkpoints get errors that name the file and the tensor or field."""

import json

import pytest
from safetensors.numpy import load_file, save_file

from jraise.model import init_model, load_model, preset_config, save_model


@pytest.fixture()
def saved(tmp_path):
    config = preset_config("tiny", vocab_size=30)
    save_model(init_model(config), config, tmp_path)
    return tmp_path


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_config_field(saved):
    _edit_config(saved, hidden_size=None)
    with pytest.raises(ValueError, match=r"config\.json.*'hidden_size'"):
        load_model(saved)


def test_wrongly_typed_config_field(saved):
    _edit_config(saved, num_hidden_layers="two")
    with pytest.raises(ValueError, match=r"config\.json.*'num_hidden_layers'"):
        load_model(saved)


def test_unsupported_model_type_lists_supported(saved):
    _edit_config(saved, model_type="gpt2")
    with pytest.raises(ValueError, match=r"'gpt2'.*supported: llama, mistral, qwen2"):
        load_model(saved)


def test_unsupported_rope_scaling(saved):
    _edit_config(saved, rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match=r"config\.json.*'rope_scaling'.*yarn"):
        load_model(saved)


def test_missing_tensor_is_named(saved):
    tensors = load_file(saved / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_model(saved)


def test_shape_mismatch_names_file_and_tensor(saved):
    _edit_config(saved, intermediate_size=48)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.down_proj\.weight' "
                                         r"has shape \(32, 64\), but config\.json implies \(32, 48\)"):
        load_model(saved)


def test_unexpected_tensor_is_named(saved):
    tensors = load_file(saved / "model.safetensors")
    tensors["model.layers.0.self_attn.rogue.weight"] = tensors["model.norm.weight"]
    save_file(tensors, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.rogue\.weight'"):
        load_model(saved)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    config = preset_config("tiny", vocab_size=30)
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path)


def test_resave_removes_stale_shards(saved):
    config = preset_config("tiny", vocab_size=30)
    model = init_model(config, seed=1)
    save_model(model, config, saved, max_shard_bytes=10_000)
    assert not (saved / "model.safetensors").exists()
    save_model(model, config, saved)
    assert (saved / "model.safetensors").exists()
    assert not list(saved.glob("model-*")) and not (saved / "model.safetensors.index.json").exists()
    load_model(saved)
