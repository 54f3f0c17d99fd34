"""No hidden host syncs in the hot path, no in-place change of a tensor the caller holds.

Host syncs. On the CPU there is no device to wait for, but the operations that would make a
GPU wait are visible: reading a tensor's value on the host (aten._local_scalar_dense: .item(),
bool(), int()), and ops whose output size depends on values (nonzero, masked_select,
unique). A TorchDispatchMode records every aten op a call runs; the documented syncs
(docs/errors.md) are the only ones:
- fastmargin.checks reads the labels once per call (the range check), on every backend;
- SphereFaceLoss(annealing=True) reads its `iteration` buffer once per forward;
- PartialFC with uneven batch sizes all-gathers them (tests/test_distributed.py).
A fused op is one node to the mode; the Triton launchers (the Python that runs on a GPU
around the kernels) are checked op by op. On a GPU, torch.cuda.set_sync_debug_mode('error')
runs a fused forward and backward.

In place. Forward and backward leave the caller's embeddings, weight, labels and upstream
gradient unchanged (values and version counters), and a backward with retain_graph=True can
run twice (gradients saved or scaled in place would break it: STYLE).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastmargin
from fastmargin import backends
from fastmargin.margins import Margin
from helpers import assert_close, geometric_inputs, op_options, usable_backends

ALL = [pytest.param(name, device, id=name) for name, device in usable_backends()]
SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique",
            "aten.equal", "aten.is_nonzero", "aten.item")


class SyncLog(TorchDispatchMode):
    """Records the aten ops that read values on the host or size outputs by values."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(SYNC_OPS):
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


def inputs(device, K=1, dtype=torch.float32):
    x, w, y = geometric_inputs(B=12, C=30, D=7, K=K, dtype=dtype, seed=12)
    y[4] = -100
    return x.to(device), w.to(device), y.to(device)


@pytest.mark.parametrize("backend, device", ALL)
def test_host_syncs_are_the_documented_ones(backend, device):
    x, w, y = inputs(device, K=2)
    x.requires_grad_(True)
    w.requires_grad_(True)
    with SyncLog() as forward:
        loss = fastmargin.margin_cross_entropy(x, w, y, m2=0.5, sub_centers=2, label_smoothing=0.1, backend=backend)
    with SyncLog() as backward:
        loss.backward()
    assert len(forward.syncs) == 1, f"{backend} forward: {forward.syncs} (the label check is the one expected)"
    assert backward.syncs == [], f"{backend} backward: {backward.syncs}"


@pytest.mark.parametrize("backend, device", [p for p in ALL if p.values[0] != "reference"])
def test_fused_statistics_have_no_host_sync(backend, device):
    """The backend's row statistics and fastmargin.loss, without the functional's checks."""
    x, w, y = inputs(device)
    x.requires_grad_(True)
    stats = backends.implementation(backend)
    with SyncLog() as log:
        lse, z_target, z_sum = stats(x, w, y, Margin(m2=0.5), 64.0, 1)
        loss = fastmargin.loss.loss_from_statistics(lse, z_target, z_sum, y >= 0, 30, 0.1, "mean")
        loss.backward()
    assert log.syncs == [], f"{backend}: {log.syncs}"


def test_triton_ops_have_no_host_sync():
    """The torch ops around the Triton kernels (fastmargin/gpu_host.py: norms, the split
    merge, dx's last step) and the ops' input checks."""
    if backends.unavailable_reason("triton") is not None:
        pytest.skip(f"triton: {backends.unavailable_reason('triton')}")
    from fastmargin import backend_triton  # noqa: F401  (registers the ops)

    device = [d for n, d in usable_backends() if n == "triton"][0]
    x, w, y = inputs(device, K=2)
    y = y.clamp(min=-1)
    opts = op_options(Margin(sphere_m=3, sphere_lambda=5.0), 4.0, 2, 0, x, w)
    g = torch.ones(12, device=device, dtype=opts[0].dtype)
    with SyncLog() as log:
        lse, _, _ = torch.ops.fastmargin.triton_fwd(x, w, y, *opts)
        torch.ops.fastmargin.triton_bwd(g, -g, g / 30, x, w, y, lse, *opts)
    assert log.syncs == [], log.syncs


def test_sphereface_annealing_reads_its_iteration():
    """SphereFaceLoss(annealing=True): the label check, and the iteration counter once."""
    module = fastmargin.SphereFaceLoss(30, 7, annealing=True, backend="reference" if
                                       backends.unavailable_reason("cpu") else "cpu")
    x, _, y = inputs(torch.device("cpu"))
    with SyncLog() as log:
        module(x, y)
    assert len(log.syncs) == 2, log.syncs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [b for b in fastmargin.BACKENDS if b != "reference"])
def test_no_sync_on_gpu(backend):
    """torch.cuda.set_sync_debug_mode('error') around a fused forward and backward."""
    device = torch.device("cuda")
    reason = backends.unavailable_reason(backend, device)
    if reason is not None:
        pytest.skip(reason)
    x, w, y = inputs(device)
    x.requires_grad_(True)
    w.requires_grad_(True)
    stats = backends.implementation(backend)
    stats(x, w, y, Margin(m2=0.5), 64.0, 1)  # first call: compilation, caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        lse, z_target, z_sum = stats(x, w, y, Margin(m2=0.5), 64.0, 1)
        loss = fastmargin.loss.loss_from_statistics(lse, z_target, z_sum, y >= 0, 30, 0.1, "mean")
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend, device", ALL)
def test_inputs_are_not_changed_in_place(backend, device, reduction):
    x, w, y = inputs(device, K=3, dtype=torch.float64)
    x.requires_grad_(True)
    w.requires_grad_(True)
    tensors = {"embeddings": x, "weight": w, "labels": y}
    before = {k: (t.detach().clone(), t._version) for k, t in tensors.items()}
    upstream = torch.linspace(-1, 2, 12, dtype=torch.float64, device=device)
    upstream_before = upstream.clone()
    loss = fastmargin.margin_cross_entropy(x, w, y, m2=0.5, sub_centers=3, reduction=reduction, backend=backend)
    grad = torch.ones_like(loss) if reduction == "mean" else upstream
    loss.backward(grad, retain_graph=True)
    first = (x.grad.clone(), w.grad.clone())
    loss.backward(grad)  # retain_graph: a second backward accumulates the same gradients again
    for k, t in tensors.items():
        assert torch.equal(t.detach(), before[k][0]) and t._version == before[k][1], f"{backend}: {k} changed in place"
    assert torch.equal(upstream, upstream_before), f"{backend}: the upstream gradient changed in place"
    assert_close(x.grad, 2 * first[0], atol=1e-12, what=f"{backend}: dx after two backward passes")
    assert_close(w.grad, 2 * first[1], atol=1e-12, what=f"{backend}: dW after two backward passes")
