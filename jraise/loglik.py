"""Per-token and per-sequence log-likelihoods of a causal language model, and "dropout off".

Every layer that scores text (training, evaluation, per-example gradients, selection) takes its
log-likelihoods from here, so they all compute the same numbers the same way. This module imports
no other part of `jraise`.

Data flow: a model run on ``input_ids`` [B, T] gives ``logits`` [B, T, V]; the logits at position
t-1 predict token t, so

    nll[b, t] = logsumexp(logits[b, t-1]) - logits[b, t-1, input_ids[b, t]]   (t >= 1)
              = -log p(input_ids[b, t] | input_ids[b, :t])

and a row's score is a masked sum over t of these. Mask convention (as `jraise.data.batching`):
``mask[:, t] == 1`` marks token t as scored, so ``mask[:, 0]`` never counts (nothing predicts
token 0); a row with ``example_mask == 0`` is padding and scores (0, 0).

Per token, two forms of the same number: `token_nll` (the target logit picked by a one-hot
product, for what is differentiated) and `token_log_probs` (picked by a gather, for forward-only
scoring). Per row, two reductions:

* `example_nll`: (sum over t >= 1 of nll * loss_mask * example_mask, the number of such tokens),
  from `token_nll`: the response loss of training, per-example gradients and selection;
* `masked_log_prob_sums`: (sum of log p over the tokens where a mask is 1, their count), from
  `token_log_probs`: how evaluation scores responses and multiple-choice options.

The first sums the T-1 predicted positions, the second all T positions with position 0 held at 0;
the two agree up to float rounding.

Dropout off: `eval_view`. The model runners `response_nll` and `scored_log_prob_sums` switch it
off themselves, so a score is a function of the weights and the data. `per_example_sums` writes
a batched scorer's per-row results back to pool order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# ----------------------------------------------------------------------------------------------
# From logits


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per position, as logsumexp(logits) - logits[target]: the form
    for anything that is differentiated (training, per-example gradients).

    logits [..., V] (any float dtype; computed in float32), targets [...] int -> [...] float32.
    The target logit is picked by a one-hot multiply-sum rather than a gather: the gather's
    backward pass is a scatter-add, slow on CPU, while the one-hot product fuses into the reduce.
    """
    logits = logits.astype(jnp.float32)
    one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
    picked = jnp.sum(logits * one_hot, axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - picked


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[target] per position, as logits[target] - logsumexp(logits): the form
    for forward-only scoring (evaluation), the target logit picked by a gather.

    logits [..., V] (any float dtype; computed in float32), targets [...] int -> [...] float32.
    Equals ``-token_nll`` up to float rounding (under jit the two picks may be fused differently).
    """
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def next_token_log_probs(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """log p(input_ids[:, t] | input_ids[:, :t]) at each position t, float32 [B, T].

    `token_log_probs` of the logits at t-1 against token t; position 0 has no predictor and holds 0.
    """
    return jnp.pad(token_log_probs(logits[:, :-1], input_ids[:, 1:]), ((0, 0), (1, 0)))


def example_nll(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array,
                example_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row: (summed NLL of its response tokens, number of response tokens), float32 [B] each.

    logits [B, T, V], input_ids [B, T] int, loss_mask [B, T], example_mask [B]. With
    w[b, t] = loss_mask[b, t] * example_mask[b] for t >= 1: (sum_t nll[b, t] * w[b, t], sum_t w[b, t]),
    nll as in the module docstring. ``loss_mask[:, 0]`` never counts; padding rows give (0, 0).
    """
    nll = token_nll(logits[:, :-1], input_ids[:, 1:])
    weights = loss_mask[:, 1:].astype(jnp.float32) * example_mask[:, None].astype(jnp.float32)
    return jnp.sum(nll * weights, axis=-1), jnp.sum(weights, axis=-1)


def masked_log_prob_sums(logits: jax.Array, input_ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row: (sum of log p over the tokens where ``mask`` is 1, how many tokens), float32 [B] each.

    logits [B, T, V], input_ids [B, T] int, mask [B, T] (0/1; ``mask[:, 0]`` is ignored, token 0
    being never predicted): (sum_t next_token_log_probs[b, t] * mask[b, t], sum_{t >= 1} mask[b, t]).
    """
    mask = mask.astype(jnp.float32).at[:, 0].set(0.0)
    log_probs = next_token_log_probs(logits, input_ids)
    return jnp.sum(log_probs * mask, axis=-1), jnp.sum(mask, axis=-1)


# ----------------------------------------------------------------------------------------------
# Dropout off, and the model runners


def eval_view(model: nnx.Module) -> nnx.Module:
    """The model with every dropout switched off: a view sharing the arrays (the caller's model is
    not touched). Models without dropout come back as they are."""
    if any(isinstance(node, nnx.Dropout) for _, node in nnx.iter_graph(model)):
        return nnx.view(model, only=nnx.Dropout, deterministic=True)
    return model


def response_nll(model: nnx.Module, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """`example_nll` of ``model``'s logits on ``batch``, dropout off: (summed response NLL,
    response tokens) [B] each.

    ``batch``: ``input_ids``, ``attention_mask``, ``loss_mask`` [B, T] and ``example_mask`` [B]
    (a `jraise.data.batching.make_batch` batch; extra keys are ignored). Not jitted: callers run
    it inside their own jit (a train or eval step, a gradient, a scan).
    """
    logits = eval_view(model)(batch["input_ids"], batch["attention_mask"])
    return example_nll(logits, batch["input_ids"], batch["loss_mask"], batch["example_mask"])


def scored_log_prob_sums(model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array,
                         mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`masked_log_prob_sums` of ``model``'s logits, dropout off, over the tokens of ``mask`` that
    are also in ``attention_mask`` (a scored padding token never counts). [B, T] in, [B] each out.
    Padding may be on either side (positions follow the attention mask). Not jitted.
    """
    logits = eval_view(model)(input_ids, attention_mask)
    return masked_log_prob_sums(logits, input_ids, mask * attention_mask)


# ----------------------------------------------------------------------------------------------
# Back to pool order


def per_example_sums(batches: Iterable[Mapping[str, np.ndarray]],
                     score: Callable[[Mapping[str, np.ndarray]], tuple], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two float64 [n] arrays: for every pool example, the (sum, count) that ``score`` gives its row.

    ``batches``: `jraise.data.batching.iterate_batches` batches, whose ``index`` [B] names each
    row's pool example (negative: a padding row, dropped). ``score(batch)`` returns two [B] arrays,
    e.g. (summed NLL, response tokens). Examples no batch holds stay 0.
    """
    sums = np.zeros(n, np.float64)
    counts = np.zeros(n, np.float64)
    for batch in batches:
        row_sums, row_counts = score(batch)
        real = batch["index"] >= 0
        sums[batch["index"][real]] = np.asarray(row_sums)[real]
        counts[batch["index"][real]] = np.asarray(row_counts)[real]
    return sums, counts
