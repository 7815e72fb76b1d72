"""Model configuration: one frozen dataclass for the Llama family (llama, mistral, qwen2, qwen3).

Maps to and from Hugging Face `config.json`. Every field read from a file is checked, and an error
names the file and the field. Dtypes are kept as canonical names ("float32", "bfloat16"): callers
may pass a JAX or NumPy dtype, and `dtype_name` turns it into its name at the boundary.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_DTYPES = ("float32", "bfloat16")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def dtype_name(dtype: Any) -> str:
    """The canonical name ("float32" or "bfloat16") of a dtype given as a name, a JAX dtype
    (`jnp.bfloat16`) or a NumPy dtype (`np.dtype("float32")`). Anything else is a ValueError."""
    if isinstance(dtype, str) and dtype in SUPPORTED_DTYPES:
        return dtype
    try:
        name = None if dtype is None else jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: {', '.join(SUPPORTED_DTYPES)} "
                         "(as names, or the matching jnp / np dtypes)")
    return name


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only LM of the Llama family.

    `dtype` is the compute dtype, `param_dtype` the storage dtype of the weights ("float32" or
    "bfloat16"; a jnp / np dtype is accepted and stored as its name). `rope_scaling` is None or a
    Llama-3 style dict (`rope_type: llama3`, `factor`, `low_freq_factor`, `high_freq_factor`,
    `original_max_position_embeddings`). Qwen3 adds a per-head RMSNorm on queries and keys
    (`qk_norm`).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # a dict frozen as sorted items
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v (Qwen2: always; Llama, Qwen3: optional, also on o)
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    initializer_range: float = 0.02  # std of the normal init of every weight matrix (transformers' field)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        for name in ("dtype", "param_dtype"):
            try:
                object.__setattr__(self, name, dtype_name(getattr(self, name)))  # frozen: normalise once
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from err
        if not self.initializer_range > 0:
            raise ValueError(f"initializer_range must be > 0, got {self.initializer_range}")

    @property
    def rope_scaling_dict(self) -> dict | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def o_proj_bias(self) -> bool:
        # Llama's and Qwen3's `attention_bias` cover o_proj too; Qwen2 has biases on q, k, v only.
        return self.attention_bias and self.model_type in ("llama", "qwen3")

    @property
    def qk_norm(self) -> bool:
        """Qwen3: RMSNorm over head_dim on each query and key head, before RoPE."""
        return self.model_type == "qwen3"

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self) -> dict:
        """The `config.json` transformers reads for this model."""
        out = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
            "initializer_range": self.initializer_range,
            "use_cache": True,
        }
        rope_scaling = self.rope_scaling_dict
        # transformers 5 reads rope settings from `rope_parameters`; older versions from
        # `rope_theta`/`rope_scaling`. Writing both keeps the file loadable by either.
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if rope_scaling is not None:
            out["rope_scaling"] = rope_scaling
            out["rope_parameters"] = {**rope_scaling, "rope_theta": self.rope_theta}
        if self.model_type == "llama":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            out["use_sliding_window"] = False
            out["sliding_window"] = None
            out["max_window_layers"] = self.num_hidden_layers
        if self.model_type == "qwen3":
            out["attention_bias"] = self.attention_bias
        return out

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json", **overrides) -> "ModelConfig":
        """Reads a transformers `config.json` dict; errors name `source` and the field."""

        def need(field, kind=(int,)):
            if field not in d or d[field] is None:
                raise ValueError(f"{source}: missing required field {field!r}")
            value = d[field]
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"{source}: field {field!r} must be {kind[0].__name__}, got {value!r}")
            return value

        model_type = d.get("model_type")
        if model_type is None:
            raise ValueError(f"{source}: missing required field 'model_type'")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: field 'model_type' is {model_type!r}, which jraise does not support; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: field 'hidden_act' is {act!r}; only 'silu' (SwiGLU) is supported")
        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = d.get("num_key_value_heads") or heads
        head_dim = d.get("head_dim") or hidden // heads

        rope = d.get("rope_parameters") or {}
        rope_scaling = d.get("rope_scaling") or None
        if rope_scaling is None and rope.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind == "default":
                rope_scaling = None
            elif kind != "llama3":
                raise ValueError(
                    f"{source}: field 'rope_scaling' has rope_type {kind!r}; supported: 'llama3' or none"
                )
            else:
                for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    if key not in rope_scaling:
                        raise ValueError(f"{source}: field 'rope_scaling' lacks {key!r}")
                rope_scaling = tuple(sorted({**rope_scaling, "rope_type": "llama3"}.items()))
        rope_theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))

        sliding_window = None
        if model_type == "mistral":
            sliding_window = d.get("sliding_window")
        if model_type == "qwen2" and d.get("use_sliding_window", False):
            raise ValueError(f"{source}: field 'use_sliding_window' is true; jraise supports Qwen2 without it")
        if model_type == "qwen3":
            _check_qwen3_full_attention(d, source)
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(eos)
        torch_dtype = d.get("torch_dtype") or d.get("dtype") or "float32"
        kwargs = dict(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            model_type=model_type,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            initializer_range=float(d.get("initializer_range", 0.02)),
            attention_bias=True if model_type == "qwen2" else bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)) if model_type == "llama" else False,
            sliding_window=sliding_window,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=d.get("pad_token_id"),
            param_dtype="bfloat16" if torch_dtype == "bfloat16" else "float32",
        )
        kwargs["dtype"] = kwargs["param_dtype"]
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err


def _check_qwen3_full_attention(d: dict, source: str) -> None:
    """Refuses a Qwen3 config.json with any sliding-window layer: jraise attends over the full
    context in every layer. Layer kinds are derived as transformers' `Qwen3Config` does: from
    `layer_types` when given, else layers >= `max_window_layers` slide when `use_sliding_window`
    is true and `sliding_window` is set."""
    n_layers = d.get("num_hidden_layers")
    layer_types = d.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or isinstance(n_layers, int) and len(layer_types) != n_layers:
            raise ValueError(f"{source}: field 'layer_types' must be a list of num_hidden_layers ({n_layers}) "
                             f"entries, got {layer_types!r}")
        other = sorted({str(t) for t in layer_types} - {"full_attention"})
        if other:
            raise ValueError(f"{source}: field 'layer_types' has {', '.join(map(repr, other))}; jraise "
                             "supports Qwen3 with 'full_attention' in every layer")
    sliding = d.get("use_sliding_window", False) and d.get("sliding_window") is not None
    first_sliding = d.get("max_window_layers")
    first_sliding = 28 if first_sliding is None else first_sliding  # transformers' default
    if sliding and layer_types is None and isinstance(n_layers, int) and first_sliding < n_layers:
        raise ValueError(f"{source}: field 'use_sliding_window' is true, so layers from max_window_layers "
                         f"({first_sliding}) on use a sliding window; jraise supports Qwen3 with full "
                         "attention in every layer")


def read_json_object(path: Path) -> dict:
    """The JSON object in the file `path` (config.json, adapter_config.json, ...); a file that is not
    valid JSON, or holds something other than an object, is a ValueError naming it."""
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def read_config(model_dir: str | os.PathLike, **overrides) -> ModelConfig:
    """Reads `<model_dir>/config.json` into a `ModelConfig`."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in the model directory")
    return ModelConfig.from_hf_dict(read_json_object(path), source=str(path), **overrides)


# Presets for tests and demos. `tiny` is for unit tests (milliseconds); `small` is the testbed and
# benchmark model (459k parameters with the testbed tokenizer). Its init std is 0.08 (about
# 1/sqrt(hidden)), not transformers' 0.02: from scratch on the testbed the plateau at "a random letter"
# ends near step 400 instead of 1,300. It has 2 layers of 8 heads (16 dims, 4 KV heads), not 4 of 4
# (32 dims): per step it is faster and learns no slower (BUILD_NOTES, testbed calibration).
PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
    ),
    "small": dict(
        hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=16, max_position_embeddings=512, initializer_range=0.08,
    ),
    "base": dict(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
    ),
}


def preset_config(name: str, vocab_size: int, model_type: str = "llama", **overrides) -> ModelConfig:
    """A preset's `ModelConfig` for a given vocabulary size."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    kwargs = dict(PRESETS[name], vocab_size=vocab_size, model_type=model_type, rope_theta=10000.0)
    kwargs.update(overrides)
    return ModelConfig(**kwargs)
