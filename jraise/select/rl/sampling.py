"""Per-cluster set selection for RAISE: padded cluster layout, Gumbel-top-b sampling, Plackett-Luce.

Stage: ``jraise.select`` (RAISE, Lv, Li et al. 2025, arXiv 2504.07282: its diversity
constraint and RL).
K-means splits the pool into C clusters once; at every step the policy takes b instructions from each
cluster, B = C * b in all. Clusters have different sizes, so they are padded to one static shape:

    labels [N]  --cluster_layout-->  members [C, M] (pool index, -1 = padding), valid [C, M]
    scores [N]  --layout.gather-->   scores  [C, M]
    scores [C, M] --gumbel_top_b / top_b-->  picked [C, b] (positions within the cluster row)
    picked [C, b] --layout.pool_indices-->   pool indices [C, b]

Training uses the stochastic policy: inside each cluster, b items are sampled without replacement by
Gumbel-top-b on ``scores / tau`` (Kool et al. 2019, arXiv 1903.06059: adding i.i.d. Gumbel noise and
taking the b largest draws an ordered sample from the Plackett-Luce distribution). Its log-probability
is ``sum_j [z_{i_j} - logsumexp_{remaining after j-1 picks} z]`` with ``z = scores / tau``. Deployment
uses the deterministic ``top_b``.

Items that may not be picked: ``valid`` marks real (non-padding) entries; an optional ``available``
mask removes more (for example items a caller excludes this step). The *pickable* items are
``valid & available``. A cluster with k < b pickable items yields its k items (in sampled order)
followed by ``-1`` in the remaining slots; those slots carry no probability (they are forced), so the
log-probability sums over the real picks only, and a caller masks the ``-1`` slots out of its batch.
`ClusterLayout.check_budget` refuses, outside jit, a layout whose smallest cluster is below b, so with
``available`` left out every slot is real.

All functions take unbatched ``[C, M]`` arrays, keep b and M static, and run under ``jit``; batch
extra leading axes (episodes, steps) with ``vmap`` at the call site. Scores must be finite.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ClusterLayout",
    "cluster_layout",
    "gumbel_top_b",
    "pl_first_pick_entropy",
    "plackett_luce_logp",
    "top_b",
]

# A finite stand-in for -inf: exp(_NEG - x) underflows to 0 for any finite x a policy produces, and
# unlike -inf it keeps logsumexp and its gradient free of inf - inf = nan for empty sets.
_NEG = -1e30


@partial(jax.tree_util.register_dataclass, data_fields=["members", "valid"], meta_fields=[])
@dataclass(frozen=True)
class ClusterLayout:
    """The pool split into C clusters, each padded to the largest cluster size M.

    A pytree (both fields are leaves), so it can be passed into ``jit``.

    Attributes:
      members: ``[C, M]`` int32 pool indices of each cluster's items, ascending; ``-1`` pads.
      valid: ``[C, M]`` bool, True where ``members`` is a real item.
    """

    members: jax.Array
    valid: jax.Array

    @property
    def n_clusters(self) -> int:
        return self.members.shape[0]

    @property
    def max_size(self) -> int:
        return self.members.shape[1]

    def sizes(self) -> np.ndarray:
        """``[C]`` int64 number of real items per cluster (host values: call outside jit)."""
        return np.asarray(self.valid).sum(axis=1).astype(np.int64)

    def check_budget(self, b: int) -> None:
        """Raise ValueError unless every cluster has at least ``b`` items (call outside jit)."""
        if b < 1:
            raise ValueError(f"items per cluster b must be >= 1, got {b}")
        sizes = self.sizes()
        short = np.flatnonzero(sizes < b)
        if short.size:
            raise ValueError(f"b = {b} items per cluster, but cluster(s) {short[:10].tolist()} have only "
                             f"{sizes[short[:10]].tolist()} items; lower b or use fewer clusters")

    def gather(self, values: jax.Array, fill: float = 0.0) -> jax.Array:
        """Per-item values ``[N, ...]`` -> ``[C, M, ...]`` laid out by cluster; padding gets ``fill``."""
        out = jnp.asarray(values)[jnp.maximum(self.members, 0)]
        mask = self.valid.reshape(self.valid.shape + (1,) * (out.ndim - 2))
        return jnp.where(mask, out, jnp.asarray(fill, out.dtype))

    def pool_indices(self, picked: jax.Array) -> jax.Array:
        """Positions within clusters ``[C, b]`` -> pool indices ``[C, b]`` int32 (``-1`` stays ``-1``)."""
        chex.assert_rank(picked, 2)
        found = jnp.take_along_axis(self.members, jnp.maximum(picked, 0), axis=1)
        return jnp.where(picked >= 0, found, -1).astype(jnp.int32)


def cluster_layout(labels, n_clusters: int) -> ClusterLayout:
    """Padded layout of integer cluster labels ``[N]`` in ``[0, n_clusters)``.

    Runs on the host (numpy) once, because M (the largest cluster size) is a data-dependent shape.
    Items appear in ascending pool order inside each cluster. Empty clusters are kept as all-padding
    rows; `ClusterLayout.check_budget` rejects them for sampling.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty [N] array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    bad = np.flatnonzero((labels < 0) | (labels >= n_clusters))
    if bad.size:
        raise ValueError(f"labels must be in [0, {n_clusters}); index {int(bad[0])} has {int(labels[bad[0]])}")
    sizes = np.bincount(labels, minlength=n_clusters)
    members = np.full((n_clusters, int(sizes.max())), -1, np.int32)
    order = np.argsort(labels, kind="stable")  # grouped by cluster, ascending pool index inside
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.arange(labels.size) - starts[labels[order]]  # position inside the cluster
    members[labels[order], rank] = order
    return ClusterLayout(members=jnp.asarray(members), valid=jnp.asarray(members >= 0))


def _pickable(valid: jax.Array, available: jax.Array | None) -> jax.Array:
    pickable = jnp.asarray(valid, bool)
    if available is not None:
        chex.assert_equal_shape([valid, available])
        pickable = pickable & jnp.asarray(available, bool)
    return pickable


def _check_b(b: int, max_size: int) -> None:
    if not isinstance(b, (int, np.integer)) or not 1 <= b <= max_size:
        raise ValueError(f"b must be an int in [1, M = {max_size}], got {b!r}")


def _check_tau(tau) -> None:
    if isinstance(tau, (int, float, np.number)) and not tau > 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")


def _top_positions(keys: jax.Array, pickable: jax.Array, b: int) -> jax.Array:
    """``[C, b]`` positions of the b largest pickable ``keys`` per row (lower index first on ties);
    slots beyond a row's pickable count are ``-1``."""
    _, positions = jax.lax.top_k(jnp.where(pickable, keys, -jnp.inf), b)
    real = jnp.arange(b)[None, :] < pickable.sum(axis=1, keepdims=True)
    return jnp.where(real, positions, -1).astype(jnp.int32)


def gumbel_top_b(key: jax.Array, scores: jax.Array, valid: jax.Array, b: int, tau: float = 1.0,
                 available: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Sample b items per cluster without replacement from Plackett-Luce(scores / tau).

    Args:
      key: PRNG key (one draw of Gumbel noise for the whole ``[C, M]`` matrix).
      scores: ``[C, M]`` float acquisition scores (finite).
      valid: ``[C, M]`` bool, real items (False = padding).
      b: static number of items per cluster, ``1 <= b <= M``.
      tau: temperature (> 0); smaller is greedier.
      available: optional ``[C, M]`` bool; False items are never picked.

    Returns:
      ``picked`` ``[C, b]`` int32 positions within each cluster row, in sampled order (``-1`` where a
      cluster has fewer than b pickable items), and ``logp`` ``[C]``: the log-probability of each
      cluster's ordered picks (`plackett_luce_logp`).
    """
    chex.assert_rank([scores, valid], 2)
    chex.assert_equal_shape([scores, valid])
    _check_b(b, scores.shape[1])
    _check_tau(tau)
    pickable = _pickable(valid, available)
    z = jnp.asarray(scores, jnp.float32) / tau
    perturbed = z + jax.random.gumbel(key, z.shape, z.dtype)
    picked = _top_positions(perturbed, pickable, b)
    return picked, plackett_luce_logp(scores, valid, picked, tau, available)


def plackett_luce_logp(scores: jax.Array, valid: jax.Array, picked: jax.Array, tau: float = 1.0,
                       available: jax.Array | None = None) -> jax.Array:
    """Log-probability ``[C]`` of each cluster's ordered picks under Plackett-Luce(scores / tau).

    ``log P = sum_j [z_{i_j} - logsumexp(z over pickable items not among i_1..i_{j-1})]``.

    Computed without a loop over j and without subtracting probability mass (which cancels badly when
    the remaining mass is small): the set still remaining before pick j is the never-picked items
    plus picks j..b, so its logsumexp is ``logaddexp(L_rest, reverse_cumlogsumexp(z_picked)_j)``.
    Cost O(C * (M + b)). Differentiable in ``scores``.

    Args:
      scores: ``[C, M]`` float scores; valid: ``[C, M]`` bool; available: optional ``[C, M]`` bool.
      picked: ``[C, b]`` int positions, distinct and pickable within a row; ``-1`` slots (only after
        the real picks) contribute 0.
      tau: temperature (> 0).
    """
    chex.assert_rank([scores, valid, picked], 2)
    chex.assert_equal_shape([scores, valid])
    chex.assert_equal_shape_prefix([scores, picked], 1)
    _check_tau(tau)
    pickable = _pickable(valid, available)
    n_clusters, size = scores.shape
    z = jnp.where(pickable, jnp.asarray(scores, jnp.float32) / tau, _NEG)
    real = picked >= 0
    z_picked = jnp.where(real, jnp.take_along_axis(z, jnp.maximum(picked, 0), axis=1), _NEG)
    rows = jnp.arange(n_clusters)[:, None]
    was_picked = jnp.zeros(scores.shape, bool).at[rows, jnp.where(real, picked, size)].set(True, mode="drop")
    rest = jax.nn.logsumexp(jnp.where(was_picked, _NEG, z), axis=1, keepdims=True)  # [C, 1]
    remaining = jnp.logaddexp(rest, jax.lax.cumlogsumexp(z_picked, axis=1, reverse=True))  # [C, b]
    return jnp.where(real, z_picked - remaining, 0.0).sum(axis=1)


def top_b(scores: jax.Array, valid: jax.Array, b: int, available: jax.Array | None = None) -> jax.Array:
    """Deterministic deployment policy: ``[C, b]`` int32 positions of the b highest scores per cluster.

    Best first; equal scores are broken by the lower position (= lower pool index, since members are
    ascending). Invalid or unavailable items are never picked; ``-1`` fills slots a cluster cannot.
    """
    chex.assert_rank([scores, valid], 2)
    chex.assert_equal_shape([scores, valid])
    _check_b(b, scores.shape[1])
    return _top_positions(jnp.asarray(scores, jnp.float32), _pickable(valid, available), b)


def pl_first_pick_entropy(scores: jax.Array, valid: jax.Array, tau: float = 1.0,
                          available: jax.Array | None = None) -> jax.Array:
    """Entropy ``[C]`` (nats) of the first pick, softmax(scores / tau) over each cluster's pickable items.

    The entropy regulariser for PPO. The exact entropy of the ordered b-subset distribution has no
    closed form (a sum over M!/(M-b)! sequences); the first pick's entropy is exact for b = 1, shares
    the maximiser (equal scores: log k for k pickable items) and the minimiser (one dominant score) of
    the full entropy, and costs O(M). A cluster with no pickable item has entropy 0.
    """
    chex.assert_rank([scores, valid], 2)
    chex.assert_equal_shape([scores, valid])
    _check_tau(tau)
    pickable = _pickable(valid, available)
    z = jnp.where(pickable, jnp.asarray(scores, jnp.float32) / tau, _NEG)
    log_p = z - jax.nn.logsumexp(z, axis=1, keepdims=True)
    p = jnp.where(pickable, jnp.exp(log_p), 0.0)
    return -(p * jnp.where(pickable, log_p, 0.0)).sum(axis=1)
