"""`python -m serve.bench_engine`: a fixed mixed-adapter workload through the engine under every policy,
against the same requests run one adapter at a time with the plain `Generator`.

The workload (`serve.workload`: Poisson arrivals, skewed adapter popularity, prompt and output lengths
drawn and capped) replays in real time: each request is submitted at its arrival and the engine loop
runs in its thread. Per policy: requests/s and output tokens/s over the run, time to first token and
per-output-token latency (p50, p99), average token latency (VaLoRA's: request latency / tokens), mode
switches. The baseline serves the same requests grouped by adapter (attached with `load_adapter`), in
batches of the engine's slot count, back to back with no arrivals to wait for; its throughput is the
ratio's denominator (measured in the same run).

Defaults run the embedded tiny model on CPU in about a minute. On a GPU: `--preset llava-1.5-7b --dtype
bfloat16` (random weights).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from serve.bench_adapters import save_random_adapters
from serve.bench_model import random_model
from serve.engine import GenerationRequest, SamplingParams
from serve.engine.engine import Engine
from serve.policy import POLICIES
from serve.summary import RequestResult, summarize
from serve.workload import WorkloadSpec, generate
from valora_jax.adapters import detach, load_adapter
from valora_jax.adapters.pool import AdapterPool
from valora_jax.generation import Generator
from valora_jax.models.tiny import TINY, tiny_base
from valora_jax.models.tiny_processor import BOS_ID, tiny_processor


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build(args):
    """(model, processor) of the preset: the tiny base with its processor, or random weights with the tiny
    word-level tokenizer (prompts are token ids) and a CLIP image processor of the preset's image size."""
    if args.preset == TINY:
        return tiny_base(jnp.dtype(args.dtype))
    model = random_model(args.preset, jnp.dtype(args.dtype), args.seed, text_layers=args.text_layers)
    return model, tiny_processor(model.config.vision.image_size, model.config.vision.patch_size)


def prompt(cfg, rng, tokens: int, images: int) -> tuple[list[int], list]:
    """Token ids (BOS, each image's placeholder tokens, random words) and the images."""
    text = rng.integers(10, min(cfg.text.vocab_size, 170), max(1, tokens)).tolist()
    ids = [BOS_ID] + [cfg.image_token_id] * (cfg.image_seq_length * images) + text
    size = cfg.vision.image_size
    pictures = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(images)]
    return ids, pictures


def workload(args, rate: float, seed: int, skew: float | None = None):
    """The live benchmarks' workload: Poisson at `rate` for `args.duration` seconds, `args.adapters` adapters of
    rank `args.rank` (skew `args.skew` unless given), one image and 4..`args.prompt_max` text tokens per prompt,
    2..`args.output_max` output tokens."""
    return generate(WorkloadSpec(rate=rate, duration=args.duration, adapters=args.adapters,
                                 skew=args.skew if skew is None else skew, ranks=(args.rank,), images=(1,),
                                 prompt_min=4, prompt_max=args.prompt_max, output_min=2, output_max=args.output_max,
                                 output_cap=args.output_max, seed=seed))


def requests_of(specs, cfg, seed: int) -> list[tuple[float, GenerationRequest]]:
    rng = np.random.default_rng(seed)
    out = []
    for spec in specs:
        ids, images = prompt(cfg, rng, spec.prompt_tokens, spec.images)
        out.append((spec.arrival, GenerationRequest(
            adapter=spec.adapter, prompt_ids=ids, images=images, id=spec.id,
            sampling=SamplingParams(max_tokens=spec.output_tokens, ignore_eos=True))))
    return out


def live(engine: Engine, requests, policy: str) -> dict:
    """Replay `requests` against the running engine under `policy`; the summary of the run."""
    rows, switches = replay(engine, requests, policy)
    return summarize(rows, switches=switches)


def replay(engine: Engine, requests, policy: str) -> tuple[list[RequestResult], int]:
    """Replay `requests` ((arrival, request) pairs) in real time against the running engine under
    `policy`, starting unmerged; each request's timestamps and the run's weight switches."""
    from serve.policy import make_policy

    engine.pool.unmerge()
    engine.policy, switches = make_policy(policy), engine.switches
    handles, start = [], time.monotonic()
    for arrival, request in requests:
        time.sleep(max(0.0, start + arrival - time.monotonic()))
        handles.append(engine.submit(request))
    results = [h.result() for h in handles]
    failed = [r for r in results if r.finish_reason == "error"]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed under {policy}: {failed[0].error}")
    rows = [RequestResult(r.id, q.adapter, r.arrival, r.first_token, r.finished, r.prompt_tokens,
                          r.completion_tokens) for r, (_, q) in zip(results, requests)]
    return rows, engine.switches - switches


def serving_engine(model, processor, paths: dict, args, max_waiting: int) -> Engine:
    """An engine of `args.slots` decode slots over `model` with the adapters `paths` (name -> directory)
    loaded into a pool of `args.max_loras` device slots of rank `args.rank`."""
    pool = AdapterPool(model, slots=args.max_loras, max_rank=args.rank, serial=False)
    engine = Engine(model, processor, pool, max_num_seqs=args.slots, max_model_len=args.max_model_len,
                    served_model_name=args.preset, max_waiting=max_waiting)
    for name, path in paths.items():
        engine.load_adapter(name, path)
    return engine


def warm_up(engine: Engine, requests, slots: int) -> None:
    """Compile the programs a workload needs (every mode, the switches, the prompt buckets of its first
    requests) by running its first `2 * slots` requests at once under valora and unmerged, before and after
    the pool's periodic restore of the base weights (restored weights are committed device arrays, for
    which the jitted programs compile once more)."""
    progress("engine warm-up (compiles every program the workload needs)")
    for restored in (False, True):
        if restored:
            engine.pool.unmerge()
            engine.pool.restore()
        for policy in ("valora", "unmerged"):
            live(engine, [(0.0, r) for _, r in requests[: 2 * slots]], policy)


def one_adapter_at_a_time(generator: Generator, processor, requests, paths: dict, batch: int,
                          max_new_tokens: int) -> dict:
    """The baseline: each adapter's requests in batches with the adapter attached, no arrivals; every batch
    decodes `max_new_tokens` (a static batch runs to its longest request), only requested tokens count."""
    model = generator.model
    by_adapter: dict = {}
    for _, request in requests:
        by_adapter.setdefault(request.adapter, []).append(request)
    tokens, start = 0, time.monotonic()
    for adapter, group in by_adapter.items():
        if adapter is not None:
            load_adapter(model, paths[adapter])
        for i in range(0, len(group), batch):
            rows = group[i:i + batch]
            longest = max(len(r.prompt_ids) for r in rows)
            ids = np.zeros((len(rows), longest), np.int32)
            mask = np.zeros_like(ids, bool)
            for j, r in enumerate(rows):
                ids[j, longest - len(r.prompt_ids):], mask[j, longest - len(r.prompt_ids):] = r.prompt_ids, True
            images = [image for r in rows for image in r.images]
            pixels = None if not images else processor.image_processor(images=images, return_tensors="np")["pixel_values"]
            generator.generate(ids, pixels, mask, max_new_tokens=max_new_tokens, eos_token_id=-1)
            tokens += sum(r.sampling.max_tokens for r in rows)
        if adapter is not None:
            detach(model)
    seconds = time.monotonic() - start
    return {"requests": len(requests), "duration_s": seconds, "throughput_rps": len(requests) / seconds,
            "output_tokens_per_s": tokens / seconds}


def run(args) -> dict:
    model, processor = build(args)
    cfg = model.config
    device = jax.devices()[0].device_kind
    specs = workload(args, args.rate, args.seed)
    requests = requests_of(specs, cfg, args.seed)
    max_len = args.max_model_len
    progress(f"{len(requests)} requests for {args.adapters} adapters (skew {args.skew}) at {args.rate}/s on {device}")
    with tempfile.TemporaryDirectory() as tmp:
        names = sorted({spec.adapter for spec in specs} - {None})
        paths = dict(zip(names, save_random_adapters(model, len(names), args.rank, args.seed, pathlib.Path(tmp))))
        generator = Generator(build(args)[0], max_len=max_len)
        progress("baseline: one adapter at a time with Generator (a first pass compiles, the second is timed)")
        for _ in range(2):
            baseline = one_adapter_at_a_time(generator, processor, requests, paths, args.slots, args.output_max)
        engine = serving_engine(model, processor, paths, args, max_waiting=len(requests) + 1)
        rows = []
        with engine:
            warm_up(engine, requests, args.slots)
            for policy in args.policies:
                progress(f"policy {policy}: live replay, then every request at once")
                summary = live(engine, requests, policy)
                saturated = live(engine, [(0.0, r) for _, r in requests], policy)
                summary["saturated_tokens_per_s"] = saturated["output_tokens_per_s"]
                summary["throughput_ratio"] = saturated["output_tokens_per_s"] / baseline["output_tokens_per_s"]
                rows.append({"policy": policy, **summary})
    meta = {"device": device, "preset": args.preset, "dtype": args.dtype, "requests": len(requests),
            "adapters": args.adapters, "skew": args.skew, "rate": args.rate, "slots": args.slots,
            "max_loras": args.max_loras, "rank": args.rank}
    return {"meta": meta, "rows": rows, "baseline": baseline}


def markdown(result: dict) -> str:
    m, b = result["meta"], result["baseline"]
    lines = [f"{m['preset']} {m['dtype']} on {m['device']}: {m['requests']} requests, {m['adapters']} adapters "
             f"(skew {m['skew']}), Poisson {m['rate']}/s, {m['slots']} decode slots, {m['max_loras']} adapter slots, "
             f"rank {m['rank']}", "",
             "| policy | req/s | out tok/s | TTFT p50 ms | TTFT p99 ms | per-token p50 ms | per-token p99 ms "
             "| avg token latency ms | switches | all at once: out tok/s | vs one adapter at a time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['policy']} | {r['throughput_rps']:.2f} | {r['output_tokens_per_s']:.1f} | "
                     f"{1e3 * r['ttft_p50_s']:.1f} | {1e3 * r['ttft_p99_s']:.1f} | "
                     f"{1e3 * r['tpot_p50_s']:.2f} | {1e3 * r['tpot_p99_s']:.2f} | "
                     f"{1e3 * r['avg_token_latency_s']:.2f} | {r['switches']} | {r['saturated_tokens_per_s']:.1f} | "
                     f"{r['throughput_ratio']:.2f}x |")
    lines.append(f"| one adapter at a time (Generator) | - | - | - | - | - | - | - | - | "
                 f"{b['output_tokens_per_s']:.1f} | 1.00x |")
    lines += ["", "Latency columns: the workload replayed at its arrival times. Throughput ratio: every request "
              "submitted at once, against the same requests grouped by adapter and run in Generator batches of "
              "the engine's slot count, back to back (same run)."]
    return "\n".join(lines)


def add_live_args(p: argparse.ArgumentParser, *, duration: float = 6.0, adapters: int = 4, max_loras: int = 4) -> None:
    """The model, engine and workload flags of the live benchmarks (this one, serve.profile, serve.bench_serving)."""
    p.add_argument("--preset", "--model", dest="preset", default=TINY,
                   help="tiny (CPU default) or a model preset with random weights")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--text-layers", type=int, help="cut a random preset's language model to this many layers "
                   "(same widths) to bound compile time")
    p.add_argument("--policies", nargs="+", default=sorted(POLICIES), choices=sorted(POLICIES))
    p.add_argument("--duration", type=float, default=duration, help="seconds of arrivals")
    p.add_argument("--adapters", type=int, default=adapters)
    p.add_argument("--skew", type=float, default=0.8, help="share of requests for the hot adapter")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--slots", type=int, default=8, help="decode slots (the baseline's batch size too)")
    p.add_argument("--max-loras", type=int, default=max_loras, help="adapter slots on the device")
    p.add_argument("--prompt-max", type=int, default=24, help="text tokens per prompt at most (plus the image's)")
    p.add_argument("--output-max", type=int, default=16, help="output tokens per request at most")
    p.add_argument("--max-model-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m serve.bench_engine", description=__doc__.split("\n\n")[0])
    add_live_args(p)
    p.add_argument("--rate", type=float, default=8.0, help="requests per second (Poisson)")
    p.add_argument("--out", type=pathlib.Path, help="write bench_engine.json and bench_engine.md here")
    args = p.parse_args(argv)
    result = run(args)
    text = markdown(result)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_engine.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "bench_engine.md").write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
