"""Model-agnostic gradient features: any JAX model given as a params pytree and a loss function.

Stage: ``jraise.grads``, for callers outside jraise's own ``CausalLM`` (a pure-JAX or linen model
in the user's training loop). The contract is only::

    loss_fn(params, example) -> scalar        (example: one row of ``batch``, leading axis removed)

Data flow (LESS, Xia et al. 2024, arXiv 2402.04333)::

    params pytree, batch pytree (leaves [G, ...])
      --per_example_grads-->   gradient pytree, leaves [G, *param.shape]
      --precondition-->        optional, one example at a time (e.g. `adam_preconditioner`)
      --flatten + project-->   features [G, d] float32          (`gradient_features`)

The examples are processed ``chunk`` at a time by `jraise.grads.per_example.chunked_grads`, the
mechanism jraise's own features use: ``jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))`` over the
rows of one chunk, ``lax.map`` over the chunks, G padded up to whole chunks by repeating row 0 (a
real example, so the loss stays finite) and the padding dropped from the results. `gradient_features` projects each chunk before the next is computed, so at most
``chunk`` gradients (``chunk x P`` numbers, P = the parameter count) exist at once; the full
``[G, P]`` matrix is never formed.

The projection is the one `ProjectionConfig` defines for jraise's own features: dense mode is
`project_tree` (leaves raveled and concatenated in ``jax.tree_util`` order, as
`flatten_batched_tree` does, times the implicit random matrix of `project`); factored mode is
`project_tree_factored`; sjlt mode equals `project_tree_sjlt` (the same flattening, then the
sparse JL transform of `project_sjlt`), computed on gradients laid out with the example axis last
(`project_columns_sjlt`, no flattened copy). Features of the same pytree structure under the same config are
therefore comparable with jraise's (up to float32 summation order). All three functions are
jit-able with ``loss_fn``, ``chunk`` and ``projection`` static (e.g. via ``functools.partial``);
the shape checks read only static shapes.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jraise.grads.per_example import adam_precondition, chunked_grads
from jraise.grads.projection import (
    ProjectionConfig,
    project_columns_sjlt,
    project_tree,
    project_tree_factored,
    sjlt_table,
    tree_size,
)

__all__ = ["AdamPreconditioner", "adam_preconditioner", "gradient_features", "per_example_grads"]

Pytree = Any


# ----------------------------------------------------------------------------- checks


def _named_leaves(tree) -> list[tuple[str, Any]]:
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _check_chunk(chunk) -> None:
    if not isinstance(chunk, numbers.Integral) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer (examples per vmapped step), got {chunk!r}")


def _example_count(batch) -> int:
    """G, the leading axis shared by every leaf of ``batch``; ValueError naming the leaves otherwise."""
    leaves = _named_leaves(batch)
    if not leaves:
        raise ValueError("batch has no array leaves: give a pytree of arrays with a leading example axis [G, ...]")
    first_name, first = leaves[0]
    first_shape = tuple(jnp.shape(first))
    for name, leaf in leaves:
        shape = tuple(jnp.shape(leaf))
        if not shape:
            raise ValueError(f"batch leaf {name or '<root>'} is a scalar (shape ()); every batch leaf needs a "
                             f"leading example axis [G, ...]")
        if shape[0] != first_shape[0]:
            raise ValueError(f"batch leaves disagree on the leading (example) axis: {first_name or '<root>'} has "
                             f"shape {first_shape} (G = {first_shape[0]}) but {name} has shape {shape} "
                             f"(G = {shape[0]})")
    if first_shape[0] == 0:
        raise ValueError(f"batch is empty: leading (example) axis G = 0 (leaf {first_name or '<root>'} has shape "
                         f"{first_shape}); give at least one example")
    return int(first_shape[0])


def _check_loss(loss_fn: Callable, params: Pytree, batch: Pytree) -> None:
    """``loss_fn(params, one example)`` must be a real floating scalar (checked on shapes only)."""
    example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)), batch)
    out = jax.eval_shape(loss_fn, params, example)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        got = jax.tree.map(lambda s: f"{s.dtype}{list(s.shape)}", out)
        raise ValueError(f"loss_fn(params, example) must return a scalar for one example (the batch's leading "
                         f"axis removed), got {got}")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"loss_fn(params, example) must return a real floating scalar, got dtype {out.dtype}")


def _prepare(loss_fn: Callable, params: Pytree, batch: Pytree, chunk) -> int:
    _check_chunk(chunk)
    count = _example_count(batch)
    _check_loss(loss_fn, params, batch)
    return count


# ----------------------------------------------------------------------------- public


def per_example_grads(loss_fn: Callable, params: Pytree, batch: Pytree, *, chunk: int = 8) -> Pytree:
    """The gradient of ``loss_fn`` at ``params`` for every example of ``batch``, stacked.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar`` (real floating, shape ()); ``example`` is one
        row of ``batch``: the same pytree with each leaf's leading axis removed.
      params: pytree of floating arrays (the gradient is taken with respect to all of it).
      batch: pytree whose leaves all have the same leading example axis G >= 1.
      chunk: examples vmapped at once (static; capped at G). G need not be a multiple of it.

    Returns:
      A pytree like ``params`` with leaves ``[G, *leaf.shape]`` (each leaf in its parameter's
      dtype): entry g equals ``jax.grad(loss_fn)(params, example_g)``.

    Raises:
      ValueError: ``chunk`` < 1; ``batch`` has no leaves, G = 0, a scalar leaf, or leaves that
        disagree on G (the message names the leaves and their shapes); ``loss_fn`` does not return
        a floating scalar.
    """
    _prepare(loss_fn, params, batch, chunk)
    return chunked_grads(loss_fn, params, batch, chunk)


def gradient_features(loss_fn: Callable, params: Pytree, batch: Pytree, *, projection: ProjectionConfig,
                      precondition: Callable[[Pytree], Pytree] | None = None, chunk: int = 8) -> jax.Array:
    """Projected per-example gradients ``[G, projection.dim]`` float32 (not normalised).

    Row g is ``project_tree`` (dense mode), ``project_tree_factored`` (factored mode) or
    ``project_tree_sjlt`` (sjlt mode, with ``projection.sjlt_nnz``) of
    ``precondition(jax.grad(loss_fn)(params, example_g))`` (of the plain gradient when
    ``precondition`` is None), with the key ``projection.key()`` and the config's dim, kind and
    block_rows: the coordinates are the leaves raveled and concatenated in ``jax.tree_util`` order
    (`flatten_batched_tree`), so the features of a given pytree structure match those jraise
    computes for it.

    Args:
      loss_fn, params, batch, chunk: as in `per_example_grads`.
      projection: the `ProjectionConfig` (static).
      precondition: maps ONE example's gradient pytree (leaves ``param.shape``) to a pytree of
        floating arrays, e.g. ``adam_preconditioner(mu, nu)`` (LESS's train side); it is vmapped
        over each chunk.

    Each chunk of ``chunk`` examples is differentiated, preconditioned and projected before the
    next, so at most ``chunk x P`` gradient numbers exist at once. The projection's random blocks
    are regenerated per chunk: a larger ``chunk`` amortises them better, at the cost of memory.
    """
    if not isinstance(projection, ProjectionConfig):
        raise TypeError(f"projection must be a jraise.grads.projection.ProjectionConfig, "
                        f"got {type(projection).__name__}")
    _prepare(loss_fn, params, batch, chunk)
    if projection.mode == "sjlt":
        return _sjlt_features(loss_fn, params, batch, projection, precondition, chunk)
    key = projection.key()
    transform = None if precondition is None else jax.vmap(precondition)
    project_fn = partial(project_tree_factored if projection.mode == "factored" else project_tree,
                         kind=projection.kind)

    def one_chunk(tree):
        if transform is not None:
            tree = transform(tree)
        return project_fn(tree, key, projection.dim, block_rows=projection.block_rows)  # [c, d]

    return chunked_grads(loss_fn, params, batch, chunk, one_chunk)


def _sjlt_features(loss_fn, params, batch, projection: ProjectionConfig, precondition, chunk: int) -> jax.Array:
    """`gradient_features` in sjlt mode: each chunk's gradients laid out with the example axis
    last, preconditioned there and sketched in place by `project_columns_sjlt` (equal to
    `project_tree_sjlt` of the rows-first chunk, without its transposed copy); the hashes are drawn
    once for all chunks."""
    shapes = params if precondition is None else jax.eval_shape(precondition, params)
    table = sjlt_table(projection.key(), tree_size(shapes), projection.dim, projection.sjlt_nnz,
                       projection.block_rows)
    transform = None if precondition is None else jax.vmap(precondition, in_axes=-1, out_axes=-1)

    def one_chunk(tree):  # leaves [*param.shape, c]
        if transform is not None:
            tree = transform(tree)
        return project_columns_sjlt(tree, table, projection.dim)  # [c, d]

    return chunked_grads(loss_fn, params, batch, chunk, one_chunk, rows_last=True)


@partial(jax.tree_util.register_dataclass, data_fields=("mu", "nu"),
         meta_fields=("b1", "b2", "eps", "first_moment"))
@dataclass(frozen=True)
class AdamPreconditioner:
    """LESS's Adam update direction of one example's gradient; build it with `adam_preconditioner`.

    A pytree (``mu``, ``nu`` are its leaves, the hyperparameters static), so it can be passed
    as a traced argument of a jitted function instead of being baked in as constants.
    """

    mu: Pytree
    nu: Pytree
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    first_moment: bool = True

    def __call__(self, grad: Pytree) -> Pytree:
        _check_like("gradient", grad, "nu", self.nu)
        mu = self.mu if self.first_moment else jax.tree.map(jnp.zeros_like, self.mu)
        return adam_precondition(grad, mu, self.nu, self.b1, self.b2, self.eps)


def _check_like(name: str, tree: Pytree, ref_name: str, ref: Pytree) -> None:
    """ValueError unless ``tree`` has ``ref``'s structure and leaf shapes."""
    leaves, ref_leaves = _named_leaves(tree), _named_leaves(ref)
    names, ref_names = [n for n, _ in leaves], [n for n, _ in ref_leaves]
    if names != ref_names or jax.tree.structure(tree) != jax.tree.structure(ref):
        missing = sorted(set(ref_names) - set(names))
        extra = sorted(set(names) - set(ref_names))
        raise ValueError(f"{name} and {ref_name} must have the same pytree structure; leaves only in {ref_name}: "
                         f"{missing or 'none'}, only in {name}: {extra or 'none'}")
    for (leaf_name, leaf), (_, ref_leaf) in zip(leaves, ref_leaves):
        if tuple(jnp.shape(leaf)) != tuple(jnp.shape(ref_leaf)):
            raise ValueError(f"{name} leaf {leaf_name or '<root>'} has shape {tuple(jnp.shape(leaf))} but {ref_name} "
                             f"has {tuple(jnp.shape(ref_leaf))}")


def adam_preconditioner(mu: Pytree, nu: Pytree, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                        first_moment: bool = True) -> AdamPreconditioner:
    """``fn(grad) -> Γ`` mapping ONE example's gradient pytree to LESS's Adam update direction.

    LESS (Xia et al. 2024, arXiv 2402.04333) scores training examples by the direction Adam would
    move the weights after a step on that example alone, with the checkpoint's moments mu, nu::

        m = b1 mu + (1 - b1) g          v = b2 nu + (1 - b2) g**2
        Γ(z, θ) = m / sqrt(v + eps)      (elementwise, leaf by leaf; float32)

    as jraise's `jraise.grads.per_example.adam_precondition` computes it (this function calls it):
    the convention of LESS's released code, no bias correction and eps inside the square root
    (the paper writes bias-corrected m, v and ``m / (sqrt(v) + eps)``). It needs no step count.
    ``first_moment=False`` takes mu as zero, ``Γ = (1 - b1) g / sqrt(v + eps)``, exactly as jraise's
    ``adam_first_moment=False`` does (`jraise.grads.features.compute_features`): the example's own
    share of the update, without the shared ``b1 mu`` added to every example.

    Args:
      mu, nu: Adam's first and second moments, pytrees with the structure and leaf shapes of
        ``params`` (hence of one example's gradient).
      b1, b2, eps: Adam's hyperparameters (static).
      first_moment: keep ``b1 mu`` (LESS, the default) or drop it.

    Returns:
      An `AdamPreconditioner`: a callable pytree, ``grad -> Γ`` with Γ float32 like ``grad``;
      pass it as ``gradient_features(..., precondition=...)``. A gradient of another structure or
      shape is a ValueError naming the leaf.
    """
    _check_like("mu", mu, "nu", nu)
    for name, value in (("b1", b1), ("b2", b2)):
        if not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    if not isinstance(eps, numbers.Real) or eps < 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    return AdamPreconditioner(mu, nu, float(b1), float(b2), float(eps), bool(first_moment))
