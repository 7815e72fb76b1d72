"""Shared set-up of the gradient-feature tests: a tiny testbed pool (the suite's `make_testbed`) and a
tiny LoRA model."""

import jax
import pytest
from flax import nnx

from jraise.data.pool import load_pool, load_preference_pool
from jraise.model import init_model, load_tokenizer, preset_config
from jraise.model.lora import LoRAConfig, add_lora


@pytest.fixture(scope="module")
def tiny_testbed_and_lora(tmp_path_factory, make_testbed):
    """``make(name, n_train) -> (root, pool, preference pool, tokenizer, LoRA model)``: a 3-category
    testbed (30% noise) and a tiny model with rank-2 adapters whose B factors are non-zero (as after
    warm-up), so every adapter leaf has a gradient. ``root``: an empty directory of the module's own."""

    def make(name: str, n_train: int):
        root = tmp_path_factory.mktemp(name)
        paths = make_testbed(n_train=n_train, noise=0.3, n_val_per_category=1, n_test_per_category=1,
                             categories=["first", "reverse", "add"])
        tok = load_tokenizer(paths["tokenizer"])
        pool = load_pool(paths["pool"], tok, max_len=256)
        pref = load_preference_pool(paths["val_pref"], tok, max_len=256)
        model = init_model(preset_config("tiny", vocab_size=len(tok)), seed=0)
        add_lora(model, LoRAConfig(rank=2, alpha=4.0))
        key = jax.random.key(3)
        for _, node in nnx.iter_graph(model):
            if isinstance(node, nnx.LoRAParam):
                key, sub = jax.random.split(key)
                node.value = 0.05 * jax.random.normal(sub, node.value.shape)
        return root, pool, pref, tok, model

    return make
