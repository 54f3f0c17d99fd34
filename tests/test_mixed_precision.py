"""Mixed precision on every usable backend: torch.autocast (bfloat16, float16), a GradScaler
training step, and parameters that are never recast in place.

Under autocast a backbone hands the loss half-precision embeddings while the loss's W stays
a float32 parameter. The loss then computes in float32 (DESIGN §3) and returns float32:
- equal, within float32 rounding (1e-5 relative), to the float32 loss of the same rounded
  embeddings: nothing inside is rounded to half precision (a bf16 logit would be off by
  up to s * 2^-9 = 0.125 at s = 64);
- within a bound derived from the embeddings' rounding of the loss of the float32 pipeline:
  with delta_i = ||e_i - e32_i|| / ||e32_i|| (measured), each cosine moves by at most
  2 delta_i, each logit by at most S_i max(1, |psi'|) 2 delta_i (+ |Delta S_i| |psi| for
  SphereFace's S_i = s ||e_i||), and each row's loss, a difference of two 1-Lipschitz
  functions of the logits, by at most twice the largest logit move.
W keeps its dtype, storage and version counter through forward and backward (PML casts
W.data in place, tests/test_modules.py has the value checks); its gradient is float32.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastmargin
from fastmargin import reference
from fastmargin.margins import Margin, psi, psi_grad
from helpers import assert_close, assert_finite, usable_backends

ALL = [pytest.param(name, device, id=name) for name, device in usable_backends()]
HALF = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]

FACTORIES = {
    "arcface": lambda b: fastmargin.ArcFaceLoss(13, 16, backend=b),
    "cosface": lambda b: fastmargin.CosFaceLoss(13, 16, backend=b),
    "sphereface": lambda b: fastmargin.SphereFaceLoss(13, 16, backend=b),
    "subcenter": lambda b: fastmargin.SubCenterArcFaceLoss(13, 16, backend=b),
    "combined": lambda b: fastmargin.CombinedMarginLoss(64.0, 1.0, 0.3, 0.2, num_classes=13, embedding_size=16,
                                                         backend=b),
}


def weight_of(module):
    return module.weight if isinstance(module, fastmargin.CombinedMarginLoss) else module.W


def functional(module, embeddings, labels, backend):
    """The module's loss through fastmargin.margin_cross_entropy, on its W as it is."""
    w = weight_of(module)
    w = w if isinstance(module, fastmargin.CombinedMarginLoss) else w.t()
    m = module.current_margin()
    return fastmargin.margin_cross_entropy(
        embeddings, w, labels, scale=module.scale, m1=m.m1, m2=m.m2, m3=m.m3, sphere_m=m.sphere_m,
        sphere_lambda=m.sphere_lambda, sub_centers=module.sub_centers, backend=backend, reduction="none")


def setup(name, backend, device, seed=0):
    torch.manual_seed(seed)
    backbone = torch.nn.Linear(8, 16).to(device)
    module = FACTORIES[name](backend).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(29, 8, generator=g).to(device)
    y = torch.randint(0, 13, (29,), generator=g).to(device)
    return backbone, module, x, y


def rounding_bound(module, e_half, e32, labels):
    """Per row, the largest change of the loss that rounding e32 to e_half can cause (module doc)."""
    e_half, e32 = e_half.double(), e32.double()
    n = e32.norm(dim=1)
    delta = (e_half - e32).norm(dim=1) / n
    margin = module.current_margin()
    w = weight_of(module).detach().double()
    w = w if isinstance(module, fastmargin.CombinedMarginLoss) else w.t()
    cos = reference.cosine_logits(e32, w, module.sub_centers).gather(1, labels.unsqueeze(1)).squeeze(1)
    # psi' anywhere within 2 delta of the target cosine: at its ends and middle, and a factor 2
    probes = torch.stack([cos - 2 * delta, cos, cos + 2 * delta]).clamp(-1, 1)
    slope = 2 * psi_grad(probes, margin).abs().amax(0).clamp(min=1.0)
    scale = module.scale * (n if margin.is_sphereface else 1.0)
    move = scale * slope * 2 * delta
    if margin.is_sphereface:
        value = psi(probes, margin).abs().amax(0).clamp(min=1.0)
        move = move + module.scale * (e_half.norm(dim=1) - n).abs() * value
    return 2 * move


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("backend, device", ALL)
def test_autocast(backend, device, name, dtype):
    backbone, module, x, y = setup(name, backend, device)
    module.reduction = "none"
    w = weight_of(module)
    before, ptr, version = w.detach().clone(), w.data_ptr(), w._version
    with torch.autocast(device.type, dtype=dtype):
        e = backbone(x)
        loss = module(e, y)
    assert e.dtype == dtype, f"autocast gave the backbone's output dtype {e.dtype}"
    assert loss.dtype == torch.float32, f"{backend} {name}: loss dtype {loss.dtype} under autocast"
    loss.sum().backward()
    assert_finite(f"{backend} {name} {dtype}", loss, w.grad, backbone.weight.grad)
    assert w.dtype == torch.float32 and w.data_ptr() == ptr and w._version == version, \
        f"{backend} {name}: W was changed in place (dtype {w.dtype}, version {version} -> {w._version})"
    assert torch.equal(w.detach(), before)
    assert w.grad.dtype == torch.float32
    # accumulated in fp32: the fp32 loss of the same rounded embeddings
    want = functional(module, e.detach().float(), y, "reference")
    assert_close(loss.detach(), want.detach(), atol=1e-5 * want.abs().max().item(),
                 what=f"{backend} {name} {dtype}: autocast loss vs fp32 on the rounded embeddings")
    # against the fp32 pipeline, within the bound the embeddings' rounding allows
    with torch.no_grad():
        e32 = backbone(x)
        loss32 = functional(module, e32, y, "reference")
        bound = rounding_bound(module, e.detach(), e32, y)
    err = (loss.detach().double() - loss32.double()).abs()
    assert (err <= bound + 1e-5).all(), (
        f"{backend} {name} {dtype}: row {int((err - bound).argmax())} moved {err.max().item():.3g}, "
        f"bound from input rounding {bound[(err - bound).argmax()].item():.3g}")
    assert bound.max() < 10, f"the rounding bound {bound.max().item():.3g} is too loose to test anything"


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("backend, device", ALL)
def test_grad_scaler_step(backend, device, dtype):
    """Two training steps with torch.amp.GradScaler equal the unscaled ones: scaling the loss by
    2^10 scales every gradient exactly (a power of two), unscale_ divides it back, so W after
    the step equals the unscaled step's W within fp32 rounding; the scale stays (no inf or NaN
    found); parameters keep dtype fp32 and their storage. (GradScaler's default 2^16 overflows
    the fp16 embedding gradient of an s = 64 loss, ~2^16 s / B, and backs off by skipping
    steps, as it is meant to; 2^10 does not overflow here.)"""
    results = []
    for scaled in (True, False):
        backbone, module, x, y = setup("arcface", backend, device, seed=3)
        params = [*backbone.parameters(), *module.parameters()]
        ptrs = [p.data_ptr() for p in params]
        opt = torch.optim.SGD(params, lr=0.5, momentum=0.9)
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10, enabled=scaled)
        for _ in range(2):
            opt.zero_grad()
            with torch.autocast(device.type, dtype=dtype):
                loss = module(backbone(x), y)
            assert loss.dtype == torch.float32
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if scaled:
            assert scaler.get_scale() == 2.0**10, f"GradScaler found inf/NaN: scale {scaler.get_scale()}"
        assert all(p.dtype == torch.float32 for p in params)
        assert [p.data_ptr() for p in params] == ptrs, "a parameter was reallocated"
        results.append([p.detach().clone() for p in params])
    for i, (a, b) in enumerate(zip(*results)):
        assert_close(a, b, atol=1e-5 * b.abs().max().item(), what=f"{backend} {dtype}: parameter {i} after scaled vs unscaled steps")
    assert not torch.equal(results[0][-1], setup("arcface", backend, device, seed=3)[1].W.detach()), "W did not move"


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("backend, device", ALL)
def test_functional_half_weight_is_not_recast(backend, device, dtype):
    """The functional with a half-precision W (and fp32 x): W's values, dtype, storage and
    version counter are untouched, and its gradient comes back in W's dtype."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(11, 16, generator=g).to(device).requires_grad_(True)
    w = torch.randn(13, 16, generator=g).to(dtype).to(device).requires_grad_(True)
    y = torch.randint(0, 13, (11,), generator=g).to(device)
    before, ptr, version = w.detach().clone(), w.data_ptr(), w._version
    for autocast in (False, True):
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = fastmargin.margin_cross_entropy(x, w, y, m2=0.5, backend=backend)
        assert loss.dtype == torch.float32
        loss.backward()
    assert w.dtype == dtype and w.data_ptr() == ptr and w._version == version and torch.equal(w.detach(), before)
    assert w.grad.dtype == dtype and x.grad.dtype == torch.float32
    want = fastmargin.margin_cross_entropy(x.detach(), w.detach().float(), y, m2=0.5, backend="reference")
    assert_close(loss.detach(), want, atol=1e-5 * want.item(), what=f"{backend}: half W loss vs fp32 on its values")
