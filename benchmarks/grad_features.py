"""LESS gradient features: every projection mode vs a LESS-style PyTorch loop and vs training,
their agreement with exact scores, and scoring memory.

One run measures, for every model in ``--models`` (jraise presets such as ``small``, and
``smollm2-135m-instruct``, the real SmolLM2-135M-Instruct from `jraise.fetch.fetch_smollm2`) and
every LoRA rank in ``--ranks`` (LoRA on q, k, v, o; alpha ``--lora-alpha``) at d = ``--proj-dim``,
the following figures (absolute numbers drift on a shared machine; compare the ratios, which are
taken within one setting of one run). A setting is ``r<rank>_d<d>``.

1. **Throughput (examples/s) of every projection mode** in ``--modes``: ``dense`` (LESS's dense
   Rademacher JL matrix), ``factored`` (LoGra-style Kronecker blocks per LoRA matrix, d =
   ``--factored-dim``, default d) and ``sjlt`` (sparse JL, one mode label ``sjlt_s<s>`` per s in
   ``--sjlt-nnz``). Each runs `compute_features` (SFT loss, with Adam moments), as
   `jraise.jobs.influence.feature_store` does shard by shard: the jitted per-group program is
   cached across calls (inside jraise), and every length bucket is compiled during the warm-up. Its
   time includes building the padded groups on the host and copying the features back.

2. **vs a plain jitted training step on the same examples (``vs_training``).** The same LoRA model
   trains with `make_train_step` + `make_optimizer` (AdamW, constant lr, clipping at 1.0) on
   exactly the groups `compute_features` builds (`grouped_indices`: one length bucket per group,
   padding rows included, batch = ``FeatureConfig.group`` rows, a bucket's last group padded to
   whole chunks only, one update per group). Both count
   real examples only. The ratio says what per-example gradients, Adam preconditioning and the
   projection cost on top of one batched forward/backward.

3. **vs a LESS-style PyTorch loop (``vs_reference``).** Both sides hold the same model: for a
   preset, one saved with `save_model` (no adapters); for SmolLM2, the cached model directory;
   loaded by jraise and by `transformers.AutoModelForCausalLM`. Both attach the same LoRA adapters:
   jraise with `add_lora`; torch, since ``peft`` is not installed here, by wrapping each q/k/v/o
   ``nn.Linear`` in a module adding ``x @ A @ B * alpha / r``, with A and B copied from the jraise
   model. B is set to small random values (as after warm-up training) rather than PEFT's zeros,
   which would make every gradient of A exactly zero. The Adam moments (mu, nu) are fixed random
   values shared by both sides.

   The reference does what LESS's ``collect_grad_reps.py`` does: one example at a time (batch 1,
   unpadded), forward, loss = mean cross-entropy over the response tokens (transformers' own
   ``labels`` loss, -100 elsewhere), backward, concatenate the LoRA gradients, Adam-precondition
   them without bias correction (``(b1 m + (1 - b1) g) / sqrt(b2 v + (1 - b2) g^2 + eps)``, as
   `adam_precondition`), and project densely to d dims. Like LESS, the gradients are projected
   ``--ref-project-interval`` (LESS: 16) at a time as one [16, P] x [P, d] product, by jraise's own
   dense matrix (``dense_matrix(config.projection.key(), P, d)``), so the reference's features must
   equal the dense mode's. While the [P, d] float32 matrix fits in ``--ref-matrix-max-bytes`` it is
   generated once, outside the timing, and kept as a torch tensor (an optimistic reference: TRAK's
   CPU ``BasicProjector`` with LESS's block size 128 regenerates its blocks on every call); above
   that (SmolLM2, or r = 128: 30 GB and more) every interval is projected by jraise's `project`,
   which regenerates the blocks per call, as TRAK's CPU projector does (``reference_projection``
   in the JSON says which). The run checks the agreement twice: the Adam-preconditioned gradient
   vectors before projection (first two examples) and the projected features of every example
   (last timed round, against the dense mode); the JSON reports the largest per-example relative
   L2 difference of each (float32 summation order only: 1e-3 would still be a match). LESS
   projects float16 gradients on a GPU; here both sides stay float32. PyTorch runs single-threaded
   by default (``--torch-threads 0`` gives torch's own default), as in ``trainer_throughput.py``:
   on a shared 2-core machine its OpenMP workers spin-wait against other processes and a 2-thread
   torch step measured up to 10x slower than a 1-thread one there, which would flatter jraise. jraise
   (XLA) uses its own thread pool over all cores.

4. **Agreement of each mode's LESS scores with the exact unprojected scores**, beside the agreement
   of two dense seeds. LESS-style scores (`influence_scores`, one checkpoint, one group: the mean
   cosine of each pool example's Adam-preconditioned feature with ``--n-val`` validation features,
   plain SFT gradients of the testbed's validation examples projected in the same mode). The exact
   scores use the unprojected gradients (P coordinates), computed group by group so that only the
   validation side's [n_val, P] is held. A mode's train features are those of its last timed round.
   For each pair the JSON reports the Pearson and Spearman correlations of the scores and the
   overlap of the top 5% selected by each (|A & B| / k, k = ceil(0.05 N)). ``dense_two_seeds`` is
   the dense mode against the dense mode of seed ``--seed + 1``: how much two dense projections
   disagree anyway, the yardstick for every mode's agreement with the exact scores.

5. **Peak memory of scoring N x D features (default 1,000,000 x 1024)**, once per run (not per
   model), with `influence_scores` reading a memory-mapped `FeatureStore`. The store is written
   shard by shard (random unit rows, float16: 2 GB at the default size) under ``--work`` and
   deleted at the end. Four checkpoints share the one store (``[m, m, m, m]``: same reads, a quarter
   of the disk); validation is 64 examples in 8 groups per checkpoint. The scoring runs in a fresh
   Python process (numpy and jraise's store/selection modules only, no jax or torch) that reports,
   from ``/proc/self/status``: ``VmHWM`` (peak resident set, reset through ``/proc/self/clear_refs``
   just before scoring when the kernel allows), the resident set before scoring, and the largest
   ``RssAnon`` / ``RssFile`` seen by a thread sampling every 2 ms while it scores (lower bounds on
   the true peaks). Goal: peak < 2 GB. ``--skip-memory`` leaves it out.

Output: a JSON file (``--out``, default ``benchmarks/results/grad_features.json``; its path is
printed last) with flat keys ``"<model>/<setting>/<mode>/examples_per_s"``, ``.../vs_training``,
``.../vs_reference`` and ``.../agreement/{pearson,spearman,top5}`` for every mode;
``"<model>/<setting>/{training,less_reference}/examples_per_s"``;
``"<model>/<setting>/dense_two_seeds/agreement/{pearson,spearman,top5}"``; the details of each
setting under ``"details"`` (sizes, every round, warm-up times, the reference checks, every
agreement pair, the factored split) and the scoring figure under ``"scoring"``.

Timing: every side is warmed up first (one example per length bucket, so jit compiles every group
shape; torch allocates), then the sides run ``--rounds`` rounds over the same examples, the order
rotating from round to round; a round repeats whole passes until it has run ``--min-round-s``
(so a pass of a few milliseconds is not timed alone); a figure is the median round.
``--n-examples``, ``--group``, ``--n-buckets``, ``--rounds`` and ``--chunk`` take one number or
one per model (``small=64,smollm2-135m-instruct=16``): each model gets its own testbed pool of its
``--n-examples``, so one run can time the small preset at sizes where its passes are not
overhead-bound and SmolLM2 at sizes this CPU finishes. ``--breakdown`` adds a side that runs
`compute_features`' per-example program without the projection (gradients, Adam, flatten) on the
same groups, and times one dense `project` call on a [chunk, P] block, to show where the time goes.

Group padding: `compute_features` pads the last group of every length bucket to ``group`` rows and
computes those padding rows like real ones, so a small pool wastes part of the jraise work
(``real_row_fraction``); a 4096-row store shard wastes a few percent. All jraise sides process the
same groups; all rates count real examples only.

Memory: the dense and factored modes hold ``group x P`` float32 preconditioned gradients per group
(SmolLM2 at r = 128: P = 14.7M, 3.8 GB at group 64, more inside the projection); lower
``--group`` on a small host. The sjlt mode holds ``chunk x P`` (it sketches each chunk in place).

Cost (shared 2-core CPU, loaded, 2026-12-06): ``--quick --ranks 8,128 --sjlt-nnz 1,4 --breakdown``
took 7 minutes (small r = 8: 169 s, r = 128: 239 s, scoring 100k rows: seconds). On SmolLM2 every
compile takes 0.5 to 4 minutes here (a dozen programs per setting: each mode's bucket shapes,
training, the exact gradients, the validation side), and the dense projection dominates: 2 P d flops
per example plus P d random signs per group (P = 921,600 at r = 8, 14.7M at r = 128), the same
again for the reference, which regenerates the matrix every 16 examples. Estimated for the default
run on this CPU: small 10 minutes, SmolLM2 r = 8 about 1.5-2 hours, SmolLM2 r = 128 about 6 hours
(about 8 s per example for each of the dense mode and the reference, per round); a job for a large
host or an accelerator, or lower ``--n-examples`` / ``--rounds``.

    python benchmarks/grad_features.py                         # the full measurement (all of the above)
    # issue 24's figures, both models in one run (about 40 minutes on 2 CPU cores):
    python benchmarks/grad_features.py --models small,smollm2-135m-instruct --ranks 8,128 --skip-memory \
        --n-examples small=256,smollm2-135m-instruct=32 --group small=64,smollm2-135m-instruct=16 \
        --n-buckets small=4,smollm2-135m-instruct=1 --rounds small=3,smollm2-135m-instruct=1 \
        --chunk small=16,smollm2-135m-instruct=8
    python benchmarks/grad_features.py --quick                 # small preset, r = 8, 64 examples
    python benchmarks/grad_features.py --models small --ranks 8,128 --sjlt-nnz 1,4 --skip-memory
    python benchmarks/grad_features.py --models smollm2-135m-instruct --ranks 8 --n-examples 64 --group 16
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8  # LESS's constants (as `adam_precondition`)
LORA_B_STD = 0.02  # adapters "after warm-up training": B != 0, so A has gradients
MOMENT_SCALE = 1e-3  # typical size of Adam's first moment / sqrt of the second one
SCORE_VAL, SCORE_GROUPS, SCORE_CHECKPOINTS = 64, 8, 4
GOALS = {"jraise_over_less_reference": 10.0, "features_over_training": 0.5, "scoring_peak_bytes": 2 * 1024**3}
SMOLLM2 = "smollm2-135m-instruct"
# Options that take one number, or one per model ("small=64,smollm2-135m-instruct=16"): a big
# model's settings need not shrink a small one's to a few milliseconds per pass.
PER_MODEL = ("n_examples", "group", "n_buckets", "rounds", "chunk")
RESULTS = Path(__file__).resolve().parent / "results"
# The full measurement, and --quick (a few minutes on a shared 2-core CPU). An option given
# on the command line wins over both.
FULL = {"models": f"small,{SMOLLM2}", "ranks": "8,128", "n_examples": 256, "group": 64, "rounds": 3, "n_val": 8,
        "score_rows": 1_000_000, "out": str(RESULTS / "grad_features.json")}
# 64 examples in groups of 32: two thirds of the rows real (groups of 64: half).
QUICK = {"models": "small", "ranks": "8", "n_examples": 64, "group": 32, "rounds": 2, "n_val": 8,
         "score_rows": 100_000, "out": str(RESULTS / "grad_features_quick.json")}


# ----------------------------------------------------------------------------- jraise side


def _jraise_setup(model_dir, lora_rank: int, lora_alpha: float, seed: int):
    """(model, graphdef, trainable, frozen, (mu, nu)): the saved model with LoRA on q/k/v/o."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jraise.model import load_model
    from jraise.model.lora import (
        ATTENTION_TARGETS,
        LoRAConfig,
        add_lora,
        lora_projections,
    )
    from jraise.train import split_trainable

    model, _ = load_model(model_dir)
    config = LoRAConfig(rank=lora_rank, alpha=lora_alpha, targets=ATTENTION_TARGETS)
    add_lora(model, config, seed=seed)
    rng = np.random.default_rng(seed)
    for _, proj in lora_projections(model, config.targets):
        b = rng.normal(0.0, LORA_B_STD, proj.lora_b.shape).astype(np.float32)
        proj.lora_b.value = jnp.asarray(b, proj.lora_b.dtype)
    graphdef, trainable, frozen = split_trainable(model)
    mu = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, MOMENT_SCALE, x.shape), jnp.float32), trainable)
    nu = jax.tree.map(lambda x: jnp.asarray((MOMENT_SCALE * rng.uniform(0.5, 1.5, x.shape)) ** 2, jnp.float32),
                      trainable)
    return model, graphdef, trainable, frozen, (mu, nu)


def _features_side(graphdef, trainable, frozen, pool, rows, config, moments):
    """run(warm=False) -> [N, d] features of ``rows`` by `compute_features`, its jitted program
    cached; ``warm``: one example per length bucket (compiles every group shape)."""
    from jraise.data.batching import length_buckets, pick_bucket
    from jraise.grads.features import compute_features

    buckets = length_buckets(pool.lengths, config.n_buckets)
    first = {}
    for i in rows:
        first.setdefault(pick_bucket(int(pool.lengths[i]), buckets), int(i))
    warm_rows = sorted(first.values())

    def run(warm: bool = False):
        return compute_features(graphdef, trainable, frozen, pool, warm_rows if warm else rows, config, loss="sft",
                                moments=moments)

    return run


def _train_side(model, graphdef, pool, rows, config, lr: float):
    """(() -> one pass of train steps over the feature groups, real examples per pass)."""
    import jax

    from jraise.data.batching import length_buckets, make_batch
    from jraise.grads.features import grouped_indices
    from jraise.train import (
        make_optimizer,
        make_train_step,
        param_dtypes,
        split_trainable,
    )

    _, trainable, frozen = split_trainable(model)  # a fresh copy: the step donates it
    tx, _ = make_optimizer(lr, total_steps=1, schedule="constant", weight_decay=0.0, max_grad_norm=1.0)
    state = {"trainable": trainable, "opt": jax.jit(tx.init)(trainable)}
    step_fn = make_train_step(graphdef, tx, param_dtypes(model))
    keys = ("input_ids", "attention_mask", "loss_mask", "example_mask")
    buckets = length_buckets(pool.lengths, config.n_buckets)
    batches, n_real = [], 0
    for bucket, index in grouped_indices(pool.lengths, rows, buckets, config.group, config.chunk):
        b = make_batch(pool, index, bucket)
        n_real += int(b["example_mask"].sum())
        batches.append(jax.device_put({k: b[k][None] for k in keys}))  # [A=1, group, L]

    def run(warm: bool = False):
        loss = None
        for batch in _one_per_shape(batches) if warm else batches:
            state["trainable"], state["opt"], metrics = step_fn(state["trainable"], state["opt"], frozen, batch)
            loss = metrics["loss"]
        return float(loss)  # waits for the last step; steps run in order

    shape = {"groups": len(batches), "group_rows": sum(int(b["input_ids"].shape[1]) for b in batches),
             "bucket_lengths_used": sorted({int(b["input_ids"].shape[-1]) for b in batches})}
    return run, n_real, shape


def _grads_side(graphdef, trainable, frozen, pool, rows, config, moments):
    """() -> the `compute_features` work without the projection: per-example gradients, Adam,
    flattened to [group, P], over the same groups (``--breakdown``)."""
    from jraise.data.batching import length_buckets, make_batch
    from jraise.grads.features import grouped_indices
    from jraise.grads.per_example import adam_precondition, make_per_example_fn
    from jraise.grads.projection import flatten_tree

    fn = make_per_example_fn(graphdef, "sft", config.chunk,
                             transform=lambda g, extra: flatten_tree(adam_precondition(g, *extra)))
    buckets = length_buckets(pool.lengths, config.n_buckets)
    batches = [make_batch(pool, index, bucket) for bucket, index in
               grouped_indices(pool.lengths, rows, buckets, config.group, config.chunk)]

    def run(warm: bool = False):
        for batch in _one_per_shape(batches) if warm else batches:
            fn(trainable, frozen, batch, moments).block_until_ready()

    return run


def _one_per_shape(batches):
    """The first batch of each distinct input shape (what a jit warm-up needs)."""
    seen = {}
    for batch in batches:
        seen.setdefault(tuple(batch["input_ids"].shape), batch)
    return list(seen.values())


def _projection_ms(n_coords: int, config) -> float:
    """Median ms of one jitted `project` of a [chunk, P] block, as inside `compute_features`."""
    import jax
    import jax.numpy as jnp

    from jraise.grads.projection import project

    p = config.projection
    fn = jax.jit(lambda x, key: project(x, key, p.dim, p.kind, p.block_rows))
    x = jax.random.normal(jax.random.key(1), (config.chunk, n_coords), jnp.float32)
    fn(x, p.key()).block_until_ready()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn(x, p.key()).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _jraise_vectors(graphdef, trainable, frozen, pool, rows, moments, bucket: int):
    """[len(rows), P] Adam-preconditioned, flattened per-example gradients (no projection)."""
    import numpy as np

    from jraise.data.batching import make_batch
    from jraise.grads.per_example import adam_precondition, make_per_example_fn
    from jraise.grads.projection import flatten_tree

    fn = make_per_example_fn(graphdef, "sft", chunk=len(rows),
                             transform=lambda g, extra: flatten_tree(adam_precondition(g, *extra)))
    return np.asarray(fn(trainable, frozen, make_batch(pool, rows, bucket), moments))


def _exact_fn(graphdef, chunk: int, adam: bool):
    """Per-example unprojected gradients, [Adam-preconditioned,] flattened in jraise's tree order."""
    from jraise.grads.per_example import adam_precondition, make_per_example_fn
    from jraise.grads.projection import flatten_tree

    def transform(g, extra):
        return flatten_tree(adam_precondition(g, *extra) if adam else g)

    return make_per_example_fn(graphdef, "sft", chunk, transform=transform)


def _exact_groups(graphdef, trainable, frozen, pool, rows, config, moments):
    """Yields (pool indices, [n, P] unprojected per-example gradients) for the real rows of each of
    `compute_features`' groups ([Adam-preconditioned] when ``moments``)."""
    import numpy as np

    from jraise.data.batching import PAD_INDEX, length_buckets, make_batch
    from jraise.grads.features import grouped_indices

    fn = _exact_fn(graphdef, config.chunk, moments is not None)
    for bucket, index in grouped_indices(pool.lengths, rows, length_buckets(pool.lengths, config.n_buckets),
                                         config.group, config.chunk):
        batch = {k: v for k, v in make_batch(pool, index, bucket).items() if k != "index"}
        vecs = np.asarray(fn(trainable, frozen, batch, moments))
        real = index != PAD_INDEX
        yield index[real], vecs[real]


def _exact_vectors(graphdef, trainable, frozen, pool, rows, config, moments):
    """[len(rows), P] unprojected per-example gradients (the validation side: few rows)."""
    import numpy as np

    position = {int(r): k for k, r in enumerate(rows)}
    out = None
    for index, vecs in _exact_groups(graphdef, trainable, frozen, pool, rows, config, moments):
        if out is None:
            out = np.zeros((len(rows), vecs.shape[1]), np.float32)
        out[[position[int(i)] for i in index]] = vecs
    return out


def _exact_scores(graphdef, trainable, frozen, pool, rows, config, moments, val_vectors):
    """[len(rows)] LESS scores from the unprojected gradients, group by group (never [N, P])."""
    import numpy as np

    position = {int(r): k for k, r in enumerate(rows)}
    out = np.zeros(len(rows), np.float32)
    for index, vecs in _exact_groups(graphdef, trainable, frozen, pool, rows, config, moments):
        out[[position[int(i)] for i in index]] = _less_scores(vecs, val_vectors)
    return out


def _less_scores(train, val):
    """[N] LESS's score for one task at one checkpoint: the mean cosine of each train row with the
    val rows (`influence_scores`: one checkpoint of weight 1, one group)."""
    import numpy as np

    from jraise.select.influence import influence_scores

    return influence_scores([np.asarray(train, np.float32)], [np.asarray(val, np.float32)], [1.0])


def _agreement(a, b, fraction: float = 0.05) -> dict:
    """Pearson, Spearman and top-``fraction`` overlap of two score vectors."""
    import math

    import numpy as np
    from scipy import stats

    k = max(1, math.ceil(fraction * len(a)))
    top_a, top_b = set(np.argsort(-a, kind="stable")[:k]), set(np.argsort(-b, kind="stable")[:k])
    return {"pearson": round(float(stats.pearsonr(a, b)[0]), 4), "spearman": round(float(stats.spearmanr(a, b)[0]), 4),
            "top5_overlap": round(len(top_a & top_b) / k, 3), "top5_k": k}


# ----------------------------------------------------------------------------- PyTorch reference


def _reference_projector(n_coords: int, projection, interval: int, max_bytes: int):
    """(projector for `_torch_reference`, description, matrix bytes, seconds to build it).

    The [P, d] float32 matrix when it fits in ``max_bytes``: generated once by `dense_matrix`
    (outside the timing) and applied by one torch matmul per interval. Otherwise every interval is
    projected by jraise's `project`, which regenerates the blocks per call (as TRAK's CPU
    ``BasicProjector`` does); a short last interval is zero-padded to ``interval`` rows, so one
    compiled shape serves every call."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    from jraise.grads.projection import dense_matrix, project

    p = projection
    size = n_coords * p.dim * 4
    t0 = time.perf_counter()
    if size <= max_bytes:
        matrix = torch.from_numpy(np.array(dense_matrix(p.key(), n_coords, p.dim, p.kind, p.block_rows)))
        return (lambda g: g @ matrix), "kept [P, d] matrix (torch matmul)", size, time.perf_counter() - t0
    key = p.key()

    def projector(g):
        n = g.shape[0]
        x = np.zeros((interval, g.shape[1]), np.float32)
        x[:n] = g.numpy()
        return torch.from_numpy(np.array(project(jnp.asarray(x), key, p.dim, p.kind, p.block_rows))[:n])

    return projector, "regenerated per interval (jraise project)", 0, 0.0


def _torch_reference(model_dir, trainable, moments, pool, rows, projector, lora_scale: float, interval: int):
    """(run() -> [N, d] features, vectors(rows) -> [n, P] preconditioned gradients, first loss).

    ``projector``: [n <= interval, P] float32 torch -> [n, d] torch, jraise's dense projection (a
    kept matrix or jraise's `project`, see `_reference_projector`), so the features must agree.
    """
    import jax
    import numpy as np
    import torch
    import transformers

    class LoRALinear(torch.nn.Module):
        """y = base(x) + x @ A @ B * scale (A [in, r], B [r, out]: jraise's layout)."""

        def __init__(self, base, a, b, scale):
            super().__init__()
            self.base = base
            self.lora_a = torch.nn.Parameter(torch.tensor(np.asarray(a), dtype=torch.float32))
            self.lora_b = torch.nn.Parameter(torch.tensor(np.asarray(b), dtype=torch.float32))
            self.scale = scale

        def forward(self, x):
            return self.base(x) + (x @ self.lora_a @ self.lora_b) * self.scale

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()  # no dropout (none configured anyway), as LESS's gradient collection
    for p in model.parameters():
        p.requires_grad_(False)

    # One parameter per jraise trainable leaf, in jraise's flattening order (jax.tree_util order),
    # so the concatenated gradient lines up with the rows of jraise's projection matrix.
    params = []
    for path, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]:
        names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        holder = model.model
        for name in names[:-2]:
            holder = holder[int(name)] if name.isdigit() else getattr(holder, name)
        proj_name, leaf = names[-2], names[-1]
        lora = getattr(holder, proj_name)
        if not isinstance(lora, LoRALinear):
            node = trainable
            for name in names[:-1]:
                node = node[int(name)] if name.isdigit() and int(name) in node else node[name]
            lora = LoRALinear(lora, node["lora_a"], node["lora_b"], lora_scale)
            setattr(holder, proj_name, lora)
        params.append(getattr(lora, leaf))

    def flat(tree):
        return torch.from_numpy(np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(tree)]))

    m, v = flat(moments[0]), flat(moments[1])
    if m.numel() != sum(p.numel() for p in params):
        raise RuntimeError(f"parameter counts differ: moments {m.numel()}, torch LoRA "
                           f"{sum(p.numel() for p in params)}")
    inputs = []
    for i in rows:
        ids = torch.from_numpy(np.asarray(pool.tokens[i], np.int64))[None]
        labels = torch.where(torch.from_numpy(np.asarray(pool.loss_masks[i]))[None] > 0, ids, -100)
        inputs.append((ids, labels))

    def vector(k: int) -> tuple:
        ids, labels = inputs[k]
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in params])
        for p in params:
            p.grad = None
        g = (ADAM_B1 * m + (1 - ADAM_B1) * g) / torch.sqrt(ADAM_B2 * v + (1 - ADAM_B2) * g * g + ADAM_EPS)
        return g, float(loss.detach())

    def run(warm: bool = False):
        out, pending = [], []
        n = min(interval, len(inputs)) if warm else len(inputs)
        for k in range(n):
            pending.append(vector(k)[0])
            if len(pending) == interval or k == n - 1:
                out.append(projector(torch.stack(pending)))
                pending = []
        return torch.cat(out).numpy()

    def vectors(ks):
        return np.stack([vector(k)[0].numpy() for k in ks])

    return run, vectors, vector(0)[1]


# ----------------------------------------------------------------------------- scoring memory


def _write_store(store_dir: Path, n: int, dim: int) -> float:
    """Writes an n x dim store of random unit rows (float16), shard by shard; returns seconds."""
    import numpy as np

    from jraise.data.feature_store import FeatureStore

    start = time.perf_counter()
    store = FeatureStore.create_or_open(store_dir, n=n, dim=dim, identity={"benchmark": "grad_features"})

    def random_rows(lo: int, hi: int):
        return np.random.default_rng(lo).standard_normal((hi - lo, dim), dtype=np.float32)

    store.fill(random_rows, progress=False)
    return time.perf_counter() - start


def _proc_status() -> dict:
    """kB fields of /proc/self/status that matter here, as bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _score_child(store_dir: str) -> None:
    """Runs in a fresh process: scores the store with `influence_scores`; prints a JSON line."""
    import numpy as np

    from jraise.data.feature_store import FeatureStore
    from jraise.select.influence import influence_scores

    matrix = FeatureStore.open(store_dir).matrix()
    rng = np.random.default_rng(1)
    vals = [rng.standard_normal((SCORE_VAL, matrix.dim), dtype=np.float32) for _ in range(SCORE_CHECKPOINTS)]
    groups = [f"task{i % SCORE_GROUPS}" for i in range(SCORE_VAL)]
    weights = [1.0 / SCORE_CHECKPOINTS] * SCORE_CHECKPOINTS
    before = _proc_status()
    try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm_reset = _proc_status()["VmHWM"] <= before["VmRSS"] + (1 << 20)
    except OSError:
        hwm_reset = False
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            status = _proc_status()
            for key, peak in peaks.items():
                peaks[key] = max(peak, status.get(key, 0))
            done.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    scores = influence_scores([matrix] * SCORE_CHECKPOINTS, vals, weights, groups)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    after = _proc_status()
    print(json.dumps({
        "rows": matrix.n, "dim": matrix.dim, "checkpoints": SCORE_CHECKPOINTS, "val_examples": SCORE_VAL,
        "val_groups": SCORE_GROUPS, "scores_shape": list(scores.shape), "scoring_s": round(seconds, 2),
        "rows_per_s": round(matrix.n / seconds, 1), "vm_hwm_reset": hwm_reset,
        "rss_before": before["VmRSS"], "anon_before": before.get("RssAnon"),
        "peak_vm_hwm": after["VmHWM"], "peak_rss_anon_sampled": peaks["RssAnon"],
        "peak_rss_file_sampled": peaks["RssFile"], "peak_vm_rss_sampled": peaks["VmRSS"],
    }))


def _scoring_memory(work: str | None, rows: int, dim: int) -> dict:
    parent = Path(work) if work else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="grad_features-", dir=parent))  # ours alone, removed below
    try:
        store_dir = root / "store"
        write_s = _write_store(store_dir, rows, dim)
        size = sum(p.stat().st_size for p in store_dir.iterdir())
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                              os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, __file__, "--score-store", str(store_dir)], capture_output=True,
                              text=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"scoring subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        child = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {**child, "store_bytes": size, "store_write_s": round(write_s, 1)}


# ----------------------------------------------------------------------------- one setting


def _mode_configs(args, chunk: int):
    """(the dense FeatureConfig, {mode label: FeatureConfig} for ``--modes``) at ``chunk``."""
    from jraise.grads.features import FeatureConfig
    from jraise.grads.projection import ProjectionConfig

    dense = FeatureConfig(projection=ProjectionConfig(dim=args.proj_dim, seed=args.seed), chunk=chunk,
                          group=args.group, n_buckets=args.n_buckets)
    modes = {}
    for mode in args.modes:
        if mode == "dense":
            modes["dense"] = dense
        elif mode == "factored":
            modes["factored"] = dataclasses.replace(dense, projection=dataclasses.replace(
                dense.projection, mode="factored", dim=args.factored_dim or args.proj_dim))
        else:
            for s in args.sjlt_nnz:
                modes[f"sjlt_s{s}"] = dataclasses.replace(dense, projection=dataclasses.replace(
                    dense.projection, mode="sjlt", sjlt_nnz=s))
    return dense, modes


def _agreement_figures(graphdef, trainable, frozen, pool, rows, val_pool, val_rows, dense, modes, moments,
                       last, n_seeds: int = 1) -> dict:
    """LESS-style scores of the same pool rows from the exact gradients, from every mode's features
    (a timed mode's last-round features) and from the dense mode of seed + 1; their agreement."""
    from jraise.grads.features import compute_features

    other = dataclasses.replace(dense, projection=dataclasses.replace(dense.projection, seed=dense.projection.seed + 1))
    val_exact = _exact_vectors(graphdef, trainable, frozen, val_pool, val_rows, dense, None)
    scores = {"exact": _exact_scores(graphdef, trainable, frozen, pool, rows, dense, moments, val_exact)}
    exact_dim = int(val_exact.shape[1])
    del val_exact
    configs = {"dense": dense, **modes, "dense_other_seed": other}
    for label, config in configs.items():
        train = last[label] if label in last else compute_features(graphdef, trainable, frozen, pool, rows, config,
                                                                   "sft", moments=moments)
        val = compute_features(graphdef, trainable, frozen, val_pool, val_rows, config, "sft")
        scores[label] = _less_scores(train, val)
    pairs = [("exact", label) for label in configs] + [("dense", label) for label in configs if label != "dense"]
    out = {f"{a}_vs_{b}": _agreement(scores[a], scores[b]) for a, b in pairs}
    if n_seeds > 1:
        out["over_seeds"] = _agreement_over_seeds(graphdef, trainable, frozen, pool, rows, val_pool, val_rows,
                                                  {"dense": dense, **modes}, moments, scores, n_seeds)
    return {"val_examples": len(val_rows), "exact_dim": exact_dim, **out}


def _agreement_over_seeds(graphdef, trainable, frozen, pool, rows, val_pool, val_rows, configs, moments, scores,
                          n_seeds: int) -> dict:
    """``--agreement-seeds``: every mode's agreement with the exact scores at projection seeds
    seed .. seed + n - 1, and dense seed k against dense seed k + 1 for the same k (n pairs), as
    {label: {"pearson": [...], "spearman": [...], "top5_overlap": [...], "mean": {...}}}. One
    pool of 32 examples and 8 validation examples gives a noisy agreement figure; these spread it."""
    import numpy as np

    from jraise.grads.features import compute_features

    def at_seed(config, seed):
        config = dataclasses.replace(config, projection=dataclasses.replace(config.projection, seed=seed))
        train = compute_features(graphdef, trainable, frozen, pool, rows, config, "sft", moments=moments)
        return _less_scores(train, compute_features(graphdef, trainable, frozen, val_pool, val_rows, config, "sft"))

    base = configs["dense"].projection.seed
    runs: dict[str, list[dict]] = {label: [] for label in configs}
    runs["dense_two_seeds"] = []
    dense_scores = {base: scores["dense"], base + 1: scores["dense_other_seed"]}
    for k in range(n_seeds):
        for label, config in configs.items():
            got = scores[label] if k == 0 else at_seed(config, base + k)
            if label == "dense":
                dense_scores[base + k] = got
            runs[label].append(_agreement(scores["exact"], got))
        if base + k + 1 not in dense_scores:
            dense_scores[base + k + 1] = at_seed(configs["dense"], base + k + 1)
        runs["dense_two_seeds"].append(_agreement(dense_scores[base + k], dense_scores[base + k + 1]))
    out = {}
    for label, items in runs.items():
        fields = {f: [a[f] for a in items] for f in ("pearson", "spearman", "top5_overlap")}
        out[label] = {**fields, "mean": {f: round(float(np.mean(v)), 4) for f, v in fields.items()},
                      "min": {f: round(float(np.min(v)), 4) for f, v in fields.items()}}
    return out


def _measure(name: str, model_dir, pool, val_pool, rank: int, args) -> tuple[dict, dict]:
    """(flat figures keyed ``<name>/r<rank>_d<d>/...``, details) of one model at one LoRA rank."""
    import jax
    import numpy as np

    from jraise.grads.projection import factored_plan, tree_size

    chunk = args.chunk
    dense, modes = _mode_configs(args, chunk)
    rows = np.arange(len(pool))
    model, graphdef, trainable, frozen, moments = _jraise_setup(model_dir, rank, args.lora_alpha, args.seed)
    n_lora = tree_size(trainable)
    detail: dict = {"lora_rank": rank, "lora_alpha": args.lora_alpha, "lora_targets": "q,k,v,o", "lora_params": n_lora,
                    "chunk": chunk,
                    "examples": len(rows), "real_tokens": int(pool.lengths.sum()),
                    "projections": {label: c.projection.to_dict() for label, c in modes.items()}}
    sides = {label: _features_side(graphdef, trainable, frozen, pool, rows, c, moments) for label, c in modes.items()}
    if "factored" in modes:
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
        split = factored_plan(shapes, modes["factored"].projection.dim)
        detail["factored_split"] = [list(dims) for _, _, dims in split]
    train_run, n_train_real, group_shape = _train_side(model, graphdef, pool, rows, dense, args.lr)
    detail.update(group_shape)  # every jraise side processes these groups, padding rows included
    detail["real_row_fraction"] = round(len(rows) / group_shape["group_rows"], 3)
    sides["training"] = train_run
    if args.breakdown:
        sides["grads_no_projection"] = _grads_side(graphdef, trainable, frozen, pool, rows, dense, moments)
        detail["projection_ms_per_chunk"] = round(_projection_ms(n_lora, dense), 1)
    if not args.skip_torch:
        import torch

        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        detail["torch_threads"] = torch.get_num_threads()
        projector, how, nbytes, seconds = _reference_projector(n_lora, dense.projection, args.ref_project_interval,
                                                               args.ref_matrix_max_bytes)
        detail.update(reference_projection=how, reference_matrix_bytes=nbytes, reference_matrix_s=round(seconds, 2))
        ref_run, ref_vectors, first_loss = _torch_reference(model_dir, trainable, moments, pool, rows, projector,
                                                            args.lora_alpha / rank, args.ref_project_interval)
        sides["less_reference"] = ref_run
        detail["reference_first_loss"] = round(first_loss, 6)
        # Before projection: the Adam-preconditioned gradient vectors of two examples.
        check = rows[:2]
        bucket = int(-(-int(pool.lengths[check].max()) // 16) * 16)
        jv = _jraise_vectors(graphdef, trainable, frozen, pool, check, moments, bucket)
        detail["max_rel_diff_vectors"] = float(f"{_rel(ref_vectors(range(len(check))), jv):.3g}")
        del jv

    # Warm-up: jit compiles every group shape (one example per length bucket), torch allocates.
    for label, run in sides.items():
        t0 = time.perf_counter()
        run(warm=True)
        detail[f"warmup_s/{label}"] = round(time.perf_counter() - t0, 2)
    n_real = {label: len(rows) for label in sides}
    n_real["training"] = n_train_real
    rates: dict[str, list[float]] = {label: [] for label in sides}
    last: dict = {}
    names = list(sides)
    passes: dict[str, list[int]] = {label: [] for label in sides}
    for r in range(args.rounds):
        for label in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            t0, count = time.perf_counter(), 0
            while count == 0 or time.perf_counter() - t0 < args.min_round_s:  # whole passes only
                last[label] = sides[label]()
                count += 1
            rates[label].append(count * n_real[label] / (time.perf_counter() - t0))
            passes[label].append(count)
    if "less_reference" in sides and "dense" in last:  # same features: every example of the last round
        ref, ours = last["less_reference"], last["dense"]
        detail["max_rel_diff_features"] = float(f"{_rel(ref, ours):.3g}")
        detail["min_cosine_features"] = round(float(np.min(
            np.sum(ref * ours, 1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(ours, axis=1))), 6)
    median = {label: statistics.median(v) for label, v in rates.items()}
    detail["rounds_examples_per_s"] = {label: [round(x, 2) for x in v] for label, v in rates.items()}
    detail["rounds_passes"] = passes
    t0 = time.perf_counter()
    val_rows = np.arange(min(args.n_val, len(val_pool)))
    agreement = _agreement_figures(graphdef, trainable, frozen, pool, rows, val_pool, val_rows, dense, modes, moments,
                                   last, args.agreement_seeds)
    detail["agreement_s"] = round(time.perf_counter() - t0, 1)
    detail["agreement"] = agreement

    prefix = f"{name}/r{rank}_d{args.proj_dim}"
    flat: dict = {}
    for label in modes:
        flat[f"{prefix}/{label}/examples_per_s"] = round(median[label], 3)
        flat[f"{prefix}/{label}/vs_training"] = round(median[label] / median["training"], 4)
        if "less_reference" in median:
            flat[f"{prefix}/{label}/vs_reference"] = round(median[label] / median["less_reference"], 4)
    for label in ("training", "less_reference", "grads_no_projection"):
        if label in median:
            flat[f"{prefix}/{label}/examples_per_s"] = round(median[label], 3)
    for label in modes:
        a = agreement[f"exact_vs_{label}"]
        for key, field in (("pearson", "pearson"), ("spearman", "spearman"), ("top5", "top5_overlap")):
            flat[f"{prefix}/{label}/agreement/{key}"] = a[field]
    a = agreement["dense_vs_dense_other_seed"]
    for key, field in (("pearson", "pearson"), ("spearman", "spearman"), ("top5", "top5_overlap")):
        flat[f"{prefix}/dense_two_seeds/agreement/{key}"] = a[field]
    for label, runs in agreement.get("over_seeds", {}).items():
        for key, field in (("pearson", "pearson"), ("spearman", "spearman"), ("top5", "top5_overlap")):
            flat[f"{prefix}/{label}/agreement_mean_over_seeds/{key}"] = runs["mean"][field]
    return flat, detail


def _print_setting(prefix: str, flat: dict, detail: dict, modes) -> None:
    ref = flat.get(f"{prefix}/less_reference/examples_per_s")
    after = detail.get("max_rel_diff_features", float("nan"))
    ref_text = (f", LESS-style torch {ref:.1f} ex/s ({detail['reference_projection']}; max relative difference "
                f"{detail['max_rel_diff_vectors']:.2g} before projection, {after:.2g} after)"
                ) if ref else ", no torch reference"
    print(f"\n[{prefix}] LoRA r={detail['lora_rank']} (P = {detail['lora_params']:,}), {detail['examples']} "
          f"examples in {detail['groups']} groups (real fraction {detail['real_row_fraction']}); training "
          f"{flat[f'{prefix}/training/examples_per_s']:.1f} ex/s{ref_text}")
    k = detail["agreement"]["exact_vs_dense"]["top5_k"]
    print(f"    {'mode':16s} {'ex/s':>9s} {'vs_training':>12s} {'vs_reference':>13s}   agreement with exact scores "
          f"(Pearson / Spearman / top-5% overlap, k={k}, {detail['agreement']['val_examples']} val)")
    for label in modes:
        p = f"{prefix}/{label}"
        vs_ref = flat.get(f"{p}/vs_reference")
        print(f"    {label:16s} {flat[f'{p}/examples_per_s']:9.1f} {flat[f'{p}/vs_training']:11.3f}x "
              f"{(f'{vs_ref:12.3f}x' if vs_ref is not None else '           -')}   "
              f"{flat[f'{p}/agreement/pearson']:.4f} / {flat[f'{p}/agreement/spearman']:.4f} / "
              f"{flat[f'{p}/agreement/top5']:.3f}")
    p = f"{prefix}/dense_two_seeds/agreement"
    print(f"    {'two dense seeds':16s} {'':9s} {'':12s} {'':13s}   {flat[f'{p}/pearson']:.4f} / "
          f"{flat[f'{p}/spearman']:.4f} / {flat[f'{p}/top5']:.3f} (dense vs dense seed+1)")
    seeds = detail["agreement"].get("over_seeds")
    if seeds:
        n = len(seeds["dense_two_seeds"]["pearson"])
        print(f"    over {n} projection seeds, mean (min) Pearson / Spearman:")
        for label, runs in seeds.items():
            m, lo = runs["mean"], runs["min"]
            print(f"    {label:16s} {m['pearson']:.4f} ({lo['pearson']:.4f}) / {m['spearman']:.4f} ({lo['spearman']:.4f})")


# ----------------------------------------------------------------------------- main


def _rel(a, b) -> float:
    """Largest per-row relative L2 difference ||a_i - b_i|| / ||b_i||."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-30)))


def _gb(n) -> str:
    return f"{n / 1024**3:.2f} GiB"


def _per_model(parser, option: str, text: str, models: list[str]) -> dict[str, int]:
    """A `PER_MODEL` option: one positive number for every model, or ``model=number`` pairs
    (comma-separated) naming every model of ``--models``."""
    flag = "--" + option.replace("_", "-")
    try:
        if "=" not in text:
            values = {m: int(text) for m in models}
        else:
            values = {k.strip(): int(v) for k, v in (part.split("=", 1) for part in text.split(",") if part.strip())}
    except ValueError:
        parser.error(f"{flag}: a positive number or model=number pairs, got {text!r}")
    missing = [m for m in models if m not in values]
    if missing or any(v < 1 for v in values.values()):
        parser.error(f"{flag}: needs a positive number for every model ({', '.join(missing) or 'got <= 0'})")
    return values


def _for_model(args, name: str):
    """``args`` with each `PER_MODEL` option at model ``name``'s value."""
    return argparse.Namespace(**{**vars(args), **{option: getattr(args, option)[name] for option in PER_MODEL}})


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def _model_source(name: str, args, tmp: str, testbed_tokenizer) -> tuple[Path, object, dict]:
    """(model directory both sides load, its tokenizer, facts): a preset initialised here and saved
    without adapters, or SmolLM2-135M-Instruct from the cache."""
    from jraise.model import init_model, load_tokenizer, parameter_count, preset_config, save_model

    if name == SMOLLM2:
        from jraise.fetch import fetch_smollm2

        model_dir = fetch_smollm2(args.cache)
        return model_dir, load_tokenizer(model_dir), {"source": str(model_dir)}
    tok = testbed_tokenizer
    config = preset_config(name, vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    base = init_model(config, seed=args.seed)
    facts = {"source": f"preset {name!r}, init seed {args.seed}", "base_params": parameter_count(base)}
    model_dir = Path(tmp) / f"model-{name}"
    save_model(base, config, model_dir)  # no adapters yet: both sides add the same ones
    return model_dir, tok, facts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"a few minutes on a CPU: {', '.join(f'{k}={v}' for k, v in QUICK.items())}")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated: jraise presets (tiny, small, base) and/or {SMOLLM2} "
                             f"(default {FULL['models']})")
    parser.add_argument("--ranks", default=None,
                        help=f"LoRA ranks on q,k,v,o, comma-separated (default {FULL['ranks']})")
    parser.add_argument("--modes", default="dense,factored,sjlt", help="projection modes, comma-separated")
    parser.add_argument("--sjlt-nnz", default="1", help="s of the sjlt mode, comma-separated: one side per s")
    parser.add_argument("--n-examples", default=None,
                        help=f"examples timed (the first of one testbed pool; default {FULL['n_examples']})")
    parser.add_argument("--n-val", type=int, default=None, help="validation examples of the agreement scores")
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--proj-dim", type=int, default=8192, help="d of the dense and sjlt modes")
    parser.add_argument("--factored-dim", type=int, default=None, help="d of the factored mode (default --proj-dim)")
    parser.add_argument("--chunk", default="8", help="FeatureConfig.chunk")
    parser.add_argument("--agreement-seeds", type=int, default=1,
                        help="also the agreement at this many projection seeds (mean and min; dense vs dense: "
                             "seed k vs k + 1)")
    parser.add_argument("--min-round-s", type=float, default=2.0,
                        help="a timed round repeats whole passes over the examples until it has run this long")
    parser.add_argument("--group", default=None,
                        help=f"FeatureConfig.group (= training batch; default {FULL['group']})")
    parser.add_argument("--n-buckets", default="4")
    parser.add_argument("--rounds", default=None, help=f"timed rounds (default {FULL['rounds']})")
    parser.add_argument("--lr", type=float, default=1e-4, help="training side")
    parser.add_argument("--ref-project-interval", type=int, default=16,
                        help="reference: gradients projected per product (LESS: 16)")
    parser.add_argument("--ref-matrix-max-bytes", type=int, default=2 * 1024**3,
                        help="reference: keep the [P, d] matrix up to this size, else regenerate per interval")
    parser.add_argument("--torch-threads", type=int, default=1, help="0: torch's default (see above)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time jraise without the projection, and one dense projection call")
    parser.add_argument("--skip-torch", action="store_true", help="no PyTorch reference")
    parser.add_argument("--skip-memory", action="store_true", help="no scoring-memory figure")
    parser.add_argument("--score-rows", type=int, default=None,
                        help=f"scoring figure rows (default {FULL['score_rows']:,})")
    parser.add_argument("--score-dim", type=int, default=1024)
    parser.add_argument("--work", default=None, help="where the scoring store is written (default: a temp dir)")
    parser.add_argument("--cache", default=None,
                        help="jraise cache holding SmolLM2 (default $JRAISE_CACHE or ~/.cache/jraise)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help=f"the JSON result (default {FULL['out']}; --quick: {QUICK['out']})")
    parser.add_argument("--score-store", default=None, help=argparse.SUPPRESS)  # the scoring subprocess
    args = parser.parse_args(argv)
    if args.score_store:
        _score_child(args.score_store)
        return None
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.ranks = _ints(args.ranks)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.sjlt_nnz = _ints(args.sjlt_nnz)
    unknown = set(args.modes) - {"dense", "factored", "sjlt"}
    if unknown or not args.modes:
        parser.error(f"--modes: choose from dense, factored, sjlt (got {args.modes})")
    for option in PER_MODEL:  # a number, or model=number pairs
        setattr(args, option, _per_model(parser, option, str(getattr(args, option)), args.models))
    for name in args.models:
        margs = _for_model(args, name)
        _mode_configs(margs, margs.chunk)  # bad d / s / chunk / group combinations fail here, before any work

    import jax

    from jraise.data.pool import load_pool
    from jraise.model import load_tokenizer
    from jraise.testbed import write_testbed

    out_path = Path(args.out)
    result: dict = {
        "config": {"models": args.models, "ranks": args.ranks, "modes": args.modes, "sjlt_nnz": args.sjlt_nnz,
                   "examples": args.n_examples, "n_val": args.n_val, "max_len": args.max_len,
                   "proj_dim": args.proj_dim, "factored_dim": args.factored_dim or args.proj_dim,
                   "lora_alpha": args.lora_alpha, "lora_targets": "q,k,v,o", "chunk": args.chunk,
                   "min_round_s": args.min_round_s,
                   "group": args.group, "n_buckets": args.n_buckets, "rounds": args.rounds, "seed": args.seed,
                   "ref_project_interval": args.ref_project_interval, "quick": args.quick,
                   "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")},
        "goals": GOALS, "models": {}, "details": {}}

    def write():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")

    _, modes = _mode_configs(_for_model(args, args.models[0]), 1)  # (the labels only)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            margs = _for_model(args, name)  # a pool of this model's --n-examples
            paths = write_testbed(f"{tmp}/testbed-{name}", n_train=margs.n_examples, n_test_per_category=1,
                                  seed=args.seed)
            model_dir, tok, facts = _model_source(name, args, tmp, load_tokenizer(paths["tokenizer"]))
            pool = load_pool(paths["pool"], tok, max_len=args.max_len)
            val_pool = load_pool(paths["val"], tok, max_len=args.max_len)
            result["models"][name] = {**facts, "examples": len(pool), "real_tokens": int(pool.lengths.sum()),
                                      "mean_tokens": round(float(pool.lengths.mean()), 1)}
            for rank in args.ranks:
                t0 = time.perf_counter()
                flat, detail = _measure(name, model_dir, pool, val_pool, rank, margs)
                detail["setting_s"] = round(time.perf_counter() - t0, 1)
                prefix = f"{name}/r{rank}_d{args.proj_dim}"
                result.update(flat)
                result["details"][prefix] = detail
                write()  # a long run keeps what it has measured so far
                _print_setting(prefix, flat, detail, modes)
                print(f"    ({detail['setting_s']:.0f} s)", flush=True)
                gc.collect()

    if not args.skip_memory:
        result["scoring"] = s = _scoring_memory(args.work, args.score_rows, args.score_dim)
        print(f"\n[scoring] {s['rows']:,} x {s['dim']} ({_gb(s['store_bytes'])} float16, {s['checkpoints']} "
              f"checkpoints, {s['val_examples']} val in {s['val_groups']} groups) in {s['scoring_s']:.1f} s: "
              f"peak RSS (VmHWM) {_gb(s['peak_vm_hwm'])}, sampled peak anonymous {_gb(s['peak_rss_anon_sampled'])}"
              f", file-backed {_gb(s['peak_rss_file_sampled'])}, before scoring {_gb(s['rss_before'])} "
              "(goal < 2 GiB)")
    result["total_s"] = round(time.perf_counter() - start, 1)
    write()
    print(f"\ntotal {result['total_s']:.0f} s; wrote {out_path.resolve()}")
    return result


if __name__ == "__main__":
    main()
