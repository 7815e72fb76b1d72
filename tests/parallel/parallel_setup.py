"""Shared set-up of the sharding tests: the same tiny testbed, model and inputs in every process.

Everything is a deterministic function of fixed seeds, so separate processes (the 8-device worker,
the 2 x 4 multi-process workers, the single-process reference) build identical inputs.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jraise.data.pool import load_pool
from jraise.testbed import write_testbed
from jraise.grads.features import FeatureConfig
from jraise.jobs.influence import feature_store
from jraise.grads.projection import ProjectionConfig
from jraise.model import init_model, load_tokenizer, preset_config
from jraise.model.lora import LoRAConfig, add_lora
from jraise.train.step import param_dtypes, split_trainable

FEATURES = FeatureConfig(projection=ProjectionConfig(dim=64, seed=3), chunk=2, group=16, n_buckets=2, shard_rows=16)


def testbed(root: Path, n_train: int = 40, categories=None) -> dict:
    paths = write_testbed(root, n_train=n_train, n_val_per_category=2, n_test_per_category=1, categories=categories)
    tok = load_tokenizer(paths["tokenizer"])
    return {"tok": tok, "tokenizer_dir": paths["tokenizer"], "pool": load_pool(paths["pool"], tok, max_len=128),
            "val": load_pool(paths["val"], tok, max_len=128),
            # One layer: every sharding rule of the preset (a layer's are all the same), a fifth less
            # compile time in each process.
            "config": preset_config("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id, num_hidden_layers=1)}


def feature_setup(root: Path) -> dict:
    """A LoRA model and Adam moments (a deterministic function of the weights) for train-side features."""
    data = testbed(root)
    model = init_model(data["config"], seed=0)
    add_lora(model, LoRAConfig(rank=4), seed=1)
    graphdef, trainable, frozen = split_trainable(model)
    moments = (jax.tree.map(lambda x: 0.1 * x + 0.01, trainable), jax.tree.map(lambda x: x * x + 0.02, trainable))
    return {**data, "graphdef": graphdef, "trainable": trainable, "frozen": frozen, "moments": moments,
            "dtypes": param_dtypes(model)}


def store_features(setup: dict, store_dir: Path, progress: bool = False):
    return feature_store(store_dir, setup["graphdef"], setup["trainable"], setup["frozen"], setup["pool"], FEATURES,
                         {"model": "tiny-lora"}, "sft", setup["moments"], dtypes=setup["dtypes"], progress=progress)


TRAIN = dict(lr=3e-3, epochs=1, batch_size=8, n_buckets=2, max_steps=3, seed=0)


def train_run(setup: dict, run_dir: Path):
    """3 full fine-tuning steps of a fresh tiny model on the set-up's pool, exported with its tokenizer."""
    from jraise.train import TrainConfig, train

    model = init_model(setup["config"], seed=0)
    return train(model, setup["pool"], TrainConfig(**TRAIN), run_dir, tokenizer_dir=setup["tokenizer_dir"])


def trained_params(model) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def episode_inputs(data: dict) -> dict:
    """Inputs of a 4-step RAISE episode over the testbed pool (3 clusters by category)."""
    from jraise.select.rl.episode import device_pool
    from jraise.select.rl.policy import AcquisitionMLP, PolicyConfig
    from jraise.select.rl.sampling import cluster_layout
    from jraise.train.step import make_optimizer

    pool = data["pool"]
    model = init_model(data["config"], seed=0)
    graphdef, trainable, frozen = split_trainable(model)
    tx, _ = make_optimizer(1e-3, total_steps=4, schedule="constant")
    names = sorted(set(pool.categories))
    labels = np.array([names.index(c) for c in pool.categories])
    vp = device_pool(data["val"])
    val = {"input_ids": vp.input_ids, "attention_mask": vp.attention_mask, "loss_mask": vp.loss_mask,
           "example_mask": jnp.ones(len(data["val"]))}
    actor = AcquisitionMLP(PolicyConfig(output_scale=1.0), rngs=nnx.Rngs(1))
    static = jnp.asarray(np.random.default_rng(0).normal(size=(len(pool), 36)), jnp.float32)
    return {"graphdef": graphdef, "trainable": trainable, "frozen": frozen, "tx": tx, "dtypes": param_dtypes(model),
            "static": static, "layout": cluster_layout(labels, len(names)), "pool": device_pool(pool), "val": val,
            "actor": actor}
