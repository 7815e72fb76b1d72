"""The ``less-tulu`` record format: LESS's own tokenisation of instruction records.

`jraise.data.formats` renders every record through the tokenizer's chat template. The LESS paper
(Xia et al., 2024; princeton-nlp/LESS, which takes it from allenai/open-instruct) does not: it
writes the Tulu turn markers itself, calls the tokenizer with its special tokens on, and finds
the untrained tokens by counting the tokens of text prefixes. ``record_format="less-tulu"``
(`jraise.data.pool.load_pool`, `jraise.data.formats.load_encoded`) reproduces those rules, for
the training records (``side="train"``: the pool, a warmup or a training run) and for the few-shot
validation records (``side="validation"``: the ``--val`` set of ``select less``). Record shapes,
validation, ids and categories are those of `jraise.data.formats`; only the text, the tokens and
the loss mask differ. Preference pairs have no LESS rendering (``kind="preference"`` is refused).

Train side (LESS ``encode_with_messages_format`` / ``concat_messages``)
-----------------------------------------------------------------------
The record becomes a message list first: a chat record's ``messages`` as they are, an Alpaca
record ``[user: instruction (+ "\\n\\n" + input when not empty), assistant: output]``, a
prompt/response record ``[user: prompt, assistant: response]``. Each message is written as

    system:     "<|system|>\\n"    + content.strip() + "\\n"
    user:       "<|user|>\\n"      + content.strip() + "\\n"
    assistant:  "<|assistant|>\\n" + content.strip() + EOS + "\\n"

(EOS is ``tokenizer.eos_token``, ``</s>`` for Llama-2; ``strip()`` removes all surrounding
whitespace; any other role is a ``bad-messages`` record) and the pieces are concatenated into
``text``. The tokens are ``tokenizer(text)["input_ids"]``: special tokens on, so a Llama-2
tokenizer puts ``<s>`` first (whatever the tokenizer's post-processor adds, and nothing else).

The loss mask counts tokens of prefixes, as LESS does, rather than locating characters. Let
``n(s) = len(tokenizer(s)["input_ids"])`` and ``render(m)`` the concatenation above of the
messages ``m``. For every message k that is not the assistant's, the tokens
``[start_k, end_k)`` are untrained, with ``start_0 = 0`` and ``start_k = n(render(messages[:k]))``,
``end_k = n(render(messages[:k+1]) + "<|assistant|>\\n")`` when message k+1 is the assistant's, else
``n(render(messages[:k+1]))``. Every other token is trained: each assistant content, its EOS and
the tokens of the ``"\\n"`` written after the EOS (with the Llama-2 tokenizer, which puts ``"▁"``
before the text that follows a special token, ``"</s>\\n"`` is the three tokens ``</s> ▁ <0x0A>``
and all three are trained), up to where the next non-assistant message's count starts. Where the
tokenizer merges characters across a prefix's end the counts, not the characters, decide (LESS's
behaviour). ``loss_mask[0]`` is always 0 (`jraise.data.formats`' convention; LESS's label there
is never used either, since a causal LM predicts token t from t-1).

Validation side (LESS ``get_validation_dataset.py``, ``chat_format="tulu"``)
----------------------------------------------------------------------------
A validation record is one user turn and its answer: ``prompt`` + ``response``, ``instruction``
(+ ``input``) + ``output``, or ``messages`` = [user, assistant] (anything else is a
``bad-messages`` record), plus an optional ``answer_prefix`` string (absent or null: ``""``).
Nothing is stripped: the record's strings are LESS's pieces verbatim. With ``U`` the user text,
``P`` the answer prefix and ``R`` the response,

    query = "<|user|>\\n" + U + "\\n<|assistant|>\\n" + P        completion = R

the tokens are ``tokenizer(query + R)["input_ids"]`` (``<s>`` first, no EOS anywhere) and the
first ``n(query)`` tokens are untrained: the answer prefix is context in the query, the answer
tokens are trained. LESS's three validation sets as records (``category`` = subject, language or
task, as LESS groups them):

* MMLU: ``prompt`` = LESS's ``gen_prompt`` text (the header, the question, the choices and the
  closing ``"\\nAnswer:"``), ``answer_prefix`` = ``"The answer is:"``, ``response`` = ``" " + letter``.
* TydiQA: ``prompt`` = the instruction + passage + question text without its final ``"\\n"``,
  ``answer_prefix`` = the language's answer word (``"Answer:"`` in English), ``response`` =
  ``" " + answer``.
* BBH: ``prompt`` = ``task_prompt.strip() + "\\n\\n"`` + the other two exemplars (each
  ``question + "\\nA:" + answer + "\\n\\n"``) + the question, ``answer_prefix`` = ``"A:"``,
  ``response`` = the text after ``"\\nA:"`` (it starts with a space).

On the train side ``answer_prefix`` is an ordinary passthrough field (ignored).

Truncation (``max_len``)
------------------------
``truncation="right"`` (this format's default): LESS's ``truncation=True, max_length=max_len``;
the tokenizer keeps the first ``max_len`` tokens (its own truncation, so a post-processor's
special tokens are placed as it places them) and each prefix count is capped at ``max_len``,
which is the loss mask of the whole example cut to ``max_len``. Cut examples are counted in
``LoadReport.n_truncated``. ``truncation="error"``: a record longer than ``max_len`` tokens is an
``over-long`` record instead. ``"left_prompt"`` is the chat format's alone. One departure from
LESS: an example with no trained token (its reply cut away, or covered by the query's token
count) is a bad record (``over-long`` when cut, else ``template-error``), since LESS would take a
loss over no tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jraise.data.records import (
    Encoded,
    EncodedRecord,
    Message,
    ParsedRecord,
    ProblemLog,
    RecordError,
    is_absent,
    type_name,
)

LESS_TULU = "less-tulu"
TRUNCATION_MODES = ("right", "error")  # "right" first: the format's default
ANSWER_PREFIX_FIELD = "answer_prefix"
MARKERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}


def render_messages(messages: Sequence[Message], eos: str) -> str:
    """LESS's train-side text of ``messages``: Tulu markers, stripped contents, EOS after replies."""
    parts = []
    for role, content in messages:
        if role not in MARKERS:
            raise ValueError(f"role {role!r} is not one of {', '.join(MARKERS)}")
        parts.append(MARKERS[role] + content.strip() + (eos if role == "assistant" else "") + "\n")
    return "".join(parts)


@dataclass(frozen=True)
class TuluText:
    """One example's text and its untrained token ranges, as texts whose token counts bound them.

    ``untrained`` holds ``(start, end)`` pairs: the tokens from ``n(start)`` (0 when ``start`` is
    None) up to ``n(end)`` are untrained, ``n`` being the token count with special tokens."""

    text: str
    untrained: tuple[tuple[str | None, str], ...]


def train_text(messages: Sequence[Message], eos: str) -> TuluText:
    """The train-side text and untrained ranges (module docstring, "Train side")."""
    ranges = []
    for k, (role, _) in enumerate(messages):
        if role == "assistant":
            continue
        start = render_messages(messages[:k], eos) if k else None
        end = render_messages(messages[: k + 1], eos)
        if k + 1 < len(messages) and messages[k + 1][0] == "assistant":
            end += MARKERS["assistant"]
        ranges.append((start, end))
    return TuluText(render_messages(messages, eos), tuple(ranges))


def validation_text(user: str, answer_prefix: str, response: str) -> TuluText:
    """The validation-side text: the query (user turn, assistant marker, answer prefix) untrained."""
    query = MARKERS["user"] + user + "\n" + MARKERS["assistant"] + answer_prefix
    return TuluText(query + response, ((None, query),))


def _record_text(item: ParsedRecord, side: str, eos: str) -> TuluText:
    """The record's `TuluText` for ``side``; raises `RecordError` for what LESS cannot render."""
    (conversation,) = item.conversations
    messages, loc = conversation.messages, item.source.location
    field = conversation.prompt_field if item.shape != "chat" else "messages"
    if side == "train":
        for k, (role, _) in enumerate(messages):
            if role not in MARKERS:
                where = f"messages[{k}].role" if item.shape == "chat" else field
                raise RecordError(loc, where, "bad-messages",
                                  f"role {role!r} is not one of {', '.join(MARKERS)} (LESS's tulu format)")
        return train_text(messages, eos)
    roles = [role for role, _ in messages]
    if roles != ["user", "assistant"]:
        raise RecordError(loc, field, "bad-messages",
                          f"a less-tulu validation record is one user turn and the reply, got roles {roles}")
    prefix = item.source.record.get(ANSWER_PREFIX_FIELD)
    if is_absent(prefix):
        prefix = ""
    elif not isinstance(prefix, str):
        raise RecordError(loc, ANSWER_PREFIX_FIELD, "wrong-type", f"expected a string, got {type_name(prefix)}")
    return validation_text(messages[0][1], prefix, messages[1][1])


def encode_chunk(tokenizer, chunk: list[ParsedRecord], max_len: int, truncation: str, problems: ProblemLog,
                 *, side: str) -> list[EncodedRecord]:
    """Tokenises ``chunk`` with the rules of ``side``; bad records go to ``problems``."""
    eos = tokenizer.eos_token or ""
    if side == "train" and not eos:
        raise ValueError("the less-tulu format writes the tokenizer's eos_token after each reply; it has none")
    texts = []
    for item in chunk:
        try:
            texts.append((item, _record_text(item, side, eos)))
        except RecordError as err:
            problems.reject(err)
    strings = list(dict.fromkeys(s for _, t in texts for pair in t.untrained for s in pair if s is not None))
    counts = {}
    if strings:
        counts = {s: len(ids) for s, ids in zip(strings, tokenizer(strings)["input_ids"], strict=True)}
    full = tokenizer([t.text for _, t in texts])["input_ids"] if texts else []
    out = []
    for (item, text), ids in zip(texts, full, strict=True):
        conversation, loc = item.conversations[0], item.source.location
        truncated = len(ids) > max_len
        if truncated:
            if truncation == "error":
                problems.reject(RecordError(loc, conversation.prompt_field, "over-long",
                                            f"{len(ids)} tokens > max_len {max_len}"))
                continue
            ids = tokenizer(text.text, truncation=True, max_length=max_len)["input_ids"]
        mask = np.ones(len(ids), dtype=bool)
        for start, end in text.untrained:
            mask[0 if start is None else min(counts[start], max_len) : min(counts[end], max_len)] = False
        mask[0] = False
        if not mask.any():
            if truncated:
                problems.reject(RecordError(loc, conversation.prompt_field, "over-long",
                                            f"no response token within the first max_len {max_len} tokens"))
            else:
                problems.reject(RecordError(loc, conversation.response_field, "template-error",
                                            "no response tokens: the untrained prefixes' token counts cover "
                                            "the whole example"))
            continue
        side_encoded = Encoded(np.asarray(ids, dtype=np.int32), mask, np.zeros(0, dtype=np.int64))
        out.append(EncodedRecord(item.id, item.category, item.source.record, loc, (side_encoded,), truncated))
    return out
