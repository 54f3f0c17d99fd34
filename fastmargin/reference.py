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
from .margins import NORM_EPS, Margin, lower, nontarget_value, target_value


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


def target_cosines(embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   sub_centers: int = 1) -> torch.Tensor:
    """Each row's target cosine (B,), detached: the (B, D) gather-dot pre-pass of docs/design.md
    §1 that per-row thresholds and margin gradients need, without the (B, C) logits. 0 where
    the label is outside [0, C). embeddings (B, D), weight (C*K, D), in their compute dtype."""
    with torch.no_grad():
        dtype = compute_dtype(embeddings, weight)
        num_classes = weight.shape[0] // sub_centers
        has_target = (labels >= 0) & (labels < num_classes)
        rows = torch.where(has_target, labels, 0).unsqueeze(1) * sub_centers + torch.arange(
            sub_centers, device=labels.device)
        w_hat = F.normalize(weight.to(dtype)[rows.flatten()], dim=1, eps=NORM_EPS).view(len(labels), sub_centers, -1)
        x_hat = F.normalize(embeddings.to(dtype), dim=1, eps=NORM_EPS)
        cos = torch.einsum("bkd,bd->bk", w_hat, x_hat).amax(dim=1)
        return torch.where(has_target, cos, 0)


def margin_logits(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margin: Margin,
    scale: float,
    sub_centers: int = 1,
    target_cos: torch.Tensor | None = None,
) -> torch.Tensor:
    """z (B, C): S_i * cos_ij, with S_i * psi(cos_iy) in the target column and the non-target
    transform elsewhere (docs/design.md §1). All in one dtype.

    Rows whose label is outside [0, C) (ignored rows) get no margin. target_cos (B,): the
    rows' target cosines for a threshold that needs them (Margin.needs_target_cos), given
    where the target may live on another shard; by default the logits' own.
    """
    cos = cosine_logits(embeddings, weight, sub_centers)
    num_classes = cos.shape[1]
    has_target = (labels >= 0) & (labels < num_classes)
    target = torch.where(has_target, labels, 0).unsqueeze(1)
    cos_target = cos.gather(1, target)
    if margin.needs_target_cos and target_cos is None:  # 0 without a target, as target_cosines
        target_cos = torch.where(has_target, cos_target.squeeze(1), 0).detach()
    lowered = lower(margin, scale, cos.dtype, cos.device, target_cos)
    if margin.has_nontarget:
        cos_others = nontarget_value(cos, lowered.params)
    else:
        cos_others = cos
    # The target column by a comparison, not F.one_hot (which reads the labels on the host).
    is_target = (torch.arange(num_classes, device=cos.device) == target) & has_target.unsqueeze(1)
    z = torch.where(is_target, target_value(cos_target, lowered.params, lowered.flags), cos_others)
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
    target_cos: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, z_target, z_sum), each (B,): log Σ_j exp z_ij, z_iy and Σ_j z_ij (docs/design.md §2).

    The backend contract (fastmargin.fused): embeddings (B, D), weight (C*K, D) any strides,
    any float dtypes, computed in fp32 (fp64 if an input is); labels (B,) int64, a label
    outside [0, C) meaning no target column here (no margin, z_target = 0); target_cos as
    margin_logits takes it. Differentiable with autograd, per-row margin tensors included.
    chunk_size is a fused backend's knob: the reference holds every logit.
    """
    dtype = compute_dtype(embeddings, weight)
    with torch.autocast(embeddings.device.type, enabled=False):
        z = margin_logits(embeddings.to(dtype), weight.to(dtype), labels, margin, scale, sub_centers, target_cos)
        has_target = (labels >= 0) & (labels < z.shape[1])
        z_target = z.gather(1, torch.where(has_target, labels, 0).unsqueeze(1)).squeeze(1)
        return torch.logsumexp(z, dim=1), torch.where(has_target, z_target, 0), z.sum(dim=1)


# The whole loss on the reference's statistics: (embeddings, weight, labels, margin, scale,
# sub_centers, label_smoothing, ignore_index, reduction) -> (loss, lse). The oracle of tests.
reference_loss = functools.partial(loss.backend_loss, row_statistics)
