"""Model invariants: remat changes nothing numerically, masks, presets, sliding window, Qwen3."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jraise.model import PRESETS, ModelConfig, init_model, parameter_count, preset_config
from jraise.model.generate import generate, left_pad
from jraise.model.lora import LoRAConfig, add_lora, merge_lora
from jraise.model.transformer import causal_padding_mask, rope_inverse_frequencies, tapping


def _loss(model, ids):
    logp = jax.nn.log_softmax(model(ids)[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))


def test_remat_gives_identical_loss_and_gradients():
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 10)))
    plain = init_model(preset_config("tiny", vocab_size=50), seed=0)
    remat = init_model(preset_config("tiny", vocab_size=50, remat=True), seed=0)
    # Jitted, as training runs it (op by op, the backward pass of each model would compile every
    # operation separately).
    l1, g1 = nnx.jit(nnx.value_and_grad(_loss))(plain, ids)
    l2, g2 = nnx.jit(nnx.value_and_grad(_loss))(remat, ids)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)


def test_tapping_routes_the_named_projections_only_inside_the_block():
    """`tapping`: inside the block each named Projection returns tap(name, x, y) with x its input
    (compute dtype) and y its output; other projections, and every call after the block, are as
    before; a remat model is tapped too (remat skipped while tapped), under jit."""
    ids = jnp.asarray(np.random.RandomState(2).randint(0, 50, (2, 7)))
    for remat in (False, True):
        model = init_model(preset_config("tiny", vocab_size=50, remat=remat), seed=3)
        plain = np.asarray(model(ids))
        seen = {}

        def record(name, x, y):
            seen[name] = (x.shape, y.shape)
            return y

        with tapping(model, record):
            np.testing.assert_array_equal(np.asarray(model(ids)), plain)
        assert set(seen) == {f"layers.{i}.{p}" for i in range(2) for p in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")} | {"lm_head"}
        d, f = model.config.hidden_size, model.config.intermediate_size
        assert seen["layers.1.mlp.down_proj"] == ((2, 7, f), (2, 7, d))

        def zero_head(name, x, y):
            return jnp.zeros_like(y)

        @jax.jit
        def tapped(ids):
            with tapping(model, zero_head, frozenset({"lm_head"})):
                return model(ids)

        np.testing.assert_array_equal(np.asarray(tapped(ids)), 0.0)  # only the head was replaced
        with tapping(model, zero_head, frozenset({"layers.0.mlp.down_proj"})):
            changed = np.asarray(model(ids))
        assert np.abs(changed - plain).max() > 1e-6 and np.isfinite(changed).all()
        np.testing.assert_array_equal(np.asarray(model(ids)), plain)  # nothing left behind


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


def _qwen3_config(**overrides):
    # head_dim * heads = 64 != hidden 32, as in real Qwen3 checkpoints where they also differ.
    return preset_config("tiny", vocab_size=40, model_type="qwen3", head_dim=16, **overrides)


def _randomise_qk_norms(model, seed):
    rng = np.random.RandomState(seed)
    for layer in model.layers:
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
            norm.weight.value = jnp.asarray(1 + 0.3 * rng.randn(*norm.weight.shape), jnp.float32)


def test_qwen3_normalises_each_query_and_key_head_before_rope():
    model = init_model(_qwen3_config(), seed=0)
    attn = model.layers[0].self_attn
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (16,)
    assert attn.q_proj.kernel.shape == (32, 64) and attn.o_proj.kernel.shape == (64, 32)
    assert init_model(preset_config("tiny", vocab_size=40), seed=0).layers[0].self_attn.q_norm is None
    # Scaling a head's query projection leaves its RMS-normalised query, hence the logits, unchanged.
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 40, (2, 9)))
    before = np.asarray(model(ids))
    attn.q_proj.kernel.value = attn.q_proj.kernel[...] * 3.0
    attn.k_proj.kernel.value = attn.k_proj.kernel[...] * 0.5
    np.testing.assert_allclose(np.asarray(model(ids)), before, rtol=1e-4, atol=1e-5)


def test_qwen3_config_round_trips_through_config_json():
    for overrides in ({}, {"tie_word_embeddings": True, "attention_bias": True}):
        config = _qwen3_config(**overrides)
        hf = config.to_hf_dict()
        assert hf["architectures"] == ["Qwen3ForCausalLM"] and hf["head_dim"] == 16
        assert hf["use_sliding_window"] is False and hf["attention_bias"] == config.attention_bias
        assert ModelConfig.from_hf_dict(hf) == config
    assert _qwen3_config(attention_bias=True).o_proj_bias  # Qwen3's attention_bias covers o_proj


@pytest.mark.parametrize("fields,field", [
    ({"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, "use_sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"layer_types": ["full_attention"]}, "layer_types"),
])
def test_qwen3_sliding_window_configs_are_refused_naming_the_field(fields, field):
    hf = {**_qwen3_config().to_hf_dict(), **fields}
    with pytest.raises(ValueError, match=rf"^model/config\.json: field '{field}'"):
        ModelConfig.from_hf_dict(hf, source="model/config.json")


def test_qwen3_configs_with_full_attention_everywhere_are_accepted():
    hf = _qwen3_config().to_hf_dict()
    for fields in ({"layer_types": ["full_attention"] * 2},
                   {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2},
                   {"use_sliding_window": False, "sliding_window": 8, "max_window_layers": 0}):
        assert ModelConfig.from_hf_dict({**hf, **fields}).sliding_window is None


def test_qwen3_cached_generation_equals_the_cache_free_argmax():
    model = init_model(_qwen3_config(tie_word_embeddings=True), seed=4)
    _randomise_qk_norms(model, 4)
    ids, mask = left_pad([[5, 6, 7, 8, 9], [12, 13], [20]], 0)
    tokens = np.asarray(generate(model, ids, mask, max_new_tokens=6, eos_token_ids=()).tokens)
    # Teacher-forcing the generated tokens through the cache-free path: by causality, the argmax at
    # each position is the greedy choice given the tokens before it.
    full_ids = np.concatenate([ids, tokens], 1)
    full_mask = np.concatenate([mask, np.ones_like(tokens)], 1)
    logits = model(jnp.asarray(full_ids), jnp.asarray(full_mask))
    greedy = np.asarray(jnp.argmax(logits[:, ids.shape[1] - 1:-1], -1))
    np.testing.assert_array_equal(tokens, greedy)


def test_lora_on_qwen3_adapts_the_projections_and_merges_exactly():
    model = init_model(_qwen3_config(), seed=5)
    _randomise_qk_norms(model, 5)
    ids = jnp.asarray(np.random.RandomState(5).randint(0, 40, (2, 8)))
    before = np.asarray(model(ids))
    add_lora(model, LoRAConfig(rank=4, alpha=8))
    np.testing.assert_array_equal(np.asarray(model(ids)), before)
    adapters = nnx.state(model, nnx.LoRAParam)
    assert len(jax.tree.leaves(adapters)) == 2 * 4 * 2  # (A, B) x q, k, v, o x 2 layers
    for layer in model.layers:  # the per-head norms are not projections: never adapted
        assert not isinstance(layer.self_attn.q_norm.weight, nnx.LoRAParam)
    for layer in model.layers:
        proj = layer.self_attn.o_proj
        proj.lora_b.value = jnp.asarray(np.random.RandomState(6).randn(*proj.lora_b.shape) * 0.1, jnp.float32)
    adapted = np.asarray(model(ids))
    assert np.abs(adapted - before).max() > 1e-4
    np.testing.assert_allclose(np.asarray(merge_lora(model)(ids)), adapted, rtol=1e-5, atol=1e-5)
