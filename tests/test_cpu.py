"""What only the fused CPU backend (csrc/cpu/margin_ce.cpp, backend='cpu') has: it is built
into fastmargin._C (these tests skip, saying why, where it is not), 'auto' picks it on a
CPU, chunk_size is the class block of its walk, and its results are bitwise equal run to
run at a fixed thread count and equal to rounding across thread counts (ATen's GEMM, which
it calls per class block, blocks by the number of threads).

Its results against the reference (every margin, option, chunk size, edge, layout and
dtype, gradcheck, opcheck, compile): tests/test_backends.py, which runs on every backend.
"""

import pytest
import torch

import fastmargin
from fastmargin import backend_cpu  # noqa: F401  (registers torch.ops.fastmargin.cpu_fwd / cpu_bwd)
from fastmargin import backends
from helpers import (
    CHUNK, TOL, assert_close, assert_rel, check_against_reference, geometric_inputs, option_inputs, run,
    upstream_weights,
)

CPU = torch.device("cpu")
NOT_BUILT = backends.unavailable_reason("cpu", CPU)
pytestmark = pytest.mark.skipif(NOT_BUILT is not None, reason=f"cpp kernels not built: {NOT_BUILT}")


def test_deterministic_across_runs_and_thread_counts():
    """Two threads: against the reference, and bitwise equal on a rerun; one thread: equal to
    two threads' to rounding (bitwise only at a fixed thread count)."""
    x, w, y = option_inputs(3, -100, [5], torch.float32)
    x, y = torch.cat([x] * 8), torch.cat([y] * 8)  # B = 296: several row blocks per thread
    kwargs = dict(sub_centers=3, label_smoothing=0.1, reduction="none", chunk_size=CHUNK, m2=0.5)
    upstream = upstream_weights(len(y))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, _ = check_against_reference(x, w, y, TOL[torch.float32], what="2 threads", backend="cpu", **kwargs)
        again = run("cpu", x, w, y, upstream, **kwargs)
        torch.set_num_threads(1)
        single = run("cpu", x, w, y, upstream, **kwargs)
    finally:
        torch.set_num_threads(threads)
    for label, a, b, c in zip(("loss", "lse", "d loss / d x", "d loss / d W"), first, again, single):
        assert_close(b, a, atol=0.0, what=f"repeated run: {label}")
        assert_rel(c, a, TOL[torch.float32], f"1 thread vs 2 (bitwise only at a fixed thread count): {label}")


def test_chunk_is_a_block_of_classes():
    """chunk_size is the classes of one block of the kernel's walk, capped at a thread's share
    of the classes (csrc/cpu/margin_ce.cpp, Walk): it moves the rounding only (every chunk
    within 1e-13 of the others in fp64), and every chunk at or above the cap, the default
    here included (2^17 dots a block: 1771 classes of 2 rows at B = 37), is the same single
    block at one thread, bit for bit. (Against the reference: tests/test_backends.py's
    test_chunk_sizes.)"""
    x, w, y = option_inputs(2, -100, [8], torch.float64)
    kwargs = dict(sub_centers=2, label_smoothing=0.1, reduction="none", m1=1.2, m2=0.3, m3=0.2)
    upstream = upstream_weights(len(y))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        results = {chunk: run("cpu", x, w, y, upstream, chunk_size=chunk, **kwargs)
                   for chunk in (1, 7, 64, 1001, 4096, None)}
    finally:
        torch.set_num_threads(threads)
    labels = ("loss", "lse", "d loss / d x", "d loss / d W")
    for chunk in (4096, None):
        for label, a, b in zip(labels, results[chunk], results[1001]):
            assert_close(a, b, atol=0.0, what=f"chunk_size={chunk} vs 1001 = C (one block): {label}")
    for chunk in (1, 7, 64):
        for label, a, b in zip(labels, results[chunk], results[1001]):
            assert_rel(a, b, 1e-13, f"chunk_size={chunk} vs one block: {label}")


def test_auto_selects_cpu():
    assert backends.select("auto", CPU) == "cpu"
    x, w, y = geometric_inputs(B=6, C=10, D=5)
    auto = fastmargin.margin_cross_entropy(x, w, y, m2=0.5, reduction="none")
    cpu = fastmargin.margin_cross_entropy(x, w, y, m2=0.5, reduction="none", backend="cpu")
    assert_close(auto, cpu, atol=0.0, what="backend='auto' vs 'cpu'")
