"""Feature extraction into stores: equals the formula computed example by example; resumes
bit-identically after a kill; ROSE's exact DPO and reference-free features agree."""

import jax
import numpy as np
import pytest

from jraise.grads.features import (
    FeatureConfig,
    compute_features,
    zero_reference,
)
from jraise.grads.per_example import adam_precondition, example_grad_fn
from jraise.grads.projection import ProjectionConfig, dense_matrix, flatten_tree
from jraise.jobs.influence import feature_store
from jraise.train.step import split_trainable


@pytest.fixture(scope="module")
def setup(tiny_testbed_and_lora):
    root, pool, pref, _, model = tiny_testbed_and_lora("features", 30)
    graphdef, trainable, frozen = split_trainable(model)
    return root, pool, pref, graphdef, trainable, frozen


CONFIG = FeatureConfig(projection=ProjectionConfig(dim=32, seed=5, block_rows=64), chunk=2, group=4,
                       shard_rows=8)


def test_train_features_equal_the_formula_example_by_example(setup):
    _, pool, _, graphdef, trainable, frozen = setup
    mu = jax.tree.map(lambda x: 0.01 * np.ones_like(x), trainable)
    nu = jax.tree.map(lambda x: 1e-4 * np.ones_like(x), trainable)
    rows = np.array([5, 0, 17, 3, 29, 11, 8])
    got = compute_features(graphdef, trainable, frozen, pool, rows, CONFIG, "sft", moments=(mu, nu))
    grad = example_grad_fn(graphdef, "sft")
    from jraise.data.batching import make_batch

    p = None
    length = int(pool.lengths[rows].max())  # one shape: right padding does not change a gradient
    for k, i in enumerate(rows):
        batch = make_batch(pool, [i], length)
        g = jax.jit(grad)(trainable, frozen, {key: v[0] for key, v in batch.items() if key != "index"})
        flat = np.asarray(flatten_tree(adam_precondition(g, mu, nu)))
        if p is None:
            p = np.asarray(dense_matrix(CONFIG.projection.key(), len(flat), 32, "rademacher", 64))
        np.testing.assert_allclose(got[k], flat @ p, rtol=2e-4, atol=1e-6)


def test_without_the_first_moment_the_adam_feature_is_the_examples_own_term(setup):
    """``adam_first_moment=False``: (1-b1) g / sqrt(b2 nu + (1-b2) g^2 + eps), written out here
    (not through `adam_precondition`); the default keeps b1 mu, so the two differ when mu != 0."""
    _, pool, _, graphdef, trainable, frozen = setup
    mu = jax.tree.map(lambda x: 0.01 * np.ones_like(x), trainable)
    nu = jax.tree.map(lambda x: 1e-4 * np.ones_like(x), trainable)
    rows = np.array([4, 9, 21])
    got = compute_features(graphdef, trainable, frozen, pool, rows, CONFIG, "sft", moments=(mu, nu),
                           adam_first_moment=False)
    kept = compute_features(graphdef, trainable, frozen, pool, rows, CONFIG, "sft", moments=(mu, nu))
    grad = example_grad_fn(graphdef, "sft")
    from jraise.data.batching import make_batch

    length = int(pool.lengths[rows].max())
    for k, i in enumerate(rows):
        batch = make_batch(pool, [i], length)
        g = np.asarray(flatten_tree(jax.jit(grad)(trainable, frozen, {key: v[0] for key, v in batch.items()
                                                                       if key != "index"})))
        v = np.asarray(flatten_tree(nu))
        own = 0.1 * g / np.sqrt(0.999 * v + 0.001 * g * g + 1e-8)
        p = np.asarray(dense_matrix(CONFIG.projection.key(), len(g), 32, "rademacher", 64))
        np.testing.assert_allclose(got[k], own @ p, rtol=2e-4, atol=1e-6)
        cos = got[k] @ kept[k] / (np.linalg.norm(got[k]) * np.linalg.norm(kept[k]))
        assert cos < 0.99


def test_the_first_moment_flag_is_part_of_a_train_stores_identity(setup):
    root, pool, _, graphdef, trainable, frozen = setup
    moments = (jax.tree.map(lambda x: 0.01 * np.ones_like(x), trainable),
               jax.tree.map(lambda x: 1e-4 * np.ones_like(x), trainable))
    store = feature_store(root / "m1", graphdef, trainable, frozen, pool, CONFIG, {"ckpt": 1}, moments=moments,
                          progress=False)
    assert store.meta.identity["adam_first_moment"] is True
    with pytest.raises(ValueError, match="adam_first_moment"):
        feature_store(root / "m1", graphdef, trainable, frozen, pool, CONFIG, {"ckpt": 1}, moments=moments,
                      progress=False, adam_first_moment=False)
    # A store written before the flag existed (no key) held first-moment features: it reopens as such.
    import json

    meta_file = root / "m1" / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["identity"]["adam_first_moment"]
    meta_file.write_text(json.dumps(meta))
    feature_store(root / "m1", graphdef, trainable, frozen, pool, CONFIG, {"ckpt": 1}, moments=moments,
                  progress=False)
    with pytest.raises(ValueError, match="adam_first_moment"):
        feature_store(root / "m1", graphdef, trainable, frozen, pool, CONFIG, {"ckpt": 1}, moments=moments,
                      progress=False, adam_first_moment=False)


def test_killed_extraction_resumes_bit_identical(setup, monkeypatch):
    root, pool, _, graphdef, trainable, frozen = setup
    full = feature_store(root / "full", graphdef, trainable, frozen, pool, CONFIG, {"ckpt": 1}, progress=False)
    from jraise.jobs import influence

    real = influence.compute_features
    calls = []

    def dying(*args, **kwargs):
        calls.append(args[4][0])
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(influence, "compute_features", dying)
    with pytest.raises(KeyboardInterrupt):
        feature_store(root / "part", graphdef, trainable, frozen, pool, CONFIG, {"ckpt": 1}, progress=False)
    monkeypatch.setattr(influence, "compute_features", real)
    resumed = feature_store(root / "part", graphdef, trainable, frozen, pool, CONFIG, {"ckpt": 1}, progress=False)
    assert full.n_shards == resumed.n_shards == 4
    for i in range(full.n_shards):
        assert full.shard_path(i).read_bytes() == resumed.shard_path(i).read_bytes()
    with pytest.raises(ValueError, match="seed"):
        other = FeatureConfig(projection=ProjectionConfig(dim=32, seed=6, block_rows=64), chunk=2, group=4,
                              shard_rows=8)
        feature_store(root / "full", graphdef, trainable, frozen, pool, other, {"ckpt": 1}, progress=False)


def test_rose_exact_dpo_and_reference_free_features_agree(setup):
    _, _, pref, graphdef, trainable, frozen = setup
    rows = np.arange(len(pref))
    exact = compute_features(graphdef, trainable, frozen, pref, rows, CONFIG, "dpo",
                             reference=zero_reference(trainable))
    fast = compute_features(graphdef, trainable, frozen, pref, rows, CONFIG, "margin")
    cos = np.sum(exact * fast, axis=1) / (np.linalg.norm(exact, axis=1) * np.linalg.norm(fast, axis=1))
    assert cos.min() > 0.999


def test_loss_and_pool_kind_must_match(setup):
    _, pool, pref, graphdef, trainable, frozen = setup
    with pytest.raises(ValueError, match="preference pool"):
        compute_features(graphdef, trainable, frozen, pool, [0], CONFIG, "margin")
    with pytest.raises(ValueError, match="reference"):
        compute_features(graphdef, trainable, frozen, pref, [0], CONFIG, "dpo")


def test_a_buckets_last_group_is_padded_to_whole_chunks_only():
    from jraise.grads.features import grouped_indices

    lengths = np.array([5] * 10 + [40] * 3)
    shapes = [(b, len(ix), int((ix >= 0).sum())) for b, ix in
              grouped_indices(lengths, np.arange(13), (16, 64), group=8, tail_multiple=2)]
    assert shapes == [(16, 8, 8), (16, 2, 2), (64, 4, 3)]
    full = [(b, len(ix)) for b, ix in grouped_indices(lengths, np.arange(13), (16, 64), group=8)]
    assert full == [(16, 8), (16, 8), (64, 8)]  # without tail_multiple every group is whole


def test_a_pool_smaller_than_a_group_has_one_bucket_and_a_larger_one_up_to_n_buckets():
    from jraise.data.batching import length_buckets
    from jraise.grads.features import feature_buckets

    lengths = np.array([20, 33, 47, 90, 130, 150, 170, 190] * 2)  # 16 examples, as a validation set
    assert feature_buckets(lengths, FeatureConfig(group=64)) == (192,)
    assert feature_buckets(lengths, FeatureConfig(group=8)) == length_buckets(lengths, 2)
    many = np.resize(lengths, 480)
    assert feature_buckets(many, FeatureConfig(group=64)) == length_buckets(many, 4)
    assert len(length_buckets(lengths, 4)) == 4  # what the small set had before: four programs


def test_features_do_not_depend_on_the_group_size(setup):
    """7 rows in groups of 16 (one short group of 8 rows, one length bucket for the 30-example pool)
    and in groups of 2 (four buckets): the same features."""
    _, pool, _, graphdef, trainable, frozen = setup
    rows = np.array([5, 0, 17, 3, 29, 11, 8])
    for mode in ("dense", "sjlt"):
        projection = ProjectionConfig(dim=32, seed=5, block_rows=64, mode=mode)
        big = compute_features(graphdef, trainable, frozen, pool, rows,
                               FeatureConfig(projection=projection, chunk=2, group=16), "sft")
        small = compute_features(graphdef, trainable, frozen, pool, rows,
                                 FeatureConfig(projection=projection, chunk=2, group=2), "sft")
        np.testing.assert_allclose(big, small, rtol=1e-5, atol=1e-6)
