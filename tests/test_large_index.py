"""Shapes past 2^31 elements: B*C (the logits no backend holds) and C*K*D (the weight).

A 32-bit offset wraps past 2^31 and reads or writes the wrong row. The checks sample rows
and make the reference's answer cheap: reduction='none' with an upstream gradient that is
zero except at the sampled rows, so dW is the sampled rows' dW, which the reference computes
from those rows alone; each row's loss, lse and dx depend on that row and W only.

- CPU ('cpu' backend, -m slow): B*C = (2^16 + 1)(2^15 + 1) > 2^31 at D = 2 (~30 s on 2
  cores); C*K*D = (2^24 + 1) * 2 * 64 > 2^31 with a bfloat16 W (4.3 GB, as much for dW; ~2 min),
  zero but for a few rows at both ends (a zero row has cos = 0: each adds exp(0) to every
  row's softmax, which the reference gets from one zero row of multiplicity N, see below).
- Triton: kernels/tiles.py's class_rows, the int64 weight-row index every kernel uses, on
  class indices whose row index is past 2^31 (a unit test, under the interpreter too).
- GPU (marked gpu and slow): both shapes, both at once, and the last classes' statistics
  and dW of a W past 2^31 elements, on every fused backend that runs on CUDA tensors.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastmargin
from fastmargin import backends, reference
from fastmargin.margins import Margin
from helpers import (
    assert_close, assert_rel, gpu_backend_params, reference_bound, rounding_floors, usable_backends,
)

BIG = 2**31
NO_CPU = backends.unavailable_reason("cpu", torch.device("cpu"))


def sampled_run(backend, x, w, y, rows, **kwargs):
    """(loss, lse, dx, dW) of the fused backend with upstream 1 at `rows`, 0 elsewhere."""
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    loss, lse = fastmargin.margin_cross_entropy(x, w, y, backend=backend, reduction="none", return_lse=True, **kwargs)
    upstream = torch.zeros_like(loss)
    upstream[rows] = 1.0
    (loss * upstream).sum().backward()
    return loss.detach(), lse, x.grad, w.grad


def check_rows_times_classes(backend, device, tol):
    B, C, D = (1 << 16) + 1, (1 << 15) + 1, 2
    assert B * C > BIG
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g).to(device)
    w = torch.randn(C, D, generator=g).to(device)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    y[-1] = C - 1
    rows = torch.tensor([0, 1, B // 2, B - 2, B - 1], device=device)
    kwargs = dict(m2=0.5, label_smoothing=0.1)
    loss, lse, dx, dw = sampled_run(backend, x, w, y, rows, **kwargs)
    xr = x[rows].double().requires_grad_(True)
    wr = w.double().requires_grad_(True)
    want, want_lse = reference.reference_loss(xr, wr, y[rows], Margin(m2=0.5), 64.0, label_smoothing=0.1,
                                                    reduction="none")
    want.sum().backward()
    # STYLE's bound: 4 x the error of the reference in fp32 (at D = 2 many cosines are near
    # +-1, where ArcFace's psi' is large), plus the rounding floor of that conditioning
    # (helpers.rounding_floors, so that the bound holds whatever BLAS the reference ran on),
    # plus tol.
    x32, w32 = x[rows].cpu().requires_grad_(True), w.cpu().requires_grad_(True)
    same, same_lse = reference.reference_loss(x32, w32, y[rows].cpu(), Margin(m2=0.5), 64.0,
                                                    label_smoothing=0.1, reduction="none")
    same.sum().backward()
    floors = rounding_floors(x[rows], w, y[rows], dict(m2=0.5, label_smoothing=0.1, reduction="none"),
                             torch.ones(len(rows)), dtype=torch.float32)
    for label, a, b, c in (("loss", loss[rows], same, want), ("lse", lse[rows], same_lse, want_lse),
                           ("dx", dx[rows], x32.grad, xr.grad), ("dW", dw, w32.grad, wr.grad)):
        reference_bound(a, b, c, 4, floors[label], f"{backend} B*C > 2^31: {label} of rows {rows.tolist()}", tol=tol)
    others = torch.ones(B, dtype=torch.bool, device=device)
    others[rows] = False
    assert_close(dx[others].abs().max(), 0.0, atol=0.0, what=f"{backend}: dx of rows with no upstream gradient")


def check_weight_elements(backend, device, tol, C, K, D):
    """W (C*K, D) past 2^31 elements, bfloat16 (float16 would overflow the zero rows'
    gradient, s / NORM_EPS, to inf), zero but for rows at both ends. The reference
    runs on the live rows plus one zero row whose logit's exp is counted N times: with
    N zero rows (cos = 0, logit 0) the softmax gains N exp(0) = exp(log N), a constant column
    of logit log N. dW of a zero row is the same for every zero row: the one zero row's."""
    assert C * K * D > BIG
    g = torch.Generator().manual_seed(1)
    live = torch.tensor([0, 1, C * K - 3, C * K - 2, C * K - 1])  # the last ones sit past 2^31 / D
    w = torch.zeros(C * K, D, dtype=torch.bfloat16, device=device)
    w[live.to(device)] = torch.randn(len(live), D, generator=g).bfloat16().to(device)
    x = torch.randn(3, D, generator=g).to(device)
    y = torch.tensor([C - 1, 0, C - 2], device=device)  # classes of the live rows at the end and start
    loss, lse, dx, dw = sampled_run(backend, x, w, y, [0, 1, 2], m2=0.5, sub_centers=K)

    # The reference on a small W: the live rows (whole classes, K rows each: the dead
    # sub-center of class 0 and of the last classes is zero) and one zero class.
    classes = sorted({int(r) // K for r in live})
    small = torch.cat([w[c * K:(c + 1) * K].double().cpu() for c in classes] + [torch.zeros(K, D, dtype=torch.float64)])
    small.requires_grad_(True)
    xs = x.double().cpu().requires_grad_(True)
    index = {c: i for i, c in enumerate(classes)}
    ys = torch.tensor([index[int(c)] for c in y.cpu()])
    z = reference.margin_logits(xs, small, ys, Margin(m2=0.5), 64.0, K)
    zero_classes = C - len(classes)
    z = torch.cat([z[:, :-1], z[:, -1:] + math.log(zero_classes)], dim=1)  # N zero classes, logit 0 each
    want = torch.logsumexp(z, dim=1) - z.gather(1, ys.unsqueeze(1)).squeeze(1)
    want.sum().backward()
    assert_rel(loss, want, tol, f"{backend} C*K*D > 2^31: loss")
    assert_rel(dx, xs.grad, tol, f"{backend} C*K*D > 2^31: dx")
    for i, c in enumerate(classes):
        assert_rel(dw[c * K:(c + 1) * K].float(), small.grad[i * K:(i + 1) * K], 1e-2,
                   f"{backend} C*K*D > 2^31: dW of class {c}")  # bf16 dW
    zero_grad = small.grad[-K:] / zero_classes  # the one zero class stood for all of them
    for r in (K, C * K // 2, C * K - 3 * K):  # rows of zero classes: 1, C/2 and C - 3
        assert_rel(dw[r].float(), zero_grad[r % K], 1e-2, f"{backend} C*K*D > 2^31: dW of zero row {r}")


@pytest.mark.slow
@pytest.mark.skipif(NO_CPU is not None, reason=f"cpp kernels not built: {NO_CPU}")
def test_cpu_rows_times_classes_past_2_31():
    check_rows_times_classes("cpu", torch.device("cpu"), 1e-5)


@pytest.mark.slow
@pytest.mark.skipif(NO_CPU is not None, reason=f"cpp kernels not built: {NO_CPU}")
def test_cpu_weight_elements_past_2_31():
    check_weight_elements("cpu", torch.device("cpu"), 1e-4, C=(1 << 24) + 1, K=2, D=64)


if backends.unavailable_reason("triton") is None:
    import triton
    import triton.language as tl

    from fastmargin.kernels.tiles import class_rows

    @triton.jit
    def _class_rows_kernel(out_ptr, valid_ptr, c0, C, K, BLOCK_C: tl.constexpr, K_PAD: tl.constexpr):
        rows, valid = class_rows(c0, C, K, BLOCK_C, K_PAD)
        n = tl.arange(0, BLOCK_C * K_PAD)
        tl.store(out_ptr + n, rows)
        tl.store(valid_ptr + n, valid.to(tl.int8))


@pytest.mark.skipif(backends.unavailable_reason("triton") is not None,
                    reason=f"triton: {backends.unavailable_reason('triton')}")
@pytest.mark.parametrize("K", [1, 3, 4])
def test_triton_class_rows_are_int64_past_2_31(K):
    """tiles.class_rows gives weight rows c*K + k as int64 for classes whose rows pass 2^31
    (a 32-bit product would wrap negative), and masks the padded sub-centers and classes >= C."""
    import triton
    device = [d for n, d in usable_backends() if n == "triton"][0]
    k_pad, block_c = triton.next_power_of_2(K), 8
    C = (BIG // K) + 5  # c0 .. c0 + 7 straddle C, every row index past 2^31 - K
    c0 = C - 4
    out = torch.zeros(block_c * k_pad, dtype=torch.int64, device=device)
    valid = torch.zeros(block_c * k_pad, dtype=torch.int8, device=device)
    _class_rows_kernel[(1,)](out, valid, c0, C, K, BLOCK_C=block_c, K_PAD=k_pad)
    n = torch.arange(block_c * k_pad)
    cls, sub = c0 + n // k_pad, n % k_pad
    want_valid = (cls < C) & (sub < K)
    assert torch.equal(valid.cpu().bool(), want_valid), f"valid {valid.tolist()}"
    assert torch.equal(out.cpu()[want_valid], (cls * K + sub)[want_valid]), f"rows {out.tolist()}"
    assert out.cpu()[want_valid].min() > BIG - K


def check_statistics_past_2_31(backend):
    """B*C and C*D past 2^31 elements at once (int64 offsets in every kernel): B = 4100 rows
    against C = 2^19 + 3 classes of D = 4096 (W: 2.1e9 bf16 elements); the statistics of
    every 997th row against the reference, their targets among the last classes, where
    32-bit offsets would wrap."""
    B, C, D = 4100, (1 << 19) + 3, 4096
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, D, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randn(C, D, device="cuda", generator=g).to(torch.bfloat16)
    assert B * C > BIG and C * D > BIG
    y = torch.arange(B, device="cuda") + C - B  # targets among the last classes
    lse, z_target, z_sum = backends.implementation(backend)(x, w, y, Margin(m2=0.5), 64.0)
    rows = torch.arange(0, B, 997, device="cuda")
    want = reference.row_statistics(x[rows].double(), w.double(), y[rows], Margin(m2=0.5), 64.0)
    for label, a, b in zip(("lse", "z_target", "z_sum"), (lse[rows], z_target[rows], z_sum[rows]), want):
        assert_rel(a, b, 1e-3, f"{backend} B*C, C*D > 2^31: {label}")


def check_last_classes(backend):
    """C*D past 2^31 elements (W: 2^31 + 5 * 1024 bf16 elements): the statistics and the dW
    rows of the last classes, at the end of W where 32-bit offsets would wrap, against the
    reference on those classes (in fp32: W in fp64 would take 17 GB)."""
    B, C, D = 64, (1 << 21) + 5, 1024
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, D, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randn(C, D, device="cuda", generator=g).to(torch.bfloat16)
    assert C * D > BIG
    y = torch.arange(B, device="cuda") + C - B  # targets among the last classes
    x.requires_grad_(True)
    w.requires_grad_(True)
    lse, z_target, z_sum = backends.implementation(backend)(x, w, y, Margin(m2=0.5), 64.0)
    (lse - z_target).sum().backward()
    w_head = w.detach()[: C - B].float()
    w_tail = w.detach()[C - B:].float().requires_grad_(True)
    want = reference.row_statistics(x.detach().float(), torch.cat([w_head, w_tail]), y, Margin(m2=0.5), 64.0)
    for label, a, b in zip(("lse", "z_target", "z_sum"), (lse, z_target, z_sum), want):
        assert_rel(a.detach(), b, 1e-3, f"{backend} C*D > 2^31: {label}")
    (want[0] - want[1]).sum().backward()  # dW of the last classes, the end of W
    assert_rel(w.grad[C - B:].float(), w_tail.grad, 2e-2, f"{backend} C*D > 2^31: dW of the last classes")


@pytest.mark.slow
@pytest.mark.parametrize("backend", gpu_backend_params())
def test_gpu_past_2_31(backend):
    """Every fused backend compiled for the GPU (marked gpu; each skips, saying why, where it
    does not run on CUDA tensors): B*C past 2^31 (sampled rows), C*K*D past 2^31 (a W zero
    but for rows at both ends), both at once (B = 4100, C = 2^19 + 3, D = 4096), and the
    statistics and dW of the last classes of a W of 2^31 + bf16 elements."""
    device = torch.device("cuda")
    check_rows_times_classes(backend, device, 1e-3)  # tf32 dots
    check_weight_elements(backend, device, 1e-2, C=(1 << 20) + 1, K=2, D=1024)
    check_statistics_past_2_31(backend)
    check_last_classes(backend)
