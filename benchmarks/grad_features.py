"""LESS gradient features: jraise vs a LESS-style PyTorch loop, vs training, and scoring memory.

Three figures, each measured in this one run (absolute numbers drift on a shared machine; compare
the ratios):

1. **Train-side feature extraction, jraise vs a LESS-style PyTorch reference (examples/s).**
   Both sides hold the same model: a jraise preset saved with `save_model` (no adapters), loaded
   back by jraise and by `transformers.AutoModelForCausalLM`. Both attach the same LoRA adapters
   (rank r on q, k, v, o; alpha 16): jraise with `add_lora`; torch, since ``peft`` is not installed
   here, by wrapping each q/k/v/o ``nn.Linear`` in a module adding ``x @ A @ B * alpha / r``, with
   A and B copied from the jraise model. B is set to small random values (as after warm-up
   training) rather than PEFT's zeros, which would make every gradient of A exactly zero. The Adam
   moments (mu, nu) are fixed random values shared by both sides.

   The reference does what LESS's ``collect_grad_reps.py`` does: one example at a time (batch 1,
   unpadded), forward, loss = mean cross-entropy over the response tokens (transformers' own
   ``labels`` loss, -100 elsewhere), backward, concatenate the LoRA gradients, Adam-precondition
   them without bias correction (``(b1 m + (1 - b1) g) / sqrt(b2 v + (1 - b2) g^2 + eps)``, as
   `adam_precondition`), and project by a dense Rademacher matrix to d dims. Like LESS, the
   gradients are projected ``--ref-project-interval`` (LESS: 16) at a time as one [16, P] x [P, d]
   matmul. The matrix is generated once, outside the timing, and kept (an optimistic reference:
   TRAK's CPU ``BasicProjector`` with LESS's block size 128 regenerates its [P, 128] blocks on
   every call), and it is jraise's own matrix, ``dense_matrix(config.projection.key(), P, d)``,
   so both sides must give the same features. The run checks this twice: the Adam-preconditioned
   gradient vectors before projection (first two examples) and the projected features of every
   example (last timed round); the JSON reports the largest per-example relative L2 difference of
   each (float32 summation order only: measured below 1e-6, 1e-3 would still be a match). LESS projects float16 gradients on a GPU; on this CPU both
   sides stay float32.

   jraise runs `compute_features` (SFT loss, with moments), as `jraise.jobs.influence.feature_store`
   does shard by shard: the jitted per-group program is cached across calls (inside jraise), and every
   length bucket is compiled during the warm-up. Its time includes building the padded groups on
   the host and copying the features back.

1b. **Factored projection mode (LoGra-style Kronecker blocks per LoRA matrix), same run.** A
   fourth side, ``features_factored``, runs `compute_features` with ``ProjectionConfig.mode =
   "factored"`` on the same groups, timed in the same rotating rounds: its examples/s next to the
   dense mode's and the torch reference's, as ratios. Then, outside the timing, agreement on the
   same examples. LESS-style scores: the mean cosine of each pool example's (Adam-preconditioned)
   feature with ``--n-val`` validation features (plain SFT gradients of the testbed's validation
   examples, projected in the same mode). Scores are computed four ways: from the exact,
   unprojected gradients (P coordinates), from dense features, from factored features, and from
   dense features of another seed (``--seed + 1``: how much two dense projections disagree
   anyway, the yardstick for the factored one). For each pair the JSON reports the Pearson and
   Spearman correlations of the scores and the overlap of the top 5% selected by each
   (|A & B| / k, k = ceil(0.05 N)). ``--factored-dim`` gives the factored side its own d (its cost
   grows with d far more slowly than the dense mode's). ``--skip-factored`` leaves 1b out.

2. **jraise feature extraction vs a plain jitted training step (examples/s).** The same LoRA model
   trains with `make_train_step` + `make_optimizer` (AdamW, constant lr, clipping at 1.0) on exactly
   the groups `compute_features` builds (`grouped_indices`: one length bucket per group, padding
   rows included, batch = ``FeatureConfig.group`` rows, one update per group). Both count real
   examples only. The ratio features / training says what per-example gradients, Adam
   preconditioning and the projection cost on top of one batched forward/backward.

3. **Peak memory of scoring N x D features (default 1,000,000 x 1024)** with `influence_scores`
   reading a memory-mapped `FeatureStore`. The store is written shard by shard (random unit rows,
   float16: 2 GB at the default size) under ``--work`` and deleted at the end. Four checkpoints share
   the one store (``[m, m, m, m]``: same reads, a quarter of the disk); validation is 64 examples
   in 8 groups per checkpoint. The scoring runs in a fresh Python process (numpy and jraise's
   store/selection modules only, no jax or torch) that reports, from ``/proc/self/status``:
   ``VmHWM`` (peak resident set: anonymous memory plus touched pages of mapped files; reset through
   ``/proc/self/clear_refs`` just before scoring when the kernel allows, so import-time peaks do
   not count), the resident set before scoring, and the largest ``RssAnon`` / ``RssFile`` seen by a
   thread sampling every 2 ms while it scores (a lower bound on the true peaks). ``RssAnon`` is the
   process's own memory (float32 blocks, results); ``RssFile`` is shared page cache mapped in at
   the moment, which the kernel can drop at any time. `ShardedMatrix` maps one shard at a time and
   unmaps it after copying, so mapped pages do not accumulate. Goal: peak < 2 GB.

Timing: every side is warmed up first (one example per length bucket, so jit compiles every group
shape; torch allocates), then the sides run ``--rounds`` rounds over the same examples, the order
rotating from round to round; a figure is the median round. ``--breakdown`` adds a side that runs
`compute_features`' per-example program without the projection (gradients, Adam, flatten) on the
same groups, and times one `project` call on a [chunk, P] block, to show where the time goes.

Group padding: `compute_features` pads the last group of every length bucket to ``group`` rows and
computes those padding rows like real ones, so a small pool (the 256 default) wastes about a third
of the jraise work (``real_row_fraction`` in the JSON); a 4096-row store shard wastes a few percent.
Both jraise sides process exactly the same groups; all rates count real examples only.

PyTorch runs single-threaded by default (``--torch-threads 0`` gives torch's own default), as in
``trainer_throughput.py``: on a shared 2-core machine its OpenMP workers spin-wait against other
processes and a 2-thread torch step measured up to 10x slower than a 1-thread one there, which
would flatter jraise. jraise (XLA) uses its own thread pool over all cores.

    python benchmarks/grad_features.py                       # defaults: small, 256 examples, d 8192
    # about 10 minutes on the shared 2-core CPU, mostly jraise's feature extraction and the 2 GB store
    python benchmarks/grad_features.py --n-examples 64 --rounds 2 --score-rows 100000   # quick
    python benchmarks/grad_features.py --skip-torch --skip-memory --out /tmp/gf.json
"""

from __future__ import annotations

import argparse
import dataclasses
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
    for bucket, index in grouped_indices(pool.lengths, rows, buckets, config.group):
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
               grouped_indices(pool.lengths, rows, buckets, config.group)]

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


def _exact_vectors(graphdef, trainable, frozen, pool, rows, config, moments):
    """[len(rows), P] unprojected per-example gradients ([Adam-preconditioned] when ``moments``),
    flattened in jraise's tree order, computed on `compute_features`' groups (figure 1b)."""
    import numpy as np

    from jraise.data.batching import PAD_INDEX, length_buckets, make_batch
    from jraise.grads.features import grouped_indices
    from jraise.grads.per_example import adam_precondition, make_per_example_fn
    from jraise.grads.projection import flatten_tree

    def transform(g, extra):
        return flatten_tree(adam_precondition(g, *extra) if extra is not None else g)

    fn = make_per_example_fn(graphdef, "sft", config.chunk, transform=transform)
    position = {int(r): k for k, r in enumerate(rows)}
    out = None
    for bucket, index in grouped_indices(pool.lengths, rows, length_buckets(pool.lengths, config.n_buckets),
                                         config.group):
        batch = {k: v for k, v in make_batch(pool, index, bucket).items() if k != "index"}
        vecs = np.asarray(fn(trainable, frozen, batch, moments))
        if out is None:
            out = np.zeros((len(rows), vecs.shape[1]), np.float32)
        real = index != PAD_INDEX
        out[[position[int(i)] for i in index[real]]] = vecs[real]
    return out


def _less_scores(train, val):
    """[N] mean cosine of each train row with the val rows (LESS's score for one task)."""
    import numpy as np

    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)

    return (unit(train) @ unit(val).T).mean(axis=1)


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


def _torch_reference(model_dir, trainable, moments, pool, rows, matrix, lora_scale: float, interval: int):
    """(run() -> [N, d] features, vectors(rows) -> [n, P] preconditioned gradients, first loss).

    ``matrix``: the [P, d] float32 numpy projection (jraise's, so the features must agree).
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
    if m.numel() != sum(p.numel() for p in params) or m.numel() != matrix.shape[0]:
        raise RuntimeError(f"parameter counts differ: moments {m.numel()}, torch LoRA "
                           f"{sum(p.numel() for p in params)}, projection rows {matrix.shape[0]}")
    proj = torch.from_numpy(matrix)
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
                out.append(torch.stack(pending) @ proj)
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


def _factored_agreement(graphdef, trainable, frozen, pool, rows, val_pool, val_rows, dense, factored, moments,
                        last) -> dict:
    """Figure 1b's agreement: LESS-style scores from exact gradients, dense, factored and other-seed
    dense features of the same pool rows (the timed sides' last-round features) and val rows."""
    from jraise.grads.features import compute_features

    other = dataclasses.replace(dense, projection=dataclasses.replace(dense.projection, seed=dense.projection.seed + 1))
    train = {"dense": last["features"], "factored": last["features_factored"],
             "dense_other_seed": compute_features(graphdef, trainable, frozen, pool, rows, other, "sft",
                                                  moments=moments),
             "exact": _exact_vectors(graphdef, trainable, frozen, pool, rows, dense, moments)}
    val = {"dense": compute_features(graphdef, trainable, frozen, val_pool, val_rows, dense, "sft"),
           "factored": compute_features(graphdef, trainable, frozen, val_pool, val_rows, factored, "sft"),
           "dense_other_seed": compute_features(graphdef, trainable, frozen, val_pool, val_rows, other, "sft"),
           "exact": _exact_vectors(graphdef, trainable, frozen, val_pool, val_rows, dense, None)}
    scores = {name: _less_scores(train[name], val[name]) for name in train}
    pairs = (("exact", "dense"), ("exact", "factored"), ("dense", "factored"), ("dense", "dense_other_seed"),
             ("exact", "dense_other_seed"))
    out = {f"{a}_vs_{b}": _agreement(scores[a], scores[b]) for a, b in pairs}
    return {"val_examples": len(val_rows), "exact_dim": int(train["exact"].shape[1]), **out}


# ----------------------------------------------------------------------------- main


def _rel(a, b) -> float:
    """Largest per-row relative L2 difference ||a_i - b_i|| / ||b_i||."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-30)))


def _gb(n) -> str:
    return f"{n / 1024**3:.2f} GiB"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--n-examples", type=int, default=256,
                        help="testbed pool size = examples timed (small pools pad each bucket's last group)")
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--proj-dim", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=8, help="FeatureConfig.chunk")
    parser.add_argument("--group", type=int, default=64, help="FeatureConfig.group (= training batch)")
    parser.add_argument("--n-buckets", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4, help="training side")
    parser.add_argument("--ref-project-interval", type=int, default=16,
                        help="reference: gradients projected per matmul (LESS: 16)")
    parser.add_argument("--torch-threads", type=int, default=1, help="0: torch's default (see above)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time jraise without the projection, and one projection call")
    parser.add_argument("--skip-torch", action="store_true", help="no PyTorch reference (figure 1)")
    parser.add_argument("--skip-memory", action="store_true", help="no scoring-memory figure (figure 3)")
    parser.add_argument("--skip-factored", action="store_true", help="no factored-mode side (figure 1b)")
    parser.add_argument("--n-val", type=int, default=8, help="validation examples of the 1b agreement scores")
    parser.add_argument("--factored-dim", type=int, default=None,
                        help="d of the factored side (default: --proj-dim; larger d is cheap in factored mode)")
    parser.add_argument("--score-rows", type=int, default=1_000_000)
    parser.add_argument("--score-dim", type=int, default=1024)
    parser.add_argument("--work", default=None, help="where the scoring store is written (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    parser.add_argument("--score-store", default=None, help=argparse.SUPPRESS)  # the scoring subprocess
    args = parser.parse_args(argv)
    if args.score_store:
        _score_child(args.score_store)
        return None

    import jax
    import numpy as np

    from jraise.data.pool import load_pool
    from jraise.testbed import write_testbed
    from jraise.grads.features import FeatureConfig
    from jraise.grads.projection import (
        ProjectionConfig,
        dense_matrix,
        factored_plan,
        tree_size,
    )
    from jraise.model import (
        init_model,
        load_tokenizer,
        parameter_count,
        preset_config,
        save_model,
    )

    config = FeatureConfig(projection=ProjectionConfig(dim=args.proj_dim), chunk=args.chunk, group=args.group,
                           n_buckets=args.n_buckets)
    result: dict = {"preset": args.preset, "examples": args.n_examples, "max_len": args.max_len,
                    "lora_rank": args.lora_rank, "lora_targets": "q,k,v,o", "proj_dim": args.proj_dim,
                    "chunk": args.chunk, "group": args.group, "rounds": args.rounds,
                    "device": str(jax.devices()[0]), "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_testbed(f"{tmp}/testbed", n_train=args.n_examples, n_test_per_category=1, seed=args.seed)
        tok = load_tokenizer(paths["tokenizer"])
        pool = load_pool(paths["pool"], tok, max_len=args.max_len)
        rows = np.arange(len(pool))
        model_config = preset_config(args.preset, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
        base = init_model(model_config, seed=args.seed)
        result["base_params"] = parameter_count(base)
        save_model(base, model_config, f"{tmp}/model")  # no adapters yet: both sides add the same ones
        del base
        model, graphdef, trainable, frozen, moments = _jraise_setup(f"{tmp}/model", args.lora_rank,
                                                                    args.lora_alpha, args.seed)
        n_lora = tree_size(trainable)
        result["lora_params"] = n_lora
        result["real_tokens"] = int(pool.lengths.sum())
        sides = {"features": _features_side(graphdef, trainable, frozen, pool, rows, config, moments)}
        if not args.skip_factored:
            factored_dim = args.factored_dim or args.proj_dim
            result["factored_dim"] = factored_dim
            factored = dataclasses.replace(config, projection=dataclasses.replace(config.projection, mode="factored",
                                                                                  dim=factored_dim))
            sides["features_factored"] = _features_side(graphdef, trainable, frozen, pool, rows, factored, moments)
            result["factored_split"] = [list(dims) for _, _, dims in factored_plan(
                jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable), factored_dim)]
            val_pool = load_pool(paths["val"], tok, max_len=args.max_len)
            val_rows = np.arange(min(args.n_val, len(val_pool)))
        train_run, n_train_real, group_shape = _train_side(model, graphdef, pool, rows, config, args.lr)
        result.update(group_shape)  # both jraise sides process these groups, padding rows included
        result["real_row_fraction"] = round(len(rows) / group_shape["group_rows"], 3)
        sides["training"] = train_run
        if args.breakdown:
            sides["grads_no_projection"] = _grads_side(graphdef, trainable, frozen, pool, rows, config, moments)
            result["projection_ms_per_chunk"] = round(_projection_ms(n_lora, config), 1)
        if not args.skip_torch:
            import torch

            if args.torch_threads:
                torch.set_num_threads(args.torch_threads)
            result["torch_threads"] = torch.get_num_threads()
            t0 = time.perf_counter()
            matrix = np.array(dense_matrix(config.projection.key(), n_lora, config.projection.dim,
                                           config.projection.kind, config.projection.block_rows))
            result["reference_matrix_bytes"] = matrix.nbytes
            result["reference_matrix_s"] = round(time.perf_counter() - t0, 2)
            ref_run, ref_vectors, first_loss = _torch_reference(
                f"{tmp}/model", trainable, moments, pool, rows, matrix, args.lora_alpha / args.lora_rank,
                args.ref_project_interval)
            sides["less_reference"] = ref_run
            result["reference_first_loss"] = round(first_loss, 6)
            # Before projection: the Adam-preconditioned gradient vectors of two examples.
            check = rows[:2]
            bucket = int(-(-int(pool.lengths[check].max()) // 16) * 16)
            jv = _jraise_vectors(graphdef, trainable, frozen, pool, check, moments, bucket)
            result["max_rel_diff_vectors"] = float(f"{_rel(ref_vectors(range(len(check))), jv):.3g}")

    # Warm-up: jit compiles every group shape (one example per length bucket), torch allocates.
    for name, run in sides.items():
        t0 = time.perf_counter()
        run(warm=True)
        result[f"warmup_s_{name}"] = round(time.perf_counter() - t0, 2)

    n_real = {"features": len(rows), "features_factored": len(rows), "less_reference": len(rows),
              "training": n_train_real, "grads_no_projection": len(rows)}
    rates: dict[str, list[float]] = {name: [] for name in sides}
    last: dict = {}
    names = list(sides)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            t0 = time.perf_counter()
            last[name] = sides[name]()
            rates[name].append(n_real[name] / (time.perf_counter() - t0))
    if "less_reference" in sides:  # same features: every example of the last round
        ref, ours = last["less_reference"], last["features"]
        result["max_rel_diff_features"] = float(f"{_rel(ref, ours):.3g}")
        result["min_cosine_features"] = round(float(np.min(
            np.sum(ref * ours, 1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(ours, axis=1))), 6)
    median = {name: statistics.median(v) for name, v in rates.items()}
    for name in sides:
        result[f"{name}_examples_per_s"] = round(median[name], 2)
        result[f"{name}_rounds"] = [round(x, 2) for x in rates[name]]
    if "less_reference" in sides:
        result["ratio_jraise_over_less_reference"] = round(median["features"] / median["less_reference"], 3)
    result["ratio_features_over_training"] = round(median["features"] / median["training"], 3)
    if "features_factored" in sides:
        result["ratio_factored_over_dense"] = round(median["features_factored"] / median["features"], 3)
        if "less_reference" in sides:
            result["ratio_factored_over_less_reference"] = round(
                median["features_factored"] / median["less_reference"], 3)
        result["agreement"] = _factored_agreement(graphdef, trainable, frozen, pool, rows, val_pool, val_rows,
                                                  config, factored, moments, last)

    if not args.skip_memory:
        result["scoring"] = _scoring_memory(args.work, args.score_rows, args.score_dim)
    result["goals"] = GOALS

    print(json.dumps(result, indent=2))
    print(f"\n[1] train-side features, {len(rows)} examples, LoRA r={args.lora_rank} ({n_lora} params), "
          f"d={args.proj_dim}; jraise groups hold {result['group_rows']} rows ({result['groups']} x {args.group}, "
          f"real fraction {result['real_row_fraction']}):")
    if "less_reference" in sides:
        print(f"    jraise {median['features']:.1f} ex/s vs LESS-style torch {median['less_reference']:.1f} ex/s: "
              f"{result['ratio_jraise_over_less_reference']:.2f}x (goal >= 10x); max relative difference "
              f"{result['max_rel_diff_vectors']:.2g} before projection, {result['max_rel_diff_features']:.2g} "
              f"after")
    else:
        print("    skipped (--skip-torch)")
    if "features_factored" in sides:
        a = result["agreement"]
        vs_ref = (f", {result['ratio_factored_over_less_reference']:.2f}x the torch reference"
                  if "less_reference" in sides else "")
        print(f"[1b] factored mode (d={result['factored_dim']}) {median['features_factored']:.1f} ex/s vs dense {median['features']:.1f} ex/s: "
              f"{result['ratio_factored_over_dense']:.2f}x{vs_ref}. LESS-style scores ({len(rows)} train x "
              f"{a['val_examples']} val), Pearson / Spearman / top-5% overlap:")
        for name, label in (("exact_vs_dense", "exact vs dense"), ("exact_vs_factored", "exact vs factored"),
                            ("dense_vs_factored", "dense vs factored"),
                            ("dense_vs_dense_other_seed", "dense vs dense (seed+1)"),
                            ("exact_vs_dense_other_seed", "exact vs dense (seed+1)")):
            x = a[name]
            print(f"     {label:26s} {x['pearson']:.4f} / {x['spearman']:.4f} / {x['top5_overlap']:.3f} "
                  f"(k={x['top5_k']})")
    print(f"[2] features {median['features']:.1f} ex/s vs training {median['training']:.1f} ex/s: "
          f"{result['ratio_features_over_training']:.2f}x (goal >= 0.5x)")
    if "scoring" in result:
        s = result["scoring"]
        print(f"[3] scoring {s['rows']:,} x {s['dim']} ({_gb(s['store_bytes'])} float16, {s['checkpoints']} "
              f"checkpoints, {s['val_examples']} val in {s['val_groups']} groups) in {s['scoring_s']:.1f} s: "
              f"peak RSS (VmHWM) {_gb(s['peak_vm_hwm'])}, sampled peak anonymous {_gb(s['peak_rss_anon_sampled'])}"
              f", file-backed {_gb(s['peak_rss_file_sampled'])}, before scoring {_gb(s['rss_before'])} "
              "(goal < 2 GiB)")
    else:
        print("[3] skipped (--skip-memory)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
