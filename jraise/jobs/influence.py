"""LESS / ROSE end to end: warmup -> gradient features per checkpoint -> scores -> selection.

Every stage writes into ``work_dir`` and is resumable: the warmup is a `jraise.train` run (resumes
from its latest checkpoint), each feature matrix a `jraise.data.feature_store.FeatureStore` filled by
`feature_store` (resumes at its first missing shard, checks its identity), and the selection files are written atomically at the end. Re-running
the same command after a crash finishes the job; re-running it after success recomputes only the
scores (seconds).

    work_dir/model.json                  the model everything here was computed from (`check_work_model`)
    work_dir/warmup/                     LoRA warmup run (unless ``warmup_run`` is given)
    work_dir/features/<step>/train/      Adam-preconditioned train-side features of the pool
                                         (train-no-first-moment/ with ``adam_first_moment=False``)
    work_dir/features/<step>/val-<loss>/ validation-side features (sft, dpo or margin)

Warmup (LESS): LoRA on a random ``warmup_fraction`` of the pool for ``warmup_epochs`` epochs (each
epoch reshuffles the subset), a checkpoint at every epoch end holding the adapters and Adam's
moments. Checkpoints are weighted by their epoch's mean learning rate.

Reuse is by content, not by path: the work directory refuses another model than the one in its
``model.json``, and a feature store's identity holds the model's fingerprint and its checkpoint's
(`jraise.model.fingerprint`), so a model or warmup run replaced at the same path is never mixed
with features of the old one.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from jraise import parallel
from jraise.data.feature_store import FeatureStore
from jraise.data.pool import load_pool, load_preference_pool, skip_lines
from jraise.data.selections import write_selection
from jraise.grads.features import FeatureConfig, compute_features, placed_inputs, zero_reference
from jraise.grads.projection import DEFAULT_SJLT_NNZ, MODES, ProjectionConfig
from jraise.lock import directory_lock
from jraise.select.base import Selection
from jraise.select.influence import GROUP_BUDGETS, METHODS, checkpoint_weights, select_by_influence

VAL_LOSSES = {"less": ("sft",), "rose": ("margin", "dpo")}


@dataclass(frozen=True)
class InfluenceRunConfig:
    """Options of `run_influence_selection` (defaults: the LESS paper's, except the projection and
    sizes that a testbed run overrides). ``val_loss``: LESS "sft"; ROSE "margin" (reference-free,
    the default: same normalised features, no reference forward pass) or "dpo" (exact, base model
    as reference). ``projection_mode``: "sjlt" (the default, chosen by measurement: a sparse JL
    transform with ``sjlt_nnz`` nonzeros per gradient coordinate, cost flat in d), "dense" (LESS's
    own dense JL matrix: the exact LESS feature) or "factored" (a Kronecker projection per LoRA
    matrix); the three give other features, stored apart: see `jraise.grads.projection`.
    ``skip_bad``: drop bad records of the pool and the validation file (listed under "skipped" in
    the meta file) instead of stopping at the first. It only decides which records are loaded:
    the feature stores and the warmup run are keyed by the loaded pool's fingerprint, so a file
    without bad records reuses them whether or not it is set. ``adam_first_moment``: keep the
    checkpoint's first moment in the train-side Adam feature (the LESS code, the default) or leave
    it out (`jraise.grads.features.compute_features`; those features are stored apart).
    ``record_format``: "chat" or "less-tulu" (`jraise.data.less_tulu`: the pool with LESS's
    train-side rules, the validation records with its validation-side rules; LESS only).
    ``dedupe``: keep only the first of exact copies in the pool and the validation file (by
    default copies are distinct examples, `jraise.data.formats`). ``group_budget``: how the budget
    meets the validation file's categories (its subtasks): "max" (the paper's: top by the max over
    subtasks) or "split" (an equal share per subtask, `jraise.select.influence.split_by_group`);
    it changes only the last step, so both read the same feature stores.
    """

    method: str = "rose"
    fraction: float = 0.05
    val_loss: str | None = None
    warmup_fraction: float = 0.05
    warmup_epochs: int = 4
    warmup_lr: float = 2e-5
    warmup_batch_size: int = 128
    warmup_schedule: str = "linear"
    warmup_ratio: float = 0.03
    lora_rank: int = 128
    lora_alpha: float = 512.0
    lora_dropout: float = 0.1
    max_len: int = 2048
    proj_dim: int = 8192
    projection_mode: str = "sjlt"
    sjlt_nnz: int = DEFAULT_SJLT_NNZ
    seed: int = 0
    chunk: int = 8
    group: int = 64
    skip_bad: bool = False
    adam_first_moment: bool = True
    record_format: str = "chat"
    dedupe: bool = False
    group_budget: str = "max"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.val_loss is None:
            object.__setattr__(self, "val_loss", VAL_LOSSES[self.method][0])
        if self.val_loss not in VAL_LOSSES[self.method]:
            raise ValueError(f"{self.method} validation loss must be one of {VAL_LOSSES[self.method]}, "
                             f"got {self.val_loss!r}")
        for name in ("fraction", "warmup_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.method == "rose" and self.record_format != "chat":
            raise ValueError(f"rose reads preference pairs, which have no {self.record_format} rendering")
        if self.projection_mode not in MODES:
            raise ValueError(f"projection_mode must be one of {', '.join(MODES)}, got {self.projection_mode!r}")
        if self.group_budget not in GROUP_BUDGETS:
            raise ValueError(f"group_budget must be one of {', '.join(GROUP_BUDGETS)}, got {self.group_budget!r}")

    def features(self) -> FeatureConfig:
        return FeatureConfig(projection=ProjectionConfig(dim=self.proj_dim, seed=self.seed, mode=self.projection_mode,
                                                               sjlt_nnz=self.sjlt_nnz),
                             chunk=self.chunk, group=self.group)


# Identity keys added after stores were first written, with what their absence in a saved
# identity means (stores from before `ProjectionConfig.mode` hold dense features; train stores
# from before `adam_first_moment` kept the first moment).
IDENTITY_ABSENT_MEANS = {"features.projection.mode": "dense", "adam_first_moment": True}


def val_store_name(loss: str, val) -> str:
    """The validation store's directory name in a work directory: one per validation loss and
    validation set (``val-<loss>-<first 16 hex digits of the set's fingerprint>``), so LESS, ROSE
    and ROSE on other pairs share the train-side stores without overwriting each other's
    validation side."""
    return f"val-{loss}-{val.fingerprint[:16]}"


def feature_store(store_dir: str | os.PathLike, graphdef, trainable, frozen, pool, config: FeatureConfig,
                  identity: dict, loss: str = "sft", moments: tuple | None = None, reference=None, dtypes=None,
                  progress: bool = True, adam_first_moment: bool = True) -> FeatureStore:
    """Fills (or finishes) the store at ``store_dir`` with the pool's L2-normalised features.

    ``identity`` names the weights (model, run, checkpoint step); the pool fingerprint, loss, Adam
    flags (``adam_first_moment``: see `compute_features`) and `FeatureConfig` are added here.
    Reopening with any of them different is an error. A store written before
    ``ProjectionConfig.mode`` (or ``adam_first_moment``) existed lacks that key: it reopens under
    ``mode="dense"`` (and the first moment kept), the values it was written with
    (`IDENTITY_ABSENT_MEANS`).
    """
    full_identity = {**identity, "pool_fingerprint": pool.fingerprint, "loss": loss,
                     "adam": moments is not None, "features": config.to_dict()}
    if moments is not None:
        full_identity["adam_first_moment"] = adam_first_moment
    # Multi-process runs: every process computes every shard (the programs are collective), only
    # process 0 writes. Process 0 creates the store first; all read the list of missing shards
    # before any is written, so they run the same sequence of programs.
    writer = parallel.is_writer()

    def open_store() -> FeatureStore:
        return FeatureStore.create_or_open(Path(store_dir), n=len(pool), dim=config.projection.dim,
                                           identity=full_identity, shard_rows=config.shard_rows,
                                           absent_means=IDENTITY_ABSENT_MEANS)

    store = open_store() if writer else None
    parallel.barrier("jraise-feature-store-created")
    if store is None:
        store = open_store()
    missing = store.missing_shards()
    parallel.barrier("jraise-feature-store-planned")
    trainable, frozen, reference, moments = placed_inputs(trainable, frozen, reference, moments,
                                                          parallel.active_mesh())

    def compute(start: int, stop: int) -> np.ndarray:
        return compute_features(graphdef, trainable, frozen, pool, np.arange(start, stop), config, loss, moments,
                                reference, dtypes, adam_first_moment)

    store.fill(compute, progress=progress and writer, shards=missing, write=writer)
    parallel.barrier("jraise-feature-store-filled")
    return store


def warmup_plan(n_pool: int, config: InfluenceRunConfig):
    """(records in the warmup subset, the warmup's `TrainConfig`): ``warmup_fraction`` of the pool,
    at least 1, at a batch no larger than the subset. The run and `warmup_epoch_lrs` both read it."""
    from jraise.train import TrainConfig

    n = max(1, round(config.warmup_fraction * n_pool))
    return n, TrainConfig(lr=config.warmup_lr, schedule=config.warmup_schedule, warmup_ratio=config.warmup_ratio,
                          epochs=config.warmup_epochs, batch_size=min(config.warmup_batch_size, n), seed=config.seed)


def warmup_epoch_lrs(n_pool: int, config: InfluenceRunConfig) -> np.ndarray:
    """Each warmup epoch's mean learning rate under the warmup's schedule (the LESS checkpoint
    weights, `checkpoint_weights`), known before any training. Raises ValueError when every one is
    0, which is what a warmup of a single update step gets from any ``warmup_ratio`` > 0 (the
    schedule starts at 0, as transformers' does): nothing would be learnt, and the error would
    otherwise come only after the features were computed."""
    from jraise.train.loop import optimizer_args
    from jraise.train.step import lr_schedule

    n, train_config = warmup_plan(n_pool, config)
    batch = train_config.batch_size
    per_epoch = math.ceil(n / batch)
    total = per_epoch * config.warmup_epochs
    args = optimizer_args(train_config, total)
    schedule = lr_schedule(args["lr"], total, args["warmup_steps"], args["schedule"])
    lrs = np.array([float(schedule(s)) for s in range(total)], np.float64).reshape(config.warmup_epochs, per_epoch)
    means = lrs.mean(axis=1)
    if not means.sum() > 0:
        raise ValueError(f"the LESS warmup would learn nothing: {n} records ({config.warmup_fraction:g} of {n_pool}) "
                         f"at batch {batch} for {config.warmup_epochs} epoch(s) is {total} update step(s), all at "
                         f"learning rate 0 under warmup_ratio {config.warmup_ratio:g}; use more records "
                         "(warmup_fraction), more epochs, a smaller batch, or warmup_ratio 0")
    return means


def warmup(model_dir: Path, pool, config: InfluenceRunConfig, run_dir: Path) -> Path:
    """The LESS warmup run in ``run_dir`` (resumed when it exists); returns ``run_dir``."""
    from jraise.model import load_model
    from jraise.model.lora import LoRAConfig, add_lora
    from jraise.train import train

    warmup_epoch_lrs(len(pool), config)  # refuses a warmup that cannot learn, before it runs
    rng = np.random.default_rng([config.seed, 17])
    n, train_config = warmup_plan(len(pool), config)
    subset = np.sort(rng.choice(len(pool), size=n, replace=False))
    orders = [subset[np.random.default_rng([config.seed, 18, e]).permutation(n)]
              for e in range(config.warmup_epochs)]
    model, _ = load_model(model_dir)
    add_lora(model, LoRAConfig(rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout),
             seed=config.seed)
    train(model, pool, train_config, run_dir, order=orders, resume=True, export=False)
    return run_dir


def _run_seconds(run_dir: Path) -> float | None:
    """The training seconds a run's latest checkpoint records (summed over resumes), if any."""
    from jraise.train import load_meta

    elapsed = load_meta(run_dir).get("elapsed")
    return round(float(elapsed), 3) if elapsed is not None else None


def recorded_total(recorded: dict) -> float | None:
    """The sum of a selection's recorded seconds (warmup, every feature store, scoring), or None
    when a part's time is not on record (a feature store filled before stores kept their times):
    the selection's cost however many runs it took, which the wall time of a resumed run is not."""
    parts = [recorded["warmup"], *recorded["train_features"], *recorded["val_features"], recorded["scoring"]]
    return None if any(p is None for p in parts) else round(float(sum(parts)), 3)


def epoch_checkpoints(run_dir: Path) -> list[dict]:
    """The run's epoch-end checkpoints (step, epoch, epoch_mean_lr), in order."""
    from jraise.train import list_checkpoints

    found = [c for c in list_checkpoints(run_dir) if c["epoch_end"]]
    if not found:
        raise ValueError(f"{run_dir}: no epoch-end checkpoints; a LESS warmup run saves one per epoch")
    return found


WORK_MODEL_FILE = "model.json"  # in the work directory: the model its warmup run and features came from


def fitted_to_model(config: InfluenceRunConfig, model_dir: Path, tokenizer, echo) -> InfluenceRunConfig:
    """``config`` with ``max_len`` limited to the model's ``max_position_embeddings`` (echoing a
    note when it is); a tokenizer with ids past the model's embedding table is a ModelError."""
    from dataclasses import replace

    from jraise.model.hf import check_model_inputs

    max_len = check_model_inputs(model_dir, tokenizer, config.max_len, echo=echo)
    return config if max_len == config.max_len else replace(config, max_len=max_len)


def check_work_model(work: Path, model_dir: Path) -> str:
    """The model check of a reused work directory; returns the model's fingerprint.

    ``work/model.json`` records the model (`jraise.model.fingerprint.model_record`: config.json
    and weights by content) the warmup run and feature stores were computed from. A model that
    differs now is refused naming the files that changed, as a changed pool or seed is refused
    by the warmup run and the stores; so is a work directory holding a warmup run or features but
    no record (made before the record existed). The record is written when absent.
    """
    import json

    from jraise.atomic import atomic_write_text
    from jraise.errors import JraiseError
    from jraise.model.fingerprint import changed_files, model_record

    now = model_record(model_dir)
    record_path = work / WORK_MODEL_FILE
    fix = f"delete {work} to recompute with this model, or use another work directory (--work-dir)"
    if record_path.is_file():
        try:
            saved = json.loads(record_path.read_text(encoding="utf-8"))
            saved_fp, saved_files = str(saved["fingerprint"]), dict(saved["files"])
        except (ValueError, KeyError, TypeError) as err:
            raise JraiseError(f"{record_path}: not a readable model record ({err}); {fix}", path=record_path) from None
        if saved_fp != now["fingerprint"]:
            changed = ", ".join(changed_files(saved_files, now["files"])) or "its files"
            raise JraiseError(f"{work}: its warmup run and features were computed with another model than the one now "
                              f"at {model_dir} ({changed}; fingerprint {saved_fp[:12]} then, "
                              f"{now['fingerprint'][:12]} now); {fix}", path=work, field="model")
        return now["fingerprint"]
    if any((work / name).exists() for name in ("warmup", "features")):
        raise JraiseError(f"{work}: holds a warmup run or features but no record of the model they were computed "
                          f"with ({WORK_MODEL_FILE}, written since jraise fingerprints models); {fix}", path=work)
    if parallel.is_writer():
        atomic_write_text(record_path, json.dumps(now, indent=2) + "\n")
    return now["fingerprint"]


def run_influence_selection(model_dir: str | os.PathLike, pool_file: str | os.PathLike,
                            val_file: str | os.PathLike, out: str | os.PathLike,
                            config: InfluenceRunConfig = InfluenceRunConfig(),
                            work_dir: str | os.PathLike | None = None,
                            warmup_run: str | os.PathLike | None = None,
                            echo=print) -> Selection:
    """LESS or ROSE selection of ``pool_file`` for the validation set ``val_file`` (SFT records for
    LESS, preference pairs for ROSE); writes ``out`` (the selected records), ``out``.scores.npy
    and ``out``.meta.json. Validation subtasks are the val records' ``category`` (else one group).
    With ``config.skip_bad`` bad records of either file are dropped and reported (one ``echo`` line
    per file, ``"skipped"`` in the meta file); the selection's indices count the kept records.
    The three selection files appear together or not at all (`write_selection`). ``work_dir``
    is locked for the call (`jraise.lock.directory_lock`): a second process on it stops with an
    error naming the holder.
    """
    model_dir, out = Path(model_dir), Path(out)
    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".work")
    with directory_lock(work) if parallel.is_writer() else contextlib.nullcontext():
        return _run_locked(model_dir, pool_file, val_file, out, config, work, warmup_run, echo)


def _run_locked(model_dir: Path, pool_file, val_file, out: Path, config: InfluenceRunConfig, work: Path,
                warmup_run, echo) -> Selection:
    from jraise.model import load_tokenizer
    from jraise.model.fingerprint import model_fingerprint
    from jraise.train import (
        adam_moments,
        load_checkpoint,
        restore_model,
        split_trainable,
    )

    tok = load_tokenizer(model_dir)
    config = fitted_to_model(config, model_dir, tok, echo)
    pool = load_pool(pool_file, tok, max_len=config.max_len, skip_bad=config.skip_bad,
                     record_format=config.record_format, dedupe=config.dedupe)
    if config.method == "rose":
        val = load_preference_pool(val_file, tok, max_len=config.max_len, skip_bad=config.skip_bad,
                                   dedupe=config.dedupe)
    else:
        val = load_pool(val_file, tok, max_len=config.max_len, skip_bad=config.skip_bad,
                        record_format=config.record_format, side="validation", dedupe=config.dedupe)
    for line in skip_lines(pool, val, where=out.with_name(out.name + ".meta.json")):
        echo(line)
    echo(f"{config.method}: pool {len(pool)} examples, validation {len(val)} "
         f"{'pairs' if config.method == 'rose' else 'examples'}")

    model_fp = check_work_model(work, model_dir)
    run_dir = Path(warmup_run) if warmup_run is not None else warmup(model_dir, pool, config, work / "warmup")
    checkpoints = epoch_checkpoints(run_dir)
    features = config.features()
    train_mats, val_feats = [], []
    recorded = {"warmup": _run_seconds(run_dir), "train_features": [], "val_features": []}
    for ckpt in checkpoints:
        step = ckpt["step"]
        model = restore_model(run_dir, model_dir, step)
        graphdef, trainable, frozen = split_trainable(model)
        _, opt_state, _ = load_checkpoint(run_dir, step)
        moments = adam_moments(opt_state)
        identity = {"model": str(model_dir.resolve()), "model_fingerprint": model_fp, "run": str(run_dir.resolve()),
                    "run_fingerprint": model_fingerprint(run_dir, step=step), "step": step}
        echo(f"checkpoint {step} (epoch {ckpt['epoch']}): train-side features")
        train_dir = "train" if config.adam_first_moment else "train-no-first-moment"
        store = feature_store(work / "features" / str(step) / train_dir, graphdef, trainable, frozen, pool, features,
                              identity, loss="sft", moments=moments, adam_first_moment=config.adam_first_moment)
        train_mats.append(store.matrix())
        recorded["train_features"].append(store.compute_seconds())
        echo(f"checkpoint {step}: validation features ({config.val_loss})")
        reference = zero_reference(trainable) if config.val_loss == "dpo" else None
        val_store = feature_store(work / "features" / str(step) / val_store_name(config.val_loss, val), graphdef,
                                  trainable, frozen, val, features, identity, loss=config.val_loss,
                                  reference=reference)
        val_feats.append(val_store.matrix().rows(0, len(val)))
        recorded["val_features"].append(val_store.compute_seconds())
    t0 = time.perf_counter()
    weights = checkpoint_weights([c["epoch_mean_lr"] for c in checkpoints])
    groups = [c if c is not None else "all" for c in val.categories]
    selection = select_by_influence(config.method, train_mats, val_feats, weights, pool.fingerprint, config.fraction,
                                    groups, group_budget=config.group_budget,
                                    config={**asdict(config), "warmup_run": str(run_dir),
                                                    "checkpoints": [c["step"] for c in checkpoints]})
    recorded["scoring"] = round(time.perf_counter() - t0, 3)
    selection = replace(selection, seconds={**recorded, "total": recorded_total(recorded)})
    paths = write_selection(selection, pool, out, inputs=(val,))
    echo(f"selected {len(selection.indices)} of {len(pool)} -> {paths['selection']}")
    return selection
