"""Model invariants: remat changes nothing numerically, masks, presets, sliding window."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jraise.model import PRESETS, init_model, parameter_count, preset_config
from jraise.model.transformer import causal_padding_mask, rope_inverse_frequencies


def _loss(model, ids):
    logp = jax.nn.log_softmax(model(ids)[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))


def test_remat_gives_identical_loss_and_gradients():
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 10)))
    plain = init_model(preset_config("tiny", vocab_size=50), seed=0)
    remat = init_model(preset_config("tiny", vocab_size=50, remat=True), seed=0)
    l1, g1 = nnx.value_and_grad(_loss)(plain, ids)
    l2, g2 = nnx.value_and_grad(_loss)(remat, ids)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)


def test_future_tokens_do_not_change_past_logits():
    model = init_model(preset_config("tiny", vocab_size=50), seed=1)
    ids = np.random.RandomState(1).randint(0, 50, (1, 12))
    changed = ids.copy()
    changed[0, 8:] = (changed[0, 8:] + 1) % 50
    a, b = np.asarray(model(jnp.asarray(ids))), np.asarray(model(jnp.asarray(changed)))
    np.testing.assert_allclose(a[0, :8], b[0, :8], rtol=1e-6)
    assert np.abs(a[0, 8:] - b[0, 8:]).max() > 1e-4


def test_sliding_window_mask():
    slots = jnp.arange(6)
    mask = np.asarray(causal_padding_mask(slots, slots, jnp.ones((1, 6), bool), sliding_window=2))[0]
    expected = np.array([[q - 2 < k <= q for k in range(6)] for q in range(6)])
    np.testing.assert_array_equal(mask, expected)


def test_llama3_rope_scaling_keeps_high_and_divides_low_frequencies():
    base = preset_config("tiny", vocab_size=10, head_dim=64, num_attention_heads=1, num_key_value_heads=1,
                         hidden_size=64, rope_theta=500000.0)
    scaled = base.replace(rope_scaling=tuple(sorted({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 64}.items())))
    f0, f1 = rope_inverse_frequencies(base), rope_inverse_frequencies(scaled)
    wavelen = 2 * np.pi / f0
    np.testing.assert_allclose(f1[wavelen < 16], f0[wavelen < 16])
    np.testing.assert_allclose(f1[wavelen > 64], f0[wavelen > 64] / 8)
    mid = (wavelen >= 16) & (wavelen <= 64)
    assert mid.any() and np.all((f1[mid] <= f0[mid]) & (f1[mid] >= f0[mid] / 8))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_abstractly(name):
    config = preset_config(name, vocab_size=128)
    model = nnx.eval_shape(lambda: init_model(config))
    assert parameter_count(model) > 0


def test_gqa_config_is_validated():
    with pytest.raises(ValueError, match="multiple"):
        preset_config("tiny", vocab_size=10, num_attention_heads=4, num_key_value_heads=3)


def test_initializer_range_sets_the_weight_std_and_round_trips_through_config_json():
    config = preset_config("tiny", vocab_size=64, initializer_range=0.08)
    model = init_model(config, seed=0)
    kernels = [np.asarray(model.embed_tokens[...]).ravel()]
    kernels += [np.asarray(layer.mlp.down_proj.kernel[...]).ravel() for layer in model.layers]
    std = np.concatenate(kernels).std()
    assert abs(std - 0.08) < 0.004  # ~6k draws: standard error of the std is about 0.0007
    hf = config.to_hf_dict()
    assert hf["initializer_range"] == 0.08
    assert type(config).from_hf_dict(hf).initializer_range == 0.08
    assert type(config).from_hf_dict({k: v for k, v in hf.items() if k != "initializer_range"}).initializer_range == 0.02
    with pytest.raises(ValueError, match="initializer_range"):
        preset_config("tiny", vocab_size=64, initializer_range=0.0)
