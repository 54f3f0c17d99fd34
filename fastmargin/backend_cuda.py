"""The 'cuda' backend: the fused CUDA C++ kernels (csrc/cuda/, compiled into fastmargin._C)
as custom ops fastmargin::cuda_fwd / fastmargin::cuda_bwd (fastmargin.fused).

Peak extra memory is O(B + C*K) for the norms plus the backward's (splits, B, D) partial
dx, as the Triton backend's; never B x C. chunk_size is the classes one block walks (a
multiple of the tile's classes); the default splits the classes so that there are two
waves of blocks (csrc/cuda/launch_plan.h).
"""

from __future__ import annotations

from . import _extension, fused


def default_chunk(batch: int, sub_centers: int) -> int:
    """0: the launch plan splits the classes by the device's size."""
    return 0


def _forward(x, w, labels, *options):
    return _extension.module().cuda_forward(x, w, labels, *options)


def _backward(g_lse, g_target, g_sum, x, w, labels, lse, *options):
    return _extension.module().cuda_backward(g_lse, g_target, g_sum, x, w, labels, lse, *options)


row_statistics = fused.register("cuda", _forward, _backward, default_chunk)
