"""The oracle: margin cross-entropy on materialised logits with plain PyTorch autograd.

Readable first, fast never: it holds several (B, C*K) tensors. Every backend is tested
against it (in float64 where the backend has it). The math is docs/design.md §1. Like every
backend it computes the logits' row statistics; fastmargin.loss turns them into the loss.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import loss
from .margins import NORM_EPS, Margin, psi


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: half inputs are computed in fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def cosine_logits(embeddings: torch.Tensor, weight: torch.Tensor, sub_centers: int) -> torch.Tensor:
    """cos(x_i, w_j) as (B, C); with K sub-centers the max over each class's K rows.

    embeddings (B, D), weight (C*K, D), class-major rows (row c*K + k), one dtype.
    The gradient of the max flows to the first arg-max sub-center only.
    """
    x_hat = F.normalize(embeddings, dim=1, eps=NORM_EPS)
    w_hat = F.normalize(weight, dim=1, eps=NORM_EPS)
    cos = x_hat @ w_hat.t()
    if sub_centers == 1:
        return cos
    cos = cos.view(cos.shape[0], cos.shape[1] // sub_centers, sub_centers)
    best = cos.argmax(dim=2, keepdim=True)
    return cos.gather(2, best).squeeze(2)


def margin_logits(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margin: Margin,
    scale: float,
    sub_centers: int = 1,
) -> torch.Tensor:
    """z (B, C): S_i * cos_ij, with S_i * psi(cos_iy) in the target column (docs/design.md §1).

    Rows whose label is outside [0, C) (ignored rows) get no margin. All in one dtype.
    """
    cos = cosine_logits(embeddings, weight, sub_centers)
    num_classes = cos.shape[1]
    has_target = (labels >= 0) & (labels < num_classes)
    target = torch.where(has_target, labels, 0).unsqueeze(1)
    cos_target = cos.gather(1, target)
    shift = torch.where(has_target.unsqueeze(1), psi(cos_target, margin) - cos_target, 0)
    z = cos.scatter_add(1, target, shift)  # not F.one_hot: it reads the labels on the host
    if margin.is_sphereface:
        return z * (scale * embeddings.norm(dim=1, keepdim=True))
    return z * scale


def row_statistics(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margin: Margin,
    scale: float,
    sub_centers: int = 1,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, z_target, z_sum), each (B,): log Σ_j exp z_ij, z_iy and Σ_j z_ij (docs/design.md §2).

    The backend contract (fastmargin.fused): embeddings (B, D), weight (C*K, D) any strides,
    any float dtypes, computed in fp32 (fp64 if an input is); labels (B,) int64, a label
    outside [0, C) meaning no target column here (no margin, z_target = 0). Differentiable
    with autograd. chunk_size is a fused backend's knob: the reference holds every logit.
    """
    dtype = compute_dtype(embeddings, weight)
    with torch.autocast(embeddings.device.type, enabled=False):
        z = margin_logits(embeddings.to(dtype), weight.to(dtype), labels, margin, scale, sub_centers)
        has_target = (labels >= 0) & (labels < z.shape[1])
        z_target = z.gather(1, torch.where(has_target, labels, 0).unsqueeze(1)).squeeze(1)
        return torch.logsumexp(z, dim=1), torch.where(has_target, z_target, 0), z.sum(dim=1)


# The whole loss on the reference's statistics: (embeddings, weight, labels, margin, scale,
# sub_centers, label_smoothing, ignore_index, reduction) -> (loss, lse). The oracle of tests.
reference_loss = functools.partial(loss.backend_loss, row_statistics)
