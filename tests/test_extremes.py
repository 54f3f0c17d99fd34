"""Extreme inputs on every usable backend: finite loss and gradients with the semantics that
docs/errors.md states, checked against hand values where there is one and against the
reference in float64 otherwise.

- |cos| = 1 (x a multiple of, or opposite to, its class vector): cos is clamped to
  +-(1 - COS_EPS) before the margin; the loss is the hand value at the clamped cosine.
- zero embedding or weight rows: norms are max(||v||, NORM_EPS) as in F.normalize, so cos = 0
  there and the loss is the hand value with cos = 0.
- norms: the loss is invariant to the scale of x and of W, and the gradients scale by its
  inverse, from norms of 1e-10 to 1e15 (fp32) and 1e-10 to 1e150 (fp64); below NORM_EPS
  (1e-12) a row counts as having norm NORM_EPS, and in fp32 a norm past sqrt(float32 max)
  (~1.8e19) overflows to inf, making the row's cosines 0: as the reference, never NaN.
- s up to 128, margins at the edges of their ranges and of the theta policies, SphereFace
  m = 1 and 16, lambda up to 1e12.
- B = 1, C = 1 (loss exactly 0, gradients 0), K = 1 and K > 1 with C = 1.

tests/test_backends.py holds the per-margin sweeps of |cos| = 1, zero rows and NaN for each
fused backend against the reference; this file adds the hand values and the other
extremes, for every backend at once.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastmargin.margins import COS_EPS, Margin
from helpers import (
    assert_close, assert_finite, assert_rel, geometric_inputs, reference_bound, rounding_floors, run, upstream_weights,
    usable_backends,
)

ALL = [pytest.param(name, device, id=name) for name, device in usable_backends()]
FUSED = [pytest.param(name, device, id=name) for name, device in usable_backends(fused_only=True)]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")]

# One of each kind, functional kwargs.
KINDS = {
    "arcface": dict(m2=0.5),
    "arcface-clamp": dict(m2=0.5, theta_policy="clamp"),
    "cosface": dict(m3=0.35),
    "combined": dict(m1=1.2, m2=0.3, m3=0.2),
    "sphere-m4": dict(sphere_m=4),
    "sphere-m3-lambda": dict(sphere_m=3, sphere_lambda=5.0),
}


def margin_of(kwargs):
    return Margin(**{k: v for k, v in kwargs.items() if k in Margin.__dataclass_fields__})


def psi_hand(c, kwargs):
    """psi of DESIGN §1 in plain math, independent of fastmargin.margins (m2 <= 2.33 here)."""
    m1, m2, m3 = kwargs.get("m1", 1.0), kwargs.get("m2", 0.0), kwargs.get("m3", 0.0)
    if "sphere_m" in kwargs:
        m, lam = kwargs["sphere_m"], kwargs.get("sphere_lambda", 0.0)
        theta = math.acos(c)
        k = min(math.floor(m * theta / math.pi), m - 1)
        value = (-1) ** k * math.cos(m * theta) - 2 * k
        return (lam * c + value) / (1 + lam)
    if m1 == 1.0 and m2 == 0.0:
        return c - m3
    theta = math.acos(c)
    if m1 * theta + m2 <= math.pi:
        return math.cos(m1 * theta + m2) - m3
    if kwargs.get("theta_policy") == "clamp":
        return -1.0 - m3
    # the fallback line through cos(theta*) - m3 - h, h = m2 sin m2 + cos m2 + cos(theta*)
    theta_star = (math.pi - m2) / m1
    return c - m3 - (max(m2 * math.sin(m2) + math.cos(m2), 1.0) + math.cos(theta_star))


def hand_loss(target_cos, other_cos, scale):
    """-log softmax of the target logit: scale * psi(target) against scale * cos of the others."""
    logits = torch.tensor([target_cos, *other_cos], dtype=torch.float64) * scale
    return (torch.logsumexp(logits, 0) - logits[0]).item()


def call(backend, device, x, w, y, upstream=None, **kwargs):
    """helpers.run on `device`, results back on the CPU."""
    upstream = upstream_weights(len(y)) if upstream is None else upstream
    got = run(backend, x.to(device), w.to(device), y.to(device), upstream.to(device), **kwargs)
    return tuple(t.cpu() for t in got)


def close_to_reference(got, same, exact, tol, what, floor):
    """STYLE's bound: |got - exact| <= 4 |same - exact| + floor + tol, relative to max|exact|
    for tol, where `same` is the reference run in the inputs' dtype, `exact` in float64 and
    floor the rounding floor of the case (helpers.rounding_floors: what rounding the
    cosines by a few eps can do through the case's conditioning, so that the bound holds
    where the same-dtype reference happens to round better than on this machine)."""
    reference_bound(got, same, exact, 4, floor, what, tol=tol)


# ---------------------------------------------------------------- |cos| = 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(KINDS))
@pytest.mark.parametrize("backend, device", ALL)
def test_cos_plus_minus_one_hand_values(backend, device, name, dtype):
    """D = 2: class 0 along e1, class 1 along e2. Rows: 3*w0 (cos 1), -w0 (cos -1), 0.5*w0, all
    labelled 0; every other cosine is 0. Each row's loss is the hand value with the target
    cosine clamped to +-(1 - COS_EPS) (fp32: the clamp bound rounded to fp32, 1 - 2^-23)."""
    kwargs = dict(KINDS[name], reduction="none", scale=4.0)
    w = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=dtype)
    x = torch.stack([3 * w[0], -w[0], 0.5 * w[0]])
    y = torch.zeros(3, dtype=torch.long)
    loss, lse, dx, dw = call(backend, device, x, w, y, **kwargs)
    assert_finite(f"{backend} {name} |cos| = 1", loss, lse, dx, dw)
    bound = 1 - (COS_EPS if dtype == torch.float64 else 2**-23)
    cosface = margin_of(kwargs).is_additive_cosine
    for i, c in enumerate((1.0, -1.0, 1.0)):
        clamped = c if cosface else math.copysign(bound, c)
        s = 4.0 * (x[i].double().norm().item() if "sphere_m" in kwargs else 1.0)
        want = hand_loss(psi_hand(clamped, kwargs), [0.0], s)
        assert_close(loss[i], want, atol=TOL[dtype] * 10 * s, what=f"{backend} {name} row {i} (cos {c}) loss")


# ---------------------------------------------------------------- zero rows


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(KINDS))
@pytest.mark.parametrize("backend, device", ALL)
def test_zero_embedding_and_weight_rows_hand_values(backend, device, name, dtype):
    """A zero embedding has cos = 0 to every class: loss = log(exp(s psi(0)) + C - 1) - s psi(0)
    (SphereFace: S = s * 0, every logit 0, loss log C). A zero weight row has cos = 0 to every
    embedding. Gradients are finite (of size 1/NORM_EPS at the zero rows, as F.normalize's)."""
    x, w, y = geometric_inputs(B=4, C=7, D=5, dtype=dtype, seed=5)
    x[0] = 0
    w[3] = 0
    y[1] = 3
    kwargs = dict(KINDS[name], reduction="none", scale=8.0)
    loss, lse, dx, dw = call(backend, device, x, w, y, **kwargs)
    assert_finite(f"{backend} {name} zero rows", loss, lse, dx, dw)
    want = math.log(7) if "sphere_m" in kwargs else hand_loss(psi_hand(0.0, kwargs), [0.0] * 6, 8.0)
    assert_close(loss[0], want, atol=TOL[dtype] * 10, what=f"{backend} {name}: loss of the zero embedding")
    # row 1's target is the zero weight row: its target cosine is 0
    x1 = x[1].double()
    others = [(F.normalize(x1, dim=0) @ F.normalize(w[j].double(), dim=0)).item() for j in range(7) if j != 3]
    s = 8.0 * (x1.norm().item() if "sphere_m" in kwargs else 1.0)
    want = hand_loss(psi_hand(0.0, kwargs), others, s)
    assert_close(loss[1], want, atol=TOL[dtype] * 10 * s, what=f"{backend} {name}: loss with a zero target row")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend, device", ALL)
def test_zero_embedding_in_half_precision(backend, device, dtype):
    """The gradient at an exactly zero embedding is of size s / NORM_EPS (F.normalize's): it
    overflows float16 (max 65504) to +-inf in that row only, in every backend as in the
    reference (docs/errors.md); bfloat16 has float32's range and stays finite."""
    x, w, y = geometric_inputs(B=4, C=7, D=5, seed=5)
    x, w = x.to(dtype), w.float()
    x[0] = 0
    loss, lse, dx, dw = call(backend, device, x, w, y, m2=0.5)
    assert_finite(f"{backend} {dtype}", loss, lse, dw, dx[1:])
    if dtype == torch.float16:
        assert torch.isinf(dx[0]).all(), f"{backend}: the zero fp16 row's gradient is {dx[0].tolist()}"
    else:
        assert_finite(f"{backend} bf16 zero row", dx[0])
        assert dx[0].float().abs().max() > 1e6


# ---------------------------------------------------------------- huge and tiny norms

# (a, b): x scaled by a, W by b; every norm stays above NORM_EPS (norms start in [0.5, 3]).
SCALES = {torch.float32: [(1e-10, 1e-10), (1e-5, 1e5), (1e5, 1e-5), (1e15, 1e15)],
          torch.float64: [(1e-10, 1e-10), (1e-5, 1e5), (1e50, 1e-8), (1e150, 1e150)]}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["arcface", "combined", "cosface"])
@pytest.mark.parametrize("backend, device", ALL)
def test_scale_invariance_of_norms(backend, device, name, dtype):
    """loss(a x, b W) = loss(x, W); d/dx scales by 1/a, d/dW by 1/b, for norms far from 1."""
    x, w, y = geometric_inputs(B=6, C=9, D=5, dtype=dtype, seed=6)
    kwargs = dict(KINDS[name], reduction="none", label_smoothing=0.1)
    base = call(backend, device, x, w, y, **kwargs)
    for a, b in SCALES[dtype]:
        got = call(backend, device, x * a, w * b, y, **kwargs)
        assert_finite(f"{backend} {name} a={a:g}", *got)
        for label, g, want, factor in zip(("loss", "lse", "dx", "dW"), got, base, (1, 1, a, b)):
            assert_rel(g * factor, want, 10 * TOL[dtype], f"{backend} {name} norms x {a:g}, W x {b:g}: {label}")


@pytest.mark.parametrize("name", ["arcface", "sphere-m4"])
@pytest.mark.parametrize("backend, device", FUSED)
def test_norms_past_the_limits_match_reference(backend, device, name):
    """fp32 rows of norm 1e-14 (below NORM_EPS: counted as NORM_EPS, cos shrinks toward 0),
    1e20 (the squared norm overflows to inf: cos = 0, zero gradient for that row) and 1e4;
    SphereFace, whose logits s ||x|| cos grow with the norm, 1e-14, 1e8 and 1e4: finite, and
    as the reference computes them. At logits of 1e8 the backward's exp(z - lse) holds only if
    it rounds z = S cos exactly as the forward did (no FMA contraction: setup.py, launch.py,
    tiles.cuh's logit). (A SphereFace row whose norm overflows has S = inf and NaN logits.)"""
    x, w, y = geometric_inputs(B=5, C=9, D=5, dtype=torch.float32, seed=7)
    x[0] *= 1e-14
    sphere = "sphere_m" in KINDS[name]
    x[1] *= 1e8 if sphere else 1e20
    x[2] *= 1e4
    kwargs = dict(KINDS[name], reduction="none")
    got = call(backend, device, x, w, y, **kwargs)
    same = call("reference", device, x, w, y, **kwargs)
    exact = call("reference", device, x.double(), w.double(), y, **kwargs)
    assert_finite(f"{backend} {name}", *got)
    floors = rounding_floors(x, w, y, kwargs, upstream_weights(len(y)))
    for label, a, b, c in zip(("loss", "lse", "dx", "dW"), got, same, exact):
        for rows in ([0], [1], [2], [3, 4]) if label != "dW" else (slice(None),):
            close_to_reference(a[rows], b[rows], c[rows], 1e-5, f"{backend} {name} extreme norms: {label} rows {rows}",
                               floors[label][rows])
    if not sphere:
        assert_close(got[2][1], 0.0, atol=0.0, what="d loss / d x of the overflowing row")


# ---------------------------------------------------------------- s up to 128, margins at their edges

EDGE_MARGINS = [
    pytest.param(dict(m2=0.0), id="m2=0"),
    pytest.param(dict(m2=2.33), id="m2=2.33"),
    pytest.param(dict(m2=3.0), id="m2=3"),
    pytest.param(dict(m2=math.pi - 1e-6), id="m2=pi-1e-6"),
    pytest.param(dict(m2=math.pi - 1e-6, theta_policy="clamp"), id="m2=pi-1e-6-clamp"),
    pytest.param(dict(m1=100.0, m2=0.1), id="m1=100"),
    pytest.param(dict(m1=100.0, m2=0.1, theta_policy="clamp"), id="m1=100-clamp"),
    pytest.param(dict(m1=0.01, m2=0.5, m3=2.0), id="m1=0.01-m3=2"),
    pytest.param(dict(m3=2.0), id="m3=2"),
    pytest.param(dict(sphere_m=1), id="sphere-m1"),
    pytest.param(dict(sphere_m=16), id="sphere-m16"),
    pytest.param(dict(sphere_m=4, sphere_lambda=1e12), id="sphere-lambda=1e12"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kwargs", EDGE_MARGINS)
@pytest.mark.parametrize("backend, device", FUSED)
def test_edge_margins_and_scale_128(backend, device, kwargs, dtype):
    """Margins at the ends of their ranges, s = 128 (SphereFace: s = 32, logits s ||x|| up to
    96), both grad modes: finite, and equal to the fp64 reference. Targets at 16 angles from
    0.1 to 3.05 rad, ragged B = 37, C = 101; every margin has targets on both sides of theta*."""
    scale = 32.0 if "sphere_m" in kwargs else 128.0
    x, w, y = geometric_inputs(B=37, C=101, D=9, dtype=dtype, seed=8)
    for grad_mode in ("exact", "detached"):
        args = dict(kwargs, scale=scale, grad_mode=grad_mode, reduction="none", label_smoothing=0.1)
        upstream = upstream_weights(len(y))
        got = call(backend, device, x, w, y, upstream, **args)
        same = call("reference", device, x, w, y, upstream, **args)
        exact = call("reference", device, x.double(), w.double(), y, upstream, **args)
        assert_finite(f"{backend} {kwargs} s={scale}", *got)
        floors = rounding_floors(x, w, y, args, upstream)
        for label, a, b, c in zip(("loss", "lse", "dx", "dW"), got, same, exact):
            close_to_reference(a, b, c, TOL[dtype], f"{backend} {kwargs} {grad_mode}: {label}", floors[label])


@pytest.mark.parametrize("backend, device", ALL)
def test_zero_margin_is_softmax_cross_entropy(backend, device):
    """m1 = 1, m2 = m3 = 0 at s = 128: F.cross_entropy of 128 * cos, with label smoothing."""
    x, w, y = geometric_inputs(B=37, C=101, D=9, seed=9)
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()
    for eps in (0.0, 0.2):
        loss = call(backend, device, x, w, y, scale=128.0, label_smoothing=eps, reduction="none")[0]
        want = F.cross_entropy(128.0 * cos, y, label_smoothing=eps, reduction="none")
        assert_rel(loss, want, 1e-12, f"{backend} plain softmax, eps={eps}")


@pytest.mark.parametrize("backend, device", ALL)
def test_clamp_policy_beyond_theta_star(backend, device):
    """theta_policy='clamp': a target past theta* has logit s * (-1 - m3) exactly, and no
    gradient through psi (the clamped psi is flat): with m1 = 100 every target but the 0.1 rad
    one is past theta* = (pi - 0.1) / 100 = 0.0304."""
    x, w, y = geometric_inputs(B=16, C=20, D=6, seed=10)
    kwargs = dict(m1=100.0, m2=0.1, m3=0.3, theta_policy="clamp", scale=16.0, reduction="none")
    loss = call(backend, device, x, w, y, **kwargs)[0]
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()
    for i in range(1, 16):
        others = torch.cat([cos[i, : y[i]], cos[i, y[i] + 1 :]]).tolist()
        assert_close(loss[i], hand_loss(-1.3, others, 16.0), atol=1e-12, what=f"{backend} row {i}")


# ---------------------------------------------------------------- B = 1, C = 1, K


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("name", list(KINDS))
@pytest.mark.parametrize("backend, device", ALL)
def test_one_class_has_zero_loss(backend, device, name, K):
    """C = 1: the softmax over one class is 1, so the loss is exactly 0 (with label smoothing
    too) and the gradients vanish (to rounding: |grad| <= 1e-12), for B = 1 and B = 5, D = 1 and 4."""
    for B, D in ((1, 1), (5, 4)):
        g = torch.Generator().manual_seed(B)
        x, w = torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(K, D, generator=g, dtype=torch.float64)
        y = torch.zeros(B, dtype=torch.long)
        loss, lse, dx, dw = call(backend, device, x, w, y, sub_centers=K, label_smoothing=0.1, **KINDS[name])
        assert_close(loss, 0.0, atol=0.0, what=f"{backend} {name} C=1 B={B} loss")
        assert_close(dx, torch.zeros_like(dx), atol=1e-12, what=f"{backend} {name} C=1 B={B} dx")
        assert_close(dw, torch.zeros_like(dw), atol=1e-12, what=f"{backend} {name} C=1 B={B} dW")


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("name", list(KINDS))
@pytest.mark.parametrize("backend, device", FUSED)
def test_single_row(backend, device, name, K):
    """B = 1 against the reference in fp64, D = 1 and D = 3, C = 2 and 7."""
    for C, D in ((2, 1), (7, 3)):
        if K > 1 and D == 1:
            continue  # every cos is +-1 at D = 1: sub-centers tie
        g = torch.Generator().manual_seed(C)
        x, w = torch.randn(1, D, generator=g, dtype=torch.float64), torch.randn(C * K, D, generator=g, dtype=torch.float64)
        y = torch.tensor([C - 1])
        kwargs = dict(KINDS[name], sub_centers=K, scale=4.0)
        got = call(backend, device, x, w, y, **kwargs)
        want = call("reference", device, x, w, y, **kwargs)
        for label, a, b in zip(("loss", "lse", "dx", "dW"), got, want):
            # D = 1: every cos is +-1, d cos / d x = 0 and the gradients are rounding-sized
            assert_close(a, b, atol=1e-9 * 4.0 * (1 if D > 1 else 10), rtol=1e-9, what=f"{backend} {name} B=1 C={C} D={D}: {label}")
