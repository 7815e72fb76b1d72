"""Static-shape batches from a pool: a few length buckets so ``jax.jit`` compiles a handful of shapes.

Every batch has exactly ``batch_size`` rows and a length from a short list of buckets (the smallest
bucket that holds the batch's longest example). A final partial batch is filled with padding rows,
index -1, that are all zero in every mask, so it needs no extra compilation.

Arrays of an instruction batch (B rows, bucket length L):

* ``input_ids`` int32 [B, L]: token ids, right-padded with the pool's pad id;
* ``attention_mask`` int32 [B, L]: 1 on real tokens;
* ``loss_mask`` float32 [B, L]: the pool's loss mask (1 where token t is response text, predicted
  from position t-1), 0 on padding;
* ``example_mask`` float32 [B]: 1 for real rows, 0 for padding rows;
* ``index`` int32 [B]: the pool index of each row, -1 for padding rows.

A preference batch has ``chosen_``- and ``rejected_``-prefixed ``input_ids``, ``attention_mask``
and ``loss_mask``, plus ``example_mask`` and ``index``; both sides share the bucket length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from jraise.data.pool import InstructionPool, PreferencePool

PAD_INDEX = -1  # index of a padding row


def bucket_lengths(max_len: int, n_buckets: int = 4, min_len: int = 32) -> tuple[int, ...]:
    """Ascending bucket lengths: the largest powers of two in [min_len, max_len), then max_len.

    ``bucket_lengths(512)`` is (64, 128, 256, 512); ``bucket_lengths(1000)`` is (128, 256, 512,
    1000). At most ``n_buckets`` lengths; fewer when few powers of two lie in range.
    """
    if max_len < 1 or n_buckets < 1 or min_len < 1:
        raise ValueError(f"need max_len, n_buckets, min_len >= 1, got {max_len}, {n_buckets}, {min_len}")
    powers = []
    power = 1
    while power < max_len:
        if power >= min_len:
            powers.append(power)
        power *= 2
    smaller = powers[max(0, len(powers) - (n_buckets - 1)) :] if n_buckets > 1 else []
    return (*smaller, max_len)


def length_buckets(lengths: Sequence[int], n_buckets: int = 4, quantum: int = 16) -> tuple[int, ...]:
    """Bucket lengths fitted to a pool: at most ``n_buckets`` multiples of ``quantum`` that minimise
    the total padded length of the pool's examples (each padded to the smallest bucket holding it).

    The top bucket is the longest example rounded up to ``quantum``, so every example fits. The
    choice is exact (dynamic programming over the distinct rounded lengths), deterministic, and
    depends only on the multiset of lengths. Power-of-two buckets (`bucket_lengths`) waste about
    a third of the compute on padding for a pool of short, similar examples; fitted ones a few
    percent. Rounding to ``quantum`` keeps pools of similar lengths on the same compiled shapes.
    """
    if n_buckets < 1 or quantum < 1:
        raise ValueError(f"need n_buckets, quantum >= 1, got {n_buckets}, {quantum}")
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if lengths.size == 0:
        raise ValueError("cannot fit length buckets to an empty pool")
    if lengths.min() < 1:
        raise ValueError(f"example lengths must be >= 1, got {int(lengths.min())}")
    rounded = -(-lengths // quantum) * quantum
    sizes, counts = np.unique(rounded, return_counts=True)  # ascending candidate bucket lengths
    k = len(sizes)
    below = np.concatenate([[0], np.cumsum(counts)])  # below[j]: examples with rounded length < sizes[j]
    # cost[b][j]: least padded total of the examples up to sizes[j] with b buckets, the top one sizes[j]
    cost = np.full((n_buckets + 1, k), np.inf)
    choice = np.full((n_buckets + 1, k), -1, dtype=np.int64)
    cost[1] = sizes * below[1:]
    for b in range(2, n_buckets + 1):
        for j in range(k):
            cost[b, j], choice[b, j] = cost[b - 1, j], -1  # fewer buckets are allowed
            for i in range(j):
                total = cost[b - 1, i] + sizes[j] * (below[j + 1] - below[i + 1])
                if total < cost[b, j]:
                    cost[b, j], choice[b, j] = total, i
    picked, b, j = [], n_buckets, k - 1
    while j >= 0 and b >= 1:
        if b > 1 and choice[b, j] == -1 and cost[b, j] == cost[b - 1, j]:
            b -= 1
            continue
        picked.append(int(sizes[j]))
        j = int(choice[b, j]) if b > 1 else -1
        b -= 1
    return tuple(sorted(picked))


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``length``."""
    fitting = [b for b in buckets if b >= length]
    if not fitting:
        raise ValueError(f"an example of {length} tokens is longer than the largest bucket {max(buckets)}")
    return min(fitting)


def partial_group_rows(n: int, group: int, multiple: int) -> int:
    """Rows to compute for a group holding ``n`` real rows: ``group``, or for a partial (last) group
    the next multiple of ``multiple``: at most one more compiled shape per length, instead of up to
    ``group - 1`` padding rows computed for nothing."""
    return min(group, -(-n // multiple) * multiple)


def _checked_indices(indices: Sequence[int], n: int, allow_padding: bool) -> np.ndarray:
    index = np.asarray(indices, dtype=np.int64).reshape(-1)
    real = index != PAD_INDEX if allow_padding else np.ones(len(index), dtype=bool)
    bad = index[real & ((index < 0) | (index >= n))]
    if len(bad):
        raise IndexError(f"indices out of range for a pool of {n}: {bad[:5].tolist()}")
    return index


def pack_rows(
    tokens: Sequence[np.ndarray], masks: Sequence[np.ndarray], index: np.ndarray, bucket_len: int, pad_id: int
):
    """input_ids, attention_mask, loss_mask for the rows ``index`` (padding rows stay empty)."""
    rows = len(index)
    input_ids = np.full((rows, bucket_len), pad_id, dtype=np.int32)
    attention = np.zeros((rows, bucket_len), dtype=np.int32)
    loss = np.zeros((rows, bucket_len), dtype=np.float32)
    for row, i in enumerate(index):
        if i == PAD_INDEX:
            continue
        n = len(tokens[i])
        if n > bucket_len:
            raise ValueError(f"example {i} has {n} tokens, more than the bucket length {bucket_len}")
        input_ids[row, :n] = tokens[i]
        attention[row, :n] = 1
        loss[row, :n] = masks[i]
    return input_ids, attention, loss


def make_batch(pool: InstructionPool, indices: Sequence[int], bucket_len: int) -> dict[str, np.ndarray]:
    """One batch of the pool's examples ``indices`` (-1: a padding row), padded to ``bucket_len``."""
    index = _checked_indices(indices, len(pool), allow_padding=True)
    input_ids, attention, loss = pack_rows(pool.tokens, pool.loss_masks, index, bucket_len, pool.pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "loss_mask": loss,
        "example_mask": (index != PAD_INDEX).astype(np.float32),
        "index": index.astype(np.int32),
    }


def preference_batch(pool: PreferencePool, indices: Sequence[int], bucket_len: int) -> dict[str, np.ndarray]:
    """Chosen and rejected sides of pairs ``indices`` (-1: a padding row), both ``bucket_len`` long."""
    index = _checked_indices(indices, len(pool), allow_padding=True)
    batch = {}
    for side, tokens, masks in (
        ("chosen", pool.chosen_tokens, pool.chosen_masks),
        ("rejected", pool.rejected_tokens, pool.rejected_masks),
    ):
        input_ids, attention, loss = pack_rows(tokens, masks, index, bucket_len, pool.pad_id)
        batch.update(
            {f"{side}_input_ids": input_ids, f"{side}_attention_mask": attention, f"{side}_loss_mask": loss}
        )
    batch["example_mask"] = (index != PAD_INDEX).astype(np.float32)
    batch["index"] = index.astype(np.int32)
    return batch


def iterate_batches(
    pool: InstructionPool | PreferencePool,
    order: Sequence[int],
    batch_size: int,
    buckets: Sequence[int],
    drop_last: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``order`` taken in exactly that order (no reshuffling, repeats allowed).

    Each batch is padded to the smallest bucket holding its longest example; the last partial
    batch is filled with padding rows (index -1) unless ``drop_last``. Works for both pool kinds.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not buckets:
        raise ValueError("need at least one bucket length")
    order = _checked_indices(order, len(pool), allow_padding=False)
    build = preference_batch if isinstance(pool, PreferencePool) else make_batch
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        if len(chunk) < batch_size:
            if drop_last:
                return
            chunk = np.concatenate([chunk, np.full(batch_size - len(chunk), PAD_INDEX, dtype=np.int64)])
        longest = int(pool.lengths[chunk[chunk != PAD_INDEX]].max())
        yield build(pool, chunk, pick_bucket(longest, buckets))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(n) (int64) that depends only on (seed, epoch)."""
    if n < 0 or seed < 0 or epoch < 0:
        raise ValueError(f"n, seed and epoch must be >= 0, got {n}, {seed}, {epoch}")
    return np.random.default_rng([seed, epoch]).permutation(n)
