"""Forward+backward tokens/s of a jraise preset vs the same model in transformers (PyTorch).

Both frameworks get identical weights (the jraise model is saved as an HF checkpoint and loaded by
`AutoModelForCausalLM`), the same random token batch, and a mean next-token cross-entropy with
gradients for every parameter. Each side is warmed up (jit compile / first-call allocation), then
timed over `--iters` steps; the median step time gives tokens/s. The ratio is what to compare:
absolute numbers drift on shared machines.

    python benchmarks/model_throughput.py --preset small --batch 16 --seq 128

``--layers/--heads/--kv-heads/--head-dim`` override the preset's depth and attention shape (same
width when heads x head_dim is kept), to compare shapes on both frameworks, e.g. ``--heads 4
--kv-heads 2 --head-dim 32`` against the `small` preset's 8 heads of 16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time


def _median_seconds(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    parser.add_argument("--heads", type=int, default=None, help="query heads (default: the preset's)")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: the preset's)")
    parser.add_argument("--head-dim", type=int, default=None, help="dims per head (default: the preset's)")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from jraise.model import init_model, load_model, parameter_count, preset_config, save_model

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    shape = {k: v for k, v in (("num_hidden_layers", args.layers), ("num_attention_heads", args.heads),
                                ("num_key_value_heads", args.kv_heads), ("head_dim", args.head_dim)) if v is not None}
    config = preset_config(args.preset, vocab_size=args.vocab, **shape)
    tokens = np.random.RandomState(0).randint(0, args.vocab, (args.batch, args.seq)).astype(np.int32)
    n_tokens = args.batch * args.seq

    with tempfile.TemporaryDirectory() as tmp:
        save_model(init_model(config, seed=0), config, tmp)
        model, _ = load_model(tmp, dtype=args.dtype)
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, dtype=torch.float32 if args.dtype == "float32" else torch.bfloat16)
    torch_model.train()

    # --- jraise: one jitted value_and_grad over all parameters.
    def loss_fn(model, ids):
        logp = jax.nn.log_softmax(model(ids)[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))

    graphdef, state = nnx.split(model)

    @jax.jit
    def jax_step(state, ids):
        def pure(state):
            return loss_fn(nnx.merge(graphdef, state), ids)
        return jax.value_and_grad(pure)(state)

    ids = jnp.asarray(tokens)
    jax_loss = float(jax.block_until_ready(jax_step(state, ids))[0])  # compile
    jax_s = _median_seconds(lambda: jax.block_until_ready(jax_step(state, ids)), args.iters)

    # --- transformers PyTorch: the same loss, backward, grads cleared each step.
    t_ids = torch.tensor(tokens, dtype=torch.long)

    def torch_step():
        torch_model.zero_grad(set_to_none=True)
        logits = torch_model(t_ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t_ids[:, 1:].reshape(-1))
        loss.backward()
        return loss

    torch_loss = float(torch_step())  # warm-up
    torch_s = _median_seconds(torch_step, args.iters)

    result = {
        "preset": args.preset, "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads, "head_dim": config.head_dim, "params": parameter_count(model), "batch": args.batch, "seq": args.seq,
        "dtype": args.dtype, "device": str(jax.devices()[0]), "torch_threads": torch.get_num_threads(),
        "jraise_tokens_per_s": round(n_tokens / jax_s, 1),
        "torch_tokens_per_s": round(n_tokens / torch_s, 1),
        "ratio_jraise_over_torch": round(torch_s / jax_s, 3),
        "loss_jraise": round(jax_loss, 5), "loss_torch": round(torch_loss, 5),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
