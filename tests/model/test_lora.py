"""LoRA: no-op at init, only adapters train, merged export equals model + adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jraise.model import init_model, load_model, preset_config, save_model
from jraise.model.lora import LoRAConfig, add_lora, has_lora, merge_lora


def _batch():
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(0, 64, (2, 12)))
    mask = jnp.asarray(np.array([[1] * 12, [1] * 7 + [0] * 5]))
    return ids, mask


def _loss(model, ids, mask):
    logits = model(ids, mask)
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:])


@pytest.mark.parametrize("targets", [("q_proj", "k_proj", "v_proj", "o_proj"),
                                     ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")])
def test_fresh_adapters_leave_logits_unchanged(targets):
    model = init_model(preset_config("tiny", vocab_size=64), seed=1)
    ids, mask = _batch()
    before = np.asarray(model(ids, mask))
    add_lora(model, LoRAConfig(rank=4, alpha=8, targets=targets))
    n_adapted = sum(1 for _, v in nnx.iter_graph(model) if isinstance(v, nnx.LoRAParam)) // 2
    assert n_adapted == len(targets) * 2  # two layers in the tiny preset
    np.testing.assert_array_equal(np.asarray(model(ids, mask)), before)


def test_gradient_step_changes_only_adapters():
    model = init_model(preset_config("tiny", vocab_size=64), seed=2)
    add_lora(model, LoRAConfig(rank=4, alpha=8))
    base_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.LoRAParam)))
    lora_before = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
    optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.LoRAParam)
    ids, mask = _batch()

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, ids, mask)
        optimizer.update(model, grads)
        return loss

    loss0 = step(model, optimizer)
    loss1 = step(model, optimizer)
    assert float(loss1) < float(loss0)
    base_after = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.LoRAParam)))
    jax.tree.map(np.testing.assert_array_equal, base_after, base_before)
    lora_after = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), lora_after, lora_before))
    assert all(changed)


def _trained_adapters(model):
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.LoRAParam):
            var.value = var.value + 0.05 * jax.random.normal(jax.random.key(hash(path) % 1000), var.shape)


def test_merged_export_equals_model_with_adapters(tmp_path):
    config = preset_config("tiny", vocab_size=64, tie_word_embeddings=True)
    model = init_model(config, seed=3)
    add_lora(model, LoRAConfig(rank=2, alpha=4, targets=("q_proj", "v_proj", "down_proj")))
    _trained_adapters(model)
    ids, mask = _batch()
    with_adapters = np.asarray(model(ids, mask))
    save_model(model, config, tmp_path)  # merges on export, leaves the model untouched
    assert has_lora(model)
    exported, _ = load_model(tmp_path)
    np.testing.assert_allclose(np.asarray(exported(ids, mask)), with_adapters, rtol=1e-5, atol=1e-5)
    merge_lora(model)
    assert not has_lora(model)
    np.testing.assert_allclose(np.asarray(model(ids, mask)), with_adapters, rtol=1e-5, atol=1e-5)


def test_dropout_is_active_in_training_only():
    model = init_model(preset_config("tiny", vocab_size=64), seed=4)
    add_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.5))
    _trained_adapters(model)
    ids, mask = _batch()
    model.eval()
    a, b = np.asarray(model(ids, mask)), np.asarray(model(ids, mask))
    np.testing.assert_array_equal(a, b)
    model.train()
    c = np.asarray(model(ids, mask))
    assert np.abs(c - a).max() > 1e-6


def test_bad_lora_config_names_the_problem():
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        LoRAConfig(targets=("qproj",))
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)
