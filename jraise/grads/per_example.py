"""Per-example gradients of the trainable subset: one jitted, vmapped, chunked program.

Data flow: a batch of G examples [G, L] -> `jax.lax.map(..., batch_size=c)` over rows, which
vmaps ``c`` rows at a time -> per row, `jax.grad` of a per-example loss with respect to the
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
gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jraise.train.step import cast_to, example_nll

LOSSES = ("sft", "logprob", "dpo", "margin")
DPO_BETA = 0.1  # ROSE's beta

Pytree = Any


def _deterministic(model: nnx.Module) -> nnx.Module:
    """The model with dropout off: gradient features are a function of the weights and the data."""
    if any(isinstance(node, nnx.Dropout) for _, node in nnx.iter_graph(model)):
        return nnx.view(model, only=nnx.Dropout, deterministic=True)
    return model


def _row_nll(model, input_ids, attention_mask, loss_mask, example_mask):
    """(summed response NLL, response tokens) of ONE row given as [L] arrays."""
    logits = model(input_ids[None], attention_mask[None])
    nll, tokens = example_nll(logits, input_ids[None], loss_mask[None], example_mask[None])
    return nll[0], tokens[0]


def _side(row: Mapping[str, jax.Array], prefix: str) -> tuple:
    return (row[f"{prefix}input_ids"], row[f"{prefix}attention_mask"], row[f"{prefix}loss_mask"],
            row["example_mask"])


def example_loss(model: nnx.Module, row: Mapping[str, jax.Array], loss: str, beta: float = DPO_BETA) -> jax.Array:
    """The scalar loss ``loss`` (see `LOSSES`) of one example ``row`` (arrays without a batch axis)."""
    if loss == "sft":
        nll, tokens = _row_nll(model, *_side(row, ""))
        return nll / jnp.maximum(tokens, 1.0)
    if loss == "logprob":
        nll, _ = _row_nll(model, *_side(row, ""))
        return -nll
    if loss in ("dpo", "margin"):
        chosen = -_row_nll(model, *_side(row, "chosen_"))[0]
        rejected = -_row_nll(model, *_side(row, "rejected_"))[0]
        if loss == "margin":
            return rejected - chosen
        z = beta * ((chosen - row["ref_chosen"]) - (rejected - row["ref_rejected"]))
        return -jax.nn.log_sigmoid(z) * row["example_mask"]
    raise ValueError(f"unknown per-example loss {loss!r}; choose from {', '.join(LOSSES)}")


def example_grad_fn(graphdef: nnx.GraphDef, loss: str, dtypes: Pytree | None = None,
                    beta: float = DPO_BETA) -> Callable:
    """``grad(trainable, frozen, row) -> gradient pytree`` (like ``trainable``) of one example."""
    if loss not in LOSSES:
        raise ValueError(f"unknown per-example loss {loss!r}; choose from {', '.join(LOSSES)}")

    def loss_of(trainable, frozen, row):
        model = _deterministic(nnx.merge(graphdef, cast_to(trainable, dtypes), frozen, copy=True))
        return example_loss(model, row, loss, beta)

    return jax.grad(loss_of)


def make_per_example_fn(graphdef: nnx.GraphDef, loss: str = "sft", chunk: int = 8,
                        transform: Callable[[Pytree], Pytree] | None = None, dtypes: Pytree | None = None,
                        beta: float = DPO_BETA, jit: bool = True) -> Callable:
    """A jitted ``fn(trainable, frozen, batch, extra) -> [G, ...]`` of per-example results.

    ``batch``: arrays with a leading example axis G (see the module docstring for keys; extra keys
    are ignored). ``transform(grad, extra)`` maps one example's gradient pytree to what is kept
    (default: the gradient itself); ``extra`` is any pytree it needs (Adam moments, a projection
    key), passed through unbatched. Rows are processed ``chunk`` at a time (`jax.lax.map` with
    ``batch_size=chunk``): G need not be a multiple of ``chunk``. ``jit=False`` returns the plain
    function, to be composed inside a caller's jit.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    grad_fn = example_grad_fn(graphdef, loss, dtypes, beta)
    keys = _batch_keys(loss)

    def fn(trainable, frozen, batch, extra=None):
        rows = {k: batch[k] for k in keys}

        def one(row):
            grad = grad_fn(trainable, frozen, row)
            return grad if transform is None else transform(grad, extra)

        return jax.lax.map(one, rows, batch_size=chunk)

    return jax.jit(fn) if jit else fn


def _batch_keys(loss: str) -> tuple[str, ...]:
    if loss in ("sft", "logprob"):
        return ("input_ids", "attention_mask", "loss_mask", "example_mask")
    sides = tuple(f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "loss_mask"))
    return (*sides, "example_mask") + (("ref_chosen", "ref_rejected") if loss == "dpo" else ())


def make_sequence_logprob_fn(graphdef: nnx.GraphDef, dtypes: Pytree | None = None) -> Callable:
    """A jitted ``fn(trainable, frozen, input_ids, attention_mask, loss_mask, example_mask) -> [B]``:
    summed response-token log-probability per row (the DPO reference terms), dropout off."""

    def fn(trainable, frozen, input_ids, attention_mask, loss_mask, example_mask):
        model = _deterministic(nnx.merge(graphdef, cast_to(trainable, dtypes), frozen))
        logits = model(input_ids, attention_mask)
        nll, _ = example_nll(logits, input_ids, loss_mask, example_mask)
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
