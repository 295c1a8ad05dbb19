"""The Pallas GPU kernels through the real Triton lowering (not interpret mode), on a CUDA device.

Skipped, with that reason, where no GPU is present (CI): run them on an accelerator with
`pytest -m gpu tests/pallas_kernels`. Small cases use the test tiles; the workloads `tune` times (the
anchor shapes of BENCHMARKS.md and others) use the tiles calls of their shape run with (this device's
table, else the heuristic), so a tile that cannot launch fails here.
"""
import dataclasses

import jax
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import gpu, tune
from tests.pallas_kernels.cases import (
    CASES,
    GPU_VARIANTS,
    TOLERANCE,
    ranks_outside_the_buffer,
    slots_past_one_sort_step,
)
from tests.pallas_kernels.numpy_reference import as_f64, lora_delta_f64, relative_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU: runs the real Triton lowering"),
]
LORA_ARGS = ("x", "a_pool", "b_pool", "slot_ids", "ranks", "scales")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tiles", GPU_VARIANTS.values(), ids=GPU_VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_small_cases_match_float64(case, tiles, dtype):
    data = case.arrays(dtype)
    delta = pk.batched_lora(*(data[k] for k in LORA_ARGS), base_out=data["base_out"], backend="pallas_gpu",
                            tiles=tiles)
    expected = lora_delta_f64(*(data[k] for k in LORA_ARGS))
    if data["base_out"] is not None:
        expected += as_f64(data["base_out"])
    assert relative_error(delta, expected) <= TOLERANCE[dtype]
    projected = pk.lora_projection(data["x"], data["w"], *(data[k] for k in LORA_ARGS[1:]), backend="pallas_gpu",
                                   tiles=tiles)
    expected = as_f64(data["x"]) @ as_f64(data["w"]) + lora_delta_f64(*(data[k] for k in LORA_ARGS))
    assert relative_error(projected, expected) <= TOLERANCE[dtype]


@pytest.mark.parametrize("tiles", GPU_VARIANTS.values(), ids=GPU_VARIANTS)
def test_ranks_outside_the_buffer_are_clipped_to_it(tiles):
    data, clipped = ranks_outside_the_buffer()
    expected = lora_delta_f64(*(clipped[k] for k in LORA_ARGS))
    delta = pk.batched_lora(*(data[k] for k in LORA_ARGS), backend="pallas_gpu", tiles=tiles)
    assert relative_error(delta, expected) <= TOLERANCE["float32"]


def test_sort_kernel_orders_tokens_by_slot_stably():
    slot_ids, num_slots, expected = slots_past_one_sort_step()
    order = gpu.slot_order(slot_ids, num_slots)
    np.testing.assert_array_equal(order, expected)


def test_projections_of_one_batch_sort_once():
    """Two deltas over one batch's slot ids whose sorting tiles differ, launch settings included, compile
    to one sort: XLA merges their sort custom calls (test_lowering checks that they are identical)."""
    data = CASES[0].arrays("float32")
    lora = [data[k] for k in LORA_ARGS]
    first = GPU_VARIANTS["sorted-split-runs"]
    second = dataclasses.replace(GPU_VARIANTS["sorted-run-walk"], num_stages=first.num_stages + 1)
    projections = jax.jit(lambda *args: [pk.batched_lora(*args, backend="pallas_gpu", tiles=tiles)
                                         for tiles in (first, second)])
    compiled = projections.lower(*lora).compile().as_text()
    assert sum("xla.gpu.triton" in line and "atmm_sort" in line for line in compiled.splitlines()) == 1
    expected = lora_delta_f64(*lora)
    for delta in projections(*lora):
        assert relative_error(delta, expected) <= TOLERANCE["float32"]


@pytest.mark.parametrize("workload", tune.GRID, ids=lambda w: f"T{w.tokens}-r{w.rank}-{w.label}-pool{w.pool}")
def test_tuned_shapes_with_the_tiles_they_run_with(workload):
    """Every workload `tune` times (the anchors, packed prefill, a small pool) with its table entry."""
    data = workload.arrays(seed=0)
    delta = pk.batched_lora(*(data[k] for k in LORA_ARGS), backend="pallas_gpu")
    expected = lora_delta_f64(*(data[k] for k in LORA_ARGS))
    assert relative_error(delta, expected) <= TOLERANCE["bfloat16"]
    projected = pk.lora_projection(data["x"], data["w"], *(data[k] for k in LORA_ARGS[1:]), backend="pallas_gpu")
    expected += as_f64(data["x"]) @ as_f64(data["w"])
    assert relative_error(projected, expected) <= TOLERANCE["bfloat16"]
