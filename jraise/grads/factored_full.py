"""Full-parameter gradient features of every linear layer, never forming a per-example weight gradient.

Stage: ``jraise.grads``, beside `jraise.grads.agnostic` (which differentiates the parameters and
projects the materialised gradients). Model-agnostic: the model is a params pytree and a *tapped*
loss function; jraise's own `CausalLM` gets one from `jraise.model.taps.tapped_sft_loss`.

Contract::

    tapped_loss_fn(params, example, tap) -> scalar loss
    tap(name, x, y) -> y'        called once per featurised linear layer, y = x @ W (+ b, + ...)

``example`` is one row of ``batch`` (each leaf's leading axis removed). The model calls ``tap`` on
every linear layer whose kernel ``W [n_in, n_out]`` is to be featurised, with the layer's input
``x [..., n_in]`` (as the kernel sees it) and output ``y [..., n_out]`` (the same leading "token"
axes, any number of them), and continues with what ``tap`` returns. With ``tap = lambda n, x, y: y``
the function is the plain loss. Each name may be tapped once per call, at the top level of the
trace (not inside ``lax.scan``, ``lax.cond`` or ``jax.checkpoint``: the captured inputs must leave
the function). A layer used twice (shared weights) needs two names.

Mechanism (LoGra, Choe et al. 2024, arXiv 2405.13954). Here ``tap`` returns ``y + probe`` with a
zero probe ``[..., n_out]`` per layer and records ``x``. The gradient of the loss with respect to
the probes (not to ``params``: no weight gradient is computed) is each layer's output gradient
``Delta [N, n_out]`` (N: the token axes flattened), and the layer's per-example weight gradient is
``G = X^T Delta`` (the sum over tokens). Its feature is the Kronecker projection::

    f_layer = vec(P_in^T G P_out) = vec((X P_in)^T (Delta P_out))          [d_in * d_out]

computed from the two small products on the right, so no ``[n_in, n_out]`` array per example
exists: a chunk of c examples holds its inputs and output gradients (c N sum(n_in + n_out) numbers,
the size of what training keeps for its backward pass) and c d features, never c P (P = the
parameter count, which `jraise.grads.agnostic.gradient_features` materialises).

Projection (`ProjectionConfig` with ``mode = "factored"``; its key, kind and block_rows):

* layer order: the tapped names sorted (the ``jax.tree_util`` order of a flat dict of them);
  layer j's key is ``fold_in(projection.key(), j)`` and its factors are those of
  `factor_projections` for that key, so ``f_layer = vec(G) @ factored_matrix(fold_in(key, j),
  n_in, n_out, d_in, d_out, kind, block_rows)``;
* d split: `factored_split` of the kernel shapes (shares proportional to n_in n_out, the smaller
  side capped at sqrt of its share), except that factored_split's one fallback to a dense leaf
  (the last leaf's remaining budget B with no divisor in (a0/2, a0]) is replaced here by
  ``(a0, B // a0)`` (oriented as factored_split orients) and the fewer than a0 dims left over are
  zero columns at the end of the features (zero columns change no inner product);
* a side given as many dims as it has (``d_in == n_in``, a tiny layer at a large d) is kept
  exactly (identity), as `project_tree_factored` does.

So, without that fallback, the features equal ``project_tree_factored({name: G_name}, key, dim,
kind, block_rows)`` of the materialised kernel gradients (the tested identity). The parts are
concatenated in layer order: ``[G, dim]`` float32. Biases, norms and embedding tables are not
featurised (they are not linear layers' kernels).

Preconditioning (``precondition``): None (the plain gradient, LESS's validation side) or, per
layer, two vectors ``(a [n_in], b [n_out])`` applied as ``diag(a) G diag(b)``, i.e. ``x * a`` and
``Delta * b`` before the projection, which keeps the factorisation. `adafactor_factors` builds them
from a checkpoint's Adam second moment ``nu [n_in, n_out]`` per layer with Adafactor's rank-1
factorisation (Shazeer and Stern 2018, arXiv 1804.04235): with ``nu' = nu + eps`` (entrywise,
Adafactor's eps1), ``R = nu'.sum(1)``, ``C = nu'.sum(0)``, ``S = sum(R)``,
``nu_hat = R C^T / S`` and::

    G / sqrt(nu_hat) = diag(a) G diag(b),    a = 1 / sqrt(R),    b = sqrt(S) / sqrt(C)

(nu_hat equals nu' when nu' is rank 1).

Relation to LESS's Adam feature (Xia et al. 2024, arXiv 2402.04333; `adam_preconditioner`):
LESS's train side is ``(b1 mu + (1 - b1) g) / sqrt(b2 nu + (1 - b2) g^2 + eps)``, elementwise.
That is not of the form ``X^T Delta`` (neither the shared ``b1 mu`` nor the division by an
arbitrary nu factorises), so it needs the materialised gradient. The factored form here
(a) replaces nu by its rank-1 Adafactor approximation, (b) drops the example's own
``(1 - b2) g^2`` in the denominator (a 1e-3 weight at b2 = 0.999), (c) drops ``b1 mu`` (as
``first_moment=False`` does) and the constant factors (1 - b1), sqrt(b2), which cosine scores
ignore. Use LESS's exact feature (`gradient_features` with `adam_preconditioner`, on LoRA or a
model whose c x P gradients fit) when the selection must be LESS's own; use this path for
full-parameter features of a model whose per-example gradients do not fit in memory, or for speed
(no weight gradient is accumulated, no P x d projection), accepting the approximation (a)-(c) and
the larger variance of a Kronecker projection at equal d.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jraise.grads.per_example import chunked_rows
from jraise.grads.projection import (
    FACTOR_IN_INDEX,
    FACTOR_OUT_INDEX,
    ProjectionConfig,
    dense_matrix,
    factored_split,
)

__all__ = [
    "Tap",
    "adafactor_factors",
    "factored_full_features",
    "factored_full_plan",
    "factored_full_split",
    "tapped_inputs_and_deltas",
    "tapped_layers",
]

Pytree = Any
# tap(name, x [..., n_in], y [..., n_out]) -> y'
Tap = Callable[[str, jax.Array, jax.Array], jax.Array]

_PRECISION = lax.Precision.HIGHEST  # exact float32 products on GPU/TPU too


# ----------------------------------------------------------------------------- layers and split


def _identity_tap(name, x, y):
    return y


def _example_struct(batch: Pytree) -> Pytree:
    """One example's shapes: every batch leaf without its leading axis (checked to be shared)."""
    pairs = jax.tree_util.tree_flatten_with_path(batch)[0]
    if not pairs:
        raise ValueError("batch has no array leaves: give a pytree of arrays with a leading example axis [G, ...]")
    counts = {}
    for path, leaf in pairs:
        shape = tuple(jnp.shape(leaf))
        if not shape:
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path) or '<root>'} is a scalar; every batch leaf "
                             f"needs a leading example axis [G, ...]")
        counts.setdefault(shape[0], jax.tree_util.keystr(path) or "<root>")
    if len(counts) > 1:
        raise ValueError(f"batch leaves disagree on the leading (example) axis: sizes {sorted(counts)} "
                         f"(e.g. leaves {sorted(counts.values())})")
    if 0 in counts:
        raise ValueError("batch is empty: leading (example) axis G = 0")
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)), batch)


def _tap_shapes(tapped_loss_fn: Callable, params: Pytree, example: Pytree) -> dict[str, tuple[tuple, tuple]]:
    """``{name: (x shape, y shape)}`` of every tapped layer, names sorted; traced on shapes only.
    Checks the tap contract and the loss (see `tapped_layers`)."""
    found: dict[str, tuple[tuple, tuple]] = {}

    def record(name, x, y):
        _check_tap(name, x, y, found)
        found[name] = (tuple(x.shape), tuple(y.shape))
        return y

    out = jax.eval_shape(lambda p, e: tapped_loss_fn(p, e, record), params, example)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
        got = jax.tree.map(lambda s: f"{s.dtype}{list(s.shape)}", out)
        raise ValueError(f"tapped_loss_fn(params, example, tap) must return a real floating scalar, got {got}")
    if not found:
        raise ValueError("tapped_loss_fn never called tap(name, x, y): no linear layer to featurise")
    return {name: found[name] for name in sorted(found)}


def _as_struct(example: Pytree) -> Pytree:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), example)


def tapped_layers(tapped_loss_fn: Callable, params: Pytree, example: Pytree) -> dict[str, tuple[int, int]]:
    """``{name: (n_in, n_out)}`` of every layer ``tapped_loss_fn(params, example, tap)`` taps, in
    layer order (names sorted). Traced on shapes only (``jax.eval_shape``); ``example`` is one
    example (arrays or ``ShapeDtypeStruct``, no example axis).

    Raises ValueError when no layer is tapped, a name is not a string or is tapped twice, ``x`` and
    ``y`` are not arrays with at least one axis agreeing on all axes but the last, or the loss is
    not a real floating scalar.
    """
    shapes = _tap_shapes(tapped_loss_fn, params, _as_struct(example))
    return {name: (x[-1], y[-1]) for name, (x, y) in shapes.items()}


def _check_tap(name, x, y, seen) -> None:
    if not isinstance(name, str):
        raise ValueError(f"tap(name, x, y): name must be a string, got {name!r}")
    if name in seen:
        raise ValueError(f"layer {name!r} was tapped twice in one call; give every use of a layer its own name")
    for what, value in (("x", x), ("y", y)):
        if not hasattr(value, "shape") or len(value.shape) < 1:
            raise ValueError(f"tap({name!r}, x, y): {what} must be an array [..., features], got "
                             f"{getattr(value, 'shape', type(value).__name__)}")
    if tuple(x.shape[:-1]) != tuple(y.shape[:-1]):
        raise ValueError(f"tap({name!r}, x, y): x {tuple(x.shape)} and y {tuple(y.shape)} must agree on all axes "
                         f"but the last (the tokens)")


def _oriented(shape: tuple[int, int], small: int, big: int) -> tuple[int, int]:
    return (small, big) if shape[0] <= shape[1] else (big, small)


def factored_full_split(shapes, dim: int, names=None) -> tuple[tuple[int, int], ...]:
    """``(d_in, d_out)`` per kernel shape ``(n_in, n_out)`` (layer order); the products add up to
    ``dim`` minus fewer than ``isqrt(dim)`` zero columns.

    `factored_split` of the shapes, with its dense fallback for the last leaf (remaining budget B
    with no divisor in (a0/2, a0]) replaced by ``(a0, B // a0)``, a0 = ``min(n_in, n_out,
    isqrt(B))``, the smaller side first as factored_split orients; ``dim - sum(d_in * d_out)`` is
    then the number of zero columns `factored_full_features` appends.
    """
    shapes = [tuple(int(n) for n in s) for s in shapes]
    names = [f"layer {j}" for j in range(len(shapes))] if names is None else [str(n) for n in names]
    for name, shape in zip(names, shapes):
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"layer {name}: kernel shape must be (n_in, n_out) with both >= 1, got {shape}")
    if not isinstance(dim, numbers.Integral) or isinstance(dim, bool) or dim < len(shapes):
        raise ValueError(f"dim must be an integer >= the number of tapped layers ({len(shapes)}): every layer needs "
                         f"at least one dim; got {dim!r}")
    out = []
    for shape, dims in zip(shapes, factored_split(shapes, int(dim), names)):
        if len(dims) == 1:  # factored_split's dense fallback: keep the layer factored, pad the rest
            side = max(1, min(shape[0], shape[1], math.isqrt(dims[0])))
            dims = _oriented(shape, side, dims[0] // side)
        out.append(tuple(dims))
    return tuple(out)


def factored_full_plan(tapped_loss_fn: Callable, params: Pytree, example: Pytree,
                       dim: int) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
    """(name, (n_in, n_out), (d_in, d_out)) per tapped layer, in layer order: the projection
    `factored_full_features` applies (for inspection; ``example`` as in `tapped_layers`)."""
    layers = tapped_layers(tapped_loss_fn, params, example)
    split = factored_full_split(list(layers.values()), dim, list(layers))
    return [(name, shape, dims) for (name, shape), dims in zip(layers.items(), split)]


# ----------------------------------------------------------------------------- one example


def tapped_inputs_and_deltas(tapped_loss_fn: Callable, params: Pytree, example: Pytree):
    """``(loss, {name: (X [N, n_in], Delta [N, n_out])})`` of ONE example (arrays, no example axis):
    each tapped layer's inputs and the gradient of the loss with respect to its outputs, the token
    axes flattened to N, so that the kernel's gradient is ``X^T Delta``. ``params`` is not
    differentiated. jit-able with ``tapped_loss_fn`` static."""
    return _inputs_and_deltas(tapped_loss_fn, _tap_shapes(tapped_loss_fn, params, _as_struct(example)), params,
                              example)


def _inputs_and_deltas(tapped_loss_fn: Callable, shapes: Mapping[str, tuple[tuple, tuple]], params: Pytree,
                       example: Pytree):
    """`tapped_inputs_and_deltas` with the tap shapes of `_tap_shapes` given (vmap-able over example)."""
    probes = {name: jnp.zeros(y_shape, jnp.float32) for name, (_, y_shape) in shapes.items()}

    def with_probes(probes):
        inputs: dict[str, jax.Array] = {}

        def tap(name, x, y):
            _check_tap(name, x, y, inputs)
            if name not in probes or tuple(y.shape) != probes[name].shape or tuple(x.shape) != shapes[name][0]:
                raise ValueError(f"tap({name!r}, x {tuple(x.shape)}, y {tuple(y.shape)}) differs from the layers "
                                 f"listed on shapes: {dict(shapes)}")
            inputs[name] = x
            return y + probes[name].astype(y.dtype)

        loss = tapped_loss_fn(params, example, tap)
        missing = sorted(set(probes) - set(inputs))
        if missing:
            raise ValueError(f"layers {missing} were listed but not tapped in this call")
        return loss, inputs

    (loss, inputs), deltas = jax.value_and_grad(with_probes, has_aux=True)(probes)
    out = {}
    for name, (x_shape, y_shape) in shapes.items():
        out[name] = (inputs[name].reshape(-1, x_shape[-1]), deltas[name].reshape(-1, y_shape[-1]))
    return loss, out


# ----------------------------------------------------------------------------- preconditioning


def adafactor_factors(nu: Mapping[str, jax.Array], *, eps: float = 1e-8) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Adafactor's rank-1 preconditioner of each layer from Adam's second moment: ``{name: (a, b)}``.

    Args:
      nu: ``{layer name: nu [n_in, n_out]}``, the checkpoint's Adam second moment of each tapped
        kernel (jraise's `CausalLM`: `jraise.model.taps.layer_kernels` picks them from a
        params-shaped tree).
      eps: added to every entry of nu before factoring (Adafactor's eps1; the default is the eps
        of `adam_preconditioner`); >= 0. With eps = 0 a row or column of nu summing to zero gives
        infinite factors (not checked).

    Returns:
      ``a = 1 / sqrt(R)`` [n_in] and ``b = sqrt(S) / sqrt(C)`` [n_out] float32, with ``nu' = nu +
      eps``, ``R = nu'.sum(1)``, ``C = nu'.sum(0)``, ``S = R.sum()``, so that ``diag(a) G diag(b) =
      G / sqrt(R C^T / S)`` (see the module docstring). Pass it as
      ``factored_full_features(..., precondition=...)``.
    """
    if not isinstance(nu, Mapping) or not nu:
        raise ValueError("nu must be a non-empty mapping {layer name: second moment [n_in, n_out]}")
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    out = {}
    for name, value in nu.items():
        if jnp.ndim(value) != 2:
            raise ValueError(f"nu[{name!r}] must be a kernel's second moment [n_in, n_out], got shape "
                             f"{tuple(jnp.shape(value))}")
        v = jnp.asarray(value, jnp.float32) + jnp.float32(eps)
        rows, cols = v.sum(axis=1), v.sum(axis=0)
        out[name] = (lax.rsqrt(rows), jnp.sqrt(rows.sum()) * lax.rsqrt(cols))
    return out


def _check_precondition(precondition, layers: Mapping[str, tuple[int, int]]) -> None:
    if not isinstance(precondition, Mapping):
        raise ValueError(f"precondition must be None or a mapping {{layer name: (a [n_in], b [n_out])}} (see "
                         f"adafactor_factors), got {type(precondition).__name__}")
    missing, extra = sorted(set(layers) - set(precondition)), sorted(set(precondition) - set(layers))
    if missing or extra:
        raise ValueError(f"precondition must name exactly the tapped layers; missing: {missing or 'none'}, "
                         f"not tapped: {extra or 'none'}")
    for name, (n_in, n_out) in layers.items():
        factors = precondition[name]
        if not isinstance(factors, (tuple, list)) or len(factors) != 2:
            raise ValueError(f"precondition[{name!r}] must be a pair (a [n_in], b [n_out])")
        a, b = factors
        if tuple(jnp.shape(a)) != (n_in,) or tuple(jnp.shape(b)) != (n_out,):
            raise ValueError(f"precondition[{name!r}]: a {tuple(jnp.shape(a))} and b {tuple(jnp.shape(b))} must be "
                             f"({n_in},) and ({n_out},) for a kernel [{n_in}, {n_out}]")


# ----------------------------------------------------------------------------- features


def _factors(key: jax.Array, layers, split, kind: str, block_rows: int) -> list:
    """Per layer (P_in or None, P_out or None): None for a side kept exactly (d == n)."""
    out = []
    for j, ((n_in, n_out), (d_in, d_out)) in enumerate(zip(layers.values(), split)):
        layer_key = jax.random.fold_in(key, j)
        p_in = None if d_in == n_in else dense_matrix(jax.random.fold_in(layer_key, FACTOR_IN_INDEX), n_in, d_in,
                                                       kind, block_rows)
        p_out = None if d_out == n_out else dense_matrix(jax.random.fold_in(layer_key, FACTOR_OUT_INDEX), n_out,
                                                          d_out, kind, block_rows)
        out.append((p_in, p_out))
    return out


def _project_side(values: jax.Array, factor) -> jax.Array:
    values = values.astype(jnp.float32)
    return values if factor is None else jnp.einsum("cni,ij->cnj", values, factor, precision=_PRECISION)


def factored_full_features(tapped_loss_fn: Callable, params: Pytree, batch: Pytree, *,
                           projection: ProjectionConfig,
                           precondition: Mapping[str, tuple[jax.Array, jax.Array]] | None = None,
                           chunk: int = 8) -> jax.Array:
    """Factored full-parameter features ``[G, projection.dim]`` float32 (not normalised), never
    forming a per-example weight gradient.

    Row g concatenates, over the tapped layers in layer order (names sorted),
    ``vec(P_in^T diag(a) X^T Delta diag(b) P_out)`` of example g (see the module docstring; a = b
    = 1 without ``precondition``), then the zero columns of `factored_full_split` if any.

    Args:
      tapped_loss_fn: ``(params, example, tap) -> scalar`` (module docstring); static under jit.
      params: pytree passed through unchanged (never differentiated, shared by all examples).
      batch: pytree whose leaves share a leading example axis G >= 1.
      projection: a `ProjectionConfig` with ``mode = "factored"`` (static): dim, key, kind, block_rows.
      precondition: None, or ``{name: (a [n_in], b [n_out])}`` for every tapped layer
        (`adafactor_factors`); a traced argument is fine.
      chunk: examples vmapped at once (static; capped at G); the last chunk is padded with copies
        of row 0 whose rows are dropped.

    The factor matrices are generated once per call; each chunk's inputs and output gradients are
    projected before the next chunk runs. jit-able with ``tapped_loss_fn``, ``projection`` and
    ``chunk`` static (e.g. ``jax.jit(partial(factored_full_features, fn, projection=p, chunk=8))``).

    Raises:
      TypeError: ``projection`` is not a `ProjectionConfig`.
      ValueError: its mode is not "factored"; ``chunk`` < 1; a bad batch (no leaves, a scalar leaf,
        G = 0, leaves disagreeing on G); the tap contract broken (`tapped_layers`); dim smaller than
        the number of tapped layers; ``precondition`` not naming exactly the tapped layers with
        vectors of their sizes.
    """
    if not isinstance(projection, ProjectionConfig):
        raise TypeError(f"projection must be a jraise.grads.projection.ProjectionConfig, "
                        f"got {type(projection).__name__}")
    if projection.mode != "factored":
        raise ValueError(f"factored_full_features projects by Kronecker factors: projection.mode must be "
                         f"'factored', got {projection.mode!r}")
    if not isinstance(chunk, numbers.Integral) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer (examples per vmapped step), got {chunk!r}")
    shapes = _tap_shapes(tapped_loss_fn, params, _example_struct(batch))
    layers = {name: (x[-1], y[-1]) for name, (x, y) in shapes.items()}
    split = factored_full_split(list(layers.values()), projection.dim, list(layers))
    if precondition is not None:
        _check_precondition(precondition, layers)
    pad = projection.dim - sum(d_in * d_out for d_in, d_out in split)
    factors = _factors(projection.key(), layers, split, projection.kind, projection.block_rows)
    per_example = jax.vmap(partial(_inputs_and_deltas, tapped_loss_fn, shapes), in_axes=(None, 0))

    def one_chunk(rows):
        _, captured = per_example(params, rows)
        parts = []
        for name, (d_in, d_out), (p_in, p_out) in zip(layers, split, factors):
            x, delta = captured[name]  # [c, N, n_in], [c, N, n_out]
            if precondition is not None:
                a, b = precondition[name]
                x = x.astype(jnp.float32) * jnp.asarray(a, jnp.float32)
                delta = delta.astype(jnp.float32) * jnp.asarray(b, jnp.float32)
            feats = jnp.einsum("cnj,cnk->cjk", _project_side(x, p_in), _project_side(delta, p_out),
                               precision=_PRECISION)
            parts.append(feats.reshape(feats.shape[0], d_in * d_out))
        if pad:
            parts.append(jnp.zeros((parts[0].shape[0], pad), jnp.float32))
        return jnp.concatenate(parts, axis=1)

    return chunked_rows(one_chunk, batch, chunk)
