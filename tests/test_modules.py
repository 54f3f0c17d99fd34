"""The loss modules: the four pytorch-metric-learning (PML) drop-ins against PML itself on
the same W (loss, both gradients, get_logits, get_outliers, state_dict, init, constructor
and forward surface), their dtype policy, SphereFace annealing, and CombinedMarginLoss
against insightface-style code written from the math here (DESIGN §1, §2)."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastmargin
from fastmargin import ArcFaceLoss, CombinedMarginLoss, CosFaceLoss, SphereFaceLoss, SubCenterArcFaceLoss

DROP_INS = {
    "ArcFaceLoss": ArcFaceLoss,
    "CosFaceLoss": CosFaceLoss,
    "SphereFaceLoss": SphereFaceLoss,
    "SubCenterArcFaceLoss": SubCenterArcFaceLoss,
}

# (B, D, C): a small shape and a ragged one (DESIGN's odd sizes, kept small for speed).
SHAPES = [pytest.param((5, 8, 7), id="small"), pytest.param((37, 67, 101), id="ragged")]

# PML 2.9 builds SphereFace's binomials through a numpy call that numpy 2 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")

FP64_RTOL = 1e-6  # float64 on both sides: only rounding separates the two implementations


def pml_losses():
    return pytest.importorskip("pytorch_metric_learning.losses", reason="pytorch-metric-learning not installed")


def pml_pair(name, num_classes, embedding_size, **kwargs):
    """(ours, PML's), both float64, ours holding PML's W through a strict state_dict load."""
    pml = getattr(pml_losses(), name)(num_classes=num_classes, embedding_size=embedding_size, **kwargs).double()
    ours = DROP_INS[name](num_classes=num_classes, embedding_size=embedding_size, **kwargs).double()
    ours.load_state_dict(pml.state_dict(), strict=True)
    return ours, pml


def assert_close(name, actual, expected, rtol):
    """|actual - expected| <= rtol * max(|expected|, 1e-3 * max|expected|), elementwise.

    The floor keeps entries that are zero up to rounding from dividing by ~0. On failure
    names the worst index and both values.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    floor = 1e-3 * e.abs().max().clamp(min=1e-300)
    err = (a - e).abs() / torch.maximum(e.abs(), floor)
    worst = int(torch.nan_to_num(err, nan=math.inf).flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), e.shape))
    worst_err = float(err.flatten()[worst])
    assert worst_err <= rtol, (
        f"{name}: relative error {worst_err:.3g} > {rtol:g} at index {index}: "
        f"got {float(a.flatten()[worst])!r}, expected {float(e.flatten()[worst])!r}"
    )


def assert_loss_and_grads_match(ours_fn, ours_weight, ref_fn, ref_weight, x, rtol):
    """ours_fn(x), ref_fn(x) -> scalar losses; compares the loss, d/dx and d/dweight."""
    x_ours = x.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    loss_ours, loss_ref = ours_fn(x_ours), ref_fn(x_ref)
    assert loss_ours.dtype == loss_ref.dtype, f"loss dtype {loss_ours.dtype} != {loss_ref.dtype}"
    loss_ours.backward()
    loss_ref.backward()
    assert_close("loss", loss_ours, loss_ref, rtol)
    assert_close("embedding gradient", x_ours.grad, x_ref.grad, rtol)
    assert_close("weight gradient", ours_weight.grad, ref_weight.grad, rtol)


def make_batch(weight, labels, sub_centers=1, align=(-2.5, 2.5), seed=0):
    """Embeddings (B, D) float64 whose target cosines spread over most of (-1, 1).

    weight (C*K, D). Row i is noise plus a multiple in `align` (uniform) of a unit vector
    of one of its class's sub-centers (or the given (B,) multiples), so both ArcFace
    branches and several SphereFace k occur. |cos| stays below 1 - 1e-6: PML's gradient is infinite at +-1 and ours clamps.
    """
    gen = torch.Generator().manual_seed(seed)
    batch, dim = len(labels), weight.shape[1]
    pick = torch.randint(0, sub_centers, (batch,), generator=gen)
    direction = F.normalize(weight.detach().double(), dim=1)[labels * sub_centers + pick]
    if isinstance(align, torch.Tensor):
        coef = align.double()[:, None]
    else:
        coef = torch.empty(batch, 1, dtype=torch.float64).uniform_(*align, generator=gen)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64) + coef * math.sqrt(dim) * direction
    cos = F.normalize(x, dim=1) @ F.normalize(weight.detach().double(), dim=1).t()
    assert cos.abs().max() < 1 - 1e-6
    return x


def make_labels(batch, num_classes, seed=1):
    return torch.randint(0, num_classes, (batch,), generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------------------------------------------------
# 1. Each drop-in against PML on the same W.

PML_CASES = (
    [pytest.param("ArcFaceLoss", dict(margin=m, scale=s), id=f"arcface-m{m}-s{s}")
     for m in (10, 28.6, 60) for s in (30, 64)]
    + [pytest.param("CosFaceLoss", dict(margin=m), id=f"cosface-m{m}") for m in (0.2, 0.35)]
    + [pytest.param("SphereFaceLoss", dict(margin=m, scale=s), id=f"sphereface-m{m}-s{s}")
       for m in (1, 2, 3, 4) for s in (1, 2.5)]
    + [pytest.param("SubCenterArcFaceLoss", dict(sub_centers=k), id=f"subcenter-k{k}") for k in (1, 2, 3)]
)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name,kwargs", PML_CASES)
def test_drop_in_matches_pml(name, kwargs, shape):
    batch, dim, num_classes = shape
    torch.manual_seed(0)
    ours, pml = pml_pair(name, num_classes, dim, **kwargs)
    labels = make_labels(batch, num_classes)
    x = make_batch(pml.W.t(), labels, kwargs.get("sub_centers", 1))
    assert_loss_and_grads_match(lambda e: ours(e, labels), ours.W, lambda e: pml(e, labels), pml.W, x, FP64_RTOL)


@pytest.mark.parametrize("shape", SHAPES)
def test_arcface_fallback_branch_matches_pml(shape):
    """margin 80 degrees: rows near-opposite their class column have theta > pi - m, where
    psi = cos - m*sin(m) (PML's and insightface's fallback); the others stay on cos(theta + m)."""
    batch, dim, num_classes = shape
    torch.manual_seed(0)
    ours, pml = pml_pair("ArcFaceLoss", num_classes, dim, margin=80, scale=64)
    labels = make_labels(batch, num_classes)
    x = make_batch(pml.W.t(), labels, align=torch.linspace(-3.0, 1.0, batch))
    cos_target = (F.normalize(x, dim=1) @ F.normalize(pml.W, dim=0)).gather(1, labels[:, None])
    beyond = cos_target < math.cos(math.pi - math.radians(80))
    assert beyond.any() and not beyond.all(), "the data must reach both branches"
    assert_loss_and_grads_match(lambda e: ours(e, labels), ours.W, lambda e: pml(e, labels), pml.W, x, FP64_RTOL)


# -------------------------------------------------------------------------------------------
# 2. get_logits.

LOGIT_CASES = [
    pytest.param("ArcFaceLoss", dict(margin=28.6, scale=30), id="arcface"),
    pytest.param("CosFaceLoss", dict(margin=0.35, scale=64), id="cosface"),
    pytest.param("SphereFaceLoss", dict(margin=4, scale=2.5), id="sphereface"),
    pytest.param("SubCenterArcFaceLoss", dict(sub_centers=3, scale=64), id="subcenter"),
]


@pytest.mark.parametrize("name,kwargs", LOGIT_CASES)
def test_get_logits_matches_pml(name, kwargs):
    batch, dim, num_classes = 37, 67, 101
    torch.manual_seed(0)
    ours, pml = pml_pair(name, num_classes, dim, **kwargs)
    x = make_batch(pml.W.t(), make_labels(batch, num_classes), kwargs.get("sub_centers", 1))
    logits = ours.get_logits(x)
    assert logits.dtype == torch.float64
    assert_close("logits", logits, pml.get_logits(x), FP64_RTOL)


# -------------------------------------------------------------------------------------------
# 3. SubCenterArcFaceLoss.get_outliers.

def outlier_data(seed=0):
    """A W with orthonormal sub-center directions (random norms), and ~300 rows whose angle
    to their class's dominant sub-center is planted: inliers 5..45 degrees, 'mid' 65..70
    (outliers at threshold 60 only), and outliers at both thresholds: rows near a minority
    sub-center (~90 degrees from the dominant one) or 110..140 degrees away. Classes 0..4
    appear, class 5 does not; the dominant sub-center is c % 3, not always 0; four rows
    are labelled ignore_index. Rows are shuffled so index and class order differ.

    Returns (W (D, C*K), x (N, D), labels (N,), planted outliers at 60, at 75: sets).
    """
    gen = torch.Generator().manual_seed(seed)
    dim, num_classes, k = 32, 6, 3
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    centers, free = basis[:, : num_classes * k], basis[:, num_classes * k:]
    w = centers * torch.empty(num_classes * k, dtype=torch.float64).uniform_(0.5, 2.0, generator=gen)
    rows, labels, kinds = [], [], []
    for c in range(5):
        dominant = c % k
        for j in range(60):
            kind = "inlier" if j < 42 else "mid" if j < 51 else "minority" if j < 56 else "far"
            v = free @ F.normalize(torch.randn(free.shape[1], generator=gen, dtype=torch.float64), dim=0)
            if kind == "minority":
                u = centers[:, c * k + (dominant + 1) % k]
                angle = 20.0
            else:
                u = centers[:, c * k + dominant]
                lo, hi = {"inlier": (5, 45), "mid": (65, 70), "far": (110, 140)}[kind]
                angle = float(torch.empty(()).uniform_(lo, hi, generator=gen))
            a = math.radians(angle)
            noise = 0.02 * torch.randn(dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
            rows.append((math.cos(a) * u + math.sin(a) * v + noise) * (1 + 3 * torch.rand((), generator=gen)))
            labels.append(c)
            kinds.append(kind)
    for _ in range(4):
        rows.append(torch.randn(dim, generator=gen, dtype=torch.float64))
        labels.append(-100)
        kinds.append("ignored")
    perm = torch.randperm(len(rows), generator=gen)
    x = torch.stack(rows)[perm]
    labels = torch.tensor(labels)[perm]
    kinds = [kinds[i] for i in perm.tolist()]
    at_75 = {i for i, kind in enumerate(kinds) if kind in ("minority", "far")}
    at_60 = at_75 | {i for i, kind in enumerate(kinds) if kind == "mid"}
    return w, x, labels, {60: at_60, 75: at_75}


@pytest.mark.parametrize("threshold", [60, 75])
def test_get_outliers_matches_pml(threshold):
    w, x, labels, planted = outlier_data()
    ours, pml = pml_pair("SubCenterArcFaceLoss", 6, w.shape[0], sub_centers=3)
    with torch.no_grad():
        pml.W.copy_(w)
        ours.W.copy_(w)
    outliers, dominant = ours.get_outliers(x, labels, threshold=threshold)
    pml_outliers, pml_dominant = pml.get_outliers(x, labels, threshold=threshold)

    assert 0 < len(outliers) < (labels >= 0).sum(), "some rows must be outliers and some not"
    assert set(outliers.tolist()) == planted[threshold], "the planted outliers, no more, no fewer"
    assert outliers.dtype == torch.int64
    assert outliers.tolist() == pml_outliers.tolist(), "same indices in the same order as PML"
    present = labels[labels >= 0].unique()
    assert present.tolist() == [0, 1, 2, 3, 4]
    assert dominant.shape == pml_dominant.shape == (w.shape[0], 6)
    # PML leaves absent classes' columns uninitialised; ours are zeros.
    assert_close("dominant_centers", dominant[:, present], pml_dominant[:, present], FP64_RTOL)
    assert torch.equal(dominant[:, 5], torch.zeros(w.shape[0], dtype=torch.float64))
    # The dominant center is c % 3 by construction, which rules out "always sub-center 0".
    for c in present.tolist():
        assert torch.equal(dominant[:, c], w[:, c * 3 + c % 3]), f"class {c}: wrong dominant sub-center"


def test_get_outliers_without_dominant_centers_returns_the_tensor():
    """PML 2.9 returns (outliers, dominant_centers) even for return_dominant_centers=False
    (`outliers if not r else outliers, d` parses as a tuple): a PML bug. Returning just the
    tensor is fastmargin's deliberate fix."""
    w, x, labels, planted = outlier_data()
    ours, pml = pml_pair("SubCenterArcFaceLoss", 6, w.shape[0], sub_centers=3)
    with torch.no_grad():
        pml.W.copy_(w)
        ours.W.copy_(w)
    outliers = ours.get_outliers(x, labels, threshold=75, return_dominant_centers=False)
    assert isinstance(outliers, torch.Tensor)
    pml_result = pml.get_outliers(x, labels, threshold=75, return_dominant_centers=False)
    pml_outliers = pml_result[0] if isinstance(pml_result, tuple) else pml_result
    assert outliers.tolist() == pml_outliers.tolist()
    assert set(outliers.tolist()) == planted[75]


# -------------------------------------------------------------------------------------------
# 4. state_dict, W, init.

STATE_CASES = [
    pytest.param("ArcFaceLoss", {}, id="arcface"),
    pytest.param("CosFaceLoss", {}, id="cosface"),
    pytest.param("SphereFaceLoss", {}, id="sphereface"),
    pytest.param("SubCenterArcFaceLoss", dict(sub_centers=3), id="subcenter-k3"),
]


@pytest.mark.parametrize("name,kwargs", STATE_CASES)
def test_state_dict_round_trips_with_pml(name, kwargs):
    num_classes, dim = 11, 6
    k = kwargs.get("sub_centers", 1)
    pml = getattr(pml_losses(), name)(num_classes=num_classes, embedding_size=dim, **kwargs)
    ours = DROP_INS[name](num_classes=num_classes, embedding_size=dim, **kwargs)
    assert isinstance(ours.W, torch.nn.Parameter)
    assert ours.W.shape == pml.W.shape == (dim, num_classes * k)
    assert list(ours.state_dict()) == ["W"]

    ours.load_state_dict(pml.state_dict(), strict=True)
    assert torch.equal(ours.W, pml.W)

    with torch.no_grad():
        ours.W.mul_(-2.0)
    pml.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(pml.W, ours.W)


@pytest.mark.parametrize("name", list(DROP_INS))
def test_reassigned_w_is_used(name):
    num_classes, dim, batch = 9, 5, 13
    k = 3 if name == "SubCenterArcFaceLoss" else 1
    loss = DROP_INS[name](num_classes=num_classes, embedding_size=dim)
    gen = torch.Generator().manual_seed(0)
    new_w = torch.randn(dim, num_classes * k, generator=gen)
    loss.W = torch.nn.Parameter(new_w.clone())
    assert isinstance(loss.W, torch.nn.Parameter) and "W" in dict(loss.named_parameters())
    x = torch.randn(batch, dim, generator=gen)
    labels = make_labels(batch, num_classes)
    got = loss(x, labels)
    margin = loss.current_margin()
    expected = fastmargin.margin_cross_entropy(
        x, new_w.t(), labels, scale=loss.scale, m2=margin.m2, m3=margin.m3,
        sphere_m=margin.sphere_m, sub_centers=k,
    )
    assert_close("loss", got, expected, 1e-6)
    got.backward()
    assert loss.W.grad is not None and loss.W.grad.shape == (dim, num_classes * k)


@pytest.mark.parametrize("name", list(DROP_INS))
def test_default_init_is_standard_normal(name):
    """PML initialises W with torch.nn.init.normal_: mean 0, std 1. On 256k entries the
    sample mean and std are within ~0.002 and ~0.0014 of that; xavier or N(0, 0.01) fail."""
    torch.manual_seed(0)
    w = DROP_INS[name](num_classes=1000, embedding_size=256).W.detach()
    assert abs(float(w.mean())) < 0.01, f"mean {float(w.mean())}"
    assert abs(float(w.std()) - 1.0) < 0.01, f"std {float(w.std())}"


def test_combined_margin_init_is_partial_fc_normal():
    """CombinedMarginLoss.weight (num_classes, embedding_size) ~ N(0, 0.01), as PartialFC."""
    torch.manual_seed(0)
    w = CombinedMarginLoss(num_classes=1000, embedding_size=256).weight.detach()
    assert w.shape == (1000, 256)
    assert abs(float(w.mean())) < 1e-3, f"mean {float(w.mean())}"
    assert abs(float(w.std()) - 0.01) < 1e-3, f"std {float(w.std())}"


# -------------------------------------------------------------------------------------------
# 5. PML's constructor and forward surface.

def small_module_and_batch(name):
    loss = DROP_INS[name](num_classes=4, embedding_size=3)
    return loss, torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 1])


@pytest.mark.parametrize("name", list(DROP_INS))
def test_forward_without_labels_raises(name):
    loss, x, _ = small_module_and_batch(name)
    with pytest.raises(ValueError, match="labels"):
        loss(x)


@pytest.mark.parametrize("name", list(DROP_INS))
def test_indices_tuple_raises_naming_miner(name):
    loss, x, labels = small_module_and_batch(name)
    indices_tuple = (torch.tensor([0]), torch.tensor([4]), torch.tensor([1]))
    with pytest.raises(ValueError, match="miner"):
        loss(x, labels, indices_tuple)


@pytest.mark.parametrize("name", list(DROP_INS))
def test_ref_emb_raises(name):
    loss, x, labels = small_module_and_batch(name)
    with pytest.raises(ValueError, match="ref_emb"):
        loss(x, labels, ref_emb=x.clone())


@pytest.mark.parametrize("name", list(DROP_INS))
def test_positional_construction_matches_pml_defaults(name):
    """ours(10, 8) is (num_classes=10, embedding_size=8) with PML's default margin and scale.
    (PML's SubCenterArcFaceLoss itself needs keywords; ours accepts both.)"""
    ours = DROP_INS[name](10, 8)
    pml = getattr(pml_losses(), name)(num_classes=10, embedding_size=8)
    assert ours.W.shape == pml.W.shape
    assert ours.num_classes == pml.num_classes == 10
    assert ours.scale == pml.scale
    margin = ours.current_margin()
    ours_margin = {"ArcFaceLoss": margin.m2, "SubCenterArcFaceLoss": margin.m2,
                   "CosFaceLoss": margin.m3, "SphereFaceLoss": margin.sphere_m}[name]
    assert ours_margin == pytest.approx(float(pml.margin), rel=1e-12)
    assert ours.margin == pytest.approx(float(pml.margin), rel=1e-12), "the attribute in PML's units"


# -------------------------------------------------------------------------------------------
# 6. dtype policy. The PML drop-ins move W in place to the embeddings' dtype outside
# autocast, as PML does (tests/test_pml_compat.py holds them to PML). CombinedMarginLoss
# casts its weight out of place, so the parameter (and its optimizer state) keeps its dtype.
# Under autocast every module uses its weight as it is and returns the fp32 loss.

MODULE_FACTORIES = [
    pytest.param(lambda: ArcFaceLoss(num_classes=9, embedding_size=16), id="arcface"),
    pytest.param(lambda: CosFaceLoss(num_classes=9, embedding_size=16), id="cosface"),
    pytest.param(lambda: SphereFaceLoss(num_classes=9, embedding_size=16), id="sphereface"),
    pytest.param(lambda: SubCenterArcFaceLoss(num_classes=9, embedding_size=16), id="subcenter"),
    pytest.param(lambda: CombinedMarginLoss(num_classes=9, embedding_size=16), id="combined"),
]


def weight_of(module):
    return module.weight if isinstance(module, CombinedMarginLoss) else module.W


def functional_weight(module, weight):
    """The (C*K, D) view of a module's weight that margin_cross_entropy takes."""
    return weight if isinstance(module, CombinedMarginLoss) else weight.t()


def functional_loss(module, x, weight, labels):
    margin = module.current_margin()
    return fastmargin.margin_cross_entropy(
        x, functional_weight(module, weight), labels, scale=module.scale, m1=margin.m1, m2=margin.m2,
        m3=margin.m3, sphere_m=margin.sphere_m, sub_centers=module.sub_centers, backend="reference",
    )


def batch_for_dtype_tests(dtype):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(13, 16, generator=gen).to(dtype), make_labels(13, 9)


COMBINED_ONLY = [f for f in MODULE_FACTORIES if f.id == "combined"]


@pytest.mark.parametrize("factory", COMBINED_ONLY)
def test_float64_embeddings_with_float32_module(factory):
    torch.manual_seed(0)
    module = factory()
    weight = weight_of(module)
    before, ptr = weight.detach().clone(), weight.data_ptr()
    x, labels = batch_for_dtype_tests(torch.float64)
    loss = module(x, labels)
    assert loss.dtype == torch.float64
    assert_close("loss", loss, functional_loss(module, x, before.double(), labels), 1e-12)
    loss.backward()
    assert weight.dtype == torch.float32 and weight.data_ptr() == ptr
    assert torch.equal(weight.detach(), before)
    assert weight.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("factory", COMBINED_ONLY)
def test_half_embeddings_outside_autocast(factory, dtype, rtol):
    """The loss comes back in the embeddings' dtype (computed in fp32 inside, on the weight
    rounded to that dtype out of place); the weight keeps float32 and its storage."""
    torch.manual_seed(0)
    module = factory()
    weight = weight_of(module)
    before, ptr = weight.detach().clone(), weight.data_ptr()
    x, labels = batch_for_dtype_tests(dtype)
    x.requires_grad_()
    loss = module(x, labels)
    assert loss.dtype == dtype
    expected = functional_loss(module, x.detach().float(), before.to(dtype).float(), labels)
    assert_close("loss", loss, expected, rtol)
    loss.backward()
    assert weight.dtype == torch.float32 and weight.data_ptr() == ptr
    assert torch.equal(weight.detach(), before)
    assert weight.grad.dtype == torch.float32 and x.grad.dtype == dtype


@pytest.mark.parametrize("factory", MODULE_FACTORIES)
def test_bf16_autocast(factory):
    torch.manual_seed(0)
    module = factory()
    weight = weight_of(module)
    before, ptr = weight.detach().clone(), weight.data_ptr()
    x, labels = batch_for_dtype_tests(torch.bfloat16)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(x, labels)
    assert loss.dtype == torch.float32
    assert weight.dtype == torch.float32 and weight.data_ptr() == ptr
    assert torch.equal(weight.detach(), before), "forward modified W"
    # Under autocast the fp32 W is used as it is: the loss is the fp32 one of the bf16 inputs.
    assert_close("loss", loss, functional_loss(module, x.detach().float(), before, labels), 1e-5)
    loss.backward()
    assert weight.dtype == torch.float32 and weight.data_ptr() == ptr
    assert torch.equal(weight.detach(), before), "backward modified W"
    assert weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


# -------------------------------------------------------------------------------------------
# 7. SphereFace annealing.

def annealed_reference(module, x, labels, lam):
    return fastmargin.margin_cross_entropy(
        x, module.W.t(), labels, scale=module.scale, sphere_m=module.current_margin().sphere_m,
        sphere_lambda=lam,
    )


def test_sphereface_annealing_counter_and_lambda():
    torch.manual_seed(0)
    module = SphereFaceLoss(num_classes=11, embedding_size=6, margin=4, scale=1, annealing=True).double()
    assert set(module.state_dict()) == {"W", "iteration"}
    assert int(module.iteration) == 0 and module.iteration.dtype == torch.int64
    labels = make_labels(17, 11)
    x = make_batch(module.W.t(), labels)

    first = module(x, labels).detach()  # computed at iteration 0, lambda = 1000
    assert int(module.iteration) == 1
    assert_close("loss at iteration 0", first, annealed_reference(module, x, labels, 1000.0), 1e-12)

    module.eval()
    module(x, labels)
    assert int(module.iteration) == 1, "an eval-mode forward must not advance the counter"
    module.train()
    for _ in range(9):
        module(x, labels)
    assert int(module.iteration) == 10
    tenth = module(x, labels).detach()  # lambda = 1000 / (1 + 0.12 * 10)
    assert int(module.iteration) == 11
    expected = annealed_reference(module, x, labels, 1000.0 / (1 + 1.2))
    assert_close("loss at iteration 10", tenth, expected, 1e-12)
    assert abs(float(tenth) - float(first)) > 1e-3 * abs(float(first)), "lambda must change the loss"

    restored = SphereFaceLoss(num_classes=11, embedding_size=6, margin=4, scale=1, annealing=True).double()
    state = module.state_dict()
    state["iteration"] = torch.tensor(10)
    restored.load_state_dict(state, strict=True)
    assert int(restored.iteration) == 10
    restored.eval()
    assert_close("loss after loading iteration 10", restored(x, labels), expected, 1e-12)


def test_sphereface_without_annealing_state_dict_is_only_w():
    module = SphereFaceLoss(num_classes=11, embedding_size=6)
    assert list(module.state_dict()) == ["W"]
    assert not hasattr(module, "iteration")


# -------------------------------------------------------------------------------------------
# 8. CombinedMarginLoss against insightface-style code written from the math.

def insightface_cos_and_target(x, weight, labels):
    cos = F.linear(F.normalize(x), F.normalize(weight))
    return cos, cos.gather(1, labels[:, None])


def insightface_arcface_classic(x, weight, labels, s, m):
    """insightface's classic ArcFace (recognition/arcface_torch before the rewrite):
    phi = cos*cos_m - sin*sin_m where cos > cos(pi - m), else cos - sin(pi - m)*m."""
    cos, target = insightface_cos_and_target(x, weight, labels)
    sine = torch.sqrt((1.0 - target * target).clamp(0, 1))
    phi = target * math.cos(m) - sine * math.sin(m)
    phi = torch.where(target > math.cos(math.pi - m), phi, target - math.sin(math.pi - m) * m)
    return F.cross_entropy(cos.scatter(1, labels[:, None], phi) * s, labels)


def combined_margin_reference(x, weight, labels, s, m1, m2, m3):
    """cos(m1*theta + m2) - m3 on the target column; the caller keeps m1*theta + m2 < pi."""
    cos, target = insightface_cos_and_target(x, weight, labels)
    angle = m1 * torch.acos(target) + m2
    assert (angle < math.pi).all(), "the reference is only the first branch"
    phi = torch.cos(angle) - m3
    return F.cross_entropy(cos.scatter(1, labels[:, None], phi) * s, labels)


def arcface_torch_detached(x, weight, labels, s, m2):
    """insightface arcface_torch's CombinedMarginLoss ArcFace branch: arccos, + m2 on the
    target, cos, all in place under no_grad, so the gradient flows as if no margin."""
    logits, _ = insightface_cos_and_target(x, weight, labels)
    index = torch.arange(len(labels))
    target_logit = logits[index, labels]
    with torch.no_grad():
        target_logit.arccos_()
        logits.arccos_()
        logits[index, labels] = target_logit + m2
        logits.cos_()
    return F.cross_entropy(logits * s, labels)


COMBINED_CASES = [
    pytest.param(dict(m1=1.0, m2=0.5, m3=0.0), insightface_arcface_classic, "linspace", id="arcface-classic"),
    pytest.param(dict(m1=1.0, m2=0.0, m3=0.4), None, (-2.5, 2.5), id="cosface"),
    pytest.param(dict(m1=1.0, m2=0.3, m3=0.2), None, (-1.5, 2.5), id="combined-m1-1.0"),
    pytest.param(dict(m1=0.9, m2=0.3, m3=0.2), None, (-2.5, 2.5), id="combined-m1-0.9"),
    # insightface raises for m1 != 1 with m3 = 0, or any m1 = 2; ours computes it.
    pytest.param(dict(m1=2.0, m2=0.0, m3=0.0), None, (1.5, 3.0), id="m1-2"),
    pytest.param(dict(m1=2.0, m2=0.1, m3=0.1), None, (1.5, 3.0), id="m1-2-m2-m3"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("margins,reference,align", COMBINED_CASES)
def test_combined_margin_matches_insightface(margins, reference, align, shape):
    batch, dim, num_classes = shape
    s = 64.0
    torch.manual_seed(0)
    module = CombinedMarginLoss(s, **margins, num_classes=num_classes, embedding_size=dim).double()
    ref_weight = module.weight.detach().clone().requires_grad_()
    labels = make_labels(batch, num_classes)
    x = make_batch(module.weight, labels, align=torch.linspace(-3.0, 2.5, batch) if align == "linspace" else align)
    if reference is insightface_arcface_classic:
        target = (F.normalize(x) @ F.normalize(ref_weight.detach()).t()).gather(1, labels[:, None])
        beyond = target <= math.cos(math.pi - margins["m2"])
        assert beyond.any() and not beyond.all(), "the data must reach both branches"
        ref = lambda e: reference(e, ref_weight, labels, s, margins["m2"])  # noqa: E731
    else:
        ref = lambda e: combined_margin_reference(e, ref_weight, labels, s, **margins)  # noqa: E731
    assert_loss_and_grads_match(lambda e: module(e, labels), module.weight, ref, ref_weight, x, 1e-10)
    assert torch.isfinite(module.weight.grad).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m2", [0.3, 0.5])
def test_combined_margin_detached_matches_arcface_torch(m2, shape):
    batch, dim, num_classes = shape
    s = 64.0
    torch.manual_seed(0)
    module = CombinedMarginLoss(s, 1.0, m2, 0.0, num_classes=num_classes, embedding_size=dim,
                                grad_mode="detached").double()
    ref_weight = module.weight.detach().clone().requires_grad_()
    labels = make_labels(batch, num_classes)
    # arcface_torch has no fallback branch: keep theta + m2 below pi.
    x = make_batch(module.weight, labels, align=(-1.0, 2.5))
    target = (F.normalize(x) @ F.normalize(ref_weight.detach()).t()).gather(1, labels[:, None])
    assert (torch.acos(target) + m2 < math.pi).all()
    assert_loss_and_grads_match(lambda e: module(e, labels), module.weight,
                                lambda e: arcface_torch_detached(e, ref_weight, labels, s, m2), ref_weight,
                                x, 1e-10)
