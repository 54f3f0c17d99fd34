"""Sub-center ArcFace data cleaning (Deng et al., TPAMI): dominant sub-centers, outliers,
purification.

A model trained with K sub-centers per class (docs/design.md §1) gathers a class's clean samples
at one sub-center and its noisy or hard samples at the others. Per class, the dominant
sub-center is the one most of the class's samples are nearest to; a sample whose angle to
its class's dominant sub-center exceeds a threshold (75 degrees in the paper) is an
outlier. Purification drops the outliers, removes the classes left without samples and
renumbers the rest 0..C'-1, ready for retraining a plain ArcFace.

One pass over the data in batches: each sample is compared with its own class's K
sub-centers only, gathered per batch (B, K, D), never with all classes, so memory is
O(batch_size * K * D) for the batch plus O(N * K) for the kept cosines and O(C * K) for
the vote counts. No loop over classes, no (B, C) matrix.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import checks
from .margins import NORM_EPS
from .reference import compute_dtype

# Rows per batch. A batch holds its gathered sub-centers twice (as gathered, then
# normalised and multiplied in place), batch_size * K * D values each: at K = 3, D = 512,
# fp32, 2 * 100 MB, and large enough that the per-batch overhead vanishes on a CPU or a GPU.
DEFAULT_BATCH_SIZE = 16384

PAPER_THRESHOLD = 75.0  # degrees, the TPAMI paper's and pytorch-metric-learning's default

# purify warns when its outliers are more than this share of the samples: noisy datasets
# hold tens of percent of noise, while a threshold given in radians by mistake (1.3 for 75
# degrees) drops nearly everything.
MOST_DROPPED = 0.5


@dataclass(frozen=True)
class SubCenterStats:
    """What one pass over (embeddings, labels) finds against a sub-center weight.

    N samples, C classes, K sub-centers per class; tensors live on the embeddings' device.

    Attributes:
        labels: (N,) int64, the labels as given (ignore_index rows included).
        valid: (N,) bool, the rows whose label is not ignore_index.
        cos: (N, K) float32 (float64 if an input is), cos(x_i, w_{y_i, k}) to each of the
            sample's own class's sub-centers; NaN at ignored rows.
        votes: (C, K) int64, per class how many of its samples are nearest each sub-center.
        dominant: (C,) int64, each class's dominant sub-center, the arg-max of its votes
            (the lowest index among equal counts, as PML's argmax; 0 for absent classes).
    """

    labels: torch.Tensor
    valid: torch.Tensor
    cos: torch.Tensor
    votes: torch.Tensor
    dominant: torch.Tensor

    @property
    def num_classes(self) -> int:
        return self.votes.shape[0]

    @property
    def sub_centers(self) -> int:
        return self.votes.shape[1]

    @property
    def present(self) -> torch.Tensor:
        """(C,) bool: the classes with at least one (non-ignored) sample."""
        return self.votes.sum(dim=1) > 0

    def dominant_rows(self) -> torch.Tensor:
        """(C,) int64: the row c*K + dominant[c] of each class's dominant sub-center in the
        (C*K, D) weight, which is column c*K + dominant[c] of PML's W (D, C*K)."""
        classes = torch.arange(self.num_classes, device=self.dominant.device)
        return classes * self.sub_centers + self.dominant

    def cos_to_dominant(self) -> torch.Tensor:
        """(N,) cos of each sample to its class's dominant sub-center; NaN at ignored rows."""
        own_dominant = self.dominant[torch.where(self.valid, self.labels, 0)]
        return self.cos.gather(1, own_dominant.unsqueeze(1)).squeeze(1)

    def is_outlier(self, threshold: float = PAPER_THRESHOLD) -> torch.Tensor:
        """(N,) bool: the angle to the dominant sub-center exceeds `threshold` degrees,
        tested as cos < cos(threshold) (as PML). Ignored rows are never outliers."""
        cos_threshold = math.cos(math.radians(_check_threshold(threshold)))
        return self.valid & (self.cos_to_dominant() < cos_threshold)

    def outliers(self, threshold: float = PAPER_THRESHOLD) -> torch.Tensor:
        """(n_outliers,) int64 row indices, in PML's order: grouped by class in ascending
        class order, ascending within a class."""
        rows = self.is_outlier(threshold).nonzero().flatten()
        return rows[torch.sort(self.labels[rows], stable=True).indices]

    def dominant_share(self) -> torch.Tensor:
        """(C,) float64: the fraction of each class's samples nearest its dominant
        sub-center (1 for a class whose samples all agree); NaN for absent classes."""
        total = self.votes.sum(dim=1)
        top = self.votes.gather(1, self.dominant.unsqueeze(1)).squeeze(1)
        return torch.where(total > 0, top.double() / total.clamp(min=1), math.nan)


def sub_center_stats(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    sub_centers: int,
    *,
    ignore_index: int = -100,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
) -> SubCenterStats:
    """One batched pass: each sample's cosines to its class's K sub-centers, then the votes
    and the dominant sub-center of every class.

    Args:
        embeddings: (N, D) float, unnormalised. May be a CPU tensor over a memory-mapped
            array: it is read one batch at a time.
        weight: (C*K, D) float, class-major rows (row c*K + k), any strides: PML's
            SubCenterArcFaceLoss.W, which is (D, C*K), is passed as W.t() without a copy
            (on a CPU a contiguous weight reads about 2x faster, for a copy of W).
        labels: (N,) integer class indices in [0, C), or ignore_index.
        sub_centers: K.
        ignore_index: label of rows that take no part (no vote, never an outlier).
        batch_size: rows per batch (see DEFAULT_BATCH_SIZE for the memory it costs).
        progress: wraps the iterable of batch starts, e.g. a tqdm; None for none.

    The cosines are computed in float32 (float64 if an input is), whatever the input dtype.
    """
    num_classes = checks.check_inputs(embeddings, weight, labels, sub_centers, ignore_index)
    checks.check_positive_int("batch_size", batch_size)
    k = sub_centers
    dtype = compute_dtype(embeddings, weight)
    labels = labels.long()
    valid = labels != ignore_index
    label_or_0 = torch.where(valid, labels, 0)
    # (C, K, D) view of the weight, no copy whatever its strides: row c*K + k -> [c, k].
    per_class = weight.unflatten(0, (num_classes, k))
    cos = torch.empty(len(labels), k, dtype=dtype, device=embeddings.device)
    starts = range(0, len(labels), batch_size)
    for start in progress(starts) if progress is not None else starts:
        end = min(start + batch_size, len(labels))
        # Contiguous rows: a gather from W.t() keeps W's strides, and a sum along a strided
        # dim is slower and rounds differently from the same sum over contiguous memory.
        x_hat = F.normalize(embeddings[start:end].to(dtype).contiguous(), dim=1, eps=NORM_EPS)
        w_hat = F.normalize(per_class[label_or_0[start:end]].to(dtype).contiguous(), dim=2, eps=NORM_EPS)
        # A multiply and a row sum rather than a batched GEMM: each row's sum then runs in
        # the same order whatever the batch size, so results do not depend on batching.
        cos[start:end] = w_hat.mul_(x_hat.unsqueeze(1)).sum(dim=2)
    # The nearest sub-center is the first arg-max, as PML's torch.argmax. Votes are counted
    # into the flat (C*K,) index c*K + k; ignored rows add 0.
    nearest = cos.argmax(dim=1)
    cos.masked_fill_(~valid.unsqueeze(1), math.nan)
    votes = torch.zeros(num_classes * k, dtype=torch.long, device=embeddings.device)
    votes.index_add_(0, label_or_0 * k + nearest, valid.long())
    votes = votes.view(num_classes, k)
    return SubCenterStats(labels=labels, valid=valid, cos=cos, votes=votes, dominant=votes.argmax(dim=1))


@dataclass(frozen=True)
class Purified:
    """The clean subset.

    Attributes:
        kept_indices: (N',) int64, ascending row indices of the kept samples.
        new_labels: (N',) int64, each kept sample's label, contiguous in 0..C'-1 (the
            surviving classes renumbered in ascending order of their old labels).
        class_map: (C,) int64, old label -> new label, -1 for a removed class (one left
            without samples, or that had none).
    """

    kept_indices: torch.Tensor
    new_labels: torch.Tensor
    class_map: torch.Tensor

    @property
    def num_classes(self) -> int:
        """C', the classes left."""
        return int((self.class_map >= 0).sum())


def purify(stats: SubCenterStats, threshold: float = PAPER_THRESHOLD) -> Purified:
    """Drops the outliers at `threshold` degrees (and the ignored rows, which belong to no
    class), removes the classes left empty and renumbers the rest contiguously.

    Warns (UserWarning) when the outliers are more than MOST_DROPPED of the samples not
    ignored, saying how many and that the threshold is in degrees."""
    outlier = stats.is_outlier(threshold)
    samples, dropped = int(stats.valid.sum()), int(outlier.sum())
    if dropped > MOST_DROPPED * samples:
        warnings.warn(_dropped_most(threshold, dropped, samples), stacklevel=2)
    kept = stats.valid & ~outlier
    kept_indices = kept.nonzero().flatten()
    old_labels = stats.labels[kept_indices]
    survives = torch.zeros(stats.num_classes, dtype=torch.bool, device=kept.device)
    survives[old_labels] = True
    class_map = torch.where(survives, survives.long().cumsum(0) - 1, -1)
    return Purified(kept_indices=kept_indices, new_labels=class_map[old_labels], class_map=class_map)


def _dropped_most(threshold: float, dropped: int, samples: int) -> str:
    message = (f"threshold {threshold:g} degrees makes {dropped} of {samples} samples "
               f"({dropped / samples:.0%}) outliers: the threshold is an angle in degrees, "
               f"{PAPER_THRESHOLD:g} in the paper")
    if threshold <= math.pi:
        message += f" ({threshold:g} radians would be {math.degrees(threshold):.1f} degrees)"
    return message


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 <= threshold <= 180:
        raise ValueError(f"threshold={threshold!r} must be an angle in degrees in [0, 180] "
                         "(the paper uses 75)")
    return float(threshold)
