"""The oracle fastmargin.reference (DESIGN §1): hand values, agreement with F.cross_entropy,
fp64 gradcheck, the detached gradient, and the edges (cos = +-1, zero rows, empty batches)."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastmargin import reference
from fastmargin.margins import COS_EPS, Margin, psi

from helpers import assert_close, assert_finite
# Tolerances beside the dtype.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# ---------------------------------------------------------------- hand values
#
# D = 2, every vector at a known angle, so cos(x_i, w_j) = cos(alpha_i - phi_j). Row 0 is at
# 60 deg with norm 2, row 1 at 150 deg with norm 3; weight rows have norms 0.7, 2, 1.5 (cos does
# not see them). Classes 0, 1, 2 sit at 0, 90, 180 deg (one sub-center each) or, with K = 2,
# at (0, 40), (90, 200), (180, 270) deg.

ROW_DEG, ROW_NORM = [60.0, 150.0], [2.0, 3.0]
CLASS_DEG = {1: [[0.0], [90.0], [180.0]], 2: [[0.0, 40.0], [90.0, 200.0], [180.0, 270.0]]}
WEIGHT_NORM = [0.7, 2.0, 1.5]


def arcface(m2):
    return lambda c: math.cos(math.acos(c) + m2) if math.acos(c) <= math.pi - m2 else c - m2 * math.sin(m2)


def sphereface(m, lam=0.0):
    def f(c):
        theta = math.acos(c)
        k = math.floor(m * theta / math.pi)
        value = (-1) ** k * math.cos(m * theta) - 2 * k
        return (lam * c + value) / (1 + lam)
    return f


# (Margin kwargs, psi written out, scale s, per-row scale uses ||x||)
HAND_MARGINS = {
    "arcface": (dict(m2=0.5), arcface(0.5), 4.0, False),
    "arcface-fallback": (dict(m2=1.2), arcface(1.2), 4.0, False),
    "cosface": (dict(m3=0.35), lambda c: c - 0.35, 4.0, False),
    "combined": (dict(m1=1.2, m2=0.3, m3=0.1), lambda c: math.cos(1.2 * math.acos(c) + 0.3) - 0.1, 4.0, False),
    "sphere-m3": (dict(sphere_m=3), sphereface(3), 1.5, True),
    "sphere-m4-lambda5": (dict(sphere_m=4, sphere_lambda=5.0), sphereface(4, 5.0), 1.5, True),
}


def hand_loss(name, K, labels, smoothing, reduction, ignore_index=-100):
    """The loss worked out with math.exp/math.log from DESIGN §1's formula."""
    _, psi_fn, s, norm_scale = HAND_MARGINS[name]
    rows = []
    for alpha, n, y in zip(ROW_DEG, ROW_NORM, labels):
        cos = [max(math.cos(math.radians(alpha - phi)) for phi in subs) for subs in CLASS_DEG[K]]
        scale = s * n if norm_scale else s
        z = [scale * (psi_fn(c) if j == y else c) for j, c in enumerate(cos)]
        lse = math.log(sum(math.exp(v) for v in z))
        if y == ignore_index:
            rows.append(0.0)
            continue
        nll = lse - z[y]
        rows.append((1 - smoothing) * nll + smoothing * (lse - sum(z) / len(z)))
    if reduction == "none":
        return rows
    total = sum(rows)
    valid = sum(y != ignore_index for y in labels)
    return total if reduction == "sum" else total / max(valid, 1)


def hand_inputs(K, dtype=torch.float64):
    x = torch.tensor([[n * v for v in unit(a)] for a, n in zip(ROW_DEG, ROW_NORM)], dtype=dtype)
    w = torch.tensor(
        [[WEIGHT_NORM[c] * v for v in unit(phi)] for c, subs in enumerate(CLASS_DEG[K]) for phi in subs], dtype=dtype
    )
    return x, w


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "K, labels, smoothing",
    [
        pytest.param(1, [0, 1], 0.0, id="K1"),
        # row 0 against class 2 (120 deg): past pi - 1.2 for ArcFace m2=1.2, and SphereFace k >= 1
        pytest.param(1, [2, 1], 0.0, id="K1-obtuse"),
        pytest.param(2, [0, 2], 0.0, id="K2-max"),
        pytest.param(1, [0, 1], 0.1, id="K1-smooth"),
        pytest.param(1, [0, -100], 0.0, id="K1-ignore"),
        pytest.param(2, [-100, 1], 0.2, id="K2-smooth-ignore"),
        pytest.param(1, [-100, -100], 0.1, id="all-ignored"),
    ],
)
@pytest.mark.parametrize("name", list(HAND_MARGINS))
def test_hand_values(name, K, labels, smoothing, reduction):
    kwargs, _, s, _ = HAND_MARGINS[name]
    x, w = hand_inputs(K)
    loss, _ = reference.reference_loss(
        x, w, torch.tensor(labels), Margin(**kwargs), s, sub_centers=K, label_smoothing=smoothing,
        reduction=reduction,
    )
    expected = hand_loss(name, K, labels, smoothing, reduction)
    assert loss.dtype == torch.float64
    assert_close(loss, torch.tensor(expected, dtype=torch.float64), atol=1e-10, rtol=1e-10,
                 what=f"{name} loss, labels {labels}")


# ---------------------------------------------------------------- F.cross_entropy on margin_logits

def random_inputs(B, C, D, K=1, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    w = torch.randn(C * K, D, generator=g, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=g)
    return x, w, y


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("ignore_index, ignored_rows", [(-100, [1, 4]), (3, [2]), (-1, [])])
@pytest.mark.parametrize("kwargs, s, K", [(dict(m2=0.5), 16.0, 1), (dict(sphere_m=3, sphere_lambda=5.0), 2.0, 2)],
                         ids=["arcface", "sphere-K2"])
def test_matches_cross_entropy_on_margin_logits(kwargs, s, K, ignore_index, ignored_rows, smoothing, reduction):
    x, w, y = random_inputs(B=9, C=6, D=5, K=K)
    y[ignored_rows] = ignore_index
    margin = Margin(**kwargs)
    loss, _ = reference.reference_loss(
        x, w, y, margin, s, sub_centers=K, label_smoothing=smoothing, ignore_index=ignore_index, reduction=reduction
    )
    z = reference.margin_logits(x, w, y, margin, s, sub_centers=K)
    want = F.cross_entropy(z, y, ignore_index=ignore_index, label_smoothing=smoothing, reduction=reduction)
    assert_close(loss, want, atol=1e-12, rtol=1e-12, what="reference vs F.cross_entropy(margin_logits)")


def test_lse_is_logsumexp_of_margin_logits():
    x, w, y = random_inputs(B=7, C=11, D=4, K=2)
    y[3] = -100
    margin = Margin(m1=1.1, m2=0.3, m3=0.2)
    _, lse = reference.reference_loss(x, w, y, margin, 8.0, sub_centers=2)
    want = torch.logsumexp(reference.margin_logits(x, w, y, margin, 8.0, sub_centers=2), dim=1)
    assert lse.shape == (7,)
    assert_close(lse, want, atol=1e-12, rtol=1e-12, what="lse")


# ---------------------------------------------------------------- gradcheck (float64)

# Row i's best target sub-center sits at angle THETA[i] from x_i: one row on each side of
# pi/2 and one at 2.9 rad, past theta* of ArcFace m2=1.0 (2.14) and of the combined margin
# below (2.37); SphereFace m=2, 3 sees k = 0, 1 (and 2 for m=3).
THETA = [0.3, 1.2, 2.0, 2.9]
LABELS = [0, 2, 4, 1]


def geometric_inputs(K, dtype=torch.float64, seed=0, C=5, D=3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C * K, D, generator=g, dtype=dtype)
    x = torch.empty(len(THETA), D, dtype=dtype)
    for i, (theta, y) in enumerate(zip(THETA, LABELS)):
        target = F.normalize(w[y * K], dim=0)
        u = torch.randn(D, generator=g, dtype=dtype)
        u = F.normalize(u - (u @ target) * target, dim=0)
        x[i] = (0.6 + 0.5 * i) * (math.cos(theta) * target + math.sin(theta) * u)
        # the other sub-centers of the target class point roughly away from x_i: sub-center 0
        # is the arg-max except for the 2.9 rad row, where one of them (still past theta*) is
        for k in range(1, K):
            w[y * K + k] = -F.normalize(x[i], dim=0) + 0.4 * torch.randn(D, generator=g, dtype=dtype)
    return x, w, torch.tensor(LABELS)


def branch_report(x, w, y, K, margin):
    """The target cosines, and a check that none is within 1e-4 of a branch boundary
    (finite differences of step 1e-6 must not cross one)."""
    cos = reference.cosine_logits(x, w, K).gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)
    if margin.is_sphereface:
        bounds = [math.cos(k * math.pi / margin.sphere_m) for k in range(1, margin.sphere_m)]
    elif margin.is_additive_cosine:
        bounds = []
    else:
        bounds = [margin.cos_theta_limit]
    for b in bounds:
        assert (cos - b).abs().min() > 1e-4, f"a target cosine is within 1e-4 of the boundary {b}"
    if K > 1:
        per_class = F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()
        top2 = per_class.view(len(x), -1, K).topk(2, dim=2).values
        assert (top2[..., 0] - top2[..., 1]).min() > 1e-4, "a sub-center arg-max is nearly tied"
    return cos


GRADCHECK_MARGINS = [
    pytest.param(dict(m2=1.0), id="arcface-fallback"),
    pytest.param(dict(m2=1.0, theta_policy="clamp"), id="arcface-clamp"),
    pytest.param(dict(m3=0.35), id="cosface"),
    pytest.param(dict(m1=1.2, m2=0.3, m3=0.2), id="combined-fallback"),
    pytest.param(dict(m1=1.2, m2=0.3, m3=0.2, theta_policy="clamp"), id="combined-clamp"),
    pytest.param(dict(m1=1.35), id="m1-only"),
    pytest.param(dict(sphere_m=2), id="sphere-m2"),
    pytest.param(dict(sphere_m=3), id="sphere-m3"),
    pytest.param(dict(sphere_m=2, sphere_lambda=5.0), id="sphere-m2-lambda"),
    pytest.param(dict(sphere_m=3, sphere_lambda=5.0), id="sphere-m3-lambda"),
]


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("kwargs", GRADCHECK_MARGINS)
def test_gradcheck(kwargs, K):
    margin = Margin(**kwargs)
    x, w, y = geometric_inputs(K)
    cos = branch_report(x, w, y, K, margin)
    if not margin.is_sphereface and not margin.is_additive_cosine and margin.m2 > 0:
        assert (cos < margin.cos_theta_limit).any(), f"no row past theta*: target cosines {cos.tolist()}"
    x.requires_grad_(True)
    w.requires_grad_(True)

    def f(x, w):
        return reference.reference_loss(x, w, y, margin, 2.0, sub_centers=K)

    assert torch.autograd.gradcheck(f, (x, w), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(
    "smoothing, reduction, ignore",
    [(0.0, "sum", False), (0.0, "none", False), (0.1, "mean", False), (0.2, "none", True), (0.1, "mean", True)],
)
@pytest.mark.parametrize("kwargs", [dict(m2=1.0), dict(sphere_m=3, sphere_lambda=5.0)], ids=["arcface", "sphere"])
def test_gradcheck_options(kwargs, smoothing, reduction, ignore):
    margin = Margin(**kwargs)
    x, w, y = geometric_inputs(K=1)
    if ignore:
        y[1] = -100
    x.requires_grad_(True)
    w.requires_grad_(True)

    def f(x, w):
        return reference.reference_loss(
            x, w, y, margin, 2.0, label_smoothing=smoothing, reduction=reduction
        )

    assert torch.autograd.gradcheck(f, (x, w), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("kwargs", GRADCHECK_MARGINS)
def test_detached_gradient(kwargs, smoothing, K):
    """'detached' is the gradient of cross-entropy whose target logit carries the margin as a
    constant: z = S * (cos + onehot * (psi(cos_y) - cos_y).detach()). gradcheck cannot see it
    (it is not the derivative of the forward value), so the test builds that loss itself,
    from F.normalize and F.cross_entropy, with the shift evaluated under no_grad, and
    compares autograd gradients. S = s*||x|| for SphereFace is differentiated in both."""
    margin = Margin(**kwargs, grad_mode="detached")
    exact = Margin(**kwargs)
    x, w, y = geometric_inputs(K)
    y[2] = -100
    s = 2.0

    x1, w1 = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss, _ = reference.reference_loss(x1, w1, y, margin, s, sub_centers=K, label_smoothing=smoothing)
    loss.backward()

    x2, w2 = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    cos = (F.normalize(x2, dim=1) @ F.normalize(w2, dim=1).t()).view(len(x), -1, K).amax(dim=2)
    valid = y != -100
    target = y.clamp(min=0)
    with torch.no_grad():
        cos_y = cos.gather(1, target.unsqueeze(1)).squeeze(1)
        shift = torch.where(valid, psi(cos_y, exact) - cos_y, 0.0)
    scale = s * x2.norm(dim=1, keepdim=True) if margin.is_sphereface else s
    z = scale * (cos + F.one_hot(target, cos.shape[1]) * shift.unsqueeze(1))
    want = F.cross_entropy(z, y, ignore_index=-100, label_smoothing=smoothing)
    want.backward()

    assert_close(loss, want, atol=1e-12, rtol=1e-12, what="detached loss value")
    assert_close(x1.grad, x2.grad, atol=1e-12, rtol=1e-10, what="detached d loss / d x")
    assert_close(w1.grad, w2.grad, atol=1e-12, rtol=1e-10, what="detached d loss / d W")
    # the forward value is the exact mode's; the gradient is not (the margin acts on it).
    exact_loss, _ = reference.reference_loss(x, w, y, exact, s, sub_centers=K, label_smoothing=smoothing)
    assert_close(loss, exact_loss, atol=0.0, what="detached vs exact forward")


# ---------------------------------------------------------------- edges

EDGE_MARGINS = [
    pytest.param(dict(m2=0.5), id="arcface"),
    pytest.param(dict(m2=0.5, theta_policy="clamp"), id="arcface-clamp"),
    pytest.param(dict(m2=0.5, grad_mode="detached"), id="arcface-detached"),
    pytest.param(dict(m3=0.35), id="cosface"),
    pytest.param(dict(m1=1.2, m2=0.3, m3=0.2), id="combined"),
    pytest.param(dict(m1=1.2, m2=0.3, m3=0.2, theta_policy="clamp"), id="combined-clamp"),
    pytest.param(dict(sphere_m=4), id="sphere-m4"),
    pytest.param(dict(sphere_m=4, sphere_lambda=5.0), id="sphere-m4-lambda"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", EDGE_MARGINS)
def test_cos_plus_minus_one(kwargs, dtype):
    """Embeddings equal to (cos = 1) and opposite to (cos = -1) their class row: finite loss and
    gradients (the clamp to 1 - COS_EPS, DESIGN §1, and the straight-through gradient)."""
    margin = Margin(**kwargs)
    _, w, _ = random_inputs(B=1, C=4, D=6, dtype=dtype)
    y = torch.tensor([1, 2, 3])
    x = torch.stack([w[1] * 2.0, -w[2], w[3]]).requires_grad_(True)
    w.requires_grad_(True)
    loss, lse = reference.reference_loss(x, w, y, margin, 32.0, reduction="none")
    cos = reference.cosine_logits(x, w, 1).gather(1, y.unsqueeze(1)).squeeze(1)
    assert_close(cos, torch.tensor([1.0, -1.0, 1.0]), atol=10 * torch.finfo(dtype).eps, what="target cosines")
    loss.sum().backward()
    assert_finite(f"{margin}", loss, lse, x.grad, w.grad)
    # the target logit is S * psi at the clamped cosine (CosFace: no clamp)
    z = reference.margin_logits(x, w, y, margin, 32.0)
    c = cos.detach() if margin.is_additive_cosine else cos.detach().clamp(-1 + COS_EPS, 1 - COS_EPS)
    scale = 32.0 * x.detach().norm(dim=1) if margin.is_sphereface else 32.0
    assert_close(z.gather(1, y.unsqueeze(1)).squeeze(1), scale * psi(c, margin), atol=TOL[dtype] * 32 * 10,
                 rtol=1e-5, what="target logit at |cos| = 1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", EDGE_MARGINS)
def test_zero_rows(kwargs, dtype):
    """A zero embedding row and a zero weight row: norms are max(||v||, NORM_EPS), so cos = 0
    there (row 0 of cos, column 2), the loss is finite and so are the gradients (large: the
    gradient through x/max(||x||, eps) at x = 0 scales as 1/NORM_EPS)."""
    margin = Margin(**kwargs)
    x, w, _ = random_inputs(B=3, C=4, D=5, dtype=dtype)
    x[0] = 0
    w[2] = 0
    y = torch.tensor([1, 2, 0])
    x.requires_grad_(True)
    w.requires_grad_(True)
    s = 8.0
    loss, lse = reference.reference_loss(x, w, y, margin, s, reduction="none")
    cos = reference.cosine_logits(x, w, 1)
    assert_close(cos[0], 0.0, atol=0.0, what="cos of the zero embedding")
    assert_close(cos[:, 2], 0.0, atol=0.0, what="cos of the zero weight row")
    # Row 0: cos = 0 everywhere; psi(0) in the target (SphereFace: S = s*0, every logit 0).
    if margin.is_sphereface:
        expected = math.log(4)
    else:
        t = s * psi(torch.zeros(1, dtype=torch.float64), margin).item()
        expected = math.log(math.exp(t) + 3) - t
    assert_close(loss[0], expected, atol=TOL[dtype], rtol=1e-6, what="loss of the zero embedding row")
    loss.sum().backward()
    assert_finite(f"{margin}", loss, lse, x.grad, w.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", ["empty", "all-ignored"])
@pytest.mark.parametrize("kwargs", [dict(m2=0.5), dict(sphere_m=3), dict(m3=0.35)], ids=["arcface", "sphere", "cosface"])
def test_empty_and_all_ignored(kwargs, case, reduction):
    B = 0 if case == "empty" else 3
    x, w, y = random_inputs(B=B, C=4, D=5, dtype=torch.float32)
    y[:] = -100
    x.requires_grad_(True)
    w.requires_grad_(True)
    loss, lse = reference.reference_loss(x, w, y, Margin(**kwargs), 16.0, label_smoothing=0.1, reduction=reduction)
    assert loss.shape == ((B,) if reduction == "none" else ())
    assert lse.shape == (B,)
    assert_close(loss, torch.zeros(loss.shape), atol=0.0, what=f"{case} loss")
    loss.sum().backward()
    assert x.grad is not None and w.grad is not None
    assert_close(x.grad, torch.zeros(B, 5), atol=0.0, what="d loss / d x")
    assert_close(w.grad, torch.zeros(4, 5), atol=0.0, what="d loss / d W")


@pytest.mark.parametrize("K", [1, 2])
def test_noncontiguous_weight(K):
    """A (D, C*K) weight passed as .t() (pytorch-metric-learning's layout) gives the loss and
    gradients of its contiguous copy."""
    # float64: the two layouts may sum the GEMM in different orders
    x, _, y = random_inputs(B=6, C=5, D=7, K=K)
    w_dc = torch.randn(7, 5 * K, dtype=torch.float64).requires_grad_(True)
    w_cd = w_dc.detach().t().contiguous().requires_grad_(True)
    assert not w_dc.t().is_contiguous()
    margin = Margin(m2=0.5)
    out_t, lse_t = reference.reference_loss(x, w_dc.t(), y, margin, 32.0, sub_centers=K)
    out_c, lse_c = reference.reference_loss(x, w_cd, y, margin, 32.0, sub_centers=K)
    assert_close(out_t, out_c, atol=1e-12, rtol=1e-12, what="loss")
    assert_close(lse_t, lse_c, atol=1e-12, rtol=1e-12, what="lse")
    out_t.backward()
    out_c.backward()
    assert_close(w_dc.grad.t(), w_cd.grad, atol=1e-14, rtol=1e-10, what="d loss / d W")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kwargs", [dict(m2=0.5), dict(sphere_m=3)], ids=["arcface", "sphere"])
def test_half_inputs_computed_in_fp32(kwargs, dtype):
    """Half inputs are upcast (DESIGN §3: fp32 inside): the loss is float32 and equals the fp32
    loss of the rounded inputs; gradients come back in the input dtype."""
    x, w, y = random_inputs(B=8, C=10, D=16, dtype=torch.float32)
    xh, wh = x.to(dtype).requires_grad_(True), w.to(dtype).requires_grad_(True)
    xf, wf = xh.detach().float().requires_grad_(True), wh.detach().float().requires_grad_(True)
    margin = Margin(**kwargs)
    loss_h, lse_h = reference.reference_loss(xh, wh, y, margin, 16.0)
    loss_f, lse_f = reference.reference_loss(xf, wf, y, margin, 16.0)
    assert loss_h.dtype == torch.float32 and lse_h.dtype == torch.float32
    assert_close(loss_h, loss_f, atol=1e-6, rtol=1e-6, what="half-input loss vs fp32")
    assert_close(lse_h, lse_f, atol=1e-6, rtol=1e-6, what="half-input lse vs fp32")
    loss_h.backward()
    loss_f.backward()
    assert xh.grad.dtype == dtype and wh.grad.dtype == dtype
    # fp32 gradient rounded once to the input dtype
    eps = torch.finfo(dtype).eps
    assert_close(xh.grad, xf.grad, atol=1e-6, rtol=eps, what="d loss / d x")
    assert_close(wh.grad, wf.grad, atol=1e-6, rtol=eps, what="d loss / d W")
