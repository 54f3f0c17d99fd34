"""The drop-in loss modules, each owning its class weights.

ArcFaceLoss, CosFaceLoss, SphereFaceLoss and SubCenterArcFaceLoss take
pytorch-metric-learning's (PML 2.x) constructor arguments, defaults and units, keep its
weight `W` of shape (embedding_size, num_classes * sub_centers) and its initialisation, so
a PML state_dict loads unchanged. CombinedMarginLoss is insightface arcface_torch's margin
with the classifier weight it lacks, in the F.linear layout (num_classes, embedding_size).
fastmargin's own options (backend, grad_mode, theta_policy, label_smoothing, ignore_index,
reduction, chunk_size) are keyword arguments a PML or insightface user never needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import checks, reference, subcenter
from .functional import margin_loss
from .margins import Margin, sphereface_lambda


class _MarginLoss(torch.nn.Module):
    """What every module shares: the margin, the scale, the options and the dtype policy."""

    def __init__(
        self,
        margin: Margin,
        scale: float,
        sub_centers: int = 1,
        *,
        backend: str = "auto",
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.margin = margin
        self.scale = checks.check_scale(scale)
        self.sub_centers = checks.check_positive_int("sub_centers", sub_centers)
        checks.check_options(label_smoothing, reduction, ignore_index)
        self.backend = backend
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.chunk_size = chunk_size if chunk_size is None else checks.check_positive_int("chunk_size", chunk_size)

    def current_margin(self) -> Margin:
        return self.margin

    def _weight_for(self, embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # PML casts W to the embeddings' dtype outside autocast, but in place, which turns
        # the parameter itself into fp16 and back; we cast out of place. Under autocast the
        # weight is used as it is and the loss stays fp32.
        if torch.is_autocast_enabled(embeddings.device.type) or weight.dtype == embeddings.dtype:
            return weight
        return weight.to(embeddings.dtype)

    def _loss(self, embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """embeddings (B, D), weight (C*K, D) any strides, labels (B,) -> the reduced loss."""
        if isinstance(embeddings, torch.Tensor) and embeddings.dim() == 2 and embeddings.shape[1] != weight.shape[1]:
            raise ValueError(
                f"{type(self).__name__} holds class weights of embedding_size {weight.shape[1]}, but the "
                f"embeddings have dim {embeddings.shape[1]}: pass embeddings of shape (batch, {weight.shape[1]}) "
                f"or build the loss with embedding_size={embeddings.shape[1]}"
            )
        loss, _ = margin_loss(
            embeddings, self._weight_for(embeddings, weight), labels, self.current_margin(), self.scale,
            sub_centers=self.sub_centers, label_smoothing=self.label_smoothing, ignore_index=self.ignore_index,
            reduction=self.reduction, backend=self.backend, chunk_size=self.chunk_size,
        )
        if torch.is_autocast_enabled(embeddings.device.type):
            return loss
        return loss.to(embeddings.dtype)


_PML_UNSUPPORTED = ("distance", "reducer", "weight_regularizer", "weight_reg_weight",
                    "embedding_regularizer", "embedding_reg_weight", "collect_stats")


class _PMLMarginLoss(_MarginLoss):
    """PML's surface: W (D, C*K), forward(embeddings, labels, ...), get_logits."""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: Margin,
        scale: float,
        sub_centers: int = 1,
        weight_init_func: Callable[[torch.Tensor], object] | None = None,
        **options: object,
    ) -> None:
        unsupported = sorted(set(options) & set(_PML_UNSUPPORTED))
        if unsupported:
            raise TypeError(
                f"{type(self).__name__} does not support pytorch-metric-learning's {unsupported}: "
                "fastmargin fuses cosine similarity, mean reduction and no regularizer; "
                "add a regularizer to the returned loss yourself"
            )
        super().__init__(margin, scale, sub_centers, **options)
        self.num_classes = checks.check_positive_int("num_classes", num_classes)
        self.embedding_size = checks.check_positive_int("embedding_size", embedding_size)
        self.W = torch.nn.Parameter(torch.empty(embedding_size, num_classes * self.sub_centers))
        (weight_init_func or torch.nn.init.normal_)(self.W)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None = None,
        indices_tuple: object = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """embeddings (B, embedding_size), labels (B,) -> the loss (embeddings' dtype; fp32
        under autocast)."""
        if labels is None:
            raise ValueError("labels are required for this loss function")
        if indices_tuple is not None:
            raise ValueError(
                "indices_tuple (a miner's output) is not supported: a classification loss "
                "uses every row; drop the miner or weigh rows with reduction='none'"
            )
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("ref_emb is not supported for this loss function")
        return self._loss(embeddings, self.W.t(), labels.to(embeddings.device))

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The scaled cosine logits (B, num_classes) without margin, as PML computes them,
        in the embeddings' dtype."""
        weight = self._weight_for(embeddings, self.W.t())
        logits = reference.cosine_logits(embeddings, weight, self.sub_centers) * self.scale
        if self.margin.is_sphereface:
            logits = logits * embeddings.norm(dim=1, keepdim=True)
        return logits


def _radians(degrees: float) -> float:
    if not isinstance(degrees, (int, float)) or isinstance(degrees, bool):
        raise TypeError(f"margin must be a number of degrees, got {type(degrees).__name__}")
    return math.radians(degrees)


class ArcFaceLoss(_PMLMarginLoss):
    """ArcFace, psi = cos(theta + m): PML's ArcFaceLoss, margin in degrees (28.6 = 0.5 rad).

    Beyond theta = pi - m the default theta_policy='fallback' uses cos - m*sin(m), as PML.
    PML's gradient is infinite at cos = +-1 (acos' there); ours clamps cos to 1 - 1e-7.
    """

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6, scale: float = 64,
                 *, grad_mode: str = "exact", theta_policy: str = "fallback", **options: object) -> None:
        spec = Margin(m2=_radians(margin), grad_mode=grad_mode, theta_policy=theta_policy)
        super().__init__(num_classes, embedding_size, spec, scale, **options)


class CosFaceLoss(_PMLMarginLoss):
    """CosFace (AM-Softmax), psi = cos - m: PML's CosFaceLoss."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.35, scale: float = 64,
                 **options: object) -> None:
        super().__init__(num_classes, embedding_size, Margin(m3=margin), scale, **options)


class SphereFaceLoss(_PMLMarginLoss):
    """SphereFace (A-Softmax), psi = (-1)^k cos(m*theta) - 2k, logits scaled by s*||x||.

    PML's SphereFaceLoss (integer margin, default 4; scale 1). annealing=True turns on the
    original lambda schedule, lambda = max(lambda_min, base*(1 + gamma*it)^-power): the
    iteration counter is the buffer `iteration`, saved in the state_dict, advanced by each
    forward in training mode. PML has no annealing, and without it the state_dict is PML's.
    """

    def __init__(self, num_classes: int, embedding_size: int, margin: int = 4, scale: float = 1,
                 *, grad_mode: str = "exact", annealing: bool = False,
                 lambda_base: float = 1000.0, lambda_gamma: float = 0.12,
                 lambda_power: float = 1.0, lambda_min: float = 5.0, **options: object) -> None:
        spec = Margin(sphere_m=int(margin), grad_mode=grad_mode)
        super().__init__(num_classes, embedding_size, spec, scale, **options)
        self.annealing = annealing
        self.lambda_schedule = dict(base=lambda_base, gamma=lambda_gamma, power=lambda_power,
                                    lambda_min=lambda_min)
        if annealing:
            sphereface_lambda(0, **self.lambda_schedule)  # fails early on a bad schedule
            self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    def current_margin(self) -> Margin:
        if not self.annealing:
            return self.margin
        lam = sphereface_lambda(int(self.iteration), **self.lambda_schedule)
        return Margin(sphere_m=self.margin.sphere_m, sphere_lambda=lam, grad_mode=self.margin.grad_mode)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None,
                indices_tuple: object = None, ref_emb: torch.Tensor | None = None,
                ref_labels: torch.Tensor | None = None) -> torch.Tensor:
        loss = super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if self.annealing and self.training:
            self.iteration += 1
        return loss


class SubCenterArcFaceLoss(_PMLMarginLoss):
    """Sub-center ArcFace: K = sub_centers columns of W per class (column c*K + k), cos the
    max over them before the margin; PML's SubCenterArcFaceLoss (margin in degrees)."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6, scale: float = 64,
                 sub_centers: int = 3, *, grad_mode: str = "exact", theta_policy: str = "fallback",
                 **options: object) -> None:
        spec = Margin(m2=_radians(margin), grad_mode=grad_mode, theta_policy=theta_policy)
        super().__init__(num_classes, embedding_size, spec, scale, sub_centers, **options)

    @torch.no_grad()
    def get_outliers(self, embeddings: torch.Tensor, labels: torch.Tensor, threshold: float = 75,
                     return_dominant_centers: bool = True
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """PML's outlier search, vectorised over classes (fastmargin.subcenter).

        For each class present in `labels`, the dominant sub-center is the one most of the
        class's samples are nearest to (ties: the lowest index); samples whose cosine to it
        is below cos(threshold degrees) are outliers. Returns their indices (int64, grouped
        by class in ascending class order, ascending within a class, as PML lists them) and,
        if return_dominant_centers, dominant_centers (embedding_size, num_classes), the
        dominant column of W per class (zeros for classes absent from `labels`, where PML
        leaves uninitialised memory). Rows labelled ignore_index take no part. PML returns
        the tuple even when return_dominant_centers=False; we return what is asked.
        """
        stats = subcenter.sub_center_stats(embeddings, self.W.t(), labels, self.sub_centers,
                                           ignore_index=self.ignore_index)
        outliers = stats.outliers(threshold)
        if not return_dominant_centers:
            return outliers
        dominant_centers = torch.where(stats.present, self.W[:, stats.dominant_rows()], 0)
        return outliers, dominant_centers.to(embeddings.dtype)


class CombinedMarginLoss(_MarginLoss):
    """insightface arcface_torch's CombinedMarginLoss(s, m1, m2, m3), cos(m1*theta + m2) - m3,
    with its own classifier weight `weight` (num_classes, embedding_size), initialised
    N(0, 0.01) as PartialFC's. insightface accepts only ArcFace (m1 = 1, m3 = 0) or CosFace
    (m3 > 0); every combination works here. insightface's ArcFace branch is the detached
    gradient: pass grad_mode='detached' for its numbers in backward too.
    """

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0, *,
                 num_classes: int, embedding_size: int, sub_centers: int = 1,
                 grad_mode: str = "exact", theta_policy: str = "fallback", **options: object) -> None:
        spec = Margin(m1=m1, m2=m2, m3=m3, grad_mode=grad_mode, theta_policy=theta_policy)
        super().__init__(spec, s, sub_centers, **options)
        self.num_classes = checks.check_positive_int("num_classes", num_classes)
        self.embedding_size = checks.check_positive_int("embedding_size", embedding_size)
        self.weight = torch.nn.Parameter(torch.normal(0, 0.01, (num_classes * self.sub_centers, embedding_size)))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """embeddings (B, embedding_size), labels (B,) -> the loss."""
        return self._loss(embeddings, self.weight, labels)
