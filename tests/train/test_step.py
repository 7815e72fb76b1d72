"""The pure train step: loss, gradients, accumulation, bfloat16, the lr schedule, Adam moments."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jraise.loglik import example_nll
from jraise.model import init_model, preset_config
from jraise.train import (
    adam_moments,
    lr_schedule,
    make_optimizer,
    make_train_step,
    param_dtypes,
    split_trainable,
)

VOCAB = 48
L = 16


def _batch(rows: int, seed: int = 0) -> dict:
    """Right-padded rows of different lengths and response spans; the last row is padding whose
    masks are deliberately NOT zero, so a step that ignored example_mask would count it."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, VOCAB, (rows, L)).astype(np.int32)
    attention = np.zeros((rows, L), np.int32)
    loss = np.zeros((rows, L), np.float32)
    for r in range(rows):
        n = rng.randint(6, L + 1)
        start = rng.randint(1, n - 1)
        attention[r, :n] = 1
        loss[r, start:n] = 1.0
    example = np.ones(rows, np.float32)
    example[-1] = 0.0
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss, "example_mask": example}


def _accum(batch: dict, a: int) -> dict:
    return {k: v.reshape(a, -1, *v.shape[1:]) for k, v in batch.items()}


def _numpy_loss(logits: np.ndarray, batch: dict) -> float:
    """Mean NLL of response tokens, written with loops in float64."""
    total, count = 0.0, 0.0
    for r in range(logits.shape[0]):
        if batch["example_mask"][r] == 0:
            continue
        for t in range(1, logits.shape[1]):
            if batch["loss_mask"][r, t]:
                row = logits[r, t - 1].astype(np.float64)
                log_z = np.log(np.sum(np.exp(row - row.max()))) + row.max()
                total += log_z - row[batch["input_ids"][r, t]]
                count += 1
    return total / count


@pytest.fixture(scope="module")
def tiny():
    model = init_model(preset_config("tiny", vocab_size=VOCAB), seed=0)
    graphdef, trainable, frozen = split_trainable(model)
    # SGD with lr 1 makes the update equal to minus the gradient, so the step's gradient is visible.
    step = make_train_step(graphdef, optax.sgd(1.0), param_dtypes(model), donate=False)
    return model, graphdef, trainable, frozen, step


def test_step_gradient_equals_direct_grad(tiny):
    _, graphdef, trainable, frozen, step = tiny
    batch = _batch(8, seed=3)  # the accumulation test's batch too: one compiled shape for both

    def plain_loss(params):  # a second formulation: log_softmax + gather
        out = nnx.merge(graphdef, params, frozen)(batch["input_ids"], batch["attention_mask"])
        logp = jnp.take_along_axis(jax.nn.log_softmax(out[:, :-1]), batch["input_ids"][:, 1:, None], -1)[..., 0]
        weights = batch["loss_mask"][:, 1:] * batch["example_mask"][:, None]
        return -jnp.sum(logp * weights) / jnp.sum(weights), out

    (loss, logits), direct = jax.jit(jax.value_and_grad(plain_loss, has_aux=True))(trainable)
    logits = np.asarray(logits)
    expected_loss = _numpy_loss(logits, batch)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
    nll, count = jax.jit(example_nll)(logits, batch["input_ids"], batch["loss_mask"], batch["example_mask"])
    np.testing.assert_allclose(float(nll.sum() / count.sum()), expected_loss, rtol=1e-5)

    new, _, metrics = step(trainable, optax.sgd(1.0).init(trainable), frozen, _accum(batch, 1))
    np.testing.assert_allclose(float(metrics["loss"]), expected_loss, rtol=1e-5)
    assert float(metrics["response_tokens"]) == float(np.sum(batch["loss_mask"][:-1, 1:]))
    step_grad = jax.tree.map(lambda old, upd: np.asarray(old) - np.asarray(upd), trainable, new)
    for g_step, g_direct in zip(jax.tree.leaves(step_grad), jax.tree.leaves(direct)):
        np.testing.assert_allclose(g_step, np.asarray(g_direct), rtol=1e-4, atol=1e-6)
    assert sum(float(np.abs(g).sum()) > 0 for g in jax.tree.leaves(step_grad)) == len(jax.tree.leaves(step_grad))
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.global_norm(direct)), rtol=1e-5)


def test_accumulation_equals_one_big_batch(tiny):
    _, _, trainable, frozen, step = tiny
    batch = _batch(8, seed=3)
    opt = optax.sgd(1.0).init(trainable)
    micro = _accum(batch, 4)
    # Micro-batches with different response-token counts: a mean of per-micro means would differ.
    counts = (micro["loss_mask"][:, :, 1:] * micro["example_mask"][:, :, None]).sum(axis=(1, 2))
    assert len(set(counts.tolist())) > 1
    big, _, m_big = step(trainable, opt, frozen, _accum(batch, 1))
    acc, _, m_acc = step(trainable, opt, frozen, micro)
    np.testing.assert_allclose(float(m_acc["loss"]), float(m_big["loss"]), rtol=1e-6)
    assert float(m_acc["response_tokens"]) == float(m_big["response_tokens"])
    for a, b, old in zip(jax.tree.leaves(acc), jax.tree.leaves(big), jax.tree.leaves(trainable)):
        np.testing.assert_allclose(np.asarray(a) - np.asarray(old), np.asarray(b) - np.asarray(old), atol=1e-6)


def test_bfloat16_model_keeps_float32_master_and_optimizer_state():
    # Shapes and dtypes only (tracing, no compile): the step's numerics are tested above.
    config = preset_config("tiny", vocab_size=VOCAB, dtype="bfloat16", param_dtype="bfloat16")
    model = nnx.eval_shape(lambda: init_model(config, seed=0))
    dtypes = param_dtypes(model)
    assert {str(d) for d in jax.tree.leaves(dtypes)} == {"bfloat16"}
    graphdef, _, frozen = nnx.split(model, nnx.Param, ...)
    trainable = jax.eval_shape(lambda: split_trainable(init_model(config, seed=0))[1])
    assert {x.dtype for x in jax.tree.leaves(trainable)} == {jnp.dtype("float32")}
    tx, _ = make_optimizer(1e-2, total_steps=4, max_grad_norm=1.0)
    opt = jax.eval_shape(tx.init, trainable)
    new, opt, metrics = jax.eval_shape(make_train_step(graphdef, tx, dtypes), trainable, opt, frozen,
                                       _accum(_batch(4), 2))
    assert {x.dtype for x in jax.tree.leaves(new)} == {jnp.dtype("float32")}
    mu, nu = adam_moments(opt)
    assert {x.dtype for x in jax.tree.leaves((mu, nu))} == {jnp.dtype("float32")}
    assert metrics["loss"].dtype == jnp.float32


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_lr_schedule_matches_formula(kind):
    peak, total, warmup = 3e-4, 20, 5

    def formula(s):
        if s < warmup:
            return peak * s / warmup
        frac = min((s - warmup) / (total - warmup), 1.0)
        return {"linear": peak * (1 - frac), "cosine": 0.5 * peak * (1 + math.cos(math.pi * frac)),
                "constant": peak}[kind]

    steps = [0, 1, 2, 4, 5, 6, 11, 19, 20, 25]
    got = np.asarray(jax.jit(lr_schedule(peak, total, warmup, kind))(jnp.asarray(steps)))
    np.testing.assert_allclose(got, [formula(s) for s in steps], rtol=1e-5, atol=1e-12)


def test_optimizer_applies_lr_weight_decay_mask_and_exposes_moments():
    params = {"layer": {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.full((4,), 2.0)}}
    grads = {"layer": {"kernel": jnp.full((3, 4), 0.5), "bias": jnp.full((4,), -0.5)}}
    lr, wd = 1e-2, 0.1
    tx, _ = make_optimizer(lr, total_steps=10, warmup_steps=0, schedule="constant", weight_decay=wd,
                           max_grad_norm=1.0)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    # First Adam step: m/sqrt(v) = sign(g); decoupled decay on matrices only.
    np.testing.assert_allclose(np.asarray(updates["layer"]["kernel"]), -lr * (1.0 + wd * 2.0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(updates["layer"]["bias"]), lr * 1.0, rtol=1e-5)
    mu, nu = adam_moments(state)
    assert jax.tree.structure(mu) == jax.tree.structure(params) == jax.tree.structure(nu)
    assert float(mu["layer"]["bias"][0]) < 0 < float(nu["layer"]["bias"][0])
    raw = [None, [{"count": 1, "mu": mu, "nu": nu}, None]]  # what a target-less Orbax restore gives
    assert adam_moments(raw)[0] is mu
    with pytest.raises(ValueError, match="Adam"):
        adam_moments(optax.sgd(0.1).init(params))
