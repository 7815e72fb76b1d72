"""jraise.model: the Llama-family decoder (llama, mistral, qwen2, qwen3) in Flax NNX, HF checkpoints,
tokenizers, LoRA, generation."""

from jraise.model.config import (
    PRESETS, SUPPORTED_DTYPES, SUPPORTED_MODEL_TYPES, ModelConfig, dtype_name, preset_config, read_config,
)
from jraise.model.hf import load_model, parameter_count, save_model
from jraise.model.peft import load_peft_adapter, save_peft_adapter
from jraise.model.tokenizer import DEFAULT_CHAT_TEMPLATE, build_char_tokenizer, load_tokenizer
from jraise.model.transformer import CausalLM, default_positions, init_cache, init_model

__all__ = [
    "PRESETS", "SUPPORTED_DTYPES", "SUPPORTED_MODEL_TYPES", "ModelConfig", "dtype_name", "preset_config",
    "read_config",
    "load_model", "save_model", "parameter_count", "load_peft_adapter", "save_peft_adapter",
    "DEFAULT_CHAT_TEMPLATE", "build_char_tokenizer", "load_tokenizer",
    "CausalLM", "default_positions", "init_cache", "init_model",
]
