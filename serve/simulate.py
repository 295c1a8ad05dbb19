"""Simulated serving of one workload under every orchestration policy: `python -m serve.simulate`.

    python -m serve.simulate --rate 4 --adapters 16 --skew 0.8 --duration 600
    python -m serve.simulate --policy valora --policy unmerged --arrival trace --trace configs/traces/azure-synthetic.csv
    python -m serve.simulate --replicas 4 --router affinity --rate 32 --json out.json

Prints a Markdown table (one row per policy; the profile and workload named above it) and, with
`--json`, writes the summaries. The costs come from a profile (`--profile`, default cpu-tiny in
configs/profiles, measured by `python -m serve.profile`); the workload from `serve.workload` or a JSONL
file (`--workload`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from serve.batching import Limits
from serve.cost_profile import load_profile
from serve.policy import POLICIES
from serve.routing import ROUTERS
from serve.simulator import simulate
from serve.summary import markdown_table
from serve.workload import WorkloadSpec, generate, read_jsonl, write_jsonl


def parse_args(argv=None) -> argparse.Namespace:
    defaults = WorkloadSpec()
    p = argparse.ArgumentParser(prog="python -m serve.simulate", description=__doc__.splitlines()[0])
    p.add_argument("--policy", action="append", choices=sorted(POLICIES),
                   help="repeat for several (default: all four)")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", help="read requests from this JSONL file instead of generating them")
    w.add_argument("--save-workload", help="write the generated requests to this JSONL file")
    w.add_argument("--arrival", choices=("poisson", "gamma", "trace"), default=defaults.arrival)
    w.add_argument("--rate", type=float, default=defaults.rate,
                   help="requests/s (with --arrival trace: rescale the trace to it; 0 keeps its own rate)")
    w.add_argument("--cv", type=float, default=defaults.cv, help="coefficient of variation of Gamma gaps")
    w.add_argument("--duration", type=float, default=defaults.duration, help="seconds of traffic (0: whole trace)")
    w.add_argument("--trace", help="Azure LLM inference trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens)")
    w.add_argument("--adapters", type=int, default=defaults.adapters)
    w.add_argument("--popularity", choices=("skewed", "power"), default=defaults.popularity)
    w.add_argument("--skew", type=float, default=defaults.skew, help="share of requests to the hot adapter")
    w.add_argument("--power-alpha", type=float, default=defaults.power_alpha)
    w.add_argument("--base-share", type=float, default=defaults.base_share)
    w.add_argument("--ranks", type=int, nargs="+", default=list(defaults.ranks))
    w.add_argument("--images", type=int, nargs="+", default=list(defaults.images), help="images per request, drawn from")
    w.add_argument("--prompt-range", type=int, nargs=2, default=[defaults.prompt_min, defaults.prompt_max])
    w.add_argument("--output-range", type=int, nargs=2, default=[defaults.output_min, defaults.output_max])
    w.add_argument("--output-cap", type=int, default=defaults.output_cap)
    w.add_argument("--seed", type=int, default=defaults.seed)
    e = p.add_argument_group("engines")
    e.add_argument("--profile", default="cpu-tiny", help="cost profile: a name in configs/profiles or a JSON file")
    e.add_argument("--max-batch", type=int, default=32, help="decode slots per engine")
    e.add_argument("--max-prefill-tokens", type=int, default=None)
    e.add_argument("--kv-tokens", type=int, default=None, help="KV token positions per engine")
    e.add_argument("--max-queue", type=int, default=None, help="waiting requests per engine before refusing")
    e.add_argument("--replicas", type=int, default=1)
    e.add_argument("--router", choices=sorted(ROUTERS), default="affinity")
    e.add_argument("--max-loras", type=int, default=None, help="adapters per replica for affinity routing")
    e.add_argument("--starve-after", type=float, default=None, help="valora: seconds before a request starves")
    e.add_argument("--alpha", type=float, default=None, help="dlora: merge above alpha x batch")
    e.add_argument("--beta", type=float, default=None, help="dlora: unmerge below beta x batch")
    p.add_argument("--slo-ttft", type=float, default=6.0, help="SLO on time to first token, seconds")
    p.add_argument("--json", help="write the summaries to this file")
    return p.parse_args(argv)


def policy_params(name: str, args: argparse.Namespace) -> dict:
    wanted = {"valora": {"starve_after": args.starve_after}, "dlora": {"alpha": args.alpha, "beta": args.beta}}
    return {k: v for k, v in wanted.get(name, {}).items() if v is not None}


def workload(args: argparse.Namespace):
    if args.workload:
        return read_jsonl(args.workload), args.workload
    spec = WorkloadSpec(arrival=args.arrival, rate=args.rate or None, duration=args.duration or None, cv=args.cv,
                        trace=args.trace, adapters=args.adapters, popularity=args.popularity, skew=args.skew,
                        power_alpha=args.power_alpha, base_share=args.base_share, ranks=tuple(args.ranks),
                        images=tuple(args.images), prompt_min=args.prompt_range[0], prompt_max=args.prompt_range[1],
                        output_min=args.output_range[0], output_max=args.output_range[1],
                        output_cap=args.output_cap, seed=args.seed)
    requests = generate(spec)
    if args.save_workload:
        write_jsonl(requests, args.save_workload)
    shown = ("arrival", "trace", "rate", "cv", "duration", "adapters", "popularity", "skew", "base_share", "seed")
    return requests, ", ".join(f"{k}={getattr(spec, k)}" for k in shown)


def main(argv=None) -> int:
    args = parse_args(argv)
    profile = load_profile(args.profile)
    requests, described = workload(args)
    if not requests:
        print("the workload has no requests", file=sys.stderr)
        return 1
    limits = Limits(args.max_batch, args.max_prefill_tokens, args.kv_tokens)
    rows = []
    for name in args.policy or list(POLICIES):
        start = time.perf_counter()
        result = simulate(requests, policy=name, policy_params=policy_params(name, args), profile=profile,
                          limits=limits, replicas=args.replicas, router=args.router, max_queue=args.max_queue,
                          max_loras=args.max_loras, seed=args.seed)
        summary = {"policy": name, **result.summary(slo_ttft=args.slo_ttft), "mode_seconds": result.mode_seconds,
                   "wall_s": time.perf_counter() - start}
        rows.append(summary)
        print(f"{name}: {summary['requests']} requests, {summary['steps']} steps simulated in {summary['wall_s']:.1f} s"
              + (f", {summary['rejected']} rejected" if summary["rejected"] else ""), file=sys.stderr)
    print(f"Simulated with profile `{profile.name}` ({profile.device or 'device not named'}); "
          f"{len(requests)} requests ({described}); {args.replicas} replica(s)"
          + (f" behind {args.router} routing" if args.replicas > 1 else "") + f", {args.max_batch} slots each.\n")
    print(markdown_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"profile": profile.to_json(), "workload": described, "replicas": args.replicas,
                       "router": args.router, "max_batch": args.max_batch, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
