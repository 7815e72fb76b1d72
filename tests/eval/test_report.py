"""Evaluations end to end, each checked against an independent plain-loop computation.

The references never go through jraise.eval or the data loader: prompts are formatted with the
chat template directly, token ids come from the tokenizer, log-probs from the model's logits on
one unpadded example at a time (filler after the example, which causality makes irrelevant, so a
single shape is compiled), and generations from `generate` on one prompt at a time.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from flax import nnx

from jraise.data.pool import load_pool
from jraise.testbed import CATEGORIES
from jraise.eval import evaluate, write_json_atomic
from jraise.eval.metrics import NO_CATEGORY
from jraise.model import init_model, load_tokenizer, preset_config
from jraise.model.generate import generate

BATCH = 4  # one batch size everywhere: compiled shapes are shared between tests
NEW_TOKENS = 8
REF_LEN = 160  # fixed length of the reference forward pass


@pytest.fixture(scope="module")
def testbed(make_testbed):
    return make_testbed(n_train=14, n_val_per_category=1, n_test_per_category=2)


@pytest.fixture(scope="module")
def tok(testbed):
    return load_tokenizer(testbed["tokenizer"])


@pytest.fixture(scope="module")
def model(tok):
    config = preset_config("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return init_model(config, seed=5)  # seed 5: replies that differ between prompts (see eos_model)


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


_forward = nnx.jit(lambda model, ids: model(ids))


def causal_log_probs(model, tokens):
    ids = np.full((1, REF_LEN), 5, np.int32)
    ids[0, : len(tokens)] = tokens
    return log_softmax(np.asarray(_forward(model, ids))[0, : len(tokens)])


def user_messages(record):
    """The prompt messages, spelled out here rather than taken from jraise."""
    if "messages" in record:
        return [m for m in record["messages"] if m["role"] != "assistant"]
    if "instruction" in record:
        text = record["instruction"] + ("\n\n" + record["input"] if record.get("input") else "")
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": record.get("prompt") or record["question"]}]


def prompt_ids(tok, record):
    text = tok.apply_chat_template(user_messages(record), tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def reply_score(model, tok, record, reply, with_eos=True):
    """(sum of log-probs of the reply's tokens [+ EOS] after the formatted prompt, how many)."""
    context = prompt_ids(tok, record)
    answer = tok(reply, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if with_eos else [])
    full = context + answer
    rendered = tok.apply_chat_template(user_messages(record) + [{"role": "assistant", "content": reply}], tokenize=False)
    assert tok(rendered, add_special_tokens=False)["input_ids"][: len(full)] == full  # the template's own text
    logp = causal_log_probs(model, full)
    return sum(logp[t - 1, full[t]] for t in range(len(context), len(full))), len(answer)


# ----------------------------------------------------------------------------------------------
# Loss

LOSS_RECORDS = [
    {"instruction": "reverse abc", "output": "cba", "category": "reverse"},
    {"instruction": "add", "input": "2 and 3", "output": "5", "category": "add"},
    {"prompt": "hello there", "response": "general kenobi", "category": "chat"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey you"}], "category": "chat"},
    {"prompt": "no category", "response": "yes"},
    {"instruction": "reverse xyzw", "output": "wzyx", "category": "reverse"},
    {"prompt": "p", "response": "a much longer response than the others", "category": "add"},
]


def reply_of(record):
    return record.get("output") or record.get("response") or record["messages"][-1]["content"]


def test_loss_per_category_matches_numpy(model, tok, tmp_path):
    per = [reply_score(model, tok, r, reply_of(r)) for r in LOSS_RECORDS]  # EOS is trained, so scored
    nll, counts = np.array([-s for s, _ in per]), np.array([n for _, n in per], float)
    cats = [r.get("category", NO_CATEGORY) for r in LOSS_RECORDS]
    res = evaluate(model, tok, LOSS_RECORDS, kinds=("loss",), batch_size=BATCH, keep_predictions=True)["loss"]
    for cat in set(cats):
        rows = [i for i, c in enumerate(cats) if c == cat]
        got = res["per_category"][cat]
        assert got["n_examples"] == len(rows) and got["n_tokens"] == counts[rows].sum()
        assert got["per_example"] == pytest.approx(np.mean(nll[rows] / counts[rows]), rel=1e-4)
        assert got["per_token"] == pytest.approx(nll[rows].sum() / counts[rows].sum(), rel=1e-4)
    # 7 examples in batches of 4: the padding row of the last batch adds neither examples nor tokens.
    assert res["overall"]["n_examples"] == 7 and res["overall"]["n_tokens"] == counts.sum()
    assert res["overall"]["per_example"] == pytest.approx(np.mean(nll / counts), rel=1e-4)
    assert res["overall"]["per_token"] == pytest.approx(nll.sum() / counts.sum(), rel=1e-4)
    assert [e["index"] for e in res["examples"]] == list(range(7))
    np.testing.assert_allclose([e["sum_nll"] for e in res["examples"]], nll, rtol=1e-4)

    # A pool and a file give the same numbers as the record list.
    path = write_jsonl(tmp_path / "loss.jsonl", LOSS_RECORDS)
    from_pool = evaluate(model, tok, load_pool(path, tok, max_len=256), kinds=("loss",), batch_size=BATCH)["loss"]
    from_file = evaluate(model, tok, path, kinds=("loss",), batch_size=BATCH)["loss"]
    del res["examples"]
    assert from_pool == from_file == res  # same tokens, same batches: identical numbers


# ----------------------------------------------------------------------------------------------
# Multiple choice

MC_RECORDS = [
    {"prompt": "Which is a fruit?", "options": ["apple", "car", "a big red bus"], "answer": 0, "category": "q"},
    {"question": "2+2?", "options": ["4", "22", "four", "5"], "answer": "four", "category": "math"},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sky colour"}],
     "options": ["blue", "green and yellow"], "answer": 1, "category": "q"},
    {"instruction": "pick one", "input": "x or y", "options": ["x", "y", "xy"], "answer": "xy"},
    {"prompt": "last one", "options": ["a", "abcdefghijklmnop", "ab"], "answer": 2, "category": "math"},
]


def answer_index(record):
    a = record["answer"]
    return a if isinstance(a, int) else record["options"].index(a)


def loop_choices(model, tok, length_normalise, with_eos):
    scores = []
    for record in MC_RECORDS:
        per = [reply_score(model, tok, record, opt, with_eos) for opt in record["options"]]
        scores.append([s / n if length_normalise else s for s, n in per])
    return scores, [int(np.argmax(s)) for s in scores]


def test_length_normalisation_changes_some_choice(model, tok):
    # Otherwise the parametrised test below could not tell the two modes apart.
    assert loop_choices(model, tok, False, True)[1] != loop_choices(model, tok, True, True)[1]


@pytest.mark.parametrize("length_normalise, include_eos", [(False, True), (True, True), (False, False)])
def test_multiple_choice_matches_plain_loop(model, tok, length_normalise, include_eos):
    scores, chosen = loop_choices(model, tok, length_normalise, include_eos)
    correct = [c == answer_index(r) for c, r in zip(chosen, MC_RECORDS)]
    res = evaluate(model, tok, MC_RECORDS, kinds=("multiple_choice",), batch_size=BATCH, keep_predictions=True,
                   length_normalise=length_normalise, include_eos=include_eos)["multiple_choice"]
    assert [e["prediction"] for e in res["examples"]] == chosen
    for example, want in zip(res["examples"], scores):
        np.testing.assert_allclose(example["scores"], want, rtol=1e-4)
    assert res["overall"]["accuracy"] == pytest.approx(np.mean(correct))
    assert res["overall"]["n"] == len(MC_RECORDS)
    for cat in ("q", "math", NO_CATEGORY):
        rows = [i for i, r in enumerate(MC_RECORDS) if r.get("category", NO_CATEGORY) == cat]
        assert res["per_category"][cat]["n_correct"] == sum(correct[i] for i in rows)


def test_multiple_choice_answer_can_be_made_right_or_wrong(model, tok):
    _, chosen = loop_choices(model, tok, False, True)
    right = [dict(r, answer=c) for r, c in zip(MC_RECORDS, chosen)]
    wrong = [dict(r, answer=(c + 1) % len(r["options"])) for r, c in zip(MC_RECORDS, chosen)]
    assert evaluate(model, tok, right, kinds=("multiple_choice",), batch_size=BATCH)["multiple_choice"]["overall"]["accuracy"] == 1.0
    assert evaluate(model, tok, wrong, kinds=("multiple_choice",), batch_size=BATCH)["multiple_choice"]["overall"]["accuracy"] == 0.0


# ----------------------------------------------------------------------------------------------
# Exact match


def greedy_tokens(model, tok, record, eos):
    ids = prompt_ids(tok, record)
    out = generate(model, np.array([ids]), np.ones((1, len(ids))), NEW_TOKENS, eos_token_ids=eos,
                   pad_token_id=tok.pad_token_id)
    return np.asarray(out.tokens)[0, : int(out.lengths[0])].tolist()


# Equal prompt lengths: the one-prompt-at-a-time loop compiles once. Six prompts in batches of 4:
# the last batch has padding rows. Case-blind categories, as the testbed normaliser folds case.
EM_RECORDS = [{"instruction": f"Reverse {w}", "output": "?", "category": c}
              for w, c in zip(["apple", "mango", "zebra", "quilt", "vivid", "oxbow"], ["reverse", "sort"] * 3)]


@pytest.fixture(scope="module")
def eos_model(model, tok):
    """The model, except that it says EOS where it would say one ordinary token that some (not
    all) of its EM_RECORDS replies contain: EOS's output column becomes a copy of that token's,
    and argmax ties go to the lower id, EOS's. So some replies stop early, and decoding must
    drop the EOS. Same shapes as `model`: nothing new to compile."""
    free = [greedy_tokens(model, tok, r, eos=())[1:] for r in EM_RECORDS]
    counts = Counter(t for row in free for t in set(row))
    token = min(t for t, n in counts.items() if n < len(free) and t not in tok.all_special_ids)
    assert tok.eos_token_id < token
    clone = nnx.clone(model)
    kernel = clone.lm_head.kernel
    kernel.value = kernel[...].at[:, tok.eos_token_id].set(kernel[...][:, token])
    return clone


def test_exact_match_of_own_greedy_outputs(eos_model, tok):
    model, records = eos_model, EM_RECORDS
    tokens = [greedy_tokens(model, tok, r, eos=(tok.eos_token_id,)) for r in records]
    assert any(t[-1] == tok.eos_token_id for t in tokens) and any(len(t) == NEW_TOKENS for t in tokens)
    own = [tok.decode(t, skip_special_tokens=True) for t in tokens]
    assert len(set(own)) > 1  # distinct outputs, so a mixed-up row order would be caught
    same = [dict(r, output=o) for r, o in zip(records, own)]
    res = evaluate(model, tok, same, kinds=("exact_match",), max_new_tokens=NEW_TOKENS, batch_size=BATCH,
                   keep_predictions=True)["exact_match"]
    assert res["overall"] == {"n": len(records), "n_correct": len(records), "accuracy": 1.0}
    assert [e["prediction"] for e in res["examples"]] == own
    altered = [dict(r, output=o + "Q") for r, o in zip(records, own)]
    res = evaluate(model, tok, altered, kinds=("exact_match",), max_new_tokens=NEW_TOKENS, batch_size=BATCH)
    assert res["exact_match"]["overall"]["accuracy"] == 0.0


def test_exact_match_accepts_any_listed_reference(eos_model, tok):
    model, records = eos_model, EM_RECORDS
    own = [tok.decode(greedy_tokens(model, tok, r, eos=(tok.eos_token_id,)), skip_special_tokens=True)
           for r in records]
    # The right answer second in `references`, a wrong one first (and as `reference`): still right.
    listed = [dict(r, reference=o + "Q", references=[o + "Q", o]) for r, o in zip(records, own)]
    res = evaluate(model, tok, listed, kinds=("exact_match",), max_new_tokens=NEW_TOKENS, batch_size=BATCH,
                   keep_predictions=True)["exact_match"]
    assert res["overall"]["accuracy"] == 1.0
    assert all(e["references"] == [o + "Q", o] and e["reference"] == o + "Q" for e, o in zip(res["examples"], own))
    wrong = [dict(r, reference=o + "Q", references=[o + "Q", o + "R"]) for r, o in zip(records, own)]
    res = evaluate(model, tok, wrong, kinds=("exact_match",), max_new_tokens=NEW_TOKENS, batch_size=BATCH)
    assert res["exact_match"]["overall"]["accuracy"] == 0.0


def test_squad_normaliser_drops_case_punctuation_and_articles():
    from jraise.eval.normalise import answers_match, squad_answer

    assert squad_answer("  The Indus  River. ") == "indus river" == squad_answer("indus river")
    assert squad_answer("A bidet!") == "bidet" and squad_answer("an apple, the pear") == "apple pear"
    assert squad_answer("Theory") == "theory"  # an article only as a whole word
    assert answers_match("The Eiffel Tower.", "eiffel tower", normaliser="squad")
    assert not answers_match("Eiffel", "eiffel tower", normaliser="squad")
    assert not answers_match("Paris.", "paris", normaliser="testbed")  # the strict normaliser keeps case


@pytest.fixture(scope="module")
def testbed_result(model, tok, testbed, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "results" / "eval.json"
    result = evaluate(model, tok, testbed["test"], kinds=("loss", "exact_match"), max_new_tokens=NEW_TOKENS,
                      batch_size=BATCH, out_path=out, keep_predictions=True)
    return result, out


def test_untrained_model_scores_near_zero_on_testbed(testbed_result, tok):
    result, _ = testbed_result
    em = result["exact_match"]
    assert em["overall"]["n"] == 2 * len(CATEGORIES)
    assert em["overall"]["accuracy"] <= 0.05
    assert set(em["per_category"]) == set(CATEGORIES) and all(c["n"] == 2 for c in em["per_category"].values())
    # An untrained model is near uniform over the vocabulary: loss near log(V).
    assert result["loss"]["overall"]["per_token"] == pytest.approx(np.log(len(tok)), rel=0.1)


def test_json_is_written_atomically_and_reloads(testbed_result):
    result, out = testbed_result
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # no temp file left behind
    assert len(result["exact_match"]["examples"]) == len(result["loss"]["examples"]) == result["n_records"]
    # A value strict JSON cannot hold fails before the old file is touched.
    with pytest.raises(ValueError):
        write_json_atomic(out, {"x": float("nan")})
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]


def test_mixed_file_routes_records_by_kind(model, tok, tmp_path):
    records = [MC_RECORDS[0], LOSS_RECORDS[0], MC_RECORDS[1], LOSS_RECORDS[2]]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    res = evaluate(model, tok, path, kinds=("loss", "exact_match", "multiple_choice"), max_new_tokens=NEW_TOKENS,
                   batch_size=BATCH, keep_predictions=True)
    assert [e["index"] for e in res["loss"]["examples"]] == [1, 3]
    assert [e["index"] for e in res["exact_match"]["examples"]] == [1, 3]
    assert [e["index"] for e in res["multiple_choice"]["examples"]] == [0, 2]


def test_bad_input_is_named(model, tok):
    with pytest.raises(ValueError, match=r"record index 1.*'answer'"):
        evaluate(model, tok, [MC_RECORDS[0], dict(MC_RECORDS[1], answer=9)], kinds=("multiple_choice",))
    with pytest.raises(ValueError, match=r"record index 0.*no prompt"):
        evaluate(model, tok, [{"output": "x"}], kinds=("exact_match",))
    with pytest.raises(ValueError, match="record index 1"):
        evaluate(model, tok, [LOSS_RECORDS[0], {"prompt": "p", "response": " "}], kinds=("loss",))
    with pytest.raises(ValueError, match="unknown or no evaluation kinds"):
        evaluate(model, tok, LOSS_RECORDS, kinds=("bleu",))
    with pytest.raises(ValueError, match="no records with 'options'"):
        evaluate(model, tok, LOSS_RECORDS, kinds=("multiple_choice",))


def test_a_partial_last_batch_is_padded_to_eight_rows_and_decodes_as_alone(eos_model, tok):
    from jraise.eval.report import _batch_rows, greedy_completions, prompt_messages, prompt_token_ids

    assert [_batch_rows(n, 32) for n in (1, 3, 8, 9, 31, 32)] == [8, 8, 8, 16, 32, 32]
    assert _batch_rows(3, 4) == 4  # never past the batch size
    prompts = prompt_token_ids(tok, [prompt_messages(r) for r in EM_RECORDS])
    alone = [greedy_completions(eos_model, tok, [p], NEW_TOKENS, batch_size=1)[0] for p in prompts]
    # 32-row batches: every batch is the partial last one, padded to a multiple of 8 rows.
    assert greedy_completions(eos_model, tok, prompts, NEW_TOKENS, batch_size=32) == alone
    assert greedy_completions(eos_model, tok, prompts[:3], NEW_TOKENS, batch_size=32) == alone[:3]
