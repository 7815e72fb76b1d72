"""Per-example gradients: the vmapped, chunked program equals a loop of single-example jax.grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jraise.grads.per_example import (
    adam_precondition,
    example_grad_fn,
    make_per_example_fn,
    make_sequence_logprob_fn,
)
from jraise.loglik import example_nll
from jraise.model import init_model, preset_config
from jraise.model.lora import LoRAConfig, add_lora
from jraise.train.step import split_trainable

VOCAB, L = 40, 12


def _model(lora: bool, dropout: float = 0.0):
    model = init_model(preset_config("tiny", vocab_size=VOCAB), seed=0)
    if lora:
        add_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=dropout))
        # B starts at zero (so A's gradient would be zero): give the adapters real values.
        key = jax.random.key(7)
        for path, node in nnx.iter_graph(model):
            if isinstance(node, nnx.LoRAParam):
                key, sub = jax.random.split(key)
                node.value = 0.1 * jax.random.normal(sub, node.value.shape)
    return model


def _rows(n: int, seed: int, prefix: str = "") -> dict:
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, VOCAB, (n, L)).astype(np.int32)
    attention = np.zeros((n, L), np.int32)
    loss = np.zeros((n, L), np.float32)
    for r in range(n):
        length = rng.randint(5, L + 1)
        start = rng.randint(1, length - 1)
        attention[r, :length] = 1
        loss[r, start:length] = 1.0
    return {f"{prefix}input_ids": ids, f"{prefix}attention_mask": attention, f"{prefix}loss_mask": loss}


def _loop(graphdef, trainable, frozen, batch, loss, n):
    grad = example_grad_fn(graphdef, loss)
    return [grad(trainable, frozen, {k: v[i] for k, v in batch.items()}) for i in range(n)]


def _row(tree, i: int):
    return jax.tree.map(lambda x: x[i], tree)


def _rel_err(a, b) -> float:
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("loss", ["sft", "logprob"])
def test_vmapped_chunks_equal_a_loop_of_single_grads(lora, loss):
    n = 7  # not a multiple of the chunk
    model = _model(lora)
    graphdef, trainable, frozen = split_trainable(model)
    batch = {**_rows(n, 0), "example_mask": np.ones(n, np.float32)}
    got = make_per_example_fn(graphdef, loss, chunk=3)(trainable, frozen, batch)
    want = _loop(graphdef, trainable, frozen, batch, loss, n)
    for i in range(n):
        assert _rel_err(_row(got, i), want[i]) < 1e-5
    # And each single grad is the gradient of the batch step's own per-row loss.
    row = {k: v[:1] for k, v in batch.items()}

    def row_loss(t):
        m = nnx.merge(graphdef, t, frozen, copy=True)
        nll, tok = example_nll(m(row["input_ids"], row["attention_mask"]), row["input_ids"], row["loss_mask"],
                               row["example_mask"])
        return nll[0] / tok[0] if loss == "sft" else -nll[0]

    assert _rel_err(want[0], jax.grad(row_loss)(trainable)) < 1e-5


def test_only_trainable_subset_under_lora_and_padding_rows_are_zero():
    model = _model(lora=True)
    graphdef, trainable, frozen = split_trainable(model)
    batch = {**_rows(4, 1), "example_mask": np.array([1, 1, 0, 1], np.float32)}
    got = make_per_example_fn(graphdef, "sft", chunk=2)(trainable, frozen, batch)
    assert jax.tree.structure(got) == jax.tree.structure(trainable)
    assert all("lora" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(got))
    norms = [float(sum(jnp.sum(x[i] ** 2) for x in jax.tree.leaves(got))) for i in range(4)]
    assert norms[2] == 0.0 and min(norms[0], norms[1], norms[3]) > 0


def test_dropout_is_off_so_features_are_deterministic():
    model = _model(lora=True, dropout=0.5)
    graphdef, trainable, frozen = split_trainable(model)
    batch = {**_rows(3, 2), "example_mask": np.ones(3, np.float32)}
    fn = make_per_example_fn(graphdef, "sft", chunk=3)
    a, b = fn(trainable, frozen, batch), fn(trainable, frozen, batch)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _pairs(n: int) -> dict:
    return {**_rows(n, 3, "chosen_"), **_rows(n, 4, "rejected_"), "example_mask": np.ones(n, np.float32)}


def test_dpo_gradient_matches_its_closed_form_and_the_reference_free_margin():
    model = _model(lora=True)
    graphdef, trainable, frozen = split_trainable(model)
    n, beta = 5, 0.1
    pairs = _pairs(n)
    logprob = make_sequence_logprob_fn(graphdef)
    # A reference that differs from the policy: the same model without its adapters' values.
    ref_trainable = jax.tree.map(jnp.zeros_like, trainable)
    side = lambda t, s: logprob(t, frozen, pairs[f"{s}_input_ids"], pairs[f"{s}_attention_mask"],
                                pairs[f"{s}_loss_mask"], pairs["example_mask"])
    pairs["ref_chosen"], pairs["ref_rejected"] = side(ref_trainable, "chosen"), side(ref_trainable, "rejected")
    dpo = make_per_example_fn(graphdef, "dpo", chunk=2, beta=beta)(trainable, frozen, pairs)
    margin = make_per_example_fn(graphdef, "margin", chunk=2)(trainable, frozen, pairs)
    z = beta * ((side(trainable, "chosen") - pairs["ref_chosen"]) - (side(trainable, "rejected") - pairs["ref_rejected"]))
    scale = beta * jax.nn.sigmoid(-z)  # grad DPO = beta * sigmoid(-z) * grad(margin)
    for i in range(n):
        want = jax.tree.map(lambda m, s=scale[i]: s * m, _row(margin, i))
        assert _rel_err(_row(dpo, i), want) < 1e-5
        flat_d = np.concatenate([np.ravel(x[i]) for x in jax.tree.leaves(dpo)])
        flat_m = np.concatenate([np.ravel(x[i]) for x in jax.tree.leaves(margin)])
        cos = flat_d @ flat_m / (np.linalg.norm(flat_d) * np.linalg.norm(flat_m))
        assert cos > 0.999


def test_transform_runs_per_example_with_unbatched_extra():
    model = _model(lora=True)
    graphdef, trainable, frozen = split_trainable(model)
    batch = {**_rows(5, 5), "example_mask": np.ones(5, np.float32)}
    mu = jax.tree.map(lambda x: jnp.full_like(x, 0.01), trainable)
    nu = jax.tree.map(lambda x: jnp.full_like(x, 1e-4), trainable)

    def transform(grad, moments):
        return adam_precondition(grad, *moments)

    got = make_per_example_fn(graphdef, "sft", chunk=2, transform=transform)(trainable, frozen, batch, (mu, nu))
    raw = make_per_example_fn(graphdef, "sft", chunk=5)(trainable, frozen, batch)
    for i in range(5):
        g = _row(raw, i)
        want = jax.tree.map(lambda g_, m, v: (0.9 * m + 0.1 * g_) / np.sqrt(0.999 * v + 0.001 * g_**2 + 1e-8), g, mu, nu)
        assert _rel_err(_row(got, i), want) < 1e-5
    # The example axis last inside each chunk (the sjlt features' layout): the same numbers, and
    # an on_chunk sees the whole chunk's transformed tree with the moments unbatched.
    last = make_per_example_fn(graphdef, "sft", chunk=2, transform=transform, rows_last=True)
    got_last = last(trainable, frozen, batch, (mu, nu))
    for i in range(5):
        assert _rel_err(_row(got_last, i), _row(got, i)) < 1e-6
    sums = make_per_example_fn(graphdef, "sft", chunk=2, transform=transform, rows_last=True,
                               on_chunk=lambda tree, extra: sum(x.reshape(-1, x.shape[-1]).sum(0)
                                                                for x in jax.tree.leaves(tree)))
    want_sums = [sum(float(np.sum(x)) for x in jax.tree.leaves(_row(got, i))) for i in range(5)]
    np.testing.assert_allclose(np.asarray(sums(trainable, frozen, batch, (mu, nu))), want_sums, rtol=1e-4)


def test_unknown_loss_and_bad_chunk():
    model = _model(lora=False)
    graphdef, _, _ = split_trainable(model)
    with pytest.raises(ValueError, match="unknown per-example loss"):
        make_per_example_fn(graphdef, "kl")
    with pytest.raises(ValueError, match="chunk"):
        make_per_example_fn(graphdef, "sft", chunk=0)
