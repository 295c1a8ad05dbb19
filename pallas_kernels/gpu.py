"""ATMM on GPU: Pallas kernels with the Triton lowering over token tiles, with no XLA grouping ops.

A token tile is block_t consecutive tokens, in natural order or, with tiles.sort, in slot order (a
permutation made by the `atmm_sort` kernel, one launch). Rows of a tile that share an adapter form a
*run*; a program walks its tile's runs in ascending slot order (`_for_each_run`; where the run
groups leave it one run at most, it finds that run directly) and does one masked tl.dot per run
against that adapter's contiguous A or B block. Natural order suits small batches
(decode: a sort would cost a launch and a tile holds few tokens anyway); sorted order suits prefill
and large decode batches, where a tile then holds one or two runs instead of every adapter, so each
adapter is read about once per tile. tiles.split_runs spreads a tile's runs over that many programs:
decode tiles hold many runs and are too few to fill the GPU on their own.

- sort: order[p] = token at slot-sorted position p (stable; tokens without adapter last), by
  counting for each token the tokens that sort before it. It depends on the slot ids alone, so
  projections of one batch in one jitted program issue the same sort (`slot_order`, SORT_LAUNCH).
- shrink: grid (tiles, run groups, split-K). xa[s, t, :rank] = scale * x[t, K_s] @ A[slot_t, K_s, :rank]
  in float32, split-K partials indexed by token.
- expand: grid (tiles, run groups, d_out tiles). y[t] = base[t] + (sum_s xa[s, t]) @ B[slot_t, :rank],
  each token written once (tokens without adapter get base, or zeros).
- delta (tiles.fuse_shrink): the expand with no shrink kernel before it; each program takes one run
  of its tile and computes that run's scaled x @ A over all of d_in itself (every d_out tile again,
  A re-read from L2), so a decode delta is one launch (two with sort) and xa never goes through HBM.
- projection: grid (tiles, d_out tiles), natural-order tiles whatever tiles.sort says. y = x @ W
  with x and W loaded as contiguous blocks and the expand as its epilogue, so W is read once per
  token tile and y written once; the shrink kernel (sorted or not) runs first.

With tiles.expand_rows the expand (of the delta and of the projection's epilogue) skips the runs and
lets every row gather its own adapter's B instead (`_expand_rows`): for decode, where the runs of a
tile would be a chain of dependent loads.

Masked-off lanes of every gather and scatter point out of bounds (token index T), which the Triton
lowering never touches and interpret mode drops, so interpret mode is exact too.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.reference import dot_f32
from pallas_kernels.tiles import Tiles

# Tokens ranked per program x tokens compared per step. Few rows and many programs: on the H100 the
# sort took 6.9 us at T = 4096 against 16.4 with 32 x 256 (2.2 against 3.3 at T = 256; PERF.md round 7).
SORT_ROWS, SORT_COLS = 4, 1024
# The sort's launch settings are its own, not the tiles' of the call it serves: then every projection of
# a batch (same slot ids) issues the identical sort, which XLA's common-subexpression elimination can
# compute once (num_stages 3 as the prefill entries that sort over several steps had it).
SORT_LAUNCH = plgpu.CompilerParams(num_warps=4, num_stages=3)


def _load(ref, *index, mask, other=0):
    """Gather, masked unless mask is None; index vectors broadcast against each other."""
    return plgpu.load(ref.at[index], mask=mask, other=None if mask is None else other)


def _tail(idx: jax.Array, size: int):
    """idx < size for a block along an axis of `size`, or None where the block size divides it.

    Masks go only where a block can pass the end: a mask that varies along the contiguous axis stops
    Triton from vectorizing the access (one element per instruction).
    """
    return idx < size if size % idx.shape[0] else None


def _edge_mask(rows_ok, cols_ok):
    """The mask of a 2-D block from its optional row and column masks (None: that axis is whole)."""
    if rows_ok is None or cols_ok is None:
        return None if rows_ok is None and cols_ok is None else (
            rows_ok[:, None] if cols_ok is None else cols_ok[None, :])
    return rows_ok[:, None] & cols_ok[None, :]


def _keys(slot_ref, rows: jax.Array, valid: jax.Array, num_slots: int) -> jax.Array:
    """Run key of each row: its slot, N for no adapter (slot -1 or out of range), N + 1 past the end."""
    slots = _load(slot_ref, rows, mask=valid, other=-1)
    keys = jnp.where((slots >= 0) & (slots < num_slots), slots, num_slots)
    return jnp.where(valid, keys, num_slots + 1)


def _tile(order_ref, slot_ref, tile, block_t: int, num_slots: int):
    """Token index (T past the end), validity and run key of each row of a token tile."""
    num_tokens = slot_ref.shape[0]
    pos = tile * block_t + jnp.arange(block_t)
    valid = pos < num_tokens
    rows = pos if order_ref is None else _load(order_ref, pos, mask=valid)
    rows = jnp.where(valid, rows, num_tokens)
    return rows, valid, _keys(slot_ref, rows, valid, num_slots)


def _next_key(keys: jax.Array, prev, stop_key: int):
    """The tile's smallest key above prev, stop_key if none is below stop_key."""
    return jnp.min(jnp.where(keys > prev, keys, stop_key))


def _nth_key(keys: jax.Array, n, stop_key: int):
    """The tile's n-th smallest distinct key below stop_key (from 0), stop_key if it has fewer.

    Three reductions over a (block_t, block_t) comparison whatever n, where a loop of n + 1
    `_next_key` reductions (each a cross-warp barrier) kept the last run group's programs longest.
    """
    position = jnp.arange(keys.shape[0])
    repeat = (keys[None, :] == keys[:, None]) & (position[None, :] < position[:, None])
    first = (jnp.max(repeat.astype(jnp.int32), axis=1) == 0) & (keys < stop_key)
    below = jnp.sum((first[None, :] & (keys[None, :] < keys[:, None])).astype(jnp.int32), axis=1)
    return jnp.min(jnp.where(first & (below == n), keys, stop_key))


def _for_each_run(keys: jax.Array, stop_key: int, body, carry, *, group=0, groups: int = 1):
    """carry = body(key, in_run, carry) for each distinct key < stop_key of the tile, ascending.

    With groups > 1 only every groups-th run from `group` on: the others cost a reduction, no loads.
    Where the groups cover every run a tile can hold (min(block_t, stop_key) distinct keys), a
    program has at most one: `_nth_key` finds it in three reductions, where the walk would take
    one per run of the tile, each a cross-warp barrier, in every program (decode tiles: 16).
    """
    if groups >= min(keys.shape[0], stop_key):
        key = _nth_key(keys, group, stop_key)
        return lax.cond(key < stop_key, lambda c: body(key, keys == key, c), lambda c: c, carry)

    def step(state):
        key, index, carry = state
        run = lambda c: body(key, keys == key, c)  # noqa: E731
        carry = run(carry) if groups == 1 else lax.cond(index % groups == group, run, lambda c: c, carry)
        return _next_key(keys, key, stop_key), index + 1, carry

    start = (_next_key(keys, jnp.int32(-1), stop_key), jnp.int32(0), carry)
    return lax.while_loop(lambda state: state[0] < stop_key, step, start)[2]


def _over_rank_blocks(rank, has_adapter, rank_buffer: int, block_r: int, body, carry):
    """carry = body(r_idx, r_ok, carry) for the first rank block when `has_adapter` (True: always)
    and each further rank block below `rank`.

    The first block does not wait for the rank: its load would sit between the slot loads and A's
    (a dependent memory latency, on the critical path of a decode call), and r_ok zeroes whatever
    lies past the rank anyway (rank 0 gives an exact zero). A static loop of conds rather than an
    scf.for: Triton would software-pipeline a loop, and in an epilogue that only buys shared-memory
    buffers (which ran out at prefill tiles) for one trip.
    """
    for rank_block in range(pl.cdiv(rank_buffer, block_r)):
        r_idx = rank_block * block_r + jnp.arange(block_r)
        step = functools.partial(body, r_idx, r_idx < rank)
        live = has_adapter if rank_block == 0 else rank_block * block_r < rank
        carry = step(carry) if live is True else lax.cond(live, step, lambda c: c, carry)
    return carry


def _expand_run(acc, key, in_run, n_idx, n_ok, ranks_ref, b_ref, xa_block, *, block_r: int, num_slots: int):
    """acc[rows of the run] += xa_block(key, in_run, r_idx, r_ok) @ B[key, :rank, n_idx], rank-blocked."""
    has_adapter = key < num_slots
    rank = jnp.where(has_adapter, ranks_ref[jnp.minimum(key, num_slots - 1)], 0)

    def rank_block(r_idx, r_ok, acc):
        # B is loaded whole along the rank and the rows past it are zeroed after the load (NaN
        # included): the load then waits for the key alone, not for the rank, and is unmasked
        # along the rank. (Issuing it before xa's loads sped decode up by 3-5% but cost prefill 5%
        # on the H100: PERF.md round 5.)
        xa = xa_block(key, in_run, r_idx, r_ok)
        b = _load(b_ref, key, r_idx[:, None], n_idx[None, :], mask=_edge_mask(_tail(r_idx, b_ref.shape[1]), n_ok))
        return acc + dot_f32(xa.astype(b.dtype), jnp.where(r_ok[:, None], b, 0))

    return _over_rank_blocks(rank, has_adapter, b_ref.shape[1], block_r, rank_block, acc)


def _shrink_block(x_ref, a_ref, rows, in_run, key, r_idx, r_ok, k_start, k_stop, *, block_k: int) -> jax.Array:
    """x[rows of the run, K] @ A[key, K, r_idx] over the d_in blocks [k_start, k_stop), float32.

    A's block is read whole, so its load needs no mask along its contiguous axis and feeds the dot
    directly (what Triton pipelines); column r of the product depends on A[:, r] alone, so zeroing
    the columns past the slot's rank afterwards discards whatever the pool holds there, NaN included.
    """
    d_in = x_ref.shape[1]
    r_tail = _tail(r_idx, a_ref.shape[2])

    def k_step(k_block, acc):
        k_idx = k_block * block_k + jnp.arange(block_k)
        k_ok = _tail(k_idx, d_in)
        x = _load(x_ref, rows[:, None], k_idx[None, :], mask=_edge_mask(in_run, k_ok))
        a = _load(a_ref, key, k_idx[:, None], r_idx[None, :], mask=_edge_mask(k_ok, r_tail))
        return acc + dot_f32(x, a)

    acc = lax.fori_loop(k_start, k_stop, k_step, jnp.zeros((rows.shape[0], r_idx.shape[0]), jnp.float32))
    return jnp.where(r_ok[None, :], acc, 0)


def _xa_partials(xa_ref, rows, valid, *, whole_tile: bool):
    """xa_block of the two-kernel delta: the sum of the shrink kernel's split-K partials (exactly 0
    past the rank within a rank block the shrink computed, so only rows are masked).

    With `whole_tile` (for a program that walks all of its tile's runs, over one rank block) the
    partials of every row are loaded once, before the runs, and each run keeps its rows of them: the
    same bytes, but the partials are no longer live beside the accumulator inside the run loop,
    where they made the prefill expand spill 408 bytes a thread (PERF.md round 6).
    """
    def load(r_idx, rows_ok):
        return sum(_load(xa_ref, s, rows[:, None], r_idx[None, :], mask=rows_ok[:, None])
                   for s in range(xa_ref.shape[0]))

    if whole_tile:
        tile_xa = load(jnp.arange(xa_ref.shape[2]), valid)
        return lambda key, in_run, r_idx, r_ok: jnp.where(in_run[:, None], tile_xa, 0)
    return lambda key, in_run, r_idx, r_ok: load(r_idx, in_run)


def _xa_recomputed(scales_ref, x_ref, a_ref, rows, block_k: int):
    """xa_block of the one-kernel delta: the scaled shrink over all of d_in, in the program itself.

    Every d_out tile recomputes it (A re-read from L2) so that no xa round trip through HBM, and no
    second launch, sits between shrink and expand: what a decode batch is bound by.
    """
    k_blocks = pl.cdiv(x_ref.shape[1], block_k)

    def block(key, in_run, r_idx, r_ok):
        xa = _shrink_block(x_ref, a_ref, rows, in_run, key, r_idx, r_ok, 0, k_blocks, block_k=block_k)
        return scales_ref[key] * xa

    return block


def _expand_rows(acc, keys, rows, n_idx, n_ok, ranks_ref, b_ref, *, xa_ref, num_slots: int):
    """acc[t] += (sum of split-K partials of xa[t]) @ B[slot_t, :rank_t, n_idx] for every row at once.

    Rank-1 updates in which each row gathers its own row of B: no loop over the tile's adapters, so
    every load is independent of the others. At decode a tile holds many adapters, and a loop over
    them is a chain of dependent load latencies (about 1 us each on an H100); the cost is that each
    token re-reads its adapter's B (from L2) and the FMAs run off the tensor cores.
    """
    has = keys < num_slots
    slot = jnp.where(has, keys, 0)
    rank = jnp.minimum(_load(ranks_ref, slot, mask=has), b_ref.shape[1])  # a rank past R means R

    def rank_step(r, acc):
        live = r < rank
        xa = sum(_load(xa_ref, s, rows, r, mask=live) for s in range(xa_ref.shape[0]))
        b = _load(b_ref, slot[:, None], r, n_idx[None, :], mask=_edge_mask(live, n_ok))
        return acc + xa[:, None] * b.astype(jnp.float32)

    return lax.fori_loop(0, jnp.max(rank), rank_step, acc)


def _split_refs(refs, sort: bool):
    return (refs[0], refs[1:]) if sort else (None, refs)


def _sort_kernel(slot_ref, order_ref, *, num_slots: int):
    num_tokens = slot_ref.shape[0]
    pos = pl.program_id(0) * SORT_ROWS + jnp.arange(SORT_ROWS)
    valid = pos < num_tokens
    keys = _keys(slot_ref, jnp.where(valid, pos, num_tokens), valid, num_slots)

    def count_before(chunk, count):
        other = chunk * SORT_COLS + jnp.arange(SORT_COLS)
        other_ok = other < num_tokens
        other_keys = _keys(slot_ref, jnp.where(other_ok, other, num_tokens), other_ok, num_slots)
        before = (other_keys[None, :] < keys[:, None]) | (
            (other_keys[None, :] == keys[:, None]) & (other[None, :] < pos[:, None]))
        return count + jnp.sum((before & other_ok[None, :]).astype(jnp.int32), axis=1)

    rank = lax.fori_loop(0, pl.cdiv(num_tokens, SORT_COLS), count_before, jnp.zeros((SORT_ROWS,), jnp.int32))
    plgpu.store(order_ref.at[jnp.where(valid, rank, num_tokens)], pos, mask=valid)


def _shrink_kernel(*refs, tiles: Tiles, num_slots: int):
    """Grid (token tiles, run groups, split-K splits): each program's runs' scaled x @ A partials into xa."""
    order_ref, (slot_ref, ranks_ref, scales_ref, x_ref, a_ref, xa_ref) = _split_refs(refs, tiles.sort)
    bt, bk, br = tiles.block_t, tiles.block_k, tiles.block_r
    rows, _, keys = _tile(order_ref, slot_ref, pl.program_id(0), bt, num_slots)
    split = pl.program_id(2)
    k_blocks = math.ceil(x_ref.shape[1] / bk)
    per_split = math.ceil(k_blocks / tiles.split_k)
    k_start = split * per_split
    k_stop = jnp.minimum(k_start + per_split, k_blocks)

    def run(key, in_run, carry):
        rank, scale = ranks_ref[key], scales_ref[key]

        def rank_block(r_idx, r_ok, carry):
            # An empty split (k_start >= k_stop) still stores its zero partial: expand reads every split.
            acc = _shrink_block(x_ref, a_ref, rows, in_run, key, r_idx, r_ok, k_start, k_stop, block_k=bk)
            plgpu.store(xa_ref.at[split, rows[:, None], r_idx[None, :]], acc * scale, mask=in_run[:, None])
            return carry

        return _over_rank_blocks(rank, True, a_ref.shape[2], br, rank_block, carry)

    _for_each_run(keys, num_slots, run, jnp.int32(0), group=pl.program_id(1), groups=tiles.split_runs)


def _expand_kernel(*refs, tiles: Tiles, num_slots: int, add_base: bool):
    """Grid (token tiles, run groups, d_out tiles): y rows of each program's runs = base + xa @ B. The xa
    operand is the shrink's partials, or with tiles.fuse_shrink the three operands (scales, x, A) that
    this kernel computes xa from."""
    order_ref, (slot_ref, ranks_ref, *refs) = _split_refs(refs, tiles.sort)
    xa_refs, (b_ref, *refs) = (refs[:3], refs[3:]) if tiles.fuse_shrink else (refs[:1], refs[1:])
    base_ref, out_ref = refs if add_base else (None, refs[0])
    bt, bn = tiles.block_t, tiles.block_n
    d_out = out_ref.shape[1]
    rows, valid, keys = _tile(order_ref, slot_ref, pl.program_id(0), bt, num_slots)
    group = pl.program_id(1)
    n_idx = pl.program_id(2) * bn + jnp.arange(bn)
    n_ok = _tail(n_idx, d_out)
    refs = dict(n_idx=n_idx, n_ok=n_ok, ranks_ref=ranks_ref, b_ref=b_ref, num_slots=num_slots)
    acc = jnp.zeros((bt, bn), jnp.float32)
    if tiles.expand_rows:
        acc, mine = _expand_rows(acc, keys, rows, xa_ref=xa_refs[0], **refs), valid
    elif tiles.fuse_shrink:
        # One run per program (fit makes split_runs cover a tile's runs): the d_in loop then sits
        # in no loop over runs, where Triton can pipeline it.
        key = _nth_key(keys, group, num_slots + 1)
        mine = (keys == key) & valid
        acc = _expand_run(acc, key, mine, xa_block=_xa_recomputed(*xa_refs, rows, tiles.block_k),
                          block_r=tiles.block_r, **refs)
    else:
        whole_tile = tiles.split_runs == 1 and xa_refs[0].shape[2] == tiles.block_r
        xa_block = _xa_partials(xa_refs[0], rows, valid, whole_tile=whole_tile)

        def run(key, in_run, carry):  # the no-adapter run (key N, rank 0) only marks its rows written
            acc, mine = carry
            return _expand_run(acc, key, in_run, xa_block=xa_block, block_r=tiles.block_r, **refs), mine | in_run

        start = (acc, jnp.zeros((bt,), jnp.bool_))
        acc, mine = _for_each_run(keys, num_slots + 1, run, start, group=group, groups=tiles.split_runs)
    mask = _edge_mask(mine, n_ok)
    if base_ref is not None:
        acc += _load(base_ref, rows[:, None], n_idx[None, :], mask=mask).astype(jnp.float32)
    plgpu.store(out_ref.at[rows[:, None], n_idx[None, :]], acc.astype(out_ref.dtype), mask=mask)


def _projection_kernel(slot_ref, ranks_ref, xa_ref, x_ref, w_ref, b_ref, out_ref, *, tiles: Tiles,
                       num_slots: int, d_in: int):
    """Grid (token tiles, d_out tiles): one tile of x @ W plus the expand as its epilogue; x, W and y
    are BlockSpec blocks of the program's tile.

    The K loop is a plain GEMM over natural-order token tiles (masks only on axes whose size the
    tile does not divide), so its loads vectorize and pipeline as in a dense Pallas GEMM; the
    adapters only enter in the epilogue, through gathers of xa and B by token and slot.
    """
    bt, bk, bn = tiles.block_t, tiles.block_k, tiles.block_n
    num_tokens, d_out = slot_ref.shape[0], b_ref.shape[2]
    rows, valid, keys = _tile(None, slot_ref, pl.program_id(0), bt, num_slots)
    n_idx = pl.program_id(1) * bn + jnp.arange(bn)
    n_ok = _tail(n_idx, d_out)
    rows_edge = valid if num_tokens % bt else None

    def k_step(k_block, acc):
        k_idx = k_block * bk + jnp.arange(bk)
        k_ok = _tail(k_idx, d_in)
        x = _load(x_ref, slice(None), pl.ds(k_block * bk, bk), mask=_edge_mask(rows_edge, k_ok))
        w = _load(w_ref, pl.ds(k_block * bk, bk), slice(None), mask=_edge_mask(k_ok, n_ok))
        return acc + dot_f32(x, w)

    acc = lax.fori_loop(0, pl.cdiv(d_in, bk), k_step, jnp.zeros((bt, bn), jnp.float32))
    refs = dict(n_idx=n_idx, n_ok=n_ok, ranks_ref=ranks_ref, b_ref=b_ref, num_slots=num_slots)
    if tiles.expand_rows:
        acc = _expand_rows(acc, keys, rows, xa_ref=xa_ref, **refs)
    else:
        xa_block = _xa_partials(xa_ref, rows, valid, whole_tile=xa_ref.shape[2] == tiles.block_r)
        acc = _for_each_run(keys, num_slots, lambda key, in_run, acc: _expand_run(
            acc, key, in_run, xa_block=xa_block, block_r=tiles.block_r, **refs), acc)
    plgpu.store(out_ref, acc.astype(out_ref.dtype), mask=_edge_mask(rows_edge, n_ok))


def _call(kernel, grid, out_shape, launch: Tiles | plgpu.CompilerParams, interpret: bool, name: str, *operands,
          **specs):
    """pallas_call with the launch settings of `launch`: a kernel's tiles, or SORT_LAUNCH."""
    params = launch if isinstance(launch, plgpu.CompilerParams) else plgpu.CompilerParams(
        num_warps=launch.num_warps, num_stages=launch.num_stages)
    return pl.pallas_call(kernel, grid=grid, out_shape=out_shape, compiler_params=params,
                          interpret=interpret, name=name, **specs)(*operands)


def slot_order(slot_ids, num_slots: int, interpret: bool = False) -> jax.Array:
    """The slot-sorted permutation of the tokens (the `atmm_sort` kernel): order[p] = token at
    position p, stable, tokens without adapter (slot outside [0, num_slots)) last."""
    num_tokens = slot_ids.shape[0]
    return _call(functools.partial(_sort_kernel, num_slots=num_slots), (pl.cdiv(num_tokens, SORT_ROWS),),
                 jax.ShapeDtypeStruct((num_tokens,), jnp.int32), SORT_LAUNCH, interpret, "atmm_sort", slot_ids)


def _order(slot_ids, num_slots: int, tiles: Tiles, interpret: bool) -> list:
    """[order] of the slot-sorted permutation when tiles.sort, else [] (natural order)."""
    return [slot_order(slot_ids, num_slots, interpret)] if tiles.sort else []


def _shrink(order: list, x, a_pool, slot_ids, ranks, scales, tiles: Tiles, interpret: bool) -> jax.Array:
    """Scaled x @ A per token: split-K partials (split_k, T, R padded to block_r), float32."""
    num_slots, _, rank_buffer = a_pool.shape
    kernel = functools.partial(_shrink_kernel, tiles=tiles, num_slots=num_slots)
    grid = (pl.cdiv(x.shape[0], tiles.block_t), tiles.split_runs, tiles.split_k)
    padded_rank = pl.cdiv(rank_buffer, tiles.block_r) * tiles.block_r
    xa = jax.ShapeDtypeStruct((tiles.split_k, x.shape[0], padded_rank), jnp.float32)
    return _call(kernel, grid, xa, tiles, interpret, "atmm_shrink", *order, slot_ids, ranks, scales, x, a_pool)


def batched_lora(x, a_pool, b_pool, slot_ids, ranks, scales, base_out, tiles: Tiles,
                 interpret: bool) -> jax.Array:
    """base_out (or zeros) + every token's LoRA delta, in x's dtype: [sort,] shrink, expand; with
    tiles.fuse_shrink [sort,] one kernel, the expand computing its own xa (`_xa_recomputed`)."""
    num_slots, _, d_out = b_pool.shape
    num_tokens = x.shape[0]
    order = _order(slot_ids, num_slots, tiles, interpret)
    base = [] if base_out is None else [base_out]
    if tiles.fuse_shrink:
        xa, name = [scales, x, a_pool], "atmm_delta"
    else:
        xa, name = [_shrink(order, x, a_pool, slot_ids, ranks, scales, tiles, interpret)], "atmm_expand"
    kernel = functools.partial(_expand_kernel, tiles=tiles, num_slots=num_slots, add_base=bool(base))
    grid = (pl.cdiv(num_tokens, tiles.block_t), 1 if tiles.expand_rows else tiles.split_runs,
            pl.cdiv(d_out, tiles.block_n))
    out = jax.ShapeDtypeStruct((num_tokens, d_out), x.dtype)
    return _call(kernel, grid, out, tiles, interpret, name, *order, slot_ids, ranks, *xa, b_pool, *base)


def lora_projection(x, w, a_pool, b_pool, slot_ids, ranks, scales, tiles: Tiles, interpret: bool) -> jax.Array:
    """x @ W + every token's LoRA delta: [sort,] shrink, then one GEMM with the expand as epilogue.

    The GEMM walks token tiles in natural order whatever tiles.sort says (sort orders the shrink
    only, which writes xa by token): x and W then load as contiguous blocks, and W is read once per
    token tile. With tiles.xla_base the base GEMM is XLA's (cuBLAS) instead and the delta's expand
    adds to it (y written twice): the fallback where this Pallas GEMM is slower than cuBLAS.
    """
    if tiles.xla_base:
        base = dot_f32(x, w).astype(x.dtype)
        return batched_lora(x, a_pool, b_pool, slot_ids, ranks, scales, base, tiles, interpret)
    num_slots, _, d_out = b_pool.shape
    num_tokens, d_in = x.shape
    order = _order(slot_ids, num_slots, tiles, interpret)
    bt, bn = tiles.block_t, tiles.block_n
    k_span = pl.cdiv(d_in, tiles.block_k) * tiles.block_k  # the K loop's last block may pass d_in
    xa = _shrink(order, x, a_pool, slot_ids, ranks, scales, tiles, interpret)
    whole = pl.BlockSpec()
    specs = dict(in_specs=[whole, whole, whole, pl.BlockSpec((bt, k_span), lambda i, j: (i, 0)),
                           pl.BlockSpec((k_span, bn), lambda i, j: (0, j)), whole],
                 out_specs=pl.BlockSpec((bt, bn), lambda i, j: (i, j)))
    grid = (pl.cdiv(num_tokens, bt), pl.cdiv(d_out, bn))
    return _call(functools.partial(_projection_kernel, tiles=tiles, num_slots=num_slots, d_in=d_in), grid,
                 jax.ShapeDtypeStruct((num_tokens, d_out), x.dtype), tiles, interpret, "atmm_projection",
                 slot_ids, ranks, xa, x, w, b_pool, **specs)
