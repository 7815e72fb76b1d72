"""jraise's `CausalLM` with a tap on every linear layer, for `jraise.grads.factored_full`.

Stage: the model-side adapter of the never-materialised full-parameter features. `tapped_logits`
re-runs the cache-free forward of `jraise.model.transformer.CausalLM` (embedding -> decoder layers
-> norm -> LM head, the same modules and the same operations in the same order) with every
`Projection` call routed through ``tap(name, x, y)``: ``x`` is the layer's input cast to its compute
dtype (what the kernel multiplies), ``y = projection(x)`` its output (bias and LoRA branch
included). With ``tap = lambda n, x, y: y`` the logits are the model's own (tested).

Tapped layers (`projection_names`), named like their parameters' paths:
``layers.<i>.self_attn.{q,k,v,o}_proj``, ``layers.<i>.mlp.{gate,up,down}_proj`` and, when the
model has an untied head, ``lm_head`` (``include_lm_head=False`` leaves it out: it is a [D, V]
kernel, often the largest). Not tapped, hence not featurised: the embedding table (a gather, not
a matmul; a tied head's matmul uses that table too), the RMSNorm scales and any bias (their
gradients are not ``X^T Delta``). The transformer module itself is untouched: the forward here
is a functional copy of ``CausalLM.__call__`` (without remat: the inputs it captures are kept
anyway), so a change to the model's forward must be mirrored here; the tests compare the two.

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
from jraise.model.transformer import (
    CausalLM,
    Projection,
    apply_rope,
    grouped_attention,
    dtype_of,
    rope_inverse_frequencies,
)

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


def _tapped(projection: Projection, name: str, x: jax.Array, tap: Callable) -> jax.Array:
    x = x.astype(projection.dtype)
    return tap(name, x, projection(x))


def _attention(attn, prefix: str, x, positions, mask, inv_freq, tap):
    """`Attention.__call__` (no cache) with tapped projections."""
    b, t, _ = x.shape
    q = _tapped(attn.q_proj, f"{prefix}.q_proj", x, tap).reshape(b, t, attn.num_heads, attn.head_dim)
    k = _tapped(attn.k_proj, f"{prefix}.k_proj", x, tap).reshape(b, t, attn.num_kv_heads, attn.head_dim)
    v = _tapped(attn.v_proj, f"{prefix}.v_proj", x, tap).reshape(b, t, attn.num_kv_heads, attn.head_dim)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    return _tapped(attn.o_proj, f"{prefix}.o_proj", grouped_attention(q, k, v, mask), tap)


def _mlp(mlp, prefix: str, x, tap):
    gate = _tapped(mlp.gate_proj, f"{prefix}.gate_proj", x, tap)
    up = _tapped(mlp.up_proj, f"{prefix}.up_proj", x, tap)
    return _tapped(mlp.down_proj, f"{prefix}.down_proj", jax.nn.silu(gate) * up, tap)


def tapped_logits(model: CausalLM, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                  tap: Callable | None = None, positions: jax.Array | None = None,
                  include_lm_head: bool = True) -> jax.Array:
    """``model(input_ids, attention_mask, positions)`` (logits [B, T, V] float32) with
    ``y = tap(name, x, y)`` at every `Projection` named by `projection_names` (the LM head only
    when ``include_lm_head``). Dropout is as the caller's model has it (`tapped_sft_loss` switches
    it off); ``config.remat`` is ignored."""
    if not isinstance(model, CausalLM):
        raise TypeError(f"tapped_logits needs a jraise CausalLM, got {type(model).__name__}")
    tap = (lambda name, x, y: y) if tap is None else tap
    config = model.config
    positions, mask = model.causal_inputs(input_ids, attention_mask, positions)
    inv_freq = jnp.asarray(tuple(rope_inverse_frequencies(config).tolist()), jnp.float32)
    x = model.embed_tokens[...][input_ids].astype(dtype_of(config.dtype))
    for i, layer in enumerate(model.layers):
        x = x + _attention(layer.self_attn, f"layers.{i}.self_attn", layer.input_layernorm(x), positions, mask,
                           inv_freq, tap)
        x = x + _mlp(layer.mlp, f"layers.{i}.mlp", layer.post_attention_layernorm(x), tap)
    h = model.norm(x)
    if model.lm_head is None:
        emb = model.embed_tokens[...].astype(h.dtype)
        return jnp.einsum("BTD,VD->BTV", h, emb).astype(jnp.float32)
    if include_lm_head:
        return _tapped(model.lm_head, "lm_head", h, tap).astype(jnp.float32)
    return model.lm_head(h).astype(jnp.float32)


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
