"""Record shapes, loss masks, errors naming file/record/field, skip_bad reports, truncation, ids."""

from __future__ import annotations

import hashlib
import json
import string

import numpy as np
import pytest

from jraise.data.formats import RecordError, content_hash_id
from jraise.data.pool import load_pool, load_preference_pool
from jraise.model.tokenizer import DEFAULT_CHAT_TEMPLATE, build_char_tokenizer, load_tokenizer

EOS = "</s>"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("char_tok")
    build_char_tokenizer(out, [string.printable])
    return out


@pytest.fixture()
def tok(tok_dir):
    """A fresh tokenizer per test, so tests that change the chat template cannot leak."""
    return load_tokenizer(tok_dir)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def masked_text(tok, tokens, mask):
    return tok.decode(tokens[np.asarray(mask, dtype=bool)].tolist())


def mask_runs(mask):
    """(start, end) of each run of consecutive 1s."""
    padded = np.concatenate([[0], np.asarray(mask, dtype=np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2], edges[1::2], strict=True))


def load_one(tmp_path, tok, record, **kwargs):
    return load_pool(write_jsonl(tmp_path / "one.jsonl", [record]), tok, **kwargs)


# ---------------------------------------------------------------------------------------------
# Shapes and loss masks


def test_alpaca_with_input_renders_document_and_masks_output_plus_eos(tmp_path, tok):
    pool = load_one(tmp_path, tok, {"instruction": "Sum it", "input": "2 3", "output": "5"})
    text = tok.decode(pool.tokens[0].tolist())
    expected = tok.apply_chat_template(
        [{"role": "user", "content": "Sum it\n\n2 3"}, {"role": "assistant", "content": "5"}], tokenize=False
    )
    assert text == expected
    assert masked_text(tok, pool.tokens[0], pool.loss_masks[0]) == "5" + EOS
    assert pool.loss_masks[0].dtype == bool and pool.tokens[0].dtype == np.int32
    assert not pool.loss_masks[0][0]


def test_alpaca_empty_and_absent_input_are_the_same_example(tmp_path, tok):
    with_empty = load_one(tmp_path, tok, {"instruction": "Say hi", "input": "", "output": "hi"})
    absent = load_one(tmp_path, tok, {"instruction": "Say hi", "output": "hi"})
    assert "\n\n\n\n" not in tok.decode(absent.tokens[0].tolist())
    assert with_empty.ids == absent.ids
    assert np.array_equal(with_empty.tokens[0], absent.tokens[0])


def test_prompt_response_masks_only_the_response(tmp_path, tok):
    pool = load_one(tmp_path, tok, {"prompt": "Reverse abc", "response": "cba"})
    mask = pool.loss_masks[0]
    assert masked_text(tok, pool.tokens[0], mask) == "cba" + EOS
    # The response is one contiguous run ending in EOS; the template's trailing "\n\n" is not trained.
    ((start, end),) = mask_runs(mask)
    assert pool.tokens[0][end - 1] == tok.eos_token_id
    assert tok.decode(pool.tokens[0][end:].tolist()) == "\n\n"


def test_multi_turn_chat_masks_every_assistant_turn_and_nothing_else(tmp_path, tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first q"},
        {"role": "assistant", "content": "answer one"},
        {"role": "user", "content": "second q"},
        {"role": "assistant", "content": "answer two"},
    ]
    pool = load_one(tmp_path, tok, {"messages": messages})
    tokens, mask = pool.tokens[0], pool.loss_masks[0]
    runs = mask_runs(mask)
    assert [tok.decode(tokens[a:b].tolist()) for a, b in runs] == ["answer one" + EOS, "answer two" + EOS]
    assert tok.decode(tokens.tolist()) == tok.apply_chat_template(messages, tokenize=False)


def test_chat_must_end_with_an_assistant_turn(tmp_path, tok):
    record = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "more"},
        ]
    }
    with pytest.raises(RecordError) as err:
        load_one(tmp_path, tok, record)
    assert err.value.reason == "bad-messages" and err.value.field == "messages"


def test_assistant_content_found_by_position_not_by_search(tmp_path, tok):
    # The assistant header comes with the message, not the generation prompt: the text turn k adds
    # is "assistant: a</s>", where a plain search for "a" would hit the "a" of "assistant".
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}user: {{ m['content'] }}\n"
        "{% else %}assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    )
    pool = load_one(tmp_path, tok, {"prompt": "q", "response": "a"})
    ((start, end),) = mask_runs(pool.loss_masks[0])
    assert tok.decode(pool.tokens[0][start:end].tolist()) == "a" + EOS
    assert tok.decode(pool.tokens[0][:start].tolist()) == "user: q\nassistant: "


def test_template_that_rewrites_earlier_turns_is_a_template_error(tmp_path, tok):
    tok.chat_template = "{{ messages | length }}:" + DEFAULT_CHAT_TEMPLATE
    with pytest.raises(RecordError) as err:
        load_one(tmp_path, tok, {"prompt": "q", "response": "a"})
    assert err.value.reason == "template-error" and "prefix" in str(err.value)


def test_passthrough_fields_and_category_are_kept(tmp_path, tok):
    record = {
        "instruction": "x",
        "output": "y",
        "category": "math",
        "meta": {"src": "web", "n": [1, 2]},
        "z": None,
    }
    pool = load_one(tmp_path, tok, record)
    assert pool.records[0] == record
    assert pool.categories == ("math",)


# ---------------------------------------------------------------------------------------------
# Preference pairs


def test_preference_string_and_message_forms_tokenise_the_same(tmp_path, tok):
    as_strings = {"prompt": "Pick", "chosen": "good", "rejected": "bad", "id": "s"}
    as_messages = {
        "prompt": [{"role": "user", "content": "Pick"}],
        # full-conversation style on one side, reply-only on the other
        "chosen": [{"role": "user", "content": "Pick"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
        "id": "m",
    }
    pool = load_preference_pool(write_jsonl(tmp_path / "p.jsonl", [as_strings, as_messages]), tok)
    assert pool.ids == ("s", "m")
    for side_tokens, side_masks, reply in (
        (pool.chosen_tokens, pool.chosen_masks, "good"),
        (pool.rejected_tokens, pool.rejected_masks, "bad"),
    ):
        assert np.array_equal(side_tokens[0], side_tokens[1])
        assert masked_text(tok, side_tokens[0], side_masks[0]) == reply + EOS
    assert pool.lengths.tolist() == [
        max(len(c), len(r)) for c, r in zip(pool.chosen_tokens, pool.rejected_tokens, strict=True)
    ]


def test_preference_prompt_assistant_turns_are_context_not_trained(tmp_path, tok):
    record = {
        "prompt": [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "old answer"},
            {"role": "user", "content": "q2"},
        ],
        "chosen": "new good",
        "rejected": "new bad",
    }
    pool = load_preference_pool(write_jsonl(tmp_path / "p.jsonl", [record]), tok)
    assert masked_text(tok, pool.chosen_tokens[0], pool.chosen_masks[0]) == "new good" + EOS
    assert masked_text(tok, pool.rejected_tokens[0], pool.rejected_masks[0]) == "new bad" + EOS


def test_preference_record_in_instruction_loader_is_wrong_shape(tmp_path, tok):
    with pytest.raises(RecordError) as err:
        load_one(tmp_path, tok, {"prompt": "p", "chosen": "a", "rejected": "b"})
    assert err.value.reason == "wrong-shape"


def test_preference_missing_rejected_names_the_field(tmp_path, tok):
    with pytest.raises(RecordError, match="field 'rejected'"):
        load_preference_pool(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a"}]), tok)


# ---------------------------------------------------------------------------------------------
# Errors name file, record and field


def test_malformed_line_in_the_middle_reports_file_and_line(tmp_path, tok):
    path = tmp_path / "broken_data.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"})
    # line 2 is blank: line numbers are physical lines, blank ones included
    path.write_text(
        f'{good}\n\n{{"instruction": "x", "output": \n{json.dumps({"prompt": "c", "response": "d"})}\n'
    )
    with pytest.raises(RecordError) as err:
        load_pool(path, tok)
    message = str(err.value)
    assert "broken_data.jsonl" in message and "line 3" in message and "malformed-json" in message


@pytest.mark.parametrize(
    ("record", "field", "reason"),
    [
        ({"instruction": "a"}, "output", "missing-field"),
        ({"instruction": "a", "output": None}, "output", "missing-field"),
        ({"instruction": "a", "output": 5}, "output", "wrong-type"),
        ({"instruction": "a", "output": "  \n"}, "output", "empty-response"),
        ({"instruction": "", "output": "b"}, "instruction", "empty-prompt"),
        ({"instruction": "a", "input": 3, "output": "b"}, "input", "wrong-type"),
        ({"prompt": "a"}, "response", "missing-field"),
        ({"output": "b"}, "instruction", "missing-field"),
        ({"instruction": "a", "output": "b", "category": 4}, "category", "wrong-type"),
        ({"instruction": "a", "output": "b", "id": 1.5}, "id", "wrong-type"),
        ({"messages": "hi"}, "messages", "wrong-type"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}]},
            "messages[1].content",
            "wrong-type",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
            "messages[1].content",
            "empty-response",
        ),
        (
            {"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]},
            "messages[0].role",
            "missing-field",
        ),
    ],
)
def test_bad_record_error_names_file_line_and_field(tmp_path, tok, record, field, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "ok", "output": "fine"}, record])
    with pytest.raises(RecordError) as err:
        load_pool(path, tok)
    assert (err.value.field, err.value.reason) == (field, reason)
    assert str(err.value).startswith(f"{path}: line 2: field '{field}'")


def test_non_jsonl_errors_name_the_record_index(tmp_path, tok):
    path = tmp_path / "records.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    with pytest.raises(RecordError, match=r"records\.json: record index 1: field 'output'"):
        load_pool(path, tok)


def test_skip_bad_reports_counts_by_reason_and_first_problems(tmp_path, tok):
    path = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"instruction": "a", "output": "b"}),
        "{not json",
        json.dumps({"instruction": "c"}),
        json.dumps({"instruction": "d", "output": ""}),
        json.dumps({"instruction": "e", "output": "f"}),
        json.dumps({"instruction": "g"}),
        json.dumps({"instruction": "a", "output": "b"}),  # a copy of line 1: data, not a bad record
    ]
    path.write_text("\n".join(lines) + "\n")
    pool = load_pool(path, tok, skip_bad=True)
    report = pool.report
    assert len(pool) == 3 and report.n_kept == 3 and report.n_read == 7 and report.n_copies == 1
    assert pool.ids[2] == pool.ids[0] + "~2"
    assert dict(report.skipped) == {
        "malformed-json": 1,
        "missing-field": 2,
        "empty-response": 1,
    }
    assert report.n_skipped == 4
    first = report.problems[0]
    assert (first.file, first.line, first.reason) == (str(path), 2, "malformed-json")
    assert [(p.line, p.field) for p in report.problems[1:3]] == [(3, "output"), (4, "output")]
    assert "kept 3 of 7" in report.summary() and "1 exact copy kept as distinct examples" in report.summary()


def test_duplicate_ids_error_names_both_records(tmp_path, tok):
    records = [
        {"id": "x", "prompt": "a", "response": "b"},
        {"prompt": "c", "response": "d"},
        {"id": "x", "prompt": "e", "response": "f"},
    ]
    path = write_jsonl(tmp_path / "dups.jsonl", records)
    with pytest.raises(RecordError) as err:
        load_pool(path, tok)
    assert err.value.reason == "duplicate-id"
    assert "line 3" in str(err.value) and "line 1" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Ids


def test_hash_id_is_sha256_of_canonical_content_fields(tmp_path, tok):
    record = {"output": "y", "meta": {"k": 1}, "instruction": "x"}
    canonical = json.dumps(
        {"input": "", "instruction": "x", "output": "y"}, sort_keys=True, separators=(",", ":")
    )
    expected = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert content_hash_id({"instruction": "x", "input": "", "output": "y"}) == expected
    assert load_one(tmp_path, tok, record).ids == (expected,)
    # field order and passthrough fields do not matter; content does
    reordered = {"instruction": "x", "output": "y", "other": 3}
    assert load_one(tmp_path, tok, reordered).ids == (expected,)
    assert load_one(tmp_path, tok, {"instruction": "x", "output": "z"}).ids != (expected,)


def test_id_field_is_used_as_a_string(tmp_path, tok):
    assert load_one(tmp_path, tok, {"id": 12, "prompt": "a", "response": "b"}).ids == ("12",)
    assert load_one(tmp_path, tok, {"id": "007", "prompt": "a", "response": "b"}).ids == ("007",)


# ---------------------------------------------------------------------------------------------
# Truncation

LONG_DOC = "0123456789" * 6


def test_over_long_is_an_error_naming_the_prompt_field_by_default(tmp_path, tok):
    record = {"instruction": "Echo", "input": LONG_DOC, "output": "ok"}
    with pytest.raises(RecordError) as err:
        load_one(tmp_path, tok, record, max_len=60)
    assert (err.value.reason, err.value.field) == ("over-long", "input")
    assert "one.jsonl: line 1" in str(err.value)


def test_over_long_with_skip_bad_drops_and_counts(tmp_path, tok):
    records = [
        {"instruction": "Echo", "input": LONG_DOC, "output": "ok"},
        {"instruction": "Hi", "output": "ok"},
    ]
    pool = load_pool(write_jsonl(tmp_path / "r.jsonl", records), tok, max_len=60, skip_bad=True)
    assert len(pool) == 1 and dict(pool.report.skipped) == {"over-long": 1}
    assert pool.report.problems[0].field == "input"


def test_left_prompt_truncation_cuts_the_start_of_the_first_user_turn(tmp_path, tok):
    record = {"instruction": "Echo", "input": LONG_DOC, "output": "ok"}
    full = load_one(tmp_path, tok, record, max_len=512)
    cut = load_one(tmp_path, tok, record, max_len=60, truncation="left_prompt")
    assert cut.lengths.tolist() == [60] and cut.report.n_truncated == 1
    excess = int(full.lengths[0]) - 60  # char tokenizer: one token per character
    header = "### Instruction:\n"
    # the first `excess` characters of the user content are gone, everything else is intact
    user = "Echo\n\n" + LONG_DOC
    assert tok.decode(cut.tokens[0].tolist()) == tok.decode(full.tokens[0].tolist()).replace(
        header + user, header + user[excess:]
    )
    assert masked_text(tok, cut.tokens[0], cut.loss_masks[0]) == "ok" + EOS


def test_left_prompt_truncation_refuses_when_the_response_cannot_fit(tmp_path, tok):
    record = {"instruction": "Hi", "output": "a long answer that does not fit"}
    with pytest.raises(RecordError) as err:
        load_one(tmp_path, tok, record, max_len=40, truncation="left_prompt")
    assert (err.value.reason, err.value.field) == ("over-long", "output")


def test_left_prompt_truncation_keeps_preference_prompts_identical(tmp_path, tok):
    record = {"prompt": LONG_DOC, "chosen": "short", "rejected": "a much longer reply"}
    pool = load_preference_pool(
        write_jsonl(tmp_path / "p.jsonl", [record]), tok, max_len=70, truncation="left_prompt"
    )
    chosen, rejected = pool.chosen_tokens[0], pool.rejected_tokens[0]
    assert max(len(chosen), len(rejected)) == 70
    prompt_len = int(np.argmax(pool.chosen_masks[0]))
    assert prompt_len == int(np.argmax(pool.rejected_masks[0]))
    assert np.array_equal(chosen[:prompt_len], rejected[:prompt_len])
    assert masked_text(tok, rejected, pool.rejected_masks[0]) == "a much longer reply" + EOS


def test_bad_truncation_mode_is_refused(tmp_path, tok):
    with pytest.raises(ValueError, match="truncation"):
        load_one(tmp_path, tok, {"prompt": "a", "response": "b"}, truncation="right")


# ---------------------------------------------------------------------------------------------
# A sub-word tokenizer with a ChatML-style template, where tokens span several characters

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(
        ["the quick brown fox jumps over the lazy dog; how are you? fine thanks"] * 20, trainer
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    out = tmp_path_factory.mktemp("bpe_tok")
    fast.save_pretrained(str(out))
    return load_tokenizer(out)


def test_sub_word_tokenizer_masks_assistant_turns_with_their_end_token(tmp_path, bpe_tok):
    messages = [
        {"role": "user", "content": "how are you?"},
        {"role": "assistant", "content": " fine thanks"},
        {"role": "user", "content": "the quick brown fox"},
        {"role": "assistant", "content": "jumps over the lazy dog"},
    ]
    pool = load_one(tmp_path, bpe_tok, {"messages": messages})
    tokens, mask = pool.tokens[0], pool.loss_masks[0]
    assert len(tokens) < len(bpe_tok.apply_chat_template(messages, tokenize=False))  # merges happened
    runs = [bpe_tok.decode(tokens[a:b].tolist()) for a, b in mask_runs(mask)]
    assert runs == [" fine thanks<|im_end|>", "jumps over the lazy dog<|im_end|>"]


# ---------------------------------------------------------------------------------------------
# Invalid UTF-8: the file and the line (JSON lines) or the line and byte offset (other formats)

GOOD = b'{"instruction": "a", "output": "b"}\n'
BAD_UTF8 = b'{"instruction": "c\xff\xfe", "output": "d"}\n'


def test_invalid_utf8_jsonl_line_is_a_record_error_naming_file_line_and_column(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD + BAD_UTF8 + GOOD.replace(b'"a"', b'"e"'))
    with pytest.raises(RecordError) as err:
        load_pool(path, tok)
    assert err.value.reason == "invalid-utf8" and err.value.location.line == 2
    message = str(err.value)
    assert message.startswith(f"{path}: line 2: invalid-utf8: byte 0xff (invalid start byte)")
    assert f"at byte 19 of the line (byte offset {len(GOOD) + 18} of the file)" in message
    pool = load_pool(path, tok, skip_bad=True)
    assert len(pool) == 2 and dict(pool.report.skipped) == {"invalid-utf8": 1}
    assert pool.report.problems[0].line == 2


def test_invalid_utf8_after_a_byte_order_mark_counts_the_mark(tmp_path, tok):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + BAD_UTF8)
    with pytest.raises(RecordError, match=r"line 1: invalid-utf8: .* at byte 19 of the line \(byte offset 21 of the file\)"):
        load_pool(path, tok)
    path.write_bytes(b"\xef\xbb\xbf" + GOOD)
    assert len(load_pool(path, tok)) == 1


def test_invalid_utf8_in_a_json_array_names_the_line_and_byte_offset(tmp_path, tok):
    path = tmp_path / "bad.json"
    data = b"[\n" + GOOD[:-1] + b",\n" + BAD_UTF8[:-1] + b"\n]\n"
    path.write_bytes(data)
    offset = data.index(b"\xff")
    with pytest.raises(ValueError) as err:
        load_pool(path, tok)
    assert str(err.value).startswith(f"{path}: line 3: invalid UTF-8 at byte offset {offset}")
    with pytest.raises(ValueError, match="line 3: invalid UTF-8"):  # not skippable: records cannot be told apart
        load_pool(path, tok, skip_bad=True)


def test_invalid_utf8_in_a_csv_file_names_the_line_and_byte_offset(tmp_path, tok):
    path = tmp_path / "bad.csv"
    data = "instruction,output\nwhat is π?,3.14\n".encode() + b"x,y\xff\n"
    path.write_bytes(data)
    offset = data.index(b"\xff")
    with pytest.raises(ValueError, match=rf"bad\.csv: line 3: invalid UTF-8 at byte offset {offset}: "
                                         r"byte 0xff \(invalid start byte\)"):
        load_pool(path, tok)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64])
def test_utf8_check_of_large_files_carries_characters_across_chunks(tmp_path, monkeypatch, chunk):
    from jraise.data import formats

    monkeypatch.setattr(formats, "_UTF8_CHUNK", chunk)
    path = tmp_path / "t.csv"
    good = "a,€\nπ,中文\n".encode()
    path.write_bytes(good)
    formats._require_utf8(path)  # no error: multi-byte characters cut by chunk boundaries are fine
    path.write_bytes(good + b"b,\xe2\x82\n")  # a truncated euro sign on line 3
    with pytest.raises(ValueError, match=rf"line 3: invalid UTF-8 at byte offset {len(good) + 2}"):
        formats._require_utf8(path)
    path.write_bytes(good + b"\xe2\x82")  # truncated at the very end
    with pytest.raises(ValueError, match=rf"line 3: invalid UTF-8 at byte offset {len(good)}"):
        formats._require_utf8(path)


# ---------------------------------------------------------------------------------------------
# Preference pairs whose chosen equals rejected


@pytest.mark.parametrize("record", [
    {"prompt": "p", "chosen": "same", "rejected": "same"},
    {"prompt": "p", "chosen": "same", "rejected": [{"role": "assistant", "content": "same"}]},
    {"prompt": [{"role": "user", "content": "p"}],
     "chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "same"}],  # repeats the prompt
     "rejected": [{"role": "assistant", "content": "same"}]},
], ids=["strings", "string-and-message", "full-conversation"])
def test_identical_preference_pair_is_a_bad_record_naming_rejected(tmp_path, tok, record):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "yes", "rejected": "no"}, record])
    with pytest.raises(RecordError) as err:
        load_preference_pool(path, tok)
    assert (err.value.reason, err.value.field, err.value.location.line) == ("identical-pair", "rejected", 2)
    assert str(err.value).startswith(f"{path}: line 2: field 'rejected': identical-pair")
    pool = load_preference_pool(path, tok, skip_bad=True)
    assert len(pool) == 1 and dict(pool.report.skipped) == {"identical-pair": 1}


def test_pair_differing_only_in_whitespace_is_a_pair(tmp_path, tok):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "yes", "rejected": "yes "}])
    assert len(load_preference_pool(path, tok)) == 1  # the loader keeps text verbatim: different tokens


# ---------------------------------------------------------------------------------------------
# The command line, as a user runs it


def _cli(*args, cwd):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "JRAISE_DEBUG"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "jraise.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_cli_invalid_utf8_names_file_and_line(tmp_path, tok_dir):
    (tmp_path / "bad.jsonl").write_bytes(GOOD + BAD_UTF8)
    proc = _cli("select", "random", "--pool", "bad.jsonl", "--tokenizer", tok_dir, "--out", "o.jsonl", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 5
    assert "bad.jsonl: line 2: invalid-utf8: byte 0xff" in proc.stderr and "byte offset" in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()
