"""The selection study: every method at the same budget on the noisy testbed, 3 seeds.

Writes ``benchmarks/results/selection_study.{md,json,png}`` from this run's rows only (the work
directory keeps finished rows, so an interrupted run resumes where it stopped; pass a fresh
``--work`` to recompute everything).

    python benchmarks/selection_study.py --work /tmp/jraise_study
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> dict:
    from jraise.atomic import atomic_write_text
    from jraise.study import (
        ALL_METHODS,
        REFERENCE_METHODS,
        StudyConfig,
        full_run_steps,
        markdown_table,
        plot_summary,
        run_study,
        summarise,
    )

    defaults = StudyConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/jraise_study", help="work directory (resumable)")
    parser.add_argument("--methods", default=",".join(ALL_METHODS + REFERENCE_METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--targets", default=",".join(defaults.targets))
    for name in ("n_pool", "steps", "batch_size", "n_test", "base_pool", "base_steps", "raise_episodes",
                 "raise_steps", "raise_clusters"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("noise", "fraction", "lr"):
        parser.add_argument("--" + name, type=float, default=getattr(defaults, name))
    parser.add_argument("--rose-pairs", default=defaults.rose_pairs, choices=("model", "testbed"),
                        help="ROSE's validation pairs: rejected = the base model's own answer, or the testbed's "
                             "near miss")
    parser.add_argument("--out", default=str(RESULTS / "selection_study"), help="prefix of the .md/.json/.png")
    args = parser.parse_args(argv)

    config = StudyConfig(methods=tuple(args.methods.split(",")), seeds=tuple(int(s) for s in args.seeds.split(",")),
                         targets=tuple(args.targets.split(",")), n_pool=args.n_pool, steps=args.steps,
                         batch_size=args.batch_size, n_test=args.n_test, base_pool=args.base_pool,
                         base_steps=args.base_steps, raise_episodes=args.raise_episodes, raise_steps=args.raise_steps,
                         raise_clusters=args.raise_clusters, noise=args.noise, fraction=args.fraction, lr=args.lr,
                         rose_pairs=args.rose_pairs)
    start = time.perf_counter()
    result = run_study(args.work, config)
    summary = summarise(result["rows"])
    table = markdown_table(summary, result["base"])
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (f"Selection study: `python benchmarks/selection_study.py {' '.join(argv or [])}`".rstrip() + "\n\n"
              f"targets {', '.join(config.targets)}; pool {config.n_pool} records, {config.noise:.0%} noise; "
              f"{config.fraction:.0%} budget / {config.steps} update steps; seeds {list(config.seeds)} "
              f"(mean ± std); {config.n_test} test records per category; run time {seconds:.0f} s\n\n")
    if "full_run" in config.methods:
        full = full_run_steps(config)
        header += (f"full_run: the whole pool for {config.full_run_epochs} epochs = {full} steps, so the "
                   f"{config.steps}-step budget is {config.steps / full:.0%} of the full-data steps\n\n")
    if "oracle" in config.methods:
        header += (f"oracle: {config.fraction:.0%} of the pool drawn from the clean target records (the testbed's "
                   "ground truth, which no selector sees): the room selection has at this budget\n\n")
    atomic_write_text(out.with_suffix(".md"), header + table + "\n")
    atomic_write_text(out.with_suffix(".json"), json.dumps({"config": asdict(config), "base": result["base"],
                                                            "summary": summary, "rows": result["rows"]}, indent=2) + "\n")
    plot_summary(summary, out.with_suffix(".png"))
    print("\n" + header + table)
    return {"summary": summary, "rows": result["rows"]}


if __name__ == "__main__":
    main()
