"""Tests for the synthetic testbed: determinism, ground truth, planted noise, splits, files.

Answers are checked against small oracles written here independently of the generator: each
record's text is parsed back (the word, the numbers, the quoted letters, the key=value table)
and the expected answer recomputed from it.
"""

from __future__ import annotations

import functools
import json
import random
import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jraise import testbed as tb
from jraise.data.records import PROMPT_SEPARATOR
from jraise.testbed import (
    ALL_CATEGORIES,
    CASE_SENSITIVE_CATEGORIES,
    CATEGORIES,
    CATEGORY_PREREQUISITES,
    CATEGORY_SPECS,
    DEGENERATE_OUTPUT,
    NOISE_KINDS,
    TestbedConfig,
    generate_testbed,
    normalise_answer,
    user_prompt,
    write_testbed,
)
from jraise.model.tokenizer import load_tokenizer

SMALL = dict(n_val_per_category=2, n_test_per_category=4)
WRITTEN_FILES = {
    "pool.jsonl", "val.jsonl", "val_pref.jsonl", "test.jsonl", "testbed.json", "tokenizer"
}


# ------------------------------------------------------------------------------------------
# Independent oracles: parse a record's text back into arguments and answer from scratch.
# ------------------------------------------------------------------------------------------


def parse_word(instruction: str, input_text: str) -> str:
    """The task's word: the whole input, or the double-quoted word in the instruction."""
    if input_text:
        assert re.fullmatch(r"[a-z]{3,6}", input_text), input_text
        return input_text
    (word,) = re.findall(r'"([a-z]+)"', instruction)
    assert 3 <= len(word) <= 6
    return word


def parse_numbers(instruction: str, input_text: str) -> list[int]:
    numbers = [int(n) for n in re.findall(r"\d+", f"{instruction} {input_text}")]
    assert all(0 <= n < 100 for n in numbers)
    return numbers


def parse_quoted_letters(instruction: str) -> list[str]:
    return re.findall(r"'([a-z])'", instruction)


def parse_table(instruction: str, input_text: str) -> dict[str, int]:
    pairs = re.findall(r"\b([a-z])=(\d+)", f"{instruction} {input_text}")
    assert len(pairs) >= 3 and len({k for k, _ in pairs}) == len(pairs)
    return {k: int(v) for k, v in pairs}


def oracle_reverse(word: str) -> str:
    out = ""
    for ch in word:
        out = ch + out
    return out


def oracle_sort(word: str) -> str:
    return "".join(ch * word.count(ch) for ch in string.ascii_lowercase)


def oracle_upper(word: str) -> str:
    return "".join(chr(ord(ch) - ord("a") + ord("A")) for ch in word)


def oracle_add(a: int, b: int) -> int:
    return a + b


def oracle_compare(a: int, b: int) -> int:
    return a if a > b else b


def oracle_lookup(table: dict[str, int], key: str) -> int:
    return table[key]


WORD_ORACLES = {"reverse": oracle_reverse, "sort": oracle_sort, "upper": oracle_upper}


def answer_count(instruction: str, input_text: str) -> str:
    (char,) = parse_quoted_letters(instruction)
    word = parse_word(instruction.replace(f"'{char}'", ""), input_text)
    return str(sum(1 for ch in word if ch == char))


def answer_lookup(instruction: str, input_text: str) -> str:
    (key,) = parse_quoted_letters(instruction)
    return str(oracle_lookup(parse_table(instruction, input_text), key))


def answer_add_compare(instruction: str, input_text: str) -> str:
    a, b, c = parse_numbers(instruction, input_text)
    assert CATEGORY_PREREQUISITES["add_compare"] == ("add", "compare")
    return str(oracle_compare(oracle_add(a, b), c))


def answer_lookup_add(instruction: str, input_text: str) -> str:
    key, key2 = parse_quoted_letters(instruction)
    table = parse_table(instruction, input_text)
    assert CATEGORY_PREREQUISITES["lookup_add"] == ("lookup", "add")
    return str(oracle_add(oracle_lookup(table, key), oracle_lookup(table, key2)))


def answer_word_chain(category: str, instruction: str, input_text: str) -> str:
    """Word categories, base or composed: apply the prerequisite chain (or the category itself)."""
    chain = CATEGORY_PREREQUISITES[category] or (category,)
    word = parse_word(instruction, input_text)
    return functools.reduce(lambda w, step: WORD_ORACLES[step](w), chain, word)


ORACLES = {
    "reverse": functools.partial(answer_word_chain, "reverse"),
    "sort": functools.partial(answer_word_chain, "sort"),
    "upper": functools.partial(answer_word_chain, "upper"),
    "first": lambda i, x: parse_word(i, x)[:1],
    "last": lambda i, x: parse_word(i, x)[-1:],
    "length": lambda i, x: str(sum(1 for _ in parse_word(i, x))),
    "count": answer_count,
    "add": lambda i, x: str(oracle_add(*parse_numbers(i, x))),
    "compare": lambda i, x: str(oracle_compare(*parse_numbers(i, x))),
    "lookup": answer_lookup,
    "reverse_upper": functools.partial(answer_word_chain, "reverse_upper"),
    "sort_reverse": functools.partial(answer_word_chain, "sort_reverse"),
    "add_compare": answer_add_compare,
    "lookup_add": answer_lookup_add,
}


def oracle(record: dict) -> str:
    return ORACLES[record["category"]](record["instruction"], record["input"])


# ------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    config = TestbedConfig(
        n_train=420, noise=0.3, seed=7, n_val_per_category=3, n_test_per_category=10
    )
    return generate_testbed(config)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed")
    paths = write_testbed(out, n_train=70, noise=0.2, seed=1, **SMALL)
    return out, paths


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def tree_bytes(root) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


# ------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------


def test_registry_shape():
    assert len(CATEGORIES) >= 8
    assert set(ORACLES) == set(CATEGORIES)  # a new category needs an oracle here
    assert set(CATEGORY_PREREQUISITES) == set(ALL_CATEGORIES)  # defaults and knowledge categories
    assert sum(bool(p) for p in CATEGORY_PREREQUISITES.values()) >= 2
    for category, prereqs in CATEGORY_PREREQUISITES.items():
        for p in prereqs:
            # Prerequisites are known categories listed earlier: the graph is a DAG.
            assert ALL_CATEGORIES.index(p) < ALL_CATEGORIES.index(category)
    texts = []
    for category in CATEGORIES:
        templates = CATEGORY_SPECS[category].templates
        assert len(templates) >= 3, category
        texts += [(t.instruction, t.input) for t in templates]
    assert len(texts) == len(set(texts)), "a template is shared, so two tasks would read the same"


# ------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------


def test_generate_is_deterministic_and_leaves_global_random_alone():
    config = TestbedConfig(n_train=100, noise=0.4, seed=11, **SMALL)
    state = random.getstate()
    first = generate_testbed(config)
    assert random.getstate() == state
    assert generate_testbed(config) == first
    other = generate_testbed(TestbedConfig(n_train=100, noise=0.4, seed=12, **SMALL))
    for split in tb.SPLITS:
        assert other[split] != first[split]


def test_written_files_are_byte_identical_for_a_seed(tmp_path, written):
    out, _ = written
    again = tmp_path / "again"
    write_testbed(again, n_train=70, noise=0.2, seed=1, **SMALL)
    assert tree_bytes(again) == tree_bytes(out)
    different = tmp_path / "different"
    write_testbed(different, n_train=70, noise=0.2, seed=2, **SMALL)
    for name in ("pool.jsonl", "val.jsonl", "val_pref.jsonl", "test.jsonl"):
        assert (different / name).read_bytes() != (out / name).read_bytes()
    # The tokenizer is config-independent by design.
    assert tree_bytes(different / "tokenizer") == tree_bytes(out / "tokenizer")


def test_held_out_splits_do_not_depend_on_pool_size_or_noise():
    a = generate_testbed(TestbedConfig(n_train=30, noise=0.0, seed=5, **SMALL))
    b = generate_testbed(TestbedConfig(n_train=300, noise=0.5, seed=5, **SMALL))
    for split in ("val", "val_pref", "test"):
        assert a[split] == b[split]


# ------------------------------------------------------------------------------------------
# Ground truth
# ------------------------------------------------------------------------------------------


def test_every_answer_matches_the_oracle(splits):
    for split in ("pool", "val", "test"):
        for record in splits[split]:
            expected = oracle(record)
            assert record["meta"]["clean_output"] == expected, record
            if not record["meta"]["noisy"]:
                assert record["output"] == expected, record
    assert {r["category"] for r in splits["pool"]} == set(CATEGORIES)


def test_composed_categories_compose_their_prerequisites(splits):
    composed = [c for c in CATEGORIES if CATEGORY_PREREQUISITES[c]]
    by_category = {c: [r for r in splits["test"] if r["category"] == c] for c in composed}
    for category in ("reverse_upper", "sort_reverse"):
        for r in by_category[category]:
            word = parse_word(r["instruction"], r["input"])
            step1, step2 = (WORD_ORACLES[p] for p in CATEGORY_PREREQUISITES[category])
            assert r["output"] == step2(step1(word))
    for r in by_category["add_compare"]:
        a, b, c = parse_numbers(r["instruction"], r["input"])
        assert int(r["output"]) == oracle_compare(oracle_add(a, b), c)
        assert oracle_add(a, b) != c  # no ties by construction
    for r in by_category["lookup_add"]:
        key, key2 = parse_quoted_letters(r["instruction"])
        table = parse_table(r["instruction"], r["input"])
        assert int(r["output"]) == oracle_add(oracle_lookup(table, key), oracle_lookup(table, key2))
    # Module's own functions compose the same way.
    reverse_upper = CATEGORY_SPECS["reverse_upper"].answer
    assert reverse_upper({"word": "abc"}) == tb.to_upper(tb.reverse_word("abc"))


def test_inputs_and_answers_are_short(splits):
    for split in ("pool", "val", "test"):
        for r in splits[split]:
            assert 1 <= len(r["meta"]["clean_output"]) <= 6
            assert len(r["input"]) <= 20 and len(r["instruction"]) <= 100


def test_records_have_the_alpaca_format(splits):
    for split in ("pool", "val", "test"):
        for n, r in enumerate(splits[split]):
            assert r["id"] == f"{split}-{n}"
            assert set(r) == {"id", "instruction", "input", "output", "category", "meta"}
            assert r["meta"]["category"] == r["category"]
            assert r["output"] and r["instruction"]
    for n, p in enumerate(splits["val_pref"]):
        assert p["id"] == f"val_pref-{n}"
        assert set(p) == {"id", "prompt", "chosen", "rejected", "category"}


# ------------------------------------------------------------------------------------------
# Planted noise
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_train, noise", [(50, 0.0), (57, 0.1), (83, 0.25), (90, 0.37), (40, 1.0), (10, 0.15)]
)
def test_noise_count_is_exact_and_meta_is_consistent(n_train, noise):
    data = generate_testbed(TestbedConfig(n_train=n_train, noise=noise, seed=3, **SMALL))
    pool = data["pool"]
    noisy = [r for r in pool if r["meta"]["noisy"]]
    assert abs(len(noisy) - noise * n_train) <= 0.5
    assert len(noisy) == tb.noisy_count(n_train, noise)
    clean_answers = [r["meta"]["clean_output"] for r in pool]
    for r in pool:
        meta = r["meta"]
        assert meta["noisy"] == (r["output"] != meta["clean_output"])
        # A planted error must stay wrong under the answer normaliser used for exact match.
        category = r["category"]
        output, clean = (normalise_answer(x, category) for x in (r["output"], meta["clean_output"]))
        assert meta["noisy"] == (output != clean)
        assert r["output"], "empty outputs are never written"
        if not meta["noisy"]:
            assert meta["noise_kind"] is None
            continue
        kind = meta["noise_kind"]
        assert kind in NOISE_KINDS
        if kind == "truncated":
            assert meta["clean_output"].startswith(r["output"])
            assert len(r["output"]) < len(meta["clean_output"])
        elif kind == "empty":
            assert r["output"] == DEGENERATE_OUTPUT
        elif kind == "other_task":
            assert r["output"] in clean_answers
        else:  # a plausible wrong answer looks like an answer of its category
            clean = meta["clean_output"]
            assert r["output"].isdigit() == clean.isdigit()
            assert r["output"].isalpha() == clean.isalpha()
    for split in ("val", "test"):
        for r in data[split]:
            assert not r["meta"]["noisy"] and r["output"] == r["meta"]["clean_output"]


def test_noise_kinds_are_all_used_and_degenerate_is_never_correct(splits):
    kinds = {r["meta"]["noise_kind"] for r in splits["pool"] if r["meta"]["noisy"]}
    assert kinds == set(NOISE_KINDS)
    correct = {r["meta"]["clean_output"] for s in ("pool", "test") for r in splits[s]}
    assert DEGENERATE_OUTPUT not in correct


def test_noisy_sets_are_nested_across_noise_levels():
    low = generate_testbed(TestbedConfig(n_train=120, noise=0.1, seed=4, **SMALL))["pool"]
    high = generate_testbed(TestbedConfig(n_train=120, noise=0.3, seed=4, **SMALL))["pool"]
    def clean_view(r):
        return (r["id"], r["instruction"], r["input"], r["meta"]["clean_output"])

    assert [clean_view(r) for r in low] == [clean_view(r) for r in high]  # same clean pool
    for lo, hi in zip(low, high):
        if lo["meta"]["noisy"]:
            assert hi["meta"]["noisy"] and hi["output"] == lo["output"]


def test_restricted_noise_kinds():
    config = TestbedConfig(n_train=60, noise=0.5, seed=2, noise_kinds=("empty",), **SMALL)
    pool = generate_testbed(config)["pool"]
    assert {r["output"] for r in pool if r["meta"]["noisy"]} == {DEGENERATE_OUTPUT}


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), category=st.sampled_from(ALL_CATEGORIES))  # knowledge ones too
def test_plausible_wrong_answer_is_wrong_and_non_empty(seed, category):
    rng = random.Random(seed)
    args = CATEGORY_SPECS[category].sample(rng)
    wrong = tb.plausible_wrong_answer(category, args, rng)
    correct = CATEGORY_SPECS[category].answer(args)
    assert wrong and normalise_answer(wrong, category) != normalise_answer(correct, category)


# ------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------


def test_no_held_out_record_is_in_the_pool(splits):
    def key(r):
        return (r["instruction"], r["input"])

    pool = {key(r) for r in splits["pool"]}
    val = [key(r) for r in splits["val"]]
    test = [key(r) for r in splits["test"]]
    assert not pool & set(val) and not pool & set(test) and not set(val) & set(test)
    assert len(set(val)) == len(val) and len(set(test)) == len(test)


def test_held_out_sizes_per_category(splits):
    for split, n in (("val", 3), ("val_pref", 3), ("test", 10)):
        counts = {c: sum(r["category"] == c for r in splits[split]) for c in CATEGORIES}
        assert set(counts.values()) == {n}, split


def test_val_pref_pairs_mirror_val(splits):
    for pair, record in zip(splits["val_pref"], splits["val"], strict=True):
        assert pair["prompt"] == user_prompt(record["instruction"], record["input"])
        assert pair["category"] == record["category"]
        instruction, _, input_text = pair["prompt"].partition(PROMPT_SEPARATOR)
        assert pair["chosen"] == ORACLES[pair["category"]](instruction, input_text)
        assert pair["rejected"] and pair["rejected"] != pair["chosen"]


def test_category_weights_and_subsets():
    assert TestbedConfig(categories="add").categories == ("add",)
    config = TestbedConfig(
        n_train=100, categories=("add", "reverse", "upper"), category_weights=(2, 1, 1), **SMALL
    )
    pool = generate_testbed(config)["pool"]
    counts = {c: sum(r["category"] == c for r in pool) for c in config.categories}
    assert counts == {"add": 50, "reverse": 25, "upper": 25}
    balanced = generate_testbed(TestbedConfig(n_train=31, **SMALL))["pool"]
    per_category = [sum(r["category"] == c for r in balanced) for c in CATEGORIES]
    assert max(per_category) - min(per_category) <= 1 and sum(per_category) == 31


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(noise=1.5),
        dict(noise=-0.1),
        dict(n_train=-1),
        dict(categories=("reverse", "nope")),
        dict(categories=()),
        dict(categories=("add",), category_weights=(1, 2)),
        dict(categories=("add",), category_weights=(0,)),
        dict(noise_kinds=("bogus",)),
    ],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        TestbedConfig(**kwargs)


def test_too_many_held_out_instances_raise_instead_of_looping():
    # `add` has 50 * 50 instances; asking for more distinct ones than exist must fail cleanly.
    with pytest.raises(ValueError, match="add"):
        generate_testbed(TestbedConfig(n_train=0, categories=("add",), n_test_per_category=2600))


# ------------------------------------------------------------------------------------------
# Files, manifest, tokenizer
# ------------------------------------------------------------------------------------------


def test_files_written_and_no_temp_files_left(written):
    out, paths = written
    assert {p.name for p in out.iterdir()} == WRITTEN_FILES
    assert set(paths) == {"pool", "val", "val_pref", "test", "testbed", "tokenizer"}
    assert all(p.exists() and p.parent == out for p in paths.values())
    for split in tb.SPLITS:
        assert read_jsonl(paths[split]) == read_jsonl(out / f"{split}.jsonl")


def test_rewrite_and_failed_write_leave_no_temp_files(tmp_path, monkeypatch):
    write_testbed(tmp_path, n_train=20, noise=0.5, seed=0, categories=["add", "upper"], **SMALL)
    write_testbed(tmp_path, n_train=20, noise=0.5, seed=9, categories=["add", "upper"], **SMALL)
    assert {p.name for p in tmp_path.iterdir()} == WRITTEN_FILES
    assert json.loads((tmp_path / "testbed.json").read_text())["config"]["seed"] == 9

    def broken_tokenizer_builder(out_dir, *args, **kwargs):
        (out_dir / "half-written.json").parent.mkdir(parents=True)
        (out_dir / "half-written.json").write_text("{")
        raise OSError("disk full")

    monkeypatch.setattr(tb, "build_char_tokenizer", broken_tokenizer_builder)
    with pytest.raises(OSError, match="disk full"):
        write_testbed(tmp_path, n_train=20, seed=10, categories=["add", "upper"], **SMALL)
    names = {p.name for p in tmp_path.iterdir()}
    # No temp leftovers; the old tokenizer survives; no manifest marks the directory complete.
    assert names == WRITTEN_FILES - {"testbed.json"}
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()


def test_manifest_describes_the_testbed(written):
    out, paths = written
    manifest = json.loads(paths["testbed"].read_text())
    pool = read_jsonl(paths["pool"])
    assert manifest["categories"] == list(CATEGORIES)
    assert manifest["prerequisites"] == {c: list(CATEGORY_PREREQUISITES[c]) for c in CATEGORIES}
    assert manifest["config"]["n_train"] == 70 and manifest["config"]["seed"] == 1
    assert manifest["counts"]["pool"]["total"] == len(pool) == 70
    assert manifest["counts"]["test"]["total"] == 4 * len(CATEGORIES)
    noisy = [r for r in pool if r["meta"]["noisy"]]
    assert manifest["noise"]["n_noisy"] == len(noisy) == 14
    assert sum(manifest["noise"]["by_kind"].values()) == 14
    assert all((out / name).exists() for name in manifest["files"].values())


def test_tokenizer_round_trips_every_text_without_unk(written):
    out, paths = written
    tokenizer = load_tokenizer(paths["tokenizer"])
    alphabet = set(tb.ALPHABET)
    texts = []
    for split in ("pool", "val", "test"):
        for r in read_jsonl(paths[split]):
            texts += [r["instruction"], r["input"], r["output"], r["meta"]["clean_output"]]
    for p in read_jsonl(paths["val_pref"]):
        texts += [p["prompt"], p["chosen"], p["rejected"]]
        chat = [
            {"role": "user", "content": p["prompt"]},
            {"role": "assistant", "content": p["chosen"]},
        ]
        texts.append(tokenizer.apply_chat_template(chat, tokenize=False))
    texts = [t for t in texts if t]
    assert all(set(t) <= alphabet for t in texts)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for text, ids in zip(texts, encoded):
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids) == text


# ------------------------------------------------------------------------------------------
# Answer normalisation
# ------------------------------------------------------------------------------------------


def test_normalise_answer():
    assert normalise_answer("  12 \n") == "12"
    assert normalise_answer("a \t  b") == "a b"
    assert normalise_answer("ABC") == "ABC"  # no category: strict
    assert normalise_answer(" CBA ", "reverse") == "cba"
    assert normalise_answer("Abc", "upper") == "Abc"  # case is the task
    assert normalise_answer("Abc", "some_other_dataset") == "Abc"
    assert CASE_SENSITIVE_CATEGORIES == {"upper", "reverse_upper"}


def test_task_words_are_spelled_letter_by_letter(written):
    """Template words are single tokens; no task input or answer ever contains one."""
    _, paths = written
    tokenizer = load_tokenizer(paths["tokenizer"])
    word_ids = set(tokenizer.convert_tokens_to_ids([*tb.TEMPLATE_WORDS, *(" " + w for w in tb.TEMPLATE_WORDS)]))
    assert tokenizer.unk_token_id not in word_ids
    records = read_jsonl(paths["pool"]) + read_jsonl(paths["test"])
    for r in records:
        for text in (r["input"], r["meta"]["clean_output"]):
            ids = tokenizer(text, add_special_tokens=False).input_ids
            assert not word_ids & set(ids), text
    instruction_ids = tokenizer("Reverse the letters of this word.", add_special_tokens=False).input_ids
    assert len(instruction_ids) == 7
    rng = random.Random(0)
    anagrams = {"".join(sorted(w.lower())) for w in tb.TEMPLATE_WORDS}
    assert all("".join(sorted(tb._random_word(rng))) not in anagrams for _ in range(20000))
