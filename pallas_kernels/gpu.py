"""ATMM on GPU: Pallas kernels with the Triton lowering, shrink then expand over slot-sorted tiles.

Every program owns one token tile of the padded slot-sorted layout (so one adapter) and gathers its
token rows straight from x by index, and scatters its results straight into y: tokens are never
copied into sorted order. Refs are whole arrays; each access is an index-vector gather/scatter with a
mask (Triton style), which is also exact in interpret mode because masked-off lanes point out of
bounds, where interpret-mode scatters drop them.

- shrink: grid (token tiles, rank blocks, split-K). xa[s, rows, r] = scale * x[rows, K_s] @ A[:, r]
  in float32, for the K range of split s. Rank blocks past the slot's rank and tiles past the layout
  exit at once; split-K fills the GPU when a decode batch has few token tiles.
- expand: grid (token tiles, d_out tiles). y[rows, n] = [x[rows] @ W[:, n]] + (sum_s xa[s, rows]) @
  B[:rank, n] [+ base[rows, n]], the rank loop bounded by the slot's rank. With W it is the fused
  projection: the base GEMM's K loop and the LoRA expand share one accumulator and one y write.
- projection with tiles.fuse_shrink: the expand grid alone; its K loop also accumulates
  scale * x[rows] @ A[:, :rank] (columns past the slot's rank masked), so x is read once and one
  kernel runs, at the price of recomputing the shrink in every d_out tile (see Tiles.fuse_shrink).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.grouping import Grouping
from pallas_kernels.tiles import Tiles


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """float32-accumulating dot; float32 inputs ask for full precision (no TF32)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)


def _gather(ref, *index_vectors, mask):
    """Masked gather of a 2-D tile; index vectors broadcast, masked lanes read as zero."""
    return plgpu.load(ref.at[index_vectors], mask=mask, other=0)


def _tile_rows(row_token_ref, tile: jax.Array, block_t: int, num_tokens: int):
    """Token rows of a tile as a (block_t, 1) index column and its validity mask (padding rows)."""
    rows = row_token_ref[pl.ds(tile * block_t, block_t)]
    valid = rows >= 0
    return jnp.where(valid, rows, num_tokens)[:, None], valid[:, None]


def _compiler_params(tiles: Tiles) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def _shrink_kernel(tile_slot_ref, num_tiles_ref, row_token_ref, ranks_ref, scales_ref, x_ref, a_ref,
                   xa_ref, *, tiles: Tiles, num_slots: int):
    tile, rank_block, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bt, bk, br = tiles.block_t, tiles.block_k, tiles.block_r
    num_tokens, d_in = x_ref.shape
    slot = tile_slot_ref[tile]
    safe_slot = jnp.minimum(slot, num_slots - 1)
    rank = ranks_ref[safe_slot]
    active = (tile < num_tiles_ref[0]) & (slot < num_slots) & (rank_block * br < rank)

    @pl.when(active)
    def _():
        rows, row_ok = _tile_rows(row_token_ref, tile, bt, num_tokens)
        r_cols = (rank_block * br + jnp.arange(br))[None, :]
        r_ok = r_cols < rank
        k_blocks = pl.cdiv(d_in, bk)
        per_split = pl.cdiv(k_blocks, tiles.split_k)
        k_start = split * per_split
        k_stop = jnp.minimum(k_start + per_split, k_blocks)

        def k_step(k_block, acc):
            k_idx = k_block * bk + jnp.arange(bk)
            k_ok = k_idx < d_in
            x = _gather(x_ref, rows, k_idx[None, :], mask=row_ok & k_ok[None, :])
            a = _gather(a_ref, safe_slot, k_idx[:, None], r_cols, mask=k_ok[:, None] & r_ok)
            return acc + _dot(x, a)

        acc = lax.fori_loop(k_start, k_stop, k_step, jnp.zeros((bt, br), jnp.float32))
        tile_rows = (tile * bt + jnp.arange(bt))[:, None]
        xa_ref[split, tile_rows, r_cols] = acc * scales_ref[safe_slot]


def _expand_kernel(*refs, tiles: Tiles, num_slots: int, fused_base: bool, fuse_shrink: bool,
                   add_base: bool):
    tile_slot_ref, num_tiles_ref, row_token_ref, ranks_ref, *refs = refs
    if fused_base:
        x_ref, w_ref, *refs = refs
    if fuse_shrink:
        scales_ref, a_ref, *refs = refs
    else:
        xa_ref, *refs = refs
    b_ref, *refs = refs
    base_ref, out_ref = refs if add_base else (None, refs[0])

    tile, n_block = pl.program_id(0), pl.program_id(1)
    bt, bk, br, bn = tiles.block_t, tiles.block_k, tiles.block_r, tiles.block_n
    num_tokens, d_out = out_ref.shape
    slot = tile_slot_ref[tile]
    safe_slot = jnp.minimum(slot, num_slots - 1)
    rank = jnp.where(slot < num_slots, ranks_ref[safe_slot], 0)

    def rank_cols(rank_block):
        r_idx = rank_block * br + jnp.arange(br)
        return r_idx, r_idx < rank

    @pl.when(tile < num_tiles_ref[0])
    def _():
        rows, row_ok = _tile_rows(row_token_ref, tile, bt, num_tokens)
        n_idx = (n_block * bn + jnp.arange(bn))[None, :]
        n_ok = n_idx < d_out
        acc = jnp.zeros((bt, bn), jnp.float32)
        # Fused shrink: one float32 x @ A accumulator per rank block of the pool, carried through
        # the base GEMM's d_in loop so that each x tile loaded feeds both dots. Rank columns past the
        # slot's rank are masked off in the load (never read) rather than branched around: a branch
        # in the loop stops Triton pipelining its loads, which measured slower on an H100.
        rank_blocks = pl.cdiv(a_ref.shape[2], br) if fuse_shrink else 0
        xa = tuple(jnp.zeros((bt, br), jnp.float32) for _ in range(rank_blocks))
        if fused_base:
            d_in = x_ref.shape[1]

            def k_step(k_block, carry):
                acc, xa = carry
                k_idx = k_block * bk + jnp.arange(bk)
                k_ok = k_idx < d_in
                x = _gather(x_ref, rows, k_idx[None, :], mask=row_ok & k_ok[None, :])
                w = _gather(w_ref, k_idx[:, None], n_idx, mask=k_ok[:, None] & n_ok)

                def add_shrink(rank_block, xa_block):
                    r_idx, r_ok = rank_cols(rank_block)
                    a = _gather(a_ref, safe_slot, k_idx[:, None], r_idx[None, :],
                                mask=k_ok[:, None] & r_ok[None, :])
                    return xa_block + _dot(x, a)

                xa = tuple(add_shrink(j, xa_j) for j, xa_j in enumerate(xa))
                return acc + _dot(x, w), xa

            acc, xa = lax.fori_loop(0, pl.cdiv(d_in, bk), k_step, (acc, xa))

        def add_expand(rank_block, xa_block, acc):
            r_idx, r_ok = rank_cols(rank_block)
            b = _gather(b_ref, safe_slot, r_idx[:, None], n_idx, mask=r_ok[:, None] & n_ok)
            return acc + _dot(xa_block.astype(b.dtype), b)

        if fuse_shrink:
            scale = scales_ref[safe_slot]
            for j, xa_j in enumerate(xa):  # rank blocks past the slot's rank: no loads, no FLOPs
                acc = lax.cond(j * br < rank, functools.partial(add_expand, j, xa_j * scale), lambda a: a, acc)
        else:
            tile_rows = (tile * bt + jnp.arange(bt))[:, None]

            def rank_step(rank_block, acc):
                r_idx, r_ok = rank_cols(rank_block)
                xa_block = sum(_gather(xa_ref, s, tile_rows, r_idx[None, :], mask=r_ok[None, :])
                               for s in range(xa_ref.shape[0]))
                return add_expand(rank_block, xa_block, acc)

            acc = lax.fori_loop(0, pl.cdiv(rank, br), rank_step, acc)
        mask = row_ok & n_ok
        if add_base:
            acc += _gather(base_ref, rows, n_idx, mask=mask).astype(jnp.float32)
        plgpu.store(out_ref.at[rows, n_idx], acc.astype(out_ref.dtype), mask=mask)


def shrink(x, a_pool, ranks, scales, grouping: Grouping, tiles: Tiles, interpret: bool) -> jax.Array:
    """Scaled x @ A per tile, as split-K partial sums (split_k, Tp, R padded to block_r), float32."""
    num_slots, _, rank_buffer = a_pool.shape
    rank_blocks = pl.cdiv(rank_buffer, tiles.block_r)
    num_tile_slots = grouping.tile_slot.shape[0]
    kernel = functools.partial(_shrink_kernel, tiles=tiles, num_slots=num_slots)
    return pl.pallas_call(
        kernel,
        grid=(num_tile_slots, rank_blocks, tiles.split_k),
        out_shape=jax.ShapeDtypeStruct(
            (tiles.split_k, grouping.row_token.shape[0], rank_blocks * tiles.block_r), jnp.float32),
        compiler_params=_compiler_params(tiles),
        interpret=interpret,
        name="atmm_shrink",
    )(grouping.tile_slot, grouping.num_tiles, grouping.row_token, ranks, scales, x, a_pool)


def _expand(b_pool, ranks, grouping: Grouping, tiles: Tiles, interpret: bool, *, xa=None,
            a_pool=None, scales=None, base_out=None, x=None, w=None) -> jax.Array:
    """The expand kernel; `xa` from `shrink`, or `a_pool` and `scales` to fuse the shrink (needs x, w)."""
    num_slots, _, d_out = b_pool.shape
    num_tokens = grouping.token_row.shape[0]
    fused_base, fuse_shrink, add_base = w is not None, xa is None, base_out is not None
    dtype = (base_out if add_base else x).dtype
    operands = [grouping.tile_slot, grouping.num_tiles, grouping.row_token, ranks]
    operands += [x, w] if fused_base else []
    operands += [scales, a_pool] if fuse_shrink else [xa]
    operands += [b_pool] + ([base_out] if add_base else [])
    kernel = functools.partial(_expand_kernel, tiles=tiles, num_slots=num_slots, fused_base=fused_base,
                               fuse_shrink=fuse_shrink, add_base=add_base)
    return pl.pallas_call(
        kernel,
        grid=(grouping.tile_slot.shape[0], pl.cdiv(d_out, tiles.block_n)),
        out_shape=jax.ShapeDtypeStruct((num_tokens, d_out), dtype),
        input_output_aliases={len(operands) - 1: 0} if add_base else {},
        compiler_params=_compiler_params(tiles),
        interpret=interpret,
        name="atmm_projection" if fuse_shrink else "atmm_expand",
    )(*operands)


def expand(xa, b_pool, ranks, grouping: Grouping, tiles: Tiles, interpret: bool, *,
           base_out=None) -> jax.Array:
    """y = xa @ B + base_out for every token in the layout; tokens outside it keep their base value
    without being copied (the output aliases base_out)."""
    return _expand(b_pool, ranks, grouping, tiles, interpret, xa=xa, base_out=base_out)


def projection(x, w, a_pool, b_pool, ranks, scales, grouping: Grouping, tiles: Tiles,
               interpret: bool) -> jax.Array:
    """y = x @ W + delta with the base GEMM's K loop and the expand sharing one accumulator and one y
    write. With tiles.fuse_shrink the same K loop also accumulates x @ A (one kernel, x read once,
    the shrink recomputed per d_out tile); without it a split-K shrink kernel runs first (x read
    twice, two launches, but no recomputation: the better trade once FLOPs dominate)."""
    if tiles.fuse_shrink:
        return _expand(b_pool, ranks, grouping, tiles, interpret, a_pool=a_pool, scales=scales, x=x, w=w)
    xa = shrink(x, a_pool, ranks, scales, grouping, tiles, interpret)
    return _expand(b_pool, ranks, grouping, tiles, interpret, xa=xa, x=x, w=w)
