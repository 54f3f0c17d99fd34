"""The margin math of DESIGN §1-2 as Triton jit helpers: psi (the target transform) and psi'.

The PyTorch twin is fastmargin/margins.py (the oracle's), the C++/CUDA twin csrc/margin.h;
tests/test_triton.py holds this one to the PyTorch one. Values are in the compute dtype
(float32, or float64 when an input is). Which psi is a constexpr (KIND, one of the
constants below); its numbers come from a small tensor that margin_params() builds on
the host, so that float64 kernels get them in float64 (a Python float argument of a
Triton kernel is float32).
"""

import functools
import math

import torch
import triton
import triton.language as tl

from fastmargin.margins import COS_EPS, Margin

# Module constants are tl.constexpr: the Triton compiler refuses other globals in a kernel
# (the interpreter does not check, tests/test_triton.py compiles for sm_90 to catch it).

# KIND: which psi. ARC is the combined margin with m1 = 1, whose cos(theta + m2) needs no
# angle; COMBINED (m1 != 1) and SPHERE need theta = acos(cos).
ADDITIVE, ARC, COMBINED, SPHERE = (tl.constexpr(k) for k in range(4))

# Offsets in the params tensor (margin_params).
P_SCALE, P_M1, P_M2, P_M3, P_LAMBDA, P_COS_M2, P_SIN_M2, P_COS_LIMIT, P_SHIFT, P_COS_LO, P_COS_HI = (
    tl.constexpr(i) for i in range(11)
)
PI = tl.constexpr(math.pi)


def kind(margin: Margin) -> int:
    if margin.is_sphereface:
        return SPHERE
    if margin.is_additive_cosine:
        return ADDITIVE
    return ARC if margin.m1 == 1.0 else COMBINED


@functools.lru_cache(maxsize=64)
def margin_params(margin: Margin, scale: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The numbers psi needs, (11,) in the compute dtype, at the P_* offsets. The clamp
    bounds are rounded to the dtype here exactly as torch rounds them in the reference.
    Cached (the kernels only read it): a training step copies nothing to the device, and
    CUDA-graph capture sees no host-to-device copy."""
    values = [
        scale, margin.m1, margin.m2, margin.m3, margin.sphere_lambda, math.cos(margin.m2), math.sin(margin.m2),
        margin.cos_theta_limit, margin.fallback_shift, -1.0 + COS_EPS, 1.0 - COS_EPS,
    ]
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


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
def clamp_cos(cos, params_ptr):
    """cos clamped to [-1 + COS_EPS, 1 - COS_EPS], NaN kept NaN (as torch.clamp does)."""
    return tl.clamp(cos, tl.load(params_ptr + P_COS_LO), tl.load(params_ptr + P_COS_HI),
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
def psi(cos, params_ptr, KIND: tl.constexpr, SPHERE_M: tl.constexpr, CLAMP_THETA: tl.constexpr):
    """psi(cos) elementwise (fastmargin.margins.psi's value)."""
    m3 = tl.load(params_ptr + P_M3)
    if KIND == ADDITIVE:
        return cos - m3
    c = clamp_cos(cos, params_ptr)
    if KIND == SPHERE:
        t, _u = _chebyshev_t_u(c, SPHERE_M)
        sign, k = _sphere_sign_k(c, SPHERE_M)
        lam = tl.load(params_ptr + P_LAMBDA)
        return (lam * c + (sign * t - 2.0 * k)) / (1.0 + lam)
    if KIND == ARC:  # cos(theta + m2) = c cos(m2) - sin(theta) sin(m2), sin(theta) as in psi_grad
        inside = c * tl.load(params_ptr + P_COS_M2) - tl.sqrt((1.0 - c) * (1.0 + c)) * tl.load(params_ptr + P_SIN_M2)
    else:
        inside = tl.cos(tl.load(params_ptr + P_M1) * acos(c) + tl.load(params_ptr + P_M2))
    if CLAMP_THETA:
        beyond = tl.full(c.shape, -1.0, c.dtype)
    else:
        beyond = c - tl.load(params_ptr + P_SHIFT)
    return tl.where(c < tl.load(params_ptr + P_COS_LIMIT), beyond, inside) - m3


@triton.jit
def psi_grad(cos, params_ptr, KIND: tl.constexpr, SPHERE_M: tl.constexpr, CLAMP_THETA: tl.constexpr,
             DETACHED: tl.constexpr):
    """psi'(cos) elementwise, in closed form (DESIGN §2; fastmargin.margins.psi_grad)."""
    if DETACHED or KIND == ADDITIVE:
        return tl.full(cos.shape, 1.0, cos.dtype)
    c = clamp_cos(cos, params_ptr)
    if KIND == SPHERE:
        _t, u = _chebyshev_t_u(c, SPHERE_M)
        sign, _k = _sphere_sign_k(c, SPHERE_M)
        lam = tl.load(params_ptr + P_LAMBDA)
        return (lam + SPHERE_M * sign * u) / (1.0 + lam)
    sin_theta = tl.sqrt((1.0 - c) * (1.0 + c))  # 1 - c is exact near c = 1, where 1 - c*c cancels
    if KIND == ARC:  # sin(theta + m2) / sin(theta) = cos(m2) + sin(m2) c / sin(theta)
        inside = tl.load(params_ptr + P_COS_M2) + tl.load(params_ptr + P_SIN_M2) * c / sin_theta
    else:
        m1 = tl.load(params_ptr + P_M1)
        inside = m1 * tl.sin(m1 * acos(c) + tl.load(params_ptr + P_M2)) / sin_theta
    beyond = 0.0 if CLAMP_THETA else 1.0
    return tl.where(c < tl.load(params_ptr + P_COS_LIMIT), beyond, inside)
