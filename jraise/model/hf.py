"""Hugging Face checkpoints in and out: `load_model` and `save_model`.

Loading streams: an abstract model is built with `nnx.eval_shape` (shapes only, no memory), then
each safetensors tensor is read, transposed where torch and jraise lay it out differently, cast,
and placed into its variable, one tensor at a time. The host never holds the whole state twice.

With an active `jraise.parallel` mesh each tensor goes straight into its sharding (the parameter
rules of `jraise.parallel.param_spec`): `jax.make_array_from_callback` asks for the slices this
process's devices hold and only those are read from the file (safetensors slices), so on a
multi-host run no host reads or holds the whole model.

Saving writes `config.json` and safetensors (sharded with `model.safetensors.index.json` above a
size limit) that `transformers.AutoModelForCausalLM.from_pretrained` loads. LoRA adapters, when
attached, are merged into the exported weights (the model itself is left unchanged).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from jraise.atomic import atomic_write_bytes
from jraise.model.config import ModelConfig, dtype_name, read_config
from jraise.model.transformer import CausalLM, Projection, dtype_of

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors some checkpoints carry that are derived, not learned: skipped on load.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _hf_name(path: tuple) -> str:
    """jraise variable path -> Hugging Face tensor name."""
    parts = [str(p) for p in path]
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    if parts[0] == "lm_head":
        return ".".join(parts)
    if parts[0] == "embed_tokens":
        return "model.embed_tokens.weight"
    return "model." + ".".join(parts)


def _is_kernel(path: tuple) -> bool:
    return str(path[-1]) == "kernel"


def model_variables(model: nnx.Module) -> dict[str, tuple[tuple, nnx.Variable]]:
    """HF tensor name -> (jraise path, variable) for every base (non-LoRA) parameter."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param) and not isinstance(node, nnx.LoRAParam):
            out[_hf_name(path)] = (path, node)
    return out


def _checkpoint_files(model_dir: Path) -> dict[str, list[str]]:
    """safetensors file -> tensor names it should hold (from the index, or the single file)."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: not a valid safetensors index (need a 'weight_map' object): {err}") from err
        files: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            files.setdefault(fname, []).append(name)
        for fname in files:
            if not (model_dir / fname).is_file():
                raise FileNotFoundError(f"{index}: shard {fname!r} listed in weight_map does not exist")
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return {SINGLE_FILE: []}
    raise FileNotFoundError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)")


def _read_sharded(stored, shape: tuple[int, ...], kernel: bool, dtype, mesh) -> jax.Array:
    """A global array of ``shape`` placed by the parameter rules, each device's block read from
    the file's slice ``stored`` (torch layout: a kernel is stored transposed)."""
    from jraise import parallel

    def block(index: tuple[slice, ...]) -> np.ndarray:
        part = stored[index[1], index[0]].T if kernel else stored[index]
        return np.asarray(part).astype(dtype)

    sharding = jax.sharding.NamedSharding(mesh, parallel.param_spec(shape, mesh))
    return jax.make_array_from_callback(shape, sharding, block)


def load_model(path: str | os.PathLike, dtype: DTypeLike | None = None, remat: bool = False,
               **config_overrides) -> tuple[CausalLM, ModelConfig]:
    """Loads a local HF model directory (config.json + safetensors, single or sharded).

    `dtype` ("float32" / "bfloat16", or `jnp.float32` / `jnp.bfloat16` / the np dtypes) sets both
    parameter and compute dtype; default: float32. An unsupported dtype is a ValueError.
    With an active `jraise.parallel` mesh every weight is read straight into its sharding.
    Returns (model, config). Errors name the file and the tensor or field at fault.
    """
    from safetensors import safe_open

    from jraise import parallel

    dtype = "float32" if dtype is None else dtype_name(dtype)
    mesh = parallel.active_mesh()
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory does not exist")
    config = read_config(model_dir, dtype=dtype, param_dtype=dtype, remat=remat, **config_overrides)
    files = _checkpoint_files(model_dir)

    model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    wanted = model_variables(model)
    loaded: set[str] = set()
    target = dtype_of(config.param_dtype)
    for fname in sorted(files):
        fpath = model_dir / fname
        try:
            handle = safe_open(str(fpath), framework="flax" if mesh is None else "numpy")
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{fpath}: not a readable safetensors file: {err}") from err
        with handle as f:
            for name in f.keys():
                if _IGNORED.search(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
                    continue
                if name not in wanted:
                    raise ValueError(f"{fpath}: unexpected tensor {name!r} (not part of a "
                                     f"{config.model_type} model with this config.json)")
                var_path, var = wanted[name]
                kernel = _is_kernel(var_path)
                stored = f.get_slice(name)
                expected = tuple(var.shape[::-1]) if kernel else tuple(var.shape)
                if tuple(stored.get_shape()) != expected:
                    raise ValueError(f"{fpath}: tensor {name!r} has shape {tuple(stored.get_shape())}, "
                                     f"but config.json implies {expected}")
                if mesh is None:
                    tensor = f.get_tensor(name)
                    var.value = jnp.asarray(tensor.T if kernel else tensor, dtype=target)
                else:
                    var.value = _read_sharded(stored, tuple(var.shape), kernel, target, mesh)
                loaded.add(name)
    missing = sorted(set(wanted) - loaded)
    if missing:
        where = ", ".join(sorted(files))
        raise ValueError(f"{model_dir}: missing tensor {missing[0]!r} (not found in {where})"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return model, config


def export_tensors(model: CausalLM) -> dict[str, jax.Array]:
    """HF tensor name -> array in torch layout, with LoRA adapters merged into their kernels."""
    out = {}
    projections = {path: node for path, node in nnx.iter_graph(model) if isinstance(node, Projection)}
    for name, (path, var) in model_variables(model).items():
        value = var[...]
        if _is_kernel(path):
            proj = projections[path[:-1]]
            if proj.lora_a is not None:
                delta = (proj.lora_a[...].astype(jnp.float32) @ proj.lora_b[...].astype(jnp.float32)) * proj.lora_scale
                value = (value.astype(jnp.float32) + delta).astype(value.dtype)
            value = value.T
        out[name] = value
    return out


def save_model(model: CausalLM, config: ModelConfig, path: str | os.PathLike,
               max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Writes config.json + safetensors that transformers loads; shards above `max_shard_bytes`.

    Every file is written under a temporary name and renamed into place, and files of an earlier
    save that the new one does not use (a stale index or shards) are removed afterwards.

    In a multi-process run every process must call it (weights sharded across hosts are gathered
    collectively); process 0 writes the files and all return once they are in place.
    """
    from jraise import parallel

    tensors = {name: jnp.asarray(parallel.to_host(v)) for name, v in export_tensors(model).items()}
    out = Path(path)
    if parallel.is_writer():
        _write_model_files(tensors, config, out, max_shard_bytes)
    parallel.barrier(f"save_model:{out}")
    return out


def _write_model_files(tensors: dict, config: ModelConfig, out: Path, max_shard_bytes: int) -> None:
    from safetensors.flax import save

    out.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = tensors[name].size * tensors[name].dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    metadata = {"format": "pt"}
    written = []
    if len(shards) == 1:
        atomic_write_bytes(out / SINGLE_FILE, save({n: tensors[n] for n in names}, metadata=metadata))
        written.append(SINGLE_FILE)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            atomic_write_bytes(out / fname, save({n: tensors[n] for n in shard}, metadata=metadata))
            weight_map.update({n: fname for n in shard})
            written.append(fname)
        total = sum(t.size * t.dtype.itemsize for t in tensors.values())
        index = {"metadata": {"total_size": int(total)}, "weight_map": weight_map}
        atomic_write_bytes(out / INDEX_FILE, json.dumps(index, indent=2).encode())
        written.append(INDEX_FILE)
    atomic_write_bytes(out / "config.json", json.dumps(config.to_hf_dict(), indent=2).encode())
    for stale in out.glob("model*.safetensors*"):
        if stale.name not in written:
            stale.unlink()


def parameter_count(model: nnx.Module, kind=nnx.Param) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, kind))))
