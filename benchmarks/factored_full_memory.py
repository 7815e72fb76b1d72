"""Full-parameter factored gradient features (never-materialised, `jraise.grads.factored_full`):
throughput against a full fine-tuning step, and compiled memory against the materialised path.

For every model in ``--models`` (jraise presets, e.g. ``small`` and ``base``: about 50x apart in
parameter count; random weights, vocabulary ``--vocab``; and ``smollm2-135m-instruct``, the real
SmolLM2-135M-Instruct with its 49,152-token vocabulary, whose LM head is tied to the embedding
table, so neither is featurised while training updates both), on the same ``--n-examples`` random
examples of ``--seq-len`` tokens (the second half of each row is the response):

1. **features**: ``factored_full_features`` of every `Projection` of the model (q, k, v, o, gate,
   up, down, the untied LM head) through `jraise.model.taps.tapped_sft_loss`, d = ``--dim``,
   ``--chunk`` examples per vmapped step, Adafactor-preconditioned from a random second moment
   (``--precondition none`` leaves it out); one jitted call over all examples.
2. **training**: a plain jitted full fine-tuning step on batches of ``--chunk`` of the same
   examples: ``value_and_grad`` of the batch's response NLL over all parameters, then an
   ``optax.adam`` update (parameters and optimiser state donated).

Throughput: examples/s of each (median of ``--rounds`` timed rounds, the order of the two sides
rotating, after one compile and one untimed round each), and ``features_over_training``, their
ratio (the issue's goal on SmolLM2: >= 0.8).

Memory (``jax.jit(...).lower(...).compile().memory_analysis()``, the XLA buffer assignment of the
compiled program; works on CPU): ``temp_size_in_bytes`` (scratch beyond the program's arguments
and outputs) of one chunk (``--chunk`` examples) of (a) the factored features (the timed program:
`lax.map` runs one chunk at a time); of the materialised path, `gradient_features` (``jax.grad``
of every parameter per example; compiled, not run), (b) in ``"dense"`` mode (LESS's: the chunk's
gradients flattened to [chunk, P], so at least ``chunk x P x 4`` bytes) and (c) in ``"factored"``
mode (each kernel's per-example gradient projected by its Kronecker factors: XLA can free a
leaf's gradients once projected, so it holds fewer than all of them at once); (d) the timed
training step (a batch of ``--chunk`` rows, parameters and optimiser state donated; its scratch
holds the activations and the gradient). Also ``chunk x P x 4`` bytes and an activation estimate
``chunk x T x sum(n_in + n_out) x 4`` of the tapped layers (what (a) holds). (a) grows with the
activations (width, depth, tokens), (b) with the parameter count times the chunk.

Output: figures printed, and a JSON file (``--out``, default
``benchmarks/results/factored_full_memory.json``; its path printed last) with keys
``"<model>/{features,training}/examples_per_s"``, ``"<model>/features_over_training"``,
``"<model>/memory/{factored,materialised_dense,materialised_factored,training}_temp_bytes"``,
``"<model>/params"`` and the details under ``"details"``.

    python benchmarks/factored_full_memory.py                       # small and base: about 3 minutes on 2 CPU cores
    python benchmarks/factored_full_memory.py --models small --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SMOLLM2 = "smollm2-135m-instruct"


def _batch(n: int, seq_len: int, vocab: int, seed: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    loss_mask = np.zeros((n, seq_len), np.int32)
    loss_mask[:, seq_len // 2:] = 1
    return {"input_ids": rng.integers(3, vocab, (n, seq_len)).astype(np.int32),
            "attention_mask": np.ones((n, seq_len), np.int32), "loss_mask": loss_mask,
            "example_mask": np.ones(n, np.float32)}


def _temp_bytes(fn, *args, **kwargs) -> int:
    stats = fn.lower(*args, **kwargs).compile().memory_analysis()
    return int(stats.temp_size_in_bytes) if stats is not None else -1


def _timed(sides: dict, rounds: int) -> dict:
    """{name: (median seconds, every round, warm-up seconds)}: every side warmed up (compiled) once,
    then ``rounds`` rounds, the order of the sides rotating from round to round (a shared machine
    drifts)."""
    warm, times = {}, {name: [] for name in sides}
    for name, run in sides.items():
        start = time.perf_counter()
        run()
        warm[name] = time.perf_counter() - start
    order = list(sides)
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            start = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), times[name], warm[name]) for name in sides}


def measure(preset: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from jraise.grads import ProjectionConfig, adafactor_factors, factored_full_features, gradient_features
    from jraise.grads.factored_full import factored_full_split
    from jraise.grads.per_example import example_loss
    from jraise.loglik import response_nll
    from jraise.model import init_model, preset_config
    from jraise.model.taps import layer_kernels, projection_names, tapped_sft_loss
    from jraise.train.step import split_trainable

    if preset == SMOLLM2:  # the real model (`jraise fetch smollm2-135m-instruct`), its own vocabulary
        from jraise.fetch import fetch_smollm2
        from jraise.model import load_model

        model, _ = load_model(fetch_smollm2(args.cache))
        vocab = int(model.config.vocab_size)
    else:
        model, vocab = init_model(preset_config(preset, vocab_size=args.vocab), seed=args.seed), args.vocab
    graphdef, trainable, frozen = split_trainable(model)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    names = projection_names(model)
    kernels = layer_kernels(trainable, names)
    shapes = [tuple(kernels[n].shape) for n in names]
    split = factored_full_split(shapes, args.dim, names)
    batch = _batch(args.n_examples, args.seq_len, vocab, args.seed)
    chunk_batch = {k: v[:args.chunk] for k, v in batch.items()}
    proj = ProjectionConfig(dim=args.dim, seed=args.seed, mode="factored")
    rng = np.random.default_rng(args.seed)
    factors = None
    if args.precondition == "adafactor":
        factors = adafactor_factors({n: jnp.asarray((1e-3 * rng.uniform(0.5, 1.5, kernels[n].shape)) ** 2,
                                                    jnp.float32) for n in names})

    features = jax.jit(partial(factored_full_features, tapped_sft_loss(graphdef), projection=proj, chunk=args.chunk))
    params = (trainable, frozen)

    # training: value_and_grad over all parameters + adam
    optimizer = optax.adam(1e-4)

    def train_step(trainable, opt_state, batch):
        def loss(t):
            nll, tokens = response_nll(nnx.merge(graphdef, t, frozen, copy=True), batch)
            return nll.sum() / jnp.maximum(tokens.sum(), 1.0)

        value, grads = jax.value_and_grad(loss)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    step = jax.jit(train_step, donate_argnums=(0, 1))
    state = {"params": jax.tree.map(jnp.copy, trainable)}
    state["opt"] = optimizer.init(state["params"])
    steps = [{k: jnp.asarray(v[i:i + args.chunk]) for k, v in batch.items()}
             for i in range(0, args.n_examples, args.chunk)]
    device_batch = {k: jnp.asarray(v) for k, v in batch.items()}

    # one compile per program: the compiled objects are timed and give the memory figures
    start = time.perf_counter()
    features_c = features.lower(params, device_batch, precondition=factors).compile()
    features_compile = time.perf_counter() - start
    start = time.perf_counter()
    step_c = step.lower(state["params"], state["opt"], steps[0]).compile()
    training_compile = time.perf_counter() - start

    def run_features():
        return features_c(params, device_batch, precondition=factors).block_until_ready()

    def run_training():
        value = None
        for rows in steps:
            state["params"], state["opt"], value = step_c(state["params"], state["opt"], rows)
        value.block_until_ready()

    timing = _timed({"features": run_features, "training": run_training}, args.rounds)
    (feat_med, feat_rounds, feat_warm), (train_med, train_rounds, train_warm) = timing["features"], timing["training"]
    feat_eps, train_eps = args.n_examples / feat_med, args.n_examples / train_med

    # compiled memory of one chunk of the materialised path
    def materialised(p, b, mode):
        def loss_fn(t, row):
            return example_loss(nnx.merge(graphdef, t, frozen, copy=True), row, "sft")
        return gradient_features(loss_fn, p, b, projection=ProjectionConfig(dim=args.dim, seed=args.seed, mode=mode),
                                 chunk=args.chunk)

    chunk_dev = {k: jnp.asarray(v) for k, v in chunk_batch.items()}
    factored_temp = int(features_c.memory_analysis().temp_size_in_bytes)  # lax.map: one chunk at a time
    dense_temp = _temp_bytes(jax.jit(partial(materialised, mode="dense")), trainable, chunk_dev)
    materialised_temp = _temp_bytes(jax.jit(partial(materialised, mode="factored")), trainable, chunk_dev)
    training_temp = int(step_c.memory_analysis().temp_size_in_bytes)
    activations = args.chunk * args.seq_len * sum(a + b for a, b in shapes) * 4

    result = {
        f"{preset}/params": n_params,
        f"{preset}/features/examples_per_s": feat_eps,
        f"{preset}/training/examples_per_s": train_eps,
        f"{preset}/features_over_training": feat_eps / train_eps,
        f"{preset}/memory/factored_temp_bytes": factored_temp,
        f"{preset}/memory/materialised_dense_temp_bytes": dense_temp,
        f"{preset}/memory/materialised_factored_temp_bytes": materialised_temp,
        f"{preset}/memory/training_temp_bytes": training_temp,
        f"{preset}/memory/chunk_x_params_bytes": args.chunk * n_params * 4,
        f"{preset}/memory/tapped_activations_bytes": activations,
    }
    details = {"layers": len(names), "kernel_params": int(sum(a * b for a, b in shapes)),
               "split": {n: list(s) for n, s in zip(names, split)},
               "features_compile_s": features_compile, "training_compile_s": training_compile,
               "features_rounds_s": feat_rounds, "features_warmup_s": feat_warm,
               "training_rounds_s": train_rounds, "training_warmup_s": train_warm}
    return result, details


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small,base",
                        help=f"jraise presets and/or {SMOLLM2} (the real model, from the cache), comma-separated")
    parser.add_argument("--cache", default=None, help="jraise cache for the real model (default $JRAISE_CACHE or "
                                                      "~/.cache/jraise)")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--n-examples", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=8, help="examples per vmapped step (features) and per "
                                                              "training batch")
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--precondition", choices=("adafactor", "none"), default="adafactor")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "factored_full_memory.json"))
    args = parser.parse_args(argv)
    if args.n_examples % args.chunk:
        parser.error("--n-examples must be a multiple of --chunk (training takes whole batches)")

    import jax

    result, details = {}, {}
    for preset in args.models.split(","):
        start = time.perf_counter()
        figures, info = measure(preset, args)
        info["seconds"] = time.perf_counter() - start
        result.update(figures)
        details[preset] = info
        mib = 1024 ** 2
        print(f"{preset}: P = {figures[f'{preset}/params']:,} parameters, {info['layers']} tapped layers "
              f"({info['seconds']:.0f} s)")
        print(f"  examples/s: factored features {figures[f'{preset}/features/examples_per_s']:.1f}, "
              f"training step {figures[f'{preset}/training/examples_per_s']:.1f}, "
              f"ratio {figures[f'{preset}/features_over_training']:.2f}")
        print(f"  temp MiB per chunk of {args.chunk}: "
              f"factored {figures[f'{preset}/memory/factored_temp_bytes'] / mib:.1f}, "
              f"materialised dense {figures[f'{preset}/memory/materialised_dense_temp_bytes'] / mib:.1f}, "
              f"materialised factored {figures[f'{preset}/memory/materialised_factored_temp_bytes'] / mib:.1f}, "
              f"training {figures[f'{preset}/memory/training_temp_bytes'] / mib:.1f} "
              f"(chunk x P x 4: {figures[f'{preset}/memory/chunk_x_params_bytes'] / mib:.1f}, "
              f"tapped activations: {figures[f'{preset}/memory/tapped_activations_bytes'] / mib:.1f})")
    result["details"] = {**details, "args": vars(args), "command": " ".join([sys.executable, *sys.argv]),
                         "jax": jax.__version__, "backend": jax.default_backend(),
                         "device": str(jax.devices()[0]), "machine": platform.platform(),
                         "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
