"""The sweeps (shapes, device, measuring budget) and the one command that runs each.

    python -m bench.sweep --sweep cpu                 # CPU sweep, < 10 min on 2 cores
    python -m bench.sweep --sweep cpu64               # the same shapes in fp64
    python -m bench.sweep --sweep cpubf16             # and with bf16 x and W
    python -m bench.sweep --sweep gpu --out DIR       # GPU sweep (bench/gpu_check.sh runs it)

Each runs bench/bench_margin_ce.py under pytest-benchmark, appends the rows to
DIR/<device>.csv, draws DIR/<device>_<dtype>.png and, unless --no-readme, regenerates the
tables of bench/README.md (and, after a CPU sweep, README.md's CPU summary) from the CSVs.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from . import measure, plot
from .providers import Case

BENCH = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Sweep:
    device: str
    cases: tuple[Case, ...]
    settings: dict = field(default_factory=dict)  # measure.Settings fields
    deadline_s: float | None = None  # from the sweep's start; later cases are recorded as skipped

    def make_settings(self, deadline_s: float | None = None) -> measure.Settings:
        deadline_s = self.deadline_s if deadline_s is None else deadline_s
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        return measure.Settings(**self.settings, deadline=deadline)


def _by_size(cases: list[Case]) -> tuple[Case, ...]:
    """Smaller first per dtype: step-time predictions come from the case before."""
    return tuple(sorted(cases, key=lambda c: (c.dtype != "bf16", c.B * c.C * c.K, c.B)))


SWEEPS = {
    # ArcFace (and, on fastmargin's CPU kernel, CosFace and SphereFace), fp32. The K = 3 case
    # is sub-center ArcFace (fastmargin and PML's class).
    "cpu": Sweep(
        device="cpu",
        cases=_by_size([Case(256, c, 512) for c in (10_000, 50_000, 200_000)]
                       + [Case(1024, 50_000, 512), Case(256, 10_000, 512, K=3)]),
        settings=dict(warmup=0, budget_s=1.5, min_repeats=3, max_repeats=30, step_limit_s=25.0),
    ),
    # The same shapes in fp64, against fp64 GEMMs (the floor and the matmul rate take the
    # case's dtype).
    "cpu64": Sweep(
        device="cpu",
        cases=_by_size([Case(256, c, 512, 1, "fp64") for c in (10_000, 50_000, 200_000)]
                       + [Case(1024, 50_000, 512, 1, "fp64"), Case(256, 10_000, 512, 3, "fp64")]),
        settings=dict(warmup=0, budget_s=1.5, min_repeats=3, max_repeats=30, step_limit_s=25.0),
    ),
    # The same shapes with bf16 x and W: the kernel's GEMMs on AVX512-BF16 where the CPU has
    # it (fastmargin._C.build_info()['cpu_bf16_gemms']), the peers' in torch's bf16 matmul.
    "cpubf16": Sweep(
        device="cpu",
        cases=_by_size([Case(256, c, 512, 1, "bf16") for c in (10_000, 50_000, 200_000)]
                       + [Case(1024, 50_000, 512, 1, "bf16"), Case(256, 10_000, 512, 3, "bf16")]),
        settings=dict(warmup=0, budget_s=1.5, min_repeats=3, max_repeats=30, step_limit_s=25.0),
    ),
    "gpu": Sweep(
        device="cuda",
        cases=_by_size([Case(b, c, 512, 1, dtype) for dtype in ("bf16", "fp32")
                        for b in (512, 4096) for c in (100_000, 1_000_000, 4_000_000)]),
        settings=dict(warmup=2, budget_s=0.3, min_repeats=5, max_repeats=50, step_limit_s=3.0),
        deadline_s=240.0,
    ),
    # Every provider at a tiny shape; peak memory (a fresh process each) for one provider.
    "smoke": Sweep(
        device="cpu",
        cases=(Case(8, 50, 16), Case(8, 50, 16, K=3)),
        settings=dict(warmup=0, budget_s=0.0, min_repeats=3, max_repeats=3,
                      memory=("fastmargin:reference",)),
    ),
}


def csv_path(out: Path, device: torch.device) -> Path:
    return out / f"{measure.slug(measure.device_name(device))}.csv"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", choices=sorted(SWEEPS), required=True)
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="folder for the CSV and PNGs")
    parser.add_argument("--providers", help="comma-separated provider names (default: all usable)")
    parser.add_argument("--deadline-s", type=float, help="seconds after which cases are recorded as skipped")
    parser.add_argument("--no-readme", action="store_true", help="leave bench/README.md and README.md as they are")
    args = parser.parse_args(argv)

    sweep = SWEEPS[args.sweep]
    if sweep.device == "cuda" and not torch.cuda.is_available():
        print("the gpu sweep needs a CUDA device; none is visible to torch", file=sys.stderr)
        return 2
    pytest_args = [str(BENCH / "bench_margin_ce.py"), "-q", "-p", "no:cacheprovider",
                   "--sweep", args.sweep, "--out", str(args.out),
                   "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name"]
    if args.providers:
        pytest_args += ["--providers", args.providers]
    if args.deadline_s is not None:
        pytest_args += ["--deadline-s", str(args.deadline_s)]
    code = pytest.main(pytest_args)
    path = csv_path(args.out, torch.device(sweep.device))
    if path.exists():
        pngs = plot.plot_csv(path, args.out)
        print("plots:", *map(str, pngs), sep="\n  ")
        if not args.no_readme:
            csvs = sorted((BENCH / "results").glob("*.csv"))
            plot.update_readme(BENCH / "README.md", csvs)
            if sweep.device == "cpu":
                plot.update_readme(BENCH.parent / "README.md", csvs, summary=True)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
