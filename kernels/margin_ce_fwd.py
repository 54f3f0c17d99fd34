"""Forward: the margin logits' row statistics (lse, z_target, z_sum) in one pass over the
classes, never holding more than a tile of logits (docs/design.md §2, §4).

Program (row block, split) walks its split's class tiles, keeping each row's online
log-sum-exp (running max and sum of exp(z - max)), Σ_j z_ij and z_iy, and writes them
to (splits, B) buffers. fastmargin/gpu_host.py merges the splits in a fixed order, so the
result does not depend on which program finishes first: no atomics, no locks.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import launch
from .margin import row_params
from .tiles import cos_tile, logits, nt_rows, row_scales


@triton.jit
def margin_ce_fwd_kernel(
    # inputs: x (B, D), w (C*K, D), labels (B,) int64; norms (B,), (B,), (C*K,); the margin's
    # params (NUM_PARAMS, R) and its strides
    x_ptr, w_ptr, labels_ptr, x_norm_ptr, x_inv_norm_ptr, w_inv_norm_ptr, params_ptr, stride_pp, stride_pb,
    # outputs, (splits, B) each, in ACC_DTYPE
    row_max_ptr, row_sum_exp_ptr, z_sum_ptr, z_target_ptr,
    # sizes; split_size classes per program, a multiple of BLOCK_C
    B, C, D, K, split_size,
    stride_xb, stride_xd, stride_wn, stride_wd,
    KIND: tl.constexpr, SPHERE_M: tl.constexpr, NONTARGET: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_valid = rows < B
    labels = tl.load(labels_ptr + rows, mask=row_valid, other=-1)
    x_inv_norm = tl.load(x_inv_norm_ptr + rows, mask=row_valid, other=0.0)
    prow = row_params(params_ptr, rows, B, stride_pp, stride_pb)
    row_scale = row_scales(prow, stride_pp, x_norm_ptr, rows, row_valid, KIND)
    nt = nt_rows(prow, stride_pp, NONTARGET)

    run_max = tl.full((BLOCK_B,), float("-inf"), ACC_DTYPE)
    run_sum = tl.zeros((BLOCK_B,), ACC_DTYPE)
    z_sum = tl.zeros((BLOCK_B,), ACC_DTYPE)
    z_target = tl.zeros((BLOCK_B,), ACC_DTYPE)
    c_start = pid_s * split_size
    c_end = tl.minimum(c_start + split_size, C)
    for c0 in range(c_start, c_end, BLOCK_C):
        _cos_n, cos, _best = cos_tile(
            x_ptr, w_ptr, w_inv_norm_ptr, x_inv_norm, rows, c0, B, C, D, K,
            stride_xb, stride_xd, stride_wn, stride_wd,
            BLOCK_B, BLOCK_C, K_PAD, BLOCK_D, ACC_DTYPE, DOT_DTYPE, UPCAST, PRECISION,
        )
        cols = c0 + tl.arange(0, BLOCK_C)
        zc, is_target, _cos_target = logits(cos, cols, C, labels, prow, stride_pp, nt, KIND, SPHERE_M, NONTARGET)
        z = tl.where((cols < C)[None, :], row_scale[:, None] * zc, float("-inf"))
        z_target += tl.sum(tl.where(is_target, z, 0.0), axis=1)
        z_sum += tl.sum(tl.where((cols < C)[None, :], z, 0.0), axis=1)
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max

    out = pid_s.to(tl.int64) * B + rows
    tl.store(row_max_ptr + out, run_max, mask=row_valid)
    tl.store(row_sum_exp_ptr + out, run_sum, mask=row_valid)
    tl.store(z_sum_ptr + out, z_sum, mask=row_valid)
    tl.store(z_target_ptr + out, z_target, mask=row_valid)


def forward(x, w, labels, x_norm, x_inv_norm, w_inv_norm, params, flags, sub_centers, chunk, allow_tf32):
    """Per-split partials (row_max, row_sum_exp, z_sum, z_target), (splits, B) each in the
    compute dtype (fastmargin.gpu_host.register's contract; it merges them).

    x (B, D) and w (C*K, D) any float dtype and strides, B >= 1; labels (B,) int64, a label
    outside [0, C) meaning no target column; norms and params (fastmargin.margins.lower) in
    the compute dtype. chunk: classes per program, 0 for the default split.
    """
    B, D = x.shape
    C = w.shape[0] // sub_centers
    margin_args, margin_meta = launch.margin_args(params, flags, B)
    del margin_meta["DETACHED"]  # the forward has no gradient
    cfg = launch.config(D, sub_centers, params.dtype, backward=False)
    row_blocks = triton.cdiv(B, cfg.BLOCK_B)
    split = launch.split_size(C, chunk, B, D, params.element_size(), cfg, x.device)
    splits = triton.cdiv(C, split)
    row_max, row_sum_exp, z_sum, z_target = (x.new_empty(splits, B, dtype=params.dtype) for _ in range(4))
    with launch.on_device(x.device):
        margin_ce_fwd_kernel[(row_blocks, splits)](
            x, w, labels, x_norm, x_inv_norm, w_inv_norm, *margin_args,
            row_max, row_sum_exp, z_sum, z_target,
            B, C, D, sub_centers, split,
            x.stride(0), x.stride(1), w.stride(0), w.stride(1),
            **margin_meta, **cfg.meta(), **launch.dtypes(x, w, params.dtype, allow_tf32),
        )
    return row_max, row_sum_exp, z_sum, z_target
