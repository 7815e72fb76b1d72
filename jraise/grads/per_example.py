"""Per-example gradients of the trainable subset: one jitted, vmapped, chunked program.

Data flow: a batch of G examples [G, L] -> `chunked_grads` (one mechanism for every per-example
gradient in jraise, model-agnostic ones included): rows laid out as whole chunks of ``c``,
`jax.lax.map` over the chunks, `jax.vmap` over a chunk's rows -> per row, `jax.grad` of a
per-example loss with respect to the
trainable state (LoRA adapters when attached, else every parameter; see
`jraise.train.step.split_trainable`) -> an optional per-example ``transform`` of that gradient
pytree (Adam preconditioning, flattening, a JL projection) -> stacked results [G, ...].

Peak memory is bounded by the chunk: only ``c`` per-example gradients (and their activations)
exist at once, and with a ``transform`` that projects, only ``c`` gradients at a time are
materialised before they shrink to ``d`` numbers each. The frozen base weights are shared by all
rows, never copied per example. A projection inside ``transform`` generates its random blocks
from an unbatched key, so under the vmap each block is generated once and applied to the whole
chunk (a [c, block] x [block, d] matmul).

Per-example losses (one row; `LOSSES`):

* ``"sft"``: mean cross-entropy over the row's response tokens (LESS's training loss);
* ``"logprob"``: summed log-probability of the response tokens, log pi(y|x) (a preference side);
* ``"dpo"``: -log sigmoid(beta * [(log pi(y_w|x) - ref_w) - (log pi(y_l|x) - ref_l)]) for a
  preference pair, with the reference model's log-probabilities ``ref_w``, ``ref_l`` given as
  data (computed once by `sequence_logprobs` on the reference model; they carry no gradient);
* ``"margin"``: log pi(y_l|x) - log pi(y_w|x), the reference-free form of the DPO gradient: for
  one pair grad DPO = beta * sigmoid(-z) * grad(margin), a positive scalar times it, so after L2
  normalisation the two give the same feature (ROSE's fast path).

Batch keys: SFT and logprob read ``input_ids``, ``attention_mask``, ``loss_mask``,
``example_mask``; DPO and margin read the ``chosen_``/``rejected_``-prefixed triples of
`jraise.data.batching.preference_batch` plus ``example_mask`` (and ``ref_chosen``,
``ref_rejected`` [G] for DPO). A padding row (``example_mask`` 0) has a zero loss, so a zero
gradient. Every loss runs the model with dropout off (`jraise.loglik.response_nll`), so a gradient
feature is a function of the weights and the data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jax import lax

from jraise.loglik import response_nll
from jraise.train.step import cast_to

LOSSES = ("sft", "logprob", "dpo", "margin")
DPO_BETA = 0.1  # ROSE's beta

Pytree = Any


def _row_nll(model: nnx.Module, row: Mapping[str, jax.Array], prefix: str) -> tuple[jax.Array, jax.Array]:
    """(summed response NLL, response tokens) of ONE row (arrays without a batch axis), dropout off;
    ``prefix`` picks the side of a preference pair ("", "chosen_", "rejected_")."""
    batch = {k: row[f"{prefix}{k}"][None] for k in ("input_ids", "attention_mask", "loss_mask")}
    nll, tokens = response_nll(model, {**batch, "example_mask": row["example_mask"][None]})
    return nll[0], tokens[0]


def example_loss(model: nnx.Module, row: Mapping[str, jax.Array], loss: str, beta: float = DPO_BETA) -> jax.Array:
    """The scalar loss ``loss`` (see `LOSSES`) of one example ``row`` (arrays without a batch axis)."""
    if loss == "sft":
        nll, tokens = _row_nll(model, row, "")
        return nll / jnp.maximum(tokens, 1.0)
    if loss == "logprob":
        nll, _ = _row_nll(model, row, "")
        return -nll
    if loss in ("dpo", "margin"):
        chosen = -_row_nll(model, row, "chosen_")[0]
        rejected = -_row_nll(model, row, "rejected_")[0]
        if loss == "margin":
            return rejected - chosen
        z = beta * ((chosen - row["ref_chosen"]) - (rejected - row["ref_rejected"]))
        return -jax.nn.log_sigmoid(z) * row["example_mask"]
    raise ValueError(f"unknown per-example loss {loss!r}; choose from {', '.join(LOSSES)}")


def example_loss_fn(graphdef: nnx.GraphDef, loss: str, dtypes: Pytree | None = None,
                    beta: float = DPO_BETA) -> Callable:
    """``loss_of(trainable, frozen, row) -> scalar``: `example_loss` of one example with the model
    rebuilt from its trainable and frozen states (trainable cast to ``dtypes``)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown per-example loss {loss!r}; choose from {', '.join(LOSSES)}")

    def loss_of(trainable, frozen, row):
        model = nnx.merge(graphdef, cast_to(trainable, dtypes), frozen, copy=True)
        return example_loss(model, row, loss, beta)

    return loss_of


def example_grad_fn(graphdef: nnx.GraphDef, loss: str, dtypes: Pytree | None = None,
                    beta: float = DPO_BETA) -> Callable:
    """``grad(trainable, frozen, row) -> gradient pytree`` (like ``trainable``) of one example."""
    return jax.grad(example_loss_fn(graphdef, loss, dtypes, beta))


def make_per_example_fn(graphdef: nnx.GraphDef, loss: str = "sft", chunk: int = 8,
                        transform: Callable[[Pytree], Pytree] | None = None, dtypes: Pytree | None = None,
                        beta: float = DPO_BETA, jit: bool = True, rows_last: bool = False,
                        on_chunk: Callable[[Pytree, Pytree], Pytree] | None = None) -> Callable:
    """A jitted ``fn(trainable, frozen, batch, extra) -> [G, ...]`` of per-example results: jraise's
    `CausalLM` as a ``loss_fn(params, example)`` for `chunked_grads`.

    ``batch``: arrays with a leading example axis G (see the module docstring for keys; extra keys
    are ignored). ``transform(grad, extra)`` maps one example's gradient pytree to what is kept
    (default: the gradient itself); ``extra`` is any pytree it needs (Adam moments, a projection
    key), passed through unbatched. Rows are processed ``chunk`` at a time; G need not be a
    multiple of ``chunk`` (the last chunk is padded with row 0, whose results are dropped).
    ``on_chunk(tree, extra)``, when given, then maps the whole chunk's (transformed) tree to a
    pytree of ``[c, ...]`` leaves, e.g. a projection of the chunk. ``rows_last``: the chunk's
    gradients are laid out with the example axis last (leaves ``[*param.shape, c]``, see
    `chunked_grads`), ``transform`` still sees one example; what leaves without ``on_chunk`` is
    moved back to rows first. ``jit=False`` returns the plain function, to be composed inside a
    caller's jit.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    loss_of = example_loss_fn(graphdef, loss, dtypes, beta)
    keys = _batch_keys(loss)
    axis = -1 if rows_last else 0

    def fn(trainable, frozen, batch, extra=None):
        rows = {k: batch[k] for k in keys}

        def keep(tree):
            if transform is not None:
                tree = jax.vmap(lambda grad: transform(grad, extra), in_axes=axis, out_axes=axis)(tree)
            if on_chunk is not None:
                return on_chunk(tree, extra)
            return jax.tree.map(lambda x: jnp.moveaxis(x, -1, 0), tree) if rows_last else tree

        return chunked_grads(lambda params, row: loss_of(params, frozen, row), trainable, rows, chunk, keep,
                             rows_last=rows_last)

    return jax.jit(fn) if jit else fn


def chunked_rows(fn: Callable[[Pytree], Pytree], batch: Pytree, chunk: int) -> Pytree:
    """``fn`` over the rows of ``batch``, ``chunk`` rows at a time, stacked over the G rows.

    The rows are laid out as ``n = ceil(G / c)`` chunks of ``c = min(chunk, G)`` (the last padded
    with copies of row 0: a real example, so a loss on it stays finite); `jax.lax.map` runs
    ``fn(rows)`` (leaves ``[c, ...]`` in, a pytree of ``[c, ...]`` leaves out) on the chunks one
    after another, so only one chunk's intermediates are live at a time. Padding rows are dropped
    from the result (leaves ``[G, ...]``).
    """
    count = jax.tree.leaves(batch)[0].shape[0]
    size = min(chunk, count)
    n_chunks = -(-count // size)
    pad = n_chunks * size - count

    def lay_out(x):
        x = jnp.asarray(x)
        if pad:
            x = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)], axis=0)
        return x.reshape(n_chunks, size, *x.shape[1:])

    out = lax.map(fn, jax.tree.map(lay_out, batch))
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:])[:count], out)


def chunked_grads(loss_fn: Callable, params: Pytree, batch: Pytree, chunk: int,
                  on_chunk: Callable[[Pytree], Pytree] | None = None, rows_last: bool = False) -> Pytree:
    """``on_chunk`` of the gradients of ``loss_fn(params, example)`` for every row of ``batch``,
    ``chunk`` rows at a time, stacked over the G rows (`chunked_rows`).

    Inside a chunk, ``jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))`` gives the chunk's gradients
    (leaves ``[c, *param.shape]``), which ``on_chunk`` maps to a pytree of ``[c, ...]`` leaves
    (default: kept as they are) before the next chunk is computed. ``rows_last=True`` asks the
    vmap for the example axis last instead (leaves ``[*param.shape, c]``, ``out_axes=-1``): XLA
    writes the per-example weight gradients in that layout directly, so a consumer that reads
    one coordinate across the chunk (`jraise.grads.projection.project_columns_sjlt`) needs no
    transpose; it needs an ``on_chunk``, which must still return ``[c, ...]`` leaves. No other
    checks here: see `jraise.grads.agnostic.per_example_grads` for the checked public form.
    """
    if rows_last and on_chunk is None:
        raise ValueError("rows_last=True needs an on_chunk that returns [c, ...] leaves")
    grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0), out_axes=-1 if rows_last else 0)

    def one_chunk(rows):
        tree = grads(params, rows)
        return tree if on_chunk is None else on_chunk(tree)

    return chunked_rows(one_chunk, batch, chunk)


def _batch_keys(loss: str) -> tuple[str, ...]:
    if loss in ("sft", "logprob"):
        return ("input_ids", "attention_mask", "loss_mask", "example_mask")
    sides = tuple(f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "loss_mask"))
    return (*sides, "example_mask") + (("ref_chosen", "ref_rejected") if loss == "dpo" else ())


def make_sequence_logprob_fn(graphdef: nnx.GraphDef, dtypes: Pytree | None = None) -> Callable:
    """A jitted ``fn(trainable, frozen, input_ids, attention_mask, loss_mask, example_mask) -> [B]``:
    summed response-token log-probability per row (the DPO reference terms), dropout off."""

    def fn(trainable, frozen, input_ids, attention_mask, loss_mask, example_mask):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
                 "example_mask": example_mask}
        nll, _ = response_nll(nnx.merge(graphdef, cast_to(trainable, dtypes), frozen), batch)
        return -nll

    return jax.jit(fn)


def adam_precondition(grad: Pytree, mu: Pytree, nu: Pytree, b1: float = 0.9, b2: float = 0.999,
                      eps: float = 1e-8) -> Pytree:
    """LESS's Adam feature of one gradient, as in its code: the next step's moment estimates
    without bias correction, epsilon inside the square root:
    ``(b1*mu + (1-b1)*g) / sqrt(b2*nu + (1-b2)*g**2 + eps)``, leaf by leaf."""

    def leaf(g, m, v):
        g = g.astype(jnp.float32)
        return (b1 * m + (1 - b1) * g) / jnp.sqrt(b2 * v + (1 - b2) * g * g + eps)

    return jax.tree.map(leaf, grad, mu, nu)
