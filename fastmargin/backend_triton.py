"""The 'triton' backend: the fused Triton kernels (kernels/, installed as fastmargin.kernels)
as custom ops fastmargin::triton_fwd / fastmargin::triton_bwd (fastmargin.fused).

Peak extra memory is O(B + C*K) for the norms plus the backward's (splits, B, D) partial
dx; never B x C. chunk_size is the classes one program walks (a multiple of the tile's
classes); the default splits the classes so that there are two waves of programs.
"""

from __future__ import annotations

from . import fused
from .kernels.margin_ce_bwd import backward
from .kernels.margin_ce_fwd import forward


def default_chunk(batch: int, sub_centers: int) -> int:
    """0: the launcher splits the classes by the device's size (kernels.launch.split_size)."""
    return 0


row_statistics = fused.register("triton", forward, backward, default_chunk)
