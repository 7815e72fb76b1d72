"""Beyond IID on the built-in testbed: measured Gamma and tiers, EE-CPO vs the baseline mix, DT-CSFT
vs shuffled order, at one budget, over seeds.

One command regenerates everything (the work directory keeps a shared base model and finished
seeds, so an interrupted run resumes; pass a fresh ``--work`` to recompute)::

    python benchmarks/beyond_iid_study.py

The protocol is in `jraise.beyond_iid_study`, which runs the study and writes
``<out>/beyond_iid_study.{md,json,png}`` and ``<out>/beyond_iid_gamma/``; this script is its
command line (every option is a field of `BeyondIIDStudyConfig`; ``--quick`` is a smoke test of
the pipeline, not a measurement) and prints the report.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from jraise.beyond_iid_study import QUICK, BeyondIIDStudyConfig, write_study

RESULTS = Path(__file__).resolve().parent / "results"


def _optional_float(text: str) -> float | None:
    return None if text.strip().lower() == "none" else float(text)


def _parser() -> argparse.ArgumentParser:
    d = BeyondIIDStudyConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default=str(RESULTS), help="where beyond_iid_study.{md,json,png} and "
                   "beyond_iid_gamma/ go")
    p.add_argument("--work", default="/tmp/jraise_beyond_iid", help="work directory (base model, testbeds, "
                   "runs, rows.jsonl; resumable)")
    p.add_argument("--categories", default=",".join(d.categories))
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)))
    for name in ("n_pool", "budget", "batch_size", "n_val", "n_test", "min_per_category", "base_pool", "base_steps",
                 "base_seed", "max_len", "max_new_tokens"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "warmup_ratio", "noise", "delta_fraction", "edit_fraction", "tier_threshold", "base_lr"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--self-effect-floor", type=float, default=d.self_effect_floor,
                   help="clip non-positive own effects when normalising Gamma (default: such a category is an error)")
    p.add_argument("--relative-self-effect-floor", type=_optional_float, default=d.relative_self_effect_floor,
                   help="floor own effects at this fraction of their median ('none': off)")
    p.add_argument("--max-change-fraction", type=_optional_float, default=d.max_change_fraction,
                   help="cap any category's EE-CPO change at this fraction of the edit budget ('none': no cap)")
    p.add_argument("--schedule", default=d.schedule)
    p.add_argument("--gamma-metric", default=d.gamma_metric, choices=("loss", "exact_match"))
    p.add_argument("--gamma-mode", default=d.gamma_mode, choices=("auto", "vmap", "sequential"))
    p.add_argument("--gamma-budget", default=d.gamma_budget, choices=("steps", "epochs"),
                   help="intervention runs: the arms' step budget, or each run `epochs` passes over its own set")
    p.add_argument("--tier-method", default=d.tier_method, choices=("depth", "net_asymmetry"))
    p.add_argument("--base-categories", default=d.base_categories, choices=("all", "others"),
                   help="train the base model on all 14 default categories, or only on those outside --categories "
                        "(the study's categories are then learnt during the runs)")
    p.add_argument("--quick", action="store_true", help="a tiny configuration (minutes of nothing: a smoke "
                   "test of the pipeline, not a measurement)")
    return p


def config_from_args(args: argparse.Namespace) -> BeyondIIDStudyConfig:
    """The config the command line asks for (``--quick`` replaces the sizes by `QUICK`'s)."""
    values = {k: getattr(args, k) for k in ("n_pool", "budget", "batch_size", "n_val", "n_test", "min_per_category",
                                             "base_pool", "base_steps", "base_seed", "max_len", "max_new_tokens",
                                             "lr", "warmup_ratio", "noise", "delta_fraction", "edit_fraction",
                                             "tier_threshold", "base_lr", "self_effect_floor",
                                             "relative_self_effect_floor", "max_change_fraction", "schedule",
                                             "gamma_metric", "gamma_mode", "gamma_budget", "tier_method",
                                             "base_categories")}
    values["categories"] = tuple(c.strip() for c in args.categories.split(",") if c.strip())
    values["seeds"] = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    if args.quick:
        values.update(QUICK)
    return BeyondIIDStudyConfig(**values)


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs (or resumes) the study and writes the report files; returns the JSON document."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    command = " ".join(["python benchmarks/beyond_iid_study.py", *argv])
    document, report = write_study(config_from_args(args), Path(args.work), Path(args.out_dir), command)
    print("\n" + report)
    return document


if __name__ == "__main__":
    main()
