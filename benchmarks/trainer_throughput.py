"""Training throughput of the jraise train step vs an equivalent transformers/PyTorch loop.

Both sides train the same model (a jraise preset saved with `save_model`, loaded back by jraise and
by `AutoModelForCausalLM.from_pretrained`) on the same testbed batches (bucketed, right-padded,
from `iterate_batches`), with the same loss (mean NLL over response tokens) and the same optimizer
(AdamW, constant lr, decay on matrices only, global-norm clipping at 1.0). jraise runs its real
trainer step (`make_train_step` + `make_optimizer`, as `train` does); PyTorch runs the classic
zero_grad / forward / backward / clip / step loop.

Each side is warmed up first (jit compiles every bucket shape; PyTorch allocates), then both
train over the same K batches for several rounds, alternating which goes first. Throughput is
real (prompt + response, not padding) tokens per second of a round; the JSON result reports the
median over rounds and the ratio jraise / PyTorch measured in this one run. On a shared machine
absolute numbers drift; compare the ratio.

PyTorch runs single-threaded by default (``--torch-threads 0`` gives torch's own default): on a
shared 2-core machine its OpenMP workers spin-wait against other processes and a 2-thread torch
step measured 10x slower than a 1-thread one, which would flatter jraise.

    python benchmarks/trainer_throughput.py --preset small --batch 16 --steps 8 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time


def _torch_side(model_dir, batches, lr, weight_decay, max_grad_norm):
    """(one training step on batch i, the model) for the transformers model in ``model_dir``."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    tensors = [{k: torch.from_numpy(b[k]) for k in ("input_ids", "attention_mask", "loss_mask", "example_mask")}
               for b in batches]
    for t in tensors:
        t["input_ids"] = t["input_ids"].long()

    def step(i: int) -> float:
        b = tensors[i]
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                b["input_ids"][:, 1:].reshape(-1), reduction="none")
        weights = (b["loss_mask"][:, 1:] * b["example_mask"][:, None]).reshape(-1)
        loss = (nll * weights).sum() / weights.sum().clamp(min=1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        return float(loss.detach())

    return step


def _jraise_side(model_dir, batches, lr, weight_decay, max_grad_norm):
    """(one training step on batch i, blocking until it is done) with jraise's trainer step."""
    import jax

    from jraise.model import load_model
    from jraise.train import (
        make_optimizer,
        make_train_step,
        param_dtypes,
        split_trainable,
    )

    model, _ = load_model(model_dir)
    graphdef, trainable, frozen = split_trainable(model)
    tx, _ = make_optimizer(lr, total_steps=1, schedule="constant", weight_decay=weight_decay,
                           max_grad_norm=max_grad_norm)
    state = {"trainable": trainable, "opt": jax.jit(tx.init)(trainable)}
    step_fn = make_train_step(graphdef, tx, param_dtypes(model))
    device_batches = [jax.device_put({k: b[k][None] for k in ("input_ids", "attention_mask", "loss_mask",
                                                              "example_mask")}) for b in batches]

    def step(i: int) -> float:
        state["trainable"], state["opt"], metrics = step_fn(state["trainable"], state["opt"], frozen,
                                                            device_batches[i])
        return float(metrics["loss"])  # float() waits for the step, as PyTorch's loop does

    return step


def _round_tokens_per_s(step, n_steps: int, tokens: list[int]) -> float:
    start = time.perf_counter()
    for i in range(n_steps):
        step(i)
    return sum(tokens[:n_steps]) / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--n-train", type=int, default=256, help="testbed pool size")
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--n-buckets", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="batches per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--torch-threads", type=int, default=1, help="0: torch's default (see above)")
    args = parser.parse_args(argv)

    import jax
    import torch

    from jraise.data.batching import epoch_order, iterate_batches, length_buckets
    from jraise.data.pool import load_pool
    from jraise.testbed import write_testbed
    from jraise.model import (
        init_model,
        load_tokenizer,
        parameter_count,
        preset_config,
        save_model,
    )

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    weight_decay, max_grad_norm = 0.01, 1.0
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_testbed(f"{tmp}/testbed", n_train=args.n_train, n_test_per_category=1)
        tok = load_tokenizer(paths["tokenizer"])
        pool = load_pool(paths["pool"], tok, max_len=args.max_len)
        buckets = length_buckets(pool.lengths, args.n_buckets)
        batch_iter = iterate_batches(pool, epoch_order(len(pool), 0, 0), args.batch, buckets, drop_last=True)
        batches = [b for _, b in zip(range(args.steps), batch_iter)]
        if len(batches) < args.steps:
            raise SystemExit(f"the pool gives only {len(batches)} full batches; raise --n-train")
        tokens = [int(b["attention_mask"].sum()) for b in batches]

        config = preset_config(args.preset, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
        model = init_model(config, seed=0)
        n_params = parameter_count(model)
        save_model(model, config, f"{tmp}/model")
        sides = {"jraise": _jraise_side(f"{tmp}/model", batches, args.lr, weight_decay, max_grad_norm),
                 "torch": _torch_side(f"{tmp}/model", batches, args.lr, weight_decay, max_grad_norm)}

    # Warm-up: the first step's loss is the same model on the same batch (a parity check); then
    # every batch once, which compiles each bucket shape for jraise.
    first_loss = {name: step(0) for name, step in sides.items()}
    for step in sides.values():
        for i in range(1, args.steps):
            step(i)

    rates = {name: [] for name in sides}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            rates[name].append(_round_tokens_per_s(sides[name], args.steps, tokens))

    median = {name: statistics.median(v) for name, v in rates.items()}
    result = {
        "preset": args.preset, "params": n_params, "batch": args.batch,
        "bucket_lengths_used": sorted({int(b["input_ids"].shape[1]) for b in batches}),
        "steps_per_round": args.steps, "rounds": args.rounds, "tokens_per_round": sum(tokens),
        "response_token_fraction": round(sum(float(b["loss_mask"].sum()) for b in batches) / sum(tokens), 4),
        "device": str(jax.devices()[0]), "torch_threads": torch.get_num_threads(),
        "jraise_tokens_per_s": round(median["jraise"], 1),
        "torch_tokens_per_s": round(median["torch"], 1),
        "ratio_jraise_over_torch": round(median["jraise"] / median["torch"], 3),
        "jraise_rounds": [round(x, 1) for x in rates["jraise"]],
        "torch_rounds": [round(x, 1) for x in rates["torch"]],
        "first_step_loss": {name: round(v, 5) for name, v in first_loss.items()},
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
