"""The less-tulu record format (LESS's own tokenisation), token for token against the rules in
`jraise.data.less_tulu`'s docstring.

The tokenizer is a tiny Llama-2 look-alike: a byte-fallback BPE with sentencepiece's "▁" (the
Llama-2 tokenizer.json normaliser: prepend "▁", spaces to "▁"), "\\n" only as the byte token
<0x0A>, <s>/</s> special tokens and a post-processor that puts <s> first. Every expected value is
written here from the rules: the text as a literal string, the tokens as the tokenizer's ids of
that string (special tokens on), the untrained ranges as token counts of literal prefix strings.
"""

from __future__ import annotations

import json
import string

import numpy as np
import pytest

from jraise.data.formats import RecordError, load_encoded
from jraise.data.pool import load_pool
from jraise.model.tokenizer import load_tokenizer

# Whole-word pieces (merged left to right), so the examples tokenise into a few pieces each.
WORDS = ("<|", "|>", "user", "assistant", "system", "What", "▁is", "▁the", "▁capital", "▁of", "▁France",
         "▁Paris", "The", "Answer", "Question", "Hello", "Be", "▁brief")
# Ranked first: "xy" alone is one token, but "xyz" is x|yz (a merge across a query's end).
QUIRK_MERGES = (("y", "z"), ("x", "y"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in ("▁", *(c for c in string.printable if c not in string.whitespace)):
        vocab.setdefault(piece, len(vocab))
    merges = list(QUIRK_MERGES)
    for word in WORDS:
        for i in range(1, len(word)):
            pair = (word[:i], word[i])
            if pair not in merges:
                merges.append(pair)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out = tmp_path_factory.mktemp("llama_like_tok")
    fast.save_pretrained(str(out))
    return load_tokenizer(out)


def ids(tok, text):
    """The ids LESS's tokenizer call gives: special tokens on (<s> first)."""
    return tok(text)["input_ids"]


def n(tok, text):
    return len(ids(tok, text))


def expected_mask(length, untrained):
    """Ones, then zeros over each untrained [start, end) (capped at ``length``), and at position 0."""
    mask = np.ones(length, dtype=bool)
    for start, end in untrained:
        mask[min(start, length) : min(end, length)] = False
    mask[0] = False
    return mask


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def load(tmp_path, tok, records, **kwargs):
    return load_pool(write_jsonl(tmp_path / "data.jsonl", records), tok, record_format="less-tulu", **kwargs)


def pieces(tok, token_ids):
    return tok.convert_ids_to_tokens([int(t) for t in token_ids])


def trained_runs(tok, pool, i=0):
    """The pieces of each run of consecutive trained tokens, joined."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], pool.loss_masks[i].astype(np.int8), [0]])))
    return ["".join(pieces(tok, pool.tokens[i][a:b])) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def assert_example(pool, i, tokens, mask):
    assert pool.tokens[i].tolist() == list(tokens)
    assert pool.loss_masks[i].tolist() == list(mask)
    assert pool.tokens[i].dtype == np.int32 and pool.loss_masks[i].dtype == bool


def test_the_test_tokenizer_behaves_like_llama_2(tok):
    assert pieces(tok, ids(tok, "</s>\n")) == ["<s>", "</s>", "▁", "<0x0A>"]  # "▁" after a special token
    assert pieces(tok, ids(tok, "The capital")) == ["<s>", "▁", "The", "▁capital"]
    assert pieces(tok, ids(tok, "xy")) == ["<s>", "▁", "xy"] and pieces(tok, ids(tok, "xyz"))[-2:] == ["x", "yz"]


# ----------------------------------------------------------------------------------------------
# Train side


SINGLE = ("<|user|>\nWhat is the capital of France?\n<|assistant|>\nThe capital of France is Paris.</s>\n")
SINGLE_PREFIX = "<|user|>\nWhat is the capital of France?\n<|assistant|>\n"


def test_single_turn_train_tokens_and_mask(tmp_path, tok):
    record = {"messages": [{"role": "user", "content": "What is the capital of France?"},
                           {"role": "assistant", "content": "The capital of France is Paris."}]}
    pool = load(tmp_path, tok, [record], max_len=512)
    tokens = ids(tok, SINGLE)
    assert_example(pool, 0, tokens, expected_mask(len(tokens), [(0, n(tok, SINGLE_PREFIX))]))
    assert tokens[0] == tok.bos_token_id and tokens.count(tok.bos_token_id) == 1
    trained = pieces(tok, pool.tokens[0][pool.loss_masks[0]])
    # the reply, its EOS and the "\n" after it (two tokens: "▁" then the byte) are trained
    assert "".join(trained) == "The▁capital▁of▁France▁is▁Paris.</s>▁<0x0A>"


def test_surrounding_whitespace_is_stripped_on_the_train_side(tmp_path, tok):
    records = [
        {"id": "chat", "messages": [{"role": "user", "content": " \n What is the capital of France?  \n"},
                                    {"role": "assistant", "content": "\n\tThe capital of France is Paris. \n"}]},
        {"id": "pr", "prompt": "What is the capital of France?\n\n", "response": "  The capital of France is Paris."},
        {"id": "alpaca", "instruction": "  What is the capital of France?",
         "output": "The capital of France is Paris.\n"},
    ]
    pool = load(tmp_path, tok, records)
    tokens = ids(tok, SINGLE)
    mask = expected_mask(len(tokens), [(0, n(tok, SINGLE_PREFIX))])
    for i in range(3):
        assert_example(pool, i, tokens, mask)
    assert pool.ids == ("chat", "pr", "alpaca")


def test_alpaca_input_joins_the_user_turn_before_stripping(tmp_path, tok):
    pool = load(tmp_path, tok, [{"instruction": "  Sum it", "input": "2 3  ", "output": " 5 "}])
    text = "<|user|>\nSum it\n\n2 3\n<|assistant|>\n5</s>\n"
    tokens = ids(tok, text)
    prefix = "<|user|>\nSum it\n\n2 3\n<|assistant|>\n"
    assert_example(pool, 0, tokens, expected_mask(len(tokens), [(0, n(tok, prefix))]))


def test_multi_turn_with_system_trains_every_reply_through_the_newline_after_eos(tmp_path, tok):
    record = {"messages": [
        {"role": "system", "content": "Be brief. "},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": " Hello. "},
        {"role": "user", "content": "\nWhat is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]}
    pool = load(tmp_path, tok, [record])
    system = "<|system|>\nBe brief.\n"
    first = system + "<|user|>\nHello\n<|assistant|>\n"
    after_reply = system + "<|user|>\nHello\n<|assistant|>\nHello.</s>\n"
    second = after_reply + "<|user|>\nWhat is 2+2?\n<|assistant|>\n"
    text = second + "4</s>\n"
    tokens = ids(tok, text)
    untrained = [(0, n(tok, system)), (n(tok, system), n(tok, first)), (n(tok, after_reply), n(tok, second))]
    assert_example(pool, 0, tokens, expected_mask(len(tokens), untrained))
    assert trained_runs(tok, pool) == ["Hello.</s>▁<0x0A>", "4</s>▁<0x0A>"]


def test_consecutive_non_assistant_turns_and_a_leading_reply(tmp_path, tok):
    records = [
        {"id": "two-users", "messages": [{"role": "user", "content": "Hello"}, {"role": "user", "content": "What"},
                                         {"role": "assistant", "content": "Paris"}]},
        {"id": "reply-first", "messages": [{"role": "assistant", "content": "Hello"},
                                           {"role": "user", "content": "What"},
                                           {"role": "assistant", "content": "Paris"}]},
    ]
    pool = load(tmp_path, tok, records)
    text = "<|user|>\nHello\n<|user|>\nWhat\n<|assistant|>\nParis</s>\n"
    tokens = ids(tok, text)
    untrained = [(0, n(tok, "<|user|>\nHello\n")),
                 (n(tok, "<|user|>\nHello\n"), n(tok, "<|user|>\nHello\n<|user|>\nWhat\n<|assistant|>\n"))]
    assert_example(pool, 0, tokens, expected_mask(len(tokens), untrained))
    text = "<|assistant|>\nHello</s>\n<|user|>\nWhat\n<|assistant|>\nParis</s>\n"
    tokens = ids(tok, text)
    reply = "<|assistant|>\nHello</s>\n"
    untrained = [(n(tok, reply), n(tok, reply + "<|user|>\nWhat\n<|assistant|>\n"))]
    assert_example(pool, 1, tokens, expected_mask(len(tokens), untrained))  # the leading reply is trained


def test_right_truncation_keeps_the_first_max_len_tokens(tmp_path, tok):
    record = {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello."},
                           {"role": "user", "content": "What is the capital of France?"},
                           {"role": "assistant", "content": "Paris"}]}
    after_reply = "<|user|>\nHello\n<|assistant|>\nHello.</s>\n"
    text = after_reply + "<|user|>\nWhat is the capital of France?\n<|assistant|>\nParis</s>\n"
    full = ids(tok, text)
    second = after_reply + "<|user|>\nWhat is the capital of France?\n<|assistant|>\n"
    untrained = [(0, n(tok, "<|user|>\nHello\n<|assistant|>\n")), (n(tok, after_reply), n(tok, second))]
    for max_len in (n(tok, after_reply) + 3, n(tok, after_reply) - 1, len(full) - 1, len(full)):
        pool = load(tmp_path, tok, [record], max_len=max_len)
        assert_example(pool, 0, full[:max_len], expected_mask(max_len, untrained))
        assert pool.report.n_truncated == (max_len < len(full))
    with pytest.raises(RecordError, match="over-long") as err:
        load(tmp_path, tok, [record], max_len=len(full) - 1, truncation="error")
    assert err.value.field == "messages"
    assert len(load(tmp_path, tok, [record], max_len=len(full), truncation="error")) == 1


def test_a_reply_cut_away_entirely_is_over_long(tmp_path, tok):
    record = {"prompt": "What is the capital of France?", "response": "Paris"}
    max_len = n(tok, "<|user|>\nWhat is the capital of France?\n<|assistant|>\n")
    with pytest.raises(RecordError, match="over-long") as err:
        load(tmp_path, tok, [record], max_len=max_len)
    assert err.value.field == "prompt"
    pool = load(tmp_path, tok, [record, {"prompt": "Hello", "response": "Paris"}], max_len=max_len, skip_bad=True)
    assert len(pool) == 1 and dict(pool.report.skipped) == {"over-long": 1}


def test_an_unknown_role_is_a_bad_record(tmp_path, tok):
    record = {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "Paris"}]}
    with pytest.raises(RecordError, match="bad-messages") as err:
        load(tmp_path, tok, [record])
    assert err.value.field == "messages[0].role"


# ----------------------------------------------------------------------------------------------
# Validation side


def load_val(tmp_path, tok, records, **kwargs):
    return load(tmp_path, tok, records, side="validation", **kwargs)


def test_validation_query_keeps_the_answer_prefix_untrained_and_adds_no_eos(tmp_path, tok):
    record = {"prompt": "What is the capital of France?", "answer_prefix": "Answer:", "response": " Paris",
              "category": "geo"}
    pool = load_val(tmp_path, tok, [record])
    query = "<|user|>\nWhat is the capital of France?\n<|assistant|>\nAnswer:"
    tokens = ids(tok, query + " Paris")
    assert_example(pool, 0, tokens, expected_mask(len(tokens), [(0, n(tok, query))]))
    assert tok.eos_token_id not in tokens and tokens[0] == tok.bos_token_id
    assert pieces(tok, pool.tokens[0][pool.loss_masks[0]]) == ["▁Paris"]
    assert pool.categories == ("geo",)


def test_validation_strings_are_kept_verbatim(tmp_path, tok):
    records = [
        {"id": "spaces", "prompt": "  What is the capital of France?\n", "answer_prefix": "Answer: ",
         "response": "Paris \n"},
        {"id": "no-prefix", "instruction": "What", "input": "France", "output": " Paris"},
        {"id": "chat", "messages": [{"role": "user", "content": " What"}, {"role": "assistant", "content": "Paris"}],
         "answer_prefix": None},
    ]
    pool = load_val(tmp_path, tok, records)
    for i, (query, response) in enumerate([
        ("<|user|>\n  What is the capital of France?\n\n<|assistant|>\nAnswer: ", "Paris \n"),
        ("<|user|>\nWhat\n\nFrance\n<|assistant|>\n", " Paris"),
        ("<|user|>\n What\n<|assistant|>\n", "Paris"),
    ]):
        tokens = ids(tok, query + response)
        assert_example(pool, i, tokens, expected_mask(len(tokens), [(0, n(tok, query))]))


def test_validation_mask_follows_token_counts_across_a_merge(tmp_path, tok):
    # "…xy" alone ends in the token "xy"; in "…xyz" the tokenizer makes "x", "yz": LESS masks the
    # first n(query) tokens, so "yz" (half answer prefix) is trained.
    pool = load_val(tmp_path, tok, [{"prompt": "Hello", "answer_prefix": "xy", "response": "z"}])
    query = "<|user|>\nHello\n<|assistant|>\nxy"
    tokens = ids(tok, query + "z")
    assert_example(pool, 0, tokens, expected_mask(len(tokens), [(0, n(tok, query))]))
    assert pieces(tok, pool.tokens[0][pool.loss_masks[0]]) == ["yz"]


def test_validation_truncation(tmp_path, tok):
    record = {"prompt": "What is the capital of France?", "answer_prefix": "Answer:", "response": " The capital"}
    query = "<|user|>\nWhat is the capital of France?\n<|assistant|>\nAnswer:"
    full = ids(tok, query + " The capital")
    pool = load_val(tmp_path, tok, [record], max_len=len(full) - 1)
    assert_example(pool, 0, full[:-1], expected_mask(len(full) - 1, [(0, n(tok, query))]))
    assert pool.report.n_truncated == 1
    with pytest.raises(RecordError, match="over-long"):
        load_val(tmp_path, tok, [record], max_len=len(full) - 1, truncation="error")
    with pytest.raises(RecordError, match="over-long"):
        load_val(tmp_path, tok, [record], max_len=n(tok, query))


def test_validation_records_are_single_turn_with_a_string_prefix(tmp_path, tok):
    multi = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    with pytest.raises(RecordError, match="bad-messages"):
        load_val(tmp_path, tok, [multi])
    with pytest.raises(RecordError, match="wrong-type") as err:
        load_val(tmp_path, tok, [{"prompt": "a", "response": "b", "answer_prefix": 3}])
    assert err.value.field == "answer_prefix"
    # on the train side the prefix is a passthrough field and a multi-turn record is fine
    assert len(load(tmp_path, tok, [multi, {"prompt": "a", "response": "b", "answer_prefix": 3}])) == 2


# ----------------------------------------------------------------------------------------------
# Options and the default format


def test_options_are_checked(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(ValueError, match="record_format"):
        load_pool(path, tok, record_format="tulu")
    with pytest.raises(ValueError, match="side"):
        load_pool(path, tok, record_format="less-tulu", side="val")
    with pytest.raises(ValueError, match="truncation"):
        load_pool(path, tok, record_format="less-tulu", truncation="left_prompt")
    with pytest.raises(ValueError, match="truncation"):
        load_pool(path, tok, truncation="right")  # the chat format has no right truncation
    with pytest.raises(ValueError, match="instruction records only"):
        load_encoded(path, tok, kind="preference", record_format="less-tulu")


def test_the_chat_format_is_the_default_and_ids_do_not_depend_on_the_format(tmp_path, tok):
    records = [{"prompt": "What", "response": "Paris", "category": "c"}, {"instruction": "Hello", "output": "The"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    default = load_pool(path, tok)
    chat = load_pool(path, tok, record_format="chat", side="validation", truncation="error")
    assert chat.fingerprint == default.fingerprint
    assert all(np.array_equal(a, b) for a, b in zip(chat.tokens, default.tokens, strict=True))
    text = tok.apply_chat_template([{"role": "user", "content": "What"}, {"role": "assistant", "content": "Paris"}],
                                   tokenize=False)
    assert default.tokens[0].tolist() == tok(text, add_special_tokens=False)["input_ids"]
    tulu = load_pool(path, tok, record_format="less-tulu")
    assert tulu.fingerprint != default.fingerprint
    assert tulu.ids == default.ids and tulu.categories == default.categories and tulu.records == default.records


def test_less_tulu_takes_its_record_types_from_records_not_formats():
    """The arrows run one way: formats -> less_tulu -> records (formats dispatches to less_tulu)."""
    import subprocess
    import sys

    code = "import sys, jraise.data.less_tulu; print(' '.join(m for m in sys.modules if m.startswith('jraise')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "jraise.data.records" in loaded and "jraise.data.formats" not in loaded
