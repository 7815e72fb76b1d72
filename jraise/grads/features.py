"""Gradient features of a pool at one checkpoint: arrays in, the projected feature matrix out.

pool (or preference pool) + model weights [+ the checkpoint's Adam moments]
  -> fixed-size groups of examples of one length bucket (static shapes: a handful of programs)
  -> `make_per_example_fn`: per-example gradient -> [Adam preconditioning] -> flatten -> JL project
     (factored mode: the preconditioned tree -> a Kronecker JL projection per 2-D leaf;
     sjlt mode: each chunk's gradients, example axis last, sketched in place by a sparse JL
     transform, never flattened)
  -> rows [len(rows), d] in the order asked for (`compute_features`); every step is deterministic,
     so the same rows give the same features bit for bit.

Sides (LESS/ROSE):

* train side: SFT loss, Adam-preconditioned with the checkpoint's moments (``adam=True``); with
  ``adam_first_moment=False`` the checkpoint's first moment is left out (see `compute_features`);
* LESS validation side: SFT loss, plain gradient;
* ROSE validation side: the DPO loss with a reference model (``loss="dpo"``: the reference is the
  model without its trained LoRA values, i.e. the base model) or the reference-free margin
  (``loss="margin"``), plain gradient.

No file I/O here: `jraise.jobs.influence.feature_store` writes these features shard by shard into
a resumable `jraise.data.feature_store.FeatureStore`, whose identity records everything they
depend on (`FeatureConfig.to_dict` among it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jraise import parallel
from jraise.compile_cache import CompiledCache, dtypes_key
from jraise.data.batching import (
    PAD_INDEX,
    length_buckets,
    make_batch,
    partial_group_rows,
    pick_bucket,
    preference_batch,
)
from jraise.data.feature_store import DEFAULT_SHARD_ROWS
from jraise.data.pool import InstructionPool, PreferencePool
from jraise.grads.per_example import (
    DPO_BETA,
    adam_precondition,
    make_per_example_fn,
    make_sequence_logprob_fn,
)
from jraise.grads.projection import (
    ProjectionConfig,
    flatten_tree,
    project,
    project_columns_sjlt,
    project_tree_factored,
    sjlt_table,
    tree_size,
)

Pytree = object


@dataclass(frozen=True)
class FeatureConfig:
    """How features are computed. ``group``: examples per jitted call (one static shape per length
    bucket) and per projection (the random blocks are generated once per group); ``chunk``:
    examples whose gradients exist at once inside it. Memory: chunk x (activations + gradients)
    plus, in the dense and factored modes, group x P floats for the flattened, preconditioned
    gradients awaiting projection (P = trainable size: small under LoRA; lower ``group`` for full
    gradients of a large model); the sjlt mode sketches each chunk in place (chunk x P at most,
    plus its hash table, 8 bytes per coordinate and nonzero).

    ``n_buckets``: at most this many length buckets, and one per whole group (`feature_buckets`).

    ``projection.mode``: ``"dense"`` projects the flattened gradient by one JL matrix;
    ``"factored"`` projects each 2-D leaf by its own Kronecker matrix (LoGra) and the other leaves
    densely (`jraise.grads.projection.project_tree_factored`): the same per-example gradients,
    far fewer random numbers per group; ``"sjlt"`` applies a sparse JL transform with
    ``projection.sjlt_nnz`` nonzeros per gradient coordinate to the flattened gradient
    (`jraise.grads.projection.project_sjlt`): O(group x P x s) work, flat in d. The modes give
    different (all unbiased) features; the store's identity records the mode (and s for sjlt)."""

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


def _precondition_and_flatten(adam: bool, flatten: bool = True):
    """``transform(grad, extra)`` for `make_per_example_fn`: [Adam preconditioning] then flatten
    (dense mode; factored mode keeps the tree, whose 2-D leaves it projects one by one). The
    projection is applied afterwards to the whole group at once (see `_group_features_fn`)."""

    def transform(grad, extra):
        if adam:
            mu, nu, _ = extra
            grad = adam_precondition(grad, mu, nu)
        return flatten_tree(grad) if flatten else grad

    return transform


def _group_features_fn(graphdef, loss: str, adam: bool, config: FeatureConfig, dtypes, mesh=None):
    """One jitted program per (bucket shape): per-example gradients ``chunk`` at a time, then ONE
    projection of the group's [group, P] matrix (dense and factored modes; the sjlt mode projects
    each chunk in place instead, `_sjlt_group_fn`). Generating the random blocks costs as much as
    applying them, so projecting per group instead of per chunk divides that cost by
    ``group / chunk`` (at chunk 8 the projection dominates the time; BUILD_NOTES).

    On a mesh the group's rows are split over data x fsdp and each device runs this same program
    on its own rows (`jax.shard_map`): per-example gradients need no communication, the weights
    (FSDP-sharded at rest) are gathered once per call, and the projection blocks are generated
    from the same keys on every device, so the features equal the single-device ones.
    """
    proj = config.projection
    if proj.mode == "sjlt":
        return _jit_on(mesh, _sjlt_group_fn(graphdef, loss, adam, config, dtypes))
    factored = proj.mode == "factored"
    grads = make_per_example_fn(graphdef, loss, config.chunk, _precondition_and_flatten(adam, not factored), dtypes,
                                config.beta, jit=False)

    def fn(trainable, frozen, batch, extra):
        per_example = grads(trainable, frozen, batch, extra)  # [group, P], or a tree of [group, ...]
        key = extra[2] if adam else extra
        if factored:
            return project_tree_factored(per_example, key, proj.dim, proj.kind, proj.block_rows)
        return project(per_example, key, proj.dim, proj.kind, proj.block_rows)

    return _jit_on(mesh, fn)


def _sjlt_group_fn(graphdef, loss: str, adam: bool, config: FeatureConfig, dtypes):
    """The sjlt mode's group program: the sketch is applied chunk by chunk, inside the chunk loop.

    Its cost is one scatter-add per coordinate, which is cheap only while the chunk's gradients
    are read in place: the gradients come out with the example axis last (`chunked_grads`'
    ``rows_last``), Adam preconditions them there (elementwise, the moments broadcast over the
    chunk), and `project_columns_sjlt` adds each coordinate's row of ``chunk`` numbers into the
    [d, chunk] accumulator. Neither the [group, P] matrix the other modes project, nor a flattened
    or transposed copy of a chunk, is ever formed; the hashes (`sjlt_table`) are drawn once per
    call. The features equal `project_sjlt` of the flattened gradients (same hashes, same order of
    summation; BUILD_NOTES has the measured speed-up).
    """
    proj = config.projection
    grads = make_per_example_fn(
        graphdef, loss, config.chunk, _precondition_and_flatten(adam, flatten=False) if adam else None, dtypes,
        config.beta, jit=False, rows_last=True,
        on_chunk=lambda tree, extra: project_columns_sjlt(tree, extra[2] if adam else extra, proj.dim))

    def fn(trainable, frozen, batch, extra):
        key = extra[2] if adam else extra
        table = sjlt_table(key, tree_size(trainable), proj.dim, proj.sjlt_nnz, proj.block_rows)
        return grads(trainable, frozen, batch, (*extra[:2], table) if adam else table)

    return fn


def _jit_on(mesh, fn):
    """``fn(trainable, frozen, batch, extra)`` jitted, its rows split over ``mesh`` when given."""
    if mesh is not None:
        whole, rows = PartitionSpec(), PartitionSpec(parallel.ROWS)
        fn = jax.shard_map(fn, mesh=mesh, in_specs=(whole, whole, rows, whole), out_specs=rows, check_vma=False)
    return jax.jit(fn)


# Compiled feature programs, keyed by model structure, loss and config, so repeated calls (one
# per shard, checkpoint or side) compile once.
_PROGRAMS = CompiledCache(8)


def feature_buckets(lengths, config: FeatureConfig) -> tuple[int, ...]:
    """The length buckets of a pool's feature groups: `length_buckets` of all its ``lengths``, with
    at most one bucket per whole group of examples, ``min(n_buckets, max(1, len(lengths) // group))``.

    Every bucket is a program of its own to trace and compile (with its short last group, two),
    which on SmolLM2 costs about what the gradients of ten examples do; a pool smaller than a
    group, such as a validation set of 16 pairs, is cheaper padded to one length than split over
    four compiled shapes. Fitted to the whole pool, not to one shard's rows, so every shard of a
    store uses the same shapes."""
    lengths = np.asarray(lengths)
    return length_buckets(lengths, min(config.n_buckets, max(1, len(lengths) // config.group)))


def grouped_indices(lengths: np.ndarray, rows: np.ndarray, buckets, group: int, tail_multiple: int | None = None):
    """(bucket length, pool indices padded with -1) for ``rows``, sorted by length so each group
    holds examples of one bucket: ``group`` indices, except that with ``tail_multiple`` a bucket's
    last, partial group is padded only up to the next multiple of ``tail_multiple`` (one more
    static shape per bucket instead of up to ``group - 1`` padding rows computed for nothing: 16
    validation pairs in a 64-row group cost 4x their own work). Deterministic: a stable sort on
    (length, index)."""
    rows = np.asarray(rows, dtype=np.int64)
    order = rows[np.lexsort((rows, lengths[rows]))]
    by_bucket: dict[int, list[int]] = {}
    for i in order:
        by_bucket.setdefault(pick_bucket(int(lengths[i]), buckets), []).append(int(i))
    for bucket, members in sorted(by_bucket.items()):
        for start in range(0, len(members), group):
            chunk = members[start : start + group]
            size = group if tail_multiple is None else partial_group_rows(len(chunk), group, tail_multiple)
            yield bucket, np.array(chunk + [PAD_INDEX] * (size - len(chunk)), dtype=np.int64)


def _reference_logprobs(batch: dict, logprob_fn, reference, frozen, mesh=None) -> dict:
    """The reference model's summed response log-probability of each side, [G] per side, laid
    out like the batch's rows."""
    out = {}
    for side in ("chosen", "rejected"):
        out[f"ref_{side}"] = logprob_fn(reference, frozen, batch[f"{side}_input_ids"],
                                        batch[f"{side}_attention_mask"], batch[f"{side}_loss_mask"],
                                        batch["example_mask"])
    return parallel.shard_batch(out, mesh, what="reference log-probabilities")


def placed_inputs(trainable, frozen, reference, moments, mesh):
    """(trainable, frozen, reference, moments) as the feature program reads them on ``mesh``:
    weights by the parameter rules (FSDP at rest), Adam moments replicated (they enter the
    per-device program whole). Placing already-placed inputs costs nothing, so a caller running
    many `compute_features` calls (`jraise.jobs.influence.feature_store`) places once and each call
    finds them in place."""
    trainable, frozen, reference = parallel.shard_params((trainable, frozen, reference), mesh)
    return trainable, frozen, reference, parallel.shard_replicated(moments, mesh)


def compute_features(graphdef, trainable, frozen, pool: InstructionPool | PreferencePool, rows: np.ndarray,
                     config: FeatureConfig, loss: str = "sft", moments: tuple | None = None,
                     reference: Pytree | None = None, dtypes=None, adam_first_moment: bool = True) -> np.ndarray:
    """Projected per-example gradient features [len(rows), d] float32 (not normalised), in the
    order of ``rows``. ``moments``: (mu, nu) for Adam preconditioning (train side), else plain
    gradients. ``reference``: trainable values of the DPO reference model (``loss="dpo"``).

    ``adam_first_moment=False`` drops the checkpoint's first moment from the Adam feature (mu taken
    as zero): ``(1-b1)*g / sqrt(b2*nu + (1-b2)*g**2 + eps)``, the example's own share of the next
    update. The LESS code keeps it (the default), but ``b1*mu`` is one vector added to every
    example's feature, and where it outweighs ``(1-b1)*g`` the cosines rank examples by how little
    they move that shared vector rather than by what they teach (BUILD_NOTES)."""
    if moments is not None and not adam_first_moment:
        moments = (jax.tree.map(jnp.zeros_like, moments[0]), moments[1])
    if loss == "dpo" and reference is None:
        raise ValueError("the DPO loss needs reference weights (reference=...)")
    is_pref = isinstance(pool, PreferencePool)
    if is_pref != (loss in ("dpo", "margin")):
        raise ValueError(f"loss {loss!r} needs {'a preference pool' if loss in ('dpo', 'margin') else 'an instruction pool'}")
    adam = moments is not None
    mesh = parallel.active_mesh()
    if config.group % parallel.row_shards(mesh):
        raise ValueError(f"FeatureConfig.group ({config.group}) must be a multiple of the mesh's data x fsdp "
                         f"({parallel.row_shards(mesh)} devices)")
    # The program reads the projection's key as an argument, so configs that differ only in the
    # seed share one compiled program.
    program_config = replace(config, projection=replace(config.projection, seed=0))
    fn = _PROGRAMS.get((graphdef, loss, adam, program_config, dtypes_key(dtypes), mesh),
                       lambda: _group_features_fn(graphdef, loss, adam, program_config, dtypes, mesh))
    if loss == "dpo":
        logprob_fn = _PROGRAMS.get((graphdef, "logprob", dtypes_key(dtypes)),
                                   lambda: make_sequence_logprob_fn(graphdef, dtypes))
    trainable, frozen, reference, moments = placed_inputs(trainable, frozen, reference, moments, mesh)
    key = parallel.shard_replicated(config.projection.key(), mesh)
    extra = (*moments, key) if moments is not None else key
    buckets = feature_buckets(pool.lengths, config)
    rows = np.asarray(rows, dtype=np.int64)
    position = {int(r): k for k, r in enumerate(rows)}
    out = np.zeros((len(rows), config.projection.dim), np.float32)
    tail = math.lcm(config.chunk, parallel.row_shards(mesh))  # a partial group: whole chunks, whole shards
    for bucket, index in grouped_indices(np.asarray(pool.lengths), rows, buckets, config.group, tail):
        batch = preference_batch(pool, index, bucket) if is_pref else make_batch(pool, index, bucket)
        batch = parallel.shard_batch({k: v for k, v in batch.items() if k != "index"}, mesh,
                                     what="feature group")
        if loss == "dpo":
            batch.update(_reference_logprobs(batch, logprob_fn, reference, frozen, mesh))
        feats = parallel.to_host(fn(trainable, frozen, batch, extra))
        real = index != PAD_INDEX
        out[[position[int(i)] for i in index[real]]] = feats[real]
    return out


def zero_reference(trainable) -> Pytree:
    """The DPO reference of a LoRA policy: adapters set to zero contribute nothing, which is the
    base model (ROSE's reference is the base model without LoRA)."""
    return jax.tree.map(jnp.zeros_like, trainable)
