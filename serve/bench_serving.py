"""`python -m serve.bench_serving`: every orchestration policy on the same traces, live on the engine and
simulated on a measured cost profile, against VaLoRA's goal.

    python -m serve.bench_serving --out runs/bench_serving          # tiny on this device, cpu-tiny profile
    python -m serve.bench_serving --profile measure                  # measure the profile first, same engine
    python -m serve.bench_serving --no-live --profile gpu-...        # the simulated sweep only

Live: the engine (`serve.bench_engine`'s, the tiny model on CPU by default) replays a Poisson trace at each
of `--live-rates` in real time under every policy; each live row has its simulated twin (the same trace
through `serve.simulator` on `--profile`), and `sim/live` compares their average token latencies.

Simulated: `--sim-rates` (2-16 requests/s, as published) x `--sim-skews` (0.8, 0.5, 0.2) on
`--sim-adapters` (16) adapters, `--sim-duration` seconds of traffic each, with the live run's request
shapes (one image, short prompts and outputs: what the profile was measured on) and decode slots.

Metrics (`serve.summary`): average token latency as VaLoRA defines it (mean request latency over mean
request length, prompt and image tokens included), time to first token p50 / p99, per-output-token
latency, throughput (requests/s, output tokens/s), SLO attainment (first token within `--slo-ttft`),
weight switches. Output: a Markdown table, a JSON file and a PNG plot of average token latency against
request rate per policy (one panel per simulated skew, one for the live runs), under `--out`.

The goal (issue 27, from VaLoRA's paper): at skew 0.8, valora's average token latency at least 20% below
the best baseline's at every simulated rate, and at lower skews never above it. The verdict is printed;
where the goal is not met, a note names the cost that decides it, from the profile.

`--tune` also runs valora under every setting of its thresholds in `TUNE_GRID` on the simulated sweep's
traces and profile, and ranks the settings by their worst reduction against the best baseline at skew 0.8
(then at lower skews): thresholds chosen from the measured profile, not from hand-picked traces. The
policy's defaults stay the paper's; the table says what the profile would choose.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys

import numpy as np
import scipy.stats

from serve.batching import Limits
from serve.bench_engine import add_live_args, progress, replay, requests_of, workload
from serve.cost_profile import CostProfile, load_profile
from serve.profile import device_name, profile_engine, running_engine
from serve.policy import make_policy
from serve.simulator import simulate
from serve.summary import RequestResult, markdown_table, summarize
from serve.workload import RequestSpec

GOAL_REDUCTION = 0.2  # valora at least 20% below the best baseline at skew 0.8
HIGH_SKEW = 0.8
# valora's thresholds `--tune` tries (serve.policy.ValoraPolicy's parameters).
TUNE_GRID = {"starve_after": (0.5, 1.0, 2.0, 4.0), "starving_share": (0.25, 0.5, 0.75),
             "merge_share": (0.25, 0.5, 0.75)}


def simulated(specs: list[RequestSpec], policy: str, profile: CostProfile, slots: int, slo_ttft: float):
    """The simulator's run of `specs` under `policy` with `slots` decode slots: (summary, per-request results)."""
    result = simulate(specs, policy=policy, profile=profile, limits=Limits(max_batch=slots))
    return ({**result.summary(slo_ttft=slo_ttft), "mode_seconds": result.mode_seconds,
             "switch_seconds": result.switch_seconds}, result.results)


def tracking(live: list[RequestResult], sim: list[RequestResult]) -> dict:
    """How closely the simulator's requests track the engine's, matched by id: the ratio of their average
    token latencies and of mean time to first token, the mean of |sim - live| / live over per-request
    latencies, and the rank (Spearman) correlation of per-request latencies (which requests wait longer:
    unaffected by the machine's speed)."""
    by_id = {r.id: r for r in sim}
    pairs = [(r, by_id[r.id]) for r in live if r.id in by_id]
    if len(pairs) != len(live):
        raise ValueError(f"{len(live) - len(pairs)} live requests have no simulated twin")
    latency = np.array([[l.latency, s.latency] for l, s in pairs])
    ttft = np.array([[l.ttft, s.ttft] for l, s in pairs])
    return {"sim_over_live_latency": float(latency[:, 1].mean() / latency[:, 0].mean()),
            "sim_over_live_ttft": float(ttft[:, 1].mean() / ttft[:, 0].mean()),
            "latency_mean_rel_error": float(np.mean(np.abs(latency[:, 1] - latency[:, 0]) / latency[:, 0])),
            "latency_rank_correlation": float(scipy.stats.spearmanr(latency[:, 0], latency[:, 1]).statistic)}


def live_rows(engine, args, profile: CostProfile) -> list[dict]:
    """Every policy at every live rate on the engine, each with its simulated twin's tracking."""
    rows = []
    for rate in args.live_rates:
        specs = workload(args, rate, args.seed)
        requests = requests_of(specs, engine.config, args.seed)
        for policy in args.policies:
            progress(f"live: {policy} at {rate:g} requests/s ({len(specs)} requests)")
            results, switches = replay(engine, requests, policy)
            sim_summary, sim_results = simulated(specs, policy, profile, args.slots, args.slo_ttft)
            rows.append({"source": "live", "policy": policy, "rate": rate, "skew": args.skew,
                         **summarize(results, slo_ttft=args.slo_ttft, switches=switches),
                         "simulated_avg_token_latency_s": sim_summary["avg_token_latency_s"],
                         **tracking(results, sim_results)})
    return rows


def sweep_spec(args, rate: float, skew: float):
    """The simulated sweep's workload: the live run's request shapes at `rate` and `skew` on
    `args.sim_adapters` adapters for `args.sim_duration` seconds."""
    shapes = argparse.Namespace(**{**vars(args), "adapters": args.sim_adapters, "duration": args.sim_duration})
    return workload(shapes, rate, args.seed, skew=skew)


def sweep_rows(args, profile: CostProfile) -> list[dict]:
    rows = []
    for skew in args.sim_skews:
        for rate in args.sim_rates:
            specs = sweep_spec(args, rate, skew)
            for policy in args.policies:
                summary, _ = simulated(specs, policy, profile, args.slots, args.slo_ttft)
                rows.append({"source": "simulated", "profile": profile.name, "policy": policy, "rate": rate,
                             "skew": skew, **summary})
    return rows


def tune(args, profile: CostProfile, rows: list[dict]) -> list[dict]:
    """valora under every setting of `TUNE_GRID` on the simulated sweep's traces, judged by `goal` against the
    sweep's baselines: per setting, its worst reduction of average token latency against the best baseline
    at skew >= 0.8 and at lower skews (None without such points), and whether it meets the goal; best first."""
    baselines = [r for r in rows if r["policy"] != "valora"]
    specs = {key: sweep_spec(args, key[1], key[0]) for key in sorted({(r["skew"], r["rate"]) for r in baselines})}
    out = []
    for values in itertools.product(*TUNE_GRID.values()):
        params = dict(zip(TUNE_GRID, values))
        valora = [{"policy": "valora", "skew": skew, "rate": rate, "avg_token_latency_s": simulate(
            spec, policy="valora", profile=profile, policy_params=params,
            limits=Limits(max_batch=args.slots)).summary()["avg_token_latency_s"]} for (skew, rate), spec in specs.items()]
        verdict = goal(baselines + valora)
        worst = lambda high: min((c["reduction"] for c in verdict["checks"] if (c["skew"] >= HIGH_SKEW) == high),  # noqa: E731
                                 default=None)
        out.append({**params, "high_skew_reduction": worst(True), "low_skew_reduction": worst(False),
                    "met": verdict["met"]})
    rank = lambda t: tuple(-np.inf if v is None else v for v in (t["high_skew_reduction"], t["low_skew_reduction"]))  # noqa: E731
    return sorted(out, key=rank, reverse=True)


def goal(rows: list[dict]) -> dict:
    """VaLoRA's goal on the simulated rows: per (skew, rate), valora's average token latency against the
    best baseline's; met when it is at least 20% lower at every rate of skew 0.8 and never higher at a
    lower skew."""
    checks = []
    for key in sorted({(r["skew"], r["rate"]) for r in rows}):
        group = {r["policy"]: r["avg_token_latency_s"] for r in rows if (r["skew"], r["rate"]) == key}
        baselines = {p: v for p, v in group.items() if p != "valora"}
        if "valora" not in group or not baselines:
            continue
        best = min(baselines, key=baselines.get)
        reduction = 1 - group["valora"] / baselines[best]
        needed = GOAL_REDUCTION if key[0] >= HIGH_SKEW else 0.0
        checks.append({"skew": key[0], "rate": key[1], "best_baseline": best, "reduction": reduction,
                       "needed": needed, "met": reduction >= needed})
    return {"met": bool(checks) and all(c["met"] for c in checks), "checks": checks}


def dominant_cost(profile: CostProfile, rows: list[dict]) -> str:
    """Which cost decides valora against the baselines on this profile, in words and numbers."""
    valora = [r for r in rows if r["policy"] == "valora" and r["skew"] >= HIGH_SKEW]
    busy = sum(sum(r["mode_seconds"].values()) for r in valora)
    switch = sum(r["switch_seconds"] for r in valora)
    merged_time = sum(r["mode_seconds"].get("merged", 0.0) + r["mode_seconds"].get("mixture", 0.0) for r in valora)
    pre, d = profile.prefill, profile.decode
    lines = [f"On profile `{profile.name}`, valora at skew {HIGH_SKEW} spends {switch / busy:.0%} of its busy time "
             f"switching weights ({profile.merge_s * 1e3:.1f} ms a merge, {profile.unmerge_s * 1e3:.1f} ms an unmerge, "
             f"{profile.op_s('switch') * 1e3:.1f} ms from one merged adapter to another) "
             f"and {merged_time / busy:.0%} in merged or mixture steps." if busy else
             f"valora ran no step at skew {HIGH_SKEW}."]
    lines.append(f"With an adapter merged, a prefill step costs {pre.per_merged_s * 1e3:.1f} ms and a decode step "
                 f"{d.per_merged_s * 1e3:.2f} ms more than unmerged (a mixture step computes the merged adapter's "
                 f"correction on every slot), while a row of the merged adapter saves "
                 f"{d.per_lora_token_s * 1e3:.3f} ms of decode and a prompt token {pre.per_lora_token_s * 1e3:.3f} ms "
                 f"of prefill.")
    if d.per_lora_token_s > 0:
        lines.append(f"A merged decode step pays off only with more than {d.per_merged_s / d.per_lora_token_s:.0f} "
                     f"rows of the merged adapter, before switches and the prefill's extra cost.")
    else:
        lines.append("The profile charges no decode cost per LoRA row, so merging saves nothing here: every merged "
                     "step and switch is overhead on this device.")
    return " ".join(lines)


def markdown(result: dict) -> str:
    meta = result["meta"]
    out = []
    if result["live"]:
        out += [f"Live: {meta['preset']} {meta['dtype']} on {meta['device']}, {meta['slots']} decode slots, "
                f"{meta['adapters']} adapters (skew {meta['skew']}), Poisson, {meta['duration']:g} s of arrivals per "
                f"rate; `sim/live` is the simulated twin's average token latency (profile `{meta['profile']}`) over "
                f"the live one.", "",
                markdown_table(result["live"], lead=(("rate", "req/s offered", "{:g}"),)), ""]
        out += ["| req/s offered | policy | sim/live avg token latency | sim/live mean TTFT | mean per-request latency "
                "error | per-request latency rank correlation |", "|---|---|---|---|---|---|"]
        out += [f"| {r['rate']:g} | {r['policy']} | {r['sim_over_live_latency']:.2f} | {r['sim_over_live_ttft']:.2f} "
                f"| {r['latency_mean_rel_error']:.0%} | {r['latency_rank_correlation']:.2f} |" for r in result["live"]]
        out.append("")
    for skew in sorted({r["skew"] for r in result["simulated"]}, reverse=True):
        rows = [r for r in result["simulated"] if r["skew"] == skew]
        out += [f"Simulated on profile `{meta['profile']}` ({meta['profile_device']}): skew {skew}, "
                f"{meta['sim_adapters']} adapters, {meta['sim_duration']:g} s of Poisson traffic per rate, "
                f"{meta['slots']} decode slots.", "",
                markdown_table(rows, lead=(("rate", "req/s offered", "{:g}"),)), ""]
    g = result["goal"]
    if g["checks"]:
        out.append(f"Goal (valora >= {GOAL_REDUCTION:.0%} lower average token latency than the best baseline at "
                   f"skew {HIGH_SKEW}, never higher at lower skew): **{'met' if g['met'] else 'not met'}**.")
        out += ["", "| skew | req/s | best baseline | valora's reduction | needed |", "|---|---|---|---|---|"]
        out += [f"| {c['skew']} | {c['rate']:g} | {c['best_baseline']} | {c['reduction']:+.0%} | "
                f">= {c['needed']:.0%} |" for c in g["checks"]]
        if not g["met"]:
            out += ["", result["note"]]
    if result.get("tuning"):
        out += ["", tuning_table(result["tuning"], meta["profile"])]
    return "\n".join(out)


def tuning_table(tuning: list[dict], profile: str, shown: int = 5) -> str:
    """The best `shown` settings of `--tune` and the policy's defaults, as Markdown."""
    defaults = {name: getattr(make_policy("valora"), name) for name in TUNE_GRID}
    pct = lambda v: "-" if v is None else f"{v:+.0%}"  # noqa: E731
    rows = tuning[:shown] + [t for t in tuning[shown:] if all(t[k] == v for k, v in defaults.items())]
    lines = [f"valora's thresholds tuned on profile `{profile}` ({len(tuning)} settings, the simulated sweep's "
             "traces), best first; the worst reduction of average token latency against the best baseline:", "",
             "| starve_after (s) | starving_share | merge_share | at skew >= 0.8 | at lower skew | goal |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {t['starve_after']:g} | {t['starving_share']:g} | {t['merge_share']:g} | "
              f"{pct(t['high_skew_reduction'])} | {pct(t['low_skew_reduction'])} | "
              f"{'met' if t['met'] else 'not met'}{' (defaults)' if all(t[k] == v for k, v in defaults.items()) else ''} |"
              for t in rows]
    return "\n".join(lines)


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"simulated, skew {s} ({result['meta']['profile']})", [r for r in result["simulated"] if r["skew"] == s])
              for s in sorted({r["skew"] for r in result["simulated"]}, reverse=True)]
    if result["live"]:
        panels.append((f"live, skew {result['meta']['skew']}, {result['meta']['device']}\n(dashed: simulated twins)",
                       result["live"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels):
        for policy in sorted({r["policy"] for r in rows}):
            mine = [r for r in rows if r["policy"] == policy]
            points = sorted((r["rate"], 1e3 * r["avg_token_latency_s"]) for r in mine)
            line, = ax.plot(*zip(*points), marker="o", label=policy)
            if "simulated_avg_token_latency_s" in mine[0]:  # a live panel: the simulated twins, dashed
                twins = sorted((r["rate"], 1e3 * r["simulated_avg_token_latency_s"]) for r in mine)
                ax.plot(*zip(*twins), linestyle="--", marker="x", color=line.get_color())
        ax.set(title=title, xlabel="requests/s", ylabel="average token latency (ms)", yscale="log")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> dict:
    measured = args.profile == "measure"
    if measured and not args.live_rates:
        raise SystemExit("--profile measure measures on the live engine: give --live-rates")
    profile = None if measured else load_profile(args.profile)
    live = []
    if args.live_rates:
        with running_engine(args, workload(args, max(args.live_rates), args.seed + 1)) as engine:
            if measured:
                profile, _ = profile_engine(engine, args, args.live_rates, name="measured in this run")
            live = live_rows(engine, args, profile)
    progress(f"simulating {len(args.sim_skews) * len(args.sim_rates) * len(args.policies)} runs on {profile.name}")
    sim = sweep_rows(args, profile)
    meta = {"device": device_name(), "preset": args.preset, "dtype": args.dtype,
            "slots": args.slots, "adapters": args.adapters, "skew": args.skew, "duration": args.duration,
            "profile": profile.name, "profile_device": profile.device or "device not named",
            "sim_adapters": args.sim_adapters, "sim_duration": args.sim_duration}
    verdict = goal(sim)
    result = {"meta": meta, "profile": profile.to_json(), "live": live, "simulated": sim, "goal": verdict,
              "note": dominant_cost(profile, sim)}
    if args.tune:
        progress(f"tuning valora's thresholds: {np.prod([len(v) for v in TUNE_GRID.values()])} settings")
        result["tuning"] = tune(args, profile, sim)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serve.bench_serving", description=__doc__.split("\n\n")[0])
    add_live_args(p, duration=6.0, adapters=16, max_loras=16)
    p.add_argument("--live-rates", type=float, nargs="*", default=[4.0, 8.0],
                   help="requests/s of the live runs (none: simulate only)")
    p.add_argument("--no-live", dest="live_rates", action="store_const", const=[], help="simulate only")
    p.add_argument("--profile", default="cpu-tiny",
                   help="cost profile: a name in configs/profiles, a JSON file, or 'measure' (on the live engine, "
                        "before the live runs, on traces of other seeds; written to the output as profile.json)")
    p.add_argument("--sim-rates", type=float, nargs="+", default=[2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0])
    p.add_argument("--sim-skews", type=float, nargs="+", default=[0.8, 0.5, 0.2])
    p.add_argument("--sim-adapters", type=int, default=16)
    p.add_argument("--sim-duration", type=float, default=120.0, help="seconds of simulated traffic per point")
    p.add_argument("--slo-ttft", type=float, default=6.0, help="SLO on time to first token, seconds")
    p.add_argument("--tune", action="store_true",
                   help="also rank valora's threshold settings (TUNE_GRID) on the simulated sweep's traces")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/bench_serving"),
                   help="directory for bench_serving.json, .md and .png")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    text = markdown(result)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_serving.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "bench_serving.md").write_text(text + "\n")
    plot(result, args.out / "bench_serving.png")
    if args.profile == "measure":
        (args.out / "profile.json").write_text(json.dumps(result["profile"], indent=2) + "\n")
    print(f"\ngoal {'met' if result['goal']['met'] else 'NOT met'}; wrote {args.out}/bench_serving.{{json,md,png}}",
          file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
