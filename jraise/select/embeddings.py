"""Pooled model embeddings of a pool, and clusters of them by K-means.

`pooled_embeddings`: each example's final (normed) hidden states averaged over its real tokens
(prompt and response), computed in length-bucketed batches by one jitted program per bucket.
`cluster_embeddings`: embeddings -> PCA to ``dims`` -> z-score -> K-means (k-means++) -> labels,
for data without a ``category`` field (Beyond IID; `jraise.jobs.embeddings.derive_categories`
names them ``derived-<j>`` and writes them marked as derived), and the semantic part of RAISE's
state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jraise.data.batching import PAD_INDEX, iterate_batches, length_buckets
from jraise.data.pool import InstructionPool
from jraise.select.clustering import kmeans, pca, zscore


@nnx.jit
def _mean_hidden(model, input_ids, attention_mask):
    h = model.hidden_states(input_ids, attention_mask).astype(jnp.float32)
    m = attention_mask.astype(jnp.float32)[..., None]
    return (h * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


def pooled_embeddings(model, pool: InstructionPool, batch_size: int = 32, n_buckets: int = 4) -> np.ndarray:
    """[N, hidden_size] float32 mean-pooled final hidden states, in pool order."""
    out = np.zeros((len(pool), model.config.hidden_size), np.float32)
    order = np.argsort(pool.lengths, kind="stable")  # similar lengths share a batch
    for batch in iterate_batches(pool, order, batch_size, length_buckets(pool.lengths, n_buckets)):
        emb = np.asarray(_mean_hidden(model, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])))
        real = batch["index"] != PAD_INDEX
        out[batch["index"][real]] = emb[real]
    return out


def cluster_embeddings(embeddings: np.ndarray, k: int, dims: int = 32, seed: int = 0) -> np.ndarray:
    """K-means labels [N] of z-scored PCA scores (dims clipped to what the data supports)."""
    n, d = embeddings.shape
    scores = pca(jnp.asarray(embeddings), min(dims, n, d))
    _, labels, _ = kmeans(zscore(scores), k, jax.random.key(seed))
    return np.asarray(labels)
