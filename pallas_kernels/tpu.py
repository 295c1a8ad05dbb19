"""ATMM on TPU: Pallas Mosaic kernels over slot-sorted tiles, BlockSpec-pipelined (double-buffered DMA).

Mosaic moves whole (8, 128)-aligned blocks, so rows cannot be gathered per token inside the kernel:
x is gathered into the padded slot-sorted layout before the kernels and results are gathered back
after. Tile slots, the tile count and the ranks are scalar-prefetched into SMEM so the index maps
pick each tile's adapter blocks. Steps with nothing to do (rank blocks past a slot's rank, tiles past
the layout) map to the block the previous step used, so the pipeline issues no DMA for them.

- shrink: grid (token tiles, rank blocks, d_in blocks); xa = scale * x @ A[:, :rank] in float32,
  accumulated in the resident output block. Columns past the rank are zeroed, not left unwritten.
- expand: grid (token tiles, d_out blocks, steps); the step axis runs the base GEMM's d_in blocks
  (fused projection only) and then the slot's rank blocks into one float32 accumulator.
- projection with tiles.fuse_shrink: the expand alone; its d_in steps also accumulate x @ A into a
  VMEM scratch, so x is read once and one kernel runs, while each d_out block recomputes the shrink
  (see Tiles.fuse_shrink).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.grouping import Grouping
from pallas_kernels.reference import dot_f32
from pallas_kernels.tiles import Tiles


def _interpret(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


class _TileInfo:
    """Per-tile facts the index maps and kernels share, from the scalar-prefetched metadata."""

    def __init__(self, tile, tile_slot_ref, num_tiles_ref, ranks_ref, num_slots: int, block_r: int):
        slot = tile_slot_ref[tile]
        self.safe_slot = jnp.minimum(slot, num_slots - 1)
        self.in_layout = tile < num_tiles_ref[0]
        self.rank = jnp.where((slot < num_slots) & self.in_layout, ranks_ref[self.safe_slot], 0)
        self.last_rank_block = jnp.maximum(pl.cdiv(self.rank, block_r) - 1, 0)
        self.resident_tile = jnp.minimum(tile, jnp.maximum(num_tiles_ref[0] - 1, 0))


def _rank_mask(rank_block, rank, block_r: int, shape, axis: int) -> jax.Array:
    return rank_block * block_r + lax.broadcasted_iota(jnp.int32, shape, axis) < rank


def _shrink_kernel(tile_slot_ref, num_tiles_ref, ranks_ref, scales_ref, x_ref, a_ref, xa_ref, *,
                   num_slots: int, block_r: int):
    tile, rank_block, k_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    info = _TileInfo(tile, tile_slot_ref, num_tiles_ref, ranks_ref, num_slots, block_r)

    @pl.when(k_block == 0)
    def _():
        xa_ref[...] = jnp.zeros_like(xa_ref)

    @pl.when(rank_block * block_r < info.rank)
    def _():
        a = a_ref[...]
        a = jnp.where(_rank_mask(rank_block, info.rank, block_r, a.shape, 1), a, 0)
        xa_ref[...] += dot_f32(x_ref[...], a)

        @pl.when(k_block == pl.num_programs(2) - 1)
        def _():
            xa_ref[...] *= scales_ref[info.safe_slot]


def shrink(x_sorted, a_pool, ranks, scales, grouping: Grouping, tiles: Tiles, interpret: bool):
    """Scaled x @ A for every tile of the layout: (Tp, R) float32, zero past each slot's rank."""
    num_slots, d_in, rank_buffer = a_pool.shape
    bt, bk, br = tiles.block_t, tiles.block_k, tiles.block_r
    k_blocks = d_in // bk

    def info(t, refs):
        return _TileInfo(t, *refs, num_slots=num_slots, block_r=br)

    def x_map(t, r, k, *refs):
        i = info(t, refs)
        return i.resident_tile, jnp.where(r > i.last_rank_block, k_blocks - 1, k)

    def a_map(t, r, k, *refs):
        i = info(t, refs)
        past_rank = r > i.last_rank_block
        return i.safe_slot, jnp.where(past_rank, k_blocks - 1, k), jnp.minimum(r, i.last_rank_block)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(grouping.tile_slot.shape[0], rank_buffer // br, k_blocks),
        in_specs=[
            pl.BlockSpec(memory_space=pltpu.SMEM),
            pl.BlockSpec((bt, bk), x_map),
            pl.BlockSpec((None, bk, br), a_map),
        ],
        out_specs=pl.BlockSpec((bt, br), lambda t, r, k, *_: (t, r)),
    )
    return pl.pallas_call(
        functools.partial(_shrink_kernel, num_slots=num_slots, block_r=br),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((x_sorted.shape[0], rank_buffer), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="atmm_shrink",
    )(grouping.tile_slot, grouping.num_tiles, ranks, scales, x_sorted, a_pool)


class _Steps:
    """The expand's step axis: d_in steps, then one step per rank block of B.

    Each d_in block of the base GEMM takes one step, or, with the shrink fused, one step per rank
    block of A (the x and W blocks stay resident across them, and A blocks past the slot's rank map
    to the block before, so they cost neither DMA nor FLOPs).
    """

    def __init__(self, base_blocks: int, rank_blocks: int, fuse_shrink: bool):
        self.base_blocks, self.rank_blocks, self.fuse_shrink = base_blocks, rank_blocks, fuse_shrink
        self.per_k = rank_blocks if fuse_shrink else 1
        self.d_in = base_blocks * self.per_k
        self.total = self.d_in + rank_blocks

    def k_block(self, step):
        return jnp.minimum(step // self.per_k, self.base_blocks - 1)

    def shrink_block(self, step):
        """Rank block of A that a d_in step accumulates; the rank steps keep the last one."""
        return jnp.where(step < self.d_in, step % self.per_k, self.per_k - 1)

    def expand_block(self, step):
        return step - self.d_in


def _expand_kernel(*refs, num_slots: int, block_r: int, steps: _Steps):
    tile_slot_ref, num_tiles_ref, ranks_ref, *refs = refs
    if steps.fuse_shrink:
        scales_ref, x_ref, w_ref, a_ref, b_ref, out_ref, acc_ref, xa_ref = refs
    elif steps.base_blocks:
        x_ref, w_ref, xa_ref, b_ref, out_ref, acc_ref = refs
    else:
        xa_ref, b_ref, out_ref, acc_ref = refs
    tile, step = pl.program_id(0), pl.program_id(2)
    info = _TileInfo(tile, tile_slot_ref, num_tiles_ref, ranks_ref, num_slots, block_r)

    @pl.when(step == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        if steps.fuse_shrink:
            xa_ref[...] = jnp.zeros_like(xa_ref)

    if steps.base_blocks:
        @pl.when(info.in_layout & (step < steps.d_in) & (step % steps.per_k == 0))
        def _():
            acc_ref[...] += dot_f32(x_ref[...], w_ref[...])

    if steps.fuse_shrink:
        shrink_block = steps.shrink_block(step)

        @pl.when((step < steps.d_in) & (shrink_block * block_r < info.rank))
        def _():
            a = a_ref[...]
            a = jnp.where(_rank_mask(shrink_block, info.rank, block_r, a.shape, 1), a, 0)
            xa_ref[shrink_block] += dot_f32(x_ref[...], a)

    rank_block = steps.expand_block(step)

    @pl.when((rank_block >= 0) & (rank_block * block_r < info.rank))
    def _():
        b = b_ref[...]
        b = jnp.where(_rank_mask(rank_block, info.rank, block_r, b.shape, 0), b, 0)
        xa = xa_ref[rank_block] * scales_ref[info.safe_slot] if steps.fuse_shrink else xa_ref[...]
        acc_ref[...] += dot_f32(xa.astype(b.dtype), b)

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _expand(b_pool, ranks, grouping: Grouping, tiles: Tiles, interpret: bool, out_dtype, *, xa=None,
            a_pool=None, scales=None, x_sorted=None, w=None):
    """The expand kernel; `xa` from `shrink`, or `a_pool` and `scales` to fuse the shrink (needs x, w)."""
    num_slots, rank_buffer, d_out = b_pool.shape
    bt, bk, br, bn = tiles.block_t, tiles.block_k, tiles.block_r, tiles.block_n
    steps = _Steps(0 if w is None else w.shape[0] // bk, rank_buffer // br, fuse_shrink=xa is None)

    def info(t, refs):
        return _TileInfo(t, *refs[:3], num_slots=num_slots, block_r=br)

    def rank_block_of(t, s, refs):
        return jnp.clip(steps.expand_block(s), 0, info(t, refs).last_rank_block)

    def b_map(t, n, s, *refs):
        return info(t, refs).safe_slot, rank_block_of(t, s, refs), n

    def a_map(t, n, s, *refs):
        i = info(t, refs)
        return i.safe_slot, steps.k_block(s), jnp.minimum(steps.shrink_block(s), i.last_rank_block)

    in_specs, operands, scratch = [], [], [pltpu.VMEM((bt, bn), jnp.float32)]
    if steps.base_blocks:
        in_specs += [
            pl.BlockSpec((bt, bk), lambda t, n, s, *refs: (info(t, refs).resident_tile, steps.k_block(s))),
            pl.BlockSpec((bk, bn), lambda t, n, s, *refs: (steps.k_block(s), n)),
        ]
        operands += [x_sorted, w]
    if steps.fuse_shrink:
        in_specs.append(pl.BlockSpec((None, bk, br), a_map))
        operands.append(a_pool)
        scratch.append(pltpu.VMEM((steps.rank_blocks, bt, br), jnp.float32))
    else:
        in_specs.append(pl.BlockSpec(
            (bt, br), lambda t, n, s, *refs: (info(t, refs).resident_tile, rank_block_of(t, s, refs))))
        operands.append(xa)
    in_specs.append(pl.BlockSpec((None, br, bn), b_map))
    operands.append(b_pool)
    scalars = [grouping.tile_slot, grouping.num_tiles, ranks] + ([scales] if steps.fuse_shrink else [])

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(scalars),
        grid=(grouping.tile_slot.shape[0], d_out // bn, steps.total),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bt, bn), lambda t, n, s, *_: (t, n)),
        scratch_shapes=scratch,
    )
    return pl.pallas_call(
        functools.partial(_expand_kernel, num_slots=num_slots, block_r=br, steps=steps),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((grouping.row_token.shape[0], d_out), out_dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="atmm_projection" if steps.fuse_shrink else "atmm_expand",
    )(*scalars, *operands)


def expand(xa, b_pool, ranks, grouping: Grouping, tiles: Tiles, interpret: bool, out_dtype):
    """xa @ B for every tile of the layout, (Tp, d_out) in `out_dtype`, slot-sorted rows."""
    return _expand(b_pool, ranks, grouping, tiles, interpret, out_dtype, xa=xa)


def projection(x_sorted, w, a_pool, b_pool, ranks, scales, grouping: Grouping, tiles: Tiles,
               interpret: bool):
    """x @ W + delta for every tile of the layout, slot-sorted rows in x's dtype.

    With tiles.fuse_shrink one kernel reads each x block once for both x @ W and x @ A (the shrink
    recomputed per d_out block); without it the shrink kernel runs first and x is read twice.
    """
    if tiles.fuse_shrink:
        return _expand(b_pool, ranks, grouping, tiles, interpret, x_sorted.dtype, a_pool=a_pool,
                       scales=scales, x_sorted=x_sorted, w=w)
    xa = shrink(x_sorted, a_pool, ranks, scales, grouping, tiles, interpret)
    return _expand(b_pool, ranks, grouping, tiles, interpret, x_sorted.dtype, xa=xa, x_sorted=x_sorted, w=w)
