"""Model fingerprints: a sha256 of what defines a model, for the identity of every cache built
from one, so a model replaced at the same path is noticed instead of reused.

What is hashed, per kind of directory (each file as its name relative to the directory, its size
and the sha256 of its bytes, in sorted name order, after a version tag and the kind):

* an HF model directory (``config.json``): ``config.json`` and the weights, ``model.safetensors``
  or ``model.safetensors.index.json`` with every shard it lists. Tokenizer, generation and other
  files are not part of it: a pool's fingerprint already covers the tokens a tokenizer produced.
* a PEFT adapter directory (``adapter_config.json``): ``adapter_config.json`` and the adapter
  weights (``adapter_model.safetensors`` and/or ``adapter_model.bin``). The base model the adapter
  is applied to is a separate fingerprint.
* a training run directory (``checkpoints/`` or ``final/``): with ``step``, every file of
  ``checkpoints/<step>/`` (trainable weights, optimizer state, run metadata; the base model is a
  separate fingerprint); without, its finished ``final/`` model directory, which is what a run
  directory means when it is used as a model.

Full content hash, every call: sha256 over every byte, about 1 s per GB on one core from the
page cache (a cold cache is bound by the disk). The cheaper alternatives miss exactly the edits
this exists to catch: a hash of the safetensors headers plus sampled content misses a change
confined to unsampled bytes (one re-initialised embedding row, a few edited values), and a memo
keyed by (path, size, mtime_ns, inode) misses an in-place rewrite that keeps size and mtime (a
copy with ``cp -p``, a coarse-clock filesystem) and needs a writable place beside a model
directory that is often read-only. The full hash has no such failure mode. Its costs: every weight
byte is read on every call, and it is conservative: any byte change (the same weights re-saved
with other metadata, a reformatted ``config.json``) changes the fingerprint, so a cache is
refused or recomputed where it could have been kept, never wrongly reused.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

FINGERPRINT_VERSION = 1
MODEL_CONFIG = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
CHECKPOINTS = "checkpoints"
FINAL = "final"


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of the file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _model_dir_files(model_dir: Path) -> list[str]:
    from jraise.model.hf import INDEX_FILE, checkpoint_files

    weights = sorted(checkpoint_files(model_dir))
    return [MODEL_CONFIG, *([INDEX_FILE] if (model_dir / INDEX_FILE).is_file() else []), *weights]


def _adapter_files(adapter_dir: Path) -> list[str]:
    weights = [name for name in ADAPTER_WEIGHTS if (adapter_dir / name).is_file()]
    if not weights:
        raise FileNotFoundError(f"{adapter_dir}: PEFT adapter directory without weights "
                                f"({' or '.join(ADAPTER_WEIGHTS)})")
    return [ADAPTER_CONFIG, *weights]


def _checkpoint_step_files(run_dir: Path, step: int) -> list[str]:
    step_dir = run_dir / CHECKPOINTS / str(step)
    if not step_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no checkpoint at step {step} ({step_dir} does not exist)")
    names = [p.relative_to(run_dir).as_posix() for p in step_dir.rglob("*") if p.is_file()]
    if not names:
        raise FileNotFoundError(f"{step_dir}: empty checkpoint directory")
    return sorted(names)


def model_files(model_dir: str | os.PathLike, step: int | None = None) -> tuple[str, Path, list[str]]:
    """(kind, base directory, file names relative to it) that define the model at ``model_dir``.

    kind is "model", "adapter" or "checkpoint"; see the module docstring. A run directory without
    ``step`` stands for its ``final/`` model. Raises FileNotFoundError naming what is missing.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: model directory does not exist")
    is_run = (root / CHECKPOINTS).is_dir() or (root / FINAL).is_dir()
    if step is not None:
        if not is_run:
            raise FileNotFoundError(f"{root}: not a training run directory (no {CHECKPOINTS}/), so it has no step {step}")
        return "checkpoint", root, _checkpoint_step_files(root, step)
    if (root / MODEL_CONFIG).is_file():
        return "model", root, _model_dir_files(root)
    if (root / ADAPTER_CONFIG).is_file():
        return "adapter", root, _adapter_files(root)
    if is_run:
        if not (root / FINAL / MODEL_CONFIG).is_file():
            raise FileNotFoundError(f"{root}: a training run without a finished {FINAL}/ model; name a checkpoint step")
        return "model", root / FINAL, _model_dir_files(root / FINAL)
    raise FileNotFoundError(f"{root}: neither a model directory ({MODEL_CONFIG}), a PEFT adapter "
                            f"({ADAPTER_CONFIG}) nor a training run ({CHECKPOINTS}/ or {FINAL}/)")


def combine(kind: str, files: dict[str, str]) -> str:
    """The fingerprint of a model from its kind and {file name: "<size>:<sha256>"} entries."""
    digest = hashlib.sha256(f"jraise-model-fingerprint:{FINGERPRINT_VERSION}:{kind}\n".encode())
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]}\n".encode())
    return digest.hexdigest()


def model_fingerprint(model_dir: str | os.PathLike, step: int | None = None) -> str:
    """sha256 hex of what defines the model at ``model_dir`` (config and weights; see the module
    docstring): equal for byte-identical models wherever they are, different after any change."""
    return model_record(model_dir, step)["fingerprint"]


def model_label(model_dir: str | os.PathLike, step: int | None = None) -> str:
    """"<resolved path> (fingerprint <sha256 hex>)": a model's name for a cache that compares
    names, which changes when the model at the path does."""
    return f"{Path(model_dir).resolve()} (fingerprint {model_fingerprint(model_dir, step)})"


def model_record(model_dir: str | os.PathLike, step: int | None = None) -> dict:
    """{"model": resolved path, "kind", "fingerprint", "files": {name: "<size>:<sha256>"}}: what a
    cache stores to recognise its model later (`changed_files` names what differs)."""
    kind, root, names = model_files(model_dir, step)
    files = {name: f"{(root / name).stat().st_size}:{file_sha256(root / name)}" for name in names}
    record = {"model": str(Path(model_dir).resolve()), "kind": kind, "fingerprint": combine(kind, files),
              "files": files}
    return record if step is None else {**record, "step": step}


def changed_files(saved: dict[str, str], now: dict[str, str]) -> list[str]:
    """Names of the files that differ between two `model_record` ``files`` dicts, each marked
    "(changed)", "(new)" or "(gone)", in sorted order."""
    out = []
    for name in sorted(set(saved) | set(now)):
        if name not in saved:
            out.append(f"{name} (new)")
        elif name not in now:
            out.append(f"{name} (gone)")
        elif saved[name] != now[name]:
            out.append(f"{name} (changed)")
    return out
