"""What the tests share: assertions whose failures name the first bad index and both values;
the backends usable here, as one list; the inputs and margins of the backend suite
(tests/test_backends.py); running a backend and checking it against the reference; and the
rounding floors that make a bound derived from the reference's own error hold on every
machine."""

import math
import os

import pytest
import torch
import torch.nn.functional as F


def assert_close(got, want, atol, rtol=0.0, what="value"):
    """Elementwise |got - want| <= atol + rtol*|want| (want may be a scalar to broadcast)."""
    got = torch.as_tensor(got, dtype=torch.float64).detach().cpu()
    want = torch.as_tensor(want, dtype=torch.float64).detach().cpu()
    assert got.shape == want.shape or want.dim() == 0, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    want = want.expand_as(got)
    bad = ~torch.isclose(got, want, atol=atol, rtol=rtol)
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} differ; first at index {i}: "
            f"got {got[i].item()!r}, expected {want[i].item()!r} (atol={atol}, rtol={rtol})"
        )


def assert_finite(what, *tensors):
    for t in tensors:
        assert t is not None, f"{what}: no gradient"
        bad = ~torch.isfinite(t)
        assert not bad.any(), f"{what}: not finite at index {tuple(bad.nonzero()[0].tolist())}: {t[bad][0].item()}"


def assert_rel(got, want, tol, what):
    """max|got - want| <= tol * max|want|; on failure the first bad index and both values."""
    assert got.dtype.is_floating_point, f"{what}: dtype {got.dtype}"
    want = want.detach().double()
    scale = want.abs().max().item() if want.numel() else 0.0
    assert_close(got, want, atol=tol * scale, what=f"{what} (relative to max|want| = {scale:.3g})")


# ---------------------------------------------------------------- the backends, one list


def backend_device(name):
    """The device whose tensors backend `name` takes here ('cpu' or 'cuda'), None when it
    cannot run here: Triton's kernels take CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py
    sets it without a GPU), 'cuda' only CUDA tensors. Tests that iterate backends iterate
    usable_backends(), so a backend joins them where it can run."""
    from fastmargin import backends

    for device in ("cpu", "cuda"):
        if backends.unavailable_reason(name, torch.device(device)) is None:
            return torch.device(device)
    return None


def usable_backends(fused_only=False):
    """[(name, device)] of the backends that can run here, in fastmargin.BACKENDS order: the
    one list of backends the suite iterates (adding a backend to fastmargin.BACKENDS adds it
    to every test that iterates this)."""
    from fastmargin import BACKENDS

    names = [b for b in BACKENDS if not (fused_only and b == "reference")]
    return [(b, backend_device(b)) for b in names if backend_device(b) is not None]


def interpreted(name):
    """Whether backend `name` runs here under Triton's interpreter (numpy arithmetic, about a
    second per forward and backward at B=37, C=1001, D=67): the backend suite thins its long
    parametrisations there (tests/conftest.py, marker `thin`)."""
    device = backend_device(name)
    return name == "triton" and device is not None and device.type == "cpu"


def backend_params(fused_only=True, gpu_mark=True):
    """pytest params of usable_backends(fused_only), id = the backend's name, marked
    `interpreted` where it runs under Triton's interpreter and `gpu` where it runs on CUDA
    tensors (pytest -m gpu selects the compiled GPU runs). gpu_mark=False leaves the gpu
    mark off: for the long sweeps marked slow, which bench/gpu_check.sh's selection
    (-m "gpu or not slow": the default suite plus every GPU test) must leave out."""
    params = []
    for name, device in usable_backends(fused_only):
        marks = [pytest.mark.interpreted] if interpreted(name) else []
        marks += [pytest.mark.gpu] if device.type == "cuda" and gpu_mark else []
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def gpu_backend_params():
    """pytest params of every fused backend (fastmargin.BACKENDS but the reference) for the
    GPU-sized cases, marked gpu; each skips, saying why, unless it runs on CUDA tensors here."""
    from fastmargin import BACKENDS, backends

    params = []
    for name in BACKENDS:
        if name == "reference":
            continue
        reason = backends.unavailable_reason(name, torch.device("cuda"))
        marks = [pytest.mark.gpu]
        if reason is not None:
            marks.append(pytest.mark.skip(reason=f"a GPU-sized case on {name!r} compiled for a CUDA device: {reason}"))
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def suite_threads():
    """Intra-op threads for the backend suite's cases: 1 unless FASTMARGIN_TEST_THREADS says
    otherwise. On a loaded machine every parallel region of a kernel (and of the reference's
    ATen ops) can wait a scheduler slice for its second thread, which made a case take
    seconds instead of milliseconds; FASTMARGIN_TEST_THREADS=2 runs the suite at 2 threads
    (the CPU GEMMs then block differently: every bound must still hold)."""
    return int(os.environ.get("FASTMARGIN_TEST_THREADS", "1"))




# ---------------------------------------------------------------- the fused ops' arguments


def op_options(margin, scale, sub_centers, chunk, x, w):
    """The fused ops' arguments after (x, w, labels) for `margin` (fastmargin.fused.OP_ARGS):
    the lowered margin in the compute dtype of x and w on their device, exact fp32 GEMMs."""
    from fastmargin.margins import lower
    from fastmargin.reference import compute_dtype

    lowered = lower(margin, scale, compute_dtype(x, w), x.device)
    return lowered.params, list(lowered.flags), sub_centers, chunk, False


# ---------------------------------------------------------------- the suite's inputs and margins

# Relative error bound against the float64 reference, beside the dtype (TOL); a backend
# whose arithmetic is coarser says so in BACKEND_TOL: the CUDA kernels' fp32 path takes
# exp from __expf (2 + 1.16|z| ulp: ~1.5e-5 relative at the logits of s = 64).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
BACKEND_TOL = {"cuda": {torch.float64: 1e-10, torch.float32: 5e-5}}
DTYPES = [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")]


def tol(backend, dtype):
    """The relative error bound of `backend` against the float64 reference in `dtype`."""
    return BACKEND_TOL.get(backend, TOL)[dtype]


def half_dcos_operands(backend: str, dtype: torch.dtype) -> bool:
    """Whether `backend`'s backward GEMMs take dcos rounded to `dtype` where both inputs are
    of that half dtype (docs/design.md §4): the GPU backends' tensor cores, and the cpu
    kernel's bf16 GEMMs on a CPU with AVX512-BF16. One rounding more than fp32 GEMMs, so
    such half-input gradients are held to twice the dtype's eps."""
    from fastmargin import _extension

    if backend in ("triton", "cuda"):
        return True
    return backend == "cpu" and dtype == torch.bfloat16 and _extension.build_info().get("cpu_bf16_gemms", False)

# The ragged shape of STYLE: no multiple of anything; C = 1001 is 15 blocks of 64 and 41.
B, C, D = 37, 1001, 67
CHUNK = 64

MARGIN_FIELDS = ("m1", "m2", "m3", "sphere_m", "sphere_lambda", "theta_policy", "grad_mode", "curricular_t",
                 "filter_threshold")

# Functional kwargs of each loss. SphereFace's logit scale is s * ||x_i|| (||x_i|| in [0.5, 3]).
MARGINS = {
    "arcface": dict(m2=0.5),
    "arcface-clamp": dict(m2=0.5, theta_policy="clamp"),
    "cosface": dict(m3=0.35),
    "combined": dict(m1=1.2, m2=0.3, m3=0.2),
    "combined-clamp": dict(m1=1.2, m2=0.3, m3=0.2, theta_policy="clamp"),
    "combined-m1=2": dict(m1=2.0, m2=0.2, m3=0.1),
    "combined-m1=2-clamp": dict(m1=2.0, m2=0.2, m3=0.1, theta_policy="clamp"),
    **{f"sphere-m{m}": dict(sphere_m=m, scale=4.0) for m in range(1, 5)},
    **{f"sphere-m{m}-lambda": dict(sphere_m=m, sphere_lambda=5.0, scale=4.0) for m in range(1, 5)},
}
GRAD_MODES = ["exact", "detached"]

# Target angles (radians), cycled over the rows. They cross every branch of every margin in
# MARGINS and stay >= 0.04 rad from each boundary (theta* = 2.64, 2.37, 1.47 for the three
# angular margins; SphereFace's k*pi/m = 0.79, 1.05, 1.57, 2.09, 2.36; the clamp of cos at
# 1 - COS_EPS), so float32 rounding cannot move a target across one.
ANGLES = (0.1, 0.5, 0.7, 0.95, 1.2, 1.4, 1.52, 1.8, 2.0, 2.2, 2.3, 2.45, 2.55, 2.75, 2.9, 3.05)

OPTION_MARGINS = ["arcface", "combined-m1=2", "sphere-m4-lambda"]

# (sub_centers, label_smoothing, ignore_index, ignored rows, reduction)
OPTIONS = [
    pytest.param(1, 0.0, -100, [], "mean", id="K1-mean"),
    pytest.param(1, 0.0, -100, [], "sum", id="K1-sum"),
    pytest.param(1, 0.0, -100, [], "none", id="K1-none"),
    pytest.param(2, 0.1, -100, [], "mean", id="K2-smooth"),
    pytest.param(3, 0.0, -100, [1, 4, 20], "none", id="K3-ignore-none"),
    pytest.param(4, 0.2, -1, [0, 36], "sum", id="K4-smooth-ignore-1-sum"),
    # ignore_index names a real class: its rows are dropped, the class keeps its other rows
    pytest.param(2, 0.0, 3, [5, 6], "mean", id="K2-ignore-class3"),
    pytest.param(3, 0.1, -100, [2, 9, 30], "none", id="K3-every-option"),
]


def geometric_inputs(B=B, C=C, D=D, K=1, dtype=torch.float64, seed=0, angles=ANGLES):
    """x (B, D), w (C*K, D), labels (B,) distinct (B <= C). Row i's target class has its
    arg-max sub-center (k = i % K, so every k is an arg-max somewhere) at angles[i % len] from
    x_i and its other sub-centers between it and pi, apart from it and from each other by
    at least 0.02 rad (no ties); all other rows are random directions. Norms vary: x in
    [0.5, 3], w in [0.5, 2]."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64

    def units(n):
        return F.normalize(torch.randn(n, D, generator=g, dtype=f64), dim=1)

    x_hat = units(B)
    x = x_hat * (0.5 + 2.5 * torch.rand(B, 1, generator=g, dtype=f64))
    w = units(C * K) * (0.5 + 1.5 * torch.rand(C * K, 1, generator=g, dtype=f64))
    y = torch.randperm(C, generator=g)[:B]
    for i in range(B):
        theta = angles[i % len(angles)]
        for k in range(K):
            phi = theta if k == i % K else theta + (math.pi - theta) * (0.3 + 0.6 * k / K)
            v = units(1)[0]
            v = F.normalize(v - (v @ x_hat[i]) * x_hat[i], dim=0)
            row = y[i] * K + k
            w[row] = w[row].norm() * (math.cos(phi) * x_hat[i] + math.sin(phi) * v)
    return x.to(dtype), w.to(dtype), y


def option_inputs(K, ignore_index, ignored, dtype):
    x, w, y = geometric_inputs(K=K, dtype=dtype)
    y[ignored] = ignore_index
    return x, w, y


def margin_of(kwargs):
    from fastmargin.margins import Margin

    return Margin(**{k: v for k, v in kwargs.items() if k in MARGIN_FIELDS})


def branches(x, w, y, K, margin):
    """The branch of psi each row's target cosine falls in (ignored rows: -1)."""
    from fastmargin import reference

    valid = (y >= 0) & (y < w.shape[0] // K)
    cos = reference.cosine_logits(x.double(), w.double(), K).gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)
    if margin.is_sphereface:
        branch = torch.floor(margin.sphere_m * torch.acos(cos.clamp(-1, 1)) / math.pi).clamp(max=margin.sphere_m - 1)
    elif margin.is_additive_cosine:
        branch = torch.zeros_like(cos)
    else:
        branch = (cos < margin.cos_theta_limit).double()
    return torch.where(valid, branch, -1).long()


def upstream_weights(n, seed=1):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 0.5


# ---------------------------------------------------------------- running a backend


def device_of(backend, x=None):
    """The device a backend computes on here: the fused backends' own (backend_device), the
    reference's where its inputs are."""
    if backend == "reference":
        return x.device if x is not None else torch.device("cpu")
    return backend_device(backend) or (x.device if x is not None else torch.device("cpu"))


def to_device(t, device):
    """t on `device` in t's layout: a dense view keeps its strides (Tensor.to does that), a
    view with gaps keeps its gaps and a broadcast (stride 0) stays one (Tensor.to would make
    both dense), so that a strided case on a GPU is still strided there."""
    t = t.detach()
    if t.device == device:
        return t
    broadcast = [d for d in range(t.dim()) if t.stride(d) == 0 and t.shape[d] > 1]
    if broadcast:
        index = tuple(slice(0, 1) if d in broadcast else slice(None) for d in range(t.dim()))
        return to_device(t[index], device).expand(t.shape)
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device).copy_(t)


def run(backend, x, w, y, upstream=None, **kwargs):
    """(loss, lse, dx, dW) of fastmargin.margin_cross_entropy, back on the CPU. reduction
    'none' backprops sum(upstream * loss), so each row's upstream weight differs. The inputs
    go to the device the backend takes (CUDA for a compiled GPU backend) in their layout
    (to_device); the reference computes where they are."""
    import fastmargin

    device = device_of(backend, x)
    x = to_device(x, device).requires_grad_(True)  # detached: a view keeps its strides (clone would not)
    w = to_device(w, device).requires_grad_(True)
    loss, lse = fastmargin.margin_cross_entropy(x, w, to_device(y, device), backend=backend, return_lse=True,
                                                **kwargs)
    if loss.dim() == 0:
        loss.backward()
    else:
        (loss * upstream.to(loss.device, loss.dtype)).sum().backward()
    return tuple(t.cpu() for t in (loss.detach(), lse, x.grad, w.grad))


def check_against_reference(x, w, y, tol, what="", backend="cpu", grad_tol=None, **kwargs):
    """A fused backend on (x, w) against the reference on the same values in float64:
    loss, lse, dx, dW, each within tol relative (dx, dW within grad_tol if given). Returns
    both results."""
    from fastmargin import reference

    upstream = upstream_weights(len(y))
    got = run(backend, x, w, y, upstream, **kwargs)
    want = run("reference", x.cpu().double(), w.cpu().double(), y.cpu(), upstream, **kwargs)
    dtype = reference.compute_dtype(x, w)
    assert got[0].dtype == dtype and got[1].dtype == dtype, f"{what}: loss {got[0].dtype}, lse {got[1].dtype}"
    assert got[2].dtype == x.dtype and got[3].dtype == w.dtype, f"{what}: grads {got[2].dtype}, {got[3].dtype}"
    assert got[0].shape == want[0].shape and got[1].shape == (len(y),)
    for i, (name, a, b) in enumerate(zip(("loss", "lse", "d loss / d x", "d loss / d W"), got, want)):
        assert_rel(a, b, tol if i < 2 or grad_tol is None else grad_tol, f"{what} {name}")
    return got, want


# ---------------------------------------------------------------- rounding floors
#
# A bound built from the same-dtype reference's error (STYLE: "at most a small multiple of
# same-dtype PyTorch's error") is only as good as that error is large: torch's MKL and
# numpy's OpenBLAS (the Triton interpreter's dots) pick their kernels by CPU, so on another
# machine the reference can happen to round better and the bound shrinks below what any
# computation in the dtype can promise. Each such bound therefore gets a floor: the error
# that rounding the cosines by delta_c can cause through the case's conditioning, derived
# once here (first order in delta_c):
#
# - delta_c = DELTA_C_EPS eps of the compute dtype bounds a computed cosine's error: the two
#   normalisations and the dot round at half an ulp a term, growing like sqrt(D) for random
#   signs; measured against fp64, fp32 cosines through MKL and OpenBLAS are off by up to
#   1.8 eps at D = 2..9 and 2.3 eps at D = 512. (The clamp bound 1 - COS_EPS itself rounds
#   to 1 - 2^-23 in fp32, 0.16 eps away.)
# - psi is Lipschitz with constant P_i = |psi'| at row i's target cosine, in the exact
#   gradient mode (the value is psi's whatever the gradient mode). psi' grows towards the
#   clamp (ArcFace's ~ sin(m2) / sqrt(2 COS_EPS) ~ 1e3 there) and a cosine past the clamp is
#   clamped, so at |cos| = 1 the psi' at the clamped cosine bounds the slope between it and
#   any rounding of it; elsewhere the targets stay away from psi's branch points (the tests'
#   inputs, or test_properties' DELTA). So the target logit of row i moves by at most
#   a_i = S_i P_i delta_c, every other logit by at most o_i = S_i delta_c.
# - lse and z_target move by at most a_i, the loss (their difference) by twice that; the
#   reductions average or add the rows.
# - the softmax p = softmax(z) moves by J dz, J = diag(p) - p p^T: a change of the target
#   logit alone moves p_iy by p_iy (1 - p_iy) a_i and p_ij by p_ij p_iy a_i; changes of at
#   most o_i anywhere move p_ij by at most 2 p_ij o_i. So
#       |dp_ij| <= p_ij (2 o_i + a_i q_ij),  q_ij = 1 - p_iy (j = y_i), p_iy (j != y_i).
# - dx_i = (S_i / n_i) sum_j dz_ij psi'_ij (w_hat_j - c_ij x_hat_i) (DESIGN §3), where dz_ij =
#   U_i (p_ij - (1 - eps) [j = y_i] - eps / C) (U_i the row's upstream weight, eps the label
#   smoothing) and each direction has norm sin(theta) <= 1, so elements <= 1. Rounding
#   moves it by (S_i / n_i) U_i sum_j (|dp_ij| + |dz_ij / U_i| P'_ij delta_c): the softmax's
#   change, and each direction known to delta_c times its psi', plus the target's psi'
#   taken at a cosine off by delta_c times its direction (P'_ij = |psi'_i| + |psi''_i|
#   sin(theta_i) in the case's gradient mode for the target, 1 for the others; SphereFace
#   m = 16 has psi'' ~ 2e4 near |cos| = 1). At |cos| = 1 the target's direction is all
#   rounding, ~ s psi' eps: the "psi' ~ 1e3 at the clamp times eps times s" of these cases
#   (psi' is held at the clamp there, psi'' = 0).
# - dW_j sums the same over the rows, each with its terms of class j, divided by r_j.
# The result's own rounding (half an ulp of each stored value, a few in lse's log and
# exp) is what TOL, beside these floors in every bound, covers.


# A computed cosine is within this many eps of the exact one (see above: measured up to 2.3).
DELTA_C_EPS = 4.0


def rounding_floors(x, w, y, kwargs, upstream=None, dtype=None):
    """{'loss', 'lse', 'dx', 'dW'}: the absolute error, per row of each tensor ('loss' a
    scalar for reduction 'mean' and 'sum'; 'dW' per weight row), that rounding every
    cosine of the call (x, w, y, **kwargs: the functional's margin, scale, sub_centers,
    label_smoothing, ignore_index, reduction) by DELTA_C_EPS eps of the compute dtype
    `dtype` can cause (the derivation above). upstream: the rows' weights for
    reduction='none'. Computed in float64 from the exact cosines and softmax."""
    import dataclasses

    from fastmargin import reference
    from fastmargin.margins import NORM_EPS, psi_grad

    dtype = dtype or reference.compute_dtype(x, w)
    delta_c = DELTA_C_EPS * torch.finfo(dtype).eps
    margin = margin_of(kwargs)
    exact = dataclasses.replace(margin, grad_mode="exact")  # the value is psi's in either mode
    scale, K = kwargs.get("scale", 64.0), kwargs.get("sub_centers", 1)
    reduction, smoothing = kwargs.get("reduction", "mean"), kwargs.get("label_smoothing", 0.0)
    x, w, y = x.detach().cpu().double(), w.detach().cpu().double(), y.detach().cpu().long()
    num_classes = w.shape[0] // K
    n = x.norm(dim=1).clamp(min=NORM_EPS)
    r = w.norm(dim=1).clamp(min=NORM_EPS)
    y = torch.where(y == kwargs.get("ignore_index", -100), -1, y)
    valid = (y >= 0) & (y < num_classes)
    target_col = F.one_hot(y.clamp(0, num_classes - 1), num_classes).bool() & valid.unsqueeze(1)  # (B, C)
    S = scale * (n if margin.is_sphereface else torch.ones_like(n))
    cos = reference.cosine_logits(x, w, K)
    target = cos.gather(1, y.clamp(0, num_classes - 1).unsqueeze(1)).squeeze(1) if len(y) else n
    P = torch.where(valid, psi_grad(target, exact).abs(), 0.0).clamp(min=1.0)
    # The target direction's factor: psi' (in the case's gradient mode) for the direction's
    # own rounding, plus |psi''| sin(theta) for psi' taken at a cosine off by delta_c.
    c = target.detach().clone().requires_grad_(True)
    slope = psi_grad(c, margin)
    (curvature,) = torch.autograd.grad(slope.sum(), c, allow_unused=True) if slope.requires_grad else (None,)
    curvature = torch.zeros_like(target) if curvature is None else curvature.abs()
    P_grad = slope.detach().abs() + curvature * (1 - target.detach() ** 2).clamp(min=0).sqrt()
    P_grad = torch.where(valid, P_grad, 0.0).clamp(min=1.0)
    a, o = S * P * delta_c, S * delta_c  # (B,): target logit's and the others' moves
    rows = valid.sum().item()
    U = {"mean": torch.full_like(n, 1.0 / max(rows, 1)), "sum": torch.ones_like(n),
         "none": (upstream.abs().double().cpu() if upstream is not None else torch.ones_like(n))}[reduction]
    U = torch.where(valid, U, 0.0)  # an ignored row has no gradient
    p = torch.softmax(reference.margin_logits(x, w, torch.where(valid, y, -1), exact, scale, K), dim=1)
    p_target = (p * target_col).sum(1, keepdim=True)
    q = torch.where(target_col, 1 - p_target, p_target) * valid.unsqueeze(1)
    dp = p * (2 * o.unsqueeze(1) + a.unsqueeze(1) * q)
    dz = (p - (1 - smoothing) * target_col).abs() + smoothing / num_classes  # |dz_ij| / U_i
    direction = dz * torch.where(target_col, P_grad.unsqueeze(1), 1.0) * delta_c
    per_entry = (S * U).unsqueeze(1) * (dp + direction)  # (B, C), before 1/n_i or 1/r_j
    loss = 2 * a if reduction == "none" else (2 * a * valid).sum() / (max(rows, 1) if reduction == "mean" else 1)
    return dict(loss=loss, lse=a, dx=per_entry.sum(1) / n, dW=per_entry.sum(0).repeat_interleave(K) / r)


def reference_bound(got, same, exact, factor, floor_abs, what, tol=0.0):
    """STYLE's bound with the floor: |got - exact| <= factor * |same - exact| + floor_abs +
    tol * max|exact|, maxima over the tensor (floor_abs: a rounding_floors entry, its
    largest element taken; index it for a part of the tensor), where `same` is the reference run in the
    inputs' dtype and `exact` in float64. The failure names both parts."""
    exact = exact.detach().double().cpu()
    scale = exact.abs().max().item() if exact.numel() else 0.0
    ref_err = (same.detach().double().cpu() - exact).abs().max().item() if exact.numel() else 0.0
    floor_abs = torch.as_tensor(floor_abs, dtype=torch.float64)
    floor_abs = floor_abs.max().item() if floor_abs.numel() else 0.0
    bound = factor * ref_err + floor_abs + tol * scale
    assert_close(got.detach().cpu(), exact, atol=bound,
                 what=f"{what} (bound {bound:.3g} = {factor} x the same-dtype reference's error {ref_err:.3g} + "
                      f"rounding floor {floor_abs:.3g} + {tol:g} x max|want| {scale:.3g})")
