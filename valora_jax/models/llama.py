"""Llama decoder as transformers computes it: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Runs either without a cache (training, scoring: causal attention over the given tokens) or against a
`KVCache` (generation: the new keys/values are written at the cache's next slot and attention reads the
whole preallocated buffer under a validity mask, so shapes never change between steps).
"""

from __future__ import annotations

import dataclasses
import math

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from valora_jax.config import RopeConfig, TextConfig
from valora_jax.kv_cache import KVCache
from valora_jax.layers import Embedding, Linear, RMSNorm, activation, serial_input
from valora_jax.sharding import constrain


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> jax.Array:
    """Inverse frequencies per rotary pair, with linear or Llama-3 scaling applied (as HF's rope init fns)."""
    inv_freq = 1.0 / (rope.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables (batch, seq, head_dim) for integer positions (batch, seq), computed in float32."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (b, s, heads, d): the rotate-half convention of HF Llama (pairs (i, i + d/2))."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def write_rows(buffer: jax.Array, new: jax.Array, at: jax.Array) -> jax.Array:
    """buffer (b, max_len, ...) with each row's `new` (b, s, ...) written from that row's slot `at` (b,)."""
    write = lambda row, values, start: jax.lax.dynamic_update_slice_in_dim(row, values.astype(row.dtype), start, 0)
    return jax.vmap(write)(buffer, new, at)


def last_position(positions: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """(b,) the largest position of each row's real tokens (over all axes of (b, s) or (axes, b, s)
    positions), -1 for a row without any."""
    largest = positions.reshape(-1, *attention_mask.shape).max(axis=0)
    return jnp.max(jnp.where(attention_mask, largest, -1), axis=1).astype(jnp.int32)


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        bias = cfg.qkv_bias
        self.q_proj = Linear(d, self.num_heads * hd, axes=("embed", "heads"), use_bias=bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, self.num_kv_heads * hd, axes=("embed", "kv_heads"), use_bias=bias, dtype=dtype,
                             rngs=rngs)
        self.v_proj = Linear(d, self.num_kv_heads * hd, axes=("embed", "kv_heads"), use_bias=bias, dtype=dtype,
                             rngs=rngs)
        self.o_proj = Linear(self.num_heads * hd, d, axes=("heads", "embed"), use_bias=cfg.attention_bias, dtype=dtype,
                             rngs=rngs)
        # Hooks for adapters that transform the block input before q/k/v (Serial LoRA): `serial_input`.
        self.qkv_input_adapter = nnx.data(None)
        self.qkv_input_slots = nnx.data(None)

    def __call__(self, x, cos, sin, mask, cache: KVCache | None, layer: int, adapters=None):
        qkv_in = serial_input(self, x, adapters)
        q = einops.rearrange(self.q_proj(qkv_in, adapters), "b s (h d) -> b s h d", h=self.num_heads)
        k = einops.rearrange(self.k_proj(qkv_in, adapters), "b s (h d) -> b s h d", h=self.num_kv_heads)
        v = einops.rearrange(self.v_proj(qkv_in, adapters), "b s (h d) -> b s h d", h=self.num_kv_heads)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cache = dataclasses.replace(cache, k=cache.k.at[layer].set(write_rows(cache.k[layer], k, cache.length)),
                                        v=cache.v.at[layer].set(write_rows(cache.v[layer], v, cache.length)))
            k, v = cache.k[layer].astype(q.dtype), cache.v[layer].astype(q.dtype)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
        return self.o_proj(einops.rearrange(out, "b s h d -> b s (h d)"), adapters), cache


class MLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = Linear(d, f, axes=("embed", "mlp"), use_bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, f, axes=("embed", "mlp"), use_bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, d, axes=("mlp", "embed"), use_bias=bias, dtype=dtype, rngs=rngs)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x, adapters=None):
        h = constrain(self.act(self.gate_proj(x, adapters)) * self.up_proj(x, adapters), "batch", "length", "mlp")
        return self.down_proj(h, adapters)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache, layer, adapters=None):
        attn, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, adapters)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x), adapters)
        return constrain(x, "batch", "length", "embed"), cache


class LlamaModel(nnx.Module):
    """Decoder stack without the output head: embeddings in, final-normed hidden states out."""

    def __init__(self, cfg: TextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)

    def rotary(self, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
        """cos/sin (b, s, head_dim) of `positions`; a family with another position scheme overrides this."""
        return rope_cos_sin(positions, rope_inv_freq(self.cfg.rope, self.cfg.head_dim), dtype)

    def __call__(self, inputs_embeds: jax.Array, attention_mask: jax.Array, position_ids: jax.Array | None = None,
                 cache: KVCache | None = None, adapters=None) -> tuple[jax.Array, KVCache | None]:
        """Hidden states for `inputs_embeds` (b, s, d); `adapters` is the adapter pool's per-row selection.

        Without a cache: causal attention among the given tokens, keys masked by `attention_mask`;
        positions are `position_ids` or 0..s-1 (transformers' forward). With a cache: each row's tokens are
        appended at its own slot `cache.length[row]`, its positions are `position_ids` or continue from its
        next position (its count of real tokens, as transformers' generate), the row's next position becomes
        one past the largest position of its real tokens, and the updated cache is returned. Rows whose
        `attention_mask` is False write nothing valid and keep their position (an idle decode slot).
        """
        b, s, _ = inputs_embeds.shape
        attention_mask = attention_mask.astype(bool)
        query_slots = jnp.arange(s)
        if cache is None:
            positions = position_ids if position_ids is not None else jnp.broadcast_to(query_slots, (b, s))
            key_valid, key_slots = attention_mask, query_slots
        else:
            positions = position_ids
            if positions is None:
                positions = cache.next_position[:, None] + jnp.cumsum(attention_mask, axis=1) - 1
                positions = jnp.where(attention_mask, positions, 0)
            key_valid = write_rows(cache.valid, attention_mask, cache.length)
            key_slots, query_slots = jnp.arange(cache.max_len), cache.length[:, None] + query_slots
        query_slots = jnp.broadcast_to(query_slots, (b, s))
        mask = key_valid[:, None, :] & (key_slots[None, None, :] <= query_slots[:, :, None])
        cos, sin = self.rotary(positions, inputs_embeds.dtype)
        x = constrain(inputs_embeds, "batch", "length", "embed")
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, cos, sin, mask, cache, i, adapters)
        if cache is not None:
            cache = dataclasses.replace(
                cache,
                valid=key_valid,
                next_position=jnp.maximum(cache.next_position, last_position(positions, attention_mask) + 1),
                length=cache.length + s,
            )
        return self.norm(x), cache
