"""Gradient features of a pool at one checkpoint, written to a resumable `FeatureStore`.

pool (or preference pool) + model weights [+ the checkpoint's Adam moments]
  -> fixed-size groups of examples of one length bucket (static shapes: a handful of programs)
  -> `make_per_example_fn`: per-example gradient -> [Adam preconditioning] -> flatten -> JL project
  -> rows of the store, in pool order, shard by shard (a killed run resumes at the first missing
     shard and ends bit-identical: every step is deterministic).

Sides (LESS/ROSE):

* train side: SFT loss, Adam-preconditioned with the checkpoint's moments (``adam=True``);
* LESS validation side: SFT loss, plain gradient;
* ROSE validation side: the DPO loss with a reference model (``loss="dpo"``: the reference is the
  model without its trained LoRA values, i.e. the base model) or the reference-free margin
  (``loss="margin"``), plain gradient.

The store's identity records everything the features depend on (pool fingerprint, model, weights,
loss, Adam, projection), so features of another pool or seed are never mixed in silently.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jraise.compile_cache import CompiledCache, dtypes_key
from jraise.data.batching import (
    PAD_INDEX,
    length_buckets,
    make_batch,
    pick_bucket,
    preference_batch,
)
from jraise.data.pool import InstructionPool, PreferencePool
from jraise.grads.per_example import (
    DPO_BETA,
    adam_precondition,
    make_per_example_fn,
    make_sequence_logprob_fn,
)
from jraise.grads.projection import ProjectionConfig, flatten_tree, project
from jraise.grads.store import DEFAULT_SHARD_ROWS, FeatureStore

Pytree = object


@dataclass(frozen=True)
class FeatureConfig:
    """How features are computed. ``group``: examples per jitted call (one static shape per length
    bucket) and per projection (the random blocks are generated once per group); ``chunk``:
    examples whose gradients exist at once inside it. Memory: chunk x (activations + gradients)
    plus group x P floats for the flattened, preconditioned gradients awaiting projection (P =
    trainable size: small under LoRA; lower ``group`` for full gradients of a large model)."""

    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    chunk: int = 8
    group: int = 64
    n_buckets: int = 4
    shard_rows: int = DEFAULT_SHARD_ROWS
    beta: float = DPO_BETA

    def __post_init__(self):
        for name in ("chunk", "group", "n_buckets", "shard_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"FeatureConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.group % self.chunk:
            raise ValueError(f"FeatureConfig.group ({self.group}) must be a multiple of chunk ({self.chunk})")

    def to_dict(self) -> dict:
        return {**asdict(self), "projection": self.projection.to_dict()}


def _precondition_and_flatten(adam: bool):
    """``transform(grad, extra)`` for `make_per_example_fn`: [Adam preconditioning] then flatten.
    The projection is applied afterwards to the whole group at once (see `_group_features_fn`)."""

    def transform(grad, extra):
        if adam:
            mu, nu, _ = extra
            grad = adam_precondition(grad, mu, nu)
        return flatten_tree(grad)

    return transform


def _group_features_fn(graphdef, loss: str, adam: bool, config: FeatureConfig, dtypes):
    """One jitted program per (bucket shape): per-example gradients ``chunk`` at a time, then ONE
    projection of the group's [group, P] matrix. Generating the random blocks costs as much as
    applying them, so projecting per group instead of per chunk divides that cost by
    ``group / chunk`` (measured: the projection was ~90% of the time at chunk 8)."""
    grads = make_per_example_fn(graphdef, loss, config.chunk, _precondition_and_flatten(adam), dtypes, config.beta,
                                jit=False)
    proj = config.projection

    def fn(trainable, frozen, batch, extra):
        flat = grads(trainable, frozen, batch, extra)
        key = extra[2] if adam else extra
        return project(flat, key, proj.dim, proj.kind, proj.block_rows)

    return jax.jit(fn)


# Compiled feature programs, keyed by model structure, loss and config, so repeated calls (one
# per shard, checkpoint or side) compile once.
_PROGRAMS = CompiledCache(8)


def grouped_indices(lengths: np.ndarray, rows: np.ndarray, buckets, group: int):
    """(bucket length, [group] pool indices padded with -1) for ``rows``, sorted by length so each
    group holds examples of one bucket. Deterministic: a stable sort on (length, index)."""
    rows = np.asarray(rows, dtype=np.int64)
    order = rows[np.lexsort((rows, lengths[rows]))]
    by_bucket: dict[int, list[int]] = {}
    for i in order:
        by_bucket.setdefault(pick_bucket(int(lengths[i]), buckets), []).append(int(i))
    for bucket, members in sorted(by_bucket.items()):
        for start in range(0, len(members), group):
            chunk = members[start : start + group]
            yield bucket, np.array(chunk + [PAD_INDEX] * (group - len(chunk)), dtype=np.int64)


def _reference_logprobs(pool: PreferencePool, index: np.ndarray, bucket: int, logprob_fn, reference,
                        frozen) -> dict:
    batch = preference_batch(pool, index, bucket)
    out = {}
    for side in ("chosen", "rejected"):
        out[f"ref_{side}"] = logprob_fn(reference, frozen, batch[f"{side}_input_ids"],
                                        batch[f"{side}_attention_mask"], batch[f"{side}_loss_mask"],
                                        batch["example_mask"])
    return out


def compute_features(graphdef, trainable, frozen, pool: InstructionPool | PreferencePool, rows: np.ndarray,
                     config: FeatureConfig, loss: str = "sft", moments: tuple | None = None,
                     reference: Pytree | None = None, dtypes=None) -> np.ndarray:
    """Projected per-example gradient features [len(rows), d] float32 (not normalised), in the
    order of ``rows``. ``moments``: (mu, nu) for Adam preconditioning (train side), else plain
    gradients. ``reference``: trainable values of the DPO reference model (``loss="dpo"``)."""
    if loss == "dpo" and reference is None:
        raise ValueError("the DPO loss needs reference weights (reference=...)")
    is_pref = isinstance(pool, PreferencePool)
    if is_pref != (loss in ("dpo", "margin")):
        raise ValueError(f"loss {loss!r} needs {'a preference pool' if loss in ('dpo', 'margin') else 'an instruction pool'}")
    adam = moments is not None
    fn = _PROGRAMS.get((graphdef, loss, adam, config, dtypes_key(dtypes)),
                       lambda: _group_features_fn(graphdef, loss, adam, config, dtypes))
    if loss == "dpo":
        logprob_fn = _PROGRAMS.get((graphdef, "logprob", dtypes_key(dtypes)),
                                   lambda: make_sequence_logprob_fn(graphdef, dtypes))
    extra = (*moments, config.projection.key()) if moments is not None else config.projection.key()
    buckets = length_buckets(pool.lengths, config.n_buckets)
    rows = np.asarray(rows, dtype=np.int64)
    position = {int(r): k for k, r in enumerate(rows)}
    out = np.zeros((len(rows), config.projection.dim), np.float32)
    for bucket, index in grouped_indices(np.asarray(pool.lengths), rows, buckets, config.group):
        batch = preference_batch(pool, index, bucket) if is_pref else make_batch(pool, index, bucket)
        if loss == "dpo":
            batch.update(_reference_logprobs(pool, index, bucket, logprob_fn, reference, frozen))
        feats = np.asarray(fn(trainable, frozen, batch, extra))
        real = index != PAD_INDEX
        out[[position[int(i)] for i in index[real]]] = feats[real]
    return out


def feature_store(store_dir: str | os.PathLike, graphdef, trainable, frozen, pool, config: FeatureConfig,
                  identity: dict, loss: str = "sft", moments: tuple | None = None, reference=None, dtypes=None,
                  progress: bool = True) -> FeatureStore:
    """Fills (or finishes) the store at ``store_dir`` with the pool's L2-normalised features.

    ``identity`` names the weights (model, run, checkpoint step); the pool fingerprint, loss, Adam
    flag and `FeatureConfig` are added here. Reopening with any of them different is an error.
    """
    full_identity = {**identity, "pool_fingerprint": pool.fingerprint, "loss": loss,
                     "adam": moments is not None, "features": config.to_dict()}
    store = FeatureStore.create_or_open(Path(store_dir), n=len(pool), dim=config.projection.dim,
                                        identity=full_identity, shard_rows=config.shard_rows)
    def compute(start: int, stop: int) -> np.ndarray:
        return compute_features(graphdef, trainable, frozen, pool, np.arange(start, stop), config, loss, moments,
                                reference, dtypes)

    store.fill(compute, progress=progress)
    return store


def zero_reference(trainable) -> Pytree:
    """The DPO reference of a LoRA policy: adapters set to zero contribute nothing, which is the
    base model (ROSE's reference is the base model without LoRA)."""
    return jax.tree.map(jnp.zeros_like, trainable)
