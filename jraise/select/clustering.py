"""PCA and K-means (k-means++ initialisation) in JAX, for semantic features and derived categories.

Pure functions on [N, D] float arrays with explicit PRNG keys; static shapes (k, iterations and
dimensions are Python ints), so each runs as one jitted program.

* `pca(x, dims)`: centre, then project on the top ``dims`` right singular vectors (SVD of the
  centred data); the sign of each component is fixed (largest-magnitude loading positive) so the
  result is deterministic across runs and platforms.
* `zscore(x)`: per-column standardisation (constant columns become 0).
* `kmeans(x, k, key)`: k-means++ seeding (each next centre drawn with probability proportional to
  the squared distance to the nearest chosen centre), then Lloyd iterations (a fixed count, as a
  `lax.fori_loop`); an empty cluster keeps its previous centre. Returns (centres [k, D], labels [N],
  inertia). ``restarts`` runs several seedings and keeps the lowest inertia.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


@partial(jax.jit, static_argnames=("dims",))
def pca(x: jax.Array, dims: int) -> jax.Array:
    """[N, D] -> [N, dims] principal-component scores (dims <= min(N, D))."""
    x = jnp.asarray(x, jnp.float32)
    centred = x - x.mean(axis=0, keepdims=True)
    _, _, vt = jnp.linalg.svd(centred, full_matrices=False)
    components = vt[:dims]  # [dims, D]
    pivot = jnp.argmax(jnp.abs(components), axis=1)
    signs = jnp.sign(components[jnp.arange(dims), pivot])
    return centred @ (components * jnp.where(signs == 0, 1.0, signs)[:, None]).T


@jax.jit
def zscore(x: jax.Array) -> jax.Array:
    """Columns standardised to mean 0, std 1; constant columns become 0."""
    x = jnp.asarray(x, jnp.float32)
    std = x.std(axis=0, keepdims=True)
    return (x - x.mean(axis=0, keepdims=True)) / jnp.where(std > 0, std, 1.0)


def _sq_distances(x: jax.Array, centres: jax.Array) -> jax.Array:
    """[N, k] squared Euclidean distances, clipped at 0 against rounding."""
    d = (x * x).sum(1)[:, None] - 2.0 * x @ centres.T + (centres * centres).sum(1)[None, :]
    return jnp.maximum(d, 0.0)


def kmeans_plus_plus(x: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """k-means++ seeding: [k, D] initial centres chosen among the rows of ``x``."""
    n = x.shape[0]
    keys = jax.random.split(key, k)
    first = x[jax.random.randint(keys[0], (), 0, n)]
    centres = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(first)
    nearest = ((x - first) ** 2).sum(1)

    def add(i, state):
        centres, nearest = state
        total = nearest.sum()
        probs = jnp.where(total > 0, nearest / jnp.where(total > 0, total, 1.0), 1.0 / n)
        pick = x[jax.random.choice(keys[i], n, p=probs)]
        return centres.at[i].set(pick), jnp.minimum(nearest, ((x - pick) ** 2).sum(1))

    centres, _ = jax.lax.fori_loop(1, k, add, (centres, nearest))
    return centres


def lloyd(x: jax.Array, centres: jax.Array, iterations: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``iterations`` Lloyd steps from ``centres`` -> (centres, labels, inertia)."""
    k = centres.shape[0]

    def step(_, centres):
        labels = jnp.argmin(_sq_distances(x, centres), axis=1)
        onehot = jax.nn.one_hot(labels, k, dtype=x.dtype)
        counts = onehot.sum(0)
        sums = onehot.T @ x
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centres)

    centres = jax.lax.fori_loop(0, iterations, step, centres)
    d = _sq_distances(x, centres)
    labels = jnp.argmin(d, axis=1)
    return centres, labels, jnp.take_along_axis(d, labels[:, None], axis=1).sum()


@partial(jax.jit, static_argnames=("k", "iterations", "restarts"))
def kmeans(x: jax.Array, k: int, key: jax.Array, iterations: int = 50, restarts: int = 4):
    """(centres [k, D], labels [N] int32, inertia) of the best of ``restarts`` k-means++ runs."""
    x = jnp.asarray(x, jnp.float32)
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must be in [1, N={x.shape[0]}], got {k}")

    def one(key):
        return lloyd(x, kmeans_plus_plus(x, k, key), iterations)

    centres, labels, inertia = jax.vmap(one)(jax.random.split(key, restarts))
    best = jnp.argmin(inertia)
    return centres[best], labels[best].astype(jnp.int32), inertia[best]
