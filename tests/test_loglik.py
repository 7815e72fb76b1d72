"""jraise.loglik: token NLL, the two row reductions, dropout off and the pool scatter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jraise.loglik import (
    eval_view,
    example_nll,
    masked_log_prob_sums,
    next_token_log_probs,
    per_example_sums,
    response_nll,
    scored_log_prob_sums,
    token_log_probs,
    token_nll,
)
from jraise.model import init_model, preset_config
from jraise.model.lora import LoRAConfig, add_lora

VOCAB = 48


def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_token_nll_is_log_softmax():
    rng = np.random.RandomState(0)
    logits = (rng.randn(3, 5, VOCAB) * 3).astype(np.float32)
    targets = rng.randint(0, VOCAB, (3, 5))
    expected = -np.take_along_axis(log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(jax.jit(token_nll)(logits, targets)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_two_token_forms_agree(dtype):
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(4, 33, 300)) * 3, dtype)
    targets = jnp.asarray(rng.integers(0, 300, size=(4, 33)), jnp.int32)
    np.testing.assert_allclose(np.asarray(jax.jit(token_log_probs)(logits, targets)),
                               -np.asarray(jax.jit(token_nll)(logits, targets)), rtol=1e-6, atol=1e-6)


def test_next_token_log_probs_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
    ids = rng.integers(0, 7, size=(2, 5))
    got = np.asarray(next_token_log_probs(logits, ids))
    expected = np.zeros((2, 5))
    for b in range(2):
        for t in range(1, 5):
            expected[b, t] = log_softmax(logits[b, t - 1])[ids[b, t]]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_the_two_row_reductions_agree_and_skip_token_zero_and_padding_rows():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(3, 9, 11)) * 3, jnp.float32)
    ids = jnp.asarray(rng.integers(0, 11, size=(3, 9)), jnp.int32)
    loss_mask = jnp.ones((3, 9), jnp.float32)  # position 0 marked too: it must not count
    example_mask = jnp.asarray([1.0, 0.0, 1.0])
    nll, tokens = example_nll(logits, ids, loss_mask, example_mask)
    sums, counts = masked_log_prob_sums(logits, ids, loss_mask * example_mask[:, None])
    np.testing.assert_array_equal(np.asarray(tokens), [8.0, 0.0, 8.0])
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(tokens))
    np.testing.assert_allclose(np.asarray(nll), -np.asarray(sums), rtol=1e-6)
    assert float(nll[1]) == 0.0
    want = -sum(log_softmax(np.asarray(logits[0, t - 1]))[int(ids[0, t])] for t in range(1, 9))
    np.testing.assert_allclose(float(nll[0]), want, rtol=1e-5)


@pytest.fixture(scope="module")
def dropout_model():
    model = add_lora(init_model(preset_config("tiny", vocab_size=VOCAB), seed=4), LoRAConfig(rank=2, dropout=0.5))
    for _, node in nnx.iter_graph(model):  # non-zero B, so dropout would change the output
        if hasattr(node, "lora_b") and node.lora_b is not None:
            node.lora_b.value = node.lora_b[...] + 0.5
    return model


def _batch():
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(0, VOCAB, size=(2, 10)), jnp.int32)
    attention = jnp.ones((2, 10), jnp.int32).at[1, 7:].set(0)
    loss = jnp.zeros((2, 10), jnp.float32).at[:, 4:].set(1.0)
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss, "example_mask": jnp.ones(2)}


def test_runners_switch_dropout_off_and_leave_the_model_alone(dropout_model):
    batch = _batch()
    first = np.asarray(response_nll(dropout_model, batch)[0])
    np.testing.assert_array_equal(first, np.asarray(response_nll(dropout_model, batch)[0]))
    plain = eval_view(dropout_model)(batch["input_ids"], batch["attention_mask"])
    np.testing.assert_array_equal(
        first, np.asarray(example_nll(plain, batch["input_ids"], batch["loss_mask"], batch["example_mask"])[0]))
    flags = [n.deterministic for _, n in nnx.iter_graph(dropout_model) if isinstance(n, nnx.Dropout)]
    assert flags and not any(flags)
    # A scored token outside the attention mask (row 1, positions 7..9) never counts.
    sums, counts = scored_log_prob_sums(dropout_model, batch["input_ids"], batch["attention_mask"],
                                        batch["loss_mask"])
    np.testing.assert_array_equal(np.asarray(counts), [6.0, 3.0])
    np.testing.assert_allclose(np.asarray(sums)[0], -first[0], rtol=1e-5)


def test_eval_view_of_a_model_without_dropout_is_the_model():
    model = init_model(preset_config("tiny", vocab_size=VOCAB), seed=0)
    assert eval_view(model) is model


def test_per_example_sums_writes_rows_to_pool_order_and_drops_padding_rows():
    batches = [{"index": np.array([2, -1])}, {"index": np.array([0, 3])}]
    scores = {2: (1.5, 2.0), 0: (0.5, 1.0), 3: (3.0, 4.0), -1: (99.0, 99.0)}

    def score(batch):
        rows = [scores[int(i)] for i in batch["index"]]
        return np.array([r[0] for r in rows], np.float32), np.array([r[1] for r in rows], np.float32)

    sums, counts = per_example_sums(batches, score, 5)
    assert sums.dtype == counts.dtype == np.float64
    np.testing.assert_array_equal(sums, [0.5, 0.0, 1.5, 3.0, 0.0])
    np.testing.assert_array_equal(counts, [1.0, 0.0, 2.0, 4.0, 0.0])



def _jraise_modules_loaded_by(module: str) -> set[str]:
    import subprocess
    import sys

    code = ("import sys, importlib; importlib.import_module(sys.argv[1]); "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('jraise'))))")
    out = subprocess.run([sys.executable, "-c", code, module], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_loglik_imports_no_other_part_of_jraise():
    assert _jraise_modules_loaded_by("jraise.loglik") == {"jraise", "jraise.loglik"}
