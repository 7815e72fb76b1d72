"""The testbed's opt-in knowledge categories: a fixed fact table, recall held-out sets, composites.

Answers are recomputed here from the record text (the quoted name, the numbers) and the fact
table, independently of the generator's answer functions.
"""

from __future__ import annotations

import re

import pytest
from jraise import testbed as tb
from jraise.testbed import (
    ALL_CATEGORIES,
    CATEGORIES,
    CATEGORY_PREREQUISITES,
    FACT_CODES,
    FACT_TAGS,
    KNOWLEDGE_CATEGORIES,
    SPLIT_NAME_COMPOSITES,
    TestbedConfig,
    generate_testbed,
    normalise_answer,
    write_testbed,
)

KNOWLEDGE_SET = ["fact", "add", "compare", "fact_add", "fact_compare", "first"]


SPLIT_SET = ["fact", "tag", "fact_tag", "fact_pair", "first"]


def quoted_names(record: dict) -> list[str]:
    return re.findall(r"'([a-z]{4})'", record["instruction"])


def expected_answer(record: dict) -> str:
    names = quoted_names(record)
    if record["category"] == "fact_pair":
        second, first = names  # the templates quote the second name first
        assert first != second
        return f"{FACT_CODES[first]} {FACT_CODES[second]}"
    (name,) = names
    if record["category"] == "tag":
        return FACT_TAGS[name]
    if record["category"] == "fact_tag":
        return f"{FACT_CODES[name]} {FACT_TAGS[name]}"
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


@pytest.fixture(scope="module", params=["skill_composites", "split_name_composites"])
def splits(request):
    if request.param == "split_name_composites":
        return generate_testbed(TestbedConfig(n_train=1200, noise=0.3, seed=5, n_val_per_category=30,
                                              n_test_per_category=60, categories=SPLIT_SET))
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
    assert CATEGORY_PREREQUISITES["tag"] == ()
    assert CATEGORY_PREREQUISITES["fact_tag"] == ("fact", "tag")
    assert CATEGORY_PREREQUISITES["fact_pair"] == ("fact",)
    assert SPLIT_NAME_COMPOSITES == {"fact_tag", "fact_pair"}
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
    recall = tb.RECALL_CATEGORIES
    held = splits["val"] + splits["test"]
    for category in recall & {r["category"] for r in pool}:
        taught = {quoted_names(r)[0] for r in pool if r["category"] == category}
        asked = [quoted_names(r)[0] for r in held if r["category"] == category]
        assert len(asked) == 90 and set(asked) <= taught  # the pool states every fact asked
    # Recall records may repeat a pool text; composites and skills never do.
    pool_texts = {text(r) for r in pool}
    assert any(text(r) in pool_texts for r in held if r["category"] in recall)
    others = [text(r) for r in held if r["category"] not in recall]
    assert not pool_texts & set(others)
    # Distinct too, except the split-name composites' (few held-out names, drawn with repeats).
    distinct = [text(r) for r in held if r["category"] not in recall | SPLIT_NAME_COMPOSITES]
    assert len(set(distinct)) == len(distinct)


def test_manifest_records_the_name_split_and_specs_reject_a_split_recall_category(tmp_path):
    import json

    paths = write_testbed(tmp_path / "s", n_train=40, seed=0, categories=["fact", "fact_pair"], n_test_per_category=2)
    manifest = json.loads(paths["testbed"].read_text())
    assert manifest["split_names"] == {"categories": ["fact_pair"], "pool": list(tb.COMPOSITE_POOL_NAMES),
                                       "held_out": list(tb.COMPOSITE_HELD_OUT_NAMES)}
    plain = write_testbed(tmp_path / "p", n_train=40, seed=0, categories=["fact"], n_test_per_category=2)
    assert "split_names" not in json.loads(plain["testbed"].read_text())
    spec = tb.CATEGORY_SPECS["fact"]
    with pytest.raises(ValueError, match="recall category cannot have a held_out_sample"):
        tb.CategorySpec(name="bad", description="", prerequisites=(), templates=spec.templates, sample=spec.sample,
                        answer=spec.answer, mistakes=spec.mistakes, recall=True, held_out_sample=spec.sample)


def test_knowledge_testbed_uses_the_default_tokenizer(tmp_path):
    from jraise.model.tokenizer import load_tokenizer

    knowledge = write_testbed(tmp_path / "k", n_train=60, seed=0, categories=KNOWLEDGE_SET, n_test_per_category=3)
    default = write_testbed(tmp_path / "d", n_train=60, seed=0, categories=["add"], n_test_per_category=3)
    tok, tok_default = load_tokenizer(knowledge["tokenizer"]), load_tokenizer(default["tokenizer"])
    assert tok.get_vocab() == tok_default.get_vocab()
    for r in generate_testbed(TestbedConfig(n_train=60, categories=KNOWLEDGE_CATEGORIES))["pool"]:
        ids = tok(r["instruction"] + " " + r["output"])["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == r["instruction"] + " " + r["output"]



def test_tag_table_is_fixed_and_well_formed():
    assert list(FACT_TAGS) == list(FACT_CODES)  # one tag per name
    assert all(re.fullmatch(r"[bcdfghjklmnpqrstvwxz][aeiou][bcdfghjklmnpqrstvwxz]", t) for t in FACT_TAGS.values())
    assert len(set(FACT_TAGS.values())) == len(FACT_TAGS)  # distinct: a tag identifies its name
    assert list(FACT_TAGS.items())[:3] == [("woza", "vuz"), ("tegu", "cef"), ("demi", "dof")]  # pinned
    assert not {"".join(sorted(t)) for t in FACT_TAGS.values()} & {"".join(sorted(w.lower())) for w in tb.TEMPLATE_WORDS}


def test_split_name_composites_hold_out_names_their_pool_never_mentions():
    splits = generate_testbed(TestbedConfig(n_train=1500, noise=0.0, seed=3, n_val_per_category=40,
                                            n_test_per_category=80, categories=SPLIT_SET))
    pool_half, held_half = set(tb.COMPOSITE_POOL_NAMES), set(tb.COMPOSITE_HELD_OUT_NAMES)
    assert not pool_half & held_half and pool_half | held_half == set(FACT_CODES)
    assert len(pool_half) == len(held_half) == tb.N_FACTS // 2

    def names_of(split: str, category: str) -> set:
        return {n for r in splits[split] if r["category"] == category for n in quoted_names(r)}

    for composite in SPLIT_NAME_COMPOSITES:
        assert names_of("pool", composite) == pool_half  # every pool-half name, no held-out one
        assert names_of("val", composite) | names_of("test", composite) == held_half
        assert not names_of("val", composite) & pool_half
    # The prerequisites' pool records state every fact a held-out composite record needs, so
    # the composite's held-out answers are learnable only through `fact` and `tag`.
    for prerequisite in ("fact", "tag"):
        assert names_of("pool", prerequisite) == set(FACT_CODES)
    pool_texts = {(r["instruction"], r["input"]) for r in splits["pool"]}
    held = [r for r in splits["val"] + splits["test"] if r["category"] in SPLIT_NAME_COMPOSITES]
    assert len(held) == 2 * (40 + 80) and not pool_texts & {(r["instruction"], r["input"]) for r in held}
