"""Gradient-feature throughput vs the number of devices on one `jraise.parallel` mesh.

For each device count n (virtual CPU devices: ``XLA_FLAGS=--xla_force_host_platform_device_count=n``,
one subprocess per n since the count is fixed when JAX starts) this computes the train-side LESS
features (LoRA gradients, Adam preconditioning, JL projection) of the same testbed pool on a
``data=n`` mesh with `compute_features`, after one untimed pass that compiles every length bucket,
and reports real examples per second (median of ``--rounds`` passes) and the ratio to n = 1. Every
run's features are checked against the n = 1 features (largest relative difference).

What it shows on a CPU: n virtual devices share the machine's cores, so the ratio measures the
partitioning overhead (and whatever core-level parallelism XLA's CPU backend did not already use),
not accelerator scaling. On real accelerators each device computes its own rows' per-example
gradients with no communication except one gather of FSDP-sharded weights per group call, so
throughput should grow nearly linearly with devices until host-side batch building (or, for
tiny models, per-call overhead) limits it; see BUILD_NOTES.md.

    python benchmarks/parallel_features.py --devices 1,2,4,8 --n-train 256 --preset small
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child(args) -> None:
    """One device count: time `compute_features` on a data=n mesh; print a JSON line."""
    import jax
    import numpy as np

    from jraise import parallel
    from jraise.data.pool import load_pool
    from jraise.testbed import write_testbed
    from jraise.grads.features import FeatureConfig, compute_features
    from jraise.grads.projection import ProjectionConfig
    from jraise.model import init_model, load_tokenizer, preset_config
    from jraise.model.lora import LoRAConfig, add_lora
    from jraise.train.step import param_dtypes, split_trainable

    work = Path(args.work)
    paths = write_testbed(work / "tb", n_train=args.n_train, n_val_per_category=1, n_test_per_category=1)
    tok = load_tokenizer(paths["tokenizer"])
    pool = load_pool(paths["pool"], tok, max_len=256)
    config = preset_config(args.preset, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    model = init_model(config, seed=0)
    add_lora(model, LoRAConfig(rank=args.lora_rank), seed=1)
    graphdef, trainable, frozen = split_trainable(model)
    moments = (jax.tree.map(lambda x: 0.1 * x + 0.01, trainable), jax.tree.map(lambda x: x * x + 0.02, trainable))
    features = FeatureConfig(projection=ProjectionConfig(dim=args.dim, seed=0), chunk=args.chunk, group=args.group,
                             n_buckets=args.buckets)
    rows = np.arange(len(pool))
    dtypes = param_dtypes(model)
    with parallel.use_mesh(f"data={jax.device_count()}"):
        out = compute_features(graphdef, trainable, frozen, pool, rows, features, "sft", moments, dtypes=dtypes)
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            out = compute_features(graphdef, trainable, frozen, pool, rows, features, "sft", moments, dtypes=dtypes)
            times.append(time.perf_counter() - start)
    np.save(work / "features.npy", out)
    print(json.dumps({"devices": jax.device_count(), "examples": len(pool), "seconds": times,
                      "examples_per_s": len(pool) / statistics.median(times)}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--group", type=int, default=64, help="rows per call; a multiple of every device count")
    parser.add_argument("--buckets", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)

    import numpy as np

    counts = [int(n) for n in args.devices.split(",")]
    runs, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            work = Path(tmp) / f"n{n}"
            work.mkdir()
            env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}
            settings = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "work", "out")]
            child = [sys.executable, __file__, "--child", "--work", str(work), *settings]
            proc = subprocess.run(child, env=env, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"device count {n} failed:\n{proc.stderr[-3000:]}")
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            feats = np.load(work / "features.npy")
            reference = feats if reference is None else reference
            run["max_rel_diff_vs_first"] = float(np.abs(feats - reference).max() / np.abs(reference).max())
            runs.append(run)
            print(f"{n} device(s): {run['examples_per_s']:.1f} examples/s "
                  f"(x{run['examples_per_s'] / runs[0]['examples_per_s']:.2f} vs {counts[0]}), "
                  f"max rel diff {run['max_rel_diff_vs_first']:.1e}", flush=True)
    result = {"command": " ".join(["python", "benchmarks/parallel_features.py", *(argv or sys.argv[1:])]),
              "settings": {k: v for k, v in vars(args).items() if k not in ("child", "work", "out")},
              "cpu_count": os.cpu_count(), "runs": runs}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
