"""Every backend against the float64 numpy reference, in Pallas interpret mode on CPU.

Interpret mode fills fresh outputs and scratch with NaN, so the finiteness checks also prove that
every output element is written and no unwritten intermediate is read.
"""
import dataclasses

import numpy as np
import pytest

import pallas_kernels as pk
from tests.pallas_kernels.cases import (
    CASES,
    GPU_VARIANTS,
    TOLERANCE,
    TPU_TILES,
    ranks_outside_the_buffer,
)
from tests.pallas_kernels.numpy_reference import as_f64, lora_delta_f64, relative_error

LORA_ARGS = ("x", "a_pool", "b_pool", "slot_ids", "ranks", "scales")
VARIANTS = [  # (backend, tiles, id): the reference, every GPU variant, the TPU kernels
    ("reference", None, "reference"),
    *(("pallas_gpu", tiles, f"gpu-{name}") for name, tiles in GPU_VARIANTS.items()),
    ("pallas_tpu", TPU_TILES, "tpu"),
]
# one_launch applies to the projection only after XLA's base GEMM: without xla_base a variant would
# repeat its twin without one_launch.
TPU_FUSE_SHRINK = ("pallas_tpu", dataclasses.replace(TPU_TILES, fuse_shrink=True), "tpu-fuse-shrink")
PROJECTION_VARIANTS = [v for v in VARIANTS if v[1] is None or v[1].xla_base or not v[1].one_launch] + [TPU_FUSE_SHRINK]


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
@_variants(PROJECTION_VARIANTS)
@pytest.mark.parametrize("case", [c for c in CASES if c.name != "no-adapter"], ids=lambda c: c.name)
def test_lora_projection_matches_float64_reference(case, backend, tiles, dtype):
    data = case.arrays(dtype, seed=1)
    out = pk.lora_projection(data["x"], data["w"], *(data[k] for k in LORA_ARGS[1:]), backend=backend,
                             interpret=True, tiles=tiles)
    expected = as_f64(data["x"]) @ as_f64(data["w"]) + lora_delta_f64(*(data[k] for k in LORA_ARGS))
    assert out.shape == expected.shape and out.dtype == data["x"].dtype
    assert np.isfinite(as_f64(out)).all()
    assert relative_error(out, expected) <= TOLERANCE[dtype]
