"""The fused CPU backend (csrc/cpu/margin_ce.cpp, backend='cpu') against the oracle
fastmargin.reference: every margin and option on a ragged shape, chunk sizes around C, the
edges (ignored rows, B = 0, |cos| = 1, zero rows, a transposed W), half and mixed inputs,
determinism, gradcheck, opcheck, torch.compile and the kernel's own label check.

Errors are relative per tensor, max|got - want| / max|want| (assert_rel), with the
reference run in float64 on the same input values: the fp32 kernel is held to the exact
answer, not to another fp32 rounding of it."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastmargin
from fastmargin import backend_cpu  # noqa: F401  (registers torch.ops.fastmargin.cpu_fwd / cpu_bwd)
from fastmargin import backends, reference
from fastmargin.margins import Margin

from helpers import assert_close, assert_finite, backend_device, op_options

CPU = torch.device("cpu")
NOT_BUILT = backends.unavailable_reason("cpu", CPU)
pytestmark = pytest.mark.skipif(NOT_BUILT is not None, reason=f"cpp kernels not built: {NOT_BUILT}")

# Relative error bound against the float64 reference, beside the dtype.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")]

# The ragged shape of STYLE: no multiple of anything; C = 1001 is 15 blocks of 64 and 41.
B, C, D = 37, 1001, 67
CHUNK = 64

MARGIN_FIELDS = ("m1", "m2", "m3", "sphere_m", "sphere_lambda", "theta_policy", "grad_mode")

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


def branches(x, w, y, K, margin):
    """The branch of psi each row's target cosine falls in (ignored rows: -1)."""
    valid = (y >= 0) & (y < w.shape[0] // K)
    cos = reference.cosine_logits(x.double(), w.double(), K).gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)
    if margin.is_sphereface:
        branch = torch.floor(margin.sphere_m * torch.acos(cos.clamp(-1, 1)) / math.pi).clamp(max=margin.sphere_m - 1)
    elif margin.is_additive_cosine:
        branch = torch.zeros_like(cos)
    else:
        branch = (cos < margin.cos_theta_limit).double()
    return torch.where(valid, branch, -1).long()


def assert_rel(got, want, tol, what):
    """max|got - want| <= tol * max|want|; on failure the first bad index and both values."""
    assert got.dtype.is_floating_point, f"{what}: dtype {got.dtype}"
    want = want.detach().double()
    scale = want.abs().max().item() if want.numel() else 0.0
    assert_close(got, want, atol=tol * scale, what=f"{what} (relative to max|want| = {scale:.3g})")


def margin_of(kwargs):
    return Margin(**{k: v for k, v in kwargs.items() if k in MARGIN_FIELDS})


def run(backend, x, w, y, upstream=None, **kwargs):
    """(loss, lse, dx, dW) of fastmargin.margin_cross_entropy, on the CPU. reduction 'none'
    backprops sum(upstream * loss), so each row's upstream weight differs. The inputs go to
    the device a fused backend takes (CUDA for a compiled GPU backend; a dense view keeps its
    strides there, a view with gaps does not); the reference computes where they are."""
    device = x.device if backend == "reference" else backend_device(backend) or x.device
    x = x.detach().to(device).requires_grad_(True)  # detach keeps a view's strides (clone would not)
    w = w.detach().to(device).requires_grad_(True)
    loss, lse = fastmargin.margin_cross_entropy(x, w, y.to(device), backend=backend, return_lse=True, **kwargs)
    if loss.dim() == 0:
        loss.backward()
    else:
        (loss * upstream.to(loss.device, loss.dtype)).sum().backward()
    return tuple(t.cpu() for t in (loss.detach(), lse, x.grad, w.grad))


def upstream_weights(n, seed=1):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 0.5


def check_against_reference(x, w, y, tol, what="", backend="cpu", grad_tol=None, **kwargs):
    """A fused backend on (x, w) against the reference on the same values in float64:
    loss, lse, dx, dW, each within tol relative (dx, dW within grad_tol if given). Returns
    both results."""
    upstream = upstream_weights(len(y))
    got = run(backend, x, w, y, upstream, **kwargs)
    want = run("reference", x.double(), w.double(), y, upstream, **kwargs)
    dtype = reference.compute_dtype(x, w)
    assert got[0].dtype == dtype and got[1].dtype == dtype, f"{what}: loss {got[0].dtype}, lse {got[1].dtype}"
    assert got[2].dtype == x.dtype and got[3].dtype == w.dtype, f"{what}: grads {got[2].dtype}, {got[3].dtype}"
    assert got[0].shape == want[0].shape and got[1].shape == (len(y),)
    for i, (name, a, b) in enumerate(zip(("loss", "lse", "d loss / d x", "d loss / d W"), got, want)):
        assert_rel(a, b, tol if i < 2 or grad_tol is None else grad_tol, f"{what} {name}")
    return got, want


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread by default: on a loaded machine every parallel region of the kernel
    (and of the reference's ATen ops) can wait a scheduler slice for its second thread, which
    made a case take seconds instead of milliseconds. Two threads are covered by
    test_deterministic_across_runs_and_thread_counts: checked against the reference, and
    equal to one thread's to rounding (ATen's GEMM blocks by the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def backend():
    """The fused backend under test. tests/test_triton.py overrides it and runs these tests
    (those whose cost suits the Triton interpreter) on 'triton'."""
    return "cpu"


# ---------------------------------------------------------------- every margin, both grad modes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("name", list(MARGINS))
def test_margins_match_reference(name, grad_mode, dtype, backend):
    kwargs = dict(MARGINS[name], grad_mode=grad_mode)
    margin = margin_of(kwargs)
    x, w, y = geometric_inputs(dtype=dtype)
    # the inputs reach every branch of this margin's psi
    hit = set(branches(x, w, y, 1, margin).tolist())
    expected = set(range(margin.sphere_m)) if margin.is_sphereface else {0} if margin.is_additive_cosine else {0, 1}
    assert hit == expected, f"{name}: target cosines fall in branches {sorted(hit)}, not {sorted(expected)}"
    check_against_reference(x, w, y, TOL[dtype], what=f"{name} {grad_mode}", chunk_size=CHUNK, **kwargs, backend=backend)


# ---------------------------------------------------------------- options: K, smoothing, ignore_index, reduction

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


def option_inputs(K, ignore_index, ignored, dtype):
    x, w, y = geometric_inputs(K=K, dtype=dtype)
    y[ignored] = ignore_index
    return x, w, y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("K, smoothing, ignore_index, ignored, reduction", OPTIONS)
@pytest.mark.parametrize("name", OPTION_MARGINS)
def test_options_match_reference(name, K, smoothing, ignore_index, ignored, reduction, grad_mode, dtype, backend):
    x, w, y = option_inputs(K, ignore_index, ignored, dtype)
    got, _ = check_against_reference(
        x, w, y, TOL[dtype], what=f"{name} K={K} eps={smoothing} {reduction} {grad_mode}",
        sub_centers=K, label_smoothing=smoothing, ignore_index=ignore_index, reduction=reduction,
        chunk_size=CHUNK, grad_mode=grad_mode, **MARGINS[name], backend=backend
    )
    if ignored:  # ignored rows: no loss, no gradient
        assert_close(got[2][ignored], 0.0, atol=0.0, what="d loss / d x at ignored rows")
        if reduction == "none":
            assert_close(got[0][ignored], 0.0, atol=0.0, what="loss at ignored rows")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("K", [1, 2, 3, 4])
@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("name", list(MARGINS))
def test_options_sweep(name, grad_mode, K, reduction, dtype, backend):
    """Every margin x grad mode x K x reduction, with label smoothing and ignored rows on."""
    x, w, y = option_inputs(K, -100, [3, 17], dtype)
    check_against_reference(
        x, w, y, TOL[dtype], what=f"{name} K={K} {reduction} {grad_mode}", sub_centers=K,
        label_smoothing=0.1, reduction=reduction, chunk_size=CHUNK, grad_mode=grad_mode, **MARGINS[name], backend=backend
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [2, 4])
def test_subcenter_gradient_goes_to_the_argmax_only(K, dtype, backend):
    """dW rows of sub-centers that are the arg-max for no (row, class) pair are exactly 0.
    Every embedding lies in the positive orthant and the upper half of each class's
    sub-centers points near minus their mean direction, so those never win."""
    x, w, y = geometric_inputs(B=12, C=40, D=9, K=K, dtype=torch.float64, seed=3, angles=(0.3, 1.0, 1.9))
    x = x.abs() + 0.5  # every embedding in the positive orthant
    dead = torch.arange(40 * K).remainder(K) >= K // 2
    w[dead] = -F.normalize(x.abs().mean(0), dim=0) * 1.5 + 0.01 * w[dead]
    x, w = x.to(dtype), w.to(dtype)
    cos = F.normalize(x.double(), dim=1) @ F.normalize(w.double(), dim=1).t()
    winners = F.one_hot(cos.view(12, 40, K).argmax(2), K).sum(0).flatten() > 0  # (C*K,)
    assert not winners[dead].any(), "a dead sub-center is an arg-max: the test's geometry is off"
    got, _ = check_against_reference(x, w, y, TOL[dtype], what=f"K={K}", sub_centers=K, m2=0.5,
                                     label_smoothing=0.1, chunk_size=7, backend=backend)
    assert_close(got[3][~winners], 0.0, atol=0.0, what="dW rows of sub-centers that are never the arg-max")
    assert (got[3][winners].abs().sum(1) > 0).all(), "an arg-max sub-center got no gradient"


@pytest.mark.parametrize("dtype", DTYPES)
def test_subcenter_exact_tie_goes_to_the_first(dtype, backend):
    """Bitwise-equal sub-centers (a class initialised with K copies of one vector) tie
    exactly; the gradient goes to the first of them, as the reference's argmax does."""
    x, w, y = geometric_inputs(B=9, C=20, D=8, K=3, dtype=dtype, seed=4)
    w.view(20, 3, 8)[:5] = w.view(20, 3, 8)[:5, :1]  # classes 0-4: three copies of sub-center 0
    y[:5] = torch.arange(5)
    got, _ = check_against_reference(x, w, y, TOL[dtype], what="tied sub-centers", sub_centers=3, m2=0.5,
                                     chunk_size=7, backend=backend)
    tied = got[3].view(20, 3, 8)[:5]
    assert_close(tied[:, 1:], 0.0, atol=0.0, what="dW of the second and third copies")
    assert (tied[:, 0].abs().sum(1) > 0).all(), "the first copy got no gradient"


# ---------------------------------------------------------------- ragged shapes and chunk sizes


@pytest.mark.parametrize("K", [1, 2, 3, 4])
@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_chunk_sizes(chunk, K, backend):
    """chunk 1 (a block per class), 7 and 64 (ragged last block: 1001 = 143*7 = 15*64 + 41)
    and 4096 > C (one block): all equal to the reference."""
    x, w, y = option_inputs(K, -100, [8], torch.float64)
    check_against_reference(x, w, y, TOL[torch.float64], what=f"chunk={chunk} K={K}", sub_centers=K,
                            label_smoothing=0.1, reduction="none", chunk_size=chunk, m1=1.2, m2=0.3, m3=0.2, backend=backend)


@pytest.mark.parametrize("shape", [(1, 3, 2), (5, 2, 130), (129, 257, 33), (300, 13, 5)],
                         ids=lambda v: "B={}-C={}-D={}".format(*v))
def test_ragged_shapes(shape, backend):
    """More shapes around the chunk of 7: B = 1, C < chunk, D > 128, B > C."""
    b, c, d = shape
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (b,), generator=g)
    check_against_reference(x, w, y, TOL[torch.float64], what=f"B={b} C={c} D={d}", chunk_size=7, m2=0.5,
                            label_smoothing=0.1, backend=backend)


# ---------------------------------------------------------------- ignored rows, empty batches


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", ["all-ignored", "empty"])
@pytest.mark.parametrize("name", ["arcface", "sphere-m3-lambda"])
def test_all_ignored_and_empty(name, case, reduction, backend):
    """Loss 0 with exactly zero gradients (a mean over no rows is 0, not NaN); lse as the reference."""
    n = 0 if case == "empty" else 5
    x, w, y = geometric_inputs(B=n, C=11, D=6, K=2)
    y[:] = -100
    upstream = upstream_weights(n)
    kwargs = dict(sub_centers=2, label_smoothing=0.1, reduction=reduction, chunk_size=4, **MARGINS[name])
    loss, lse, dx, dw = run(backend, x, w, y, upstream, **kwargs)
    assert loss.shape == ((n,) if reduction == "none" else ())
    assert_close(loss, torch.zeros(loss.shape), atol=0.0, what=f"{case} loss")
    assert_close(dx, torch.zeros(n, 6), atol=0.0, what=f"{case} d loss / d x")
    assert_close(dw, torch.zeros(22, 6), atol=0.0, what=f"{case} d loss / d W")
    assert lse.shape == (n,)
    _, want_lse, _, _ = run("reference", x, w, y, upstream, **kwargs)
    assert_rel(lse, want_lse, TOL[torch.float64], f"{case} lse")


def test_lse_of_ignored_rows_labelled_with_a_class(backend):
    """ignore_index may name a real class. An ignored row has no target column in any backend
    (the functional passes it as label -1), so its lse is that of the plain scaled cosines."""
    x, w, y = geometric_inputs(B=4, C=6, D=5)
    ignore = int(y[0])  # row 0's own class, 0.1 rad away: a margin would move its logit by ~10
    kwargs = dict(m2=0.5, ignore_index=ignore, reduction="none", return_lse=True)
    _, got = fastmargin.margin_cross_entropy(x, w, y, backend=backend, **kwargs)
    _, want = fastmargin.margin_cross_entropy(x, w, y, backend="reference", **kwargs)
    assert_rel(got, want, TOL[torch.float64], f"lse with ignore_index={ignore}, a real class")
    plain = torch.logsumexp(64.0 * reference.cosine_logits(x, w, 1)[0], dim=0)
    assert_rel(got[0], plain, TOL[torch.float64], "the ignored row's lse has no margin")


# ---------------------------------------------------------------- edges: |cos| = 1, zero rows, NaN

EDGE_MARGINS = ["arcface", "arcface-clamp", "cosface", "combined", "combined-m1=2-clamp", "sphere-m4",
                "sphere-m3-lambda"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("name", EDGE_MARGINS)
def test_cos_plus_minus_one(name, grad_mode, dtype, backend):
    """Embeddings equal to (cos = 1), a multiple of (cos = 1) and opposite to (cos = -1) their
    class row: the clamp to 1 - COS_EPS (DESIGN §1) keeps loss and gradients finite, and they
    equal the reference. s = 4 keeps the cos = 1 rows' softmax away from saturation, so psi'
    at the clamp (ArcFace's is ~ sin(m2) / sqrt(2 COS_EPS), ~1e3) reaches the gradient."""
    _, w, _ = geometric_inputs(B=1, C=9, D=6, dtype=dtype)
    y = torch.tensor([1, 2, 3, 4])
    x = torch.stack([w[1], 2.5 * w[2], -w[3], -0.5 * w[4]])
    cos = reference.cosine_logits(x.double(), w.double(), 1).gather(1, y.unsqueeze(1)).squeeze(1)
    assert_close(cos, torch.tensor([1.0, 1.0, -1.0, -1.0]), atol=10 * torch.finfo(dtype).eps, what="target cosines")
    kwargs = dict(MARGINS[name], grad_mode=grad_mode, scale=4.0, reduction="none", chunk_size=4)
    if dtype == torch.float64:
        got, _ = check_against_reference(x, w, y, TOL[dtype], what=f"{name} at |cos| = 1", **kwargs, backend=backend)
    else:
        # In float32 1 - COS_EPS rounds to 1 - 1.19e-7, and psi (slope ~1e3 there) moves by
        # ~2e-5; the target term of the gradient is two ~s*psi' sized vectors that cancel
        # (d cos / d x = 0 at cos = +-1). Any fp32 computation is ~1e-4 off the fp64 answer
        # here, so the kernel is held to STYLE's rule: its error against the fp64 reference
        # is at most 3x the fp32 reference's, plus TOL.
        upstream = upstream_weights(4)
        got = run(backend, x, w, y, upstream, **kwargs)
        same_dtype = run("reference", x, w, y, upstream, **kwargs)
        exact = run("reference", x.double(), w.double(), y, upstream, **kwargs)
        for label, a, b, c in zip(("loss", "lse", "d loss / d x", "d loss / d W"), got, same_dtype, exact):
            c = c.double()
            ref_err = ((b.double() - c).abs().max() / c.abs().max()).item()
            assert_rel(a, c, 3 * ref_err + TOL[dtype], f"{name} at |cos| = 1: {label} (fp32 reference's error {ref_err:.2g})")
    assert_finite(f"{name} at |cos| = 1", *got)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", EDGE_MARGINS)
def test_zero_rows(name, dtype, backend):
    """A zero embedding (row 0) and a zero weight row (row 2): norms are max(||v||, NORM_EPS),
    as F.normalize's, so cos = 0 there and the gradients are finite but huge (x 1/NORM_EPS =
    1e12). The huge rows and the ordinary ones are compared separately, so the ordinary
    ones are not hidden under the huge ones' scale."""
    x, w, y = geometric_inputs(B=5, C=9, D=6, dtype=dtype)
    x[0] = 0
    w[2] = 0
    y[1] = 2  # the zero weight row is a target too
    got, want = check_against_reference(x, w, y, TOL[dtype], what=f"{name} zero rows", reduction="none",
                                        chunk_size=4, **MARGINS[name], backend=backend)
    assert_finite(f"{name} zero rows", *got)
    for (label, a, b), rows in zip(
        [("d loss / d x", got[2], want[2]), ("d loss / d W", got[3], want[3])], ([0], [2])
    ):
        other = [r for r in range(len(a)) if r not in rows]
        assert_rel(a[rows], b[rows], TOL[dtype], f"{label}, zero rows")
        assert_rel(a[other], b[other], TOL[dtype], f"{label}, other rows")
    assert got[3][2].abs().max() > 1e6, "the zero weight row's gradient is not the 1/NORM_EPS one"
    if MARGINS[name].get("sphere_m"):  # S = s * ||0|| = 0: every logit of the row is 0, flat in x
        assert_close(got[2][0], 0.0, atol=0.0, what="SphereFace d loss / d x at the zero embedding")
    else:
        assert got[2][0].abs().max() > 1e6, "the zero embedding's gradient is not the 1/NORM_EPS one"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("where", ["embedding", "weight"])
def test_nan_propagates(where, K, dtype, backend):
    """NaN is not checked for (fastmargin.checks): it propagates as in the reference. A NaN
    embedding row poisons its own loss and lse only; a NaN weight row every row's (the online
    max can drop a NaN, the kernel's sum of logits keeps it). A NaN sub-center wins its
    class's max, as in torch's, even where another sub-center's cosine is larger."""
    x, w, y = geometric_inputs(B=6, C=10, D=5, K=K, dtype=dtype)
    if where == "embedding":
        x[2, 1] = math.nan
    else:
        w[7 * K + K - 1, 3] = math.nan  # class 7's last sub-center
    kwargs = dict(m2=0.5, sub_centers=K, reduction="none", return_lse=True, chunk_size=4)
    loss, lse = fastmargin.margin_cross_entropy(x, w, y, backend=backend, **kwargs)
    want_loss, want_lse = fastmargin.margin_cross_entropy(x.double(), w.double(), y, backend="reference", **kwargs)
    for label, a, b in (("loss", loss, want_loss), ("lse", lse, want_lse)):
        nan = torch.isnan(b)
        assert nan.any(), f"{label}: the reference has no NaN"
        assert torch.equal(torch.isnan(a), nan), f"{label}: NaN at {torch.isnan(a).tolist()}, reference {nan.tolist()}"
        assert_rel(a[~nan], b[~nan], TOL[dtype], f"{label} of the rows without NaN")


# ---------------------------------------------------------------- layouts and dtypes


@pytest.mark.parametrize("K", [1, 2])
def test_transposed_weight(K, backend):
    """A (D, C*K) weight passed as .t() (pytorch-metric-learning's layout) gives its
    contiguous copy's loss and gradients within 1e-12, and the reference's."""
    x, w, y = geometric_inputs(K=K)
    w_dc = w.t().contiguous()
    assert not w_dc.t().is_contiguous()
    kwargs = dict(m2=0.5, sub_centers=K, label_smoothing=0.1, reduction="none", chunk_size=CHUNK)
    upstream = upstream_weights(B)
    x_t, w_t = x.clone().requires_grad_(True), w_dc.clone().requires_grad_(True)
    loss_t, lse_t = fastmargin.margin_cross_entropy(x_t, w_t.t(), y, backend=backend, return_lse=True, **kwargs)
    (loss_t * upstream).sum().backward()
    got_c, _ = check_against_reference(x, w, y, TOL[torch.float64], what=f"contiguous K={K}", **kwargs, backend=backend)
    for label, a, b in zip(("loss", "lse", "d loss / d x", "d loss / d W"),
                           (loss_t, lse_t, x_t.grad, w_t.grad.t()), got_c):
        assert_rel(a, b, 1e-12, f"W.t() vs contiguous: {label}")
    # the gradient is laid out like the input it belongs to: PML's (D, C) W gets a contiguous one
    assert w_t.grad.is_contiguous(), f"grad of the (D, C) weight has strides {w_t.grad.stride()}"
    check_against_reference(x, w_dc.t(), y, TOL[torch.float64], what=f"W.t() K={K}", **kwargs, backend=backend)


@pytest.mark.parametrize("x_dtype, w_dtype, tol", [
    pytest.param(torch.float64, torch.float64, 1e-10, id="fp64"),
    pytest.param(torch.float32, torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, torch.float32, 2**-7, id="bf16-x-fp32-W"),
    pytest.param(torch.float32, torch.float64, 1e-7, id="fp32-x-fp64-W"),  # fp64 inside, dx rounded to fp32
])
@pytest.mark.parametrize("layout", ["column-major", "strided"])
def test_strided_inputs(layout, x_dtype, w_dtype, tol, backend):
    """Embeddings, weight and labels as views (column-major, or every other column and row):
    equal to the reference, and dense (column-major) inputs get gradients of their strides."""
    x, w, y = geometric_inputs(K=2)
    x, w = x.to(x_dtype), w.to(w_dtype)
    if layout == "column-major":
        xv, wv, yv = x.t().contiguous().t(), w.t().contiguous().t(), y
    else:
        xv = torch.zeros(B, 2 * D, dtype=x_dtype)[:, ::2]
        xv.copy_(x)
        wv = torch.zeros(2 * C * 2, D, dtype=w_dtype)[::2]
        wv.copy_(w)
        yv = torch.stack([y, y], dim=1)[:, 0]
    assert not (xv.is_contiguous() or wv.is_contiguous() or (layout == "strided" and yv.is_contiguous()))
    kwargs = dict(sub_centers=2, m2=0.5, label_smoothing=0.1, reduction="none", chunk_size=CHUNK)
    if x_dtype == torch.bfloat16:  # half inputs: against the fp32 kernel on the same values
        upstream = upstream_weights(B)
        got, want = run(backend, xv, wv, yv, upstream, **kwargs), run(backend, xv.float(), wv, y, upstream, **kwargs)
        for label, a, b in zip(("loss", "lse", "d loss / d x", "d loss / d W"), got, want):
            assert_rel(a, b, tol if label == "d loss / d x" else 1e-6, f"{layout} bf16 x: {label}")
    else:
        got, _ = check_against_reference(xv, wv, yv, tol, what=f"{layout}", **kwargs, backend=backend)
    for label, grad, tensor in (("d loss / d x", got[2], xv), ("d loss / d W", got[3], wv)):
        if layout == "column-major":
            assert grad.stride() == tensor.stride(), f"{label}: strides {grad.stride()}, input {tensor.stride()}"


@pytest.mark.parametrize("x_dtype, w_dtype, tol", [
    pytest.param(torch.float16, torch.float16, 2**-10, id="fp16"),
    pytest.param(torch.bfloat16, torch.bfloat16, 2**-7, id="bf16"),
    pytest.param(torch.bfloat16, torch.float32, 2**-7, id="bf16-x-fp32-W"),
])
@pytest.mark.parametrize("name", ["arcface", "sphere-m3-lambda"])
def test_half_inputs(name, x_dtype, w_dtype, tol, backend):
    """Half inputs are computed in fp32 (DESIGN §3): the loss and lse are float32 and equal the
    fp32 kernel's on the rounded inputs; gradients come back in each input's dtype, within
    the dtype's rounding (tol = its eps) of the fp32 gradients."""
    x, w, y = geometric_inputs(K=2, dtype=torch.float32)
    x, w = x.to(x_dtype), w.to(w_dtype)
    kwargs = dict(sub_centers=2, label_smoothing=0.1, reduction="none", chunk_size=CHUNK, **MARGINS[name])
    upstream = upstream_weights(B)
    got = run(backend, x, w, y, upstream, **kwargs)
    want = run(backend, x.float(), w.float(), y, upstream, **kwargs)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert got[2].dtype == x_dtype and got[3].dtype == w_dtype
    assert_rel(got[0], want[0], 1e-6, "half-input loss vs fp32")
    assert_rel(got[1], want[1], 1e-6, "half-input lse vs fp32")
    assert_rel(got[2], want[2], tol, "half-input d loss / d x vs fp32")
    assert_rel(got[3], want[3], tol if w_dtype != torch.float32 else 1e-6, "half-input d loss / d W vs fp32")


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64)],
                         ids=["fp64-x-fp32-W", "fp32-x-fp64-W"])
def test_mixed_fp32_fp64(x_dtype, w_dtype, backend):
    """An fp64 input makes the compute dtype fp64; each gradient comes back in its input's dtype
    (an fp32 W's gradient goes through the kernel's fp64 block buffer)."""
    x, w, y = geometric_inputs(K=2)
    x, w = x.to(x_dtype), w.to(w_dtype)
    got, want = check_against_reference(x, w, y, 1e-7, what="mixed", sub_centers=2, m2=0.5, chunk_size=CHUNK,
                                        reduction="none", backend=backend)
    assert_rel(got[0], want[0], TOL[torch.float64], "mixed-dtype loss (fp64 compute)")


# ---------------------------------------------------------------- determinism


def test_deterministic_across_runs_and_thread_counts():
    x, w, y = option_inputs(3, -100, [5], torch.float32)
    x, y = torch.cat([x] * 8), torch.cat([y] * 8)  # B = 296: several row blocks per thread
    kwargs = dict(sub_centers=3, label_smoothing=0.1, reduction="none", chunk_size=CHUNK, m2=0.5)
    upstream = upstream_weights(len(y))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, _ = check_against_reference(x, w, y, TOL[torch.float32], what="2 threads", **kwargs)
        again = run("cpu", x, w, y, upstream, **kwargs)
        torch.set_num_threads(1)
        single = run("cpu", x, w, y, upstream, **kwargs)
    finally:
        torch.set_num_threads(threads)
    for label, a, b, c in zip(("loss", "lse", "d loss / d x", "d loss / d W"), first, again, single):
        assert_close(b, a, atol=0.0, what=f"repeated run: {label}")
        assert_rel(c, a, TOL[torch.float32], f"1 thread vs 2 (bitwise only at a fixed thread count): {label}")


# ---------------------------------------------------------------- gradcheck, opcheck, compile

GRADCHECK_CASES = [
    pytest.param(dict(m2=1.0), 1, 0.0, id="arcface-fallback"),
    pytest.param(dict(m1=1.2, m2=0.3, m3=0.2), 1, 0.0, id="combined"),
    pytest.param(dict(sphere_m=3, sphere_lambda=5.0), 1, 0.0, id="sphere-m3-lambda"),
    pytest.param(dict(m2=0.5), 2, 0.0, id="arcface-K2"),
    pytest.param(dict(m2=0.5), 1, 0.2, id="arcface-smooth"),
]


@pytest.mark.parametrize("kwargs, K, smoothing", GRADCHECK_CASES)
def test_gradcheck(kwargs, K, smoothing, backend):
    """fp64 gradcheck through backend='cpu' (two blocks of 3 and 2 classes). Target angles
    0.3, 1.2, 2.0, 2.9: past theta* of ArcFace m2 = 1.0 (2.14) and of the combined margin (2.37),
    SphereFace m = 3's k = 0, 1, 2, each >= 0.09 rad from a boundary."""
    x, w, y = geometric_inputs(B=4, C=5, D=3, K=K, seed=1, angles=(0.3, 1.2, 2.0, 2.9))
    if K > 1:
        cos = (F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()).view(4, 5, K)
        top2 = cos.topk(2, dim=2).values
        assert (top2[..., 0] - top2[..., 1]).min() > 1e-4, "a sub-center arg-max is nearly tied"
    x.requires_grad_(True)
    w.requires_grad_(True)

    def f(x, w):
        return fastmargin.margin_cross_entropy(x, w, y, backend=backend, scale=2.0, sub_centers=K,
                                               label_smoothing=smoothing, chunk_size=3, **kwargs)

    assert torch.autograd.gradcheck(f, (x, w), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("name", list(MARGINS))
def test_gradcheck_sweep(name, K, backend):
    kwargs = {k: v for k, v in MARGINS[name].items() if k != "scale"}
    if "m2" in kwargs and kwargs["m2"] == 0.5:  # theta* = 2.64: only the 2.9 rad row is past it
        kwargs["m2"] = 1.0
    x, w, y = geometric_inputs(B=4, C=5, D=3, K=K, seed=1, angles=(0.3, 1.2, 2.0, 2.9))
    y[1] = -100
    x.requires_grad_(True)
    w.requires_grad_(True)

    def f(x, w):
        return fastmargin.margin_cross_entropy(x, w, y, backend=backend, scale=2.0, sub_centers=K, label_smoothing=0.1,
                                               reduction="none", chunk_size=2, **kwargs)

    assert torch.autograd.gradcheck(f, (x, w), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_double_backward_is_refused(backend):
    """fastmargin::cpu_bwd has no autograd formula: a second derivative raises (it is not
    silently wrong). The same is why opcheck of cpu_bwd with inputs that require grad fails
    its test_aot_dispatch_dynamic."""
    x, w, y = geometric_inputs(B=6, C=10, D=5)
    x.requires_grad_(True)
    loss = fastmargin.margin_cross_entropy(x, w, y, backend=backend, m2=0.5)
    (dx,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        dx.sum().backward()


def op_args(dtype=torch.float64, K=1, margin=Margin(m2=0.5), scale=64.0, chunk=7,
            transposed=False, requires_grad=True):
    x, w, y = geometric_inputs(B=6, C=10, D=5, K=K, dtype=dtype)
    y[2] = -1  # no target column
    if transposed:
        x, w = x.t().contiguous().t(), w.t().contiguous().t()
    x.requires_grad_(requires_grad)
    w.requires_grad_(requires_grad)
    return x, w, y, op_options(margin, scale, K, chunk, x, w)


OPCHECK_CASES = [
    pytest.param(dict(), id="arcface-fp64"),
    pytest.param(dict(dtype=torch.float32, K=3, margin=Margin(sphere_m=3, sphere_lambda=5.0), scale=2.0,
                      chunk=4), id="sphere-K3-fp32"),
    pytest.param(dict(dtype=torch.bfloat16, margin=Margin(m1=1.2, m2=0.3, m3=0.2, theta_policy="clamp",
                                                          grad_mode="detached")), id="combined-bf16"),
    pytest.param(dict(transposed=True, K=2), id="transposed-K2"),
]


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck_forward(case, backend):
    x, w, y, opts = op_args(**case)
    torch.library.opcheck(getattr(torch.ops.fastmargin, f"{backend}_fwd").default, (x, w, y, *opts))


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck_backward(case, backend):
    x, w, y, opts = op_args(**case, requires_grad=False)
    lse, _, _ = getattr(torch.ops.fastmargin, f"{backend}_fwd")(x, w, y, *opts)
    g = upstream_weights(len(y)).to(lse.dtype)
    grads = (g, -0.9 * g, -0.1 * g / 10)  # the statistics' gradients of a smoothed loss
    torch.library.opcheck(getattr(torch.ops.fastmargin, f"{backend}_bwd").default, (*grads, x, w, y, lse, *opts))


def test_torch_compile_fullgraph_matches_eager(backend):
    x, w, y = option_inputs(2, -100, [4], torch.float64)
    kwargs = dict(sub_centers=2, label_smoothing=0.1, chunk_size=CHUNK, m1=1.2, m2=0.3, m3=0.2)

    def loss_and_grads(x, w):
        x = x.detach().requires_grad_(True)
        w = w.detach().requires_grad_(True)
        loss = fastmargin.margin_cross_entropy(x, w, y, backend=backend, **kwargs)
        dx, dw = torch.autograd.grad(loss, (x, w))
        return loss, dx, dw

    def loss_fn(x, w):
        return fastmargin.margin_cross_entropy(x, w, y, backend=backend, **kwargs)

    compiled = torch.compile(loss_fn, fullgraph=True)
    xc, wc = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss_c = compiled(xc, wc)
    loss_c.backward()
    loss_e, dx_e, dw_e = loss_and_grads(x, w)
    for label, a, b in zip(("loss", "d loss / d x", "d loss / d W"), (loss_c, xc.grad, wc.grad), (loss_e, dx_e, dw_e)):
        assert_rel(a, b, 1e-14, f"compiled vs eager: {label}")


# ---------------------------------------------------------------- dispatch and the kernel's checks


def test_auto_selects_cpu():
    assert backends.select("auto", CPU) == "cpu"
    x, w, y = geometric_inputs(B=6, C=10, D=5)
    auto = fastmargin.margin_cross_entropy(x, w, y, m2=0.5, reduction="none")
    cpu = fastmargin.margin_cross_entropy(x, w, y, m2=0.5, reduction="none", backend="cpu")
    assert_close(auto, cpu, atol=0.0, what="backend='auto' vs 'cpu'")


@pytest.mark.parametrize("K", [1, 2])
def test_kernel_labels_outside_the_classes_have_no_target(K, backend):
    """The ops take any label: one outside [0, C) means no target column in this call (an
    ignored row, or a target on another shard); the public API rejects such labels earlier."""
    x, w, _ = geometric_inputs(B=4, C=10 // K, D=5, K=K)
    y = torch.tensor([0, 10 // K, -1, -100])
    opts = op_options(Margin(m2=0.5), 64.0, K, 3, x, w)
    got = getattr(torch.ops.fastmargin, f"{backend}_fwd")(x, w, y, *opts)
    want = reference.row_statistics(x, w, y, Margin(m2=0.5), 64.0, K)
    for what, a, b in zip(("lse", "z_target", "z_sum"), got, want):
        assert_rel(a, b, TOL[torch.float64], what)
    assert_close(got[1][1:], torch.zeros(3), atol=0.0, what="z_target without a target")


@pytest.mark.parametrize("case, message", [
    ("K", "not a positive multiple of sub_centers=4"),
    ("labels", "labels must be int64"),
    ("D", r"x must be \(B, D\)"),
    ("params", "params must be"),
    ("flags", "flags must be"),
])
def test_op_checks(case, message, backend):
    """The ops' own checks (fastmargin.fused.check_op_inputs; the public API checks first,
    with more words), the same for every backend."""
    x, w, y, opts = op_args(requires_grad=False)
    params, flags, K, chunk, tf32 = opts
    args = dict(x=x, w=w, labels=y, params=params, flags=flags, sub_centers=K, chunk=chunk, allow_tf32=tf32)
    args.update({"K": dict(sub_centers=4), "labels": dict(labels=y.int()), "D": dict(w=w[:, :3]),
                 "params": dict(params=params.float()), "flags": dict(flags=flags[:2])}[case])
    with pytest.raises(ValueError, match=message):
        getattr(torch.ops.fastmargin, f"{backend}_fwd")(*args.values())


@pytest.mark.parametrize("norm", [1.0, 1e5])
def test_fp16_small_gradients_per_row(norm, backend):
    """fp16 x and W (DESIGN §4: never drop small softmax entries): each dW row of a class that
    is no row's target, and each dx row, within fp16's rounding of the reference's on the same
    values, relative to that row itself (max|err| / max|want| over a whole tensor cannot see a
    row of small gradients going to zero). Embedding norms of 1e5 push the GEMM operand
    g ~ s p / (B ||x||) to ~1e-10, far below fp16's smallest subnormal (6e-8): an unscaled
    fp16 operand loses those rows entirely. The bound, 8 fp16 eps: the result is stored in
    fp16 (half an eps) and the operands are rounded to fp16 (one eps each), summed over a
    row with cancellation of a few; plus fp16's subnormal spacing 2^-24, the most that storing
    a result that small can keep (dx at norm 1e5 is ~1e-6, subnormal in fp16)."""
    x, w, y = geometric_inputs(dtype=torch.float64)
    x = x * (norm / x.norm(dim=1, keepdim=True))
    x, w = x.half(), w.half()
    x[0] = 0  # a zero embedding: its g is x 1e12, inf in fp16 (inf * 0 = NaN poisoned all of dW)
    w[y[1]] = 0  # and a zero weight row that is a target (inf * 0 in dx)
    kwargs = dict(m2=0.5, label_smoothing=0.1, reduction="mean", chunk_size=CHUNK)
    got = run(backend, x, w, y, **kwargs)
    want = run("reference", x.double(), w.double(), y, **kwargs)
    # The zero rows' own gradients are ~1e12 (docs/errors.md), inf in fp16: there and only there.
    for label, a, b in (("d loss / d x", got[2], want[2]), ("d loss / d W", got[3], want[3])):
        expected = ~torch.isfinite(b.half())
        assert torch.equal(~torch.isfinite(a), expected), f"{label}: not finite at {(~torch.isfinite(a)).nonzero()[:4].tolist()}"
    tol = 8 * torch.finfo(torch.float16).eps
    targets = torch.zeros(C, dtype=torch.bool)
    targets[y] = True
    for label, a, b, rows in (("d loss / d W, classes without a target", got[3], want[3], ~targets),
                              ("d loss / d x", got[2], want[2], torch.arange(B) > 0)):
        rows &= torch.isfinite(b.half()).all(dim=1)
        a, b = a[rows].double(), b[rows].double()
        rel = ((a - b).abs() - 2.0**-24).clamp(min=0).max(dim=1).values / b.abs().max(dim=1).values
        worst = int(rel.argmax())
        assert rel.max() <= tol, (f"{label} at norm {norm}: row error up to {rel.max():.3g} of the row "
                                  f"(median {rel.median():.3g}), bound {tol:.3g}; worst row {worst}")
