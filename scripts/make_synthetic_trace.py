"""Writes configs/traces/azure-synthetic.csv: a small synthetic trace in the Azure LLM inference trace
format (`TIMESTAMP,ContextTokens,GeneratedTokens`, timestamps with 7 fractional digits as the published
trace has them) for tests and examples. Bursty arrivals (Gamma gaps, cv 2) at about 3 requests/s over
about 100 s, lognormal lengths. Not real traffic: point serve.workload at the real trace for that.

    python scripts/make_synthetic_trace.py [--out PATH] [--rows 300] [--seed 0]
"""
import argparse
import datetime
import pathlib

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent.parent / "configs/traces/azure-synthetic.csv"))
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    gaps = rng.gamma(0.25, 4 / 3, args.rows)  # mean 1/3 s, cv 2
    start = datetime.datetime(2023, 11, 16, 18, 15, 46, 680590)
    context = np.clip(rng.lognormal(6.5, 0.9, args.rows), 4, 8000).astype(int)
    generated = np.clip(rng.lognormal(4.5, 1.0, args.rows), 1, 2000).astype(int)
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    elapsed = 0.0
    for gap, c, g in zip(gaps, context, generated):
        elapsed += gap
        ticks = round(elapsed * 1e7)  # 100 ns units, the trace's resolution
        stamp = start + datetime.timedelta(microseconds=ticks // 10)
        lines.append(f"{stamp:%Y-%m-%d %H:%M:%S}.{stamp.microsecond:06d}{ticks % 10},{c},{g}")
    pathlib.Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
