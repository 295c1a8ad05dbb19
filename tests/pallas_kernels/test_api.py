"""Argument checking, backend resolution, and no recompiles across adapter mixes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import api
from tests.pallas_kernels.cases import GPU_TILES, TPU_TILES


def _args(T=8, d_in=32, d_out=48, N=3, R=4, dtype=jnp.float32):
    return dict(x=jnp.ones((T, d_in), dtype), a_pool=jnp.ones((N, d_in, R), dtype),
                b_pool=jnp.ones((N, R, d_out), dtype), slot_ids=jnp.zeros((T,), jnp.int32),
                ranks=jnp.full((N,), R, jnp.int32), scales=jnp.ones((N,), jnp.float32))


@pytest.mark.parametrize("name, bad, message", [
    ("x", jnp.ones((8,), jnp.float32), "x must be"),
    ("x", jnp.ones((8, 32), jnp.float16), "x must be"),
    ("a_pool", jnp.ones((3, 31, 4)), r"a_pool must have shape \(3, 32, 4\), got \(3, 31, 4\)"),
    ("a_pool", jnp.ones((3, 32, 4), jnp.bfloat16), "a_pool must have dtype float32, got bfloat16"),
    ("b_pool", jnp.ones((2, 4, 48)), r"b_pool must have shape \(3, 4, 48\)"),
    ("slot_ids", jnp.zeros((7,), jnp.int32), r"slot_ids must have shape \(8\)"),
    ("slot_ids", jnp.zeros((8,), jnp.float32), "slot_ids must have dtype int32"),
    ("ranks", jnp.zeros((4,), jnp.int32), r"ranks must have shape \(3\)"),
    ("scales", jnp.ones((3,), jnp.bfloat16), "scales must have dtype float32"),
])
def test_mismatched_arguments_name_the_argument(name, bad, message):
    args = _args() | {name: bad}
    with pytest.raises(ValueError, match=message):
        pk.batched_lora(**args, backend="reference")


def test_base_out_and_w_are_checked():
    with pytest.raises(ValueError, match=r"base_out must have shape \(8, 48\)"):
        pk.batched_lora(**_args(), base_out=jnp.zeros((8, 47)), backend="reference")
    with pytest.raises(ValueError, match=r"w must have shape \(32, 48\)"):
        pk.lora_projection(w=jnp.zeros((48, 32)), **_args(), backend="reference")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        pk.batched_lora(**_args(), backend="cuda")


def test_auto_backend_follows_the_default_device():
    expected = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend(), "reference")
    assert pk.resolve_backend("auto") == expected


@pytest.mark.parametrize("backend, tiles", [("pallas_gpu", GPU_TILES), ("pallas_tpu", TPU_TILES)])
def test_new_adapter_mixes_do_not_recompile(backend, tiles):
    rng = np.random.default_rng(0)
    T, N = 13, 5  # a shape no other test uses, so the first call must compile
    args = _args(T=T, d_in=128, d_out=128, N=N, R=16)
    mixes = [np.full(T, -1), rng.integers(-1, N, T), np.arange(T) % N, np.full(T, 2)]
    before = api._batched_lora._cache_size()
    outs = []
    for ranks, mix in zip(([16] * N, [1, 2, 3, 4, 5], [16, 0, 8, 8, 2], [4] * N), mixes):
        call = args | dict(slot_ids=jnp.asarray(mix, jnp.int32), ranks=jnp.asarray(ranks, jnp.int32))
        outs.append(pk.batched_lora(**call, backend=backend, interpret=True, tiles=tiles))
    assert api._batched_lora._cache_size() == before + 1
    assert not np.array_equal(outs[1], outs[2])  # the mixes really differed


@pytest.mark.parametrize("backend", ["reference", "pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("T, N, R", [(0, 3, 4), (8, 0, 4), (8, 3, 0), (0, 0, 0)])
def test_shapes_without_any_delta_return_the_base(backend, T, N, R):
    """No tokens (an empty batch), no slots or a rank buffer of 0: base_out (or zeros), and x @ w."""
    rng = np.random.default_rng(T + N + R)
    args = _args(T=T, N=N, R=R) | {"x": jnp.asarray(rng.standard_normal((T, 32)), jnp.float32),
                                   "slot_ids": jnp.asarray(rng.integers(-1, max(N, 1), T), jnp.int32)}
    base = jnp.asarray(rng.standard_normal((T, 48)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((32, 48)), jnp.float32)
    kw = {"backend": backend, "interpret": True}
    np.testing.assert_array_equal(pk.batched_lora(**args, **kw), np.zeros((T, 48), np.float32))
    np.testing.assert_array_equal(pk.batched_lora(**args, base_out=base, **kw), base)
    expected = np.asarray(args["x"], np.float64) @ np.asarray(w, np.float64)
    np.testing.assert_allclose(pk.lora_projection(w=w, **args, **kw), expected, rtol=1e-5, atol=1e-5)
