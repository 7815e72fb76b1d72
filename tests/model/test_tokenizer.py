"""Tokenizers: offline loading, the default chat template, the char-level builder."""

import json

import pytest

from jraise.model import DEFAULT_CHAT_TEMPLATE, build_char_tokenizer, load_tokenizer


def test_char_tokenizer_round_trips_whitespace_and_newlines(tmp_path):
    tok = build_char_tokenizer(tmp_path, ["abc xyz\n\t0123"])
    text = "ab\n\n  c\t3"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids
    assert tok("q", add_special_tokens=False).input_ids == [tok.unk_token_id]


def test_default_template_is_added_when_missing_and_ends_turns_with_eos(tmp_path):
    build_char_tokenizer(tmp_path, ["abc"])
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    for extra in tmp_path.glob("chat_template.*"):
        extra.unlink()
    tok = load_tokenizer(tmp_path)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                   tokenize=False)
    assert text == "### Instruction:\na\n\n### Response:\nb</s>\n\n"
    prompt = tok.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("### Response:\n")


def test_load_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


def test_word_tokens_apply_only_to_standalone_words(tmp_path):
    tok = build_char_tokenizer(tmp_path, ['abc2.\nT "'], words=["the", "word"])
    pieces = lambda text: tok.convert_ids_to_tokens(tok(text, add_special_tokens=False).input_ids)
    assert pieces("the word.") == ["the", " word", "."]
    assert pieces('"the"') == ['"', "the", '"']
    # Inside longer words, next to digits or in another case the letters are spelled out.
    assert pieces("there") == list("there")
    assert pieces("bathe") == list("bathe")
    assert pieces("the2") == list("the2")
    assert pieces("The") == list("The")
    for text in ["the word.", "there the", "a  the\nword", "wordthe word"]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text and tok.unk_token_id not in ids


@pytest.mark.parametrize("bad", [["a"], ["two words"], ["x-y"]])
def test_word_tokens_must_be_alphanumeric_words(tmp_path, bad):
    with pytest.raises(ValueError, match="words must be"):
        build_char_tokenizer(tmp_path, ["abc"], words=bad)
