"""Pure, jitted supervised fine-tuning steps: gradient accumulation, AdamW, the eval step.

Data flow: an `InstructionPool` batch (from `jraise.data.batching`) -> model logits -> response-token
cross entropy (`jraise.loglik.example_nll`) -> gradients of the trainable subset -> one optax AdamW
update.

State is split three ways at the jit boundary (`nnx.split` / `nnx.merge`): the graph definition
(static, closed over), the *trainable* state (a nested dict of float32 arrays: the LoRA adapters when
any are attached, else every `nnx.Param`) and the *frozen* rest (base weights under LoRA, RNG
streams). The trainable state is a float32 master copy even for a bfloat16 model: it is cast to the
model's parameter dtype inside the step, so gradients, the update and the Adam moments stay float32
while the forward/backward run in the model's dtype (the usual mixed-precision recipe).

Loss normalisation. A train step takes a batch with a leading accumulation axis, arrays
[A, B, L] (A micro-batches of B rows). It scans over the A micro-batches with `jax.lax.scan`,
summing the *token-summed* NLL and its gradient, then divides both by the total number of response
tokens of all A micro-batches and applies ONE optimizer update. The loss is therefore the mean NLL
over every response token of the accumulated batch, exactly what a single [A*B, L] batch gives:
splitting a batch into micro-batches changes memory use, not the update (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jraise import parallel
from jraise.loglik import example_nll, response_nll

SCHEDULES = ("linear", "cosine", "constant")
MODEL_KEYS = ("input_ids", "attention_mask", "loss_mask", "example_mask")  # what the model step reads

Pytree = Any


# ----------------------------------------------------------------------------------------------
# Splitting a model into (graphdef, trainable, frozen)


def trainable_filter(model: nnx.Module):
    """What trains: the LoRA adapters when any are attached, else every `nnx.Param`."""
    has_adapters = any(isinstance(node, nnx.LoRAParam) for _, node in nnx.iter_graph(model))
    return nnx.LoRAParam if has_adapters else nnx.Param


def split_trainable(model: nnx.Module) -> tuple[nnx.GraphDef, dict, nnx.State]:
    """(graphdef, trainable, frozen): trainable is a *fresh* float32 nested dict (a master copy).

    Copying matters twice: the train step donates the trainable buffers, which must not be the
    model's own arrays, and a bfloat16 model keeps float32 master weights.
    """
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(model), ...)
    master = jax.tree.map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True), nnx.to_pure_dict(trainable))
    return graphdef, master, frozen


def param_dtypes(model: nnx.Module) -> dict:
    """The model's own dtype of each trainable leaf (same structure as the trainable dict)."""
    _, trainable, _ = nnx.split(model, trainable_filter(model), ...)
    return jax.tree.map(lambda x: np.dtype(x.dtype), nnx.to_pure_dict(trainable))


def cast_to(tree: Pytree, dtypes: Pytree | None) -> Pytree:
    """Casts each leaf of ``tree`` to the matching dtype in ``dtypes`` (None: unchanged)."""
    if dtypes is None:
        return tree
    return jax.tree.map(lambda x, d: x.astype(d), tree, dtypes)


def assign_trainable(model: nnx.Module, trainable: Mapping) -> nnx.Module:
    """Writes a trainable dict (e.g. from a checkpoint) into ``model`` in place, cast to the
    model's dtypes. Errors name the first path that does not match."""
    _, state, _ = nnx.split(model, trainable_filter(model), ...)
    expected = nnx.to_pure_dict(state)
    want = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(trainable)}
    if set(want) != set(got):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise ValueError(f"trainable weights do not match the model: missing {missing[:3]}, "
                         f"unexpected {extra[:3]} (a LoRA checkpoint needs a model with the same adapters)")
    for name, x in got.items():
        if tuple(x.shape) != tuple(want[name].shape):
            raise ValueError(f"trainable weight {name} has shape {tuple(x.shape)}, the model's is "
                             f"{tuple(want[name].shape)}")
    nnx.replace_by_pure_dict(state, cast_to(trainable, jax.tree.map(lambda x: x.dtype, expected)))
    nnx.update(model, state)
    return model


# ----------------------------------------------------------------------------------------------
# Optimizer


def lr_schedule(peak_lr: float, total_steps: int, warmup_steps: int, kind: str = "linear") -> optax.Schedule:
    """Linear warmup from 0 to ``peak_lr`` over ``warmup_steps``, then decay to 0 at ``total_steps``.

    ``kind``: "linear" (linear decay, as transformers' default), "cosine"
    (`optax.warmup_cosine_decay_schedule`) or "constant" (flat after warmup). The value at update
    count s is the learning rate of the (s+1)-th update.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose from {', '.join(SCHEDULES)}")
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    decay_steps = max(total_steps - warmup_steps, 1)  # optax needs a positive decay length
    if kind == "cosine":
        sched = optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup_steps, warmup_steps + decay_steps, 0.0)
    else:
        warmup = optax.linear_schedule(0.0, peak_lr, warmup_steps)
        after = (optax.linear_schedule(peak_lr, 0.0, decay_steps) if kind == "linear"
                 else optax.constant_schedule(peak_lr))
        sched = optax.join_schedules([warmup, after], [warmup_steps])
    # float32 rounding can leave the decayed value at -1e-11: never step uphill.
    return lambda count: jnp.maximum(sched(count), 0.0)


def decay_mask(params: Pytree) -> Pytree:
    """Weight decay on matrices only (kernels, embeddings, LoRA A/B), not on norms or biases,
    as transformers' Trainer does: decaying a norm's gain towards 0 is not regularisation."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(lr: float, total_steps: int, warmup_steps: int = 0, schedule: str = "linear",
                   weight_decay: float = 0.0, max_grad_norm: float | None = None, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(AdamW with optional global-norm clipping, its learning-rate schedule).

    Arguments are plain numbers so a checkpoint can store them and rebuild the same optimizer.
    """
    sched = lr_schedule(lr, total_steps, warmup_steps, schedule)
    adamw = optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    if max_grad_norm is not None and max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw), sched
    return adamw, sched


def adam_moments(opt_state: Pytree) -> tuple[Pytree, Pytree]:
    """(mu, nu): Adam's first and second moment estimates, each shaped like the trainable state.

    Finds the `optax.ScaleByAdamState` inside any chain/mask nesting; a raw Orbax restore (lists
    and dicts instead of named tuples) works too. LESS reads these to precondition gradients.
    """
    found = []

    def visit(node):
        if isinstance(node, optax.ScaleByAdamState):
            found.append((node.mu, node.nu))
        elif isinstance(node, Mapping) and {"mu", "nu", "count"} <= set(node):
            found.append((node["mu"], node["nu"]))
        elif isinstance(node, Mapping):
            for value in node.values():
                visit(value)
        elif isinstance(node, (tuple, list)):
            for value in node:
                visit(value)

    visit(opt_state)
    if len(found) != 1:
        raise ValueError(f"expected exactly one Adam state in the optimizer state, found {len(found)}")
    return found[0]


# ----------------------------------------------------------------------------------------------
# Steps


def _model_inputs(batch: Mapping[str, jax.Array]) -> dict:
    return {k: batch[k] for k in MODEL_KEYS}


def _summed_loss(graphdef, dtypes, trainable, frozen, batch, key):
    """(summed response NLL, (response tokens, real tokens)) of one micro-batch [B, L]."""
    # copy=True: fresh Variables at this trace level, so reseeding below may mutate them (the
    # frozen state's own Variables belong to the outer jit trace).
    model = nnx.merge(graphdef, cast_to(trainable, dtypes), frozen, copy=True)
    if key is not None:
        # Dropout draws from RNG streams inside the frozen state; a pure step cannot carry their
        # counters forward, so each (step, micro-batch) reseeds them from an explicit key.
        nnx.reseed(model, dropout=key)
    logits = model(batch["input_ids"], batch["attention_mask"])
    nll, tokens = example_nll(logits, batch["input_ids"], batch["loss_mask"], batch["example_mask"])
    return jnp.sum(nll), (jnp.sum(tokens), jnp.sum(batch["attention_mask"]).astype(jnp.float32))


def accumulated_grads(graphdef, dtypes, trainable, frozen, batch, key=None):
    """Scan over the A micro-batches of ``batch`` ([A, B, L] arrays).

    Returns (mean-NLL gradient, mean NLL, response tokens, real tokens), the mean taken over all
    response tokens of the accumulated batch (see the module docstring).
    """
    accum = batch["input_ids"].shape[0]
    keys = None if key is None else jax.random.split(key, accum)
    grad_fn = jax.value_and_grad(_summed_loss, argnums=2, has_aux=True)

    def body(carry, xs):
        grad_sum, nll_sum, resp_sum, tok_sum = carry
        micro, micro_key = xs
        (nll, (resp, tok)), grads = grad_fn(graphdef, dtypes, trainable, frozen, micro, micro_key)
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (grad_sum, nll_sum + nll, resp_sum + resp, tok_sum + tok), None

    zero = jnp.zeros((), jnp.float32)
    init = (jax.tree.map(jnp.zeros_like, trainable), zero, zero, zero)
    (grad_sum, nll_sum, resp, tokens), _ = jax.lax.scan(body, init, (_model_inputs(batch), keys))
    denom = jnp.maximum(resp, 1.0)  # a batch with no response tokens gives zero gradients
    grads = jax.tree.map(lambda g: g / denom, grad_sum)
    return grads, nll_sum / denom, resp, tokens


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, dtypes: Pytree | None = None,
                    donate: bool = True, mesh=None) -> Callable:
    """A jitted ``step(trainable, opt_state, frozen, batch, key=None) -> (trainable, opt_state, metrics)``.

    ``batch`` arrays are [A, B, L] (A >= 1 micro-batches; ``index`` and other extra keys are
    ignored). ``dtypes`` (from `param_dtypes`) is the model's dtype per trainable leaf; the float32
    trainable state is cast to it for the forward pass. ``key`` reseeds dropout (None: no reseed).
    The trainable and optimizer buffers are donated: callers must use the returned ones.
    Metrics: loss (mean response NLL), grad_norm (before clipping), response_tokens, tokens.
    ``mesh`` (a `jraise.parallel` mesh): the new state is pinned to the parameter shardings.
    """

    def step(trainable, opt_state, frozen, batch, key=None):
        grads, loss, resp, tokens = accumulated_grads(graphdef, dtypes, trainable, frozen, batch, key)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        trainable, opt_state = parallel.constrain_params((trainable, opt_state), mesh)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "response_tokens": resp,
                   "tokens": tokens}
        return trainable, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def make_eval_step(graphdef: nnx.GraphDef, dtypes: Pytree | None = None) -> Callable:
    """A jitted ``eval_step(trainable, frozen, batch) -> (nll [B], response tokens [B])`` per row,
    with dropout switched off."""

    def eval_step(trainable, frozen, batch):
        return response_nll(nnx.merge(graphdef, cast_to(trainable, dtypes), frozen), batch)

    return jax.jit(eval_step)
