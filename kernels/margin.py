"""The margin math of docs/design.md §1 and §3 as Triton jit helpers: psi (the target transform), psi'
and the non-target transform.

fastmargin/margins.py (PyTorch, the oracle's) and csrc/margin.h (C++/CUDA) compute the same
expressions with the same branches; tests/test_margin_math.py holds the three to each other.
Values are in the compute dtype (float32, or float64 when an input is). Which psi is a
constexpr (KIND, fastmargin.margins' kinds); its numbers are the rows of the lowered
margin's params tensor (fastmargin.margins.lower), read per row through `prow`, the (BLOCK_B,)
pointers to each row's column, so that float64 kernels get them in float64 (a Python float
argument of a Triton kernel is float32) and per-row margins need no other code.
"""

import math

import triton
import triton.language as tl

from fastmargin import margins

# Module constants are tl.constexpr: the Triton compiler refuses other globals in a kernel
# (the interpreter does not check, tests/test_triton.py compiles for sm_90 to catch it).
ADDITIVE, ARC, COMBINED, SPHERE = (tl.constexpr(k) for k in (margins.ADDITIVE, margins.ARC, margins.COMBINED,
                                                             margins.SPHERE))

# Rows of the params tensor (fastmargin.margins.PARAMS).
(P_SCALE, P_M1, P_M2, P_M3, P_LAMBDA, P_COS_M2, P_SIN_M2, P_COS_LO, P_COS_HI, P_CLAMP_GRAD, P_COS_LIMIT, P_SLOPE,
 P_SHIFT, P_TOP_LIMIT, P_TOP_VALUE, P_NT_LO, P_NT_HI, P_NT_A0, P_NT_A1, P_NT_A2) = (
    tl.constexpr(margins.PARAMS.index(name)) for name in margins.PARAMS
)
PI = tl.constexpr(math.pi)


@triton.jit
def row_params(params_ptr, rows, B, stride_pp, stride_pb):
    """(BLOCK_B,) pointers to each row's column of params (column 0 for all when
    stride_pb = 0); rows past B read row B - 1's, which nothing uses."""
    return params_ptr + tl.minimum(rows, B - 1) * stride_pb


@triton.jit
def param(prow, stride_pp, WHICH: tl.constexpr):
    """Param WHICH of each row, (BLOCK_B,)."""
    return tl.load(prow + WHICH * stride_pp)


# Cephes' atan (Moshier): range reduction by tan(3 pi / 8) and 0.66, then x + x z P(z)/Q(z),
# z = x^2. Accurate to a double's last bits (tests check 1e-15), so one formula serves
# float32 and float64. Triton has no acos of its own (libdevice's does not run under
# TRITON_INTERPRET=1), hence this. A Python float in a kernel is a float32 literal, so
# constants that need all their bits are made in the tensor's dtype, tl.full((), v, dtype).
# (Inline, not a helper: each jit call costs the interpreter a re-patch of triton.language.)
_ATAN_P0, _ATAN_P1, _ATAN_P2, _ATAN_P3, _ATAN_P4 = (tl.constexpr(v) for v in (
    -8.750608600031904122785e-1, -1.615753718733365076637e1, -7.500855792314704667340e1,
    -1.228866684490136173410e2, -6.485021904942025371773e1,
))
_ATAN_Q0, _ATAN_Q1, _ATAN_Q2, _ATAN_Q3, _ATAN_Q4 = (tl.constexpr(v) for v in (
    2.485846490142306297962e1, 1.650270098316988542046e2, 4.328810604912902668951e2,
    4.853903996359136964868e2, 1.945506571482613964425e2,
))


@triton.jit
def atan_nonnegative(x):
    """atan(x) for x >= 0, elementwise, in x's dtype."""
    big = x > 2.41421356237309504880
    mid = (x > 0.66) & (x <= 2.41421356237309504880)
    dt = x.dtype
    base = tl.where(big, tl.full((), PI / 2, dt), tl.where(mid, tl.full((), PI / 4, dt), 0.0))
    r = tl.where(big, -1.0 / tl.where(big, x, 1.0), tl.where(mid, (x - 1.0) / (x + 1.0), x))
    z = r * r
    p = (((tl.full((), _ATAN_P0, dt) * z + tl.full((), _ATAN_P1, dt)) * z + tl.full((), _ATAN_P2, dt)) * z
         + tl.full((), _ATAN_P3, dt)) * z + tl.full((), _ATAN_P4, dt)
    q = ((((z + tl.full((), _ATAN_Q0, dt)) * z + tl.full((), _ATAN_Q1, dt)) * z + tl.full((), _ATAN_Q2, dt)) * z
         + tl.full((), _ATAN_Q3, dt)) * z + tl.full((), _ATAN_Q4, dt)
    return base + r + r * z * p / q


@triton.jit
def acos(c):
    """acos(c) for c in (-1, 1): theta = 2 atan(sqrt((1 - c) / (1 + c))), tan(theta/2) of the
    half-angle formula; 1 - c is exact near c = 1 (Sterbenz), where acos is steepest."""
    return 2.0 * atan_nonnegative(tl.sqrt((1.0 - c) / (1.0 + c)))


@triton.jit
def clamp_cos(cos, prow, stride_pp):
    """cos clamped to [-1 + COS_EPS, 1 - COS_EPS], NaN kept NaN (as torch.clamp does)."""
    return tl.clamp(cos, param(prow, stride_pp, P_COS_LO), param(prow, stride_pp, P_COS_HI),
                    propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _chebyshev_t_u(c, SPHERE_M: tl.constexpr):
    """T_m(c) = cos(m theta) and U_{m-1}(c) = sin(m theta) / sin(theta), by recurrence."""
    t_prev = tl.full(c.shape, 1.0, c.dtype)
    t = c
    u_prev = tl.zeros(c.shape, c.dtype)
    u = tl.full(c.shape, 1.0, c.dtype)
    for _ in tl.static_range(SPHERE_M - 1):
        t_next = 2.0 * c * t - t_prev
        u_next = 2.0 * c * u - u_prev
        t_prev = t
        t = t_next
        u_prev = u
        u = u_next
    return t, u


@triton.jit
def _sphere_sign_k(c, SPHERE_M: tl.constexpr):
    """(-1)^k and k = floor(m theta / pi), clamped to [0, m - 1]."""
    k = tl.floor(SPHERE_M * acos(c) / tl.full((), PI, c.dtype))
    k = tl.minimum(tl.maximum(k, 0.0), SPHERE_M - 1.0)
    odd = (k - 2.0 * tl.floor(k / 2.0)) == 1.0
    return tl.where(odd, -1.0, 1.0).to(c.dtype), k.to(c.dtype)


@triton.jit
def _sin_theta(c):
    """sqrt((1 - c)(1 + c)): 1 - c is exact near c = 1 (Sterbenz), where 1 - c*c cancels."""
    return tl.sqrt((1.0 - c) * (1.0 + c))


@triton.jit
def psi(cos, prow, stride_pp, KIND: tl.constexpr, SPHERE_M: tl.constexpr):
    """psi(cos) of each row's cosine (BLOCK_B,) (fastmargin.margins.target_value): every theta
    policy is numbers in params (the line below cos_theta_limit, top_value above top_limit)."""
    m3 = param(prow, stride_pp, P_M3)
    if KIND == ADDITIVE:
        return cos - m3
    c = clamp_cos(cos, prow, stride_pp)
    if KIND == SPHERE:
        t, _u = _chebyshev_t_u(c, SPHERE_M)
        sign, k = _sphere_sign_k(c, SPHERE_M)
        lam = param(prow, stride_pp, P_LAMBDA)
        return (lam * c + (sign * t - 2.0 * k)) / (1.0 + lam)
    if KIND == ARC:  # cos(theta + m2), without the angle
        inside = c * param(prow, stride_pp, P_COS_M2) - _sin_theta(c) * param(prow, stride_pp, P_SIN_M2)
    else:
        inside = tl.cos(param(prow, stride_pp, P_M1) * acos(c) + param(prow, stride_pp, P_M2))
    top = tl.where(c > param(prow, stride_pp, P_TOP_LIMIT), param(prow, stride_pp, P_TOP_VALUE), inside)
    beyond = param(prow, stride_pp, P_SLOPE) * c - param(prow, stride_pp, P_SHIFT)
    return tl.where(c < param(prow, stride_pp, P_COS_LIMIT), beyond, top) - m3


@triton.jit
def psi_grad(cos, prow, stride_pp, KIND: tl.constexpr, SPHERE_M: tl.constexpr, DETACHED: tl.constexpr):
    """psi'(cos) of each row's cosine, in closed form (docs/design.md §3; fastmargin.margins.target_grad);
    outside [cos_lo, cos_hi] the clamp passes clamp_grad times it (1: straight-through)."""
    if DETACHED or KIND == ADDITIVE:
        return tl.full(cos.shape, 1.0, cos.dtype)
    c = clamp_cos(cos, prow, stride_pp)
    outside = (cos < param(prow, stride_pp, P_COS_LO)) | (cos > param(prow, stride_pp, P_COS_HI))
    gate = tl.where(outside, param(prow, stride_pp, P_CLAMP_GRAD), 1.0)
    if KIND == SPHERE:
        _t, u = _chebyshev_t_u(c, SPHERE_M)
        sign, _k = _sphere_sign_k(c, SPHERE_M)
        lam = param(prow, stride_pp, P_LAMBDA)
        return gate * (lam + SPHERE_M * sign * u) / (1.0 + lam)
    if KIND == ARC:  # sin(theta + m2) / sin(theta) = cos(m2) + sin(m2) c / sin(theta)
        inside = param(prow, stride_pp, P_COS_M2) + param(prow, stride_pp, P_SIN_M2) * c / _sin_theta(c)
    else:
        m1 = param(prow, stride_pp, P_M1)
        inside = m1 * tl.sin(m1 * acos(c) + param(prow, stride_pp, P_M2)) / _sin_theta(c)
    top = tl.where(c > param(prow, stride_pp, P_TOP_LIMIT), 0.0, inside)
    return gate * tl.where(c < param(prow, stride_pp, P_COS_LIMIT), param(prow, stride_pp, P_SLOPE), top)


@triton.jit
def nontarget_rows(prow, stride_pp):
    """Each row's (nt_lo, nt_hi, nt_a0, nt_a1, nt_a2), (BLOCK_B, 1) each: loaded once a row
    block, outside the class loop, for nontarget and nontarget_grad."""
    return (param(prow, stride_pp, P_NT_LO)[:, None], param(prow, stride_pp, P_NT_HI)[:, None],
            param(prow, stride_pp, P_NT_A0)[:, None], param(prow, stride_pp, P_NT_A1)[:, None],
            param(prow, stride_pp, P_NT_A2)[:, None])


@triton.jit
def nontarget(c, lo, hi, a0, a1, a2):
    """The non-target transform of a tile of cosines (fastmargin.margins.nontarget_value):
    a0 + c (a1 + a2 c) above hi, lo below lo, else c; NaN stays NaN."""
    return tl.where(c > hi, a0 + c * (a1 + a2 * c), tl.where(c < lo, lo, c))


@triton.jit
def nontarget_grad(c, lo, hi, a0, a1, a2):
    """d nontarget / dc (fastmargin.margins.nontarget_grad)."""
    return tl.where(c > hi, a1 + 2.0 * a2 * c, tl.where(c < lo, 0.0, 1.0))
