"""The testbed's opt-in knowledge categories: a fixed fact table, recall held-out sets, composites.

Answers are recomputed here from the record text (the quoted name, the numbers) and the fact
table, independently of the generator's answer functions.
"""

from __future__ import annotations

import re

import pytest
from jraise.data import testbed as tb
from jraise.data.testbed import (
    ALL_CATEGORIES,
    CATEGORIES,
    CATEGORY_PREREQUISITES,
    FACT_CODES,
    KNOWLEDGE_CATEGORIES,
    TestbedConfig,
    generate_testbed,
    normalise_answer,
    write_testbed,
)

KNOWLEDGE_SET = ["fact", "add", "compare", "fact_add", "fact_compare", "first"]


def expected_answer(record: dict) -> str:
    (name,) = re.findall(r"'([a-z]{4})'", record["instruction"])
    numbers = [int(n) for n in re.findall(r"\d+", record["instruction"])]
    code = FACT_CODES[name]
    if record["category"] == "fact":
        assert numbers == []
        return str(code)
    (other,) = numbers
    if record["category"] == "fact_add":
        return str(code + other)
    assert record["category"] == "fact_compare" and other != code
    assert tb.MIN_CODE <= other < tb.MAX_CODE  # in the codes' range: the answer always needs the fact
    return str(code if code > other else other)


@pytest.fixture(scope="module")
def splits():
    config = TestbedConfig(n_train=1200, noise=0.3, seed=5, n_val_per_category=30, n_test_per_category=60,
                           categories=KNOWLEDGE_SET)
    return generate_testbed(config)


def test_fact_table_is_fixed_and_well_formed():
    assert len(FACT_CODES) == tb.N_FACTS == 40
    assert all(re.fullmatch(r"([bcdfghjklmnpqrstvwxz][aeiou]){2}", n) for n in FACT_CODES)
    assert all(tb.MIN_CODE <= c < tb.MAX_CODE for c in FACT_CODES.values())
    assert len(set(FACT_CODES.values())) > 20  # codes vary, so recall is not guessable
    # Pinned: the table is part of the ground truth of every knowledge benchmark.
    assert list(FACT_CODES.items())[:3] == [("woza", 32), ("tegu", 45), ("demi", 24)]
    # No name is a word token of the tokenizer (it is spelled letter by letter).
    assert not {"".join(sorted(n)) for n in FACT_CODES} & {"".join(sorted(w.lower())) for w in tb.TEMPLATE_WORDS}


def test_registry_keeps_knowledge_categories_out_of_the_defaults():
    assert not set(KNOWLEDGE_CATEGORIES) & set(CATEGORIES)
    assert ALL_CATEGORIES == CATEGORIES + KNOWLEDGE_CATEGORIES
    assert TestbedConfig().category_names == CATEGORIES
    assert CATEGORY_PREREQUISITES["fact"] == ()
    assert CATEGORY_PREREQUISITES["fact_add"] == ("fact", "add")
    assert CATEGORY_PREREQUISITES["fact_compare"] == ("fact", "compare")
    with pytest.raises(ValueError, match="fact_compare"):  # the error lists every known category
        TestbedConfig(categories=["nope"])


def test_every_knowledge_record_answers_from_the_fact_table(splits):
    checked = 0
    for split in ("pool", "val", "test"):
        for r in splits[split]:
            if r["category"] not in KNOWLEDGE_CATEGORIES:
                continue
            truth = expected_answer(r)
            assert r["meta"]["clean_output"] == truth
            assert (r["output"] == truth) != r["meta"]["noisy"]
            if r["meta"]["noisy"]:
                assert normalise_answer(r["output"], r["category"]) != normalise_answer(truth, r["category"])
            checked += 1
    assert checked > 500
    assert any(r["meta"]["noisy"] for r in splits["pool"] if r["category"] in KNOWLEDGE_CATEGORIES)
    for pair in splits["val_pref"]:
        if pair["category"] in KNOWLEDGE_CATEGORIES:
            assert pair["chosen"] != pair["rejected"]


def test_recall_held_out_asks_about_taught_facts_and_composites_stay_disjoint(splits):
    def text(r):
        return (r["instruction"], r["input"])

    pool = splits["pool"]
    taught = {re.findall(r"'([a-z]{4})'", r["instruction"])[0] for r in pool if r["category"] == "fact"}
    held = splits["val"] + splits["test"]
    facts_asked = [re.findall(r"'([a-z]{4})'", r["instruction"])[0] for r in held if r["category"] == "fact"]
    assert len(facts_asked) == 90 and set(facts_asked) <= taught  # the pool states every fact asked
    # Recall records may repeat a pool text; composites and skills never do.
    pool_texts = {text(r) for r in pool}
    assert any(text(r) in pool_texts for r in held if r["category"] == "fact")
    others = [text(r) for r in held if r["category"] != "fact"]
    assert not pool_texts & set(others) and len(set(others)) == len(others)


def test_knowledge_testbed_uses_the_default_tokenizer(tmp_path):
    from jraise.model.tokenizer import load_tokenizer

    knowledge = write_testbed(tmp_path / "k", n_train=60, seed=0, categories=KNOWLEDGE_SET, n_test_per_category=3)
    default = write_testbed(tmp_path / "d", n_train=60, seed=0, categories=["add"], n_test_per_category=3)
    tok, tok_default = load_tokenizer(knowledge["tokenizer"]), load_tokenizer(default["tokenizer"])
    assert tok.get_vocab() == tok_default.get_vocab()
    for r in generate_testbed(TestbedConfig(n_train=60, categories=KNOWLEDGE_CATEGORIES))["pool"]:
        ids = tok(r["instruction"] + " " + r["output"])["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == r["instruction"] + " " + r["output"]

