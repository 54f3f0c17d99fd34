"""Small measuring helpers: step timing with quantiles, and peak extra memory of a step.

Used by `python -m fastmargin` and extended by the benchmark suite (bench/measure.py).

Timing: warm-up steps, then repeats until a time budget is spent (within a minimum and a
maximum count); each step may place marks, so one training step yields the forward, the
backward and their sum. The clock is time.perf_counter on the CPU and CUDA events on a
GPU (the step is synchronised once, after it, before the events are read).

Peak extra memory of a step, two ways:
  - CUDA: torch.cuda.max_memory_allocated over a step, minus what was allocated before it
    (inputs, gradients, anything held).
  - CPU: in a fresh subprocess, the growth of the resident set (Linux VmHWM, reset through
    /proc/self/clear_refs) over one step, above the resident set after warm-up with the
    inputs and their gradients allocated; the step sets the gradients to None first (as
    optimizer.zero_grad() does), so the figure is what a step needs beyond the inputs and
    their gradients. A hook on torch's allocator would miss buffers
    that C++ ops allocate themselves (oneDNN, MKL, OpenMP scratch); the resident set sees
    every byte. glibc's mmap threshold is fixed at 128 KiB in the child (MALLOC_MMAP_THRESHOLD_),
    so large blocks go back to the kernel when freed and the baseline holds no cached heap;
    the validation probe (`validate_rss_method`) checks a known allocation reads back as itself.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

MIB = 2**20


@dataclass(frozen=True)
class Stats:
    """Quantiles of repeated measurements (same unit as the samples) and their count."""

    median: float
    p20: float
    p80: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Stats":
        ordered = sorted(samples)
        return cls(_quantile(ordered, 0.5), _quantile(ordered, 0.2), _quantile(ordered, 0.8), len(ordered))


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not ordered:
        return math.nan
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timer_name(device: torch.device) -> str:
    return "cuda_event" if device.type == "cuda" else "perf_counter"


class _Marks:
    """Time points placed inside one step: perf_counter values or recorded CUDA events."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.points: list = []

    def __call__(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append(event)
        else:
            self.points.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (read after the step is synchronised)."""
        pairs = zip(self.points, self.points[1:])
        if self.cuda:
            return [a.elapsed_time(b) for a, b in pairs]
        return [(b - a) * 1e3 for a, b in pairs]


Step = Callable[[Callable[[], None]], None]


class StepTooSlow(TimeoutError):
    """A step ran past the time limit it was given."""


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """Raises StepTooSlow in the main thread once `seconds` have passed (SIGALRM, so between
    Python-level operations: a single long C++ call returns first); elsewhere, no limit."""
    usable = (seconds is not None and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise StepTooSlow(f"one step ran longer than {seconds:g} s and was interrupted")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_step(step: Step, device: torch.device, limit_s: float | None = None) -> list[float]:
    """Runs step(mark) once, synchronised; returns the ms between its marks.

    A step calls mark() at least twice (first and last); with marks between, the result
    has one interval per phase, e.g. [forward, backward]. limit_s: see _time_limit.
    """
    marks = _Marks(device)
    with _time_limit(limit_s):
        step(marks)
        synchronize(device)
    intervals = marks.intervals_ms()
    if not intervals:
        raise ValueError("a timed step must call mark() at least twice")
    return intervals


def repeats_for(step_ms: float, budget_s: float, min_repeats: int, max_repeats: int) -> int:
    """How many repeats fit in budget_s at step_ms each, within [min_repeats, max_repeats]."""
    fit = int(budget_s * 1e3 / max(step_ms, 1e-3))
    return max(min_repeats, min(max_repeats, fit))


def time_step(
    step: Step,
    device: torch.device,
    *,
    warmup: int = 1,
    budget_s: float = 1.0,
    min_repeats: int = 5,
    max_repeats: int = 200,
    step_limit_s: float | None = None,
    loop: Callable[[Callable[[], None], int], None] | None = None,
) -> list[Stats]:
    """Times step(mark): one Stats (ms) per phase between marks, then their total.

    After `warmup` untimed steps, the repeat count is what fits the budget at the last
    warm-up step's time (with warmup=0, the first timed step's), at least min_repeats
    (so even a step longer than the budget is repeated, and p20/p50/p80 are real
    quantiles) and at most max_repeats. `loop(run_one, count)` drives the repeats
    (pytest-benchmark's pedantic in the benchmark suite); by default a plain for loop.
    A step past step_limit_s raises StepTooSlow.
    """
    samples: list[list[float]] = []
    step_ms = 0.0
    for _ in range(warmup):
        step_ms = sum(run_step(step, device, step_limit_s))
    if warmup == 0:
        samples.append(run_step(step, device, step_limit_s))
        step_ms = sum(samples[0])
    repeats = repeats_for(step_ms, budget_s, min_repeats, max_repeats) - len(samples)

    def run_one() -> None:
        samples.append(run_step(step, device, step_limit_s))

    if repeats > 0:
        if loop is None:
            for _ in range(repeats):
                run_one()
        else:
            loop(run_one, repeats)
    phases = [Stats.of([s[i] for s in samples]) for i in range(len(samples[0]))]
    total = Stats.of([sum(s) for s in samples])
    return [*phases, total] if len(phases) > 1 else phases


def training_step(forward: Callable[[], torch.Tensor],
                  backward: Callable[[torch.Tensor], None] | None = None,
                  leaves: Sequence[torch.Tensor] = ()) -> Step:
    """The step mark; forward; mark; backward; mark: time_step gives [fwd, bwd, fwd_bwd].

    Before the first mark the leaves' gradients are set to None, as optimizer.zero_grad()
    does: each step allocates fresh gradients (as training does), never accumulates.
    """

    def step(mark: Callable[[], None]) -> None:
        for leaf in leaves:
            leaf.grad = None
        mark()
        out = forward()
        mark()
        if backward is None:
            out.backward()
        else:
            backward(out)
        mark()

    return step


# ---- peak memory: CUDA ----------------------------------------------------------------


def cuda_peak_extra_bytes(run: Callable[[], object], device: torch.device) -> int:
    """torch.cuda.max_memory_allocated over run(), minus what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


# ---- peak memory: CPU, a fresh subprocess -----------------------------------------------

RSS_METHOD = "rss_hwm_subprocess"
CUDA_METHOD = "cuda_max_memory_allocated"


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Resets the kernel's resident-set high-water mark (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _child_measure(target: str, kwargs: dict, warmup: int) -> dict:
    """In the child: build the step, warm it up, then one step's resident-set growth."""
    module_name, _, function_name = target.partition(":")
    build = getattr(importlib.import_module(module_name), function_name)
    run = build(**kwargs)
    for _ in range(warmup):
        run()
    if not _reset_peak_rss() or _proc_status_kib("VmHWM") is None:
        raise RuntimeError("resident-set peak unavailable: needs Linux /proc/self/clear_refs and VmHWM")
    baseline = _proc_status_kib("VmRSS") * 1024
    run()
    peak = _proc_status_kib("VmHWM") * 1024
    return {"baseline_bytes": baseline, "peak_bytes": peak, "extra_bytes": max(peak - baseline, 0)}


def rss_peak_extra_bytes(
    target: str,
    kwargs: dict | None = None,
    *,
    warmup: int = 1,
    pythonpath: Sequence[str] = (),
    timeout_s: float = 600.0,
) -> dict:
    """Peak resident-set growth of one call, measured in a fresh Python process.

    target: "module:function"; function(**kwargs) allocates the inputs (and, when it
    matters, their gradients) and returns a zero-argument callable, one step. The child
    runs it `warmup` times, then once more between a baseline and the peak. Returns
    {'baseline_bytes', 'peak_bytes', 'extra_bytes'}; raises RuntimeError with the child's
    error if it fails (a MemoryError included).
    """
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    env["PYTHONPATH"] = os.pathsep.join([*pythonpath, env.get("PYTHONPATH", "")]).strip(os.pathsep)
    spec = json.dumps({"target": target, "kwargs": kwargs or {}, "warmup": warmup})
    result = subprocess.run(
        [sys.executable, "-m", "fastmargin.profiling", spec],
        capture_output=True, text=True, env=env, timeout=timeout_s,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"memory subprocess failed (exit {result.returncode}): {' | '.join(tail)}")
    return json.loads(lines[-1])


def _allocate_probe(nbytes: int) -> Callable[[], None]:
    """A step that allocates and touches nbytes, then frees them: the validation probe."""

    def run() -> None:
        block = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
        del block

    return run


def validate_rss_method(nbytes: int = 256 * MIB) -> float:
    """Measured / known extra bytes for a known allocation, through rss_peak_extra_bytes."""
    measured = rss_peak_extra_bytes("fastmargin.profiling:_allocate_probe", {"nbytes": nbytes})
    return measured["extra_bytes"] / nbytes


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    print(json.dumps(_child_measure(request["target"], request["kwargs"], request["warmup"])), flush=True)
