"""Tests for jraise.grads.projection: blockwise JL projection, its determinism, statistics, LoGra factoring."""

import json
import math

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import pytest

from jraise.grads.projection import (
    FACTOR_IN_INDEX,
    FACTOR_OUT_INDEX,
    KINDS,
    ProjectionConfig,
    dense_matrix,
    factor_projections,
    factored_matrix,
    factored_project,
    flatten_batched_tree,
    flatten_tree,
    project,
    project_tree,
    projection_block,
    tree_size,
)

# Shared sizes, so that most tests reuse compiled programs (compiling dominates the run time).
DIM = 48  # not a multiple of 32: the last sign word is only partly used
BLOCK = 32
N_EXAMPLES = 10
N_COORDS = 3 * BLOCK + 11  # not a multiple of BLOCK


def random_vectors(seed, shape):
    """Test data from numpy: drawing it with jax.random would compile a program per shape."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def project_f64(vectors, matrix):
    return np.asarray(vectors, np.float64) @ np.asarray(matrix, np.float64)


def all_eqns(jaxpr):
    """Every equation of a jaxpr, including those of nested (jit, loop) bodies."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jex_core.ClosedJaxpr):
                    yield from all_eqns(sub.jaxpr)
                elif isinstance(sub, jex_core.Jaxpr):
                    yield from all_eqns(sub)


# ----------------------------------------------------------------------------- blocks and dense matrix


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_are_slices_of_dense_matrix(kind):
    key = jax.random.key(3)
    matrix = dense_matrix(key, N_COORDS, DIM, kind, BLOCK)
    assert matrix.shape == (N_COORDS, DIM) and matrix.dtype == jnp.float32
    for b in range(-(-N_COORDS // BLOCK)):
        block = projection_block(key, b, BLOCK, DIM, kind)
        assert block.shape == (BLOCK, DIM) and block.dtype == jnp.float32
        rows = matrix[b * BLOCK:(b + 1) * BLOCK]
        np.testing.assert_array_equal(block[:rows.shape[0]], rows)


@pytest.mark.parametrize("kind", KINDS)
def test_rows_do_not_depend_on_matrix_length(kind):
    key = jax.random.key(4)
    short = dense_matrix(key, 40, DIM, kind, BLOCK)
    long = dense_matrix(key, N_COORDS, DIM, kind, BLOCK)
    np.testing.assert_array_equal(short, long[:40])


def test_blocks_differ_from_each_other():
    key = jax.random.key(5)
    first, second = (projection_block(key, b, BLOCK, DIM, "gaussian") for b in (0, 1))
    assert abs(np.corrcoef(np.ravel(first), np.ravel(second))[0, 1]) < 0.05


# ----------------------------------------------------------------------------- project == vectors @ matrix


@pytest.mark.parametrize("kind", KINDS)
def test_project_equals_dense_product(kind):
    key = jax.random.key(11)
    matrix = dense_matrix(key, N_COORDS, DIM, kind, BLOCK)  # its first n rows are the matrix for length n
    for n_coords in (7, BLOCK, N_COORDS):  # below one block, whole blocks, ragged
        vectors = random_vectors(n_coords, (N_EXAMPLES, n_coords))
        got = project(vectors, key, DIM, kind, BLOCK)
        assert got.shape == (N_EXAMPLES, DIM) and got.dtype == jnp.float32
        assert relative_error(got, project_f64(vectors, matrix[:n_coords])) < 1e-5


def test_project_keeps_leading_axes_and_casts_to_float32():
    key = jax.random.key(12)
    vectors = random_vectors(1, (2, 5, N_COORDS)).astype(jnp.bfloat16)
    got = project(vectors, key, DIM, "rademacher", BLOCK)
    assert got.shape == (2, 5, DIM) and got.dtype == jnp.float32
    want = project(vectors.astype(jnp.float32).reshape(N_EXAMPLES, N_COORDS), key, DIM, "rademacher", BLOCK)
    np.testing.assert_array_equal(got.reshape(N_EXAMPLES, DIM), want)


def test_project_under_jit_with_static_arguments():
    key = jax.random.key(13)
    vectors = random_vectors(2, (N_EXAMPLES, N_COORDS))
    jitted = jax.jit(project, static_argnames=("dim", "kind", "block_rows"))
    got = jitted(vectors, key, dim=DIM, kind="gaussian", block_rows=BLOCK)
    np.testing.assert_allclose(got, project(vectors, key, DIM, "gaussian", BLOCK), rtol=1e-6, atol=1e-6)


def test_program_size_does_not_grow_with_vector_length():
    key = jax.random.key(0)

    def eqns(n_coords):
        jaxpr = jax.make_jaxpr(lambda v: project(v, key, DIM, "rademacher", BLOCK))(jnp.zeros((3, n_coords)))
        return sum(1 for _ in all_eqns(jaxpr.jaxpr))

    assert eqns(BLOCK + 1) == eqns(100 * BLOCK + 1)


# ----------------------------------------------------------------------------- chunking, vmap, determinism


@pytest.mark.parametrize("kind", KINDS)
def test_result_does_not_depend_on_chunking_or_vmap(kind):
    key = jax.random.key(21)
    vectors = random_vectors(3, (N_EXAMPLES, N_COORDS))
    whole = np.asarray(project(vectors, key, DIM, kind, BLOCK))
    tol = {"rtol": 1e-6, "atol": 1e-6 * np.abs(whole).max()}
    one_by_one = np.stack([project(v, key, DIM, kind, BLOCK) for v in vectors])
    np.testing.assert_allclose(one_by_one, whole, **tol)
    for chunk in (1, 5):
        chunked = np.concatenate(
            [project(vectors[i:i + chunk], key, DIM, kind, BLOCK) for i in range(0, len(vectors), chunk)]
        )
        np.testing.assert_allclose(chunked, whole, **tol)
    vmapped = jax.vmap(lambda v: project(v, key, DIM, kind, BLOCK))(vectors)
    np.testing.assert_allclose(vmapped, whole, **tol)


@pytest.mark.parametrize("kind", KINDS)
def test_vmap_generates_each_block_once_for_the_batch(kind):
    key = jax.random.key(0)
    fn = jax.vmap(lambda v: project(v, key, DIM, kind, BLOCK))
    jaxpr = jax.make_jaxpr(fn)(jnp.zeros((6, 3 * BLOCK))).jaxpr
    draws = [eqn for eqn in all_eqns(jaxpr) if eqn.primitive.name == "random_bits"]
    assert draws
    for eqn in draws:  # the draw has the block's own shape: no example axis in front
        shape = eqn.outvars[0].aval.shape
        assert len(shape) == 2 and shape[0] == BLOCK


def test_same_key_is_bitwise_reproducible_and_keys_differ():
    vectors = random_vectors(4, (N_EXAMPLES, N_COORDS))
    first = project(vectors, jax.random.key(7), DIM, "rademacher", BLOCK)
    again = project(vectors, jax.random.key(7), DIM, "rademacher", BLOCK)
    np.testing.assert_array_equal(first, again)
    other_key = project(vectors, jax.random.key(8), DIM, "rademacher", BLOCK)
    other_kind = project(vectors, jax.random.key(7), DIM, "gaussian", BLOCK)
    scale = np.abs(np.asarray(first)).mean()
    assert np.abs(np.asarray(first - other_key)).mean() > 0.5 * scale
    assert np.abs(np.asarray(first - other_kind)).mean() > 0.5 * scale


# ----------------------------------------------------------------------------- entry statistics


def test_rademacher_entries_are_exact_signs_and_balanced():
    dim, rows = 200, 2048
    matrix = np.asarray(dense_matrix(jax.random.key(31), rows, dim, "rademacher", 512))
    np.testing.assert_array_equal(np.abs(matrix), np.float32(1 / math.sqrt(dim)))
    positive = matrix > 0
    n = positive.size
    assert abs(positive.mean() - 0.5) < 5 * 0.5 / math.sqrt(n)
    for bit in range(32):  # every bit position of the sign words is used and fair
        column_group = positive[:, bit::32]
        assert abs(column_group.mean() - 0.5) < 5 * 0.5 / math.sqrt(column_group.size)


def test_rademacher_bit_order_is_least_significant_first():
    key, block_index = jax.random.key(32), 3
    block = np.asarray(projection_block(key, block_index, BLOCK, DIM, "rademacher"))
    n_words = -(-DIM // 32)
    words = np.asarray(jax.random.bits(jax.random.fold_in(key, block_index), (BLOCK, n_words), jnp.uint32))
    for column in (0, 1, 31, 32, DIM - 1):
        bit = (words[:, column // 32] >> np.uint32(column % 32)) & 1
        np.testing.assert_array_equal(block[:, column] > 0, bit == 1)


def test_gaussian_entries_are_standard_normal_over_sqrt_dim():
    dim, rows = 256, 2048
    z = np.asarray(dense_matrix(jax.random.key(33), rows, dim, "gaussian", 512), np.float64) * math.sqrt(dim)
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z**4).mean() - 3) < 5 * math.sqrt(96 / n)  # Var(z^4) = 105 - 9 = 96
    assert abs(np.mean(np.abs(z) < 1) - 0.682689) < 0.005


# ----------------------------------------------------------------------------- Johnson-Lindenstrauss property


def pairs_with_cosines(seed, n_pairs, n_coords):
    """Pairs (u, v) with cosines spread over [-1, 1] and norms spread over two decades."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((n_pairs, n_coords))
    w = rng.standard_normal((n_pairs, n_coords))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    w -= np.sum(w * u, axis=1, keepdims=True) * u
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    cos = rng.uniform(-1, 1, (n_pairs, 1))
    v = cos * u + np.sqrt(1 - cos**2) * w
    u *= 10 ** rng.uniform(-1, 1, (n_pairs, 1))
    v *= 10 ** rng.uniform(-1, 1, (n_pairs, 1))
    return u, v, cos[:, 0]


@pytest.mark.parametrize("kind", KINDS)
def test_inner_product_errors_follow_jl_distribution(kind):
    n_pairs, n_coords, dim = 3000, 500, 256
    u, v, cos = pairs_with_cosines(0, n_pairs, n_coords)
    features = np.asarray(project(jnp.asarray(np.concatenate([u, v]), jnp.float32), jax.random.key(41), dim, kind, 128),
                          np.float64)
    pu, pv = features[:n_pairs], features[n_pairs:]
    norm_u, norm_v = np.linalg.norm(u, axis=1), np.linalg.norm(v, axis=1)
    error = (np.sum(pu * pv, axis=1) - np.sum(u * v, axis=1)) / (norm_u * norm_v)
    z = error / np.sqrt((1 + cos**2) / dim)  # standardised by the theoretical std
    assert abs(z.mean()) < 4.5 / math.sqrt(n_pairs)
    assert 0.85 < z.std() < 1.15
    # squared norms: relative error has mean 0 and std sqrt(2 / dim)
    norms = np.concatenate([np.sum(pu**2, axis=1) / norm_u**2, np.sum(pv**2, axis=1) / norm_v**2]) - 1
    assert abs(norms.mean()) < 4.5 * math.sqrt(2 / dim) / math.sqrt(norms.size)
    assert 0.85 < norms.std() / math.sqrt(2 / dim) < 1.15
    assert np.abs(norms).max() < 6 * math.sqrt(2 / dim)


# ----------------------------------------------------------------------------- factored (Kronecker) projection


def layer_inputs(seed, n_examples, tokens, n_in, n_out):
    """x [C, T, n_in] and delta [C, T, n_out] as float32 numpy arrays."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_examples, tokens, n_in)).astype(np.float32)
    return x, rng.standard_normal((n_examples, tokens, n_out)).astype(np.float32)


def weight_gradients(x, delta):
    """Explicit per-example G = X^T Delta, row-major vec: [C, n_in * n_out] float64."""
    g = np.einsum("cti,cto->cio", np.asarray(x, np.float64), np.asarray(delta, np.float64))
    return g.reshape(g.shape[0], -1)


@pytest.mark.parametrize("kind", KINDS)
def test_factored_project_equals_kronecker_projection_of_gradient(kind):
    n_in, n_out, d_in, d_out = 12, 10, 4, 6
    x, delta = layer_inputs(51, 3, 5, n_in, n_out)
    key = jax.random.key(52)
    got = factored_project(x, delta, key, d_in, d_out, kind, block_rows=8)
    assert got.shape == (3, d_in * d_out) and got.dtype == jnp.float32
    kron = factored_matrix(key, n_in, n_out, d_in, d_out, kind, block_rows=8)
    assert kron.shape == (n_in * n_out, d_in * d_out)
    assert relative_error(got, weight_gradients(x, delta) @ np.asarray(kron, np.float64)) < 1e-5


def test_factor_matrices_come_from_documented_fold_in_indices():
    key = jax.random.key(53)
    p_in, p_out = factor_projections(key, 12, 10, 4, 6, "rademacher", 8)
    key_in, key_out = (jax.random.fold_in(key, index) for index in (FACTOR_IN_INDEX, FACTOR_OUT_INDEX))
    np.testing.assert_array_equal(p_in, dense_matrix(key_in, 12, 4, "rademacher", 8))
    np.testing.assert_array_equal(p_out, dense_matrix(key_out, 10, 6, "rademacher", 8))
    np.testing.assert_array_equal(np.abs(np.asarray(factored_matrix(key, 12, 10, 4, 6, "rademacher", 8))),
                                  np.float32(1 / 2) * np.float32(1 / math.sqrt(6)))


def test_factored_project_vmap_matches_batch():
    x, delta = layer_inputs(54, 4, 6, 9, 7)
    key = jax.random.key(55)
    batched = factored_project(x, delta, key, 3, 5, "gaussian", block_rows=8)
    vmapped = jax.vmap(lambda a, b: factored_project(a, b, key, 3, 5, "gaussian", block_rows=8))(x, delta)
    np.testing.assert_allclose(vmapped, batched, rtol=1e-6, atol=1e-6 * np.abs(np.asarray(batched)).max())


def test_factored_project_rejects_mismatched_tokens():
    x, delta = layer_inputs(56, 2, 5, 4, 3)
    with pytest.raises(ValueError, match="agree"):
        factored_project(x, delta[:, :4], jax.random.key(0), 2, 2)


@pytest.mark.parametrize("kind", KINDS)
def test_factored_projection_preserves_inner_products_in_expectation(kind):
    n_keys, d_in, d_out = 2000, 8, 8
    x, delta = layer_inputs(57, 2, 4, 16, 12)
    x[1] = 0.6 * x[0] + 0.8 * x[1]  # correlated gradients: a clearly non-zero inner product
    delta[1] = 0.6 * delta[0] + 0.8 * delta[1]
    g = weight_gradients(x, delta)
    keys = jax.random.split(jax.random.key(58), n_keys)
    features = jax.vmap(lambda k: factored_project(x, delta, k, d_in, d_out, kind, block_rows=16))(keys)
    features = np.asarray(features, np.float64)  # [keys, 2, d_in * d_out]
    estimates = {
        "inner": (np.sum(features[:, 0] * features[:, 1], axis=1), g[0] @ g[1]),
        "norm0": (np.sum(features[:, 0] ** 2, axis=1), g[0] @ g[0]),
        "norm1": (np.sum(features[:, 1] ** 2, axis=1), g[1] @ g[1]),
    }
    for name, (sample, truth) in estimates.items():
        standard_error = sample.std() / math.sqrt(n_keys)
        assert abs(sample.mean() - truth) < 4.5 * standard_error, name
        assert standard_error < 0.05 * np.linalg.norm(g[0]) * np.linalg.norm(g[1]), name


# ----------------------------------------------------------------------------- pytrees


def example_tree(n_examples):
    return {
        "b": random_vectors(0, (n_examples, 3, 2)),
        "a": {"z": random_vectors(1, (n_examples, 4)), "y": random_vectors(2, (n_examples,))},
    }


def test_flatten_order_is_sorted_dict_keys():
    tree = example_tree(2)
    flat = np.asarray(flatten_batched_tree(tree))
    assert flat.shape == (2, 11)
    np.testing.assert_array_equal(flat[:, 0], tree["a"]["y"])
    np.testing.assert_array_equal(flat[:, 1:5], tree["a"]["z"])
    np.testing.assert_array_equal(flat[:, 5:], np.asarray(tree["b"]).reshape(2, 6))
    for c in range(2):
        one = jax.tree_util.tree_map(lambda leaf, c=c: leaf[c], tree)
        np.testing.assert_array_equal(flatten_tree(one), flat[c])
        assert tree_size(one) == 11
    abstract = jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype), tree)
    assert tree_size(abstract) == 11


def test_project_tree_equals_project_of_flattened_tree():
    tree = example_tree(3)
    key = jax.random.key(62)
    got = project_tree(tree, key, DIM, "rademacher", 4)
    np.testing.assert_array_equal(got, project(flatten_batched_tree(tree), key, DIM, "rademacher", 4))


def test_flatten_errors():
    with pytest.raises(ValueError, match="leading"):
        flatten_batched_tree({"a": jnp.zeros((2, 3)), "b": jnp.zeros((3, 3))})
    with pytest.raises(ValueError, match="no array leaves"):
        flatten_tree({})


# ----------------------------------------------------------------------------- configuration and argument errors


def test_config_defaults_and_dict():
    config = ProjectionConfig()
    assert config.to_dict() == {"dim": 8192, "kind": "rademacher", "seed": 0, "block_rows": 4096, "mode": "dense"}
    custom = ProjectionConfig(dim=np.int64(256), kind="gaussian", seed=np.uint32(7), block_rows=128, mode="factored")
    assert json.loads(json.dumps(custom.to_dict())) == {"dim": 256, "kind": "gaussian", "seed": 7, "block_rows": 128,
                                                        "mode": "factored"}
    np.testing.assert_array_equal(jax.random.key_data(custom.key()), jax.random.key_data(jax.random.key(7)))


@pytest.mark.parametrize(
    "field, value",
    [("dim", 0), ("dim", -8), ("dim", 8.0), ("dim", True), ("kind", "sparse"), ("kind", None), ("seed", -1),
     ("seed", 2**32), ("seed", 1.5), ("block_rows", 0), ("block_rows", "4096"), ("mode", "kron")],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        ProjectionConfig(**{field: value})


@pytest.mark.parametrize("kwargs", [{"dim": 0}, {"kind": "sparse"}, {"block_rows": -1}])
def test_project_rejects_bad_arguments(kwargs):
    args = {"dim": DIM, "kind": "rademacher", "block_rows": BLOCK} | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        project(jnp.zeros((2, 5)), jax.random.key(0), **args)
    with pytest.raises(ValueError, match="coordinate"):
        project(jnp.zeros((2, 0)), jax.random.key(0), DIM)
