"""The real SmolLM2-135M-Instruct GGUF (Q4_1 weights, Q8_0 embedding, tied, ChatML): `convert_gguf`
against transformers' own GGUF loading, tensor for tensor and token for token."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jraise.model import load_tokenizer  # noqa: E402
from jraise.model.gguf import convert_gguf  # noqa: E402

TEXTS = [
    "Hello, world!", "The year 2024 had 366 days; pi is 3.14159 and 1,000,000 is a million.", " 42", "x=12345",
    "a  b   c\n\n\td  ", "    def f(x):\n        return x ** 2\n", "naïve café, ñandú, straße", "日本語のテキスト",
    "Привет, мир", "emoji 😀👍🏽 and ∑ math ≤ ≥", "don't you'll we've I'M", "<|im_start|>user\nHi<|im_end|>\n",
    "<|endoftext|>text<|endoftext|>", "", " ", "trailing spaces   ", "$9.99 @ 5pm #tag", "ABC123def456GHI",
]
MESSAGES = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name 3 colours."},
     {"role": "assistant", "content": "Red, green, blue."}, {"role": "user", "content": "Now 2 more, 100% sure."}],
]


@pytest.fixture(scope="module")
def converted(smollm2_gguf, tmp_path_factory):
    return convert_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "hf")


def test_config(converted):
    config = json.loads((converted / "config.json").read_text())
    expected = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                    rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2, pad_token_id=2)
    assert {k: config[k] for k in expected} == expected


def test_weights_equal_transformers_gguf_loading(smollm2_gguf, converted):
    from safetensors import safe_open

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    theirs = reference.state_dict()
    with safe_open(converted / "model.safetensors", framework="np") as f:
        names = set(f.keys())
        # Tied: transformers' lm_head.weight is the embedding itself; the file leaves it out.
        assert names == set(theirs) - {"lm_head.weight"}
        assert len(names) == 2 + 30 * 9
        for name in sorted(names):
            # Exact: both dequantise to float32 with the same operations (d * q + m per block).
            np.testing.assert_array_equal(f.get_tensor(name), theirs[name].numpy(), err_msg=name)


def test_tokenizer_matches_transformers_gguf_tokenizer(smollm2_gguf, converted):
    ours = load_tokenizer(converted)
    theirs = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    assert len(ours) == len(theirs) == 49152
    assert ours.all_special_tokens == theirs.all_special_tokens
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, name) == getattr(theirs, name), name
    for text in TEXTS:
        ids = ours(text)["input_ids"]
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids) == text
    for messages in MESSAGES:
        for prompt in (False, True):
            rendered = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            assert rendered == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            assert ours(rendered)["input_ids"] == theirs(rendered)["input_ids"]
    # llama.cpp's "smollm" pre-tokenizer: every digit is its own token.
    assert ours.convert_ids_to_tokens(ours("x 2024")["input_ids"]) == ["x", "Ġ", "2", "0", "2", "4"]
