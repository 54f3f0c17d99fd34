"""What the CPU kernel's layout for speed (csrc/cpu/margin_ce.cpp) must keep.

The kernel splits the classes into contiguous parts, four a thread (fewer when there is
little work or there are few classes), which the threads take in turn; it walks each part
in blocks of `chunk` classes with single-threaded GEMMs, and merges the parts' statistics
and dX̂ in part order, whichever thread walked them. These cases put the split's edges under the reference: more threads than classes,
parts whose sizes differ by one, blocks that do not divide a part, sub-centers across a
part's edge, slices of 256 class rows cut by a block's end; and a rerun at 3 threads is
bitwise equal (the merge order is fixed), while another thread count agrees to rounding.
The backend suite (tests/test_backends.py) runs at the suite's thread count; these set
their own.
"""

import pytest
import torch

from fastmargin import backends
from helpers import TOL, assert_close, assert_rel, check_against_reference, run, upstream_weights

CPU = torch.device("cpu")
NOT_BUILT = backends.unavailable_reason("cpu", CPU)
pytestmark = pytest.mark.skipif(NOT_BUILT is not None, reason=f"cpp kernels not built: {NOT_BUILT}")


def inputs(B, C, D, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(C * K, D, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, C, (B,), generator=g)
    y[::7] = -100  # ignored rows: no target in any part
    return x, w, y


@pytest.fixture
def threads():
    """Sets the intra-op thread count for a case, restoring it after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# (threads, B, C, D, K, chunk). A part holds at least 2^15 logits (B * C * K of them in all),
# so these split into min(4 * threads, C, B * C * K / 2^15) parts: 3, 3, 12, 2, 2 and 1.
SPLITS = [
    pytest.param(3, 33000, 3, 8, 1, 256, id="as-many-parts-as-classes"),
    pytest.param(4, 33000, 3, 8, 1, 256, id="more-threads-than-classes"),
    pytest.param(3, 400, 1001, 24, 1, 64, id="twelve-parts-of-83-84-blocks-of-64"),
    pytest.param(2, 100, 257, 16, 3, 100, id="sub-centers-slices-of-85-cut-by-blocks-of-100"),
    pytest.param(4, 37, 1001, 67, 2, 1000, id="two-parts-chunk-larger-than-a-part"),
    pytest.param(3, 16, 40, 8, 1, 7, id="too-little-work-one-part"),
]


@pytest.mark.parametrize("dtype", [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")])
@pytest.mark.parametrize("margin", [dict(m2=0.5), dict(m3=0.35), dict(sphere_m=4, scale=2.0)],
                         ids=["arcface", "cosface", "sphereface"])
@pytest.mark.parametrize("n_threads, B, C, D, K, chunk", SPLITS)
def test_parts_and_blocks_against_the_reference(threads, n_threads, B, C, D, K, chunk, margin, dtype):
    threads(n_threads)
    x, w, y = inputs(B, C, D, K, dtype)
    kwargs = dict(sub_centers=K, chunk_size=chunk, reduction="none", label_smoothing=0.1, **margin)
    check_against_reference(x, w, y, TOL[dtype], what=f"{n_threads} threads", backend="cpu", **kwargs)


@pytest.mark.parametrize("K", [1, 3])
def test_row_nontarget_params_across_row_tiles(threads, K):
    """CurricularFace's threshold differs row by row, and the kernel loads each row's
    non-target numbers once a tile of 128 rows: 300 rows are three tiles, in 2 parts. Every
    row has a target (an ignored row's threshold is the caller's convention)."""
    threads(2)
    x, w, y = inputs(300, 500, 24, K, torch.float64)
    y = y.abs() % 500
    check_against_reference(x, w, y, TOL[torch.float64], what=f"curricular K={K}", backend="cpu", sub_centers=K,
                            chunk_size=64, reduction="none", label_smoothing=0.1, m2=0.5, curricular_t=0.3)


def test_transposed_weight_split_into_parts(threads):
    """PML's W.t() layout: each part reads and writes its rows down the columns."""
    threads(3)
    x, w, y = inputs(600, 500, 24, 1, torch.float64)
    w_t = w.t().contiguous().t()  # (C, D) with strides (1, C)
    check_against_reference(x, w_t, y, TOL[torch.float64], what="W.t()", backend="cpu", m2=0.5, chunk_size=64)


def test_bitwise_at_a_fixed_thread_count(threads):
    """Twelve parts, taken by three threads in whatever order they free up, merged in part
    order: a rerun is equal to the bit; two threads (eight parts, other GEMM blocks) agree
    to rounding."""
    x, w, y = inputs(500, 1000, 32, 2, torch.float32)
    kwargs = dict(sub_centers=2, chunk_size=96, reduction="none", m2=0.5)
    upstream = upstream_weights(len(y))
    threads(3)
    first = run("cpu", x, w, y, upstream, **kwargs)
    again = run("cpu", x, w, y, upstream, **kwargs)
    threads(2)
    other = run("cpu", x, w, y, upstream, **kwargs)
    for label, a, b, c in zip(("loss", "lse", "d loss / d x", "d loss / d W"), first, again, other):
        assert_close(b, a, atol=0.0, what=f"rerun at 3 threads: {label}")
        assert_rel(c, a, TOL[torch.float32], f"2 threads vs 3: {label}")
