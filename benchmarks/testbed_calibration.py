"""Testbed calibration: how fast the `small` preset learns the clean built-in testbed.

Writes a clean testbed, initialises a `small` model from its tokenizer, trains it with `jraise.train`
(checkpoints every ``--eval-every`` steps), then evaluates test exact match per category at every
checkpoint. Prints one row per checkpoint: step, training wall time (the trainer's own clock,
compilation included), overall exact match, the number of categories at or above ``--target`` and
per-category exact match; writes the same as JSON to ``--out``.

The issue's target: on 2 CPU cores, most categories reach 80% exact match within 5 minutes.

    python benchmarks/testbed_calibration.py --out benchmarks/results/calibration.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--eval-every", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=float, default=0.05)
    parser.add_argument("--schedule", default="cosine")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--n-test", type=int, default=30, help="test records per category")
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="keep the testbed and run here (default: a temp dir)")
    parser.add_argument("--out", default=None, help="write the curve as JSON here")
    args = parser.parse_args(argv)

    from jraise.data.pool import load_pool
    from jraise.testbed import write_testbed
    from jraise.eval import evaluate
    from jraise.model import init_model, load_tokenizer, preset_config
    from jraise.train import TrainConfig, train
    from jraise.train.checkpoint import checkpoint_steps, restore_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        paths = write_testbed(work / "testbed", n_train=args.n_train, noise=0.0, seed=args.seed,
                              n_test_per_category=args.n_test)
        tok = load_tokenizer(paths["tokenizer"])
        config = preset_config(args.preset, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        pool = load_pool(paths["pool"], tok, max_len=config.max_position_embeddings)
        train_config = TrainConfig(lr=args.lr, schedule=args.schedule, warmup_ratio=args.warmup, epochs=1000,
                                   max_steps=args.steps, batch_size=args.batch, seed=args.seed,
                                   save_every=args.eval_every, max_grad_norm=1.0)
        run_dir = work / "run"
        train(init_model(config, seed=args.seed), pool, train_config, run_dir, resume=True, export=False)
        times = {}
        with open(run_dir / "metrics.jsonl") as f:
            for line in f:
                record = json.loads(line)
                times[record["step"]] = record["time"]
        rows = []
        for step in checkpoint_steps(run_dir):
            model = restore_model(run_dir, init_model(config, seed=args.seed), step)
            report = evaluate(model, tok, paths["test"], kinds=("exact_match",), max_new_tokens=12, batch_size=64)
            per_cat = {c: v["accuracy"] for c, v in report["exact_match"]["per_category"].items()}
            row = {"step": step, "train_seconds": round(times[step], 1),
                   "exact_match": report["exact_match"]["overall"]["accuracy"],
                   "categories_at_target": sum(a >= args.target for a in per_cat.values()),
                   "per_category": per_cat}
            rows.append(row)
            print(f"step {step:5d}  {row['train_seconds']:7.1f} s  EM {row['exact_match']:.3f}  "
                  f">={args.target:.0%}: {row['categories_at_target']}/{len(per_cat)}  "
                  + " ".join(f"{c}={a:.2f}" for c, a in sorted(per_cat.items())), flush=True)
    result = {"args": vars(args), "n_pool": len(pool), "curve": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
