"""What the forward and backward launchers share: the tile configuration, the dtypes, the
params' strides and the class splits (the ops' inputs are checked by fastmargin/fused.py).

The configuration is fixed per (dtype, device kind), not autotuned: an autotuner picks by
timing, and a different pick is a different summation order, so results could change from
one process to the next. Blocks are powers of two and at least 16 where tl.dot needs it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


# triton.jit reads TRITON_INTERPRET when a kernel is defined, that is when this package is
# imported: kernels run on CPU tensors, in numpy, if it was "1" then.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}


@dataclass(frozen=True)
class Config:
    """Tile sizes and launch options (kernels/tiles.py describes the tile)."""

    BLOCK_B: int    # rows of a tile
    BLOCK_C: int    # classes of a tile; BLOCK_C * K_PAD weight rows
    K_PAD: int      # sub-centers per class, rounded up to a power of two
    BLOCK_D: int    # the slice of D that one step of a tile's dot loads
    BLOCK_DO: int   # the slice of D of a backward program's output (dx or dW)
    num_warps: int
    num_stages: int

    def meta(self, with_output_block: bool = False) -> dict:
        keys = ("BLOCK_B", "BLOCK_C", "K_PAD", "BLOCK_D") + (("BLOCK_DO",) if with_output_block else ())
        # No FMA contraction: the backward's exp(S zc - lse) must round z = S zc as the forward
        # did before its log-sum-exp, or p is off by exp(ulp(z)) (e^4 at SphereFace's
        # S = s ||x|| ~ 1e8). The tile dots are unaffected.
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages, "enable_fp_fusion": False}
        return {k: getattr(self, k) for k in keys} | options


def config(D: int, K: int, dtype: torch.dtype, backward: bool) -> Config:
    """Tiles of 64 rows; 128 weight rows forward, 64 backward with outputs of up to 256
    columns of D. For bf16 on sm_90 these are the largest that ptxas fits in 255 registers
    a thread at 8 warps without spilling (the backward's dW kernel spills 192 bytes); 64 x 128
    x 256 backward spills 4 KB (tests/test_triton.py::test_compiles_with_tensor_cores compiles them).
    fp64 tiles are a quarter. Under the interpreter mid-sized tiles: numpy's cost is per
    tile, and tests still cross tile edges on small shapes."""
    k_pad = triton.next_power_of_2(K)
    if INTERPRET:
        rows, n, block_d, block_do = 32, 128, 64, 64
    elif dtype == torch.float64:
        rows, n, block_d, block_do = 32, 128, 64, 64
    else:
        rows, n, block_d, block_do = 64, 64 if backward else 128, 64, 256
    block_d = min(block_d, max(16, triton.next_power_of_2(D)))
    block_do = min(block_do, max(16, triton.next_power_of_2(D)))
    block_c = max(1, n // k_pad)
    return Config(rows, block_c, k_pad, block_d, block_do, num_warps=4 if INTERPRET else 8, num_stages=2)


def on_device(device: torch.device):
    """The context every launch runs in: the tensors' GPU as the current device. Triton launches
    on the current device's current stream, which is not the tensors' when they live on
    cuda:1 and the current device is cuda:0 (a crash, or a race with their stream)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def margin_args(params: torch.Tensor, flags, B: int) -> tuple[tuple, dict]:
    """The lowered margin (fastmargin.margins.lower) as kernel arguments: (params, stride over
    the params, stride over the rows: 0 when every row shares column 0) and the margin's
    meta-parameters (flags: kind, sphere_m, nontarget, detached; NONTARGET off compiles the
    non-target transform out)."""
    kind, sphere_m, nontarget, detached = flags
    stride_pb = 0 if params.shape[1] == 1 else params.stride(1)
    meta = dict(KIND=kind, SPHERE_M=max(1, sphere_m), NONTARGET=bool(nontarget), DETACHED=bool(detached))
    return (params, params.stride(0), stride_pb), meta


def dtypes(x: torch.Tensor, w: torch.Tensor, acc: torch.dtype, allow_tf32: bool) -> dict:
    """Kernel meta-parameters for the dtypes: ACC_DTYPE (the compute dtype, params'), DOT_DTYPE
    (the inputs' dtype if they share one, else ACC_DTYPE), UPCAST (see tiles.dot_acc) and
    PRECISION (tf32 for fp32 dots where the forward found torch allowing it)."""
    dot = x.dtype if x.dtype == w.dtype else acc
    tf32 = dot == torch.float32 and allow_tf32 and not INTERPRET
    return dict(
        ACC_DTYPE=TL_DTYPES[acc], DOT_DTYPE=TL_DTYPES[dot],
        UPCAST=INTERPRET and dot in (torch.float16, torch.bfloat16), PRECISION="tf32" if tf32 else "ieee",
    )


# CUDA's limit on grid dimensions y and z: the forward's and dx's split axis.
MAX_GRID_YZ = 65535
# The backward's per-split dx̂ partials, (splits, B, D) in the compute dtype, may take this
# much memory at most: more splits than fit are merged into fewer, whatever chunk_size asks
# (a chunk of 64 classes at B = 8192, C = 2M, D = 512 would otherwise need 524 GB). 256 MiB
# is 2 splits at B = 32768, D = 512 in fp64, and splits beyond a few waves buy nothing.
PARTIAL_BUDGET_BYTES = 256 << 20


def split_size(num_classes: int, chunk: int, B: int, D: int, acc_bytes: int, cfg: Config,
               device: torch.device) -> int:
    """Classes per program of the walks over the classes (forward and dx), in whole tiles.

    chunk > 0 asks for that many classes a split (chunk_size), 0 for enough splits for two
    waves of programs over the device; either way the splits are at most MAX_GRID_YZ and
    their dx̂ partials (B * D * acc_bytes each) within PARTIAL_BUDGET_BYTES, so chunk_size
    is a lower bound, raised where it would break either."""
    def whole_tiles(classes):
        return triton.cdiv(classes, cfg.BLOCK_C) * cfg.BLOCK_C

    if chunk > 0:
        split = whole_tiles(chunk)
    else:
        units = 1 if INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count
        split = whole_tiles(triton.cdiv(num_classes, triton.cdiv(2 * units, triton.cdiv(B, cfg.BLOCK_B))))
    most = min(MAX_GRID_YZ, max(1, PARTIAL_BUDGET_BYTES // (B * D * acc_bytes)))
    if triton.cdiv(num_classes, split) > most:
        split = whole_tiles(triton.cdiv(num_classes, most))
    return split
