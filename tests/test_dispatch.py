"""'auto' and the first-use check (fastmargin.backends): a backend that no GPU run has
verified is checked against the reference once per process and (device, dtype, margin
kind) before 'auto' uses it; a broken one is skipped with a warning that names it, and
FASTMARGIN_VERIFY=0 turns the check off. Shown on the CPU with an injected broken backend."""

import warnings

import pytest
import torch

import fastmargin
from fastmargin import backends, margins
from helpers import assert_close

CPU = torch.device("cpu")


def broken_row_statistics(embeddings, weight, labels, margin, scale, sub_centers=1, chunk_size=None):
    """The reference's statistics with the target logit 10% off: a kernel bug."""
    lse, z_target, z_sum = backends.reference.row_statistics(embeddings, weight, labels, margin, scale, sub_centers)
    return lse, z_target * 1.1, z_sum


@pytest.fixture
def broken_first(monkeypatch):
    """'auto' on the CPU tries an unverified backend 'cpu' that is broken, then the reference."""
    if backends.unavailable_reason("cpu", CPU) is not None:
        pytest.skip(backends.unavailable_reason("cpu", CPU))
    calls = []
    real = backends.implementation

    def implementation(name):
        if name == "cpu":
            calls.append(name)
            return broken_row_statistics
        return real(name)

    monkeypatch.setattr(backends, "implementation", implementation)
    monkeypatch.setattr(backends, "VERIFIED", frozenset({"reference"}))
    backends._passes_first_use_check.cache_clear()
    yield calls
    backends._passes_first_use_check.cache_clear()


def test_verified_backends_are_not_checked():
    assert backends.VERIFIED == {"reference", "cpu"}, "triton and cuda join only with a GPU run's figures"
    assert backends.select("auto", CPU) in ("cpu", "reference")


def test_broken_backend_is_skipped_with_a_warning(broken_first):
    with pytest.warns(RuntimeWarning, match=r"backend 'cpu' failed its first-use check on cpu .*(lse|z_target|z_sum|d/dx|d/dW) is off"):
        assert backends.select("auto", CPU, torch.float32, margins.ARC) == "reference"
    checks = len(broken_first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process and key: no second check, no second warning
        assert backends.select("auto", CPU, torch.float32, margins.ARC) == "reference"
    assert len(broken_first) == checks
    with pytest.warns(RuntimeWarning):  # another margin kind is another key
        assert backends.select("auto", CPU, torch.float32, margins.SPHERE) == "reference"


def test_the_loss_falls_back_to_the_reference(broken_first):
    x, w = torch.randn(6, 5, dtype=torch.float64), torch.randn(10, 5, dtype=torch.float64)
    y = torch.arange(6)
    with pytest.warns(RuntimeWarning, match="first-use check"):
        got = fastmargin.margin_cross_entropy(x, w, y, m2=0.5)
    want = fastmargin.margin_cross_entropy(x, w, y, m2=0.5, backend="reference")
    assert_close(got, want, atol=0.0, what="auto after a failed check vs the reference")


def test_check_can_be_turned_off(broken_first, monkeypatch):
    monkeypatch.setenv("FASTMARGIN_VERIFY", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select("auto", CPU) == "cpu"


def test_a_backend_that_raises_is_skipped(broken_first, monkeypatch):
    def raising(*args, **kwargs):
        raise RuntimeError("too much shared memory for this device")

    monkeypatch.setattr(backends, "first_use_check", raising)  # e.g. Triton's OutOfResources
    with pytest.warns(RuntimeWarning, match="RuntimeError: too much shared memory"):
        assert backends.select("auto", CPU) == "reference"


def test_a_correct_unverified_backend_passes():
    if backends.unavailable_reason("cpu", CPU) is not None:
        pytest.skip(backends.unavailable_reason("cpu", CPU))
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for kind in (margins.ADDITIVE, margins.ARC, margins.COMBINED, margins.SPHERE):
            assert backends.first_use_check("cpu", CPU, dtype, kind) is None, (dtype, kind)


def test_compile_fullgraph_with_the_check(broken_first):
    """The check runs while dynamo traces (select is a constant to it): the compiled step
    falls back like the eager one, without a graph break."""
    x, w = torch.randn(6, 5), torch.randn(10, 5)
    y = torch.arange(6)
    compiled = torch.compile(lambda x, w: fastmargin.margin_cross_entropy(x, w, y, m2=0.5), fullgraph=True)
    with pytest.warns(RuntimeWarning, match="first-use check"):
        got = compiled(x, w)
    want = fastmargin.margin_cross_entropy(x, w, y, m2=0.5, backend="reference")
    assert_close(got, want, atol=0.0, rtol=1e-6, what="compiled auto after a failed check vs the reference")


def test_old_gpus_are_refused(monkeypatch):
    """The GPU kernels are sized for sm_80 and newer (fp32 tiles take 80 KB of shared memory
    a block, a T4's sm_75 has 64 KB): an older GPU is unavailable, with the reason."""
    if backends.unavailable_reason("cuda") not in (None, "no CUDA device is visible to torch"):
        pytest.skip(backends.unavailable_reason("cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "compute capability 8.0 or newer" in backends.unavailable_reason("cuda", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert backends.unavailable_reason("cuda", torch.device("cuda")) is None
