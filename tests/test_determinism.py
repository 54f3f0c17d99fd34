"""Determinism on every usable backend: the same inputs give bitwise-equal loss, lse and
gradients run after run, at 1, 2 and 3 intra-op threads (3 splits the rows and classes
unevenly on this 2-core machine), and in a fresh process.

Triton is also bitwise equal across thread counts (it merges its class splits in a fixed
order and has no atomics; the thread count only reaches its launcher's torch ops). The
'cpu' backend and the reference are bitwise equal at a fixed thread count only: both call
ATen's GEMM (at::mm_out / addmm_ in csrc/cpu/margin_ce.cpp), whose blocking follows the
number of threads, so across thread counts they agree to rounding (1e-6 relative here;
e.g. dW at 1 vs 3 threads differs in the last bits).

What changes the result's rounding (never run to run): chunk_size (the order of the walk
over the classes) and, for Triton on a GPU, the default split of the classes, which follows
the device's number of SMs. No option trades determinism for speed (docs/errors.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_rel, geometric_inputs, run, upstream_weights, usable_backends

ROOT = Path(__file__).resolve().parents[1]
ALL = [pytest.param(name, device, id=name) for name, device in usable_backends()]
LABELS = ("loss", "lse", "d loss / d x", "d loss / d W")
# Backends whose results do not depend on the number of threads, bit for bit.
ACROSS_THREADS = ("triton", "cuda")

# Every option on, sub-centers, ignored rows; B = 80 is three row blocks of 32 (Triton under
# the interpreter) and several per thread for the CPU kernel.
KWARGS = dict(m1=1.1, m2=0.4, m3=0.1, sub_centers=2, label_smoothing=0.1, reduction="none", chunk_size=24)


def inputs(device):
    x, w, y = geometric_inputs(B=40, C=101, D=19, K=2, dtype=torch.float32, seed=11)
    x, y = torch.cat([x, x.flip(0)]), torch.cat([y, y.flip(0)])
    y[[3, 50]] = -100
    return x.to(device), w.to(device), y.to(device), upstream_weights(len(y)).to(device)


def results(backend, device):
    x, w, y, upstream = inputs(device)
    return [t.detach().cpu() for t in run(backend, x, w, y, upstream, **KWARGS)]


def digest(tensors):
    return [hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() for t in tensors]


@pytest.mark.parametrize("backend, device", ALL)
def test_bitwise_equal_run_after_run_and_across_threads(backend, device):
    threads = torch.get_num_threads()
    by_threads = {}
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            first, again = results(backend, device), results(backend, device)
            for label, a, b in zip(LABELS, first, again):
                assert torch.equal(a, b), f"{backend}, {n} threads: {label} differs between two runs"
            by_threads[n] = first
    finally:
        torch.set_num_threads(threads)
    for n in (2, 3):
        for label, a, b in zip(LABELS, by_threads[n], by_threads[1]):
            if backend in ACROSS_THREADS:
                diff = (a.double() - b.double()).abs().max().item()
                assert torch.equal(a, b), f"{backend}: {label} at {n} threads differs from 1 thread by up to {diff:.3g}"
            else:  # the rounding of torch's GEMM at another thread count
                assert_rel(a, b, 1e-6, f"{backend}: {label} at {n} threads vs 1 thread")


SCRIPT = """
import hashlib, json, os, sys
sys.path.insert(0, os.path.join({root!r}, "tests"))
if {interpret}:
    os.environ["TRITON_INTERPRET"] = "1"
import torch
import test_determinism as t
torch.set_num_threads(2)
print(json.dumps({{b: t.digest(t.results(b, torch.device(d))) for b, d in {backends!r}}}))
"""


def test_bitwise_equal_in_a_fresh_process():
    """A new process (new allocator state, new kernel caches) gives the same bits."""
    backends = [(name, device.type) for name, device in usable_backends()]
    script = SCRIPT.format(root=str(ROOT), interpret=os.environ.get("TRITON_INTERPRET") == "1", backends=backends)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for name, device in usable_backends():
            ours = digest(results(name, device))
            for label, a, b in zip(LABELS, ours, theirs[name]):
                assert a == b, f"{name}: {label} differs between this process and a fresh one"
    finally:
        torch.set_num_threads(threads)
