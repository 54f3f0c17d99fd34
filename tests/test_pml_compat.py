"""The pytorch-metric-learning drop-ins held to PML 2.x itself (the installed package), on the
same W, in float16, float32 and float64 on the CPU: loss, d/d embeddings, d/d W, W's dtype,
device and storage after the call (PML's cast_types moves W in place), get_logits,
get_outliers, PML's helpers, the `margin` attribute in PML's units and its assignment,
PML's reducers and regularizers composed over our per-row losses, collect_stats, and
autocast (W left alone, the loss fp32: what PML's fix for its AMP bug meant).

One tolerance rule (assert_as_close_as_pml): PML's float64 computation on the same rounded
inputs is the exact value; ours may be off it, in max norm over the tensor, by twice PML's
own same-dtype error plus a floor of
  - eps(dtype): the result is rounded once into the dtype (ours computes half inputs in
    fp32 and rounds at the end), and
  - FLOOR_ULPS eps of the compute dtype (fp32 for half, else the dtype): the fused backend
    sums its D- and C*K-term dot products in another order than PML's matmul (sqrt(303)
    ~ 17 eps), and ArcFace's psi' = sin(theta + m) / sin(theta) magnifies a cosine's
    error; measured up to 52 eps (float64 sub-center dx), where PML's own error is 0.
Both relative to max |exact|. PML on the CPU runs in float16 (torch has fp16 CPU matmuls);
its fp16 errors are 2-10 eps(fp16) here, ours 0.1-0.5.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import fastmargin

pytest.importorskip("pytorch_metric_learning", reason="pytorch-metric-learning not installed")
from pytorch_metric_learning import distances, reducers, regularizers  # noqa: E402
from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning.utils import common_functions as pml_c_f  # noqa: E402
from test_modules import outlier_data  # noqa: E402

# PML 2.9 builds SphereFace's binomials through a numpy call that numpy 2 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")

B, D, C = 37, 67, 101  # ragged, small enough for PML's float16 on a CPU
FLOOR_ULPS = 128
DTYPES = [pytest.param(t, id=str(t).removeprefix("torch.")) for t in (torch.float16, torch.float32, torch.float64)]
CASES = {  # name -> constructor keywords beyond num_classes and embedding_size
    "ArcFaceLoss": dict(margin=28.6, scale=64),
    "CosFaceLoss": dict(margin=0.35, scale=64),
    "SphereFaceLoss": dict(margin=4, scale=2.5),
    "SubCenterArcFaceLoss": dict(sub_centers=3),
}
NAMES = list(CASES)


def assert_as_close_as_pml(what, ours, pml, exact, dtype):
    """|ours - exact| <= 2 |pml - exact| + floor, max norms (module docstring)."""
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    assert ours.dtype == pml.dtype, f"{what}: dtype {ours.dtype}, PML's {pml.dtype}"
    assert ours.shape == pml.shape == exact.shape, f"{what}: shapes {ours.shape}, {pml.shape}, {exact.shape}"
    ours, pml, exact = ours.detach().double(), pml.detach().double(), exact.detach().double()
    size = exact.abs().max().item()
    floor = (torch.finfo(dtype).eps + FLOOR_ULPS * torch.finfo(compute).eps) * size
    ours_err = (ours - exact).abs()
    pml_err = (pml - exact).abs().max().item()
    worst = int(ours_err.flatten().argmax())
    assert ours_err.max().item() <= 2 * pml_err + floor, (
        f"{what} ({dtype}): error {ours_err.max().item():.3g} > 2 x PML's {pml_err:.3g} + floor {floor:.3g}, "
        f"at flat index {worst}: ours {ours.flatten()[worst].item()!r}, PML {pml.flatten()[worst].item()!r}, "
        f"exact {exact.flatten()[worst].item()!r}")


def make_pair(name, dtype=None, **kwargs):
    """(ours, PML's), ours holding PML's float32 W."""
    kwargs = {**CASES[name], **kwargs}
    torch.manual_seed(0)
    pml = getattr(pml_losses, name)(num_classes=C, embedding_size=D, **kwargs)
    ours = getattr(fastmargin, name)(num_classes=C, embedding_size=D, **kwargs)
    ours.load_state_dict(pml.state_dict(), strict=True)
    return ours, pml


def exact_copy(name, pml, **kwargs):
    """PML's module in float64 holding `pml`'s W as it is now (rounded to its dtype)."""
    exact = getattr(pml_losses, name)(num_classes=C, embedding_size=D, **{**CASES[name], **kwargs})
    exact.W.data = pml.W.detach().double().clone()
    return exact


def batch(name, w, seed=1):
    """x (B, D) float64 whose target cosines spread over (-1, 1) (both ArcFace branches,
    several SphereFace k), labels (B,). w is PML's W (D, C*K)."""
    gen = torch.Generator().manual_seed(seed)
    k = CASES[name].get("sub_centers", 1)
    labels = torch.randint(0, C, (B,), generator=gen)
    pick = torch.randint(0, k, (B,), generator=gen)
    direction = F.normalize(w.detach().t().double(), dim=1)[labels * k + pick]
    coef = torch.empty(B, 1, dtype=torch.float64).uniform_(-2.5, 2.5, generator=gen)
    x = torch.randn(B, D, generator=gen, dtype=torch.float64) + coef * math.sqrt(D) * direction
    return x, labels


def run(module, x, labels):
    """(loss, d/dx, d/dW) of module(x, labels).sum() for x a fresh leaf."""
    x = x.detach().clone().requires_grad_()
    loss = module(x, labels)
    loss.backward()
    return loss.detach(), x.grad, module.W.grad


# -------------------------------------------------------------------------------------------
# 1. Loss, gradients and W's dtype, device and values after the call.

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_loss_and_gradients_match_pml(name, dtype):
    ours, pml = make_pair(name)
    x, labels = batch(name, pml.W)
    x = x.to(dtype)
    pml_out = run(pml, x, labels)
    exact_out = run(exact_copy(name, pml), x.double(), labels)
    ours_out = run(ours, x, labels)
    for what, a, p, e in zip(("loss", "d/d embeddings", "d/d W"), ours_out, pml_out, exact_out):
        assert_as_close_as_pml(f"{name} {what}", a, p, e, dtype)
    assert ours.W.dtype == pml.W.dtype == dtype and ours.W.device == pml.W.device == x.device
    assert torch.equal(ours.W.detach(), pml.W.detach()), "W rounded into the dtype as PML's"


def test_w_follows_the_embeddings_in_place_as_pml():
    """The Parameter stays (an optimizer's reference to it too); its data is replaced when
    the dtype changes and kept, storage and all, when it does not."""
    ours, pml = make_pair("ArcFaceLoss")
    x, labels = batch("ArcFaceLoss", pml.W)
    param = ours.W
    optimizer = torch.optim.SGD(ours.parameters(), lr=0.1)
    for dtype in (torch.float16, torch.float64, torch.float32):
        ours(x.to(dtype), labels)
        pml(x.to(dtype), labels)
        assert ours.W is param and optimizer.param_groups[0]["params"][0] is param
        assert ours.W.dtype == pml.W.dtype == dtype
        assert torch.equal(ours.W.detach(), pml.W.detach()), f"after {dtype}: W differs from PML's"
    ptr, version, before = ours.W.data_ptr(), ours.W._version, ours.W.detach().clone()
    ours(x.float(), labels).backward()
    assert ours.W.data_ptr() == ptr and ours.W._version == version, "an unchanged dtype must not copy W"
    optimizer.step()
    assert not torch.equal(ours.W.detach(), before), "the optimizer steps the same Parameter"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to move W between devices")
def test_w_follows_the_embeddings_device_as_pml():
    ours, pml = make_pair("CosFaceLoss")
    x, labels = batch("CosFaceLoss", pml.W)
    x = x.float().cuda()
    pml_out = run(pml, x, labels)  # labels stay on the CPU: both move them
    ours_out = run(ours, x, labels)
    exact_out = run(exact_copy("CosFaceLoss", pml), x.double(), labels)
    assert ours.W.device == pml.W.device == x.device
    for what, a, p, e in zip(("loss", "d/d embeddings", "d/d W"), ours_out, pml_out, exact_out):
        assert_as_close_as_pml(f"cuda {what}", a.cpu(), p.cpu(), e.cpu(), torch.float32)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", NAMES)
def test_autocast_leaves_w_alone_and_the_loss_is_fp32(name, half):
    """Under autocast W keeps dtype, storage and version, and the loss is PML's fp32 loss of
    the same half-precision embeddings (PML's own check asks CUDA's autocast only, so on a
    CPU it still casts W to the half dtype: not compared)."""
    ours, pml = make_pair(name)
    x, labels = batch(name, pml.W)
    x = x.to(half)
    ptr, version = ours.W.data_ptr(), ours.W._version
    with torch.autocast("cpu", dtype=half):
        ours_out = run(ours, x, labels)
    assert ours_out[0].dtype == torch.float32 and ours.W.dtype == torch.float32
    assert ours.W.data_ptr() == ptr and ours.W._version == version, "autocast must leave W alone"
    assert ours_out[1].dtype == half and ours_out[2].dtype == torch.float32
    pml_out = run(pml, x.float(), labels)
    exact_out = run(exact_copy(name, pml), x.double(), labels)
    # d/d embeddings comes back in their half dtype: one more rounding, eps(half), in its floor.
    for what, a, p, e, rounded_to in zip(("loss", "d/d embeddings", "d/d W"), ours_out, pml_out, exact_out,
                                         (torch.float32, half, torch.float32)):
        assert_as_close_as_pml(f"{name} autocast {what}", a.to(p.dtype), p, e, rounded_to)


# -------------------------------------------------------------------------------------------
# 2. get_logits, get_outliers, the helpers, `margin`.

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_get_logits_matches_pml(name, dtype):
    ours, pml = make_pair(name)
    x, labels = batch(name, pml.W)
    x = x.to(dtype)
    pml.cast_types(dtype, x.device)  # PML's get_logits needs W in the embeddings' dtype already
    exact = exact_copy(name, pml)
    ours.cast_types(dtype, x.device)
    assert_as_close_as_pml(f"{name} get_logits", ours.get_logits(x), pml.get_logits(x),
                           exact.get_logits(x.double()), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [60, 75])
def test_get_outliers_matches_pml(threshold, dtype):
    """The planted data's angles sit 5 degrees or more from either threshold: no rounding
    moves a row across it, in any dtype."""
    w, x, labels, planted = outlier_data()
    kwargs = dict(num_classes=6, embedding_size=w.shape[0], sub_centers=3)
    pml = pml_losses.SubCenterArcFaceLoss(**kwargs)
    ours = fastmargin.SubCenterArcFaceLoss(**kwargs)
    pml.W.data, ours.W.data = w.float().clone(), w.float().clone()
    keep = labels >= 0  # PML has no ignore_index
    x, labels = x[keep].to(dtype), labels[keep]
    outliers, dominant = ours.get_outliers(x, labels, threshold=threshold)
    pml_outliers, pml_dominant = pml.get_outliers(x, labels, threshold=threshold)
    assert outliers.tolist() == pml_outliers.tolist()
    assert ours.W.dtype == pml.W.dtype == dtype, "get_outliers casts W as PML's does"
    present = labels.unique()
    assert torch.equal(dominant[:, present], pml_dominant[:, present])
    assert dominant.dtype == pml_dominant.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_helpers_match_pml(name, dtype):
    """get_cosine, get_angles, get_target_mask, modify_cosine_of_target_classes (value and
    gradient), scale_logits, cast_types, on PML's own intermediate values."""
    ours, pml = make_pair(name)
    x, labels = batch(name, pml.W)
    x = x.to(dtype)
    for module in (ours, pml):
        module.cast_types(dtype, "cpu")
    assert ours.W.dtype == pml.W.dtype == dtype and torch.equal(ours.W.detach(), pml.W.detach())
    exact = exact_copy(name, pml)
    cos = pml.get_cosine(x)
    assert_as_close_as_pml("get_cosine", ours.get_cosine(x), cos, exact.get_cosine(x.double()), dtype)
    mask = ours.get_target_mask(x, labels)
    assert torch.equal(mask, pml.get_target_mask(x, labels)) and mask.dtype == dtype
    target = cos.detach()[mask == 1]
    assert_as_close_as_pml("get_angles", ours.get_angles(target), pml.get_angles(target),
                           exact.get_angles(target.double()), dtype)
    modified = []
    for module, t in ((ours, target), (pml, target), (exact, target.double())):
        t = t.clone().requires_grad_()
        value = module.modify_cosine_of_target_classes(t)
        value.sum().backward()
        modified.append((value, t.grad))
    for i, what in enumerate(("modify_cosine_of_target_classes", "its gradient")):
        assert_as_close_as_pml(what, modified[0][i], modified[1][i], modified[2][i], dtype)
    assert_as_close_as_pml("scale_logits", ours.scale_logits(cos, x), pml.scale_logits(cos, x),
                           exact.scale_logits(cos.double(), x.double()), dtype)


# PML's attribute after construction, a new value in the same units, and whether PML's own
# assignment takes effect (SphereFace's binomials are computed once, in its constructor).
MARGIN_ASSIGNMENTS = {
    "ArcFaceLoss": (math.radians(28.6), 0.3, True),
    "CosFaceLoss": (0.35, 0.2, True),
    "SphereFaceLoss": (4, 3, False),
    "SubCenterArcFaceLoss": (math.radians(28.6), 0.3, True),
}


@pytest.mark.parametrize("name", NAMES)
def test_margin_attribute_is_pmls_and_assignable(name):
    ours, pml = make_pair(name)
    built, new, pml_assignment_works = MARGIN_ASSIGNMENTS[name]
    assert ours.margin == pytest.approx(float(pml.margin), rel=1e-15) == built
    assert "margin" in ours._record_these
    x, labels = batch(name, pml.W)
    ours.margin = new
    assert ours.margin == new
    if pml_assignment_works:
        pml.margin = new
        reference = pml
    else:  # PML built anew with the margin
        fresh_ours, reference = make_pair(name, margin=new)
        assert ours.current_margin() == fresh_ours.current_margin()
    for what, a, p in zip(("loss", "d/d embeddings", "d/d W"), run(ours, x, labels), run(reference, x, labels)):
        assert_as_close_as_pml(f"{name} after margin = {new}: {what}", a, p, p, torch.float64)


# -------------------------------------------------------------------------------------------
# 3. PML's reducers, regularizers and collect_stats, composed over our per-row losses.

def gap_threshold(values, low_quantile, high_quantile):
    """The midpoint of the widest gap between consecutive sorted values in a quantile range:
    a threshold that no rounding of the values moves a value across."""
    v = values.sort().values
    lo, hi = int(low_quantile * len(v)), int(high_quantile * len(v))
    gaps = v[lo + 1 : hi + 1] - v[lo:hi]
    i = lo + int(gaps.argmax())
    return float((v[i] + v[i + 1]) / 2)


@functools.cache  # the same for every test: computed once (callers only read it)
def per_row_losses(name):
    """(B,) PML's float64 per-row losses of `name` on batch(name)."""
    _, pml = make_pair(name, reducer=reducers.DoNothingReducer())
    x, labels = batch(name, pml.W)
    return exact_copy(name, pml, reducer=reducers.DoNothingReducer())(x, labels)["loss"]["losses"].detach()


def reducer_cases():
    rows = per_row_losses("ArcFaceLoss")
    low, high = gap_threshold(rows, 0.2, 0.5), gap_threshold(rows, 0.5, 0.8)
    weights = torch.linspace(0.5, 2.0, C)
    return {
        "mean": reducers.MeanReducer(),
        "sum": reducers.SumReducer(),
        "avg-non-zero": reducers.AvgNonZeroReducer(),
        "threshold-low": reducers.ThresholdReducer(low=low),
        "threshold-high": reducers.ThresholdReducer(high=high),
        "threshold-both": reducers.ThresholdReducer(low=low, high=high),
        "class-weighted": reducers.ClassWeightedReducer(weights),
        "multiple": reducers.MultipleReducers({"loss": reducers.ThresholdReducer(low=low)}),
    }


REDUCERS = ["mean", "sum", "avg-non-zero", "threshold-low", "threshold-high", "threshold-both", "class-weighted",
            "multiple"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reducer", REDUCERS)
def test_reducers_match_pml(reducer, dtype):
    kwargs = dict(reducer=reducer_cases()[reducer])
    ours, pml = make_pair("ArcFaceLoss", **kwargs)
    x, labels = batch("ArcFaceLoss", pml.W)
    x = x.to(dtype)
    pml_out = run(pml, x, labels)
    exact_out = run(exact_copy("ArcFaceLoss", pml, **kwargs), x.double(), labels)
    ours_out = run(ours, x, labels)
    for what, a, p, e in zip(("loss", "d/d embeddings", "d/d W"), ours_out, pml_out, exact_out):
        assert_as_close_as_pml(f"{reducer} {what}", a, p, e, dtype)


@pytest.mark.parametrize("name", NAMES)
def test_do_nothing_reducer_gives_pmls_loss_dict(name):
    ours, pml = make_pair(name, reducer=reducers.DoNothingReducer())
    x, labels = batch(name, pml.W)
    got, want = ours(x, labels), pml(x, labels)
    assert list(got) == list(want) == ["loss"]
    assert got["loss"]["reduction_type"] == want["loss"]["reduction_type"] == "element"
    assert torch.equal(got["loss"]["indices"], want["loss"]["indices"])
    p = want["loss"]["losses"]
    assert_as_close_as_pml("per-row losses", got["loss"]["losses"], p, p, torch.float64)


def regularizer_cases():
    return {
        "weight-regularface": dict(weight_regularizer=regularizers.RegularFaceRegularizer(), weight_reg_weight=0.5),
        "both-lp": dict(weight_regularizer=regularizers.LpRegularizer(), weight_reg_weight=0.1,
                        embedding_regularizer=regularizers.LpRegularizer(p=1), embedding_reg_weight=0.01),
        "embedding-lp-threshold": dict(embedding_regularizer=regularizers.LpRegularizer(),
                                       reducer=reducers.ThresholdReducer(high=1e6)),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["weight-regularface", "both-lp", "embedding-lp-threshold"])
@pytest.mark.parametrize("name", ["ArcFaceLoss", "SubCenterArcFaceLoss"])
def test_regularizers_match_pml(name, case, dtype):
    kwargs = regularizer_cases()[case]
    ours, pml = make_pair(name, **kwargs)
    assert type(ours.reducer) is type(pml.reducer)
    assert ours._record_these == pml._record_these
    x, labels = batch(name, pml.W)
    x = x.to(dtype)
    pml_out = run(pml, x, labels)
    exact_out = run(exact_copy(name, pml, **kwargs), x.double(), labels)
    ours_out = run(ours, x, labels)
    for what, a, p, e in zip(("loss", "d/d embeddings", "d/d W"), ours_out, pml_out, exact_out):
        assert_as_close_as_pml(f"{case} {what}", a, p, e, dtype)


@pytest.mark.parametrize("with_reducer", [False, True], ids=["fused-mean", "threshold-reducer"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_collect_stats_matches_pml(name, dtype, with_reducer):
    """avg_angle (degrees), the recordable attribute lists, stats reset each forward, and a
    reducer's own stats."""
    kwargs = dict(collect_stats=True)
    if with_reducer:
        low = gap_threshold(per_row_losses(name), 0.2, 0.5)
        kwargs["reducer"] = reducers.ThresholdReducer(low=low, collect_stats=True)
    ours, pml = make_pair(name, **kwargs)
    assert ours._record_these == pml._record_these and ours._record_these_stats == pml._record_these_stats
    assert ours.avg_angle == pml.avg_angle == 0
    x, labels = batch(name, pml.W)
    x = x.to(dtype)
    ours(x, labels)
    pml(x, labels)
    exact = exact_copy(name, pml, **kwargs)
    exact(x.double(), labels)
    angles = (torch.tensor(float(m.avg_angle), dtype=torch.float64) for m in (ours, pml, exact))
    assert_as_close_as_pml("avg_angle", *angles, dtype)
    if with_reducer:
        assert ours.reducer.num_past_filter == pml.reducer.num_past_filter > 0
    ours.reset_stats()
    assert ours.avg_angle == 0


def test_collect_stats_default_follows_pmls_global(monkeypatch):
    monkeypatch.setattr(pml_c_f, "COLLECT_STATS", True)
    ours = fastmargin.ArcFaceLoss(10, 4)
    assert ours.collect_stats and ours._record_these_stats == ["avg_angle"]
    monkeypatch.setattr(pml_c_f, "COLLECT_STATS", False)
    assert not fastmargin.ArcFaceLoss(10, 4).collect_stats


@pytest.mark.parametrize("name", NAMES)
def test_cosine_distance_is_accepted(name):
    ours, pml = make_pair(name, distance=distances.CosineSimilarity())
    x, labels = batch(name, pml.W)
    p = pml(x, labels)
    assert_as_close_as_pml("loss", ours(x, labels), p, p, torch.float64)


def test_ignored_rows_are_left_out_of_the_reducer():
    """ignore_index (fastmargin's, PML has none): the reducer sees the other rows only."""
    ours, pml = make_pair("CosFaceLoss", reducer=reducers.DoNothingReducer())
    x, labels = batch("CosFaceLoss", pml.W)
    ignored = labels.clone()
    ignored[::3] = -100
    kept = ignored != -100
    got = ours(x, ignored)["loss"]
    assert torch.equal(got["indices"], kept.nonzero().flatten())
    want = pml(x, labels)["loss"]["losses"][kept]
    assert_as_close_as_pml("per-row losses", got["losses"], want, want, torch.float64)
