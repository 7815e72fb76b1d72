"""jraise's `CausalLM` with a tap on every linear layer, for `jraise.grads.factored_full`.

Stage: the model-side adapter of the never-materialised full-parameter features. `tapped_logits`
runs the cache-free forward of `jraise.model.transformer.CausalLM` itself inside
`jraise.model.transformer.tapping`, which routes every named `Projection` call through
``tap(name, x, y)``: ``x`` is the layer's input cast to its compute dtype (what the kernel
multiplies), ``y = projection(x)`` its output (bias and LoRA branch included). With ``tap =
lambda n, x, y: y`` the logits are the model's own (tested).

Tapped layers (`projection_names`), named like their parameters' paths:
``layers.<i>.self_attn.{q,k,v,o}_proj``, ``layers.<i>.mlp.{gate,up,down}_proj`` and, when the
model has an untied head, ``lm_head`` (``include_lm_head=False`` leaves it out: it is a [D, V]
kernel, often the largest). Not tapped, hence not featurised: the embedding table (a gather, not
a matmul; a tied head's matmul uses that table too), the RMSNorm scales and any bias (their
gradients are not ``X^T Delta``). There is one forward: the model's own, remat skipped while a
tap is active (the inputs it captures are kept anyway).

`tapped_sft_loss` gives ``tapped_loss_fn(params, row, tap)``: the SFT loss of
`jraise.grads.per_example.example_loss` (mean NLL over the row's response tokens, dropout off,
batch keys ``input_ids``, ``attention_mask``, ``loss_mask`` [T] and ``example_mask`` []), with the
model rebuilt from ``params`` by ``nnx.merge``. Typical use::

    graphdef, state = nnx.split(model)
    feats = factored_full_features(tapped_sft_loss(graphdef), state, batch, projection=proj)

`layer_kernels` picks each tapped layer's kernel-shaped leaf (a checkpoint's Adam ``nu``, say)
out of a params-shaped tree, for `jraise.grads.factored_full.adafactor_factors`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jraise.loglik import eval_view, example_nll
from jraise.model.transformer import CausalLM, tapping

__all__ = ["layer_kernels", "projection_names", "tapped_logits", "tapped_sft_loss"]

Pytree = Any

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def projection_names(model: CausalLM, include_lm_head: bool = True) -> tuple[str, ...]:
    """Names of the layers `tapped_logits` taps, sorted (the layer order of the features)."""
    names = [f"layers.{i}.self_attn.{p}" for i in range(len(model.layers)) for p in _ATTENTION]
    names += [f"layers.{i}.mlp.{p}" for i in range(len(model.layers)) for p in _MLP]
    if include_lm_head and model.lm_head is not None:
        names.append("lm_head")
    return tuple(sorted(names))


def tapped_logits(model: CausalLM, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                  tap: Callable | None = None, positions: jax.Array | None = None,
                  include_lm_head: bool = True) -> jax.Array:
    """``model(input_ids, attention_mask, positions)`` (logits [B, T, V] float32) with
    ``y = tap(name, x, y)`` at every `Projection` named by `projection_names` (the LM head only
    when ``include_lm_head``), through `jraise.model.transformer.tapping`: the model's own forward,
    so the logits are the model's. Dropout is as the caller's model has it (`tapped_sft_loss`
    switches it off); ``config.remat`` is ignored while tapped."""
    if not isinstance(model, CausalLM):
        raise TypeError(f"tapped_logits needs a jraise CausalLM, got {type(model).__name__}")
    if tap is None:
        return model(input_ids, attention_mask, positions)
    with tapping(model, tap, frozenset(projection_names(model, include_lm_head))):
        return model(input_ids, attention_mask, positions)


def tapped_sft_loss(graphdef: nnx.GraphDef, *, include_lm_head: bool = True) -> Callable:
    """``tapped_loss_fn(params, row, tap) -> scalar`` for `jraise.grads.factored_full`: the SFT loss
    of `jraise.grads.per_example.example_loss` (summed response NLL / max(response tokens, 1), dropout
    off) of the model ``nnx.merge(graphdef, *params)`` on one row, every `Projection` tapped (an
    untied LM head only with ``include_lm_head``).

    ``params``: the state(s) that complete ``graphdef`` (``state`` of ``graphdef, state =
    nnx.split(model)``, or a tuple such as ``(trainable, frozen)`` of
    `jraise.train.step.split_trainable`). ``row``: ``input_ids``, ``attention_mask``, ``loss_mask``
    [T] and ``example_mask`` [] (extra keys ignored).
    """

    def loss_fn(params, row, tap):
        states = params if isinstance(params, tuple) else (params,)
        model = eval_view(nnx.merge(graphdef, *states, copy=True))
        ids, attn = row["input_ids"][None], row["attention_mask"][None]
        logits = tapped_logits(model, ids, attn, tap, include_lm_head=include_lm_head)
        nll, tokens = example_nll(logits, ids, row["loss_mask"][None], row["example_mask"][None])
        return nll[0] / jnp.maximum(tokens[0], 1.0)

    return loss_fn


def layer_kernels(tree: Pytree, names) -> dict[str, jax.Array]:
    """``{name: tree[...path of name...]["kernel"]}`` for each tapped layer name (e.g. a checkpoint's
    Adam ``nu`` over all parameters, a nested dict as ``nnx.to_pure_dict`` gives or an ``nnx.State``);
    an integer path part (``layers.<i>``) matches an int or a str key. KeyError names the layer."""
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    out = {}
    for name in names:
        node = tree
        for part in [*name.split("."), "kernel"]:
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, Mapping) and part.isdigit() and int(part) in node:
                node = node[int(part)]
            elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise KeyError(f"layer {name!r}: no {part!r} under its path in the tree")
        out[name] = node
    return out
