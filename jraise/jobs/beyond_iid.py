"""Beyond IID on files: category-labelled records in, a re-mixed set or a curriculum order out.

These are the jobs behind ``jraise select mixture`` and ``jraise curriculum``; the maths lives in
`jraise.select.mixture` (EE-CPO) and `jraise.select.curriculum` (tiers, DT-CSFT). Neither job needs
a model: records are read and validated by the same parser the pools use (errors name the file,
line and field), ids are the pool's stable ids (the ``id`` field, else a content hash), and every
record needs a ``category``, or a categories file mapping ids to categories (e.g. derived ones).

Outputs are written atomically:

* mixture: ``OUT`` (the new set: kept pool records then added candidates, records unchanged) and
  ``OUT``.meta.json (counts before/after per category, LP objective, edits, which ids were removed
  and added);
* curriculum: ``OUT`` (the 3N-long order as a `jraise.data.order` file: pool index and id per
  entry, under a header with the pool's ids fingerprint; ``jraise train --order OUT`` reads it and
  checks it against the pool it trains on) and ``OUT``.meta.json (tiers per category, stage
  lengths, m).

Exact copies of records are distinct records with their own ids (`jraise.data.formats`, "Ids");
``dedupe=True`` keeps the first copy only. A curriculum is read by ``jraise train --order`` only
with the same choice, since the ids and positions differ.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jraise.atomic import atomic_write_group
from jraise.data.formats import parse_record, read_records, resolve_duplicates
from jraise.data.gamma import load_gamma
from jraise.data.order import order_text
from jraise.data.records import ProblemLog
from jraise.select.curriculum import dependency_tiers, dt_csft_stages, example_tiers, replicated_taxonomy
from jraise.select.mixture import ee_cpo_plan, realise_subset


@dataclass(frozen=True)
class CategorisedRecords:
    """Records of one file in file order, with their ids and categories."""

    path: str
    records: list[dict]
    ids: list[str]
    categories: list[str]


def read_categorised(path: str | os.PathLike, categories_file: str | os.PathLike | None = None,
                     dedupe: bool = False) -> CategorisedRecords:
    """Reads and validates instruction records; each needs a category (from its ``category`` field
    or from ``categories_file``: JSON {id: category}, or a `derive_categories` file whose
    "categories" holds that mapping; the file wins). Errors name the file and line. Exact copies
    get copy ids, or with ``dedupe`` only the first is kept (as `jraise.data.pool.load_pool`)."""
    problems = ProblemLog(skip_bad=False)
    sources, _ = read_records(path, problems)
    parsed = resolve_duplicates([parse_record(s) for s in sources], problems, dedupe).records
    given = json.loads(Path(categories_file).read_text()) if categories_file is not None else {}
    if isinstance(given.get("categories"), dict):  # a `derive_categories` file
        given = given["categories"]
    cats = []
    for item in parsed:
        cat = given.get(item.id, item.category)
        if cat is None:
            raise ValueError(f"{item.source.location}: field 'category': missing; every record needs a category "
                             f"(or pass a categories file mapping ids to categories)")
        cats.append(str(cat))
    return CategorisedRecords(str(path), [p.source.record for p in parsed], [p.id for p in parsed], cats)


def content_key(record: dict, ignore: tuple[str, ...] = ("id",)) -> str:
    """A key of a record's content without the ``ignore`` fields (its id by default), so a
    candidate duplicating a kept record is caught."""
    content = {k: v for k, v in record.items() if k not in ignore}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _gamma_for(names_in_data: list[str], gamma_path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    names, gamma = load_gamma(gamma_path)
    missing = sorted(set(names_in_data) - set(names))
    if missing:
        raise ValueError(f"{gamma_path}: Gamma has no row/column for categories {missing} of the data")
    return names, gamma


def _write_with_meta(out: Path, text: str, meta: dict) -> None:
    """``out`` and ``out.meta.json`` as one commit (`atomic_write_group`: the meta file first, the
    output last, so an output on disk always has its meta)."""
    atomic_write_group([(out.with_name(out.name + ".meta.json"), (json.dumps(meta, indent=2) + "\n").encode("utf-8")),
                        (out, text.encode("utf-8"))])


def mixture_job(pool_file, gamma_file, out, budget: int | None = None, edit_fraction: float = 0.03,
                candidates_file=None, min_per_category: int = 5, quality_field: str | None = None,
                seed: int = 0, categories_file=None, max_change: int | None = None, dedupe: bool = False) -> dict:
    """EE-CPO on a pool file; writes the re-mixed set and its metadata. Returns the metadata.
    ``max_change`` caps any one category's change ``|n_k - n0_k|`` (None: no cap; see `ee_cpo_plan`).
    ``dedupe``: read the pool and the candidates without exact copies."""
    pool = read_categorised(pool_file, categories_file, dedupe)
    cand = read_categorised(candidates_file, categories_file, dedupe) if candidates_file is not None else None
    names, gamma = _gamma_for(sorted(set(pool.categories) | set(cand.categories if cand else [])), gamma_file)
    index = {n: k for k, n in enumerate(names)}
    n0 = np.bincount([index[c] for c in pool.categories], minlength=len(names))
    extra = (np.bincount([index[c] for c in cand.categories], minlength=len(names)) if cand is not None
             else np.zeros(len(names), np.int64))
    plan = ee_cpo_plan(gamma, n0, budget=budget, edit_fraction=edit_fraction, min_per_category=min_per_category,
                       available_extra=extra, max_change=max_change)
    quality = None
    if cand is not None and quality_field is not None:
        missing = [i for i, r in enumerate(cand.records) if not isinstance(r.get(quality_field), (int, float))]
        if missing:
            raise ValueError(f"{candidates_file}: record index {missing[0]}: field {quality_field!r}: missing or "
                             f"not a number ({len(missing)} records)")
        quality = np.array([float(r[quality_field]) for r in cand.records])
    keep, add = realise_subset(pool.categories, plan.counts_after, cand.categories if cand else None, quality, seed,
                               names=names, current_keys=[content_key(r) for r in pool.records],
                               candidate_keys=[content_key(r) for r in cand.records] if cand else [])
    chosen = [pool.records[i] for i in keep] + ([cand.records[j] for j in add] if cand else [])
    out = Path(out)
    kept = set(keep.tolist())
    meta = {
        "method": "ee_cpo", "pool": str(pool_file), "gamma": str(gamma_file),
        "candidates": str(candidates_file) if candidates_file else None, "seed": seed,
        "edit_fraction": edit_fraction, "min_per_category": min_per_category, "max_change": plan.max_change,
        "categories": names,
        "counts_before": dict(zip(names, plan.counts_before.tolist())),
        "counts_after": dict(zip(names, plan.counts_after.tolist())),
        "budget": plan.budget, "edit_budget": plan.edit_budget, "edits": plan.edits,
        "objective_before": plan.objective_before, "objective_after": plan.objective_after,
        "lp_objective": plan.lp_objective,
        "removed_ids": [pool.ids[i] for i in range(len(pool.ids)) if i not in kept],
        "added_ids": [cand.ids[j] for j in add] if cand else [],
    }
    _write_with_meta(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen), meta)
    return meta


def curriculum_job(pool_file, out, gamma_file=None, tiers_file=None, threshold: float | None = None,
                   method: str = "depth", seed: int = 0, categories_file=None, alpha: float = 0.05,
                   dedupe: bool = False) -> dict:
    """DT-CSFT order of a pool file from Gamma (derived tiers) or a tiers file (JSON {category:
    tier}, 0 base .. 2 dependent); writes the order (`jraise.data.order.order_text`) and its
    metadata. Returns the metadata. ``dedupe``: read the pool without exact copies.

    ``gamma_file`` is one path or a list of paths. Two or more are replicate measurements (e.g. one
    per seed): edges then need the replicates' agreement (`replicated_taxonomy`, one-sided t-test
    at ``alpha`` on top of the threshold)."""
    gamma_files = ([] if gamma_file is None else
                   [gamma_file] if isinstance(gamma_file, (str, os.PathLike)) else list(gamma_file))
    if bool(gamma_files) == (tiers_file is not None):
        raise ValueError("give exactly one of a Gamma file (or several replicates) or a tiers file")
    pool = read_categorised(pool_file, categories_file, dedupe)
    names = sorted(set(pool.categories))
    kwargs = {} if threshold is None else {"threshold": threshold}
    if tiers_file is not None:
        tiers = dependency_tiers(None, names, user_tiers=json.loads(Path(tiers_file).read_text()))
    else:
        gammas = []
        for path in gamma_files:
            gamma_names, gamma = _gamma_for(names, path)
            rows = [gamma_names.index(n) for n in names]
            gammas.append(gamma[np.ix_(rows, rows)])
        if len(gammas) == 1:
            tiers = dependency_tiers(gammas[0], names, method=method, **kwargs)
        else:
            tiers = replicated_taxonomy(np.stack(gammas), names, alpha=alpha, method=method, **kwargs).tiers
    stages = dt_csft_stages(example_tiers(pool.categories, tiers), seed=seed)
    sequence = stages.sequence()
    out = Path(out)
    replicates = len(gamma_files) > 1
    gamma_paths = [str(g) for g in gamma_files]  # one path is recorded as a string, replicates as a list
    meta = {"method": "dt_csft", "pool": str(pool_file),
            "gamma": gamma_paths if replicates else (gamma_paths[0] if gamma_paths else None),
            "alpha": alpha if replicates else None,
            "tiers_file": str(tiers_file) if tiers_file else None, "seed": seed, "tiers": tiers,
            "tier_sizes": dict(Counter(str(tiers[c]) for c in pool.categories)),
            "stage_lengths": [len(stages.stage1), len(stages.stage2), len(stages.stage3)],
            "m_base": stages.m_base, "m_dependent": stages.m_dependent, "n": len(pool.ids), "dedupe": dedupe}
    _write_with_meta(out, order_text(pool.ids, sequence), meta)
    return meta
