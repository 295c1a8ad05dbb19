"""Public entry points: validate, pick backend and tiles (static), then run one jitted program.

Shapes and tiles are static; slot ids, ranks and scales are data, so a new adapter mix reuses the
compiled program.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import gpu, reference, tpu
from pallas_kernels.grouping import group_tokens
from pallas_kernels.tiles import ShapeKey, Tiles, call_key, fit, tiles_for

BACKENDS = ("auto", "reference", "pallas_gpu", "pallas_tpu")
INPUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def resolve_backend(backend: str) -> str:
    """'auto' follows the default device: GPU -> pallas_gpu, TPU -> pallas_tpu, else reference."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend(), "reference")


def _expect(name: str, array, shape: tuple, dtype) -> None:
    if array.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, array.shape)):
        wanted = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {wanted}, got {tuple(array.shape)}")
    if jnp.dtype(array.dtype) != jnp.dtype(dtype):
        raise ValueError(f"{name} must have dtype {jnp.dtype(dtype).name}, got {jnp.dtype(array.dtype).name}")


def _validate(x, a_pool, b_pool, slot_ids, ranks, scales, base_out=None, w=None) -> ShapeKey:
    if x.ndim != 2 or jnp.dtype(x.dtype) not in INPUT_DTYPES:
        raise ValueError(f"x must be (T, d_in) bfloat16 or float32, got {tuple(x.shape)} {x.dtype}")
    num_tokens, d_in = x.shape
    if a_pool.ndim != 3:
        raise ValueError(f"a_pool must have shape (N, d_in, R), got {tuple(a_pool.shape)}")
    num_slots, _, rank_buffer = a_pool.shape
    _expect("a_pool", a_pool, (num_slots, d_in, rank_buffer), x.dtype)
    if b_pool.ndim != 3:
        raise ValueError(f"b_pool must have shape (N, R, d_out), got {tuple(b_pool.shape)}")
    d_out = b_pool.shape[2]
    _expect("b_pool", b_pool, (num_slots, rank_buffer, d_out), x.dtype)
    _expect("slot_ids", slot_ids, (num_tokens,), jnp.int32)
    _expect("ranks", ranks, (num_slots,), jnp.int32)
    _expect("scales", scales, (num_slots,), jnp.float32)
    if base_out is not None:
        _expect("base_out", base_out, (num_tokens, d_out), x.dtype)
    if w is not None:
        _expect("w", w, (d_in, d_out), x.dtype)
    return call_key(x.shape, a_pool.shape, b_pool.shape)


def _no_delta(x, a_pool) -> bool:
    """No token, no slot or a rank buffer of 0: every delta is zero and no kernel has work (nor a grid)."""
    return 0 in (x.shape[0], a_pool.shape[0], a_pool.shape[2])


def _tiles(key: ShapeKey, backend: str, tiles: Tiles | None) -> Tiles | None:
    if backend == "reference":
        return None
    return fit(tiles, key, backend) if tiles is not None else tiles_for(key, backend)


@functools.partial(jax.jit, static_argnames=("backend", "tiles", "interpret"))
def _batched_lora(x, a_pool, b_pool, slot_ids, ranks, scales, base_out, *, backend, tiles, interpret):
    if backend == "reference":
        return reference.batched_lora(x, a_pool, b_pool, slot_ids, ranks, scales, base_out)
    if backend == "pallas_gpu":
        return gpu.batched_lora(x, a_pool, b_pool, slot_ids, ranks, scales, base_out, tiles, interpret)
    grouping = group_tokens(slot_ids, a_pool.shape[0], tiles.block_t, include_unadapted=False)
    if base_out is None:
        base_out = jnp.zeros((x.shape[0], b_pool.shape[2]), x.dtype)
    x_sorted = x[jnp.maximum(grouping.row_token, 0)]
    xa = tpu.shrink(x_sorted, a_pool, ranks, scales, grouping, tiles, interpret)
    delta = tpu.expand(xa, b_pool, ranks, grouping, tiles, interpret, jnp.float32)
    delta = jnp.take(delta, grouping.token_row, axis=0, mode="fill", fill_value=0)
    return (base_out.astype(jnp.float32) + delta).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("backend", "tiles", "interpret"))
def _lora_projection(x, w, a_pool, b_pool, slot_ids, ranks, scales, *, backend, tiles, interpret):
    if backend == "reference":
        return reference.lora_projection(x, w, a_pool, b_pool, slot_ids, ranks, scales)
    if backend == "pallas_gpu":
        return gpu.lora_projection(x, w, a_pool, b_pool, slot_ids, ranks, scales, tiles, interpret)
    grouping = group_tokens(slot_ids, a_pool.shape[0], tiles.block_t, include_unadapted=True)
    x_sorted = x[jnp.maximum(grouping.row_token, 0)]
    y_sorted = tpu.projection(x_sorted, w, a_pool, b_pool, ranks, scales, grouping, tiles, interpret)
    return y_sorted[grouping.token_row]


def batched_lora(x, a_pool, b_pool, slot_ids, ranks, scales, *, base_out=None, backend: str = "auto",
                 interpret: bool = False, tiles: Tiles | None = None) -> jax.Array:
    """base_out + scales[i] * (x[t] @ a_pool[i, :, :ranks[i]]) @ b_pool[i, :ranks[i], :] per token t.

    x (T, d_in); a_pool (N, d_in, R); b_pool (N, R, d_out); slot_ids (T,) int32 with -1 (or any
    id outside [0, N)) for no adapter; ranks (N,) int32, taken as clipped to [0, R]; scales (N,)
    float32; base_out (T, d_out) or None for zeros. bfloat16 or float32 inputs, float32
    accumulation, output in x's dtype. `tiles` overrides the tile-table lookup (it is fitted to the
    shape first).
    """
    key = _validate(x, a_pool, b_pool, slot_ids, ranks, scales, base_out=base_out)
    backend = resolve_backend(backend)
    if _no_delta(x, a_pool):
        return jnp.zeros((x.shape[0], b_pool.shape[2]), x.dtype) if base_out is None else base_out
    return _batched_lora(x, a_pool, b_pool, slot_ids, ranks, scales, base_out, backend=backend,
                         tiles=_tiles(key, backend, tiles), interpret=interpret)


def lora_projection(x, w, a_pool, b_pool, slot_ids, ranks, scales, *, backend: str = "auto",
                    interpret: bool = False, tiles: Tiles | None = None) -> jax.Array:
    """x @ w plus every token's LoRA delta (see batched_lora), with the base GEMM and the delta fused
    as the tiles say (the table's fused entries, ShapeKey.fused).

    On GPU a small shrink kernel runs first and the Pallas GEMM carries the expand in its epilogue, so
    y is written once; with tiles.xla_base XLA's GEMM (cuBLAS) runs instead and the delta adds to
    its output. On TPU, with tiles.fuse_shrink, the projection kernel also computes x @ A, so x is
    read once.
    """
    key = dataclasses.replace(_validate(x, a_pool, b_pool, slot_ids, ranks, scales, w=w), fused=True)
    backend = resolve_backend(backend)
    if _no_delta(x, a_pool):
        return reference.dot_f32(x, w).astype(x.dtype)
    return _lora_projection(x, w, a_pool, b_pool, slot_ids, ranks, scales, backend=backend,
                            tiles=_tiles(key, backend, tiles), interpret=interpret)
