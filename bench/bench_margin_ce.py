"""The benchmark: every provider at every case of a sweep, under pytest-benchmark.

    pytest bench/bench_margin_ce.py --sweep cpu        (or: python -m bench.sweep --sweep cpu)

pytest-benchmark drives the repeats (pedantic: one synchronised training step a round);
the step's own marks split it into fwd and bwd (perf_counter on a CPU, CUDA events on a
GPU). Each case appends its rows (time, TFLOP/s, fraction of the matmul rate, peak extra
memory; or why not: oom, skipped, error) to <out>/<device>.csv.
"""

from __future__ import annotations

import warnings

import pytest

from bench import measure


def test_margin_ce(benchmark, bench_session, provider, case) -> None:
    reason = provider.unavailable(bench_session.device)
    if reason is not None:
        pytest.skip(reason)

    def pedantic(run_one, rounds: int) -> None:
        benchmark.pedantic(run_one, rounds=rounds, iterations=1, warmup_rounds=0)

    rows = measure.run_case(provider, case, bench_session.device, bench_session.settings,
                            loop=pedantic, env=bench_session.env)
    measure.write_csv(rows, bench_session.csv)
    benchmark.extra_info.update(
        {f"{r['measure']}_{r['metric']}": r["median"] or r["unit"] for r in rows})
    for row in rows:
        if row["metric"] in ("oom", "skipped", "error"):
            warnings.warn(f"{provider.name} {case.id}: {row['metric']}: {row['unit']}", stacklevel=1)
