"""The fused policy-plus-learner episode equals a step-by-step Python loop; replay recomputes the
rollout's log-probabilities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jraise.data.pool import load_pool
from jraise.model import init_model, load_tokenizer, preset_config
from jraise.select.rl.episode import (
    EpisodeConfig,
    device_pool,
    make_episode,
    make_fused_step,
    replay,
    validation_loss,
)
from jraise.select.rl.policy import AcquisitionMLP, Critic, PolicyConfig
from jraise.select.rl.sampling import cluster_layout
from jraise.train.step import make_optimizer, param_dtypes, split_trainable


@pytest.fixture(scope="module")
def setup(make_testbed):
    paths = make_testbed(n_train=24, n_val_per_category=2, n_test_per_category=1, categories=["first", "upper", "add"])
    tok = load_tokenizer(paths["tokenizer"])
    pool = load_pool(paths["pool"], tok, max_len=128)
    val_pool = load_pool(paths["val"], tok, max_len=128)
    model = init_model(preset_config("tiny", vocab_size=len(tok)), seed=0)
    graphdef, trainable, frozen = split_trainable(model)
    tx, _ = make_optimizer(1e-3, total_steps=4, schedule="constant")
    rng = np.random.default_rng(0)
    static = jnp.asarray(rng.normal(size=(len(pool), 36)), jnp.float32)
    labels = np.array([["first", "upper", "add"].index(c) for c in pool.categories])
    layout = cluster_layout(labels, 3)
    vp = device_pool(val_pool)
    val = {"input_ids": vp.input_ids, "attention_mask": vp.attention_mask, "loss_mask": vp.loss_mask,
           "example_mask": jnp.ones(len(val_pool))}
    actor = AcquisitionMLP(PolicyConfig(output_scale=1.0), rngs=nnx.Rngs(1))
    critic = Critic(PolicyConfig(), rngs=nnx.Rngs(2))
    return dict(graphdef=graphdef, trainable=trainable, frozen=frozen, tx=tx, dtypes=param_dtypes(model),
                static=static, layout=layout, pool=device_pool(pool), val=val, actor=actor, critic=critic)


@pytest.mark.parametrize("stochastic", [True, False])
def test_fused_episode_equals_python_loop(setup, stochastic):
    s = setup
    config = EpisodeConfig(steps=4, per_cluster=2, stochastic=stochastic)
    actor_graphdef, actor_state = nnx.split(s["actor"])
    key = jax.random.key(5)
    episode = make_episode(s["graphdef"], s["tx"], s["dtypes"], actor_graphdef, config)
    opt0 = s["tx"].init(s["trainable"])
    trainable, _, rollout, _ = episode(actor_state, s["trainable"], opt0, s["frozen"], s["static"], s["layout"],
                                       s["pool"], s["val"], key)
    step = jax.jit(make_fused_step(s["graphdef"], s["tx"], s["dtypes"], actor_graphdef, config))
    val0 = validation_loss(s["graphdef"], s["dtypes"], s["trainable"], s["frozen"], s["val"])
    carry = (s["trainable"], s["tx"].init(s["trainable"]), jnp.zeros(len(s["static"])), val0)
    for t in range(1, 5):
        carry, out = step(actor_state, carry, t, key, s["static"], s["layout"], s["pool"], s["val"], s["frozen"])
        np.testing.assert_array_equal(out["indices"], rollout.indices[t - 1])
        np.testing.assert_allclose(out["val_loss"], rollout.val_losses[t - 1], rtol=1e-5)
        np.testing.assert_allclose(out["logp"], rollout.logp[t - 1], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(carry[0]), jax.tree.leaves(trainable)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Each step's batch holds b items of each cluster; rewards telescope.
    labels = np.asarray(s["layout"].members)
    for t in range(4):
        idx = np.asarray(rollout.indices[t]).reshape(3, 2)
        for c in range(3):
            assert set(idx[c].tolist()) <= set(labels[c][labels[c] >= 0].tolist())
    np.testing.assert_allclose(float(rollout.rewards.sum()), float(rollout.val_loss0 - rollout.val_losses[-1]),
                               rtol=1e-5, atol=1e-6)
    # Replay under the same actor gives back the stored log-probabilities.
    logp, entropy, values = jax.jit(replay, static_argnums=5)(s["actor"], s["critic"], s["static"], s["layout"],
                                                              rollout, 1.0)
    np.testing.assert_allclose(logp, rollout.logp, rtol=1e-4, atol=1e-5)
    assert entropy.shape == (4, 3) and values.shape == (4,)
