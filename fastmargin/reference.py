"""The oracle: margin cross-entropy on materialised logits with plain PyTorch autograd.

Readable first, fast never: it holds several (B, C*K) tensors. Every backend is tested
against it (in float64 where the backend has it). The math is DESIGN §1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    cos = cos.view(cos.shape[0], -1, sub_centers)
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
    """z (B, C): S_i * cos_ij, with S_i * psi(cos_iy) in the target column (DESIGN §1).

    Rows whose label is outside [0, C) (ignored rows) get no margin. All in one dtype.
    """
    cos = cosine_logits(embeddings, weight, sub_centers)
    num_classes = cos.shape[1]
    has_target = (labels >= 0) & (labels < num_classes)
    target = torch.where(has_target, labels, 0).unsqueeze(1)
    cos_target = cos.gather(1, target)
    shift = torch.where(has_target.unsqueeze(1), psi(cos_target, margin) - cos_target, 0)
    one_hot = F.one_hot(target.squeeze(1), num_classes).to(cos.dtype)
    z = cos + one_hot * shift
    if margin.is_sphereface:
        return z * (scale * embeddings.norm(dim=1, keepdim=True))
    return z * scale


def margin_cross_entropy(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margin: Margin,
    scale: float,
    sub_centers: int = 1,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, lse), both in the compute dtype (fp64 if an input is, else fp32).

    embeddings (B, D), weight (C*K, D) any strides, labels (B,) int64. loss is a scalar for
    'mean' (over the rows that are not ignored; 0 when none is) and 'sum', (B,) for 'none'
    (0 at ignored rows). lse (B,) is the log-sum-exp of each row's logits.
    Inputs are assumed valid: fastmargin.functional checks them.
    """
    dtype = compute_dtype(embeddings, weight)
    device_type = embeddings.device.type
    with torch.autocast(device_type, enabled=False):
        z = margin_logits(embeddings.to(dtype), weight.to(dtype), labels, margin, scale, sub_centers)
        lse = torch.logsumexp(z, dim=1)
        valid = labels != ignore_index
        target = torch.where(valid, labels, 0).unsqueeze(1)
        nll = lse - z.gather(1, target).squeeze(1)
        if label_smoothing:
            nll = (1 - label_smoothing) * nll + label_smoothing * (lse - z.mean(dim=1))
        return reduce_rows(torch.where(valid, nll, 0), valid, reduction), lse


def reduce_rows(per_row: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """per_row (B,) with 0 at ignored rows, valid (B,) bool -> the reduced loss.

    'mean' divides by the number of valid rows, at least 1: an all-ignored or empty batch
    gives 0 with zero gradients (F.cross_entropy gives NaN there). No host sync.
    """
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total if reduction == "sum" else total / valid.sum().clamp(min=1)
