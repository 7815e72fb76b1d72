"""Factored (LoGra-style Kronecker) projection mode of the gradient features: equal to explicit
Kronecker / dense matrices applied to single-example gradients, an exact split of d, unbiased
inner products, stores kept apart by mode, and the option wired from the CLI to the store."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jraise.data.batching import make_batch
from jraise.grads.features import FeatureConfig, compute_features
from jraise.jobs.influence import feature_store
from jraise.grads.per_example import adam_precondition, example_grad_fn
from jraise.grads.projection import (
    ProjectionConfig,
    dense_matrix,
    factor_projections,
    factored_matrix,
    factored_plan,
    factored_split,
    project_tree_factored,
)
from jraise.model import init_model, preset_config
from jraise.train.step import split_trainable

BLOCK = 64
ROWS = np.array([5, 0, 9, 11])


@pytest.fixture(scope="module")
def setup(tiny_testbed_and_lora):
    """(root, pool, lora (graphdef, trainable, frozen), full-parameter (graphdef, trainable, frozen))."""
    root, pool, _, tok, model = tiny_testbed_and_lora("factored", 12)
    full = split_trainable(init_model(preset_config("tiny", vocab_size=len(tok)), seed=1))
    return root, pool, split_trainable(model), full


def _config(dim: int, mode: str = "factored", seed: int = 5) -> FeatureConfig:
    return FeatureConfig(projection=ProjectionConfig(dim=dim, seed=seed, block_rows=BLOCK, mode=mode), chunk=2,
                         group=4, shard_rows=8)


def _moments(trainable):
    rng = np.random.default_rng(0)
    mu = jax.tree.map(lambda x: (1e-3 * rng.standard_normal(x.shape)).astype(np.float32), trainable)
    nu = jax.tree.map(lambda x: (1e-6 * rng.uniform(0.5, 1.5, x.shape)).astype(np.float32), trainable)
    return mu, nu


def _reference(trees, proj: ProjectionConfig) -> np.ndarray:
    """[len(trees), d] features from explicit matrices: leaf j (tree order) of every example times
    its Kronecker (`factored_matrix`; identity for a side with d == n) or dense (`dense_matrix`)
    block with key fold_in(key, j), the blocks concatenated."""
    columns = list(zip(*(jax.tree_util.tree_leaves(tree) for tree in trees)))  # per leaf, every example
    split = factored_split([leaves[0].shape for leaves in columns], proj.dim)
    parts = []
    for j, (leaves, dims) in enumerate(zip(columns, split)):
        key = jax.random.fold_in(proj.key(), j)
        vecs = np.stack([np.asarray(leaf, np.float64).ravel() for leaf in leaves])
        if len(dims) == 2:
            (n_in, n_out), (d_in, d_out) = leaves[0].shape, dims
            p_in, p_out = factor_projections(key, n_in, n_out, d_in, d_out, proj.kind, proj.block_rows)
            p_in = np.eye(n_in) if d_in == n_in else p_in  # a side given all its dims is kept exactly
            p_out = np.eye(n_out) if d_out == n_out else p_out
            matrix = np.kron(p_in, p_out)
            if d_in != n_in and d_out != n_out:
                np.testing.assert_allclose(matrix, factored_matrix(key, n_in, n_out, d_in, d_out, proj.kind,
                                                                   proj.block_rows))
        else:
            matrix = dense_matrix(key, vecs.shape[1], dims[0], proj.kind, proj.block_rows)
        parts.append(vecs @ np.asarray(matrix, np.float64))
    return np.concatenate(parts, axis=1)


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _single_example_grads(pool, graphdef, trainable, frozen, rows):
    grad = jax.jit(example_grad_fn(graphdef, "sft"))
    length = int(pool.lengths[rows].max())  # one shape: right padding does not change a gradient
    out = []
    for i in rows:
        batch = make_batch(pool, [i], length)
        out.append(grad(trainable, frozen, {k: v[0] for k, v in batch.items() if k != "index"}))
    return out


@pytest.mark.parametrize("which, dim, adam", [("lora", 86, True), ("full", 200, False)])
def test_factored_features_equal_explicit_kronecker_and_dense_matrices(setup, which, dim, adam):
    """LoRA with Adam preconditioning (every leaf 2-D; at d 86 the last one takes an odd remainder
    and is projected densely) and full parameters, plain gradients (norm scales: dense; kernels,
    embedding: Kronecker). Reference: single-example `jax.grad`, explicit matrices, float64."""
    _, pool, lora, full = setup
    graphdef, trainable, frozen = lora if which == "lora" else full
    config = _config(dim)
    moments = _moments(trainable) if adam else None
    got = compute_features(graphdef, trainable, frozen, pool, ROWS, config, "sft", moments=moments)
    assert got.shape == (len(ROWS), dim)
    grads = _single_example_grads(pool, graphdef, trainable, frozen, ROWS)
    if adam:
        grads = [adam_precondition(g, *moments) for g in grads]
    plan = factored_plan(grads[0], dim)
    assert {len(dims) for _, _, dims in plan} == {1, 2}  # both kinds of blocks
    if which == "lora":  # the rank-2 side of lora_a / lora_b is kept whole (identity factor)
        assert any(len(dims) == 2 and min(shape) in dims for _, shape, dims in plan)
    refs = _reference(grads, config.projection)
    for k in range(len(ROWS)):
        assert _rel(got[k], refs[k]) < 1e-5


def test_project_tree_factored_equals_explicit_matrices_on_a_random_tree():
    """The projection alone (no model): a tree with 2-D, 1-D, 3-D and scalar leaves, a batch of 3."""
    rng = np.random.default_rng(1)
    shapes = {"emb": (9, 4), "norm": (4,), "w": {"kernel": (4, 6), "bias": (6,)}, "conv": (2, 3, 2), "s": ()}
    trees = [jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), shapes,
                          is_leaf=lambda s: isinstance(s, tuple)) for _ in range(3)]
    batched = jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)
    proj = ProjectionConfig(dim=29, seed=9, block_rows=8, kind="gaussian", mode="factored")
    got = np.asarray(project_tree_factored(batched, proj.key(), proj.dim, proj.kind, proj.block_rows))
    refs = _reference(trees, proj)
    for k in range(3):
        assert _rel(got[k], refs[k]) < 1e-5


@pytest.mark.parametrize("shapes", [
    [(32, 2), (2, 32), (32, 2), (2, 16)] * 4,  # tiny LoRA
    [(128, 8), (8, 128), (128, 8), (8, 64)] * 16,  # small-preset LoRA, rank 8
    [(100, 32), (32,), (32, 64), (64,), (7,), (3, 4, 5), ()],  # kernels, biases, a 3-D and a scalar leaf
    [(5, 7)],
    [(1000,)],
])
@pytest.mark.parametrize("dim", [16, 37, 64, 257, 1000, 1024, 8192])
def test_split_gives_every_leaf_a_share_and_sums_to_d_exactly(shapes, dim):
    if dim < len(shapes):
        return
    split = factored_split(shapes, dim)
    assert sum(int(np.prod(dims)) for dims in split) == dim
    assert all(min(dims) >= 1 for dims in split)
    for shape, dims in zip(shapes, split):
        assert len(dims) in ((1, 2) if len(shape) == 2 else (1,))
    assert sum(len(dims) == 1 and len(shape) == 2 for shape, dims in zip(shapes, split)) <= 1  # at most the last
    assert factored_split(shapes, dim) == split  # deterministic


def test_split_shares_follow_leaf_sizes_and_keep_the_rank_side():
    split = factored_split([(128, 8), (8, 128), (128, 8), (8, 64)] * 8, 8192)
    assert split[:4] == ((36, 8), (8, 36), (36, 8), (8, 18))  # rank side whole, shares ~ size
    assert factored_split([(64, 64)], 1024) == ((32, 32),)


def test_a_too_small_dim_names_the_leaf_left_without_a_share():
    with pytest.raises(ValueError, match=r"dim 4 .* 5 gradient leaves.*leaf e \(7,\)"):
        factored_split([(10, 3), (3,), (3, 6), (6,), (7,)], 4, names=list("abcde"))
    tree = {"kernel": jnp.zeros((2, 3, 4)), "scale": jnp.zeros((2, 5))}
    with pytest.raises(ValueError, match=r"\['scale'\]"):
        project_tree_factored(tree, jax.random.key(0), 1)
    with pytest.raises(ValueError, match="no coordinates"):
        factored_split([(0, 3), (2,)], 8)
    with pytest.raises(ValueError, match="mode"):
        ProjectionConfig(mode="kron")


def test_inner_products_are_preserved_in_expectation():
    """Over many keys the mean of <Kx, Ky> is within a few standard errors of <x, y> (and of the
    squared norms), for a tree with Kronecker blocks and dense leaves."""
    rng = np.random.default_rng(0)
    shapes = {"a": (12, 6), "b": (4, 9), "c": (5,), "d": (3, 2, 2)}
    x = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    y = {k: (0.6 * x[k] + 0.8 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    pair = jax.tree.map(lambda u, v: jnp.stack([u, v]), x, y)
    keys = jax.random.split(jax.random.key(11), 2000)
    feats = np.asarray(jax.vmap(lambda key: project_tree_factored(pair, key, 24, "rademacher", BLOCK))(keys),
                       np.float64)
    assert any(len(dims) == 2 for dims in factored_split([s for _, s in sorted(shapes.items())], 24))
    flat = [np.concatenate([np.ravel(t[k]) for k in sorted(t)]).astype(np.float64) for t in (x, y)]
    for (u, v), estimates in (((0, 1), np.sum(feats[:, 0] * feats[:, 1], axis=1)),
                              ((0, 0), np.sum(feats[:, 0] ** 2, axis=1))):
        exact = flat[u] @ flat[v]
        standard_error = estimates.std(ddof=1) / np.sqrt(len(estimates))
        assert abs(estimates.mean() - exact) < 4 * standard_error, (estimates.mean(), exact, standard_error)
        assert standard_error < 0.1 * abs(exact)  # the test has power: estimates scatter, but not wildly


def test_a_store_is_bound_to_its_projection_mode(setup):
    root, pool, lora, _ = setup
    graphdef, trainable, frozen = lora
    dense = feature_store(root / "dense", graphdef, trainable, frozen, pool, _config(32, "dense"), {"ckpt": 1},
                          progress=False)
    assert dense.identity["features"]["projection"]["mode"] == "dense"
    with pytest.raises(ValueError, match=r"identity\.features\.projection\.mode: saved \"dense\", requested "
                                         r"\"factored\""):
        feature_store(root / "dense", graphdef, trainable, frozen, pool, _config(32), {"ckpt": 1}, progress=False)
    # A store written before the mode existed (no "mode" key) holds dense features: it reopens under
    # the dense mode without recomputing, and refuses the factored one.
    meta_path = root / "dense" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["identity"]["features"]["projection"]["mode"]
    meta_path.write_text(json.dumps(meta))
    shard = dense.shard_path(0).read_bytes()
    again = feature_store(root / "dense", graphdef, trainable, frozen, pool, _config(32, "dense"), {"ckpt": 1},
                          progress=False)
    assert again.is_complete and again.shard_path(0).read_bytes() == shard
    with pytest.raises(ValueError, match=r"mode: saved <absent, meaning \"dense\">, requested \"factored\""):
        feature_store(root / "dense", graphdef, trainable, frozen, pool, _config(32), {"ckpt": 1}, progress=False)
