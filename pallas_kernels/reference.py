"""The semantics of batched heterogeneous LoRA in plain jnp: what every kernel must compute."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_f32(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b accumulated in float32, float32 inputs at full precision (no TF32): the product every
    backend and kernel uses, so that none differs from the others by its GEMM's precision."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)


def lora_delta(x, a_pool, b_pool, slot_ids, ranks, scales) -> jax.Array:
    """float32 delta of each token: scale_i * (x_t @ A_i[:, :r_i]) @ B_i[:r_i, :], zero for slot -1.

    Each token gathers its own adapter (memory T * d_in * R): clear, not fast.
    """
    num_slots, _, rank_buffer = a_pool.shape
    has_adapter = (slot_ids >= 0) & (slot_ids < num_slots)
    slot = jnp.clip(slot_ids, 0, num_slots - 1)
    within_rank = (jnp.arange(rank_buffer)[None, :] < ranks[slot][:, None]) & has_adapter[:, None]
    a = jnp.where(within_rank[:, None, :], a_pool[slot], 0)
    b = jnp.where(within_rank[:, :, None], b_pool[slot], 0)
    xa = jnp.einsum("td,tdr->tr", x, a, preferred_element_type=jnp.float32,
                    precision=jax.lax.Precision.HIGHEST)
    xa = xa * jnp.where(has_adapter, scales[slot], 0.0)[:, None]
    return jnp.einsum("tr,tro->to", xa, b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def batched_lora(x, a_pool, b_pool, slot_ids, ranks, scales, base_out=None) -> jax.Array:
    delta = lora_delta(x, a_pool, b_pool, slot_ids, ranks, scales)
    base = 0.0 if base_out is None else base_out.astype(jnp.float32)
    return (base + delta).astype(x.dtype)


def lora_projection(x, w, a_pool, b_pool, slot_ids, ranks, scales) -> jax.Array:
    return (dot_f32(x, w) + lora_delta(x, a_pool, b_pool, slot_ids, ranks, scales)).astype(x.dtype)
