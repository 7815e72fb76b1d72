"""The Llama-family decoder (llama, mistral, qwen2, qwen3) in Flax NNX.

Data flow: token ids [B, T] -> embedding -> L x (RMSNorm -> GQA attention with RoPE -> residual ->
RMSNorm -> SwiGLU MLP -> residual) -> RMSNorm -> LM head -> logits [B, T, V] (float32).
Qwen3 (Qwen team 2025, arXiv 2505.09388) normalises each query and key head with its own RMSNorm
over head_dim (`q_norm`, `k_norm`) between the projection and RoPE.

Two paths share the same modules:
- cache-free (`__call__`), for training and scoring: causal + padding mask, optional remat;
- KV cache (`forward_with_cache`), for generation: keys/values of earlier steps are kept in a
  fixed-size cache [B, S, K, H] per layer, written at a slot index, so shapes stay static.

Tensor names follow Hugging Face (`q_proj`, `gate_proj`, `input_layernorm`, ...) so the loader's
key map is a plain rename; kernels are stored [in, out] (the transpose of torch's Linear weight).
Positions default to `cumsum(attention_mask) - 1`, so a left-padded row gives the same logits as
the unpadded row; this is also what transformers' `generate` uses.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jraise.model.config import ModelConfig, dtype_name

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_MASKED = -1e30  # finite, so fully masked (padding) query rows give no NaN


def dtype_of(dtype) -> type:
    """The JAX scalar type of a dtype given by name ("float32", "bfloat16") or as a jnp / np dtype."""
    return _DTYPES[dtype_name(dtype)]


# The active tap of `tapping`: ({id(projection): name}, tap) or None (the default: no effect).
_TAP: contextvars.ContextVar = contextvars.ContextVar("jraise_projection_tap", default=None)


@contextlib.contextmanager
def tapping(model: nnx.Module, tap: Callable[[str, jax.Array, jax.Array], jax.Array],
            names: frozenset[str] | None = None) -> Iterator[None]:
    """Within the block, every `Projection` of ``model`` (those whose dotted path, e.g.
    ``layers.0.self_attn.q_proj``, is in ``names``; default all) returns ``tap(name, x, y)`` instead
    of ``y``, where ``x`` is its input cast to the compute dtype (what the kernel multiplies) and
    ``y`` its output (bias and LoRA branch included). It acts while the forward is traced, so it
    composes with jit, vmap and grad; `CausalLM.hidden_states` skips remat while a tap is active
    (what the tap captures must leave the function). Used by `jraise.model.taps`."""
    paths = ((id(node), ".".join(map(str, path))) for path, node in nnx.iter_graph(model)
             if isinstance(node, Projection))
    found = {key: name for key, name in paths if names is None or name in names}
    token = _TAP.set((found, tap))
    try:
        yield
    finally:
        _TAP.reset(token)


class Projection(nnx.Module):
    """A linear map `y = x @ kernel (+ bias)` with an optional LoRA branch.

    The LoRA branch (`lora_a` [in, r], `lora_b` [r, out], both `nnx.LoRAParam`) is absent until
    `jraise.model.lora.add_lora` attaches it; it adds `dropout(x) @ lora_a @ lora_b * lora_scale`.
    Inside `tapping`, the output passes through the active tap.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, config: ModelConfig,
                 rngs: nnx.Rngs):
        param_dtype = dtype_of(config.param_dtype)
        init = nnx.initializers.normal(config.initializer_range)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else nnx.data(None)
        self.dtype = dtype_of(config.dtype)
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)
        self.lora_scale = 0.0
        self.lora_dropout = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = x @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None:
            xd = self.lora_dropout(x) if self.lora_dropout is not None else x
            low = xd @ self.lora_a[...].astype(self.dtype)
            y = y + (low @ self.lora_b[...].astype(self.dtype)) * self.lora_scale
        active = _TAP.get()
        if active is not None and id(self) in active[0]:
            y = active[1](active[0][id(self)], x, y)
        return y


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, `weight * x / sqrt(mean(x^2) + eps)`: the statistic in float32
    (as transformers does), the result in the compute dtype."""

    def __init__(self, dim: int, config: ModelConfig):
        self.weight = nnx.Param(jnp.ones((dim,), dtype_of(config.param_dtype)))
        self.eps = config.rms_norm_eps
        self.dtype = dtype_of(config.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * x32.astype(self.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies [head_dim / 2], with Llama-3 `rope_scaling` when configured.

    Llama 3 keeps high frequencies, divides low ones by `factor`, and interpolates smoothly in
    between (Meta's llama3 rope scaling, as in transformers' `_compute_llama3_parameters`).
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    scaling = config.rope_scaling_dict
    if scaling is None:
        return inv_freq.astype(np.float32)
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates x [B, T, heads, H] by positions [B, T] (half-split layout, as in transformers)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def causal_padding_mask(query_slots: jax.Array, key_slots: jax.Array, key_valid: jax.Array,
                   sliding_window: int | None) -> jax.Array:
    """Boolean mask [B, T, S]: causal over slots, keys that are real tokens, optional window."""
    causal = key_slots[None, :] <= query_slots[:, None]  # [T, S]
    if sliding_window is not None:
        causal &= query_slots[:, None] - key_slots[None, :] < sliding_window
    return causal[None, :, :] & key_valid[:, None, :].astype(bool)


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query softmax attention: q [B, T, N, H], k and v [B, S, K, H] (N a multiple of K;
    each group of N / K query heads shares one key/value head), mask [B, T, S] (True = attend) ->
    [B, T, N * H]. Scores in float32, scaled by 1 / sqrt(H); a fully masked row gets uniform
    weights instead of NaN (`_MASKED` is finite)."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k.astype(q.dtype)).astype(jnp.float32)
    scores = scores / math.sqrt(h)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v.astype(q.dtype))
    return out.reshape(b, t, n * h)


class Attention(nnx.Module):
    """Grouped-query self-attention: `num_attention_heads` query heads share
    `num_key_value_heads` key/value heads in groups."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d, h = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, h)
        qkv_bias = config.attention_bias
        self.q_proj = Projection(d, self.num_heads * h, use_bias=qkv_bias, config=config, rngs=rngs)
        self.k_proj = Projection(d, self.num_kv_heads * h, use_bias=qkv_bias, config=config, rngs=rngs)
        self.v_proj = Projection(d, self.num_kv_heads * h, use_bias=qkv_bias, config=config, rngs=rngs)
        self.o_proj = Projection(self.num_heads * h, d, use_bias=config.o_proj_bias, config=config, rngs=rngs)
        # Qwen3: one RMSNorm [head_dim], shared by all heads, on queries and one on keys.
        self.q_norm = RMSNorm(h, config) if config.qk_norm else nnx.data(None)
        self.k_norm = RMSNorm(h, config) if config.qk_norm else nnx.data(None)
        # A static tuple, not a variable: RoPE frequencies are a function of the config, never trained.
        self._inv_freq = tuple(rope_inverse_frequencies(config).tolist())

    def __call__(self, x, positions, mask, cache=None, cache_index=None):
        b, t, _ = x.shape
        inv_freq = jnp.asarray(self._inv_freq, jnp.float32)
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        new_cache = None
        if cache is not None:
            k_cache, v_cache = cache
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, cache_index, 0, 0))
            new_cache = (k, v)
        return self.o_proj(grouped_attention(q, k, v, mask)), new_cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Projection(d, f, use_bias=bias, config=config, rngs=rngs)
        self.up_proj = Projection(d, f, use_bias=bias, config=config, rngs=rngs)
        self.down_proj = Projection(f, d, use_bias=bias, config=config, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config)
        self.self_attn = Attention(config, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config)
        self.mlp = MLP(config, rngs)

    def __call__(self, x, positions, mask, cache=None, cache_index=None):
        attn_out, new_cache = self.self_attn(self.input_layernorm(x), positions, mask, cache, cache_index)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new_cache


def _layer_without_cache(layer: DecoderLayer, x, positions, mask):
    return layer(x, positions, mask)[0]


class CausalLM(nnx.Module):
    """Decoder-only language model; `model(input_ids, attention_mask) -> logits [B, T, V]`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        init = nnx.initializers.normal(config.initializer_range)
        self.embed_tokens = nnx.Param(
            init(rngs.params(), (config.vocab_size, config.hidden_size), dtype_of(config.param_dtype)))
        self.layers = nnx.List([DecoderLayer(config, rngs) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config)
        if config.tie_word_embeddings:
            self.lm_head = nnx.data(None)
        else:
            self.lm_head = Projection(config.hidden_size, config.vocab_size, use_bias=False, config=config,
                                      rngs=rngs)

    def _embed(self, input_ids):
        return self.embed_tokens[...][input_ids].astype(dtype_of(self.config.dtype))

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        """Logits [B, T, V] (float32) of final hidden states [B, T, D] (the LM head, tied or not)."""
        return self._logits(h)

    def _logits(self, h):
        if self.lm_head is None:
            emb = self.embed_tokens[...].astype(h.dtype)
            return jnp.einsum("BTD,VD->BTV", h, emb).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def causal_inputs(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(positions [B, T], attention mask [B, T, T]) of the cache-free path: a missing
        ``attention_mask`` means all tokens are real, missing positions count real tokens from 0
        (left padding safe), and the mask is causal, padding-aware and windowed as the config says."""
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = default_positions(attention_mask)
        slots = jnp.arange(t)
        return positions, causal_padding_mask(slots, slots, attention_mask, self.config.sliding_window)

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      positions: jax.Array | None = None) -> jax.Array:
        """Final (normed) hidden states [B, T, D] on the cache-free path."""
        positions, mask = self.causal_inputs(input_ids, attention_mask, positions)
        x = self._embed(input_ids)
        for layer in self.layers:
            if self.config.remat and _TAP.get() is None:
                x = nnx.remat(_layer_without_cache)(layer, x, positions, mask)
            else:
                x = _layer_without_cache(layer, x, positions, mask)
        return self.norm(x)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, V] (float32) on the cache-free path."""
        return self._logits(self.hidden_states(input_ids, attention_mask, positions))

    def forward_with_cache(self, input_ids, positions, cache, cache_index, key_valid):
        """One cached step: `input_ids` [B, T] go into cache slots `cache_index .. cache_index+T-1`.

        `cache` is a tuple of per-layer (k, v) arrays [B, S, K, H]; `key_valid` [B, S] marks the
        slots holding real tokens (false for left padding). Returns (logits, new cache).
        """
        hidden, new_cache = self.hidden_with_cache(input_ids, positions, cache, cache_index, key_valid)
        return self._logits(hidden), new_cache

    def hidden_with_cache(self, input_ids, positions, cache, cache_index, key_valid):
        """`forward_with_cache` without the LM head: (final normed hidden states [B, T, D], new
        cache), for callers that need logits at a few positions only."""
        t = input_ids.shape[1]
        s = cache[0][0].shape[1]
        mask = causal_padding_mask(cache_index + jnp.arange(t), jnp.arange(s), key_valid, self.config.sliding_window)
        x = self._embed(input_ids)
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache):
            x, c = layer(x, positions, mask, layer_cache, cache_index)
            new_cache.append(c)
        return self.norm(x), tuple(new_cache)


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Position ids from a padding mask: 0 at each row's first real token (left padding safe)."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def init_cache(config: ModelConfig, batch: int, length: int) -> tuple:
    """An empty KV cache: per layer (k, v) zeros [batch, length, num_kv_heads, head_dim]."""
    shape = (batch, length, config.num_key_value_heads, config.head_dim)
    dtype = dtype_of(config.dtype)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_hidden_layers))


def init_model(config: ModelConfig, seed: int = 0) -> CausalLM:
    """A randomly initialised model (normal(`config.initializer_range`) weights, unit norms), as transformers does."""
    return CausalLM(config, rngs=nnx.Rngs(params=seed))
