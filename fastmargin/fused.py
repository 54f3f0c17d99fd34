"""A fused backend as torch.library custom ops (DESIGN §4), written once for every backend.

A backend computes the logits' row statistics (fastmargin.reference.row_statistics has
the contract): lse = log Σ_j exp z_ij, z_target = z_iy (0 where the label is outside
[0, C): an ignored row, or a target on another shard) and z_sum = Σ_j z_ij, each (B,) in
the compute dtype. Everything else of the loss (smoothing, ignore_index, reduction) is
fastmargin.loss, shared. A backend supplies

    forward(x, w, labels, *options) -> (lse, z_target, z_sum)
    backward(g_lse, g_target, g_sum, x, w, labels, lse, *options) -> (dx, dw)

with `options` as in OPTIONS_SCHEMA; its backward recomputes the logits and uses
dz_ij = g_lse_i p_ij + g_target_i [j = y_i] + g_sum_i (DESIGN §2), and returns each gradient
torch.empty_like its input (a dense input's strides: PML's W.t() gets a gradient whose
.t() is contiguous). register() makes them the custom ops fastmargin::<backend>_fwd /
_bwd with fake implementations (so torch.compile traces them) and an autograd formula
(so autograd sees one node). There is no double backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .margins import Margin
from .reference import compute_dtype

OPTIONS_SCHEMA = (
    "float scale, float m1, float m2, float m3, int sphere_m, float sphere_lambda, "
    "bool clamp_theta, bool detached, int sub_centers, int chunk"
)


def options(margin: Margin, scale: float, sub_centers: int, chunk: int) -> tuple:
    """The option values, in OPTIONS_SCHEMA's order."""
    return (
        scale, margin.m1, margin.m2, margin.m3, margin.sphere_m or 0, margin.sphere_lambda,
        margin.theta_policy == "clamp", margin.grad_mode == "detached", sub_centers, chunk,
    )


def register(backend: str, forward: Callable, backward: Callable,
             default_chunk: Callable[[int, int], int]) -> Callable:
    """Registers the ops; returns row_statistics(x, w, labels, margin, scale, sub_centers,
    chunk_size=None). default_chunk(B, K) gives the classes per block when chunk_size is None."""
    fwd = torch.library.custom_op(
        f"fastmargin::{backend}_fwd", forward, mutates_args=(),
        schema=f"(Tensor x, Tensor w, Tensor labels, {OPTIONS_SCHEMA}) -> (Tensor, Tensor, Tensor)",
    )
    bwd = torch.library.custom_op(
        f"fastmargin::{backend}_bwd", backward, mutates_args=(),
        schema=f"(Tensor g_lse, Tensor g_target, Tensor g_sum, Tensor x, Tensor w, Tensor labels, "
        f"Tensor lse, {OPTIONS_SCHEMA}) -> (Tensor, Tensor)",
    )

    @fwd.register_fake
    def _(x, w, labels, *opts):
        dtype = compute_dtype(x, w)
        return tuple(x.new_empty(x.shape[0], dtype=dtype) for _ in range(3))

    @bwd.register_fake
    def _(g_lse, g_target, g_sum, x, w, labels, lse, *opts):
        return torch.empty_like(x), torch.empty_like(w)

    def setup_context(ctx, inputs, output):
        x, w, labels, *opts = inputs
        ctx.save_for_backward(x, w, labels, output[0])
        ctx.opts = opts

    def backward_formula(ctx, g_lse, g_target, g_sum):
        x, w, labels, lse = ctx.saved_tensors
        g_lse, g_target, g_sum = (torch.zeros_like(lse) if g is None else g for g in (g_lse, g_target, g_sum))
        dx, dw = bwd(g_lse, g_target, g_sum, x, w, labels, lse, *ctx.opts)
        return dx, dw, None, *(None for _ in ctx.opts)

    fwd.register_autograd(backward_formula, setup_context=setup_context)

    def row_statistics(embeddings, weight, labels, margin, scale, sub_centers=1, chunk_size=None):
        chunk = chunk_size or default_chunk(embeddings.shape[0], sub_centers)
        return fwd(embeddings, weight, labels, *options(margin, scale, sub_centers, chunk))

    row_statistics.__doc__ = f"The {backend!r} backend's row statistics: see fastmargin.reference.row_statistics."
    return row_statistics
