"""A fused backend as torch.library custom ops (docs/design.md §2), written once for every backend.

A backend computes the logits' row statistics (fastmargin.reference.row_statistics has
the contract): lse = log Σ_j exp z_ij, z_target = z_iy (0 where the label is outside
[0, C): an ignored row, or a target on another shard) and z_sum = Σ_j z_ij, each (B,) in
the compute dtype. Everything else of the loss (smoothing, ignore_index, reduction) is
fastmargin.loss, shared. A backend supplies

    forward(x, w, labels, params, flags, sub_centers, chunk, allow_tf32) -> (lse, z_target, z_sum)
    backward(g_lse, g_target, g_sum, x, w, labels, lse, params, flags, sub_centers, chunk,
             allow_tf32) -> (dx, dw)

where (params, flags) is the margin lowered once per call (fastmargin.margins.lower; the
kernels compute in params' dtype), chunk the backend's class block or split (its
`default_chunk` when the user gives none) and allow_tf32 whether fp32 GEMM operands may be
rounded to tf32 on a GPU (torch's setting; CPU kernels and the Triton interpreter compute
exact fp32 whatever it says), read once in forward and carried to backward, so that
backward recomputes the cosines the forward's lse saw. The backward recomputes the logits and uses
dz_ij = g_lse_i p_ij + g_target_i [j = y_i] + g_sum_i (docs/design.md §3), and returns each
gradient torch.empty_like its input (a dense input's strides: PML's W.t() gets a gradient
whose .t() is contiguous). register() makes them the custom ops fastmargin::<backend>_fwd /
_bwd, with the op-level input checks (check_op_inputs, the only ones: kernels trust them),
fake implementations (so torch.compile traces them) and an autograd formula (so autograd
sees one node). There is no double backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .margins import NUM_PARAMS, LoweredMargin, Margin, lower, target_value
from .reference import compute_dtype, target_cosines

OP_ARGS = "Tensor params, int[] flags, int sub_centers, int chunk, bool allow_tf32"


# Dynamo cannot trace torch's settings getters: a compiled step reads the setting once, at
# trace time, like any other Python constant it specialises on.
@torch.compiler.assume_constant_result
def tf32_allowed() -> bool:
    """Whether torch lets fp32 matmuls use tf32 on CUDA. torch's new API
    (torch.backends.cuda.matmul.fp32_precision, "none" deferring to torch.backends.fp32_precision)
    is read where it exists: the legacy allow_tf32 raises once a user has set the new one."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return precision == "tf32"


def check_op_inputs(backend: str, device_type: str, x, w, labels, params, flags, sub_centers, chunk) -> None:
    """The ops' own checks (fastmargin.checks has the user-facing ones, with more words)."""
    where = f"fastmargin::{backend}"
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"{where}: x must be (B, D) and w (C*K, D), got {tuple(x.shape)} and {tuple(w.shape)}")
    if sub_centers < 1 or w.shape[0] < sub_centers or w.shape[0] % sub_centers:
        raise ValueError(f"{where}: w has {w.shape[0]} rows, not a positive multiple of sub_centers={sub_centers}")
    if labels.dtype != torch.int64 or labels.shape != (x.shape[0],):
        raise ValueError(f"{where}: labels must be int64 of shape ({x.shape[0]},), got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if params.dtype != compute_dtype(x, w) or params.dim() != 2 or params.shape[0] != NUM_PARAMS \
            or params.shape[1] not in (1, x.shape[0]):
        raise ValueError(f"{where}: params must be ({NUM_PARAMS}, 1 or B) in the compute dtype "
                         f"{compute_dtype(x, w)}, got {params.dtype} {tuple(params.shape)}")
    if len(flags) != 4:
        raise ValueError(f"{where}: flags must be (kind, sphere_m, nontarget, detached), got {list(flags)}")
    if chunk < 0:
        raise ValueError(f"{where}: chunk must be >= 0, got {chunk}")
    if not (x.device == w.device == labels.device == params.device):
        raise ValueError(f"{where}: x, w, labels and params are on {x.device}, {w.device}, {labels.device}, "
                         f"{params.device}: they must share one")
    if x.device.type != device_type:
        raise ValueError(f"{where}: the kernels take {device_type} tensors, these are on {x.device.type}")


def register(backend: str, forward: Callable, backward: Callable, device_type: str,
             default_chunk: Callable[[int, int], int]) -> Callable:
    """Registers the ops for tensors of `device_type`; returns row_statistics(x, w, labels,
    margin, scale, sub_centers, chunk_size=None). default_chunk(B, K) gives chunk when
    chunk_size is None."""

    def checked_forward(x, w, labels, params, flags, sub_centers, chunk, allow_tf32):
        check_op_inputs(backend, device_type, x, w, labels, params, flags, sub_centers, chunk)
        return forward(x, w, labels, params, flags, sub_centers, chunk, allow_tf32)

    def checked_backward(g_lse, g_target, g_sum, x, w, labels, lse, params, flags, sub_centers, chunk, allow_tf32):
        check_op_inputs(backend, device_type, x, w, labels, params, flags, sub_centers, chunk)
        return backward(g_lse, g_target, g_sum, x, w, labels, lse, params, flags, sub_centers, chunk, allow_tf32)

    fwd = torch.library.custom_op(
        f"fastmargin::{backend}_fwd", checked_forward, mutates_args=(),
        schema=f"(Tensor x, Tensor w, Tensor labels, {OP_ARGS}) -> (Tensor, Tensor, Tensor)",
    )
    bwd = torch.library.custom_op(
        f"fastmargin::{backend}_bwd", checked_backward, mutates_args=(),
        schema=f"(Tensor g_lse, Tensor g_target, Tensor g_sum, Tensor x, Tensor w, Tensor labels, "
        f"Tensor lse, {OP_ARGS}) -> (Tensor, Tensor)",
    )

    @fwd.register_fake
    def _(x, w, labels, params, *opts):
        return tuple(x.new_empty(x.shape[0], dtype=params.dtype) for _ in range(3))

    @bwd.register_fake
    def _(g_lse, g_target, g_sum, x, w, labels, lse, *opts):
        return torch.empty_like(x), torch.empty_like(w)

    def setup_context(ctx, inputs, output):
        x, w, labels, params, *opts = inputs
        ctx.save_for_backward(x, w, labels, output[0], params)
        ctx.opts = opts

    def backward_formula(ctx, g_lse, g_target, g_sum):
        x, w, labels, lse, params = ctx.saved_tensors
        g_lse, g_target, g_sum = (torch.zeros_like(lse) if g is None else g for g in (g_lse, g_target, g_sum))
        dx, dw = bwd(g_lse, g_target, g_sum, x, w, labels, lse, params, *ctx.opts)
        return dx, dw, None, None, *(None for _ in ctx.opts)

    fwd.register_autograd(backward_formula, setup_context=setup_context)

    def row_statistics(embeddings, weight, labels, margin: Margin, scale: float, sub_centers=1, chunk_size=None,
                       target_cos=None):
        if target_cos is None and (margin.needs_target_cos or margin.requires_grad):
            target_cos = target_cosines(embeddings, weight, labels, sub_centers)
        lowered = lower(margin, scale, compute_dtype(embeddings, weight), embeddings.device, target_cos)
        chunk = chunk_size or default_chunk(embeddings.shape[0], sub_centers)
        stats = fwd(embeddings, weight, labels, lowered.params.detach(), list(lowered.flags), sub_centers, chunk,
                    tf32_allowed())
        if margin.requires_grad:
            stats = with_margin_gradient(stats, labels, target_cos, lowered, weight.shape[0] // sub_centers)
        return stats

    row_statistics.__doc__ = f"The {backend!r} backend's row statistics: see fastmargin.reference.row_statistics."
    return row_statistics


def with_margin_gradient(stats, labels: torch.Tensor, target_cos: torch.Tensor, lowered: LoweredMargin,
                         num_classes: int):
    """The statistics (lse, z_target, z_sum) with the gradient in the margin tensors that the
    ops do not return, values unchanged.

    A margin moves only the target logit z_iy = S_i psi(c_iy; m_i). With delta_i = z_iy -
    z_iy.detach(), zero in value but d delta_i / d m_i = dz_iy / dm_i, and p_iy = exp(z_iy -
    lse_i) = d lse_i / d z_iy, the tensors lse + p_iy delta, z_target + delta, z_sum + delta
    have the op's values and, in m, the exact first derivatives. c_iy is target_cos (the
    gather-dot pre-pass: its rounding differs from the kernel's GEMM only in the last bits).
    """
    lse, z_target, z_sum = stats
    scale = lowered.params[0]
    z = scale * target_value(target_cos.to(lowered.params.dtype), lowered.params, lowered.flags)
    has_target = (labels >= 0) & (labels < num_classes)
    delta = torch.where(has_target, z - z.detach(), 0)
    return lse + torch.exp(z_target - lse).detach() * delta, z_target + delta, z_sum + delta
