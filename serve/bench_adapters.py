"""What serving many adapters costs, on a preset with random weights: `python -m serve.bench_adapters`.

One `AdapterPool` (a slot per adapter, rank buffer `--max-rank`, default the rank) holds random LoRA
adapters of rank `--rank` on the language model's 7 projections, saved with `save_adapter` and loaded as a
user would. The pool's sites are those projections only (`targets`, `serial=False`): with its default
sites it would also run each attention block's Serial LoRA kernel for every row. In one run, for a batch
of `--batch` rows using 1, 4 and 16 distinct adapters (row i reads adapter i mod n):
- the decode step (after a `--prompt-len` prompt) and a prefill of `--prefill-len` tokens per row,
  unmerged and in mixture mode, each as a ratio to the base model's step (same batch, `adapters=None`).
  Mixture: adapter_0, which every batch uses, is merged; its rows read nothing, every other row adds its
  own delta and subtracts adapter_0's.
- switching: `pool.merge` of one adapter and `pool.unmerge()` (every layer), each against the byte floor
  of one pass over the weights: read and write every adapted weight once and read the adapter, at a
  device copy bandwidth measured in the same run (BENCHMARKS.md's definition; merge followed by unmerge
  makes two such passes); and the switch from one merged adapter to another (`pool.switch`, one pass that
  adds the new delta and subtracts the old, reading both adapters), the operation the target is about.
  Also the pool's exact restore of the original weights from its host copy, which replaces every
  `restore_every`-th switch away from a merged adapter (host-to-device transfer: no device floor). The
  pool's `restore_every` exceeds the timed switches, so none of them includes a restore.
Then the issue's GPU targets and whether they are met (on a CPU they are no target). A measurement that
fails is reported in its row and the run exits with status 1; nothing is skipped.

Jitted steps are timed after a compiling warm-up call, blocked on their results, median of `--repeats`.
Prints Markdown tables (progress on stderr); `--out DIR` writes bench_adapters.json and bench_adapters.md.
On a GPU: `--preset llava-1.5-7b --dtype bfloat16` (random weights, no checkpoint needed).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from serve.bench_model import decode_seconds, device_copy_bandwidth, prefill_seconds, progress, random_model, timed
from valora_jax.adapters import AdapterConfig, attach, detach, save_adapter
from valora_jax.adapters.attach import module_path
from valora_jax.adapters.config import PROJECTION_TARGETS
from valora_jax.adapters.pool import AdapterPool
from valora_jax.generation import Generator
from valora_jax.layers import Linear

# The language model's 7 projections (the vision tower also has q/k/v_proj, so names alone would not do).
LM_PROJECTIONS = rf"language_model\..*\.({'|'.join(PROJECTION_TARGETS)})"
MERGED = "adapter_0"
MODES = ("base", "unmerged", "mixture")
PHASES = ("decode", "prefill")
# Issue 24's targets on a GPU.
DECODE_TARGET = {"adapters": 4, "rank": 16, "ratio": 1.15}
SWITCH_TARGET = 1.5
SWITCH = "switch (one merged adapter to another)"


def adapter_name(i: int) -> str:
    return f"adapter_{i}"


def save_random_adapters(model, count: int, rank: int, seed: int, directory: pathlib.Path) -> list[pathlib.Path]:
    """`count` random LoRA adapters of `rank` on LM_PROJECTIONS, each saved with `save_adapter`. A as
    `attach` initialises it, B normal(0, 0.01) (LoRA's initial B = 0 would make every delta zero)."""
    config = AdapterConfig(kind="lora", rank=rank, alpha=2.0 * rank, targets=PROJECTION_TARGETS)
    paths = []
    for i in range(count):
        loras = attach(model, config, nnx.Rngs(seed + i))
        keys = jax.random.split(jax.random.key(seed + i), len(loras))
        for key, lora in zip(keys, loras.values()):
            lora.B.set_value(0.01 * jax.random.normal(key, lora.B.shape, lora.B.dtype))
        paths.append(directory / adapter_name(i))
        save_adapter(model, paths[-1])
        detach(model)
    return paths


def switch_bytes(model, rank: int) -> tuple[int, int]:
    """(bytes of every adapted weight, bytes of one adapter's factors in the model's dtype)."""
    sites = [m for p, m in nnx.iter_modules(model)
             if isinstance(m, Linear) and re.fullmatch(LM_PROJECTIONS, module_path(p))]
    weights = sum(m.kernel[...].nbytes for m in sites)
    adapter = sum(rank * (m.in_features + m.out_features) * m.kernel[...].dtype.itemsize for m in sites)
    return weights, adapter


def measure(row: dict, fn) -> dict:
    """`row` with the fields `fn()` returns, or with the error it raised: reported, never skipped."""
    try:
        row.update(fn())
    except Exception as err:  # one failed case must not cost the others' measurements (a GPU run is short)
        traceback.print_exc()
        row["error"] = f"{type(err).__name__}: {err}"
        progress(f"{row['phase']} {row.get('mode', '')} failed: {row['error']}")
    return row


def run(args) -> dict:
    backend = jax.default_backend()
    device = str(jax.devices()[0].device_kind)
    counts = sorted(set(args.adapters))
    if counts[0] < 1 or counts[-1] > args.batch:
        raise SystemExit(f"bench_adapters: --adapters must lie in 1..--batch ({args.batch}), got {args.adapters}")
    max_rank = args.max_rank or args.rank
    copy_bytes = args.copy_bytes or (1 << 30 if backend != "cpu" else 1 << 26)
    progress(f"creating random {args.preset} weights ({args.dtype}) on {device}")
    model = random_model(args.preset, jnp.dtype(args.dtype), args.seed, text_layers=args.text_layers)
    bandwidth = device_copy_bandwidth(copy_bytes, repeats=args.repeats)

    progress(f"creating {counts[-1]} random rank-{args.rank} LoRA adapters and loading them into the pool")
    with tempfile.TemporaryDirectory() as tmp:
        paths = save_random_adapters(model, counts[-1], args.rank, args.seed, pathlib.Path(tmp))
        pool = AdapterPool(model, slots=counts[-1], max_rank=max_rank, targets=LM_PROJECTIONS, serial=False,
                           restore_every=max(32, 4 * (args.repeats + 2)))
        for i, path in enumerate(paths):
            pool.load(adapter_name(i), path)

    ids = np.random.default_rng(args.seed).integers(10, model.config.text.vocab_size, (args.batch, args.prefill_len),
                                                    dtype=np.int32)
    decode_gen = Generator(model, max_len=args.prompt_len + args.new_tokens, min_bucket=args.prompt_len)
    prefill_gen = Generator(model, max_len=args.prefill_len, min_bucket=args.prefill_len)

    def step_ms(phase: str, mode: str, count: int) -> dict:
        selection = None
        if mode != "base":
            if mode == "mixture" and pool.merged is None:
                pool.merge(MERGED)
            if mode == "unmerged":
                pool.unmerge()
            selection = pool.select([adapter_name(i % count) for i in range(args.batch)])
        graphdef, state = nnx.split(model)  # after select and merge: the slots and weights they wrote
        if phase == "decode":
            seconds = decode_seconds(decode_gen, graphdef, state, args.batch, prompt_len=args.prompt_len,
                                     new_tokens=args.new_tokens, repeats=args.repeats, adapters=selection)
            return {"ms": 1e3 * seconds / (args.new_tokens - 1)}
        return {"ms": 1e3 * prefill_seconds(prefill_gen, graphdef, state, ids,
                                            repeats=args.repeats, adapters=selection)}

    rows = []
    for mode in MODES:
        for count in ([0] if mode == "base" else counts):
            for phase in PHASES:
                progress(f"{phase}, {mode}, {count} distinct adapters (compile, then {args.repeats} timed runs)")
                rows.append(measure({"phase": phase, "mode": mode, "adapters": count},
                                    lambda phase=phase, mode=mode, count=count: step_ms(phase, mode, count)))
    for row in rows:
        base = next(r for r in rows if r["phase"] == row["phase"] and r["mode"] == "base")
        if row["mode"] != "base" and "ms" in row and "ms" in base:
            row["over_base"] = row["ms"] / base["ms"]

    weight_bytes, adapter_bytes = switch_bytes(model, args.rank)
    floor_ms = 1e3 * (2 * weight_bytes + adapter_bytes) / bandwidth

    def switch() -> dict:
        pool.unmerge()
        times = []
        for _ in range(args.repeats + 1):  # the first: compilation and the host copy of the original weights
            start = time.perf_counter()
            pool.merge(MERGED)
            jax.block_until_ready(nnx.state(model))
            middle = time.perf_counter()
            pool.unmerge()
            jax.block_until_ready(nnx.state(model))
            times.append((middle - start, time.perf_counter() - middle))
        ms = lambda seconds: 1e3 * statistics.median(seconds)
        if counts[-1] < 2:
            raise ValueError("switching between merged adapters needs two adapters (--adapters up to 2 or more)")
        pool.switch(MERGED)
        direct = []
        for i in range(2 * (args.repeats + 1)):  # the first two compile (one program per direction)
            start = time.perf_counter()
            pool.switch(adapter_name(1) if i % 2 == 0 else MERGED)
            jax.block_until_ready(nnx.state(model))
            direct.append(time.perf_counter() - start)
        pool.unmerge()
        return {"merge": ms(m for m, _ in times[1:]), "unmerge": ms(u for _, u in times[1:]),
                "merge + unmerge": ms(m + u for m, u in times[1:]), SWITCH: ms(direct[2:])}

    progress(f"switch: merge + unmerge of {MERGED}, then switches between it and {adapter_name(1)}, {args.repeats} "
             "timed after a warm-up")
    switch_ms = measure({"phase": "switch"}, switch)
    for name in ("merge", "unmerge", "merge + unmerge", SWITCH):
        row = {"phase": name, "floor_ms": floor_ms + (1e3 * adapter_bytes / bandwidth if name == SWITCH else 0.0)}
        if "error" in switch_ms:
            row["error"] = switch_ms["error"]
        else:
            row.update(ms=switch_ms[name], over_floor=switch_ms[name] / row["floor_ms"])
        rows.append(row)
    restore = {"phase": f"restore (every {pool.restore_every} unmerges)"}
    if "error" in switch_ms:  # nothing merged: nothing to restore
        restore["error"] = switch_ms["error"]
    else:
        progress(f"restore of the original weights from the host copy, {args.repeats} timed after a warm-up")
        measure(restore, lambda: {"ms": 1e3 * timed(lambda: (pool.restore(), nnx.state(model))[1], lambda: (),
                                                    repeats=args.repeats)})
    rows.append(restore)

    meta = {"preset": args.preset, "text_layers": model.config.text.num_hidden_layers, "dtype": args.dtype,
            "device": device, "platform": backend, "kernel_backend": pool.backend, "rank": args.rank,
            "max_rank": max_rank, "slots": pool.num_slots,
            "batch": args.batch, "prompt_len": args.prompt_len, "prefill_len": args.prefill_len,
            "decode_steps": args.new_tokens - 1, "repeats": args.repeats, "copy_bandwidth_GBps": bandwidth / 1e9,
            "adapted_weight_GB": weight_bytes / 1e9, "adapter_MB": adapter_bytes / 1e6}
    return {"meta": meta, "rows": rows, "targets": targets(rows, meta)}


def targets(rows: list[dict], meta: dict) -> list[dict]:
    """Issue 24's GPU targets: the value measured here and whether it is met (None: not measured, or no
    GPU, where `status` says why)."""
    decode = next((r for r in rows if (r["phase"], r.get("mode"), r.get("adapters")) ==
                   ("decode", "unmerged", DECODE_TARGET["adapters"])), None)
    switch = next(r for r in rows if r["phase"] == SWITCH)
    found = [
        {"target": f"decode step with {DECODE_TARGET['adapters']} distinct rank-{DECODE_TARGET['rank']} adapters "
                   f"(unmerged) <= {DECODE_TARGET['ratio']}x the base step",
         "value": decode.get("over_base") if decode else None, "bound": DECODE_TARGET["ratio"],
         "unmeasured": ("--adapters has no 4" if decode is None else
                        f"the run's rank is {meta['rank']}" if meta["rank"] != DECODE_TARGET["rank"] else
                        decode.get("error"))},
        {"target": f"{SWITCH} <= {SWITCH_TARGET}x its byte floor", "value": switch.get("over_floor"),
         "bound": SWITCH_TARGET, "unmeasured": switch.get("error")},
    ]
    for t in found:
        unmeasured = t.pop("unmeasured")
        met = t["value"] is not None and t["value"] <= t["bound"]
        t["met"] = met if meta["platform"] == "gpu" and not unmeasured else None
        t["status"] = (f"not measured ({unmeasured})" if unmeasured else
                       f"{meta['platform'].upper()}: not a target" if meta["platform"] != "gpu" else
                       "met" if met else "NOT met")
    return found


def markdown(result: dict) -> str:
    m = result["meta"]
    ms = lambda r: f"failed: {r['error']}" if "error" in r else f"{r['ms']:.3f}"
    ratio = lambda r, key: f"{r[key]:.3f}x" if key in r else "-"
    lines = [f"{m['preset']} ({m['text_layers']} language-model layers) {m['dtype']} on {m['device']} "
             f"({m['kernel_backend']} kernels); random LoRA rank "
             f"{m['rank']} on the language model's 7 projections, pool of {m['slots']} slots, rank buffer "
             f"{m['max_rank']}; batch {m['batch']}: decode step after a {m['prompt_len']}-token prompt "
             f"(mean of {m['decode_steps']} steps), prefill of {m['prefill_len']} tokens per row; median of "
             f"{m['repeats']}; copy bandwidth {m['copy_bandwidth_GBps']:.1f} GB/s",
             "", "| phase | mode | distinct adapters | ms | / base |", "| --- | --- | --- | --- | --- |"]
    steps = [r for r in result["rows"] if "mode" in r]
    lines += [f"| {r['phase']} | {r['mode']} | {r['adapters'] or '-'} | {ms(r)} | {ratio(r, 'over_base')} |"
              for r in steps]
    lines += ["", f"Switching {MERGED} ({m['adapted_weight_GB']:.3f} GB of adapted weights, adapter "
                  f"{m['adapter_MB']:.2f} MB); byte floor: one read and write of every adapted weight and one "
                  "read of the adapter (two adapters for a switch between merged adapters)", "",
              "| operation | ms | byte floor ms | / floor |", "| --- | --- | --- | --- |"]
    for r in result["rows"][len(steps):]:
        floor = f"{r['floor_ms']:.3f}" if "floor_ms" in r else "-"
        lines.append(f"| {r['phase']} | {ms(r)} | {floor} | {ratio(r, 'over_floor')} |")
    lines += ["", "Targets (issue 24, on a GPU):"]
    for t in result["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.3f}x"
        lines.append(f"- {t['target']}: {value}, {t['status']}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (tiny, llava-1.5-7b, llava-1.5-13b)")
    p.add_argument("--dtype", default="float32", help="parameter and cache dtype (bfloat16 on accelerators)")
    p.add_argument("--text-layers", type=int, default=None,
                   help="cut the language model to this many layers (same widths; default: the preset's)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of every adapter")
    p.add_argument("--max-rank", type=int, default=None, help="the pool's rank buffer R (default: --rank)")
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16],
                   help="distinct adapters per batch, one case each; the pool has a slot for the largest")
    p.add_argument("--batch", type=int, default=16, help="rows per batch (at least the largest --adapters)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens before the decode steps")
    p.add_argument("--new-tokens", type=int, default=9, help="tokens generated per row (decode steps + 1)")
    p.add_argument("--prefill-len", type=int, default=32, help="prompt tokens per row in the prefill measurement")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--copy-bytes", type=int, default=None,
                   help="buffer size of the bandwidth measurement (default 1 GiB, past the last-level cache; "
                        "64 MiB on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, help="directory for bench_adapters.json and bench_adapters.md")
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.repeats < 1:
        p.error("--new-tokens must be at least 2 (one decode step) and --repeats at least 1")
    result = run(args)
    table = markdown(result)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_adapters.json").write_text(json.dumps(result, indent=2))
        (args.out / "bench_adapters.md").write_text(table + "\n")
    failed = [r for r in result["rows"] if "error" in r]
    if failed:
        raise SystemExit(f"bench_adapters: {len(failed)} measurement(s) failed (see their rows)")
    return result


if __name__ == "__main__":
    main()
