"""Device timing without host launch gaps: many calls inside one jitted loop, captured as a CUDA graph.

Each loop iteration makes at least `per_iteration` calls, in passes over the input copies; the
copies together are sized past the last-level cache, so weights stream from memory as in serving
rather than sitting in L2. Every call's inputs pass through an optimization barrier together with the
previous call's output, so XLA can neither hoist a loop-invariant call nor merge two identical ones,
and every output rides in the loop carry so no call is dead code (a first version kept only the last
pass's outputs, and XLA dropped the other passes: check that the copy bandwidth stays physical).

Why graphs and unrolling: XLA's GPU while loop copies its predicate to the host every iteration and
launches each kernel from the host, so a one-kernel call timed about 7 us per iteration on an H100
however little it did. `use_cuda_graphs()` (call it before JAX touches the GPU) sets XLA flags that
capture the whole loop, kernels, cuBLAS and Pallas custom calls included, in a command buffer (a CUDA
graph whose while loop runs on the device), as vLLM's figures were taken by CUDA-graph replay;
several calls per iteration amortize whatever per-iteration cost remains. The same method times every column of a
benchmark (kernels, stock formulations, base GEMM), and `one_kernel_seconds` reports its floor: the
time of a call that does almost nothing.

    python -m pallas_kernels.timing [--no-graphs] [--per-iteration N]   # this device's floor and copy rate
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

L2_BYTES = 64 * 2**20  # a bit above an H100's 50 MiB L2; also covers TPU CMEM-less parts
PER_ITERATION = 8  # calls per loop iteration, at least
GRAPH_FLAGS = ("--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL",
               "--xla_gpu_graph_min_graph_size=1")


def use_cuda_graphs() -> None:
    """Add GRAPH_FLAGS to XLA_FLAGS. XLA reads them when the GPU backend starts, so call this before
    the first computation; flags that this XLA did not know would abort the process there."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join(flags + [f for f in GRAPH_FLAGS if f not in flags])


def add_loop_arguments(parser: argparse.ArgumentParser) -> None:
    """--calls, --per-iteration and --no-graphs, as bench and tune take them (`apply_loop_arguments`)."""
    parser.add_argument("--calls", type=int, default=None, help="iterations per timed loop")
    parser.add_argument("--per-iteration", type=int, default=None,
                        help=f"calls per iteration (default {PER_ITERATION}; 1 with --quick)")
    parser.add_argument("--no-graphs", action="store_true", help="launch kernels from the host (no CUDA graph)")


def apply_loop_arguments(args: argparse.Namespace, *, calls: int, quick_calls: int) -> None:
    """Fill in --calls and --per-iteration where not given, and turn CUDA graphs on unless --no-graphs
    (before the first computation). --quick (CPU) times nothing that means anything: one call per
    iteration keeps its loops small to compile."""
    args.calls = args.calls or (quick_calls if args.quick else calls)
    args.per_iteration = args.per_iteration or (1 if args.quick else PER_ITERATION)
    if not args.no_graphs:
        use_cuda_graphs()


def copies_past_cache(bytes_per_copy: int, max_copies: int = 8) -> int:
    """How many input copies to rotate through so that their total exceeds twice the L2 size."""
    return max(1, min(max_copies, -(-2 * L2_BYTES // max(bytes_per_copy, 1))))


def timed_loop(fn: Callable, arg_copies: Sequence[tuple], *, calls: int,
               per_iteration: int = PER_ITERATION) -> Callable[[int], float]:
    """Compile and warm one jitted loop of `calls` iterations of `fn`; the returned function runs it
    `repeats` times and gives the best time per call of `fn`. Kept, a loop can be timed again later
    without compiling again (tune's finalists, timed in turn)."""
    out_shapes = jax.eval_shape(fn, *arg_copies[0])
    passes = -(-per_iteration // len(arg_copies))

    def loop(copies):
        def body(step, carry):
            # Every call's output stays in the carry, and passes through the barrier in front of the
            # next call: no call is dead, and no two calls see the same barrier inputs (which XLA
            # could merge). An output used by nothing would be dropped with its call.
            previous, outputs = carry[-1], []
            for _ in range(passes):
                for args in copies:
                    _, previous, args = lax.optimization_barrier((step, previous, args))
                    outputs.append(previous)
                    previous = fn(*args)
            return (*outputs[1:], previous)

        init = tuple(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shapes)
                     for _ in range(passes * len(copies)))
        return lax.fori_loop(0, calls, body, init)

    program = jax.jit(loop).lower(arg_copies).compile()
    jax.block_until_ready(program(arg_copies))

    def best_of(repeats: int = 3) -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(program(arg_copies))
            best = min(best, time.perf_counter() - start)
        return best / (calls * passes * len(arg_copies))

    return best_of


def seconds_per_call(fn: Callable, arg_copies: Sequence[tuple], *, calls: int, repeats: int = 3,
                     per_iteration: int = PER_ITERATION) -> float:
    """Best-of-`repeats` wall time of one jitted loop of `calls` iterations, per call of `fn`."""
    return timed_loop(fn, arg_copies, calls=calls, per_iteration=per_iteration)(repeats)


def one_kernel_seconds(*, calls: int, repeats: int = 3, per_iteration: int = PER_ITERATION) -> float:
    """The harness's floor: a call of one tiny elementwise kernel (a + 1 on 4 KB), three input
    copies as at decode."""
    tiny = [(jnp.full((8, 128), float(i)),) for i in range(3)]
    return seconds_per_call(lambda a: a + 1.0, tiny, calls=calls, repeats=repeats, per_iteration=per_iteration)


def copy_bandwidth(num_bytes: int, *, calls: int, repeats: int = 3, per_iteration: int = PER_ITERATION) -> float:
    """Bytes/s of an elementwise copy (read + write) of a `num_bytes` buffer, measured like kernels."""
    buffer = jnp.zeros((num_bytes // 4,), jnp.float32)
    seconds = seconds_per_call(lambda a: a + 1.0, [(buffer,)], calls=calls, repeats=repeats,
                               per_iteration=per_iteration)
    return 2 * buffer.nbytes / seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-graphs", action="store_true", help="launch from the host (no CUDA graph)")
    parser.add_argument("--per-iteration", type=int, default=PER_ITERATION, help="calls per loop iteration")
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    if not args.no_graphs:
        use_cuda_graphs()
    result = {"graphs": not args.no_graphs, "per_iteration": args.per_iteration,
              "one_kernel_us": 1e6 * one_kernel_seconds(calls=args.calls, per_iteration=args.per_iteration),
              "copy_GBps": copy_bandwidth(2**30 if jax.default_backend() == "gpu" else 2**20, calls=args.calls // 4,
                                          per_iteration=args.per_iteration) / 1e9}
    print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
