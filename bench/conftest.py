"""Options of the benchmark suite and its parametrisation: (case, provider) pairs of a sweep.

    pytest bench/bench_margin_ce.py --sweep cpu [--out DIR] [--providers a,b] [--deadline-s N]
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bench import measure, providers
from bench.sweep import BENCH, SWEEPS, csv_path

# Per case: the matmul rate first (every frac_matmul row divides by it), then the floor.
_FIRST = {"matmul_rate": 0, "gemm_floor": 1}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastmargin benchmark")
    group.addoption("--sweep", choices=sorted(SWEEPS), default="smoke", help="which sweep (bench/sweep.py)")
    group.addoption("--out", type=Path, default=None,
                    help="folder of <device>.csv (default bench/results; for the smoke sweep a temporary folder)")
    group.addoption("--providers", default=None, help="comma-separated provider names (default: all)")
    group.addoption("--deadline-s", type=float, default=None, help="override the sweep's time budget")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if not {"provider", "case"} <= set(metafunc.fixturenames):
        return
    sweep = SWEEPS[metafunc.config.getoption("--sweep")]
    wanted = metafunc.config.getoption("--providers")
    names = None if wanted is None else set(wanted.split(","))
    unknown = (names or set()) - {p.name for p in providers.all_providers()}
    if unknown:
        raise pytest.UsageError(f"--providers: unknown {sorted(unknown)}; "
                                f"known: {[p.name for p in providers.all_providers()]}")
    ordered = sorted(providers.all_providers(), key=lambda p: _FIRST.get(p.name, 2))
    pairs = [(p, c) for c in sweep.cases for p in ordered
             if p.supports(c) and (names is None or p.name in names)]
    metafunc.parametrize(("provider", "case"), pairs, ids=[f"{c.id}-{p.name}" for p, c in pairs])


@dataclass
class BenchSession:
    device: torch.device
    settings: measure.Settings
    env: dict
    csv: Path
    started: float
    load: float


@pytest.fixture(scope="session")
def bench_session(request: pytest.FixtureRequest) -> BenchSession:
    config = request.config
    sweep = SWEEPS[config.getoption("--sweep")]
    device = torch.device(sweep.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("this sweep needs a CUDA device; none is visible to torch")
    out = config.getoption("--out")
    if out is None:
        smoke = config.getoption("--sweep") == "smoke"
        out = Path(tempfile.mkdtemp(prefix="fastmargin-smoke-")) if smoke else BENCH / "results"
    session = BenchSession(device, sweep.make_settings(config.getoption("--deadline-s")),
                           measure.environment(device), csv_path(out, device), time.monotonic(),
                           os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
    config._fastmargin_bench = session  # read by pytest_terminal_summary
    return session


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    session = getattr(config, "_fastmargin_bench", None)
    if session is None:
        return
    write = terminalreporter.write_line
    write(f"fastmargin bench: {time.monotonic() - session.started:.0f} s on {session.env['device']}; "
          f"rows appended to {session.csv}")
    if hasattr(os, "getloadavg"):  # other work on the machine inflates CPU timings: say how much there was
        write(f"  load average at the start {session.load:.2f}, now (1, 5, 15 min) "
              + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    for name, reason in providers.unavailable(session.device).items():
        write(f"  unavailable: {name}: {reason}")
