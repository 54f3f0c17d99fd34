"""Measuring one provider at one case: time, peak extra memory, FLOP/s, as CSV rows.

Timing and memory come from fastmargin.profiling (see its docstring for both methods);
this file adds the suite's policy: FLOP counts (DESIGN §3), the matmul rate, guards
(memory, step time, the sweep's deadline) that record a row instead of crashing or
swapping, and the CSV.
"""

from __future__ import annotations

import csv
import datetime
import gc
import math
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fastmargin import profiling

from .providers import Case, Provider, by_name, tiny

REPO = Path(__file__).resolve().parents[1]

COLUMNS = ("op,provider,backend,loss,mode,B,C,D,K,dtype,measure,metric,unit,median,p20,p80,n,"
           "device,torch,triton,timer,commit,date").split(",")

# FLOPs per (row, class column, feature) of each mode, DESIGN §3: forward is one GEMM,
# backward two (dx, dW); fwd_bwd counts the three an algorithm must do, whether it does 4.
FLOPS_PER_BCKD = {"fwd": 2, "bwd": 4, "fwd_bwd": 6}

# The matmul rate is measured on (B, D) @ (D, min(C*K, RATE_MAX_COLS)): large enough to
# saturate a device, small enough to fit beside anything.
RATE_MAX_COLS = 2**18


@dataclass
class Settings:
    """How hard to measure. budget_s: time for the repeats of one (provider, case);
    at least min_repeats, at most max_repeats. memory: measure peak memory for every
    provider (True), none (False) or the names given. warmup: untimed steps at the shape
    (0: one untimed step at a tiny shape instead, and the first timed step sizes the loop;
    a provider that compiles always warms up at the shape). step_limit_s: a step that runs
    longer is interrupted and the case recorded as skipped. deadline: a time.monotonic()
    after which cases are recorded as skipped. memory_headroom: the fraction of available
    RAM a CPU case may be estimated to need."""

    warmup: int = 1
    budget_s: float = 2.0
    min_repeats: int = 3
    max_repeats: int = 50
    memory: bool | tuple[str, ...] = True
    step_limit_s: float | None = None
    deadline: float | None = None
    memory_headroom: float = 0.8

    def measures_memory(self, provider: str) -> bool:
        return self.memory if isinstance(self.memory, bool) else provider in self.memory


def flops(case: Case, mode: str) -> int:
    return FLOPS_PER_BCKD[mode] * case.B * case.C * case.K * case.D


# ---- the environment columns ------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# What a run measures: the package, its kernels, the build and the benchmark code. Not the
# docs, nor the READMEs and bench/results that a sweep writes itself.
CODE_PATHS = ("fastmargin", "csrc", "kernels", "setup.py", "pyproject.toml", "bench/*.py")


def _commit() -> str:
    """HEAD's short hash, with '+dirty' where tracked code (CODE_PATHS) differs from it: the
    rows then measure code no commit holds."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--",
                                *CODE_PATHS], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = head.stdout.strip()
    if not commit:
        return "unknown"
    return commit + "+dirty" if dirty.stdout.strip() else commit


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil
        return psutil.virtual_memory().available
    except ImportError:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024


# ---- rows -------------------------------------------------------------------------------


class Rows:
    """Builds the CSV rows of one (provider, case)."""

    def __init__(self, provider: Provider, case: Case, env: dict) -> None:
        self.provider, self.case, self.env = provider, case, env
        self.rows: list[dict] = []

    def add(self, mode: str, metric: str, unit: str, *, median: float | None = None,
            p20: float | None = None, p80: float | None = None, n: int | None = None,
            timer: str = "", measure: str | None = None) -> None:
        case = self.case
        self.rows.append({
            "op": self.provider.op, "provider": self.provider.name, "backend": self.provider.backend,
            "loss": self.provider.loss_for(case), "mode": mode, "B": case.B, "C": case.C, "D": case.D,
            "K": case.K, "dtype": case.dtype, "measure": measure or mode, "metric": metric, "unit": unit,
            "median": _num(median), "p20": _num(p20), "p80": _num(p80), "n": "" if n is None else n,
            "timer": timer, **self.env,
        })

    def failure(self, metric: str, reason: str, mode: str = "fwd_bwd") -> None:
        """A row that says why nothing was measured: metric 'oom', 'skipped' or 'error'."""
        reason = " ".join(reason.split())[:300]
        self.add(mode, metric, reason, measure="error" if metric == "error" else mode)

    def time(self, mode: str, stats: profiling.Stats, timer: str, rate: profiling.Stats | None) -> None:
        self.add(mode, "time", "ms", median=stats.median, p20=stats.p20, p80=stats.p80, n=stats.n, timer=timer)
        work = flops(self.case, mode)
        tflops = [work / (ms * 1e-3) / 1e12 for ms in (stats.median, stats.p80, stats.p20)]
        self.add(mode, "tflops", "TFLOP/s", median=tflops[0], p20=tflops[1], p80=tflops[2], n=stats.n, timer=timer)
        if rate is not None:
            self.add(mode, "frac_matmul", "fraction", median=tflops[0] / rate.median,
                     p20=tflops[1] / rate.median, p80=tflops[2] / rate.median, n=stats.n, timer=timer)


def _num(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6g}"


def write_csv(rows: list[dict], path: Path) -> None:
    """Appends rows to the CSV at path, writing the header if the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


# ---- measuring --------------------------------------------------------------------------

Loop = Callable[[Callable[[], None], int], None]

_rates: dict[tuple, profiling.Stats] = {}


def _time_workload(provider: Provider, case: Case, device: torch.device, settings: Settings,
                   loop: Loop | None) -> tuple[list[profiling.Stats], int | None]:
    """[fwd, bwd, fwd_bwd] Stats (ms) and, on CUDA, the peak extra bytes of one more step."""
    warmup = max(settings.warmup, 1) if provider.compiles else settings.warmup
    if warmup == 0:
        tiny_workload = provider.build(tiny(case), device)
        tiny_workload.backward(tiny_workload.forward())
        del tiny_workload
    workload = provider.build(case, device)
    step = profiling.training_step(workload.forward, workload.backward, workload.leaves)
    stats = profiling.time_step(step, device, warmup=warmup, budget_s=settings.budget_s,
                                min_repeats=settings.min_repeats, max_repeats=settings.max_repeats,
                                step_limit_s=settings.step_limit_s, loop=loop)
    peak = None
    if device.type == "cuda" and provider.op == "margin_ce" and settings.measures_memory(provider.name):
        peak = profiling.cuda_peak_extra_bytes(lambda: workload.backward(workload.forward()), device)
    return stats, peak


def matmul_rate(case: Case, device: torch.device, settings: Settings, loop: Loop | None = None) -> profiling.Stats:
    """The device's matmul rate (TFLOP/s) at this case's B, D and dtype, measured once."""
    cols = min(case.C * case.K, RATE_MAX_COLS)
    key = (device.type, case.B, cols, case.D, case.dtype)
    if key not in _rates:
        rate_case = Case(case.B, cols, case.D, 1, case.dtype)
        stats, _ = _time_workload(by_name("matmul_rate"), rate_case, device, settings, loop)
        work = flops(rate_case, "fwd")
        fwd = stats[0]
        _rates[key] = profiling.Stats(work / fwd.median / 1e9, work / fwd.p80 / 1e9, work / fwd.p20 / 1e9, fwd.n)
    return _rates[key]


def _failure_kind(error: BaseException) -> str:
    if isinstance(error, (profiling.StepTooSlow, subprocess.TimeoutExpired)):
        return "skipped"
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(error):
        return "oom"
    return "error"


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # an interrupted step may have kernels queued
        torch.cuda.empty_cache()


def _cpu_peak_bytes(provider: Provider, case: Case, step_ms: float) -> int:
    """Peak extra resident memory of one training step in a fresh process."""
    case_dict = {"B": case.B, "C": case.C, "D": case.D, "K": case.K, "dtype": case.dtype}
    result = profiling.rss_peak_extra_bytes(
        "bench.providers:memory_step", {"provider": provider.name, "case": case_dict},
        warmup=0, pythonpath=[str(REPO)], timeout_s=120 + 5 * step_ms / 1e3)
    return result["extra_bytes"]


def run_case(provider: Provider, case: Case, device: torch.device, settings: Settings,
             loop: Loop | None = None, env: dict | None = None) -> list[dict]:
    """Every row of one provider at one case; failures become rows, never exceptions."""
    rows = Rows(provider, case, env or environment(device))
    timer = profiling.timer_name(device)
    if provider.name == "matmul_rate":
        try:
            rate = matmul_rate(case, device, settings, loop)
        except Exception as error:  # noqa: BLE001 - recorded as a row
            rows.failure(_failure_kind(error), f"{type(error).__name__}: {error}", mode="fwd")
            _release(device)
            return rows.rows
        rows.add("fwd", "tflops", "TFLOP/s", median=rate.median, p20=rate.p20, p80=rate.p80, n=rate.n, timer=timer)
        return rows.rows
    if settings.deadline is not None and time.monotonic() > settings.deadline:
        rows.failure("skipped", "the sweep's time budget was spent before this case")
        return rows.rows
    if device.type == "cpu":
        need, free = provider.estimate_bytes(case), available_bytes(device)
        if need > settings.memory_headroom * free:
            rows.failure("oom", f"estimated {need / 1e9:.1f} GB > {settings.memory_headroom:.0%} of "
                                f"{free / 1e9:.1f} GB available")
            return rows.rows

    failure = None
    try:
        stats, peak = _time_workload(provider, case, device, settings, loop)
    except Exception as error:  # noqa: BLE001 - recorded as a row: one provider's failure must not end a sweep
        failure = (_failure_kind(error), f"{type(error).__name__}: {error}")
    _release(device)
    if failure is not None:
        rows.failure(*failure)
        return rows.rows
    if device.type == "cpu" and settings.measures_memory(provider.name) and provider.name != "gemm_floor":
        try:
            peak = _cpu_peak_bytes(provider, case, stats[-1].median)
        except Exception as error:  # noqa: BLE001 - the time rows stand; this row says why no memory
            rows.failure(_failure_kind(error), f"peak memory: {type(error).__name__}: {error}")

    try:
        rate = matmul_rate(case, device, settings)
    except Exception:  # noqa: BLE001 - no rate, no frac_matmul rows; the rate's own row says why
        rate = None
        _release(device)
    fwd, bwd, total = stats
    for mode, mode_stats in (("fwd", fwd), ("bwd", bwd), ("fwd_bwd", total)):
        if mode in provider.modes:
            rows.time(mode, mode_stats, timer, rate)
    if provider.name == "gemm_floor":
        # Everything is preallocated: its extra memory is the (B, C*K) logits buffer.
        logits_bytes = case.B * case.C * case.K * torch.finfo(case.torch_dtype).bits // 8
        rows.add("fwd_bwd", "peak_mem", "MiB", median=logits_bytes / profiling.MIB, n=1, timer="preallocated")
    elif peak is not None:
        method = profiling.CUDA_METHOD if device.type == "cuda" else profiling.RSS_METHOD
        rows.add("fwd_bwd", "peak_mem", "MiB", median=peak / profiling.MIB, n=1, timer=method)
    return rows.rows
