"""Jit helpers that the forward and backward kernels share: one (rows x classes) tile of
cosines, its logits and its dcos (docs/design.md §1, §3).

A tile covers BLOCK_B rows and BLOCK_C classes. With K sub-centers a class owns the K
consecutive weight rows c*K .. c*K + K-1, so the tile's weight rows are a contiguous run,
laid out as BLOCK_N = BLOCK_C * K_PAD columns (K_PAD = next power of two >= K; column
n is class c0 + n // K_PAD, sub-center n % K_PAD, masked when that is >= K). The max
over the sub-centers is then a reshape to (BLOCK_B, BLOCK_C, K_PAD) and a max over the
last axis, and the gradient goes back to the arg-max column by the inverse (spread).

Every offset is int64: B*D, C*K*D and (for PML's W.t()) d * C*K pass 2^31 at real sizes.
"""

import triton
import triton.language as tl

from .margin import P_SCALE, SPHERE, nontarget, nontarget_grad, nontarget_rows, param, psi, psi_grad


@triton.jit
def row_scales(prow, stride_pp, x_norm_ptr, rows, row_valid, KIND: tl.constexpr):
    """S_i (BLOCK_B,): s, or s ||x_i|| for SphereFace."""
    scale = param(prow, stride_pp, P_SCALE)
    if KIND == SPHERE:
        scale = scale * tl.load(x_norm_ptr + rows, mask=row_valid, other=0.0)
    return scale


@triton.jit
def backward_rows(rows, B, labels_ptr, x_norm_ptr, x_inv_norm_ptr, prow, stride_pp, lse_ptr, g_lse_ptr,
                  g_target_ptr, g_sum_ptr, KIND: tl.constexpr, NONTARGET: tl.constexpr):
    """What the backward needs of rows (BLOCK_B,): which exist, their labels, 1 / n_i, S_i,
    lse_i, the gradients (g_lse, g_target, g_sum) of the three statistics and the rows'
    non-target params (nt_rows)."""
    row_valid = rows < B
    labels = tl.load(labels_ptr + rows, mask=row_valid, other=-1)
    x_inv_norm = tl.load(x_inv_norm_ptr + rows, mask=row_valid, other=0.0)
    row_scale = row_scales(prow, stride_pp, x_norm_ptr, rows, row_valid, KIND)
    lse = tl.load(lse_ptr + rows, mask=row_valid, other=0.0)
    g_lse = tl.load(g_lse_ptr + rows, mask=row_valid, other=0.0)
    g_target = tl.load(g_target_ptr + rows, mask=row_valid, other=0.0)
    g_sum = tl.load(g_sum_ptr + rows, mask=row_valid, other=0.0)
    return row_valid, labels, x_inv_norm, row_scale, lse, g_lse, g_target, g_sum, nt_rows(prow, stride_pp, NONTARGET)


@triton.jit
def nt_rows(prow, stride_pp, NONTARGET: tl.constexpr):
    """The rows' non-target params (margin.nontarget_rows), loaded once a row block, outside
    the class loop; None, and no load, without a non-target transform."""
    if NONTARGET:  # one return: Triton types every return of a function, taken or not
        nt = nontarget_rows(prow, stride_pp)
    else:
        nt = None
    return nt


@triton.jit
def dot_acc(a, b, acc, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b, the operands rounded to DOT_DTYPE (the inputs' dtype: bf16 and fp16 run
    on tensor cores) and accumulated in acc's dtype (fp32, or fp64). UPCAST feeds the rounded
    operands to the dot as fp32, which gives the same products (a bf16 or fp16 product is
    exact in fp32): Triton 3.8's interpreter computes half-precision dots wrongly."""
    a = a.to(DOT_DTYPE)
    b = b.to(DOT_DTYPE)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


# fp16 GEMM operands (docs/design.md §4: never drop small softmax entries). The backward's operand g
# is about s p / (B ||x||) for a class that is no row's target, p ~ 1/C: 1e-8 and below,
# under half the smallest fp16 subnormal, so a plain cast flushes most of the negative-class
# gradient. Each row of the dx operand and each class column of the dW operand is therefore
# scaled by a power of two, 2^(14 - E), E the running maximum over the tiles so far of
# floor(log2 max|g|) along it: its largest entry lands in [2^14, 2^15), under fp16's 65504,
# and entries down to 2^-28 of it keep fp16's full precision. The accumulator's row holds
# the sum times that same power of two; when E grows, the row is rescaled by 2^(E_old - E)
# (as an online softmax rescales its sum), and at the end divided by it: powers of two, so
# every rescaling is exact in fp32 and the result differs from an unscaled one only by the
# fp16 rounding of the operand, now relative instead of absolute. bf16 has fp32's range
# and needs none of this.
E_FLOOR = tl.constexpr(-100)
E_CEIL = tl.constexpr(100)


@triton.jit
def pow2(e):
    """2^e as float32 for int32 e in [-126, 127], exactly (the exponent field)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def scale_fp16_operand(g, acc, e_run, AXIS: tl.constexpr):
    """(g scaled along AXIS, acc rescaled, the new running exponents): g (M, N) float32, the
    GEMM operand; AXIS 1 scales each of its rows (the dx kernel: acc's rows are g's rows),
    0 each column (the dW kernel: acc's rows are g's columns); e_run int32, one per acc row."""
    m = tl.max(tl.abs(g), axis=AXIS)
    e = ((m.to(tl.int32, bitcast=True) >> 23) & 255) - 127  # floor(log2 m); -127 for m = 0
    e_new = tl.minimum(tl.maximum(e_run, e), E_CEIL)
    acc = acc * pow2(tl.maximum(e_run - e_new, -126))[:, None]
    sigma = pow2(14 - e_new)
    g = g * (sigma[:, None] if AXIS == 1 else sigma[None, :])
    return g, acc, e_new


@triton.jit
def class_rows(c0, C, K, BLOCK_C: tl.constexpr, K_PAD: tl.constexpr):
    """The weight rows of the tile's BLOCK_N columns (int64) and which of them exist."""
    n = tl.arange(0, BLOCK_C * K_PAD)
    cls = c0 + n // K_PAD
    sub = n % K_PAD
    return cls.to(tl.int64) * K + sub, (cls < C) & (sub < K)


@triton.jit
def cos_tile(x_ptr, w_ptr, w_inv_norm_ptr, x_inv_norm, rows, c0, B, C, D, K,
             stride_xb, stride_xd, stride_wn, stride_wd,
             BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
             ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Cosines of rows (BLOCK_B,) against classes c0 .. c0 + BLOCK_C - 1.

    Returns cos_n (BLOCK_B, BLOCK_N), every sub-center's cosine; cos (BLOCK_B, BLOCK_C), the
    max over each class's sub-centers (-2 in columns >= C); best (BLOCK_B, BLOCK_C) int32, the
    first arg-max sub-center. x_inv_norm (BLOCK_B,) is 1 / max(||x_i||, NORM_EPS).
    """
    w_row, n_valid = class_rows(c0, C, K, BLOCK_C, K_PAD)
    row_valid = rows < B
    acc = tl.zeros((BLOCK_B, BLOCK_C * K_PAD), ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        x = tl.load(x_ptr + rows[:, None] * stride_xb + d[None, :] * stride_xd,
                    mask=row_valid[:, None] & (d < D)[None, :], other=0.0)
        w = tl.load(w_ptr + w_row[:, None] * stride_wn + d[None, :] * stride_wd,
                    mask=n_valid[:, None] & (d < D)[None, :], other=0.0)
        acc = dot_acc(x, tl.trans(w), acc, DOT_DTYPE, UPCAST, PRECISION)
    w_inv_norm = tl.load(w_inv_norm_ptr + w_row, mask=n_valid, other=0.0)
    cos_n = acc * x_inv_norm[:, None] * w_inv_norm[None, :]
    if K_PAD == 1:
        cos = tl.where(n_valid[None, :], cos_n, -2.0)
        return cos_n, cos, tl.zeros((BLOCK_B, BLOCK_C), tl.int32)
    # Padded sub-centers and missing classes get -2, below any cosine, so they never win.
    cos3 = tl.reshape(tl.where(n_valid[None, :], cos_n, -2.0), (BLOCK_B, BLOCK_C, K_PAD))
    cos = tl.max(cos3, axis=2)
    # tl.max may drop a NaN; torch's max over the sub-centers (the reference) keeps it.
    cos = tl.where(tl.max((cos3 != cos3).to(tl.int32), axis=2) > 0, float("nan"), cos)
    k = tl.arange(0, K_PAD)
    best = tl.min(tl.where(cos3 == cos[:, :, None], k[None, None, :], K_PAD), axis=2)
    return cos_n, cos, best


@triton.jit
def spread(v, best, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, K_PAD: tl.constexpr):
    """(BLOCK_B, BLOCK_C) values onto the tile's (BLOCK_B, BLOCK_N) columns: each at its
    class's arg-max sub-center, 0 at the others (the gradient of the max)."""
    if K_PAD == 1:
        return v
    k = tl.arange(0, K_PAD)
    v3 = tl.where(k[None, None, :] == best[:, :, None], v[:, :, None], 0.0)
    return tl.reshape(v3, (BLOCK_B, BLOCK_C * K_PAD))


@triton.jit
def logits(cos, cols, C, labels, prow, stride_pp, nt, KIND: tl.constexpr, SPHERE_M: tl.constexpr,
           NONTARGET: tl.constexpr):
    """zc = z / S (BLOCK_B, BLOCK_C): cos, or its non-target transform nontarget(cos) where
    NONTARGET (nt: the rows' params, nt_rows), with psi(cos) in each row's target column; that
    column's mask (never a padded column: a label C, no target here, must not match one);
    and the target's cosine (BLOCK_B,). psi runs on one cosine a row, not on the tile."""
    is_target = (cols[None, :] == labels[:, None]) & (cols < C)[None, :]
    cos_target = tl.sum(tl.where(is_target, cos, 0.0), axis=1)
    psi_target = psi(cos_target, prow, stride_pp, KIND, SPHERE_M)
    if NONTARGET:
        others = nontarget(cos, nt[0], nt[1], nt[2], nt[3], nt[4])
    else:
        others = cos
    return tl.where(is_target, psi_target[:, None], others), is_target, cos_target


@triton.jit
def dcos_tile(cos, cols, C, labels, row_valid, row_scale, lse, g_lse, g_target, g_sum, prow, stride_pp, nt,
              KIND: tl.constexpr, SPHERE_M: tl.constexpr, NONTARGET: tl.constexpr, DETACHED: tl.constexpr):
    """dcos (BLOCK_B, BLOCK_C) of docs/design.md §3, with dz_ij = g_lse_i p_ij + g_target_i [j = y_i]
    + g_sum_i and p_ij = exp(z_ij - lse_i): dcos_ij = S_i dz_ij psi'(c_iy) in the target
    column, S_i dz_ij nontarget'(c_ij) in the others where NONTARGET, else S_i dz_ij; and
    dz * zc, whose row sums are SphereFace's gradient through S_i = s ||x_i||. Both are 0
    outside the B x C block: a where, not a product, since exp(S zc - lse) of a padded row
    (lse = 0) may overflow to inf."""
    zc, is_target, cos_target = logits(cos, cols, C, labels, prow, stride_pp, nt, KIND, SPHERE_M, NONTARGET)
    p = tl.exp(row_scale[:, None] * zc - lse[:, None])
    dz = g_lse[:, None] * p + tl.where(is_target, g_target[:, None], 0.0) + g_sum[:, None]
    dz = tl.where(row_valid[:, None] & (cols < C)[None, :], dz, 0.0)
    grad_target = psi_grad(cos_target, prow, stride_pp, KIND, SPHERE_M, DETACHED)
    if NONTARGET:
        grad_others = nontarget_grad(cos, nt[0], nt[1], nt[2], nt[3], nt[4])
        dcos = row_scale[:, None] * dz * tl.where(is_target, grad_target[:, None], grad_others)
    else:
        dcos = row_scale[:, None] * dz * tl.where(is_target, grad_target[:, None], 1.0)
    return dcos, dz * zc
