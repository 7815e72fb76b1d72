"""Model-agnostic gradient features: user-written pure-JAX models (a params pytree and a loss)
give the per-example gradients of a Python loop of jax.grad, and the features of jraise's own
projection of those gradients."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jraise.grads import (
    AdamPreconditioner,
    ProjectionConfig,
    adam_preconditioner,
    gradient_features,
    per_example_grads,
)
from jraise.grads.per_example import adam_precondition
from jraise.grads.projection import (
    dense_matrix,
    flatten_batched_tree,
    project_tree,
    project_tree_factored,
    tree_size,
)

TOL = 1e-5
# block_rows below P, so the projection runs over several blocks and a zero-padded last one.
PROJ = ProjectionConfig(dim=16, seed=3, block_rows=16)


# ----------------------------------------------------------------------------- user models


def mlp_params(key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {"w1": 0.5 * jax.random.normal(k1, (4, 8)), "b1": 0.1 * jax.random.normal(k2, (8,)),
            "w2": 0.5 * jax.random.normal(k3, (8, 3)), "b2": 0.1 * jax.random.normal(k4, (3,))}


def mlp_loss(params, example):
    """Softmax cross-entropy of a 2-layer MLP on one (x [4], y int) example."""
    x, y = example
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    logits = h @ params["w2"] + params["b2"]
    return -jax.nn.log_softmax(logits)[y]


def mlp_batch(n, seed=0):
    rng = np.random.RandomState(seed)
    return (rng.randn(n, 4).astype(np.float32), rng.randint(0, 3, n).astype(np.int32))


def bilinear_params(key):
    k1, k2 = jax.random.split(key)
    return {"scale": jnp.float32(1.5), "inner": {"m": jax.random.normal(k1, (3, 5)),
                                                 "bias": [jax.random.normal(k2, (5,))]}}


def bilinear_loss(params, example):
    """Squared error of ``scale * u^T M v + bias . v`` against a scalar target."""
    pred = params["scale"] * example["u"] @ params["inner"]["m"] @ example["v"]
    pred = pred + params["inner"]["bias"][0] @ example["v"]
    return (pred - example["t"]) ** 2


def bilinear_batch(n, seed=0):
    rng = np.random.RandomState(seed)
    return {"u": rng.randn(n, 3).astype(np.float32), "v": rng.randn(n, 5).astype(np.float32),
            "t": rng.randn(n).astype(np.float32)}


MODELS = {"mlp": (mlp_params, mlp_loss, mlp_batch), "bilinear": (bilinear_params, bilinear_loss, bilinear_batch)}


def _setup(name, n):
    make_params, loss, make_batch = MODELS[name]
    return make_params(jax.random.key(0)), loss, make_batch(n)


def _looped_grads(loss, params, batch, n):
    """Stacked [G, ...] gradients from a Python loop of single-example jax.grad."""
    grad = jax.grad(loss)
    rows = [grad(params, jax.tree.map(lambda x: x[i], batch)) for i in range(n)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *rows), rows


def _rel_err(a, b) -> float:
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _moments(params, seed=5):
    keys = iter(jax.random.split(jax.random.key(seed), 2 * len(jax.tree.leaves(params))))
    mu = jax.tree.map(lambda p: 0.01 * jax.random.normal(next(keys), jnp.shape(p)), params)
    nu = jax.tree.map(lambda p: 1e-4 * jnp.abs(jax.random.normal(next(keys), jnp.shape(p))), params)
    return mu, nu


# ----------------------------------------------------------------------------- per-example grads


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("n, chunk", [(11, 4), (11, 1), (3, 8)])
def test_per_example_grads_match_loop(name, n, chunk):
    params, loss, batch = _setup(name, n)
    got = per_example_grads(loss, params, batch, chunk=chunk)
    want, _ = _looped_grads(loss, params, batch, n)
    assert jax.tree.structure(got) == jax.tree.structure(params)
    for g, p in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        assert g.shape == (n, *jnp.shape(p))
    assert _rel_err(got, want) < TOL


def test_per_example_grads_under_jit():
    params, loss, batch = _setup("mlp", 11)
    got = jax.jit(partial(per_example_grads, loss, chunk=4))(params, batch)
    want, _ = _looped_grads(loss, params, batch, 11)
    assert _rel_err(got, want) < TOL


# ----------------------------------------------------------------------------- features


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("chunk", [4, 1])
def test_gradient_features_match_projected_loop(name, chunk):
    n = 11
    params, loss, batch = _setup(name, n)
    got = gradient_features(loss, params, batch, projection=PROJ, chunk=chunk)
    assert got.shape == (n, PROJ.dim) and got.dtype == jnp.float32
    stacked, _ = _looped_grads(loss, params, batch, n)
    want = project_tree(stacked, PROJ.key(), PROJ.dim, PROJ.kind, PROJ.block_rows)
    assert _rel_err(got, want) < TOL
    # The same as the explicit matrix: jraise's coordinates (flatten_batched_tree) times its rows.
    matrix = dense_matrix(PROJ.key(), tree_size(params), PROJ.dim, PROJ.kind, PROJ.block_rows)
    assert _rel_err(got, flatten_batched_tree(stacked) @ matrix) < TOL


@pytest.mark.parametrize("first_moment", [True, False])
def test_gradient_features_adam_match_loop(first_moment):
    n = 11
    params, loss, batch = _setup("mlp", n)
    mu, nu = _moments(params)
    pre = adam_preconditioner(mu, nu, first_moment=first_moment)
    got = gradient_features(loss, params, batch, projection=PROJ, precondition=pre, chunk=4)
    _, rows = _looped_grads(loss, params, batch, n)
    b1, b2, eps = 0.9, 0.999, 1e-8
    # The documented equation, written out: (b1 mu + (1-b1) g) / sqrt(b2 nu + (1-b2) g^2 + eps).
    m0 = mu if first_moment else jax.tree.map(jnp.zeros_like, mu)
    expected = [jax.tree.map(lambda g, m, v: (b1 * m + (1 - b1) * g) / jnp.sqrt(b2 * v + (1 - b2) * g * g + eps),
                             g, m0, nu) for g in rows]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *expected)
    want = project_tree(stacked, PROJ.key(), PROJ.dim, PROJ.kind, PROJ.block_rows)
    assert _rel_err(got, want) < TOL
    # One example: bit-identical to jraise's own feature path (adam_precondition; zero mu when the
    # first moment is dropped, as compute_features(adam_first_moment=False) does).
    ours = pre(rows[0])
    theirs = adam_precondition(rows[0], m0, nu)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gradient_features_under_jit_with_traced_preconditioner():
    n = 11
    params, loss, batch = _setup("bilinear", n)
    mu, nu = _moments(params)
    pre = adam_preconditioner(mu, nu, b1=0.8, b2=0.99, eps=1e-6)
    assert isinstance(pre, AdamPreconditioner)
    fn = jax.jit(partial(gradient_features, loss, projection=PROJ, chunk=4))
    got = fn(params, batch, precondition=pre)  # mu, nu are traced leaves, not baked-in constants
    eager = gradient_features(loss, params, batch, projection=PROJ, precondition=pre, chunk=4)
    _, rows = _looped_grads(loss, params, batch, n)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[pre(g) for g in rows])
    want = project_tree(stacked, PROJ.key(), PROJ.dim, PROJ.kind, PROJ.block_rows)
    assert _rel_err(got, want) < TOL
    assert _rel_err(eager, want) < TOL


def test_gradient_features_factored_and_gaussian():
    n = 7
    params, loss, batch = _setup("mlp", n)
    stacked, _ = _looped_grads(loss, params, batch, n)
    factored = ProjectionConfig(dim=16, seed=1, block_rows=16, mode="factored")
    got = gradient_features(loss, params, batch, projection=factored, chunk=3)
    want = project_tree_factored(stacked, factored.key(), factored.dim, factored.kind, factored.block_rows)
    assert _rel_err(got, want) < TOL
    gaussian = ProjectionConfig(dim=16, seed=2, block_rows=16, kind="gaussian")
    got = gradient_features(loss, params, batch, projection=gaussian, chunk=3)
    want = project_tree(stacked, gaussian.key(), gaussian.dim, gaussian.kind, gaussian.block_rows)
    assert _rel_err(got, want) < TOL


# ----------------------------------------------------------------------------- errors


def test_errors_are_readable():
    params, loss, batch = _setup("bilinear", 5)
    bad = {**batch, "t": batch["t"][:4]}
    with pytest.raises(ValueError, match=r"leading \(example\) axis.*\['t'\].*\(4,\)"):
        per_example_grads(loss, params, bad)
    empty = jax.tree.map(lambda x: x[:0], batch)
    with pytest.raises(ValueError, match="batch is empty"):
        gradient_features(loss, params, empty, projection=PROJ)
    with pytest.raises(ValueError, match="no array leaves"):
        per_example_grads(loss, params, {})
    with pytest.raises(ValueError, match=r"\['t'\] is a scalar"):
        per_example_grads(loss, params, {**batch, "t": np.float32(1.0)})
    with pytest.raises(ValueError, match="must return a scalar"):
        per_example_grads(lambda p, ex: p["inner"]["m"] @ ex["v"], params, batch)
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        per_example_grads(loss, params, batch, chunk=0)
    with pytest.raises(TypeError, match="ProjectionConfig"):
        gradient_features(loss, params, batch, projection={"dim": 16})
    mu, nu = _moments(params)
    with pytest.raises(ValueError, match="same pytree structure"):
        adam_preconditioner({"scale": mu["scale"]}, nu)
    pre = adam_preconditioner(mu, nu)
    with pytest.raises(ValueError, match=r"\['inner'\]\['m'\] has shape \(5, 3\)"):
        pre({**params, "inner": {"m": jnp.zeros((5, 3)), "bias": params["inner"]["bias"]}})
    with pytest.raises(ValueError, match="b1 must be"):
        adam_preconditioner(mu, nu, b1=1.0)
