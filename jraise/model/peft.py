"""PEFT LoRA adapters in and out: `save_peft_adapter` and `load_peft_adapter`.

The format is the one `peft.PeftModel.save_pretrained` writes for a LoRA adapter on a causal LM,
and `peft.PeftModel.from_pretrained(base, adapter_dir)` reads:

* ``adapter_config.json``: ``peft_type: LORA``, ``task_type: CAUSAL_LM``, ``r``, ``lora_alpha``,
  ``lora_dropout``, ``target_modules`` (projection names), ``base_model_name_or_path``, and the
  switches of PEFT's LoRA variants, all off (``use_dora``, ``use_rslora``, ``bias: none``, ...);
* ``adapter_model.safetensors``: for every adapted linear layer with Hugging Face module name ``M``
  (``model.layers.{i}.self_attn.q_proj``), ``base_model.model.M.lora_A.weight`` [r, in] and
  ``base_model.model.M.lora_B.weight`` [out, r]: torch's Linear layout, the transposes of jraise's
  ``lora_a`` [in, r] and ``lora_b`` [r, out].

PEFT computes y = x W^T + (x A^T B^T) * scaling with scaling = lora_alpha / r (lora_alpha / sqrt(r)
under ``use_rslora``); jraise computes y = x kernel + (x lora_a lora_b) * lora_scale. So
lora_a = A^T, lora_b = B^T and lora_scale = scaling: the two models give the same logits.

Reading refuses, naming the file and field or tensor, what jraise's LoRA cannot represent: DoRA,
LoRA biases, per-module rank or alpha patterns, ``modules_to_save``, ``fan_in_fan_out``, other
PEFT methods or LoRA variants, modules other than the attention and MLP projections, modules the
model does not have, shape mismatches, and adapters that skip some layers (jraise adapts a
projection in every layer). ``adapter_model.bin`` (older PEFT) is read when torch is installed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jraise.atomic import atomic_write_bytes, temp_sibling
from jraise.model.config import read_json_object
from jraise.model.hf import model_variables
from jraise.model.lora import ATTENTION_TARGETS, MLP_TARGETS, LoRAConfig, add_lora, attached_lora_config, has_lora
from jraise.model.transformer import CausalLM, Projection, dtype_of

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TORCH_WEIGHTS_FILE = "adapter_model.bin"
# What PEFT's save_pretrained leaves in an adapter directory; a directory holding anything else
# is not overwritten.
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, TORCH_WEIGHTS_FILE, "README.md")
SUPPORTED_TARGETS = ATTENTION_TARGETS + MLP_TARGETS
KEY_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")

# adapter_config.json fields that switch on something jraise's LoRA cannot represent, each active
# unless it is null, false, empty or (for `bias`) "none".
_REFUSED_FIELDS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "bias": "trained biases",
    "lora_bias": "a bias on lora_B",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "modules_to_save": "fully trained extra modules",
    "fan_in_fan_out": "Conv1D-style transposed weights",
    "layer_replication": "replicated layers",
    "target_parameters": "adapted nn.Parameters",
    "trainable_token_indices": "trained token embeddings",
    "alora_invocation_tokens": "activated LoRA",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "arrow_config": "Arrow routing",
}


@dataclass(frozen=True)
class AdapterSettings:
    """What an ``adapter_config.json`` says that jraise uses: rank r, the branch's scaling
    (lora_alpha / r, or lora_alpha / sqrt(r) under use_rslora), dropout, and the target names
    (None when ``target_modules`` is a pattern string: the tensors then decide)."""

    rank: int
    scaling: float
    dropout: float
    targets: tuple[str, ...] | None


# ----------------------------------------------------------------------------------------------
# Module names


def adaptable_modules(model: CausalLM) -> dict[str, Projection]:
    """Hugging Face module name (``model.layers.0.self_attn.q_proj``) -> jraise `Projection`, for
    every projection jraise's LoRA can adapt."""
    projections = {path: node for path, node in nnx.iter_graph(model)
                   if isinstance(node, Projection) and path and str(path[-1]) in SUPPORTED_TARGETS}
    return {name.removesuffix(".weight"): projections[path[:-1]]
            for name, (path, _) in model_variables(model).items()
            if str(path[-1]) == "kernel" and path[:-1] in projections}


def peft_key(module: str, which: str) -> str:
    """The adapter tensor name of ``module``'s lora_A (``which="A"``) or lora_B (``"B"``)."""
    return f"{KEY_PREFIX}{module}.lora_{which}.weight"


# ----------------------------------------------------------------------------------------------
# Writing


def _json_number(x: float) -> int | float:
    return int(round(x)) if math.isclose(x, round(x), rel_tol=1e-12, abs_tol=1e-12) else float(x)


def adapter_config_dict(config: LoRAConfig, base_model_name_or_path: str | None) -> dict:
    """The ``adapter_config.json`` PEFT reads for adapters of ``config``: plain LoRA, scaling
    alpha / rank, every variant switched off."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": config.rank,
        "lora_alpha": _json_number(config.alpha),
        "lora_dropout": config.dropout,
        "target_modules": list(config.targets),
        "exclude_modules": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def adapter_tensors(model: CausalLM) -> dict[str, jnp.ndarray]:
    """PEFT tensor name -> adapter matrix in torch layout (lora_A [r, in], lora_B [out, r]), in
    the model's parameter dtype, for every adapted projection."""
    out = {}
    for module, proj in adaptable_modules(model).items():
        if proj.lora_a is not None:
            out[peft_key(module, "A")] = proj.lora_a[...].T
            out[peft_key(module, "B")] = proj.lora_b[...].T
    return out


def _check_replaceable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory; cannot write an adapter there")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ADAPTER_FILES)
        if foreign:
            raise FileExistsError(f"{out}: holds files that are not part of a PEFT adapter ({', '.join(foreign[:3])}"
                                  f"{' ...' if len(foreign) > 3 else ''}); write the adapter to another directory")


def write_directory(out: Path, files: dict[str, bytes]) -> Path:
    """Writes ``files`` (name -> content) as the directory ``out``, replacing an earlier one whole:
    the files go to a hidden sibling directory that is then renamed into place, so ``out`` holds
    either the old set of files or the new one, never a mix or a partial file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_sibling(out)
    staging.mkdir()
    old = None
    try:
        for name, data in files.items():
            atomic_write_bytes(staging / name, data)
        if out.exists():
            old = temp_sibling(out)
            os.replace(out, old)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def save_peft_adapter(model: CausalLM, out_dir: str | os.PathLike,
                      base_model_name_or_path: str | os.PathLike | None = None) -> Path:
    """Writes the model's LoRA adapters as a PEFT adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base, out_dir)`` loads onto
    the transformers model of the base checkpoint.

    ``base_model_name_or_path`` is recorded in the config (a path is made absolute). The adapter
    settings are read back from the model (`attached_lora_config`). ``out_dir`` is written whole
    or not at all (`write_directory`); an existing directory holding other files is refused.
    In a multi-process run every process must call it; process 0 writes. Returns ``out_dir``.
    """
    from safetensors.flax import save

    from jraise import parallel

    config = attached_lora_config(model)
    if config is None:
        raise ValueError("the model has no LoRA adapters to save (attach them with add_lora or load_peft_adapter)")
    out = Path(out_dir)
    _check_replaceable(out)
    if isinstance(base_model_name_or_path, os.PathLike):
        base_model_name_or_path = str(Path(base_model_name_or_path).absolute())
    tensors = {name: jnp.asarray(parallel.to_host(v)) for name, v in adapter_tensors(model).items()}
    if parallel.is_writer():
        settings = adapter_config_dict(config, base_model_name_or_path)
        write_directory(out, {
            WEIGHTS_FILE: save(tensors, metadata={"format": "pt"}),
            CONFIG_FILE: (json.dumps(settings, indent=2) + "\n").encode(),
        })
    parallel.barrier(f"save_peft_adapter:{out}")
    return out


# ----------------------------------------------------------------------------------------------
# Reading


def _is_inactive(field: str, value) -> bool:
    if field == "bias":
        return value in (None, "none")
    return value is None or value is False or value == {} or value == [] or value == ""


def read_adapter_settings(adapter_dir: str | os.PathLike) -> AdapterSettings:
    """Reads and checks ``adapter_config.json``; errors name the file and the field."""
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no PEFT adapter config (is {adapter_dir} a PEFT adapter directory?)")
    raw = read_json_object(path)
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{path}: peft_type is {peft_type!r}; only LoRA adapters ('LORA') are supported")
    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"{path}: task_type is {raw['task_type']!r}; only causal-LM adapters ('CAUSAL_LM') "
                         "are supported")
    for field, what in _REFUSED_FIELDS.items():
        if not _is_inactive(field, raw.get(field)):
            raise ValueError(f"{path}: field {field!r} is {raw[field]!r}: {what} cannot be represented by "
                             "jraise's LoRA")
    rank = raw.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{path}: field 'r' must be a positive integer, got {rank!r}")
    alpha = raw.get("lora_alpha", 8)  # PEFT's default
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{path}: field 'lora_alpha' must be a number, got {alpha!r}")
    dropout = raw.get("lora_dropout") or 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{path}: field 'lora_dropout' must be a number in [0, 1), got {dropout!r}")
    rslora = bool(raw.get("use_rslora", False))
    scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
    return AdapterSettings(rank=rank, scaling=float(scaling), dropout=float(dropout),
                           targets=_read_targets(path, raw.get("target_modules")))


def _read_targets(path: Path, targets) -> tuple[str, ...] | None:
    if targets is None:
        raise ValueError(f"{path}: field 'target_modules' is missing")
    if isinstance(targets, str):
        return None  # a regex or "all-linear": the tensors say which modules are adapted
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets) or not targets:
        raise ValueError(f"{path}: field 'target_modules' must be a non-empty list of module names or a "
                         f"pattern string, got {targets!r}")
    unsupported = sorted(set(targets) - set(SUPPORTED_TARGETS))
    if unsupported:
        raise ValueError(f"{path}: field 'target_modules' names {unsupported}, which jraise's LoRA cannot "
                         f"adapt; supported: {', '.join(SUPPORTED_TARGETS)}")
    return tuple(t for t in SUPPORTED_TARGETS if t in targets)


def read_adapter_tensors(adapter_dir: str | os.PathLike) -> tuple[Path, dict[str, np.ndarray]]:
    """(weights file, PEFT tensor name -> float32 array) from ``adapter_model.safetensors``, else
    ``adapter_model.bin`` (needs torch)."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / WEIGHTS_FILE
    if path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="flax") as f:
                return path, {name: np.asarray(f.get_tensor(name), np.float32) for name in f.keys()}
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a readable safetensors file: {err}") from err
    path = adapter_dir / TORCH_WEIGHTS_FILE
    if path.is_file():
        try:
            import torch
        except ImportError as err:
            raise ImportError(f"{path}: reading a torch-pickled adapter needs torch; install it, or convert "
                              f"the file to {WEIGHTS_FILE}") from err
        state = torch.load(path, map_location="cpu", weights_only=True)
        return path, {name: t.detach().float().numpy() for name, t in state.items()}
    raise FileNotFoundError(f"{adapter_dir}: no {WEIGHTS_FILE} or {TORCH_WEIGHTS_FILE}")


def adapter_pairs(path: Path, tensors: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Module name -> {"A": lora_A [r, in], "B": lora_B [out, r]}; any other tensor, or a module
    with only one of the two, is an error naming the file and the tensor."""
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        match = _KEY.match(name)
        if match is None:
            raise ValueError(f"{path}: tensor {name!r} is not a LoRA matrix "
                             "(expected base_model.model.<module>.lora_A/lora_B.weight)")
        pairs.setdefault(match["module"], {})[match["which"]] = value
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise ValueError(f"{path}: tensor {peft_key(module, missing)!r} is missing (module {module} has only "
                             f"lora_{set(pair).pop()})")
    return pairs


def _check_modules(path: Path, pairs: dict, modules: dict[str, Projection], settings: AdapterSettings,
                   n_layers: int) -> None:
    """Every adapted module exists, is a supported projection the config targets, has shapes
    [r, in] / [out, r], and each adapted projection name is adapted in every layer."""
    for module, pair in sorted(pairs.items()):
        short = module.rsplit(".", 1)[-1]
        if module not in modules:
            if short in SUPPORTED_TARGETS:
                raise ValueError(f"{path}: tensor {peft_key(module, 'A')!r} adapts {module}, which this model "
                                 f"({n_layers} layers) does not have")
            raise ValueError(f"{path}: tensor {peft_key(module, 'A')!r} adapts {module}, which jraise's LoRA cannot "
                             f"adapt; supported: {', '.join(SUPPORTED_TARGETS)}")
        if settings.targets is not None and short not in settings.targets:
            raise ValueError(f"{path}: tensor {peft_key(module, 'A')!r} adapts {short}, which the adapter config's "
                             f"target_modules {list(settings.targets)} does not name")
        d_in, d_out = modules[module].kernel.shape
        for which, want in (("A", (settings.rank, d_in)), ("B", (d_out, settings.rank))):
            got = tuple(pair[which].shape)
            if got != want:
                raise ValueError(f"{path}: tensor {peft_key(module, which)!r} has shape {got}, but r="
                                 f"{settings.rank} and the model's {module} ({d_in} -> {d_out}) need {want}")
    adapted = {m.rsplit(".", 1)[-1] for m in pairs}
    if settings.targets is not None:
        absent = sorted(set(settings.targets) - adapted)
        if absent:
            raise ValueError(f"{path}: target_modules names {absent} but the file holds no tensors for them")
    for short in sorted(adapted):
        every = sorted(m for m in modules if m.rsplit(".", 1)[-1] == short)
        have = [m for m in every if m in pairs]
        if len(have) != len(every):
            raise ValueError(f"{path}: {short} is adapted in {len(have)} of {len(every)} layers; jraise's LoRA "
                             "adapts a projection in every layer (layers_to_transform, exclude_modules and "
                             "layer-selective patterns are not supported)")


def load_peft_adapter(model: CausalLM, adapter_dir: str | os.PathLike, seed: int = 0) -> CausalLM:
    """Attaches the PEFT LoRA adapter in ``adapter_dir`` to ``model`` (in place; returned).

    ``model`` is jraise's model of the adapter's base checkpoint, without adapters. The adapted
    projections get lora_a = lora_A^T, lora_b = lora_B^T (cast to the model's parameter dtype)
    and PEFT's scaling, so the model gives the PeftModel's logits; ``lora_dropout`` becomes the
    branch dropout (``seed`` seeds its keys). Anything jraise's LoRA cannot represent is refused
    before the model is touched (see the module docstring). An rsLoRA adapter keeps its scaling
    alpha / sqrt(r); `save_peft_adapter` writes it back as plain LoRA with lora_alpha = scaling * r,
    the same function.
    """
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters; load a PEFT adapter onto a model without them")
    settings = read_adapter_settings(adapter_dir)
    path, tensors = read_adapter_tensors(adapter_dir)
    pairs = adapter_pairs(path, tensors)
    if not pairs:
        raise ValueError(f"{path}: holds no LoRA tensors")
    modules = adaptable_modules(model)
    _check_modules(path, pairs, modules, settings, model.config.num_hidden_layers)

    adapted = {m.rsplit(".", 1)[-1] for m in pairs}
    config = LoRAConfig(rank=settings.rank, alpha=settings.scaling * settings.rank, dropout=settings.dropout,
                        targets=tuple(t for t in SUPPORTED_TARGETS if t in adapted))
    add_lora(model, config, seed=seed)
    param_dtype = dtype_of(model.config.param_dtype)
    for module, pair in pairs.items():
        proj = modules[module]
        proj.lora_a.value = jnp.asarray(pair["A"].T, param_dtype)
        proj.lora_b.value = jnp.asarray(pair["B"].T, param_dtype)
        proj.lora_scale = settings.scaling
    return model
