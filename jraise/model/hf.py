"""Hugging Face checkpoints in and out: `load_model` and `save_model`.

Loading streams: an abstract model is built with `nnx.eval_shape` (shapes only, no memory), then
each safetensors tensor is read, transposed where torch and jraise lay it out differently, cast,
and placed into its variable, one tensor at a time. The host never holds the whole state twice.

With an active `jraise.parallel` mesh each tensor goes straight into its sharding (the parameter
rules of `jraise.parallel.param_spec`): `jax.make_array_from_callback` asks for the slices this
process's devices hold and only those are read from the file (safetensors slices), so on a
multi-host run no host reads or holds the whole model.

Loading refuses a degenerate model: a tensor holding NaN or an infinity is a `ModelError` naming
the file and the tensor (one jitted isfinite reduction per tensor, dispatched as each tensor is
placed and read back together at the end; compiled once per distinct shape and dtype).

Where a tokenizer and a model meet, `check_tokenizer_fits` refuses a tokenizer whose token ids
reach past the model's embedding table, and `fit_max_len` limits a sequence-length option to the
model's ``max_position_embeddings`` (`check_model_inputs` does both from a model directory).

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
from jraise.errors import JraiseError
from jraise.model.config import ModelConfig, dtype_name, read_config
from jraise.model.transformer import CausalLM, Projection, dtype_of

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors some checkpoints carry that are derived, not learned: skipped on load.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class ModelError(JraiseError, ValueError):
    """A model jraise refuses to use: degenerate weights, or a tokenizer it cannot embed."""


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


def checkpoint_files(model_dir: Path) -> dict[str, list[str]]:
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


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
    return jnp.isfinite(x).all()


def _check_finite(flags: list[tuple[Path, str, jax.Array]]) -> None:
    """Raises ModelError naming the first (file, tensor) whose all-finite flag is false."""
    values = jax.device_get([flag for _, _, flag in flags])
    bad = [(fpath, name) for (fpath, name, _), ok in zip(flags, values) if not ok]
    if bad:
        fpath, name = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise ModelError(f"{fpath}: tensor {name!r} holds NaN or infinite values{more}; the model's weights are "
                         "degenerate (a diverged or corrupted checkpoint), refusing to load it", path=fpath, field=name)


def tokenizer_size(tokenizer) -> int:
    """How many token ids the tokenizer can produce: one past its largest id, added tokens
    included (``len(tokenizer)`` counts them too; the larger of the two)."""
    ids = tokenizer.get_vocab().values()
    return max(len(tokenizer), max(ids, default=-1) + 1)


def check_tokenizer_fits(tokenizer, config: ModelConfig, model_dir: str | os.PathLike) -> None:
    """Raises ModelError when the tokenizer has token ids past the model's embedding table
    (``vocab_size`` rows), naming both directories and both sizes. A smaller tokenizer is fine
    (models often pad their tables)."""
    size = tokenizer_size(tokenizer)
    if size > config.vocab_size:
        raise ModelError(f"tokenizer {tokenizer.name_or_path} has {size} tokens (added tokens included), more than the "
                         f"{config.vocab_size} rows of the embedding table of the model {model_dir} (config.json "
                         "vocab_size): its larger token ids have no embedding. Use the model's own tokenizer",
                         path=model_dir, field="vocab_size")


def fit_max_len(max_len: int, config: ModelConfig, option: str = "--max-len") -> tuple[int, str | None]:
    """(max_len limited to the model's ``max_position_embeddings``, a note saying so or None).

    A longer option is clamped, not refused: it is an upper bound on sequence length, so records
    the model can take are kept and longer ones are refused (or skipped) at the model's limit.
    """
    limit = config.max_position_embeddings
    if max_len <= limit:
        return max_len, None
    return limit, (f"note: {option} {max_len} is more than the model's max_position_embeddings ({limit}); "
                   f"sequences are limited to {limit} tokens")


def check_model_inputs(model_dir: str | os.PathLike, tokenizer, max_len: int, option: str = "--max-len",
                       echo=None) -> int:
    """Where a tokenizer and a model directory meet: `check_tokenizer_fits` and `fit_max_len` on
    its config.json. Returns the usable max_len; ``echo`` (if given) receives the clamp note."""
    config = read_config(model_dir)
    check_tokenizer_fits(tokenizer, config, model_dir)
    usable, note = fit_max_len(max_len, config, option)
    if note and echo is not None:
        echo(note)
    return usable


def load_model(path: str | os.PathLike, dtype: DTypeLike | None = None, remat: bool = False,
               **config_overrides) -> tuple[CausalLM, ModelConfig]:
    """Loads a local HF model directory (config.json + safetensors, single or sharded).

    `dtype` ("float32" / "bfloat16", or `jnp.float32` / `jnp.bfloat16` / the np dtypes) sets both
    parameter and compute dtype; default: float32. An unsupported dtype is a ValueError.
    With an active `jraise.parallel` mesh every weight is read straight into its sharding.
    Returns (model, config). Errors name the file and the tensor or field at fault; weights
    holding NaN or infinities are a ModelError.
    """
    from safetensors import safe_open

    from jraise import parallel

    dtype = "float32" if dtype is None else dtype_name(dtype)
    mesh = parallel.active_mesh()
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory does not exist")
    config = read_config(model_dir, dtype=dtype, param_dtype=dtype, remat=remat, **config_overrides)
    files = checkpoint_files(model_dir)

    model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    wanted = model_variables(model)
    loaded: set[str] = set()
    finite_flags: list[tuple[Path, str, jax.Array]] = []
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
                finite_flags.append((fpath, name, _all_finite(var[...])))
                loaded.add(name)
    missing = sorted(set(wanted) - loaded)
    if missing:
        where = ", ".join(sorted(files))
        raise ValueError(f"{model_dir}: missing tensor {missing[0]!r} (not found in {where})"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    _check_finite(finite_flags)
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
