"""Orbax checkpoints of a training run: trainable weights, optimizer state, and run metadata.

Layout: ``<run_dir>/checkpoints/<step>/`` written by one `ocp.CheckpointManager`, each step a
composite of three items:

* ``trainable``: the float32 trainable weights (only the adapters for LoRA), a nested dict
  (`nnx.to_pure_dict` layout: layer indices are int keys);
* ``opt_state``: the full optax state (Adam count, mu, nu); `jraise.train.adam_moments` pulls
  out (mu, nu), each shaped like ``trainable``;
* ``meta`` (JSON): step and epoch counters, the data-order position to resume from, the
  learning rate used at every step so far, the optimizer arguments (so the optimizer, and the
  opt_state's exact structure, can be rebuilt without the training script), what was trained
  (full or LoRA, with the LoRA settings), the model's parameter dtype, the pool and order
  fingerprints and the `TrainConfig` as a dict.

Saves are synchronous: the next train step donates the buffers being saved.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jraise.train.step import assign_trainable, make_optimizer

if TYPE_CHECKING:  # jraise.model is imported where a model is built, so `jraise.train.step` users need not load it
    from jraise.model.transformer import CausalLM

CHECKPOINT_DIR = "checkpoints"


def checkpoint_manager(run_dir: str | os.PathLike, max_to_keep: int | None = None,
                       create: bool = True) -> ocp.CheckpointManager:
    """The run's manager. ``max_to_keep=None`` keeps every checkpoint (LESS needs each epoch's)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(run_dir).absolute() / CHECKPOINT_DIR, options=options)


def save_checkpoint(manager: ocp.CheckpointManager, step: int, trainable, opt_state, meta: dict) -> None:
    """Writes one composite checkpoint at ``step`` (overwriting nothing: steps are unique)."""
    manager.save(step, args=ocp.args.Composite(
        trainable=ocp.args.StandardSave(trainable),
        opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta),
    ), force=True)
    manager.wait_until_finished()


def _int_keys(tree):
    """Orbax stores dict keys as strings; NNX uses int keys for list indices (``layers.0``)."""
    if isinstance(tree, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()}
    return tree


def _steps(run_dir: Path) -> list[int]:
    if not (run_dir / CHECKPOINT_DIR).is_dir():
        return []
    return list(checkpoint_manager(run_dir, create=False).all_steps())


def checkpoint_steps(run_dir: str | os.PathLike) -> list[int]:
    """Steps with a checkpoint, ascending."""
    return sorted(_steps(Path(run_dir)))


def _pick_step(run_dir: Path, step: int | None) -> int:
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise FileNotFoundError(f"{run_dir}: no checkpoints under {run_dir / CHECKPOINT_DIR}")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"{run_dir}: no checkpoint at step {step}; steps with one: {steps}")
    return step


def load_meta(run_dir: str | os.PathLike, step: int | None = None) -> dict:
    """The JSON metadata of the checkpoint at ``step`` (default: the latest)."""
    run_dir = Path(run_dir)
    step = _pick_step(run_dir, step)
    restored = checkpoint_manager(run_dir, create=False).restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored.meta)


def list_checkpoints(run_dir: str | os.PathLike) -> list[dict]:
    """One dict per checkpoint: step, epoch, epoch_end (saved at an epoch's end), mean lr of the
    epoch so far. Epoch-end checkpoints are the ones LESS averages over."""
    out = []
    for step in checkpoint_steps(run_dir):
        meta = load_meta(run_dir, step)
        out.append({"step": step, "epoch": meta["epoch"], "epoch_end": meta["epoch_end"],
                    "epoch_mean_lr": meta.get("epoch_mean_lr")})
    return out


def restore_state(run_dir: str | os.PathLike, step: int, trainable_target, opt_target) -> tuple[Any, Any, dict]:
    """Restores (trainable, opt_state, meta) into the structures of the given targets (arrays or
    `jax.ShapeDtypeStruct`s); used by the training loop to resume."""
    restored = checkpoint_manager(run_dir, create=False).restore(step, args=ocp.args.Composite(
        trainable=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, trainable_target)),
        opt_state=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, opt_target)),
        meta=ocp.args.JsonRestore(),
    ))
    return restored.trainable, restored.opt_state, dict(restored.meta)


def load_checkpoint(run_dir: str | os.PathLike, step: int | None = None) -> tuple[dict, Any, dict]:
    """(trainable, opt_state, meta) of the checkpoint at ``step`` (default: the latest).

    Needs no model: the trainable dict comes back as saved (int layer keys restored), and the
    optimizer is rebuilt from the arguments in ``meta`` so ``opt_state`` has optax's exact
    structure (named tuples; `adam_moments` works on it).
    """
    run_dir = Path(run_dir)
    step = _pick_step(run_dir, step)
    manager = checkpoint_manager(run_dir, create=False)
    raw = manager.restore(step, args=ocp.args.Composite(
        trainable=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    trainable, meta = _int_keys(raw.trainable), dict(raw.meta)
    tx, _ = make_optimizer(**meta["optimizer"])
    opt_target = jax.eval_shape(tx.init, trainable)
    restored = manager.restore(step, args=ocp.args.Composite(opt_state=ocp.args.StandardRestore(opt_target)))
    return trainable, restored.opt_state, meta


def lora_settings(model: nnx.Module) -> dict | None:
    """The `LoRAConfig` fields of the adapters attached to ``model`` (None without adapters),
    read back from the projections so a checkpoint can re-attach identical adapters."""
    from jraise.model.lora import ATTENTION_TARGETS, MLP_TARGETS
    from jraise.model.transformer import Projection

    adapted = [(path, node) for path, node in nnx.iter_graph(model)
               if isinstance(node, Projection) and node.lora_a is not None]
    if not adapted:
        return None
    ranks = {node.lora_a.shape[1] for _, node in adapted}
    scales = {node.lora_scale for _, node in adapted}
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError("adapters of different ranks or scales cannot be described by one LoRAConfig")
    rank, scale = ranks.pop(), scales.pop()
    names = {str(path[-1]) for path, _ in adapted}
    dropout = next((float(node.lora_dropout.rate) for _, node in adapted if node.lora_dropout is not None), 0.0)
    return {"rank": int(rank), "alpha": float(scale * rank), "dropout": dropout,
            "targets": [t for t in ATTENTION_TARGETS + MLP_TARGETS if t in names]}


def restore_model(run_dir: str | os.PathLike, base: str | os.PathLike | CausalLM, step: int | None = None) -> CausalLM:
    """A model holding the checkpoint's weights.

    ``base`` is the HF directory the run started from (loaded in the run's dtype) or a model of
    the same architecture (updated in place). For a LoRA run, the same adapters are attached
    (when ``base`` has none) and filled with the trained values; base weights come from ``base``.
    """
    from jraise.model.hf import load_model
    from jraise.model.lora import LoRAConfig, add_lora, has_lora
    from jraise.model.transformer import CausalLM

    trainable, _, meta = load_checkpoint(run_dir, step)
    if isinstance(base, CausalLM):
        model = base
    else:
        model, _ = load_model(base, dtype=meta["param_dtype"])
    if meta["lora"] is not None and not has_lora(model):
        lora = dict(meta["lora"], targets=tuple(meta["lora"]["targets"]))
        add_lora(model, LoRAConfig(**lora))
    return assign_trainable(model, trainable)


# The files `export_model` copies from a tokenizer (or base model) directory: the tokenizer's own
# files and the generation defaults. Nothing else is copied (no weights, no stray files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
TOKENIZER_PATTERNS = ("tokenizer*.json", "chat_template.*")


def _is_tokenizer_file(name: str) -> bool:
    from fnmatch import fnmatchcase

    return name in TOKENIZER_FILES or any(fnmatchcase(name, p) for p in TOKENIZER_PATTERNS)


def _allowed_link_roots(src: Path) -> tuple[Path, ...]:
    """Where a symlink of ``src`` may point: inside ``src``, and, for a Hugging Face hub cache
    snapshot (``.../snapshots/<revision>/``), the repository's ``blobs/`` directory."""
    roots = [src.resolve()]
    if src.parent.name == "snapshots":
        roots.append((src.parent.parent / "blobs").resolve())
    return tuple(roots)


def tokenizer_files(tokenizer_dir: str | os.PathLike) -> list[Path]:
    """The files `export_model` copies from ``tokenizer_dir``: regular files with a tokenizer
    file name (`TOKENIZER_FILES`, `TOKENIZER_PATTERNS`), in name order.

    A symlink is followed only when it resolves to a regular file inside the directory (or in
    the ``blobs/`` of a Hugging Face cache snapshot); one pointing elsewhere is an error naming
    it, as is a directory with no tokenizer file at all."""
    from jraise.errors import JraiseError

    src = Path(tokenizer_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: tokenizer directory does not exist")
    roots = _allowed_link_roots(src)
    chosen = []
    for item in sorted(src.iterdir()):
        if not _is_tokenizer_file(item.name):
            continue
        if item.is_symlink():
            target = item.resolve()
            if not any(target.is_relative_to(root) for root in roots):
                raise JraiseError(f"{item}: a symlink to {target}, outside {src}; the export copies only the "
                                  "directory's own tokenizer files (replace the link by the file)", path=item)
        if item.is_file():
            chosen.append(item)
    if not chosen:
        raise JraiseError(f"{src}: no tokenizer files (expected tokenizer.json or tokenizer_config.json)", path=src)
    return chosen


def export_model(model: CausalLM, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Writes ``model`` as a Hugging Face directory (`save_model`; LoRA merged) plus, when given,
    the tokenizer's files (`tokenizer_files`), each copied under a temporary name and renamed
    into place.

    ``tokenizer_dir`` may be a model directory (a base model with its tokenizer): only its
    tokenizer files and ``generation_config.json`` are copied (the latter only when the export
    has none), never its weights, config or any other file, and no symlink out of it."""
    from jraise import parallel
    from jraise.model.hf import save_model

    # checked by every process, before any collective
    sources = None if tokenizer_dir is None else tokenizer_files(tokenizer_dir)
    out = save_model(model, model.config, out_dir)  # collective in a multi-process run; process 0 writes
    if sources is not None and parallel.is_writer():
        for item in sources:
            if item.name == "generation_config.json" and (out / item.name).exists():
                continue
            tmp = out / f".{item.name}.tmp-{os.getpid()}"
            shutil.copyfile(item, tmp)
            os.replace(tmp, out / item.name)
    parallel.barrier(f"export_model:{out}")
    return out
