"""LoRA adapters (Hu et al. 2021, arXiv 2106.09685) on the decoder's projections.

`add_lora` attaches a low-rank branch to each chosen `Projection`: y = x W + dropout(x) A B * (alpha/r),
with A [in, r] ~ N(0, 1/in)-scaled random and B [r, out] = 0, so a fresh adapter changes nothing. A and
B are `nnx.LoRAParam`, so `nnx.state(model, nnx.LoRAParam)` / `nnx.DiffState(0, nnx.LoRAParam)`
select exactly the trainable subset while base weights stay frozen. `merge_lora` folds the adapters
into the base kernels for export (`save_model` also merges on the fly, without mutating).
`attached_lora_config` reads the `LoRAConfig` back from a model; `jraise.model.peft` writes and
reads the adapters in PEFT's format.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jraise.model.transformer import CausalLM, Projection, dtype_of

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank r, scaling alpha (the branch is multiplied by alpha / r), dropout on the branch input,
    and the projection names to adapt (default: attention q, k, v, o)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ATTENTION_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        unknown = set(self.targets) - set(ATTENTION_TARGETS + MLP_TARGETS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from "
                             f"{', '.join(ATTENTION_TARGETS + MLP_TARGETS)}")


def lora_projections(model: nnx.Module, targets: tuple[str, ...]):
    """(path, Projection) pairs whose name is in `targets`."""
    return [(path, node) for path, node in nnx.iter_graph(model)
            if isinstance(node, Projection) and path and str(path[-1]) in targets]


def add_lora(model: CausalLM, config: LoRAConfig, seed: int = 0) -> CausalLM:
    """Attaches fresh adapters in place (and returns the model). B = 0: logits are unchanged."""
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    found = lora_projections(model, config.targets)
    if not found:
        raise ValueError(f"no projections named {config.targets} in the model")
    param_dtype = dtype_of(model.config.param_dtype)
    for _, proj in found:
        d_in, d_out = proj.kernel.shape
        # Kaiming-uniform-like scale for A (as PEFT does), zeros for B.
        bound = 1.0 / jnp.sqrt(d_in)
        a = jax.random.uniform(rngs.params(), (d_in, config.rank), jnp.float32, -bound, bound)
        proj.lora_a = nnx.LoRAParam(a.astype(param_dtype))
        proj.lora_b = nnx.LoRAParam(jnp.zeros((config.rank, d_out), param_dtype))
        proj.lora_scale = float(config.alpha) / config.rank
        proj.lora_dropout = nnx.Dropout(config.dropout, rngs=rngs) if config.dropout > 0 else None
    return model


def merge_lora(model: CausalLM) -> CausalLM:
    """Folds every adapter into its base kernel (W += A B alpha/r) and removes it, in place."""
    for _, proj in nnx.iter_graph(model):
        if isinstance(proj, Projection) and proj.lora_a is not None:
            delta = (proj.lora_a[...].astype(jnp.float32) @ proj.lora_b[...].astype(jnp.float32)) * proj.lora_scale
            proj.kernel.value = (proj.kernel[...].astype(jnp.float32) + delta).astype(proj.kernel.dtype)
            proj.lora_a = None
            proj.lora_b = None
            proj.lora_scale = 0.0
            proj.lora_dropout = None
    return model


def has_lora(model: nnx.Module) -> bool:
    return any(isinstance(n, Projection) and n.lora_a is not None for _, n in nnx.iter_graph(model))


def attached_lora_config(model: nnx.Module) -> LoRAConfig | None:
    """The `LoRAConfig` of the adapters attached to ``model`` (None without adapters), read back
    from its projections: rank from ``lora_a``'s shape, alpha = lora_scale * rank, dropout rate,
    and the adapted projection names in canonical order. Errors when the adapters differ in rank
    or scale, which one config cannot describe."""
    adapted = [(str(path[-1]), node) for path, node in nnx.iter_graph(model)
               if isinstance(node, Projection) and node.lora_a is not None]
    if not adapted:
        return None
    ranks = {int(node.lora_a.shape[1]) for _, node in adapted}
    scales = {float(node.lora_scale) for _, node in adapted}
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError(f"the model's adapters differ in rank {sorted(ranks)} or scale {sorted(scales)}; "
                         "one LoRAConfig cannot describe them")
    rank, scale = ranks.pop(), scales.pop()
    names = {name for name, _ in adapted}
    dropout = next((float(node.lora_dropout.rate) for _, node in adapted if node.lora_dropout is not None), 0.0)
    return LoRAConfig(rank=rank, alpha=scale * rank, dropout=dropout,
                      targets=tuple(t for t in ATTENTION_TARGETS + MLP_TARGETS if t in names))
