"""jraise's own paths through the open core give the numbers they gave before it (issue 23).

The values below were computed by the code of commit f887eb3, before `make_fused_step`,
`make_episode` and `train_policy` became `make_raise_step`, `make_raise_episode` and
`train_raise_policy` around `episode.llm_learner`, and before `make_per_example_fn` ran through
`chunked_grads` (the model-agnostic per-example gradients). On the machine of the change they
matched bit for bit (BUILD_NOTES, "The open core"); the tolerance here (relative 1e-5) leaves room
for another CPU's float rounding, not for a changed computation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jraise.data.pool import load_pool
from jraise.grads.features import FeatureConfig, compute_features
from jraise.grads.projection import ProjectionConfig
from jraise.model import init_model, load_tokenizer, preset_config
from jraise.jobs.intervention import measure_interactions
from jraise.select.intervention import InterventionConfig
from jraise.select.rl.episode import device_pool
from jraise.select.rl.features import static_features
from jraise.select.rl.sampling import cluster_layout
from jraise.select.rl.trainer import RaiseConfig, train_policy
from jraise.testbed import write_testbed
from jraise.train.step import split_trainable

# RAISE: per episode (return, val_loss0, val_loss_final, train_loss_mean, policy_loss, value_loss,
# entropy); the actor's summed weights after 3 episodes.
RAISE_HISTORY = [[0.215591908, 5.53428936, 5.318697453, 5.491242409, -0.158635095, 0.002190759, 3.176096678],
                 [0.226454258, 5.53428936, 5.307835102, 5.504477501, -0.200989172, 0.000175895, 3.165629864],
                 [0.225651741, 5.53428936, 5.308637619, 5.449975967, -0.175921202, 0.000411803, 3.142330885]]
RAISE_ACTOR_SUM = 0.4332045552582713
HISTORY_KEYS = ("return", "val_loss0", "val_loss_final", "train_loss_mean", "policy_loss", "value_loss", "entropy")
# Beyond-IID: per run (base, then one per category) the per-category validation loss and train loss.
GAMMA_PERF = [[5.467505985, 5.404831568, 5.446943956], [5.467505985, 5.404831568, 5.446943956],
              [5.466218313, 5.399952888, 5.447453667], [5.467505985, 5.404831568, 5.446943956]]
GAMMA_TRAIN_LOSS = [[5.537380695, 5.564900875, 5.468745708], [5.537380695, 5.564900875, 5.468745708],
                    [5.537380695, 5.564900875, 5.5242486], [5.537380695, 5.564900875, 5.468745708]]
GAMMA_BASE = [2, 3, 4, 6, 18, 19, 20, 21, 23, 25, 26, 28, 29, 32, 33, 34, 36, 37, 38, 40, 42, 43, 44, 45]
# LESS features (SFT, dense d = 64, seed 0) of pool rows 0..7: the first four columns, and sum |f|.
FEATURES_HEAD = [[-0.330597281, 0.15102385, 0.601698339, 0.139035657],
                 [0.317485452, 0.670149326, -0.578523993, 0.040502831],
                 [-0.052256107, -0.650127172, 0.018484376, 0.286913216],
                 [0.313208163, 0.230131298, 0.98018378, 0.363037825],
                 [0.251155138, -0.656812847, -0.410315603, -0.364084154],
                 [0.500010431, 0.247552902, -0.131603837, 0.606079519],
                 [-0.543211222, -0.097104028, -0.045895293, -1.082365036],
                 [-0.322172225, -0.067909546, -0.370482713, 0.961671054]]
FEATURES_ABS_SUM = 194.9774169921875


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pins")
    paths = write_testbed(root / "tb", n_train=48, n_val_per_category=3, n_test_per_category=1,
                          categories=["first", "add", "reverse"])
    tok = load_tokenizer(paths["tokenizer"])
    pool = load_pool(paths["pool"], tok, max_len=128)
    val = load_pool(paths["val"], tok, max_len=128)
    config = preset_config("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                           num_hidden_layers=1)
    return tok, pool, val, config


def test_raise_policy_training_is_pinned(setup):
    tok, pool, val_pool, config = setup
    model = init_model(config, seed=0)
    static = static_features(model, pool, tok.eos_token_id)
    vp = device_pool(val_pool)
    val = {"input_ids": vp.input_ids, "attention_mask": vp.attention_mask, "loss_mask": vp.loss_mask,
           "example_mask": jnp.ones(vp.input_ids.shape[0])}
    layout = cluster_layout(np.arange(len(pool)) % 2, 2)
    raise_config = RaiseConfig(episodes=3, steps=4, per_cluster=2, llm_lr=3e-3, policy_lr=3e-3)
    policy, history = train_policy(model, jnp.asarray(static), layout, device_pool(pool), val, raise_config,
                                   progress=False)
    assert [h["episode"] for h in history] == [1, 2, 3] and "mean_reward" not in history[0]
    np.testing.assert_allclose([[h[k] for k in HISTORY_KEYS] for h in history], RAISE_HISTORY, rtol=1e-5, atol=1e-7)
    actor_sum = sum(np.asarray(x, np.float64).sum() for x in jax.tree.leaves(nnx.state(policy.actor)))
    assert actor_sum == pytest.approx(RAISE_ACTOR_SUM, rel=1e-5)


def test_beyond_iid_runs_are_pinned(setup):
    _, pool, val_pool, config = setup
    model = init_model(config, seed=0)
    intervention = InterventionConfig(delta_fraction=0.25, base_fraction=0.5, steps=3, batch_size=4, lr=3e-3,
                                      warmup_ratio=0.0, n_buckets=1, eval_batch_size=8, seed=3,
                                      self_effect_floor=1e-6)
    result = measure_interactions(model, pool, val_pool, intervention, out_dir=None, progress=False)
    assert np.asarray(result["base_indices"]).tolist() == GAMMA_BASE
    np.testing.assert_allclose(result["perf"], GAMMA_PERF, rtol=1e-5)
    np.testing.assert_allclose(result["train_loss"], GAMMA_TRAIN_LOSS, rtol=1e-5)


def test_less_features_are_pinned(setup):
    _, pool, _, config = setup
    graphdef, trainable, frozen = split_trainable(init_model(config, seed=0))
    features = compute_features(graphdef, trainable, frozen, pool, np.arange(8),
                                FeatureConfig(projection=ProjectionConfig(dim=64, seed=0)), loss="sft")
    np.testing.assert_allclose(features[:, :4], FEATURES_HEAD, rtol=1e-5, atol=1e-7)
    assert float(np.abs(features).sum()) == pytest.approx(FEATURES_ABS_SUM, rel=1e-5)
