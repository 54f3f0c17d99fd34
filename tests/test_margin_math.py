"""The margin math in its three languages held to each other: fastmargin/margins.py
(PyTorch, what the reference computes), kernels/margin.py (Triton, run by the interpreter
on the CPU or compiled on a GPU) and csrc/margin.h (C++, the code both the CPU kernel and
the CUDA kernels compile: fastmargin._C.margin_math evaluates it on the CPU), on a grid of
cosines that holds every branch edge, in float64 and float32; and their shared layout
(kinds, params' rows) equal by name."""

import math

import pytest
import torch

from fastmargin import _extension, margins
from fastmargin.margins import (ADAFACE_EPS, COS_EPS, EASY_LIMIT, Margin, lower, nontarget_grad, nontarget_value, replace, target_grad,
                                target_value)
from helpers import assert_close

try:
    import triton
    import triton.language as tl

    from fastmargin.kernels import margin as jit
except ImportError:
    triton = None
else:
    @triton.jit
    def _margin_math_kernel(cos_ptr, out_ptr, params_ptr, stride_pp, N, KIND: tl.constexpr,
                            SPHERE_M: tl.constexpr, DETACHED: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < N
        c = tl.load(cos_ptr + offsets, mask=mask, other=0.0)
        prow = params_ptr + tl.zeros((BLOCK,), tl.int64)  # every element reads column 0
        tl.store(out_ptr + offsets, jit.psi(c, prow, stride_pp, KIND, SPHERE_M), mask=mask)
        tl.store(out_ptr + N + offsets, jit.psi_grad(c, prow, stride_pp, KIND, SPHERE_M, DETACHED), mask=mask)
        lo, hi, a0, a1, a2 = jit.nontarget_rows(prow, stride_pp)
        tile = c[:, None]
        tl.store(out_ptr + 2 * N + offsets[:, None], jit.nontarget(tile, lo, hi, a0, a1, a2), mask=mask[:, None])
        tl.store(out_ptr + 3 * N + offsets[:, None], jit.nontarget_grad(tile, lo, hi, a0, a1, a2),
                 mask=mask[:, None])

# Every kind and policy; m1 < 1 (theta* beyond pi: never reached) and m1 = 2 (reached early);
# negative m2 (AdaFace's); every non-target transform.
MARGINS = {
    "arcface": Margin(m2=0.5),
    "arcface-m2=2.5": Margin(m2=2.5),  # past 2.33, where the fallback's max matters
    "arcface-clamp": Margin(m2=0.5, theta_policy="clamp"),
    "arcface-easy": Margin(m2=0.5, theta_policy="easy"),
    "arcface-easy-m2=2": Margin(m2=2.0, theta_policy="easy"),  # theta* < pi/2: easy is unguarded there
    "arcface-none": Margin(m2=0.5, theta_policy="none"),
    "arcface-m2=-0.4": Margin(m2=-0.4),  # held at theta + m2 = 0
    "adaface": Margin(m2=0.3, m3=0.2, theta_policy="adaface"),
    "adaface-m2=-0.4": Margin(m2=-0.4, m3=0.1, theta_policy="adaface"),
    "cosface": Margin(m3=0.35),
    "cosface-easy": Margin(m3=0.35, theta_policy="easy"),
    "combined": Margin(m1=1.2, m2=0.3, m3=0.2),
    "combined-clamp": Margin(m1=1.2, m2=0.3, m3=0.2, theta_policy="clamp"),
    "combined-m1=2": Margin(m1=2.0, m2=0.2, m3=0.1),
    "combined-m1=0.7": Margin(m1=0.7, m2=0.4, m3=0.1),
    "combined-m2=-0.3": Margin(m1=1.5, m2=-0.3, m3=0.1),
    "curricular": Margin(m2=0.5, curricular_t=0.3),
    "filter": Margin(m2=0.5, filter_threshold=0.2),
    **{f"sphere-m{m}": Margin(sphere_m=m) for m in (1, 2, 3, 4, 16)},
    "sphere-m3-lambda": Margin(sphere_m=3, sphere_lambda=5.0),
}
GRAD_MODES = ("exact", "detached")
# CurricularFace's threshold is its row's cos(theta_y + m): these tests take a target cosine of 0.6.
TARGET_COS = 0.6

# Error bound, relative to max(1, |value|), between two languages in the same dtype: the
# expressions are the same, so only the acos implementations (torch's, the C library's,
# kernels/margin.py's Cephes atan) and their rounding differ: a few ulps of theta, scaled by
# m1 <= 2 and by 1/sin(theta) <= 1/sqrt(2 COS_EPS) ~ 2236 in psi' at the clamp only where
# the angle's error is ~ theta * eps ~ sqrt(2 COS_EPS) * eps. SphereFace's Chebyshev
# recurrence carries an absolute error up to ~ m^2 eps in T_m and in m U_{m-1}, and where
# k's edge falls between two languages' acos, (-1)^k flips on a psi' of that size: its
# bound is m^2 times as large (`conditioning`). Measured: 3e-15 (fp64), 1.2e-6 (fp32); the
# bounds hold with room on any IEEE machine.
TOL = {torch.float64: 1e-12, torch.float32: 64 * torch.finfo(torch.float32).eps}


def conditioning(margin: Margin) -> float:
    return float(margin.sphere_m**2) if margin.is_sphereface else 1.0


def lowered(margin: Margin, dtype: torch.dtype, device="cpu"):
    target_cos = torch.tensor([TARGET_COS]) if margin.needs_target_cos else None
    return lower(margin, 1.0, dtype, torch.device(device), target_cos)


def grid(margin: Margin, dtype: torch.dtype) -> torch.Tensor:
    """Cosines across [-1, 1] in `dtype`, plus every edge of `margin`'s branches and its
    neighbours in that dtype: +-1, 0, the clamp bounds, every limit of the lowered params
    (theta*, the bottom of theta + m2, the non-target thresholds), SphereFace's k pi / m."""
    params = lowered(margin, torch.float64).params[:, 0]
    limits = [params[margins.PARAMS.index(name)].item()
              for name in ("cos_lo", "cos_hi", "cos_theta_limit", "top_limit", "nt_lo", "nt_hi")]
    edges = [-1.0, 1.0, 0.0, -1.0 + COS_EPS, 1.0 - COS_EPS] + [v for v in limits if -1 <= v <= 1]
    if margin.is_sphereface:
        edges += [math.cos(k * math.pi / margin.sphere_m) for k in range(1, margin.sphere_m)]
    points = torch.tensor(edges, dtype=dtype)
    ulp = torch.nextafter(points, torch.full_like(points, 2.0)) - points
    near = torch.cat([points, points + ulp, points - ulp, points + 64 * ulp, points - 64 * ulp])
    cos = torch.cat([torch.linspace(-1, 1, 4001, dtype=dtype), near.clamp(-1, 1)])
    return cos


def torch_math(cos, margin):
    low = lowered(margin, cos.dtype)
    return (target_value(cos, low.params, low.flags), target_grad(cos, low.params, low.flags),
            nontarget_value(cos, low.params), nontarget_grad(cos, low.params))


def cpp_math(cos, margin):
    ext = _extension.module()
    if ext is None:
        pytest.skip(_extension.build_info()["error"])
    low = lowered(margin, cos.dtype)
    return ext.margin_math(cos, low.params, list(low.flags))


def triton_math(cos, margin):
    if triton is None:
        pytest.skip("triton is not installed")
    from fastmargin.kernels.launch import INTERPRET

    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("Triton runs compiled only on a GPU, interpreted with TRITON_INTERPRET=1")
    c = cos.to("cpu" if INTERPRET else "cuda")
    low = lowered(margin, cos.dtype, c.device)
    out = torch.empty(4, len(c), dtype=c.dtype, device=c.device)
    kind, sphere_m, _, detached = low.flags
    _margin_math_kernel[(triton.cdiv(len(c), 256),)](
        c, out, low.params, low.params.stride(0), len(c), KIND=kind, SPHERE_M=max(1, sphere_m),
        DETACHED=bool(detached), BLOCK=256)
    return tuple(out.cpu())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("name", list(MARGINS))
def test_three_languages_agree(name, grad_mode, dtype):
    margin = replace(MARGINS[name], grad_mode=grad_mode)
    cos = grid(margin, dtype)
    want = torch_math(cos, margin)
    for language, fn in (("C++ (csrc/margin.h)", cpp_math), ("Triton (kernels/margin.py)", triton_math)):
        got = fn(cos, margin)
        for label, a, b in zip(("psi", "psi'", "nontarget", "nontarget'"), got, want):
            assert a.dtype == dtype
            scale = b.abs().clamp(min=1.0)
            assert_close(a / scale, b / scale, atol=TOL[dtype] * conditioning(margin), what=f"{name} {grad_mode} {dtype}: {language} {label} "
                         "vs fastmargin.margins (relative to max(1, |value|))")


def exact_psi(c: float, margin: Margin) -> float:
    """psi of a float margin at one cosine, from each policy's definition (Margin's docstring)
    with Python's math module: an independent acos and cos, and no lowered params."""
    if margin.is_additive_cosine:
        return c - margin.m3
    eps = ADAFACE_EPS if margin.theta_policy == "adaface" else COS_EPS
    cc = min(max(c, -1 + eps), 1 - eps)
    if margin.is_sphereface:
        m, theta = margin.sphere_m, math.acos(cc)
        k = min(max(math.floor(m * theta / math.pi), 0), m - 1)
        base = (-1) ** k * math.cos(m * theta) - 2 * k
        return (margin.sphere_lambda * cc + base) / (1 + margin.sphere_lambda)
    m1, m2, m3 = margin.m1, margin.m2, margin.m3
    angle = m1 * math.acos(cc) + m2
    policy = margin.theta_policy
    if policy == "fallback" and angle > math.pi:  # insightface's line, discontinuous at theta*
        return cc - (max(m2 * math.sin(m2) + math.cos(m2), 1) + math.cos((math.pi - m2) / m1)) - m3
    if policy in ("fallback", "clamp"):
        return math.cos(min(max(angle, 0.0), math.pi)) - m3
    if policy == "easy":
        return math.cos(angle) - m3 if cc >= EASY_LIMIT else cc
    if policy == "adaface":
        return math.cos(min(max(angle, ADAFACE_EPS), math.pi - ADAFACE_EPS)) - m3
    return math.cos(angle) - m3


def exact_nontarget(c: float, margin: Margin) -> float:
    """The non-target transform at one cosine, from the originals' definitions."""
    if margin.theta_policy == "adaface":
        return min(max(c, -1 + ADAFACE_EPS), 1 - ADAFACE_EPS)
    if margin.filter_threshold is not None:
        return 0.0 if c > margin.filter_threshold else c
    if margin.curricular_t is not None:
        threshold = math.cos(margin.m1 * math.acos(TARGET_COS) + margin.m2) - margin.m3
        return c * (margin.curricular_t + c) if c > threshold else c
    return c


@pytest.mark.parametrize("name", list(MARGINS))
def test_float64_is_the_exact_answer(name):
    """The fp64 PyTorch math is the oracle's: within 1e-13 of each policy's definition in
    float64 evaluated elementwise with Python's math module."""
    margin = MARGINS[name]
    cos = grid(margin, torch.float64)
    # Within a few ulps of a branch edge the two sides of a discontinuity (the fallback line,
    # a threshold) may be taken by one and not the other: the edge is computed as a cosine
    # there and as an angle here. The language test covers the edges.
    params = lowered(margin, torch.float64).params[:, 0]
    edges = torch.tensor([params[margins.PARAMS.index(n)].item() for n in ("cos_theta_limit", "top_limit", "nt_hi")]
                         + [0.0], dtype=torch.float64)
    cos = cos[((cos[:, None] - edges).abs() > 1e-12).all(dim=1)]
    got, _, got_nt, _ = torch_math(cos, margin)
    for c, value, nt in zip(cos.tolist(), got.tolist(), got_nt.tolist()):
        for label, a, b in (("psi", value, exact_psi(c, margin)), ("nontarget", nt, exact_nontarget(c, margin))):
            assert abs(a - b) <= 1e-13 * max(1.0, abs(b)), f"{name} {label} at cos={c!r}: {a!r} vs {b!r}"


@pytest.mark.parametrize("name", list(MARGINS))
def test_closed_forms_are_the_derivatives(name):
    """target_grad and nontarget_grad (what the kernels compute) against autograd of
    target_value and nontarget_value in float64, away from the branch edges."""
    margin = MARGINS[name]
    low = lowered(margin, torch.float64)
    cos = torch.linspace(-0.999, 0.999, 1999, dtype=torch.float64, requires_grad=True)
    psi_auto, = torch.autograd.grad(target_value(cos, low.params, low.flags).sum(), cos)
    nt_auto, = torch.autograd.grad(nontarget_value(cos, low.params).sum(), cos)
    assert_close(target_grad(cos.detach(), low.params, low.flags), psi_auto, atol=1e-9, what=f"{name} psi'")
    assert_close(nontarget_grad(cos.detach(), low.params), nt_auto, atol=1e-12, what=f"{name} nontarget'")


def test_layout_is_shared():
    """The kinds and the params' rows are the same numbers in margins.py, kernels/margin.py and
    csrc/margin.h, and lower() writes each param where its name says."""
    ext = _extension.module()
    if ext is None:
        pytest.skip(_extension.build_info()["error"])
    layout = ext.margin_layout()
    assert layout["params"] == {name: i for i, name in enumerate(margins.PARAMS)}
    assert layout["kinds"] == {k: getattr(margins, k) for k in ("ADDITIVE", "ARC", "COMBINED", "SPHERE")}
    margin = Margin(m1=1.2, m2=0.3, m3=0.2)
    params = lower(margin, 32.0, torch.float64, torch.device("cpu")).params
    assert params.shape == (margins.NUM_PARAMS, 1)
    theta_top = (math.pi - 0.3) / 1.2
    want = dict(scale=32.0, m1=1.2, m2=0.3, m3=0.2, sphere_lambda=0.0, cos_m2=math.cos(0.3), sin_m2=math.sin(0.3),
                cos_lo=-1 + COS_EPS, cos_hi=1 - COS_EPS, clamp_grad=1.0, cos_theta_limit=math.cos(theta_top),
                beyond_slope=1.0, beyond_shift=max(0.3 * math.sin(0.3) + math.cos(0.3), 1) + math.cos(theta_top),
                top_limit=2.0, top_value=1.0, nt_lo=-2.0, nt_hi=2.0, nt_a0=0.0, nt_a1=0.0, nt_a2=0.0)
    got = {name: params[i, 0].item() for i, name in enumerate(margins.PARAMS)}
    assert got.keys() == want.keys()
    for name in want:
        assert abs(got[name] - want[name]) <= 4e-16 * max(1.0, abs(want[name])), (name, got[name], want[name])
    if triton is not None:
        for i, name in enumerate(margins.PARAMS):
            offsets = [v for k, v in vars(jit).items() if k.startswith("P_") and int(v) == i]
            assert len(offsets) == 1, f"kernels/margin.py has {len(offsets)} P_* constants for row {i} ({name})"
        assert [int(k) for k in (jit.ADDITIVE, jit.ARC, jit.COMBINED, jit.SPHERE)] == [0, 1, 2, 3]


def test_lowering_is_cached_and_typed():
    """One lowering per (margin, scale, dtype, device): a step with the previous step's
    margin reuses its params (no host-to-device copy)."""
    a = lower(Margin(m2=0.5), 64.0, torch.float32, torch.device("cpu"))
    b = lower(Margin(m2=0.5), 64.0, torch.float32, torch.device("cpu"))
    assert a is b and a.params.dtype == torch.float32
    assert lower(Margin(m2=0.5), 64.0, torch.float64, torch.device("cpu")).params.dtype == torch.float64
    assert a.flags == (margins.ARC, 0, 0, 0)
    assert Margin(sphere_m=3, theta_policy="clamp", grad_mode="detached").flags == (margins.SPHERE, 3, 0, 1)
    assert Margin(m2=0.5, filter_threshold=0.1).flags == (margins.ARC, 0, 1, 0)


def test_per_row_params():
    """A (B,) margin lowers to one column a row, each column the float margin's."""
    m2 = torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64)
    m3 = torch.tensor([0.0, 0.3, 0.1], dtype=torch.float64)
    for policy in ("fallback", "clamp", "easy", "none", "adaface"):
        params = lower(Margin(m2=m2, m3=m3, theta_policy=policy), 64.0, torch.float64, torch.device("cpu")).params
        assert params.shape == (margins.NUM_PARAMS, 3)
        for i in range(3):
            one = Margin(m2=m2[i].item(), m3=m3[i].item(), theta_policy=policy)
            want = lower(one, 64.0, torch.float64, torch.device("cpu")).params[:, 0]
            assert_close(params[:, i], want, atol=1e-15, what=f"{policy} row {i}")
