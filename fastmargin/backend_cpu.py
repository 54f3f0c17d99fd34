"""The 'cpu' backend: the fused C++ kernel (csrc/cpu/margin_ce.cpp) as custom ops.

Registered as fastmargin::cpu_fwd / fastmargin::cpu_bwd (fastmargin.fused). Peak extra
memory is O(B * chunk * K + (B + chunk * K) * D): one block of dots and the block's
normalised weight rows, never B x C.
"""

from __future__ import annotations

from . import _extension, fused

# Classes per block. A (B, chunk) fp32 block at B = 256 is 4 MiB: large enough that each
# GEMM runs near MKL's peak, small enough to stay in a 2-core machine's caches between
# the GEMM and the softmax pass (bench/README.md has the sweep).
DEFAULT_CHUNK = 4096


def _forward(x, w, labels, *options):
    return _extension.module().cpu_forward(x, w, labels, *options)


def _backward(grad_rows, x, w, labels, lse, *options):
    return _extension.module().cpu_backward(grad_rows, x, w, labels, lse, *options)


margin_cross_entropy = fused.register("cpu", _forward, _backward, DEFAULT_CHUNK)
