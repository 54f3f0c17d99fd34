"""The 'cuda' backend: the fused CUDA C++ kernels (csrc/cuda/, compiled into fastmargin._C)
as custom ops fastmargin::cuda_fwd / fastmargin::cuda_bwd (fastmargin.gpu_host).

Peak extra memory is O(B + C*K) for the norms plus the backward's (splits, B, D) partial
dx, as the Triton backend's; never B x C. chunk_size is the classes one block walks (a
multiple of the tile's classes); the default splits the classes so that there are two
waves of blocks (csrc/cuda/launch_plan.h).
"""

from __future__ import annotations

from . import _extension, gpu_host


def _forward(*args):
    return _extension.module().cuda_forward(*args)


def _backward(*args):
    return _extension.module().cuda_backward(*args)


row_statistics = gpu_host.register("cuda", _forward, _backward, "cuda")
