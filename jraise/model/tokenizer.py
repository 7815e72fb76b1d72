"""Tokenizers: load a local Hugging Face tokenizer offline, or build a small character-level one
(optionally with whole-word tokens for a fixed word list).

Chat formatting always goes through `tokenizer.apply_chat_template`. A tokenizer directory without
a `chat_template` gets `DEFAULT_CHAT_TEMPLATE` (an Alpaca-style template that needs only the
tokenizer's own `eos_token`), so every tokenizer `load_tokenizer` returns can format chats.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

# Alpaca-style, so it works with any tokenizer: no special tokens beyond the tokenizer's EOS. Each
# assistant turn ends with EOS, which is what greedy generation stops on.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}### Response:\n{{ message['content'] }}{{ eos_token }}\n\n"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


def load_tokenizer(path: str | os.PathLike):
    """`transformers.AutoTokenizer` from a local directory, never touching the network.

    Adds `DEFAULT_CHAT_TEMPLATE` when the tokenizer has no chat template and uses EOS as the pad
    token when it has none (needed for batched, padded inputs).
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: tokenizer directory does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot load a tokenizer from this directory: {err}") from err
    if not getattr(tok, "chat_template", None):
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"{path}: tokenizer has neither a pad_token nor an eos_token")
        tok.pad_token = tok.eos_token
    return tok


def build_char_tokenizer(out_dir: str | os.PathLike, texts: Iterable[str] = (), extra_chars: str = "",
                         chat_template: str = DEFAULT_CHAT_TEMPLATE, words: Iterable[str] = ()):
    """Writes a character-level tokenizer (one token per character seen) as a HF tokenizer dir.

    Character-level suits the built-in testbed's algorithmic tasks (reversing, sorting letters),
    where sub-word merges would hide the characters the model must move. ``words`` adds whole-word
    tokens (each also with a leading space, as GPT-style vocabularies have): a listed word becomes
    one token only where it stands alone (no letter or digit touching it on either side);
    everything else stays one token per character, so decoding is exact for any text. Unknown
    characters map to `<unk>`. The directory carries ``chat_template`` (default
    `DEFAULT_CHAT_TEMPLATE`). Returns the loaded tokenizer.
    """
    import re

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = set(extra_chars)
    for text in texts:
        chars.update(text)
    whole_words = sorted(set(words), key=lambda w: (-len(w), w))  # longest first: regex alternation
    bad = [w for w in whole_words if not re.fullmatch(r"[A-Za-z0-9]{2,}", w)]
    if bad:
        raise ValueError(f"words must be alphanumeric and at least 2 characters long, got {bad}")
    chars.update(*whole_words)  # a listed word inside a longer one is still spelled out
    specials = [PAD, BOS, EOS, UNK]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for piece in [*sorted(chars), *whole_words, *(" " + w for w in whole_words)]:
        vocab.setdefault(piece, len(vocab))
    pattern = r"[\s\S]"
    if whole_words:
        alternation = "|".join(whole_words)
        pattern = rf"(?: |(?<![A-Za-z0-9]))(?:{alternation})(?![A-Za-z0-9])|[\s\S]"
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    core.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )
    fast.chat_template = chat_template
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return load_tokenizer(out_dir)
