"""Device timing without Python launch gaps: many calls inside one jitted loop.

Each loop iteration calls the function once per input copy; the copies together are sized past the
last-level cache, so weights stream from memory as in serving rather than sitting in L2. An
optimization barrier on the loop counter stops XLA from hoisting the loop-invariant calls, and the
outputs ride in the loop carry so no call is dead code.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

L2_BYTES = 64 * 2**20  # a bit above an H100's 50 MiB L2; also covers TPU CMEM-less parts


def copies_past_cache(bytes_per_copy: int, max_copies: int = 8) -> int:
    """How many input copies to rotate through so that their total exceeds twice the L2 size."""
    return max(1, min(max_copies, -(-2 * L2_BYTES // max(bytes_per_copy, 1))))


def seconds_per_call(fn: Callable, arg_copies: Sequence[tuple], *, calls: int, repeats: int = 3) -> float:
    """Best-of-`repeats` wall time of one jitted loop of `calls` x len(arg_copies) calls, per call."""
    out_shapes = jax.eval_shape(fn, *arg_copies[0])

    def loop(copies):
        def body(step, carry):
            outputs = []
            for args in copies:
                _, args = lax.optimization_barrier((step, args))
                outputs.append(fn(*args))
            return tuple(outputs)

        init = tuple(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shapes) for _ in copies)
        return lax.fori_loop(0, calls, body, init)

    program = jax.jit(loop)
    jax.block_until_ready(program(arg_copies))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(program(arg_copies))
        best = min(best, time.perf_counter() - start)
    return best / (calls * len(arg_copies))


def copy_bandwidth(num_bytes: int, *, calls: int, repeats: int = 3) -> float:
    """Bytes/s of an elementwise copy (read + write) of a `num_bytes` buffer, measured like kernels."""
    buffer = jnp.zeros((num_bytes // 4,), jnp.float32)
    seconds = seconds_per_call(lambda a: a + 1.0, [(buffer,)], calls=calls, repeats=repeats)
    return 2 * buffer.nbytes / seconds
