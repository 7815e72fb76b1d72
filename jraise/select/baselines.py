"""Baseline selectors behind the `Selection` interface: random, full data, longest responses,
perplexity, IFD and RDS.

Every selector scores each pool example (higher = chosen first), keeps the top ``fraction`` with
`top_fraction` (ties by the lower index) and returns a `Selection` whose ``scores`` are those
per-example scores, ``method`` its name and ``config`` its options. Scores:

* ``random``: a seeded random permutation of 0..N-1 (the same seed gives the same subset);
* ``full``: every example in pool order, no scores;
* ``longest``: the number of response tokens;
* ``perplexity``: PPL = exp(-mean log p(y|x)) over the response tokens, by an auxiliary model;
  ``which="low"`` scores -PPL (lowest perplexity first), ``"high"`` scores PPL;
* ``ifd`` (instruction-following difficulty, Cherry LLM): IFD = loss(y|x) / loss(y), each loss the
  mean NLL over the response tokens, loss(y) with the prompt replaced by one start token; the
  highest IFD first. With ``drop_above_one`` an example with IFD >= 1 (the prompt does not help
  predict the response) scores -inf, so it is ranked after every other example (Cherry LLM drops
  them; here they are only taken when the fraction asks for more than the rest). An example with
  no response tokens, whose IFD is undefined, scores -inf too;
* ``rds`` (representation-based selection): the cosine similarity of each example's mean-pooled
  final hidden state to every validation example's, reduced by the max over validation examples,
  so an example close to any one validation example ranks high (a mean would favour examples near
  the validation centroid and neglect small validation subtasks).

The file-level job behind ``jraise select <name>`` is `jraise.jobs.baselines.run_baseline`.
"""

from __future__ import annotations

import numpy as np

from jraise.data.pool import InstructionPool
from jraise.select.base import Selection, top_fraction
from jraise.select.embeddings import pooled_embeddings
from jraise.select.rl.features import difficulty_features

BASELINES = ("random", "full", "longest", "perplexity", "ifd", "rds")
NEEDS_MODEL = ("perplexity", "ifd", "rds")
PERPLEXITY_SIDES = ("low", "high")


def ranked_selection(scores: np.ndarray, fraction: float, method: str, pool: InstructionPool,
                     config: dict) -> Selection:
    """A `Selection` of the top ``fraction`` of ``scores`` (float32 [N], one per pool example)."""
    scores = np.asarray(scores, np.float32)
    if scores.shape != (len(pool),):
        raise ValueError(f"scores must have shape ({len(pool)},), one per pool example, got {scores.shape}")
    return Selection(indices=top_fraction(scores, fraction=fraction), method=method,
                     pool_fingerprint=pool.fingerprint, scores=scores, config={"fraction": fraction, **config})


def response_lengths(pool: InstructionPool) -> np.ndarray:
    """int64 [N]: the number of response (loss-masked) tokens of each example."""
    return np.array([int(np.count_nonzero(m)) for m in pool.loss_masks], np.int64)


def random_scores(n: int, seed: int) -> np.ndarray:
    """float32 [n]: a random permutation of 0..n-1 drawn from ``seed`` (the top k are a uniform subset)."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng(seed).permutation(n).astype(np.float32)


def perplexity_from_logp(mean_logp: np.ndarray) -> np.ndarray:
    """Perplexity exp(-mean log p) per example (float64 [N])."""
    return np.exp(-np.asarray(mean_logp, np.float64))


def ifd_from_logp(logp_given_x: np.ndarray, logp_alone: np.ndarray) -> np.ndarray:
    """IFD = loss(y|x) / loss(y) from the two mean log-probabilities (loss = -mean log p), float64 [N];
    NaN where loss(y) is 0 (no response tokens, or a response predicted with certainty)."""
    loss_x = -np.asarray(logp_given_x, np.float64)
    loss_alone = -np.asarray(logp_alone, np.float64)
    out = np.full(loss_x.shape, np.nan)
    np.divide(loss_x, loss_alone, out=out, where=loss_alone > 0)
    return out


def ifd_scores(ifd_values: np.ndarray, drop_above_one: bool = True) -> np.ndarray:
    """The IFD selection score: IFD itself, -inf where undefined and, with ``drop_above_one``,
    -inf where IFD >= 1 (ranked last, see the module docstring)."""
    values = np.asarray(ifd_values, np.float64)
    bad = np.isnan(values) | ((values >= 1.0) if drop_above_one else False)
    return np.where(bad, -np.inf, values)


def max_cosine(embeddings: np.ndarray, targets: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """float32 [N]: for each row of ``embeddings`` [N, D], its largest cosine similarity to a row of
    ``targets`` [M, D] (a zero vector has similarity 0 to everything)."""
    embeddings, targets = np.asarray(embeddings, np.float32), np.asarray(targets, np.float32)
    if embeddings.ndim != 2 or targets.ndim != 2 or embeddings.shape[1] != targets.shape[1]:
        raise ValueError(f"embeddings {embeddings.shape} and targets {targets.shape} must be [N, D] and [M, D]")
    if len(targets) == 0:
        raise ValueError("targets is empty: need at least one validation example")

    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)

    return (unit(embeddings) @ unit(targets).T).max(axis=1)


# ----------------------------------------------------------------------------------------------
# Selectors


def random_selection(pool: InstructionPool, fraction: float, seed: int = 0) -> Selection:
    """A uniformly random ``fraction`` of the pool, reproducible by ``seed``."""
    return ranked_selection(random_scores(len(pool), seed), fraction, "random", pool, {"seed": seed})


def full_data(pool: InstructionPool) -> Selection:
    """Every example, in pool order (no scores): the no-selection baseline."""
    if len(pool) == 0:
        raise ValueError("pool is empty")
    return Selection(indices=np.arange(len(pool), dtype=np.int64), method="full", pool_fingerprint=pool.fingerprint,
                     scores=None, config={"fraction": 1.0})


def longest(pool: InstructionPool, fraction: float) -> Selection:
    """The ``fraction`` of examples with the most response tokens."""
    return ranked_selection(response_lengths(pool).astype(np.float32), fraction, "longest", pool, {})


def perplexity(model, pool: InstructionPool, fraction: float, which: str = "low", start_token: int | None = None,
               batch_size: int = 32) -> Selection:
    """The ``fraction`` of lowest (``which="low"``) or highest (``"high"``) response perplexity under
    ``model``. The perplexity does not depend on ``start_token``: it only feeds the prompt-free
    pass of the shared `difficulty_features` (None: the pool's pad id)."""
    if which not in PERPLEXITY_SIDES:
        raise ValueError(f"which must be 'low' or 'high', got {which!r}")
    start = pool.pad_id if start_token is None else start_token
    ppl = perplexity_from_logp(difficulty_features(model, pool, start, batch_size)[:, 2])
    scores = -ppl if which == "low" else ppl
    return ranked_selection(scores, fraction, "perplexity", pool, {"which": which})


def ifd(model, pool: InstructionPool, fraction: float, start_token: int, batch_size: int = 32,
        drop_above_one: bool = True) -> Selection:
    """The ``fraction`` of highest IFD under ``model`` (see the module docstring for IFD >= 1)."""
    features = difficulty_features(model, pool, start_token, batch_size)
    values = ifd_from_logp(features[:, 2], features[:, 3])
    scores = ifd_scores(values, drop_above_one)
    config = {"start_token": int(start_token), "drop_above_one": drop_above_one,
              "n_ranked_last": int(np.isneginf(scores).sum())}
    return ranked_selection(scores, fraction, "ifd", pool, config)


def rds(model, pool: InstructionPool, val_pool: InstructionPool, fraction: float, batch_size: int = 32) -> Selection:
    """The ``fraction`` of pool examples whose pooled hidden state is closest (max cosine) to a
    validation example's."""
    if len(val_pool) == 0:
        raise ValueError("val_pool is empty")
    scores = max_cosine(pooled_embeddings(model, pool, batch_size), pooled_embeddings(model, val_pool, batch_size))
    return ranked_selection(scores, fraction, "rds", pool,
                            {"reduce": "max", "val_fingerprint": val_pool.fingerprint})
