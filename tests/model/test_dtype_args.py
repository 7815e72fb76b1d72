"""Dtype arguments: names, JAX dtypes and NumPy dtypes all work, and are stored as names."""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jraise.model import ModelConfig, dtype_name, init_model, load_model, preset_config, save_model
from jraise.model.transformer import dtype_of

SPELLINGS = {
    "float32": ["float32", jnp.float32, np.float32, np.dtype("float32"), jnp.dtype("float32")],
    "bfloat16": ["bfloat16", jnp.bfloat16, ml_dtypes.bfloat16, jnp.dtype("bfloat16")],
}
UNSUPPORTED = [jnp.float16, "float16", np.dtype("int8"), "int8", jnp.float64, "fp32", "", None, 3]


@pytest.mark.parametrize("name,dtype", [(n, d) for n, ds in SPELLINGS.items() for d in ds])
def test_every_spelling_normalises_to_the_name(name, dtype):
    assert dtype_name(dtype) == name
    assert dtype_of(dtype) is dtype_of(name)
    config = preset_config("tiny", vocab_size=16, dtype=dtype, param_dtype=dtype)
    assert config.dtype == config.param_dtype == name
    assert type(config.dtype) is str


@pytest.mark.parametrize("dtype", UNSUPPORTED, ids=repr)
def test_unsupported_dtype_is_a_value_error_naming_it_and_the_supported_ones(dtype):
    with pytest.raises(ValueError, match=r"unsupported dtype .*supported: float32, bfloat16") as err:
        dtype_name(dtype)
    assert repr(dtype) in str(err.value)
    with pytest.raises(ValueError, match=r"param_dtype: unsupported dtype"):
        preset_config("tiny", vocab_size=16, param_dtype=dtype)


def test_config_from_jax_dtypes_equals_config_from_names_and_serialises():
    by_name = preset_config("tiny", vocab_size=16, dtype="bfloat16", param_dtype="bfloat16")
    by_dtype = preset_config("tiny", vocab_size=16, dtype=jnp.bfloat16, param_dtype=np.dtype(ml_dtypes.bfloat16))
    assert by_dtype == by_name and hash(by_dtype) == hash(by_name)
    assert json.loads(json.dumps(by_dtype.to_hf_dict()))["torch_dtype"] == "bfloat16"
    back = by_name.replace(dtype=jnp.float32, param_dtype=np.dtype("float32"))
    assert (back.dtype, back.param_dtype) == ("float32", "float32")
    assert ModelConfig(**{**vars(back), "dtype": jnp.bfloat16}).dtype == "bfloat16"
    with pytest.raises(ValueError, match="float16"):
        by_name.replace(dtype=jnp.float16)


def test_init_model_uses_a_config_built_from_a_jax_dtype():
    model = init_model(preset_config("tiny", vocab_size=16, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16))
    assert model.layers[0].mlp.up_proj.kernel.dtype == jnp.bfloat16
    assert model.embed_tokens.dtype == jnp.bfloat16
    assert model(jnp.zeros((1, 3), jnp.int32)).dtype == jnp.float32


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    config = preset_config("tiny", vocab_size=16)
    path = tmp_path_factory.mktemp("dtype_model")
    save_model(init_model(config, seed=0), config, path)
    return path


@pytest.mark.parametrize("dtype", ["bfloat16", jnp.bfloat16, jnp.dtype("bfloat16")], ids=repr)
def test_load_model_accepts_a_jax_dtype(saved_model, dtype):
    model, config = load_model(saved_model, dtype=dtype)
    assert (config.dtype, config.param_dtype) == ("bfloat16", "bfloat16")
    assert model.layers[0].self_attn.q_proj.kernel.dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", [None, "float32", jnp.float32, np.dtype("float32")], ids=repr)
def test_load_model_float32_spellings_and_default(saved_model, dtype):
    model, config = load_model(saved_model, dtype=dtype)
    assert config.dtype == "float32"
    assert model.layers[0].self_attn.q_proj.kernel.dtype == jnp.float32


def test_load_model_rejects_an_unsupported_dtype_without_blaming_config_json(saved_model):
    with pytest.raises(ValueError, match="unsupported dtype") as err:
        load_model(saved_model, dtype=jnp.float16)
    assert "float16" in str(err.value) and "config.json" not in str(err.value)
