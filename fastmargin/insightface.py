"""insightface arcface_torch's margin losses and PartialFC_V2, on fastmargin's fused kernels.

Change the import and keep the training script:

    # from losses import CombinedMarginLoss
    # from partial_fc_v2 import PartialFC_V2
    from fastmargin.insightface import CombinedMarginLoss, PartialFC_V2

    margin_loss = CombinedMarginLoss(64, 1.0, 0.5, 0.0, 0)
    module_partial_fc = PartialFC_V2(margin_loss, 512, num_classes, sample_rate, fp16)
    loss = module_partial_fc(local_embeddings, local_labels)   # the global batch's mean loss
    torch.save(module_partial_fc.state_dict(), f"softmax_fc_gpu_{rank}.pt")

The margin losses (CombinedMarginLoss, ArcFace, CosFace) take insightface's arguments and
play both of insightface's parts: called on cosine logits and labels they return the
margined, scaled logits (insightface's formulas in plain PyTorch, for code that calls them
directly), and handed to PartialFC_V2 they are only read, as a fastmargin Margin and a scale
that the fused kernel applies without ever forming the (B, C) logits (docs/design.md §1).

PartialFC_V2 is fastmargin.distributed.PartialFC with insightface's constructor, weight
(name, (num_local, embedding_size) layout, N(0, 0.01) initialisation, class split) and
gradients: a per-rank state_dict of either loads into the other. Beyond insightface it
takes batch sizes that differ between ranks and from step to step, and runs in a single
process without torch.distributed. What still differs, and why, is listed in README.md
("Coming from insightface").
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.distributed as dist

from . import checks
from .distributed import LOCAL, PartialFC
from .margins import COS_EPS, Margin

__all__ = ["ArcFace", "CombinedMarginLoss", "CosFace", "PartialFC_V2", "fused_margin"]


class _MarginSoftmax(torch.nn.Module):
    """Target transform psi(c) = cos(m1*theta + m2) - m3 on cosine logits, insightface style.

    `margin_spec` is the fastmargin.margins.Margin that PartialFC_V2 fuses (it validates
    the margins: m1 in (0, 100], m2 in (-pi, pi), m3 in [-2, 2]), `scale` the logit scale s as
    a float. The subclasses keep insightface's attribute names (s, m1, m2, m3, margin, m).

    Called on logits, psi is insightface's formula everywhere, also past theta* =
    (pi - m2) / m1, where cos(m1*theta + m2) rises again; the fused kernels continue with
    fastmargin's monotonic line there instead (docs/design.md §1). Target angles that large (cos <
    -0.88 for ArcFace's m2 = 0.5) do not occur in training.
    """

    def __init__(self, s: float, m1: float, m2: float, m3: float, interclass_filtering_threshold: float,
                 grad_mode: str) -> None:
        super().__init__()
        self.scale = checks.check_scale(s)
        threshold = interclass_filtering_threshold
        if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool) or not math.isfinite(threshold):
            raise ValueError(f"interclass_filtering_threshold={threshold!r} must be a finite number")
        self._threshold = float(threshold)
        # insightface filters where the threshold is > 0; a cosine never passes 1, so a
        # threshold at or above 1 filters nothing.
        filtering = 0 < self._threshold < 1
        self.margin_spec = Margin(m1=m1, m2=m2, m3=m3, grad_mode=grad_mode,
                                  filter_threshold=self._threshold if filtering else None)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Margined, scaled logits, as insightface's margin losses return them.

        logits: (B, C) float, the cosines between normalised embeddings and class weights
            (PartialFC_V2 clamps them to [-1, 1] before this call).
        labels: (B,) or (B, 1) integer, the target column of each row, or -1 where the row
            has none (insightface: the target lives on another rank's shard); those rows are
            only scaled.

        Returns (B, C) in logits' dtype: s * cos, the target column s * psi(cos). Unlike
        insightface, `logits` itself is left unchanged (insightface writes into it).
        With interclass_filtering_threshold t > 0, non-target cosines above t become 0
        first (no gradient there), as insightface filters. No host sync.
        """
        labels = labels.reshape(-1, 1).long()
        has_target = labels != -1
        index = labels.clamp(min=0)  # a placeholder column for rows without a target
        if self._threshold > 0:
            target_cell = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, index, has_target)
            logits = logits.masked_fill((logits > self._threshold) & ~target_cell, 0.0)
        target = logits.gather(1, index)
        margined = torch.where(has_target, self._psi(target), target)
        return logits.scatter(1, index, margined) * self.scale

    def _psi(self, c: torch.Tensor) -> torch.Tensor:
        m = self.margin_spec
        if m.is_additive_cosine:  # insightface's CosFace: no angle
            return c - m.m3
        if m.grad_mode == "detached":
            # insightface's ArcFace: the margin moves the value only (computed without
            # autograd, from c as given), the gradient is that of c (straight-through).
            # c - c.detach() is exactly 0: the value is psi to the last bit, as insightface's.
            with torch.no_grad():
                psi = torch.cos(m.m1 * torch.acos(c) + m.m2) - m.m3
            return psi + (c - c.detach())
        # The exact gradient: c is clamped to +-(1 - 1e-7) first (straight-through), as
        # fastmargin's kernels do (docs/design.md §1), so that acos' stays finite at |c| = 1.
        c = c + (c.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS) - c).detach()
        return torch.cos(m.m1 * torch.acos(c) + m.m2) - m.m3


class CombinedMarginLoss(_MarginSoftmax):
    """insightface's CombinedMarginLoss(s, m1, m2, m3, interclass_filtering_threshold=0):
    psi(cos) = cos(m1*theta + m2) - m3 (margins in radians), logits scaled by s.

    insightface computes two branches only: ArcFace when m1 = 1 and m3 = 0, CosFace (cos -
    m3, m1 and m2 ignored) when m3 > 0, and raises otherwise. Here the same two give the
    same numbers, and every other combination is the full formula (a warning says so where
    insightface would have ignored m1 and m2).

    grad_mode (keyword): 'detached' (default), insightface's straight-through gradient, the
    margin changing the forward value only; 'exact', the true gradient of psi.
    interclass_filtering_threshold t > 0: non-target cosines above t become 0, without
    gradient, as insightface filters them; PartialFC_V2 applies it in the fused kernels.
    """

    def __init__(self, s: float, m1: float, m2: float, m3: float, interclass_filtering_threshold: float = 0, *,
                 grad_mode: str = "detached") -> None:
        super().__init__(s, m1, m2, m3, interclass_filtering_threshold, grad_mode)
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold
        if m3 > 0 and (m1 != 1.0 or m2 != 0.0):
            warnings.warn(f"CombinedMarginLoss(m1={m1}, m2={m2}, m3={m3}): insightface applies only m3 when "
                          "m3 > 0 (cos - m3, ignoring m1 and m2); fastmargin applies all three, "
                          "cos(m1*theta + m2) - m3", stacklevel=2)


class ArcFace(_MarginSoftmax):
    """insightface's ArcFace(s=64.0, margin=0.5): psi(cos) = cos(theta + margin), logits
    scaled by s. grad_mode (keyword): 'detached' (default, insightface's) or 'exact'."""

    def __init__(self, s: float = 64.0, margin: float = 0.5, *, grad_mode: str = "detached") -> None:
        super().__init__(s, 1.0, margin, 0.0, 0, grad_mode)
        self.s, self.margin = s, margin


class CosFace(_MarginSoftmax):
    """insightface's CosFace(s=64.0, m=0.40): psi(cos) = cos - m, logits scaled by s. Its
    exact gradient is the straight-through one, so grad_mode (keyword) changes nothing."""

    def __init__(self, s: float = 64.0, m: float = 0.40, *, grad_mode: str = "detached") -> None:
        super().__init__(s, 1.0, 0.0, m, 0, grad_mode)
        self.s, self.m = s, m


# insightface's own losses.py classes, read by the attributes their constructors set, so
# that a script changing only its PartialFC_V2 import keeps its margin loss.
_INSIGHTFACE_ATTRIBUTES = {
    "CombinedMarginLoss": (("s", "m1", "m2", "m3", "interclass_filtering_threshold"), CombinedMarginLoss),
    "ArcFace": (("s", "margin"), ArcFace),
    "CosFace": (("s", "m"), CosFace),
}


def fused_margin(margin_loss: object) -> tuple[Margin, float]:
    """(Margin, scale) that fastmargin's kernels apply for an insightface margin loss.

    margin_loss: this module's CombinedMarginLoss, ArcFace or CosFace, or insightface's own
    (losses.py), whose gradient is the detached one; its interclass_filtering_threshold is
    the Margin's filter_threshold. Raises TypeError for any other callable: a function of
    the materialised logits cannot be fused into a kernel that never forms them.
    """
    if not isinstance(margin_loss, _MarginSoftmax):
        attributes, ours = _INSIGHTFACE_ATTRIBUTES.get(type(margin_loss).__name__, ((), None))
        if ours is None or not all(hasattr(margin_loss, a) for a in attributes):
            raise TypeError(
                f"PartialFC_V2 got margin_loss of type {type(margin_loss).__name__}: fastmargin fuses the margin "
                "into the kernel and cannot call a function on the logits; pass "
                "fastmargin.insightface.CombinedMarginLoss, ArcFace or CosFace (or insightface's own)")
        margin_loss = ours(*(getattr(margin_loss, a) for a in attributes))
    return margin_loss.margin_spec, margin_loss.scale


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class PartialFC_V2(PartialFC):  # noqa: N801 - insightface's name
    """insightface's PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate=1.0,
    fp16=False) on fastmargin.distributed.PartialFC (docs/design.md §6).

    margin_loss: CombinedMarginLoss, ArcFace or CosFace (this module's or insightface's):
        read once, here, as a Margin and a scale (fused_margin); kept as `margin_softmax`.
    embedding_size: D. num_classes: C, split by class across the ranks as insightface
        splits them: rank r holds [class_start, class_start + num_local).
    sample_rate: the share of this rank's negative classes kept each training step (every
        positive of the global batch is kept); 1.0 is the exact loss.
    fp16: the fused GEMM reads the embeddings and the weight in float16 and accumulates in
        fp32, as insightface's autocast linear does; the loss is fp32.
    backend, chunk_size (keywords): fastmargin's backend and class block, as for PartialFC.

    `weight` is (num_local, embedding_size) float32, initialised N(0, 0.01): insightface's
    name, layout and initialisation, so its per-rank state_dict ({'weight'}) loads here and
    back. With torch.distributed initialised the default process group is used; without
    it, the module is a world of one (fastmargin.distributed.LOCAL).

    forward(local_embeddings (B_r, D) float, local_labels (B_r,) or (B_r, 1) integer) ->
    the mean loss over the global batch's rows whose label is not -1, a scalar (float32;
    float64 for a module moved to float64), the same on every rank. B_r may differ between ranks and between steps. As insightface,
    the gradient reaching local_embeddings is world_size times d loss / d local_embeddings:
    DistributedDataParallel averages the backbone's gradients over the ranks, so the
    backbone receives the gradient of the global loss, at any world size. The weight's
    gradient is d loss / d weight.
    """

    _version = 2  # insightface's: its state_dict metadata says version 2

    def __init__(self, margin_loss: object, embedding_size: int, num_classes: int, sample_rate: float = 1.0,
                 fp16: bool = False, *, backend: str = "auto", chunk_size: int | None = None) -> None:
        margin, scale = fused_margin(margin_loss)
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(num_classes, embedding_size, scale=scale, m1=margin.m1, m2=margin.m2, m3=margin.m3,
                         grad_mode=margin.grad_mode, theta_policy=margin.theta_policy,
                         filter_threshold=margin.filter_threshold, ignore_index=-1,
                         sample_rate=sample_rate, backend=backend, chunk_size=chunk_size,
                         group=None if distributed else LOCAL,
                         operand_dtype=torch.float16 if fp16 else None)
        self.margin_softmax = margin_loss
        self.fp16 = fp16

    @property
    def num_local(self) -> int:
        """The number of classes this rank holds (insightface's name)."""
        return self.class_end - self.class_start

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """local_embeddings (B_r, D), local_labels (B_r,) or (B_r, 1), -1 ignored -> the global mean loss."""
        if local_labels.dim() == 2 and local_labels.shape[1] == 1:
            local_labels = local_labels.reshape(-1)
        if self.world_size > 1 and torch.is_grad_enabled() and local_embeddings.requires_grad:
            local_embeddings = _ScaleGradient.apply(local_embeddings, self.world_size)
        return super().forward(local_embeddings, local_labels.long())
