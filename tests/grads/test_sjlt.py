"""The sparse JL projection (``ProjectionConfig.mode = "sjlt"``): equals the explicit sparse matrix
of its generated hashes and signs; preserves inner products with CountSketch's variance; gives the
one-device features on 8 devices; is what `gradient_features` and the feature store apply."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jraise.grads.agnostic import adam_preconditioner, gradient_features, per_example_grads
from jraise.grads.features import FeatureConfig, compute_features
from jraise.grads.per_example import chunked_grads
from jraise.grads.projection import (
    DEFAULT_SJLT_NNZ,
    ProjectionConfig,
    flatten_batched_tree,
    project_columns_sjlt,
    project_sjlt,
    project_tree_sjlt,
    sjlt_hashes,
    sjlt_matrix,
    sjlt_table,
)
from jraise.jobs.influence import feature_store
from jraise.train.step import split_trainable


def explicit_matrix(key, n_rows: int, dim: int, nnz: int, block_rows: int) -> np.ndarray:
    """[n_rows, dim] built in numpy from `sjlt_hashes`: row i has sigma_j(i)/sqrt(s) at h_j(i)."""
    matrix = np.zeros((n_rows, dim), np.float64)
    for block in range(-(-n_rows // block_rows)):
        outputs, signs = map(np.asarray, sjlt_hashes(key, block, block_rows, dim, nnz))
        for r in range(block_rows):
            row = block * block_rows + r
            if row < n_rows:
                for j in range(nnz):
                    matrix[row, outputs[j, r]] += signs[j, r] / math.sqrt(nnz)
    return matrix


# ----------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("nnz", [1, 2, 4])
def test_projection_equals_the_explicit_sparse_matrix_of_its_hashes(nnz):
    key, n_rows, dim, block_rows = jax.random.key(11), 50, 16, 8  # 7 blocks, the last one padded
    x = np.asarray(jax.random.normal(jax.random.key(0), (6, n_rows)), np.float32)
    matrix = explicit_matrix(key, n_rows, dim, nnz, block_rows)
    # The OSNAP block structure: s nonzeros per row, one in each block of d/s columns, +-1/sqrt(s).
    width = dim // nnz
    assert (np.count_nonzero(matrix, axis=1) == nnz).all()
    for j in range(nnz):
        assert (np.count_nonzero(matrix[:, j * width:(j + 1) * width], axis=1) == 1).all()
    np.testing.assert_allclose(np.abs(matrix[matrix != 0]), 1 / math.sqrt(nnz), rtol=1e-7)
    np.testing.assert_allclose(np.asarray(sjlt_matrix(key, n_rows, dim, nnz, block_rows)), matrix, rtol=1e-6)
    got = np.asarray(project_sjlt(jnp.asarray(x), key, dim, nnz, block_rows))
    want = x.astype(np.float64) @ matrix
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_hashes_are_the_documented_function_of_the_key():
    """Pinned: the stored features' definition. w = bits(fold_in(key, b), (s, n), uint32); output
    j m + ((w >> 1) mod m), sign + iff bit 0 of w is set."""
    key, block, block_rows, dim, nnz = jax.random.key(7), 3, 32, 24, 3
    words = np.asarray(jax.random.bits(jax.random.fold_in(key, block), (nnz, block_rows), jnp.uint32))
    outputs, signs = map(np.asarray, sjlt_hashes(key, block, block_rows, dim, nnz))
    width = dim // nnz
    np.testing.assert_array_equal(outputs, np.arange(nnz)[:, None] * width + (words >> 1) % width)
    np.testing.assert_array_equal(signs, np.where(words & 1, 1.0, -1.0))
    assert outputs.dtype == np.int32 and signs.dtype == np.float32


def test_rows_are_independent_and_calls_repeat_bit_for_bit():
    key = ProjectionConfig(mode="sjlt", dim=32, sjlt_nnz=2, seed=5).key()
    x = jax.random.normal(jax.random.key(1), (2, 3, 300))
    whole = np.asarray(project_sjlt(x, key, 32, 2, 64))
    assert whole.shape == (2, 3, 32) and whole.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(project_sjlt(x, key, 32, 2, 64)), whole)
    for i in range(2):
        for k in range(3):  # a row alone gives its features within the chunk, bit for bit
            np.testing.assert_array_equal(np.asarray(project_sjlt(x[i, k], key, 32, 2, 64)), whole[i, k])
    # The hashes do not depend on P: a longer vector with zeros appended has the same features.
    longer = jnp.pad(x, ((0, 0), (0, 0), (0, 333)))
    np.testing.assert_allclose(np.asarray(project_sjlt(longer, key, 32, 2, 64)), whole, rtol=1e-6, atol=1e-6)
    tree = {"b": x[0, :, :100].reshape(3, 10, 10), "a": x[0, :, 100:]}
    np.testing.assert_array_equal(np.asarray(project_tree_sjlt(tree, key, 32, 2, 64)),
                                  np.asarray(project_sjlt(flatten_batched_tree(tree), key, 32, 2, 64)))


@pytest.mark.parametrize("nnz", [1, 2])
def test_the_rows_last_sketch_equals_the_rows_first_one_bit_for_bit(nnz):
    """`project_columns_sjlt` (the chunk laid out [*shape, C], as the feature programs hold it) is
    `project_tree_sjlt` of the same chunk rows first: same hashes (`sjlt_table`), same sums."""
    key, dim, block_rows = ProjectionConfig(mode="sjlt", dim=32, seed=9).key(), 32, 64
    x = jax.random.normal(jax.random.key(2), (5, 317))  # 5 blocks, the last one partial
    tree = {"w": x[:, :120].reshape(5, 8, 15), "b": x[:, 120:150], "z": x[:, 150:].reshape(5, 167, 1)}
    table = sjlt_table(key, 317, dim, nnz, block_rows)
    outputs, signs = map(np.asarray, table)
    assert outputs.shape == signs.shape == (nnz, 317)
    for block in range(5):  # column i holds coordinate i's hashes
        want_o, want_s = map(np.asarray, sjlt_hashes(key, block, block_rows, dim, nnz))
        n = min(block_rows, 317 - block * block_rows)
        np.testing.assert_array_equal(outputs[:, block * block_rows:block * block_rows + n], want_o[:, :n])
        np.testing.assert_array_equal(signs[:, block * block_rows:block * block_rows + n], want_s[:, :n])
    rows_last = jax.tree.map(lambda leaf: jnp.moveaxis(leaf, 0, -1), tree)
    got = np.asarray(jax.jit(lambda t, tab: project_columns_sjlt(t, tab, dim))(rows_last, table))
    np.testing.assert_array_equal(got, np.asarray(project_tree_sjlt(tree, key, dim, nnz, block_rows)))
    with pytest.raises(ValueError, match="coordinates"):
        project_columns_sjlt({"w": rows_last["w"]}, table, dim)
    with pytest.raises(ValueError, match="trailing"):
        project_columns_sjlt({**rows_last, "b": rows_last["b"][:, :4]}, table, dim)


def test_rows_last_gradients_are_the_transposed_gradients():
    """`chunked_grads(rows_last=True)` hands ``on_chunk`` the chunk's gradients with the example
    axis last; without an ``on_chunk`` (nothing to bring the rows back first) it refuses."""
    params = {"w": jnp.arange(6.0).reshape(2, 3) / 7, "b": jnp.ones(3)}
    batch = jax.random.normal(jax.random.key(3), (5, 2))

    def loss_fn(p, x):
        return jnp.sum(jnp.tanh(x @ p["w"] + p["b"]) ** 2)

    want = chunked_grads(loss_fn, params, batch, 2)
    got = chunked_grads(loss_fn, params, batch, 2, lambda t: jax.tree.map(lambda g: jnp.moveaxis(g, -1, 0), t),
                        rows_last=True)
    for name in params:
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), rtol=1e-6)
    with pytest.raises(ValueError, match="on_chunk"):
        chunked_grads(loss_fn, params, batch, 2, rows_last=True)


def test_config_validation_and_identity():
    assert ProjectionConfig(mode="sjlt").sjlt_nnz == DEFAULT_SJLT_NNZ == 1
    with pytest.raises(ValueError, match="must divide dim"):
        ProjectionConfig(mode="sjlt", dim=10, sjlt_nnz=4)
    with pytest.raises(ValueError, match="kind must be 'rademacher'"):
        ProjectionConfig(mode="sjlt", kind="gaussian")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="sjlt_nnz"):
            ProjectionConfig(mode="sjlt", sjlt_nnz=bad)
    with pytest.raises(ValueError, match="must divide dim"):
        project_sjlt(jnp.ones((2, 5)), jax.random.key(0), 10, 3)
    # Dense and factored identities are unchanged (no sjlt_nnz); an sjlt one holds the mode and s.
    assert set(ProjectionConfig().to_dict()) == {"dim", "kind", "seed", "block_rows", "mode"}
    assert ProjectionConfig(mode="factored", sjlt_nnz=4).to_dict() == ProjectionConfig(mode="factored").to_dict()
    sparse = ProjectionConfig(mode="sjlt", dim=64, sjlt_nnz=np.int64(4)).to_dict()
    assert sparse["mode"] == "sjlt" and sparse["sjlt_nnz"] == 4 and type(sparse["sjlt_nnz"]) is int
    json.dumps(FeatureConfig(projection=ProjectionConfig(mode="sjlt", sjlt_nnz=2)).to_dict())


# ----------------------------------------------------------------------------- JL statistics


@pytest.mark.parametrize("nnz", [1, 4])
def test_inner_products_are_unbiased_with_countsketch_variance(nnz):
    """Over 200 keys, err = <Sx, Sy> - <x, y> for fixed unit x, y has mean ~0 and variance
    (|x|^2 |y|^2 + <x,y>^2 - 2 sum_i x_i^2 y_i^2) / d, for every s (s independent CountSketches
    into d/s dims, averaged). x and y share 3 heavy coordinates, so that the last term is ~30% of
    the first two and the test tells this formula from (|x|^2 |y|^2 + <x,y>^2) / d."""
    n_keys, n_coords, dim = 200, 300, 32
    z1, z2 = np.random.default_rng(0).standard_normal((2, n_coords - 3))
    x = np.concatenate([[3.0, -2.0, 2.0], 0.15 * z1])
    y = np.concatenate([[2.0, 2.5, -1.0], 0.15 * (0.6 * z1 + 0.8 * z2)])
    x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
    keys = jax.vmap(jax.random.key)(jnp.arange(n_keys))
    features = jax.vmap(lambda k: project_sjlt(jnp.asarray(np.stack([x, y]), jnp.float32), k, dim, nnz, 64))(keys)
    features = np.asarray(features, np.float64)
    err = (features[:, 0] * features[:, 1]).sum(1) - x @ y
    correction = 2 * np.sum(x**2 * y**2)
    theory = (1 + (x @ y) ** 2 - correction) / dim
    assert correction / (1 + (x @ y) ** 2) > 0.25
    assert abs(err.mean()) < 3 * err.std() / math.sqrt(n_keys)
    # The sample variance of 200 draws has a standard error of ~10-15% of the true one.
    assert 0.8 < err.var() / theory < 1.25, (err.var(), theory)


# ----------------------------------------------------------------------------- gradient_features


def test_gradient_features_equal_the_sjlt_projection_of_per_example_grads():
    def loss_fn(params, example):
        hidden = jnp.tanh(example["x"] @ params["w"] + params["b"])
        return (hidden @ params["v"] - example["y"]) ** 2

    rng = np.random.default_rng(3)
    params = {"w": rng.standard_normal((5, 7)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32),
              "v": rng.standard_normal(7).astype(np.float32)}
    batch = {"x": rng.standard_normal((10, 5)).astype(np.float32), "y": rng.standard_normal(10).astype(np.float32)}
    config = ProjectionConfig(mode="sjlt", dim=16, sjlt_nnz=2, seed=4, block_rows=8)
    grads = per_example_grads(loss_fn, params, batch, chunk=4)
    want = np.asarray(project_sjlt(flatten_batched_tree(grads), config.key(), 16, 2, 8))
    got = np.asarray(gradient_features(loss_fn, params, batch, projection=config, chunk=4))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # and with LESS's Adam preconditioning, applied before the projection
    mu = jax.tree.map(lambda p: 0.1 * p, params)
    nu = jax.tree.map(lambda p: p * p + 0.01, params)
    pre = adam_preconditioner(mu, nu)
    want = np.asarray(project_sjlt(flatten_batched_tree(jax.vmap(pre)(grads)), config.key(), 16, 2, 8))
    got = np.asarray(gradient_features(loss_fn, params, batch, projection=config, precondition=pre, chunk=4))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # a different s is a different projection
    other = gradient_features(loss_fn, params, batch, projection=ProjectionConfig(
        mode="sjlt", dim=16, sjlt_nnz=4, seed=4, block_rows=8), chunk=4)
    assert not np.allclose(np.asarray(other), got)


# ----------------------------------------------------------------------------- jraise's features


SJLT = FeatureConfig(projection=ProjectionConfig(dim=32, seed=5, block_rows=64, mode="sjlt", sjlt_nnz=2), chunk=2,
                     group=4, shard_rows=8)


@pytest.fixture(scope="module")
def setup(tiny_testbed_and_lora):
    root, pool, _, _, model = tiny_testbed_and_lora("sjlt", 12)
    graphdef, trainable, frozen = split_trainable(model)
    return root, pool, graphdef, trainable, frozen


def test_compute_features_is_the_sjlt_projection_of_the_gradients(setup):
    from jraise.data.batching import make_batch
    from jraise.grads.per_example import adam_precondition, example_grad_fn
    from jraise.grads.projection import flatten_tree

    _, pool, graphdef, trainable, frozen = setup
    mu = jax.tree.map(lambda x: 0.01 * np.ones_like(x), trainable)
    nu = jax.tree.map(lambda x: 1e-4 * np.ones_like(x), trainable)
    rows = np.array([5, 0, 11, 3, 7])
    got = compute_features(graphdef, trainable, frozen, pool, rows, SJLT, "sft", moments=(mu, nu))
    grad = jax.jit(example_grad_fn(graphdef, "sft"))
    length = int(pool.lengths[rows].max())
    flat = []
    for i in rows:
        batch = make_batch(pool, [i], length)
        g = grad(trainable, frozen, {key: v[0] for key, v in batch.items() if key != "index"})
        flat.append(np.asarray(flatten_tree(adam_precondition(g, mu, nu))))
    proj = SJLT.projection
    want = np.asarray(sjlt_matrix(proj.key(), len(flat[0]), proj.dim, proj.sjlt_nnz, proj.block_rows))
    np.testing.assert_allclose(got, np.stack(flat) @ want, rtol=2e-4, atol=1e-6)
    # Another seed: its own hashes, through the same compiled program (the key is an argument).
    from jraise.grads import features

    programs = len(features._PROGRAMS._entries)
    other = dataclasses.replace(SJLT, projection=dataclasses.replace(proj, seed=proj.seed + 1))
    got_other = compute_features(graphdef, trainable, frozen, pool, rows, other, "sft", moments=(mu, nu))
    assert len(features._PROGRAMS._entries) == programs
    want = np.asarray(sjlt_matrix(other.projection.key(), len(flat[0]), proj.dim, proj.sjlt_nnz, proj.block_rows))
    np.testing.assert_allclose(got_other, np.stack(flat) @ want, rtol=2e-4, atol=1e-6)
    assert np.abs(got_other - got).max() > 1e-3


def test_feature_stores_of_other_modes_or_s_never_mix(setup):
    root, pool, graphdef, trainable, frozen = setup
    store_dir = root / "store-sjlt"
    store = feature_store(store_dir, graphdef, trainable, frozen, pool, SJLT, {"model": "tiny"}, progress=False)
    assert store.identity["features"]["projection"]["sjlt_nnz"] == 2
    for projection in (ProjectionConfig(dim=32, seed=5, block_rows=64, mode="sjlt", sjlt_nnz=4),
                       ProjectionConfig(dim=32, seed=5, block_rows=64, mode="dense")):
        config = FeatureConfig(projection=projection, chunk=2, group=4, shard_rows=8)
        with pytest.raises(ValueError, match="features.projection"):
            feature_store(store_dir, graphdef, trainable, frozen, pool, config, {"model": "tiny"}, progress=False)
    again = feature_store(store_dir, graphdef, trainable, frozen, pool, SJLT, {"model": "tiny"}, progress=False)
    np.testing.assert_array_equal(again.matrix().rows(0, len(pool)), store.matrix().rows(0, len(pool)))


# ----------------------------------------------------------------------------- 8 devices

WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path

    import jax
    import numpy as np

    from jraise import parallel
    from jraise.data.pool import load_pool
    from jraise.grads.features import FeatureConfig, compute_features
    from jraise.grads.projection import ProjectionConfig
    from jraise.model import init_model, load_tokenizer, preset_config
    from jraise.model.lora import LoRAConfig, add_lora
    from jraise.testbed import write_testbed
    from jraise.train.step import param_dtypes, split_trainable

    work = Path(sys.argv[1])
    paths = write_testbed(work / "tb", n_train=24, n_val_per_category=1, n_test_per_category=1)
    tok = load_tokenizer(paths["tokenizer"])
    pool = load_pool(paths["pool"], tok, max_len=128)
    model = init_model(preset_config("tiny", vocab_size=len(tok)), seed=0)
    add_lora(model, LoRAConfig(rank=4), seed=1)
    graphdef, trainable, frozen = split_trainable(model)
    moments = (jax.tree.map(lambda x: 0.1 * x + 0.01, trainable), jax.tree.map(lambda x: x * x + 0.02, trainable))
    config = FeatureConfig(projection=ProjectionConfig(dim=64, seed=3, block_rows=256, mode="sjlt", sjlt_nnz=2),
                           chunk=2, group=16, n_buckets=2)
    out = {}
    for spec in ["none", *sys.argv[2:]]:
        with parallel.use_mesh(None if spec == "none" else spec):
            out[spec] = compute_features(graphdef, trainable, frozen, pool, np.arange(len(pool)), config, "sft",
                                         moments, dtypes=param_dtypes(model))
    # The projection alone, rows split over 8 devices by shard_map, against one device.
    from jax.sharding import Mesh, PartitionSpec
    from jraise.grads.projection import project_sjlt

    x = jax.random.normal(jax.random.key(9), (16, 1000))
    key = config.projection.key()
    project = jax.shard_map(lambda v, k: project_sjlt(v, k, 64, 2, 256), mesh=Mesh(np.array(jax.devices()), ("d",)),
                            in_specs=(PartitionSpec("d"), PartitionSpec()), out_specs=PartitionSpec("d"),
                            check_vma=False)
    out["projection/none"] = project_sjlt(x, key, 64, 2, 256)
    out["projection/8"] = jax.jit(project)(x, key)
    np.savez(work / "features.npz", devices=jax.device_count(), **out)
""")
MESHES = ("data=8", "data=2,fsdp=4")


def test_sjlt_features_on_8_devices_equal_one_device(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path), *MESHES], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = np.load(tmp_path / "features.npz")
    assert int(results["devices"]) == 8
    one = results["none"]
    assert one.shape == (24, 64) and np.abs(one).min(axis=1).max() > 0
    for mesh in MESHES:
        # The hashes are generated from the same keys on every device and each row is projected
        # on its own; only the per-example gradients may round differently on a mesh.
        np.testing.assert_allclose(results[mesh], one, rtol=1e-5, atol=1e-6 * np.abs(one).max(), err_msg=mesh)
    # The projection of the same rows is the same bit for bit on 1 and 8 devices.
    np.testing.assert_array_equal(results["projection/8"], results["projection/none"])
