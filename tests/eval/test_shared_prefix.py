"""Shared-prefix multiple-choice scoring equals scoring every option as a whole sequence.

The reference is the whole-sequence path of `option_log_probs` (``shared_prefix=False``), itself
checked against a plain loop in test_report.py; on token lists built here the reference is
`metrics.scored_sums` on the right-padded whole sequences.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from jraise.eval import metrics, report
from jraise.eval.report import evaluate_multiple_choice, option_log_probs
from jraise.eval.shared_prefix import batch_sums, plan_batches, scatter, shared_prefix_lengths
from jraise.model import init_model, load_tokenizer, preset_config

BATCH = 4
RTOL = 1e-5

# 2, 3 and 5 options; options of very different lengths, sharing leading characters ("a", "ab",
# "abc..."), one option that is a prefix of another, and a multi-message prompt.
QUESTIONS = [
    ([{"role": "user", "content": "Which is a fruit?"}], ["apple", "a big red bus"]),
    ([{"role": "user", "content": "2+2?"}], ["4", "22", "four", "5", "forty four and a bit more than that"]),
    ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "sky colour"}],
     ["blue", "blue and green"]),
    ([{"role": "user", "content": "pick one: x or y"}], ["x", "y", "xy"]),
    ([{"role": "user", "content": "last"}], ["a", "abcdefghijklmnopqrstuvwxyz abcdefghij", "ab"]),
    ([{"role": "user", "content": "a much longer prompt than the others, to land in another bucket " * 2}],
     ["yes", "no", "yes no", "maybe", "n"]),
    ([{"role": "user", "content": "odd one"}], ["same start A", "same start B", "same start"]),
]


@pytest.fixture(scope="module")
def tok(make_testbed):
    paths = make_testbed(n_train=4, n_val_per_category=1, n_test_per_category=1)
    return load_tokenizer(paths["tokenizer"])


def make_model(tok, model_type="llama", **overrides):
    config = preset_config("tiny", vocab_size=len(tok), model_type=model_type, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, **overrides)
    return init_model(config, seed=5)


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok)


def both_paths(model, tok, questions, include_eos, batch_size):
    prompts, choices = [q for q, _ in questions], [c for _, c in questions]
    old = option_log_probs(model, tok, prompts, choices, include_eos, batch_size, shared_prefix=False)
    new = option_log_probs(model, tok, prompts, choices, include_eos, batch_size, shared_prefix=True)
    return old, new


def assert_same(old, new):
    (s0, n0, o0), (s1, n1, o1) = old, new
    np.testing.assert_array_equal(o0, o1)
    np.testing.assert_array_equal(n0, n1)
    assert (n0 > 0).all()
    np.testing.assert_allclose(s1, s0, rtol=RTOL)
    for a, b in zip(o0[:-1], o0[1:]):
        assert np.argmax(s0[a:b]) == np.argmax(s1[a:b])


@pytest.mark.parametrize("include_eos", [True, False])
@pytest.mark.parametrize("batch_size", [BATCH, 16])  # 4 // 5 options: one question a batch; 16: partial batches
def test_matches_whole_sequences(model, tok, include_eos, batch_size):
    assert_same(*both_paths(model, tok, QUESTIONS, include_eos, batch_size))


def test_uniform_option_counts_with_partial_batch(model, tok):
    # Two options each, 5 questions in batches of 2 questions (batch_size 4 // 2): the last is partial.
    questions = [(q, c[:2]) for q, c in QUESTIONS[:5]]
    assert_same(*both_paths(model, tok, questions, True, BATCH))


@pytest.mark.parametrize("model_type, overrides", [("mistral", {"sliding_window": 6}), ("qwen3", {})])
def test_other_families(tok, model_type, overrides):
    # A window shorter than the prompts (slots and positions must agree), and Qwen3's q/k norms; one
    # layer has them all (and compiles in about half the time).
    model = make_model(tok, model_type, num_hidden_layers=1, **overrides)
    assert_same(*both_paths(model, tok, QUESTIONS, True, BATCH))


def test_predictions_of_evaluate_multiple_choice_are_identical(model, tok, monkeypatch):
    records = [{"messages": q, "options": c, "answer": i % len(c)} for i, (q, c) in enumerate(QUESTIONS)]
    options = report.MultipleChoiceOptions(batch_size=BATCH, length_normalise=True)
    new = evaluate_multiple_choice(model, tok, records, options, keep_predictions=True)
    monkeypatch.setattr(report, "option_log_probs", functools.partial(option_log_probs, shared_prefix=False))
    old = evaluate_multiple_choice(model, tok, records, options, keep_predictions=True)
    assert [e["prediction"] for e in new["examples"]] == [e["prediction"] for e in old["examples"]]
    assert [e["n_tokens"] for e in new["examples"]] == [e["n_tokens"] for e in old["examples"]]
    assert new["overall"] == old["overall"]
    for a, b in zip(new["examples"], old["examples"]):
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=RTOL)


# ----------------------------------------------------------------------------------------------
# Token lists built here: boundary merges, and options that differ from the first token


def test_prefix_lengths():
    def seq(tokens, first_scored):
        mask = np.zeros(len(tokens), np.float32)
        mask[first_scored:] = 1
        return np.array(tokens), mask

    sequences = [
        seq([1, 2, 3, 4, 5], 3), seq([1, 2, 3, 6], 3),        # common prefix 3 = first scored
        seq([1, 2, 3, 4, 5], 4), seq([1, 2, 7, 4, 5], 4),     # a merge changed token 2: prefix 2
        seq([1, 2, 3], 2), seq([1, 2, 3, 4], 3),              # the earliest scored token bounds it
        seq([1, 2], 1), seq([1, 2], 1),                       # identical options
        seq([8, 2, 3], 2), seq([9, 2, 3], 2),                 # nothing in common
    ]
    assert shared_prefix_lengths(sequences, [0, 2, 4, 6, 8, 10]).tolist() == [3, 2, 2, 1, 0]


def test_random_token_lists_match_scored_sums(model):
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    sequences, offsets = [], [0]
    for q in range(9):
        prompt = rng.integers(1, vocab, rng.integers(1, 40)).tolist()
        for _ in range(int(rng.integers(2, 6))):
            cut = int(rng.integers(0, len(prompt) + 1))  # options may rewrite the prompt's tail (a merge)
            head = prompt[:cut] + rng.integers(1, vocab, len(prompt) - cut).tolist() if q % 3 else prompt
            option = rng.integers(1, vocab, rng.integers(1, 30)).tolist()
            tail = rng.integers(1, vocab, rng.integers(0, 3)).tolist()  # unscored tokens after the option
            tokens = np.array(head + option + tail, np.int32)
            mask = np.zeros(len(tokens), np.float32)
            mask[len(head) : len(head) + len(option)] = 1
            mask[0] = 0
            if not mask.any():
                mask[-1] = 1
            sequences.append((tokens, mask))
        offsets.append(len(sequences))
    graphdef, state = metrics.split_for_eval(model)
    want_s, want_n = np.zeros(len(sequences)), np.zeros(len(sequences))
    length = max(len(t) for t, _ in sequences)
    for chunk in np.array_split(np.arange(len(sequences)), 4):
        ids, attention, score = report._right_padded([sequences[i] for i in chunk], len(chunk), length, 0)
        s, n = metrics.scored_sums(graphdef, state, ids, attention, score)
        want_s[chunk], want_n[chunk] = np.asarray(s), np.asarray(n)
    got_s, got_n = np.zeros(len(sequences)), np.zeros(len(sequences))
    for batch in plan_batches(sequences, offsets, 0, 8, 3, 16):
        scatter(batch, *batch_sums(graphdef, state, batch), got_s, got_n)
    np.testing.assert_array_equal(got_n, want_n)
    np.testing.assert_allclose(got_s, want_s, rtol=RTOL)
