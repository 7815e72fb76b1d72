"""Answer normalisers for exact match: what counts as the same answer.

A normaliser maps ``(text, category) -> canonical answer`` (None when no answer can be read off);
a prediction matches a reference when both normalise to the same non-None answer
(`answers_match`). `NORMALISERS` names them for configs and the command line:

* ``testbed``: `normalise_answer` (whitespace runs collapsed, ends stripped, case folded for the
  testbed categories whose task is not about case);
* ``gsm8k``: `gsm8k_answer` (the last number, after ``####`` when present);
* ``exact``: the decoded text unchanged;
* ``squad``: `squad_answer` (case, punctuation and articles dropped: NQ-open, TruthfulQA).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

# The testbed's categories (`jraise.testbed`) whose answers compare case-insensitively: all but
# ``upper`` and ``reverse_upper``. The testbed checks its category specs against this set.
TESTBED_CASE_FOLDED: frozenset[str] = frozenset(('add', 'add_compare', 'compare', 'count', 'fact', 'fact_add', 'fact_compare', 'fact_pair', 'fact_tag', 'first', 'last', 'length', 'lookup', 'lookup_add', 'reverse', 'sort', 'sort_reverse', 'tag'))

_WHITESPACE_RUN = re.compile(r"\s+")


def normalise_answer(answer: str, category: str | None = None) -> str:
    """Canonical form of an answer for exact-match scoring.

    Strips the ends and collapses every internal whitespace run to one space. Case is folded only
    for a testbed category whose task does not concern case (`TESTBED_CASE_FOLDED`: every one but
    ``upper`` and ``reverse_upper``, where the capitals are the point). With no category, or one
    the testbed does not have, comparison stays case-sensitive (the strict choice for data from
    elsewhere).
    """
    text = _WHITESPACE_RUN.sub(" ", answer).strip()
    if category in TESTBED_CASE_FOLDED:
        text = text.casefold()
    return text


# A number as people write it: optional sign, digits with thousands commas, optional decimals.
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")
GSM8K_ANSWER_MARK = "####"


def gsm8k_answer(text: str) -> str | None:
    """The final numeric answer in ``text``, canonical, or None when there is no number.

    Takes the text after the last ``####`` when present (GSM8K's reference format), then the last
    number in it; drops thousands commas, a leading '+', and trailing decimal zeros, so "1,234.50"
    and "1234.5" agree and "72.00" is "72".
    """
    if GSM8K_ANSWER_MARK in text:
        text = text.rsplit(GSM8K_ANSWER_MARK, 1)[1]
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    number = numbers[-1].replace(",", "").lstrip("+")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return "0" if number in ("-0", "") else number


def _testbed(text: str, category: str | None) -> str:
    return normalise_answer(text, category)


def _gsm8k(text: str, category: str | None) -> str | None:
    return gsm8k_answer(text)


def _exact(text: str, category: str | None) -> str:
    return text


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = re.compile(r"[^\w\s]")


def squad_answer(text: str, category: str | None = None) -> str:
    """SQuAD's answer normalisation (Rajpurkar et al. 2016; the NQ-open metric): lower case,
    punctuation removed, the articles a / an / the removed, whitespace runs collapsed."""
    text = _PUNCTUATION.sub(" ", text.casefold())
    return " ".join(_ARTICLES.sub(" ", text).split())


# name -> normaliser(text, category) -> canonical answer, or None (the module docstring).
NORMALISERS: Mapping[str, Callable[[str, str | None], str | None]] = {
    "testbed": _testbed,
    "gsm8k": _gsm8k,
    "exact": _exact,
    "squad": squad_answer,
}

Normaliser = str | Callable[[str, str | None], str | None]


def resolve_normaliser(normaliser: Normaliser) -> Callable[[str, str | None], str | None]:
    if callable(normaliser):
        return normaliser
    if normaliser not in NORMALISERS:
        raise ValueError(f"unknown answer normaliser {normaliser!r}; known: {', '.join(NORMALISERS)}")
    return NORMALISERS[normaliser]


def answers_match(prediction: str, reference: str, category: str | None = None, normaliser: Normaliser = "testbed") -> bool:
    """Whether the normalised prediction equals the normalised reference.

    A reference with no readable answer (the normaliser gives None) is never matched, so two
    answer-less texts do not count as agreeing.
    """
    norm = resolve_normaliser(normaliser)
    ref = norm(reference, category)
    return ref is not None and norm(prediction, category) == ref
