"""The Beyond-IID measurement end to end: intervention sets, the N+1 runs, per-category
performance and Gamma, with their files.

`measure_interactions` chains the pieces of `jraise.select.intervention` (`intervention_sets`,
`train_interventions`, `evaluate_runs`, `interaction_from_runs`) and, given ``out_dir``, writes
``interactions.json`` (`RESULT_FILE`: the design, performance, timings and options) and the Gamma
files (`jraise.data.gamma.save_gamma`).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jraise.atomic import atomic_write_text
from jraise.data.gamma import ORIENTATION, save_gamma
from jraise.data.pool import InstructionPool, with_skipped
from jraise.select.intervention import (
    MODES,
    InterventionConfig,
    eval_names,
    evaluate_runs,
    interaction_from_runs,
    intervention_sets,
    pool_categories,
    train_interventions,
)

RESULT_FILE = "interactions.json"
FORMAT_VERSION = 1


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def measure_interactions(model: nnx.Module, pool: InstructionPool, eval_pool: InstructionPool,
                         config: InterventionConfig, out_dir: str | os.PathLike | None = None,
                         mode: str = "vmap", *, tokenizer=None, progress: bool = True) -> dict:
    """The whole Beyond-IID measurement: sets, R fine-tunes, per-category performance, Gamma.

    Returns a dict with ``names``, ``deltas`` [N], ``base_counts`` (n0 per category),
    ``set_sizes`` [R], ``base_indices``, ``perf`` [R, N] (row 0 = D0), ``gamma`` [N, N]
    (``gamma[target, source]``), ``stacked_trainable`` (the R trained states), ``train_loss``
    [R, steps] and ``timings`` (sets, compile, train, eval, total seconds).

    With ``out_dir``: ``interactions.json`` (design, perf, timings, config, and ``skipped`` when
    either pool was loaded with bad records skipped; written before Gamma,
    so a Gamma error such as a non-positive own effect keeps the runs) and, via `save_gamma`,
    ``gamma.csv``, ``gamma.json`` and ``gamma_heatmap.png``; every file written atomically.
    ``tokenizer`` is needed for ``config.metric == "exact_match"``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if config.metric == "exact_match" and tokenizer is None:
        raise ValueError("metric='exact_match' needs the tokenizer (measure_interactions(..., tokenizer=tok))")
    total_start = time.perf_counter()
    start = time.perf_counter()
    base, sets, deltas, names = intervention_sets(pool_categories(pool), config)
    eval_names(eval_pool, names)  # fail before training when a category cannot be evaluated
    sets_s = time.perf_counter() - start
    stats: dict = {}
    stacked = train_interventions(model, pool, config, mode, progress, sets=sets, stats=stats)
    start = time.perf_counter()
    perf = evaluate_runs(model, stacked, eval_pool, config.metric, names=names,
                         batch_size=config.eval_batch_size, n_buckets=config.n_buckets, tokenizer=tokenizer)
    eval_s = time.perf_counter() - start

    labels = np.array(pool_categories(pool), dtype=object)
    base_counts = [int(np.sum(labels[base] == name)) for name in names]
    timings = {"sets_s": sets_s, "compile_s": stats["compile_s"], "train_s": stats["train_s"], "eval_s": eval_s}
    result = {
        "names": list(names), "deltas": deltas, "base_counts": base_counts,
        "set_sizes": [int(s.size) for s in sets], "base_indices": base, "perf": perf,
        "metric": config.metric, "higher_is_better": config.metric != "loss", "mode": mode,
        "stacked_trainable": stacked, "train_loss": stats["train_loss"], "timings": timings,
        "gamma": None, "files": {},
    }

    def document(gamma_error: str | None) -> dict:
        changed = [np.setxor1d(sets[k + 1], base) for k in range(len(names))]
        return with_skipped({
            "format_version": FORMAT_VERSION,
            "method": "Beyond IID (arXiv 2409.07045), section 2: interaction matrix by intervention",
            "pool": {"source": pool.source, "fingerprint": pool.fingerprint, "size": len(pool)},
            "eval_pool": {"source": eval_pool.source, "fingerprint": eval_pool.fingerprint, "size": len(eval_pool)},
            "names": list(names), "metric": config.metric, "higher_is_better": config.metric != "loss",
            "orientation": ORIENTATION, "mode": mode, "devices": jax.device_count(),
            "deltas": [int(d) for d in deltas],
            "interventions": ["add" if d > 0 else "remove" for d in deltas],
            "base_counts": base_counts, "set_sizes": result["set_sizes"],
            "base_ids": [pool.ids[i] for i in base],
            "changed_ids": {name: [pool.ids[i] for i in changed[k]] for k, name in enumerate(names)},
            "perf_rows": ["D0"] + [f"{'+' if d > 0 else ''}{int(d)} {name}" for d, name in zip(deltas, names)],
            "perf": [[_json_float(v) for v in row] for row in perf],
            # Each run's own last step (under budget="epochs" a shorter run's row ends in NaN padding).
            "final_train_loss": [_json_float(row[n - 1]) for row, n in zip(stats["train_loss"], stats["run_steps"])],
            "run_steps": [int(n) for n in stats["run_steps"]],
            "timings": {**timings, "total_s": time.perf_counter() - total_start},
            "bucket_lengths": stats["bucket_lengths"],
            "config": config.to_dict(),
            "gamma_error": gamma_error,
        }, pool, eval_pool)

    out = None if out_dir is None else Path(out_dir)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        result["files"]["runs"] = atomic_write_text(out / RESULT_FILE, json.dumps(document(None), indent=1) + "\n")
    try:
        gamma = interaction_from_runs(perf, deltas, names, config.metric, config.self_effect_floor,
                                      relative_self_effect_floor=config.relative_self_effect_floor)
    except ValueError as err:
        if out is not None:
            atomic_write_text(out / RESULT_FILE, json.dumps(document(str(err)), indent=1) + "\n")
        raise
    result["gamma"] = gamma
    if out is not None:
        result["files"].update(save_gamma(gamma, names, out))
    result["timings"]["total_s"] = time.perf_counter() - total_start
    return result
