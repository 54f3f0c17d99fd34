"""The margin math of fastmargin.margins (DESIGN §1, §2): psi against hand values, psi_grad
against autograd of psi, the Chebyshev recurrence, the cos = +-1 edge, Margin validation."""

import dataclasses
import math

import pytest
import torch

from fastmargin.margins import (
    COS_EPS,
    Margin,
    chebyshev_t_u,
    psi,
    psi_grad,
    sphereface_lambda,
)
from helpers import assert_close

# Tolerances beside the dtype: float64 is the oracle's precision; float32 allows the input
# rounding (6e-8) times |psi'| (up to m^2 = 25 for SphereFace m=5) plus the -2k offset.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def margin_id(margin):
    """The fields that differ from the defaults: 'm2=0.5,theta_policy=clamp'."""
    changed = [f"{f.name}={getattr(margin, f.name)}" for f in dataclasses.fields(margin)
               if getattr(margin, f.name) != f.default]
    return ",".join(changed) or "no-margin"


def deg(a):
    return math.radians(a)


def sphere(m, theta_deg):
    """(-1)^k cos(m*theta) - 2k with k = floor(m*theta/pi), written out for the hand values."""
    k = math.floor(m * theta_deg / 180.0)
    return (-1) ** k * math.cos(m * deg(theta_deg)) - 2 * k


# (margin, cos, psi worked out by hand).
HAND_VALUES = [
    pytest.param(Margin(m2=0.5), 0.6, math.cos(math.acos(0.6) + 0.5), id="arcface"),
    pytest.param(Margin(m2=0.5), -0.3, math.cos(math.acos(-0.3) + 0.5), id="arcface-obtuse"),
    pytest.param(Margin(m3=0.35), 0.6, 0.6 - 0.35, id="cosface"),
    pytest.param(Margin(m3=0.35), -1.0, -1.0 - 0.35, id="cosface-at-minus-1-no-clamp"),
    pytest.param(Margin(m1=2.0, m2=0.3, m3=0.1), 0.8, math.cos(2 * math.acos(0.8) + 0.3) - 0.1, id="combined"),
    pytest.param(Margin(m1=0.9, m2=0.4, m3=0.15), -0.2, math.cos(0.9 * math.acos(-0.2) + 0.4) - 0.15, id="combined-m1<1"),
    pytest.param(Margin(sphere_m=1), math.cos(deg(120)), math.cos(deg(120)), id="sphere-m1"),
    # m=2, 30 deg: k = floor(60/180) = 0 -> cos(60 deg)
    pytest.param(Margin(sphere_m=2), math.cos(deg(30)), math.cos(deg(60)), id="sphere-m2-k0"),
    # m=2, 135 deg: k = floor(270/180) = 1 -> -cos(270 deg) - 2
    pytest.param(Margin(sphere_m=2), math.cos(deg(135)), -math.cos(deg(270)) - 2, id="sphere-m2-k1"),
    # m=3, 70 deg: k = floor(210/180) = 1 -> -cos(210 deg) - 2
    pytest.param(Margin(sphere_m=3), math.cos(deg(70)), -math.cos(deg(210)) - 2, id="sphere-m3-k1"),
    # m=4, 100 deg: k = floor(400/180) = 2 -> cos(400 deg) - 4
    pytest.param(Margin(sphere_m=4), math.cos(deg(100)), math.cos(deg(400)) - 4, id="sphere-m4-k2"),
    # m=4, 170 deg: k = floor(680/180) = 3 -> -cos(680 deg) - 6
    pytest.param(Margin(sphere_m=4), math.cos(deg(170)), -math.cos(deg(680)) - 6, id="sphere-m4-k3"),
    # m=5, 150 deg: k = floor(750/180) = 4 -> cos(750 deg) - 8
    pytest.param(Margin(sphere_m=5), math.cos(deg(150)), math.cos(deg(750)) - 8, id="sphere-m5-k4"),
    # lambda = 5: (5*cos + psi) / 6
    pytest.param(
        Margin(sphere_m=4, sphere_lambda=5.0), math.cos(deg(100)),
        (5.0 * math.cos(deg(100)) + math.cos(deg(400)) - 4) / (1 + 5.0), id="sphere-m4-lambda5",
    ),
    # ArcFace fallback: theta = acos(-0.95) = 2.82 > pi - 0.5 = 2.64 -> cos - m2*sin(m2)
    pytest.param(Margin(m2=0.5), -0.95, -0.95 - 0.5 * math.sin(0.5), id="arcface-fallback"),
    pytest.param(Margin(m2=0.5, m3=0.2), -0.95, -0.95 - 0.2 - 0.5 * math.sin(0.5), id="arcface-m3-fallback"),
    # combined fallback: 2*acos(-0.5) + 0.3 = 4.49 > pi; h = m2 sin m2 + cos m2 + cos((pi - m2)/m1)
    pytest.param(
        Margin(m1=2.0, m2=0.3, m3=0.1), -0.5,
        -0.5 - 0.1 - (0.3 * math.sin(0.3) + math.cos(0.3) + math.cos((math.pi - 0.3) / 2)),
        id="combined-fallback",
    ),
    # clamp policy past theta*: m1*theta + m2 held at pi -> cos(pi) - m3
    pytest.param(Margin(m2=0.5, m3=0.2, theta_policy="clamp"), -0.95, -1.0 - 0.2, id="arcface-clamp"),
    pytest.param(Margin(m1=2.0, m2=0.3, m3=0.1, theta_policy="clamp"), -0.5, -1.0 - 0.1, id="combined-clamp"),
    # clamp policy before theta*: the ordinary branch
    pytest.param(Margin(m2=0.5, theta_policy="clamp"), 0.6, math.cos(math.acos(0.6) + 0.5), id="arcface-clamp-inside"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("grad_mode", ["exact", "detached"])
@pytest.mark.parametrize("margin, cos, expected", HAND_VALUES)
def test_psi_hand_values(margin, cos, expected, grad_mode, dtype):
    margin = Margin(**{**margin.__dict__, "grad_mode": grad_mode})
    got = psi(torch.tensor([cos], dtype=dtype), margin)
    assert got.dtype == dtype
    assert_close(got, expected, atol=TOL[dtype], what=f"psi({cos!r}) for {margin}")


@pytest.mark.parametrize(
    "margin", [Margin(m2=0.5, theta_policy="clamp"), Margin(m1=2.0, m2=0.3, m3=0.1, theta_policy="clamp")],
    ids=["arcface", "combined"],
)
def test_clamp_branch_has_zero_gradient(margin):
    # Cosines past cos(theta*): acos(-0.95) = 2.82 > 2.64 and 2*acos(c) + 0.3 > pi for c < -0.08.
    cos = torch.tensor([-0.95, -0.9, -0.99], dtype=torch.float64, requires_grad=True)
    assert (cos < math.cos(margin.theta_limit)).all(), "the cases must lie on the clamp branch"
    psi(cos, margin).sum().backward()
    assert_close(cos.grad, 0.0, atol=0.0, what="autograd psi' on the clamp branch")
    assert_close(psi_grad(cos.detach(), margin), 0.0, atol=0.0, what="psi_grad on the clamp branch")


# Theta grid for the shape of psi: fine, and it reaches theta* for every margin below.
THETA = torch.linspace(0.0, math.pi, 20001, dtype=torch.float64)

SHAPE_MARGINS = [
    (1.0, 0.5, 0.0), (1.0, 1.2, 0.2), (1.0, 2.0, 0.0), (2.0, 0.3, 0.1), (0.9, 0.4, 0.15),
    (1.35, 0.0, 0.0), (3.0, 0.0, 0.3), (0.5, 2.0, 0.1), (1.0, 0.0, 0.35),
]


@pytest.mark.parametrize(
    "m1, m2, m3, policy",
    [(*m, p) for m in SHAPE_MARGINS + [(1.0, 2.5, 0.0)] for p in ("fallback", "clamp")],
)
def test_psi_nonincreasing_in_theta(m1, m2, m3, policy):
    values = psi(torch.cos(THETA), Margin(m1=m1, m2=m2, m3=m3, theta_policy=policy))
    steps = values[1:] - values[:-1]
    worst = int(steps.argmax())
    assert steps[worst] <= 1e-12, (
        f"psi increases from theta={THETA[worst].item():.6f} (psi={values[worst].item():.9f}) "
        f"to theta={THETA[worst + 1].item():.6f} (psi={values[worst + 1].item():.9f})"
    )


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("lam", [0.0, 5.0])
def test_sphereface_psi_continuous_and_nonincreasing(m, lam):
    values = psi(torch.cos(THETA), Margin(sphere_m=m, sphere_lambda=lam))
    steps = values[1:] - values[:-1]
    # Continuity across the k-branches: no step larger than max|dpsi/dtheta| * dtheta (<= m * 1.6e-4).
    dtheta = math.pi / 20000
    assert steps.max() <= 1e-12, f"psi increases: max step {steps.max().item()!r}"
    assert (-steps).max() <= (m + 1) * dtheta, f"psi jumps: largest drop {(-steps).max().item()!r}"
    # Range: psi(0) = 1, psi(pi) = -(2m - 1) (before the lambda blend).
    end = -(2 * m - 1) if not lam else (lam * -1 + -(2 * m - 1)) / (1 + lam)
    assert_close(values[[0, -1]], torch.tensor([1.0, end], dtype=torch.float64), atol=1e-5, what="psi(0), psi(pi)")


@pytest.mark.parametrize("policy", ["fallback", "clamp"])
@pytest.mark.parametrize("m1, m2, m3", [(2.0, 0.3, 0.1), (1.35, 0.0, 0.0), (3.0, 0.0, 0.3), (0.5, 2.0, 0.1)])
def test_combined_jump_at_theta_limit(m1, m2, m3, policy):
    """psi at theta* from the left is -1 - m3; from the right it is -1 - m3 + jump with
    jump = 1 - max(cos(m2) + m2 sin(m2), 1) (fallback: insightface's gap, 0 when m2 = 0 and
    past m2 = 2.33, where insightface's line would jump up) or 0 (clamp)."""
    margin = Margin(m1=m1, m2=m2, m3=m3, theta_policy=policy)
    t = margin.theta_limit
    assert t < math.pi
    left, right = psi(torch.tensor([math.cos(t - 1e-9), math.cos(t + 1e-9)], dtype=torch.float64), margin).tolist()
    jump = (1 - max(math.cos(m2) + m2 * math.sin(m2), 1.0)) if policy == "fallback" else 0.0
    assert_close(left, -1.0 - m3, atol=1e-7, what="psi just inside theta*")
    assert_close(right, -1.0 - m3 + jump, atol=1e-7, what="psi just past theta*")


@pytest.mark.parametrize("m3", [0.0, 0.2])
@pytest.mark.parametrize("m2", [0.1, 0.5, 0.8, 1.2, 2.0, 2.3])
def test_arcface_fallback_is_insightface_shift(m2, m3):
    margin = Margin(m2=m2, m3=m3)
    assert_close(margin.fallback_shift, m2 * math.sin(m2), atol=1e-12, what="fallback_shift")
    # Cosines past cos(pi - m2): insightface's `cos - m2*sin(m2)` (minus m3).
    cos = torch.cos(torch.linspace(math.pi - m2 + 1e-3, math.pi - 1e-3, 50, dtype=torch.float64))
    assert_close(psi(cos, margin), cos - m3 - m2 * math.sin(m2), atol=1e-12, what="psi on the fallback")
    assert_close(psi_grad(cos, margin), 1.0, atol=0.0, what="psi_grad on the fallback")


# Cosines covering every branch: ArcFace/combined inside and past theta*, every SphereFace k.
COS_GRID = torch.cat([
    torch.linspace(-0.9999, 0.9999, 397, dtype=torch.float64),
    torch.tensor([-1 + 1e-6, 1 - 1e-6, 0.0, 0.5, -0.5], dtype=torch.float64),
    torch.cos(torch.linspace(3.0, math.pi - 1e-3, 20, dtype=torch.float64)),  # theta* near pi
])

ANGULAR = [
    dict(m2=0.5), dict(m2=1.2), dict(m2=0.5, m3=0.2), dict(m3=0.35), dict(m1=2.0, m2=0.3, m3=0.1),
    dict(m1=0.9, m2=0.4, m3=0.15), dict(m1=1.35), dict(m1=0.5, m2=2.0, m3=0.1), dict(),
]
GRAD_MARGINS = [
    Margin(**kw, theta_policy=p, grad_mode=g)
    for kw in ANGULAR for p in ("fallback", "clamp") for g in ("exact", "detached")
] + [
    Margin(sphere_m=m, sphere_lambda=lam, grad_mode=g)
    for m in (1, 2, 3, 4, 5) for lam in (0.0, 5.0, 1000.0) for g in ("exact", "detached")
]


@pytest.mark.parametrize("margin", GRAD_MARGINS, ids=margin_id)
def test_psi_grad_matches_autograd(margin):
    cos = COS_GRID.clone().requires_grad_(True)
    psi(cos, margin).sum().backward()
    closed = psi_grad(COS_GRID, margin)
    if margin.grad_mode == "detached":
        assert_close(cos.grad, 1.0, atol=0.0, what="detached autograd psi'")
    # The grid reaches every branch this margin has.
    if margin.is_sphereface:
        k = torch.floor(margin.sphere_m * torch.acos(COS_GRID) / math.pi).clamp(max=margin.sphere_m - 1)
        assert set(k.tolist()) == set(range(margin.sphere_m)), "the grid misses a SphereFace branch"
    elif margin.theta_limit < math.acos(-0.9999):
        assert (COS_GRID < math.cos(margin.theta_limit)).sum() >= 5, "the grid misses the branch past theta*"
    assert_close(closed, cos.grad, atol=1e-9, rtol=1e-9, what=f"psi_grad vs autograd for {margin}")


@pytest.mark.parametrize(
    "margin, cos, expected",
    [
        pytest.param(Margin(m2=0.5), 0.6, math.cos(0.5) + math.sin(0.5) * 0.6 / math.sqrt(1 - 0.6**2), id="arcface"),
        pytest.param(Margin(m2=0.5), -0.95, 1.0, id="arcface-fallback"),
        pytest.param(Margin(m2=0.5, theta_policy="clamp"), -0.95, 0.0, id="arcface-clamp"),
        pytest.param(
            Margin(m1=2.0, m2=0.3, m3=0.1), 0.6, 2.0 * math.sin(2.0 * math.acos(0.6) + 0.3) / math.sin(math.acos(0.6)),
            id="combined",
        ),
        pytest.param(Margin(m3=0.35), 0.6, 1.0, id="cosface"),
        # m=3 at 0.6: theta = 53.1 deg, k = 0; 3*U_2(c) = 3*(4c^2 - 1)
        pytest.param(Margin(sphere_m=3), 0.6, 3 * (4 * 0.6**2 - 1), id="sphere-m3-k0"),
        # m=2 at -0.6: theta = 126.9 deg, k = 1; -(2*U_1(c)) = -(2*2c)
        pytest.param(Margin(sphere_m=2), -0.6, -(2 * 2 * -0.6), id="sphere-m2-k1"),
        pytest.param(Margin(sphere_m=2, sphere_lambda=5.0), -0.6, (5.0 - 2 * 2 * -0.6) / 6.0, id="sphere-m2-lambda5"),
        pytest.param(Margin(m2=0.5, grad_mode="detached"), 0.6, 1.0, id="arcface-detached"),
    ],
)
def test_psi_grad_hand_values(margin, cos, expected):
    """psi_grad against DESIGN §2's formulas worked out with math, one point per branch."""
    got = psi_grad(torch.tensor([cos], dtype=torch.float64), margin)
    assert_close(got, expected, atol=1e-12, what=f"psi_grad({cos}) for {margin}")


@pytest.mark.parametrize("m", range(1, 9))
def test_chebyshev_t_u(m):
    theta = torch.linspace(0.01, math.pi - 0.01, 301, dtype=torch.float64)
    t, u = chebyshev_t_u(torch.cos(theta), m)
    assert_close(t, torch.cos(m * theta), atol=1e-11, what=f"T_{m}(cos) vs cos({m} theta)")
    assert_close(u, torch.sin(m * theta) / torch.sin(theta), atol=1e-10, what=f"U_{m - 1}(cos) vs sin/sin")


EDGE_MARGINS = [
    Margin(**kw, theta_policy=p, grad_mode=g)
    for kw in (dict(m2=0.5), dict(m3=0.35), dict(m1=2.0, m2=0.3, m3=0.1), dict(m1=1.35))
    for p in ("fallback", "clamp") for g in ("exact", "detached")
] + [Margin(sphere_m=m, sphere_lambda=lam) for m in (1, 2, 3, 4, 5) for lam in (0.0, 5.0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("margin", EDGE_MARGINS, ids=margin_id)
def test_psi_at_cos_plus_minus_one(margin, dtype):
    """At |cos| = 1 (and 1e-9 inside it) psi, its autograd gradient and psi_grad are finite.

    Semantics asserted (margins.COS_EPS, the straight-through clamp): for a margin that needs
    the angle, psi(cos) equals psi at the cosine clamped to [-1 + COS_EPS, 1 - COS_EPS], and
    the gradient equals psi_grad at the clamped cosine, not zero; CosFace (psi = cos - m3)
    needs no clamp and is evaluated as is.
    """
    edge = torch.tensor([1.0, -1.0, 1 - 1e-9, -1 + 1e-9], dtype=dtype)
    cos = edge.clone().requires_grad_(True)
    value = psi(cos, margin)
    value.sum().backward()
    closed = psi_grad(edge, margin)
    for name, t in (("psi", value), ("autograd psi'", cos.grad), ("psi_grad", closed)):
        assert torch.isfinite(t).all(), f"{name} not finite at {edge.tolist()}: {t.tolist()}"
    clamped = edge.clamp(-1 + COS_EPS, 1 - COS_EPS)
    expected = psi(edge if margin.is_additive_cosine else clamped, margin)
    assert_close(value, expected, atol=0.0, what="psi at the edge vs psi at the clamped cosine")
    assert_close(cos.grad, psi_grad(clamped, margin), atol=TOL[dtype], rtol=1e-6, what="autograd psi' at the edge")
    assert_close(closed, cos.grad, atol=TOL[dtype], rtol=1e-6, what="psi_grad at the edge")


@pytest.mark.parametrize(
    "kwargs, error, field",
    [
        (dict(m1=0.0), ValueError, "m1"),
        (dict(m1=-1.0), ValueError, "m1"),
        (dict(m2=-math.pi), ValueError, "m2"),
        (dict(m2=math.pi), ValueError, "m2"),
        (dict(m2=4.0), ValueError, "m2"),
        (dict(m3=-2.5), ValueError, "m3"),
        (dict(m3=2.5), ValueError, "m3"),
        (dict(m1=math.nan), ValueError, "m1"),
        (dict(m2=math.nan), ValueError, "m2"),
        (dict(m3=math.inf), ValueError, "m3"),
        (dict(m2=-math.inf), ValueError, "m2"),
        (dict(m2="0.5"), TypeError, "m2"),
        (dict(m3=True), TypeError, "m3"),
        (dict(sphere_m=0), ValueError, "sphere_m"),
        (dict(sphere_m=-2), ValueError, "sphere_m"),
        (dict(sphere_m=2.0), TypeError, "sphere_m"),
        (dict(sphere_m=True), TypeError, "sphere_m"),
        (dict(sphere_m=4, m2=0.5), ValueError, "sphere_m"),
        (dict(sphere_m=4, m3=0.1), ValueError, "sphere_m"),
        (dict(sphere_m=4, m1=2.0), ValueError, "sphere_m"),
        (dict(sphere_lambda=5.0), ValueError, "sphere_lambda"),
        (dict(sphere_m=2, sphere_lambda=-1.0), ValueError, "sphere_lambda"),
        (dict(sphere_m=2, sphere_lambda=math.nan), ValueError, "sphere_lambda"),
        (dict(theta_policy="wrap"), ValueError, "theta_policy"),
        (dict(grad_mode="stop"), ValueError, "grad_mode"),
        (dict(m2=torch.zeros(3, 2)), ValueError, "m2"),
        (dict(curricular_t=torch.zeros(2)), ValueError, "curricular_t"),
        (dict(curricular_t=math.nan), ValueError, "curricular_t"),
        (dict(filter_threshold=-1.5), ValueError, "filter_threshold"),
        (dict(theta_policy="adaface", filter_threshold=0.3), ValueError, "filter_threshold"),
        (dict(sphere_m=2, curricular_t=0.1), ValueError, "sphere_m"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else None,
)
def test_margin_rejects(kwargs, error, field):
    with pytest.raises(error, match=rf"\b{field}\b"):
        Margin(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [dict(m1=100.0), dict(m2=0.0), dict(m2=3.14), dict(m3=2.0), dict(m1=2, m2=0, m3=0),
     dict(sphere_m=1), dict(sphere_m=16, sphere_lambda=0.0), dict(sphere_m=4, m1=1, m2=0)],
    ids=repr,
)
def test_margin_accepts_boundaries(kwargs):
    margin = Margin(**kwargs)
    assert all(getattr(margin, k) == v for k, v in kwargs.items())


@pytest.mark.parametrize(
    "iteration, expected",
    [(0, 1000.0), (10, 1000.0 / (1 + 0.12 * 10)), (1000, 1000.0 / (1 + 0.12 * 1000)),
     # 1000 / (1 + 0.12 it) reaches lambda_min = 5 at it = 1658.3
     (1655, 1000.0 / (1 + 0.12 * 1655)), (1659, 5.0), (10**6, 5.0)],
)
def test_sphereface_lambda(iteration, expected):
    assert_close(sphereface_lambda(iteration), expected, atol=1e-12, what=f"lambda({iteration})")
