"""Peak memory of one RAISE PPO update with a 1,000,000-record pool, against the episode length T.

The PPO update (`jraise.select.rl.trainer`'s jitted update: critic replay, GAE, then
``ppo_epochs`` Adam steps on the clipped surrogate) rebuilds each step's fused state [N, 39] from
the running selection counts inside a rematerialised `lax.scan` (`replay`), so what it keeps
between steps is O(T x B) (picks, log-probabilities, rewards) plus one [N] carry, never [T, N].

For each T this lowers and compiles the update for N records in C clusters (random static features,
a random rollout of T steps of B picks; no LLM is involved in the update) and reads XLA's own
memory analysis of the compiled program (temporary buffers = the working set beyond inputs and
outputs), then runs it once and reports the wall time. The claim holds when the temporaries stay
flat as T grows, while a naive [T, N, hidden] activation stash would grow linearly (shown for
reference as ``naive_stash``).

    python benchmarks/raise_ppo_memory.py --n 1000000 --steps 10,20,40 --batch 16 --clusters 4
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--steps", default="10,20,40", help="episode lengths T")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--clusters", type=int, default=4)
    parser.add_argument("--run", action=argparse.BooleanOptionalAction, default=True, help="also run each update once")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from jraise.select.rl.episode import Rollout
    from jraise.select.rl.policy import PolicyConfig
    from jraise.select.rl.sampling import cluster_layout
    from jraise.select.rl.trainer import RaiseConfig, ppo_update_fn, new_policy

    rng = np.random.default_rng(0)
    n, c = args.n, args.clusters
    per = args.batch // c
    labels = rng.integers(0, c, size=n)
    layout = cluster_layout(labels, c)
    static = jnp.asarray(rng.normal(size=(n, 36)), jnp.float32)
    policy_config = PolicyConfig()
    policy = new_policy(policy_config, 0)
    actor_graphdef, actor_state = nnx.split(policy.actor)
    critic_graphdef, critic_state = nnx.split(policy.critic)
    params = {"actor": actor_state, "critic": critic_state}
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)
    members = np.asarray(layout.members)
    sizes = np.asarray(layout.valid).sum(axis=1)
    hidden = max(policy_config.hidden)
    rows = []
    for t_len in [int(t) for t in args.steps.split(",")]:
        config = RaiseConfig(steps=t_len, per_cluster=per)
        update = ppo_update_fn(actor_graphdef, critic_graphdef, opt, config)
        picked = np.stack([np.stack([rng.choice(sizes[k], per, replace=False) for k in range(c)]) for _ in range(t_len)])
        indices = np.stack([np.concatenate([members[k][picked[t, k]] for k in range(c)]) for t in range(t_len)])
        rollout = Rollout(picked=jnp.asarray(picked, jnp.int32), indices=jnp.asarray(indices, jnp.int32),
                          logp=jnp.asarray(rng.normal(size=(t_len, c)) - 20.0, jnp.float32),
                          rewards=jnp.asarray(rng.normal(size=t_len) * 0.01, jnp.float32),
                          val_losses=jnp.asarray(np.linspace(2.0, 1.5, t_len), jnp.float32),
                          stages=jnp.asarray(np.stack([np.arange(1, t_len + 1) / t_len, -np.linspace(2, 1.5, t_len)], 1),
                                             jnp.float32),
                          val_loss0=jnp.asarray(2.0, jnp.float32))
        start = time.perf_counter()
        compiled = update.lower(params, opt_state, static, layout, rollout).compile()
        compile_s = time.perf_counter() - start
        mem = compiled.memory_analysis()
        row = {"T": t_len, "N": n, "B": args.batch, "clusters": c, "compile_s": compile_s,
               "temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes),
               "output_bytes": int(mem.output_size_in_bytes),
               "naive_stash_bytes": int(t_len * n * (hidden * 2 + policy_config.state_dim) * 4)}
        if args.run:
            start = time.perf_counter()
            out = compiled(params, opt_state, static, layout, rollout)
            jax.block_until_ready(out)
            row["run_s"] = time.perf_counter() - start
            row["policy_loss"] = float(out[2]["policy_loss"])
        rows.append(row)
        print(f"T={t_len:3d}: temporaries {row['temp_bytes'] / 2**30:.3f} GiB, arguments "
              f"{row['argument_bytes'] / 2**30:.3f} GiB (a [T, N] stash would be "
              f"{row['naive_stash_bytes'] / 2**30:.1f} GiB)" + (f", run {row['run_s']:.1f} s" if args.run else ""),
              flush=True)
    growth = rows[-1]["temp_bytes"] / max(rows[0]["temp_bytes"], 1)
    result = {"rows": rows, "temp_growth_first_to_last_T": growth,
              "devices": str(jax.devices()[0].platform)}
    print(f"temporaries at T={rows[-1]['T']} / at T={rows[0]['T']}: {growth:.3f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
