"""The real-model study: every selection method at one budget on SmolLM2-135M-Instruct + LoRA and real data.

Runs `jraise.study_real` (the protocol is in its docstring) and writes
``benchmarks/results/real_study.{md,json,png}`` from this run's rows: the table (target and
all-category accuracy, noisy / target / clean-target share of what each method trained on,
selection seconds), accuracy per category, the oracle's margin over the base model and random in
standard errors, and LESS's / ROSE's clean-target share against the pool's. The work directory
keeps finished rows, so an interrupted run resumes where it stopped (a fresh ``--work``
recomputes everything); ``--methods`` runs a subset; ``--size gpu`` scales pool, steps and seeds up.

    python benchmarks/real_study.py --work /tmp/jraise_real_study              # one seed, every method
    python benchmarks/real_study.py --work /tmp/jraise_real_study --extra-seeds 1,2   # + 2 seeds of random/oracle/LESS/ROSE/RAISE
    python benchmarks/real_study.py --work /tmp/jraise_real_study --extra-seeds 1,2 --also 3,4:random  # + random 3, 4
    python benchmarks/real_study.py --work /tmp/new_work --rows-from benchmarks/results/real_study.json  # resume a report
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> dict:
    from dataclasses import replace

    from jraise.study_real import SIZES, more_seed_runs, real_study_size, rows_from_report, run_real_study, write_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/jraise_real_study", help="work directory (resumable)")
    parser.add_argument("--size", default="cpu", choices=tuple(SIZES))
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: every method, the "
                                                        "oracle and the complete full-data run)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the size's)")
    parser.add_argument("--targets", default=None, help="comma-separated target categories (default: the size's)")
    parser.add_argument("--generative", default=None, help="comma-separated categories scored by greedy exact "
                        "match of the right option's text (default: the size's; '' for none)")
    parser.add_argument("--noise", type=float, default=None, help="share of pool records given a wrong answer "
                                                                     "(default: the size's)")
    parser.add_argument("--per-target", type=int, default=None, help="pool records per target category "
                                                                      "(default: the size's)")
    parser.add_argument("--extra-seeds", default=None, help="comma-separated seeds run after the main ones for "
                                                            "--extra-methods only (rows from the same work directory)")
    parser.add_argument("--extra-methods", default="random,oracle,less,rose,raise",
                        help="methods run at --extra-seeds (default: the issue's four with 3 seeds, and the oracle, "
                             "whose seed spread the informativeness check reads)")
    parser.add_argument("--also", action="append", default=[], metavar="SEEDS:METHODS",
                        help="more rows after the extra seeds, e.g. 3,4:random (repeatable)")
    parser.add_argument("--rows-from", default=None, metavar="REPORT.json",
                        help="first add the finished rows of an earlier report (e.g. benchmarks/results/"
                             "real_study.json) to --work, so a fresh work directory resumes where it stopped")
    parser.add_argument("--cache", default=None, help="jraise cache (default $JRAISE_CACHE or ~/.cache/jraise)")
    parser.add_argument("--out", default=str(RESULTS / "real_study"), help="prefix of the .md/.json/.png")
    args = parser.parse_args(argv)

    overrides = {}
    if args.methods:
        overrides["methods"] = tuple(args.methods.split(","))
    if args.seeds:
        overrides["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    if args.targets:
        overrides["targets"] = tuple(args.targets.split(","))
    if args.noise is not None:
        overrides["noise"] = args.noise
    if args.per_target is not None:
        overrides["per_target"] = args.per_target
    if args.generative is not None:
        overrides["generative"] = tuple(c for c in args.generative.split(",") if c)
    config = real_study_size(args.size, **overrides)
    try:
        more = more_seed_runs(args.extra_seeds, args.extra_methods, args.also)
    except ValueError as e:
        parser.error(str(e))
    if args.rows_from:
        print(f"{rows_from_report(args.work, args.rows_from)} finished rows added from {args.rows_from}")
    start = time.perf_counter()
    result = run_real_study(args.work, config, cache=args.cache)
    for seeds, methods in more:
        result["rows"] += run_real_study(args.work, replace(config, seeds=seeds, methods=methods),
                                         cache=args.cache)["rows"]
    title = f"Real-model study: `python benchmarks/real_study.py {' '.join(argv or [])}`".rstrip()
    text = write_report(result, config, args.out, title, time.perf_counter() - start)
    print("\n" + text)
    print(Path(args.out).with_suffix(".md"))
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
