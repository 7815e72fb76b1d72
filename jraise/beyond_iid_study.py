"""The Beyond-IID study on the built-in testbed: measured Gamma and tiers against the testbed's
construction, EE-CPO vs the baseline mix, DT-CSFT vs shuffled order, at one budget, over seeds.

This is the standalone study of the two Beyond-IID methods (``benchmarks/beyond_iid_study.py``
is its command line); inside the selection study they run as two more selectors
(`jraise.study_beyond_iid`). Protocol (Beyond IID, arXiv 2409.07045), sizes in `BeyondIIDStudyConfig`:

1. **Base model.** One ``small`` model trained from scratch on a clean testbed of the 14 default
   categories (`jraise.study.build_base` with no held-out targets, ``base_steps`` steps): the
   stand-in for a pretrained LLM. It never sees a knowledge category, so every fact it knows comes
   from the seed's pool. It is shared by every seed. At the default 2,500 steps the
   letter tasks are on the steep part of their learning curve, so a few hundred fine-tuning steps
   move them and the effect of the data mix is measurable.
2. **Per seed** s (`run_seed`): a fresh testbed of the study ``categories`` (seed s: pool, val,
   test draws; ``noise`` planted, default 0), then
   a. **Gamma** with `jraise.jobs.intervention.measure_interactions`: D0 = ``budget`` records
      of the pool (the pool's mix, i.e. balanced), Delta_k = +``delta_fraction`` of n0_k,
      N+1 fine-tunes of the base with the same step budget as the arms below, per-category
      response loss on the val split, own effects floored at ``relative_self_effect_floor`` x
      their median. Files under ``<out>/beyond_iid_gamma/seed<s>/``.
   b. **Tiers** from that Gamma (`dependency_taxonomy`, ``tier_method``), and the testbed's true
      tiers (`true_tiers`: prerequisites of a composite -> 0, composites -> 2, others -> 1) for
      reference.
   c. **Arms**, every one ``epochs`` x ``budget`` examples = the same number of optimizer
      steps from the same base model, same lr schedule:
      ``baseline`` D0 in reshuffled epochs; ``ee_cpo`` the EE-CPO re-mix of D0
      (`jraise.study_beyond_iid.ee_cpo_remix` with Gamma, ``edit_fraction``, at most
      ``max_change_fraction`` of the edit budget per category, additions from the rest of the
      pool) in reshuffled epochs; ``dt_csft`` D0 in the DT-CSFT order of the derived tiers;
      ``dt_csft_true_tiers`` D0 in the DT-CSFT order of the true tiers.
   d. Test exact match and response loss per category (`jraise.eval.evaluate`).
3. **Report** (`write_study`): ``<out>/beyond_iid_study.{md,json,png}`` and the mean Gamma over
   seeds in ``<out>/beyond_iid_gamma/`` (`save_gamma`).

The seed changes the testbed draw, D0 and the Delta draws, the runs' data orders, the EE-CPO
additions/removals and the DT-CSFT shuffles; the base model (its init and training) is fixed.
The work directory keeps the shared base model and finished seeds (``<work>/rows.jsonl``), so an
interrupted run resumes; a fresh work directory recomputes.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# The letter set. Other sets via `categories`, e.g. the knowledge set
# fact,add,compare,fact_add,fact_compare,first,last or the split-name knowledge set
# fact,tag,fact_tag,fact_pair,first,last,add (with delta_fraction 1.0 and gamma_budget "epochs").
DEFAULT_CATEGORIES = ("reverse", "upper", "sort", "reverse_upper", "sort_reverse", "first", "last")
ARMS = ("baseline", "ee_cpo", "dt_csft", "dt_csft_true_tiers")
ARM_LABELS = {"baseline": "baseline (D0 mix, shuffled)", "ee_cpo": "EE-CPO mix (shuffled)",
              "dt_csft": "DT-CSFT order (derived tiers)", "dt_csft_true_tiers": "DT-CSFT order (true tiers)"}
TIER_NAMES = {0: "base", 1: "middle", 2: "dependent"}


@dataclass(frozen=True)
class BeyondIIDStudyConfig:
    """Sizes and budgets of the study (defaults: the benchmark's; the module docstring says what
    each part does). Invalid combinations raise ``ValueError`` naming every problem."""

    categories: tuple[str, ...] = DEFAULT_CATEGORIES
    seeds: tuple[int, ...] = (0, 1, 2)
    n_pool: int = 3000  # per seed; D0 = budget of it, the rest is the EE-CPO candidate pool
    budget: int = 1200  # N: records every arm trains on
    epochs: int = 3  # every record of an arm's set is seen this many times (DT-CSFT: exactly 3)
    batch_size: int = 16
    lr: float = 1e-3
    schedule: str = "cosine"
    warmup_ratio: float = 0.05
    noise: float = 0.0
    n_val: int = 100  # per category: Gamma's performance measurement
    n_test: int = 100  # per category: the arms' evaluation
    delta_fraction: float = 0.5
    gamma_metric: str = "loss"
    gamma_mode: str = "auto"  # vmap, sequential, auto = sequential on CPU (faster there), vmap elsewhere
    # "steps": every intervention run takes the arms' step budget (the library default); "epochs":
    # every run takes `epochs` passes over its own set, so added records do not dilute the others
    # (sequential runs only; `InterventionConfig.budget`).
    gamma_budget: str = "steps"
    self_effect_floor: float | None = None
    # Own effects floored at this fraction of their median (a nearly learned category's tiny own
    # effect otherwise magnifies its row's noise); None: off.
    relative_self_effect_floor: float | None = 0.25
    edit_fraction: float = 0.2
    # No category changed by more than this fraction of the edit budget T (None: no cap; without
    # one the LP moves all of T into the single best category).
    max_change_fraction: float | None = 0.34
    min_per_category: int = 5
    tier_method: str = "depth"
    tier_threshold: float = 0.1
    # "all": the base model is trained on all 14 default categories, the study's included (a pretrained
    # LLM that already has the skills); "others": only on the default categories outside the study's,
    # so the study's parts and composites are learnt during the runs (the held-out regime of the
    # selection study).
    base_categories: str = "all"
    base_pool: int = 12000
    base_steps: int = 2500
    base_lr: float = 1e-3
    base_seed: int = 1000
    max_len: int = 192
    max_new_tokens: int = 12

    def __post_init__(self):
        from jraise.testbed import ALL_CATEGORIES

        problems = []
        unknown = [c for c in self.categories if c not in ALL_CATEGORIES]
        if unknown:
            problems.append(f"unknown categories {unknown}; known: {', '.join(ALL_CATEGORIES)}")
        if len(set(self.categories)) != len(self.categories) or len(self.categories) < 2:
            problems.append(f"categories must be at least 2 distinct names, got {list(self.categories)}")
        if not self.seeds:
            problems.append("seeds must not be empty")
        if not 0 < self.budget < self.n_pool:
            problems.append(f"budget ({self.budget}) must be > 0 and below n_pool ({self.n_pool}): the rest "
                            "of the pool supplies Gamma's additions and EE-CPO's candidates")
        if self.epochs != 3:
            problems.append(f"epochs must be 3 (DT-CSFT shows every record exactly 3 times), got {self.epochs}")
        if self.gamma_mode not in ("auto", "vmap", "sequential"):
            problems.append(f"gamma_mode must be auto, vmap or sequential, got {self.gamma_mode!r}")
        if self.gamma_budget not in ("steps", "epochs"):
            problems.append(f"gamma_budget must be steps or epochs, got {self.gamma_budget!r}")
        elif self.gamma_budget == "epochs" and self.gamma_mode == "vmap":
            problems.append("gamma_budget epochs gives the runs different lengths: use gamma_mode sequential or auto")
        if self.base_categories not in ("all", "others"):
            problems.append(f"base_categories must be all or others, got {self.base_categories!r}")
        if self.tier_method not in ("depth", "net_asymmetry"):
            problems.append(f"tier_method must be depth or net_asymmetry, got {self.tier_method!r}")
        if self.relative_self_effect_floor is not None and not 0 < self.relative_self_effect_floor <= 1:
            problems.append(f"relative_self_effect_floor must be in (0, 1] or None, got {self.relative_self_effect_floor}")
        if self.max_change_fraction is not None and not 0 < self.max_change_fraction <= 1:
            problems.append(f"max_change_fraction must be in (0, 1] or None, got {self.max_change_fraction}")
        if not 0 < self.edit_fraction <= 1:
            problems.append(f"edit_fraction must be in (0, 1], got {self.edit_fraction}")
        if problems:
            raise ValueError("invalid BeyondIIDStudyConfig: " + "; ".join(problems))

    @property
    def steps(self) -> int:
        """Optimizer steps of every run (the arms and each Gamma run): epochs x budget / batch."""
        return math.ceil(self.epochs * self.budget / self.batch_size)


def settings_key(config: BeyondIIDStudyConfig) -> str:
    """What a finished seed depends on (everything but the seed list): rows of a run with other
    settings in the same work directory are not reused."""
    settings = {k: v for k, v in asdict(config).items() if k != "seeds"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Ground truth of the testbed and pure helpers


def composition_pairs(categories: Sequence[str]) -> list[tuple[str, str]]:
    """(prerequisite, composite) pairs of the testbed's composition graph with both ends in
    ``categories``, in ``categories`` order."""
    from jraise.testbed import CATEGORY_PREREQUISITES

    chosen = set(categories)
    return [(p, c) for c in categories for p in CATEGORY_PREREQUISITES[c] if p in chosen]


def true_tiers(categories: Sequence[str]) -> dict[str, int]:
    """Tiers by construction: a prerequisite of a composite in the set -> 0 (base), a composite
    with a prerequisite in the set -> 2 (dependent), everything else -> 1 (middle)."""
    pairs = composition_pairs(categories)
    prerequisites = {p for p, _ in pairs}
    composites = {c for _, c in pairs}
    both = prerequisites & composites
    if both:
        raise ValueError(f"categories {sorted(both)} are both a prerequisite and a composite in this set: "
                         "three true tiers cannot represent that")
    return {c: 0 if c in prerequisites else 2 if c in composites else 1 for c in categories}


def repeated_epochs(indices: np.ndarray, epochs: int, seed: int) -> np.ndarray:
    """``epochs`` independently shuffled passes over ``indices``, concatenated (the plain SFT
    order: every index exactly ``epochs`` times)."""
    rng = np.random.default_rng([seed, 1])
    return np.concatenate([rng.permutation(np.asarray(indices, np.int64)) for _ in range(epochs)])


def occurrence_range(order: np.ndarray, indices: np.ndarray) -> tuple[int, int]:
    """(min, max) number of times an element of ``indices`` occurs in ``order``; (0, 0) when
    ``order`` also holds an index outside ``indices``, which no arm may do."""
    counts = dict(zip(*np.unique(order, return_counts=True)))
    if set(counts) - set(np.asarray(indices).tolist()):
        return 0, 0
    per = [int(counts.get(i, 0)) for i in np.asarray(indices).tolist()]
    return min(per), max(per)


def category_counts(categories: Sequence[str], indices: np.ndarray, names: Sequence[str]) -> list[int]:
    """How many of ``indices`` fall in each of ``names``."""
    picked = [categories[i] for i in np.asarray(indices).tolist()]
    return [picked.count(n) for n in names]


def dependency_entries(gamma: np.ndarray, names: Sequence[str], pairs: Sequence[tuple[str, str]]) -> list[dict]:
    """For each (prerequisite p, composite c): ``Gamma[c, p]`` (one p record, in c-equivalents,
    for target c), ``Gamma[p, c]`` (the reverse direction) and their difference, the quantity the
    library's prerequisite rule thresholds (``p -> c`` when it exceeds the threshold)."""
    index = {n: k for k, n in enumerate(names)}
    out = []
    for p, c in pairs:
        forward = float(gamma[index[c], index[p]])
        backward = float(gamma[index[p], index[c]])
        out.append({"prerequisite": p, "composite": c, "gamma_composite_from_prerequisite": forward,
                    "gamma_prerequisite_from_composite": backward, "asymmetry": forward - backward})
    return out


def other_asymmetries(gamma: np.ndarray, names: Sequence[str], pairs: Sequence[tuple[str, str]]) -> list[float]:
    """|Gamma[a, b] - Gamma[b, a]| of every unordered pair that is not a composition pair: the
    reference scale of asymmetry without a by-construction dependency."""
    related = {frozenset(p) for p in pairs}
    return [abs(float(gamma[a, b] - gamma[b, a])) for a in range(len(names)) for b in range(a + 1, len(names))
            if frozenset((names[a], names[b])) not in related]


def tiers_order_pairs(tiers: Mapping[str, int], pairs: Sequence[tuple[str, str]]) -> dict:
    """How many (prerequisite, composite) pairs the tiers put strictly before / level / after."""
    before = sum(tiers[p] < tiers[c] for p, c in pairs)
    level = sum(tiers[p] == tiers[c] for p, c in pairs)
    return {"pairs": len(pairs), "prerequisite_first": int(before), "same_tier": int(level),
            "composite_first": int(len(pairs) - before - level)}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def own_effects(perf: Sequence[Sequence[float]], deltas: Sequence[int], metric: str) -> list[float]:
    """e_kk per category: the own-category improvement per added record, the divisor of Gamma's
    row k (``perf`` row 0 = D0, row k+1 = category k changed by ``deltas[k]``; loss: a drop is an
    improvement). Small values amplify their row's noise."""
    p = np.asarray(perf, np.float64)
    sign = 1.0 if metric == "exact_match" else -1.0
    return [float(sign * (p[k + 1, k] - p[0, k]) / d) for k, d in enumerate(deltas)]


def _floats(x) -> list:
    return np.asarray(x, np.float64).tolist()


# ----------------------------------------------------------------------------------------------
# One seed


def resolved_gamma_mode(config: BeyondIIDStudyConfig) -> str:
    """The intervention runs' mode: ``gamma_mode`` unless "auto", which means sequential on CPU
    (faster there) or when runs differ in length (``gamma_budget`` "epochs"), else vmap."""
    if config.gamma_mode != "auto":
        return config.gamma_mode
    if config.gamma_budget == "epochs":
        return "sequential"  # runs of different lengths
    import jax

    return "sequential" if jax.default_backend() == "cpu" else "vmap"


def _fine_tune(base_dir: Path, pool, order: np.ndarray, config: BeyondIIDStudyConfig, seed: int, run_dir: Path):
    """The base model fine-tuned on ``pool`` following ``order`` (read in order, one epoch);
    returns (model, optimizer steps done, seconds)."""
    from jraise.model import load_model
    from jraise.train import TrainConfig, train

    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished attempt
    model, _ = load_model(base_dir)
    train_config = TrainConfig(lr=config.lr, schedule=config.schedule, warmup_ratio=config.warmup_ratio, epochs=1,
                               batch_size=config.batch_size, seed=seed, max_grad_norm=1.0, max_to_keep=1)
    t0 = time.perf_counter()
    result = train(model, pool, train_config, run_dir, order=order, resume=False, export=False)
    return model, result.steps, time.perf_counter() - t0


def _test_scores(model, tok, test_file: Path, names: Sequence[str], max_new_tokens: int) -> dict:
    """Per-category test exact match and response loss per token, and their means over categories."""
    from jraise.eval import evaluate

    report = evaluate(model, tok, test_file, kinds=("loss", "exact_match"), max_new_tokens=max_new_tokens,
                      batch_size=64)
    em = {c: float(report["exact_match"]["per_category"][c]["accuracy"]) for c in names}
    loss = {c: float(report["loss"]["per_category"][c]["per_token"]) for c in names}
    return {"em": em, "loss": loss, "avg_em": float(np.mean(list(em.values()))),
            "avg_loss": float(np.mean(list(loss.values())))}


def _measure_gamma(base_dir: Path, pool, val_pool, tok, config: BeyondIIDStudyConfig, seed: int,
                   gamma_dir: Path) -> dict:
    from jraise.jobs.intervention import measure_interactions
    from jraise.model import load_model
    from jraise.select.intervention import InterventionConfig

    intervention = InterventionConfig(delta_fraction=config.delta_fraction, base_size=config.budget,
                                      steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                                      schedule=config.schedule, warmup_ratio=config.warmup_ratio, seed=seed,
                                      metric=config.gamma_metric, max_grad_norm=1.0, eval_batch_size=64,
                                      budget=config.gamma_budget, epochs=config.epochs,
                                      self_effect_floor=config.self_effect_floor,
                                      relative_self_effect_floor=config.relative_self_effect_floor)
    model, _ = load_model(base_dir)
    result = measure_interactions(model, pool, val_pool, intervention, gamma_dir, mode=resolved_gamma_mode(config),
                                  tokenizer=tok, progress=False)
    result.pop("stacked_trainable")  # R trained states: not needed past this point
    return result


def run_seed(seed: int, base_dir: Path, work: Path, gamma_root: Path, config: BeyondIIDStudyConfig,
             echo: Callable[[str], None] = print) -> dict:
    """Gamma, tiers, the EE-CPO plan and every arm's fine-tune and test scores for one seed.

    The arms' data orders are saved as ``<work>/seed<s>/orders/<arm>.npy`` (pool indices) next to
    the seed's testbed, so their invariants can be checked from outside."""
    from jraise.data.pool import load_pool
    from jraise.testbed import write_testbed
    from jraise.model import load_tokenizer
    from jraise.select.curriculum import adjacency_edges, dependency_taxonomy, dt_csft_schedule, example_tiers
    from jraise.select.intervention import pool_categories
    from jraise.study_beyond_iid import ee_cpo_remix

    t_seed = time.perf_counter()
    seed_dir = work / f"seed{seed}"
    paths = write_testbed(seed_dir / "testbed", n_train=config.n_pool, noise=config.noise, seed=seed,
                          n_val_per_category=config.n_val, n_test_per_category=config.n_test,
                          categories=list(config.categories))
    tok = load_tokenizer(base_dir)
    pool = load_pool(paths["pool"], tok, max_len=config.max_len)
    val_pool = load_pool(paths["val"], tok, max_len=config.max_len)
    cats = pool_categories(pool)
    pairs = composition_pairs(config.categories)

    # a. Gamma (and D0) by intervention.
    t0 = time.perf_counter()
    measured = _measure_gamma(base_dir, pool, val_pool, tok, config, seed, gamma_root / f"seed{seed}")
    gamma_s = time.perf_counter() - t0
    names, gamma = list(measured["names"]), np.asarray(measured["gamma"], np.float64)
    d0 = np.asarray(measured["base_indices"], np.int64)
    run_length = f"{config.epochs} epochs" if config.gamma_budget == "epochs" else f"{config.steps} steps"
    echo(f"seed {seed}: Gamma from {len(names) + 1} runs x {run_length} ({gamma_s:.0f} s)")

    # b. Tiers.
    taxonomy = dependency_taxonomy(gamma, names, threshold=config.tier_threshold, method=config.tier_method)
    alternative = "net_asymmetry" if config.tier_method == "depth" else "depth"
    other = dependency_taxonomy(gamma, names, threshold=config.tier_threshold, method=alternative)
    truth = true_tiers(config.categories)

    # c. The arms' training sets and orders.
    # Additions are deduplicated by content, so what can be added is the distinct new texts
    # (a recall category such as `fact` repeats its 120 texts throughout the pool).
    keys = [(r["instruction"], r["input"], r["output"]) for r in pool.records]
    ee_set, plan = ee_cpo_remix(gamma, names, d0, cats, keys, seed, edit_fraction=config.edit_fraction,
                                max_change_fraction=config.max_change_fraction,
                                min_per_category=config.min_per_category)
    d0_cats = [cats[i] for i in d0]
    orders = {
        "baseline": repeated_epochs(d0, config.epochs, seed),
        "ee_cpo": repeated_epochs(ee_set, config.epochs, seed),
        "dt_csft": d0[dt_csft_schedule(example_tiers(d0_cats, taxonomy.tiers), seed=seed)],
        "dt_csft_true_tiers": d0[dt_csft_schedule(example_tiers(d0_cats, truth), seed=seed)],
    }
    sets = {"baseline": d0, "ee_cpo": ee_set, "dt_csft": d0, "dt_csft_true_tiers": d0}
    (seed_dir / "orders").mkdir(parents=True, exist_ok=True)

    # d. Fine-tune and evaluate every arm.
    arms = {}
    for arm in ARMS:
        np.save(seed_dir / "orders" / f"{arm}.npy", orders[arm])
        model, steps, train_s = _fine_tune(base_dir, pool, orders[arm], config, seed, seed_dir / arm)
        scores = _test_scores(model, tok, paths["test"], names, config.max_new_tokens)
        low, high = occurrence_range(orders[arm], sets[arm])
        arms[arm] = {**scores, "steps": int(steps), "sequence_length": int(len(orders[arm])),
                     "set_size": int(len(sets[arm])), "min_occurrences": low, "max_occurrences": high,
                     "category_counts": category_counts(cats, sets[arm], names), "train_seconds": round(train_s, 1)}
        echo(f"seed {seed} {arm:>18}: avg EM {scores['avg_em']:.3f}  avg loss {scores['avg_loss']:.3f}  "
             f"({steps} steps, {train_s:.0f} s)")

    return {
        "seed": seed, "names": names, "gamma": gamma.tolist(), "perf": _floats(measured["perf"]),
        "perf_rows": ["D0"] + [f"{int(d):+d} {n}" for d, n in zip(measured["deltas"], names)],
        "deltas": [int(d) for d in measured["deltas"]], "base_counts": [int(c) for c in measured["base_counts"]],
        "gamma_metric": measured["metric"], "gamma_mode": measured["mode"],
        "gamma_timings": {k: round(float(v), 1) for k, v in measured["timings"].items()},
        "dependency_entries": dependency_entries(gamma, names, pairs),
        "other_abs_asymmetries": other_asymmetries(gamma, names, pairs),
        "edges": [list(e) for e in adjacency_edges(taxonomy.adjacency, names)],
        "tiers": taxonomy.tiers, "tier_method": config.tier_method,
        "tiers_alternative": {"method": alternative, "tiers": other.tiers},
        "tier_score": dict(zip(names, _floats(taxonomy.score))),
        "true_tiers": truth, "tier_check": tiers_order_pairs(taxonomy.tiers, pairs),
        "tier_check_alternative": tiers_order_pairs(other.tiers, pairs),
        "plan": {"counts_before": plan.counts_before.tolist(), "counts_after": plan.counts_after.tolist(),
                 "coefficients": _floats(plan.coefficients), "edit_budget": plan.edit_budget, "edits": plan.edits,
                 "objective_before": plan.objective_before, "objective_after": plan.objective_after},
        "arms": arms, "gamma_seconds": round(gamma_s, 1), "seconds": round(time.perf_counter() - t_seed, 1),
    }


# ----------------------------------------------------------------------------------------------
# The study


def run_beyond_iid_study(config: BeyondIIDStudyConfig, work: Path, out_dir: Path,
                         echo: Callable[[str], None] = print) -> dict:
    """Every seed of the study (finished seeds of the same settings are read back from
    ``<work>/rows.jsonl``), plus the mean Gamma over seeds saved under ``<out>/beyond_iid_gamma``.
    Returns {"rows" (one `run_seed` row per seed), "names", "mean_gamma", "base_dir",
    "base_seconds", "pooled_tiers"}."""
    from jraise.data.gamma import save_gamma
    from jraise.study import StudyConfig, build_base, read_jsonl
    from jraise.train.loop import append_jsonl

    work.mkdir(parents=True, exist_ok=True)
    gamma_root = out_dir / "beyond_iid_gamma"
    held_out = tuple(config.categories) if config.base_categories == "others" else ()
    base_config = StudyConfig(targets=held_out, base_pool=config.base_pool, base_steps=config.base_steps,
                              base_lr=config.base_lr, base_seed=config.base_seed, batch_size=config.batch_size,
                              max_len=config.max_len)
    t0 = time.perf_counter()
    base_dir = build_base(work, base_config, echo)
    base_s = time.perf_counter() - t0
    key = settings_key(config)
    rows_file = work / "rows.jsonl"
    done = ({r["seed"]: r for r in read_jsonl(rows_file) if r.get("settings") == key} if rows_file.exists()
            else {})
    rows = []
    for seed in config.seeds:
        row = done.get(seed)
        if row is None or not (gamma_root / f"seed{seed}" / "gamma.json").exists():
            row = {**run_seed(seed, base_dir, work, gamma_root, config, echo), "settings": key}
            append_jsonl(rows_file, row)
        else:
            echo(f"seed {seed}: finished earlier, read from {rows_file}")
        rows.append(row)
    names = rows[0]["names"]
    gammas = np.asarray([r["gamma"] for r in rows], np.float64)
    mean_gamma = gammas.mean(axis=0)
    save_gamma(mean_gamma, names, gamma_root)
    return {"rows": rows, "names": names, "mean_gamma": mean_gamma, "base_dir": str(base_dir),
            "base_seconds": round(base_s, 1), "pooled_tiers": pooled_tiers(gammas, names, config)}


# One-sided level of the replicate t-test for prerequisite edges (`replicated_taxonomy`).
REPLICATE_ALPHA = 0.05


def pooled_tiers(gammas: np.ndarray, names: Sequence[str], config: BeyondIIDStudyConfig) -> dict:
    """Tiers (both methods) and their check against the composition pairs from all seeds' Gammas
    together: ``mean`` applies the single-matrix rule (asymmetry > threshold) to the mean Gamma,
    ``replicated`` keeps an edge only where the seeds agree (`replicated_taxonomy`: mean asymmetry
    > threshold and a one-sided t-test over the seeds at `REPLICATE_ALPHA`; needs 2+ seeds)."""
    from jraise.select.curriculum import adjacency_edges, dependency_taxonomy, replicated_taxonomy

    pairs = composition_pairs(config.categories)
    out = {}
    for method in ("depth", "net_asymmetry"):
        variants = {"mean": dependency_taxonomy(gammas.mean(axis=0), list(names), threshold=config.tier_threshold,
                                                method=method)}
        if len(gammas) >= 2:
            variants["replicated"] = replicated_taxonomy(gammas, list(names), threshold=config.tier_threshold,
                                                         alpha=REPLICATE_ALPHA, method=method)
        out[method] = {v: {"tiers": t.tiers, "check": tiers_order_pairs(t.tiers, pairs),
                           "edges": [list(e) for e in adjacency_edges(t.adjacency, names)]} for v, t in variants.items()}
    return out


# ----------------------------------------------------------------------------------------------
# Summaries


def summarise(rows: Sequence[dict], names: Sequence[str]) -> dict:
    """Mean ± std over seeds: per arm (per-category EM and loss, averages, steps), per arm the
    paired difference to the baseline, the dependency entries, and the tier checks."""
    arms = {}
    for arm in ARMS:
        mine = [r["arms"][arm] for r in rows]
        entry = {"avg_em": mean_std([a["avg_em"] for a in mine]), "avg_loss": mean_std([a["avg_loss"] for a in mine]),
                 "em": {c: mean_std([a["em"][c] for a in mine]) for c in names},
                 "loss": {c: mean_std([a["loss"][c] for a in mine]) for c in names},
                 "steps": sorted({a["steps"] for a in mine}),
                 "diff_avg_em_vs_baseline": mean_std([a["avg_em"] - r["arms"]["baseline"]["avg_em"]
                                                      for a, r in zip(mine, rows)]),
                 "diff_avg_loss_vs_baseline": mean_std([a["avg_loss"] - r["arms"]["baseline"]["avg_loss"]
                                                        for a, r in zip(mine, rows)]),
                 "seeds_better_em": int(sum(a["avg_em"] > r["arms"]["baseline"]["avg_em"] for a, r in zip(mine, rows)))}
        arms[arm] = entry
    dependencies = []
    for k, first in enumerate(rows[0]["dependency_entries"]):
        per = [r["dependency_entries"][k] for r in rows]
        dependencies.append({
            "prerequisite": first["prerequisite"], "composite": first["composite"],
            **{f: mean_std([e[f] for e in per]) for f in
               ("gamma_composite_from_prerequisite", "gamma_prerequisite_from_composite", "asymmetry")},
            "per_seed_asymmetry": [e["asymmetry"] for e in per],
            "seeds_with_edge": int(sum([first["prerequisite"], first["composite"]] in r["edges"] for r in rows)),
            "seeds_with_reverse_edge": int(sum([first["composite"], first["prerequisite"]] in r["edges"] for r in rows)),
        })
    others = [v for r in rows for v in r["other_abs_asymmetries"]]
    effects = [own_effects(r["perf"], r["deltas"], r["gamma_metric"]) for r in rows]
    gamma_runs = {"d0_val": {c: mean_std([r["perf"][0][k] for r in rows]) for k, c in enumerate(names)},
                  "own_effect": {c: mean_std([e[k] for e in effects]) for k, c in enumerate(names)}}
    return {"arms": arms, "dependencies": dependencies, "gamma_runs": gamma_runs,
            "other_abs_asymmetry": mean_std(others) if others else None,
            "tier_checks": [r["tier_check"] for r in rows],
            "tier_checks_alternative": [r["tier_check_alternative"] for r in rows]}


def _pm(pair: Sequence[float], digits: int = 3) -> str:
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(str(x) for x in line) + " |" for line in lines])


def markdown_report(result: dict, summary: dict, config: BeyondIIDStudyConfig, command: str, seconds: float) -> str:
    """The study's markdown report: setup, Gamma entries, tiers, the EE-CPO and DT-CSFT tables."""
    rows, names = result["rows"], result["names"]
    n_seeds = len(rows)
    run_budget = (f"every run {config.epochs} epochs of its own set" if config.gamma_budget == "epochs"
                  else "every run the arms' step budget")
    parts = [
        "# Beyond IID on the built-in testbed",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {seconds:.0f} s (base model {result['base_seconds']:.0f} s, about 0 when reused from the "
        "work directory; seeds "
        + ", ".join(f"{r['seed']}: {r['seconds']:.0f} s" for r in rows) + "; a seed read back from the work "
        "directory shows the time it took when it ran)",
        "",
        f"Categories: {', '.join(names)}; composition pairs (prerequisite -> composite): "
        + ", ".join(f"{p} -> {c}" for p, c in composition_pairs(config.categories)) + ".  ",
        f"Base model: `small` preset, {config.base_steps} steps from scratch (lr {config.base_lr:g}, constant) on "
        f"{config.base_pool} clean records of "
        + ("all 14 default testbed categories" if config.base_categories == "all"
           else "the default testbed categories outside this study's (it has never seen one of them)")
        + ", shared by every seed.  ",
        f"Per seed: testbed pool {config.n_pool} records ({config.noise:.0%} noise), D0 = {config.budget} records "
        f"(the pool's balanced mix); every run and arm: {config.epochs} x {config.budget} examples = "
        f"{config.steps} steps of {config.batch_size}, lr {config.lr:g} {config.schedule} "
        f"(warmup {config.warmup_ratio:.0%}), from the base model.  ",
        f"Gamma: {len(names) + 1} intervention runs (Delta_k = +{config.delta_fraction:.0%} of n0_k, "
        f"{run_budget}, mode "
        f"{rows[0]['gamma_mode']}), per-category response {rows[0]['gamma_metric']} on {config.n_val} val records "
        f"per category, own effects floored at {config.relative_self_effect_floor} x their median (None: no "
        f"floor). Tiers: `dependency_taxonomy` method `{config.tier_method}`, threshold "
        f"{config.tier_threshold:g}. EE-CPO: edit fraction {config.edit_fraction:g} (T = "
        f"{rows[0]['plan']['edit_budget']}), at most {config.max_change_fraction} x T changed per category (None: "
        f"no cap), importance alpha = D0's proportions, min {config.min_per_category} per "
        f"category, candidates = the pool outside D0 (added at random). Test: {config.n_test} records per category, greedy exact match.  ",
        f"Seeds: {[r['seed'] for r in rows]}; values are mean ± sample std over seeds"
        + (" (one seed: std 0)." if n_seeds == 1 else "."),
        "",
        "## Headline",
        "",
        *_headline(summary, rows, config, result["pooled_tiers"]),
        "",
        "## Gamma entries of the by-construction dependencies",
        "",
        "Gamma[target, source]: one source record's effect on the target, in target-record equivalents. "
        "If p is a prerequisite of composite c, training on p should help c more than c helps p: "
        "asymmetry = Gamma[c, p] - Gamma[p, c] > 0; the library draws the edge p -> c when it exceeds "
        f"{config.tier_threshold:g}.",
        "",
        _table(["prerequisite p", "composite c", "Gamma[c, p]", "Gamma[p, c]", "asymmetry", "per seed",
                "seeds with edge p -> c", "seeds with c -> p"],
               [[d["prerequisite"], d["composite"], _pm(d["gamma_composite_from_prerequisite"], 2),
                 _pm(d["gamma_prerequisite_from_composite"], 2), _pm(d["asymmetry"], 2),
                 ", ".join(f"{v:+.2f}" for v in d["per_seed_asymmetry"]), f"{d['seeds_with_edge']}/{n_seeds}",
                 f"{d['seeds_with_reverse_edge']}/{n_seeds}"] for d in summary["dependencies"]]),
        "",
        "Reference: |Gamma[a, b] - Gamma[b, a]| over the pairs without a composition relation: "
        + (_pm(summary["other_abs_asymmetry"], 2) + " (all seeds pooled)." if summary["other_abs_asymmetry"]
           else "none in this category set."),
        "",
        f"Gamma's row divisors: the D0 run's val {rows[0]['gamma_metric']} and the own effect e_kk (improvement "
        "per added own record, x 1000); a small e_kk divides its row's noise by a small number:",
        "",
        _table(["category", f"D0 val {rows[0]['gamma_metric']}", "e_kk x 1000"],
               [[c, _pm(summary["gamma_runs"]["d0_val"][c], 3),
                 _pm([1000 * v for v in summary["gamma_runs"]["own_effect"][c]], 3)] for c in names]),
        "",
        "Mean Gamma over seeds (rows = target, columns = source; also `beyond_iid_gamma/gamma.csv`):",
        "",
        _table(["target \\ source", *names],
               [[t, *(f"{v:+.2f}" for v in row)] for t, row in zip(names, result["mean_gamma"])]),
        "",
        "## Tiers derived from Gamma",
        "",
        _table(["category", "true tier", *(f"seed {r['seed']} ({r['tier_method']})" for r in rows),
                *(f"seed {r['seed']} ({r['tiers_alternative']['method']})" for r in rows)],
               [[c, TIER_NAMES[rows[0]["true_tiers"][c]], *(TIER_NAMES[r["tiers"][c]] for r in rows),
                 *(TIER_NAMES[r["tiers_alternative"]["tiers"][c]] for r in rows)] for c in names]),
        "",
        "Composition pairs with the prerequisite in an earlier tier (strictly before / same tier / after): "
        + "; ".join(f"seed {r['seed']}: {r['tier_check']['prerequisite_first']}/{r['tier_check']['same_tier']}/"
                    f"{r['tier_check']['composite_first']} ({r['tier_method']}), "
                    f"{r['tier_check_alternative']['prerequisite_first']}/{r['tier_check_alternative']['same_tier']}/"
                    f"{r['tier_check_alternative']['composite_first']} ({r['tiers_alternative']['method']})"
                    for r in rows) + ".  ",
        "Prerequisite edges per seed: " + "; ".join(
            f"seed {r['seed']}: " + (", ".join(f"{a} -> {b}" for a, b in r["edges"]) or "none") for r in rows) + ".",
        "",
        "From all seeds' Gammas together (`mean`: the threshold rule on the mean Gamma; `replicated`: edges "
        f"only where the seeds agree, one-sided t-test at {REPLICATE_ALPHA:g} on top of the threshold):",
        "",
        _table(["method", "variant", "prerequisite before / same / after", "tiers", "edges"],
               [[m, v, f"{t['check']['prerequisite_first']}/{t['check']['same_tier']}/{t['check']['composite_first']}",
                 ", ".join(f"{c} {TIER_NAMES[t['tiers'][c]]}" for c in names),
                 ", ".join(f"{a} -> {b}" for a, b in t["edges"]) or "none"]
                for m, variants in result["pooled_tiers"].items() for v, t in variants.items()]),
        "",
        "## EE-CPO mix vs the baseline mix (same budget, same steps)",
        "",
        "Category counts (D0 -> EE-CPO) per seed: " + "; ".join(
            f"seed {r['seed']}: " + ", ".join(f"{n} {a}->{b}" for n, a, b in
                                             zip(names, r["plan"]["counts_before"], r["plan"]["counts_after"]))
            for r in rows) + ".",
        "",
    ]
    parts += _arm_tables(summary, names, ("baseline", "ee_cpo"))
    parts += ["", "## DT-CSFT order vs shuffled order (same records, each 3 times, same steps)", ""]
    parts += _arm_tables(summary, names, ("baseline", "dt_csft", "dt_csft_true_tiers"))
    return "\n".join(parts) + "\n"


def _headline(summary: dict, rows: Sequence[dict], config: BeyondIIDStudyConfig,
              pooled: Mapping[str, dict]) -> list[str]:
    """Bullet lines with the numbers the report is about (all computed from this run)."""
    arms, n = summary["arms"], len(rows)
    deps = summary["dependencies"]
    positive = sum(d["asymmetry"][0] > 0 for d in deps)
    edges = sum(d["seeds_with_edge"] for d in deps)
    first = sum(r["tier_check"]["prerequisite_first"] for r in rows)
    total = sum(r["tier_check"]["pairs"] for r in rows)
    p = arms["baseline"]["avg_em"][0]
    sampling = math.sqrt(p * (1 - p) / (config.n_test * len(rows[0]["names"])))

    def diff(arm):
        d = arms[arm]["diff_avg_em_vs_baseline"]
        return (f"{_pm(arms[arm]['avg_em'])} vs {_pm(arms['baseline']['avg_em'])}, paired difference "
                f"{d[0]:+.3f} ± {d[1]:.3f}, better in {arms[arm]['seeds_better_em']}/{n} seeds")

    return [
        f"- Composition pairs whose mean asymmetry Gamma[c, p] - Gamma[p, c] is positive: {positive}/{len(deps)}; "
        f"edges p -> c drawn in {edges} of {len(deps) * n} (pair, seed) cases.",
        f"- Derived tiers ({config.tier_method}) put the prerequisite strictly before the composite in {first} of "
        f"{total} (pair, seed) cases (independent uniform tiers would do so in about 1 of 3)."
        + "".join(f" From all seeds' Gammas ({v}): {t['check']['prerequisite_first']} of {t['check']['pairs']} pairs."
                  for v, t in pooled[config.tier_method].items()),
        f"- Average test EM, EE-CPO vs baseline mix: {diff('ee_cpo')}.",
        f"- Average test EM, DT-CSFT (derived tiers) vs shuffled: {diff('dt_csft')}.",
        f"- Average test EM, DT-CSFT (true tiers) vs shuffled: {diff('dt_csft_true_tiers')}.",
        f"- Scale of noise: the binomial std of one arm's average EM from the test sample alone is about "
        f"{sampling:.3f} ({config.n_test} x {len(rows[0]['names'])} test records).",
    ]


def _arm_tables(summary: dict, names: Sequence[str], arms: Sequence[str]) -> list[str]:
    s = summary["arms"]
    em = _table(["arm", *names, "average EM", "diff vs baseline", "seeds better", "avg loss", "steps"],
                [[ARM_LABELS[a], *(_pm(s[a]["em"][c], 2) for c in names), _pm(s[a]["avg_em"]),
                  "" if a == "baseline" else f"{s[a]['diff_avg_em_vs_baseline'][0]:+.3f} ± "
                                             f"{s[a]['diff_avg_em_vs_baseline'][1]:.3f}",
                  "" if a == "baseline" else str(s[a]["seeds_better_em"]), _pm(s[a]["avg_loss"]),
                  "/".join(map(str, s[a]["steps"]))] for a in arms])
    loss = _table(["arm", *names],
                  [[ARM_LABELS[a], *(_pm(s[a]["loss"][c], 3) for c in names)] for a in arms])
    return ["Test exact match per category:", "", em, "", "Test response loss per token per category:", "", loss]


def plot_report(summary: dict, names: Sequence[str], path: Path) -> Path:
    """Two panels: test exact match per category and on average for every arm (mean ± std over
    seeds), and the dependency entries Gamma[c, p] vs Gamma[p, c]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [3, 1.4]})
    labels = [*names, "average"]
    x = np.arange(len(labels))
    width = 0.8 / len(ARMS)
    for k, arm in enumerate(ARMS):
        s = summary["arms"][arm]
        means = [s["em"][c][0] for c in names] + [s["avg_em"][0]]
        stds = [s["em"][c][1] for c in names] + [s["avg_em"][1]]
        ax1.bar(x + (k - (len(ARMS) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=ARM_LABELS[arm])
    ax1.set_xticks(x, labels, rotation=20, ha="right")
    ax1.set_ylabel("test exact match")
    ax1.set_title("Fine-tunes at one budget (mean ± std over seeds)")
    ax1.legend(fontsize=8)
    deps = summary["dependencies"]
    y = np.arange(len(deps))
    ax2.barh(y - 0.2, [d["gamma_composite_from_prerequisite"][0] for d in deps], 0.4,
             xerr=[d["gamma_composite_from_prerequisite"][1] for d in deps], label="Gamma[c, p]", capsize=2)
    ax2.barh(y + 0.2, [d["gamma_prerequisite_from_composite"][0] for d in deps], 0.4,
             xerr=[d["gamma_prerequisite_from_composite"][1] for d in deps], label="Gamma[p, c]", capsize=2)
    ax2.set_yticks(y, [f"p={d['prerequisite']}\nc={d['composite']}" for d in deps], fontsize=8)
    ax2.axvline(0, color="black", linewidth=0.5)
    ax2.set_title("Composition pairs in Gamma")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# The command line's ``--quick``: a tiny configuration (a smoke test of the pipeline, not a measurement).
QUICK = dict(categories=("reverse", "upper", "reverse_upper"), seeds=(0,), n_pool=120, budget=48, batch_size=8,
             n_val=2, n_test=2, base_pool=200, base_steps=4, max_new_tokens=4, self_effect_floor=1e-6)


def write_study(config: BeyondIIDStudyConfig, work: Path, out_dir: Path, command: str,
                echo: Callable[[str], None] = print) -> tuple[dict, str]:
    """Runs (or resumes) the study in ``work`` and writes ``<out_dir>/beyond_iid_study.md`` (the
    report, headed by ``command``), ``.json`` (the document: command, wall seconds, config,
    steps per run, names, composition pairs, mean Gamma, pooled tiers, summary and every seed's
    row) and ``.png`` (`plot_report`). Returns (the document, the report text)."""
    from jraise.atomic import atomic_write_text

    out_dir = Path(out_dir)
    start = time.perf_counter()
    result = run_beyond_iid_study(config, Path(work), out_dir, echo)
    summary = summarise(result["rows"], result["names"])
    seconds = time.perf_counter() - start
    document = {"command": command, "wall_seconds": round(seconds, 1), "config": asdict(config),
                "steps_per_run": config.steps, "names": result["names"],
                "composition_pairs": composition_pairs(config.categories), "base_seconds": result["base_seconds"],
                "mean_gamma": result["mean_gamma"].tolist(), "pooled_tiers": result["pooled_tiers"],
                "summary": summary, "rows": result["rows"]}
    out_dir.mkdir(parents=True, exist_ok=True)
    report = markdown_report(result, summary, config, command, seconds)
    atomic_write_text(out_dir / "beyond_iid_study.md", report)
    atomic_write_text(out_dir / "beyond_iid_study.json", json.dumps(document, indent=1) + "\n")
    plot_report(summary, result["names"], out_dir / "beyond_iid_study.png")
    return document, report
