"""Input checks shared by the functional API and the modules; each error says what to do.

The label range check reads the labels on the host: one device sync per call on a GPU
(under torch.compile it is an in-graph assertion instead, with a shorter message).
NaN or inf in embeddings or weight is not checked (that would be a second sync): it
propagates to the loss and gradients, as in torch.nn.functional.cross_entropy.
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def check_positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_scale(scale: object) -> float:
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale={scale!r}: the logit scale s must be finite and > 0 (64 is usual)")
    return float(scale)


def check_options(label_smoothing: object, reduction: object, ignore_index: object) -> None:
    if not isinstance(label_smoothing, numbers.Real) or isinstance(label_smoothing, bool) \
            or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing!r} must be a number in [0, 1)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: use one of {REDUCTIONS}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def _check_tensor(name: str, t: object, kind: str = "a torch.Tensor") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be {kind}, got {type(t).__name__}: convert it with torch.as_tensor({name})")


def _check_float(name: str, t: object) -> torch.Tensor:
    _check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; use one of float16, bfloat16, float32, float64")
    if t.layout != torch.strided:
        raise TypeError(f"{name} is a {t.layout} tensor; pass a dense one ({name}.to_dense())")
    return t


def check_types(embeddings: object, labels: object) -> None:
    """What a module checks before it touches the tensors (moves the labels, casts its
    weight to the embeddings' dtype): float embeddings, labels a tensor. The rest is
    check_inputs'."""
    _check_float("embeddings", embeddings)
    _check_tensor("labels", labels, "a torch.Tensor of class indices")


def check_embedding_size(owner: str, embedding_size: int, embeddings: torch.Tensor) -> None:
    """A module's own class weights fix D: a mismatch is told in the module's terms, not as
    a `weight` of shape (C*K, D) that its caller never passed."""
    if embeddings.dim() == 2 and embeddings.shape[1] != embedding_size:
        raise ValueError(
            f"{owner} holds class weights of embedding_size {embedding_size}, but the embeddings have "
            f"dim {embeddings.shape[1]}: pass embeddings of shape (batch, {embedding_size}) or build "
            f"{owner} with embedding_size={embeddings.shape[1]}"
        )


def check_inputs(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    sub_centers: int,
    ignore_index: int,
    num_classes: int | None = None,
) -> int:
    """Checks shapes, dtypes, devices and label range; returns the number of classes C.

    embeddings (B, D) float, weight (C*K, D) float (any strides), labels (B,) integer.
    num_classes: the label range when weight holds a shard of the classes (else C*K / K).
    """
    _check_float("embeddings", embeddings)
    _check_float("weight", weight)
    _check_tensor("labels", labels, "a torch.Tensor of class indices")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be 2-D (batch, dim), got shape {tuple(embeddings.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (num_classes * sub_centers, dim), got shape {tuple(weight.shape)}")
    batch, dim = embeddings.shape
    if weight.shape[1] != dim:
        hint = " (a (dim, num_classes) weight, as pytorch-metric-learning keeps W, is passed as W.t())"
        hint = hint if weight.shape[0] == dim else ""
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} but embeddings have dim {dim}: weight must be "
            f"(num_classes * sub_centers, {dim}){hint}"
        )
    if dim < 1:
        raise ValueError("embeddings must have dim >= 1")
    check_positive_int("sub_centers", sub_centers)
    rows = weight.shape[0]
    if rows < sub_centers or rows % sub_centers:
        raise ValueError(
            f"weight has {rows} rows, not a positive multiple of sub_centers={sub_centers}: "
            "it must hold num_classes * sub_centers rows, class-major (row c*K + k)"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class indices, got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(
            f"labels must have shape ({batch},), one per embedding row, got {tuple(labels.shape)}"
        )
    if not (embeddings.device == weight.device == labels.device):
        raise ValueError(
            f"embeddings ({embeddings.device}), weight ({weight.device}) and labels ({labels.device}) "
            "must be on one device: move them with .to(device)"
        )
    num_classes = rows // sub_centers if num_classes is None else num_classes
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if torch.compiler.is_compiling():
        # A traced graph cannot branch on data: the check runs inside it instead.
        torch._assert_async(~bad.any(), "labels must be class indices in [0, C) or ignore_index")
    elif labels.device.type == "meta":
        raise ValueError("embeddings, weight and labels are on the meta device, which holds no values: "
                         "the loss needs real tensors (for shapes only, trace the call with torch.compile)")
    elif batch and bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels[{i}] = {int(labels[i])} is outside [0, {num_classes}) and is not "
            f"ignore_index={ignore_index}: labels must be class indices or ignore_index"
        )
    return num_classes
