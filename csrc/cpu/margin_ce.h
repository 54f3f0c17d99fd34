// The fused CPU margin cross-entropy (docs/design.md §1-3), declared for the binding file.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "margin.h"

namespace fastmargin {

// The row statistics every loss is built from (fastmargin/fused.py, docs/design.md §2): with
// z_ij the logits, lse_i = log Σ_j exp z_ij, z_target_i = z_iy and z_sum_i = Σ_j z_ij.
// x (B, D), w (C*K, D) any strides, float16/bfloat16/float32/float64; labels (B,) int64,
// where a label outside [0, C) means "no target column here" (an ignored row, or a target
// on another rank's shard): no margin, z_target 0. params (kNumParams, 1 or B), the
// lowered margin (fastmargin.margins.lower) in the compute dtype, which the kernel computes
// in; chunk: classes per block of the walk over the classes (each thread walks its own
// share of the classes with a block of its own: O(threads * B * chunk * K) extra memory).
// The inputs are checked by the op (fastmargin/fused.py). Returns (lse, z_target, z_sum),
// each (B,) in the compute dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> margin_ce_cpu_forward(const at::Tensor& x, const at::Tensor& w,
                                                                     const at::Tensor& labels,
                                                                     const at::Tensor& params, const MarginFlags& flags,
                                                                     int64_t sub_centers, int64_t chunk);

// From the gradients of the three statistics (each (B,), any strides) and the lse the
// forward returned: dz_ij = g_lse_i p_ij + g_target_i [j = y_i] + g_sum_i. Returns
// (dx, dw), each laid out like its input (at::empty_like: a dense input's strides, else
// contiguous) in its dtype.
std::tuple<at::Tensor, at::Tensor> margin_ce_cpu_backward(const at::Tensor& grad_lse, const at::Tensor& grad_target,
                                                          const at::Tensor& grad_sum, const at::Tensor& x,
                                                          const at::Tensor& w, const at::Tensor& labels,
                                                          const at::Tensor& lse, const at::Tensor& params,
                                                          const MarginFlags& flags, int64_t sub_centers,
                                                          int64_t chunk);

// Whether this CPU runs the GEMMs of bfloat16 x and W on AVX512-BF16 (bf16 products, fp32
// sums; the backward's operand G rounded to bf16, as on the GPU backends), else on fp32 GEMMs.
bool margin_ce_cpu_bf16_gemms();

}  // namespace fastmargin
