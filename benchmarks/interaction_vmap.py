"""Beyond-IID intervention runs: N+1 fine-tunes as one vmapped program vs one after another.

`jraise.select.intervention.train_interventions` trains the R = N+1 runs of the interaction
design (baseline D0, then D0 with each category changed by Delta_k) either as one `jax.vmap`-ed
program per step (``mode="vmap"``) or run after run with the plain jitted train step
(``mode="sequential"``). Both do the same math on the same padded batches; this script times
them on the built-in testbed and checks that they agree.

Each mode compiles each step shape on first use (reported as ``compile_s``, tracing included,
and left out of ``train_s``); ``train_s`` is the training loop alone (batch building included,
which is the same work in both modes). Rounds alternate which mode goes first; compilation happens in
round 1 only (programs are cached). The ratio sequential / vmap of the median ``train_s`` is the
speed-up measured in this one run; on a shared machine absolute times drift, compare the ratio.

    python benchmarks/interaction_vmap.py --preset small --categories 8 --steps 10 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time


def _max_rel_err(a, b) -> float:
    import jax
    import numpy as np

    errs = []
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        errs.append(float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)))
    return max(errs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="jraise model preset (tiny, small)")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--categories", type=int, default=8, help="testbed categories N (R = N+1 runs)")
    parser.add_argument("--n-train", type=int, default=400, help="testbed pool size")
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--base-fraction", type=float, default=0.5)
    parser.add_argument("--delta-fraction", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=10, help="the fixed step budget of every run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n-buckets", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tuning; >0: LoRA adapters")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    args = parser.parse_args(argv)

    import jax

    from jraise.data.pool import load_pool
    from jraise.testbed import CATEGORIES, write_testbed
    from jraise.model import init_model, load_tokenizer, parameter_count, preset_config
    from jraise.model.lora import LoRAConfig, add_lora
    from jraise.select.intervention import (
        InterventionConfig,
        intervention_sets,
        pool_categories,
        train_interventions,
    )

    if not 1 <= args.categories <= len(CATEGORIES):
        raise SystemExit(f"--categories must be in 1..{len(CATEGORIES)}")
    names = list(CATEGORIES[: args.categories])
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_testbed(f"{tmp}/testbed", n_train=args.n_train, n_val_per_category=1,
                              n_test_per_category=1, categories=names)
        tok = load_tokenizer(paths["tokenizer"])
        pool = load_pool(paths["pool"], tok, max_len=args.max_len)
    overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
    model_config = preset_config(args.preset, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id, **overrides)
    model = init_model(model_config, seed=0)
    if args.lora_rank:
        add_lora(model, LoRAConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank), seed=1)
    config = InterventionConfig(delta_fraction=args.delta_fraction, base_fraction=args.base_fraction,
                                steps=args.steps, batch_size=args.batch, lr=args.lr, n_buckets=args.n_buckets,
                                seed=0)
    base, sets, deltas, cats = intervention_sets(pool_categories(pool), config)

    start_all = time.perf_counter()
    stats = {"vmap": [], "sequential": []}
    results = {}
    for r in range(args.rounds):
        order = ["vmap", "sequential"] if r % 2 == 0 else ["sequential", "vmap"]
        for mode in order:
            s: dict = {}
            results[mode] = train_interventions(model, pool, config, mode, progress=False, sets=sets, stats=s)
            stats[mode].append(s)
            print(f"round {r + 1}/{args.rounds} {mode:>10}: compile {s['compile_s']:.2f} s, "
                  f"train {s['train_s']:.2f} s", flush=True)

    train_s = {m: [s["train_s"] for s in v] for m, v in stats.items()}
    median = {m: statistics.median(v) for m, v in train_s.items()}
    n_runs = len(sets)
    result = {
        "preset": args.preset, "layers": model_config.num_hidden_layers, "params": parameter_count(model),
        "trainable": f"lora r={args.lora_rank}" if args.lora_rank else "full",
        "categories": list(cats), "runs": n_runs, "deltas": [int(d) for d in deltas],
        "base_size": len(base), "set_sizes": [len(s) for s in sets],
        "steps_per_run": args.steps, "batch": args.batch, "max_len": args.max_len,
        "bucket_lengths_used": stats["vmap"][0]["bucket_lengths"], "rounds": args.rounds,
        "device": str(jax.devices()[0]), "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
        "compile_s": {m: round(v[0]["compile_s"], 3) for m, v in stats.items()},
        "train_s_rounds": {m: [round(x, 3) for x in v] for m, v in train_s.items()},
        "train_s_median": {m: round(v, 3) for m, v in median.items()},
        "run_steps_per_s": {m: round(n_runs * args.steps / v, 2) for m, v in median.items()},
        "speedup_vmap_over_sequential": round(median["sequential"] / median["vmap"], 3),
        "speedup_per_round": [round(a / b, 3) for a, b in zip(train_s["sequential"], train_s["vmap"])],
        "max_rel_err_vmap_vs_sequential": _max_rel_err(results["vmap"], results["sequential"]),
        "total_s": round(time.perf_counter() - start_all, 1),
    }
    print(json.dumps(result, indent=2))
    print(f"speed-up vmap over sequential (median train time, this run): "
          f"{result['speedup_vmap_over_sequential']}x")
    if args.out:
        from jraise.atomic import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
