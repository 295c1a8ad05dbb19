"""Stock JAX formulations of the same delta, the bars the kernels are measured against.

All assume every slot uses the full rank buffer (as the benchmark workloads do) and no -1 tokens.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def gather_einsum(x, a_pool, b_pool, slot_ids, scales) -> jax.Array:
    """Gather each token's A and B, then two batched einsums."""
    xa = jnp.einsum("td,tdr->tr", x, a_pool[slot_ids], preferred_element_type=jnp.float32)
    xa = (xa * scales[slot_ids][:, None]).astype(x.dtype)
    return jnp.einsum("tr,tro->to", xa, b_pool[slot_ids], preferred_element_type=jnp.float32).astype(x.dtype)


def one_hot_einsum(x, a_pool, b_pool, slot_ids, scales) -> jax.Array:
    """Shrink against every slot, keep each token's own slot with a one-hot mask, expand densely."""
    weights = jax.nn.one_hot(slot_ids, a_pool.shape[0], dtype=jnp.float32) * scales[None, :]
    xa = jnp.einsum("td,ndr->tnr", x, a_pool, preferred_element_type=jnp.float32)
    xa = (xa * weights[:, :, None]).astype(x.dtype)
    return jnp.einsum("tnr,nro->to", xa, b_pool, preferred_element_type=jnp.float32).astype(x.dtype)


def sorted_ragged_dot(x, a_pool, b_pool, slot_ids, scales) -> jax.Array:
    """Sort tokens by slot, then lax.ragged_dot for shrink and expand, then unsort."""
    order = jnp.argsort(slot_ids)
    sorted_slots = slot_ids[order]
    group_sizes = jnp.bincount(slot_ids, length=a_pool.shape[0]).astype(jnp.int32)
    xa = lax.ragged_dot(x[order], a_pool, group_sizes, preferred_element_type=jnp.float32)
    xa = (xa * scales[sorted_slots][:, None]).astype(x.dtype)
    delta = lax.ragged_dot(xa, b_pool, group_sizes, preferred_element_type=jnp.float32).astype(x.dtype)
    return jnp.zeros_like(delta).at[order].set(delta)


FORMULATIONS = {
    "gather-einsum": gather_einsum,
    "one-hot einsum": one_hot_einsum,
    "sort + ragged_dot": sorted_ragged_dot,
}
