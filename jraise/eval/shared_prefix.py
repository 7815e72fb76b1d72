"""Multiple-choice scoring that runs each question's shared prompt once (KV-cache prefill).

`jraise.eval.report.option_log_probs` tokenises every (prompt, option) pair as a whole chat
conversation. The options of one question share a long token prefix (the rendered prompt and the
assistant header); scoring each option as its own sequence repeats the forward pass over that
prefix once per option. Here each question's prefix is prefilled once into a KV cache, the cache
is repeated for the question's options, and only each option's suffix runs through the model:

* prefix length P_q: the longest common prefix of the options' token lists, cut before the first
  scored token of any option (so every scored token, and the logits predicting it, lie after
  the prefix's last token). Tokenisation may merge text across the prompt/option boundary, which
  is why the prefix is taken from the actual token lists rather than from the prompt alone;
* suffix of option j: its tokens from P_q to its last scored token (later tokens cannot change
  a scored token's log-prob, by causality);
* suffix token 0 is predicted by the prefill's last logits, token t > 0 by the suffix's logits at
  t - 1, at positions continuing the prefix's, exactly as in the whole-sequence forward pass.

The numbers equal `jraise.eval.metrics.scored_sums` over the whole sequences up to float rounding
(the cached attention sums over a differently padded key axis). Shapes are static: a batch holds
``questions`` question rows (dummy rows fill the last one) and ``options`` option rows per
question (dummy rows fill questions with fewer), prefixes are left-padded and suffixes
right-padded to length buckets. Memory: the prefill cache is repeated to ``questions * options``
rows of ``P + S`` slots per layer, which `plan_batches` keeps to about ``batch_size`` rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jraise.data.batching import length_buckets, pick_bucket
from jraise.loglik import token_log_probs
from jraise.model.transformer import default_positions, init_cache


# ----------------------------------------------------------------------------------------------
# Planning (numpy)


def _first_scored(mask: np.ndarray) -> int:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if len(hits) else len(mask)


def _end_scored(mask: np.ndarray) -> int:
    hits = np.flatnonzero(mask)
    return int(hits[-1]) + 1 if len(hits) else 0


def _common_prefix(token_lists: Sequence[np.ndarray]) -> int:
    length = min(len(t) for t in token_lists)
    first = np.asarray(token_lists[0][:length])
    same = np.ones(length, bool)
    for tokens in token_lists[1:]:
        same &= np.asarray(tokens[:length]) == first
    return int(length if same.all() else np.argmin(same))


def shared_prefix_lengths(sequences: Sequence[tuple[np.ndarray, np.ndarray]], offsets: Sequence[int]) -> np.ndarray:
    """P_q per question: the longest common token prefix of its options, ending before the first
    scored token of any of them. ``sequences[i]`` is (tokens, score mask) of option row i;
    question q owns rows ``offsets[q]:offsets[q+1]``."""
    lengths = []
    for a, b in zip(offsets[:-1], offsets[1:]):
        rows = sequences[a:b]
        first = min(_first_scored(_scored(mask)) for _, mask in rows)
        lengths.append(min(first, _common_prefix([tokens for tokens, _ in rows])))
    return np.asarray(lengths, np.int64)


def _scored(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask, np.float32).copy()
    if len(mask):
        mask[0] = 0.0  # token 0 is never predicted (as in `jraise.loglik.masked_log_prob_sums`)
    return mask


@dataclass(frozen=True)
class Batch:
    """One static-shape batch: ``questions`` indexes the real questions (in row order, the rest of
    the ``prefix_ids`` rows are dummies); ``option_rows[q_row]`` the flat option rows of question
    row q_row, in order (fewer than ``n_options``: the rest are dummies)."""

    questions: np.ndarray
    option_rows: list[np.ndarray]
    prefix_ids: np.ndarray    # [B, P] int32, left-padded
    prefix_mask: np.ndarray   # [B, P] int32
    suffix_ids: np.ndarray    # [B, N, S] int32, right-padded
    suffix_mask: np.ndarray   # [B, N, S] int32
    score_mask: np.ndarray    # [B, N, S] float32


def plan_batches(sequences: Sequence[tuple[np.ndarray, np.ndarray]], offsets: Sequence[int], pad_id: int,
                 batch_size: int, n_buckets: int, quantum: int) -> list[Batch]:
    """Static-shape batches covering every option row once.

    A batch has ``max(1, batch_size // n_max)`` question rows (n_max: the most options of any
    question), so the repeated cache and the suffix logits have at most about ``batch_size``
    option rows, like a whole-sequence batch. Questions are sorted by prefix bucket, then by
    longest suffix, so a batch's rows are close in length; prefix and suffix lengths are padded
    to at most ``n_buckets`` fitted buckets each (multiples of ``quantum``), and the option axis
    to the batch's most options.
    """
    offsets = np.asarray(offsets)
    n_q = len(offsets) - 1
    if n_q < 1:
        return []
    prefix_len = shared_prefix_lengths(sequences, offsets)
    suffixes = []  # per option row: (tokens, score mask) from P_q to its last scored token
    for q in range(n_q):
        for i in range(offsets[q], offsets[q + 1]):
            tokens, mask = sequences[i]
            mask = _scored(mask)
            end = max(_end_scored(mask), int(prefix_len[q]))
            suffixes.append((np.asarray(tokens[prefix_len[q]:end], np.int32), mask[prefix_len[q]:end]))
    n_options = np.diff(offsets)
    suffix_max = np.array([max((len(suffixes[i][0]) for i in range(offsets[q], offsets[q + 1])), default=0)
                           for q in range(n_q)])
    p_buckets = length_buckets(np.maximum(prefix_len, 1), n_buckets=n_buckets, quantum=quantum)
    s_buckets = length_buckets(np.maximum(suffix_max, 1), n_buckets=n_buckets, quantum=quantum)
    p_of = np.array([pick_bucket(max(int(p), 1), p_buckets) for p in prefix_len])
    order = np.lexsort((suffix_max, p_of))  # by prefix bucket, then longest suffix
    rows = max(1, batch_size // int(n_options.max()))
    batches = []
    for start in range(0, n_q, rows):
        chunk = order[start : start + rows]
        p = int(p_of[chunk].max())
        s = pick_bucket(max(int(suffix_max[chunk].max()), 1), s_buckets)
        n = int(n_options[chunk].max())
        prefix_ids = np.full((rows, p), pad_id, np.int32)
        prefix_mask = np.zeros((rows, p), np.int32)
        suffix_ids = np.full((rows, n, s), pad_id, np.int32)
        suffix_mask = np.zeros((rows, n, s), np.int32)
        score_mask = np.zeros((rows, n, s), np.float32)
        option_rows = []
        for r, q in enumerate(chunk):
            first = offsets[q]
            length = int(prefix_len[q])
            if length:
                prefix_ids[r, p - length:] = sequences[first][0][:length]
                prefix_mask[r, p - length:] = 1
            for j, i in enumerate(range(offsets[q], offsets[q + 1])):
                tokens, mask = suffixes[i]
                suffix_ids[r, j, : len(tokens)] = tokens
                suffix_mask[r, j, : len(tokens)] = 1
                score_mask[r, j, : len(tokens)] = mask
            option_rows.append(np.arange(offsets[q], offsets[q + 1]))
        batches.append(Batch(chunk, option_rows, prefix_ids, prefix_mask, suffix_ids, suffix_mask, score_mask))
    return batches


# ----------------------------------------------------------------------------------------------
# The jitted forward


@jax.jit
def _option_sums(graphdef, state, prefix_ids, prefix_mask, suffix_ids, suffix_mask, score_mask):
    model = nnx.merge(graphdef, state)
    b, p = prefix_ids.shape
    _, n, s = suffix_ids.shape
    rows = b * n
    cache = init_cache(model.config, b, p + s)
    key_valid = jnp.zeros((b, p + s), bool).at[:, :p].set(prefix_mask.astype(bool))
    hidden, cache = model.hidden_with_cache(prefix_ids, default_positions(prefix_mask), cache, 0, key_valid)
    last = jnp.repeat(hidden[:, -1:], n, axis=0)  # [rows, 1, D]: predicts each suffix's token 0
    # Every option row gets its question's cache; its suffix goes into slots p .. p+s-1.
    cache = jax.tree_util.tree_map(lambda c: jnp.repeat(c, n, axis=0), cache)
    ids, attention = suffix_ids.reshape(rows, s), suffix_mask.reshape(rows, s)
    key_valid = jnp.repeat(key_valid, n, axis=0).at[:, p:].set(attention.astype(bool))
    positions = jnp.repeat(jnp.sum(prefix_mask, axis=-1), n)[:, None] + jnp.arange(s)[None, :]
    hidden, _ = model.hidden_with_cache(ids, positions.astype(jnp.int32), cache, p, key_valid)
    # [rows, s, V]: suffix token 0 from the prefill's last position, token t from suffix position t - 1
    logits = model.logits_from_hidden(jnp.concatenate([last, hidden[:, :-1]], axis=1)).astype(jnp.float32)
    log_probs = token_log_probs(logits, ids)
    mask = score_mask.reshape(rows, s) * attention
    return jnp.sum(log_probs * mask, axis=-1).reshape(b, n), jnp.sum(mask, axis=-1).reshape(b, n)


def batch_sums(graphdef, state, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """(summed log-probs, scored-token counts) [B, N] of a `Batch` (dummy rows included)."""
    sums, counts = _option_sums(graphdef, state, jnp.asarray(batch.prefix_ids), jnp.asarray(batch.prefix_mask),
                                jnp.asarray(batch.suffix_ids), jnp.asarray(batch.suffix_mask),
                                jnp.asarray(batch.score_mask))
    return np.asarray(sums), np.asarray(counts)


def scatter(batch: Batch, sums: np.ndarray, counts: np.ndarray, out_sums: np.ndarray, out_counts: np.ndarray) -> None:
    """Writes a batch's real option rows into the flat per-option arrays."""
    for r, rows in enumerate(batch.option_rows):
        out_sums[rows] = sums[r, : len(rows)]
        out_counts[rows] = counts[r, : len(rows)]
