"""The record-level rules of `jraise.real_pool` on tiny hand-made records: content keys, the three
noise kinds and their fallbacks, exact noise counts, held-out splits and preference pairs."""

import numpy as np
import pytest

from jraise.fetch.eval_sets import INSTRUCTIONS, mc_prompt
from jraise.real_pool import (
    NOISE_KINDS,
    answer_key,
    build_real_pool,
    content_key,
    corrupted_answer,
    near_miss_number,
    other_answer,
    plant_noise,
    preference_pair,
    split_held_out,
    training_record,
    truncated_answer,
    wrong_option,
)


def mc(rid: str, question: str, options: list[str], answer: int, category: str = "quiz") -> dict:
    return {"id": rid, "category": category, "instruction": mc_prompt(question, options), "output": options[answer],
            "options": options, "answer": answer}


def gen(rid: str, question: str, answer: str, category: str = "trivia", references: list[str] | None = None) -> dict:
    refs = references or [answer]
    return {"id": rid, "category": category, "instruction": f"{question}\n{INSTRUCTIONS['short']}", "output": answer,
            "reference": answer, "references": refs}


def number(rid: str, question: str, answer: str) -> dict:
    return {"id": rid, "category": "sums", "instruction": f"{question}\n{INSTRUCTIONS['number']}", "output": answer,
            "reference": answer}


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---- content keys ------------------------------------------------------------------------------


def test_content_key_ignores_options_answer_line_case_and_punctuation():
    a = mc("q-1", "What is the capital of France?", ["Paris", "Rome"], 0)
    b = mc("q-2", "what is the  capital of France", ["Lyon", "Paris", "Nice"], 1)
    c = gen("t-1", "What is the capital of France", "Paris")
    assert content_key(a) == content_key(b) == content_key(c) == "what is the capital of france"
    assert content_key(mc("q-3", "What is the capital of Spain?", ["Paris", "Rome"], 0)) != content_key(a)


def test_answer_key_compares_numbers_as_numbers_and_text_loosely():
    assert answer_key("1,200.50", "gsm8k") == answer_key("1200.5", "gsm8k")
    assert answer_key("  The  Moon. ", None) == answer_key("the moon", "testbed")


# ---- noise kinds -------------------------------------------------------------------------------


def test_wrong_option_is_another_option():
    record = mc("q-1", "Pick one", ["red", "green", "blue"], 1)
    picks = {wrong_option(record, rng(s)) for s in range(20)}
    assert picks == {"red", "blue"}


def test_wrong_option_skips_options_equal_to_the_answer_up_to_case():
    record = mc("q-1", "Pick one", ["Yes", "yes.", "no"], 0)
    assert {wrong_option(record, rng(s)) for s in range(20)} == {"no"}


@pytest.mark.parametrize("answer", ["0", "1", "9", "2.5", "0.46", "1200", "-3"])
def test_wrong_number_is_a_near_different_number(answer):
    record = number("s-1", "How many?", answer)
    for seed in range(10):
        text = wrong_option(record, rng(seed), "gsm8k")
        assert text is not None and answer_key(text, "gsm8k") != answer_key(answer, "gsm8k")
        assert abs(float(text) - float(answer)) <= 2 * 10 ** -max(len(answer.partition(".")[2]), 0) + 1e-9
        if not answer.startswith("-"):
            assert float(text) >= 0


def test_near_miss_number_rejects_non_numbers():
    assert near_miss_number("many", rng()) is None


def test_wrong_option_has_nothing_for_a_generative_record():
    assert wrong_option(gen("t-1", "Who?", "Ada Lovelace"), rng()) is None


def test_other_answer_never_picks_a_right_answer_or_reference():
    record = gen("t-1", "Who wrote it?", "Mary Shelley", references=["Mary Shelley", "Shelley"])
    answers = ["mary shelley", "Shelley.", "Jane Austen"]
    assert {other_answer(record, answers, rng(s), "testbed") for s in range(10)} == {"Jane Austen"}
    assert other_answer(record, ["Shelley"], rng(), "testbed") is None


def test_other_answer_for_numbers_differs_numerically():
    record = number("s-1", "How many?", "12")
    assert {other_answer(record, ["12", "12.0", "7"], rng(s), "gsm8k") for s in range(10)} == {"7"}


def test_truncated_answer_is_a_strict_prefix_cut_after_half_the_words():
    record = gen("t-1", "Where?", "in the  upper left corner")
    text = truncated_answer(record)
    assert text == "in the"
    assert record["output"].startswith(text) and len(text) < len(record["output"])
    assert truncated_answer(gen("t-2", "Where?", "north pole")) == "north"


def test_truncated_answer_needs_two_words_and_a_wrong_prefix():
    assert truncated_answer(gen("t-1", "Who?", "Nobody")) is None
    assert truncated_answer(number("s-1", "How many?", "15"), "gsm8k") is None
    with_prefix_reference = gen("t-2", "Which?", "Paris France", references=["Paris France", "Paris"])
    assert truncated_answer(with_prefix_reference, "testbed") is None


def test_corrupted_answer_falls_back_when_a_kind_cannot_apply():
    one_word_mc = mc("q-1", "Yes or no?", ["yes", "no"], 0)
    assert corrupted_answer(one_word_mc, "truncated", ["yes", "no"], rng()) == ("no", "wrong_option")
    one_word_gen = gen("t-1", "Who?", "Ada")
    assert corrupted_answer(one_word_gen, "truncated", ["Ada", "Alan"], rng()) == ("Alan", "other_answer")
    assert corrupted_answer(one_word_gen, "wrong_option", ["Ada", "Alan"], rng()) == ("Alan", "other_answer")
    assert corrupted_answer(one_word_gen, "truncated", ["Ada"], rng()) is None


# ---- planting noise ----------------------------------------------------------------------------


def _corruptible_records(n: int) -> list[dict]:
    return [mc(f"q-{i}", f"Question number {i}?", [f"right answer {i}", f"wrong answer {i}", f"other one {i}"],
               0) for i in range(n)]


def test_plant_noise_plants_exactly_n_with_kinds_spread_evenly():
    records = _corruptible_records(30)
    before = [dict(r) for r in records]
    noisy, truth = plant_noise(records, 12, rng(3))
    assert records == before  # not changed in place
    assert len(truth) == 12 and len({t["id"] for t in truth}) == 12
    assert sorted(t["kind"] for t in truth) == sorted(NOISE_KINDS * 4)
    by_id = {r["id"]: r for r in noisy}
    for t in truth:
        source = next(r for r in records if r["id"] == t["id"])
        assert t["clean_output"] == source["output"]
        assert answer_key(by_id[t["id"]]["output"], None) != answer_key(source["output"], None)
    noisy_ids = {t["id"] for t in truth}
    assert all(r["output"] == s["output"] for r, s in zip(noisy, records) if r["id"] not in noisy_ids)


def test_plant_noise_is_deterministic_by_generator():
    records = _corruptible_records(20)
    assert plant_noise(records, 7, rng(5)) == plant_noise(records, 7, rng(5))
    assert plant_noise(records, 7, rng(5)) != plant_noise(records, 7, rng(6))


def test_plant_noise_skips_records_it_cannot_corrupt_and_still_plants_exactly_n():
    stuck = [gen(f"t-{i}", f"Who {i}?", "Ada") for i in range(5)]  # one answer only: no wrong one exists
    records = stuck + _corruptible_records(5)
    _, truth = plant_noise(records, 5, rng(0))
    assert {t["id"] for t in truth} == {f"q-{i}" for i in range(5)}
    with pytest.raises(ValueError, match="can be given a wrong answer"):
        plant_noise(records, 6, rng(0))


# ---- held-out split, pairs, training records ---------------------------------------------------


def test_split_held_out_takes_distinct_content_and_skips_taken_content():
    records = [gen("t-0", "Same question?", "a"), gen("t-1", "same question", "b"), gen("t-2", "Other?", "c"),
               gen("t-3", "Taken?", "d"), gen("t-4", "Fourth?", "e")]
    val, test, rest = split_held_out(records, 1, 2, taken={"taken"})
    assert [r["id"] for r in val] == ["t-0"]
    assert [r["id"] for r in test] == ["t-2", "t-4"]
    assert [r["id"] for r in rest] == ["t-1", "t-3"]
    with pytest.raises(ValueError, match="fewer than n_val"):
        split_held_out(records, 2, 3)


def test_preference_pairs_choose_the_right_answer_and_reject_a_wrong_one():
    record = mc("q-1", "Pick", ["alpha", "beta"], 1)
    pair = preference_pair(record, ["beta", "gamma"], rng())
    assert pair == {"id": "q-1", "category": "quiz", "prompt": record["instruction"], "chosen": "beta",
                    "rejected": "alpha"}
    sums = number("s-1", "How many?", "4")
    pair = preference_pair(sums, ["4", "4.0", "9"], rng(), "gsm8k")
    assert (pair["chosen"], pair["rejected"]) == ("4", "9")
    with pytest.raises(ValueError, match="no wrong answer"):
        preference_pair(gen("t-1", "Who?", "Ada"), ["Ada"], rng())


def test_training_record_carries_no_truth():
    record = mc("q-1", "Pick", ["alpha", "beta"], 1)
    assert training_record(record) == {"id": "q-1", "category": "quiz", "instruction": record["instruction"],
                                       "output": "beta"}


def test_build_real_pool_keeps_held_out_content_out_of_every_category():
    quiz = [mc(f"q-{i}", f"Question {i}?", [f"yes {i}", f"no {i}"], 0) for i in range(10)]
    trivia = [gen(f"t-{i}", f"Question {i}", f"answer {i}") for i in range(10)]  # same questions as quiz
    splits, counts = build_real_pool({"quiz": quiz, "trivia": trivia}, targets=["quiz"], noise=0.5, seed=1,
                                     n_val=2, n_test=3, per_category=None)
    source = {r["id"]: r for r in quiz + trivia}
    held = {content_key(source[r["id"]]) for r in splits["val"] + splits["test"]}
    assert len(held) == 5
    assert not held & {content_key(source[r["id"]]) for r in splits["pool"]}
    assert counts["trivia"]["same_content_as_held_out"] == 5
    assert counts["quiz"]["pool"] == counts["trivia"]["pool"] == 5 and len(splits["pool"]) == 10
    assert len(splits["noise"]) == 5
    assert all(set(r) == {"id", "category", "instruction", "output"} for r in splits["pool"] + splits["val"])


def test_other_categories_can_hold_out_val_and_test_records_disjoint_from_the_pool():
    quiz = [mc(f"q-{i}", f"Quiz question {i}?", [f"yes {i}", f"no {i}"], 0) for i in range(12)]
    trivia = [gen(f"t-{i}", f"Trivia question {i}", f"answer {i}") for i in range(12)]
    default, _ = build_real_pool({"quiz": quiz, "trivia": trivia}, targets=["quiz"], noise=0.0, seed=3, n_val=2,
                                 n_test=3, per_category=None)
    assert "val_other" not in default and {r["category"] for r in default["test"]} == {"quiz"}
    splits, counts = build_real_pool({"quiz": quiz, "trivia": trivia}, targets=["quiz"], noise=0.0, seed=3, n_val=2,
                                     n_test=3, per_category=None, n_val_other=2, n_test_other=4)
    # The target's held-out records and the pool's target part are the same as without the option.
    assert splits["val"] == default["val"]
    assert [r for r in splits["test"] if r["category"] == "quiz"] == default["test"]
    assert len(splits["val_other"]) == 2 and {r["category"] for r in splits["val_other"]} == {"trivia"}
    assert sum(r["category"] == "trivia" for r in splits["test"]) == 4
    assert counts["trivia"]["val"] == 2 and counts["trivia"]["test"] == 4 and counts["trivia"]["pool"] == 6
    held = {content_key(r) for r in splits["val"] + splits["val_other"] + splits["test"]}
    source = {r["id"]: r for r in quiz + trivia}
    assert len(held) == 11 and not held & {content_key(source[r["id"]]) for r in splits["pool"]}
    assert all(set(r) == {"id", "category", "instruction", "output"} for r in splits["val_other"])
    # Only test records, no val ones, for the other categories: val_other is absent, test has them.
    only_test, _ = build_real_pool({"quiz": quiz, "trivia": trivia}, targets=["quiz"], noise=0.0, seed=3, n_val=2,
                                   n_test=3, per_category=None, n_test_other=4)
    assert "val_other" not in only_test and sum(r["category"] == "trivia" for r in only_test["test"]) == 4
    with pytest.raises(ValueError, match="trivia"):
        build_real_pool({"quiz": quiz, "trivia": trivia}, targets=["quiz"], n_val=2, n_test=3, per_category=None,
                        n_test_other=20)
    with pytest.raises(ValueError, match="n_val_other"):
        build_real_pool({"quiz": quiz, "trivia": trivia}, targets=["quiz"], n_val_other=-1)


def test_split_held_out_fills_val_alone_when_no_test_records_are_asked():
    records = [gen(f"t-{i}", f"Question {i}", f"answer {i}") for i in range(5)]
    val, test, rest = split_held_out(records, 2, 0)
    assert [r["id"] for r in val] == ["t-0", "t-1"] and test == [] and [r["id"] for r in rest] == ["t-2", "t-3", "t-4"]


def test_per_target_caps_only_the_target_categories():
    quiz = [mc(f"q-{i}", f"Quiz question {i}?", [f"yes {i}", f"no {i}"], 0) for i in range(20)]
    trivia = [gen(f"t-{i}", f"Trivia question {i}", f"answer {i}") for i in range(20)]
    sources = {"quiz": quiz, "trivia": trivia}
    same, _ = build_real_pool(sources, targets=["quiz"], noise=0.25, seed=2, n_val=2, n_test=3, per_category=12)
    splits, counts = build_real_pool(sources, targets=["quiz"], noise=0.25, seed=2, n_val=2, n_test=3,
                                     per_category=12, per_target=4)
    assert counts["quiz"]["pool"] == 4 and counts["trivia"]["pool"] == 12 and len(splits["pool"]) == 16
    assert counts["quiz"]["over_cap"] == 20 - 5 - 4
    assert len(splits["noise"]) == 4  # round(0.25 x 16): the noise follows the smaller pool
    # Held-out records and the kept target records (the first in the seeded order) are unchanged.
    assert splits["val"] == same["val"] and splits["test"] == same["test"]
    kept = {r["id"] for r in splits["pool"] if r["category"] == "quiz"}
    assert kept < {r["id"] for r in same["pool"] if r["category"] == "quiz"}
    with pytest.raises(ValueError, match="per_target"):
        build_real_pool(sources, targets=["quiz"], per_target=0)
