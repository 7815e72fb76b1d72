"""Running evaluations over files, record lists and pools, and writing the results as JSON.

Three kinds (`KINDS`), each over the records it applies to:

* ``loss``: mean response-token NLL per category (`jraise.eval.metrics.loss_summary`), on the
  records without ``options``, tokenised exactly as for training (`jraise.data.pool.load_pool`:
  same chat template, loss mask and EOS handling), batched in length buckets.
* ``exact_match``: greedy generation from the chat-formatted prompt
  (``add_generation_prompt=True``), decoded with ``skip_special_tokens=True`` and compared with
  the reference after a normaliser (`jraise.eval.normalise.NORMALISERS`), on the records without
  ``options``.
* ``multiple_choice``: records with ``options`` (a list of strings) and ``answer`` (the index, or
  the text of one option); each option is scored as the assistant reply to the prompt and the
  highest-scoring option is the prediction.

Record fields. The prompt is ``messages`` (a trailing assistant message is the reference, not
prompt), else ``instruction`` (+ ``input``, joined as in training), else ``prompt`` (a string or
a message list), else ``question``. The exact-match reference is ``reference``, else ``output``,
else ``response``, else a string ``answer``, else the trailing assistant message. ``category``
and ``id`` are optional.

Option scoring. The option text is rendered as the assistant turn with the chat template and the
whole conversation is tokenised once (``add_special_tokens=False``), as the data loader does; the
option's tokens are those whose first character lies in the option text. By default the EOS the
template writes right after the reply is scored too (``include_eos=True``): the score is then the
probability that the reply is exactly the option and ends there, which is what the model was
trained to produce, and an option that is a prefix of another ("1" vs "12") no longer wins just
by being shorter. Length normalisation divides by the number of scored tokens (EOS included when
scored).

Shapes stay static: every batch has ``batch_size`` rows (padding rows, never reported, fill the
last one, even when there are fewer examples than that, so small evaluations reuse the compiled
programs of large ones); scoring batches are right-padded to a few length buckets
(`jraise.data.batching.length_buckets`: multiples of `BUCKET_QUANTUM` fitted to the lengths), and
generation batches are left-padded to a few prompt-length buckets, a padding row being a
one-token prompt. Examples are sorted by length first so a batch's rows are close in length.
Multiple choice runs each question's shared prompt once (`jraise.eval.shared_prefix`: a KV-cache
prefill, then only the options' own tokens, about ``batch_size`` option rows per batch); the
whole-sequence path above stays one keyword away (``shared_prefix=False``) and gives the same
numbers up to float rounding.
"""

from __future__ import annotations

import json
import numbers
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from jraise.atomic import atomic_write_text
from jraise.data.batching import iterate_batches, length_buckets, partial_group_rows, pick_bucket
from jraise.data.formats import TemplateError, encode_rendered, read_records, render_conversation
from jraise.data.pool import InstructionPool, load_pool, skipped_summary
from jraise.data.records import Conversation, Location, RecordError, SourceRecord, user_prompt
from jraise.eval import metrics, normalise
from jraise.eval.shared_prefix import batch_sums, plan_batches, scatter
from jraise.loglik import eval_view, per_example_sums
from jraise.model.generate import generate, left_pad

KINDS = ("loss", "exact_match", "multiple_choice")
FORMAT_VERSION = 1  # of the JSON report
PROGRESS_MIN_BATCHES = 4  # more batches than this get a progress bar (on a terminal)
_TOKENISE_CHUNK = 512  # texts per batched tokenizer call
BUCKET_QUANTUM = 16  # bucket lengths are multiples of this
DEFAULT_MAX_LEN = 2048  # the file-level jobs' and the CLI's max_len, unless the model's context is shorter


# ----------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class LossOptions:
    """``batch_size`` rows per batch; ``max_len`` tokens per example (None: the model's
    ``max_position_embeddings``; longer records are an error, as in `load_pool`)."""

    batch_size: int = 16
    max_len: int | None = None
    n_buckets: int = 4

    def __post_init__(self):
        _check_positive(batch_size=self.batch_size, n_buckets=self.n_buckets)


@dataclass(frozen=True)
class ExactMatchOptions:
    """Greedy decoding of at most ``max_new_tokens`` tokens, ``batch_size`` prompts at a time,
    answers compared after ``normaliser`` (a `normalise.NORMALISERS` name or a callable
    ``(text, category) -> str | None``). ``max_len``: the longest prompt plus ``max_new_tokens``
    (None: the model's ``max_position_embeddings``); a longer prompt is never generated from: it
    is an error naming the record and field (`check_prompt_lengths`), or with ``skip_bad`` the
    record is left out and listed under ``"skipped"``."""

    max_new_tokens: int = 32
    batch_size: int = 16
    normaliser: normalise.Normaliser = "testbed"
    n_buckets: int = 4
    max_len: int | None = None
    skip_bad: bool = False

    def __post_init__(self):
        _check_positive(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, n_buckets=self.n_buckets)
        if self.max_len is not None:
            _check_positive(max_len=self.max_len)
        normalise.resolve_normaliser(self.normaliser)  # fail now, not after the generation


@dataclass(frozen=True)
class MultipleChoiceOptions:
    """``batch_size`` option sequences per batch; see the module docstring for ``include_eos``
    and ``length_normalise``."""

    batch_size: int = 16
    length_normalise: bool = False
    include_eos: bool = True
    n_buckets: int = 4

    def __post_init__(self):
        _check_positive(batch_size=self.batch_size, n_buckets=self.n_buckets)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Records: prompts, references, options


def record_where(source: str, index: int, record: dict, field: str | None = None) -> str:
    ident = f" (id {record['id']!r})" if isinstance(record, dict) and record.get("id") not in (None, "") else ""
    return f"{source}: record index {index}{ident}" + (f": field {field!r}" if field else "")


def _message_list(value, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: expected a non-empty list of messages")
    out = []
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: every message needs string 'role' and 'content'")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _nonblank(record: dict, field: str) -> str | None:
    value = record.get(field)
    return value if isinstance(value, str) and value.strip() else None


def prompt_messages(record: dict, where: str = "record") -> list[dict]:
    """The chat messages to prompt with (see the module docstring for the field order)."""
    if record.get("messages") is not None:
        messages = _message_list(record["messages"], f"{where}: field 'messages'")
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # the reply to be predicted, not part of the prompt
        if not messages:
            raise ValueError(f"{where}: field 'messages': nothing before the assistant reply to prompt with")
        return messages
    if _nonblank(record, "instruction"):
        return [{"role": "user", "content": user_prompt(record["instruction"], record.get("input") or "")}]
    if isinstance(record.get("prompt"), list):
        return _message_list(record["prompt"], f"{where}: field 'prompt'")
    for field in ("prompt", "question"):
        if _nonblank(record, field):
            return [{"role": "user", "content": record[field]}]
    raise ValueError(f"{where}: no prompt: expected 'messages', 'instruction', 'prompt' or 'question'")


def prompt_field(record: dict) -> str:
    """The field `prompt_messages` takes the prompt from (for messages naming it)."""
    if record.get("messages") is not None:
        return "messages"
    if _nonblank(record, "instruction"):
        return "instruction"
    if isinstance(record.get("prompt"), list) or _nonblank(record, "prompt"):
        return "prompt"
    return "question"


def reference_answers(record: dict, where: str = "record") -> list[str]:
    """Every accepted exact-match answer: the record's ``references`` list when it has one (a
    prediction matching any of them is right, as NQ-open scores), else `reference_answer`."""
    listed = record.get("references")
    if isinstance(listed, list) and listed and all(isinstance(r, str) for r in listed):
        return list(listed)
    return [reference_answer(record, where)]


def reference_answer(record: dict, where: str = "record") -> str:
    """The exact-match reference (see the module docstring for the field order)."""
    for field in ("reference", "output", "response", "answer"):
        if isinstance(record.get(field), str):
            return record[field]
    messages = record.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        return str(messages[-1].get("content", ""))
    raise ValueError(f"{where}: no reference answer: expected 'reference', 'output', 'response', 'answer' "
                     "or a final assistant message")


def choice_options(record: dict, where: str = "record") -> tuple[list[str], int]:
    """(options, index of the right one) of a multiple-choice record."""
    options = record.get("options")
    if not isinstance(options, list) or not options or not all(isinstance(o, str) and o for o in options):
        raise ValueError(f"{where}: field 'options': expected a non-empty list of non-empty strings")
    answer = record.get("answer")
    if isinstance(answer, numbers.Integral) and not isinstance(answer, bool):
        if not 0 <= answer < len(options):
            raise ValueError(f"{where}: field 'answer': index {answer} out of range for {len(options)} options")
        return options, int(answer)
    if isinstance(answer, str):
        if answer not in options:
            raise ValueError(f"{where}: field 'answer': {answer!r} is not one of the options")
        return options, options.index(answer)
    raise ValueError(f"{where}: field 'answer': expected an option index or an option's text, got {answer!r}")


def record_category(record: dict) -> str | None:
    category = record.get("category")
    return category if isinstance(category, str) and category else None


def _record_id(record: dict) -> str | None:
    value = record.get("id")
    return None if value in (None, "") else str(value)


class _RaiseOnProblem:
    """`read_records` asks its problem log to reject bad lines; evaluation never skips data."""

    def reject(self, err: RecordError) -> None:
        raise err


def load_eval_sources(path: str | os.PathLike) -> list[SourceRecord]:
    """Every record of a data file with its location (file, index, line), unchanged."""
    sources, _ = read_records(path, _RaiseOnProblem())
    return sources


def load_eval_records(path: str | os.PathLike) -> list[dict]:
    """Every record of a data file, unchanged (any format `jraise.data.formats` reads)."""
    return [source.record for source in load_eval_sources(path)]


# ----------------------------------------------------------------------------------------------
# Batching helpers


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _progress(n_batches: int, desc: str):
    from tqdm.auto import tqdm

    # None: shown only on a terminal, so logs and CI stay clean (as the data loader does).
    return tqdm(total=n_batches, desc=desc, unit="batch", disable=True if n_batches <= PROGRESS_MIN_BATCHES else None)


def _buckets(lengths: Sequence[int], n_buckets: int) -> tuple[int, ...]:
    # Multiples of BUCKET_QUANTUM fitted to the lengths, so evaluations of different files (or
    # checkpoints) mostly share compiled shapes instead of each compiling its own.
    return length_buckets(lengths, n_buckets=n_buckets, quantum=BUCKET_QUANTUM)


PARTIAL_BATCH_MULTIPLE = 8  # a partial last batch is padded to a multiple of this many rows


def _batch_rows(n: int, batch_size: int) -> int:
    """Rows of a batch holding ``n`` real rows: `partial_group_rows` with `PARTIAL_BATCH_MULTIPLE`
    (3 test prompts in a 32-row batch cost 10x their own work)."""
    return partial_group_rows(n, batch_size, PARTIAL_BATCH_MULTIPLE)


def _right_padded(rows: Sequence[tuple[np.ndarray, np.ndarray]], n_rows: int, length: int, pad_id: int):
    """input_ids, attention_mask, score_mask [n_rows, length]; missing rows stay all padding."""
    ids = np.full((n_rows, length), pad_id, np.int32)
    attention = np.zeros((n_rows, length), np.int32)
    score = np.zeros((n_rows, length), np.float32)
    for r, (tokens, mask) in enumerate(rows):
        ids[r, : len(tokens)] = tokens
        attention[r, : len(tokens)] = 1
        score[r, : len(tokens)] = mask
    return ids, attention, score


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token id; load it with load_tokenizer")
    return int(pad)


# ----------------------------------------------------------------------------------------------
# Loss


def evaluate_loss(model, pool: InstructionPool, options: LossOptions = LossOptions(), keep_predictions: bool = False,
                  record_index: Sequence[int] | None = None) -> dict:
    """Response-token NLL of every pool example, summarised per category (`metrics.loss_summary`).

    ``record_index[i]`` is the index reported for pool example i (default: i).
    """
    if len(pool) == 0:
        raise ValueError(f"{pool.source}: no examples to evaluate")
    order = np.argsort(pool.lengths, kind="stable")  # similar lengths together: less padding
    rows = options.batch_size
    buckets = _buckets(pool.lengths, options.n_buckets)
    graphdef, state = metrics.split_for_eval(model)
    with _progress(-(-len(pool) // rows), "loss") as bar:

        def score(batch):
            bar.update(1)
            return metrics.response_nll_sums(graphdef, state, batch)

        sum_nll, n_tokens = per_example_sums(iterate_batches(pool, order, rows, buckets), score, len(pool))
    result = metrics.loss_summary(sum_nll, n_tokens, pool.categories)
    result["averaging"] = {"per_example": "mean over examples of each example's mean token NLL",
                           "per_token": "total NLL / total response tokens"}
    if keep_predictions:
        index = np.arange(len(pool)) if record_index is None else np.asarray(record_index)
        result["examples"] = [
            {"index": int(index[i]), "id": pool.ids[i], "category": pool.categories[i], "sum_nll": float(sum_nll[i]),
             "n_tokens": int(n_tokens[i]), "loss": metrics.finite_or_none(sum_nll[i] / n_tokens[i]) if n_tokens[i] else None}
            for i in range(len(pool))
        ]
    return result


def _write_jsonl(records: Sequence[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def _user_locations(text: str, tmp: Path, where) -> str:
    """``text`` with every ``<tmp>: line N`` (a line of the temporary copy) replaced by
    ``where(N - 1)``, the user's record, and any other mention of ``tmp`` by ``where(None)``."""
    text = re.sub(re.escape(str(tmp)) + r": line (\d+)", lambda m: where(int(m.group(1)) - 1), text)
    return text.replace(str(tmp), where(None))


def _pool_of(records: Sequence[dict], record_index: Sequence[int], tokenizer, max_len: int, source: str,
             locations: Sequence[Location] | None = None, skip_bad: bool = False) -> InstructionPool:
    """The records tokenised as for training, via a temporary JSON-lines copy (the pool loader
    reads files). Errors and skip reports name the user's records, never the copy: with
    ``locations`` (records read from a file) their file and line or index, else ``source`` and
    the record index in the evaluated data."""

    def where(copy_index: int | None) -> str:
        if copy_index is None:
            return source
        i = record_index[copy_index]
        return str(locations[i]) if locations is not None else record_where(source, i, records[i])

    with tempfile.TemporaryDirectory(prefix="jraise-eval-") as tmp:
        path = Path(tmp) / "records.jsonl"
        _write_jsonl([records[i] for i in record_index], path)
        try:
            pool = load_pool(path, tokenizer, max_len=max_len, skip_bad=skip_bad)
        except RecordError as err:
            detail = _user_locations(err.detail, path, where)
            if locations is not None:
                i = record_index[err.location.index]
                raise RecordError(locations[i], err.field, err.reason, detail) from None
            raise ValueError(f"{where(err.location.index)}"
                             + (f": field {err.field!r}" if err.field else "") + f": {err.reason}: {detail}") from None
        except (ValueError, OSError) as err:
            if str(path) not in str(err):
                raise
            raise ValueError(_user_locations(str(err), path, where)) from None
    report = pool.report
    if report is not None and report.n_skipped:
        problems = tuple(replace(p, file=source, message=_user_locations(p.message, path, where),
                                 line=locations[record_index[p.index]].line if locations is not None else None,
                                 index=record_index[p.index]) for p in report.problems)
        report = replace(report, source=source, problems=problems)
    return replace(pool, source=source, report=report)


# ----------------------------------------------------------------------------------------------
# Exact match


def prompt_token_ids(tokenizer, conversations: Sequence[list[dict]]) -> list[list[int]]:
    """Chat-formatted prompts ending in the assistant header, tokenised without added specials
    (the template writes any BOS it wants)."""
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations]
    ids = []
    for chunk in _chunks(texts, _TOKENISE_CHUNK):
        ids.extend(tokenizer(list(chunk), add_special_tokens=False)["input_ids"])
    return [list(map(int, seq)) for seq in ids]


def _stop_ids(model, tokenizer) -> tuple[int, ...]:
    """The model config's EOS ids plus the tokenizer's EOS, which ends every templated reply."""
    ids = list(model.config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return tuple(dict.fromkeys(ids))


def greedy_completions(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 16,
                       n_buckets: int = 4, desc: str = "generating", max_prompt_len: int | None = None) -> list[str]:
    """Greedy replies to token-id prompts, decoded with ``skip_special_tokens=True``, in order.

    Prompts are sorted by length and left-padded to a few length buckets; a partial last batch is
    filled up to `_batch_rows` with one-token padding prompts, whose outputs are dropped. A prompt
    longer than ``max_prompt_len`` (None: the model's ``max_position_embeddings`` less
    ``max_new_tokens``) is refused before anything is generated; callers check lengths first to
    name the record.
    """
    if not prompts:
        return []
    if min(len(p) for p in prompts) == 0:
        raise ValueError("an empty prompt cannot be decoded")
    limit = prompt_token_limit(model, None, max_new_tokens) if max_prompt_len is None else max_prompt_len
    longest = max(range(len(prompts)), key=lambda k: len(prompts[k]))
    if len(prompts[longest]) > limit:
        raise ValueError(f"prompt {longest} is {len(prompts[longest])} tokens, past the {limit} a prompt may have")
    pad_id, eos = _pad_id(tokenizer), _stop_ids(model, tokenizer)
    lengths = [len(p) for p in prompts]
    buckets = _buckets(lengths, n_buckets)
    order = np.argsort(lengths, kind="stable")
    rows = batch_size
    view = eval_view(model)
    texts: list[str | None] = [None] * len(prompts)
    with _progress(-(-len(prompts) // rows), desc) as bar:
        for chunk in _chunks(order, rows):
            seqs = [list(prompts[i]) for i in chunk] + [[pad_id]] * (_batch_rows(len(chunk), rows) - len(chunk))
            ids, mask = left_pad(seqs, pad_id, length=pick_bucket(max(lengths[i] for i in chunk), buckets))
            out = generate(view, ids, mask, max_new_tokens, eos_token_ids=eos, pad_token_id=pad_id)
            tokens, n_new = np.asarray(out.tokens), np.asarray(out.lengths)
            for r, i in enumerate(chunk):
                texts[i] = tokenizer.decode(tokens[r, : n_new[r]].tolist(), skip_special_tokens=True)
            bar.update(1)
    return texts


def normaliser_name(normaliser: normalise.Normaliser) -> str:
    return normaliser if isinstance(normaliser, str) else getattr(normaliser, "__name__", "custom")


def default_max_len(model) -> int:
    """`DEFAULT_MAX_LEN`, or the model's ``max_position_embeddings`` when that is smaller: what the
    CLI and the file-level jobs bound sequences by unless told otherwise (memory grows with it)."""
    return min(DEFAULT_MAX_LEN, int(model.config.max_position_embeddings))


def prompt_token_limit(model, max_len: int | None, max_new_tokens: int) -> int:
    """The longest prompt that may be generated from: ``max_len`` (None: the model's
    ``max_position_embeddings``) less ``max_new_tokens``; an error when nothing is left."""
    total = model.config.max_position_embeddings if max_len is None else max_len
    if total - max_new_tokens < 1:
        raise ValueError(f"max_len {total} leaves no room for a prompt before max_new_tokens {max_new_tokens}")
    return total - max_new_tokens


def check_prompt_lengths(prompt_ids: Sequence[Sequence[int]], limit: int, records: Sequence[dict],
                         record_index: Sequence[int], source: str, skip_bad: bool = False) -> list[int]:
    """Positions (into ``prompt_ids``) of the prompts of at most ``limit`` tokens. A longer one is
    an error naming ``source``, the record, its prompt field and the lengths, unless ``skip_bad``:
    then it is only left out (the caller reports ``record_index`` of the others)."""
    kept = []
    for k, ids in enumerate(prompt_ids):
        if len(ids) <= limit:
            kept.append(k)
        elif not skip_bad:
            i = record_index[k]
            raise ValueError(f"{record_where(source, i, records[i], prompt_field(records[i]))}: over-long: the prompt is "
                             f"{len(ids)} tokens, past the {limit} a prompt may have (max_len less max_new_tokens); "
                             "raise --max-len, or leave such records out with --skip-bad")
    return kept


def evaluate_exact_match(model, tokenizer, records: Sequence[dict], options: ExactMatchOptions = ExactMatchOptions(),
                         keep_predictions: bool = False, record_index: Sequence[int] | None = None,
                         source: str = "records") -> dict:
    """Greedy-generation exact match of ``records[i]`` for i in ``record_index`` (default: all).
    Prompts past ``options.max_len`` are errors or, with ``options.skip_bad``, left out and
    listed (record indices) under ``"skipped"`` ``{"over-long": [...]}``."""
    record_index = list(range(len(records))) if record_index is None else list(record_index)
    if not record_index:
        raise ValueError(f"{source}: no records to evaluate by exact match")
    prompts, references, categories = [], [], []
    for i in record_index:
        record = records[i]
        prompts.append(prompt_messages(record, record_where(source, i, record)))
        references.append(reference_answers(record, record_where(source, i, record)))
        categories.append(record_category(record))
    prompt_ids = prompt_token_ids(tokenizer, prompts)
    limit = prompt_token_limit(model, options.max_len, options.max_new_tokens)
    kept = check_prompt_lengths(prompt_ids, limit, records, record_index, source, options.skip_bad)
    kept_set = set(kept)
    skipped = [i for k, i in enumerate(record_index) if k not in kept_set]
    if not kept:
        raise ValueError(f"{source}: every prompt is past the {limit} tokens a prompt may have; raise --max-len")
    record_index = [record_index[k] for k in kept]
    references, categories = [references[k] for k in kept], [categories[k] for k in kept]
    texts = greedy_completions(model, tokenizer, [prompt_ids[k] for k in kept], options.max_new_tokens,
                               options.batch_size, options.n_buckets, desc="exact match", max_prompt_len=limit)
    norm = normalise.resolve_normaliser(options.normaliser)
    correct = [any(normalise.answers_match(t, r, c, norm) for r in refs)
               for t, refs, c in zip(texts, references, categories)]
    result = metrics.accuracy_summary(correct, categories)
    result["normaliser"] = normaliser_name(options.normaliser)
    if skipped:
        result["skipped"] = {"over-long": skipped}
    if keep_predictions:
        result["examples"] = [
            {"index": i, "id": _record_id(records[i]), "category": c, "prediction": t, "reference": refs[0],
             "normalised_prediction": norm(t, c), "normalised_reference": norm(refs[0], c), "correct": bool(ok),
             **({"references": refs} if len(refs) > 1 else {})}
            for i, t, refs, c, ok in zip(record_index, texts, references, categories, correct)
        ]
    return result


# ----------------------------------------------------------------------------------------------
# Multiple choice


def _option_sequences(tokenizer, prompt: list[dict], choices: Sequence[str], include_eos: bool, where: str):
    """Rendered texts and scored character spans of each option as the assistant reply."""
    context = tuple((m["role"], m["content"]) for m in prompt)
    rendered = []
    for option in choices:
        conversation = Conversation((*context, ("assistant", option)), len(context), "prompt", "options")
        try:
            item = render_conversation(tokenizer, conversation)
        except TemplateError as err:
            raise ValueError(f"{where}: field 'options': {err}") from err
        if not include_eos:  # the span is the option text, then the EOS the template wrote after it
            start = item.loss_spans[-1][0]
            item = replace(item, loss_spans=((start, start + len(option)),))
        rendered.append(item)
    return rendered


def option_log_probs(model, tokenizer, prompts: Sequence[list[dict]], choices: Sequence[Sequence[str]],
                     include_eos: bool = True, batch_size: int = 16, n_buckets: int = 4,
                     wheres: Sequence[str] | None = None, *,
                     shared_prefix: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Summed log-prob and scored-token count of every option of every question, flattened in
    question order, with ``offsets`` [Q+1] (question q's options are rows offsets[q]:offsets[q+1]).

    With ``shared_prefix`` (the default) each question's common token prefix is run once and only
    the options' own tokens per option (`jraise.eval.shared_prefix`); otherwise every option is
    scored as a whole sequence in ``batch_size``-row batches. Both give the same numbers up to
    float rounding.
    """
    wheres = wheres or [f"question {q}" for q in range(len(prompts))]
    rendered, offsets = [], [0]
    for prompt, opts, where in zip(prompts, choices, wheres):
        rendered.extend(_option_sequences(tokenizer, prompt, opts, include_eos, where))
        offsets.append(len(rendered))
    sequences = []
    for chunk in _chunks(rendered, _TOKENISE_CHUNK):
        enc = tokenizer([r.text for r in chunk], add_special_tokens=False, return_offsets_mapping=True)
        for r, ids, offs in zip(chunk, enc["input_ids"], enc["offset_mapping"]):
            encoded = encode_rendered(r, ids, offs)
            sequences.append((encoded.tokens, encoded.loss_mask.astype(np.float32)))
    owner = np.repeat(np.arange(len(prompts)), np.diff(offsets))
    for row, (_, mask) in enumerate(sequences):
        if not mask.any():
            raise ValueError(f"{wheres[owner[row]]}: field 'options': option {row - offsets[owner[row]]} "
                             "has no tokens of its own to score (it merges into the prompt's last token)")
    sums, counts = np.zeros(len(sequences)), np.zeros(len(sequences))
    graphdef, state = metrics.split_for_eval(model)
    pad_id = _pad_id(tokenizer)
    if shared_prefix:
        batches = plan_batches(sequences, offsets, pad_id, batch_size, n_buckets, BUCKET_QUANTUM)
        with _progress(len(batches), "multiple choice") as bar:
            for batch in batches:
                scatter(batch, *batch_sums(graphdef, state, batch), sums, counts)
                bar.update(1)
        return sums, counts, np.asarray(offsets)
    lengths = [len(tokens) for tokens, _ in sequences]
    buckets = _buckets(lengths, n_buckets)
    order = np.argsort(lengths, kind="stable")
    rows = batch_size
    with _progress(-(-len(sequences) // rows), "multiple choice") as bar:
        for chunk in _chunks(order, rows):
            length = pick_bucket(max(lengths[i] for i in chunk), buckets)
            ids, attention, score = _right_padded([sequences[i] for i in chunk], _batch_rows(len(chunk), rows),
                                                  length, pad_id)
            s, n = metrics.scored_sums(graphdef, state, ids, attention, score)
            sums[chunk], counts[chunk] = np.asarray(s)[: len(chunk)], np.asarray(n)[: len(chunk)]
            bar.update(1)
    return sums, counts, np.asarray(offsets)


def evaluate_multiple_choice(model, tokenizer, records: Sequence[dict],
                             options: MultipleChoiceOptions = MultipleChoiceOptions(), keep_predictions: bool = False,
                             record_index: Sequence[int] | None = None, source: str = "records") -> dict:
    """Option log-likelihood accuracy of ``records[i]`` for i in ``record_index`` (default: all)."""
    record_index = list(range(len(records))) if record_index is None else list(record_index)
    if not record_index:
        raise ValueError(f"{source}: no records with 'options' to evaluate by multiple choice")
    prompts, choices, answers, categories, wheres = [], [], [], [], []
    for i in record_index:
        record, where = records[i], record_where(source, i, records[i])
        opts, answer = choice_options(record, where)
        prompts.append(prompt_messages(record, where))
        choices.append(opts)
        answers.append(answer)
        categories.append(record_category(record))
        wheres.append(where)
    sums, counts, offsets = option_log_probs(model, tokenizer, prompts, choices, options.include_eos,
                                             options.batch_size, options.n_buckets, wheres)
    scores = metrics.option_scores(sums, counts, options.length_normalise)
    predicted = metrics.choose_options(scores, offsets)
    correct = predicted == np.asarray(answers)
    result = metrics.accuracy_summary(correct, categories)
    result["length_normalised"] = options.length_normalise
    result["include_eos"] = options.include_eos
    if keep_predictions:
        result["examples"] = [
            {"index": i, "id": _record_id(records[i]), "category": categories[q], "prediction": int(predicted[q]),
             "answer": answers[q], "correct": bool(correct[q]),
             "scores": [float(x) for x in scores[offsets[q] : offsets[q + 1]]],
             "n_tokens": [int(x) for x in counts[offsets[q] : offsets[q + 1]]]}
            for q, i in enumerate(record_index)
        ]
    return result


# ----------------------------------------------------------------------------------------------
# Everything together


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Writes ``obj`` as strict JSON to a temp file beside ``path``, then renames it into place,
    so a reader never sees half a file and a failed write leaves any old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"  # fail before touching disk
    return atomic_write_text(path, text)


def _as_records(data) -> tuple[list[dict], str, InstructionPool | None, list[Location] | None]:
    """(records, source name, the pool when given one, each record's location when read from a file)."""
    if isinstance(data, InstructionPool):
        return list(data.records), data.source, data, None
    if isinstance(data, (str, os.PathLike)):
        sources = load_eval_sources(data)
        return [s.record for s in sources], str(data), None, [s.location for s in sources]
    records = list(data)
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ValueError(f"records: record index {bad}: expected a dict, got {type(records[bad]).__name__}")
    return records, "records", None, None


def _kept_indices(pool: InstructionPool, records: Sequence[dict], record_index: Sequence[int]) -> list[int]:
    """The record indices of a pool's examples: ``record_index``, less the records that
    ``skip_bad`` dropped (the pool keeps the others' order and their records unchanged)."""
    if len(pool) == len(record_index):
        return list(record_index)
    kept, position = [], 0
    for i in record_index:
        if position < len(pool) and pool.records[position] == records[i]:
            kept.append(i)
            position += 1
    return kept


def evaluate(
    model,
    tokenizer,
    data: str | os.PathLike | Sequence[dict] | InstructionPool,
    kinds: Sequence[str] = ("loss", "exact_match"),
    max_new_tokens: int = 32,
    batch_size: int = 16,
    out_path: str | os.PathLike | None = None,
    *,
    max_len: int | None = None,
    normaliser: normalise.Normaliser = "testbed",
    length_normalise: bool = False,
    include_eos: bool = True,
    keep_predictions: bool = False,
    skip_bad: bool = False,
) -> dict:
    """Runs the evaluations ``kinds`` (see `KINDS`) on a data file, a record list or a pool.

    Returns a JSON-ready dict: ``{"format_version", "source", "n_records", "kinds", "config",
    <kind>: {"overall": {...}, "per_category": {...}, ...}}``, with per-example ``examples`` under
    each kind when ``keep_predictions``. ``loss`` and ``exact_match`` use the records without
    ``options``; ``multiple_choice`` those with. A requested kind with no records to run on is
    an error. With ``out_path`` the dict is also written there atomically.

    ``max_len`` (None: the model's ``max_position_embeddings``) bounds a loss record's tokens and
    an exact-match prompt plus ``max_new_tokens``. A record past it, or otherwise bad, is an error
    naming the user's file and record, unless ``skip_bad``: then it is left out of that kind and
    listed under the kind's ``"skipped"``.
    """
    kinds = tuple(dict.fromkeys(kinds))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown or no evaluation kinds {unknown or list(kinds)}; choose from {', '.join(KINDS)}")
    loss_options = LossOptions(batch_size, max_len if max_len is not None else model.config.max_position_embeddings)
    em_options = ExactMatchOptions(max_new_tokens, batch_size, normaliser, max_len=max_len, skip_bad=skip_bad)
    mc_options = MultipleChoiceOptions(batch_size, length_normalise, include_eos)
    records, source, pool, locations = _as_records(data)
    plain = [i for i, r in enumerate(records) if r.get("options") is None]
    choice = [i for i, r in enumerate(records) if r.get("options") is not None]
    config = {"loss": asdict(loss_options), "exact_match": asdict(em_options), "multiple_choice": asdict(mc_options)}
    config["exact_match"]["normaliser"] = normaliser_name(normaliser)
    result = {"format_version": FORMAT_VERSION, "source": source, "n_records": len(records), "kinds": list(kinds),
              "config": {kind: config[kind] for kind in kinds}}
    if "loss" in kinds:
        if pool is None:
            if not plain:
                raise ValueError(f"{source}: no records without 'options' to compute the loss on")
            pool = _pool_of(records, plain, tokenizer, loss_options.max_len, source, locations, skip_bad)
            loss_index = _kept_indices(pool, records, plain)
        else:
            loss_index = list(range(len(pool)))
        result["loss"] = evaluate_loss(model, pool, loss_options, keep_predictions, loss_index)
        skipped = skipped_summary(pool)
        if skipped is not None:
            result["loss"]["skipped"] = skipped
    if "exact_match" in kinds:
        result["exact_match"] = evaluate_exact_match(model, tokenizer, records, em_options, keep_predictions, plain, source)
    if "multiple_choice" in kinds:
        result["multiple_choice"] = evaluate_multiple_choice(model, tokenizer, records, mc_options, keep_predictions,
                                                             choice, source)
    if out_path is not None:
        write_json_atomic(out_path, result)
    return result
