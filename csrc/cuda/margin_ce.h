// The fused CUDA margin cross-entropy (docs/design.md §1-3) as the binding file sees it: plain
// pointers and a plan, no torch. The binding (csrc/fastmargin.cpp) allocates, makes the
// LaunchPlan (launch_plan.h) and launches; the kernels are margin_ce_fwd.cu and
// margin_ce_bwd.cu. They write per-split partial results, which fastmargin/gpu_host.py
// merges in a fixed order, as it does the Triton kernels'.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/launch_plan.h"
#include "margin.h"

namespace fastmargin {
namespace cuda {

// A 2-D tensor of any strides (in elements); data points at element (0, 0).
struct Matrix {
  const void* data;
  int64_t stride0, stride1;
  DType dtype;
};

// Every pointer of one call. "acc" vectors and buffers are in the compute dtype: float,
// or double when the plan's operand is kFloat64; all are contiguous.
struct MarginCeArgs {
  Matrix x;                 // (B, D)
  Matrix w;                 // (C*K, D), class-major: row c*K + k
  const int64_t* labels;    // (B,); outside [0, C): no target column
  const void* x_norm;       // (B,) acc: ||x_i|| (SphereFace's scale)
  const void* x_inv_norm;   // (B,) acc: 1 / max(||x_i||, kNormEps)
  const void* w_norm;       // (C*K,) acc
  const void* w_inv_norm;   // (C*K,) acc
  const void* params;       // (kNumParams, R) acc: the lowered margin (margin.h), row i's in column i
  int64_t stride_param, stride_row;  // stride_row 0 when every row reads column 0
  MarginFlags flags;
  // backward inputs, (B,) acc each: the forward's lse and the statistics' gradients
  const void* lse;
  const void* g_lse;
  const void* g_target;
  const void* g_sum;
  // forward outputs, (splits, B) acc each: per split, running max and sum of exp(z - max),
  // Σ_j z_ij and z_iy
  void* row_max;
  void* row_sum_exp;
  void* z_sum;
  void* z_target;
  // backward outputs: per split, dx̂ (splits, B, D) and Σ_j dz_ij z_ij / S_i (splits, B),
  // acc; dW (C*K, D) in its own dtype and strides
  void* dx_hat;
  void* norm_grad;
  void* dw;
  int64_t stride_dwn, stride_dwd;
  DType dw_dtype;
};

// Launch on `stream`; the result of the launches (cudaSuccess, or why not).
cudaError_t margin_ce_forward(const LaunchPlan& plan, const MarginCeArgs& args, cudaStream_t stream);
cudaError_t margin_ce_backward(const LaunchPlan& plan, const MarginCeArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmargin
