"""Paper configurations: validate, plan (steps, memory) and run the published set-ups.

    python benchmarks/paper_configs.py benchmarks/configs/less_llama2_7b_tulu.json --dry-run
    python benchmarks/paper_configs.py CONFIG.json --models ~/models --data ~/data --work runs/less

The configuration format, the placeholders and how the plan estimates memory are described in
`jraise.paper_configs`, which does the work; this script is its command line. ``--dry-run``
needs no weights and no data: it checks every step against the real `jraise` command line,
reports which referenced local paths exist and prints the plan. Without ``--dry-run`` the steps
of one configuration run in order, after checking that every input that no earlier step writes
exists, and stop at the first failure.
"""

from __future__ import annotations

import argparse
import sys

from jraise.paper_configs import run_configs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="configuration JSON files (see benchmarks/configs/)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; run nothing")
    parser.add_argument("--models", help="root of ${MODELS} (default: $JRAISE_MODELS or ./models)")
    parser.add_argument("--data", help="root of ${DATA} (default: $JRAISE_DATA or ./data)")
    parser.add_argument("--work", help="root of ${WORK} (default: $JRAISE_WORK or ./paper_runs/<name>)")
    parser.add_argument("--no-baselines", action="store_true", help="skip the steps marked as baselines")
    parser.add_argument("--device-gib", type=float, default=80.0, help="device memory for the plan's warnings")
    args = parser.parse_args(argv)
    if not args.dry_run and len(args.configs) > 1:
        parser.error("run one configuration at a time (several are fine with --dry-run)")
    return run_configs(args.configs, dry_run=args.dry_run, models=args.models, data=args.data, work=args.work,
                       skip_baselines=args.no_baselines, device_gib=args.device_gib)


if __name__ == "__main__":
    sys.exit(main())
