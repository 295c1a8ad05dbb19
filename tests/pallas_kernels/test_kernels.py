"""Every backend against the float64 numpy reference, in Pallas interpret mode on CPU.

Interpret mode fills fresh outputs and scratch with NaN, so the finiteness checks also prove that
every output element is written and no unwritten intermediate is read.
"""
import dataclasses

import jax
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import gpu
from tests.pallas_kernels.cases import (
    CASES,
    GPU_VARIANTS,
    TOLERANCE,
    TPU_TILES,
    WHOLE_TILES,
    ranks_outside_the_buffer,
    slots_past_one_sort_step,
)
from tests.pallas_kernels.numpy_reference import as_f64, lora_delta_f64, relative_error

LORA_ARGS = ("x", "a_pool", "b_pool", "slot_ids", "ranks", "scales")
VARIANTS = [  # (backend, tiles, id): the reference, every GPU variant, the TPU kernels
    ("reference", None, "reference"),
    *(("pallas_gpu", tiles, f"gpu-{name}") for name, tiles in GPU_VARIANTS.items()),
    ("pallas_tpu", TPU_TILES, "tpu"),
]
TPU_FUSE_SHRINK = ("pallas_tpu", dataclasses.replace(TPU_TILES, fuse_shrink=True), "tpu-fuse-shrink")


def _variants(variants):
    return pytest.mark.parametrize("backend, tiles", [v[:2] for v in variants], ids=[v[2] for v in variants])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@_variants(VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_batched_lora_matches_float64_reference(case, backend, tiles, dtype):
    data = case.arrays(dtype)
    out = pk.batched_lora(*(data[k] for k in LORA_ARGS), base_out=data["base_out"], backend=backend,
                          interpret=True, tiles=tiles)
    expected = lora_delta_f64(*(data[k] for k in LORA_ARGS))
    if data["base_out"] is not None:
        expected += as_f64(data["base_out"])
    assert out.shape == expected.shape and out.dtype == data["x"].dtype
    assert np.isfinite(as_f64(out)).all()
    assert relative_error(out, expected) <= TOLERANCE[dtype]
    slot_ids = np.asarray(data["slot_ids"])
    no_adapter = (slot_ids < 0) | (slot_ids >= len(case.ranks))
    base = as_f64(data["base_out"]) if data["base_out"] is not None else 0 * expected
    np.testing.assert_array_equal(as_f64(out)[no_adapter], base[no_adapter])


@_variants([*VARIANTS, TPU_FUSE_SHRINK])
def test_ranks_outside_the_buffer_are_clipped_to_it(backend, tiles):
    """A rank past the rank buffer R means R, and a negative one 0, in every kernel as in the reference."""
    data, clipped = ranks_outside_the_buffer()
    expected = lora_delta_f64(*(clipped[k] for k in LORA_ARGS))
    out = pk.batched_lora(*(data[k] for k in LORA_ARGS), backend=backend, interpret=True, tiles=tiles)
    assert relative_error(out, expected) <= TOLERANCE["float32"]
    out = pk.lora_projection(data["x"], data["w"], *(data[k] for k in LORA_ARGS[1:]), backend=backend,
                             interpret=True, tiles=tiles)
    assert relative_error(out, expected + as_f64(data["x"]) @ as_f64(data["w"])) <= TOLERANCE["float32"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@_variants([*VARIANTS, TPU_FUSE_SHRINK])
@pytest.mark.parametrize("case", [c for c in CASES if c.name != "no-adapter"], ids=lambda c: c.name)
def test_lora_projection_matches_float64_reference(case, backend, tiles, dtype):
    data = case.arrays(dtype, seed=1)
    out = pk.lora_projection(data["x"], data["w"], *(data[k] for k in LORA_ARGS[1:]), backend=backend,
                             interpret=True, tiles=tiles)
    expected = as_f64(data["x"]) @ as_f64(data["w"]) + lora_delta_f64(*(data[k] for k in LORA_ARGS))
    assert out.shape == expected.shape and out.dtype == data["x"].dtype
    assert np.isfinite(as_f64(out)).all()
    assert relative_error(out, expected) <= TOLERANCE[dtype]


@_variants([v for v in VARIANTS if v[0] == "pallas_gpu"])
def test_gpu_kernels_on_whole_token_tiles(backend, tiles):
    """Both operations where T is a multiple of block_t, so no row mask exists (float32)."""
    data = WHOLE_TILES.arrays("float32", seed=3)
    assert data["x"].shape[0] % tiles.block_t == 0
    lora = [data[k] for k in LORA_ARGS]
    delta = lora_delta_f64(*lora)
    out = pk.batched_lora(*lora, base_out=data["base_out"], backend=backend, interpret=True, tiles=tiles)
    assert relative_error(out, delta + as_f64(data["base_out"])) <= TOLERANCE["float32"]
    out = pk.lora_projection(data["x"], data["w"], *lora[1:], backend=backend, interpret=True, tiles=tiles)
    assert relative_error(out, delta + as_f64(data["x"]) @ as_f64(data["w"])) <= TOLERANCE["float32"]


def test_sort_kernel_orders_tokens_by_slot_stably():
    """The sort kernel alone, over several comparison steps and a partial last program."""
    slot_ids, num_slots, expected = slots_past_one_sort_step()
    order = gpu.slot_order(slot_ids, num_slots, interpret=True)
    np.testing.assert_array_equal(order, expected)


def test_tpu_projections_of_one_batch_share_the_grouping_sort():
    """The TPU path groups tokens with XLA ops whose sort reads the slot ids alone, so projections of
    one batch with different token tiles compile to one argsort (XLA's CSE, here CPU's). The GPU
    path's sort kernel: test_lowering.py and test_kernels_gpu.py."""
    data = CASES[0].arrays("float32")
    lora = [data[k] for k in LORA_ARGS]
    tiles = (TPU_TILES, dataclasses.replace(TPU_TILES, block_t=2 * TPU_TILES.block_t))
    projections = jax.jit(lambda *args: [pk.batched_lora(*args, backend="pallas_tpu", interpret=True, tiles=each)
                                         for each in tiles])
    compiled = projections.lower(*lora).compile().as_text()
    assert sum(" sort(" in line and "jit(argsort)" in line for line in compiled.splitlines()) == 1
    expected = lora_delta_f64(*lora)
    for delta in projections(*lora):
        assert relative_error(delta, expected) <= TOLERANCE["float32"]

