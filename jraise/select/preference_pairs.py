"""Few-shot preference pairs from right answers and a model's own mistakes.

ROSE scores the pool against the gradient of a preference loss on a few validation pairs
(prompt, chosen, rejected). Where a user has few-shot examples with right answers but no ranked
pairs, this module makes the pairs: chosen = the record's reference answer, rejected = what the
model (the base model that will be fine-tuned) answers by greedy decoding. A record the model
already answers right (under the exact-match normaliser) gives no preference and is skipped, as is
one the model answers with nothing. An answer is cut at ``max_new_tokens``: set it to cover a whole
answer of the task, or the rejected side also differs by being cut short.

Why the model's own answers (BUILD_NOTES, "ROSE validation pairs"): the contrast
``grad log pi(y_l|x) - grad log pi(y_w|x)`` of a pair then points from the model's habit on the
task to the task's answer, a direction every pair of the subtask shares; with a hand-made near miss
(a right answer with one letter changed) each pair's contrast is specific to its two letters, and
the subtask's mean has almost no task direction.

Writing the pairs of a validation file (``jraise pairs``) is
`jraise.jobs.preference_pairs.write_model_answer_pairs`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from jraise.eval import metrics, normalise
from jraise.eval.report import (
    check_prompt_lengths,
    greedy_completions,
    normaliser_name,
    prompt_messages,
    prompt_token_ids,
    prompt_token_limit,
    record_category,
    record_where,
    reference_answer,
)

SKIP_REASONS = ("correct", "empty", "over-long")


def _pair_prompt(messages: list[dict]) -> str | list[dict]:
    """One user turn as a plain string (the usual preference-file shape), else the message list."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return messages


def model_answer_pairs(model, tokenizer, records: Sequence[dict], *, max_new_tokens: int = 32, batch_size: int = 16,
                       normaliser: normalise.Normaliser = "testbed", source: str = "records",
                       require_pairs: bool = True, max_len: int | None = None,
                       skip_bad: bool = False) -> tuple[list[dict], dict]:
    """Preference pairs ``{"id"?, "prompt", "chosen", "rejected", "category"?}`` from SFT ``records``:
    chosen = the reference answer, rejected = ``model``'s greedy answer (outer whitespace stripped).

    Returns ``(pairs, report)``; the report counts records, pairs and skipped records per category
    and lists the skipped records' indices by reason (`SKIP_REASONS`). Pairs keep the records' order,
    ``id`` and ``category``. A record without a prompt or with a blank reference is an error naming
    ``source``, the record and the field; so is a set that yields no pair at all, unless
    ``require_pairs`` is False. A prompt longer than ``max_len`` (None: the model's
    ``max_position_embeddings``) less ``max_new_tokens`` is never generated from: an error naming
    the record and its prompt field, or with ``skip_bad`` a record skipped as ``"over-long"``.
    """
    if not records:
        raise ValueError(f"{source}: no records to make preference pairs from")
    prompts, references = [], []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{source}: record index {i}: expected a dict, got {type(record).__name__}")
        prompts.append(prompt_messages(record, record_where(source, i, record)))
        reference = reference_answer(record, record_where(source, i, record))
        if not reference.strip():
            raise ValueError(f"{record_where(source, i, record, 'output')}: the reference answer is blank")
        references.append(reference)
    prompt_ids = prompt_token_ids(tokenizer, prompts)
    limit = prompt_token_limit(model, max_len, max_new_tokens)
    kept = check_prompt_lengths(prompt_ids, limit, records, range(len(records)), source, skip_bad)
    generated = greedy_completions(model, tokenizer, [prompt_ids[k] for k in kept], max_new_tokens, batch_size,
                                   desc="model answers", max_prompt_len=limit)
    answers: list[str | None] = [None] * len(records)
    for k, answer in zip(kept, generated):
        answers[k] = answer
    norm = normalise.resolve_normaliser(normaliser)
    pairs, skipped = [], {reason: [] for reason in SKIP_REASONS}
    per_category: dict[str, Counter] = {}
    for i, (record, messages, reference, answer) in enumerate(zip(records, prompts, references, answers)):
        category = record_category(record)
        counts = per_category.setdefault(metrics.category_key(category), Counter())
        counts["records"] += 1
        rejected = answer.strip() if answer is not None else None
        reason = ("over-long" if rejected is None else "empty" if not rejected
                  else "correct" if normalise.answers_match(rejected, reference, category, norm) else None)
        if reason is not None:
            skipped[reason].append(i)
            counts[reason] += 1
            continue
        pair = {"prompt": _pair_prompt(messages), "chosen": reference, "rejected": rejected}
        if record.get("id") not in (None, ""):
            pair = {"id": record["id"], **pair}
        if category is not None:
            pair["category"] = category
        pairs.append(pair)
        counts["pairs"] += 1
    if not pairs and require_pairs:
        raise ValueError(f"{source}: no preference pair: the model answers all {len(records)} records right "
                         f"({len(skipped['correct'])}) or with nothing ({len(skipped['empty'])})"
                         + (f", or their prompts are too long ({len(skipped['over-long'])})"
                            if skipped["over-long"] else ""))
    shown = [r for r in SKIP_REASONS if r != "over-long" or skipped[r]]  # over-long only with skip_bad
    report = {"source": source, "n_records": len(records), "n_pairs": len(pairs), "skipped": skipped,
              "per_category": {c: {k: n[k] for k in ("records", "pairs", *shown)}
                               for c, n in sorted(per_category.items())},
              "max_new_tokens": max_new_tokens, "max_prompt_tokens": limit,
              "normaliser": normaliser_name(normaliser)}
    return pairs, report
