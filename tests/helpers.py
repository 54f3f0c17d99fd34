"""Assertions shared by the tests: failures name the first bad index and both values."""

import torch


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
    """[(name, device)] of the backends that can run here, in fastmargin.BACKENDS order."""
    from fastmargin import BACKENDS

    names = [b for b in BACKENDS if not (fused_only and b == "reference")]
    return [(b, backend_device(b)) for b in names if backend_device(b) is not None]


def op_options(margin, scale, sub_centers, chunk, x, w):
    """The fused ops' arguments after (x, w, labels) for `margin` (fastmargin.fused.OP_ARGS):
    the lowered margin in the compute dtype of x and w on their device, exact fp32 GEMMs."""
    from fastmargin.margins import lower
    from fastmargin.reference import compute_dtype

    lowered = lower(margin, scale, compute_dtype(x, w), x.device)
    return lowered.params, list(lowered.flags), sub_centers, chunk, False
