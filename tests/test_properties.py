"""Property-based tests (hypothesis): every usable fused backend against the reference on
drawn shapes, margins, options, dtypes and strides.

Each example draws B, C, D, K, a margin (ArcFace, CosFace, combined, SphereFace with or
without lambda), theta_policy, grad_mode, scale, label smoothing, ignored rows and
ignore_index (-100, -1 or a real class), the reduction, chunk_size, the dtypes of x and W
(float64, float32, bfloat16, float16, independently), their layouts (contiguous,
column-major, every other column or row, W as PML's (D, C) passed as W.t(), rows of x
broadcast with stride 0) and the labels' dtype and stride. The backend's loss, lse, dx and
dW are compared with the reference run in float64 on the same (rounded) values, and the
error allowed is STYLE's: at most 4 times the error of the reference run in the inputs' own
dtypes, plus the rounding floor of the case's conditioning (helpers.rounding_floors: what
rounding every cosine by a few eps can do through psi' and the softmax, so that the bound
holds on any CPU's BLAS), plus TOL[compute dtype] of the largest value. Inputs whose target
cosine lies within DELTA of a branch boundary of psi, or where two sub-centers of a class are within DELTA of
each other, are rejected (assume): there a rounding may legitimately pick the other branch.

Profiles. "fastmargin-default" (the default run) draws few examples, derandomize=True so CI
sees the same examples every run, no deadline, no example database. "fastmargin-slow" draws
many more; it runs in the tests marked slow:

    python -m pytest -q tests/test_properties.py              # default profile
    python -m pytest -q -m slow tests/test_properties.py      # slow profile
    FASTMARGIN_HYPOTHESIS=slow python -m pytest -q tests/test_properties.py   # the default tests, slow profile

Examples per backend are in EXAMPLES: Triton under its interpreter costs about a second an
example, so it draws fewer and smaller shapes (B <= 40, C <= 150, D <= 70, K <= 3).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastmargin import reference  # noqa: E402
from fastmargin.margins import Margin  # noqa: E402
from helpers import assert_close, rounding_floors, run, suite_threads, upstream_weights, usable_backends  # noqa: E402

for _name, _examples in (("fastmargin-default", 60), ("fastmargin-slow", 600)):
    settings.register_profile(
        _name, max_examples=_examples, derandomize=True, deadline=None, database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )

PROFILE = {"default": "fastmargin-" + os.environ.get("FASTMARGIN_HYPOTHESIS", "default"), "slow": "fastmargin-slow"}

# Examples per (profile, backend): the profile's max_examples, fewer for the interpreter.
EXAMPLES = {
    ("fastmargin-default", "triton-interpreted"): 10,
    ("fastmargin-slow", "triton-interpreted"): 60,
}

TOL = {torch.float64: 1e-9, torch.float32: 1e-5}
# Minimum distance (in cosine) of a target from a branch boundary of psi, and between the
# best two sub-centers of a class: fp64 cosines are good to ~1e-15, fp32 ones to ~1e-6.
DELTA = {torch.float64: 1e-9, torch.float32: 1e-4}

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
FUSED = [pytest.param(name, device, id=name) for name, device in usable_backends(fused_only=True)]


def interpreted(backend, device):
    return backend == "triton" and device.type == "cpu"


@st.composite
def margins(draw):
    """Functional kwargs of one margin, with its scale."""
    kind = draw(st.sampled_from(["arcface", "cosface", "combined", "sphereface"]))
    if kind == "sphereface":
        kwargs = dict(sphere_m=draw(st.integers(1, 6)),
                      sphere_lambda=draw(st.one_of(st.just(0.0), st.floats(0.0, 1000.0))),
                      scale=draw(st.floats(0.25, 8.0)))
    else:
        if kind == "arcface":
            kwargs = dict(m2=draw(st.floats(0.0, 3.1)))
        elif kind == "cosface":
            kwargs = dict(m3=draw(st.floats(0.0, 2.0)))
        else:
            kwargs = dict(m1=draw(st.floats(0.5, 3.0)), m2=draw(st.floats(0.0, 1.5)), m3=draw(st.floats(0.0, 0.5)))
        kwargs.update(scale=draw(st.floats(1.0, 64.0)), theta_policy=draw(st.sampled_from(["fallback", "clamp"])))
    kwargs["grad_mode"] = draw(st.sampled_from(["exact", "detached"]))
    return kwargs


@st.composite
def cases(draw, small):
    """One drawn call: shapes, margin, options, dtypes and layouts, and a seed for the values."""
    K = draw(st.integers(1, 3 if small else 4))
    case = dict(
        K=K,
        B=draw(st.integers(0, 40 if small else 64)),
        C=draw(st.integers(1, 150 if small else 300)),
        D=draw(st.integers(1 if K == 1 else 2, 70 if small else 96)),  # D = 1 with K > 1: every cos is +-1, all tied
        margin=draw(margins()),
        label_smoothing=draw(st.one_of(st.just(0.0), st.floats(0.0, 0.5))),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        ignore=draw(st.sampled_from(["none", "-100", "-1", "class"])),
        ignored_fraction=draw(st.floats(0.0, 1.0)),
        x_dtype=draw(st.sampled_from(DTYPES)),
        w_dtype=draw(st.sampled_from(DTYPES)),
        x_layout=draw(st.sampled_from(["contiguous", "column-major", "strided", "broadcast"])),
        w_layout=draw(st.sampled_from(["contiguous", "transposed", "strided"])),
        labels=draw(st.sampled_from(["int64", "int32", "strided"])),
        chunk_size=draw(st.one_of(st.none(), st.integers(1, 160))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    return case


def layout(t, how):
    """t's values in the layout `how`; dense layouts keep t's strides for the gradient check."""
    if how == "column-major" or how == "transposed":
        return t.t().contiguous().t()
    if how == "strided":  # every other column (x) or row (W): not dense
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)[:, ::2]
        return wide.copy_(t) if t.shape[0] else wide
    if how == "broadcast":  # one row, stride 0
        return t[:1].expand(t.shape[0], -1) if t.shape[0] else t
    return t


def materialise(case, device):
    """x (B, D), w (C*K, D), labels (B,) and the functional kwargs of a drawn case."""
    g = torch.Generator().manual_seed(case["seed"])
    B, C, D, K = case["B"], case["C"], case["D"], case["K"]
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * (0.5 + 2.5 * torch.rand(B, 1, generator=g, dtype=torch.float64))
    w = torch.randn(C * K, D, generator=g, dtype=torch.float64) * (0.5 + 1.5 * torch.rand(C * K, 1, generator=g, dtype=torch.float64))
    y = torch.randint(0, C, (B,), generator=g)
    ignore_index = {"none": -100, "-100": -100, "-1": -1, "class": int(torch.randint(0, C, (), generator=g))}[case["ignore"]]
    if case["ignore"] != "none":
        y[torch.rand(B, generator=g) < case["ignored_fraction"]] = ignore_index
    x = layout(x.to(case["x_dtype"]).to(device), case["x_layout"])
    w = w.to(case["w_dtype"]).to(device)
    w = layout(w, case["w_layout"]) if case["w_layout"] != "strided" else layout(w.t(), "strided").t()
    y = y.to(device)
    if case["labels"] == "int32":
        y = y.int()
    elif case["labels"] == "strided":
        y = torch.stack([y, y], dim=1)[:, 0]
    kwargs = dict(case["margin"], sub_centers=K, label_smoothing=case["label_smoothing"], ignore_index=ignore_index,
                  reduction=case["reduction"], chunk_size=case["chunk_size"])
    return x, w, y, kwargs


def boundary_cosines(margin):
    """The cosines where psi changes branch."""
    if margin.is_sphereface:
        return [math.cos(k * math.pi / margin.sphere_m) for k in range(1, margin.sphere_m)]
    if margin.is_additive_cosine or margin.theta_limit >= math.pi:
        return []
    return [margin.cos_theta_limit]


def well_separated(x, w, y, K, margin, delta):
    """No target cosine within delta of a branch boundary, no two best sub-centers within delta."""
    cos_all = reference.cosine_logits(x.double().cpu(), w.double().cpu(), 1)
    if K > 1 and cos_all.numel():
        top2 = cos_all.view(len(y), -1, K).topk(2, dim=2).values
        if (top2[..., 0] - top2[..., 1]).min() <= delta:
            return False
    C = w.shape[0] // K
    valid = (y >= 0) & (y < C)
    if not valid.any():
        return True
    cos = reference.cosine_logits(x.double().cpu(), w.double().cpu(), K)[valid.cpu()]
    target = cos.gather(1, y.cpu()[valid.cpu()].long().unsqueeze(1))
    return all((target - b).abs().min() > delta for b in boundary_cosines(margin))


def check_case(backend, device, case):
    x, w, y, kwargs = materialise(case, device)
    margin = Margin(**{k: v for k, v in kwargs.items() if k in Margin.__dataclass_fields__})
    compute = reference.compute_dtype(x, w)
    assume(well_separated(x, w, y, case["K"], margin, DELTA[compute]))
    upstream = upstream_weights(len(y)).to(device)
    got = run(backend, x, w, y, upstream, **kwargs)
    exact = run("reference", x.double(), w.double(), y, upstream, **kwargs)
    same = exact if x.dtype == w.dtype == torch.float64 else run("reference", x, w, y, upstream, **kwargs)
    what = f"{backend} {case}"
    assert got[0].dtype == compute and got[1].dtype == compute, f"{what}: loss {got[0].dtype}, lse {got[1].dtype}"
    assert got[2].dtype == x.dtype and got[3].dtype == w.dtype, f"{what}: grads {got[2].dtype}, {got[3].dtype}"
    for label, grad, tensor in (("dx", got[2], x), ("dW", got[3], w)):
        assert grad.shape == tensor.shape, f"{what}: {label} shape {tuple(grad.shape)}"
        if case["x_layout" if label == "dx" else "w_layout"] in ("column-major", "transposed") and tensor.numel():
            assert grad.stride() == tensor.stride(), f"{what}: {label} strides {grad.stride()}, input {tensor.stride()}"
    # Where the answer is ~0 (D = 1: every cos is +-1 and d cos / d x = 0) what cancels is of
    # the size S * sum_i |upstream_i| / min norm (norms >= 0.5 here): the bound has that floor.
    S = kwargs["scale"] * (x.double().norm(dim=1).max().item() if margin.is_sphereface and len(y) else 1.0)
    total = {"mean": 1.0, "sum": float(len(y)), "none": upstream.abs().sum().item()}[kwargs["reduction"]]
    floor = 2 * S * max(total, 1.0)
    # And the rounding floor of the drawn case's conditioning (helpers.rounding_floors: a
    # few eps of every cosine through psi' and the softmax), so that the bound does not rest
    # on how well the same-dtype reference happens to round on this machine's BLAS.
    rounding = rounding_floors(x, w, y, kwargs, upstream, dtype=compute)
    for label, key, a, b, c in zip(("loss", "lse", "d loss / d x", "d loss / d W"), ("loss", "lse", "dx", "dW"),
                                   got, same, exact):
        c = c.detach().double().cpu()
        if not c.numel():
            continue
        scale = c.abs().max().item()
        same_err = (b.detach().double().cpu() - c).abs().max().item()
        rounding_floor = rounding[key].max().item() if rounding[key].numel() else 0.0
        # A gradient is stored in its input's dtype: where that is coarser than the compute
        # dtype (half inputs; fp32 beside fp64) half an ulp of it, and up to as much again
        # where the backward's GEMM took dcos rounded to it (helpers.half_dcos_operands).
        stored = {"dx": x.dtype, "dW": w.dtype}.get(key, compute)
        if torch.finfo(stored).eps > torch.finfo(compute).eps:
            rounding_floor += 2 * torch.finfo(stored).eps * scale
        bound = 4 * same_err + rounding_floor + TOL[compute] * (scale + (floor if label.startswith("d loss") else 0.0))
        assert_close(a.detach().cpu(), c, atol=bound,
                     what=f"{label} (bound 4 x the same-dtype reference's error {same_err:.3g} + rounding floor "
                          f"{rounding_floor:.3g} + {TOL[compute]:g} x (max|want| {scale:.3g} + {floor:.3g})) for {what}")


@pytest.mark.parametrize("profile", ["default", pytest.param("slow", marks=pytest.mark.slow)])
@pytest.mark.parametrize("backend, device", FUSED)
def test_backend_matches_reference(backend, device, profile):
    small = interpreted(backend, device)
    name = PROFILE[profile]
    parent = settings.get_profile(name)
    examples = EXAMPLES[(name, "triton-interpreted")] if small else parent.max_examples

    @settings(parent, max_examples=examples)
    @given(case=cases(small))
    def prop(case):
        check_case(backend, device, case)

    threads = torch.get_num_threads()
    torch.set_num_threads(suite_threads())  # see helpers.suite_threads; across threads: test_determinism
    try:
        prop()
    finally:
        torch.set_num_threads(threads)
