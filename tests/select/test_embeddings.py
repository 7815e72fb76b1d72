"""PCA, K-means (k-means++) in JAX; pooled embeddings; derived categories usable by the file jobs."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from jraise.data.pool import load_pool
from jraise.model import init_model, preset_config
from jraise.jobs.beyond_iid import read_categorised
from jraise.jobs.embeddings import derive_categories
from jraise.select.clustering import kmeans, pca, zscore
from jraise.select.embeddings import cluster_embeddings, pooled_embeddings


def _blobs(k=4, per=30, d=6, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 8, (k, d))
    x = np.concatenate([centres[i] + rng.normal(size=(per, d)) for i in range(k)])
    return x.astype(np.float32), np.repeat(np.arange(k), per)


def test_kmeans_recovers_separated_clusters_deterministically():
    x, truth = _blobs()
    _, labels, inertia = kmeans(x, 4, jax.random.key(1))
    labels = np.asarray(labels)
    # Each true cluster maps to exactly one label and vice versa (a perfect partition).
    pairs = set(zip(truth.tolist(), labels.tolist()))
    assert len(pairs) == 4 and len({p[0] for p in pairs}) == 4 and len({p[1] for p in pairs}) == 4
    _, again, inertia2 = kmeans(x, 4, jax.random.key(1))
    assert np.array_equal(labels, np.asarray(again)) and float(inertia) == float(inertia2)
    # Inertia equals the sum of squared distances to the assigned cluster means.
    means = np.stack([x[labels == j].mean(0) for j in range(4)])
    np.testing.assert_allclose(float(inertia), ((x - means[labels]) ** 2).sum(), rtol=1e-4)


def test_cluster_embeddings_partitions_separated_blobs():
    x, truth = _blobs(d=6)
    for dims in (3, 32):  # 32: more than the 6 columns, clipped to what the data supports
        labels = cluster_embeddings(x, 4, dims=dims, seed=1)
        assert labels.shape == (len(x),)
        pairs = set(zip(truth.tolist(), labels.tolist()))
        assert len(pairs) == 4 and len({p[0] for p in pairs}) == 4 and len({p[1] for p in pairs}) == 4
    np.testing.assert_array_equal(cluster_embeddings(x, 4, dims=3, seed=1), cluster_embeddings(x, 4, dims=3, seed=1))


def test_pca_matches_numpy_svd_up_to_sign_and_zscore():
    x, _ = _blobs(d=5)
    got = np.asarray(pca(x, 3))
    centred = x - x.mean(0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    want = u[:, :3] * s[:3]
    for j in range(3):
        sign = np.sign(got[:, j] @ want[:, j])
        np.testing.assert_allclose(got[:, j], sign * want[:, j], rtol=1e-3, atol=1e-3)
    z = np.asarray(zscore(np.c_[x[:, :2], np.ones(len(x))]))
    np.testing.assert_allclose(z[:, :2].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, :2].std(0), 1, atol=1e-4)
    assert np.all(z[:, 2] == 0)


def test_pooled_embeddings_and_derived_categories(tmp_path, testbed, testbed_tok):
    paths, tok = testbed, testbed_tok  # the suite's standard 40-record testbed
    pool = load_pool(paths["pool"], tok, max_len=256)
    model = init_model(preset_config("tiny", vocab_size=len(tok)), seed=0)
    emb = pooled_embeddings(model, pool, batch_size=8)
    i = 7
    h = model.hidden_states(jnp.asarray(pool.tokens[i][None]))
    np.testing.assert_allclose(emb[i], np.asarray(h[0]).mean(0), rtol=1e-4, atol=1e-5)
    cats = derive_categories(model, pool, k=3, dims=4, seed=0, out=tmp_path / "cats.json")
    assert set(cats) <= {"derived-0", "derived-1", "derived-2"} and len(cats) == len(pool)
    saved = json.loads((tmp_path / "cats.json").read_text())
    assert saved["derived"] is True and saved["pool_fingerprint"] == pool.fingerprint
    assert read_categorised(paths["pool"], tmp_path / "cats.json").categories == cats
