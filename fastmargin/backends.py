"""Which backend computes a call: availability, the reason when not, and 'auto'.

Every backend computes the logits' row statistics with the contract of
fastmargin.reference.row_statistics: (embeddings, weight, labels, margin, scale,
sub_centers, chunk_size) -> (lse, z_target, z_sum); fastmargin.loss makes the loss. A fused
backend is a torch.library custom op (docs/design.md §2, fastmargin.fused).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Callable

import torch

from . import _extension, margins, reference

BACKENDS = ("reference", "cpu", "triton", "cuda")

# 'auto' takes the first usable backend for the tensors' device type. On a GPU Triton
# comes first: its kernels are the ones CI runs (under the interpreter), while the CUDA
# kernels are only compiled there; the CUDA backend goes first once a GPU run of
# bench/gpu_check.sh shows it correct and faster.
AUTO_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}

# The backends whose results have been checked where 'auto' picks them: reference and cpu
# by CI on every change. No GPU run has checked triton or cuda yet; a backend joins this set
# only in the change that commits the bench/gpu_check.sh run whose GPU tests all passed.
# Until then 'auto' checks a backend against the reference once per process and (device,
# dtype, margin kind) before using it (first_use_check); FASTMARGIN_VERIFY=0 turns that off.
VERIFIED = frozenset({"reference", "cpu"})

def _device_type(name: str) -> str:
    """Where a fused backend's kernels run: Triton's on CPU tensors when they are interpreted
    (TRITON_INTERPRET=1 when fastmargin.kernels was imported: how CI tests them)."""
    if name == "triton":
        from .kernels import launch

        return "cpu" if launch.INTERPRET else "cuda"
    return "cpu" if name == "cpu" else "cuda"


class BackendUnavailableError(RuntimeError):
    """A named backend cannot run here; the message says why and what to use instead."""


def unavailable_reason(name: str, device: torch.device | None = None) -> str | None:
    """None if backend `name` can run on `device` (any device when None), else why not."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}: choose one of {BACKENDS} or 'auto'"
    if name == "reference":
        return None
    if name == "triton" and importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton, or a CUDA build of torch, brings it)"
    wanted = _device_type(name)
    if device is not None and device.type != wanted:
        return f"backend {name!r} runs on {wanted} tensors, and these are on {device.type}"
    if name in ("cpu", "cuda"):
        ext_reason = _extension.unavailable_reason(name)
        if ext_reason is not None:
            return ext_reason
    if name == "cpu" and not hasattr(_extension.module(), "cpu_forward"):
        return "fastmargin._C was built before the CPU kernel existed: reinstall to rebuild it"
    if wanted == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    if wanted == "cuda" and device is not None:
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:  # tests/test_triton.py: the kernels are compiled and sized for sm_80 and newer
            return (f"backend {name!r} needs a GPU of compute capability 8.0 or newer (its fp32 tiles take 80 KB "
                    f"of shared memory a block); this one is {major}.{minor}")
    return None


# A margin of each kind for the first-use check (fastmargin.margins' kinds).
_CHECK_MARGINS = {
    margins.ADDITIVE: margins.Margin(m3=0.35),
    margins.ARC: margins.Margin(m2=0.5),
    margins.COMBINED: margins.Margin(m1=1.2, m2=0.3, m3=0.2),
    margins.SPHERE: margins.Margin(sphere_m=4),
}


def first_use_check(name: str, device: torch.device, dtype: torch.dtype, kind: int, sub_centers: int = 2,
                    dim: int = 19) -> str | None:
    """None if backend `name` gives the reference's statistics and gradients on a small ragged problem
    (B = 7, C = 37, an ignored row) in `dtype` on `device`, with a margin of `kind`, the call's
    sub-centers and its embedding size up to 256 (beyond it the GPU tiles are the same): so a
    kernel whose tiles need more shared memory than this device has fails here too. Else what
    went wrong. Milliseconds, plus the kernels' first compile.

    The bound is loose on purpose (1e-3 of the largest value, 3e-2 for half inputs): it is
    there to catch a kernel that is wrong on this GPU, not rounding (the tests bound that).
    """
    generator = torch.Generator().manual_seed(0)
    dim = min(dim, 256)
    x = torch.randn(7, dim, generator=generator).to(dtype)
    w = torch.randn(37 * sub_centers, dim, generator=generator).to(dtype)
    labels = torch.randint(0, 37, (7,), generator=generator)
    labels[3] = -1
    results = []
    for backend, where, as_type in ((name, device, dtype), ("reference", torch.device("cpu"), torch.float64)):
        xv, wv = (t.to(where, as_type).detach().requires_grad_(True) for t in (x, w))  # the same rounded values
        lse, z_target, z_sum = implementation(backend)(xv, wv, labels.to(where), _CHECK_MARGINS[kind], 16.0,
                                                       sub_centers)
        (lse - z_target + 0.01 * z_sum).sum().backward()
        results.append((lse, z_target, z_sum, xv.grad, wv.grad))
    tol = 3e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3
    for what, got, want in zip(("lse", "z_target", "z_sum", "d/dx", "d/dW"), results[0], results[1]):
        got, want = got.detach().double().cpu(), want.detach().double()
        error = (got - want).abs().max().item()
        if not error <= tol * want.abs().max().item():  # NaN fails too
            return f"{what} is off by {error:.3g} (largest value {want.abs().max().item():.3g})"
    return None


@functools.cache
def _passes_first_use_check(name: str, device: torch.device, dtype: torch.dtype, kind: int, sub_centers: int,
                            dim: int) -> bool:
    """first_use_check, once per process and key; a failure warns, naming the backend."""
    try:
        problem = first_use_check(name, device, dtype, kind, sub_centers, dim)
    except Exception as error:  # noqa: BLE001  (e.g. a kernel that cannot launch on this device)
        problem = f"it raised {type(error).__name__}: {error}"
    if problem is not None:
        warnings.warn(
            f"fastmargin: backend {name!r} failed its first-use check on {device} ({dtype}, margin kind {kind}): "
            f"{problem}. 'auto' uses the next backend instead; please report this. FASTMARGIN_VERIFY=0 skips "
            "the check.", RuntimeWarning, stacklevel=4)
    return problem is None


# torch.compile takes the pick as a constant instead of tracing the extension loading and
# the first-use check (dynamo runs this eagerly while tracing).
@torch.compiler.assume_constant_result
def select(name: str, device: torch.device, dtype: torch.dtype = torch.float32, kind: int = margins.ARC,
           sub_centers: int = 1, dim: int = 512) -> str:
    """The backend that will compute on `device`: `name` itself, or the pick of 'auto' for
    inputs of `dtype`, a margin of `kind` (fastmargin.margins' kinds), `sub_centers` and
    embedding size `dim`. 'auto' skips a backend not in VERIFIED whose first_use_check
    fails, with a warning naming it and why."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {BACKENDS} or 'auto'")
    if name == "auto":
        verify = os.environ.get("FASTMARGIN_VERIFY", "1") != "0"
        for candidate in AUTO_ORDER.get(device.type, ("reference",)):
            if unavailable_reason(candidate, device) is not None:
                continue
            if candidate in VERIFIED or not verify or _passes_first_use_check(candidate, device, dtype, kind,
                                                                              sub_centers, min(dim, 256)):
                return candidate
        return "reference"
    reason = unavailable_reason(name, device)
    if reason is not None:
        usable = [b for b in BACKENDS if unavailable_reason(b, device) is None]
        raise BackendUnavailableError(
            f"backend {name!r} is unavailable: {reason}. "
            f"Usable here: {usable}; backend='auto' picks the first of them in its order (AUTO_ORDER). "
            "`python -m fastmargin` reports what is built."
        )
    return name


def implementation(name: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The row_statistics function of an available backend `name`."""
    if name == "reference":
        return reference.row_statistics
    if name == "cpu":
        from . import backend_cpu

        return backend_cpu.row_statistics
    if name == "triton":
        from . import backend_triton

        return backend_triton.row_statistics
    if name == "cuda":
        from . import backend_cuda

        return backend_cuda.row_statistics
    raise BackendUnavailableError(f"unknown backend {name!r}: choose one of {BACKENDS}")
