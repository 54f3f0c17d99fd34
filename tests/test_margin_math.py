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
from fastmargin.margins import COS_EPS, Margin, lower, psi, psi_grad
from helpers import assert_close

try:
    import triton
    import triton.language as tl

    from fastmargin.kernels import margin as jit
except ImportError:
    triton = None
else:
    @triton.jit
    def _margin_math_kernel(cos_ptr, psi_ptr, grad_ptr, params_ptr, stride_pp, N, KIND: tl.constexpr,
                            SPHERE_M: tl.constexpr, CLAMP_THETA: tl.constexpr, DETACHED: tl.constexpr,
                            BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < N
        c = tl.load(cos_ptr + offsets, mask=mask, other=0.0)
        prow = params_ptr + tl.zeros((BLOCK,), tl.int64)  # every element reads column 0
        tl.store(psi_ptr + offsets, jit.psi(c, prow, stride_pp, KIND, SPHERE_M, CLAMP_THETA), mask=mask)
        tl.store(grad_ptr + offsets, jit.psi_grad(c, prow, stride_pp, KIND, SPHERE_M, CLAMP_THETA, DETACHED),
                 mask=mask)

# Every kind and policy; m1 < 1 (theta* beyond pi: never reached) and m1 = 2 (reached early).
MARGINS = {
    "arcface": Margin(m2=0.5),
    "arcface-m2=2.5": Margin(m2=2.5),  # past 2.33, where the fallback's max matters
    "arcface-clamp": Margin(m2=0.5, theta_policy="clamp"),
    "cosface": Margin(m3=0.35),
    "combined": Margin(m1=1.2, m2=0.3, m3=0.2),
    "combined-clamp": Margin(m1=1.2, m2=0.3, m3=0.2, theta_policy="clamp"),
    "combined-m1=2": Margin(m1=2.0, m2=0.2, m3=0.1),
    "combined-m1=0.7": Margin(m1=0.7, m2=0.4, m3=0.1),
    **{f"sphere-m{m}": Margin(sphere_m=m) for m in (1, 2, 3, 4, 16)},
    "sphere-m3-lambda": Margin(sphere_m=3, sphere_lambda=5.0),
}
GRAD_MODES = ("exact", "detached")

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


def grid(margin: Margin, dtype: torch.dtype) -> torch.Tensor:
    """Cosines across [-1, 1] in `dtype`, plus every edge of `margin`'s branches and its
    neighbours in that dtype: +-1, the clamp bounds, theta*, SphereFace's k pi / m."""
    edges = [-1.0, 1.0, 0.0, -1.0 + COS_EPS, 1.0 - COS_EPS, margin.cos_theta_limit]
    if margin.is_sphereface:
        edges += [math.cos(k * math.pi / margin.sphere_m) for k in range(1, margin.sphere_m)]
    points = torch.tensor(edges, dtype=dtype)
    ulp = torch.nextafter(points, torch.full_like(points, 2.0)) - points
    near = torch.cat([points, points + ulp, points - ulp, points + 64 * ulp, points - 64 * ulp])
    cos = torch.cat([torch.linspace(-1, 1, 4001, dtype=dtype), near.clamp(-1, 1)])
    return cos


def torch_math(cos, margin):
    return psi(cos, margin), psi_grad(cos, margin)


def cpp_math(cos, margin):
    ext = _extension.module()
    if ext is None:
        pytest.skip(_extension.build_info()["error"])
    params = lower(margin, 1.0, cos.dtype, torch.device("cpu")).params
    return ext.margin_math(cos, params, list(margin.flags))


def triton_math(cos, margin):
    if triton is None:
        pytest.skip("triton is not installed")
    from fastmargin.kernels.launch import INTERPRET

    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("Triton runs compiled only on a GPU, interpreted with TRITON_INTERPRET=1")
    c = cos.to("cpu" if INTERPRET else "cuda")
    lowered = lower(margin, 1.0, cos.dtype, c.device)
    value, grad = torch.empty_like(c), torch.empty_like(c)
    kind, sphere_m, clamp_theta, detached = lowered.flags
    _margin_math_kernel[(triton.cdiv(len(c), 256),)](
        c, value, grad, lowered.params, lowered.params.stride(0), len(c), KIND=kind, SPHERE_M=max(1, sphere_m),
        CLAMP_THETA=bool(clamp_theta), DETACHED=bool(detached), BLOCK=256)
    return value.cpu(), grad.cpu()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("name", list(MARGINS))
def test_three_languages_agree(name, grad_mode, dtype):
    margin = Margin(**{**MARGINS[name].__dict__, "grad_mode": grad_mode})
    cos = grid(margin, dtype)
    want = torch_math(cos, margin)
    for language, fn in (("C++ (csrc/margin.h)", cpp_math), ("Triton (kernels/margin.py)", triton_math)):
        got = fn(cos, margin)
        for label, a, b in zip(("psi", "psi'"), got, want):
            assert a.dtype == dtype
            scale = b.abs().clamp(min=1.0)
            assert_close(a / scale, b / scale, atol=TOL[dtype] * conditioning(margin), what=f"{name} {grad_mode} {dtype}: {language} {label} "
                         "vs fastmargin.margins (relative to max(1, |value|))")


@pytest.mark.parametrize("name", list(MARGINS))
def test_float64_is_the_exact_answer(name):
    """The fp64 PyTorch math is the oracle's: within 1e-13 of the same formulas in float64
    evaluated elementwise with Python's math module (an independent acos and cos)."""
    margin = MARGINS[name]
    cos = grid(margin, torch.float64)
    got, _ = torch_math(cos, margin)
    for c, value in zip(cos.tolist()[::37], got.tolist()[::37]):
        cc = min(max(c, -1 + COS_EPS), 1 - COS_EPS)
        if margin.is_additive_cosine:
            want = c - margin.m3
        elif margin.is_sphereface:
            m, theta = margin.sphere_m, math.acos(cc)
            k = min(max(math.floor(m * theta / math.pi), 0), m - 1)
            base = (-1) ** k * math.cos(m * theta) - 2 * k
            want = (margin.sphere_lambda * cc + base) / (1 + margin.sphere_lambda)
        elif cc < margin.cos_theta_limit:
            want = (-1.0 if margin.theta_policy == "clamp" else cc - margin.fallback_shift) - margin.m3
        else:
            want = math.cos(margin.m1 * math.acos(cc) + margin.m2) - margin.m3
        assert abs(value - want) <= 1e-13 * max(1.0, abs(want)), f"{name} at cos={c!r}: {value!r} vs {want!r}"


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
    want = dict(scale=32.0, m1=1.2, m2=0.3, m3=0.2, sphere_lambda=0.0, cos_m2=math.cos(0.3), sin_m2=math.sin(0.3),
                cos_theta_limit=margin.cos_theta_limit, fallback_shift=margin.fallback_shift,
                cos_lo=-1 + COS_EPS, cos_hi=1 - COS_EPS)
    assert {name: params[i, 0].item() for i, name in enumerate(margins.PARAMS)} == want
    if triton is not None:
        for name, offset in zip(margins.PARAMS, (jit.P_SCALE, jit.P_M1, jit.P_M2, jit.P_M3, jit.P_LAMBDA, jit.P_COS_M2,
                                                 jit.P_SIN_M2, jit.P_COS_LIMIT, jit.P_SHIFT, jit.P_COS_LO,
                                                 jit.P_COS_HI)):
            assert int(offset) == margins.PARAMS.index(name), name
        assert [int(k) for k in (jit.ADDITIVE, jit.ARC, jit.COMBINED, jit.SPHERE)] == [0, 1, 2, 3]


def test_lowering_is_cached_and_typed():
    """One lowering per (margin, scale, dtype, device): a step with the previous step's
    margin reuses its params (no host-to-device copy)."""
    a = lower(Margin(m2=0.5), 64.0, torch.float32, torch.device("cpu"))
    b = lower(Margin(m2=0.5), 64.0, torch.float32, torch.device("cpu"))
    assert a is b and a.params.dtype == torch.float32
    assert lower(Margin(m2=0.5), 64.0, torch.float64, torch.device("cpu")).params.dtype == torch.float64
    assert a.flags == (margins.ARC, 0, 0, 0)
    assert Margin(sphere_m=3, theta_policy="clamp", grad_mode="detached").flags == (margins.SPHERE, 3, 1, 1)
