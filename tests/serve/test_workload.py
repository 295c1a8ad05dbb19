"""Workloads (serve.workload): reproducibility, the popularity shares within statistical bounds, the
arrival processes' moments, the Azure trace parser and the JSONL format."""

import dataclasses
import datetime
import math
import pathlib

import numpy as np
import pytest

from serve.workload import (WorkloadSpec, adapter_probabilities, generate, parse_timestamp,
                            read_azure_trace, read_jsonl, write_jsonl)

TRACE = pathlib.Path(__file__).resolve().parents[2] / "configs" / "traces" / "azure-synthetic.csv"


def test_same_seed_same_requests_other_seed_other_requests():
    spec = WorkloadSpec(rate=5, duration=60, seed=3)
    assert generate(spec) == generate(spec)
    assert generate(spec) != generate(dataclasses.replace(spec, seed=4))


def test_skewed_share_to_the_hot_adapter_and_uniform_rest():
    spec = WorkloadSpec(rate=100, duration=200, adapters=16, skew=0.8, seed=1)
    requests = generate(spec)
    n = len(requests)
    assert abs(n - 20000) < 5 * math.sqrt(20000)  # Poisson count
    counts = {}
    for r in requests:
        counts[r.adapter] = counts.get(r.adapter, 0) + 1
    hot = counts["adapter-0"] / n
    assert abs(hot - 0.8) < 5 * math.sqrt(0.8 * 0.2 / n)  # 5 sigma: a false alarm is ~1e-6
    p_other = 0.2 / 15
    for i in range(1, 16):
        share = counts[f"adapter-{i}"] / n
        assert abs(share - p_other) < 5 * math.sqrt(p_other * (1 - p_other) / n), i


def test_power_law_popularity_matches_numpys_power_distribution():
    spec = WorkloadSpec(adapters=8, popularity="power", power_alpha=0.3)
    probs = adapter_probabilities(spec)
    # S-LoRA's own draw: adapter floor(N * x), x ~ numpy's power distribution (an independent sampler).
    x = np.random.default_rng(0).power(0.3, 200_000)
    empirical = np.bincount((x * 8).astype(int), minlength=8) / x.size
    assert probs.sum() == pytest.approx(1.0)
    assert np.all(np.diff(probs) < 0)
    np.testing.assert_allclose(empirical, probs, atol=5 * math.sqrt(0.25 / x.size))


def test_poisson_and_gamma_gaps_have_the_requested_mean_and_cv():
    for arrival, cv in (("poisson", 1.0), ("gamma", 2.0), ("gamma", 0.5)):
        times = np.array([r.arrival for r in generate(WorkloadSpec(arrival=arrival, cv=cv, rate=50, duration=400))])
        gaps = np.diff(times)
        assert times.max() <= 400 and np.all(gaps >= 0)
        assert gaps.mean() == pytest.approx(1 / 50, rel=0.05), arrival
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08), (arrival, cv)


def test_lengths_images_ranks_and_the_output_cap():
    spec = WorkloadSpec(rate=20, duration=50, images=(0, 2), ranks=(8, 64), base_share=0.25, output_cap=120)
    requests = generate(spec)
    assert all(8 <= r.prompt_tokens <= 512 and 8 <= r.output_tokens <= 120 for r in requests)
    assert max(r.output_tokens for r in requests) == 120  # outputs drawn up to 512 are capped
    assert {r.images for r in requests} == {0, 2}
    ranks = {}
    for r in requests:
        if r.adapter is None:
            assert r.rank is None
        else:
            assert r.rank in (8, 64)
            assert ranks.setdefault(r.adapter, r.rank) == r.rank  # one rank per adapter
    base = sum(r.adapter is None for r in requests) / len(requests)
    assert abs(base - 0.25) < 5 * math.sqrt(0.25 * 0.75 / len(requests))


def test_parse_timestamp_as_the_azure_trace_writes_them():
    expected = datetime.datetime(2023, 11, 16, 18, 15, 46, tzinfo=datetime.timezone.utc).timestamp() + 0.68059
    assert parse_timestamp("2023-11-16 18:15:46.6805900") == pytest.approx(expected, abs=1e-6)
    assert parse_timestamp("2023-11-16T18:15:46Z") == pytest.approx(expected - 0.68059, abs=1e-6)
    assert parse_timestamp("2023-11-16 19:15:46.5+01:00") == pytest.approx(expected - 0.18059, abs=1e-6)
    with pytest.raises(ValueError, match="not a timestamp"):
        parse_timestamp("16/11/2023 18:15")


def test_read_the_shipped_synthetic_trace():
    rows = read_azure_trace(TRACE)
    assert len(rows) == 300
    assert rows[0].time == 0.0
    assert all(a.time <= b.time for a, b in zip(rows, rows[1:]))
    # Its first two data rows, by hand: 18:15:46.9000685 and 18:15:46.9000723, 397/286 and 384/520 tokens.
    assert (rows[0].context_tokens, rows[0].generated_tokens) == (397, 286)
    assert rows[1].time == pytest.approx(3.8e-6, abs=1e-7)
    assert (rows[1].context_tokens, rows[1].generated_tokens) == (384, 520)


def test_trace_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.1,3\n")
    with pytest.raises(ValueError, match="missing column.*GeneratedTokens"):
        read_azure_trace(bad)
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,3,4\nyesterday,3,4\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: bad trace row"):
        read_azure_trace(bad)


def test_trace_replay_keeps_lengths_and_rescales_to_the_rate():
    rows = read_azure_trace(TRACE)
    spec = WorkloadSpec(arrival="trace", trace=str(TRACE), rate=None, duration=None, output_cap=120)
    requests = generate(spec)
    assert [r.arrival for r in requests] == [r.time for r in rows]
    assert [r.prompt_tokens for r in requests] == [r.context_tokens for r in rows]
    assert [r.output_tokens for r in requests] == [min(r.generated_tokens, 120) for r in rows]
    scaled = generate(dataclasses.replace(spec, rate=10.0))
    assert (len(scaled) - 1) / scaled[-1].arrival == pytest.approx(10.0)
    cut = generate(dataclasses.replace(spec, rate=10.0, duration=10.0))
    assert len(cut) == sum(r.arrival <= 10.0 for r in scaled)


def test_jsonl_round_trip_and_errors(tmp_path):
    requests = generate(WorkloadSpec(rate=5, duration=20, base_share=0.3))
    path = tmp_path / "w.jsonl"
    write_jsonl(requests, path)
    assert read_jsonl(path) == requests
    path.write_text('{"id": "a", "arrival": 0.0, "adapter": null, "prompt_tokens": 3, "output_tokens": 2, "x": 1}\n')
    with pytest.raises(ValueError, match=r"w.jsonl:1: not a request spec: unknown field\(s\) \['x'\]"):
        read_jsonl(path)


def test_bad_specs_are_refused():
    for spec, message in ((WorkloadSpec(arrival="uniform"), "unknown arrival process"),
                          (WorkloadSpec(popularity="zipf"), "unknown popularity"),
                          (WorkloadSpec(skew=1.5), "skew must be in"),
                          (WorkloadSpec(arrival="trace"), "needs a trace file")):
        with pytest.raises(ValueError, match=message):
            generate(spec)

