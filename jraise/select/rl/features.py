"""RAISE's static per-instruction features from an auxiliary model, and its clusters.

Per example (all from one auxiliary model, any model `load_model` reads; default: the model being
fine-tuned):

* difficulty (4): len(x) = prompt tokens, len(y) = response tokens, mean log p(y|x) over the
  response tokens, mean log p(y) over the same tokens with the prompt replaced by one start token
  (the tokenizer's BOS, else EOS): the two forward passes of IFD;
* semantic (32): mean-pooled final hidden states (`jraise.select.embeddings.pooled_embeddings`)
  reduced by PCA (in JAX).

Both blocks are z-scored column by column, giving the [N, 36] static matrix of the fused state.
Clusters for the per-cluster selection are K-means (k-means++) over the z-scored semantic block.
Caching the matrix on disk (the policy directory's ``static.npz``) is
`jraise.jobs.raise_policy.cached_static_features`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jraise.data.batching import PAD_INDEX, length_buckets, pack_rows, pick_bucket
from jraise.data.pool import InstructionPool
from jraise.select.clustering import kmeans, pca, zscore
from jraise.select.embeddings import pooled_embeddings
from jraise.train.step import example_nll

SEMANTIC_DIMS = 32


@nnx.jit
def _row_mean_logp(model, input_ids, attention_mask, loss_mask):
    logits = model(input_ids, attention_mask)
    nll, tokens = example_nll(logits, input_ids, loss_mask, jnp.ones(input_ids.shape[0]))
    return -nll / jnp.maximum(tokens, 1.0)


def _batched_mean_logp(model, sequences: list[tuple[np.ndarray, np.ndarray]], pad_id: int, batch_size: int) -> np.ndarray:
    lengths = np.array([len(t) for t, _ in sequences])
    buckets = length_buckets(lengths, 4)
    order = np.argsort(lengths, kind="stable")
    out = np.zeros(len(sequences), np.float32)
    tokens, masks = [t for t, _ in sequences], [m for _, m in sequences]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        index = np.concatenate([rows, np.full(batch_size - len(rows), PAD_INDEX)])
        ids, att, mask = pack_rows(tokens, masks, index, pick_bucket(int(lengths[rows].max()), buckets), pad_id)
        out[rows] = np.asarray(_row_mean_logp(model, jnp.asarray(ids), jnp.asarray(att), jnp.asarray(mask)))[: len(rows)]
    return out


def start_token_of(tokenizer) -> int:
    """The token that stands in for the prompt in loss(y): the tokenizer's BOS, else its EOS."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("tokenizer has neither a BOS nor an EOS token id")
    return int(token)


def difficulty_features(model, pool: InstructionPool, start_token: int, batch_size: int = 32) -> np.ndarray:
    """[N, 4] float32: len(x), len(y), mean log p(y|x), mean log p(y) (see the module docstring)."""
    masks = [np.asarray(m, bool) for m in pool.loss_masks]
    len_y = np.array([m.sum() for m in masks], np.float32)
    len_x = np.array([len(t) for t in pool.tokens], np.float32) - len_y
    with_prompt = [(np.asarray(t), m.astype(np.float32)) for t, m in zip(pool.tokens, masks)]
    alone = []
    for t, m in zip(pool.tokens, masks):
        response = np.asarray(t)[m]
        alone.append((np.concatenate([[start_token], response]).astype(np.int32),
                      np.concatenate([[0.0], np.ones(len(response))]).astype(np.float32)))
    return np.stack([len_x, len_y, _batched_mean_logp(model, with_prompt, pool.pad_id, batch_size),
                     _batched_mean_logp(model, alone, pool.pad_id, batch_size)], axis=1)


def static_features_from(difficulty, embeddings, dims: int = SEMANTIC_DIMS) -> jax.Array:
    """The [N, D_d + dims] float32 static matrix of the fused state, from arrays of any model.

    The combination `static_features` applies to its model passes' outputs:

        semantic = pca(embeddings, min(dims, N, E)), zero columns appended up to ``dims``
        static   = zscore([difficulty | semantic])            (column by column; constant -> 0)

    Args:
      difficulty: [N, D_d] (or [N], one column) per-example difficulty numbers. RAISE's layout
        (`policy.DIFFICULTY`) is D_d = 4: len(x), len(y), mean log p(y|x), mean log p(y).
      embeddings: [N, E] per-example embeddings (RAISE: mean-pooled final hidden states).
      dims: semantic width after PCA (RAISE: 32, giving the paper's S = 36 and a 39-number state).

    Returns:
      [N, D_d + dims] float32; a policy over it needs ``PolicyConfig(state_dim=D_d + dims + 3)``
      (the default 39 when D_d = 4 and dims = 32). K-means for `cluster_layout` runs on the semantic
      block ``static[:, D_d:]`` in jraise's pipeline (`features.cluster_pool`).
    """
    difficulty = jnp.asarray(difficulty, jnp.float32)
    if difficulty.ndim == 1:
        difficulty = difficulty[:, None]
    emb = jnp.asarray(embeddings, jnp.float32)
    if difficulty.ndim != 2 or emb.ndim != 2:
        raise ValueError(f"difficulty must be [N, D] (or [N]) and embeddings [N, E], got shapes "
                         f"{difficulty.shape} and {emb.shape}")
    if difficulty.shape[0] != emb.shape[0]:
        raise ValueError(f"difficulty has {difficulty.shape[0]} rows, embeddings {emb.shape[0]}")
    if dims < 1:
        raise ValueError(f"dims must be >= 1, got {dims}")
    semantic = pca(emb, min(dims, *emb.shape))
    if semantic.shape[1] < dims:  # tiny pools or embeddings: zero columns keep the layout
        semantic = jnp.pad(semantic, ((0, 0), (0, dims - semantic.shape[1])))
    return zscore(jnp.concatenate([difficulty, semantic], axis=1))


def static_features(model, pool: InstructionPool, start_token: int, dims: int = SEMANTIC_DIMS,
                    batch_size: int = 32) -> np.ndarray:
    """[N, 4 + dims] z-scored static features (difficulty, then semantic)."""
    difficulty = difficulty_features(model, pool, start_token, batch_size)
    emb = pooled_embeddings(model, pool, batch_size)
    return np.asarray(static_features_from(difficulty, emb, dims))


def cluster_pool(static: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """[N] K-means labels over the semantic block of the static matrix."""
    _, labels, _ = kmeans(jnp.asarray(static[:, 4:]), n_clusters, jax.random.key(seed))
    return np.asarray(labels)
