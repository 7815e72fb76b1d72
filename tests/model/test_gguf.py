"""GGUF import: a tiny llama GGUF written here with `gguf.GGUFWriter` -> `convert_gguf` -> jraise and
transformers. Weights go in through llama.cpp's own q/k row permutation and mixed tensor types,
and must come back in HF layout, dequantised exactly."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jraise.model import load_model, load_tokenizer  # noqa: E402
from jraise.model.gguf import GGUFError, convert_gguf, unpermute_rotary  # noqa: E402
from jraise.model.hf import export_tensors  # noqa: E402

Q = gguf.GGMLQuantizationType
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 32, 64, 2, 4, 2, 8
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# ---- a tiny byte-level BPE vocabulary ----------------------------------------------------------

def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves,
    the others are shifted to 256 + n in byte order (so the space is 'Ġ')."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    out, shifted = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + shifted))
            shifted += 1
    return out


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<think>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġa nd", "n d", "1 2", "12 3", "Ġ 1", "Ġ w", "o r", "Ġw or", "l d",
          "Ġwor ld", "e r", "l l", "Ġ h", "Ġh e", "Ġhe ll", "Ġhell o"]


def _vocab():
    tokens = SPECIALS + _byte_alphabet() + [m.replace(" ", "") for m in MERGES] + USER_DEFINED
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS) - len(USER_DEFINED)) + [4] * len(USER_DEFINED)
    assert len(set(tokens)) == len(tokens)
    return tokens, types


TOKENS, TOKEN_TYPES = _vocab()
VOCAB = len(TOKENS)


# ---- tiny llama weights and the llama.cpp side of the conversion ------------------------------

def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rotary halves -> adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_weights(seed: int, tied: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    normal = lambda *shape: (rng.standard_normal(shape) * 0.2).astype(np.float32)
    w = {"model.embed_tokens.weight": normal(VOCAB, HIDDEN), "model.norm.weight": 1 + normal(HIDDEN)}
    if not tied:
        w["lm_head.weight"] = normal(VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = normal(HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.k_proj.weight"] = normal(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.v_proj.weight"] = normal(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.o_proj.weight"] = normal(HIDDEN, HEADS * HEAD_DIM)
        w[p + "mlp.gate_proj.weight"] = normal(FFN, HIDDEN)
        w[p + "mlp.up_proj.weight"] = normal(FFN, HIDDEN)
        w[p + "mlp.down_proj.weight"] = normal(HIDDEN, FFN)
        w[p + "input_layernorm.weight"] = 1 + normal(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = 1 + normal(HIDDEN)
    return w


# HF name -> (GGUF name, stored type, heads of the rotary permutation). Mixed types on purpose.
def _gguf_layout(hf_name: str) -> tuple[str, object, int | None]:
    fixed = {"model.embed_tokens.weight": ("token_embd.weight", Q.Q8_0, None),
             "model.norm.weight": ("output_norm.weight", Q.F32, None),
             "lm_head.weight": ("output.weight", Q.F16, None)}
    if hf_name in fixed:
        return fixed[hf_name]
    layer, rest = hf_name.split(".")[2], ".".join(hf_name.split(".")[3:-1])
    name, qtype, heads = {
        "self_attn.q_proj": ("attn_q", Q.Q8_0, HEADS),
        "self_attn.k_proj": ("attn_k", Q.Q4_1, KV_HEADS),
        "self_attn.v_proj": ("attn_v", Q.F16, None),
        "self_attn.o_proj": ("attn_output", Q.Q4_0, None),
        "mlp.gate_proj": ("ffn_gate", Q.Q8_0, None),
        "mlp.up_proj": ("ffn_up", Q.BF16, None),
        "mlp.down_proj": ("ffn_down", Q.Q5_1, None),
        "input_layernorm": ("attn_norm", Q.F32, None),
        "post_attention_layernorm": ("ffn_norm", Q.F32, None),
    }[rest]
    return f"blk.{layer}.{name}.weight", qtype, heads


def _stored(values: np.ndarray, qtype) -> np.ndarray:
    if qtype == Q.F32:
        return values.astype(np.float32)
    if qtype == Q.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values, qtype)


def _expected(values: np.ndarray, qtype) -> np.ndarray:
    """What dequantising the stored tensor gives, in HF layout. Quantisation blocks lie within a row
    and the permutation only reorders rows, so this needs no permutation at all."""
    return gguf.quants.dequantize(_stored(values, qtype), qtype).reshape(values.shape).astype(np.float32)


def write_gguf(path, weights, *, arch="llama", pre="smollm", tokenizer_model="gpt2", drop=(), extra=None,
               retype=None, add_bos=False, skip_keys=(), more_meta=None):
    """Writes `weights` (HF names and layout) as llama.cpp would: GGUF names, q/k permuted, mixed types."""
    writer = gguf.GGUFWriter(str(path), arch)
    p = f"{arch}."
    meta = {
        p + "context_length": (256, "uint32"), p + "embedding_length": (HIDDEN, "uint32"),
        p + "block_count": (LAYERS, "uint32"), p + "feed_forward_length": (FFN, "uint32"),
        p + "attention.head_count": (HEADS, "uint32"), p + "attention.head_count_kv": (KV_HEADS, "uint32"),
        p + "attention.layer_norm_rms_epsilon": (1e-5, "float32"), p + "rope.freq_base": (10000.0, "float32"),
        p + "rope.dimension_count": (HEAD_DIM, "uint32"), p + "vocab_size": (VOCAB, "uint32"),
        "tokenizer.ggml.model": (tokenizer_model, "string"), "tokenizer.ggml.pre": (pre, "string"),
        "tokenizer.ggml.bos_token_id": (1, "uint32"), "tokenizer.ggml.eos_token_id": (2, "uint32"),
        "tokenizer.ggml.padding_token_id": (2, "uint32"), "tokenizer.ggml.unknown_token_id": (0, "uint32"),
        "tokenizer.ggml.add_bos_token": (add_bos, "bool"), "tokenizer.chat_template": (CHATML, "string"),
    }
    for key, (value, kind) in {**meta, **(more_meta or {})}.items():
        if key not in skip_keys:
            getattr(writer, f"add_{kind}")(key, value)
    writer.add_array("tokenizer.ggml.tokens", TOKENS)
    writer.add_array("tokenizer.ggml.token_type", TOKEN_TYPES)
    writer.add_array("tokenizer.ggml.merges", MERGES)
    for hf_name, values in weights.items():
        name, qtype, heads = _gguf_layout(hf_name)
        if name in drop:
            continue
        qtype = (retype or {}).get(name, qtype)
        data = values if heads is None else _llama_cpp_permute(values, heads)
        stored = _stored(data, qtype) if qtype != Q.I32 else data.astype(np.int32)
        writer.add_tensor(name, stored, raw_dtype=None if qtype in (Q.F32, Q.F16, Q.I32) else qtype)
    for name, values in (extra or {}).items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module", params=["tied", "untied"])
def converted(request, tmp_path_factory):
    tied = request.param == "tied"
    weights = _hf_weights(0, tied)
    root = tmp_path_factory.mktemp(f"gguf_{request.param}")
    src = write_gguf(root / "tiny.gguf", weights)
    out = convert_gguf(src, root / "hf")
    return weights, src, out, tied


# ---- the permutation --------------------------------------------------------------------------

def test_unpermute_inverts_llama_cpp_permutation():
    # One head of 4 rows: HF pairs rotary dims (0, 2) and (1, 3); llama.cpp stores them adjacent.
    rows = np.arange(4, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    assert _llama_cpp_permute(rows, 1)[:, 0].tolist() == [0, 2, 1, 3]
    w = np.random.default_rng(1).standard_normal((HEADS * HEAD_DIM, HIDDEN)).astype(np.float32)
    for heads in (1, KV_HEADS, HEADS):
        permuted = _llama_cpp_permute(w, heads)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(unpermute_rotary(permuted, heads), w)


# ---- weights and logits -----------------------------------------------------------------------

def test_converted_weights_are_the_dequantised_hf_weights(converted):
    weights, _, out, tied = converted
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is tied
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (32, 4, 2)
    assert (config["vocab_size"], config["max_position_embeddings"], config["rms_norm_eps"]) == (VOCAB, 256, 1e-5)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    model, _ = load_model(out)
    got = {k: np.asarray(v) for k, v in export_tensors(model).items()}
    assert set(got) == set(weights)
    for hf_name, values in weights.items():
        np.testing.assert_array_equal(got[hf_name], _expected(values, _gguf_layout(hf_name)[1]), err_msg=hf_name)
    # Dequantisation is lossy, so the expected values differ from the originals (the test is not vacuous).
    q = "model.layers.0.self_attn.q_proj.weight"
    assert 0 < np.abs(got[q] - weights[q]).max() < 0.02


def test_transformers_and_jraise_give_the_same_logits(converted):
    _, _, out, _ = converted
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    model, _ = load_model(out)
    ids = np.random.default_rng(2).integers(0, VOCAB, (2, 12))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(ids)))
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-4


def test_bfloat16_output(tmp_path):
    weights = _hf_weights(3, tied=True)
    src = write_gguf(tmp_path / "tiny.gguf", weights)
    out = convert_gguf(src, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model, config = load_model(out, dtype="bfloat16")
    assert config.param_dtype == "bfloat16"
    got = export_tensors(model)
    for hf_name, values in weights.items():
        expected = jnp.asarray(_expected(values, _gguf_layout(hf_name)[1])).astype(jnp.bfloat16)
        assert got[hf_name].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got[hf_name], np.float32), np.asarray(expected, np.float32))


# ---- tokenizer --------------------------------------------------------------------------------

TEXTS = ["hello world and the", " the hello", "123 1234 12", "x 2024, 123!", "naïve café 日本 😀",
         "a  b\n\n\tc  ", "<|im_start|>user\nhi<|im_end|>", "think <think> done", "don't", ""]


def _tokens(tok, text):
    return tok.convert_ids_to_tokens(tok(text)["input_ids"])


def test_tokenizer_round_trip_and_special_tokens(converted):
    _, _, out, _ = converted
    tok = load_tokenizer(out)
    assert len(tok) == VOCAB
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<|im_start|>", "<|im_end|>",
                                                                            "<|im_end|>", "<|endoftext|>")
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
    assert _tokens(tok, "hello world and the") == ["he", "ll", "o", "Ġworld", "Ġand", "Ġthe"]
    ids = tok("<|im_start|>user<|im_end|>")["input_ids"]
    assert (ids[0], ids[-1], len(ids)) == (1, 2, 5)  # control tokens whole, with their own ids; u, s, er
    assert "<think>" in _tokens(tok, "a <think> b")  # user-defined token whole
    assert tok.decode(tok("<|im_start|>x")["input_ids"], skip_special_tokens=True) == "x"


def test_smollm_pre_tokenizer_splits_every_digit(converted):
    _, _, out, _ = converted
    tok = load_tokenizer(out)
    # The vocabulary has "12", "123" and "Ġ1", but llama.cpp's smollm pre-tokenizer isolates digits first.
    assert _tokens(tok, "x 123 12") == ["x", "Ġ", "1", "2", "3", "Ġ", "1", "2"]


def test_gpt2_pre_tokenizer_matches_transformers(tmp_path):
    # With pre "gpt-2" nothing splits digits, so the merges apply; transformers' own GGUF tokenizer
    # (GPT-2's pre-tokenizer) is an independent reference here.
    src = write_gguf(tmp_path / "tiny.gguf", _hf_weights(4, tied=True), pre="gpt-2")
    out = convert_gguf(src, tmp_path / "hf")
    ours = load_tokenizer(out)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert _tokens(ours, "x 123 12") == ["x", "Ġ", "123", "Ġ", "12"]
    for text in TEXTS:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text


def test_add_bos_token_prepends_bos(tmp_path):
    src = write_gguf(tmp_path / "tiny.gguf", _hf_weights(5, tied=True), add_bos=True)
    tok = load_tokenizer(convert_gguf(src, tmp_path / "hf"))
    ids = tok("the")["input_ids"]
    assert ids[0] == 1 and tok.convert_ids_to_tokens(ids[1:]) == ["t", "he"]


def test_chat_template_renders_chatml(converted):
    _, _, out, _ = converted
    tok = load_tokenizer(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


# ---- errors -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("good") / "tiny.gguf", _hf_weights(6, tied=True))


def _assert_clean(tmp_path, out_name="out"):
    # A failed conversion leaves neither the directory nor a temporary sibling.
    assert not (tmp_path / out_name).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out_name}.")]


def test_other_architecture_is_an_error(tmp_path):
    src = write_gguf(tmp_path / "qwen.gguf", _hf_weights(7, tied=True), arch="qwen2")
    with pytest.raises(GGUFError, match=r"qwen\.gguf.*general\.architecture is 'qwen2'"):
        convert_gguf(src, tmp_path / "out")
    _assert_clean(tmp_path)


def test_not_a_gguf_is_an_error(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_text("{\"this\": \"is json\"}")
    with pytest.raises(GGUFError, match=r"model\.gguf: not a GGUF file"):
        convert_gguf(src, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    _assert_clean(tmp_path)


@pytest.mark.parametrize("keep", [0.98, 0.3, 0.002])  # tensor data, metadata, header cut short
def test_truncated_file_is_an_error(good_gguf, tmp_path, keep):
    data = good_gguf.read_bytes()
    src = tmp_path / "cut.gguf"
    src.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(GGUFError, match=r"cut\.gguf: .*(truncated|corrupt)"):
        convert_gguf(src, tmp_path / "out")
    _assert_clean(tmp_path)


def test_truncated_tensor_data_names_the_tensor(good_gguf, tmp_path):
    src = tmp_path / "cut.gguf"
    src.write_bytes(good_gguf.read_bytes()[:-200])
    with pytest.raises(GGUFError, match=r"tensor '[\w.]+' ends at byte \d+, past the end"):
        convert_gguf(src, tmp_path / "out")


def test_missing_tensor_is_an_error(tmp_path):
    src = write_gguf(tmp_path / "t.gguf", _hf_weights(8, tied=True), drop=("blk.1.ffn_up.weight",))
    with pytest.raises(GGUFError, match=r"t\.gguf: missing tensor 'blk\.1\.ffn_up\.weight'"):
        convert_gguf(src, tmp_path / "out")
    _assert_clean(tmp_path)


def test_unexpected_or_misshapen_tensor_is_an_error(tmp_path):
    weights = _hf_weights(9, tied=True)
    src = write_gguf(tmp_path / "a.gguf", weights, extra={"blk.0.attn_q.bias": np.zeros(32, np.float32)})
    with pytest.raises(GGUFError, match=r"unexpected tensor 'blk\.0\.attn_q\.bias'"):
        convert_gguf(src, tmp_path / "out")
    weights["model.layers.1.mlp.up_proj.weight"] = weights["model.layers.1.mlp.up_proj.weight"][:32]
    src = write_gguf(tmp_path / "b.gguf", weights)
    with pytest.raises(GGUFError, match=r"tensor 'blk\.1\.ffn_up\.weight' has shape \(32, 32\)"):
        convert_gguf(src, tmp_path / "out")
    _assert_clean(tmp_path)


def test_tensor_type_errors(tmp_path):
    weights = _hf_weights(10, tied=True)
    src = write_gguf(tmp_path / "i32.gguf", weights, retype={"blk.0.attn_norm.weight": Q.I32})
    with pytest.raises(GGUFError, match=r"tensor 'blk\.0\.attn_norm\.weight' has type I32"):
        convert_gguf(src, tmp_path / "out")
    # A type id gguf does not know at all: patch one tensor's type field in place.
    src = write_gguf(tmp_path / "unknown.gguf", weights)
    reader = gguf.GGUFReader(src, "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    tensor.field.parts[4][0] = 250
    reader.data.flush()
    del reader, tensor
    with pytest.raises(GGUFError, match=r"unknown\.gguf: tensor 'blk\.1\.ffn_down\.weight' has tensor type id 250"):
        convert_gguf(src, tmp_path / "out")
    _assert_clean(tmp_path)


def test_metadata_errors(tmp_path):
    weights = _hf_weights(11, tied=True)
    src = write_gguf(tmp_path / "a.gguf", weights, skip_keys=("llama.feed_forward_length",))
    with pytest.raises(GGUFError, match=r"a\.gguf: missing metadata key 'llama\.feed_forward_length'"):
        convert_gguf(src, tmp_path / "out")
    src = write_gguf(tmp_path / "b.gguf", weights, pre="no-such-pre")
    with pytest.raises(GGUFError, match=r"tokenizer\.ggml\.pre is 'no-such-pre'"):
        convert_gguf(src, tmp_path / "out")
    src = write_gguf(tmp_path / "c.gguf", weights, tokenizer_model="llama")
    with pytest.raises(GGUFError, match=r"tokenizer\.ggml\.model is 'llama'"):
        convert_gguf(src, tmp_path / "out")
    src = write_gguf(tmp_path / "d.gguf", weights, more_meta={"llama.rope.dimension_count": (4, "uint32")})
    with pytest.raises(GGUFError, match=r"llama\.rope\.dimension_count is 4.*partial rotary"):
        convert_gguf(src, tmp_path / "out")
    src = write_gguf(tmp_path / "e.gguf", weights, more_meta={"split.count": (2, "uint16")})
    with pytest.raises(GGUFError, match=r"e\.gguf: split\.count is 2"):
        convert_gguf(src, tmp_path / "out")
    _assert_clean(tmp_path)


def test_failure_while_writing_leaves_nothing(good_gguf, tmp_path, monkeypatch):
    import jraise.model.gguf as module

    original, calls = module.hf_tensor, []

    def fail_on_fifth(tensor, target):
        calls.append(target.hf_name)
        if len(calls) == 5:
            raise OSError("disk full")
        return original(tensor, target)

    monkeypatch.setattr(module, "hf_tensor", fail_on_fifth)
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(good_gguf, tmp_path / "out")
    assert len(calls) == 5
    _assert_clean(tmp_path)


def test_existing_output_directory(good_gguf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="out"):
        convert_gguf(good_gguf, out)
    assert (out / "keep.txt").read_text() == "mine"
    convert_gguf(good_gguf, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (convert_gguf(good_gguf, empty) / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_missing_gguf_package_is_a_readable_error(monkeypatch):
    """gguf is an optional extra: without it the converter says how to install it (a `GGUFError`,
    which the command line prints as a short message) instead of a bare ModuleNotFoundError."""
    import sys

    from jraise.errors import is_expected
    from jraise.model.gguf import TensorTarget, hf_tensor

    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(GGUFError, match=r"jraise\[gguf\]") as info:
        hf_tensor(None, TensorTarget("model.embed_tokens.weight", (2, 2)))
    assert is_expected(info.value)
