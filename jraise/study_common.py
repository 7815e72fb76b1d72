"""What the selection study and its Beyond-IID part share: the settings key of a result and the
model fine-tuning starts from.

``config`` is a `jraise.study.StudyConfig` throughout. `options_key` hashes the options a result
depends on (the study's common options and the option groups named by ``own``);
`tunable_model` loads the study's base model with fresh LoRA adapters when the study tunes by LoRA.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path


# Option groups only some methods read: a row's key leaves out the groups its method does not read,
# so changing, say, RAISE's episodes recomputes the RAISE rows and keeps every other finished row.
METHOD_OPTION_PREFIXES = {"less": ("influence_",), "rose": ("influence_", "rose_"), "rose_model": ("influence_",),
                          "less_per_target": ("influence_",), "rose_per_target": ("influence_", "rose_"),
                          "ee_cpo": ("gamma_", "ee_cpo_"),
                          "dt_csft": ("gamma_", "dt_csft_"), "sspl": ("sspl_",), "raise": ("raise_",),
                          "raise_sampled": ("raise_",), "full_run": ("full_run_",)}
_ALL_PREFIXES = tuple(sorted({p for group in METHOD_OPTION_PREFIXES.values() for p in group}))


def options_key(config, tag: str, own: tuple[str, ...]) -> str:
    """A hash of ``tag`` and every option but the method and seed lists and the option groups
    (`METHOD_OPTION_PREFIXES`) other than ``own``: what a result computed from those options
    depends on."""
    settings = {k: v for k, v in asdict(config).items()
                if k not in ("methods", "seeds") and (not k.startswith(_ALL_PREFIXES) or k.startswith(own))}
    settings["base_model"] = config.model_identity()  # the model's definition, not only its name
    return hashlib.sha256(json.dumps({"method": tag, **settings}, sort_keys=True).encode()).hexdigest()[:16]


def tunable_model(base_dir: Path, config, seed: int):
    """The base model as fine-tuning starts from it: with fresh LoRA adapters when ``lora_rank``."""
    from jraise.model import load_model

    model, _ = load_model(base_dir)
    if config.lora_rank:
        from jraise.model.lora import LoRAConfig, add_lora

        add_lora(model, LoRAConfig(rank=config.lora_rank, alpha=2.0 * config.lora_rank), seed=seed)
    return model
