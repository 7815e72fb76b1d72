"""Batched greedy decoding with a KV cache, jitted with static shapes.

Prompts are left-padded to a common length P, so every row's next token is written to the same
cache slot; the cache holds P + max_new_tokens slots. One prefill pass fills slots [0, P), then a
`lax.while_loop` appends one token per step until every row has emitted an EOS id or
`max_new_tokens` is reached. Rows that finished are filled with the pad id.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jraise.model.transformer import CausalLM, default_positions, init_cache


class Generation(NamedTuple):
    tokens: jax.Array   # [B, max_new_tokens] int32, pad after the first EOS (EOS itself kept)
    lengths: jax.Array  # [B] int32: generated tokens per row, including the EOS when emitted


def left_pad(sequences: list[list[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to `length` (default: the longest). Returns (ids, mask) int32."""
    if not sequences:
        raise ValueError("no prompts to pad")
    longest = max(len(s) for s in sequences)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"a prompt has {longest} tokens, more than the padded length {length}")
    if min(len(s) for s in sequences) == 0:
        raise ValueError("an empty prompt cannot be decoded (no token to condition on)")
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for row, seq in enumerate(sequences):
        ids[row, length - len(seq):] = seq
        mask[row, length - len(seq):] = 1
    return ids, mask


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "eos_ids", "pad_id"))
def _greedy(graphdef, state, input_ids, attention_mask, *, max_new_tokens, eos_ids, pad_id):
    model = nnx.merge(graphdef, state)
    b, p = input_ids.shape
    cache = init_cache(model.config, b, p + max_new_tokens)
    key_valid = jnp.zeros((b, p + max_new_tokens), bool).at[:, :p].set(attention_mask.astype(bool))
    positions = default_positions(attention_mask)
    # Prefill: only the last position's logits are read, so the LM head runs on that one row
    # ([B, 1, V], not [B, P, V]).
    hidden, cache = model.hidden_with_cache(input_ids, positions, cache, 0, key_valid)
    logits = model.logits_from_hidden(hidden[:, -1:])
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def cond(carry):
        i, _, _, _, _, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, tok, pos, cache, key_valid, tokens, done = carry
        tokens = tokens.at[:, i].set(jnp.where(done, pad_id, tok))
        done = done | jnp.isin(tok, eos)
        key_valid = key_valid.at[:, p + i].set(True)
        logits, cache = model.forward_with_cache(tok[:, None], pos[:, None], cache, p + i, key_valid)
        return i + 1, jnp.argmax(logits[:, 0], -1).astype(jnp.int32), pos + 1, cache, key_valid, tokens, done

    carry = (jnp.int32(0), jnp.argmax(logits[:, -1], -1).astype(jnp.int32), positions[:, -1] + 1, cache,
             key_valid, jnp.full((b, max_new_tokens), pad_id, jnp.int32), jnp.zeros((b,), bool))
    _, _, _, _, _, tokens, _ = jax.lax.while_loop(cond, body, carry)
    is_eos = jnp.isin(tokens, eos)
    # The loop only stops early once every row is done, so a row without EOS ran to the limit.
    lengths = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, -1) + 1, max_new_tokens)
    return Generation(tokens, lengths.astype(jnp.int32))


def generate(model: CausalLM, input_ids, attention_mask, max_new_tokens: int,
             eos_token_ids: tuple[int, ...] | None = None, pad_token_id: int = 0) -> Generation:
    """Greedy continuation of left-padded prompts [B, P] by up to `max_new_tokens` tokens.

    `eos_token_ids` defaults to the model config's (empty: no early stop); decoding of a row stops
    at the first of them. Returns ``Generation(tokens [B, max_new_tokens] int32, lengths [B]
    int32)``: a row's tokens up to and including its first EOS (``lengths``), then
    ``pad_token_id`` (default 0, not the config's pad id). Raises ValueError when the two arrays
    are not both [B, P], the prompts are not left-padded (a last mask column not all 1), or
    ``max_new_tokens < 1``.
    """
    input_ids = np.asarray(input_ids, np.int32)
    attention_mask = np.asarray(attention_mask, np.int32)
    if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
        raise ValueError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} "
                         "must both be [batch, prompt_len]")
    if not attention_mask[:, -1].all():
        raise ValueError("generation needs left-padded prompts: every row's last column must be a real token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = tuple(int(e) for e in (eos_token_ids if eos_token_ids is not None else model.config.eos_token_ids))
    graphdef, state = nnx.split(model)
    return _greedy(graphdef, state, jnp.asarray(input_ids), jnp.asarray(attention_mask),
                   max_new_tokens=int(max_new_tokens), eos_ids=eos, pad_id=int(pad_token_id))
