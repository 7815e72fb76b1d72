"""Overhead of RAISE's fused policy-plus-learner step over a plain jitted SFT step.

Both sides run T optimizer steps of B examples on the same model and the same device-resident
testbed pool (padded to one length, as the fused episode needs):

* plain: a `lax.scan` of T `accumulated_grads` + AdamW steps on fixed random batches (indices drawn
  on the host beforehand), plus the same validation loss after every step (RAISE's reward needs
  it, so the ratio isolates what selection itself adds);
* fused: `make_episode` (score all N examples with the acquisition MLP -> per-cluster Gumbel-top-b
  -> gather -> the same optimizer step -> the same validation loss);
* loop: the same fused step, jitted alone and called from a Python loop T times (what an episode
  costs without `lax.scan`: one dispatch and host round trip per step).

Each side is compiled and warmed up first, then the rounds alternate which side goes first; the
figure is the median time per step and the ratio fused / plain measured in one run.

    python benchmarks/raise_fused_step.py --preset small --n-train 2000 --steps 20 --batch 16 --clusters 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--clusters", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jraise.data.pool import load_pool
    from jraise.testbed import write_testbed
    from jraise.model import init_model, load_tokenizer, preset_config
    from jraise.select.rl.episode import (
        EpisodeConfig,
        device_pool,
        make_episode,
        make_fused_step,
        validation_loss,
    )
    from jraise.select.rl.policy import AcquisitionMLP, PolicyConfig
    from jraise.select.rl.sampling import cluster_layout
    from jraise.train.step import (
        accumulated_grads,
        make_optimizer,
        param_dtypes,
        split_trainable,
    )

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_testbed(f"{tmp}/tb", n_train=args.n_train, n_val_per_category=4, n_test_per_category=1)
        tok = load_tokenizer(paths["tokenizer"])
        pool = load_pool(paths["pool"], tok, max_len=256)
        val_pool = load_pool(paths["val"], tok, max_len=256)
    model = init_model(preset_config(args.preset, vocab_size=len(tok)), seed=0)
    graphdef, trainable, frozen = split_trainable(model)
    dtypes = param_dtypes(model)
    tx, _ = make_optimizer(1e-3, total_steps=args.steps, schedule="constant")
    dpool = device_pool(pool)
    val = device_pool(val_pool).rows(jnp.arange(len(val_pool)))
    rng = np.random.default_rng(0)
    static = jnp.asarray(rng.normal(size=(len(pool), 36)), jnp.float32)
    layout = cluster_layout(rng.integers(0, args.clusters, len(pool)), args.clusters)
    per_cluster = args.batch // args.clusters
    actor_graphdef, actor_state = nnx.split(AcquisitionMLP(PolicyConfig(), rngs=nnx.Rngs(0)))
    episode = make_episode(graphdef, tx, dtypes, actor_graphdef, EpisodeConfig(args.steps, per_cluster))
    fixed = jnp.asarray(rng.integers(0, len(pool), (args.steps, per_cluster * args.clusters)), jnp.int32)

    @jax.jit
    def plain(trainable, opt_state):
        def body(carry, indices):
            trainable, opt_state = carry
            batch = jax.tree.map(lambda x: x[None], dpool.rows(indices))
            grads, _, _, _ = accumulated_grads(graphdef, dtypes, trainable, frozen, batch)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            trainable = jax.tree.map(jnp.add, trainable, updates)
            return (trainable, opt_state), validation_loss(graphdef, dtypes, trainable, frozen, val)

        (trainable, opt_state), losses = jax.lax.scan(body, (trainable, opt_state), fixed)
        return trainable, losses

    def run_plain():
        out = plain(trainable, tx.init(trainable))
        jax.block_until_ready(out)

    def run_fused():
        out = episode(actor_state, trainable, tx.init(trainable), frozen, static, layout, dpool, val, jax.random.key(1))
        jax.block_until_ready(out)

    step = jax.jit(make_fused_step(graphdef, tx, dtypes, actor_graphdef, EpisodeConfig(args.steps, per_cluster)))

    def run_loop():
        val0 = validation_loss(graphdef, dtypes, trainable, frozen, val)
        carry = (trainable, tx.init(trainable), jnp.zeros(len(pool)), val0)
        for t in range(1, args.steps + 1):
            carry, _ = step(actor_state, carry, t, jax.random.key(1), static, layout, dpool, val, frozen)
        jax.block_until_ready(carry)

    sides = {"plain": run_plain, "fused": run_fused, "loop": run_loop}
    for fn in sides.values():
        fn()  # compile + warm up
    times = {name: [] for name in sides}
    for r in range(args.rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            start = time.perf_counter()
            sides[name]()
            times[name].append((time.perf_counter() - start) / args.steps)
    per_step = {name: statistics.median(t) for name, t in times.items()}
    result = {"args": vars(args), "pool": len(pool), "seq_len": int(dpool.input_ids.shape[1]),
              "seconds_per_step": per_step, "rounds": times,
              "overhead_ratio_fused_over_plain": per_step["fused"] / per_step["plain"],
              "speedup_scan_over_python_loop": per_step["loop"] / per_step["fused"],
              "device": str(jax.devices()[0])}
    print(json.dumps(result, indent=2))
    print(f"\nfused step {per_step['fused'] * 1e3:.1f} ms vs plain SFT step {per_step['plain'] * 1e3:.1f} ms "
          f"(both with the validation loss): overhead {result['overhead_ratio_fused_over_plain']:.2f}x; "
          f"Python loop of jitted fused steps {per_step['loop'] * 1e3:.1f} ms: scan is "
          f"{result['speedup_scan_over_python_loop']:.2f}x faster")
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
