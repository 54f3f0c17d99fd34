"""The 'triton' backend: the fused Triton kernels (kernels/, installed as fastmargin.kernels)
as custom ops fastmargin::triton_fwd / fastmargin::triton_bwd (fastmargin.gpu_host).

Peak extra memory is O(B + C*K) for the norms plus the backward's (splits, B, D) partial
dx; never B x C. chunk_size is the least number of classes one program walks (a class
split, in whole tiles); the default splits the classes for two waves of programs; either
way the splits stay within the grid limit and 256 MiB of partials (kernels/launch.py
split_size). Under TRITON_INTERPRET=1 the kernels run on CPU tensors (how CI tests them).
"""

from __future__ import annotations

from . import gpu_host
from .kernels.launch import INTERPRET
from .kernels.margin_ce_bwd import backward
from .kernels.margin_ce_fwd import forward

row_statistics = gpu_host.register("triton", forward, backward, "cpu" if INTERPRET else "cuda")
