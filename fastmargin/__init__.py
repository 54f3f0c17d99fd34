"""fastmargin: fused margin-softmax losses (ArcFace, CosFace, SphereFace, sub-center
ArcFace, the combined margin) that never materialise the (B, C) logits.

    from fastmargin import ArcFaceLoss                  # pytorch-metric-learning drop-in
    loss = fastmargin.margin_cross_entropy(x, W, y, m2=0.5)   # the functional form
"""

from . import subcenter
from .backends import BACKENDS, BackendUnavailableError
from .functional import margin_cross_entropy
from .margins import Margin
from .modules import ArcFaceLoss, CombinedMarginLoss, CosFaceLoss, SphereFaceLoss, SubCenterArcFaceLoss

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "ArcFaceLoss",
    "BackendUnavailableError",
    "CombinedMarginLoss",
    "CosFaceLoss",
    "Margin",
    "SphereFaceLoss",
    "SubCenterArcFaceLoss",
    "margin_cross_entropy",
    "subcenter",
]
