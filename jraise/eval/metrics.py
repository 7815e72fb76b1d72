"""Scoring pieces for evaluation: response loss, option log-likelihoods, option choice (answer
matching is `jraise.eval.normalise`).

Everything here is a pure function of arrays or strings; the two that run the model
(`response_token_nll`, `sequence_log_probs`) are jitted with static shapes, so a caller that pads
to a few length buckets compiles a few programs. Their log-likelihood math, and "dropout off", is
`jraise.loglik`'s. `jraise.eval.report` strings them together over files and pools.

Conventions shared with the data layer (`jraise.data.batching`): a score mask [B, T] marks the
tokens whose log-probability counts, ``mask[t] == 1`` meaning token t is predicted from position
t-1 (so ``mask[:, 0]`` never counts); rows with ``example_mask == 0`` are padding and score zero.

Averaging of the response loss (`loss_summary`), reported both ways:

* ``per_example``: each example's mean token NLL (sum / its response tokens), then the plain mean
  over examples, so a long answer weighs as much as a short one (what per-category comparisons
  want: a category is not dominated by its longest examples);
* ``per_token``: total NLL / total response tokens, the usual corpus-level loss (and what
  ``exp`` turns into perplexity).

The overall numbers pool every example with the same rule (not a mean of category means).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jraise.loglik import eval_view, scored_log_prob_sums

NO_CATEGORY = "(none)"  # the per-category key of examples without a category (JSON keys are strings)


# ----------------------------------------------------------------------------------------------
# Log-likelihoods of a split model (the math is `jraise.loglik`'s)


@jax.jit
def _scored_sums(graphdef, state, input_ids, attention_mask, mask):
    return scored_log_prob_sums(nnx.merge(graphdef, state), input_ids, attention_mask, mask)


def split_for_eval(model: nnx.Module):
    """(graphdef, state) of the model with dropout off (`jraise.loglik.eval_view`): split once,
    then call `scored_sums` / `response_nll_sums` per batch."""
    return nnx.split(eval_view(model))


def scored_sums(graphdef, state, input_ids, attention_mask, mask) -> tuple[jax.Array, jax.Array]:
    """`sequence_log_probs` on an already split model (avoids re-splitting in a batch loop)."""
    return _scored_sums(graphdef, state, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
                        jnp.asarray(mask, jnp.float32))


def sequence_log_probs(model: nnx.Module, input_ids, attention_mask, score_mask) -> tuple[jax.Array, jax.Array]:
    """Summed log-probability of the tokens in ``score_mask`` per row, and their count ([B] each):
    `jraise.loglik.scored_log_prob_sums`, jitted.

    ``input_ids``/``attention_mask``/``score_mask`` are [B, T]; padding may be on either side
    (positions follow the attention mask). Used to score multiple-choice options.
    """
    graphdef, state = split_for_eval(model)
    return scored_sums(graphdef, state, input_ids, attention_mask, score_mask)


def response_token_nll(model: nnx.Module, batch: Mapping[str, np.ndarray]) -> tuple[jax.Array, jax.Array]:
    """Per example: (sum of response-token NLL, number of response tokens), float32 [B] each.

    ``batch`` is a `jraise.data.batching.make_batch` batch: ``input_ids``, ``attention_mask``,
    ``loss_mask`` and ``example_mask`` (extra keys are ignored). Padding rows
    (``example_mask == 0``) give (0, 0) whatever their other masks say.
    """
    graphdef, state = split_for_eval(model)
    return response_nll_sums(graphdef, state, batch)


def response_nll_sums(graphdef, state, batch: Mapping[str, np.ndarray]) -> tuple[jax.Array, jax.Array]:
    """`response_token_nll` on an already split model: minus the scored sums under the mask
    ``loss_mask * example_mask``."""
    mask = np.asarray(batch["loss_mask"], np.float32) * np.asarray(batch["example_mask"], np.float32)[:, None]
    sum_log_prob, n_tokens = scored_sums(graphdef, state, batch["input_ids"], batch["attention_mask"], mask)
    return -sum_log_prob, n_tokens


# ----------------------------------------------------------------------------------------------
# Summaries by category


def category_key(category: str | None) -> str:
    return NO_CATEGORY if category is None else str(category)


def finite_or_none(value: float) -> float | None:
    """A float for JSON, or None when it is NaN/inf (strict JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _groups(categories: Sequence[str | None]) -> dict[str, np.ndarray]:
    """Row indices per category key, keys in first-seen order."""
    keys = np.array([category_key(c) for c in categories], dtype=object)
    return {key: np.flatnonzero(keys == key) for key in dict.fromkeys(keys.tolist())}


def _loss_group(sum_nll: np.ndarray, n_tokens: np.ndarray) -> dict:
    scored = n_tokens > 0  # an example without response tokens has no loss to average
    per_example = sum_nll[scored] / n_tokens[scored]
    total_tokens = float(n_tokens.sum())
    return {
        "n_examples": int(scored.sum()),
        "n_tokens": int(total_tokens),
        "per_example": finite_or_none(per_example.mean()) if scored.any() else None,
        "per_token": finite_or_none(sum_nll.sum() / total_tokens) if total_tokens else None,
    }


def loss_summary(sum_nll: Sequence[float], n_tokens: Sequence[float], categories: Sequence[str | None]) -> dict:
    """Mean response NLL overall and per category, both ``per_example`` and ``per_token`` (see the
    module docstring), with example and token counts: ``{"overall": {...}, "per_category": {...}}``."""
    sum_nll, n_tokens = np.asarray(sum_nll, np.float64), np.asarray(n_tokens, np.float64)
    return {
        "overall": _loss_group(sum_nll, n_tokens),
        "per_category": {key: _loss_group(sum_nll[rows], n_tokens[rows]) for key, rows in _groups(categories).items()},
    }


def _accuracy_group(correct: np.ndarray) -> dict:
    n = len(correct)
    return {"n": n, "n_correct": int(correct.sum()), "accuracy": float(correct.mean()) if n else None}


def accuracy_summary(correct: Sequence[bool], categories: Sequence[str | None]) -> dict:
    """Accuracy with counts, overall (pooled over examples) and per category."""
    correct = np.asarray(correct, bool)
    return {
        "overall": _accuracy_group(correct),
        "per_category": {key: _accuracy_group(correct[rows]) for key, rows in _groups(categories).items()},
    }


# ----------------------------------------------------------------------------------------------
# Multiple choice


def option_scores(sum_log_probs: Sequence[float], n_tokens: Sequence[float], length_normalise: bool) -> np.ndarray:
    """An option's score: its summed log-prob, or with ``length_normalise`` the mean per scored
    token (sum / number of scored tokens), which stops long options losing for being long."""
    sums = np.asarray(sum_log_probs, np.float64)
    if not length_normalise:
        return sums
    counts = np.asarray(n_tokens, np.float64)
    if (counts <= 0).any():
        raise ValueError("an option with no scored tokens cannot be length-normalised")
    return sums / counts


def choose_options(scores: Sequence[float], offsets: Sequence[int]) -> np.ndarray:
    """Argmax option per question; question q owns ``scores[offsets[q]:offsets[q+1]]``.

    Ties go to the lowest option index (``np.argmax``), deterministic and independent of batching.
    """
    scores, offsets = np.asarray(scores), np.asarray(offsets)
    if offsets[0] != 0 or offsets[-1] != len(scores) or (np.diff(offsets) < 1).any():
        raise ValueError("offsets must start at 0, end at len(scores) and give every question an option")
    return np.array([int(np.argmax(scores[a:b])) for a, b in itertools.pairwise(offsets)], dtype=np.int64)
