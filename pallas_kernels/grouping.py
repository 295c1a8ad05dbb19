"""Token grouping metadata for the TPU kernels, computed on device inside the jitted call.

(Mosaic moves whole blocks, so the TPU kernels need tokens copied into this padded layout; the GPU
kernels gather rows in-kernel and sort, when they do, with a kernel of their own: see gpu.py.)

Tokens are stably sorted by slot and each slot's segment is padded to a whole number of token tiles,
so every tile belongs to exactly one adapter: a kernel program reads one adapter's A and B and needs
no per-row adapter logic. Which slots are active and how many tokens each has are data; every array
here has a static shape derived from (T, N, block_t), so a new adapter mix never recompiles.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Grouping(NamedTuple):
    """Where each token sits in the padded, slot-sorted row layout (Tp rows, Tp / block_t tiles).

    row_token: (Tp,) token index held by each padded row, -1 for padding rows.
    token_row: (T,) padded row of each token; Tp for tokens left out of the layout.
    tile_slot: (Tp / block_t,) slot of each tile; N for tiles of unadapted tokens or past the end.
    num_tiles: (1,) how many leading tiles hold tokens; kernels skip the rest.
    """

    row_token: jax.Array
    token_row: jax.Array
    tile_slot: jax.Array
    num_tiles: jax.Array


def padded_rows(num_tokens: int, num_slots: int, block_t: int, include_unadapted: bool) -> int:
    """Static bound on the padded layout: each non-empty segment wastes at most block_t - 1 rows."""
    segments = min(num_tokens, num_slots + int(include_unadapted))
    tiles = (num_tokens + segments * (block_t - 1)) // block_t
    return max(1, tiles) * block_t


def group_tokens(slot_ids: jax.Array, num_slots: int, block_t: int, include_unadapted: bool) -> Grouping:
    """Sort tokens by slot into tile-aligned segments.

    Slot -1 (and any id outside [0, N)) means no adapter. Those tokens form a trailing segment of
    slot N when `include_unadapted` (the fused projection still owes them x @ W), else they are left
    out of the layout entirely.
    """
    num_tokens = slot_ids.shape[0]
    total_rows = padded_rows(num_tokens, num_slots, block_t, include_unadapted)
    in_range = (slot_ids >= 0) & (slot_ids < num_slots)
    key = jnp.where(in_range, slot_ids, num_slots).astype(jnp.int32)

    counts = jnp.bincount(key, length=num_slots + 1).astype(jnp.int32)
    if not include_unadapted:
        counts = counts.at[num_slots].set(0)
    padded_counts = (counts + block_t - 1) // block_t * block_t
    padded_ends = jnp.cumsum(padded_counts)
    padded_starts = padded_ends - padded_counts
    starts = jnp.cumsum(counts) - counts

    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    sorted_key = key[order]
    rank_in_segment = jnp.arange(num_tokens, dtype=jnp.int32) - starts[sorted_key]
    row_of_sorted = padded_starts[sorted_key] + rank_in_segment
    kept = include_unadapted | (sorted_key < num_slots)
    row_of_sorted = jnp.where(kept, row_of_sorted, total_rows)

    row_token = jnp.full((total_rows,), -1, jnp.int32).at[row_of_sorted].set(order, mode="drop")
    token_row = jnp.zeros((num_tokens,), jnp.int32).at[order].set(row_of_sorted)

    tile_starts = jnp.arange(total_rows // block_t, dtype=jnp.int32) * block_t
    tile_slot = jnp.searchsorted(padded_ends, tile_starts, side="right").astype(jnp.int32)
    tile_slot = jnp.minimum(tile_slot, num_slots)
    num_tiles = (padded_ends[-1] // block_t).astype(jnp.int32).reshape(1)
    return Grouping(row_token, token_row, tile_slot, num_tiles)
