"""RAISE around a user's own learner (`jraise.select.rl.agnostic`): a pure-JAX linear regression
stands in for the user's model; the policy trains, is deterministic by key, resumes exactly, and
deploys through `raise_policy` in the user's loop; the static features and the cluster layout
built from plain arrays match jraise's own pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jraise.select.rl import features, trainer
from jraise.select.rl.agnostic import (
    RaiseConfig,
    cluster_layout,
    make_raise_episode,
    make_raise_step,
    static_features_from,
    train_raise_policy,
)
from jraise.select.rl.episode import EpisodeConfig
from jraise.select.rl.policy import PolicyConfig, fused_state, stage_features
from jraise.select.rl.sampling import cluster_layout as padded_layout
from jraise.select.rl.selector import StepInfo, raise_policy
from jraise.select.rl.trainer import PolicyBundle

# The user's problem: y = x . w* on 4 semantic clusters of 16 rows (their inputs drawn around
# different centres). In every cluster the last 8 rows are harmful: their labels are -x . w*
# plus noise, so training on them raises the loss on the clean validation set.
N, D, C, B_PER, T, LR = 64, 4, 4, 2, 8, 0.1
_rng = np.random.default_rng(0)
W_STAR = np.array([1.0, -2.0, 0.5, 1.5], np.float32)
LABELS = np.repeat(np.arange(C), N // C)
HARMFUL = np.tile(np.arange(N // C) >= N // (2 * C), C)
_centres = _rng.normal(size=(C, D))
X = jnp.asarray(_centres[LABELS] + 0.5 * _rng.normal(size=(N, D)), jnp.float32)
Y = jnp.asarray(np.where(HARMFUL, -(np.asarray(X) @ W_STAR) + _rng.normal(size=N), np.asarray(X) @ W_STAR),
                jnp.float32)
X_VAL = jnp.asarray(_rng.normal(size=(32, D)), jnp.float32)
Y_VAL = X_VAL @ jnp.asarray(W_STAR)


def learner_step(state, indices):
    """One SGD step of the user's linear model on pool rows ``indices`` (-1: padding, skipped)."""
    w, b = state
    real = (indices >= 0).astype(jnp.float32)
    rows = jnp.maximum(indices, 0)

    def loss(params):
        w, b = params
        err = X[rows] @ w + b - Y[rows]
        return jnp.sum(real * err**2) / jnp.maximum(real.sum(), 1.0)

    grads = jax.grad(loss)((w, b))
    return (w - LR * grads[0], b - LR * grads[1])


def learner_step_with_loss(state, indices):
    w, b = state
    real = (indices >= 0).astype(jnp.float32)
    loss = jnp.sum(real * (X[jnp.maximum(indices, 0)] @ w + b - Y[jnp.maximum(indices, 0)]) ** 2) / real.sum()
    return learner_step(state, indices), loss


def val_loss_fn(state):
    w, b = state
    return jnp.mean((X_VAL @ w + b - Y_VAL) ** 2)


STATE0 = (jnp.zeros(D, jnp.float32), jnp.zeros((), jnp.float32))
# Difficulty (4 numbers, as RAISE's) and an embedding the user computed with "their model": the
# inputs, the label and a noisy copy of the harmful flag.
DIFFICULTY = np.stack([np.linalg.norm(np.asarray(X), axis=1), np.abs(np.asarray(Y)), _rng.normal(size=N),
                       _rng.normal(size=N)], axis=1).astype(np.float32)
EMBEDDINGS = np.concatenate([np.asarray(X), np.asarray(Y)[:, None], HARMFUL[:, None] + 0.1 * _rng.normal(size=(N, 1)),
                             _rng.normal(size=(N, 2))], axis=1).astype(np.float32)
STATIC = static_features_from(DIFFICULTY, EMBEDDINGS)
LAYOUT = cluster_layout(LABELS)
CONFIG = RaiseConfig(episodes=3, steps=T, per_cluster=B_PER, policy_lr=1e-2)


@pytest.fixture(scope="module")
def trained():
    history_calls = []
    policy, history = train_raise_policy(learner_step, val_loss_fn, STATE0, STATIC, LAYOUT, CONFIG,
                                         jax.random.key(0), on_episode=history_calls.append)
    return policy, history, history_calls


def _params(policy: PolicyBundle):
    return jax.tree.leaves((nnx.state(policy.actor), nnx.state(policy.critic)))


def test_static_features_from_matches_static_features(monkeypatch):
    # static_features with its two model passes replaced by the given arrays: the same combination.
    monkeypatch.setattr(features, "difficulty_features", lambda *args: DIFFICULTY)
    monkeypatch.setattr(features, "pooled_embeddings", lambda *args: EMBEDDINGS)
    for dims in (32, 3):  # 32 > rank: PCA then zero columns; 3: plain PCA
        expected = features.static_features(None, None, 0, dims=dims)
        got = static_features_from(DIFFICULTY, EMBEDDINGS, dims=dims)
        assert got.shape == (N, 4 + dims) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)
    assert STATIC.shape == (N, PolicyConfig().static_dim)  # the paper's 36 -> the default 39-number state
    assert static_features_from(DIFFICULTY[:, 0], EMBEDDINGS, dims=2).shape == (N, 3)
    with pytest.raises(ValueError, match="rows"):
        static_features_from(DIFFICULTY[:10], EMBEDDINGS)


def test_cluster_layout_round_trips_labels():
    labels = np.array([2, 0, 1, 2, 2, 0, 1])
    layout = cluster_layout(labels)
    ref = padded_layout(labels, 3)
    np.testing.assert_array_equal(layout.members, ref.members)
    np.testing.assert_array_equal(layout.valid, ref.valid)
    back = np.full(len(labels), -1)
    for c, (row, valid) in enumerate(zip(np.asarray(layout.members), np.asarray(layout.valid))):
        back[row[valid]] = c
    np.testing.assert_array_equal(back, labels)
    assert cluster_layout(labels, 4).n_clusters == 4  # an explicit count keeps trailing empty clusters
    with pytest.raises(ValueError, match="integers"):
        cluster_layout(labels.astype(float))


def test_episode_scan_equals_python_loop_of_steps():
    config = EpisodeConfig(steps=T, per_cluster=B_PER)
    policy = trainer.fresh_policy(PolicyConfig(output_scale=1.0), jax.random.key(1))
    graphdef, actor_state = nnx.split(policy.actor)
    key = jax.random.key(5)
    state, rollout, losses = make_raise_episode(learner_step, val_loss_fn, graphdef, config)(
        actor_state, STATE0, STATIC, LAYOUT, key)
    assert losses is None
    step = jax.jit(make_raise_step(learner_step, val_loss_fn, graphdef, config))
    carry = (STATE0, jnp.zeros(N), val_loss_fn(STATE0))
    for t in range(1, T + 1):
        carry, out = step(actor_state, carry, t, key, STATIC, LAYOUT)
        np.testing.assert_array_equal(out["indices"], rollout.indices[t - 1])
        np.testing.assert_allclose(out["val_loss"], rollout.val_losses[t - 1], rtol=1e-6)
        np.testing.assert_allclose(out["logp"], rollout.logp[t - 1], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(carry[0]), jax.tree.leaves(state)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # Rewards are validation-loss decreases and telescope; the stage reads the loss before each step.
    np.testing.assert_allclose(float(rollout.rewards.sum()), float(rollout.val_loss0 - rollout.val_losses[-1]),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rollout.stages[:, 1], -jnp.concatenate([rollout.val_loss0[None],
                                                                      rollout.val_losses[:-1]]), rtol=1e-6)


def test_training_is_deterministic_by_key_and_records_history(trained):
    policy, history, calls = trained
    assert isinstance(policy, PolicyBundle) and policy.config.state_dim == 39
    assert [h["episode"] for h in history] == [1, 2, 3]
    for h in history:
        assert set(h) == {"episode", "return", "mean_reward", "val_loss0", "val_loss_final", "policy_loss",
                          "value_loss", "entropy"}
        assert all(np.isfinite(v) for v in h.values())
        np.testing.assert_allclose(h["return"], h["val_loss0"] - h["val_loss_final"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(h["mean_reward"], h["return"] / T)
    assert [len(p.history) for p in calls] == [1, 2, 3]
    again, history2 = train_raise_policy(learner_step, val_loss_fn, STATE0, STATIC, LAYOUT, CONFIG, jax.random.key(0))
    assert history2 == history
    for a, b in zip(_params(policy), _params(again)):
        np.testing.assert_array_equal(a, b)
    other, history3 = train_raise_policy(learner_step, val_loss_fn, STATE0, STATIC, LAYOUT, CONFIG, jax.random.key(1))
    assert history3 != history
    assert any(not np.array_equal(a, b) for a, b in zip(_params(policy), _params(other)))


def test_resume_continues_exactly_and_aux_losses_are_recorded(trained):
    policy, history, calls = trained
    resumed, history_r = train_raise_policy(learner_step, val_loss_fn, STATE0, STATIC, LAYOUT, CONFIG,
                                            jax.random.key(0), resume=calls[0])
    assert history_r == history
    for a, b in zip(_params(policy), _params(resumed)):
        np.testing.assert_array_equal(a, b)
    one = RaiseConfig(**{**CONFIG.__dict__, "episodes": 1})
    _, aux_history = train_raise_policy(learner_step_with_loss, val_loss_fn, STATE0, STATIC, LAYOUT, one,
                                        jax.random.key(0), learner_has_aux=True)
    assert np.isfinite(aux_history[0]["train_loss_mean"])
    assert aux_history[0]["return"] == history[0]["return"]  # the same episode, plus the learner's losses


def test_trained_policy_deploys_in_the_users_loop(trained):
    policy, _, _ = trained
    members = [set(row[valid].tolist()) for row, valid in zip(np.asarray(LAYOUT.members), np.asarray(LAYOUT.valid))]
    for stochastic in (False, True):
        selector = raise_policy(policy.actor, STATIC, LAYOUT, CONFIG.per_cluster, stage=policy.config.stage,
                                tau=policy.config.tau, stochastic=stochastic)
        assert selector.batch_size == C * B_PER
        select, step = jax.jit(selector.select), jax.jit(learner_step)
        state, sel_state = STATE0, selector.init(jax.random.key(0))
        for t in range(1, T + 1):
            indices, sel_state = select(sel_state, StepInfo(step=t, total_steps=T, val_loss=val_loss_fn(state)))
            idx = np.asarray(indices)
            assert idx.shape == (C * B_PER,) and idx.dtype == np.int32
            assert len(set(idx.tolist())) == idx.size and idx.min() >= 0 and idx.max() < N
            for c, chunk in enumerate(idx.reshape(C, B_PER)):  # b rows of every cluster, from that cluster
                assert set(chunk.tolist()) <= members[c]
            state = step(state, indices)
        assert np.isfinite(float(val_loss_fn(state)))
        assert float(sel_state.counts.sum()) == T * C * B_PER


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="columns"):
        train_raise_policy(learner_step, val_loss_fn, STATE0, STATIC[:, :10], LAYOUT, CONFIG, jax.random.key(0),
                           policy_config=PolicyConfig())
    with pytest.raises(ValueError, match="cluster"):
        train_raise_policy(learner_step, val_loss_fn, STATE0, STATIC, LAYOUT,
                           RaiseConfig(per_cluster=N // C + 1), jax.random.key(0))
    with pytest.raises(ValueError, match="stage"):
        train_raise_policy(learner_step, val_loss_fn, STATE0, STATIC, LAYOUT, CONFIG, jax.random.key(0),
                           policy_config=PolicyConfig(stage="progress_pair"))


def test_policy_learns_to_prefer_the_clean_rows_inside_clusters():
    """Per-cluster budgets fix every cluster's share, so what the policy can learn is which rows of
    each cluster to take: the first-pick probability mass on clean rows rises."""
    config = RaiseConfig(episodes=15, steps=T, per_cluster=B_PER, policy_lr=1e-2, entropy_coef=0.0)
    policy, history = train_raise_policy(learner_step, val_loss_fn, STATE0, STATIC, LAYOUT, config,
                                         jax.random.key(0))

    def clean_mass(actor):  # first-pick softmax mass on clean rows at step 1, mean over clusters
        state = fused_state(STATIC, jnp.zeros(N), stage_features(1, T, val_loss_fn(STATE0)))
        p = jax.nn.softmax(jnp.where(LAYOUT.valid, LAYOUT.gather(actor(state)), -jnp.inf), axis=1)
        return float((p * LAYOUT.gather(jnp.asarray(~HARMFUL, jnp.float32))).sum(axis=1).mean())

    initial = trainer.fresh_policy(policy.config, jax.random.key(0))
    before, after = clean_mass(initial.actor), clean_mass(policy.actor)
    assert abs(before - 0.5) < 0.05
    assert after > before + 0.1, (before, after, [round(h["return"], 3) for h in history])
