"""The kernels lower for real hardware, not only in interpret mode: exported for an abstract H100
(Pallas -> Triton IR) and an abstract TPU (Pallas -> Mosaic), with table-free heuristic tiles at a
7B-class shape, and on TPU with every tile choice (heuristic, tuned table, tune's candidates) at drawn
shapes. This checks the lowering rules (block shapes, layouts, ops), not the device compilers.
"""
import dataclasses

import jax
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax._src import mesh as mesh_lib

from pallas_kernels import api, tune
from pallas_kernels.tiles import ShapeKey, Tiles, TileTable, fit, heuristic

# Known and reported: jax 0.11.2 deprecates the Pallas Triton backend in favour of Mosaic GPU.
pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

TARGETS = {  # backend: (export platform, device kind, custom call)
    "pallas_gpu": ("cuda", "NVIDIA H100 80GB HBM3", "__gpu$xla.gpu.triton"),
    "pallas_tpu": ("tpu", "TPU v5 lite", "tpu_custom_call"),
}


def _kernels(backend: str, fused: bool, tiles) -> list[str]:
    """The pallas_calls one jitted call must contain."""
    if backend == "pallas_gpu":
        if fused and not tiles.xla_base:
            return ["atmm_sort"] * tiles.sort + ["atmm_shrink", "atmm_projection"]
        delta = ["atmm_delta"] if tiles.fuse_shrink else ["atmm_shrink", "atmm_expand"]
        return ["atmm_sort"] * tiles.sort + delta
    return ["atmm_projection"] if fused and tiles.fuse_shrink else ["atmm_shrink", "atmm_expand"]


VARIANTS = [(backend, fused, variant) for backend in TARGETS
            for fused, variant in [(False, None), (True, None), (True, "flipped")]] + [
    ("pallas_gpu", False, "one-kernel"), ("pallas_gpu", True, "one-kernel")]


@pytest.mark.parametrize("backend, fused, variant", VARIANTS,
                         ids=[f"{b}-{'fused' if f else 'delta'}{'-' + v if v else ''}" for b, f, v in VARIANTS])
@pytest.mark.parametrize("tokens, rank", [(32, 16), (512, 256)])
def test_kernels_lower_for_the_accelerator(backend, tokens, rank, fused, variant):
    """Heuristic tiles at both sizes, with the size-dependent choice flipped (GPU: sort, TPU:
    fuse_shrink), and GPU's one-kernel delta (alone and after XLA's base GEMM), so every kernel
    variant lowers."""
    custom_call = TARGETS[backend][2]
    key = ShapeKey.of(tokens, 1024, 2048, rank, 8, fused)
    tiles = heuristic(key, backend)
    if variant == "flipped":
        flipped = "sort" if backend == "pallas_gpu" else "fuse_shrink"
        tiles = dataclasses.replace(tiles, **{flipped: not getattr(tiles, flipped)})
    elif variant == "one-kernel":
        tiles = fit(dataclasses.replace(tiles, fuse_shrink=True, xla_base=fused), key, backend)
    kernels = _kernels(backend, fused, tiles)
    module = _exported_call(key, tiles, backend)
    assert module.count(custom_call) == len(kernels) and all(name in module for name in kernels)


# A tuned TPU table whose entries `fit` must bring to each shape (block sizes a tuner on another shape kept).
TPU_TABLE = TileTable("TPU v5 lite", "pallas_tpu", "0.11.2", {
    ShapeKey.of(16, 4096, 4096, 16, 4): Tiles(16, 1024, 16, 2048, fuse_shrink=True),
    ShapeKey.of(4096, 4096, 11008, 64, 8): Tiles(256, 512, 64, 1024),
    ShapeKey.of(256, 4096, 4096, 256, 16, fused=True): Tiles(64, 2048, 256, 512),
})


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tokens=st.integers(1, 4096), dims=st.sampled_from([(64, 200), (96, 128), (1024, 2048), (4096, 11008)]),
       rank=st.sampled_from([4, 8, 16, 64, 256]), slots=st.integers(1, 16), fused=st.booleans())
def test_every_tpu_tile_choice_respects_the_8_by_128_layout(tokens, dims, rank, slots, fused):
    """Whatever tiles the heuristic, a tuned table or tune's candidates give a shape (bf16, the serving dtype),
    the TPU kernels lower: Pallas's Mosaic lowering refuses a block whose last two dims are not multiples of
    (8, 128) and not the whole array's, naming it. Dims below 128 or not a multiple of it take whole-axis blocks."""
    key = ShapeKey.of(tokens, *dims, rank, slots, fused)
    choices = {heuristic(key, "pallas_tpu"), TPU_TABLE.lookup(key), *tune.candidates(key, "pallas_tpu", limit=4)}
    for tiles in choices:
        assert "tpu_custom_call" in _exported_call(key, tiles, "pallas_tpu"), tiles


def _exported_call(key: ShapeKey, tiles, backend: str) -> str:
    """The delta (batched_lora) or, for a fused key, the projection (lora_projection) at `key`'s shape
    (bf16 operands, `key.adapters` slots), exported for the backend's abstract accelerator."""
    tokens, d_in, d_out, rank, slots = key.tokens, key.d_in, key.d_out, key.rank, key.adapters
    spec = jax.ShapeDtypeStruct
    lora = (spec((slots, d_in, rank), jnp.bfloat16), spec((slots, rank, d_out), jnp.bfloat16),
            spec((tokens,), jnp.int32), spec((slots,), jnp.int32), spec((slots,), jnp.float32))
    static = dict(backend=backend, tiles=tiles, interpret=False)
    if key.fused:
        fn = lambda x, w, *rest: api._lora_projection(x, w, *rest, **static)  # noqa: E731
        args = (spec((tokens, d_in), jnp.bfloat16), spec((d_in, d_out), jnp.bfloat16), *lora)
    else:
        fn = lambda *a: api._batched_lora(*a, **static)  # noqa: E731
        args = (spec((tokens, d_in), jnp.bfloat16), *lora, spec((tokens, d_out), jnp.bfloat16))
    return _exported_module(fn, args, backend)


def _exported_module(fn, args, backend: str) -> str:
    """fn jitted and exported for the backend's abstract accelerator, as StableHLO text."""
    platform, kind, custom_call = TARGETS[backend]
    device = mesh_lib.AbstractDevice(device_kind=kind, num_cores=1, platform=platform)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        exported = jax.export.export(
            jax.jit(fn), platforms=[platform],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(custom_call)])(*args)
    return exported.mlir_module()


def test_projections_of_one_batch_issue_the_same_sort():
    """Two deltas over one batch's slot ids with different sorting tiles (as a model's projections of
    other shapes have) issue the same sort custom call on the same operand, so XLA's CSE can sort once
    per batch; the sort's launch settings used to follow each call's tiles (num_stages 3 and 4 here)."""
    tokens, d_in, d_out, slots, rank = 512, 1024, 2048, 8, 16
    key = ShapeKey.of(tokens, d_in, d_out, rank, slots, False)
    first = fit(dataclasses.replace(heuristic(key, "pallas_gpu"), sort=True, num_stages=3), key, "pallas_gpu")
    second = fit(dataclasses.replace(first, num_stages=4, block_n=first.block_n // 2), key, "pallas_gpu")

    def two_projections(x, *lora):  # from two source lines, as a model's projections are called
        query = api._batched_lora(x, *lora, None, backend="pallas_gpu", tiles=first, interpret=False)
        value = api._batched_lora(x, *lora, None, backend="pallas_gpu", tiles=second, interpret=False)
        return query, value

    spec = jax.ShapeDtypeStruct
    module = _exported_module(two_projections, (
        spec((tokens, d_in), jnp.bfloat16), spec((slots, d_in, rank), jnp.bfloat16),
        spec((slots, rank, d_out), jnp.bfloat16), spec((tokens,), jnp.int32), spec((slots,), jnp.int32),
        spec((slots,), jnp.float32)), "pallas_gpu")

    def calls(kernel):  # each call's op, operands and attributes (the kernel's IR included), not its location
        return [line.split("=", 1)[1].rsplit(" loc(", 1)[0] for line in module.splitlines() if f'"{kernel}"' in line]

    sorts, shrinks = calls("atmm_sort"), calls("atmm_shrink")
    assert len(sorts) == 2 and sorts[0] == sorts[1]
    assert len(shrinks) == 2 and shrinks[0] != shrinks[1]  # the tiles differ where they matter
