"""Never-materialised factored full-parameter features (`jraise.grads.factored_full`) and jraise's
CausalLM adapter (`jraise.model.taps`): equal to the explicit Kronecker projection of materialised
per-example kernel gradients, with and without the Adafactor preconditioner; no per-example weight
gradient in the program; jit and chunking; errors."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jraise.data.batching import make_batch
from jraise.grads import (
    ProjectionConfig,
    adafactor_factors,
    factored_full_features,
    factored_full_plan,
    tapped_inputs_and_deltas,
    tapped_layers,
)
from jraise.grads.factored_full import factored_full_split
from jraise.grads.per_example import example_grad_fn, example_loss
from jraise.grads.projection import factor_projections, factored_matrix, project_tree_factored
from jraise.model import init_model, preset_config
from jraise.model.taps import layer_kernels, projection_names, tapped_logits, tapped_sft_loss
from jraise.model.transformer import Projection
from jraise.train.step import split_trainable

TOL = 1e-5
N_IN, HID, N_OUT = 6, 10, 5
TOKENS = (3, 4)  # two token axes: they are flattened to N = 12


# ----------------------------------------------------------------------------- a pure-JAX MLP


def mlp_params(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {"w1": 0.5 * jax.random.normal(k1, (N_IN, HID)), "b1": 0.1 * jax.random.normal(k2, (HID,)),
            "w2": 0.5 * jax.random.normal(k3, (HID, N_OUT))}


def tapped_mlp_loss(params, example, tap):
    """Weighted token cross-entropy of a 2-layer MLP, both linear layers tapped."""
    x = example["x"]  # [3, 4, N_IN]
    h = jnp.tanh(tap("fc1", x, x @ params["w1"] + params["b1"]))
    logits = tap("fc2", h, h @ params["w2"])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), example["y"][..., None], axis=-1)[..., 0]
    return jnp.sum(nll * example["w"]) / jnp.sum(example["w"])


def mlp_loss(params, example):
    return tapped_mlp_loss(params, example, lambda name, x, y: y)


def mlp_batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, *TOKENS, N_IN)).astype(np.float32),
            "y": rng.integers(0, N_OUT, (n, *TOKENS)).astype(np.int32),
            "w": rng.uniform(0.5, 1.5, (n, *TOKENS)).astype(np.float32)}


def _rows(batch, i):
    return jax.tree.map(lambda x: x[i], batch)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _proj(dim, seed=4, kind="rademacher"):
    return ProjectionConfig(dim=dim, seed=seed, kind=kind, block_rows=8, mode="factored")


def _explicit(grad, key, dims, kind, block_rows):
    """vec(G) @ (P_in (x) P_out) in float64, identity for a side with d == n."""
    (n_in, n_out), (d_in, d_out) = grad.shape, dims
    p_in, p_out = factor_projections(key, n_in, n_out, d_in, d_out, kind, block_rows)
    p_in = np.eye(n_in) if d_in == n_in else np.asarray(p_in, np.float64)
    p_out = np.eye(n_out) if d_out == n_out else np.asarray(p_out, np.float64)
    return np.asarray(grad, np.float64).ravel() @ np.kron(p_in, p_out)


# ----------------------------------------------------------------------------- (a) (b) equal to explicit


def test_layers_and_plan():
    params, batch = mlp_params(), mlp_batch(2)
    assert tapped_layers(tapped_mlp_loss, params, _rows(batch, 0)) == {"fc1": (N_IN, HID), "fc2": (HID, N_OUT)}
    plan = factored_full_plan(tapped_mlp_loss, params, _rows(batch, 0), 24)
    assert plan == [("fc1", (N_IN, HID), (3, 4)), ("fc2", (HID, N_OUT), (4, 3))]


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_each_layer_equals_kronecker_projection_of_materialised_gradient(kind):
    """At d = 24 both layers are projected on both sides: the features of layer j are
    vec(G_j) @ factored_matrix(fold_in(key, j), ...), G_j = jax.grad w.r.t. the kernel."""
    params, batch = mlp_params(), mlp_batch(3)
    proj = _proj(24, kind=kind)
    got = np.asarray(factored_full_features(tapped_mlp_loss, params, batch, projection=proj, chunk=2))
    assert got.shape == (3, 24) and got.dtype == np.float32
    plan = factored_full_plan(tapped_mlp_loss, params, _rows(batch, 0), proj.dim)
    for g in range(3):
        grads = jax.grad(mlp_loss)(params, _rows(batch, g))
        start = 0
        for j, (name, shape, (d_in, d_out)) in enumerate(plan):
            kernel = grads["w1" if name == "fc1" else "w2"]
            key = jax.random.fold_in(proj.key(), j)
            matrix = factored_matrix(key, *shape, d_in, d_out, kind, proj.block_rows)
            want = np.asarray(kernel, np.float64).ravel() @ np.asarray(matrix, np.float64)
            assert _rel(got[g, start:start + d_in * d_out], want) < TOL
            start += d_in * d_out
        assert start == proj.dim


@pytest.mark.parametrize("dim", [24, 57, 400])
def test_whole_tree_equals_project_tree_factored_of_kernel_gradients(dim):
    """The concatenation over layers equals jraise's factored mode of the materialised kernel
    gradients {name: G} (d = 400 keeps fc1's input side exactly: d_in == n_in)."""
    params, batch = mlp_params(1), mlp_batch(4, seed=1)
    proj = _proj(dim)
    got = np.asarray(factored_full_features(tapped_mlp_loss, params, batch, projection=proj, chunk=4))
    grads = jax.vmap(jax.grad(mlp_loss), in_axes=(None, 0))(params, batch)
    want = project_tree_factored({"fc1": grads["w1"], "fc2": grads["w2"]}, proj.key(), dim, proj.kind,
                                 proj.block_rows)
    assert sum(a * b for a, b in factored_full_split([(N_IN, HID), (HID, N_OUT)], dim)) == dim
    if dim == 400:
        assert factored_full_split([(N_IN, HID), (HID, N_OUT)], dim)[0][0] == N_IN
    for g in range(4):
        assert _rel(got[g], want[g]) < TOL


def test_last_layer_without_a_divisor_stays_factored_and_pads_with_zeros():
    """At d = 25 the last budget (13, prime) has no divisor in (a0/2, a0]: factored_split would
    project fc2 densely; here fc2 takes (4, 3) and one zero column is appended."""
    params, batch = mlp_params(), mlp_batch(2)
    split = factored_full_split([(N_IN, HID), (HID, N_OUT)], 25)
    assert split == ((3, 4), (4, 3))
    proj = _proj(25)
    got = np.asarray(factored_full_features(tapped_mlp_loss, params, batch, projection=proj))
    assert np.all(got[:, 24] == 0.0)
    for g in range(2):
        grads = jax.grad(mlp_loss)(params, _rows(batch, g))
        want = np.concatenate([_explicit(grads["w1"], jax.random.fold_in(proj.key(), 0), (3, 4), proj.kind, 8),
                               _explicit(grads["w2"], jax.random.fold_in(proj.key(), 1), (4, 3), proj.kind, 8)])
        assert _rel(got[g, :24], want) < TOL


def test_inputs_and_deltas_give_the_kernel_gradients():
    params, batch = mlp_params(), mlp_batch(1)
    example = _rows(batch, 0)
    loss, captured = tapped_inputs_and_deltas(tapped_mlp_loss, params, example)
    assert np.isclose(float(loss), float(mlp_loss(params, example)), rtol=1e-6)
    grads = jax.grad(mlp_loss)(params, example)
    for name, kernel in (("fc1", "w1"), ("fc2", "w2")):
        x, delta = captured[name]
        assert x.shape[0] == delta.shape[0] == int(np.prod(TOKENS))
        assert _rel(x.T @ delta, grads[kernel]) < TOL


def _shapes_in(jaxpr, out=None):
    out = set() if out is None else out
    for eqn in jaxpr.eqns:
        out.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    _shapes_in(sub, out)
    return out


def test_no_per_example_weight_gradient_is_formed():
    """No value in the program (sub-programs included) has a kernel's shape with an example axis,
    while the materialised path's program has."""
    params, batch = mlp_params(), mlp_batch(4)
    proj = _proj(24)
    jaxpr = jax.make_jaxpr(partial(factored_full_features, tapped_mlp_loss, projection=proj, chunk=4))(params, batch)
    kernels = {(N_IN, HID), (HID, N_OUT)}
    shapes = _shapes_in(jaxpr.jaxpr)
    assert not [s for s in shapes if len(s) >= 3 and s[-2:] in kernels]
    materialised = _shapes_in(jax.make_jaxpr(jax.vmap(jax.grad(mlp_loss), in_axes=(None, 0)))(params, batch).jaxpr)
    assert (4, N_IN, HID) in materialised


# ----------------------------------------------------------------------------- (c) Adafactor


def test_adafactor_factors_are_the_rank_one_second_moment():
    rng = np.random.default_rng(2)
    nu = rng.uniform(1e-7, 1e-5, (N_IN, HID)).astype(np.float32)
    eps = 1e-8
    a, b = adafactor_factors({"fc1": nu}, eps=eps)["fc1"]
    v = nu.astype(np.float64) + eps
    rows, cols = v.sum(1), v.sum(0)
    nu_hat = np.outer(rows, cols) / rows.sum()
    np.testing.assert_allclose(np.outer(np.asarray(a), np.asarray(b)), 1.0 / np.sqrt(nu_hat), rtol=1e-5)
    # an exactly rank-1 nu is its own factorisation
    r, c = rng.uniform(1e-4, 1e-2, N_IN), rng.uniform(1e-4, 1e-2, HID)
    a1, b1 = adafactor_factors({"fc1": np.outer(r, c).astype(np.float32)}, eps=0.0)["fc1"]
    np.testing.assert_allclose(np.outer(np.asarray(a1), np.asarray(b1)), 1.0 / np.sqrt(np.outer(r, c)), rtol=1e-5)


def test_adafactor_preconditioned_features_equal_projecting_diag_a_g_diag_b():
    params, batch = mlp_params(), mlp_batch(3)
    rng = np.random.default_rng(3)
    nus = {"fc1": rng.uniform(1e-6, 1e-4, (N_IN, HID)).astype(np.float32),
           "fc2": rng.uniform(1e-6, 1e-4, (HID, N_OUT)).astype(np.float32)}
    factors = adafactor_factors(nus)
    proj = _proj(24)
    got = np.asarray(factored_full_features(tapped_mlp_loss, params, batch, projection=proj, precondition=factors))
    plan = factored_full_plan(tapped_mlp_loss, params, _rows(batch, 0), proj.dim)
    for g in range(3):
        grads = jax.grad(mlp_loss)(params, _rows(batch, g))
        parts = []
        for j, (name, _, dims) in enumerate(plan):
            a, b = (np.asarray(v, np.float64) for v in factors[name])
            pre = a[:, None] * np.asarray(grads["w1" if name == "fc1" else "w2"], np.float64) * b[None, :]
            parts.append(_explicit(pre, jax.random.fold_in(proj.key(), j), dims, proj.kind, proj.block_rows))
        assert _rel(got[g], np.concatenate(parts)) < TOL


# ----------------------------------------------------------------------------- (f) jit and chunks


def test_jit_and_chunking_give_the_unchunked_features():
    params, batch = mlp_params(), mlp_batch(7, seed=5)
    proj = _proj(24)
    factors = adafactor_factors({"fc1": np.full((N_IN, HID), 1e-5, np.float32),
                                 "fc2": np.linspace(1e-6, 1e-4, HID * N_OUT, dtype=np.float32).reshape(HID, N_OUT)})
    whole = np.asarray(factored_full_features(tapped_mlp_loss, params, batch, projection=proj, chunk=7,
                                              precondition=factors))
    fn = jax.jit(lambda p, b, f: factored_full_features(tapped_mlp_loss, p, b, projection=proj, chunk=3,
                                                        precondition=f))
    chunked = np.asarray(fn(params, batch, factors))
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6 * np.abs(whole).max())
    np.testing.assert_array_equal(np.asarray(fn(params, batch, factors)), chunked)  # deterministic
    one = np.asarray(factored_full_features(tapped_mlp_loss, params, _rows_slice(batch, 2, 3), projection=proj,
                                            precondition=factors))
    np.testing.assert_allclose(one[0], whole[2], rtol=1e-5, atol=1e-6 * np.abs(whole).max())


def _rows_slice(batch, start, stop):
    return jax.tree.map(lambda x: x[start:stop], batch)


# ----------------------------------------------------------------------------- (e) errors


def _twice(params, example, tap):
    x = example["x"]
    tap("fc1", x, x @ params["w1"])
    return jnp.sum(tap("fc1", x, x @ params["w1"]))


def _misaligned(params, example, tap):
    x = example["x"]
    return jnp.sum(tap("fc1", x[:-1], x @ params["w1"]))


def _untapped(params, example, tap):
    return jnp.sum(example["x"] @ params["w1"])


def _vector_loss(params, example, tap):
    x = example["x"]
    return tap("fc1", x, x @ params["w1"]).ravel()


def _int_name(params, example, tap):
    x = example["x"]
    return jnp.sum(tap(1, x, x @ params["w1"]))


@pytest.mark.parametrize("fn, match", [
    (_twice, "tapped twice"),
    (_misaligned, "must agree on all axes but the last"),
    (_untapped, "never called tap"),
    (_vector_loss, "real floating scalar"),
    (_int_name, "name must be a string"),
])
def test_broken_tap_contract_is_a_clear_error(fn, match):
    with pytest.raises(ValueError, match=match):
        factored_full_features(fn, mlp_params(), mlp_batch(2), projection=_proj(24))


def test_bad_arguments_are_clear_errors():
    params, batch = mlp_params(), mlp_batch(2)
    with pytest.raises(TypeError, match="ProjectionConfig"):
        factored_full_features(tapped_mlp_loss, params, batch, projection=24)
    with pytest.raises(ValueError, match="mode must be 'factored'"):
        factored_full_features(tapped_mlp_loss, params, batch, projection=ProjectionConfig(dim=24))
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        factored_full_features(tapped_mlp_loss, params, batch, projection=_proj(24), chunk=0)
    with pytest.raises(ValueError, match="number of tapped layers"):
        factored_full_features(tapped_mlp_loss, params, batch, projection=_proj(1))
    with pytest.raises(ValueError, match="disagree on the leading"):
        factored_full_features(tapped_mlp_loss, params, {**batch, "w": batch["w"][:1]}, projection=_proj(24))
    with pytest.raises(ValueError, match="G = 0"):
        factored_full_features(tapped_mlp_loss, params, _rows_slice(batch, 0, 0), projection=_proj(24))
    good = adafactor_factors({"fc1": np.ones((N_IN, HID)), "fc2": np.ones((HID, N_OUT))})
    with pytest.raises(ValueError, match="missing: \\['fc2'\\]"):
        factored_full_features(tapped_mlp_loss, params, batch, projection=_proj(24),
                               precondition={"fc1": good["fc1"]})
    with pytest.raises(ValueError, match="must be \\(6,\\) and \\(10,\\)"):
        factored_full_features(tapped_mlp_loss, params, batch, projection=_proj(24),
                               precondition={**good, "fc1": good["fc1"][::-1]})
    with pytest.raises(ValueError, match="second moment"):
        adafactor_factors({"fc1": np.ones(N_IN)})
    with pytest.raises(ValueError, match="eps must be"):
        adafactor_factors({"fc1": np.ones((N_IN, HID))}, eps=-1.0)
    with pytest.raises(ValueError, match="kernel shape"):
        factored_full_split([(N_IN, HID, 2)], 24)


# ----------------------------------------------------------------------------- (d) CausalLM adapter


@pytest.fixture(scope="module")
def lm(tiny_testbed_and_lora):
    """(pool, rows, a tiny full model (untied head), the tiny LoRA model of the fixture)."""
    _, pool, _, tok, lora_model = tiny_testbed_and_lora("factored_full", 8)
    model = init_model(preset_config("tiny", vocab_size=len(tok)), seed=1)
    rows = [5, 0, 3]
    length = int(pool.lengths[rows].max())
    batch = {k: v for k, v in make_batch(pool, rows, length).items() if k != "index"}
    return pool, batch, model, lora_model


def _projection_paths(model):
    return {".".join(map(str, path)) for path, node in nnx.iter_graph(model) if isinstance(node, Projection)}


def test_every_projection_is_tapped_and_the_forward_is_the_models(lm):
    _, batch, model, lora_model = lm
    for m in (model, lora_model):
        names = projection_names(m)
        assert set(names) == _projection_paths(m) and list(names) == sorted(names)
        graphdef, state = nnx.split(m)
        assert tuple(tapped_layers(tapped_sft_loss(graphdef), state, _rows(batch, 0))) == names
        ids, attn = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
        np.testing.assert_allclose(tapped_logits(m, ids, attn), m(ids, attn), rtol=1e-6, atol=1e-6)
    assert "lm_head" not in projection_names(model, include_lm_head=False)
    graphdef, state = nnx.split(model)
    assert "lm_head" not in tapped_layers(tapped_sft_loss(graphdef, include_lm_head=False), state, _rows(batch, 0))


def test_tied_head_is_not_tapped_and_the_loss_is_unchanged(lm):
    _, batch, model, _ = lm
    tied = init_model(preset_config("tiny", vocab_size=model.config.vocab_size, tie_word_embeddings=True), seed=2)
    assert "lm_head" not in projection_names(tied) and len(projection_names(tied)) == 14
    graphdef, state = nnx.split(tied)
    row = _rows(batch, 1)
    got = tapped_sft_loss(graphdef)(state, row, lambda n, x, y: y)
    assert np.isclose(float(got), float(example_loss(tied, row, "sft")), rtol=1e-6)


def test_adapter_loss_and_deltas_match_example_loss_and_its_kernel_gradients(lm):
    """Full model split as (trainable, frozen): the tapped loss is example_loss's SFT loss and
    X^T Delta of every layer is example_grad_fn's gradient of that kernel."""
    _, batch, model, lora_model = lm
    graphdef, trainable, frozen = split_trainable(model)
    loss_fn = tapped_sft_loss(graphdef)
    grad_fn = jax.jit(example_grad_fn(graphdef, "sft"))
    for g in range(2):
        row = _rows(batch, g)
        loss, captured = jax.jit(partial(tapped_inputs_and_deltas, loss_fn))((trainable, frozen), row)
        assert np.isclose(float(loss), float(example_loss(model, row, "sft")), rtol=1e-6)
        kernels = layer_kernels(grad_fn(trainable, frozen, row), projection_names(model))
        assert set(kernels) == set(captured)
        for name, (x, delta) in captured.items():
            assert _rel(x.T @ delta, kernels[name]) < TOL, name
    # with LoRA attached: the kernels' gradients of the full state, LoRA branch in the forward
    graphdef, state = nnx.split(lora_model)
    row = _rows(batch, 2)
    loss_fn = tapped_sft_loss(graphdef)
    loss, captured = tapped_inputs_and_deltas(loss_fn, state, row)
    assert np.isclose(float(loss), float(example_loss(lora_model, row, "sft")), rtol=1e-6)
    grads = jax.grad(lambda s: loss_fn(s, row, lambda n, x, y: y))(state)
    kernels = layer_kernels(grads, projection_names(lora_model))
    for name, (x, delta) in captured.items():
        assert _rel(x.T @ delta, kernels[name]) < TOL, name


def test_causal_lm_features_equal_kronecker_projection_of_materialised_kernel_gradients(lm):
    """The acceptance check: factored full-parameter features of the tiny model (every Projection,
    Adafactor-preconditioned, chunk 2 over 3 rows, jitted) equal jraise's factored projection of
    the per-example kernel gradients from jax.grad, preconditioned explicitly."""
    _, batch, model, _ = lm
    graphdef, trainable, frozen = split_trainable(model)
    names = projection_names(model)
    shapes = [layer_kernels(trainable, [n])[n].shape for n in names]
    # a d near 512 at which factored_full_split needs no zero columns (then it is factored_split's)
    dim = next(d for d in range(512, 600) if sum(a * b for a, b in factored_full_split(shapes, d)) == d)
    rng = np.random.default_rng(6)
    nu = {n: rng.uniform(1e-7, 1e-5, k.shape).astype(np.float32) for n, k in layer_kernels(trainable, names).items()}
    factors = adafactor_factors(nu)
    proj = _proj(dim, seed=11)
    fn = jax.jit(partial(factored_full_features, tapped_sft_loss(graphdef), projection=proj, chunk=2))
    got = np.asarray(fn((trainable, frozen), batch, precondition=factors))
    assert got.shape == (3, dim)
    grads = jax.jit(jax.vmap(example_grad_fn(graphdef, "sft"), in_axes=(None, None, 0)))(trainable, frozen, batch)
    kernels = layer_kernels(grads, names)
    pre = {n: factors[n][0][None, :, None] * kernels[n] * factors[n][1][None, None, :] for n in names}
    want = np.asarray(project_tree_factored(pre, proj.key(), dim, proj.kind, proj.block_rows))
    for g in range(3):
        assert _rel(got[g], want[g]) < TOL


def test_layer_kernels_errors_name_the_layer():
    with pytest.raises(KeyError, match="layers.0.mlp.up_proj"):
        layer_kernels({"layers": {0: {"mlp": {}}}}, ["layers.0.mlp.up_proj"])
    tree = {"layers": {"0": {"mlp": {"up_proj": {"kernel": np.ones((2, 3))}}}}}
    assert layer_kernels(tree, ["layers.0.mlp.up_proj"])["layers.0.mlp.up_proj"].shape == (2, 3)
