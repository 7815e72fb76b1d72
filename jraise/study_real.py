"""The real-model study: every selection method at one budget on SmolLM2-135M-Instruct and the real pool.

The protocol is the selection study's (`jraise.study`: same methods, budgets, fine-tunes and
reference rows), with three things swapped for real ones by `RealBench`:

* **Model.** The base is SmolLM2-135M-Instruct (`jraise.fetch.fetch_smollm2`: the pinned GGUF,
  dequantised), never trained here. Every fine-tune (each row, SSPL, RAISE's learner, Gamma's
  runs) trains rank-``lora_rank`` LoRA adapters on q, k, v, o (alpha = 2 x rank) with the base frozen;
  the auxiliary model of perplexity, IFD, RDS, RAISE's features and ROSE's model-answer pairs is
  the same base model.
* **Data.** One real pool (`jraise.real_pool.write_real_pool`, seed ``pool_seed``), built once per
  work directory and shared by every seed: the seeds vary the methods (selection randomness,
  LoRA initialisation, batch order), not the data, so every row is scored on the same test
  records (and the base row is scored once). The targets hold ``per_target`` pool records each,
  fewer than the other categories' ``per_category``: with a small target share a random 5%
  seldom holds a target record, so what target records add shows against random. The
  selectors see ``pool.jsonl`` and the targets' few-shot ``val.jsonl`` /
  ``val_pref.jsonl``; Gamma (EE-CPO, DT-CSFT) also reads ``val_other.jsonl`` (few records of every
  other category: it measures how categories act on each other); nothing reads ``noise.jsonl``
  or ``test.jsonl`` but the study's own truth and scores.
* **Scores.** Per category of ``test.jsonl``: multiple-choice accuracy by option
  log-likelihood (EOS included, unnormalised), or exact match after greedy decoding with the set's
  normaliser (ASDiv: the number; NQ-open, TruthfulQA: SQuAD's normalisation, any accepted
  answer). The ``generative`` categories (default: the targets BoolQ and SIQA) are asked as their
  instruction asks, "Answer yes or no." / "Answer with the text of the correct option", and
  scored by SQuAD-normalised exact match of the right option's text (`as_generative`): the base
  model answers in sentences ("No, the movie is not ..."), and what a fine-tune on the right
  records teaches shows in this score. ``target_acc`` is the mean over the targets, ``all_acc``
  the mean over every category (macro: targets have ``n_test`` records, the others
  ``n_test_other``).

ROSE runs twice: ``rose`` on the pool's real preference pairs (chosen = the right answer, rejected =
a wrong option), ``rose_model`` on model-answer pairs (rejected = the base model's greedy answer).
LESS and the two ROSE rows share one warmup and one set of train-side features per seed
(``influence_shared_work``), so the later rows' selection seconds count only their validation side.

`RealStudyConfig` holds the CPU size and `real_study_size` the larger ones; `real_demo_config`
the size `jraise demo --real` runs (measured times in BUILD_NOTES).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jraise.atomic import atomic_write_jsonl, atomic_write_text
from jraise.errors import JraiseError
from jraise.study import INFLUENCE_METHODS, PoolTruth, StudyConfig, read_jsonl

# The categories whose short records are plentiful under the CPU length policy (128 tokens):
# LogiQA, MedQA and PubMedQA have 47, 63 and 1 records that short, so they join at the larger sizes.
CPU_CATEGORIES = ("mmlu", "boolq", "commonsenseqa", "piqa", "siqa", "openbookqa", "asdiv", "nq_open", "truthfulqa",
                  "hellaswag")
REAL_METHODS = ("random", "full", "longest", "perplexity", "ifd", "rds", "less", "rose", "rose_model",
                "less_per_target", "rose_per_target", "ee_cpo", "dt_csft", "sspl", "raise", "raise_sampled")
FULL_STUDY_METHODS = REAL_METHODS + ("oracle", "full_run")  # the 90-minute bar is for one seed of these
POOL_DIR = "pool"
POOL_SETTINGS = "pool_settings.json"


@dataclass(frozen=True)
class RealStudyConfig(StudyConfig):
    """The study's options (`StudyConfig`) at the real study's CPU size, plus the real pool's.

    The testbed-only options (``n_pool``, ``base_*``) are unused: the pool's size follows from
    ``categories`` x ``per_category`` and the length policy, and the base model is SmolLM2.
    ``rose_pairs="testbed"`` means the data's own pairs, here the real pool's ``val_pref.jsonl``.
    """

    methods: tuple[str, ...] = FULL_STUDY_METHODS
    seeds: tuple[int, ...] = (0,)
    targets: tuple[str, ...] = ("boolq", "siqa")
    # 40% planted noise: at this scale a fine-tune on 24 records learns the answer form, and wrong
    # answers teach a wrong form, so noise is what a selection must avoid; at 20% a random 5% held
    # few enough noisy records to tie the oracle (BUILD_NOTES, "informativeness").
    noise: float = 0.4
    fraction: float = 0.05
    steps: int = 16
    batch_size: int = 8
    lr: float = 5e-4
    n_test: int = 300
    max_len: int = 192
    lora_rank: int = 8
    influence_lora_rank: int = 8
    influence_proj_dim: int = 1024
    influence_warmup_epochs: int = 2
    influence_adam_first_moment: bool = False
    influence_shared_work: bool = True
    rose_pairs: str = "testbed"
    raise_episodes: int = 3
    raise_steps: int = 16
    raise_clusters: int = 4
    sspl_refresh_every: int = 8
    gamma_steps: int = 6
    # D0 is 5% of 480 records, 2-3 per category: the testbed's floor of 5 forbids every deletion
    # (the plan is D0 unchanged), so a category may shrink to 1 record.
    ee_cpo_min_per_category: int = 1
    full_run_epochs: int = 1
    # The real pool (`jraise.real_pool.write_real_pool`).
    categories: tuple[str, ...] = CPU_CATEGORIES
    # 8 x 55 + 2 x 20 = 480 records: 5% is 24, three whole batches of 8. Targets are 8% of the pool,
    # so a random 5% holds about 2 target records and the oracle's 24 clean ones are what clean
    # target records add (at 20%, random drew 6-9 and matched the oracle: BUILD_NOTES).
    per_category: int = 55
    per_target: int | None = 20
    max_tokens: int = 128
    n_val: int = 8
    n_val_other: int = 4
    n_test_other: int = 5
    pool_seed: int = 0
    # Categories scored by greedy exact match of the right option's text although they have
    # options (`as_generative`): what their instruction asks for ("Answer yes or no.").
    generative: tuple[str, ...] = ("boolq", "siqa")

    def __post_init__(self):
        super().__post_init__()
        for name, chosen in (("targets", self.targets), ("generative", self.generative)):
            missing = [t for t in chosen if t not in self.categories]
            if missing:
                raise ValueError(f"{name} {missing} are not among the study's categories {list(self.categories)}")
        if self.lora_rank < 1:
            raise ValueError(f"the real study fine-tunes by LoRA: lora_rank must be >= 1, got {self.lora_rank}")

    def model_identity(self):
        """The pinned SmolLM2 wheel and evaluation-data directory: what the base model and sets are."""
        from jraise.fetch.eval_data import EVAL_DATA_DIR
        from jraise.fetch.smollm2 import SMOLLM2_NAME, SMOLLM2_WHEEL

        return {"model": SMOLLM2_NAME, "wheel_sha256": SMOLLM2_WHEEL.sha256, "eval_data": EVAL_DATA_DIR,
                "scoring": SCORING}

    def pool_settings(self) -> dict:
        return {"targets": list(self.targets), "noise": self.noise, "seed": self.pool_seed, "n_val": self.n_val,
                "n_test": self.n_test, "per_category": self.per_category, "per_target": self.per_target,
                "max_tokens": self.max_tokens,
                "categories": list(self.categories), "n_val_other": self.n_val_other,
                "n_test_other": self.n_test_other, "identity": self.model_identity()}


SIZES = {
    # The default: sized for 2 CPU cores (one seed of every method takes longer than the issue's
    # 90 minutes there; measured times in BUILD_NOTES).
    "cpu": {},
    # A GPU: the full length policy and every category, a larger pool, longer runs, three seeds.
    "gpu": {"seeds": (0, 1, 2), "categories": None, "per_category": 300, "per_target": 100, "max_tokens": 384,
            "max_len": 448, "steps": 120, "batch_size": 16, "lr": 2e-4, "n_test_other": 50, "raise_episodes": 8,
            "raise_steps": 120, "sspl_refresh_every": 30, "gamma_steps": 60, "influence_proj_dim": 8192,
            "influence_warmup_epochs": 4},
}


def real_study_size(size: str = "cpu", **overrides) -> RealStudyConfig:
    """The config of a named size (`SIZES`) with ``overrides``; ``categories: None`` means every
    multiple-choice and generative set of the cache."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; sizes: {', '.join(SIZES)}")
    fields = {**SIZES[size], **overrides}
    if fields.get("categories", CPU_CATEGORIES) is None:
        fields["categories"] = ALL_CATEGORIES
    return RealStudyConfig(**fields)


ALL_CATEGORIES = ("mmlu", "boolq", "commonsenseqa", "piqa", "siqa", "openbookqa", "logiqa", "medqa", "pubmedqa",
                  "asdiv", "nq_open", "truthfulqa", "hellaswag")


def real_demo_config(**overrides) -> RealStudyConfig:
    """`jraise demo --real`: a smaller pool and test set and the four headline methods with the
    oracle (aimed at about 20 minutes on 2 CPU cores; measured times in BUILD_NOTES)."""
    # 8 x 24 + 2 x 10 = 212 records (5%: 11); 8 steps of 8, and one RAISE episode as long as the
    # deployed run (`steps` overridden alone moves it too); LESS warms up for one epoch, so its
    # features come from one checkpoint, not two (half the per-example gradients, the largest cost).
    # 100 test records per target: at 50 the oracle-random margin (about 0.09 in the study) is
    # under 2 SE (BUILD_NOTES).
    steps = overrides.get("steps", 8)
    return RealStudyConfig(**{"methods": ("random", "less", "rose", "raise", "oracle"), "per_category": 24,
                              "per_target": 10, "n_test": 100, "n_test_other": 0, "n_val_other": 0, "steps": steps,
                              "influence_warmup_epochs": 1, "raise_episodes": 1, "raise_steps": steps, **overrides})


def more_seed_runs(extra_seeds: str | None, extra_methods: str, also: Sequence[str] = ()) -> list[tuple]:
    """The benchmark's runs after its main seeds, as [(seeds, methods)]: ``extra_seeds`` ("1,2") of
    ``extra_methods`` ("random,less"), then each ``also`` item "SEEDS:METHODS" ("3,4:random").
    Raises ValueError naming an item that is not of that form."""
    def ints(text: str, where: str) -> tuple[int, ...]:
        try:
            seeds = tuple(int(x) for x in text.split(","))
        except ValueError:
            raise ValueError(f"{where}: seeds must be comma-separated integers, got {text!r}") from None
        return seeds

    runs = [(ints(extra_seeds, "--extra-seeds"), tuple(extra_methods.split(",")))] if extra_seeds else []
    for item in also:
        seeds, sep, methods = item.partition(":")
        if not sep or not seeds or not methods:
            raise ValueError(f"--also {item!r}: expected SEEDS:METHODS, e.g. 3,4:random")
        runs.append((ints(seeds, f"--also {item!r}"), tuple(methods.split(","))))
    return runs


def rows_from_report(work: str | Path, report: str | Path) -> int:
    """Adds the finished rows of an earlier report (``write_report``'s JSON: its ``base`` and
    ``rows``) to ``work``'s ``rows.jsonl``, so a fresh work directory (the pool and base are rebuilt
    deterministically) resumes where that report stopped. A row already there for the same method,
    seed and settings is kept; rows whose settings differ from the run's are ignored by
    `jraise.study.run_study` as usual. Returns how many rows were added; ``rows.jsonl`` is
    rewritten atomically. Raises JraiseError naming the file, row and field of a malformed report."""
    report = Path(report)
    try:
        data = json.loads(report.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise JraiseError(f"{report}: not JSON ({e.msg}, line {e.lineno})", path=report) from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise JraiseError(f"{report}: field 'rows': expected a list of study rows (a real_study.json report)",
                          path=report, field="rows")
    named = [(f"rows[{i}]", row) for i, row in enumerate(data["rows"])]
    if data.get("base"):
        named.insert(0, ("base", data["base"]))
    for where, row in named:
        if not isinstance(row, dict):
            raise JraiseError(f"{report}: {where}: expected an object", path=report, record=where)
        for field in ("method", "seed", "settings"):
            if field not in row:
                raise JraiseError(f"{report}: {where}: missing field {field!r}", path=report, record=where,
                                  field=field)
    found = [row for _, row in named]
    work = Path(work)
    rows_file = work / "rows.jsonl"
    old = read_jsonl(rows_file) if rows_file.exists() else []
    have = {(r.get("method"), r.get("seed"), r.get("settings")) for r in old}
    added = []
    for row in found:  # the first row of a method, seed and settings is kept
        key = (row["method"], row["seed"], row["settings"])
        if key not in have:
            have.add(key)
            added.append(row)
    if added:
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_jsonl(rows_file, old + added)
    return len(added)


# ----------------------------------------------------------------------------------------------
# Data and scores


def pool_truth(pool_file: Path, noise_file: Path) -> PoolTruth:
    """Categories of the pool's records and which of them are planted noise (``noise.jsonl`` ids)."""
    records = read_jsonl(pool_file)
    noisy_ids = {t["id"] for t in read_jsonl(noise_file)}
    unknown = noisy_ids - {r["id"] for r in records}
    if unknown:
        raise ValueError(f"{noise_file}: ids not in {pool_file}: {sorted(unknown)[:3]}")
    return PoolTruth(tuple(r["category"] for r in records), np.array([r["id"] in noisy_ids for r in records], bool))


def source_normalisers() -> dict[str, str | None]:
    """{set name: exact-match normaliser} from the sets' definitions (`jraise.fetch.eval_sets`),
    so a cache converted before a normaliser changed is scored the current way."""
    from jraise.fetch.eval_sets import EVAL_SETS

    return {s.name: s.normaliser for s in EVAL_SETS}


# What the scores are: a change here invalidates finished rows (`RealStudyConfig.model_identity`).
SCORING = ("mc: option log-likelihood, EOS, unnormalised; gen (and `generative` categories): greedy, any "
           "reference, set normaliser (else squad)")


def as_generative(record: dict) -> dict:
    """A multiple-choice record asked as a generative one: the options stay in the instruction (it
    lists them), the reference is the right option's text (``output``)."""
    return {k: v for k, v in record.items() if k not in ("options", "answer")}


def category_scores(model, tok, records: Sequence[dict], normalisers: dict, batch_size: int = 32,
                    max_new_tokens: int = 16, generative: Collection[str] = ()) -> dict[str, float]:
    """{category: accuracy}: multiple-choice log-likelihood accuracy for records with ``options``,
    exact match with the category's normaliser (``squad`` where the set has none) for the others
    and for every record of a ``generative`` category (`as_generative`)."""
    from jraise.eval import evaluate

    scores: dict[str, float] = {}
    records = [as_generative(r) if r["category"] in generative else r for r in records]
    choice = [r for r in records if r.get("options") is not None]
    if choice:
        report = evaluate(model, tok, choice, kinds=("multiple_choice",), batch_size=batch_size)
        scores |= {c: v["accuracy"] for c, v in report["multiple_choice"]["per_category"].items()}
    by_normaliser: dict[str, list[dict]] = {}
    for r in records:
        if r.get("options") is None:
            by_normaliser.setdefault(normalisers.get(r["category"]) or "squad", []).append(r)
    for normaliser, group in by_normaliser.items():
        report = evaluate(model, tok, group, kinds=("exact_match",), batch_size=batch_size,
                          max_new_tokens=max_new_tokens, normaliser=normaliser)
        scores |= {c: v["accuracy"] for c, v in report["exact_match"]["per_category"].items()}
    return scores


class RealBench:
    """The study's data and scores on SmolLM2-135M-Instruct and the real pool (module docstring)."""

    name = "SmolLM2-135M-Instruct + LoRA, real pool"
    data_per_seed = False  # one pool and test set for every seed: the base row is scored once
    columns = (("target_acc", "target acc.", 2), ("all_acc", "all-category acc.", 2),
               ("noisy_share", "noisy share", 2), ("target_share", "target share", 2),
               ("clean_target_share", "clean target share", 2), ("select_seconds", "selection s", 0))
    score_label = "test accuracy (MC log-likelihood or exact match)"

    def __init__(self, cache: str | Path | None = None, echo: Callable[[str], None] = print):
        self.cache = cache
        self.echo = echo

    def base(self, work: Path, config: RealStudyConfig, echo: Callable[[str], None]) -> Path:
        from jraise.fetch import fetch_smollm2

        return fetch_smollm2(self.cache)

    def seed_data(self, work: Path, config: RealStudyConfig, seed: int) -> tuple[dict[str, Path], PoolTruth]:
        """The work directory's real pool (built on first use, rebuilt when its settings change;
        the same for every seed) as the study's paths, with its truth."""
        from jraise.fetch import fetch_eval_data, fetch_smollm2
        from jraise.model import load_tokenizer
        from jraise.real_pool import write_real_pool

        out = work / POOL_DIR
        stamp = work / POOL_SETTINGS
        settings = config.pool_settings()
        if not (stamp.exists() and json.loads(stamp.read_text()) == settings and (out / "val_all.jsonl").exists()):
            stamp.unlink(missing_ok=True)
            written = write_real_pool(out, eval_data_dir=fetch_eval_data(self.cache), targets=config.targets,
                                      noise=config.noise, seed=config.pool_seed, n_val=config.n_val,
                                      n_test=config.n_test, per_category=config.per_category,
                                      per_target=config.per_target,
                                      max_tokens=config.max_tokens, tokenizer=load_tokenizer(fetch_smollm2(self.cache)),
                                      categories=config.categories, n_val_other=config.n_val_other,
                                      n_test_other=config.n_test_other)
            others = read_jsonl(written["val_other"]) if "val_other" in written else []
            atomic_write_jsonl(out / "val_all.jsonl", read_jsonl(written["val"]) + others)
            atomic_write_text(stamp, json.dumps(settings, indent=2) + "\n")
            manifest = json.loads(written["manifest"].read_text())
            self.echo(f"real pool: {manifest['pool']} records of {len(manifest['categories'])} categories, "
                      f"{manifest['noisy']} noisy; targets {', '.join(config.targets)} ({out})")
        paths = {"pool": out / "pool.jsonl", "val_target": out / "val.jsonl", "val_pref_target": out / "val_pref.jsonl",
                 "val": out / "val_all.jsonl", "test": out / "test.jsonl", "noise": out / "noise.jsonl"}
        return paths, pool_truth(paths["pool"], paths["noise"])

    def scores(self, model, tok, paths: dict, config: RealStudyConfig) -> dict:
        per_category = category_scores(model, tok, read_jsonl(paths["test"]), source_normalisers(),
                                       generative=config.generative)
        return {"target_acc": float(np.mean([per_category[c] for c in config.targets])),
                "all_acc": float(np.mean(list(per_category.values()))), "per_category": per_category}


def run_real_study(work: str | Path, config: RealStudyConfig = RealStudyConfig(), cache: str | Path | None = None,
                   echo: Callable[[str], None] = print) -> dict:
    """`jraise.study.run_study` on `RealBench` (resumable the same way)."""
    from jraise.study import run_study

    return run_study(work, config, echo=echo, bench=RealBench(cache, echo))


# ----------------------------------------------------------------------------------------------
# The report


def target_standard_error(per_category: dict, config: RealStudyConfig) -> float:
    """Binomial standard error of ``target_acc`` (the mean of the targets' accuracies, each on
    ``n_test`` records), at the given accuracies."""
    p = np.array([per_category[t] for t in config.targets], np.float64)
    return float(np.sqrt(np.sum(p * (1 - p) / config.n_test)) / len(p))


def _mean_over_seeds(rows: Sequence[dict], method: str, key: str) -> float | None:
    values = [r[key] for r in rows if r["method"] == method]
    return float(np.mean(values)) if values else None


def seed_margin(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(mean(a) - mean(b), its standard error) for two rows' per-seed scores, at least 2 seeds each:
    the SE of the difference of the seed means (Welch, sqrt(s_a^2/n_a + s_b^2/n_b)), which holds the
    test set's noise and each row's seed-to-seed spread."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a seed-level margin needs at least 2 seeds of each row, got {len(a)} and {len(b)}")
    return float(a.mean() - b.mean()), float(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))


def _in_diff(margin: float, diff_se: float) -> str:
    return f"{margin / diff_se:+.1f}x" if diff_se > 0 else "undefined (no spread)"


def _target_acc_by_method(rows: Sequence[dict]) -> dict[str, list[float]]:
    """Each method's per-seed target accuracies (rows without one are left out)."""
    seeds: dict[str, list[float]] = {}
    for r in rows:
        if "target_acc" in r:
            seeds.setdefault(r["method"], []).append(r["target_acc"])
    return seeds


def _methods_over_seeds(seeds: dict[str, list[float]]) -> list[str]:
    """For each method other than the oracle and random with at least 2 seeds (``seeds``:
    `_target_acc_by_method`): its seed-level margin over random and over the oracle (where they
    have 2 seeds or more), `seed_margin`."""
    lines = []
    for method, mine in seeds.items():
        if method in ("oracle", "random") or len(mine) < 2:
            continue
        said = []
        for ref in ("random", "oracle"):
            if len(seeds.get(ref, ())) > 1:
                margin, diff_se = seed_margin(mine, seeds[ref])
                said.append(f"vs {ref}: margin {margin:+.3f} = {_in_diff(margin, diff_se)}")
        if said:
            lines.append(f"{method} over {len(mine)} seeds, target acc. {np.mean(mine):.3f} +- "
                         f"{np.std(mine, ddof=1):.3f}; " + "; ".join(said) + " (in SEs of the difference of seed means)")
    return lines


def checks(result: dict, config: RealStudyConfig) -> list[str]:
    """The acceptance figures in words: the oracle's margin over the base and random in standard
    errors of the target accuracy (and, with several seeds of both, their seed-to-seed spread beside
    that SE), every other method with several seeds against random and the oracle over seeds
    (`seed_margin`), the time of each seed that has a row of every method in ``config.methods``,
    and LESS's / ROSE's clean-target share against the pool's."""
    rows, base, pool = result["rows"], result["base"], result["pool"]
    by_method = _target_acc_by_method(rows)
    lines = [f"pool: noisy share {pool['noisy_share']:.2f}, target share {pool['target_share']:.2f}, "
             f"clean target share {pool['clean_target_share']:.2f}"]
    oracle = [r for r in rows if r["method"] == "oracle"]
    if oracle:
        se = target_standard_error(oracle[0]["per_category"], config)
        acc = _mean_over_seeds(rows, "oracle", "target_acc")
        for name, ref in (("base", base["target_acc"]), ("random", _mean_over_seeds(rows, "random", "target_acc"))):
            if ref is not None:
                in_se = f"{(acc - ref) / se:+.1f} SE" if se > 0 else "undefined in SE (accuracies of 0 or 1)"
                lines.append(f"oracle vs {name}: target acc. {acc:.3f} vs {ref:.3f}, margin {acc - ref:+.3f} = "
                             f"{in_se} (SE {se:.3f}; needs > 2)")
        spread = {m: by_method.get(m, []) for m in ("oracle", "random")}
        if all(len(v) > 1 for v in spread.values()):
            said = ", ".join(f"{m} {np.std(v, ddof=1):.3f} over {len(v)} seeds" for m, v in spread.items())
            lines.append(f"seed spread of target acc. (sample std): {said}; the test set's SE is {se:.3f}")
            margin, diff_se = seed_margin(spread["oracle"], spread["random"])
            lines.append(f"oracle vs random over seeds: margin {margin:+.3f} = {_in_diff(margin, diff_se)} the SE of "
                         f"the difference of seed means ({diff_se:.3f}, seed-to-seed variation included)")
    lines += _methods_over_seeds(by_method)
    for seed in sorted({r["seed"] for r in rows}):
        mine = {r["method"]: r for r in rows if r["seed"] == seed}
        if set(config.methods) <= set(mine):
            minutes = sum(mine[m]["total_seconds"] for m in config.methods) / 60
            bar = "; the bar: 90 min on 2 CPU cores" if set(FULL_STUDY_METHODS) <= set(config.methods) else ""
            lines.append(f"seed {seed}: one seed of every method ({len(config.methods)} rows) took {minutes:.0f} min "
                         f"on this machine (the rows' own times, summed{bar})")
    for method in INFLUENCE_METHODS:
        share = _mean_over_seeds(rows, method, "clean_target_share")
        if share is not None:
            noisy = _mean_over_seeds(rows, method, "noisy_share")
            ratio = f"{share / pool['clean_target_share']:.1f}x" if pool["clean_target_share"] else "n/a"
            recorded = _mean_over_seeds([r for r in rows if "select_recorded_seconds" in r], method,
                                        "select_recorded_seconds")
            cost = (f"; selection {recorded:.0f} s as recorded (warmup, features, scoring; shared and resumed parts "
                    "included)") if recorded is not None else ""
            lines.append(f"{method} top {config.fraction:.0%}: clean target share {share:.2f} = "
                         f"{ratio} the pool's (needs >= 2.5x); noisy share "
                         f"{noisy:.2f} (pool {pool['noisy_share']:.2f}){cost}")
    return lines


def write_report(result: dict, config: RealStudyConfig, out_prefix: str | Path, title: str, seconds: float) -> str:
    """Writes ``<out_prefix>.md`` (header, checks, table), ``.json`` (config, base, pool, summary,
    rows) and ``.png`` (chart) from the result's own rows; returns the markdown."""
    from jraise.study import markdown_table, plot_summary, summarise

    bench = RealBench
    keys = tuple(key for key, _, _ in bench.columns)
    summary = summarise(result["rows"], keys)
    per_target = f" ({config.per_target} per target)" if config.per_target is not None else ""
    header = (f"{title}\n\n"
              f"SmolLM2-135M-Instruct (LoRA r={config.lora_rank}) on the real pool: targets "
              f"{', '.join(config.targets)}; {len(config.categories)} categories, at most {config.per_category} "
              f"records each{per_target}, instruction + output <= {config.max_tokens} tokens, {config.noise:.0%} planted noise; "
              f"{config.fraction:.0%} budget / {config.steps} update steps of {config.batch_size}; seeds "
              f"{sorted({r['seed'] for r in result['rows']})} (mean ± std over each method's seeds); "
              f"{config.n_test} test records per target, {config.n_test_other} per other category; the rows' "
              f"own times sum to {sum(r['total_seconds'] for r in result['rows']):.0f} s "
              f"(this invocation {seconds:.0f} s, finished rows read back)\n\n")
    text = header + "\n".join(f"- {line}" for line in checks(result, config)) + "\n\n"
    text += markdown_table(summary, result["base"], bench.columns) + "\n\n"
    text += per_target_table(result, config) + "\n"
    out = Path(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".md"), text)
    atomic_write_text(out.with_suffix(".json"), json.dumps(
        {"config": result["config"], "base": result["base"], "pool": result["pool"], "summary": summary,
         "rows": result["rows"]}, indent=2) + "\n")
    plot_summary(summary, out.with_suffix(".png"), bench=bench)
    return text


def per_target_table(result: dict, config: RealStudyConfig) -> str:
    """Accuracy per category (mean over seeds), one row per method, the base first."""
    rows = [result["base"]] + list(result["rows"])
    categories = list(config.targets) + [c for c in result["base"]["per_category"] if c not in config.targets]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| method | " + " | ".join(categories) + " |", "|---|" + "---|" * len(categories)]
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        lines.append(f"| {method} | " + " | ".join(
            f"{np.mean([r['per_category'].get(c, np.nan) for r in mine]):.2f}" for c in categories) + " |")
    return "\n".join(lines)
