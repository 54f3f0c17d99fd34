"""fastmargin.margin_cross_entropy: the functional form of every margin loss."""

from __future__ import annotations

import torch

from . import backends, checks
from .loss import backend_loss
from .margins import Margin


def margin_cross_entropy(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    scale: float = 64.0,
    m1: float | torch.Tensor = 1.0,
    m2: float | torch.Tensor = 0.0,
    m3: float | torch.Tensor = 0.0,
    sphere_m: int | None = None,
    sphere_lambda: float = 0.0,
    sub_centers: int = 1,
    grad_mode: str = "exact",
    theta_policy: str = "fallback",
    curricular_t: float | torch.Tensor | None = None,
    filter_threshold: float | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    return_lse: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Margin softmax cross-entropy of embeddings against class weights (docs/design.md §1).

    Args:
        embeddings: (B, D) float16/bfloat16/float32/float64, unnormalised.
        weight: (C*K, D), the F.linear layout, any strides (a (D, C) weight is passed as
            W.t()); with K sub-centers, class-major rows: row c*K + k.
        labels: (B,) integer class indices in [0, C), or ignore_index.
        scale: s > 0. SphereFace uses s * ||x_i|| per row.
        m1, m2, m3: the combined margin cos(m1*theta + m2) - m3, margins in radians
            (ArcFace: m2; CosFace: m3). Every combination works. Each is a float or a (B,)
            tensor on the embeddings' device, one margin a row (m2 may be negative); a tensor
            that requires grad gets its gradient (checking a tensor's range reads it on the host).
        sphere_m, sphere_lambda: SphereFace's integer margin and annealing weight (see
            fastmargin.margins.Margin); exclusive with m1, m2, m3.
        sub_centers: K >= 1 centres per class; cos is the max over them, before the margin.
        grad_mode: 'exact' (true gradient) or 'detached' (straight-through, as insightface).
        theta_policy: what psi does where m1*theta + m2 leaves [0, pi]: 'fallback', 'clamp',
            'easy' (the margin only where cos > 0), 'none' (unguarded) or 'adaface' (see
            fastmargin.margins.Margin).
        curricular_t: CurricularFace's t: a non-target cos above its row's cos(m1*theta_y +
            m2) - m3 becomes cos * (t + cos).
        filter_threshold: insightface's interclass filtering: a non-target cos above it
            becomes 0, without gradient.
        label_smoothing: eps in [0, 1), as in F.cross_entropy.
        ignore_index: label of rows that contribute nothing.
        reduction: 'mean' over the rows not ignored (0, with zero gradients, when all are
            ignored or B = 0), 'sum', or 'none' ((B,), 0 at ignored rows).
        backend: 'auto' (the first usable here in backends.AUTO_ORDER, a GPU backend checked
            against the reference at first use), 'reference', 'cpu', 'triton', 'cuda'.
            Naming an unavailable backend raises BackendUnavailableError saying why.
        return_lse: also return lse (B,), each row's log-sum-exp of the logits (without a
            margin at ignored rows), differentiable as the loss is.
        chunk_size: how a fused backend walks the classes; None takes its default.
            'cpu': classes per block (peak memory O(B * chunk_size * K), smaller is leaner).
            'triton', 'cuda': the least classes one program walks (a class split); smaller
            means more splits and more memory for the backward's (splits, B, D) partial dx,
            so it is raised where the splits would pass the grid limit or the partials
            256 MiB. The reference materialises everything and ignores it.

    Returns:
        The loss, float32 (float64 if an input is float64) whatever the input dtypes;
        with return_lse, (loss, lse).

    The label range check reads labels on the host (one sync on a GPU).
    """
    margin = Margin(
        m1=m1, m2=m2, m3=m3, sphere_m=sphere_m, sphere_lambda=sphere_lambda,
        theta_policy=theta_policy, grad_mode=grad_mode, curricular_t=curricular_t, filter_threshold=filter_threshold,
    )
    scale = checks.check_scale(scale)
    checks.check_options(label_smoothing, reduction, ignore_index)
    if chunk_size is not None:
        checks.check_positive_int("chunk_size", chunk_size)
    loss, lse = margin_loss(
        embeddings, weight, labels, margin, scale, sub_centers=sub_centers,
        label_smoothing=float(label_smoothing), ignore_index=ignore_index, reduction=reduction,
        backend=backend, chunk_size=chunk_size,
    )
    return (loss, lse) if return_lse else loss


def margin_loss(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margin: Margin,
    scale: float,
    *,
    sub_centers: int = 1,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    chunk_size: int | None = None,
    target_cos: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse) of margin_cross_entropy for a validated `margin`, scale and options: what
    the modules call each step (they validated all of it once, at construction). Only the
    tensors are checked here, as they change from call to call. target_cos (B,): the rows'
    target cosines (fastmargin.reference.target_cosines) where the caller has computed them."""
    checks.check_inputs(embeddings, weight, labels, sub_centers, ignore_index)
    margin.check_rows(embeddings.shape[0], embeddings.device)
    row_statistics = backends.implementation(
        backends.select(backend, embeddings.device, embeddings.dtype, margin.kind, sub_centers, embeddings.shape[1]))
    return backend_loss(
        row_statistics, embeddings, weight, labels, margin, scale, sub_centers,
        label_smoothing, ignore_index, reduction, chunk_size, target_cos,
    )
