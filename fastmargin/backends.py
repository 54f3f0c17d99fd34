"""Which backend computes a call: availability, the reason when not, and 'auto'.

Every backend computes the logits' row statistics with the contract of
fastmargin.reference.row_statistics: (embeddings, weight, labels, margin, scale,
sub_centers, chunk_size) -> (lse, z_target, z_sum); fastmargin.loss makes the loss. A fused
backend is a torch.library custom op (DESIGN §4, fastmargin.fused).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from . import _extension, reference

BACKENDS = ("reference", "cpu", "triton", "cuda")

# 'auto' takes the first usable backend for the tensors' device type. On a GPU Triton
# comes first: its kernels are the ones CI runs (under the interpreter), while the CUDA
# kernels are only compiled there; the CUDA backend goes first once a GPU run of
# bench/gpu_check.sh shows it correct and faster.
AUTO_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}

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
    return None


# torch.compile takes the pick as a constant instead of tracing the extension loading.
@torch.compiler.assume_constant_result
def select(name: str, device: torch.device) -> str:
    """The backend that will compute on `device`: `name` itself, or the pick of 'auto'."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {BACKENDS} or 'auto'")
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("reference",)):
            if unavailable_reason(candidate, device) is None:
                return candidate
        return "reference"
    reason = unavailable_reason(name, device)
    if reason is not None:
        usable = [b for b in BACKENDS if unavailable_reason(b, device) is None]
        raise BackendUnavailableError(
            f"backend {name!r} is unavailable: {reason}. "
            f"Usable here: {usable}; backend='auto' picks the fastest of them. "
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
