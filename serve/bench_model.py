"""Prefill and decode throughput of a preset with random weights: `python -m serve.bench_model`.

Prints a Markdown table (and writes JSON with `--out`): prefill tokens/s, decode tokens/s per batch
size, and each decode step against its byte floor: (weights read per step + KV cache bytes) divided
by a device copy bandwidth measured in the same run. Run it on an accelerator with
`--preset llava-1.5-7b --dtype bfloat16` (any family's preset: `qwen2.5-vl-7b`, ...); on CPU the `tiny`
default finishes in about a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.timing import copy_bandwidth
from valora_jax.config import preset
from valora_jax.generation import Generator, SamplingConfig
from valora_jax.kv_cache import KVCache
from valora_jax.models.registry import build_model


def progress(message: str, start: float = time.perf_counter()) -> None:
    """A line on stderr per phase: a 7B preset spends minutes creating weights and compiling."""
    print(f"[{time.perf_counter() - start:7.1f}s] {message}", file=sys.stderr, flush=True)


def timed(fn, setup, *, repeats: int) -> float:
    """Median seconds of `fn(*setup())` after one warm-up call (compilation excluded). `setup` makes
    fresh arguments outside the timed region: the jitted calls donate their KV cache."""
    jax.block_until_ready(fn(*setup()))
    times = []
    for _ in range(repeats):
        args = jax.block_until_ready(setup())
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_copy_bandwidth(num_bytes: int, *, repeats: int) -> float:
    """Bytes/s (read + write) of a device copy of a `num_bytes` buffer. One copy per loop iteration: a
    1 GiB copy dwarfs any per-iteration cost, and each extra call per iteration would keep another
    buffer of that size alive in the loop carry."""
    return copy_bandwidth(num_bytes, calls=20, repeats=repeats, per_iteration=1)


def prefill_seconds(gen: Generator, graphdef, state, ids: np.ndarray, *, repeats: int, adapters=None) -> float:
    """Median seconds of one jitted prefill of `ids` (rows, tokens), no image, into a fresh cache."""
    mask = np.ones_like(ids, bool)
    return timed(lambda cache: gen.prefill(graphdef, state, ids, None, mask, cache, adapters),
                 lambda: (gen.new_cache(ids.shape[0]),), repeats=repeats)


def decode_seconds(gen: Generator, graphdef, state, batch: int, *, prompt_len: int, new_tokens: int, repeats: int,
                   adapters=None) -> float:
    """Median seconds of a jitted decode loop of `new_tokens - 1` steps for `batch` rows after a
    `prompt_len` prompt. A decode step's work does not depend on the cached values, only on the shapes:
    it starts from a cache marked as holding the prompt instead of compiling a prefill per batch size."""
    cache = dataclasses.replace(
        gen.new_cache(batch), length=jnp.full((batch,), prompt_len, jnp.int32),
        valid=jnp.arange(gen.max_len)[None, :].repeat(batch, 0) < prompt_len,
        next_position=jnp.full((batch,), prompt_len, jnp.int32))
    logits = jnp.zeros((batch, gen.config.text.vocab_size), jnp.float32)

    def decode(cache_copy):
        return gen.decode_loop(graphdef, state, logits, cache_copy, jax.random.key(0), adapters,
                               max_new_tokens=new_tokens, sampling=SamplingConfig(), eos_token_id=-1, pad_token_id=0)

    return timed(decode, lambda: (jax.tree.map(jnp.copy, cache),), repeats=repeats)


def random_model(name: str, dtype, seed: int, *, text_layers: int | None = None) -> nnx.Module:
    """Random weights, created eagerly on the default device (so a 7B preset never passes through host
    memory). Eager, not one jitted init: XLA constant-folds an input-free init program at compile time
    and even with the key as an input compiles it for minutes, while eager ops compile once per shape.
    `text_layers` cuts the language model to that many layers (same widths), to bound compile time."""
    cfg = preset(name)
    if text_layers:
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=text_layers))
    return build_model(cfg, dtype=dtype, rngs=nnx.Rngs(seed))


def decode_weight_bytes(model: nnx.Module) -> int:
    """Bytes of the weights one decode step reads: the language model and the output head."""
    lm = nnx.state(model.language_model, nnx.Param)
    head = nnx.state(model.lm_head, nnx.Param) if model.lm_head is not None else {}
    embed_rows = model.language_model.embed_tokens.embedding
    leaves = jax.tree.leaves(lm) + jax.tree.leaves(head)
    # A decode step reads one embedding row per token, not the whole table (unless it is the tied head).
    table = 0 if model.lm_head is None else embed_rows.nbytes
    return sum(x.nbytes for x in leaves) - table


def run(args) -> list[dict]:
    dtype = jnp.dtype(args.dtype)
    progress(f"creating random {args.preset} weights ({args.dtype}) on {jax.devices()[0].device_kind}")
    model = random_model(args.preset, dtype, args.seed)
    cfg = model.config
    bandwidth = device_copy_bandwidth(args.copy_bytes, repeats=args.repeats)
    rows = []
    rng = np.random.default_rng(args.seed)
    graphdef, state = nnx.split(model)

    progress(f"prefill of {args.prefill_len} tokens (compile, then {args.repeats} timed runs)")
    ids = rng.integers(10, cfg.text.vocab_size, (1, args.prefill_len)).astype(np.int32)
    prefill_gen = Generator(model, max_len=args.prefill_len, min_bucket=args.prefill_len)
    seconds = prefill_seconds(prefill_gen, graphdef, state, ids, repeats=args.repeats)
    rows.append({"phase": "prefill", "batch": 1, "tokens": args.prefill_len, "seconds": seconds,
                 "tokens_per_s": args.prefill_len / seconds})

    weight_bytes = decode_weight_bytes(model)
    for batch in args.batch:
        progress(f"decode at batch {batch} (compile, then {args.repeats} timed runs)")
        gen = Generator(model, max_len=args.prompt_len + args.new_tokens, min_bucket=args.prompt_len)
        seconds = decode_seconds(gen, graphdef, state, batch, prompt_len=args.prompt_len,
                                 new_tokens=args.new_tokens, repeats=args.repeats)
        steps = args.new_tokens - 1
        step_seconds = seconds / steps
        kv_bytes = KVCache.init(cfg.text, batch, gen.max_len, gen.cache_dtype).nbytes()
        floor = (weight_bytes + kv_bytes) / bandwidth
        rows.append({"phase": "decode", "batch": batch, "tokens": batch * steps, "seconds": seconds,
                     "tokens_per_s": batch * steps / seconds, "step_ms": 1e3 * step_seconds,
                     "floor_ms": 1e3 * floor, "step_over_floor": step_seconds / floor})
    meta = {"preset": args.preset, "dtype": args.dtype, "device": str(jax.devices()[0].device_kind),
            "copy_bandwidth_GBps": bandwidth / 1e9, "decode_weight_GB": weight_bytes / 1e9}
    return [dict(meta, **row) for row in rows]


def markdown(rows: list[dict]) -> str:
    head = rows[0]
    lines = [f"{head['preset']} {head['dtype']} on {head['device']}; copy bandwidth "
             f"{head['copy_bandwidth_GBps']:.1f} GB/s; decode reads {head['decode_weight_GB']:.3f} GB of weights",
             "", "| phase | batch | tokens/s | step ms | byte-floor ms | step / floor |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        step = f"{r['step_ms']:.2f}" if "step_ms" in r else "-"
        floor = f"{r['floor_ms']:.2f}" if "floor_ms" in r else "-"
        ratio = f"{r['step_over_floor']:.2f}x" if "step_over_floor" in r else "-"
        lines.append(f"| {r['phase']} | {r['batch']} | {r['tokens_per_s']:.1f} | {step} | {floor} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (tiny, llava-1.5-7b, llava-1.5-13b, qwen2-vl-2b, qwen2-vl-7b, "
                   "qwen2.5-vl-3b, qwen2.5-vl-7b)")
    p.add_argument("--dtype", default="float32", help="parameter and cache dtype (bfloat16 on accelerators)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="decode batch sizes")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens before decoding")
    p.add_argument("--new-tokens", type=int, default=33, help="tokens generated per row (decode steps + 1)")
    p.add_argument("--prefill-len", type=int, default=2048, help="tokens in the prefill measurement")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--copy-bytes", type=int, default=1 << 30, help="buffer size of the bandwidth measurement (past the last-level cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, help="directory for bench_model.json and bench_model.md")
    args = p.parse_args(argv)
    rows = run(args)
    table = markdown(rows)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_model.json").write_text(json.dumps(rows, indent=2))
        (args.out / "bench_model.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
