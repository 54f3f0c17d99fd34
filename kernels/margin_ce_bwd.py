"""Backward: dx and dW of the row statistics, recomputing each cosine tile from the saved
lse (docs/design.md §3; deterministic: §4) without atomics.

With dcos from kernels/tiles.py and the norm folded into the GEMM operand,

    dx̂_i = Σ_j dcos_ij ŵ_j = Σ_j (dcos_ij / r_j) w_j,   dŵ_j = Σ_i (dcos_ij / n_i) x_i,

then dx_i = (dx̂_i - x̂_i a_i) / n_i with a_i = <x̂_i, dx̂_i> = Σ_j dcos_ij cos_ij, and
dw_j = (dŵ_j - ŵ_j b_j) / r_j with b_j = Σ_i dcos_ij cos_ij (no normalised copy of x or W).

Two kernels, each owning what it writes: dx programs (row block, slice of D, class split)
walk their split's class tiles and write a partial dx̂ to a (splits, B, D) buffer that
fastmargin/gpu_host.py sums in a fixed order; dW programs (class tile, slice of D) walk every row
block and write their dW rows once. Each recomputes the tile's cosines (one GEMM) and
does one more, so forward + backward is 5 GEMMs of 2 B C D FLOPs (the 4-GEMM variant
shares the recomputation between dx and dW, but then one of them needs atomics). Where D
is wider than BLOCK_DO, each slice of D recomputes the cosines again (at D = 512 and
BLOCK_DO = 256: 7 GEMMs); full-width outputs spill registers on sm_90 (kernels/launch.py),
so which costs less is a question for a GPU measurement (bench/gpu_check.sh).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmargin.margins import NORM_EPS

from . import launch
from .margin import row_params
from .tiles import E_FLOOR, backward_rows, class_rows, cos_tile, dcos_tile, dot_acc, pow2, scale_fp16_operand, spread

_NORM_EPS = tl.constexpr(NORM_EPS)
# 1 / max(||v||, NORM_EPS) above this marks a zero row: a nonzero fp16 vector has a norm of at
# least 2^-24, so with fp16 operands only an all-zero x or W row gets here. Its other GEMM
# operand is that zero row, so its g (x 1e12: inf in fp16, and inf * 0 = NaN) is set to 0.
_ZERO_ROW_INV_NORM = tl.constexpr(0.5 / NORM_EPS)


@triton.jit
def margin_ce_bwd_dx_kernel(
    # inputs: x (B, D), w (C*K, D), labels (B,) int64; norms (B,), (B,), (C*K,); the margin's
    # params (NUM_PARAMS, R) and its strides
    x_ptr, w_ptr, labels_ptr, x_norm_ptr, x_inv_norm_ptr, w_inv_norm_ptr, params_ptr, stride_pp, stride_pb,
    # lse and the gradients of the three statistics, (B,) each, contiguous, ACC_DTYPE
    lse_ptr, g_lse_ptr, g_target_ptr, g_sum_ptr,
    # outputs: partial dx̂ (splits, B, D) and Σ_j dz_ij zc_ij (splits, B), ACC_DTYPE
    dx_hat_ptr, norm_grad_ptr,
    B, C, D, K, split_size,
    stride_xb, stride_xd, stride_wn, stride_wd,
    KIND: tl.constexpr, SPHERE_M: tl.constexpr, NONTARGET: tl.constexpr, DETACHED: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    prow = row_params(params_ptr, rows, B, stride_pp, stride_pb)
    row_valid, labels, x_inv_norm, row_scale, lse, g_lse, g_target, g_sum, nt = backward_rows(
        rows, B, labels_ptr, x_norm_ptr, x_inv_norm_ptr, prow, stride_pp, lse_ptr, g_lse_ptr, g_target_ptr,
        g_sum_ptr, KIND, NONTARGET)
    d_out = pid_d.to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO)

    dx_hat = tl.zeros((BLOCK_B, BLOCK_DO), ACC_DTYPE)
    norm_grad = tl.zeros((BLOCK_B,), ACC_DTYPE)
    e_run = tl.full((BLOCK_B,), E_FLOOR, tl.int32)  # fp16 operands: the rows' scales (tiles.py)
    c_start = pid_s * split_size
    c_end = tl.minimum(c_start + split_size, C)
    for c0 in range(c_start, c_end, BLOCK_C):
        _cos_n, cos, best = cos_tile(
            x_ptr, w_ptr, w_inv_norm_ptr, x_inv_norm, rows, c0, B, C, D, K,
            stride_xb, stride_xd, stride_wn, stride_wd,
            BLOCK_B, BLOCK_C, K_PAD, BLOCK_D, ACC_DTYPE, DOT_DTYPE, UPCAST, PRECISION,
        )
        cols = c0 + tl.arange(0, BLOCK_C)
        dcos, dz_zc = dcos_tile(cos, cols, C, labels, row_valid, row_scale, lse, g_lse, g_target, g_sum,
                                prow, stride_pp, nt, KIND, SPHERE_M, NONTARGET, DETACHED)
        norm_grad += tl.sum(dz_zc, axis=1)
        w_row, n_valid = class_rows(c0, C, K, BLOCK_C, K_PAD)
        w_inv_norm = tl.load(w_inv_norm_ptr + w_row, mask=n_valid, other=0.0)
        g = spread(dcos, best, BLOCK_B, BLOCK_C, K_PAD) * w_inv_norm[None, :]
        if DOT_DTYPE == tl.float16:
            g = tl.where((w_inv_norm > _ZERO_ROW_INV_NORM)[None, :], 0.0, g)
            g, dx_hat, e_run = scale_fp16_operand(g, dx_hat, e_run, 1)
        w = tl.load(w_ptr + w_row[:, None] * stride_wn + d_out[None, :] * stride_wd,
                    mask=n_valid[:, None] & (d_out < D)[None, :], other=0.0)
        dx_hat = dot_acc(g, w, dx_hat, DOT_DTYPE, UPCAST, PRECISION)

    if DOT_DTYPE == tl.float16:
        dx_hat = dx_hat * pow2(e_run - 14)[:, None]
    out = pid_s.to(tl.int64) * B + rows
    tl.store(dx_hat_ptr + out[:, None] * D + d_out[None, :], dx_hat, mask=row_valid[:, None] & (d_out < D)[None, :])
    if pid_d == 0:
        tl.store(norm_grad_ptr + out, norm_grad, mask=row_valid)


@triton.jit
def margin_ce_bwd_dw_kernel(
    # inputs as margin_ce_bwd_dx_kernel's, and w's norms (C*K,)
    x_ptr, w_ptr, labels_ptr, x_norm_ptr, x_inv_norm_ptr, w_norm_ptr, w_inv_norm_ptr, params_ptr, stride_pp,
    stride_pb, lse_ptr, g_lse_ptr, g_target_ptr, g_sum_ptr,
    # output: dw (C*K, D), w's dtype, its own strides
    dw_ptr,
    B, C, D, K,
    stride_xb, stride_xd, stride_wn, stride_wd, stride_dwn, stride_dwd,
    KIND: tl.constexpr, SPHERE_M: tl.constexpr, NONTARGET: tl.constexpr, DETACHED: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    c0 = pid_c * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C)
    w_row, n_valid = class_rows(c0, C, K, BLOCK_C, K_PAD)
    d_out = pid_d.to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO)

    dw_hat = tl.zeros((BLOCK_C * K_PAD, BLOCK_DO), ACC_DTYPE)  # Σ_i (dcos_ij / n_i) x_i = dŵ_j
    b = tl.zeros((BLOCK_C * K_PAD,), ACC_DTYPE)               # b_j = Σ_i dcos_ij cos_ij
    e_run = tl.full((BLOCK_C * K_PAD,), E_FLOOR, tl.int32)   # fp16 operands: the classes' scales (tiles.py)
    for r0 in range(0, B, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B).to(tl.int64)
        prow = row_params(params_ptr, rows, B, stride_pp, stride_pb)
        row_valid, labels, x_inv_norm, row_scale, lse, g_lse, g_target, g_sum, nt = backward_rows(
            rows, B, labels_ptr, x_norm_ptr, x_inv_norm_ptr, prow, stride_pp, lse_ptr, g_lse_ptr, g_target_ptr,
            g_sum_ptr, KIND, NONTARGET)
        cos_n, cos, best = cos_tile(
            x_ptr, w_ptr, w_inv_norm_ptr, x_inv_norm, rows, c0, B, C, D, K,
            stride_xb, stride_xd, stride_wn, stride_wd,
            BLOCK_B, BLOCK_C, K_PAD, BLOCK_D, ACC_DTYPE, DOT_DTYPE, UPCAST, PRECISION,
        )
        dcos, _dz_zc = dcos_tile(cos, cols, C, labels, row_valid, row_scale, lse, g_lse, g_target, g_sum,
                                 prow, stride_pp, nt, KIND, SPHERE_M, NONTARGET, DETACHED)
        g = spread(dcos, best, BLOCK_B, BLOCK_C, K_PAD)
        b += tl.sum(g * cos_n, axis=0)
        x = tl.load(x_ptr + rows[:, None] * stride_xb + d_out[None, :] * stride_xd,
                    mask=row_valid[:, None] & (d_out < D)[None, :], other=0.0)
        g = g * x_inv_norm[:, None]
        if DOT_DTYPE == tl.float16:
            g = tl.where((x_inv_norm > _ZERO_ROW_INV_NORM)[:, None], 0.0, g)
            g, dw_hat, e_run = scale_fp16_operand(g, dw_hat, e_run, 0)
        dw_hat = dot_acc(tl.trans(g), x, dw_hat, DOT_DTYPE, UPCAST, PRECISION)

    if DOT_DTYPE == tl.float16:
        dw_hat = dw_hat * pow2(e_run - 14)[:, None]
    # dw_j = (dŵ_j - w_j b_j / r_j) / r_j; below NORM_EPS the norm is a constant, no radial term.
    w_norm = tl.load(w_norm_ptr + w_row, mask=n_valid, other=1.0)
    w_inv_norm = tl.load(w_inv_norm_ptr + w_row, mask=n_valid, other=0.0)
    b_over_r = tl.where(w_norm < _NORM_EPS, 0.0, b * w_inv_norm)
    tile = n_valid[:, None] & (d_out < D)[None, :]
    w = tl.load(w_ptr + w_row[:, None] * stride_wn + d_out[None, :] * stride_wd, mask=tile, other=0.0)
    dw = (dw_hat - w.to(ACC_DTYPE) * b_over_r[:, None]) * w_inv_norm[:, None]
    out_dtype: tl.constexpr = dw_ptr.dtype.element_ty
    if out_dtype.is_fp16() or out_dtype.is_bf16():  # via fp32: the interpreter botches fp64 -> bf16
        dw = dw.to(tl.float32)
    tl.store(dw_ptr + w_row[:, None] * stride_dwn + d_out[None, :] * stride_dwd, dw.to(out_dtype), mask=tile)


def backward(g_lse, g_target, g_sum, x, w, labels, lse, x_norm, x_inv_norm, w_norm, w_inv_norm, params, flags,
             sub_centers, chunk, allow_tf32):
    """(dx̂ per split (splits, B, D), Σ_j dz_ij zc_ij per split (splits, B), dw like w) for the
    upstream gradients (B,) of (lse, z_target, z_sum) (fastmargin.gpu_host.register's
    contract: it sums the splits and finishes dx). B >= 1; the (B,) vectors, norms and params
    contiguous in the compute dtype."""
    B, D = x.shape
    C = w.shape[0] // sub_centers
    dw = torch.empty_like(w)
    margin_args, margin_meta = launch.margin_args(params, flags, B)
    meta = dict(**margin_meta, **launch.dtypes(x, w, params.dtype, allow_tf32))
    rows = (labels, x_norm, x_inv_norm)
    vectors = (lse, g_lse, g_target, g_sum)
    cfg = launch.config(D, sub_centers, params.dtype, backward=True)
    row_blocks, d_blocks = triton.cdiv(B, cfg.BLOCK_B), triton.cdiv(D, cfg.BLOCK_DO)
    split = launch.split_size(C, chunk, B, D, params.element_size(), cfg, x.device)
    splits = triton.cdiv(C, split)
    strides = (x.stride(0), x.stride(1), w.stride(0), w.stride(1))

    dx_hat = x.new_empty(splits, B, D, dtype=params.dtype)
    norm_grad = x.new_empty(splits, B, dtype=params.dtype)
    with launch.on_device(x.device):
        margin_ce_bwd_dx_kernel[(row_blocks, d_blocks, splits)](
            x, w, *rows, w_inv_norm, *margin_args, *vectors, dx_hat, norm_grad,
            B, C, D, sub_centers, split, *strides, **meta, **cfg.meta(with_output_block=True),
        )
        margin_ce_bwd_dw_kernel[(triton.cdiv(C, cfg.BLOCK_C), d_blocks)](
            x, w, *rows, w_norm, w_inv_norm, *margin_args, *vectors, dw,
            B, C, D, sub_centers, *strides, dw.stride(0), dw.stride(1), **meta, **cfg.meta(with_output_block=True),
        )
    return dx_hat, norm_grad, dw
