"""From the logits' row statistics to the loss: label smoothing, ignore_index, reductions.

Every backend computes, per row, lse = log Σ_j exp z_ij, z_target = z_iy and z_sum = Σ_j z_ij
(fastmargin.fused). The loss of docs/design.md §2 needs nothing else:

    (1 - eps) (lse - z_target) + eps (lse - z_sum / C)

so it is written once, here, in differentiable PyTorch on (B,) vectors, for every backend
and for class-sharded training (fastmargin.distributed), where the three statistics are
combined across ranks first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .margins import Margin


def loss_from_statistics(
    lse: torch.Tensor,
    z_target: torch.Tensor,
    z_sum: torch.Tensor,
    valid: torch.Tensor,
    num_classes: int,
    label_smoothing: float,
    reduction: str,
) -> torch.Tensor:
    """lse, z_target, z_sum (B,) float; valid (B,) bool, False at ignored rows.

    'mean' divides by the number of valid rows, at least 1: an all-ignored or empty batch
    gives 0 with zero gradients (F.cross_entropy gives NaN there). 'none' is (B,), 0 at
    ignored rows. No host sync.
    """
    nll = lse - z_target
    if label_smoothing:
        nll = (1 - label_smoothing) * nll + label_smoothing * (lse - z_sum / num_classes)
    per_row = torch.where(valid, nll, 0)
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total if reduction == "sum" else total / valid.sum().clamp(min=1)


def backend_loss(
    row_statistics: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margin: Margin,
    scale: float,
    sub_centers: int = 1,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    target_cos: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse) of docs/design.md §2 from a backend's row_statistics, inputs assumed valid.

    embeddings (B, D), weight (C*K, D) any strides, labels (B,) integer. Ignored rows are
    passed to the backend with label -1 (no target, no margin) and masked out of the loss.
    target_cos (B,): the rows' target cosines where the caller has them (the backend
    computes them where the margin needs them and none are given).
    """
    valid = labels != ignore_index
    lse, z_target, z_sum = row_statistics(
        embeddings, weight, torch.where(valid, labels.long(), -1), margin, scale, sub_centers, chunk_size,
        target_cos,
    )
    num_classes = weight.shape[0] // sub_centers
    loss = loss_from_statistics(lse, z_target, z_sum, valid, num_classes, label_smoothing, reduction)
    return loss, lse
