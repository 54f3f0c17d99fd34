"""The 'cpu' backend: the fused C++ kernel (csrc/cpu/margin_ce.cpp) as custom ops.

Registered as fastmargin::cpu_fwd / fastmargin::cpu_bwd (fastmargin.fused). chunk_size is
the classes of one block of the walk; each thread walks its own share of the classes with a
block of its own, so peak extra memory is O(threads * (B * chunk * K + B * D)), never B x C.
"""

from __future__ import annotations

from . import _extension, fused

# Elements of one thread's (chunk * K, B) block of dots: 2^17 fp32 values are 512 KiB, so
# the block and the W rows it came from stay in the core's L2 through the GEMM that writes
# it, the pass that reads it and the GEMMs that use it (2-core AMD EPYC, 1 MiB L2 a core:
# 2^17 ran 1.3-1.4x the 3-GEMM floor at one thread where 2^19 ran 1.4-1.55x).
BLOCK_ELEMENTS = 1 << 17


def default_chunk(batch: int, sub_centers: int) -> int:
    """Classes per block for a batch of `batch` rows: BLOCK_ELEMENTS dots, within [256,
    16384] class rows (chunk * sub_centers)."""
    rows = max(256, min(16384, BLOCK_ELEMENTS // max(1, batch)))
    return max(1, rows // max(1, sub_centers))


def _forward(*args):
    return _extension.module().cpu_forward(*args)


def _backward(*args):
    return _extension.module().cpu_backward(*args)


row_statistics = fused.register("cpu", _forward, _backward, "cpu", default_chunk)
