"""Built-in synthetic testbed: short algorithmic instruction tasks with known ground truth.

The testbed is a deterministic (seeded) generator of an Alpaca-style instruction pool plus
held-out validation and test sets, sized for tiny character-level transformers trained on a CPU
for minutes. It exists so data-selection methods can be benchmarked against ground truth:

* every record belongs to a known task *category* (reverse a word, add two numbers, ...);
* some categories are *compositions* of others (`reverse_upper` = `reverse` then `upper`), so
  dependencies between categories exist by construction; `CATEGORY_PREREQUISITES` is that graph;
* a configurable fraction of the pool has *planted* low-quality responses (`NOISE_KINDS`).

Opt-in *knowledge* categories (`KNOWLEDGE_CATEGORIES`, not in the default `CATEGORIES`): `fact`
asks for the code of a made-up name from a fixed table (`FACT_CODES`, the same for every seed),
and `fact_add` / `fact_compare` use that code inside a skill. A fact is learnable only from records
that state it, and a composite's record does not state it, so `fact` is a prerequisite that only
its own data teaches. `fact` is a *recall* category (`RECALL_CATEGORIES`): its held-out records
ask about the facts the pool teaches, so they may repeat each other and pool texts (the one
exception to the held-out guarantees below). `tag` is a second fact table of the same names
(`FACT_TAGS`). The *split-name* composites `fact_tag` (code and tag of a name) and `fact_pair`
(the codes of two names) mention only the first half of the names in their pool records and only
the second half in their held-out ones (`COMPOSITE_POOL_NAMES`, `COMPOSITE_HELD_OUT_NAMES`), so
their held-out answers rest on facts that only `fact` and `tag` records state: their own records
teach the answer's form, never the facts it is tested on (`SPLIT_NAME_COMPOSITES`). The
knowledge categories add no word token and no character to the tokenizer: every default
testbed, tokenizer and model is unchanged by their existence.

Record formats (one JSON object per line in the written files):

* SFT records (`pool`, `val`, `test`)::

    {"id": "<split>-<n>", "instruction": str, "input": str (may be ""), "output": str,
     "category": str,
     "meta": {"category": str, "noisy": bool, "noise_kind": str | None, "clean_output": str,
              "template": int}}

  `output` is what a model is trained on (possibly corrupted, pool only); `meta.clean_output` is
  the correct answer. In `val` and `test`, `output` is always the correct (reference) answer.
* Preference pairs (`val_pref`)::

    {"id": "val_pref-<n>", "prompt": str, "chosen": str, "rejected": str, "category": str}

  `prompt` is `user_prompt(instruction, input)`; pair `n` is built from `val` record `n`.

**`meta` is ground truth for benchmarks only: selectors must never read it.** `meta.noisy`,
`meta.noise_kind` and `meta.clean_output` reveal exactly what a selector is meant to discover;
they exist so benchmarks can score selections. The top-level `category` is a visible label, like
the task or source tag real instruction pools carry. `meta.template` is the paraphrase index.

Planted noise (pool only). Noisy records are an exact count, `round(noise * n_train)` (halves
round up), and the kinds cycle through `TestbedConfig.noise_kinds`:

* `wrong`: a plausible wrong answer of the same category (e.g. the smaller number for `compare`,
  the un-reversed word for `reverse`, an adjacent-letter swap);
* `truncated`: a proper, non-empty prefix of the correct answer. Single-character answers cannot
  be truncated, so those records fall back to `wrong` (`meta.noise_kind` records the kind used);
* `other_task`: the correct answer of another pool record, of another category when possible;
* `empty`: the degenerate response `DEGENERATE_OUTPUT` ("?"). Literally empty text is avoided
  because data loaders reject empty responses as malformed input; "?" is never a correct answer.

Every noisy record has `output != meta.clean_output`, even after `normalise_answer` (so exact-match
scoring never counts a planted error as correct), and every clean one has them equal.

Determinism: randomness comes only from `random.Random` instances seeded from `(seed, purpose)`
strings, never from global state. The streams are separated so that the test and validation sets
depend only on `seed`, the categories and the held-out sizes (not on `n_train` or `noise`), and
the clean pool does not
depend on `noise`, and the noisy records at a lower noise level are a subset of those at a higher
one (same seed and pool size), with identical corruptions.

No `val`/`test` record of a non-recall category shares a task instance (category + arguments,
whatever the template) with a `pool` record, and those `val` and `test` records are disjoint and
duplicate-free; so no held-out
instruction+input text appears in the pool. The pool itself may repeat an instance, as real
instruction pools do.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType

from jraise.atomic import atomic_write_jsonl, atomic_write_text, temp_sibling
from jraise.data.records import PROMPT_SEPARATOR, user_prompt
from jraise.eval.normalise import TESTBED_CASE_FOLDED, normalise_answer
from jraise.model.tokenizer import build_char_tokenizer

SPLITS = ("pool", "val", "val_pref", "test")
NOISE_KINDS = ("wrong", "truncated", "other_task", "empty")
# Stands in for an "empty" response; no task ever has it as its correct answer.
DEGENERATE_OUTPUT = "?"

MIN_WORD_LENGTH, MAX_WORD_LENGTH = 3, 6
MAX_NUMBER = 100  # numbers in tasks are < MAX_NUMBER
MAX_ADDEND = 50  # addends stay small so every sum is < MAX_NUMBER (at most two digits)

# The testbed tokenizer's chat template: the same roles as `DEFAULT_CHAT_TEMPLATE` with a compact
# frame ("Q: ...\nA: ...</s>"), so a character-level model spends its compute on the task text
# rather than on ~30 characters of "### Instruction:" boilerplate per example.
TESTBED_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}Q: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}A: {{ message['content'] }}{{ eos_token }}\n"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)

# Task arguments: str -> str | int | tuple (hashable values, so an instance has a key).
Args = Mapping[str, object]


# --------------------------------------------------------------------------------------------
# Ground-truth task functions. Composed categories are computed by composing these, so the
# composition graph is true by construction.
# --------------------------------------------------------------------------------------------


def reverse_word(word: str) -> str:
    """The word spelled backwards."""
    return word[::-1]


def sort_letters(word: str) -> str:
    """The word's letters in alphabetical order."""
    return "".join(sorted(word))


def to_upper(word: str) -> str:
    """The word in capital letters."""
    return word.upper()


def first_letter(word: str) -> str:
    """The word's first letter."""
    return word[0]


def last_letter(word: str) -> str:
    """The word's last letter."""
    return word[-1]


def word_length(word: str) -> int:
    """How many letters the word has."""
    return len(word)


def count_char(word: str, char: str) -> int:
    """How many times `char` occurs in the word."""
    return word.count(char)


def add_numbers(a: int, b: int) -> int:
    """The sum of two numbers."""
    return a + b


def larger_number(a: int, b: int) -> int:
    """The larger of two numbers."""
    return max(a, b)


def lookup_value(table: Sequence[tuple[str, int]], key: str) -> int:
    """The value stored under `key` in a table of (key, value) pairs."""
    return dict(table)[key]


# --------------------------------------------------------------------------------------------
# Category registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """One paraphrase of a task: `str.format` strings for the instruction and the input.

    Conventions the tests rely on to parse records back: a word shown inside the instruction is
    in double quotes, a queried letter or key is in single quotes, numbers appear in argument
    order, and a key-value table reads `k=3, m=7`.
    """

    instruction: str
    input: str = ""


@dataclass(frozen=True)
class CategorySpec:
    """A task category: how to sample arguments, phrase them, answer them, and get them wrong."""

    name: str
    description: str
    prerequisites: tuple[str, ...]
    templates: tuple[Template, ...]
    sample: Callable[[random.Random], dict]
    answer: Callable[[Args], str]
    # Deterministic plausible mistakes; filtered against the correct answer before use.
    mistakes: Callable[[Args], Sequence[str]]
    # Case-sensitive categories are those where case is part of the task (see normalise_answer).
    case_sensitive: bool = False
    # Knowledge (recall) categories: the answer rests on a fact only data teaches (`FACT_CODES`),
    # so held-out records ask about the facts the pool teaches (see `KNOWLEDGE_CATEGORIES`).
    recall: bool = False
    # Arguments of held-out (val, test) records when they come from another space than the pool's
    # (`sample`); None: the same. The split-name composites use it so that their held-out records
    # ask about names their own pool records never mention (see `SPLIT_NAME_COMPOSITES`).
    held_out_sample: Callable[[random.Random], dict] | None = None

    def __post_init__(self) -> None:
        if self.recall and self.held_out_sample is not None:
            # A recall category's held-out records ask about what its pool teaches; another space
            # for them would contradict that (and `_held_out_draws` would ignore it).
            raise ValueError(f"category {self.name!r}: a recall category cannot have a held_out_sample")


def _random_word(rng: random.Random, letters: str = string.ascii_lowercase) -> str:
    # Redrawn when it is an anagram of a template word: no word the tasks make from it (reversed,
    # sorted, ...) can then be a whole-word token of the testbed tokenizer, so every task's input
    # and answer are spelled letter by letter.
    while True:
        length = rng.randint(MIN_WORD_LENGTH, MAX_WORD_LENGTH)
        word = "".join(rng.choice(letters) for _ in range(length))
        if _spelled_by_letters(word):
            return word


def _sample_word(rng: random.Random) -> dict:
    return {"word": _random_word(rng)}


def _sample_count(rng: random.Random) -> dict:
    # Words over 2-3 distinct letters, so counts vary (uniform random letters would almost
    # always give 1); occasionally ask for an absent letter so 0 is a possible answer.
    letters = "".join(rng.sample(string.ascii_lowercase, rng.randint(2, 3)))
    word = _random_word(rng, letters)
    if rng.random() < 0.85:
        char = rng.choice(word)
    else:
        char = rng.choice([c for c in string.ascii_lowercase if c not in word])
    return {"word": word, "char": char}


def _sample_addends(rng: random.Random) -> dict:
    return {"a": rng.randrange(MAX_ADDEND), "b": rng.randrange(MAX_ADDEND)}


def _sample_distinct_pair(rng: random.Random) -> dict:
    # Distinct, so "the larger number" is always well defined.
    a, b = rng.sample(range(MAX_NUMBER), 2)
    return {"a": a, "b": b}


def _sample_add_compare(rng: random.Random) -> dict:
    a, b = rng.randrange(MAX_ADDEND), rng.randrange(MAX_ADDEND)
    # c uniform over [0, MAX_NUMBER) minus {a + b}, so there is never a tie.
    c = rng.randrange(MAX_NUMBER - 1)
    if c >= a + b:
        c += 1
    return {"a": a, "b": b, "c": c}


def _sample_table(rng: random.Random, n_queries: int) -> dict:
    n_pairs = rng.randint(3, 4)
    keys = rng.sample(string.ascii_lowercase, n_pairs)
    # Distinct single-digit values: another key's value is then always a wrong answer.
    values = rng.sample(range(10), n_pairs)
    table = tuple(zip(keys, values))
    queries = rng.sample(keys, n_queries)
    args: dict = {"table": table, "key": queries[0]}
    if n_queries == 2:
        args["key2"] = queries[1]
    return args


def _format_table(table: Sequence[tuple[str, int]]) -> str:
    return ", ".join(f"{key}={value}" for key, value in table)


def _adjacent_swaps(text: str) -> list[str]:
    """Every string obtained by swapping two neighbouring, different characters."""
    swaps = []
    for i in range(len(text) - 1):
        if text[i] != text[i + 1]:
            swaps.append(text[:i] + text[i + 1] + text[i] + text[i + 2 :])
    return swaps


def _near_misses(n: int, offsets: Sequence[int] = (-2, -1, 1, 2)) -> list[str]:
    """Non-negative numbers close to `n` (off-by-one and friends), as strings."""
    return [str(n + d) for d in offsets if n + d >= 0]


def _lookup_sum(args: Args) -> int:
    """lookup_add's answer: look both keys up, then add."""
    table = args["table"]
    return add_numbers(lookup_value(table, args["key"]), lookup_value(table, args["key2"]))


def _word_answer(fn: Callable[[str], object]) -> Callable[[Args], str]:
    return lambda args: str(fn(args["word"]))


_SPEC_LIST: tuple[CategorySpec, ...] = (
    CategorySpec(
        name="reverse",
        description="spell a word backwards",
        prerequisites=(),
        templates=(
            Template("Reverse the letters of this word.", "{word}"),
            Template("Write the word backwards.", "{word}"),
            Template('Spell "{word}" in reverse order.'),
            Template('What is "{word}" written backwards?'),
        ),
        sample=_sample_word,
        answer=_word_answer(reverse_word),
        mistakes=lambda a: [a["word"], *_adjacent_swaps(reverse_word(a["word"]))],
    ),
    CategorySpec(
        name="sort",
        description="sort a word's letters alphabetically",
        prerequisites=(),
        templates=(
            Template("Sort the letters of this word alphabetically.", "{word}"),
            Template("Put the letters in alphabetical order.", "{word}"),
            Template('Arrange the letters of "{word}" from a to z.'),
        ),
        sample=_sample_word,
        answer=_word_answer(sort_letters),
        mistakes=lambda a: [a["word"], *_adjacent_swaps(sort_letters(a["word"]))],
    ),
    CategorySpec(
        name="upper",
        description="write a word in capital letters",
        prerequisites=(),
        templates=(
            Template("Convert this word to uppercase.", "{word}"),
            Template("Write the word in capital letters.", "{word}"),
            Template('What is "{word}" in upper case?'),
        ),
        sample=_sample_word,
        answer=_word_answer(to_upper),
        mistakes=lambda a: [
            a["word"],
            a["word"].capitalize(),
            to_upper(a["word"][:-1]) + a["word"][-1],
        ],
        case_sensitive=True,
    ),
    CategorySpec(
        name="first",
        description="give a word's first letter",
        prerequisites=(),
        templates=(
            Template("What is the first letter of this word?", "{word}"),
            Template("Give the initial letter.", "{word}"),
            Template('Which letter does "{word}" start with?'),
        ),
        sample=_sample_word,
        answer=_word_answer(first_letter),
        mistakes=lambda a: [a["word"][1], a["word"][-1]],
    ),
    CategorySpec(
        name="last",
        description="give a word's last letter",
        prerequisites=(),
        templates=(
            Template("What is the last letter of this word?", "{word}"),
            Template("Give the final letter.", "{word}"),
            Template('Which letter does "{word}" end with?'),
        ),
        sample=_sample_word,
        answer=_word_answer(last_letter),
        mistakes=lambda a: [a["word"][-2], a["word"][0]],
    ),
    CategorySpec(
        name="length",
        description="count a word's letters",
        prerequisites=(),
        templates=(
            Template("How many letters does this word have?", "{word}"),
            Template("Count the letters in the word.", "{word}"),
            Template('What is the length of "{word}"?'),
        ),
        sample=_sample_word,
        answer=_word_answer(word_length),
        mistakes=lambda a: _near_misses(word_length(a["word"])),
    ),
    CategorySpec(
        name="count",
        description="count how often a letter occurs in a word",
        prerequisites=(),
        templates=(
            Template("Count how many times '{char}' appears in the word.", "{word}"),
            Template("How many '{char}' letters are in this word?", "{word}"),
            Template("How often does '{char}' occur in \"{word}\"?"),
        ),
        sample=_sample_count,
        answer=lambda a: str(count_char(a["word"], a["char"])),
        mistakes=lambda a: [
            *_near_misses(count_char(a["word"], a["char"]), (-1, 1)),
            str(word_length(a["word"])),
        ],
    ),
    CategorySpec(
        name="add",
        description="add two numbers",
        prerequisites=(),
        templates=(
            Template("Add the two numbers.", "{a} {b}"),
            Template("What is {a} plus {b}?"),
            Template("Compute the sum.", "{a} + {b}"),
        ),
        sample=_sample_addends,
        answer=lambda a: str(add_numbers(a["a"], a["b"])),
        mistakes=lambda a: _near_misses(add_numbers(a["a"], a["b"]), (-10, -2, -1, 1, 2, 10)),
    ),
    CategorySpec(
        name="compare",
        description="give the larger of two numbers",
        prerequisites=(),
        templates=(
            Template("Which number is larger?", "{a} {b}"),
            Template("What is the bigger of {a} and {b}?"),
            Template("Return the maximum of the two numbers.", "{a}, {b}"),
        ),
        sample=_sample_distinct_pair,
        answer=lambda a: str(larger_number(a["a"], a["b"])),
        mistakes=lambda a: [str(min(a["a"], a["b"])), *_near_misses(max(a["a"], a["b"]), (-1, 1))],
    ),
    CategorySpec(
        name="lookup",
        description="look a key up in a key=value table",
        prerequisites=(),
        templates=(
            Template("What is the value of '{key}'?", "{table}"),
            Template("Look up '{key}' in the table.", "{table}"),
            Template("Given {table}, what is '{key}'?"),
        ),
        sample=lambda rng: _sample_table(rng, n_queries=1),
        answer=lambda a: str(lookup_value(a["table"], a["key"])),
        mistakes=lambda a: [str(value) for _, value in a["table"]],
    ),
    # Composed categories: answers are literally prerequisite functions applied in order.
    CategorySpec(
        name="reverse_upper",
        description="spell a word backwards in capital letters (reverse, then upper)",
        prerequisites=("reverse", "upper"),
        templates=(
            Template("Reverse this word and write it in capital letters.", "{word}"),
            Template("Write the word backwards in uppercase.", "{word}"),
            Template('Spell "{word}" in reverse order using capital letters.'),
        ),
        sample=_sample_word,
        answer=_word_answer(lambda w: to_upper(reverse_word(w))),
        mistakes=lambda a: [
            reverse_word(a["word"]),  # forgot the upper step
            to_upper(a["word"]),  # forgot the reverse step
            *_adjacent_swaps(to_upper(reverse_word(a["word"]))),
        ],
        case_sensitive=True,
    ),
    CategorySpec(
        name="sort_reverse",
        description="sort a word's letters from z to a (sort, then reverse)",
        prerequisites=("sort", "reverse"),
        templates=(
            Template("Sort the letters alphabetically, then reverse them.", "{word}"),
            Template("Put the letters in reverse alphabetical order.", "{word}"),
            Template('Arrange the letters of "{word}" from z to a.'),
        ),
        sample=_sample_word,
        answer=_word_answer(lambda w: reverse_word(sort_letters(w))),
        mistakes=lambda a: [
            sort_letters(a["word"]),  # forgot the reverse step
            reverse_word(a["word"]),  # forgot the sort step
            *_adjacent_swaps(reverse_word(sort_letters(a["word"]))),
        ],
    ),
    CategorySpec(
        name="add_compare",
        description="give the larger of a sum and a third number (add, then compare)",
        prerequisites=("add", "compare"),
        templates=(
            Template(
                "Add the first two numbers, then give the larger of the sum and the third number.",
                "{a} {b} {c}",
            ),
            Template("Which is bigger: {a} plus {b}, or {c}?"),
            Template(
                "Return the maximum of the sum of the first two numbers and the third.",
                "{a} + {b}, {c}",
            ),
        ),
        sample=_sample_add_compare,
        answer=lambda a: str(larger_number(add_numbers(a["a"], a["b"]), a["c"])),
        mistakes=lambda a: [
            str(min(add_numbers(a["a"], a["b"]), a["c"])),  # picked the smaller one
            str(larger_number(a["a"], a["b"])),  # forgot the add step
            *_near_misses(larger_number(add_numbers(a["a"], a["b"]), a["c"]), (-1, 1)),
        ],
    ),
    CategorySpec(
        name="lookup_add",
        description="look up two keys and add their values (lookup, then add)",
        prerequisites=("lookup", "add"),
        templates=(
            Template("What is the sum of the values of '{key}' and '{key2}'?", "{table}"),
            Template("Look up '{key}' and '{key2}' and add their values.", "{table}"),
            Template("Given {table}, what is '{key}' plus '{key2}'?"),
        ),
        sample=lambda rng: _sample_table(rng, n_queries=2),
        answer=lambda a: str(_lookup_sum(a)),
        mistakes=lambda a: [
            str(lookup_value(a["table"], a["key"])),  # forgot the add step
            str(lookup_value(a["table"], a["key2"])),
            *_near_misses(_lookup_sum(a), (-1, 1)),
        ],
    ),
)


# Knowledge categories (opt-in: not in `CATEGORIES`, so not in any default testbed). `fact` asks
# for the code of a made-up name; the codes are a fixed table (`FACT_CODES`), the same for every
# seed, like world knowledge: a model can only learn them from records that state them. The two
# composites use a fact inside a skill. Unlike a skill, a fact is not exercised by the composite's
# records in recoverable form ("code of 'bafo' plus 7" = 31 does not say the code is 24), so the
# prerequisite is one that only its own data teaches. Measured with the Beyond-IID interventions
# it still does not show as a prerequisite once dilution is removed (BUILD_NOTES, "Beyond IID").
N_FACTS = 40
MIN_CODE, MAX_CODE = 10, 50  # codes are in [MIN_CODE, MAX_CODE): a code plus an addend stays < MAX_NUMBER


def _name_sampler(names_of: Callable[[], Sequence[str]]) -> Callable[[random.Random], dict]:
    # `names_of` is called at draw time: the name tables are built further down the module.
    def sample(rng: random.Random) -> dict:
        return {"name": rng.choice(names_of())}

    return sample


_sample_fact = _name_sampler(lambda: FACT_NAMES)


def _sample_fact_add(rng: random.Random) -> dict:
    return {"name": rng.choice(FACT_NAMES), "b": rng.randrange(1, MAX_ADDEND)}


def _sample_fact_compare(rng: random.Random) -> dict:
    name = rng.choice(FACT_NAMES)
    # c uniform over the codes' range [MIN_CODE, MAX_CODE) minus the code (never a tie), so every
    # instance needs the fact: with c from [0, MAX_NUMBER), every c >= MAX_CODE is the answer
    # whatever the code, and half the instances would not depend on the fact.
    c = rng.randrange(MIN_CODE, MAX_CODE - 1)
    if c >= FACT_CODES[name]:
        c += 1
    return {"name": name, "c": c}


def _name_pair_sampler(names_of: Callable[[], Sequence[str]]) -> Callable[[random.Random], dict]:
    def sample(rng: random.Random) -> dict:
        first, second = rng.sample(names_of(), 2)
        return {"name": first, "other": second}

    return sample


def _code_and_tag(name: str) -> str:
    return f"{FACT_CODES[name]} {FACT_TAGS[name]}"


def _next_names(name: str) -> list[str]:
    """The two names after `name` in `FACT_NAMES` (whose facts make plausible wrong answers)."""
    i = FACT_NAMES.index(name)
    return [FACT_NAMES[(i + k) % len(FACT_NAMES)] for k in (1, 2)]


def _other_codes(name: str) -> list[str]:
    """Codes of the two names after `name` (a wrong fact; may equal the code)."""
    return [str(FACT_CODES[other]) for other in _next_names(name)]


_KNOWLEDGE_SPEC_LIST: tuple[CategorySpec, ...] = (
    CategorySpec(
        name="fact",
        description="recall the code of a name (a fact only data teaches)",
        prerequisites=(),
        templates=(
            Template("What is the code of '{name}'?"),
            Template("Give the code of '{name}'."),
            Template("Which number is the code of '{name}'?"),
        ),
        sample=_sample_fact,
        answer=lambda a: str(FACT_CODES[a["name"]]),
        mistakes=lambda a: [*_other_codes(a["name"]), *_near_misses(FACT_CODES[a["name"]], (-1, 1))],
        recall=True,
    ),
    CategorySpec(
        name="fact_add",
        description="add a number to the code of a name (fact, then add)",
        prerequisites=("fact", "add"),
        templates=(
            Template("What is the code of '{name}' plus {b}?"),
            Template("Add {b} to the code of '{name}'."),
            Template("Give the sum of the code of '{name}' and {b}."),
        ),
        sample=_sample_fact_add,
        answer=lambda a: str(add_numbers(FACT_CODES[a["name"]], a["b"])),
        mistakes=lambda a: [
            str(FACT_CODES[a["name"]]),  # forgot the add step
            *(str(int(code) + a["b"]) for code in _other_codes(a["name"])),  # wrong fact
            *_near_misses(add_numbers(FACT_CODES[a["name"]], a["b"]), (-1, 1)),
        ],
    ),
    CategorySpec(
        name="fact_compare",
        description="give the larger of the code of a name and a number (fact, then compare)",
        prerequisites=("fact", "compare"),
        templates=(
            Template("Which is larger: the code of '{name}' or {c}?"),
            Template("Give the bigger of {c} and the code of '{name}'."),
            Template("Return the maximum of the code of '{name}' and {c}."),
        ),
        sample=_sample_fact_compare,
        answer=lambda a: str(larger_number(FACT_CODES[a["name"]], a["c"])),
        mistakes=lambda a: [
            str(min(FACT_CODES[a["name"]], a["c"])),  # picked the smaller one
            *_near_misses(larger_number(FACT_CODES[a["name"]], a["c"]), (-1, 1)),
        ],
    ),
    CategorySpec(
        name="tag",
        description="recall the tag of a name (a second fact only data teaches)",
        prerequisites=(),
        templates=(
            Template("What is the tag of '{name}'?"),
            Template("Give the tag of '{name}'."),
            Template("Which word is the tag of '{name}'?"),
        ),
        sample=_sample_fact,
        answer=lambda a: FACT_TAGS[a["name"]],
        mistakes=lambda a: _other_tags(a["name"]),
        recall=True,
    ),
    # The split-name composites: their pool records mention only `COMPOSITE_POOL_NAMES` and their
    # held-out records only `COMPOSITE_HELD_OUT_NAMES`, so a held-out answer needs facts that only
    # the prerequisite categories' records state (see `SPLIT_NAME_COMPOSITES`).
    CategorySpec(
        name="fact_tag",
        description="give the code and the tag of a name (fact and tag; held-out names unseen in its pool)",
        prerequisites=("fact", "tag"),
        templates=(
            Template("Tag too: what is the code of '{name}'?"),
            Template("With its tag, give the code of '{name}'."),
            Template("Then the tag: which number is the code of '{name}'?"),
        ),
        sample=_name_sampler(lambda: COMPOSITE_POOL_NAMES),
        held_out_sample=_name_sampler(lambda: COMPOSITE_HELD_OUT_NAMES),
        answer=lambda a: _code_and_tag(a["name"]),
        mistakes=lambda a: [
            str(FACT_CODES[a["name"]]),  # only the code
            FACT_TAGS[a["name"]],  # only the tag
            f"{FACT_TAGS[a['name']]} {FACT_CODES[a['name']]}",  # the wrong order
            *(f"{code} {FACT_TAGS[a['name']]}" for code in _other_codes(a["name"])),  # a wrong code
        ],
    ),
    CategorySpec(
        name="fact_pair",
        description="give the codes of two names in order (fact twice; held-out names unseen in its pool)",
        prerequisites=("fact",),
        templates=(
            Template("Then the code of '{other}': what is the code of '{name}'?"),
            Template("With the code of '{other}' after it, give the code of '{name}'."),
            Template("Then that of '{other}': which number is the code of '{name}'?"),
        ),
        sample=_name_pair_sampler(lambda: COMPOSITE_POOL_NAMES),
        held_out_sample=_name_pair_sampler(lambda: COMPOSITE_HELD_OUT_NAMES),
        answer=lambda a: f"{FACT_CODES[a['name']]} {FACT_CODES[a['other']]}",
        mistakes=lambda a: [
            str(FACT_CODES[a["name"]]),  # only the first code
            f"{FACT_CODES[a['other']]} {FACT_CODES[a['name']]}",  # the wrong order
            *(f"{code} {FACT_CODES[a['other']]}" for code in _other_codes(a["name"])),  # a wrong code
        ],
    ),
)

CATEGORY_SPECS: Mapping[str, CategorySpec] = MappingProxyType(
    {s.name: s for s in _SPEC_LIST + _KNOWLEDGE_SPEC_LIST}
)
# The default categories (every testbed without an explicit `categories`); the tokenizer's word
# tokens and the alphabet come from these alone, so opting into the knowledge categories changes
# no default testbed, tokenizer or model.
CATEGORIES: tuple[str, ...] = tuple(s.name for s in _SPEC_LIST)
KNOWLEDGE_CATEGORIES: tuple[str, ...] = tuple(s.name for s in _KNOWLEDGE_SPEC_LIST)
ALL_CATEGORIES: tuple[str, ...] = CATEGORIES + KNOWLEDGE_CATEGORIES
RECALL_CATEGORIES: frozenset[str] = frozenset(s.name for s in CATEGORY_SPECS.values() if s.recall)
# Composites whose held-out records ask about names their own pool records never mention.
SPLIT_NAME_COMPOSITES: frozenset[str] = frozenset(
    s.name for s in CATEGORY_SPECS.values() if s.held_out_sample is not None
)
# The composition graph: category -> categories it composes (in application order); () for base
# categories. Every category is a key, so the mapping lists all nodes of the DAG.
CATEGORY_PREREQUISITES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {s.name: s.prerequisites for s in _SPEC_LIST + _KNOWLEDGE_SPEC_LIST}
)
CASE_SENSITIVE_CATEGORIES: frozenset[str] = frozenset(
    s.name for s in CATEGORY_SPECS.values() if s.case_sensitive
)
if set(CATEGORY_SPECS) - CASE_SENSITIVE_CATEGORIES != TESTBED_CASE_FOLDED:  # the normaliser's rule is the specs'
    raise RuntimeError("jraise.eval.normalise.TESTBED_CASE_FOLDED disagrees with the testbed's case-sensitive specs")


# --------------------------------------------------------------------------------------------
# Public helpers
# --------------------------------------------------------------------------------------------

def _template_literals(fmt: str) -> str:
    """The literal text of a `str.format` string (placeholders removed)."""
    return "".join(literal for literal, *_ in string.Formatter().parse(fmt))


def _alphabet() -> str:
    """Every character a testbed text (or its chat-formatted prompt) can contain, sorted.

    Deliberately independent of the config, so every testbed gets the same tokenizer and a model
    trained on one testbed can be evaluated on another. Covers letters, digits, all ASCII
    punctuation, space, newline, every template and the chat template's framing.
    """
    chars = set(string.ascii_letters + string.digits + string.punctuation + " \n")
    chars.update(DEGENERATE_OUTPUT, PROMPT_SEPARATOR, _format_table((("a", 0), ("b", 1))))
    chars.update(TESTBED_CHAT_TEMPLATE)
    for spec in _SPEC_LIST:
        for template in spec.templates:
            chars.update(_template_literals(template.instruction))
            chars.update(_template_literals(template.input))
    return "".join(sorted(chars))


# Not a function named test*: pytest would collect that from any test module importing it.
ALPHABET: str = _alphabet()


def _template_words() -> tuple[str, ...]:
    """The words of two or more letters in every template, sorted: the tokenizer's word tokens."""
    words = set()
    for spec in _SPEC_LIST:
        for template in spec.templates:
            for fmt in (template.instruction, template.input):
                words.update(re.findall(r"[A-Za-z]{2,}", _template_literals(fmt)))
    return tuple(sorted(words))


# The testbed tokenizer spells task text letter by letter but reads template words whole, as a
# real sub-word vocabulary would: half the tokens per example (median 53 -> 26), so twice the
# examples per second of training. Random task words are never anagrams of these (see
# `_random_word`), so no task input or answer contains one.
TEMPLATE_WORDS: tuple[str, ...] = _template_words()
_TEMPLATE_ANAGRAMS = frozenset("".join(sorted(w.lower())) for w in TEMPLATE_WORDS)


_CONSONANTS, _VOWELS = "bcdfghjklmnpqrstvwxz", "aeiou"


def _spelled_by_letters(word: str) -> bool:
    """True when `word` is no anagram of a template word: then neither it nor any reordering of it
    (reversed, sorted, ...) is a whole-word token, and the tokenizer spells it letter by letter."""
    return "".join(sorted(word)) not in _TEMPLATE_ANAGRAMS


def _fact_table() -> dict[str, int]:
    """`N_FACTS` made-up consonant-vowel names (each spelled letter by letter) with codes in
    [MIN_CODE, MAX_CODE), from a fixed stream."""
    rng = random.Random("jraise-testbed-facts")
    table: dict[str, int] = {}
    while len(table) < N_FACTS:
        name = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(2))
        if name not in table and _spelled_by_letters(name):
            table[name] = rng.randrange(MIN_CODE, MAX_CODE)
    return table


FACT_CODES: Mapping[str, int] = MappingProxyType(_fact_table())
FACT_NAMES: tuple[str, ...] = tuple(FACT_CODES)


def _tag_table() -> dict[str, str]:
    """One distinct three-letter consonant-vowel-consonant tag per name (each spelled letter by
    letter), from its own fixed stream."""
    rng = random.Random("jraise-testbed-tags")
    tags: dict[str, str] = {}
    for name in FACT_NAMES:
        while True:
            tag = rng.choice(_CONSONANTS) + rng.choice(_VOWELS) + rng.choice(_CONSONANTS)
            if tag not in tags.values() and _spelled_by_letters(tag):
                tags[name] = tag
                break
    return tags


FACT_TAGS: Mapping[str, str] = MappingProxyType(_tag_table())
# The split of the names for the split-name composites: their pool records use the first half,
# their held-out records the second half. `fact` and `tag` records (pool and held-out) use all.
COMPOSITE_POOL_NAMES: tuple[str, ...] = FACT_NAMES[: N_FACTS // 2]
COMPOSITE_HELD_OUT_NAMES: tuple[str, ...] = FACT_NAMES[N_FACTS // 2 :]


def _other_tags(name: str) -> list[str]:
    """Tags of the two names after `name` (a wrong fact; never the tag: tags are distinct)."""
    return [FACT_TAGS[other] for other in _next_names(name)]


def plausible_wrong_answer(category: str, args: Args, rng: random.Random) -> str:
    """A wrong but plausible answer of the same category (never empty, never the correct one)."""
    spec = CATEGORY_SPECS[category]
    correct = spec.answer(args)
    candidates = [m for m in dict.fromkeys(spec.mistakes(args)) if m and m != correct]
    if candidates:
        return rng.choice(candidates)
    return _substitute_one_char(correct, rng)


def _substitute_one_char(text: str, rng: random.Random) -> str:
    """`text` with one character replaced by a different one of the same kind (always differs)."""
    i = rng.randrange(len(text))
    ch = text[i]
    pool = next(
        (p for p in (string.ascii_lowercase, string.ascii_uppercase, string.digits) if ch in p),
        string.ascii_lowercase,
    )
    replacement = rng.choice([c for c in pool if c != ch])
    return text[:i] + replacement + text[i + 1 :]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestbedConfig:
    """What to generate. Lists are accepted for the tuple fields and stored as tuples.

    `categories=None` means all of `CATEGORIES`. `category_weights` (one positive number per
    category, same order) sets the pool's category mix; `None` means balanced. Pool counts per
    category are exact (largest-remainder rounding), not sampled.
    """

    __test__ = False  # the name starts with "Test"; keep pytest from collecting it

    n_train: int = 2000
    noise: float = 0.0
    seed: int = 0
    n_val_per_category: int = 8
    n_test_per_category: int = 50
    categories: tuple[str, ...] | None = None
    category_weights: tuple[float, ...] | None = None
    noise_kinds: tuple[str, ...] = NOISE_KINDS

    def __post_init__(self) -> None:
        if isinstance(self.categories, str):  # one name, not a sequence of letters
            object.__setattr__(self, "categories", (self.categories,))
        for name in ("categories", "category_weights", "noise_kinds"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        for name in ("n_train", "n_val_per_category", "n_test_per_category"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {self.noise!r}")
        names = self.category_names
        if not names:
            raise ValueError("categories must not be empty")
        unknown = [c for c in names if c not in CATEGORY_SPECS]
        if unknown:
            raise ValueError(f"unknown categories {unknown}; known: {list(ALL_CATEGORIES)}")
        if len(set(names)) != len(names):
            raise ValueError(f"categories repeat: {list(names)}")
        if self.category_weights is not None:
            if len(self.category_weights) != len(names):
                raise ValueError("category_weights needs one weight per category")
            if any(not w > 0 or not math.isfinite(w) for w in self.category_weights):
                raise ValueError(f"category_weights must be positive, got {self.category_weights}")
        if not self.noise_kinds or any(k not in NOISE_KINDS for k in self.noise_kinds):
            raise ValueError(f"noise_kinds must be a non-empty subset of {NOISE_KINDS}")

    @property
    def category_names(self) -> tuple[str, ...]:
        """The categories in use (all of `CATEGORIES` when `categories` is None)."""
        return CATEGORIES if self.categories is None else self.categories


# --------------------------------------------------------------------------------------------
# Generation (pure: no I/O, no global random state)
# --------------------------------------------------------------------------------------------


def _rng(seed: int, *purpose: object) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so streams are stable across runs and
    # platforms (unlike hash()), and independent per purpose.
    return random.Random(":".join(map(str, ("jraise-testbed", seed, *purpose))))


def _instance_key(category: str, args: Args) -> tuple:
    """Identity of a task instance, whatever template phrases it."""
    return (category, tuple(sorted(args.items())))


def _max_draws(n: int) -> int:
    # Generous for drawing most of a small space (coupon collecting needs about n*ln(n) draws),
    # while an impossible request fails in well under a second instead of looping forever.
    return 1000 + 20 * n


def _draw_instances(
    category: str, rng: random.Random, n: int, exclude: set, distinct: bool, held_out: bool = False
) -> list[tuple[dict, int]]:
    """`n` (args, template index) draws whose instances are not in `exclude`.

    With `distinct`, drawn instances are also added to `exclude` (so they are unique). With
    `held_out`, arguments come from the category's `held_out_sample` when it has one.
    """
    spec = CATEGORY_SPECS[category]
    sample = spec.held_out_sample if held_out and spec.held_out_sample is not None else spec.sample
    drawn: list[tuple[dict, int]] = []
    for _ in range(_max_draws(n)):
        if len(drawn) == n:
            break
        args = sample(rng)
        template_index = rng.randrange(len(spec.templates))
        key = _instance_key(category, args)
        if key in exclude:
            continue
        if distinct:
            exclude.add(key)
        drawn.append((args, template_index))
    if len(drawn) < n:
        raise ValueError(
            f"category {category!r}: could not draw {n} instances outside the held-out set; "
            "its instance space is too small for the requested sizes"
        )
    return drawn


def _allocate(total: int, weights: Sequence[float]) -> list[int]:
    """Splits `total` into integer parts proportional to `weights`.

    Largest-remainder rounding, ties broken by position: exact and deterministic.
    """
    quotas = [total * w / sum(weights) for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def noisy_count(n: int, noise: float) -> int:
    """How many of `n` pool records are corrupted: `noise * n` rounded half up."""
    return math.floor(noise * n + 0.5)


def _render(category: str, args: Args, template_index: int) -> tuple[str, str]:
    template = CATEGORY_SPECS[category].templates[template_index]
    fields = dict(args)
    if "table" in fields:
        fields["table"] = _format_table(fields["table"])
    return template.instruction.format(**fields), template.input.format(**fields)


def _sft_record(record_id: str, category: str, args: Args, template_index: int) -> dict:
    """A clean SFT record: output is the correct answer."""
    instruction, input_text = _render(category, args, template_index)
    answer = CATEGORY_SPECS[category].answer(args)
    return {
        "id": record_id,
        "instruction": instruction,
        "input": input_text,
        "output": answer,
        "category": category,
        "meta": {
            "category": category,
            "noisy": False,
            "noise_kind": None,
            "clean_output": answer,
            "template": template_index,
        },
    }


def _other_task_answer(index: int, pool: Sequence[dict], rng: random.Random) -> str | None:
    """The correct answer of a random other pool record (another category when possible)
    that is wrong for this record, even after normalisation; None if there is none."""
    own = pool[index]
    own_category = own["category"]
    own_answer = normalise_answer(own["meta"]["clean_output"], own_category)

    def acceptable(j: int, need_other_category: bool) -> bool:
        other = pool[j]
        return (
            j != index
            and normalise_answer(other["meta"]["clean_output"], own_category) != own_answer
            and (not need_other_category or other["category"] != own_category)
        )

    # Random probes are enough almost always; the scans make the result total and deterministic.
    for _ in range(64):
        j = rng.randrange(len(pool))
        if acceptable(j, need_other_category=True):
            return pool[j]["meta"]["clean_output"]
    start = rng.randrange(len(pool))
    for need_other_category in (True, False):
        for offset in range(len(pool)):
            j = (start + offset) % len(pool)
            if acceptable(j, need_other_category):
                return pool[j]["meta"]["clean_output"]
    return None


def _corrupt(
    index: int, kind: str, pool: Sequence[dict], args: Args, rng: random.Random
) -> tuple[str, str]:
    """(corrupted output, kind actually used) for pool record `index`."""
    clean = pool[index]["meta"]["clean_output"]
    category = pool[index]["category"]
    if kind == "truncated" and len(clean) >= 2:
        return clean[: rng.randrange(1, len(clean))], kind
    if kind == "empty":
        return DEGENERATE_OUTPUT, kind
    if kind == "other_task":
        other = _other_task_answer(index, pool, rng)
        if other is not None:
            return other, kind
    # "wrong", plus the fallback for kinds that cannot apply to this record.
    return plausible_wrong_answer(category, args, rng), "wrong"


def _held_out_draws(config: TestbedConfig) -> tuple[dict, dict, set]:
    """Per category test and val draws, and the set of their instance keys.

    A recall category's held-out records ask about the facts the pool teaches: drawn with
    repeats and left out of the exclusion set (its instance space is the `N_FACTS` names). A
    split-name composite's are drawn with repeats from its held-out names."""
    held_out_keys: set = set()
    test, val = {}, {}

    def draw(category: str, rng: random.Random, n: int) -> list[tuple[dict, int]]:
        spec = CATEGORY_SPECS[category]
        if spec.recall or spec.held_out_sample is not None:
            # Recall: the pool teaches what these ask. Split-name: their names are never in the
            # pool, so they are disjoint from it by construction. Both spaces are small (`N_FACTS`
            # or `N_FACTS // 2` names): drawn with repeats, outside the exclusion set.
            return _draw_instances(category, rng, n, set(), distinct=False, held_out=True)
        return _draw_instances(category, rng, n, held_out_keys, distinct=True, held_out=True)

    # Test first, from its own stream, so the test set depends only on seed and its size.
    for category in config.category_names:
        test[category] = draw(category, _rng(config.seed, "test", category), config.n_test_per_category)
    for category in config.category_names:
        val[category] = draw(category, _rng(config.seed, "val", category), config.n_val_per_category)
    return test, val, held_out_keys


def generate_testbed(config: TestbedConfig) -> dict[str, list[dict]]:
    """All splits of the testbed described by `config`: {"pool", "val", "val_pref", "test"}.

    Pure and deterministic: the same config always gives equal output. See the module docstring
    for record formats and the guarantees on noise and held-out disjointness.
    """
    names = config.category_names
    test_draws, val_draws, held_out = _held_out_draws(config)

    test_items = [(c, draw) for c in names for draw in test_draws[c]]
    test = [_sft_record(f"test-{i}", c, args, t) for i, (c, (args, t)) in enumerate(test_items)]
    val_items = [(c, draw) for c in names for draw in val_draws[c]]
    val = [_sft_record(f"val-{i}", c, args, t) for i, (c, (args, t)) in enumerate(val_items)]
    val_pref = []
    for i, ((category, (args, _)), record) in enumerate(zip(val_items, val)):
        rng = _rng(config.seed, "val_pref", i)
        val_pref.append(
            {
                "id": f"val_pref-{i}",
                "prompt": user_prompt(record["instruction"], record["input"]),
                "chosen": record["output"],
                "rejected": plausible_wrong_answer(category, args, rng),
                "category": category,
            }
        )

    weights = config.category_weights or (1.0,) * len(names)
    pool_items = []
    for category, count in zip(names, _allocate(config.n_train, weights)):
        rng = _rng(config.seed, "pool", category)
        draws = _draw_instances(category, rng, count, held_out, distinct=False)
        pool_items += [(category, draw) for draw in draws]
    _rng(config.seed, "pool-order").shuffle(pool_items)
    pool = [_sft_record(f"pool-{i}", c, args, t) for i, (c, (args, t)) in enumerate(pool_items)]

    # A fixed random ranking of pool positions: the first `noisy_count` are corrupted, so noisy
    # sets are nested across noise levels; kinds cycle by rank, so they are balanced.
    ranking = list(range(len(pool)))
    _rng(config.seed, "noise-order").shuffle(ranking)
    corrupted = {}
    for rank, index in enumerate(ranking[: noisy_count(len(pool), config.noise)]):
        kind = config.noise_kinds[rank % len(config.noise_kinds)]
        args = pool_items[index][1][0]
        corrupted[index] = _corrupt(index, kind, pool, args, _rng(config.seed, "noise", index))
    # Applied after all corruptions are chosen, so "other_task" always copies clean answers.
    for index, (output, kind) in corrupted.items():
        pool[index]["output"] = output
        pool[index]["meta"]["noisy"] = True
        pool[index]["meta"]["noise_kind"] = kind

    _check_disjoint(pool, [r for r in val + test if r["category"] not in RECALL_CATEGORIES])
    return {"pool": pool, "val": val, "val_pref": val_pref, "test": test}


def _check_disjoint(pool: Sequence[dict], held_out: Sequence[dict]) -> None:
    # Guaranteed by instance-level exclusion; checked on the text too because that is the
    # property evaluation relies on.
    pool_texts = {(r["instruction"], r["input"]) for r in pool}
    leaked = [r["id"] for r in held_out if (r["instruction"], r["input"]) in pool_texts]
    if leaked:
        raise RuntimeError(f"held-out records also in the pool: {leaked[:5]}")


def describe_testbed(config: TestbedConfig, splits: Mapping[str, Sequence[dict]]) -> dict:
    """The `testbed.json` manifest: config, categories, composition graph, counts, noise stats."""
    names = config.category_names
    pool = splits["pool"]
    noisy = [r for r in pool if r["meta"]["noisy"]]
    config_dict = asdict(config)
    config_dict["categories"] = list(names)
    return {
        "format": "jraise-testbed",
        "version": 1,
        "config": config_dict,
        "categories": list(names),
        "prerequisites": {c: list(CATEGORY_PREREQUISITES[c]) for c in names},
        "case_sensitive": {c: c in CASE_SENSITIVE_CATEGORIES for c in names},
        "descriptions": {c: CATEGORY_SPECS[c].description for c in names},
        "counts": {
            split: {
                "total": len(records),
                "by_category": dict(sorted(Counter(r["category"] for r in records).items())),
            }
            for split, records in splits.items()
        },
        "noise": {
            "fraction": config.noise,
            "n_noisy": len(noisy),
            "by_kind": {k: sum(r["meta"]["noise_kind"] == k for r in noisy) for k in NOISE_KINDS},
            "by_category": {c: sum(r["category"] == c for r in noisy) for c in names},
            "degenerate_output": DEGENERATE_OUTPUT,
        },
        "files": {split: f"{split}.jsonl" for split in SPLITS} | {"tokenizer": "tokenizer"},
    } | _split_names_manifest(names)


def _split_names_manifest(names: Sequence[str]) -> dict:
    """For testbeds with split-name composites, which names their pool and held-out records use."""
    split = [c for c in names if c in SPLIT_NAME_COMPOSITES]
    if not split:
        return {}
    return {"split_names": {"categories": split, "pool": list(COMPOSITE_POOL_NAMES),
                            "held_out": list(COMPOSITE_HELD_OUT_NAMES)}}


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _atomic_write_tokenizer(path: Path) -> None:
    """Builds the char tokenizer in a temp dir, then swaps it in (two renames, no partial dir)."""
    tmp = temp_sibling(path)
    old = temp_sibling(path)
    try:
        build_char_tokenizer(tmp, extra_chars=ALPHABET, chat_template=TESTBED_CHAT_TEMPLATE,
                             words=TEMPLATE_WORDS)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_testbed(
    out_dir: str | os.PathLike,
    n_train: int = 2000,
    noise: float = 0.0,
    seed: int = 0,
    n_val_per_category: int = 8,
    n_test_per_category: int = 50,
    categories: Sequence[str] | Mapping[str, float] | None = None,
) -> dict[str, Path]:
    """Generates a testbed and writes it to `out_dir`; returns the paths written.

    Files: `pool.jsonl`, `val.jsonl`, `val_pref.jsonl`, `test.jsonl`, `testbed.json` (manifest,
    see `describe_testbed`) and `tokenizer/` (character-level over `ALPHABET`, so no
    testbed text ever maps to `<unk>`, plus whole-word tokens for `TEMPLATE_WORDS`). Returned keys: the split names, "testbed", "tokenizer".

    `categories` is a list of names (balanced pool) or a {name: weight} mapping (weighted pool).
    Each file is written under a temporary name and renamed into place. An existing
    `testbed.json` is removed first and the new one is written last, so a directory holding a
    `testbed.json` always holds a complete, consistent testbed.
    """
    if isinstance(categories, Mapping):
        names, weights = tuple(categories), tuple(float(w) for w in categories.values())
    else:
        # A single name (str) is passed through whole: TestbedConfig reads it as one category.
        plain = categories is None or isinstance(categories, str)
        names, weights = (categories if plain else tuple(categories)), None
    config = TestbedConfig(
        n_train=n_train,
        noise=noise,
        seed=seed,
        n_val_per_category=n_val_per_category,
        n_test_per_category=n_test_per_category,
        categories=names,
        category_weights=weights,
    )
    splits = generate_testbed(config)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {split: out / f"{split}.jsonl" for split in SPLITS}
    paths["tokenizer"] = out / "tokenizer"
    paths["testbed"] = out / "testbed.json"
    paths["testbed"].unlink(missing_ok=True)
    for split in SPLITS:
        atomic_write_jsonl(paths[split], splits[split])
    _atomic_write_tokenizer(paths["tokenizer"])
    manifest = describe_testbed(config, splits)
    atomic_write_text(paths["testbed"], json.dumps(manifest, indent=2) + "\n")
    return paths
