"""fastmargin: fused margin-softmax losses (ArcFace, CosFace, SphereFace, sub-center
ArcFace, the combined margin, AdaFace, ElasticFace, MagFace, CurricularFace) that never
materialise the (B, C) logits.

    from fastmargin import ArcFaceLoss                  # pytorch-metric-learning drop-in
    loss = fastmargin.margin_cross_entropy(x, W, y, m2=0.5)   # the functional form
"""

from . import subcenter
from .adaptive import AdaFaceLoss, CurricularFaceLoss, ElasticArcFaceLoss, ElasticCosFaceLoss, MagFaceLoss
from .backends import BACKENDS, BackendUnavailableError
from .functional import margin_cross_entropy
from .margins import Margin
from .modules import ArcFaceLoss, CombinedMarginLoss, CosFaceLoss, SphereFaceLoss, SubCenterArcFaceLoss

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "AdaFaceLoss",
    "ArcFaceLoss",
    "BackendUnavailableError",
    "CombinedMarginLoss",
    "CosFaceLoss",
    "CurricularFaceLoss",
    "ElasticArcFaceLoss",
    "ElasticCosFaceLoss",
    "MagFaceLoss",
    "Margin",
    "SphereFaceLoss",
    "SubCenterArcFaceLoss",
    "margin_cross_entropy",
    "subcenter",
]
