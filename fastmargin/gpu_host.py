"""The host side that the two GPU backends share (docs/design.md §2-4): the norms their kernels read,
the fixed-order merge of the forward's class splits, and the finish of dx.

Both the Triton kernels (kernels/) and the CUDA kernels (csrc/cuda/) walk the classes in
splits, each program writing per-split partial results; merging them here, in a fixed order,
makes the result independent of which program finished first (no atomics). `register`
turns a backend's two kernel launchers into its custom ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import fused
from .margins import NORM_EPS, PARAMS, SPHERE

_SCALE = PARAMS.index("scale")


def norms(v: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """||v_r|| and 1 / max(||v_r||, NORM_EPS), (R,) each in `dtype`, read in v's dtype (no
    upcast copy of v is made)."""
    norm = torch.linalg.vector_norm(v, dim=1, dtype=dtype)
    return norm, 1.0 / norm.clamp(min=NORM_EPS)


def merge_splits(row_max, row_sum_exp, z_sum, z_target):
    """(lse, z_target, z_sum), (B,) each, from per-split partials (splits, B): each split's
    running max m_s and sum l_s of exp(z - m_s), lse = M + log Σ_s l_s exp(m_s - M)."""
    top = row_max.max(dim=0).values
    lse = top + torch.log((row_sum_exp * torch.exp(row_max - top)).sum(dim=0))
    z_sum = z_sum.sum(dim=0)
    # A NaN logit can vanish from a running max (max(a, NaN) = a); z_sum keeps it.
    return torch.where(torch.isnan(z_sum), z_sum, lse), z_target.sum(dim=0), z_sum


def finish_dx(dx_hat, norm_grad, x, x_norm, x_inv_norm, params, kind):
    """dx like x from the per-split partials dx̂ (splits, B, D) and Σ_j dz_ij zc_ij (splits, B).

    dx_i = (dx̂_i - x̂_i a_i) / n_i with a_i = <x̂_i, dx̂_i> (no radial term below NORM_EPS,
    where the norm is a constant), plus SphereFace's gradient through S_i = s ||x_i||:
    s Σ_j dz_ij zc_ij x_i / ||x_i||.
    """
    dx_hat = dx_hat.sum(dim=0)
    xc = x.to(params.dtype)
    x_hat = xc * x_inv_norm[:, None]
    a = torch.where(x_norm < NORM_EPS, 0.0, (x_hat * dx_hat).sum(dim=1))
    dx = (dx_hat - x_hat * a[:, None]) * x_inv_norm[:, None]
    if kind == SPHERE:
        scale = params[_SCALE].expand(x.shape[0])
        dx = dx + xc * torch.where(x_norm > 0, scale * norm_grad.sum(dim=0) / x_norm, 0.0)[:, None]
    return torch.empty_like(x).copy_(dx)


def register(backend: str, forward_partials: Callable, backward_partials: Callable, device_type: str) -> Callable:
    """The custom ops of a GPU backend (fastmargin.fused.register) from its launchers:

        forward_partials(x, w, labels, x_norm, x_inv_norm, w_inv_norm, params, flags, K, chunk,
                         allow_tf32) -> (row_max, row_sum_exp, z_sum, z_target), (splits, B) each
        backward_partials(g_lse, g_target, g_sum, x, w, labels, lse, x_norm, x_inv_norm, w_norm,
                          w_inv_norm, params, flags, K, chunk, allow_tf32)
            -> (dx_hat (splits, B, D), norm_grad (splits, B), dw like w)

    with the norms and (B,) vectors contiguous in the compute dtype; chunk 0 lets the
    launcher split the classes by the device's size. Returns row_statistics."""

    def forward(x, w, labels, params, flags, sub_centers, chunk, allow_tf32):
        if x.shape[0] == 0:
            return tuple(x.new_empty(0, dtype=params.dtype) for _ in range(3))
        x_norm, x_inv_norm = norms(x, params.dtype)
        _, w_inv_norm = norms(w, params.dtype)
        partials = forward_partials(x, w, labels.contiguous(), x_norm, x_inv_norm, w_inv_norm, params, flags,
                                    sub_centers, chunk, allow_tf32)
        return merge_splits(*partials)

    def backward(g_lse, g_target, g_sum, x, w, labels, lse, params, flags, sub_centers, chunk, allow_tf32):
        if x.shape[0] == 0:
            return torch.empty_like(x), torch.zeros_like(w)
        x_norm, x_inv_norm = norms(x, params.dtype)
        w_norm, w_inv_norm = norms(w, params.dtype)
        # The gradient of loss.sum() arrives with stride 0: the kernels read contiguous vectors.
        vectors = (v.to(params.dtype).contiguous() for v in (g_lse, g_target, g_sum))
        dx_hat, norm_grad, dw = backward_partials(
            *vectors, x, w, labels.contiguous(), lse.to(params.dtype).contiguous(), x_norm, x_inv_norm, w_norm,
            w_inv_norm, params, flags, sub_centers, chunk, allow_tf32)
        return finish_dx(dx_hat, norm_grad, x, x_norm, x_inv_norm, params, flags[0]), dw

    # 0: the launcher splits the classes by the device's size.
    return fused.register(backend, forward, backward, device_type, lambda batch, sub_centers: 0)
