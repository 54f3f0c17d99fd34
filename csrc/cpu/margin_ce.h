// The fused CPU margin cross-entropy (DESIGN §1-3), declared for the binding file.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace fastmargin {

// The options every call carries; the margin fields are fastmargin.margins.Margin's.
struct LossOptions {
  double scale;
  double m1, m2, m3;
  int64_t sphere_m;  // 0: not SphereFace
  double sphere_lambda;
  bool clamp_theta;
  bool detached;
  int64_t sub_centers;
  int64_t chunk;  // classes per block of the walk over the classes
};

// The row statistics every loss is built from (fastmargin/fused.py, DESIGN §1): with
// z_ij the logits, lse_i = log Σ_j exp z_ij, z_target_i = z_iy and z_sum_i = Σ_j z_ij.
// x (B, D), w (C*K, D) any strides, float16/bfloat16/float32/float64; labels (B,) int64,
// where a label outside [0, C) means "no target column here" (an ignored row, or a target
// on another rank's shard): no margin, z_target 0. Returns (lse, z_target, z_sum), each
// (B,) in the compute dtype (float64 if x or w is, else float32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> margin_ce_cpu_forward(const at::Tensor& x, const at::Tensor& w,
                                                                     const at::Tensor& labels,
                                                                     const LossOptions& opt);

// From the gradients of the three statistics (each (B,), any strides) and the lse the
// forward returned: dz_ij = g_lse_i p_ij + g_target_i [j = y_i] + g_sum_i. Returns
// (dx, dw), each laid out like its input (at::empty_like: a dense input's strides, else
// contiguous) in its dtype.
std::tuple<at::Tensor, at::Tensor> margin_ce_cpu_backward(const at::Tensor& grad_lse, const at::Tensor& grad_target,
                                                          const at::Tensor& grad_sum, const at::Tensor& x,
                                                          const at::Tensor& w, const at::Tensor& labels,
                                                          const at::Tensor& lse, const LossOptions& opt);

}  // namespace fastmargin
