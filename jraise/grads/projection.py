"""Random Johnson-Lindenstrauss projections of per-example gradients, never stored as a matrix.

Stage: ``jraise.grads``, between per-example gradients and the feature store. LESS (Xia et al.
2024, arXiv 2402.04333) projects every gradient
(length P, up to millions) to d = 8192 dimensions with a fixed random matrix and compares the
projections by cosine; the same projection must be used for every checkpoint and for the
validation side.

Data flow::

    gradient pytree, leaves [C, ...]  --flatten_batched_tree-->  vectors [C, P]
    vectors [C, P]  --project-->  features [C, d] = vectors @ M        (M: the implicit [P, d] matrix)

``M`` is never materialised. Its rows are cut into blocks of ``block_rows`` rows; block ``b``
(rows ``b * block_rows`` up to ``(b + 1) * block_rows``) is generated from
``jax.random.fold_in(key, b)`` inside a ``lax.fori_loop``, multiplied with the matching slice of
the whole chunk of C examples at once, and dropped. When P is not a multiple of ``block_rows`` the
vectors are zero-padded up to whole blocks; a block always has the same shape. Entries are
``+-1 / sqrt(d)`` (``"rademacher"``) or ``N(0, 1) / sqrt(d)`` (``"gaussian"``), so
``E[M M^T] = I`` and inner products are preserved in expectation.

Determinism: row ``r`` of ``M`` is a function of ``(key, r, d, block_rows, kind)`` only (and of
JAX's PRNG implementation, threefry2x32 by default). It does not depend on P, on the number of
examples, on how they are chunked, on ``jit`` or ``vmap``, or on the run. Projecting a chunk, its
rows one by one, or the rows under ``vmap`` gives the same features up to float32 summation
order; the same call twice gives bitwise identical results.

Coordinates: a pytree's coordinates are its leaves raveled (row-major) and concatenated in
``jax.tree_util`` order (that of ``tree_flatten_with_path``: dict keys sorted, sequences by
position). This order is what defines which row of ``M`` multiplies which parameter, so two
gradient trees must have the same structure to share a projection.

Factored option (LoGra, Choe et al. 2024, arXiv 2405.13954): for a linear layer with kernel
``[n_in, n_out]``, one example's weight gradient is ``G = X^T Delta`` (X: layer inputs
``[T, n_in]``, Delta: output gradients ``[T, n_out]``). With independent ``P_in [n_in, d_in]``
and ``P_out [n_out, d_out]``, the feature ``vec(P_in^T G P_out) = vec((X P_in)^T (Delta P_out))``
is computed from the two small products without forming G (`factored_project`); it is the
projection of ``vec(G)`` by the Kronecker matrix ``P_in (x) P_out``.

Factored mode of a whole gradient tree (`project_tree_factored`, ``ProjectionConfig.mode =
"factored"``): every 2-D leaf G (one example's [n_in, n_out]; LoRA's ``lora_a``/``lora_b``, a
kernel, an embedding table) becomes ``vec(P_in^T G P_out)`` with its own factors from
``factor_projections(fold_in(key, j), ...)`` (j: the leaf's index in the tree order above); every
other leaf (norm scales, biases) is projected densely, ``project(leaf, fold_in(key, j), d_j)``. The
parts are concatenated in tree order; `factored_split` decides each leaf's share of d (so that the
shares add up to d exactly, one 2-D leaf of an all-2-D tree may be projected densely). Each part
is an independent JL map with ``E[K_j K_j^T] = I``, so inner products of whole trees are still
preserved in expectation. Here the per-example gradient is materialised first (jraise computes
it with ``jax.grad`` per example), and the Kronecker structure is what saves time: a group's
random numbers are ``n_in d_in + n_out d_out`` per 2-D leaf (each factor's rows padded to whole
blocks of ``block_rows``) instead of the dense mode's P x d, and the [group, P] x [P, d] matmul
becomes two small products per leaf. Adam's preconditioning (LESS's train side) is elementwise on G, so it is
applied to the materialised G before projecting and composes with this form exactly. The
never-materialise path (projecting a full-parameter linear layer from its captured inputs and
output gradients with `factored_project`) is not wired in: it needs the model to expose every
layer's (x, Delta); it could not serve LESS's train side anyway, since the Adam-preconditioned
gradient is no longer a product ``X^T Delta``; and under LoRA, jraise's use, the per-example
gradients are small.

When it may be used: the factored features are a different random projection from the dense
ones, not an approximation of them (coordinates differ; compare by scores, not entry by entry).
Both are unbiased for inner products, the factored one with a larger variance at equal d (the
Kronecker matrix has fewer independent entries, and each leaf gets only its share of d), so it is
for speed when P x d is large: screening a big pool, or a d the dense mode cannot afford; its
speed and its agreement with exact scores are measured by ``benchmarks/grad_features.py`` (figures
in BUILD_NOTES). Use the dense mode where the selection must be LESS's own. A store is keyed by its
mode: features of different modes are never mixed.

Sparse mode (``ProjectionConfig.mode = "sjlt"``, `project_sjlt`, `project_tree_sjlt`): a sparse
Johnson-Lindenstrauss transform with s = ``sjlt_nnz`` nonzeros per input coordinate, the OSNAP
"block" construction (Nelson and Nguyen 2013, arXiv 1211.1002; s = 1 is the CountSketch of Clarkson
and Woodruff 2013, arXiv 1207.6365), as GraSS (Hu et al. 2025, arXiv 2505.18976) uses it to
compress per-sample gradients for data attribution. The d outputs are cut into s blocks of
m = d / s consecutive coordinates; coordinate i of the flattened gradient has one nonzero in each
block j, at output ``h_j(i) = j m + u_j(i)`` with ``u_j(i)`` uniform in [0, m), of value
``sigma_j(i) / sqrt(s)`` with a uniform sign::

    f(g) = sum_i sum_{j<s} g_i sigma_j(i) / sqrt(s) e_{h_j(i)}

The s nonzeros of one coordinate are in different blocks, so they never collide (with s
independent positions in [0, d) two of them could fall on the same output and partly cancel).
Each block is an independent CountSketch into m dims, so ``E[S S^T] = I`` and, for hashes and signs
fully independent across coordinates (they are), ``Var(<Sx, Sy>) = (|x|^2 |y|^2 + <x, y>^2 -
2 sum_i x_i^2 y_i^2) / d`` for every s, the variance of the dense Rademacher projection at the
same d. A larger s improves the tails (concentration for vectors dominated by a few coordinates)
at a cost linear in s; the default s = 1 (`DEFAULT_SJLT_NNZ`) suits gradients, whose mass is
spread over many coordinates. The hashes of input block b (coordinates ``b * block_rows`` up to
``(b + 1) * block_rows``) come from one draw of ``jax.random.bits(fold_in(key, b), (s,
block_rows), uint32)`` (`sjlt_hashes`), so nothing of size P x d exists and coordinate i's
outputs depend only on ``(key, i, d, s, block_rows)``. A chunk [C, P] is projected block by block
inside a ``lax.fori_loop`` by one scatter-add of the block's s x block_rows signed input columns
(each a row of C numbers) into a [d, C] accumulator: O(C P s) work, flat in d. A chunk already
laid out with the example axis last (leaves [*shape, C], as jraise's feature programs produce it)
goes through `project_columns_sjlt` with the hashes of every coordinate drawn once
(`sjlt_table`): the same sums, without the flattened copy and the transpose. Like the factored
mode it is a different random projection from the dense one (compare by scores, not entry by
entry); a store is keyed by the mode and s.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "DEFAULT_SJLT_NNZ",
    "FACTOR_IN_INDEX",
    "FACTOR_OUT_INDEX",
    "KINDS",
    "MODES",
    "ProjectionConfig",
    "dense_matrix",
    "factor_projections",
    "factored_matrix",
    "factored_plan",
    "factored_project",
    "factored_split",
    "flatten_batched_tree",
    "flatten_tree",
    "project",
    "project_tree",
    "project_sjlt",
    "project_tree_factored",
    "project_tree_sjlt",
    "project_columns_sjlt",
    "projection_block",
    "sjlt_hashes",
    "sjlt_table",
    "sjlt_matrix",
    "tree_size",
]

KINDS = ("rademacher", "gaussian")
# ProjectionConfig.mode: project_tree, project_tree_factored or project_tree_sjlt
MODES = ("dense", "factored", "sjlt")

# Rademacher signs come 32 to a uint32 word of jax.random.bits (about 7x faster on CPU than
# jax.random.rademacher, which draws 32 random bits per sign).
SIGNS_PER_WORD = 32

# fold_in indices of the two factor matrices of the factored (Kronecker) projection.
FACTOR_IN_INDEX = 0
FACTOR_OUT_INDEX = 1

# s, the nonzeros per input coordinate of the "sjlt" mode (ProjectionConfig.sjlt_nnz).
DEFAULT_SJLT_NNZ = 1

# Exact float32 products: on GPU/TPU the default precision would round operands to tf32/bf16.
_PRECISION = lax.Precision.HIGHEST

_MAX_SEED = 2**32  # jax.random.key truncates larger seeds to 32 bits when x64 is off


# ----------------------------------------------------------------------------- validation


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_positive_int(name: str, value) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_kind(kind) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _check_sjlt_args(dim, nnz) -> None:
    _check_positive_int("dim", dim)
    _check_positive_int("sjlt_nnz", nnz)
    if dim % nnz:
        raise ValueError(f"sjlt_nnz ({nnz}) must divide dim ({dim}): each of the s nonzeros of a coordinate "
                         f"lies in its own block of dim / s outputs")


def _check_block_args(dim, kind, block_rows) -> None:
    _check_positive_int("dim", dim)
    _check_kind(kind)
    _check_positive_int("block_rows", block_rows)


@dataclass(frozen=True)
class ProjectionConfig:
    """Everything that defines a projection; two feature sets are comparable iff these agree.

    Attributes:
      dim: d, the projected dimension (LESS: 8192).
      kind: ``"rademacher"`` (entries +-1/sqrt(d)) or ``"gaussian"`` (N(0, 1)/sqrt(d)).
      seed: seed of ``jax.random.key``; an integer in [0, 2**32).
      block_rows: rows of the implicit matrix generated at once; changing it changes the matrix.
      mode: ``"dense"`` (one JL matrix over the flattened gradient, `project_tree`),
        ``"factored"`` (a Kronecker projection per 2-D leaf, `project_tree_factored`) or
        ``"sjlt"`` (a sparse JL transform of the flattened gradient, `project_tree_sjlt`); see the
        module docstring for when the last two may be used. Different modes give different features.
      sjlt_nnz: s, the nonzeros per input coordinate of the ``"sjlt"`` mode (must divide dim);
        unused by the other modes. ``kind`` must be ``"rademacher"`` in that mode (its nonzeros
        are signs).
    """

    dim: int = 8192
    kind: str = "rademacher"
    seed: int = 0
    block_rows: int = 4096
    mode: str = "dense"
    sjlt_nnz: int = DEFAULT_SJLT_NNZ

    def __post_init__(self):
        _check_positive_int("dim", self.dim)
        _check_kind(self.kind)
        _check_mode(self.mode)
        if not _is_int(self.seed) or not 0 <= self.seed < _MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        _check_positive_int("block_rows", self.block_rows)
        _check_positive_int("sjlt_nnz", self.sjlt_nnz)
        if self.mode == "sjlt":
            _check_sjlt_args(self.dim, self.sjlt_nnz)
            if self.kind != "rademacher":
                raise ValueError(f"mode 'sjlt' has sign entries: kind must be 'rademacher', got {self.kind!r}")
        for name in ("dim", "seed", "block_rows", "sjlt_nnz"):  # numpy integers -> int, so to_dict is JSON-ready
            object.__setattr__(self, name, int(getattr(self, name)))

    def key(self) -> jax.Array:
        """The typed PRNG key ``jax.random.key(seed)`` the projection is generated from."""
        return jax.random.key(self.seed)

    def to_dict(self) -> dict:
        """Plain dict of the fields (JSON-serialisable), e.g. for a feature store's metadata.

        ``sjlt_nnz`` is included only in mode ``"sjlt"``, the one it affects: the dict of a dense
        or factored config is the one it had before the field existed, so their stores keep their
        identity, and an sjlt store's identity holds its s."""
        out = asdict(self)
        if self.mode != "sjlt":
            del out["sjlt_nnz"]
        return out


# ----------------------------------------------------------------------------- blocks


def _rademacher_signs(key: jax.Array, rows: int, dim: int) -> jax.Array:
    """[rows, dim] float32 of +-1 from ``ceil(dim / 32)`` uint32 words per row.

    Bit order: entry ``[r, j]`` is bit ``j % 32`` (least significant first) of word
    ``[r, j // 32]`` of ``jax.random.bits(key, (rows, ceil(dim / 32)), uint32)``; a set bit is +1,
    a clear bit -1. Bits beyond ``dim`` in the last word are unused.
    """
    n_words = -(-dim // SIGNS_PER_WORD)
    words = jax.random.bits(key, (rows, n_words), jnp.uint32)
    shifts = jnp.arange(SIGNS_PER_WORD, dtype=jnp.uint32)
    bits = (words[:, :, None] >> shifts) & jnp.uint32(1)
    bits = bits.reshape(rows, n_words * SIGNS_PER_WORD)[:, :dim]
    return bits.astype(jnp.float32) * 2.0 - 1.0


def _unit_block(key: jax.Array, block_index, block_rows: int, dim: int, kind: str) -> jax.Array:
    """Block ``block_index`` of the implicit matrix before the 1/sqrt(dim) scale: [block_rows, dim]."""
    block_key = jax.random.fold_in(key, block_index)
    if kind == "rademacher":
        return _rademacher_signs(block_key, block_rows, dim)
    return jax.random.normal(block_key, (block_rows, dim), jnp.float32)


def _entry_scale(dim: int) -> float:
    return 1.0 / math.sqrt(dim)


@partial(jax.jit, static_argnames=("block_rows", "dim", "kind"))
def projection_block(key: jax.Array, block_index, block_rows: int, dim: int, kind: str = "rademacher") -> jax.Array:
    """Rows ``block_index * block_rows`` up to ``(block_index + 1) * block_rows`` of the implicit matrix.

    Args:
      key: PRNG key of the whole projection (not batched).
      block_index: int scalar (may be traced); the block is generated from ``fold_in(key, block_index)``.
      block_rows, dim, kind: static.

    Returns:
      [block_rows, dim] float32. Gaussian: ``jax.random.normal(fold_in(key, block_index),
      (block_rows, dim)) / sqrt(dim)``. Rademacher: +-1/sqrt(dim), where entry ``[r, j]`` is + iff
      bit ``j % 32`` (least significant first) of word ``[r, j // 32]`` of
      ``jax.random.bits(fold_in(key, block_index), (block_rows, ceil(dim / 32)), uint32)`` is set.
    """
    _check_block_args(dim, kind, block_rows)
    return _unit_block(key, block_index, block_rows, dim, kind) * _entry_scale(dim)


@partial(jax.jit, static_argnames=("n_rows", "dim", "kind", "block_rows"))
def dense_matrix(key: jax.Array, n_rows: int, dim: int, kind: str = "rademacher", block_rows: int = 4096) -> jax.Array:
    """The explicit [n_rows, dim] float32 matrix that :func:`project` applies; tests and small problems only.

    Whole blocks are stacked and the result cut to ``n_rows``, so ``dense_matrix(key, n, ...)`` is
    the first n rows of ``dense_matrix(key, m, ...)`` for any m >= n.
    """
    _check_positive_int("n_rows", n_rows)
    _check_block_args(dim, kind, block_rows)
    n_blocks = -(-n_rows // block_rows)
    blocks = lax.map(lambda b: projection_block(key, b, block_rows, dim, kind), jnp.arange(n_blocks))
    return blocks.reshape(n_blocks * block_rows, dim)[:n_rows]


# ----------------------------------------------------------------------------- dense projection


def _project_rows(rows: jax.Array, key: jax.Array, dim: int, kind: str, block_rows: int) -> jax.Array:
    """[N, P] -> [N, dim] float32: zero-pad P to whole blocks, then one block per loop step."""
    n_examples, n_coords = rows.shape
    n_blocks = -(-n_coords // block_rows)
    padded = jnp.pad(rows, ((0, 0), (0, n_blocks * block_rows - n_coords)))

    def add_block(block_index, acc):
        chunk = lax.dynamic_slice_in_dim(padded, block_index * block_rows, block_rows, axis=1)
        block = _unit_block(key, block_index, block_rows, dim, kind)  # shared by all N rows
        return acc + jnp.dot(chunk.astype(jnp.float32), block, precision=_PRECISION)

    acc = lax.fori_loop(0, n_blocks, add_block, jnp.zeros((n_examples, dim), jnp.float32))
    return acc * _entry_scale(dim)  # the scale is applied once, after the sum


@partial(jax.jit, static_argnames=("dim", "kind", "block_rows"))
def project(
    vectors: jax.Array, key: jax.Array, dim: int, kind: str = "rademacher", block_rows: int = 4096
) -> jax.Array:
    """Project vectors by the implicit [P, dim] random matrix (``vectors @ dense_matrix(key, P, ...)``).

    Args:
      vectors: [..., P] float (typically [C, P], a chunk of C examples). P is arbitrary; the last
        block is handled by zero-padding, so the matrix rows never depend on P.
      key: PRNG key (not batched: under ``vmap`` pass it with ``in_axes=None``, and every block is
        generated once for the whole batch).
      dim, kind, block_rows: static.

    Returns:
      [..., dim] float32 (accumulated in float32). The compiled program is one ``fori_loop`` over
      ``ceil(P / block_rows)`` blocks, so its size does not grow with P.
    """
    _check_block_args(dim, kind, block_rows)
    *lead, n_coords = vectors.shape
    if n_coords == 0:
        raise ValueError("vectors must have at least one coordinate (last axis P >= 1)")
    features = _project_rows(vectors.reshape(-1, n_coords), key, dim, kind, block_rows)
    return features.reshape(*lead, dim)


# ----------------------------------------------------------------------------- pytrees


def _named_leaves(tree) -> tuple[list[str], list]:
    """(``keystr`` names, leaves) in ``jax.tree_util`` order; an empty tree is an error."""
    pairs = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not pairs:
        raise ValueError("tree has no array leaves")
    return [jax.tree_util.keystr(path) for path, _ in pairs], [leaf for _, leaf in pairs]


def _leaves(tree) -> list:
    return _named_leaves(tree)[1]


def _example_count(leaves) -> int:
    """The common leading (example) axis of a chunk's leaves; differing or missing ones are an error."""
    counts = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
    if len(counts) != 1 or None in counts:
        sizes = sorted(map(str, counts))
        raise ValueError(f"every leaf must have the same leading (example) axis, got sizes {sizes}")
    (count,) = counts
    return count


def tree_size(tree) -> int:
    """P, the number of coordinates of ``flatten_tree(tree)`` (leaves may be ``ShapeDtypeStruct``)."""
    return sum(int(np.prod(leaf.shape)) for leaf in _leaves(tree))


def flatten_tree(tree) -> jax.Array:
    """One example's pytree -> [P]: leaves raveled and concatenated in ``jax.tree_util`` order.

    The order (``tree_flatten_with_path``: dict keys sorted, sequences by position) defines the
    coordinates, hence which rows of the projection multiply which parameter. The dtype is the
    promotion of the leaves' dtypes.
    """
    return jnp.concatenate([jnp.ravel(leaf) for leaf in _leaves(tree)])


def flatten_batched_tree(tree) -> jax.Array:
    """A chunk's pytree, every leaf [C, ...] -> [C, P]; row c is ``flatten_tree`` of example c."""
    leaves = _leaves(tree)
    count = _example_count(leaves)
    return jnp.concatenate([leaf.reshape(count, -1) for leaf in leaves], axis=1)


@partial(jax.jit, static_argnames=("dim", "kind", "block_rows"))
def project_tree(
    tree_batched, key: jax.Array, dim: int, kind: str = "rademacher", block_rows: int = 4096
) -> jax.Array:
    """Per-example gradient pytree (leaves [C, ...]) -> [C, dim] float32 features.

    Equal to ``project(flatten_batched_tree(tree_batched), key, dim, kind, block_rows)``.
    """
    return project(flatten_batched_tree(tree_batched), key, dim, kind, block_rows)


# ----------------------------------------------------------------------------- sparse (SJLT)


def _sjlt_block(key: jax.Array, block_index, block_rows: int, dim: int, nnz: int) -> tuple[jax.Array, jax.Array]:
    """(outputs [nnz, block_rows] int32, signs [nnz, block_rows] float32) of block ``block_index``."""
    words = jax.random.bits(jax.random.fold_in(key, block_index), (nnz, block_rows), jnp.uint32)
    width = dim // nnz
    offsets = jnp.arange(nnz, dtype=jnp.int32)[:, None] * width
    outputs = ((words >> 1) % jnp.uint32(width)).astype(jnp.int32) + offsets
    signs = (words & jnp.uint32(1)).astype(jnp.float32) * 2.0 - 1.0
    return outputs, signs


@partial(jax.jit, static_argnames=("block_rows", "dim", "nnz"))
def sjlt_hashes(key: jax.Array, block_index, block_rows: int, dim: int, nnz: int = DEFAULT_SJLT_NNZ
                ) -> tuple[jax.Array, jax.Array]:
    """The hashes and signs of input coordinates ``block_index * block_rows + r``, r < block_rows.

    With ``w = jax.random.bits(fold_in(key, block_index), (nnz, block_rows), uint32)`` and
    ``m = dim // nnz``: the j-th nonzero of coordinate r is at output ``h_j = j m + ((w[j, r] >> 1)
    mod m)`` with sign ``sigma_j = +1`` iff bit 0 of ``w[j, r]`` is set, else -1 (the positions are
    uniform up to a bias below ``m / 2**31``; exactly uniform when m is a power of two).

    Returns:
      (outputs [nnz, block_rows] int32, output j in [j m, (j + 1) m); signs [nnz, block_rows]
      float32 of +-1). The matrix entry is ``signs / sqrt(nnz)`` (`sjlt_matrix`).
    """
    _check_sjlt_args(dim, nnz)
    _check_positive_int("block_rows", block_rows)
    return _sjlt_block(key, block_index, block_rows, dim, nnz)


def sjlt_matrix(key: jax.Array, n_rows: int, dim: int, nnz: int = DEFAULT_SJLT_NNZ, block_rows: int = 4096
                ) -> jax.Array:
    """The explicit [n_rows, dim] float32 matrix that :func:`project_sjlt` applies; tests and small
    problems only. Row i has ``nnz`` nonzeros ``sigma_j(i) / sqrt(nnz)`` at columns ``h_j(i)``
    (`sjlt_hashes`), one in each block of ``dim // nnz`` columns; it is the first n_rows rows of
    the matrix for any larger n_rows."""
    _check_positive_int("n_rows", n_rows)
    _check_sjlt_args(dim, nnz)
    _check_positive_int("block_rows", block_rows)
    n_blocks = -(-n_rows // block_rows)
    outputs, signs = jax.vmap(lambda b: sjlt_hashes(key, b, block_rows, dim, nnz))(jnp.arange(n_blocks))
    rows = jnp.broadcast_to(jnp.arange(n_blocks * block_rows).reshape(n_blocks, 1, block_rows), outputs.shape)
    matrix = jnp.zeros((n_blocks * block_rows, dim), jnp.float32).at[rows, outputs].add(signs / math.sqrt(nnz))
    return matrix[:n_rows]


def _sjlt_rows(rows: jax.Array, key: jax.Array, dim: int, nnz: int, block_rows: int) -> jax.Array:
    """[N, P] -> [N, dim] float32: zero-pad P to whole blocks; per block, one scatter-add of the
    block's nnz x block_rows signed columns (rows of N numbers) into a [dim, N] accumulator."""
    n_examples, n_coords = rows.shape
    n_blocks = -(-n_coords // block_rows)
    padded = jnp.pad(rows, ((0, 0), (0, n_blocks * block_rows - n_coords)))

    def add_block(block_index, acc):
        chunk = lax.dynamic_slice_in_dim(padded, block_index * block_rows, block_rows, axis=1)
        columns = chunk.astype(jnp.float32).T  # [block_rows, N]: one contiguous row per coordinate
        outputs, signs = _sjlt_block(key, block_index, block_rows, dim, nnz)  # shared by all N rows
        updates = (signs[:, :, None] * columns[None]).reshape(nnz * block_rows, n_examples)
        return acc.at[outputs.reshape(-1)].add(updates)

    acc = lax.fori_loop(0, n_blocks, add_block, jnp.zeros((dim, n_examples), jnp.float32))
    return acc.T * (1.0 / math.sqrt(nnz))  # the scale is applied once, after the sum


@partial(jax.jit, static_argnames=("dim", "nnz", "block_rows"))
def project_sjlt(vectors: jax.Array, key: jax.Array, dim: int, nnz: int = DEFAULT_SJLT_NNZ,
                 block_rows: int = 4096) -> jax.Array:
    """Sparse JL projection of vectors: ``vectors @ sjlt_matrix(key, P, dim, nnz, block_rows)``.

    ``f = sum_i g_i sum_{j<nnz} sigma_j(i) / sqrt(nnz) e_{h_j(i)}`` (hashes and signs of
    `sjlt_hashes`; the OSNAP block construction, see the module docstring), computed without the
    matrix in O(N P nnz) work, independent of dim.

    Args:
      vectors: [..., P] float (typically [C, P], a chunk of C examples); P is arbitrary (the last
        block is zero-padded, so the hashes never depend on P).
      key: PRNG key (not batched); dim, nnz (must divide dim), block_rows: static.

    Returns:
      [..., dim] float32 (accumulated in float32). A row's features do not depend on the other
      rows (each output column is summed on its own, in a fixed order). On CPU the scatter-add is
      sequential, so the same call twice is bitwise identical; on GPU XLA's scatter-add uses
      atomics, so the last bits may vary between runs unless XLA's deterministic ops are enabled
      (``XLA_FLAGS=--xla_gpu_deterministic_ops=true``).
    """
    _check_sjlt_args(dim, nnz)
    _check_positive_int("block_rows", block_rows)
    *lead, n_coords = vectors.shape
    if n_coords == 0:
        raise ValueError("vectors must have at least one coordinate (last axis P >= 1)")
    features = _sjlt_rows(vectors.reshape(-1, n_coords), key, dim, nnz, block_rows)
    return features.reshape(*lead, dim)


@partial(jax.jit, static_argnames=("dim", "nnz", "block_rows"))
def project_tree_sjlt(tree_batched, key: jax.Array, dim: int, nnz: int = DEFAULT_SJLT_NNZ,
                      block_rows: int = 4096) -> jax.Array:
    """Per-example gradient pytree (leaves [C, ...]) -> [C, dim] float32 sparse-mode features.

    Equal to ``project_sjlt(flatten_batched_tree(tree_batched), key, dim, nnz, block_rows)``.
    """
    return project_sjlt(flatten_batched_tree(tree_batched), key, dim, nnz, block_rows)


def sjlt_table(key: jax.Array, n_coords: int, dim: int, nnz: int = DEFAULT_SJLT_NNZ, block_rows: int = 4096
               ) -> tuple[jax.Array, jax.Array]:
    """The hashes and signs of coordinates ``0 .. n_coords - 1``, in coordinate order: (outputs
    [nnz, n_coords] int32, signs [nnz, n_coords] float32), column i holding `sjlt_hashes` of
    coordinate i (block ``i // block_rows``, position ``i % block_rows``). Computed once per call
    by whoever projects many chunks with it (`project_columns_sjlt`); 8 bytes per coordinate and
    nonzero (LoRA r = 128 on SmolLM2: 118 MB)."""
    _check_sjlt_args(dim, nnz)
    _check_positive_int("block_rows", block_rows)
    _check_positive_int("n_coords", n_coords)
    n_blocks = -(-n_coords // block_rows)
    outputs, signs = jax.vmap(lambda b: _sjlt_block(key, b, block_rows, dim, nnz))(jnp.arange(n_blocks))
    # [n_blocks, nnz, block_rows] -> [nnz, n_blocks * block_rows], cut to n_coords
    outputs = jnp.moveaxis(outputs, 1, 0).reshape(nnz, -1)[:, :n_coords]
    signs = jnp.moveaxis(signs, 1, 0).reshape(nnz, -1)[:, :n_coords]
    return outputs, signs


def project_columns_sjlt(tree_rows_last, table: tuple[jax.Array, jax.Array], dim: int) -> jax.Array:
    """Sparse JL features of a chunk whose example axis is LAST: leaves ``[*param.shape, C]`` ->
    [C, dim] float32, equal to ``project_tree_sjlt`` of the same chunk laid out rows first.

    The coordinates are the leaves raveled and concatenated in ``jax.tree_util`` order (as
    `flatten_tree`), their hashes and signs the columns of ``table = sjlt_table(key, P, dim, nnz,
    block_rows)`` (nnz is its first axis). With the example axis last, coordinate i of the whole
    chunk is one contiguous row of C numbers, so every leaf is ``reshape(-1, C)`` (no copy) and one
    scatter-add per leaf and nonzero adds its signed rows into a [dim, C] accumulator; nothing of
    size C x P beyond the gradients themselves is formed (no flattened copy, no transpose). Each
    output sums its coordinates in coordinate order, as `project_sjlt` does, so the two agree bit
    for bit on the same float32 inputs.
    """
    outputs, signs = table
    nnz, n_coords = outputs.shape
    leaves = _leaves(tree_rows_last)
    counts = {leaf.shape[-1] if leaf.ndim else None for leaf in leaves}
    if len(counts) != 1 or None in counts:
        raise ValueError(f"every leaf must have the same trailing (example) axis, got sizes {sorted(map(str, counts))}")
    (count,) = counts
    size = sum(leaf.size // count for leaf in leaves)
    if size != n_coords:
        raise ValueError(f"the tree has {size} coordinates per example but the table {n_coords}")
    acc = jnp.zeros((dim, count), jnp.float32)
    start = 0
    for leaf in leaves:
        rows = leaf.reshape(-1, count).astype(jnp.float32)  # [n, C]: coordinate-major
        stop = start + rows.shape[0]
        for j in range(nnz):  # outputs of different j lie in disjoint ranges: no collisions
            acc = acc.at[outputs[j, start:stop]].add(rows * signs[j, start:stop, None])
        start = stop
    return acc.T * (1.0 / math.sqrt(nnz))


# ----------------------------------------------------------------------------- factored (LoGra)


@partial(jax.jit, static_argnames=("n_in", "n_out", "d_in", "d_out", "kind", "block_rows"))
def factor_projections(
    key: jax.Array, n_in: int, n_out: int, d_in: int, d_out: int, kind: str = "rademacher", block_rows: int = 4096
) -> tuple[jax.Array, jax.Array]:
    """The two factors of a layer's Kronecker projection: (P_in [n_in, d_in], P_out [n_out, d_out]).

    ``P_in = dense_matrix(fold_in(key, FACTOR_IN_INDEX), n_in, d_in, ...)`` and
    ``P_out = dense_matrix(fold_in(key, FACTOR_OUT_INDEX), n_out, d_out, ...)``: independent, entries
    of variance 1/d_in and 1/d_out, so ``E[P_in P_in^T] = I``, ``E[P_out P_out^T] = I``. Give every
    layer its own key (e.g. ``fold_in(key, layer)``).
    """
    p_in = dense_matrix(jax.random.fold_in(key, FACTOR_IN_INDEX), n_in, d_in, kind, block_rows)
    p_out = dense_matrix(jax.random.fold_in(key, FACTOR_OUT_INDEX), n_out, d_out, kind, block_rows)
    return p_in, p_out


@partial(jax.jit, static_argnames=("d_in", "d_out", "kind", "block_rows"))
def factored_project(
    x: jax.Array, delta: jax.Array, key: jax.Array, d_in: int, d_out: int, kind: str = "rademacher",
    block_rows: int = 4096,
) -> jax.Array:
    """Factored projection of a linear layer's per-example weight gradients, without forming them.

    Args:
      x: [..., T, n_in] layer inputs (typically [C, T, n_in]).
      delta: [..., T, n_out] gradients of the loss w.r.t. the layer outputs (zero on padding).
      key: the layer's PRNG key (not batched); d_in, d_out, kind, block_rows: static.

    Returns:
      [..., d_in * d_out] float32: ``vec((x P_in)^T (delta P_out))`` (row-major vec), equal to
      ``vec(G) @ factored_matrix(...)`` for ``G = x^T delta`` [n_in, n_out]. The Kronecker matrix
      has entries of variance ``1 / (d_in d_out)`` and ``E[K K^T] = I``, so inner products of
      gradients are preserved in expectation.
    """
    if x.shape[:-1] != delta.shape[:-1]:
        raise ValueError(f"x {x.shape} and delta {delta.shape} must agree on all axes but the last")
    p_in, p_out = factor_projections(key, x.shape[-1], delta.shape[-1], d_in, d_out, kind, block_rows)
    x_small = jnp.einsum("...ti,ij->...tj", x.astype(jnp.float32), p_in, precision=_PRECISION)
    delta_small = jnp.einsum("...to,ok->...tk", delta.astype(jnp.float32), p_out, precision=_PRECISION)
    features = jnp.einsum("...tj,...tk->...jk", x_small, delta_small, precision=_PRECISION)
    return features.reshape(*x.shape[:-2], d_in * d_out)


def factored_matrix(
    key: jax.Array, n_in: int, n_out: int, d_in: int, d_out: int, kind: str = "rademacher", block_rows: int = 4096
) -> jax.Array:
    """The explicit Kronecker projection ``P_in (x) P_out`` [n_in * n_out, d_in * d_out]; tests only.

    Row ``i * n_out + o`` multiplies ``G[i, o]`` (row-major vec of the [n_in, n_out] gradient).
    """
    p_in, p_out = factor_projections(key, n_in, n_out, d_in, d_out, kind, block_rows)
    return jnp.kron(p_in, p_out)


# ----------------------------------------------------------------------------- factored trees


def _smaller_side(shape: tuple[int, int], share: int) -> int:
    """a0: the dims of a 2-D leaf's smaller side given ``share`` dims (see `factored_split`)."""
    return max(1, min(shape[0], shape[1], math.isqrt(share)))


def _oriented(shape: tuple[int, int], small: int, big: int) -> tuple[int, int]:
    return (small, big) if shape[0] <= shape[1] else (big, small)


def _last_share(shape: tuple[int, ...], share: int) -> tuple[int, ...]:
    """The last leaf served takes exactly ``share`` dims: Kronecker if ``share`` has a divisor in
    ``(a0/2, a0]``, else dense."""
    if len(shape) == 2:
        side = _smaller_side(shape, share)
        for small in range(side, side // 2, -1):
            if share % small == 0:
                return _oriented(shape, small, share // small)
    return (share,)


def factored_split(shapes, dim: int, names=None) -> tuple[tuple[int, ...], ...]:
    """Each leaf's share of the d output dims in factored mode: ``(d_in, d_out)`` for a leaf
    projected by a Kronecker matrix, ``(d_j,)`` for a leaf projected densely;
    ``sum(prod(s) for s in result) == dim`` exactly.

    Args:
      shapes: one example's leaf shapes, in tree order (no example axis).
      dim: d. names: leaf names for error messages (default ``"leaf j"``).

    The rule (deterministic, a function of ``shapes`` and ``dim`` only):

    1. Leaves are served in this order: the 2-D leaves in tree order, then the other leaves in tree
       order. Every leaf needs at least one dim, so ``dim`` must be at least the number of leaves
       (else ValueError naming the first leaf, in that order, left without one).
    2. Leaf j, with B dims not yet given, W coordinates in the leaves not yet served and k leaves
       after it, is offered ``t = round(B * n_j / W)`` (n_j: its size, so shares are proportional
       to size), kept within ``[1, B - k]``.
    3. A 2-D leaf [n_in, n_out] (not the last) takes ``(d_in, d_out)``: its smaller side (n_in on
       a tie) gets ``a0 = min(n_in, n_out, isqrt(t))``, the other ``t // a0``. The fewer than a0
       dims this leaves unused pass to the leaves after it through B. Any other leaf takes
       ``(t,)``.
    4. The last leaf served takes all of B: a 2-D leaf as ``(a, B // a)`` (oriented as in 3) with
       ``a`` the largest divisor of B in ``(a0/2, a0]`` (a0 computed from B), and densely as
       ``(B,)`` when B has no such divisor (B prime, say). The last leaf is a non-2-D leaf whenever
       the tree has one; only trees of 2-D leaves (LoRA) can have one dense 2-D leaf.

    The smaller side is capped at sqrt(t) so that the two factors are as balanced as the leaf
    allows (LoGra's square factors), and at its own size n: a side given n dims is not projected
    at all (`project_tree_factored` keeps it exactly), so LoRA's rank-r side stays whole and all
    of the leaf's share goes to the other side.
    """
    _check_positive_int("dim", dim)
    shapes = [tuple(int(n) for n in shape) for shape in shapes]
    if not shapes:
        raise ValueError("factored projection: the tree has no leaves")
    names = [f"leaf {j}" for j in range(len(shapes))] if names is None else [str(n) for n in names]
    sizes = [math.prod(shape) for shape in shapes]
    for name, shape, size in zip(names, shapes, sizes):
        if size == 0:
            raise ValueError(f"factored projection: leaf {name} has shape {shape}, no coordinates to project")
    order = [j for j, s in enumerate(shapes) if len(s) == 2] + [j for j, s in enumerate(shapes) if len(s) != 2]
    if dim < len(shapes):
        j = order[dim]
        raise ValueError(f"factored projection: dim {dim} cannot be split over {len(shapes)} gradient leaves "
                         f"(each needs at least one dim); leaf {names[j]} {shapes[j]} gets none. Use "
                         f"dim >= {len(shapes)} or mode 'dense'.")
    budget, weight = dim, sum(sizes)
    split: list = [None] * len(shapes)
    for position, j in enumerate(order):
        after = len(order) - position - 1
        if after == 0:
            split[j] = _last_share(shapes[j], budget)
        else:
            share = min(max(1, (2 * budget * sizes[j] + weight) // (2 * weight)), budget - after)
            if len(shapes[j]) == 2:
                side = _smaller_side(shapes[j], share)
                split[j] = _oriented(shapes[j], side, share // side)
            else:
                split[j] = (share,)
        budget -= math.prod(split[j])
        weight -= sizes[j]
    assert budget == 0, (dim, split)  # the last leaf takes exactly what is left
    return tuple(split)


def factored_plan(tree, dim: int) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """(leaf name, shape, dims) per leaf of ONE example's tree (leaves may be ``ShapeDtypeStruct``):
    the `factored_split` that `project_tree_factored` applies to this structure, for inspection."""
    names, leaves = _named_leaves(tree)
    shapes = [tuple(leaf.shape) for leaf in leaves]
    return list(zip(names, shapes, factored_split(shapes, dim, names)))


def _kron_project_leaf(leaf: jax.Array, key: jax.Array, d_in: int, d_out: int, kind: str,
                       block_rows: int) -> jax.Array:
    """[C, n_in, n_out] -> [C, d_in * d_out]: row-major ``vec(P_in^T G P_out)`` per example, the
    factors from `factor_projections`, except that a side with ``d == n`` keeps the identity."""
    g = leaf.astype(jnp.float32)
    n_in, n_out = leaf.shape[1:]
    p_in, p_out = factor_projections(key, n_in, n_out, d_in, d_out, kind, block_rows)
    if d_out != n_out:
        g = jnp.einsum("cio,ok->cik", g, p_out, precision=_PRECISION)
    if d_in != n_in:
        g = jnp.einsum("ij,cik->cjk", p_in, g, precision=_PRECISION)
    return g.reshape(leaf.shape[0], d_in * d_out)


@partial(jax.jit, static_argnames=("dim", "kind", "block_rows"))
def project_tree_factored(
    tree_batched, key: jax.Array, dim: int, kind: str = "rademacher", block_rows: int = 4096
) -> jax.Array:
    """Per-example gradient pytree (leaves [C, ...]) -> [C, dim] float32 factored-mode features.

    Leaf j (tree order) with one-example shape s and share ``factored_split(...)[j]``:

    * share (d_in, d_out) (s = (n_in, n_out)): ``vec(P_in^T G P_out)``, i.e.
      ``vec(G) @ factored_matrix(fold_in(key, j), n_in, n_out, d_in, d_out, kind, block_rows)``,
      except that a side with as many dims as it has (``d_in == n_in`` or ``d_out == n_out``, e.g.
      LoRA's rank side) keeps the identity in place of its factor: it is kept exactly, since a
      random square factor would add an O(1) error for nothing (still ``E[K K^T] = I``);
    * share (d_j,): ``project(ravel(leaf), fold_in(key, j), d_j, kind, block_rows)``, i.e.
      ``ravel(leaf) @ dense_matrix(fold_in(key, j), size, d_j, kind, block_rows)``.

    The parts are concatenated in tree order. The split depends only on the leaf shapes and dim,
    so two trees of the same structure share the projection. Deterministic like `project`.
    """
    _check_block_args(dim, kind, block_rows)
    names, leaves = _named_leaves(tree_batched)
    count = _example_count(leaves)
    split = factored_split([leaf.shape[1:] for leaf in leaves], dim, names)
    parts = []
    for j, (leaf, dims) in enumerate(zip(leaves, split)):
        leaf_key = jax.random.fold_in(key, j)
        if len(dims) == 2:
            parts.append(_kron_project_leaf(leaf, leaf_key, *dims, kind, block_rows))
        else:
            parts.append(_project_rows(leaf.reshape(count, -1), leaf_key, dims[0], kind, block_rows))
    return jnp.concatenate(parts, axis=1)
