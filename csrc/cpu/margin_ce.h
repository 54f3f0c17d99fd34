// The fused CPU margin cross-entropy (DESIGN §1-3), declared for the binding file.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace fastmargin {

// The loss options every call carries; the margin fields are fastmargin.margins.Margin's.
struct LossOptions {
  double scale;
  double m1, m2, m3;
  int64_t sphere_m;  // 0: not SphereFace
  double sphere_lambda;
  bool clamp_theta;
  bool detached;
  int64_t sub_centers;
  double label_smoothing;
  int64_t ignore_index;
  int64_t chunk;  // classes per block of the walk over the classes
};

// x (B, D), w (C*K, D) any strides, float16/bfloat16/float32/float64; labels (B,) int64.
// Returns (loss_rows (B,), lse (B,)) in the compute dtype (float64 if x or w is, else
// float32); loss_rows is 0 at ignored rows.
std::tuple<at::Tensor, at::Tensor> margin_ce_cpu_forward(const at::Tensor& x, const at::Tensor& w,
                                                         const at::Tensor& labels, const LossOptions& opt);

// grad_rows (B,) any strides: d loss / d loss_rows. Returns (dx like x, dw (C*K, D)
// contiguous in w's dtype).
std::tuple<at::Tensor, at::Tensor> margin_ce_cpu_backward(const at::Tensor& grad_rows, const at::Tensor& x,
                                                          const at::Tensor& w, const at::Tensor& labels,
                                                          const at::Tensor& lse, const LossOptions& opt);

}  // namespace fastmargin
