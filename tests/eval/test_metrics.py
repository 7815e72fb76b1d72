"""Scoring pieces: token log-probs, response NLL with padding rows, summaries, option choice, answers."""

from __future__ import annotations

import json
import string

import numpy as np
import pytest
from flax import nnx

from jraise.data.batching import make_batch
from jraise.data.pool import load_pool
from jraise.eval.metrics import (
    NO_CATEGORY,
    accuracy_summary,
    choose_options,
    loss_summary,
    option_scores,
    response_token_nll,
    sequence_log_probs,
)
from jraise.eval.normalise import answers_match, gsm8k_answer
from jraise.model import build_char_tokenizer, init_model, preset_config
from jraise.model.lora import LoRAConfig, add_lora


def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_char_tokenizer(tmp_path_factory.mktemp("tok"), [string.printable])


@pytest.fixture(scope="module")
def model(tok):
    config = preset_config("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return init_model(config, seed=3)


@pytest.fixture(scope="module")
def pool(tok, tmp_path_factory):
    records = [{"prompt": f"say {i}" + "z" * i, "response": "ab" * (i + 1), "category": "c"} for i in range(3)]
    path = tmp_path_factory.mktemp("pool") / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_pool(path, tok, max_len=96)


_forward = nnx.jit(lambda model, ids: model(ids))


def causal_log_probs(model, tokens, length=128):
    """log_softmax of the logits of one example, [len(tokens), V], with no padding mask at all.

    The example is followed by filler tokens the model attends to normally; causality alone
    keeps them from affecting the first len(tokens) positions. One fixed shape: one compile.
    """
    ids = np.full((1, length), 1, np.int32)
    ids[0, : len(tokens)] = tokens
    return log_softmax(np.asarray(_forward(model, ids))[0, : len(tokens)])


def direct_nll(model, tokens, mask):
    """Sum and count of response-token NLL of one example, from the model's logits."""
    logp = causal_log_probs(model, tokens)
    nll = [-logp[t - 1, tokens[t]] for t in range(1, len(tokens)) if mask[t]]
    return sum(nll), len(nll)


def test_response_nll_ignores_padding_rows_and_matches_direct(model, pool):
    batch = make_batch(pool, [0, -1, 2, 1, -1], bucket_len=96)
    # Make the padding rows look like data: only example_mask may keep them out.
    for row in (1, 4):
        batch["input_ids"][row] = batch["input_ids"][0]
        batch["attention_mask"][row] = 1
        batch["loss_mask"][row] = 1.0
    sums, counts = map(np.asarray, response_token_nll(model, batch))
    assert sums[[1, 4]].tolist() == [0.0, 0.0] and counts[[1, 4]].tolist() == [0.0, 0.0]
    for row, i in ((0, 0), (2, 2), (3, 1)):
        want_sum, want_n = direct_nll(model, pool.tokens[i], pool.loss_masks[i])
        assert counts[row] == want_n == pool.loss_masks[i].sum()
        np.testing.assert_allclose(sums[row], want_sum, rtol=1e-4)


def test_first_token_never_scored_and_left_padding_is_harmless(model):
    ids = np.array([[5, 6, 7, 8]])
    s_all, n_all = sequence_log_probs(model, ids, np.ones_like(ids), np.ones((1, 4)))
    assert float(n_all[0]) == 3  # position 0 has nothing predicting it
    padded = np.array([[0, 0, 5, 6, 7, 8]])
    mask = np.array([[0, 0, 1, 1, 1, 1]])
    s_pad, n_pad = sequence_log_probs(model, padded, mask, np.array([[0, 0, 0, 1, 1, 1]]))
    assert float(n_pad[0]) == 3
    np.testing.assert_allclose(float(s_pad[0]), float(s_all[0]), rtol=1e-4)


def test_dropout_is_off_and_callers_model_untouched(tok, pool):
    config = preset_config("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    model = add_lora(init_model(config, seed=4), LoRAConfig(rank=2, dropout=0.5))
    for _, node in nnx.iter_graph(model):  # non-zero B, so dropout would change the output
        if hasattr(node, "lora_b") and node.lora_b is not None:
            node.lora_b.value = node.lora_b[...] + 0.5
    batch = make_batch(pool, [0, 1], bucket_len=96)
    first = np.asarray(response_token_nll(model, batch)[0])
    second = np.asarray(response_token_nll(model, batch)[0])
    np.testing.assert_array_equal(first, second)
    flags = [n.deterministic for _, n in nnx.iter_graph(model) if isinstance(n, nnx.Dropout)]
    assert flags and not any(flags)


def test_loss_summary_averaging_and_counts():
    summary = loss_summary([2.0, 2.0, 3.0, 0.0], [1, 4, 3, 0], ["a", "a", None, "a"])
    a = summary["per_category"]["a"]
    assert a["n_examples"] == 2 and a["n_tokens"] == 5  # the token-less example is not averaged
    assert a["per_example"] == pytest.approx((2.0 + 0.5) / 2)
    assert a["per_token"] == pytest.approx(4.0 / 5)
    assert summary["per_category"][NO_CATEGORY]["per_example"] == pytest.approx(1.0)
    overall = summary["overall"]
    assert overall["per_example"] == pytest.approx((2.0 + 0.5 + 1.0) / 3)
    assert overall["per_token"] == pytest.approx(7.0 / 8)
    assert loss_summary([float("nan")], [2], ["a"])["overall"]["per_token"] is None  # strict JSON


def test_accuracy_summary():
    s = accuracy_summary([True, False, True, True], ["x", "x", "y", None])
    assert s["overall"] == {"n": 4, "n_correct": 3, "accuracy": 0.75}
    assert s["per_category"]["x"]["accuracy"] == 0.5 and s["per_category"][NO_CATEGORY]["n"] == 1


def test_option_choice_normalisation_and_ties():
    sums, counts = [-2.0, -3.0, -9.0, -4.0, -4.0], [1, 3, 9, 2, 2]
    offsets = [0, 3, 5]
    assert choose_options(option_scores(sums, counts, False), offsets).tolist() == [0, 0]
    assert choose_options(option_scores(sums, counts, True), offsets).tolist() == [1, 0]  # -1 > -2; tie -> first
    with pytest.raises(ValueError):
        choose_options([1.0, 2.0], [0, 1])
    with pytest.raises(ValueError):
        option_scores([1.0], [0], True)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 48 clips... so 48+24 = 72 clips.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("the answer is $1,234.50.", "1234.5"),
        ("It is 72.00", "72"),
        ("first 3 then -5", "-5"),
        ("step 12 #### +7", "7"),
        ("no number here", None),
    ],
)
def test_gsm8k_answer(text, expected):
    assert gsm8k_answer(text) == expected


def test_answers_match_normalisers():
    assert answers_match("  OLLEH \n", "olleh", "reverse")  # case folded for a case-blind task
    assert not answers_match("olleh", "OLLEH", "upper")  # capitals are the point of `upper`
    assert not answers_match("Olleh", "olleh", None)  # unknown category: strict
    assert answers_match("So she has 1,234 left.", "work\n#### 1234", normaliser="gsm8k")
    assert not answers_match("no idea", "nothing", normaliser="gsm8k")  # two answer-less texts never agree
    assert not answers_match("a b", "a  b", normaliser="exact")
    with pytest.raises(ValueError, match="unknown answer normaliser"):
        answers_match("1", "1", normaliser="nope")
