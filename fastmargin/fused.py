"""A fused backend as torch.library custom ops (DESIGN §4), written once for every backend.

A backend supplies two functions over the same arguments:
    forward(x, w, labels, *options) -> (loss_rows (B,), lse (B,))   compute dtype
    backward(grad_rows, x, w, labels, lse, *options) -> (dx like x, dw like w, contiguous)
with `options` as in OPTIONS_SCHEMA. register() makes them the custom ops
fastmargin::<backend>_fwd / _bwd with fake implementations (so torch.compile traces them)
and an autograd formula (so autograd sees one node), and returns the function that
fastmargin.backends dispatches to, with the contract of fastmargin.reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .margins import Margin
from .reference import compute_dtype, reduce_rows

OPTIONS_SCHEMA = (
    "float scale, float m1, float m2, float m3, int sphere_m, float sphere_lambda, "
    "bool clamp_theta, bool detached, int sub_centers, float label_smoothing, "
    "int ignore_index, int chunk"
)


def options(margin: Margin, scale: float, sub_centers: int, label_smoothing: float,
            ignore_index: int, chunk: int) -> tuple:
    """The option values, in OPTIONS_SCHEMA's order."""
    return (
        scale, margin.m1, margin.m2, margin.m3, margin.sphere_m or 0, margin.sphere_lambda,
        margin.theta_policy == "clamp", margin.grad_mode == "detached", sub_centers,
        label_smoothing, ignore_index, chunk,
    )


def register(backend: str, forward: Callable, backward: Callable, default_chunk: int) -> Callable:
    fwd = torch.library.custom_op(
        f"fastmargin::{backend}_fwd", forward, mutates_args=(),
        schema=f"(Tensor x, Tensor w, Tensor labels, {OPTIONS_SCHEMA}) -> (Tensor, Tensor)",
    )
    bwd = torch.library.custom_op(
        f"fastmargin::{backend}_bwd", backward, mutates_args=(),
        schema=f"(Tensor grad_rows, Tensor x, Tensor w, Tensor labels, Tensor lse, {OPTIONS_SCHEMA}) "
        "-> (Tensor, Tensor)",
    )

    @fwd.register_fake
    def _(x, w, labels, *opts):
        dtype = compute_dtype(x, w)
        return x.new_empty(x.shape[0], dtype=dtype), x.new_empty(x.shape[0], dtype=dtype)

    @bwd.register_fake
    def _(grad_rows, x, w, labels, lse, *opts):
        return torch.empty_like(x), w.new_empty(w.shape)

    def setup_context(ctx, inputs, output):
        x, w, labels, *opts = inputs
        ctx.save_for_backward(x, w, labels, output[1])
        ctx.opts = opts
        ctx.mark_non_differentiable(output[1])  # lse is reported, not differentiated

    def backward_formula(ctx, grad_rows, _grad_lse):
        x, w, labels, lse = ctx.saved_tensors
        dx, dw = bwd(grad_rows, x, w, labels, lse, *ctx.opts)
        return dx, dw, None, *(None for _ in ctx.opts)

    fwd.register_autograd(backward_formula, setup_context=setup_context)

    def margin_cross_entropy(embeddings, weight, labels, margin, scale, sub_centers=1,
                             label_smoothing=0.0, ignore_index=-100, reduction="mean",
                             chunk_size=None):
        opts = options(margin, scale, sub_centers, label_smoothing, ignore_index,
                       chunk_size or default_chunk)
        loss_rows, lse = fwd(embeddings, weight, labels, *opts)
        return reduce_rows(loss_rows, labels != ignore_index, reduction), lse

    margin_cross_entropy.__doc__ = f"The {backend!r} backend: fastmargin.reference's contract."
    return margin_cross_entropy
