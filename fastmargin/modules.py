"""The drop-in loss modules, each owning its class weights.

ArcFaceLoss, CosFaceLoss, SphereFaceLoss and SubCenterArcFaceLoss take
pytorch-metric-learning's (PML 2.x) constructor arguments, defaults and units, keep its
weight `W` of shape (embedding_size, num_classes * sub_centers), its initialisation, its
attributes (`margin` in PML's units, assignable) and helpers, and its dtype contract: W
follows the embeddings' dtype and device in place, except under autocast. PML's optional
parts (reducer, regularizers, collect_stats) are composed from PML's own objects over
fastmargin's per-row losses. CombinedMarginLoss is insightface arcface_torch's margin with
the classifier weight it lacks, in the F.linear layout (num_classes, embedding_size).
fastmargin's own options (backend, grad_mode, theta_policy, label_smoothing, ignore_index,
reduction, chunk_size) are keyword arguments a PML or insightface user never needs.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import math
import numbers
import sys
from collections.abc import Callable

import torch

from . import backends, checks, margins, reference, subcenter
from .functional import margin_loss
from .margins import Margin, sphereface_lambda

# fastmargin's own options, with their defaults, taken by every module as keywords.
_OPTIONS = {"backend": "auto", "label_smoothing": 0.0, "ignore_index": -100, "reduction": "mean",
            "chunk_size": None}


class _MarginLoss(torch.nn.Module):
    """What every module shares: the margin, the scale, the options."""

    # Keyword arguments a subclass takes besides its signature's and _OPTIONS, for the
    # unknown-keyword message.
    _extra_keywords: tuple[str, ...] = ()

    def __init__(self, margin: Margin, scale: float, sub_centers: int = 1, **options: object) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TypeError(self._unknown_keyword(unknown[0]))
        options = {**_OPTIONS, **options}
        backend = options["backend"]
        # Checked here, not at the first call: only the name, as where the module will run
        # (which device, which extension is built) is not known yet.
        if backend != "auto" and backend not in backends.BACKENDS:
            raise ValueError(f"{type(self).__name__}: {backends.unavailable_reason(str(backend))}")
        checks.check_options(options["label_smoothing"], options["reduction"], options["ignore_index"])
        self._margin = margin
        self.scale = checks.check_scale(scale)
        self.sub_centers = checks.check_positive_int("sub_centers", sub_centers)
        self.backend = backend
        self.label_smoothing = options["label_smoothing"]
        self.ignore_index = options["ignore_index"]
        self.reduction = options["reduction"]
        chunk_size = options["chunk_size"]
        self.chunk_size = chunk_size if chunk_size is None else checks.check_positive_int("chunk_size", chunk_size)

    def _unknown_keyword(self, name: str) -> str:
        # Python's own message would name _MarginLoss.__init__, which the user never called.
        cls = type(self)
        own = [p.name for p in inspect.signature(cls).parameters.values()
               if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        accepted = ", ".join([*own, *self._extra_keywords, *_OPTIONS])
        return f"{cls.__name__}() got an unexpected keyword argument {name!r}; it takes {accepted}"

    def current_margin(self) -> Margin:
        """The validated Margin the next forward uses."""
        return self._margin

    def _loss(self, embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
              reduction: str | None = None, margin: Margin | None = None, target_cos: torch.Tensor | None = None,
              extra: torch.Tensor | None = None) -> torch.Tensor:
        """embeddings (B, D), weight (C*K, D) any strides, labels (B,) -> the loss, reduced
        by `reduction` (default: the module's), in the embeddings' dtype (fp32 under
        autocast: the loss is computed in fp32 either way, docs/design.md §1). margin: the
        step's (default: current_margin()); target_cos (B,): the rows' target cosines where
        the caller has them; extra: a term added to the loss (a schedule's regulariser)."""
        loss, _ = margin_loss(
            embeddings, weight, labels, margin or self.current_margin(), self.scale,
            sub_centers=self.sub_centers, label_smoothing=self.label_smoothing, ignore_index=self.ignore_index,
            reduction=reduction or self.reduction, backend=self.backend, chunk_size=self.chunk_size,
            target_cos=target_cos,
        )
        if extra is not None:
            loss = loss + extra
        if torch.is_autocast_enabled(embeddings.device.type):
            return loss
        return loss.to(embeddings.dtype)


# PML's BaseMetricLossFunction keywords, all taken by the drop-ins.
_PML_KEYWORDS = ("weight_init_func", "reducer", "distance", "weight_regularizer", "weight_reg_weight",
                 "embedding_regularizer", "embedding_reg_weight", "collect_stats")


def _import_pml(submodule: str, needed_by: str) -> object:
    try:
        return importlib.import_module(f"pytorch_metric_learning.{submodule}")
    except ImportError as error:
        raise ImportError(f"{needed_by} composes pytorch-metric-learning's objects, which is not installed "
                          f"({error}): pip install pytorch-metric-learning") from None


def _pml_collect_stats_default() -> bool:
    # PML's default is its global c_f.COLLECT_STATS; if PML was never imported, nobody set it.
    common_functions = sys.modules.get("pytorch_metric_learning.utils.common_functions")
    return bool(getattr(common_functions, "COLLECT_STATS", False))


class _PMLMarginLoss(_MarginLoss):
    """PML's surface: W (D, C*K), forward(embeddings, labels, ...), its attributes and helpers.

    A subclass says which field of the Margin is PML's `margin` attribute and in which
    units the constructor and the attribute take it (_margin_field, _margin_units,
    _margin_to_field).
    """

    _extra_keywords = _PML_KEYWORDS
    _margin_field: str
    _margin_units: tuple[str, str]  # (the constructor's, the attribute's)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float,
        scale: float,
        spec: Margin,
        sub_centers: int = 1,
        *,
        weight_init_func: Callable[[torch.Tensor], object] | None = None,
        reducer: object = None,
        distance: object = None,
        weight_regularizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
        weight_reg_weight: float = 1,
        embedding_regularizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
        embedding_reg_weight: float = 1,
        collect_stats: bool | None = None,
        **options: object,
    ) -> None:
        super().__init__(spec, scale, sub_centers, **options)
        self._set_margin(margin, in_constructor=True)
        self.num_classes = checks.check_positive_int("num_classes", num_classes)
        self.embedding_size = checks.check_positive_int("embedding_size", embedding_size)
        self.distance = self._check_distance(distance)
        self.weight_regularizer = self._check_callable("weight_regularizer", weight_regularizer)
        self.weight_reg_weight = weight_reg_weight
        self.embedding_regularizer = self._check_callable("embedding_regularizer", embedding_regularizer)
        self.embedding_reg_weight = embedding_reg_weight
        self.reducer = self._build_reducer(self._check_callable("reducer", reducer))
        self.collect_stats = _pml_collect_stats_default() if collect_stats is None else collect_stats
        # What PML's record keepers read, in PML's order.
        self._record_these = [*(["embedding_reg_weight"] if embedding_regularizer is not None else []),
                              *(["weight_reg_weight"] if weight_regularizer is not None else []),
                              "num_classes", "margin", "scale"]
        if self.collect_stats:
            self._record_these_stats = ["avg_angle"]
            self.avg_angle = 0
        self.W = torch.nn.Parameter(torch.empty(embedding_size, num_classes * self.sub_centers))
        (weight_init_func or torch.nn.init.normal_)(self.W)

    # ---------------------------------------------------------------- margin, in PML's units

    @property
    def margin(self) -> float:
        """PML's attribute, in PML's units (ArcFace: radians, though the constructor takes
        degrees, as PML's np.radians(margin)). Assigning it, as PML users do to schedule
        the margin, validates the value and rebuilds the Margin the next forward uses."""
        return getattr(self._margin, self._margin_field)

    @margin.setter
    def margin(self, value: float) -> None:
        self._set_margin(value, in_constructor=False)

    def _margin_to_field(self, value: float, in_constructor: bool) -> float:
        return value

    def _set_margin(self, value: float, in_constructor: bool) -> None:
        cls = type(self).__name__
        where = f"{cls}(margin={value!r})" if in_constructor else f"{cls}.margin = {value!r}"
        units = self._margin_units[0 if in_constructor else 1]
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise TypeError(f"{where}: margin must be a real number, {units}; got {type(value).__name__}")
        try:
            field = self._margin_to_field(value, in_constructor)
            self._margin = dataclasses.replace(self._margin, **{self._margin_field: field})
        except (ValueError, TypeError, OverflowError):
            # The Margin speaks of m2, m3 and radians; this user called `margin` in PML's units.
            raise ValueError(f"{where} is out of range: margin is {units}") from None

    # ---------------------------------------------------------------- PML's optional parts

    def _check_callable(self, name: str, part: object) -> object:
        if part is not None and not callable(part):
            raise TypeError(f"{type(self).__name__}: {name} must be a pytorch-metric-learning {name.split('_')[-1]} "
                            f"(a callable), got {type(part).__name__}")
        return part

    def _check_distance(self, distance: object) -> object:
        """PML's margin losses assert CosineSimilarity; the fused kernels compute plain cosines."""
        if distance is None:
            return None
        cls = type(self).__name__
        cosine = _import_pml("distances", f"{cls}(distance=...)").CosineSimilarity
        if not isinstance(distance, cosine) or distance.p != 2 or distance.power != 1:
            raise TypeError(f"{cls}: distance={type(distance).__name__}(...) is not supported: the margin losses "
                            "are defined on the cosine (PML's assert CosineSimilarity too); leave distance unset "
                            "or pass CosineSimilarity() with its defaults")
        return distance

    def _build_reducer(self, reducer: object) -> object:
        """PML's ModuleWithRecordsAndReducer.set_reducer over the sub-losses this module
        returns; None (fastmargin's fused `reduction`) when no PML part asks for one."""
        sub_losses = ["loss", *(["weight_reg_loss"] if self.weight_regularizer is not None else []),
                      *(["embedding_reg_loss"] if self.embedding_regularizer is not None else [])]
        if reducer is None and len(sub_losses) == 1:
            return None
        given = [name for name, part in (("reducer", reducer), ("weight_regularizer", self.weight_regularizer),
                                         ("embedding_regularizer", self.embedding_regularizer)) if part is not None]
        cls = type(self).__name__
        if self.reduction != "mean":
            raise ValueError(f"{cls}: reduction={self.reduction!r} and pytorch-metric-learning's {', '.join(given)} "
                             "both reduce the loss: use one (reducers.DoNothingReducer() gives the per-row losses)")
        reducers = _import_pml("reducers", f"{cls}({', '.join(f'{name}=...' for name in given)})")
        if isinstance(reducer, (reducers.MultipleReducers, reducers.DoNothingReducer)):
            return reducer
        if len(sub_losses) == 1:
            return copy.deepcopy(reducer)
        return reducers.MultipleReducers({
            name: reducers.MeanReducer() if reducer is None else copy.deepcopy(reducer) for name in sub_losses
        })

    def reset_stats(self) -> None:
        """PML's: zeroes the recorded statistics (each forward does)."""
        for name in getattr(self, "_record_these_stats", ()):
            setattr(self, name, 0)

    # ---------------------------------------------------------------- PML's helpers

    def cast_types(self, dtype: torch.dtype, device: torch.device | str) -> None:
        """PML's contract: W moves to `device` and, outside autocast, to `dtype`, in place
        (W.data is replaced: the Parameter, and an optimizer's hold on it, stay). PML's own
        fix for its AMP bug leaves the dtype alone under autocast, so that the loss is fp32;
        here autocast is looked up on `device`'s type (PML asks CUDA's only)."""
        device = torch.device(device)
        if torch.is_autocast_enabled(device.type):
            dtype = self.W.dtype
        # Only when something changes: an unchanged W keeps its storage, and torch.compile
        # traces no .data assignment.
        if self.W.device != device or self.W.dtype != dtype:
            self.W.data = self.W.data.to(device=device, dtype=dtype)

    def get_cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """cos(x_i, class j), (B, num_classes), the max over a class's sub-centers, in the
        embeddings' dtype (W is cast out of place: PML needs W in that dtype already)."""
        weight = self.W.t() if self.W.dtype == embeddings.dtype else self.W.t().to(embeddings.dtype)
        return reference.cosine_logits(embeddings, weight, self.sub_centers)

    def get_angles(self, cosine_of_target_classes: torch.Tensor) -> torch.Tensor:
        """acos of the clamped cosines; with collect_stats, their mean in degrees is
        recorded as avg_angle (one host sync)."""
        angles = torch.acos(torch.clamp(cosine_of_target_classes, -1, 1))
        if self.collect_stats:
            with torch.no_grad():
                self.avg_angle = math.degrees(torch.mean(angles).item())
        return angles

    def get_target_mask(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) in the embeddings' dtype: 1 at each row's label, else 0."""
        mask = torch.zeros(len(labels), self.num_classes, dtype=embeddings.dtype, device=embeddings.device)
        mask[torch.arange(len(labels), device=embeddings.device), labels] = 1
        return mask

    def modify_cosine_of_target_classes(self, cosine_of_target_classes: torch.Tensor) -> torch.Tensor:
        """psi(cos) of the target columns (docs/design.md §1): PML's formula, with fastmargin's
        clamp of cos to 1 - 1e-7 and theta policy."""
        if self.collect_stats:
            self.get_angles(cosine_of_target_classes)
        return margins.psi(cosine_of_target_classes, self.current_margin())

    def scale_logits(self, logits: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return logits * self.scale

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The scaled cosine logits (B, num_classes) without margin, as PML computes them,
        in the embeddings' dtype; W is not moved."""
        return self.scale_logits(self.get_cosine(embeddings), embeddings)

    # ---------------------------------------------------------------- forward

    def _check_call(self, embeddings: object, labels: object) -> torch.Tensor:
        """Checks what must hold before W is cast or the labels moved; returns the labels
        on the embeddings' device, as PML moves them."""
        checks.check_types(embeddings, labels)
        checks.check_embedding_size(type(self).__name__, self.W.shape[0], embeddings)
        return labels.to(embeddings.device)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None = None,
        indices_tuple: object = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """embeddings (B, embedding_size), labels (B,) -> the loss (embeddings' dtype; fp32
        under autocast), or what PML's reducer returns."""
        self.reset_stats()
        if labels is None:
            raise ValueError("labels are required for this loss function")
        if indices_tuple is not None:
            raise ValueError(
                "indices_tuple (a miner's output) is not supported: a classification loss "
                "uses every row; drop the miner or weigh rows with reduction='none'"
            )
        # PML accepts the embeddings themselves as ref_emb, and ignores ref_labels without ref_emb.
        if ref_emb is not None and (ref_emb is not embeddings or ref_labels is not labels):
            raise ValueError("ref_emb is not supported for this loss function")
        labels = self._check_call(embeddings, labels)
        self.cast_types(embeddings.dtype, embeddings.device)
        if self.collect_stats:
            self.get_angles(self._target_cosines(embeddings, labels))
        if self.reducer is None:
            return self._loss(embeddings, self.W.t(), labels)
        return self._reduce(embeddings, labels)

    @torch.no_grad()
    def _target_cosines(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N,) each non-ignored row's cosine to its class (its nearest sub-center), without
        the (B, C) matrix."""
        stats = subcenter.sub_center_stats(embeddings, self.W.t(), labels, self.sub_centers,
                                           ignore_index=self.ignore_index)
        return stats.cos[stats.valid].amax(dim=1)

    def _reduce(self, embeddings: torch.Tensor, labels: torch.Tensor) -> object:
        """PML's BaseMetricLossFunction.forward over fastmargin's per-row losses: the loss
        dict, the regularizers' terms, then the reducer. Ignored rows (ignore_index, which
        PML lacks) are left out of the dict."""
        losses = self._loss(embeddings, self.W.t(), labels, reduction="none")
        valid = labels != self.ignore_index
        indices = torch.arange(len(labels), device=labels.device)
        loss_dict = {"loss": {"losses": losses[valid], "indices": indices[valid], "reduction_type": "element"}}
        for name, regularizer, weight, argument in (
            ("weight_reg_loss", self.weight_regularizer, self.weight_reg_weight, self.W.t()),
            ("embedding_reg_loss", self.embedding_regularizer, self.embedding_reg_weight, embeddings),
        ):
            if regularizer is not None:
                loss_dict[name] = {"losses": regularizer(argument) * weight, "indices": None,
                                   "reduction_type": "already_reduced"}
        return self.reducer(loss_dict, embeddings, labels)


class ArcFaceLoss(_PMLMarginLoss):
    """ArcFace, psi = cos(theta + m): PML's ArcFaceLoss, margin in degrees (28.6 = 0.5 rad);
    the `margin` attribute holds radians, as PML's.

    Beyond theta = pi - m the default theta_policy='fallback' uses cos - m*sin(m), as PML.
    PML's gradient is infinite at cos = +-1 (acos' there); ours clamps cos to 1 - 1e-7.
    """

    _margin_field = "m2"
    _margin_units = ("in degrees, in [0, 180) (28.6 degrees is 0.5 radians)",
                     "in radians, in [0, pi), as PML stores it (the constructor takes degrees: "
                     "0.5 radians is 28.6 degrees)")

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6, scale: float = 64,
                 *, grad_mode: str = "exact", theta_policy: str = "fallback", **options: object) -> None:
        spec = Margin(grad_mode=grad_mode, theta_policy=theta_policy)
        super().__init__(num_classes, embedding_size, margin, scale, spec, **options)

    def _margin_to_field(self, value: float, in_constructor: bool) -> float:
        return math.radians(value) if in_constructor else float(value)


class CosFaceLoss(_PMLMarginLoss):
    """CosFace (AM-Softmax), psi = cos - m: PML's CosFaceLoss."""

    _margin_field = "m3"
    _margin_units = ("the cosine margin, in [0, 2] (0.35 is usual)",) * 2

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.35, scale: float = 64,
                 **options: object) -> None:
        super().__init__(num_classes, embedding_size, margin, scale, Margin(), **options)

    def _margin_to_field(self, value: float, in_constructor: bool) -> float:
        return float(value)


class SphereFaceLoss(_PMLMarginLoss):
    """SphereFace (A-Softmax), psi = (-1)^k cos(m*theta) - 2k, logits scaled by s*||x||.

    PML's SphereFaceLoss (integer margin, default 4, truncated by int() as PML; scale 1).
    annealing=True turns on the original lambda schedule, lambda = max(lambda_min,
    base*(1 + gamma*it)^-power): the iteration counter is the buffer `iteration`, saved in
    the state_dict, advanced by each forward in training mode. PML has no annealing, and
    without it the state_dict is PML's.
    """

    _margin_field = "sphere_m"
    _margin_units = ("SphereFace's integer angle multiplier, in [1, 16] (4 is usual)",) * 2

    def __init__(self, num_classes: int, embedding_size: int, margin: int = 4, scale: float = 1,
                 *, grad_mode: str = "exact", annealing: bool = False,
                 lambda_base: float = 1000.0, lambda_gamma: float = 0.12,
                 lambda_power: float = 1.0, lambda_min: float = 5.0, **options: object) -> None:
        spec = Margin(sphere_m=1, grad_mode=grad_mode)
        super().__init__(num_classes, embedding_size, margin, scale, spec, **options)
        self.annealing = annealing
        self.lambda_schedule = dict(base=lambda_base, gamma=lambda_gamma, power=lambda_power,
                                    lambda_min=lambda_min)
        if annealing:
            sphereface_lambda(0, **self.lambda_schedule)  # fails early on a bad schedule
            self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    def _margin_to_field(self, value: float, in_constructor: bool) -> int:
        return int(value)  # PML's init_margin: self.margin = int(self.margin)

    def current_margin(self) -> Margin:
        if not self.annealing:
            return self._margin
        return dataclasses.replace(self._margin, sphere_lambda=sphereface_lambda(int(self.iteration),
                                                                                 **self.lambda_schedule))

    def scale_logits(self, logits: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return logits * torch.norm(embeddings, p=2, dim=1).unsqueeze(1) * self.scale

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None,
                indices_tuple: object = None, ref_emb: torch.Tensor | None = None,
                ref_labels: torch.Tensor | None = None) -> torch.Tensor:
        loss = super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if self.annealing and self.training:
            self.iteration += 1
        return loss


class SubCenterArcFaceLoss(ArcFaceLoss):
    """Sub-center ArcFace: K = sub_centers columns of W per class (column c*K + k), cos the
    max over them before the margin; PML's SubCenterArcFaceLoss (margin in degrees, the
    attribute in radians)."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6, scale: float = 64,
                 sub_centers: int = 3, *, grad_mode: str = "exact", theta_policy: str = "fallback",
                 **options: object) -> None:
        spec = Margin(grad_mode=grad_mode, theta_policy=theta_policy)
        _PMLMarginLoss.__init__(self, num_classes, embedding_size, margin, scale, spec, sub_centers, **options)

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
        leaves uninitialised memory). W follows the embeddings' dtype and device as in
        forward (PML casts it here too). Rows labelled ignore_index take no part. PML
        returns the tuple even when return_dominant_centers=False; we return what is asked.
        """
        labels = self._check_call(embeddings, labels)
        self.cast_types(embeddings.dtype, embeddings.device)
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
    N(0, 0.01) as PartialFC's. insightface computes ArcFace (m1 = 1, m3 = 0) and, for any
    m3 > 0, CosFace, ignoring m1 and m2 then, and raises otherwise; every combination works
    here, all three margins applied. insightface's ArcFace branch is the detached
    gradient: pass grad_mode='detached' for its numbers in backward too.

    Half-precision embeddings outside autocast meet `weight` rounded to their dtype out of
    place (the parameter keeps its dtype); under autocast `weight` is used as it is.
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
        checks.check_types(embeddings, labels)
        checks.check_embedding_size(type(self).__name__, self.weight.shape[1], embeddings)
        weight = self.weight
        if not torch.is_autocast_enabled(embeddings.device.type) and weight.dtype != embeddings.dtype:
            weight = weight.to(embeddings.dtype)
        return self._loss(embeddings, weight, labels)
