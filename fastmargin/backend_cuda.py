"""The 'cuda' backend: the fused CUDA C++ kernels (csrc/cuda/, compiled into fastmargin._C)
as custom ops fastmargin::cuda_fwd / fastmargin::cuda_bwd (fastmargin.gpu_host).

Peak extra memory is O(B + C*K) for the norms plus the backward's (splits, B, D) partial
dx, as the Triton backend's; never B x C. chunk_size is the least number of classes one
block walks (a class split, in whole tiles); the default splits the classes for two waves
of blocks; either way the splits stay within the grid limit and 256 MiB of partials
(csrc/cuda/launch_plan.h, the same rule as kernels/launch.py's).
"""

from __future__ import annotations

from . import _extension, gpu_host


def _forward(*args):
    return _extension.module().cuda_forward(*args)


def _backward(*args):
    return _extension.module().cuda_backward(*args)


row_statistics = gpu_host.register("cuda", _forward, _backward, "cuda")
