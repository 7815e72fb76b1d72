"""The selection study: every method at the same budget on the built-in testbed, side by side.

Protocol (one seed):

1. **Base model.** A `small` model trained from scratch on a clean testbed of every category
   except the targets (``base_pool`` records, ``base_steps`` steps): the stand-in for a pretrained
   LLM. It has left the copy-task plateau (the skills the targets need exist) but has never seen
   a target task, so what a fine-tune teaches about the targets comes from the selected records.
   Built once per work directory (its settings are checked on reuse) and shared by every seed and
   method.
2. **Pool.** A fresh testbed (seed-dependent, ``noise`` planted) whose few-shot validation files
   are cut down to the ``targets`` categories: the target task a selector is told about.
3. **Selection at one budget.** Static selectors (random, longest, perplexity, IFD, RDS, LESS,
   ROSE, and EE-CPO's re-mix of a random ``fraction``) pick ``fraction`` of the pool; the base
   model is then fine-tuned on the picked records for exactly ``steps`` updates of ``batch_size``
   (reshuffled every pass). Full data trains on the whole pool for the same ``steps``; the
   reference row ``full_run`` (not in the demo) trains on it for ``full_run_epochs`` whole epochs,
   the complete full-data run of which ``steps`` is a fraction (`full_run_steps`); the reference
   row ``oracle`` (not in the demo) trains on ``fraction`` of the pool drawn from the clean target
   records, read from the testbed's ground truth (`oracle_indices`). Dynamic
   selectors (SSPL, RAISE) choose every batch themselves for the same ``steps`` updates: the RAISE
   paper's equal-steps protocol (one RAISE policy per seed, deployed twice: ``raise`` takes its
   deterministic top-b as in the paper, ``raise_sampled`` draws batches from it as in training);
   so does DT-CSFT, whose curriculum shows ``steps x batch_size / 3`` records three times each. EE-CPO and DT-CSFT first measure the interaction matrix Gamma (see
   `jraise.study_beyond_iid`).
4. **Columns.** Test exact match on the target categories and on all categories, the target
   categories' test response loss per token (finer-grained than exact match); the share of
   selected records (dynamic: of all records trained on) that are noisy and that are targets
   (read from the testbed's ``meta``, which no selector sees); selection wall time (dynamic:
   policy training, or the self-paced run's loss refreshes and steps).

`run_study` returns one row per (method, seed); `summarise` averages seeds; `markdown_table`
prints them. ``benchmarks/selection_study.py`` and ``jraise demo`` are thin front ends.
"""

from __future__ import annotations

import json
import math
import shutil
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jraise.atomic import atomic_write_jsonl, atomic_write_text
from jraise.study_common import METHOD_OPTION_PREFIXES, options_key, tunable_model
from jraise.train.loop import append_jsonl

STATIC_METHODS = ("random", "longest", "perplexity", "ifd", "rds", "less", "rose", "ee_cpo")
DYNAMIC_METHODS = ("sspl", "raise", "raise_sampled")
ALL_METHODS = ("random", "full", "longest", "perplexity", "ifd", "rds", "less", "rose", "ee_cpo", "dt_csft", "sspl",
               "raise", "raise_sampled")
# Reference rows outside the common budget (not in the demo): "full_run" is a complete fine-tune on the
# whole pool (``full_run_epochs`` epochs), the "full data" of the RAISE paper's budget protocol, against
# which the selection methods' ``steps`` are a fraction of the full-data steps. "oracle" reads the testbed's
# ground truth (``meta``, which no selector sees): ``fraction`` of the pool drawn uniformly from the clean
# records of the target categories, the best a selector at this budget can hope to pick, so the
# table shows how much room selection has (BUILD_NOTES, "Selection study").
REFERENCE_METHODS = ("full_run", "oracle")
# ROSE with the base model's own answers as the rejected side, whatever ``rose_pairs`` says: the real
# study runs it beside "rose" (the pool's real preference pairs); not in the testbed's default list.
# "less_per_target" / "rose_per_target": LESS and ROSE with the budget split equally over the target
# categories (``group_budget="split"``, `jraise.select.influence.split_by_group`) instead of the
# paper's max over them; the same feature stores, only the last step differs.
EXTRA_METHODS = ("rose_model", "less_per_target", "rose_per_target")
INFLUENCE_METHODS = ("less", "rose", "rose_model", "less_per_target", "rose_per_target")
KNOWN_METHODS = ALL_METHODS + EXTRA_METHODS + REFERENCE_METHODS


@dataclass(frozen=True)
class StudyConfig:
    """Sizes and budgets of a study (defaults: the benchmark's; `demo_config` keeps one seed).

    Sized for 2 CPU cores (2-layer `small` preset); run times are in BUILD_NOTES."""

    methods: tuple[str, ...] = ALL_METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    targets: tuple[str, ...] = ("first", "last", "compare")
    n_pool: int = 8000  # 5% = 400 records: about 5 passes in `steps` (2,000 records: 19 passes, overfitting)
    noise: float = 0.3
    fraction: float = 0.05
    steps: int = 120
    batch_size: int = 16
    lr: float = 1e-3
    # Test records per category: 100, not 20, so one seed's target EM (3 x 100 records) has a binomial
    # std of about 0.02 (at 20 the seeds' random rows disagreed far more; BUILD_NOTES).
    n_test: int = 100
    base_preset: str = "small"
    base_pool: int = 12000
    base_steps: int = 1800
    base_lr: float = 1e-3
    base_seed: int = 1000
    max_len: int = 192
    # LESS / ROSE at testbed scale: LoRA warmup on `fraction` of the pool, small projection, and the
    # train-side Adam feature without the checkpoint's first moment: after a 50-step warmup b1*mu is
    # shared by every example and swamps (1-b1)*g (BUILD_NOTES, "Gradient features, LESS and ROSE").
    influence_lora_rank: int = 8
    influence_proj_dim: int = 1024
    influence_warmup_epochs: int = 2
    influence_adam_first_moment: bool = False
    # True: LESS and ROSE rows of a seed share one work directory (warmup run and train-side
    # feature stores, whose identities make the reuse exact), so the second of them computes only
    # its validation side; its selection seconds (this call's wall time) then leave out the shared
    # part, which its `select_recorded_seconds` (the stores' recorded cost) includes.
    influence_shared_work: bool = False
    # ROSE's validation pairs: "model" (chosen = the right answer, rejected = the base model's own greedy
    # answer; `jraise.select.preference_pairs`) or "testbed" (the testbed's near misses: the right answer
    # with one letter or digit changed). Near-miss pairs' DPO gradients share almost no task direction
    # within a subtask, and ROSE on them fell below random (BUILD_NOTES).
    rose_pairs: str = "model"
    # RAISE: `raise_episodes` policy episodes of `raise_steps` fused steps; an episode is as long as the
    # deployed run (`steps`), as in the paper, where an episode is the whole fine-tuning run. K = 8, not
    # the paper's 20, for CPU time (8 x 120 steps: about 2 minutes per seed).
    raise_episodes: int = 8
    raise_steps: int = 120
    raise_clusters: int = 4
    sspl_refresh_every: int = 30
    # EE-CPO / DT-CSFT (`jraise.study_beyond_iid`): Gamma from N+1 runs of `gamma_steps` on D0 = `fraction`
    # of the pool with Delta_k = +`gamma_delta` n0_k; EE-CPO moves up to `ee_cpo_edit` of D0, at most
    # `ee_cpo_max_change` of that edit budget per category and keeps at least `ee_cpo_min_per_category`
    # records in a category it deletes from (5, the released script's floor, suits a D0 of hundreds).
    gamma_steps: int = 120
    gamma_delta: float = 0.5
    gamma_relative_floor: float = 0.25
    ee_cpo_edit: float = 0.25
    ee_cpo_max_change: float | None = 0.34
    ee_cpo_min_per_category: int = 5
    # DT-CSFT tiers from Gamma: "net_asymmetry" (rank by mean asymmetry, thirds) because with 14 noisy
    # categories the prerequisite graph of the "depth" method is one strongly connected component,
    # which puts every category in the middle tier (BUILD_NOTES).
    dt_csft_tier_method: str = "net_asymmetry"
    full_run_epochs: int = 3
    # Fine-tuning (every row, SSPL, RAISE's learner and Gamma's runs): 0 trains every weight (the
    # testbed's small model); r > 0 trains rank-r LoRA adapters on q, k, v, o (alpha = 2r) and keeps
    # the base frozen (the real study's pretrained model).
    lora_rank: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in KNOWN_METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {', '.join(KNOWN_METHODS)}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        from jraise.model.config import PRESETS

        if self.base_preset not in PRESETS:
            raise ValueError(f"unknown base_preset {self.base_preset!r}; presets: {', '.join(PRESETS)}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.rose_pairs not in ("model", "testbed"):
            raise ValueError(f"rose_pairs must be model or testbed, got {self.rose_pairs!r}")
        if self.dt_csft_tier_method not in ("depth", "net_asymmetry"):
            raise ValueError(f"dt_csft_tier_method must be depth or net_asymmetry, got {self.dt_csft_tier_method!r}")
        if self.batch_size % self.raise_clusters and {"raise", "raise_sampled"} & set(self.methods):
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of raise_clusters {self.raise_clusters}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0: full fine-tuning), got {self.lora_rank}")

    def model_identity(self):
        """What the rows' model depends on, beyond its name (`options_key`): the preset's definition."""
        from jraise.model.config import PRESETS

        return PRESETS[self.base_preset]


def demo_config(**overrides) -> StudyConfig:
    """The study as `jraise demo` runs it: one seed, a shorter Gamma measurement and 4 short RAISE
    episodes (under 10 CPU minutes in all); the benchmark runs three seeds at full size."""
    return StudyConfig(**{"seeds": (0,), "gamma_steps": 40, "raise_episodes": 4, "raise_steps": 30, **overrides})


# ----------------------------------------------------------------------------------------------
# Base model


def build_base(work: Path, config: StudyConfig, echo: Callable[[str], None] = print) -> Path:
    """The shared base model directory (HF format, with the testbed tokenizer): reused when its
    recorded settings match, rebuilt from scratch when they differ, resumed when unfinished."""
    from jraise.data.pool import load_pool
    from jraise.testbed import CATEGORIES, write_testbed
    from jraise.model import init_model, load_tokenizer, preset_config
    from jraise.model.config import PRESETS
    from jraise.train import TrainConfig, train

    categories = [c for c in CATEGORIES if c not in config.targets]
    settings = {"base_preset": config.base_preset, "base_model": PRESETS[config.base_preset],
                "base_pool": config.base_pool, "base_steps": config.base_steps, "base_lr": config.base_lr,
                "base_seed": config.base_seed, "batch_size": config.batch_size, "max_len": config.max_len,
                "categories": categories}
    base_dir = work / "base" / "run" / "final"
    stamp = work / "base" / "settings.json"
    if stamp.exists():
        if json.loads(stamp.read_text()) == settings and base_dir.is_dir():
            return base_dir
        shutil.rmtree(work / "base")  # built with other settings: start over
    paths = write_testbed(work / "base" / "testbed", n_train=config.base_pool, noise=0.0, seed=config.base_seed,
                          n_val_per_category=1, n_test_per_category=1, categories=categories)
    tok = load_tokenizer(paths["tokenizer"])
    model_config = preset_config(config.base_preset, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    pool = load_pool(paths["pool"], tok, max_len=config.max_len)
    train_config = TrainConfig(lr=config.base_lr, schedule="constant", warmup_ratio=0.05, epochs=1000,
                               max_steps=config.base_steps, batch_size=config.batch_size, seed=config.base_seed,
                               max_grad_norm=1.0, max_to_keep=1, save_every=500)
    t0 = time.perf_counter()
    train(init_model(model_config, seed=config.base_seed), pool, train_config, work / "base" / "run",
          resume=True, tokenizer_dir=paths["tokenizer"])
    atomic_write_text(stamp, json.dumps(settings) + "\n")
    which = (f"the {len(categories)} non-target categories" if config.targets
             else f"all {len(categories)} categories")
    echo(f"base model ({config.base_preset}): {config.base_steps} steps from scratch on {config.base_pool} clean "
         f"records of {which} ({time.perf_counter() - t0:.0f} s)")
    return base_dir


# ----------------------------------------------------------------------------------------------
# One seed's data


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def seed_data(work: Path, config: StudyConfig, seed: int) -> dict[str, Path]:
    """The seed's noisy testbed plus target-only validation files ``val_target`` (SFT) and
    ``val_pref_target`` (preference pairs)."""
    from jraise.testbed import write_testbed

    paths = write_testbed(work / f"seed{seed}" / "testbed", n_train=config.n_pool, noise=config.noise, seed=seed,
                          n_test_per_category=config.n_test)
    targets = set(config.targets)
    val = [r for r in read_jsonl(paths["val"]) if r["category"] in targets]
    pref = [p for p in read_jsonl(paths["val_pref"]) if p["category"] in targets]
    if not val or not pref:
        raise ValueError(f"no validation records for the targets {sorted(targets)}")
    paths["val_target"] = atomic_write_jsonl(paths["val"].with_name("val_target.jsonl"), val)
    paths["val_pref_target"] = atomic_write_jsonl(paths["val"].with_name("val_pref_target.jsonl"), pref)
    return paths


# ----------------------------------------------------------------------------------------------
# Selection and fine-tuning


def _model_answer_pairs(base_dir: Path, paths: dict, out: Path) -> Path:
    """ROSE's validation pairs for ``rose_pairs="model"``: `model_answer_pairs` on the target
    validation records (rejected = the base model's greedy answer); a record the base answers right
    or with nothing keeps the testbed's near-miss pair (``val_pref_target`` mirrors ``val_target``
    record by record). The meta file counts both kinds."""
    from jraise.model import load_model, load_tokenizer
    from jraise.select.preference_pairs import model_answer_pairs

    records, near_miss = read_jsonl(paths["val_target"]), read_jsonl(paths["val_pref_target"])
    if [p["chosen"] for p in near_miss] != [r["output"] for r in records]:
        raise ValueError(f"{paths['val_pref_target']} does not mirror {paths['val_target']} record by record")
    pairs, report = model_answer_pairs(load_model(base_dir)[0], load_tokenizer(base_dir), records,
                                       max_new_tokens=12, batch_size=64, source=str(paths["val_target"]),
                                       require_pairs=False)
    skipped = sorted(i for indices in report["skipped"].values() for i in indices)
    by_id = {p["id"]: p for p in pairs}
    merged = [near_miss[i] if i in skipped else by_id[r["id"]] for i, r in enumerate(records)]
    atomic_write_jsonl(out, merged)
    atomic_write_text(out.with_name(out.name + ".meta.json"), json.dumps(
        {"model_answer_pairs": len(pairs), "near_miss_fallbacks": len(skipped), "fallback_indices": skipped,
         "skipped": report["skipped"], "base_model": str(base_dir)}, indent=2) + "\n")
    return out


def _static_selection(method: str, base_dir: Path, paths: dict, config: StudyConfig, seed: int,
                      out: Path):
    """The `Selection` of a static ``method`` (LESS and ROSE's carry their recorded ``seconds``)."""
    if method in INFLUENCE_METHODS:
        from jraise.jobs.influence import InfluenceRunConfig, run_influence_selection

        influence = InfluenceRunConfig(method=method.removesuffix("_model").removesuffix("_per_target"),
                                       fraction=config.fraction,
                                       group_budget="split" if method.endswith("_per_target") else "max",
                                       projection_mode="dense",  # the studies compare LESS's own feature
                                       warmup_fraction=config.fraction,
                                       warmup_epochs=config.influence_warmup_epochs, warmup_lr=config.lr,
                                       warmup_batch_size=config.batch_size, lora_rank=config.influence_lora_rank,
                                       lora_alpha=2.0 * config.influence_lora_rank, max_len=config.max_len,
                                       proj_dim=config.influence_proj_dim, seed=seed,
                                       adam_first_moment=config.influence_adam_first_moment)
        val = paths["val_target"]
        if method in ("rose", "rose_model", "rose_per_target"):
            val = (_model_answer_pairs(base_dir, paths, out.with_name("val_pref_model.jsonl"))
                   if method == "rose_model" or config.rose_pairs == "model" else paths["val_pref_target"])
        work_dir = out.parent.parent / "influence_work" if config.influence_shared_work else None
        selection = run_influence_selection(base_dir, paths["pool"], val, out, influence, work_dir=work_dir,
                                            echo=lambda *_: None)
    else:
        from jraise.jobs.baselines import run_baseline

        selection = run_baseline(method, paths["pool"], out, model_dir=base_dir, val_file=paths["val_target"],
                                 fraction=config.fraction, max_len=config.max_len, seed=seed)
    return selection


class PoolTruth(NamedTuple):
    """What the study knows about its pool and no selector sees: each record's category and
    whether its output is planted noise (bool [n])."""

    categories: tuple[str, ...]
    noisy: np.ndarray


def truth_from_meta(records: Sequence[dict]) -> PoolTruth:
    """The testbed's ground truth, read from its records' ``meta``."""
    return PoolTruth(tuple(r["meta"]["category"] for r in records),
                     np.array([bool(r["meta"]["noisy"]) for r in records], bool))


def oracle_indices(truth: PoolTruth, targets: set, fraction: float, seed: int) -> np.ndarray:
    """``fraction`` of the pool (as many records as a selector picks) drawn uniformly from the clean
    records of the ``targets`` categories, read from the ground truth: the reference selection no
    selector can see. All of them when there are fewer."""
    clean_target = [i for i, (c, noisy) in enumerate(zip(truth.categories, truth.noisy)) if c in targets and not noisy]
    if not clean_target:
        raise ValueError(f"the pool has no clean records of the targets {sorted(targets)}")
    k = min(len(clean_target), max(1, round(fraction * len(truth.categories))))
    return np.sort(np.random.default_rng(seed).choice(np.asarray(clean_target), size=k, replace=False))


def _epoch_orders(indices: np.ndarray, steps: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """Reshuffled passes over ``indices``, enough of them for ``steps`` full batches."""
    rng = np.random.default_rng(seed)
    per_epoch = math.ceil(len(indices) / batch_size)
    return [rng.permutation(indices) for _ in range(math.ceil(steps / per_epoch))]


def full_run_steps(config: StudyConfig) -> int:
    """Updates of the "full_run" reference: ``full_run_epochs`` whole passes over the pool."""
    return config.full_run_epochs * math.ceil(config.n_pool / config.batch_size)


def _finetune_on(base_dir: Path, pool, order, config: StudyConfig, seed: int, run_dir: Path,
                 epochs: int | None = None):
    """The base fine-tuned for ``config.steps`` updates in ``order`` (None: the trainer's epoch
    orders over the whole pool); ``epochs``: instead, that many whole epochs (no step cap)."""
    from jraise.train import TrainConfig, train

    model = tunable_model(base_dir, config, seed)
    max_steps = None if epochs is not None else config.steps
    if epochs is None:
        epochs = len(order) if order is not None else 1000
    train_config = TrainConfig(lr=config.lr, schedule="constant", epochs=epochs, max_steps=max_steps,
                               batch_size=config.batch_size, seed=seed, max_grad_norm=1.0, max_to_keep=1)
    train(model, pool, train_config, run_dir, order=order, resume=False, export=False)
    return model


def _dynamic_run(method: str, base_dir: Path, paths: dict, config: StudyConfig, seed: int, run_dir: Path):
    """(fine-tuned model, every pool index trained on, selection seconds) of SSPL or RAISE."""
    from jraise.data.pool import load_pool
    from jraise.model import load_model, load_tokenizer

    if method == "sspl":
        from jraise.select.self_paced import self_paced_finetune

        model = tunable_model(base_dir, config, seed)
        pool = load_pool(paths["pool"], load_tokenizer(base_dir), max_len=config.max_len)
        t0 = time.perf_counter()
        model, indices = self_paced_finetune(model, pool, config.steps, config.batch_size, config.lr,
                                             refresh_every=config.sspl_refresh_every, seed=seed)
        return model, np.asarray(indices).reshape(-1), time.perf_counter() - t0
    from jraise.jobs.raise_policy import finetune_with_policy, train_raise_policy_job
    from jraise.select.rl.trainer import RaiseConfig

    # One policy per seed, shared by "raise" (deterministic top-b, the paper's deployment) and
    # "raise_sampled" (batches drawn from the policy): trained once, its seconds count for both.
    policy_dir = run_dir.parent / "raise_policy"  # beside the seed's method runs
    stamp = policy_dir / "study_settings.json"
    settings = {"settings": settings_key(config, "raise"), "seed": seed}
    saved = json.loads(stamp.read_text()) if stamp.exists() else {}
    if {k: saved.get(k) for k in settings} != settings:
        shutil.rmtree(policy_dir, ignore_errors=True)
        raise_config = RaiseConfig(episodes=config.raise_episodes, steps=config.raise_steps, llm_lr=config.lr,
                                   per_cluster=config.batch_size // config.raise_clusters, seed=seed)
        t0 = time.perf_counter()
        train_raise_policy_job(base_dir, paths["pool"], paths["val_target"], policy_dir, raise_config,
                               clusters=config.raise_clusters, batch_size=config.batch_size, max_len=config.max_len,
                               lora_rank=config.lora_rank, echo=lambda *_: None)
        saved = {**settings, "seconds": round(time.perf_counter() - t0, 1)}
        atomic_write_text(stamp, json.dumps(saved) + "\n")
    final = finetune_with_policy(base_dir, paths["pool"], paths["val_target"], policy_dir, run_dir / "deployed",
                                 steps=config.steps, lr=config.lr, max_len=config.max_len,
                                 sample=method == "raise_sampled", seed=seed)
    indices = np.asarray(json.loads((run_dir / "deployed" / "selections.json").read_text())["indices"]).reshape(-1)
    return load_model(final)[0], indices, saved["seconds"]


def _beyond_iid_run(method: str, base_dir: Path, pool, paths: dict, config: StudyConfig, seed: int, work: Path,
                    run_dir: Path):
    """(fine-tuned model, every pool index trained on, selection seconds) of EE-CPO or DT-CSFT:
    Gamma measured once per seed (its seconds count for both), then the re-mix or the order."""
    from jraise.select.intervention import pool_categories
    from jraise.study_beyond_iid import dt_csft_order, ee_cpo_subset, seed_gamma

    measured = seed_gamma(base_dir, pool, paths, config, seed, work)
    t0 = time.perf_counter()
    categories = list(pool_categories(pool))
    run_dir.mkdir(parents=True, exist_ok=True)
    if method == "ee_cpo":
        from jraise.jobs.beyond_iid import content_key

        keys = [content_key(r, ignore=("id", "meta")) for r in pool.records]  # meta: benchmark-only truth
        indices, plan = ee_cpo_subset(measured, categories, config, seed, keys)
        atomic_write_text(run_dir / "plan.json", json.dumps(plan, indent=1) + "\n")
        np.save(run_dir / "indices.npy", indices)
        order = _epoch_orders(indices, config.steps, config.batch_size, seed)
        trained_on = indices
    else:
        order, tiers = dt_csft_order(measured, categories, config, seed)
        atomic_write_text(run_dir / "tiers.json", json.dumps(tiers, indent=1) + "\n")
        np.save(run_dir / "order.npy", order)
        trained_on = order
        order = [order]
    select_s = measured["seconds"] + time.perf_counter() - t0
    return _finetune_on(base_dir, pool, order, config, seed, run_dir / "finetune"), trained_on, select_s


# ----------------------------------------------------------------------------------------------
# The study


def _shares(truth: PoolTruth, indices: np.ndarray, targets: set) -> dict:
    """Shares of the picked records (every one trained on, repeats counted) that are noisy, that are
    targets, and that are clean targets."""
    picked = np.asarray([i for i in np.asarray(indices).reshape(-1) if i >= 0], np.int64)
    is_target = np.array([truth.categories[i] in targets for i in picked], bool)
    noisy = truth.noisy[picked]
    return {"noisy_share": float(noisy.mean()), "target_share": float(is_target.mean()),
            "clean_target_share": float((is_target & ~noisy).mean())}


def pool_shares(truth: PoolTruth, targets: set) -> dict:
    """The same shares for the whole pool: what a selector's shares are compared with."""
    return _shares(truth, np.arange(len(truth.categories)), targets)


def _test_scores(model, tok, test_file: Path, targets: set) -> dict:
    """Target / all-category test exact match, target response loss per token, EM per category."""
    from jraise.eval import evaluate

    report = evaluate(model, tok, test_file, kinds=("loss", "exact_match"), max_new_tokens=12, batch_size=64)
    per_cat = {c: v["accuracy"] for c, v in report["exact_match"]["per_category"].items()}
    losses = report["loss"]["per_category"]
    return {"target_em": float(np.mean([per_cat[c] for c in targets])),
            "all_em": float(report["exact_match"]["overall"]["accuracy"]),
            "target_loss": float(np.mean([losses[c]["per_token"] for c in targets])), "per_category": per_cat}


class TestbedBench:
    """The study's data and scores on the built-in testbed: a base model trained from scratch
    (`build_base`), a fresh noisy testbed per seed (`seed_data`), exact match and response loss on
    the test split. ``columns``: (row key, table header, digits)."""

    name = "built-in testbed"
    data_per_seed = True  # a fresh testbed (test split included) per seed: the base row is scored per seed
    columns = (("target_em", "target EM", 2), ("all_em", "all EM", 2), ("target_loss", "target loss", 3),
               ("noisy_share", "noisy share", 2), ("target_share", "target share", 2),
               ("select_seconds", "selection s", 0))
    score_label = "test exact match"

    def base(self, work: Path, config: StudyConfig, echo: Callable[[str], None]) -> Path:
        return build_base(work, config, echo)

    def seed_data(self, work: Path, config: StudyConfig, seed: int) -> tuple[dict[str, Path], PoolTruth]:
        paths = seed_data(work, config, seed)
        return paths, truth_from_meta(read_jsonl(paths["pool"]))

    def scores(self, model, tok, paths: dict, config: StudyConfig) -> dict:
        return _test_scores(model, tok, paths["test"], set(config.targets))


TESTBED = TestbedBench()


def run_method(method: str, base_dir: Path, paths: dict, truth: PoolTruth, config: StudyConfig, seed: int,
               work: Path, bench=TESTBED) -> dict:
    """One row of the study: fine-tune by ``method`` at the common budget and evaluate."""
    from jraise.data.pool import load_pool
    from jraise.model import load_tokenizer

    tok = load_tokenizer(base_dir)
    pool = load_pool(paths["pool"], tok, max_len=config.max_len)
    if len(pool) != len(truth.categories):
        raise ValueError(f"{paths['pool']}: {len(pool)} records load, but its ground truth covers "
                         f"{len(truth.categories)}")
    run_dir = work / f"seed{seed}" / method
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished or other-settings attempt
    t0 = time.perf_counter()
    extra = {}
    if method in DYNAMIC_METHODS:
        model, trained_on, select_s = _dynamic_run(method, base_dir, paths, config, seed, run_dir)
    elif method in ("ee_cpo", "dt_csft"):
        model, trained_on, select_s = _beyond_iid_run(method, base_dir, pool, paths, config, seed, work, run_dir)
    else:
        epochs = config.full_run_epochs if method == "full_run" else None
        if method in ("full", "full_run"):
            indices, order, select_s = np.arange(len(pool)), None, 0.0
        elif method == "oracle":
            indices = oracle_indices(truth, set(config.targets), config.fraction, seed)
            select_s, order = 0.0, _epoch_orders(indices, config.steps, config.batch_size, seed)
        else:
            selection = _static_selection(method, base_dir, paths, config, seed, run_dir / "selection.jsonl")
            indices, select_s = np.asarray(selection.indices), time.perf_counter() - t0
            if selection.seconds.get("total") is not None:
                # LESS / ROSE: the selection's recorded cost (warmup, feature stores, scoring), shared
                # and resumed parts included, beside the wall time of this call.
                extra["select_recorded_seconds"] = selection.seconds["total"]
            order = _epoch_orders(indices, config.steps, config.batch_size, seed)
        model = _finetune_on(base_dir, pool, order, config, seed, run_dir / "finetune", epochs)
        trained_on = indices
    shares = _shares(truth, trained_on, set(config.targets))
    scores = bench.scores(model, tok, paths, config)
    return {"method": method, "seed": seed, **scores, **shares, "select_seconds": round(select_s, 1), **extra,
            "total_seconds": round(time.perf_counter() - t0, 1)}


def settings_key(config: StudyConfig, method: str) -> str:
    """What a finished row of ``method`` depends on (`options_key` with the method's own option
    groups). Rows whose key differs are recomputed, never reused."""
    return options_key(config, method, METHOD_OPTION_PREFIXES.get(method, ()))


BASE_ROW = "base (no fine-tune)"  # the base model's scores, kept in rows.jsonl beside the methods' rows


def _row_line(row: dict, columns) -> str:
    return "  ".join(f"{header} {row[key]:.{digits}f}" for key, header, digits in columns if key in row)


def run_study(work: str | Path, config: StudyConfig = StudyConfig(), echo: Callable[[str], None] = print,
              bench=TESTBED) -> dict:
    """Runs (or resumes: finished rows are kept in ``rows.jsonl`` and reused when their settings
    match, see `settings_key`) the study into ``work``, on ``bench``'s data and scores (default: the
    built-in testbed; `jraise.study_real.RealBench` for the real model and data). Returns
    ``{"config", "base", "rows", "pool"}`` (``pool``: the first seed's pool shares, `pool_shares`)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / "study_config.json", json.dumps(asdict(config), indent=2) + "\n")
    rows_file = work / "rows.jsonl"
    old = read_jsonl(rows_file) if rows_file.exists() else []
    done = {(r["method"], r["seed"]): r for r in old if r.get("settings") == settings_key(config, r["method"])}
    base_dir = bench.base(work, config, echo)
    base_row = pool_row = None
    rows = []
    for seed in config.seeds:
        paths, truth = bench.seed_data(work, config, seed)
        if base_row is None:
            from jraise.model import load_model, load_tokenizer

            pool_row = pool_shares(truth, set(config.targets))
            base_row = done.get((BASE_ROW, seed))
            if base_row is None and not bench.data_per_seed:  # the same test set for every seed
                base_row = next((r for (m, _), r in done.items() if m == BASE_ROW), None)
            if base_row is None:
                base_row = {"method": BASE_ROW, "seed": seed,
                            **bench.scores(load_model(base_dir)[0], load_tokenizer(base_dir), paths, config),
                            "settings": settings_key(config, BASE_ROW)}
                append_jsonl(rows_file, base_row)
            echo(f"base model: {_row_line(base_row, bench.columns)}")
        for method in config.methods:
            row = done.get((method, seed))
            if row is None:
                row = {**run_method(method, base_dir, paths, truth, config, seed, work, bench),
                       "settings": settings_key(config, method)}
                append_jsonl(rows_file, row)
            rows.append(row)
            echo(f"seed {seed} {method:>10}: {_row_line(row, bench.columns)}  ({row['total_seconds']:.0f} s)")
    return {"config": asdict(config), "base": base_row, "rows": rows, "pool": pool_row}


# ----------------------------------------------------------------------------------------------
# Summaries


COLUMNS = tuple(key for key, _, _ in TestbedBench.columns)


def summarise(rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> list[dict]:
    """Mean and standard deviation over seeds of every column, per method (first-seen order)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        entry = {"method": method, "n_seeds": len(mine)}
        for col in columns:
            values = np.array([r[col] for r in mine], np.float64)
            entry[col] = float(values.mean())
            entry[col + "_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def markdown_table(summary: Sequence[dict], base: dict | None = None, columns=TestbedBench.columns) -> str:
    """The summary as a markdown table; ``columns``: (key, header, digits); the base row shows the
    columns it has."""
    def cell(entry, col, digits):
        value = f"{entry[col]:.{digits}f}"
        return value + (f" ± {entry[col + '_std']:.{digits}f}" if entry["n_seeds"] > 1 else "")

    lines = ["| method | " + " | ".join(header for _, header, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    if base is not None:
        lines.append(f"| {base['method']} | " + " | ".join(f"{base[key]:.{digits}f}" if key in base else ""
                                                          for key, _, digits in columns) + " |")
    for e in summary:
        lines.append(f"| {e['method']} | " + " | ".join(cell(e, key, digits) for key, _, digits in columns) + " |")
    return "\n".join(lines)


def plot_summary(summary: Sequence[dict], path: str | Path, bench=None) -> Path:
    """Bar chart of the target and all-category scores (``bench.columns``' first two; default the
    testbed's) per method (mean and std over seeds)."""
    bench = bench or TESTBED
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [e["method"] for e in summary]
    x = np.arange(len(names))
    width = max(6, len(names) * 0.9)
    fig, ax = plt.subplots(figsize=(width, 3.8))
    (target, _, _), (everything, _, _) = bench.columns[:2]
    for offset, col, label in ((-0.2, target, "target categories"), (0.2, everything, "all categories")):
        ax.bar(x + offset, [e[col] for e in summary], 0.4, yerr=[e[col + "_std"] for e in summary], label=label,
               capsize=3)
    ax.set_xticks(x, names, rotation=30, ha="right")
    # Wrapped to the figure (about 9 title characters an inch), so a long bench name is not cut off.
    ax.set_ylabel(textwrap.fill(bench.score_label, 36))
    ax.set_title(textwrap.fill(f"Selection methods at one budget ({bench.name})", int(width * 9)))
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
