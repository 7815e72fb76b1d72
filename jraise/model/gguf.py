"""GGUF import: a llama.cpp GGUF file of a Llama model -> a Hugging Face model directory.

`convert_gguf(src, out_dir, dtype)` reads the file with the `gguf` package and writes what
`jraise.model.load_model`, `transformers.AutoModelForCausalLM` and `AutoTokenizer` read:
config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json.
The directory is built beside `out_dir` under a hidden name and renamed into place, so a failed
conversion leaves nothing behind. Every check (architecture, metadata, tensor names, shapes and
types, tokenizer) runs before the first byte is written.

Format facts relied on:
- A GGUF tensor lists its dims fastest-varying first, ``ne = [in, out]`` for a weight matrix, so
  its row-major array is ``(out, in)``: torch's Linear layout. No transpose is needed.
- A quantised row is a run of blocks along ``in``; ``gguf.quants.dequantize`` maps the bytes
  ``(out, in / block * block_bytes)`` to float32 ``(out, in)``. Whatever types that function
  handles are accepted (F32, F16, BF16, Q4_0 ... Q8_0, the K and IQ types in gguf 0.19).
- llama.cpp's convert_hf_to_gguf.py permutes the rows of q_proj (over ``n_head`` heads) and of
  k_proj (over ``n_head_kv`` heads) so that each rotary pair is adjacent. With ``D`` rows per
  head, HF rows viewed as ``(H, 2, D/2)`` and GGUF rows as ``(H, D/2, 2)``::

      gguf[h, j, i] = hf[h, i, j]      i.e. GGUF row h*D + 2j + i  =  HF row h*D + i*D/2 + j

  `unpermute_rotary` is the inverse: view the GGUF rows as ``(H, D/2, 2)`` and swap the last two.
- The tokenizer is stored as metadata: ``tokenizer.ggml.tokens`` (already spelled in the GPT-2
  byte alphabet for ``model == "gpt2"``), ``token_type`` (1 normal, 3 control, 4 user-defined),
  ``merges`` ("left right", split at the first space after the first character) and ``pre``,
  the name of llama.cpp's pre-tokenizer: a list of regexes, each splitting every piece of the
  previous one into its matches and the gaps between them (`PRE_TOKENIZERS`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import reprlib
import shutil
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from jraise.atomic import temp_sibling
from jraise.errors import JraiseError
from jraise.model.config import ModelConfig

ARCHITECTURE = "llama"
_DTYPES = {"float32": ("F32", np.float32), "bfloat16": ("BF16", None)}  # bfloat16: ml_dtypes, imported lazily

# Token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4


class GGUFError(JraiseError, ValueError):
    """A GGUF file that cannot be converted; the message names the file and the key or tensor."""


# ----------------------------------------------------------------------------------------------
# Reading


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def _gguf_package():
    """The `gguf` package, or a `GGUFError` saying how to install it (it is an optional extra)."""
    try:
        import gguf
    except ImportError as err:
        raise GGUFError("reading a GGUF file needs the gguf package: pip install 'jraise[gguf]' "
                        f"(or 'gguf>=0.17'); importing it failed: {err}") from err
    return gguf


@functools.cache
def _reader_class():
    gguf = _gguf_package()

    class CheckedReader(gguf.GGUFReader):
        """`gguf.GGUFReader` that names the tensor at fault where the base class would fail with a
        message naming none: a type id gguf does not know, or data past the end of the file."""

        def __init__(self, path: Path):
            self.source = path
            super().__init__(path)

        def _build_tensors(self, start_offs: int, fields) -> None:
            known = {int(t) for t in gguf.GGMLQuantizationType}
            for field in fields:
                _, name_data, _, dims, raw_type, offset = field.parts
                name = bytes(name_data).decode("utf-8", "replace")
                type_id = int(raw_type[0])
                if type_id not in known:
                    raise GGUFError(f"{self.source}: tensor {name!r} has tensor type id {type_id}, "
                                    f"which gguf {_gguf_version()} does not know")
                block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
                end = start_offs + int(offset[0]) + math.prod(int(d) for d in dims) // block * block_bytes
                if end > len(self.data):
                    raise GGUFError(f"{self.source}: tensor {name!r} ends at byte {end}, past the end of the "
                                    f"file ({len(self.data)} bytes): the file is truncated")
            super()._build_tensors(start_offs, fields)

    return CheckedReader


def open_gguf(path: str | os.PathLike):
    """A `gguf.GGUFReader` over `path` (memory-mapped; tensor data is read on access).

    Raises FileNotFoundError for a missing file and `GGUFError` for one that is not GGUF (wrong
    magic), is truncated or has a corrupt header, or is big-endian.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = _reader_class()(path)
    except GGUFError:
        raise
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, TypeError) as err:
        raise GGUFError(f"{path}: unreadable GGUF header (truncated or corrupt file): {err}") from err
    if reader.byte_order != "I":
        raise GGUFError(f"{path}: big-endian GGUF files are not supported")
    return reader


def read_metadata(reader) -> dict[str, Any]:
    """Every metadata key -> its value (str, int, float, bool or a list of them)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _key(meta: dict, key: str, source: Path, kind: type | tuple = int, default: Any = ...) -> Any:
    """`meta[key]`, checked to be of `kind`; a missing key is an error unless `default` is given."""
    if key not in meta:
        if default is ...:
            raise GGUFError(f"{source}: missing metadata key {key!r}")
        return default
    value = meta[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise GGUFError(f"{source}: metadata key {key!r} must be {kinds[0].__name__}, got {reprlib.repr(value)}")
    return value


def _decimal(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


# ----------------------------------------------------------------------------------------------
# Config


def model_config(meta: dict, tensor_names: Iterable[str], source: Path, dtype: str = "float32") -> ModelConfig:
    """The `ModelConfig` a llama GGUF's ``llama.*`` and ``tokenizer.ggml.*`` metadata describe.

    Word embeddings are tied exactly when the file has no ``output.weight``. Partial rotary
    embeddings (``rope.dimension_count`` != head dim) and rope scaling are not supported.
    """
    arch = _key(meta, "general.architecture", source, str)
    if arch != ARCHITECTURE:
        raise GGUFError(f"{source}: general.architecture is {arch!r}; only {ARCHITECTURE!r} GGUF files are supported")
    splits = _key(meta, "split.count", source, default=1)
    if splits > 1:
        raise GGUFError(f"{source}: split.count is {splits}: one part of a split GGUF; merge the parts first "
                        "(llama-gguf-split --merge)")
    names = set(tensor_names)
    p = f"{arch}."
    hidden = _key(meta, p + "embedding_length", source)
    heads = _key(meta, p + "attention.head_count", source)
    kv_heads = _key(meta, p + "attention.head_count_kv", source, default=heads)
    if min(heads, kv_heads) <= 0:
        raise GGUFError(f"{source}: {p}attention.head_count ({heads}) and head_count_kv ({kv_heads}) must be positive")
    head_dim = _key(meta, p + "attention.key_length", source, default=hidden // heads)
    value_dim = _key(meta, p + "attention.value_length", source, default=head_dim)
    if value_dim != head_dim:
        raise GGUFError(f"{source}: {p}attention.value_length ({value_dim}) differs from the key length ({head_dim})")
    rope_dim = _key(meta, p + "rope.dimension_count", source, default=head_dim)
    if rope_dim != head_dim:
        raise GGUFError(f"{source}: {p}rope.dimension_count is {rope_dim}, the head dim is {head_dim}; "
                        "partial rotary embeddings are not supported")
    scaling = _key(meta, p + "rope.scaling.type", source, str, default="none")
    if scaling != "none":
        raise GGUFError(f"{source}: {p}rope.scaling.type is {scaling!r}; rope scaling is not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = _key(meta, p + "vocab_size", source, default=len(tokens) if isinstance(tokens, list) else ...)

    def token_id(name: str) -> int | None:
        return _key(meta, f"tokenizer.ggml.{name}_token_id", source, default=None)

    try:
        return ModelConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=_key(meta, p + "feed_forward_length", source),
            num_hidden_layers=_key(meta, p + "block_count", source),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            model_type="llama",
            rms_norm_eps=_decimal(_key(meta, p + "attention.layer_norm_rms_epsilon", source, float)),
            rope_theta=_decimal(_key(meta, p + "rope.freq_base", source, (float, int), default=10000.0)),
            max_position_embeddings=_key(meta, p + "context_length", source),
            tie_word_embeddings="output.weight" not in names,
            bos_token_id=token_id("bos"),
            eos_token_id=token_id("eos"),
            pad_token_id=token_id("padding"),
            dtype=dtype,
            param_dtype=dtype,
        )
    except ValueError as err:
        raise GGUFError(f"{source}: {err}") from err


# ----------------------------------------------------------------------------------------------
# Tensors


@dataclasses.dataclass(frozen=True)
class TensorTarget:
    """Where one GGUF tensor goes: its HF name, HF (torch) shape, and the head count its rows are
    rotary-permuted over (None: not permuted)."""

    hf_name: str
    shape: tuple[int, ...]
    rotary_heads: int | None = None


_LAYER_TENSORS = {  # GGUF blk.N.<name>.weight -> HF model.layers.N.<name>.weight
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def tensor_targets(config: ModelConfig) -> dict[str, TensorTarget]:
    """GGUF tensor name -> `TensorTarget` for every tensor a llama GGUF of `config` holds."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    out = {
        "token_embd.weight": TensorTarget("model.embed_tokens.weight", (v, d)),
        "output_norm.weight": TensorTarget("model.norm.weight", (d,)),
    }
    if not config.tie_word_embeddings:
        out["output.weight"] = TensorTarget("lm_head.weight", (v, d))
    shapes = {
        "attn_q": ((q, d), config.num_attention_heads),
        "attn_k": ((kv, d), config.num_key_value_heads),
        "attn_v": ((kv, d), None),
        "attn_output": ((d, q), None),
        "ffn_gate": ((f, d), None),
        "ffn_up": ((f, d), None),
        "ffn_down": ((d, f), None),
        "attn_norm": ((d,), None),
        "ffn_norm": ((d,), None),
    }
    for i in range(config.num_hidden_layers):
        for name, (shape, heads) in shapes.items():
            out[f"blk.{i}.{name}.weight"] = TensorTarget(f"model.layers.{i}.{_LAYER_TENSORS[name]}.weight", shape, heads)
    return out


@functools.cache
def can_dequantize(tensor_type) -> bool:
    """Whether `gguf.quants.dequantize` handles this `GGMLQuantizationType` (probed on one block)."""
    gguf = _gguf_package()

    block, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
    try:
        values = gguf.quants.dequantize(np.zeros((1, block_bytes), np.uint8), tensor_type)
    except Exception:  # NotImplementedError, or a type whose block layout the probe gets wrong
        return False
    return values.dtype == np.float32 and values.size == block


def plan_tensors(reader, config: ModelConfig, source: Path) -> list[tuple[Any, TensorTarget]]:
    """(GGUF tensor, target) for every tensor, in HF name order, after checking that the file has
    exactly the expected tensors, each with the expected shape and a type that can be dequantised."""
    targets = tensor_targets(config)
    planned = []
    for tensor in reader.tensors:
        target = targets.get(tensor.name)
        if target is None:
            why = ("llama 3 rope frequency factors are not supported" if tensor.name.startswith("rope_freqs")
                   else "not part of a Llama model with this metadata")
            raise GGUFError(f"{source}: unexpected tensor {tensor.name!r} ({why})")
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        if shape != target.shape:
            raise GGUFError(f"{source}: tensor {tensor.name!r} has shape {shape} (HF layout), "
                            f"but the metadata implies {target.shape}")
        if not can_dequantize(tensor.tensor_type):
            raise GGUFError(f"{source}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, "
                            "which gguf.quants cannot dequantize")
        planned.append((tensor, target))
    missing = sorted(set(targets) - {t.name for t, _ in planned})
    if missing:
        raise GGUFError(f"{source}: missing tensor {missing[0]!r}"
                        + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return sorted(planned, key=lambda item: item[1].hf_name)


def unpermute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's rotary row permutation of q_proj / k_proj (module docstring):
    rows viewed as (heads, D/2, 2) -> (heads, 2, D/2)."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_tensor(tensor, target: TensorTarget) -> np.ndarray:
    """One GGUF tensor as float32 in HF layout: dequantised, rotary permutation undone."""
    gguf = _gguf_package()

    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(target.shape)
    if target.rotary_heads is not None:
        values = unpermute_rotary(values, target.rotary_heads)
    return values


def write_safetensors(path: Path, specs: list[tuple[str, tuple[int, ...]]], dtype: str,
                      produce: Callable[[int], np.ndarray]) -> None:
    """Streams a safetensors file: the header from `specs` (name, shape), then `produce(i)` for
    each spec in turn, cast to `dtype`. Only one tensor is in memory at a time.

    Format: an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
    data_offsets: [begin, end]}, "__metadata__": {...}}`` padded with spaces to a multiple of 8,
    then the tensors' bytes back to back (offsets relative to the end of the header).
    """
    code, np_dtype = _DTYPES[dtype]
    if np_dtype is None:
        import ml_dtypes

        np_dtype = ml_dtypes.bfloat16
    itemsize = np.dtype(np_dtype).itemsize
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in specs:
        nbytes = math.prod(shape) * itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "xb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for i, (name, shape) in enumerate(specs):
            values = produce(i)
            if tuple(values.shape) != tuple(shape):
                raise AssertionError(f"{name}: produced shape {values.shape}, header says {shape}")
            f.write(np.ascontiguousarray(values.astype(np_dtype, copy=False)).reshape(-1).view(np.uint8).data)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------
# Tokenizer

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclasses.dataclass(frozen=True)
class PreTokenizer:
    """llama.cpp's pre-tokenizer for one ``tokenizer.ggml.pre`` name (llama-vocab.cpp).

    `splits`: regexes applied in turn, each splitting every piece into matches and gaps.
    `ignore_merges`: a pre-token that is itself in the vocabulary is one token (no BPE).
    `clean_spaces`: decoding removes the space before punctuation (clean_up_tokenization_spaces).
    """

    splits: tuple[str, ...]
    ignore_merges: bool = False
    clean_spaces: bool = True


_DIGITS_THEN_GPT2 = PreTokenizer((r"\p{N}", _GPT2_SPLIT))
_LLAMA3 = PreTokenizer((_LLAMA3_SPLIT,), ignore_merges=True)
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "gpt-2": PreTokenizer((_GPT2_SPLIT,)),
    "smollm": dataclasses.replace(_DIGITS_THEN_GPT2, clean_spaces=False),  # every digit its own piece
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "qwen2": PreTokenizer((_QWEN2_SPLIT,), clean_spaces=False),
}


def _split_merge(merge: str) -> tuple[str, str]:
    # As llama.cpp does: the first space after the first character (a token may start with one).
    cut = merge.find(" ", 1)
    if cut < 0:
        raise ValueError(merge)
    return merge[:cut], merge[cut + 1:]


def build_tokenizer(meta: dict, source: Path):
    """`(tokenizers.Tokenizer, tokenizer_config dict)` for a GGUF's byte-level BPE vocabulary.

    Control tokens become special added tokens and user-defined ones plain added tokens (both
    matched whole in the text); BOS/EOS are prepended/appended when ``add_bos_token`` /
    ``add_eos_token`` say so. Only ``tokenizer.ggml.model == "gpt2"`` with a `PRE_TOKENIZERS` name
    is supported; anything else is a `GGUFError` naming the key and value.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _key(meta, "tokenizer.ggml.model", source, str)
    if kind != "gpt2":
        raise GGUFError(f"{source}: tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE) is supported")
    pre_name = _key(meta, "tokenizer.ggml.pre", source, str)
    if pre_name not in PRE_TOKENIZERS:
        raise GGUFError(f"{source}: tokenizer.ggml.pre is {pre_name!r}, a pre-tokenizer jraise does not know; "
                        f"known: {', '.join(sorted(PRE_TOKENIZERS))}")
    pre = PRE_TOKENIZERS[pre_name]
    tokens = _key(meta, "tokenizer.ggml.tokens", source, list)
    types = _key(meta, "tokenizer.ggml.token_type", source, list, default=[TOKEN_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise GGUFError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        seen: set[str] = set()
        dup = next(t for t in tokens if t in seen or seen.add(t))
        raise GGUFError(f"{source}: tokenizer.ggml.tokens lists {dup!r} more than once")
    raw_merges = _key(meta, "tokenizer.ggml.merges", source, list)
    try:
        merges = [_split_merge(m) for m in raw_merges]
    except ValueError as err:
        raise GGUFError(f"{source}: tokenizer.ggml.merges entry {str(err)!r} is not 'left right'") from None

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre.ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == TOKEN_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, types) if kind == TOKEN_USER_DEFINED])

    def special(name: str) -> str | None:
        index = _key(meta, f"tokenizer.ggml.{name}_token_id", source, default=None)
        if index is not None and not 0 <= index < len(tokens):
            raise GGUFError(f"{source}: tokenizer.ggml.{name}_token_id {index} is outside the vocabulary")
        return None if index is None else tokens[index]

    bos, eos = special("bos"), special("eos")
    add_bos = _key(meta, "tokenizer.ggml.add_bos_token", source, bool, default=False)
    add_eos = _key(meta, "tokenizer.ggml.add_eos_token", source, bool, default=False)
    for flag, key, token in ((add_bos, "add_bos_token", bos), (add_eos, "add_eos_token", eos)):
        if flag and token is None:
            raise GGUFError(f"{source}: tokenizer.ggml.{key} is true but the file names no such token")
    if add_bos or add_eos:
        single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
        used = {t for t, flag in ((bos, add_bos), (eos, add_eos)) if flag}
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in sorted(used)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": special("padding"),
        "unk_token": special("unknown"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": pre.clean_spaces,
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = _key(meta, "tokenizer.chat_template", source, str)
    context = meta.get(f"{meta.get('general.architecture')}.context_length")
    if isinstance(context, int):
        config["model_max_length"] = context
    return tok, config


def generation_config(config: ModelConfig, meta: dict) -> dict:
    """generation_config.json: the special token ids, and sampling defaults the file states
    (``general.sampling.temp`` / ``top_k`` / ``top_p``)."""
    out: dict[str, Any] = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                           if getattr(config, k) is not None}
    sampling = {"temperature": "general.sampling.temp", "top_k": "general.sampling.top_k",
                "top_p": "general.sampling.top_p"}
    for name, key in sampling.items():
        if key in meta and isinstance(meta[key], (int, float)) and not isinstance(meta[key], bool):
            out[name] = _decimal(meta[key]) if isinstance(meta[key], float) else meta[key]
    if any(name in out for name in sampling):
        out["do_sample"] = True
    return out


# ----------------------------------------------------------------------------------------------
# The conversion


def _write_text(path: Path, text: str) -> None:
    with open(path, "x", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: dict) -> None:
    _write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def convert_gguf(src_gguf: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32", *,
                 overwrite: bool = False) -> Path:
    """Converts a llama-architecture GGUF into a Hugging Face model directory; returns its path.

    `dtype` ("float32" / "bfloat16") is the dtype of the written weights; every GGUF type
    dequantises exactly into float32. The directory holds config.json (LlamaForCausalLM),
    model.safetensors, tokenizer.json, tokenizer_config.json (with the file's chat template) and
    generation_config.json. It is built under a hidden name beside `out_dir` and renamed into
    place. An existing non-empty `out_dir` is an error (FileExistsError) unless `overwrite`, which
    replaces it only once the new directory is complete.

    Raises `GGUFError` (a ValueError) naming the file and the key or tensor for: a file that is
    not GGUF or is truncated, another architecture, missing or ill-typed metadata, a missing,
    unexpected or misshapen tensor, a tensor type gguf cannot dequantise, an unsupported tokenizer.
    """
    src, out = Path(src_gguf), Path(out_dir)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists and is not empty (the --overwrite option, overwrite=True in Python, replaces it)")

    reader = open_gguf(src)
    meta = read_metadata(reader)
    config = model_config(meta, (t.name for t in reader.tensors), src, dtype)
    planned = plan_tensors(reader, config, src)
    tokenizer, tokenizer_config = build_tokenizer(meta, src)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    tmp.mkdir()
    try:
        write_safetensors(tmp / "model.safetensors", [(target.hf_name, target.shape) for _, target in planned],
                          dtype, lambda i: hf_tensor(*planned[i]))
        _write_json(tmp / "config.json", config.to_hf_dict())
        _write_text(tmp / "tokenizer.json", tokenizer.to_str())
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        _write_json(tmp / "generation_config.json", generation_config(config, meta))
        if out.is_dir() and not any(out.iterdir()) or not (out.exists() or out.is_symlink()):
            os.replace(tmp, out)  # onto nothing, or onto an empty directory
        else:  # overwrite: the old one goes only once the new one is in place
            old = temp_sibling(out)
            os.replace(out, old)
            os.replace(tmp, out)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = [
    "GGUFError", "PRE_TOKENIZERS", "PreTokenizer", "TensorTarget", "build_tokenizer", "can_dequantize",
    "convert_gguf", "generation_config", "hf_tensor", "model_config", "open_gguf", "plan_tensors",
    "read_metadata", "tensor_targets", "unpermute_rotary", "write_safetensors",
]
