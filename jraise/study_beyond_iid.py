"""EE-CPO and DT-CSFT in the selection study: one measured Gamma per seed, a re-mixed 5% subset
and a curriculum order at the study's budget.

The Beyond-IID methods do not score records; they act on categories, so in the study they need
the interaction matrix first (Beyond IID, arXiv 2409.07045, section 2). Per seed, and shared by
both methods (measured once, cached under ``<work>/seed<s>/gamma/``):

* **Gamma** by the intervention design (`jraise.jobs.intervention.measure_interactions`) on the
  seed's noisy pool, from the study's base model: D0 = ``fraction`` of the pool in the pool's own
  category mix (the same size as a static selector's subset), Delta_k = +``gamma_delta`` of n0_k,
  every run ``gamma_steps`` updates of ``batch_size`` at the study's learning rate; performance =
  response loss per category on the seed's validation split of *all* categories (the method
  measures how categories act on each other, so it needs every category's few-shot set; no
  test record is read). Own effects are floored at ``gamma_relative_floor`` x their median, so a
  nearly learned category's row is not magnified by a tiny divisor.
* **EE-CPO** (section 3): the LP re-mixes D0 with importance spread evenly over the target
  categories (the targeted setting of the study: only the targets' performance counts; the paper's
  default weights every category by its share), edit budget ``ee_cpo_edit`` x |D0|, no category
  changed by more than ``ee_cpo_max_change`` x the edit budget, at least 5 per category; additions
  drawn at random from the rest of the pool (no quality score: the study gives none), never a
  duplicate of a kept record's content. The result is a static subset of |D0| records, trained on
  like every other static selection.
* **DT-CSFT** (section 4): tiers derived from the same Gamma (``dt_csft_tier_method``: by default
  the net-asymmetry ranking cut into thirds, since the depth tiers of a dense noisy 14-category
  Gamma put everything in one middle tier); a random subset of ``steps x batch_size // 3``
  records is ordered into the 3-stage schedule (every record exactly three times, base tiers early, dependent late), so it
  uses the study's step budget like the dynamic methods do, read in order without reshuffling.

Both rows report the Gamma measurement's seconds (shared) plus their own as selection time.
`ee_cpo_remix`, EE-CPO's re-mix of D0 inside a pool, is also the EE-CPO arm of the standalone
Beyond-IID study (`jraise.beyond_iid_study`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from jraise.atomic import atomic_write_text
from jraise.study_common import options_key, tunable_model

GAMMA_FILE = "study_gamma.json"


def _gamma_settings(config, seed: int) -> dict:
    """What the seed's Gamma depends on: the study's common options and its ``gamma_*`` ones."""
    return {"seed": seed, "options": options_key(config, "gamma", ("gamma_",))}


def seed_gamma(base_dir: Path, pool, paths: dict, config, seed: int, work: Path) -> dict:
    """{"names", "gamma", "base_indices", "seconds"} of the seed: read back when measured with the
    same settings, else measured now (files of the measurement beside it)."""
    gamma_dir = work / f"seed{seed}" / "gamma"
    cached = gamma_dir / GAMMA_FILE
    settings = _gamma_settings(config, seed)
    if cached.exists():
        saved = json.loads(cached.read_text())
        if saved.get("settings") == settings:
            return saved
    from jraise.data.pool import load_pool
    from jraise.model import load_tokenizer
    from jraise.jobs.intervention import measure_interactions
    from jraise.select.intervention import InterventionConfig

    t0 = time.perf_counter()
    tok = load_tokenizer(base_dir)
    val_pool = load_pool(paths["val"], tok, max_len=config.max_len)
    n_select = max(1, round(config.fraction * len(pool)))
    intervention = InterventionConfig(delta_fraction=config.gamma_delta, base_size=n_select,
                                      steps=config.gamma_steps, batch_size=config.batch_size, lr=config.lr,
                                      schedule="constant", warmup_ratio=0.0, seed=seed, metric="loss",
                                      max_grad_norm=1.0, eval_batch_size=64,
                                      relative_self_effect_floor=config.gamma_relative_floor)
    model = tunable_model(base_dir, config, seed)  # LoRA adapters when the study tunes by LoRA
    measured = measure_interactions(model, pool, val_pool, intervention, gamma_dir, mode="sequential",
                                    tokenizer=tok, progress=False)
    result = {"settings": settings, "names": list(measured["names"]),
              "gamma": np.asarray(measured["gamma"], np.float64).tolist(),
              "base_indices": np.asarray(measured["base_indices"], np.int64).tolist(),
              "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(cached, json.dumps(result) + "\n")
    return result


def ee_cpo_remix(gamma: np.ndarray, names: list[str], d0: np.ndarray, categories: list, keys: list, seed: int, *,
                 edit_fraction: float, max_change_fraction: float | None, min_per_category: int = 5,
                 importance: np.ndarray | None = None):
    """EE-CPO's re-mix of a subset D0 of a pool (Beyond IID, arXiv 2409.07045, section 3).

    In: ``gamma`` (C, C) over the category ``names``; ``d0`` pool indices; per pool record its
    category (``categories``) and content key (``keys``: an addition never duplicates a kept
    record's content, so what a category can gain is its distinct new texts outside D0). Edit
    budget T = `edit_budget` (|D0|, ``edit_fraction``); no category changed by more than
    ceil(``max_change_fraction`` x T) (None: no cap); at least ``min_per_category`` per category;
    ``importance`` alpha (None: D0's own proportions, the paper's default). Records are removed
    from and added to a category at random (``seed``; no quality score).

    Out: (sorted pool indices of the re-mixed set, |D0| of them, the `MixturePlan`; its
    ``max_change`` is the cap used)."""
    from jraise.select.mixture import edit_budget, ee_cpo_plan, realise_subset, usable_extra

    d0 = np.asarray(d0, np.int64)
    rest = np.setdiff1d(np.arange(len(categories)), d0)
    index = {n: k for k, n in enumerate(names)}
    n0 = np.bincount([index[categories[i]] for i in d0], minlength=len(names))
    extra = usable_extra(names, [keys[i] for i in d0], [categories[i] for i in rest], [keys[i] for i in rest])
    t = edit_budget(len(d0), edit_fraction)
    cap = None if max_change_fraction is None else math.ceil(max_change_fraction * t)
    plan = ee_cpo_plan(np.asarray(gamma, np.float64), n0, edit_fraction=edit_fraction,
                       min_per_category=min_per_category, available_extra=extra, importance=importance,
                       max_change=cap)
    keep, add = realise_subset([categories[i] for i in d0], plan.counts_after, [categories[i] for i in rest], None,
                               seed, names=names, current_keys=[keys[i] for i in d0],
                               candidate_keys=[keys[i] for i in rest])
    return np.sort(np.concatenate([d0[keep], rest[add]])), plan


def ee_cpo_subset(measured: dict, categories: list[str], config, seed: int, keys: list) -> tuple[np.ndarray, dict]:
    """(pool indices of the re-mixed D0, the plan's counts) by EE-CPO with target importance."""
    names = measured["names"]
    importance = np.array([1.0 if n in config.targets else 0.0 for n in names])
    if not importance.any():
        raise ValueError(f"none of the targets {list(config.targets)} is a category of the pool")
    chosen, plan = ee_cpo_remix(measured["gamma"], names, measured["base_indices"], categories, keys, seed,
                                edit_fraction=config.ee_cpo_edit, max_change_fraction=config.ee_cpo_max_change,
                                min_per_category=config.ee_cpo_min_per_category, importance=importance)
    return chosen, {"counts_before": dict(zip(names, plan.counts_before.tolist())),
                    "counts_after": dict(zip(names, plan.counts_after.tolist())), "edits": plan.edits,
                    "max_change": plan.max_change, "coefficients": dict(zip(names, plan.coefficients.tolist()))}


def dt_csft_order(measured: dict, categories: list[str], config, seed: int) -> tuple[np.ndarray, dict]:
    """(the 3n-long order of pool indices, tiers) for a random n = steps x batch_size // 3 records."""
    from jraise.select.curriculum import dependency_taxonomy, dt_csft_schedule, example_tiers

    names = measured["names"]
    tiers = dependency_taxonomy(np.asarray(measured["gamma"], np.float64), names,
                                method=config.dt_csft_tier_method).tiers
    n = max(1, config.steps * config.batch_size // 3)
    if n > len(categories):
        raise ValueError(f"DT-CSFT needs {n} records (steps x batch_size / 3) but the pool has {len(categories)}")
    chosen = np.sort(np.random.default_rng((seed, 3)).permutation(len(categories))[:n])
    order = chosen[dt_csft_schedule(example_tiers([categories[i] for i in chosen], tiers), seed=seed)]
    return order, tiers
