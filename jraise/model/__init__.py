"""jraise.model: the Llama-family decoder in Flax NNX, HF checkpoints, tokenizers, LoRA, generation."""

from jraise.model.config import PRESETS, SUPPORTED_MODEL_TYPES, ModelConfig, preset_config, read_config
from jraise.model.hf import load_model, parameter_count, save_model
from jraise.model.tokenizer import DEFAULT_CHAT_TEMPLATE, build_char_tokenizer, load_tokenizer
from jraise.model.transformer import CausalLM, default_positions, init_cache, init_model

__all__ = [
    "PRESETS", "SUPPORTED_MODEL_TYPES", "ModelConfig", "preset_config", "read_config",
    "load_model", "save_model", "parameter_count",
    "DEFAULT_CHAT_TEMPLATE", "build_char_tokenizer", "load_tokenizer",
    "CausalLM", "default_positions", "init_cache", "init_model",
]
