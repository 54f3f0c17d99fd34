"""The 'cpu' backend: the fused C++ kernel (csrc/cpu/margin_ce.cpp) as custom ops.

Registered as fastmargin::cpu_fwd / fastmargin::cpu_bwd (fastmargin.fused). chunk_size is
the classes of one block of the walk: peak extra memory is O(B * chunk * K + B * D), one
block of dots, never B x C.
"""

from __future__ import annotations

from . import _extension, fused

# Elements of one (B, chunk * K) block of dots: 2^19 fp32 values are 2 MiB, large enough
# that each block's GEMM runs near MKL's peak, small enough that the block is still in
# cache when the softmax pass reads it.
BLOCK_ELEMENTS = 1 << 19


def default_chunk(batch: int, sub_centers: int) -> int:
    """Classes per block for a batch of `batch` rows: BLOCK_ELEMENTS, within [256, 16384]."""
    return max(256, min(16384, BLOCK_ELEMENTS // max(1, batch * sub_centers)))


def _forward(*args):
    return _extension.module().cpu_forward(*args)


def _backward(*args):
    return _extension.module().cpu_backward(*args)


row_statistics = fused.register("cpu", _forward, _backward, "cpu", default_chunk)
