"""The margin specification and its math in PyTorch: psi (the target transform) and psi'.

One `Margin` describes every loss of docs/design.md §1:

    ArcFace      Margin(m2=m)             psi = cos(theta + m)
    CosFace      Margin(m3=m)             psi = cos - m
    combined     Margin(m1, m2, m3)       psi = cos(m1*theta + m2) - m3
    SphereFace   Margin(sphere_m=m)       psi = (-1)^k cos(m*theta) - 2k,  k = floor(m*theta/pi)
                 Margin(sphere_m=m, sphere_lambda=lam)   psi = (lam*cos + psi) / (1 + lam)

`psi` is differentiable with autograd and is what the reference uses; `psi_grad` is the
closed form of docs/design.md §3 that fused kernels evaluate, tested against autograd of `psi`.
The C++/CUDA twin of this file is csrc/margin.h, the Triton twin kernels/margin.py: the
three compute the same expressions with the same branches (tests/test_margin_math.py).

A `Margin` is validated once, when it is made, and lowered once per call (`lower`) into
what every kernel reads: a params tensor (NUM_PARAMS, R) in the compute dtype on the
tensors' device, column i holding row i's numbers (R = 1: one margin for every row), and
the integer flags (kind, sphere_m, clamp_theta, detached) that select the branches.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

import torch

# cos is clamped to [-1 + COS_EPS, 1 - COS_EPS] before acos or sqrt(1 - cos^2): acos' and
# 1/sin(theta) are infinite at +-1. 1e-7 is the smallest margin that still moves 1.0 in
# float32 (its spacing below 1 is 6e-8), so fp32 and fp64 backends clamp to the same place.
# The clamp changes the value only: the gradient is psi' evaluated at the clamped cosine
# (a straight-through clamp), which is what a fused kernel computes from the same formula.
COS_EPS = 1e-7

# Norms are taken as max(||v||, NORM_EPS), as F.normalize (and so pytorch-metric-learning)
# does: a zero embedding or weight row has cos = 0 everywhere and a finite gradient.
NORM_EPS = 1e-12

THETA_POLICIES = ("fallback", "clamp")
GRAD_MODES = ("exact", "detached")

# Which psi (the kernels' branch, a compile-time constant there). ARC is the combined margin
# with m1 = 1: cos(theta + m2) = c cos(m2) - sin(theta) sin(m2) needs no angle. COMBINED
# (m1 != 1) and SPHERE need theta = acos(c). ADDITIVE (CosFace) needs neither, nor the clamp.
ADDITIVE, ARC, COMBINED, SPHERE = range(4)

# The rows of the params tensor, in this order in every language (csrc/margin.h's Param,
# kernels/margin.py's P_*). The clamp bounds are rounded to the compute dtype there as torch
# rounds them here.
PARAMS = ("scale", "m1", "m2", "m3", "sphere_lambda", "cos_m2", "sin_m2", "cos_theta_limit",
          "fallback_shift", "cos_lo", "cos_hi")
NUM_PARAMS = len(PARAMS)

# SphereFace lambda annealing, as in the original Caffe code: lambda = max(lambda_min,
# base * (1 + gamma * iteration) ** -power).
SPHERE_LAMBDA_BASE = 1000.0
SPHERE_LAMBDA_GAMMA = 0.12
SPHERE_LAMBDA_POWER = 1.0
SPHERE_LAMBDA_MIN = 5.0


def sphereface_lambda(
    iteration: int,
    base: float = SPHERE_LAMBDA_BASE,
    gamma: float = SPHERE_LAMBDA_GAMMA,
    power: float = SPHERE_LAMBDA_POWER,
    lambda_min: float = SPHERE_LAMBDA_MIN,
) -> float:
    """The annealed SphereFace weight lambda at a training iteration (docs/design.md §1)."""
    return max(lambda_min, base * (1.0 + gamma * iteration) ** (-power))


def _check_finite(name: str, value: float, low: float, high: float, hint: str) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or not (low <= value <= high):
        raise ValueError(f"{name}={value!r} is out of range: {hint}")


@dataclass(frozen=True)
class Margin:
    """Which target transform psi, and how its gradient and the theta > pi edge are treated.

    m1: multiplicative angular margin of the combined loss, > 0 (1 = none).
    m2: additive angular margin in radians, in [0, pi).
    m3: additive cosine margin, in [0, 2].
    sphere_m: SphereFace integer margin m >= 1, or None. Excludes m1, m2, m3; selects the
        feature-norm scale S_i = s * ||x_i||.
    sphere_lambda: SphereFace annealing weight lambda >= 0 (0 = no annealing).
    theta_policy: where m1*theta + m2 passes pi (cos < cos_theta_limit), psi stops decreasing. 'fallback' (default)
        continues with a line in cos, insightface's cos - m2*sin(m2) for ArcFace;
        'clamp' holds m1*theta + m2 at pi (psi flat, zero gradient there).
    grad_mode: 'exact' (the true gradient) or 'detached' (psi' := 1: the margin shifts the
        forward value only, the straight-through gradient of insightface and opensphere).
    """

    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.0
    sphere_m: int | None = None
    sphere_lambda: float = 0.0
    theta_policy: str = "fallback"
    grad_mode: str = "exact"

    def __post_init__(self) -> None:
        _check_finite("m1", self.m1, 1e-6, 100.0, "the multiplicative margin m1 must be in (0, 100]")
        _check_finite("m2", self.m2, 0.0, math.pi - 1e-6, "the angular margin m2 is in radians, in [0, pi)")
        _check_finite("m3", self.m3, 0.0, 2.0, "the cosine margin m3 must be in [0, 2]")
        _check_finite("sphere_lambda", self.sphere_lambda, 0.0, 1e12, "lambda must be >= 0")
        if self.theta_policy not in THETA_POLICIES:
            raise ValueError(f"theta_policy={self.theta_policy!r}: use one of {THETA_POLICIES}")
        if self.grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode={self.grad_mode!r}: use one of {GRAD_MODES}")
        if self.sphere_m is not None:
            if not isinstance(self.sphere_m, int) or isinstance(self.sphere_m, bool):
                raise TypeError(f"sphere_m must be an int, got {type(self.sphere_m).__name__}")
            if not 1 <= self.sphere_m <= 16:
                raise ValueError(f"sphere_m={self.sphere_m}: the SphereFace margin must be an integer in [1, 16]")
            if (self.m1, self.m2, self.m3) != (1.0, 0.0, 0.0):
                raise ValueError("SphereFace (sphere_m) cannot be combined with m1, m2 or m3: leave them at 1, 0, 0")
        elif self.sphere_lambda != 0.0:
            raise ValueError("sphere_lambda applies to SphereFace only: set sphere_m too")

    @property
    def is_sphereface(self) -> bool:
        return self.sphere_m is not None

    @property
    def kind(self) -> int:
        if self.is_sphereface:
            return SPHERE
        if self.is_additive_cosine:
            return ADDITIVE
        return ARC if self.m1 == 1.0 else COMBINED

    @property
    def flags(self) -> tuple[int, int, int, int]:
        """(kind, sphere_m or 0, clamp_theta, detached): the branches, as the kernels take them."""
        return (self.kind, self.sphere_m or 0, int(self.theta_policy == "clamp"), int(self.grad_mode == "detached"))

    def param_values(self, scale: float) -> tuple[float, ...]:
        """The numbers of PARAMS, in its order, as Python floats."""
        values = dict(
            scale=scale, m1=self.m1, m2=self.m2, m3=self.m3, sphere_lambda=self.sphere_lambda,
            cos_m2=math.cos(self.m2), sin_m2=math.sin(self.m2), cos_theta_limit=self.cos_theta_limit,
            fallback_shift=self.fallback_shift, cos_lo=-1.0 + COS_EPS, cos_hi=1.0 - COS_EPS,
        )
        return tuple(values[name] for name in PARAMS)

    @property
    def is_additive_cosine(self) -> bool:
        """psi = cos - m3: no angle needed, so no clamp either."""
        return self.sphere_m is None and self.m1 == 1.0 and self.m2 == 0.0

    @property
    def theta_limit(self) -> float:
        """theta* = (pi - m2) / m1: past it m1*theta + m2 > pi (may exceed pi: never reached)."""
        return (math.pi - self.m2) / self.m1

    @property
    def cos_theta_limit(self) -> float:
        """cos(theta*), or -1 when theta* >= pi: psi leaves its first branch where cos < this.

        Kernels test the cosine, not the angle, so no acos is needed to pick the branch.
        """
        return math.cos(self.theta_limit) if self.theta_limit < math.pi else -1.0

    @property
    def fallback_shift(self) -> float:
        """h in the fallback line psi = cos - m3 - h used where theta > theta*.

        h = max(m2*sin(m2) + cos(m2), 1) + cos(theta*). For m1 = 1, cos(theta*) = -cos(m2)
        and h is insightface's m2*sin(m2) (while m2*sin(m2) + cos(m2) >= 1, i.e. m2 <= 2.33).
        At theta* the line starts at cos(theta*) - m3 - h = psi(theta*) - (max(...) - 1), that
        is at or below psi(theta*) = -1 - m3 and decreasing with theta, so psi stays
        monotonic; the max keeps it so past m2 = 2.33, where insightface's line would jump up.
        """
        return max(self.m2 * math.sin(self.m2) + math.cos(self.m2), 1.0) + math.cos(self.theta_limit)


@dataclass(frozen=True)
class LoweredMargin:
    """What the kernels read of one call's margin: params (NUM_PARAMS, R) in the compute dtype
    on the tensors' device (R = 1: every row's margin is column 0) and Margin.flags."""

    params: torch.Tensor
    flags: tuple[int, int, int, int]


def _lower(margin: Margin, scale: float, dtype: torch.dtype, device: torch.device) -> LoweredMargin:
    params = torch.tensor(margin.param_values(scale), dtype=dtype).view(NUM_PARAMS, 1)
    return LoweredMargin(params.to(device, non_blocking=True), margin.flags)


_lower_cached = functools.lru_cache(maxsize=64)(_lower)


def lower(margin: Margin, scale: float, dtype: torch.dtype, device: torch.device) -> LoweredMargin:
    """The margin and scale as the kernels read them, in `dtype` (the compute dtype) on `device`.

    Cached (the kernels only read it): a step with the margin of the step before copies
    nothing to the device, and CUDA-graph capture sees no host-to-device copy. A margin that
    changes every step (SphereFace's annealed lambda) is one small copy a step. Under
    torch.compile the tensor is made in the graph instead (the cache is host state).
    """
    if torch.compiler.is_compiling():
        return _lower(margin, scale, dtype, device)
    return _lower_cached(margin, scale, dtype, device)


def _clamp_straight_through(cos: torch.Tensor) -> torch.Tensor:
    clamped = cos.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS)
    return cos + (clamped - cos).detach()


def chebyshev_t_u(cos: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T_m(cos) = cos(m*theta) and U_{m-1}(cos) = sin(m*theta)/sin(theta), by recurrence.

    T_m' = m * U_{m-1}, which is SphereFace's psi' without any division by sin(theta).
    """
    t_prev, t = torch.ones_like(cos), cos
    u_prev, u = torch.zeros_like(cos), torch.ones_like(cos)  # U_{-1}, U_0
    for _ in range(m - 1):
        t_prev, t = t, 2 * cos * t - t_prev
        u_prev, u = u, 2 * cos * u - u_prev
    return t, u


def _sphereface_sign_k(cos: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(-1)^k and k = floor(m theta / pi), clamped to [0, m - 1] (constants: no gradient)."""
    k = torch.floor(m * torch.acos(cos.detach()) / math.pi).clamp(0, m - 1)
    return 1 - 2 * k.remainder(2), k


def _sin_theta(c: torch.Tensor) -> torch.Tensor:
    # sqrt((1 - c)(1 + c)): 1 - c is exact near c = 1 (Sterbenz), where 1 - c*c cancels.
    return torch.sqrt((1 - c) * (1 + c))


def _psi_exact(cos: torch.Tensor, margin: Margin) -> torch.Tensor:
    if margin.kind == ADDITIVE:
        return cos - margin.m3
    c = _clamp_straight_through(cos)
    if margin.kind == SPHERE:
        m = margin.sphere_m
        sign, k = _sphereface_sign_k(c, m)
        t_m, _ = chebyshev_t_u(c, m)
        lam = margin.sphere_lambda
        return (lam * c + (sign * t_m - 2 * k)) / (1 + lam)
    if margin.kind == ARC:  # cos(theta + m2), without the angle
        inside = c * math.cos(margin.m2) - _sin_theta(c) * math.sin(margin.m2)
    else:
        inside = torch.cos(margin.m1 * torch.acos(c) + margin.m2)
    if margin.theta_policy == "clamp":  # m1 theta + m2 held at pi: cos(pi), flat, zero gradient
        beyond = torch.full_like(c, -1.0)
    else:
        beyond = c - margin.fallback_shift
    return torch.where(c < margin.cos_theta_limit, beyond, inside) - margin.m3


def psi(cos: torch.Tensor, margin: Margin) -> torch.Tensor:
    """The target logit's cosine after the margin, elementwise; any shape, any float dtype.

    Differentiable: with grad_mode='exact' autograd gives psi' (= psi_grad); with 'detached'
    the gradient is 1, i.e. psi(cos) = cos + (psi(cos) - cos).detach().
    """
    value = _psi_exact(cos, margin)
    if margin.grad_mode == "detached":
        return cos + (value - cos).detach()
    return value


def psi_grad(cos: torch.Tensor, margin: Margin) -> torch.Tensor:
    """d psi / d cos in closed form (docs/design.md §3), what fused kernels compute; no autograd."""
    if margin.grad_mode == "detached" or margin.kind == ADDITIVE:
        return torch.ones_like(cos)
    c = cos.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS)
    if margin.kind == SPHERE:
        m = margin.sphere_m
        sign, _ = _sphereface_sign_k(c, m)
        _, u = chebyshev_t_u(c, m)
        lam = margin.sphere_lambda
        return (lam + m * sign * u) / (1 + lam)
    if margin.kind == ARC:  # sin(theta + m2) / sin(theta) = cos(m2) + sin(m2) c / sin(theta)
        inside = math.cos(margin.m2) + math.sin(margin.m2) * c / _sin_theta(c)
    else:
        inside = margin.m1 * torch.sin(margin.m1 * torch.acos(c) + margin.m2) / _sin_theta(c)
    beyond = 0.0 if margin.theta_policy == "clamp" else 1.0
    return torch.where(c < margin.cos_theta_limit, torch.full_like(c, beyond), inside)
