"""The supervised fine-tuning loop: batches in a chosen order, jitted steps, evaluation, checkpoints.

``train(model, pool, config, run_dir)`` fine-tunes ``model`` (full, or only its LoRA adapters when
they are attached) on ``pool`` and writes into ``run_dir``:

* ``train_config.json``: the `TrainConfig`; a run dir only resumes under the same config;
* ``metrics.jsonl``: one JSON line per optimizer step (step, epoch, loss, lr, tokens, time,
  grad norm, and ``eval`` on evaluation steps), each appended with a single write;
* ``checkpoints/<step>/``: Orbax checkpoints (see `jraise.train.checkpoint`) at every epoch end,
  every ``save_every`` steps and at the last step;
* ``final/``: the trained model as a Hugging Face directory (LoRA merged), plus the tokenizer;
* ``adapter/`` (LoRA runs): the trained adapters alone, in PEFT's format (`jraise.model.peft`), for
  ``peft.PeftModel.from_pretrained(<base model>, run_dir / "adapter")``.

Data order. Without ``order``, epoch e visits the pool in ``epoch_order(n, seed, e)``. With
``order`` (pool indices), training follows it exactly: a 1-D sequence is used for every epoch, a
list of ``epochs`` sequences gives each epoch its own. Either way an epoch is cut into consecutive
chunks of ``batch_size`` indices, one chunk per optimizer step (the last chunk of an epoch is
completed with padding rows), so a curriculum or selector decides exactly what each step sees.

Resuming. With ``resume=True`` a run restarts from its latest checkpoint: the weights, Adam state,
learning-rate history and data-order position come back, dropout keys are a function of (seed,
step) and batches of (order, position), so the resumed run performs the very same updates as an
uninterrupted one (bitwise on the same machine). Lines of ``metrics.jsonl`` written after that
checkpoint (by the crashed attempt) are dropped first. A run directory resumes only the same
run: the same `TrainConfig` (``train_config.json``), training data, order, LoRA settings, dtype and
starting weights (`weights_fingerprint`); any difference is an error naming it, so a finished run
is never re-exported with another base model under adapters trained on the old one.

One process at a time. ``run_dir`` is locked for the call (`jraise.lock.directory_lock`): a second
process on the same directory stops with an error naming the holder.

Divergence. A step whose loss or gradient norm is NaN or infinite, or a checkpoint whose weights
are not finite, stops the run with `TrainingDiverged`: nothing of that step is written (not its
``metrics.jsonl`` line, not a checkpoint), and the checkpoints already written, each of finite
weights saved after a finite step, are kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jraise import parallel
from jraise.atomic import atomic_write_text
from jraise.compile_cache import CompiledCache, dtypes_key
from jraise.data.batching import PAD_INDEX, epoch_order, iterate_batches, length_buckets
from jraise.data.pool import InstructionPool
from jraise.errors import JraiseError
from jraise.lock import directory_lock
from jraise.loglik import per_example_sums
from jraise.train.checkpoint import (
    CHECKPOINT_DIR,
    checkpoint_manager,
    export_model,
    load_meta,
    lora_settings,
    restore_state,
    save_checkpoint,
    tokenizer_files,
)
from jraise.train.step import (
    MODEL_KEYS,
    SCHEDULES,
    assign_trainable,
    make_eval_step,
    make_optimizer,
    make_train_step,
    param_dtypes,
    split_trainable,
    trainable_filter,
)

CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
ADAPTER_DIR = "adapter"


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a run; saved as ``train_config.json``.

    ``batch_size`` is the number of examples per optimizer update; ``accum`` splits it into that
    many micro-batches of ``batch_size // accum`` rows (memory only: the update is the same).
    ``schedule``: "linear", "cosine" or "constant" after a linear warmup of
    ``ceil(warmup_ratio * total_steps)`` steps from 0. ``max_grad_norm`` None/0 disables
    clipping. ``eval_every``/``save_every`` 0: only at the end / at epoch ends. ``max_steps`` caps
    the run (and the schedule's length). ``max_to_keep`` None keeps every checkpoint.
    """

    lr: float = 2e-5
    schedule: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    epochs: int = 1
    batch_size: int = 8
    accum: int = 1
    max_grad_norm: float | None = 1.0
    seed: int = 0
    eval_every: int = 0
    save_every: int = 0
    max_steps: int | None = None
    n_buckets: int = 4
    max_to_keep: int | None = None
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        problems = []
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            problems.append(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("epochs", "batch_size", "accum", "n_buckets"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.accum >= 1 and self.batch_size % self.accum:
            problems.append(f"batch_size ({self.batch_size}) must be a multiple of accum ({self.accum})")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.max_to_keep is not None and self.max_to_keep < 1:
            problems.append(f"max_to_keep must be >= 1 or None, got {self.max_to_keep}")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.accum

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StepInfo:
    """What a ``callback`` sees after each optimizer step: the step number (1-based count of
    updates done), its epoch, the pool indices it trained on (padding rows removed) and the
    metrics record written to ``metrics.jsonl``."""

    step: int
    epoch: int
    indices: np.ndarray
    record: dict


@dataclass(frozen=True)
class TrainResult:
    """The trained model (the one passed in, updated in place), the number of optimizer steps
    done, where things were written (``final_dir`` and, for a LoRA run, ``adapter_dir``: None
    when the run stopped early or did not export), the lr used at each step, and the last
    evaluation."""

    model: nnx.Module
    steps: int
    metrics_path: Path
    run_dir: Path
    final_dir: Path | None
    completed: bool
    lr_history: tuple[float, ...]
    last_eval: dict | None
    adapter_dir: Path | None = None


# ----------------------------------------------------------------------------------------------
# Planning: data order, steps, optimizer arguments (pure functions of config and inputs)


def epoch_orders(n: int, config: TrainConfig, order=None) -> list[np.ndarray]:
    """The pool indices of each epoch, in training order (see the module docstring)."""
    if n < 1:
        raise ValueError("the training pool is empty")
    if order is None:
        return [epoch_order(n, config.seed, e) for e in range(config.epochs)]
    if isinstance(order, (list, tuple)) and len(order) and np.ndim(order[0]) > 0:
        orders = [np.asarray(o, dtype=np.int64).reshape(-1) for o in order]  # one per epoch
    else:
        flat = np.asarray(order, dtype=np.int64)
        if flat.ndim not in (1, 2):
            raise ValueError(f"order must be 1-D (every epoch) or one sequence per epoch, got shape {flat.shape}")
        orders = [flat] * config.epochs if flat.ndim == 1 else list(flat)
    if len(orders) != config.epochs:
        raise ValueError(f"order gives {len(orders)} per-epoch sequences but config.epochs is "
                         f"{config.epochs}; pass one sequence per epoch, or one 1-D sequence for all")
    for e, o in enumerate(orders):
        if len(o) == 0:
            raise ValueError(f"order for epoch {e} is empty")
        bad = o[(o < 0) | (o >= n)]
        if len(bad):
            raise IndexError(f"order for epoch {e} has indices outside the pool of {n}: {bad[:5].tolist()}")
    return orders


def order_fingerprint(orders: Sequence[np.ndarray]) -> str:
    """sha256 over the per-epoch index sequences: a resumed run must follow the same order."""
    digest = hashlib.sha256()
    for o in orders:
        digest.update(len(o).to_bytes(8, "little"))
        digest.update(np.asarray(o, dtype="<i8").tobytes())
    return digest.hexdigest()


def steps_per_epoch(orders: Sequence[np.ndarray], batch_size: int) -> list[int]:
    return [math.ceil(len(o) / batch_size) for o in orders]


def optimizer_args(config: TrainConfig, total_steps: int) -> dict:
    """`make_optimizer` keyword arguments; stored in every checkpoint's metadata."""
    return {
        "lr": config.lr, "total_steps": total_steps,
        "warmup_steps": math.ceil(config.warmup_ratio * total_steps), "schedule": config.schedule,
        "weight_decay": config.weight_decay, "max_grad_norm": config.max_grad_norm,
        "b1": config.b1, "b2": config.b2, "eps": config.eps,
    }


def accumulation_batch(batch: dict, accum: int) -> dict:
    """[B, L] model inputs -> [accum, B / accum, L]: consecutive rows form a micro-batch."""
    return {k: batch[k].reshape(accum, -1, *batch[k].shape[1:]) for k in MODEL_KEYS}


# ----------------------------------------------------------------------------------------------
# Files: config, metrics log


def _config_differences(saved: dict, current: dict) -> list[str]:
    current = json.loads(json.dumps(current))  # same normalisation as the saved file
    return [f"{k}: saved {saved.get(k, '<absent>')!r}, now {current.get(k, '<absent>')!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k, object()) != current.get(k, object())]


def _prepare_config(run_dir: Path, config: TrainConfig, resume: bool) -> None:
    path = run_dir / CONFIG_FILE
    if resume and path.is_file():
        saved = json.loads(path.read_text())
        diffs = _config_differences(saved, config.to_dict())
        if diffs:
            raise ValueError(f"{path}: cannot resume, the saved TrainConfig differs in "
                             + "; ".join(diffs) + ". Use a new run_dir, or the saved config.")
        return
    if parallel.is_writer():
        atomic_write_text(path, json.dumps(config.to_dict(), indent=2) + "\n")


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None  # strict JSON has no NaN
    if isinstance(value, np.integer):
        return int(value)
    return value


def append_jsonl(path: Path, record: dict) -> None:
    """Appends one JSON line with a single O_APPEND write, so a reader (or a crash) never sees
    half a line interleaved with another."""
    line = (json.dumps(_json_safe(record), allow_nan=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _truncate_log(path: Path, last_step: int) -> None:
    """Keeps only the records of steps <= ``last_step`` (a torn last line is dropped too)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


# ----------------------------------------------------------------------------------------------
# Evaluation


def per_example_nll(eval_step: Callable, trainable, frozen, pool: InstructionPool, batch_size: int,
                    buckets, order) -> tuple[np.ndarray, np.ndarray]:
    """(summed response NLL, response tokens), float64 [N] each, of every pool example under
    ``eval_step`` (from `make_eval_step`), batched in ``order`` and padded to ``buckets``."""

    def score(batch):
        inputs = parallel.shard_batch({k: batch[k] for k in MODEL_KEYS}, what="evaluation batch")
        return parallel.tree_to_host(eval_step(trainable, frozen, inputs))

    return per_example_sums(iterate_batches(pool, order, batch_size, buckets), score, len(pool))


def evaluate_loss(eval_step: Callable, trainable, frozen, pool: InstructionPool, batch_size: int,
                  n_buckets: int) -> dict:
    """Mean response-token NLL over ``pool`` (total NLL / total response tokens), overall and,
    when the pool has categories, per category with the same per-token rule."""
    nll, tokens = per_example_nll(eval_step, trainable, frozen, pool, batch_size,
                                  length_buckets(pool.lengths, n_buckets), np.arange(len(pool)))
    result = {"loss": float(nll.sum() / max(tokens.sum(), 1.0)), "tokens": int(tokens.sum())}
    if any(c is not None for c in pool.categories):
        cats = np.array([str(c) for c in pool.categories], dtype=object)
        result["by_category"] = {
            c: float(nll[cats == c].sum() / max(tokens[cats == c].sum(), 1.0))
            for c in dict.fromkeys(cats.tolist())}
    return result


# ----------------------------------------------------------------------------------------------
# The loop


# Jitted steps of recent runs, so repeated `train` calls on the same architecture and optimizer
# (curricula, selectors that retrain, resumes, tests) compile once. The schedule is part of the
# optimizer, hence of the key; GraphDefs hash by structure.
_STEPS = CompiledCache(8)


def step_functions(graphdef, opt_args: dict, dtypes) -> tuple:
    """(tx, train_step, eval_step) for this model structure and optimizer (``opt_args``: the
    keyword arguments of `make_optimizer`) on the active mesh, built once and reused by later calls."""
    mesh = parallel.active_mesh()

    def build():
        tx, _ = make_optimizer(**opt_args)
        return tx, make_train_step(graphdef, tx, dtypes, mesh=mesh), make_eval_step(graphdef, dtypes)

    return _STEPS.get((graphdef, tuple(sorted(opt_args.items())), dtypes_key(dtypes), mesh), build)


def place_state(trainable, opt_state, frozen):
    """(trainable, opt_state, frozen) on the active mesh by `jraise.parallel`'s parameter rules,
    else committed to the device of the first trainable leaf.

    Restored arrays are committed to a device, fresh ones are not; jit keys its cache on that, so
    without committing a resumed run would compile its step a second time.
    """
    if parallel.active_mesh() is not None:
        return parallel.shard_params((trainable, opt_state, frozen))
    device = jax.sharding.SingleDeviceSharding(next(iter(jax.tree.leaves(trainable)[0].devices())))
    return (*jax.device_put((trainable, opt_state), device), frozen)


FINGERPRINT_SAMPLES = 64  # values of each weight array that `weights_fingerprint` reads

# What a resumed run must share with its checkpoint, as the message names it.
IDENTITY_NAMES = {"pool_fingerprint": "the training data", "order_fingerprint": "the data order",
                  "trainable": "full or LoRA", "lora": "the LoRA settings", "param_dtype": "the dtype",
                  "total_steps": "the number of steps",
                  "weights_fingerprint": "the starting weights: another model or adapter"}
OPTIONAL_IDENTITY = ("weights_fingerprint",)  # absent from checkpoints of older versions: not compared


def weights_fingerprint(model: nnx.Module) -> str:
    """sha256 hex over every parameter's path, shape, dtype and `FINGERPRINT_SAMPLES` of its values
    (evenly spaced over the flattened array, the first and last included), in path order.

    A sample, not a hash of all the weights (which would read the whole model on every call):
    another base model, another initialisation, another fine-tune of the same architecture, another
    LoRA adapter or dtype changes it; an edit confined to unsampled positions would not."""
    digest = hashlib.sha256()
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    samples = parallel.tree_to_host(_weight_samples(state))
    leaves = dict((jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(state))
    for key, sample in sorted((jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(samples)):
        leaf = leaves[key]
        digest.update(f"{key}|{tuple(leaf.shape)}|{leaf.dtype}|".encode())
        digest.update(np.ascontiguousarray(sample).tobytes())
    return digest.hexdigest()


@jax.jit
def _weight_samples(state):
    """`FINGERPRINT_SAMPLES` evenly spaced values of every array (one program for the whole tree)."""
    def sample(x):
        positions = np.unique(np.linspace(0, max(x.size - 1, 0), FINGERPRINT_SAMPLES).astype(np.int64))
        return jnp.take(jnp.reshape(x, -1), positions[: x.size])

    return jax.tree.map(sample, state)


def _shown(value) -> str:
    if isinstance(value, str) and len(value) == 64:  # a sha256 hex digest
        return value[:12]
    return repr(value)


def identity_differences(saved: dict, current: dict) -> list[str]:
    """What differs between a checkpoint's identity and this call's, one phrase each."""
    diffs = []
    for key, value in current.items():
        if key in OPTIONAL_IDENTITY and key not in saved:
            continue
        if saved.get(key) != value:
            what = f"{key} ({IDENTITY_NAMES[key]})" if key in IDENTITY_NAMES else key
            diffs.append(f"{what}: checkpoint {_shown(saved.get(key))}, now {_shown(value)}")
    return diffs


def _check_same_run(run_dir: Path, meta: dict, identity: dict, base_model=None) -> None:
    diffs = identity_differences(meta, identity)
    if diffs:
        started = meta.get("base_model")
        hint = (f" (it started from {started}, this call from {base_model})"
                if started and base_model is not None and str(base_model) != started else "")
        raise ValueError(f"{run_dir}: holds another run (checkpoint at step {meta['step']}){hint}; it differs in "
                         + "; ".join(diffs) + ". Use a new run directory, or the run's own settings.")


class TrainingDiverged(JraiseError):
    """The loss, gradient norm or weights of a run turned NaN or infinite; the run stopped."""

    def __init__(self, run_dir: Path, step: int, what: str, checkpoint: int | None):
        kept = (f"the last good checkpoint, step {checkpoint} ({run_dir / CHECKPOINT_DIR / str(checkpoint)}), is "
                "kept" if checkpoint is not None
                else "no checkpoint was saved before it (--save-every N saves more often)")
        super().__init__(f"{run_dir}: training diverged at step {step}: {what}. Stopped: nothing of step {step} "
                         f"was written; {kept}.\nStart a new run (another --out) with a lower learning rate, or "
                         f"check the data of step {step}.", path=run_dir)
        self.step, self.checkpoint = step, checkpoint


def non_finite_metrics(metrics: dict) -> str | None:
    """'the loss is nan' (or the gradient norm's) when a step's metrics are not finite, else None."""
    for key, name in (("loss", "the loss"), ("grad_norm", "the gradient norm")):
        value = float(metrics[key])
        if not math.isfinite(value):
            return f"{name} is {value}"
    return None


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def train(model: nnx.Module, pool: InstructionPool, config: TrainConfig, run_dir: str | os.PathLike,
          eval_pool: InstructionPool | None = None, order=None, resume: bool = True,
          tokenizer_dir: str | os.PathLike | None = None,
          callback: Callable[[StepInfo], bool | None] | None = None, export: bool = True,
          base_model: str | os.PathLike | None = None) -> TrainResult:
    """Fine-tunes ``model`` in place on ``pool``; see the module docstring for files and order.

    ``base_model``: the model directory the run started from, recorded as the PEFT adapter's
    ``base_model_name_or_path`` (a LoRA run's ``adapter/``); None leaves that field null.

    ``callback(info)`` runs after every step; returning True stops the run cleanly (a checkpoint
    is written at that step, so ``resume=True`` continues it; no export). ``resume=False`` starts
    from step 0 and refuses a run dir that already holds checkpoints (writing nothing there).

    Raises `jraise.lock.DirectoryLocked` when another process works in ``run_dir``, ValueError when
    ``run_dir`` holds another run (module docstring), `TrainingDiverged` on a non-finite step.
    """
    run_dir = Path(run_dir)
    if export and tokenizer_dir is not None:
        tokenizer_files(tokenizer_dir)  # refuse a bad tokenizer directory now, not after training
    run_dir.mkdir(parents=True, exist_ok=True)
    with directory_lock(run_dir) if parallel.is_writer() else contextlib.nullcontext():
        return _train_locked(model, pool, config, run_dir, eval_pool, order, resume, tokenizer_dir, callback,
                             export, base_model)


def _train_locked(model: nnx.Module, pool: InstructionPool, config: TrainConfig, run_dir: Path,
                  eval_pool: InstructionPool | None, order, resume: bool, tokenizer_dir, callback, export: bool,
                  base_model) -> TrainResult:
    orders = epoch_orders(len(pool), config, order)
    per_epoch = steps_per_epoch(orders, config.batch_size)
    epoch_starts = np.concatenate([[0], np.cumsum(per_epoch)]).tolist()
    total = sum(per_epoch) if config.max_steps is None else min(sum(per_epoch), config.max_steps)
    opt_args = optimizer_args(config, total)
    _, schedule = make_optimizer(**opt_args)
    lrs = np.asarray(jax.jit(schedule)(jnp.arange(total)), dtype=np.float64)  # one program, not many ops

    graphdef, trainable, frozen = split_trainable(model)
    dtypes = param_dtypes(model)
    tx, step_fn, eval_fn = step_functions(graphdef, opt_args, dtypes)
    # Placed before a restore, so a checkpoint is read straight into its sharding.
    trainable, opt_state, frozen = place_state(trainable, jax.jit(tx.init)(trainable), frozen)
    lora = lora_settings(model) if trainable_filter(model) is nnx.LoRAParam else None
    identity = {"pool_fingerprint": pool.fingerprint, "order_fingerprint": order_fingerprint(orders),
                "trainable": "lora" if lora else "full", "lora": lora,
                "param_dtype": model.config.param_dtype, "total_steps": total,
                "weights_fingerprint": weights_fingerprint(model)}

    manager = checkpoint_manager(run_dir, config.max_to_keep)
    step, epoch, next_batch, lr_history, elapsed = 0, 0, 0, [], 0.0
    latest = manager.latest_step()
    if latest is not None and not resume:
        raise FileExistsError(f"{run_dir}: holds checkpoints (latest step {latest}); pass resume=True "
                              "to continue that run, or use an empty run_dir")
    _prepare_config(run_dir, config, resume)
    if latest is not None:
        _check_same_run(run_dir, load_meta(run_dir, latest), identity, base_model)  # before reading any array
        trainable, opt_state, meta = restore_state(run_dir, latest, trainable, opt_state)
        step, epoch, next_batch = meta["step"], meta["next_epoch"], meta["next_batch"]
        lr_history, elapsed = list(meta["lr_history"]), meta["elapsed"]
    metrics_path = run_dir / METRICS_FILE
    writer = parallel.is_writer()  # in a multi-process run only process 0 writes the metrics log
    if writer:
        _truncate_log(metrics_path, step)

    buckets = length_buckets(pool.lengths, config.n_buckets)
    base_key = jax.random.key(config.seed)
    last_eval = None
    stopped = False
    start_time = time.perf_counter()

    def save(epoch_done: int, batch_done: int, epoch_end: bool) -> None:
        this_epoch = lr_history[epoch_starts[epoch_done]:step]
        if not bool(_all_finite(trainable)):
            raise TrainingDiverged(run_dir, step, "the weights are no longer finite", manager.latest_step())
        meta = {**identity, "base_model": None if base_model is None else str(base_model),
                "step": step, "epoch": epoch_done, "epoch_end": epoch_end,
                "next_epoch": epoch_done + 1 if epoch_end else epoch_done,
                "next_batch": 0 if epoch_end else batch_done + 1,
                "lr_history": lr_history, "epoch_mean_lr": float(np.mean(this_epoch)) if this_epoch else None,
                "elapsed": elapsed + time.perf_counter() - start_time, "optimizer": opt_args,
                "train_config": config.to_dict()}
        save_checkpoint(manager, step, trainable, opt_state, meta)

    bar = tqdm(total=total, initial=step, disable=None, desc="train", unit="step", dynamic_ncols=True)
    try:
        while step < total and epoch < len(orders):
            start = next_batch * config.batch_size
            batches = iterate_batches(pool, orders[epoch][start:], config.batch_size, buckets)
            upcoming = next(batches, None)
            b = next_batch
            while upcoming is not None and step < total:
                batch = upcoming
                key = jax.random.fold_in(base_key, step)
                inputs = parallel.shard_batch(accumulation_batch(batch, config.accum), axis=1,
                                              what="training micro-batch (batch_size / accum)")
                trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, inputs, key)
                upcoming = next(batches, None)  # builds the next batch while the step runs
                lr_history.append(float(lrs[step]))
                step += 1
                metrics = parallel.tree_to_host(metrics)
                diverged = non_finite_metrics(metrics)
                if diverged is not None:
                    raise TrainingDiverged(run_dir, step, diverged, manager.latest_step())
                record = {"step": step, "epoch": epoch, "loss": float(metrics["loss"]), "lr": lr_history[-1],
                          "tokens": int(metrics["tokens"]), "response_tokens": int(metrics["response_tokens"]),
                          "grad_norm": float(metrics["grad_norm"]),
                          "time": elapsed + time.perf_counter() - start_time}
                if eval_pool is not None and ((config.eval_every and step % config.eval_every == 0) or step == total):
                    last_eval = evaluate_loss(eval_fn, trainable, frozen, eval_pool, config.micro_batch_size,
                                              config.n_buckets)
                    record["eval"] = last_eval
                if writer:
                    append_jsonl(metrics_path, record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                if callback is not None:
                    real = batch["index"][batch["index"] != PAD_INDEX]
                    stopped = callback(StepInfo(step, epoch, real.copy(), record)) is True
                epoch_end = b == per_epoch[epoch] - 1
                if (epoch_end or step == total or stopped
                        or (config.save_every and step % config.save_every == 0)):
                    save(epoch, b, epoch_end)
                if stopped:
                    break
                b += 1
            if stopped:
                break
            epoch, next_batch = epoch + 1, 0
    finally:
        bar.close()

    assign_trainable(model, trainable)
    completed = not stopped and step >= total
    final_dir = adapter_dir = None
    if completed and export:
        final_dir = export_model(model, run_dir / FINAL_DIR, tokenizer_dir)
        if lora is not None:
            from jraise.model.peft import save_peft_adapter

            adapter_dir = save_peft_adapter(model, run_dir / ADAPTER_DIR, base_model)
    return TrainResult(model=model, steps=step, metrics_path=metrics_path, run_dir=run_dir, final_dir=final_dir,
                       completed=completed, lr_history=tuple(lr_history), last_eval=last_eval,
                       adapter_dir=adapter_dir)
