"""fastmargin.margin_cross_entropy: agreement with the oracle, backend dispatch and its errors,
and the input checks (fastmargin.checks), each error asserted by its message."""

import math
import os
import re

import pytest
import torch

import fastmargin
from fastmargin import BACKENDS, BackendUnavailableError, backends, reference
from fastmargin.margins import Margin

from helpers import assert_close
CPU = torch.device("cpu")


def inputs(B=6, C=5, D=4, K=1, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    w = torch.randn(C * K, D, generator=g, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=g)
    return x, w, y


MARGIN_FIELDS = ("m1", "m2", "m3", "sphere_m", "sphere_lambda", "theta_policy", "grad_mode")

# (functional kwargs); split into Margin fields and reference arguments in the test.
CONFIGS = [
    pytest.param(dict(m2=0.5), id="arcface"),
    pytest.param(dict(m3=0.35, reduction="sum"), id="cosface-sum"),
    pytest.param(dict(m1=1.2, m2=0.3, m3=0.2, theta_policy="clamp", grad_mode="detached"), id="combined-clamp-detached"),
    pytest.param(dict(sphere_m=4, sphere_lambda=5.0, scale=2.0), id="sphere"),
    pytest.param(dict(m2=0.5, sub_centers=3, label_smoothing=0.1, ignore_index=-1, reduction="none"), id="subcenter-all-options"),
]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("kwargs", CONFIGS)
def test_matches_reference(kwargs, backend, dtype, tol):
    K = kwargs.get("sub_centers", 1)
    x, w, y = inputs(B=7, C=5, D=4, K=K, dtype=dtype)
    y[3] = kwargs.get("ignore_index", -100)
    margin = Margin(**{k: v for k, v in kwargs.items() if k in MARGIN_FIELDS})
    ref_args = {k: v for k, v in kwargs.items() if k not in MARGIN_FIELDS and k != "scale"}
    scale = kwargs.get("scale", 64.0)

    x1, w1 = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss, lse = fastmargin.margin_cross_entropy(x1, w1, y, **kwargs, backend=backend, return_lse=True)
    x2, w2 = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    want, want_lse = reference.reference_loss(x2, w2, y, margin, scale, **ref_args)

    assert lse.shape == (7,)
    assert loss.dtype == dtype and loss.shape == want.shape
    assert_close(loss, want, atol=tol, rtol=tol, what="loss")
    assert_close(lse, want_lse, atol=tol, rtol=tol, what="lse")
    loss.sum().backward()
    want.sum().backward()
    assert_close(x1.grad, x2.grad, atol=tol, rtol=tol, what="d loss / d x")
    assert_close(w1.grad, w2.grad, atol=tol, rtol=tol, what="d loss / d W")


def test_return_lse_false_returns_the_loss_only():
    x, w, y = inputs()
    out = fastmargin.margin_cross_entropy(x, w, y, m2=0.5)
    assert isinstance(out, torch.Tensor) and out.shape == ()
    loss, lse = fastmargin.margin_cross_entropy(x, w, y, m2=0.5, return_lse=True)
    assert_close(out, loss, atol=0.0, what="loss with and without return_lse")
    assert lse.shape == (6,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_float32_loss(dtype):
    x, w, y = inputs(dtype=torch.float32)
    loss = fastmargin.margin_cross_entropy(x.to(dtype), w.to(dtype), y, m2=0.5)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int16])
def test_narrow_integer_labels(label_dtype):
    x, w, y = inputs()
    y[2] = -100
    results = []
    for labels in (y, y.to(label_dtype)):
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = fastmargin.margin_cross_entropy(xg, wg, labels, m2=0.5, label_smoothing=0.1, reduction="none")
        loss.sum().backward()
        results.append((loss, xg.grad, wg.grad))
    for name, a, b in zip(("loss", "d/dx", "d/dW"), results[1], results[0]):
        assert_close(a, b, atol=0.0, what=f"{label_dtype} labels vs int64: {name}")


# ---------------------------------------------------------------- backends


def test_auto_picks_a_usable_backend():
    chosen = backends.select("auto", CPU)
    assert chosen in BACKENDS
    assert backends.unavailable_reason(chosen, CPU) is None
    # 'auto' takes the first usable backend in AUTO_ORDER for the device type
    first = next(b for b in backends.AUTO_ORDER["cpu"] if backends.unavailable_reason(b, CPU) is None)
    assert chosen == first


def test_reference_is_always_available():
    assert backends.unavailable_reason("reference") is None
    assert backends.unavailable_reason("reference", CPU) is None
    assert backends.select("reference", CPU) == "reference"


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_gpu_backend_with_cpu_tensors_raises(name):
    if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("under TRITON_INTERPRET=1 (tests/conftest.py) Triton's kernels run on CPU tensors")
    x, w, y = inputs()
    usable = [b for b in BACKENDS if backends.unavailable_reason(b, CPU) is None]
    assert name not in usable
    with pytest.raises(BackendUnavailableError) as info:
        fastmargin.margin_cross_entropy(x, w, y, m2=0.5, backend=name)
    message = str(info.value)
    assert re.search(rf"backend '{name}'.*cuda tensors.*on cpu", message), message
    assert f"Usable here: {usable}" in message, message


def test_triton_runs_on_cpu_tensors_when_interpreted():
    """Under the interpreter (TRITON_INTERPRET=1 at import, tests/conftest.py without a GPU)
    'triton' takes CPU tensors, and 'auto' still picks the CPU kernel for them."""
    from fastmargin.kernels import launch

    reason = backends.unavailable_reason("triton", CPU)
    assert (reason is None) == launch.INTERPRET, reason
    assert backends.select("auto", CPU) != "triton"


def test_unknown_backend_lists_the_names():
    x, w, y = inputs()
    with pytest.raises(ValueError) as info:
        fastmargin.margin_cross_entropy(x, w, y, m2=0.5, backend="tpu")
    message = str(info.value)
    assert "'tpu'" in message
    for name in (*BACKENDS, "auto"):
        assert f"'{name}'" in message, f"{name!r} missing from: {message}"


def test_cpu_backend_consistent_with_unavailable_reason():
    """Stays right when the fused CPU kernel lands: whatever unavailable_reason('cpu') says,
    naming 'cpu' either works (and matches the reference) or raises with that reason."""
    x, w, y = inputs()
    reason = backends.unavailable_reason("cpu", CPU)
    if reason is None:
        assert backends.select("cpu", CPU) == "cpu"
        got = fastmargin.margin_cross_entropy(x, w, y, m2=0.5, backend="cpu")
        want, _ = reference.reference_loss(x, w, y, Margin(m2=0.5), 64.0)
        assert_close(got, want, atol=1e-9, rtol=1e-9, what="cpu backend vs reference")
    else:
        with pytest.raises(BackendUnavailableError, match=re.escape(reason)):
            fastmargin.margin_cross_entropy(x, w, y, m2=0.5, backend="cpu")
        assert backends.select("auto", CPU) != "cpu"


# ---------------------------------------------------------------- input checks


def call(x=None, w=None, y=None, **kwargs):
    bx, bw, by = inputs(B=4, C=5, D=3, dtype=torch.float32)
    fastmargin.margin_cross_entropy(
        bx if x is None else x, bw if w is None else w, by if y is None else y, **kwargs
    )


BAD_INPUTS = [
    # (id, call arguments, error, message fragment)
    ("embeddings-1d", dict(x=torch.randn(3)), ValueError, r"embeddings must be 2-D .* got shape \(3,\)"),
    ("embeddings-3d", dict(x=torch.randn(4, 3, 1)), ValueError, r"embeddings must be 2-D"),
    ("embeddings-not-tensor", dict(x=[[1.0, 2.0, 3.0]] * 4), TypeError, r"embeddings must be a torch.Tensor"),
    ("embeddings-int", dict(x=torch.ones(4, 3, dtype=torch.int64)), TypeError, r"embeddings has dtype torch.int64"),
    ("weight-int", dict(w=torch.ones(5, 3, dtype=torch.int32)), TypeError, r"weight has dtype torch.int32"),
    ("weight-1d", dict(w=torch.randn(5)), ValueError, r"weight must be 2-D"),
    ("dim-mismatch", dict(w=torch.randn(5, 4)), ValueError,
     r"weight has shape \(5, 4\) but embeddings have dim 3: weight must be \(num_classes \* sub_centers, 3\)$"),
    ("dim-mismatch-transposed", dict(w=torch.randn(3, 5)), ValueError, r"is passed as W\.t\(\)"),
    ("zero-classes", dict(w=torch.randn(0, 3)), ValueError, r"weight has 0 rows"),
    ("rows-not-multiple", dict(w=torch.randn(5, 3), sub_centers=2), ValueError,
     r"weight has 5 rows, not a positive multiple of sub_centers=2"),
    ("sub-centers-0", dict(sub_centers=0), ValueError, r"sub_centers must be an integer >= 1, got 0"),
    ("sub-centers-float", dict(sub_centers=1.5), ValueError, r"sub_centers must be an integer >= 1, got 1\.5"),
    ("sub-centers-bool", dict(sub_centers=True), ValueError, r"sub_centers must be an integer >= 1, got True"),
    ("labels-float", dict(y=torch.zeros(4)), TypeError, r"labels must be an integer tensor .* torch\.float32"),
    ("labels-bool", dict(y=torch.zeros(4, dtype=torch.bool)), TypeError, r"labels must be an integer tensor .* torch\.bool"),
    ("labels-list", dict(y=[0, 1, 2, 3]), TypeError, r"labels must be a torch\.Tensor"),
    ("labels-short", dict(y=torch.zeros(3, dtype=torch.int64)), ValueError, r"labels must have shape \(4,\).* got \(3,\)"),
    ("labels-2d", dict(y=torch.zeros(4, 1, dtype=torch.int64)), ValueError, r"labels must have shape \(4,\).* got \(4, 1\)"),
    ("labels-negative", dict(y=torch.tensor([0, 1, -3, 2])), ValueError,
     r"labels\[2\] = -3 is outside \[0, 5\) and is not ignore_index=-100"),
    ("labels-too-big", dict(y=torch.tensor([0, 5, 1, 2])), ValueError, r"labels\[1\] = 5 is outside \[0, 5\)"),
    ("labels-negative-ignore-other", dict(y=torch.tensor([0, 1, 2, -100]), ignore_index=-1), ValueError,
     r"labels\[3\] = -100 is outside \[0, 5\) and is not ignore_index=-1"),
    ("labels-too-big-subcenters", dict(w=torch.randn(10, 3), sub_centers=2, y=torch.tensor([0, 1, 9, 2])), ValueError,
     r"labels\[2\] = 9 is outside \[0, 5\)"),
    ("weight-on-meta", dict(w=torch.randn(5, 3, device="meta")), ValueError,
     r"weight \(meta\) .* must be on one device"),
    ("embeddings-on-meta", dict(x=torch.randn(4, 3, device="meta")), ValueError,
     r"embeddings \(meta\), weight \(cpu\) and labels \(cpu\) must be on one device"),
    ("labels-on-meta", dict(y=torch.zeros(4, dtype=torch.int64, device="meta")), ValueError,
     r"labels \(meta\) must be on one device"),
    ("scale-inf", dict(scale=math.inf), ValueError, r"scale=inf: the logit scale s must be finite and > 0"),
    ("scale-nan", dict(scale=math.nan), ValueError, r"scale=nan"),
    ("scale-zero", dict(scale=0.0), ValueError, r"scale=0\.0: .* > 0"),
    ("scale-negative", dict(scale=-64.0), ValueError, r"scale=-64\.0"),
    ("scale-string", dict(scale="64"), TypeError, r"scale must be a real number, got str"),
    ("smoothing-negative", dict(label_smoothing=-0.1), ValueError, r"label_smoothing=-0\.1 must be a number in \[0, 1\)"),
    ("smoothing-one", dict(label_smoothing=1.0), ValueError, r"label_smoothing=1\.0"),
    ("smoothing-nan", dict(label_smoothing=math.nan), ValueError, r"label_smoothing=nan"),
    ("reduction", dict(reduction="avg"), ValueError, r"reduction='avg': use one of \('mean', 'sum', 'none'\)"),
    ("ignore-index-float", dict(ignore_index=-100.0), TypeError, r"ignore_index must be an int"),
    ("m2-below-minus-pi", dict(m2=-3.2), ValueError, r"m2=-3\.2 is out of range: .* in \(-pi, pi\)"),
    ("m2-inf", dict(m2=math.inf), ValueError, r"m2=inf is out of range"),
    ("m1-zero", dict(m1=0.0), ValueError, r"m1=0\.0 is out of range"),
    ("m3-big", dict(m3=3.0), ValueError, r"m3=3\.0 is out of range"),
    ("sphere-with-m2", dict(sphere_m=4, m2=0.5), ValueError, r"sphere_m\) cannot be combined"),
    ("sphere-lambda-alone", dict(sphere_lambda=5.0), ValueError, r"sphere_lambda applies to SphereFace only"),
    ("theta-policy", dict(theta_policy="wrap"), ValueError, r"theta_policy='wrap'"),
    ("grad-mode", dict(grad_mode="stop"), ValueError, r"grad_mode='stop'"),
    ("m2-rows-2d", dict(m2=torch.full((4, 1), 0.5)), ValueError, r"m2: a per-row margin is a 1-D floating tensor"),
    ("m2-rows-int", dict(m2=torch.zeros(4, dtype=torch.int64)), ValueError, r"m2: a per-row margin is a 1-D"),
    ("m2-rows-length", dict(m2=torch.full((3,), 0.5)), ValueError, r"m2: a per-row margin must be \(4,\)"),
    ("m3-rows-range", dict(m3=torch.tensor([0.1, 0.2, 2.5, 0.0])), ValueError,
     r"m3 has values outside its range: .*\[-2, 2\]; its extremes are 0\.0 and 2\.5"),
    ("m2-rows-nan", dict(m2=torch.tensor([0.1, math.nan, 0.2, 0.0])), ValueError, r"m2 has values outside its range"),
    ("two-nontarget-transforms", dict(m2=0.5, curricular_t=0.2, filter_threshold=0.3), ValueError,
     r"curricular_t and filter_threshold each change the non-target cosines: use one of them"),
    ("filter-threshold-range", dict(filter_threshold=1.5), ValueError, r"filter_threshold=1\.5 is out of range"),
    ("sphere-easy", dict(sphere_m=4, theta_policy="easy"), ValueError, r"SphereFace \(sphere_m\) takes theta_policy"),
]


@pytest.mark.parametrize("args, error, fragment", [pytest.param(*c[1:], id=c[0]) for c in BAD_INPUTS])
def test_bad_input_raises(args, error, fragment):
    with pytest.raises(error, match=fragment):
        call(**args)


def test_dim_mismatch_hint_only_for_a_transposed_weight():
    """The W.t() hint appears when weight is (D, C), not for any other mismatch."""
    with pytest.raises(ValueError) as info:
        call(w=torch.randn(5, 4))
    assert "W.t()" not in str(info.value)
    with pytest.raises(ValueError, match=r"W\.t\(\)"):
        call(w=torch.randn(3, 5))


@pytest.mark.parametrize("ignore_index", [-100, -1, 3])
def test_ignore_index_accepted_anywhere(ignore_index):
    """ignore_index may be any int, inside [0, C) too: those rows are ignored, not errors."""
    x, w, y = inputs(B=4, C=5, D=3)
    y = torch.tensor([0, ignore_index, 4, ignore_index])
    loss = fastmargin.margin_cross_entropy(x, w, y, m2=0.5, ignore_index=ignore_index, reduction="none")
    assert_close(loss[[1, 3]], torch.zeros(2), atol=0.0, what="ignored rows")
    assert (loss[[0, 2]] > 0).all(), f"rows 0, 2 must carry a loss: {loss.tolist()}"
