"""The margin specification and its math in PyTorch: psi (the target transform), psi', and
the non-target transform.

One `Margin` describes every loss of docs/design.md §1:

    ArcFace      Margin(m2=m)             psi = cos(theta + m)
    CosFace      Margin(m3=m)             psi = cos - m
    combined     Margin(m1, m2, m3)       psi = cos(m1*theta + m2) - m3
    SphereFace   Margin(sphere_m=m)       psi = (-1)^k cos(m*theta) - 2k,  k = floor(m*theta/pi)
                 Margin(sphere_m=m, sphere_lambda=lam)   psi = (lam*cos + psi) / (1 + lam)
    per row      m1, m2, m3 (B,) tensors  (AdaFace, ElasticFace, MagFace; a margin that
                                           requires grad gets its gradient)
    AdaFace      Margin(m2=g_angle, m3=g_add, theta_policy='adaface')
    MagFace      Margin(m2=m(||x||), theta_policy='easy')
    CurricularFace  Margin(m2=m, curricular_t=t): a non-target cos above the row's
                 cos(theta_y + m) becomes cos (t + cos)
    insightface's interclass filtering  Margin(..., filter_threshold=tau): a non-target cos
                 above tau becomes 0

A `Margin` is validated once, when it is made, and lowered once per call (`lower`) into what
every kernel reads: a params tensor (NUM_PARAMS, R) in the compute dtype on the tensors'
device, column i holding row i's numbers (R = 1: one margin for every row), and the integer
flags (kind, sphere_m, nontarget, detached) that select the branches. Every policy is a set
of numbers in those rows, so the kernels have one psi with fixed branches:

    c = clamp(cos, cos_lo, cos_hi)        (gradient: clamp_grad outside, 1 inside)
    psi = beyond_slope c - beyond_shift   where c < cos_theta_limit   (m1 theta + m2 past its top)
          top_value                       where c > top_limit          (m1 theta + m2 below its bottom)
          cos(m1 theta + m2)              elsewhere
          minus m3
    non-target (flag nontarget): nt_a0 + c (nt_a1 + nt_a2 c) where c > nt_hi, nt_lo where c < nt_lo, else c

`target_value`, `target_grad`, `nontarget_value` and `nontarget_grad` below evaluate them in
PyTorch; the C++/CUDA twin is csrc/margin.h, the Triton twin kernels/margin.py: the three
compute the same expressions with the same branches (tests/test_margin_math.py).
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, fields

import torch

# cos is clamped to [-1 + COS_EPS, 1 - COS_EPS] before acos or sqrt(1 - cos^2): acos' and
# 1/sin(theta) are infinite at +-1. 1e-7 is the smallest margin that still moves 1.0 in
# float32 (its spacing below 1 is 6e-8), so fp32 and fp64 backends clamp to the same place.
# The clamp changes the value only: the gradient is psi' evaluated at the clamped cosine
# (a straight-through clamp), which is what a fused kernel computes from the same formula.
COS_EPS = 1e-7

# AdaFace's eps (mk-minchul/AdaFace head.py): every cosine is clamped to [-1 + eps, 1 - eps]
# (a true clamp: no gradient outside), and theta + m2 clipped to [eps, pi - eps].
ADAFACE_EPS = 1e-3

# Norms are taken as max(||v||, NORM_EPS), as F.normalize (and so pytorch-metric-learning)
# does: a zero embedding or weight row has cos = 0 everywhere and a finite gradient.
NORM_EPS = 1e-12

THETA_POLICIES = ("fallback", "clamp", "easy", "none", "adaface")
GRAD_MODES = ("exact", "detached")

# Which psi (the kernels' branch, a compile-time constant there). ARC is the combined margin
# with m1 = 1: cos(theta + m2) = c cos(m2) - sin(theta) sin(m2) needs no angle. COMBINED
# (m1 != 1) and SPHERE need theta = acos(c). ADDITIVE (CosFace) needs neither, nor the clamp.
ADDITIVE, ARC, COMBINED, SPHERE = range(4)

# The rows of the params tensor, in this order in every language (csrc/margin.h's Param,
# kernels/margin.py's P_*). They are computed in float64 and rounded to the compute dtype.
PARAMS = ("scale", "m1", "m2", "m3", "sphere_lambda", "cos_m2", "sin_m2", "cos_lo", "cos_hi", "clamp_grad",
          "cos_theta_limit", "beyond_slope", "beyond_shift", "top_limit", "top_value",
          "nt_lo", "nt_hi", "nt_a0", "nt_a1", "nt_a2")
NUM_PARAMS = len(PARAMS)

# 'easy' keeps the margin where cos >= this, float32's smallest normal: a subnormal cosine,
# which GPUs flush to zero, counts as 0 on every backend (a zero embedding's cos is 0: no margin).
EASY_LIMIT = torch.finfo(torch.float32).tiny

# A cosine never passes these: the branch they guard is off.
NEVER_BELOW, NEVER_ABOVE = -2.0, 2.0

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


# The ranges of m1, m2, m3 (floats and every element of a tensor), with what to do.
RANGES = {
    "m1": (1e-6, 100.0, "the multiplicative margin m1 must be in (0, 100]"),
    "m2": (-math.pi + 1e-6, math.pi - 1e-6, "the angular margin m2 is in radians, in (-pi, pi)"),
    "m3": (-2.0, 2.0, "the cosine margin m3 must be in [-2, 2]"),
}


def _check_finite(name: str, value: float, low: float, high: float, hint: str) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number or a (B,) tensor, got {type(value).__name__}")
    if not math.isfinite(value) or not (low <= value <= high):
        raise ValueError(f"{name}={value!r} is out of range: {hint}")


def _check_row_tensor(name: str, value: torch.Tensor) -> None:
    if not value.is_floating_point() or value.dim() != 1:
        raise ValueError(f"{name}: a per-row margin is a 1-D floating tensor (B,), one value a row; got "
                         f"{value.dtype} of shape {tuple(value.shape)}")


@dataclass(frozen=True)
class Margin:
    """Which target transform psi, how its gradient and the edges of theta are treated, and
    the non-target transform.

    m1: multiplicative angular margin of the combined loss, in (0, 100] (1 = none).
    m2: additive angular margin in radians, in (-pi, pi).
    m3: additive cosine margin, in [-2, 2].
        Each of m1, m2, m3 is a float or a (B,) tensor on the embeddings' device (one margin a
        row); a tensor that requires grad gets its gradient.
    sphere_m: SphereFace integer margin m >= 1, or None. Excludes m1, m2, m3; selects the
        feature-norm scale S_i = s * ||x_i||.
    sphere_lambda: SphereFace annealing weight lambda >= 0 (0 = no annealing).
    theta_policy: what psi does where m1*theta + m2 leaves [0, pi].
        'fallback' (default): past pi (cos < cos(theta*)) a line in cos, insightface's
            cos - m2*sin(m2) for ArcFace; below 0 (m2 < 0) held at 0.
        'clamp': m1*theta + m2 held in [0, pi] (psi flat there, zero gradient).
        'easy': the margin only where cos > 0, psi = cos elsewhere (MagFace's default,
            arcface-pytorch's easy_margin); unguarded otherwise. A subnormal cos counts as 0.
        'none': cos(m1*theta + m2) everywhere, unguarded (ElasticFace).
        'adaface': AdaFace's: every cosine clamped to [-1 + 1e-3, 1 - 1e-3] (no gradient
            outside), m1*theta + m2 clipped to [1e-3, pi - 1e-3].
    grad_mode: 'exact' (the true gradient) or 'detached' (psi' := 1: the margin shifts the
        forward value only, the straight-through gradient of insightface and opensphere).
    curricular_t: CurricularFace's t (a float or a 0-dim tensor): a non-target cosine above
        its row's cos(m1*theta_y + m2) - m3 becomes cos * (t + cos), gradient t + 2 cos.
    filter_threshold: insightface's interclass filtering: a non-target cosine above it
        becomes 0, without gradient.
    """

    m1: float | torch.Tensor = 1.0
    m2: float | torch.Tensor = 0.0
    m3: float | torch.Tensor = 0.0
    sphere_m: int | None = None
    sphere_lambda: float = 0.0
    theta_policy: str = "fallback"
    grad_mode: str = "exact"
    curricular_t: float | torch.Tensor | None = None
    filter_threshold: float | None = None

    def __post_init__(self) -> None:
        for name, (low, high, hint) in RANGES.items():
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                _check_row_tensor(name, value)
            else:
                _check_finite(name, value, low, high, hint)
        _check_finite("sphere_lambda", self.sphere_lambda, 0.0, 1e12, "lambda must be >= 0")
        if self.theta_policy not in THETA_POLICIES:
            raise ValueError(f"theta_policy={self.theta_policy!r}: use one of {THETA_POLICIES}")
        if self.grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode={self.grad_mode!r}: use one of {GRAD_MODES}")
        if isinstance(self.curricular_t, torch.Tensor):
            if self.curricular_t.dim() != 0 or not self.curricular_t.is_floating_point():
                raise ValueError(f"curricular_t: a float or a 0-dim floating tensor, got {self.curricular_t.dtype} "
                                 f"of shape {tuple(self.curricular_t.shape)}")
        elif self.curricular_t is not None:
            _check_finite("curricular_t", self.curricular_t, -1e3, 1e3, "CurricularFace's t is in [-1e3, 1e3]")
        if self.filter_threshold is not None:
            _check_finite("filter_threshold", self.filter_threshold, -1.0, 1.0, "a cosine threshold is in [-1, 1]")
        nontargets = [name for name, on in (("curricular_t", self.curricular_t is not None),
                                            ("filter_threshold", self.filter_threshold is not None),
                                            ("theta_policy='adaface'", self.theta_policy == "adaface")) if on]
        if len(nontargets) > 1:
            raise ValueError(f"{' and '.join(nontargets)} each change the non-target cosines: use one of them")
        if self.sphere_m is not None:
            if not isinstance(self.sphere_m, int) or isinstance(self.sphere_m, bool):
                raise TypeError(f"sphere_m must be an int, got {type(self.sphere_m).__name__}")
            if not 1 <= self.sphere_m <= 16:
                raise ValueError(f"sphere_m={self.sphere_m}: the SphereFace margin must be an integer in [1, 16]")
            if any(isinstance(v, torch.Tensor) for v in (self.m1, self.m2, self.m3)) \
                    or (self.m1, self.m2, self.m3) != (1.0, 0.0, 0.0):
                raise ValueError("SphereFace (sphere_m) cannot be combined with m1, m2 or m3: leave them at 1, 0, 0")
            if self.theta_policy not in ("fallback", "clamp") or nontargets:
                raise ValueError("SphereFace (sphere_m) takes theta_policy 'fallback' or 'clamp' and no non-target "
                                 "transform")
        elif self.sphere_lambda != 0.0:
            raise ValueError("sphere_lambda applies to SphereFace only: set sphere_m too")

    @property
    def is_sphereface(self) -> bool:
        return self.sphere_m is not None

    @property
    def row_margins(self) -> dict[str, torch.Tensor]:
        """The margins given as (B,) tensors, by name."""
        return {n: v for n in ("m1", "m2", "m3") if isinstance(v := getattr(self, n), torch.Tensor)}

    @property
    def per_row(self) -> bool:
        """Whether the lowered params have a column a row (R = B)."""
        return bool(self.row_margins) or self.curricular_t is not None

    @property
    def needs_target_cos(self) -> bool:
        """Whether lowering needs each row's target cosine (CurricularFace's threshold)."""
        return self.curricular_t is not None

    @property
    def requires_grad(self) -> bool:
        return any(v.requires_grad for v in self.row_margins.values())

    @property
    def is_additive_cosine(self) -> bool:
        """psi = cos - m3: no angle needed, so no clamp either."""
        return (self.sphere_m is None and _equals(self.m1, 1.0) and _equals(self.m2, 0.0)
                and self.theta_policy not in ("easy", "adaface"))

    @property
    def kind(self) -> int:
        if self.is_sphereface:
            return SPHERE
        if self.is_additive_cosine:
            return ADDITIVE
        return ARC if _equals(self.m1, 1.0) else COMBINED

    @property
    def has_nontarget(self) -> bool:
        return self.theta_policy == "adaface" or self.curricular_t is not None or self.filter_threshold is not None

    @property
    def flags(self) -> tuple[int, int, int, int]:
        """(kind, sphere_m or 0, nontarget, detached): the branches, as the kernels take them."""
        return (self.kind, self.sphere_m or 0, int(self.has_nontarget), int(self.grad_mode == "detached"))

    @property
    def theta_limit(self) -> float:
        """theta* = (pi - m2) / m1 of float margins: past it m1*theta + m2 > pi (may exceed
        pi: never reached)."""
        return (math.pi - self.m2) / self.m1

    @property
    def cos_theta_limit(self) -> float:
        """The cos_theta_limit row of a float margin: psi leaves its first branch where cos < this."""
        return _param_value(self, "cos_theta_limit")

    @property
    def fallback_shift(self) -> float:
        """The beyond_shift row of a float margin under 'fallback': h in psi = cos - m3 - h past theta*."""
        return _param_value(self, "beyond_shift")

    def check_rows(self, batch: int, device: torch.device) -> None:
        """The per-row margins against a batch: (B,) on the embeddings' device, every value in
        its range (one host sync when there are any)."""
        rows = self.row_margins
        for name, value in rows.items():
            if value.shape != (batch,) or value.device != device:
                raise ValueError(f"{name}: a per-row margin must be ({batch},) on {device}, like the embeddings' "
                                 f"rows; got {tuple(value.shape)} on {value.device}")
        if not rows:
            return
        bad = torch.stack([((v.detach() < RANGES[n][0]) | (v.detach() > RANGES[n][1]) | ~v.detach().isfinite()).any()
                           for n, v in rows.items()])
        if bad.any():
            name = list(rows)[int(bad.int().argmax())]
            raise ValueError(f"{name} has values outside its range: {RANGES[name][2]}; its extremes are "
                             f"{rows[name].min().item()!r} and {rows[name].max().item()!r}")


def _equals(value, number: float) -> bool:
    """A float margin equal to number (a tensor never is: its rows may differ)."""
    return not isinstance(value, torch.Tensor) and value == number


@dataclass(frozen=True)
class LoweredMargin:
    """What the kernels read of one call's margin: params (NUM_PARAMS, R) in the compute dtype
    on the tensors' device (R = 1: every row's margin is column 0), and Margin.flags. params
    carries autograd from margin tensors that require grad; the kernels read it detached."""

    params: torch.Tensor
    flags: tuple[int, int, int, int]


def _rows64(margin: Margin, scale: float, target_cos: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The rows of PARAMS in float64, each a scalar or (B,) tensor, differentiable in the
    margin tensors. The policies are numbers here (module docstring)."""
    # On the device of a tensor given (no copy of it to the host), else the CPU.
    given = [*margin.row_margins.values(), margin.curricular_t, target_cos]
    device = next((v.device for v in given if isinstance(v, torch.Tensor)), torch.device("cpu"))

    def f64(value):
        return torch.as_tensor(value, dtype=torch.float64, device=device)

    m1, m2, m3 = f64(margin.m1), f64(margin.m2), f64(margin.m3)
    policy = margin.theta_policy
    eps = ADAFACE_EPS if policy == "adaface" else COS_EPS
    rows = dict(scale=f64(scale), m1=m1, m2=m2, m3=m3, sphere_lambda=f64(margin.sphere_lambda),
                cos_m2=torch.cos(m2), sin_m2=torch.sin(m2), cos_lo=f64(-1.0 + eps), cos_hi=f64(1.0 - eps),
                clamp_grad=f64(0.0 if policy == "adaface" else 1.0))
    # m1 theta + m2 passes pi where theta > theta_top and 0 where theta < theta_bottom; as
    # cosines: c < cos(theta_top) and c > cos(theta_bottom), each only where that angle is in [0, pi).
    guard = ADAFACE_EPS if policy == "adaface" else 0.0
    theta_top, theta_bottom = (math.pi - guard - m2) / m1, (guard - m2) / m1
    below = torch.where(theta_top < math.pi, torch.cos(theta_top), NEVER_BELOW)
    above = torch.where(theta_bottom > 0, torch.cos(theta_bottom), NEVER_ABOVE)
    if policy == "fallback":
        # h = max(m2 sin m2 + cos m2, 1) + cos(theta*): for m1 = 1, cos(theta*) = -cos(m2) and
        # h is insightface's m2 sin m2 (while m2 sin m2 + cos m2 >= 1, i.e. m2 <= 2.33). At
        # theta* the line starts at cos(theta*) - m3 - h = psi(theta*) - (max(...) - 1), at or
        # below psi(theta*) = -1 - m3 and decreasing with theta: psi stays monotonic; the max
        # keeps it so past m2 = 2.33, where insightface's line would jump up.
        shift = torch.clamp(m2 * torch.sin(m2) + torch.cos(m2), min=1.0) + torch.cos(theta_top)
        rows.update(cos_theta_limit=below, beyond_slope=f64(1.0), beyond_shift=shift, top_limit=above)
    elif policy in ("clamp", "adaface"):  # held at pi - guard (slope 0) and at guard
        rows.update(cos_theta_limit=below, beyond_slope=f64(0.0), beyond_shift=f64(math.cos(guard)),
                    top_limit=above)
    elif policy == "easy":  # psi = c where c <= 0: the line c + m3, then - m3
        rows.update(cos_theta_limit=f64(EASY_LIMIT), beyond_slope=f64(1.0),
                    beyond_shift=-m3, top_limit=f64(NEVER_ABOVE))
    else:  # 'none'
        rows.update(cos_theta_limit=f64(NEVER_BELOW), beyond_slope=f64(1.0), beyond_shift=f64(0.0),
                    top_limit=f64(NEVER_ABOVE))
    rows["top_value"] = f64(math.cos(guard))
    rows.update(nt_lo=f64(NEVER_BELOW), nt_hi=f64(NEVER_ABOVE), nt_a0=f64(0.0), nt_a1=f64(0.0), nt_a2=f64(0.0))
    if policy == "adaface":  # every non-target cosine clamped to [-1 + eps, 1 - eps], no gradient outside
        rows.update(nt_lo=f64(-1.0 + eps), nt_hi=f64(1.0 - eps), nt_a0=f64(1.0 - eps))
    elif margin.filter_threshold is not None:  # above the threshold: 0, no gradient
        rows.update(nt_hi=f64(margin.filter_threshold))
    elif margin.curricular_t is not None:  # above the row's cos(m1 theta_y + m2) - m3: c (t + c)
        c = target_cos.detach().to(device, torch.float64).clamp(-1.0, 1.0)
        m1d, m2d, m3d = m1.detach(), m2.detach(), m3.detach()
        if _equals(margin.m1, 1.0):
            threshold = c * torch.cos(m2d) - _sin_theta(c) * torch.sin(m2d)
        else:
            threshold = torch.cos(m1d * torch.acos(c) + m2d)
        rows.update(nt_hi=threshold - m3d, nt_a1=f64(margin.curricular_t).detach(), nt_a2=f64(1.0))
    return rows


def _lower(margin: Margin, scale: float, dtype: torch.dtype, device: torch.device,
           target_cos: torch.Tensor | None = None) -> LoweredMargin:
    rows = _rows64(margin, scale, target_cos)
    params = torch.stack(torch.broadcast_tensors(*(rows[name].reshape(-1) for name in PARAMS)))
    return LoweredMargin(params.to(device, dtype, non_blocking=True), margin.flags)


_lower_cached = functools.lru_cache(maxsize=64)(_lower)


def lower(margin: Margin, scale: float, dtype: torch.dtype, device: torch.device,
          target_cos: torch.Tensor | None = None) -> LoweredMargin:
    """The margin and scale as the kernels read them, in `dtype` (the compute dtype) on `device`.

    target_cos (B,): each row's target cosine, which CurricularFace's threshold needs
    (Margin.needs_target_cos). Float margins are cached (the kernels only read them): a step
    with the margin of the step before copies nothing to the device, and CUDA-graph capture
    sees no host-to-device copy. A margin that changes every step (SphereFace's annealed
    lambda, per-row tensors) is one small copy a step. Under torch.compile the tensor is made
    in the graph instead (the cache is host state).
    """
    if margin.needs_target_cos and target_cos is None:
        raise ValueError("this margin's non-target threshold needs each row's target cosine: pass target_cos")
    if margin.per_row or torch.compiler.is_compiling():
        return _lower(margin, scale, dtype, device, target_cos)
    return _lower_cached(margin, scale, dtype, device)


def _param_value(margin: Margin, name: str) -> float:
    if margin.per_row:
        raise ValueError(f"{name} is a number of float margins; a per-row margin has one a row (lower() them)")
    return float(_rows64(margin, 1.0, None)[name])


def replace(margin: Margin, **changes) -> Margin:
    """margin with some fields changed (validated again)."""
    return Margin(**{f.name: getattr(margin, f.name) for f in fields(Margin)} | changes)


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


def _rows(params: torch.Tensor, cos: torch.Tensor) -> dict[str, torch.Tensor]:
    """params' rows by name, each shaped (R, 1, ...) to broadcast against cos (R rows first)."""
    shape = (params.shape[1],) + (1,) * (cos.dim() - 1)
    return {name: params[i].view(shape) for i, name in enumerate(PARAMS)}


def _clamp(cos: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """cos clamped to [cos_lo, cos_hi], NaN kept; a true clamp whose gradient is 1 on the
    bounds too (torch.clamp's with float bounds; with tensor bounds torch splits it at a tie)."""
    return torch.where(cos < p["cos_lo"], p["cos_lo"], torch.where(cos > p["cos_hi"], p["cos_hi"], cos))


def target_value(cos: torch.Tensor, params: torch.Tensor, flags) -> torch.Tensor:
    """psi(cos), cos (R, ...) or (N,) with R = 1, in params' dtype; differentiable in cos and
    in params: autograd gives psi' (target_grad), or 1 where flags say 'detached'."""
    kind, sphere_m, _, detached = flags
    p = _rows(params, cos)
    if kind == ADDITIVE:
        value = cos - p["m3"]
    else:
        c = torch.where(p["clamp_grad"] != 0, cos + (_clamp(cos, p) - cos).detach(), _clamp(cos, p))
        if kind == SPHERE:
            sign, k = _sphereface_sign_k(c, sphere_m)
            t_m, _ = chebyshev_t_u(c, sphere_m)
            lam = p["sphere_lambda"]
            value = (lam * c + (sign * t_m - 2 * k)) / (1 + lam)
        else:
            if kind == ARC:  # cos(theta + m2), without the angle
                inside = c * p["cos_m2"] - _sin_theta(c) * p["sin_m2"]
            else:
                inside = torch.cos(p["m1"] * torch.acos(c) + p["m2"])
            top = torch.where(c > p["top_limit"], p["top_value"], inside)
            value = torch.where(c < p["cos_theta_limit"], p["beyond_slope"] * c - p["beyond_shift"], top) - p["m3"]
    return cos + (value - cos).detach() if detached else value


def target_grad(cos: torch.Tensor, params: torch.Tensor, flags) -> torch.Tensor:
    """d psi / d cos in closed form (docs/design.md §3), what fused kernels compute; no autograd."""
    kind, sphere_m, _, detached = flags
    if detached or kind == ADDITIVE:
        return torch.ones_like(cos)
    p = _rows(params, cos)
    c = _clamp(cos, p)
    gate = torch.where((cos < p["cos_lo"]) | (cos > p["cos_hi"]), p["clamp_grad"], 1.0)
    if kind == SPHERE:
        sign, _ = _sphereface_sign_k(c, sphere_m)
        _, u = chebyshev_t_u(c, sphere_m)
        lam = p["sphere_lambda"]
        return gate * (lam + sphere_m * sign * u) / (1 + lam)
    if kind == ARC:  # sin(theta + m2) / sin(theta) = cos(m2) + sin(m2) c / sin(theta)
        inside = p["cos_m2"] + p["sin_m2"] * c / _sin_theta(c)
    else:
        inside = p["m1"] * torch.sin(p["m1"] * torch.acos(c) + p["m2"]) / _sin_theta(c)
    top = torch.where(c > p["top_limit"], 0.0, inside)
    return gate * torch.where(c < p["cos_theta_limit"], p["beyond_slope"], top)


def nontarget_value(cos: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The non-target transform of cos (R, ...), differentiable: nt_a0 + c (nt_a1 + nt_a2 c)
    above nt_hi, nt_lo below nt_lo (true clamps, no gradient to the bounds), else c."""
    p = _rows(params, cos)
    upper = p["nt_a0"] + cos * (p["nt_a1"] + p["nt_a2"] * cos)
    return torch.where(cos > p["nt_hi"], upper, torch.where(cos < p["nt_lo"], p["nt_lo"], cos))


def nontarget_grad(cos: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """d nontarget_value / d cos in closed form."""
    p = _rows(params, cos)
    upper = p["nt_a1"] + 2 * p["nt_a2"] * cos
    return torch.where(cos > p["nt_hi"], upper, torch.where(cos < p["nt_lo"], 0.0, 1.0))


def psi(cos: torch.Tensor, margin: Margin) -> torch.Tensor:
    """psi(cos) of `margin` (target_value, lowered in cos' dtype and device); cos (B,) or
    (B, N) for a per-row margin, any shape otherwise."""
    lowered = lower(margin, 1.0, cos.dtype, cos.device)
    return target_value(cos, lowered.params, lowered.flags)


def psi_grad(cos: torch.Tensor, margin: Margin) -> torch.Tensor:
    """psi'(cos) of `margin` in closed form (target_grad)."""
    lowered = lower(margin, 1.0, cos.dtype, cos.device)
    return target_grad(cos, lowered.params, lowered.flags)
