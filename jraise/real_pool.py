"""A real instruction pool with planted noise, built from the real evaluation sets in the cache.

`write_real_pool` reads the converted evaluation sets (`jraise.fetch.fetch_eval_data`: one JSONL
per source set, records laid out as in `jraise.fetch.eval_sets`) and writes a directory:

* ``pool.jsonl``: the training pool, ``{id, category, instruction, output}`` per record, one
  category per source set, in a seeded order. No ``options``, ``answer`` or ``reference`` field:
  those would reveal which outputs are wrong.
* ``val.jsonl``: `n_val` clean SFT records per target category (same fields as the pool).
* ``val_pref.jsonl``: one preference pair per ``val`` record, ``{id, category, prompt, chosen,
  rejected}`` with the ``val`` record's id; ``chosen`` is the right answer, ``rejected`` a wrong
  option (multiple choice) or another pool record's answer of the same category that differs from
  the right one (generative sets; for ASDiv a different number).
* ``test.jsonl``: `n_test` records per target category and `n_test_other` (default 0) per other
  category, as in the source (``options``/``answer`` for multiple choice,
  ``reference``/``references`` for generative sets).
* ``val_other.jsonl`` (only when `n_val_other` > 0): `n_val_other` clean SFT records per
  non-target category, for methods that measure every category (Beyond IID's Gamma). Selectors
  told about the target task read ``val.jsonl`` only.
* ``noise.jsonl``: the truth about the planted noise, ``{id, category, kind, clean_output}`` per
  noisy pool record. No selector may read it.
* ``real_pool.json``: the manifest (seed, targets, noise, length policy, cap, counts per category,
  noise counts per kind, the source manifest's sha256).

Rules:

* Length policy: a record is kept only when its instruction and output together are at most
  `max_tokens` tokens of `tokenizer` (counted separately, without special tokens or the chat
  template), or, with no tokenizer, at most `max_chars` characters. It applies to every split,
  so the held-out records are drawn from the same length range as the pool.
* Held-out records: per target category, the length-passing records in a seeded order; the first
  `n_val` with distinct content go to ``val``, the next `n_test` to ``test``; per other category
  likewise `n_val_other` to ``val_other`` and `n_test_other` to ``test``.
* Disjointness by content (`content_key`: the question text, i.e. passage and question without
  the option lines and the answer-format line, case-folded, punctuation and spacing dropped): no
  two held-out records share a key, and no pool record, of any category, shares a key with a
  held-out one. A question repeated with other options or under another id is therefore never
  both trained on and tested.
* Cap: at most `per_category` pool records per category (the first in the seeded order); a
  target category's cap is `per_target` when given (a pool whose target share is small, so that
  random selection seldom draws a target record).
* Noise: exactly ``round(noise * n_pool)`` pool records, chosen by the seed, get a wrong output.
  The kinds cycle through `NOISE_KINDS` over the chosen records: ``wrong_option`` (another option
  of a multiple-choice record; for a numeric set a number one or two units of its last digit
  away), ``other_answer`` (the clean answer of another pool record of the same category) and
  ``truncated`` (the answer cut after half its words: a strict prefix). When a kind cannot apply
  (a one-word answer cannot be truncated; a generative record has no options) the record falls
  back along `FALLBACKS` and ``noise.jsonl`` names the kind used. A wrong output never equals the
  right answer or, for generative sets, any accepted reference, after `answer_key`.
* Determinism: every random choice comes from a generator seeded by ``(seed, purpose)``, so the
  same arguments give byte-identical files.

The directory is built under a temporary name beside `out_dir` and renamed into place whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import unicodedata
import zlib
from collections.abc import Collection, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np

from jraise.atomic import atomic_write_jsonl, atomic_write_text
from jraise.eval.normalise import gsm8k_answer, squad_answer
from jraise.fetch.eval_sets import INSTRUCTIONS
from jraise.fetch.packages import publish_directory

DEFAULT_TARGETS = ("asdiv", "boolq", "piqa")  # the command's; the study chose its own by measurement (`jraise.study_real`)
DEFAULT_NOISE = 0.2
N_VAL = 8
N_TEST = 300
MAX_TOKENS = 384  # SmolLM2 tokens of instruction + output
MAX_CHARS = 1536  # the character limit without a tokenizer: about 384 tokens at ~4 characters each
PER_CATEGORY_CAP = 300  # pool records per category: 13 sets -> a pool of at most 3,900

NOISE_KINDS = ("wrong_option", "other_answer", "truncated")
FALLBACKS = {
    "wrong_option": ("other_answer",),
    "other_answer": ("wrong_option",),
    "truncated": ("wrong_option", "other_answer"),
}
SOURCE_KINDS = ("mc", "gen")  # manifest kinds of the evaluation sets; few-shot files ("sft") are skipped
TRAINING_FIELDS = ("id", "category", "instruction", "output")
SPLITS = ("pool", "val", "val_pref", "test", "noise")
MANIFEST = "real_pool.json"
SOURCE_MANIFEST = "manifest.json"

_WORD = re.compile(r"\w+")
_NON_SPACE = re.compile(r"\S+")
_ANSWER_FORMAT_LINES = tuple(INSTRUCTIONS.values())


# ----------------------------------------------------------------------------------------------
# Record-level rules (pure)


def seeded_rng(seed: int, *purpose: str) -> np.random.Generator:
    """A generator that depends only on `seed` and the `purpose` strings."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng([seed, *(zlib.crc32(p.encode("utf-8")) for p in purpose)])


def question_text(record: dict) -> str:
    """The instruction without its answer-format line and, for multiple choice, its option lines."""
    text = record["instruction"].rstrip()
    for line in _ANSWER_FORMAT_LINES:
        if text.endswith(line):
            text = text[: -len(line)].rstrip()
            break
    options = record.get("options")
    if options:
        option_lines = "\n".join(f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(options))
        if text.endswith(option_lines):
            text = text[: -len(option_lines)].rstrip()
    return text


def content_key(record: dict) -> str:
    """The record's question as compared for disjointness: `question_text`, NFKC, case-folded,
    reduced to its word characters separated by single spaces."""
    return " ".join(_WORD.findall(unicodedata.normalize("NFKC", question_text(record)).casefold()))


def answer_key(text: str, normaliser: str | None) -> str | None:
    """An answer as compared for "is it the right one": the number for ``"gsm8k"`` sets (None when
    there is none), else `squad_answer` (case folded, punctuation and articles dropped, spacing
    collapsed).

    At least as coarse as every exact-match normaliser of `jraise.eval.metrics`, so answers that
    differ here differ there too.
    """
    if normaliser == "gsm8k":
        return gsm8k_answer(text)
    return squad_answer(text)


def right_answer_keys(record: dict, normaliser: str | None) -> set:
    """Keys of every answer that counts as right: the output, and a generative set's references."""
    texts = [record["output"], *([record["reference"]] if "reference" in record else []), *record.get("references", ())]
    return {answer_key(t, normaliser) for t in texts}


def record_lengths(records: Sequence[dict], tokenizer=None) -> list[int]:
    """Instruction plus output length per record: tokens of `tokenizer` (no special tokens, no chat
    template), or characters when `tokenizer` is None."""
    if tokenizer is None:
        return [len(r["instruction"]) + len(r["output"]) for r in records]
    if not records:
        return []
    ids_of = [tokenizer([r[field] for r in records], add_special_tokens=False)["input_ids"]
              for field in ("instruction", "output")]
    return [len(a) + len(b) for a, b in zip(*ids_of)]


def permuted(records: Sequence[dict], rng: np.random.Generator) -> list[dict]:
    """`records` in a random order drawn from `rng`."""
    return [records[i] for i in rng.permutation(len(records))]


def split_held_out(records: Sequence[dict], n_val: int, n_test: int, taken: Collection[str] = ()
                   ) -> tuple[list[dict], list[dict], list[dict]]:
    """(val, test, rest) of one category, taken in the given order.

    The first `n_val` records with distinct `content_key`s not in `taken` (other categories'
    held-out content) are val, the next `n_test` test; rest is every other record, in order (it may
    still share content with a held-out one: see `without_content`). Raises ValueError when there
    are not enough such records.
    """
    val, test, rest, seen = [], [], [], set(taken)
    for record in records:
        key = content_key(record)
        if key in seen:
            rest.append(record)
        elif len(val) < n_val:
            val.append(record)
        elif len(test) < n_test:
            test.append(record)
        else:
            rest.append(record)
        seen.add(key)
    if len(val) < n_val or len(test) < n_test:
        category = records[0]["category"] if records else "?"
        raise ValueError(f"{category}: {len(val) + len(test)} records with distinct content are left after the "
                         f"length policy, fewer than n_val + n_test = {n_val + n_test}")
    return val, test, rest


def without_content(records: Sequence[dict], keys: set[str]) -> list[dict]:
    """The records whose `content_key` is not in `keys`, in order."""
    return [r for r in records if content_key(r) not in keys]


def training_record(record: dict) -> dict:
    """The fields a selector and a trainer may see: id, category, instruction, output."""
    return {field: record[field] for field in TRAINING_FIELDS}


def category_answers(records: Sequence[dict]) -> dict[str, list[str]]:
    """{category: its records' distinct clean outputs, sorted} (the "another record's answer" choices)."""
    answers: dict[str, set[str]] = {}
    for record in records:
        answers.setdefault(record["category"], set()).add(record["output"])
    return {category: sorted(texts) for category, texts in answers.items()}


def _pick(choices: Sequence[str], rng: np.random.Generator) -> str | None:
    return choices[int(rng.integers(len(choices)))] if choices else None


def near_miss_number(answer: str, rng: np.random.Generator) -> str | None:
    """A different number near `answer` (one or two units of its last digit away, not negative when
    `answer` is not), in canonical `gsm8k_answer` form; None when `answer` is not a number."""
    try:
        value = Decimal(answer)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    step = Decimal(1).scaleb(min(value.as_tuple().exponent, 0))
    offsets = [k for k in (-2, -1, 1, 2) if value < 0 or value + k * step >= 0]
    return gsm8k_answer(format(value + offsets[int(rng.integers(len(offsets)))] * step, "f"))


def wrong_option(record: dict, rng: np.random.Generator, normaliser: str | None = None) -> str | None:
    """A wrong answer of the record's own kind: another option (multiple choice) or, for a numeric
    (``"gsm8k"``) set, `near_miss_number`; None for other generative records."""
    right = right_answer_keys(record, normaliser)
    if normaliser == "gsm8k":
        text = near_miss_number(record["output"], rng)
        return text if text is not None and answer_key(text, normaliser) not in right else None
    options = record.get("options") or ()
    return _pick([o for o in options if answer_key(o, normaliser) not in right], rng)


def other_answer(record: dict, answers: Sequence[str], rng: np.random.Generator,
                 normaliser: str | None = None) -> str | None:
    """One of `answers` (other records' answers of the category) that is not a right answer of
    `record`; None when every one is."""
    right = right_answer_keys(record, normaliser)
    return _pick([a for a in answers if answer_key(a, normaliser) not in right], rng)


def truncated_answer(record: dict, normaliser: str | None = None) -> str | None:
    """The output cut after half its words (rounded down, at least one): a strict prefix of it.

    None for a one-word answer, or when the prefix is itself a right answer.
    """
    words = list(_NON_SPACE.finditer(record["output"]))
    if len(words) < 2:
        return None
    text = record["output"][: words[len(words) // 2 - 1].end()]
    return None if answer_key(text, normaliser) in right_answer_keys(record, normaliser) else text


def corrupted_answer(record: dict, kind: str, answers: Sequence[str], rng: np.random.Generator,
                     normaliser: str | None = None) -> tuple[str, str] | None:
    """(wrong output, kind used): `kind` first, then its `FALLBACKS`; None when no kind applies."""
    for candidate in (kind, *FALLBACKS[kind]):
        if candidate == "wrong_option":
            text = wrong_option(record, rng, normaliser)
        elif candidate == "other_answer":
            text = other_answer(record, answers, rng, normaliser)
        else:
            text = truncated_answer(record, normaliser)
        if text is not None:
            return text, candidate
    return None


def noisy_count(noise: float, n_pool: int) -> int:
    """How many pool records get a wrong answer: ``round(noise * n_pool)``."""
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise!r}")
    return round(noise * n_pool)


def plant_noise(records: Sequence[dict], n_noisy: int, rng: np.random.Generator,
                normalisers: Mapping[str, str | None] | None = None) -> tuple[list[dict], list[dict]]:
    """(records with exactly `n_noisy` outputs made wrong, their truth).

    Records are visited in a random order; the i-th one that can be corrupted gets kind
    ``NOISE_KINDS[i % 3]`` (or a fallback, see `corrupted_answer`), until `n_noisy` are. "Another
    record's answer" comes from the clean outputs of `records` of the same category. The truth is
    ``{id, category, kind, clean_output}`` per noisy record, in record order. `normalisers` maps a
    category to its set's answer normaliser (`answer_key`); records are copied, not changed.
    """
    normalisers = normalisers or {}
    answers = category_answers(records)
    noisy: dict[int, tuple[str, str]] = {}
    for position in rng.permutation(len(records)):
        if len(noisy) == n_noisy:
            break
        record = records[position]
        kind = NOISE_KINDS[len(noisy) % len(NOISE_KINDS)]
        result = corrupted_answer(record, kind, answers[record["category"]], rng, normalisers.get(record["category"]))
        if result is not None:
            noisy[int(position)] = result
    if len(noisy) < n_noisy:
        raise ValueError(f"only {len(noisy)} of {len(records)} records can be given a wrong answer; {n_noisy} asked")
    out, truth = [], []
    for position, record in enumerate(records):
        if position in noisy:
            text, kind = noisy[position]
            out.append({**record, "output": text})
            truth.append({"id": record["id"], "category": record["category"], "kind": kind,
                          "clean_output": record["output"]})
        else:
            out.append(dict(record))
    return out, truth


def preference_pair(record: dict, answers: Sequence[str], rng: np.random.Generator,
                    normaliser: str | None = None) -> dict:
    """``{id, category, prompt, chosen, rejected}``: chosen is the right answer; rejected a wrong
    option (multiple choice) or `other_answer` (generative). Raises ValueError when there is none."""
    if record.get("options"):
        rejected = wrong_option(record, rng, normaliser)
    else:
        rejected = other_answer(record, answers, rng, normaliser)
    if rejected is None:
        raise ValueError(f"{record['id']}: no wrong answer to reject")
    return {"id": record["id"], "category": record["category"], "prompt": record["instruction"],
            "chosen": record["output"], "rejected": rejected}


# ----------------------------------------------------------------------------------------------
# The pool (records in, splits and counts out)


def _check_arguments(sources: Mapping[str, Sequence[dict]], targets: Sequence[str], noise: float, n_val: int,
                     n_test: int, per_category: int | None, n_val_other: int = 0, n_test_other: int = 0,
                     per_target: int | None = None) -> None:
    unknown = [t for t in targets if t not in sources]
    if unknown:
        raise ValueError(f"unknown target categories {unknown}; known: {', '.join(sources)}")
    if not targets or len(set(targets)) != len(targets):
        raise ValueError(f"targets must name distinct categories, at least one; got {list(targets)}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise!r}")
    if n_val < 0 or n_test < 1:
        raise ValueError(f"need n_val >= 0 and n_test >= 1, got {n_val} and {n_test}")
    for name, cap in (("per_category", per_category), ("per_target", per_target)):
        if cap is not None and cap < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {cap}")
    if n_val_other < 0 or n_test_other < 0:
        raise ValueError(f"need n_val_other >= 0 and n_test_other >= 0, got {n_val_other} and {n_test_other}")


def build_real_pool(
    sources: Mapping[str, Sequence[dict]],
    *,
    targets: Sequence[str],
    normalisers: Mapping[str, str | None] | None = None,
    noise: float = DEFAULT_NOISE,
    seed: int = 0,
    n_val: int = N_VAL,
    n_test: int = N_TEST,
    per_category: int | None = PER_CATEGORY_CAP,
    lengths: Mapping[str, Sequence[int]] | None = None,
    max_length: int | None = None,
    n_val_other: int = 0,
    n_test_other: int = 0,
    per_target: int | None = None,
) -> tuple[dict[str, list[dict]], dict[str, dict[str, int]]]:
    """The splits (`SPLITS`) and per-category counts of a pool built from `sources`.

    `sources` maps a category to its source records; `lengths` (same shape) and `max_length` give
    the length policy (None: keep every record). Counts per category: ``source``, ``too_long``,
    ``val``, ``test``, ``same_content_as_held_out`` (pool candidates dropped for disjointness),
    ``over_cap``, ``pool``, ``noisy``. The splits include ``val_other`` only when `n_val_other` > 0.
    A target category's cap is `per_target` when given, else `per_category`.
    """
    _check_arguments(sources, targets, noise, n_val, n_test, per_category, n_val_other, n_test_other, per_target)
    counts: dict[str, dict[str, int]] = {}
    candidates: dict[str, list[dict]] = {}
    val, val_other, test, held_keys = [], [], [], set()
    for category, records in sources.items():
        kept = list(records)
        if max_length is not None and lengths is not None:
            kept = [r for r, n in zip(records, lengths[category]) if n <= max_length]
        ordered = permuted(kept, seeded_rng(seed, "order", category))
        if category in targets:
            cat_val, cat_test, candidates[category] = split_held_out(ordered, n_val, n_test, held_keys)
            val += cat_val
        elif n_val_other or n_test_other:
            cat_val, cat_test, candidates[category] = split_held_out(ordered, n_val_other, n_test_other, held_keys)
            val_other += cat_val
        else:
            cat_val, cat_test, candidates[category] = [], [], ordered
        test += cat_test
        held_keys |= {content_key(r) for r in cat_val + cat_test}
        counts[category] = {"source": len(records), "too_long": len(records) - len(kept),
                            "val": len(cat_val), "test": len(cat_test)}

    clean_pool = []
    for category, records in candidates.items():
        disjoint = without_content(records, held_keys)
        cap = per_target if category in targets and per_target is not None else per_category
        capped = disjoint if cap is None else disjoint[:cap]
        counts[category] |= {"same_content_as_held_out": len(records) - len(disjoint),
                             "over_cap": len(disjoint) - len(capped), "pool": len(capped)}
        clean_pool += capped
    clean_pool = permuted(clean_pool, seeded_rng(seed, "pool"))

    pool, truth = plant_noise(clean_pool, noisy_count(noise, len(clean_pool)), seeded_rng(seed, "noise"), normalisers)
    for category in counts:
        counts[category]["noisy"] = sum(t["category"] == category for t in truth)

    answers = category_answers(clean_pool)
    pref_rng = seeded_rng(seed, "val_pref")
    val_pref = [preference_pair(r, answers.get(r["category"], ()), pref_rng, (normalisers or {}).get(r["category"]))
                for r in val]
    splits = {"pool": [training_record(r) for r in pool], "val": [training_record(r) for r in val],
              "val_pref": val_pref, "test": test, "noise": truth}
    if n_val_other:
        splits["val_other"] = [training_record(r) for r in val_other]
    return splits, counts


# ----------------------------------------------------------------------------------------------
# Files (the study-level job)


def read_sources(eval_data_dir: str | os.PathLike, categories: Sequence[str] | None = None
                 ) -> tuple[dict[str, list[dict]], dict[str, str | None], str]:
    """({category: records}, {category: normaliser}, sha256 of the source manifest) of the evaluation
    sets in `eval_data_dir` (every multiple-choice and generative file of its manifest, in manifest
    order, or only `categories`)."""
    directory = Path(eval_data_dir)
    manifest_bytes = (directory / SOURCE_MANIFEST).read_bytes()
    files = json.loads(manifest_bytes)["files"]
    available = {name.removesuffix(".jsonl"): info for name, info in files.items() if info.get("kind") in SOURCE_KINDS}
    chosen = list(available) if categories is None else list(categories)
    missing = [c for c in chosen if c not in available]
    if missing:
        raise ValueError(f"{directory}: no evaluation set named {missing}; available: {', '.join(available)}")
    sources, normalisers = {}, {}
    for category in chosen:
        with open(directory / f"{category}.jsonl", encoding="utf-8") as f:
            sources[category] = [json.loads(line) for line in f if line.strip()]
        normalisers[category] = available[category].get("normaliser")
    return sources, normalisers, hashlib.sha256(manifest_bytes).hexdigest()


def _tokenizer_name(tokenizer) -> str:
    return Path(str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)).name


def _publish(tmp: Path, out: Path) -> None:
    """Renames the finished `tmp` to `out`. An existing `out` is replaced when it is empty or an
    earlier real pool (it holds `MANIFEST`); any other existing path is refused."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise FileExistsError(f"{out}: a non-empty directory that is not a real pool; not replacing it")
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
        os.replace(out, old / out.name)
        try:
            publish_directory(tmp, out)
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        publish_directory(tmp, out)


def write_real_pool(
    out_dir: str | os.PathLike,
    *,
    eval_data_dir: str | os.PathLike,
    targets: Sequence[str] = DEFAULT_TARGETS,
    noise: float = DEFAULT_NOISE,
    seed: int = 0,
    n_val: int = N_VAL,
    n_test: int = N_TEST,
    per_category: int | None = PER_CATEGORY_CAP,
    max_tokens: int = MAX_TOKENS,
    max_chars: int = MAX_CHARS,
    tokenizer=None,
    categories: Sequence[str] | None = None,
    n_val_other: int = 0,
    n_test_other: int = 0,
    per_target: int | None = None,
) -> dict[str, Path]:
    """Builds the real pool from the evaluation sets in `eval_data_dir` and writes it to `out_dir`.

    Returns {split: path} for `SPLITS` plus "manifest". The length limit is `max_tokens` tokens of
    `tokenizer` when one is given, else `max_chars` characters; `per_category` None means no cap,
    `per_target` (None: `per_category`) caps the target categories;
    `categories` restricts the source sets (default: all); `n_val_other` / `n_test_other` hold out
    records of the non-target categories too (``val_other.jsonl``; ``test.jsonl``). The same
    arguments give byte-identical files. The directory appears whole (built beside `out_dir`, then renamed); an existing
    `out_dir` is replaced only when it is empty or an earlier real pool.
    """
    sources, normalisers, source_sha = read_sources(eval_data_dir, categories)
    lengths = {category: record_lengths(records, tokenizer) for category, records in sources.items()}
    max_length = max_tokens if tokenizer is not None else max_chars
    splits, counts = build_real_pool(sources, targets=tuple(targets), normalisers=normalisers, noise=noise,
                                     seed=seed, n_val=n_val, n_test=n_test, per_category=per_category,
                                     lengths=lengths, max_length=max_length, n_val_other=n_val_other,
                                     n_test_other=n_test_other, per_target=per_target)
    written = [split for split in (*SPLITS, "val_other") if split in splits]
    kinds_used = {kind: sum(t["kind"] == kind for t in splits["noise"]) for kind in NOISE_KINDS}
    manifest = {
        "seed": seed,
        "targets": list(targets),
        "noise": noise,
        "n_val": n_val,
        "n_test": n_test,
        **({"n_val_other": n_val_other, "n_test_other": n_test_other} if n_val_other or n_test_other else {}),
        "per_category": per_category,
        **({"per_target": per_target} if per_target is not None else {}),
        "length_policy": {
            "unit": "tokens" if tokenizer is not None else "characters",
            "max": max_length,
            "tokenizer": _tokenizer_name(tokenizer) if tokenizer is not None else None,
            "measured": "instruction + output, without special tokens or chat template",
            "applies_to": "pool, val and test",
        },
        "pool": len(splits["pool"]),
        "noisy": len(splits["noise"]),
        "noise_kinds": kinds_used,
        "categories": counts,
        "source": {"dir": Path(eval_data_dir).name, "manifest_sha256": source_sha},
        "files": {split: f"{split}.jsonl" for split in written},
    }

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        for split in written:
            atomic_write_jsonl(tmp / f"{split}.jsonl", splits[split])
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**{split: out / f"{split}.jsonl" for split in written}, "manifest": out / MANIFEST}
