"""Bad input: every row of the table in docs/errors.md raises the exception it names with the
message excerpt it quotes, on every usable backend (the checks run before dispatch), and
every case here has its row there. Then the NaN/inf policy: not checked (a check would cost
a device sync), propagated as torch.nn.functional.cross_entropy propagates it.

The table's rows are read from docs/errors.md: | `case` | input | exception | `excerpt` | what to do |.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

import fastmargin
from fastmargin import BackendUnavailableError
from fastmargin.distributed import LOCAL, PartialFC
from helpers import assert_close, usable_backends

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
ALL = [pytest.param(name, device, id=name) for name, device in usable_backends()]


def good(device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g)
    w = torch.randn(5, 3, generator=g)
    return x.to(device), w.to(device), torch.tensor([0, 1, 2, 4], device=device)


def functional(backend, device, x=None, w=None, y=None, **kwargs):
    gx, gw, gy = good(device)
    return fastmargin.margin_cross_entropy(gx if x is None else x, gw if w is None else w,
                                           gy if y is None else y, backend=backend, **kwargs)


def compiled_out_of_range(backend, device):
    torch._dynamo.reset()
    f = torch.compile(lambda x, w, y: fastmargin.margin_cross_entropy(x, w, y, backend=backend), fullgraph=True)
    x, w, _ = good(device)
    return f(x, w, torch.tensor([0, 1, 7, 3], device=device))


def set_margin(loss, value):
    loss.margin = value


def without_pml(call):
    """call() with pytorch-metric-learning unimportable, as where it is not installed."""
    hidden = {name: None for name in ("pytorch_metric_learning", "pytorch_metric_learning.reducers",
                                      "pytorch_metric_learning.distances")}
    with mock.patch.dict(sys.modules, hidden):
        return call()


def pml_distance(name):
    return getattr(pytest.importorskip("pytorch_metric_learning.distances"), name)()


# case -> (call(backend, device), exception). The message excerpts live in docs/errors.md.
CASES = {
    "embeddings-not-a-tensor": (lambda b, d: functional(b, d, x=[[1.0, 2.0, 3.0]] * 4), TypeError),
    "embeddings-integer": (lambda b, d: functional(b, d, x=torch.ones(4, 3, dtype=torch.int64, device=d)), TypeError),
    "weight-integer": (lambda b, d: functional(b, d, w=torch.ones(5, 3, dtype=torch.int32, device=d)), TypeError),
    "embeddings-sparse": (lambda b, d: functional(b, d, x=good(d)[0].to_sparse()), TypeError),
    "embeddings-not-2d": (lambda b, d: functional(b, d, x=torch.randn(12, device=d)), ValueError),
    "weight-not-2d": (lambda b, d: functional(b, d, w=torch.randn(5, device=d)), ValueError),
    "dim-mismatch": (lambda b, d: functional(b, d, w=torch.randn(5, 4, device=d)), ValueError),
    "weight-pml-layout": (lambda b, d: functional(b, d, w=torch.randn(3, 5, device=d)), ValueError),
    "module-dim-mismatch": (lambda b, d: fastmargin.ArcFaceLoss(10, 16, backend=b).to(d)(
        torch.randn(4, 8, device=d), torch.tensor([0, 1, 2, 3], device=d)), ValueError),
    "dim-zero": (lambda b, d: functional(b, d, x=torch.randn(4, 0, device=d), w=torch.randn(5, 0, device=d)), ValueError),
    "no-classes": (lambda b, d: functional(b, d, w=torch.randn(0, 3, device=d)), ValueError),
    "rows-not-multiple-of-K": (lambda b, d: functional(b, d, sub_centers=2), ValueError),
    "K-below-1": (lambda b, d: functional(b, d, sub_centers=0), ValueError),
    "module-K-below-1": (lambda b, d: fastmargin.SubCenterArcFaceLoss(10, 16, sub_centers=0, backend=b), ValueError),
    "labels-not-a-tensor": (lambda b, d: functional(b, d, y=[0, 1, 2, 3]), TypeError),
    "labels-float": (lambda b, d: functional(b, d, y=torch.zeros(4, device=d)), TypeError),
    "labels-wrong-shape": (lambda b, d: functional(b, d, y=torch.zeros(3, dtype=torch.long, device=d)), ValueError),
    "label-too-large": (lambda b, d: functional(b, d, y=torch.tensor([0, 5, 1, 2], device=d)), ValueError),
    "label-negative": (lambda b, d: functional(b, d, y=torch.tensor([0, 1, -3, 2], device=d)), ValueError),
    "label-out-of-range-compiled": (compiled_out_of_range, RuntimeError),
    "devices-differ": (lambda b, d: functional(b, d, w=torch.randn(5, 3, device="meta")), ValueError),
    "meta-tensors": (lambda b, d: fastmargin.margin_cross_entropy(*(t.to("meta") for t in good()), backend=b), ValueError),
    "backend-unknown": (lambda b, d: functional("gpu", d), ValueError),
    "backend-unavailable": (lambda b, d: functional("cuda", "cpu"), BackendUnavailableError),
    "scale": (lambda b, d: functional(b, d, scale=0.0), ValueError),
    "margin-out-of-range": (lambda b, d: functional(b, d, m2=4.0), ValueError),
    "sphereface-with-m2": (lambda b, d: functional(b, d, sphere_m=4, m2=0.5), ValueError),
    "row-margin-shape": (lambda b, d: functional(b, d, m2=torch.full((3,), 0.5, device=d)), ValueError),
    "row-margin-range": (lambda b, d: functional(b, d, m3=torch.tensor([0.1, 0.2, 2.5, 0.0], device=d)),
                         ValueError),
    "two-nontarget-transforms": (lambda b, d: functional(b, d, m2=0.5, curricular_t=0.1, filter_threshold=0.3),
                                 ValueError),
    "label-smoothing": (lambda b, d: functional(b, d, label_smoothing=1.0), ValueError),
    "reduction": (lambda b, d: functional(b, d, reduction="avg"), ValueError),
    "chunk-size": (lambda b, d: functional(b, d, chunk_size=0), ValueError),
    "module-no-labels": (lambda b, d: fastmargin.CosFaceLoss(10, 3, backend=b).to(d)(good(d)[0]), ValueError),
    "module-miner": (lambda b, d: fastmargin.CosFaceLoss(10, 3, backend=b).to(d)(
        good(d)[0], good(d)[2], indices_tuple=(0, 1, 2)), ValueError),
    "module-embeddings-not-a-tensor": (lambda b, d: fastmargin.CosFaceLoss(10, 3, backend=b).to(d)(
        good()[0].numpy(), good(d)[2]), TypeError),
    "module-labels-not-a-tensor": (lambda b, d: fastmargin.CosFaceLoss(10, 3, backend=b).to(d)(
        good(d)[0], [0, 1, 2, 3]), TypeError),
    "module-unknown-option": (lambda b, d: fastmargin.ArcFaceLoss(10, 16, bakend=b), TypeError),
    "module-backend-unknown": (lambda b, d: fastmargin.ArcFaceLoss(10, 16, backend="cpp"), ValueError),
    "module-margin-degrees": (lambda b, d: fastmargin.ArcFaceLoss(10, 16, margin=180, backend=b), ValueError),
    "module-margin-attribute-radians": (lambda b, d: set_margin(fastmargin.ArcFaceLoss(10, 16, backend=b), 28.6),
                                        ValueError),
    "module-cosface-margin": (lambda b, d: fastmargin.CosFaceLoss(10, 16, margin=3, backend=b), ValueError),
    "module-sphereface-margin": (lambda b, d: fastmargin.SphereFaceLoss(10, 16, margin=0, backend=b), ValueError),
    "partialfc-dim-mismatch": (lambda b, d: PartialFC(10, 16, group=LOCAL, backend=b).to(d)(
        torch.randn(4, 8, device=d), torch.tensor([0, 1, 2, 3], device=d)), ValueError),
    "get-outliers-dim-mismatch": (lambda b, d: fastmargin.SubCenterArcFaceLoss(10, 16, backend=b).to(d).get_outliers(
        torch.randn(4, 8, device=d), torch.tensor([0, 1, 2, 3], device=d)), ValueError),
    "module-distance-not-cosine": (lambda b, d: fastmargin.ArcFaceLoss(10, 16, distance=pml_distance("LpDistance")),
                                   TypeError),
    "module-pml-part-not-callable": (lambda b, d: fastmargin.ArcFaceLoss(10, 16, reducer=object()), TypeError),
    "module-pml-missing": (lambda b, d: without_pml(lambda: fastmargin.ArcFaceLoss(
        10, 16, weight_regularizer=lambda w: w.pow(2).sum())), ImportError),
    "module-reducer-with-reduction": (lambda b, d: fastmargin.ArcFaceLoss(
        10, 16, reducer=lambda loss_dict, embeddings, labels: 0, reduction="sum"), ValueError),
}


def table():
    """{case: (exception name, excerpt)} from docs/errors.md's bad-input table."""
    rows = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"\|\s*`([\w-]+)`\s*\|(.*?)\|\s*`?(\w+)`?\s*\|\s*`(.+?)`\s*\|(.*)\|\s*$", line)
        if match:
            rows[match.group(1)] = (match.group(3), match.group(4))
    return rows


def test_every_case_is_documented_and_every_row_tested():
    rows = table()
    assert set(rows) == set(CASES), (f"in docs/errors.md, not here: {sorted(set(rows) - set(CASES))}; "
                                     f"here, not in docs/errors.md: {sorted(set(CASES) - set(rows))}")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend, device", ALL)
def test_bad_input_raises_what_the_table_says(backend, device, case):
    if case == "label-out-of-range-compiled" and backend != "reference":
        pytest.skip("one compile is enough: the check runs before dispatch")
    call, error = CASES[case]
    name, excerpt = table()[case]
    assert error.__name__ == name, f"{case}: docs/errors.md says {name}, the test expects {error.__name__}"
    with pytest.raises(error) as info:
        call(backend, device)
    assert excerpt in str(info.value), f"{case}: {excerpt!r} is not in the message {str(info.value)!r}"


# ---------------------------------------------------------------- NaN and inf propagate


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("backend, device", ALL)
def test_non_finite_embedding_poisons_its_row(backend, device, value):
    """A NaN or inf in row 2 of the embeddings (inf / ||x|| = inf / inf is NaN): that row's
    loss, lse and dx are NaN, every dW row that it reaches too; the other rows' loss and dx
    are finite and unchanged; 'mean' and 'sum' are NaN."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(10, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (6,), generator=g)
    clean = fastmargin.margin_cross_entropy(x, w, y, m2=0.5, reduction="none", backend="reference")
    x[2, 1] = value
    xd = x.to(device).requires_grad_(True)
    loss, lse = fastmargin.margin_cross_entropy(xd, w.to(device), y.to(device), m2=0.5, reduction="none",
                                                backend=backend, return_lse=True)
    loss.sum().backward()
    loss, lse, dx = loss.detach().cpu(), lse.cpu(), xd.grad.cpu()
    assert torch.isnan(loss[2]) and torch.isnan(lse[2]) and torch.isnan(dx[2]).all(), \
        f"{backend}: row 2 loss {loss[2]}, lse {lse[2]}, dx {dx[2].tolist()}"
    others = [0, 1, 3, 4, 5]
    assert_close(loss[others], clean[others], atol=1e-10, what=f"{backend}: the other rows' loss")
    assert torch.isfinite(dx[others]).all(), f"{backend}: the other rows' dx {dx[others]}"
    for reduction in ("mean", "sum"):
        total = fastmargin.margin_cross_entropy(x.to(device), w.to(device), y.to(device), m2=0.5,
                                                reduction=reduction, backend=backend)
        assert torch.isnan(total), f"{backend}: {reduction} is {total.item()}"


@pytest.mark.parametrize("backend, device", ALL)
def test_non_finite_weight_poisons_every_row(backend, device):
    """A NaN in one class row of W: every row's loss is NaN (it is in every softmax)."""
    x, w, y = (t.double() if t.is_floating_point() else t for t in good())
    w[3, 0] = math.nan
    loss = fastmargin.margin_cross_entropy(x.to(device), w.to(device), y.to(device), m2=0.5, reduction="none",
                                           backend=backend)
    assert torch.isnan(loss).all(), f"{backend}: {loss.tolist()}"
